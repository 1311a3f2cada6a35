"""The progressive evaluation of one SAE (sae/evaluate.py) on planted synthetic data, without an LM."""

from __future__ import annotations

import pytest
import torch
from synthetic import batches, make_planted

from sae.config import SAEConfig, TrainConfig
from sae.evaluate import EvalData, EvalOptions, evaluate_progressive, principal_method
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


@pytest.mark.slow
def test_vanilla_report_has_every_curve_at_every_G(planted):
    train, data = planted
    sae = _train(train)
    seen = []
    report = evaluate_progressive(sae, data, EvalOptions(granularities=[*GS, 256], rsa_tokens=256), progress=seen.append)
    for method in ("prune_ez2", "prune_freq", "prune_random"):
        for metric in ("fvu", "mse", "l0", "rsa", "cka", "token_conc", "probe_acc"):
            assert [g for g, _ in report.curves[f"{metric}/{method}"]] == GS, (metric, method)
    # importance ordering beats a random subset at every G below n (claim 3)
    for g in GS[:-1]:
        assert report.at("fvu", "prune_ez2", g) < report.at("fvu", "prune_random", g)
    # at G = n every ordering is the whole SAE
    assert report.at("fvu", "prune_random", 128) == pytest.approx(report.final["fvu"])
    assert report.final["power_law/n_fit"] > 0 and "power_law/exponent" in report.final
    assert principal_method(False) == "prune_ez2" and len(seen) == 3 * len(GS)
    assert report.curve_rows("fvu")["prune_ez2"][0] == {"G": 8, "fvu": report.at("fvu", "prune_ez2", 8)}


@pytest.mark.slow
def test_matryoshka_report_has_prefix_curves_and_group_proxies(planted):
    train, data = planted
    sae = _train(train, partition=(16, 32, 64, 128))
    scored = []

    def scorer(reconstruct):  # a stand-in LM score: how well the reconstruction keeps the activations
        x = data.acts[:256]
        err = float(((reconstruct(x) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
        scored.append(err)
        return {"ce_score": 1 - err, "kl_score": 1 - err}

    report = evaluate_progressive(sae, data, EvalOptions(granularities=GS), scorer=scorer)
    assert {k.split("/")[1] for k in report.curves} == {"prefix", "prune_ez2"}
    prefix_fvu = [v for _, v in report.curves["fvu/prefix"]]
    assert prefix_fvu == sorted(prefix_fvu, reverse=True)  # nested prefixes: FVU falls as G grows
    assert [g for g, _ in report.curves["ce_score/prefix"]] == GS
    assert {f"group{i}/token_conc" for i in range(4)} <= set(report.final)
    assert len(scored) == 1 + 2 * (len(GS) - 1)  # the full SAE once, then every pruned/prefix SAE below n
