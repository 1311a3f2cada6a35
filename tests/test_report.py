"""The claims report on a real MLflow SQLite store of fabricated runs that follow the evaluation contract.

No Ray and no training: each scenario is one experiment of parent + vanilla + Matryoshka children whose curves are
metric histories with step = G, so the verdicts can be steered and must flip with the data. Curve keys are built
with the project's own encoders (the contract's key, stored in the form Tracker.log_curves writes), so these runs
carry exactly what a trial logs.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from orchestrator import stats
from orchestrator.claims import claim_matryoshka
from orchestrator.evidence import load_sweep
from sae.evaluate import curve_key as contract_key
from sweeps.report import main as report_main

N, K, GS, PARTITION = 256, 16, (32, 64, 128, 256), "doubling:32"
SCENARIOS = {
    # name: (Matryoshka FVU change per seed (negative = better), power law wins per seed, train-time ratio per seed)
    "good": ((-0.2, -0.25, -0.15), (True, True, True), (1.2, 1.25, 1.3)),
    "bad": ((0.2, 0.25, 0.15), (False, False, False), (2.9, 3.0, 3.1)),
    "mixed": ((-0.2, 0.2, -0.1), (True, False, True), (0.8, 1.3, 2.0)),
    "undertrained": ((-0.2, -0.25, -0.15), (True, True, True), (1.2, 1.25, 1.3)),
    "one_seed": ((-0.2,), (True,), (1.25,)),
    "minimal": ((-0.2, -0.25, -0.15), (True, True, True), (1.2, 1.25, 1.3)),
}


def curve_key(metric: str, method: str, rule: str) -> str:
    return contract_key(metric, method, rule)


def _curves(method: str, base: np.ndarray, scale: float, *, full: bool) -> dict[str, list[tuple[int, float]]]:
    """Curves of one method for both scoring rules; `scale` multiplies FVU (and divides CE/RSA quality)."""
    out = {}
    for rule, l0 in (("masked", [min(K, g / 16) for g in GS]), ("reselect", [K] * len(GS))):
        fvu = base * scale * (1.1 if rule == "reselect" else 1.0)
        out[curve_key("fvu", method, rule)] = list(zip(GS, fvu, strict=True))
        out[curve_key("l0", method, rule)] = list(zip(GS, l0, strict=True))
        if full and method in ("prefix", "prune_ez2"):
            ce = 1.0 - fvu
            out[curve_key("ce_score", method, rule)] = list(zip(GS, ce, strict=True))
            out[curve_key("ce_score_lo", method, rule)] = list(zip(GS, ce - 0.01, strict=True))
            out[curve_key("ce_score_hi", method, rule)] = list(zip(GS, ce + 0.01, strict=True))
            out[curve_key("rsa", method, rule)] = list(zip(GS, 1.0 - fvu / 2, strict=True))
    if full:
        for proxy in ("proxy/token_conc", "proxy/token_conc_excess"):  # raw (shown) and frequency-matched (judged)
            out[curve_key(proxy, method, "masked")] = list(zip(GS, 0.3 * scale * np.ones(len(GS)), strict=True))
    return out


def _training(still_falling: bool) -> dict[str, list[tuple[int, float]]]:
    """train/fvu (and a Matryoshka prefix) histories, step = tokens: flat after warm-up, or still falling as t^-0.5."""
    steps = np.arange(1, 41) * 1024
    fvu = 0.1 * (steps[-1] / steps) ** 0.5 if still_falling else 0.1 + 0.001 * np.sin(steps)
    return {"train/fvu": list(zip(steps, fvu, strict=True)), "train/prefix_fvu/32": list(zip(steps, 2 * fvu, strict=True))}


def _child(client: MlflowClient, exp: str, parent: str, partition: str, seed: int, finals: dict, curves: dict) -> None:
    run = client.create_run(exp, tags={"mlflow.parentRunId": parent, "sae_frontier.kind": "trial"}).info.run_id
    params = {"n_latents": N, "k": K, "architecture": "topk", "partition": partition, "seed": seed,
              "boundaries": "32,64,128,256" if partition != "none" else str(N)}
    client.log_batch(run, params=[Param(k, str(v)) for k, v in params.items()])
    metrics = [Metric(k, float(v), 0, 0) for k, v in finals.items()]
    metrics += [Metric(key, float(v), 0, int(g)) for key, pts in curves.items() for g, v in pts]
    client.log_batch(run, metrics=metrics)
    client.set_terminated(run, "FINISHED")


def fabricate(client: MlflowClient, tmp_path, name: str) -> str:
    """One sweep following the contract: returns the parent run id."""
    deltas, pl_wins, ratios = SCENARIOS[name]
    full = name != "minimal"
    exp = client.create_experiment(name, artifact_location=(tmp_path / "artifacts" / name).as_uri())
    parent = client.create_run(exp, tags={"sae_frontier.kind": "sweep", "sae_frontier.spec_hash": f"hash-{name}"})
    pid = parent.info.run_id
    params = {"spec": "smoke", "search": "grid", "model": "tiny-lm", "site": "resid_post.1", "corpus": "wiki",
              "train_tokens": 4096, "eval_tokens": 1024, "granularities": "32,64,128,256", "revision": "main",
              "activations_key": "abc123", "commit": "deadbeef", "scoring_rule_primary": "masked"}
    client.log_batch(pid, params=[Param(k, str(v)) for k, v in params.items()])
    client.log_text(pid, "name: smoke\n", "spec.yaml")
    for seed, (delta, wins, ratio) in enumerate(zip(deltas, pl_wins, ratios, strict=True)):
        base = 0.5 * (np.array(GS) / 32.0) ** -0.5 * (1 + 0.01 * seed)
        vanilla = {**_curves("prune_ez2", base, 1.0, full=full)}
        if full:
            near_full = np.where(np.array(GS) < N, 1.0, 0.0)
            vanilla |= _curves("prune_freq", base * (1 + 0.1 * near_full), 1.0, full=False)
            vanilla |= _curves("prune_random", base * (1 + 0.5 * near_full), 1.0, full=False)
            vanilla[curve_key("fvu_std", "prune_random", "masked")] = list(zip(GS, 0.02 * near_full, strict=True))
        errs = (0.01, 0.05, 0.08) if wins else (0.09, 0.02, 0.05)
        v_final = {"fvu": base[-1], "monotone_fvu": 1.0, "power_law/exponent": 0.8 + 0.01 * seed,
                   "power_law/exponent_lo": 0.75, "power_law/exponent_hi": 0.85, "power_law/heldout_mse_power_law": errs[0],
                   "power_law/heldout_mse_exponential": errs[1], "power_law/heldout_mse_lognormal": errs[2],
                   "power_law/preferred_power_law": float(wins)} if full else {"fvu": base[-1]}
        if full:
            v_final["train_seconds"] = 10.0 + seed
        _child(client, exp, pid, "none", seed, v_final, vanilla)
        m_final = {"fvu": base[-1] * (1 + delta), "monotone_fvu": 0.0 if name == "undertrained" else 1.0}
        if full:
            m_final |= {"train_seconds": (10.0 + seed) * ratio, "proxy/group0/token_conc_excess": 0.5 + 0.01 * seed,
                        "proxy/group3/token_conc_excess": 0.3, "proxy/group0/n_judged": 32.0,
                        "proxy/group3/n_judged": 128.0}
        matryoshka = _curves("prefix", base, 1 + delta, full=full) | _curves("prune_ez2", base, 1.3, full=full)
        if full:
            matryoshka |= _training(still_falling=name == "undertrained")
            vanilla |= {"train/fvu": _training(still_falling=False)["train/fvu"]}
        _child(client, exp, pid, PARTITION, seed, m_final, matryoshka)
    client.set_terminated(pid, "FINISHED")
    return pid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store holding every scenario as its own experiment (one store: migrations run once)."""
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    parents = {name: fabricate(client, tmp, name) for name in SCENARIOS}
    return uri, client, parents


