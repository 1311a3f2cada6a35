"""The progressive evaluation of one SAE (sae/evaluate.py) on planted synthetic data, without an LM."""

from __future__ import annotations

import pytest
import torch
from synthetic import batches, make_planted

from sae.config import SAEConfig, TrainConfig
from sae.evaluate import (
    EvalData,
    EvalOptions,
    EvalReport,
    curve_key,
    evaluate_progressive,
    monotone_fvu,
    principal_method,
    split_curve_key,
)
from sae.importance import LatentStats, latent_stats
from sae.prune import RULES
from sae.train import train_sae

GS = [8, 16, 32, 64, 128]


@pytest.fixture(scope="module")
def planted():
    p = make_planted(d=32, n_features=96, n_tokens=12288, seed=1)
    train, ev = p.x[:8192], p.x[8192:]
    n = ev.shape[0]
    data = EvalData(
        acts=ev, token_ids=torch.arange(n) % 50, context_ids=torch.arange(n) // 32, doc_ids=torch.arange(n) // 32,
        labels=[("even" if (i // 32) % 2 else "odd") for i in range(n)], batch_size=1024,
    )
    return train, data


def _train(train, partition=None):
    cfg = SAEConfig(d_in=32, n_latents=128, k=4, partition=partition)
    return train_sae(cfg, TrainConfig(lr=1e-2, warmup_steps=10, seed=0, dead_tokens=4096), batches(train, 256, epochs=2)).eval()


def _reversed(stats: LatentStats) -> LatentStats:
    """The same statistics with the ranking turned upside down (a deliberately bad ordering)."""
    return LatentStats(mean_sq=stats.mean_sq.max() - stats.mean_sq, freq=stats.freq.max() - stats.freq,
                       tokens=stats.tokens)


@pytest.mark.slow
def test_vanilla_report_has_every_curve_under_both_rules(planted):
    train, data = planted
    sae = _train(train)
    ranking = latent_stats(sae, train[:4096])  # training tokens rank, eval tokens score
    seen = []
    opts = EvalOptions(granularities=[*GS, 256], rsa_tokens=256, random_draws=3)
    report = evaluate_progressive(sae, data, opts, ranking=ranking, progress=seen.append)
    for method in ("prune_ez2", "prune_freq", "prune_random"):
        for rule in RULES:
            for metric in ("fvu", "mse", "l0", "dead_fraction"):
                assert [g for g, _ in report.curves[curve_key(metric, method, rule)]] == GS, (metric, method, rule)
    assert [g for g, _ in report.curves["fvu_std/prune_random.masked"]] == GS[:-1]  # G = n is the full SAE
    for metric in ("rsa", "cka"):  # similarity for the progressive code the frontier and report compare
        assert [g for g, _ in report.curves[f"{metric}/prune_ez2.reselect"]] == GS
        assert f"{metric}/prune_freq.masked" not in report.curves
    assert [g for g, _ in report.curves["proxy/token_conc/prune_ez2.masked"]] == GS[:-1]
    for g in GS[:-1]:
        # masked keeps the full SAE's picks among the kept latents: L0 below k; reselect fills up to min(k, G-1)
        # (ReLU may zero a re-selected pick, so reselect's L0 is at most, not exactly, min(k, G-1))
        assert report.at("l0", "prune_ez2", g, "masked") < report.at("l0", "prune_ez2", g, "reselect") <= min(4, g - 1)
        for rule in RULES:  # importance ordering beats a random subset at every G below n (claim 3)
            assert report.at("fvu", "prune_ez2", g, rule) < report.at("fvu", "prune_random", g, rule)
    assert report.at("fvu", "prune_random", 128) == pytest.approx(report.final["fvu"])
    assert report.final["power_law/n_fit"] > 0 and "power_law/exponent_lo" in report.final
    assert report.final["monotone_fvu"] == 1.0
    assert [g for g, _ in report.curves["spectrum/eigenvalue"]][:3] == [1, 2, 3]
    assert principal_method(False) == "prune_ez2" and seen
    assert report.curve_rows("fvu")["prune_ez2"][0] == {"G": 8, "fvu": report.at("fvu", "prune_ez2", 8)}
    # the ranking passed in decides the order: an upside-down ranking prunes worse at every G below n
    bad = evaluate_progressive(sae, data, opts, ranking=_reversed(ranking))
    for g in GS[:-1]:
        assert bad.at("fvu", "prune_ez2", g) > report.at("fvu", "prune_ez2", g)


@pytest.mark.slow
def test_matryoshka_report_scores_prefixes_at_trained_boundaries_only(planted):
    train, data = planted
    sae = _train(train, partition=(16, 32, 64, 128))
    scored = []

    def scorer(reconstruct):  # a stand-in LM score: how well the reconstruction keeps the activations
        x = data.acts[:256]
        err = float(((reconstruct(x) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
        scored.append(err)
        return {"ce_score": 1 - err, "kl_score": 1 - err, "ce_score_lo": 0.9 - err, "ce_score_hi": 1.1 - err}

    opts = EvalOptions(granularities=[8, 16, 24, 32, 64, 128], rsa_tokens=256)
    report = evaluate_progressive(sae, data, opts, scorer=scorer, ranking=latent_stats(sae, train[:4096]))
    assert {split_curve_key(k)[1] for k in report.curves if split_curve_key(k)} == {"prefix", "prune_ez2"}
    assert [g for g, _ in report.curves["fvu/prefix.masked"]] == [16, 32, 64, 128]  # never inside a group
    prefix_fvu = [v for _, v in report.curves["fvu/prefix.masked"]]
    assert prefix_fvu == sorted(prefix_fvu, reverse=True)  # nested prefixes: FVU falls as G grows
    assert [g for g, _ in report.curves["ce_score/prefix.masked"]] == [16, 32, 64, 128]
    assert "ce_score_lo/prefix.masked" in report.curves and "ce_score/prefix.reselect" not in report.curves
    assert {f"proxy/group{i}/token_conc" for i in range(4)} <= set(report.final)
    assert {f"proxy/group{i}/token_conc_lift" for i in range(4)} <= set(report.final)
    assert len(scored) == 1 + 3  # the full SAE once, then the (masked) prefixes below n
    opts = EvalOptions(granularities=[8, 16, 24, 32, 64, 128], rsa_tokens=256, report_methods=("prefix", "prune_ez2"))
    report = evaluate_progressive(sae, data, opts, scorer=scorer, ranking=latent_stats(sae, train[:4096]))
    assert [g for g, _ in report.curves["ce_score/prune_ez2.masked"]] == [8, 16, 24, 32, 64, 128]


def test_monotone_fvu_flags_an_undertrained_code():
    report = EvalReport()
    for g, v in [(64, 0.09), (128, 0.07), (256, 0.065), (512, 0.072)]:
        report.add("fvu", "prefix", "masked", g, v)
    assert not monotone_fvu(report, "prefix")
    report = EvalReport()
    for g, v in [(64, 0.09), (128, 0.07), (256, 0.0705), (512, 0.05)]:  # a 0.7% wobble is within tolerance
        report.add("fvu", "prefix", "masked", g, v)
    assert monotone_fvu(report, "prefix")
    assert split_curve_key("proxy/token_conc/prune_ez2.masked") == ("proxy/token_conc", "prune_ez2", "masked")
    assert split_curve_key("spectrum/eigenvalue") is None