def verdicts(md: str) -> dict[int, str]:
    return {int(n): v for n, v in re.findall(r"^## (\d)\. .*?\n\n\*\*Verdict: ([a-z ]+)\*\*", md, flags=re.M | re.S)}


def run_report(store, name: str, out) -> str:
    uri, _, _ = store
    assert report_main(["--experiment", name, "--tracking-uri", uri, "--out", str(out)]) == 0
    return (out / name / "REPORT.md").read_text()


def test_full_report_sections_figures_and_artifacts(store, tmp_path):
    uri, client, parents = store
    md = run_report(store, "good", tmp_path)
    assert verdicts(md) == {1: "confirmed", 2: "confirmed", 3: "confirmed", 4: "confirmed", 5: "confirmed"}
    for text in (parents["good"], "hash-good", "deadbeef", "tiny-lm", "resid_post.1", "`masked`", "`reselect`",
                 "at matched L0", "noisy", "docs/science.md", "lognormal", "innermost", "Training budget"):
        assert text in md, text
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert len(figures) == 6 and all((tmp_path / "good" / f).stat().st_size > 1000 for f in figures)
    logged = {a.path for a in client.list_artifacts(parents["good"], "report")}
    assert {"report/REPORT.md", *(f"report/{f}" for f in figures)} <= logged
    # a second run replaces the folder atomically and leaves no temp folders behind
    assert run_report(store, "good", tmp_path) == md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good"]


@pytest.mark.parametrize(("name", "expected"), [("bad", {1: "refuted", 2: "refuted", 5: "refuted"}),
                                                ("mixed", {1: "inconclusive", 2: "inconclusive", 5: "inconclusive"})])
def test_verdicts_flip_with_the_data(store, tmp_path, name, expected):
    got = verdicts(run_report(store, name, tmp_path))
    assert {c: got[c] for c in expected} == expected


def test_training_budget_tells_a_plateau_from_a_curve_still_falling(store, tmp_path):
    plateau = run_report(store, "good", tmp_path)
    assert "## Training budget" in plateau and re.search(r"Training budget.*?\*\*Verdict: plateau\*\*", plateau, re.S)
    falling = run_report(store, "undertrained", tmp_path)
    assert re.search(r"Training budget.*?\*\*Verdict: still improving\*\*", falling, re.S)
    assert (tmp_path / "good" / "training_budget.png").stat().st_size > 1000


def test_undertrained_matryoshka_gives_no_claim2_verdict(store, tmp_path):
    _, client, parents = store
    sweep = load_sweep(client, "undertrained", parents["undertrained"])
    claim = claim_matryoshka(sweep, tmp_path)
    assert claim.verdict == "inconclusive"
    assert "undertrained" in "\n".join(claim.lines) and "confirmed" not in "\n".join(claim.lines).split("Per-G")[0]


def test_one_seed_uses_context_intervals_for_ce_only(store, tmp_path):
    md = run_report(store, "one_seed", tmp_path)
    section2 = md.split("## 2.")[1].split("## 3.")[0]
    assert "one seed: interval unavailable" in section2 and "one seed: CE context intervals" in section2
    assert verdicts(md)[5] == "inconclusive"


def test_missing_metrics_say_not_measured(store, tmp_path):
    got = verdicts(run_report(store, "minimal", tmp_path))
    assert got[1] == got[3] == got[4] == got[5] == "not measured"
    assert got[2] == "confirmed"


def test_paired_bootstrap_interval_shrinks_with_more_seeds():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 0.3, 40), rng.normal(1.2, 0.3, 40)
    widths = [(e.hi - e.lo) for e in (stats.paired_bootstrap(a[:n], b[:n]) for n in (3, 10, 40))]
    assert widths[0] > widths[1] > widths[2] > 0
    assert stats.paired_bootstrap(a[:10], b[:10]) == stats.paired_bootstrap(a[:10], b[:10])  # seeded
    assert not stats.paired_bootstrap(a[:1], b[:1]).has_interval
    # with 3 seeds the percentile bootstrap alone is the range of the differences; the t interval is wider
    three = stats.paired_bootstrap([0.1, 0.2, 0.3], [0.0, 0.0, 0.0])
    assert three.lo < 0.1 and three.hi > 0.3 and three.lo < 0  # a unanimous sign alone is not significant


def test_verdict_rules():
    neg = stats.bootstrap_mean([-1.0, -2.0, -1.5])
    assert stats.sign_verdict(neg, "negative") == "confirmed" and stats.sign_verdict(neg, "positive") == "refuted"
    split = stats.bootstrap_mean([-3.0, -2.0, -2.5, -2.2, 0.1])
    assert split.hi < 0 and stats.sign_verdict(split, "negative") == "inconclusive"  # one seed disagrees
    assert stats.sign_verdict(split, "negative", unanimous=False) == "confirmed"
    assert stats.interval_verdict(1.1, 1.4, lower=1.0, upper=1.5) == "confirmed"
    assert stats.interval_verdict(1.6, 2.0, lower=1.0, upper=1.5) == "refuted"
    assert stats.interval_verdict(0.9, 1.2, lower=1.0, upper=1.5) == "inconclusive"
    assert stats.majority_verdict(["confirmed", "confirmed", "inconclusive"]) == "confirmed"
    assert stats.majority_verdict(["confirmed", "confirmed"], ["refuted"]) == "inconclusive"
    assert stats.majority_verdict(["undertrained"]) == "inconclusive"
    assert stats.all_or_any_verdict(["confirmed", "refuted"]) == "refuted"
