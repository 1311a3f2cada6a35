"""The smoke sweep end to end in-process: real harvest, Ray Tune trials, MLflow on SQLite, frontier, Optuna."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from test_frontier import brute_force_pareto
from test_saelens import read_saelens, saelens_forward

from orchestrator.frontier import CRITERIA, progressive_points
from orchestrator.report import make_report
from orchestrator.search import OBJECTIVES, optuna_storage_url, study_name
from orchestrator.spec import load_spec
from orchestrator.sweep import compare, run_sweep
from orchestrator.tracking import PARENT_TAG, Tracker
from sae.checkpoint import load_sae
from sae.evaluate import curve_key
from sae.prune import RULES

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep_home")
    yield path
    ray.shutdown()


def smoke(home: Path, **over):
    return load_spec("smoke", {"storage": str(home / "shards"), "results_path": str(home / "results"),
                               "tracking_uri": f"sqlite:///{home}/mlflow.db", **over})


@pytest.fixture(scope="module")
def grid_sweep(home):
    spec = smoke(home)
    outcome = run_sweep(spec)
    return spec, outcome


def children(client: MlflowClient, spec, parent_id: str):
    exp = client.get_experiment_by_name(spec.experiment_name)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'")


def test_every_grid_point_is_a_child_run_with_curves_and_artifacts(grid_sweep, tmp_path):
    spec, outcome = grid_sweep
    client = MlflowClient(spec.resolved_tracking_uri())
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sae_frontier.spec_hash"] == spec.spec_hash()
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id, "frontier")}
    assert {"frontier/frontier.csv", "frontier/frontier.png", "frontier/curve_points.csv"} <= parent_files
    assert "spec.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert 0.0 < float(parent.data.params["eval_top1pct_variance_share"]) <= 1.0
    assert parent.data.params["activations_key"] and parent.data.params["scoring_rule_primary"] == "masked"

    runs = children(client, spec, outcome.parent_run_id)
    expected = {(p.n_latents, p.k, p.architecture, p.partition, p.seed) for p in spec.trial_points()}
    got = {(int(r.data.params["n_latents"]), int(r.data.params["k"]), r.data.params["architecture"],
            r.data.params["partition"], int(r.data.params["seed"])) for r in runs}
    assert len(runs) == len(expected) and got == expected
    gs = spec.granularities()
    for run in runs:
        assert run.info.status == "FINISHED"
        n = int(run.data.params["n_latents"])
        matryoshka = run.data.params["partition"] != "none"
        boundaries = set(json.loads(run.data.params["boundaries"].replace("'", '"'))) if matryoshka else set()
        methods = ["prefix", "prune_ez2"] if matryoshka else ["prune_ez2", "prune_freq", "prune_random"]
        principal = "prefix" if matryoshka else "prune_ez2"

        def steps(key, run_id=run.info.run_id):
            return sorted(m.step for m in client.get_metric_history(run_id, key))

        for method in methods:
            want = [g for g in gs if g <= n and (method != "prefix" or g in boundaries)]  # prefixes: trained cuts only
            for rule in RULES:
                for metric in ("fvu", "l0", "mse", "dead_fraction"):
                    assert steps(curve_key(metric, method, rule)) == want, (metric, method, rule)
        for metric in ("ce_score", "ce_score_lo", "ce_score_hi", "kl_score", "rsa", "cka"):
            assert steps(curve_key(metric, principal, "masked")) == steps(curve_key("fvu", principal, "masked")), metric
        assert steps(curve_key("rsa", principal, "reselect")) and not steps(curve_key("ce_score", principal, "reselect"))
        assert steps(curve_key("proxy/token_conc", principal, "masked"))
        if not matryoshka:
            assert steps(curve_key("fvu_std", "prune_random", "masked"))
        else:
            assert {f"proxy/group{i}/token_conc" for i in range(len(boundaries))} <= set(run.data.metrics)
            assert steps(f"train/prefix_fvu/{max(boundaries)}")
        assert run.data.metrics["monotone_fvu"] in (0.0, 1.0) and steps("spectrum/eigenvalue")[:2] == [1, 2]
        train_steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/fvu")]
        assert train_steps == sorted(train_steps) and train_steps[-1] > 0  # step = tokens seen
        assert "power_law/exponent" in run.data.metrics
        files = {a.path for a in client.list_artifacts(run.info.run_id, "sae")}
        assert {"sae/sae.safetensors", "sae/cfg.json"} <= files
        plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert {"plots/power_law.png", "plots/pruning_fvu.masked.png", "plots/pruning_fvu.reselect.png"} <= plots
        local = client.download_artifacts(run.info.run_id, "sae", str(tmp_path / run.info.run_id))
        sae = load_sae(local)
        assert sae.cfg.n_latents == n and sae.cfg.k == int(run.data.params["k"])
        lens = client.download_artifacts(run.info.run_id, "sae_lens", str(tmp_path / run.info.run_id))
        cfg, weights = read_saelens(Path(lens))  # the trained SAE, raw activations in and out, as SAELens runs it
        assert cfg["metadata"]["hook_name"] == f"blocks.{spec.layer}.hook_{spec.site.split('.')[0]}"
        x = torch.randn(32, sae.cfg.d_in) / sae.cfg.input_scale
        z, x_hat = saelens_forward(cfg, weights, x)
        torch.testing.assert_close(z, sae.encode_dense(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(x_hat, sae(x), rtol=1e-4, atol=1e-4 / sae.cfg.input_scale)


def test_frontier_is_the_pareto_set_of_the_logged_metrics(grid_sweep):
    spec, outcome = grid_sweep
    points = Tracker(spec.resolved_tracking_uri(), spec.experiment_name).curve_points(
        [spec.experiment_name], parent_id=outcome.parent_run_id)
    prog = progressive_points(points)
    assert not prog.empty and set(prog["G"]) == set(spec.granularities())
    front = outcome.frontier
    for criterion, (cost, quality, maximise) in CRITERIA.items():
        for g, at_g in prog.groupby("G"):
            mask = brute_force_pareto(at_g[cost].to_numpy(), at_g[quality].to_numpy(), maximise)
            got = front[(front["criterion"] == criterion) & (front["G"] == g)]
            assert sorted(got["run_id"]) == sorted(at_g[mask]["run_id"]), (criterion, g)
            assert np.isfinite(got[quality]).all()


def test_optuna_study_is_persisted_and_matches_mlflow_frontier(home):
    spec = smoke(home, experiment="sae-frontier-smoke-optuna")
    outcome = run_sweep(spec, search="optuna", trials=3)
    study = optuna.load_study(study_name=study_name(spec), storage=optuna_storage_url(spec))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3
    assert study.metric_names == OBJECTIVES  # optuna-dashboard labels the objectives with these
    exp_id = MlflowClient(spec.resolved_tracking_uri()).get_run(outcome.parent_run_id).info.experiment_id
    assert outcome.parent_run_url.endswith(f"/#/experiments/{exp_id}/runs/{outcome.parent_run_id}"
                                           "?workflowType=machine_learning")  # what the sweep prints at its end
    client = MlflowClient(spec.resolved_tracking_uri())
    runs = children(client, spec, outcome.parent_run_id)
    assert len(runs) == 3
    # the study's Pareto trials are the runs MLflow shows as Pareto-optimal in (size, FVU at the objective G)
    g0 = spec.objective_granularity()
    prog = progressive_points(outcome.points)
    at_g0 = prog[prog["G"] == g0]
    mlflow_front = at_g0[brute_force_pareto(at_g0["n_latents"].to_numpy(), at_g0["fvu"].to_numpy(), False)]
    optuna_front = {(t["objective_size"], round(t["objective_fvu"], 6)) for t in outcome.pareto_trials}
    assert optuna_front == {(float(r.n_latents), round(r.fvu, 6)) for r in mlflow_front.itertuples()}


def _finished_children(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], "tags.`sae_frontier.kind` = 'trial' and attributes.status = 'FINISHED'")


def status_table_rows(out: str) -> list[str]:
    """The trial rows of the Tune status tables in a sweep's printed output."""
    return [line for line in out.splitlines()
            if line.startswith("│ ") and re.search(r"\s(PENDING|RUNNING|TERMINATED|ERROR|PAUSED)\s", line)]


def assert_quiet_log(out: str, spec) -> None:
    """A sweep's output into a pipe (a log, not a terminal): Tune's status table names each trial by its grid
    point (not by its pack dict cut to its last 20 characters); neither Ray Data nor a trial's LM load prints
    progress."""
    names = {p.name for p in spec.trial_points()}
    rows = status_table_rows(out)
    assert rows, out[-3000:]
    for row in rows:
        assert row.split("│")[1].strip().split(" (")[0] in names and "}" not in row, row
    assert "Running Dataset" not in out and "Loading weights" not in out
    done = re.findall(r"^Trial (\S+) \(\w+\) completed after \d+ iterations in \d+ s: 1 points, 0 failed; fvu=", out, re.M)
    assert done and set(done) <= names, out[-3000:]  # a finished trial is one line, not Tune's result box
    assert not re.search(r"│ Trial .* result", out)


def test_interrupted_sweep_resumes_without_duplicate_runs(home):
    """SIGINT a running sweep after its first trial finishes, then --resume: no run is duplicated or redone.
    Both runs print into pipes, so their output is also checked to be a quiet log (assert_quiet_log)."""
    uri = f"sqlite:///{home}/resume.db"
    args = [sys.executable, str(ROOT / "sweeps" / "frontier.py"), "--spec", "smoke", "--tracking-uri", uri,
            "--storage", str(home / "shards")]
    env = {**os.environ, "SAE_FRONTIER_HOME": str(home / "resume_home")}
    spec = load_spec("smoke")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and not _finished_children(uri, spec.experiment_name) and proc.poll() is None:
        time.sleep(1)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    before = {r.info.run_id: r.info.end_time for r in _finished_children(uri, spec.experiment_name)}
    assert before, out[-3000:]
    assert_quiet_log(out, spec)
    if proc.returncode == 0:
        pytest.skip("the sweep finished before the interrupt landed; nothing to resume")
    assert proc.returncode == 130, out[-3000:]

    done = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_quiet_log(done.stdout, spec)  # a restored Tuner keeps the trials' names
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(spec.experiment_name)
    parents = client.search_runs([exp.experiment_id], "tags.`sae_frontier.kind` = 'sweep'")
    trials = client.search_runs([exp.experiment_id], "tags.`sae_frontier.kind` = 'trial'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == len(spec.trial_points())
    assert len({r.data.tags["sae_frontier.point_key"] for r in trials}) == len(trials)
    assert all(r.info.status == "FINISHED" for r in trials)
    for r in trials:  # a trial restarted from a checkpoint does not log its training steps twice
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")]
        assert len(steps) == len(set(steps)) and steps
    after = {r.info.run_id: r.info.end_time for r in trials}
    assert all(after[rid] == end for rid, end in before.items())  # finished trials were not rerun


def test_report_on_the_smoke_sweep_writes_every_claim_with_figures(grid_sweep, tmp_path):
    spec, outcome = grid_sweep
    folder = make_report(spec.resolved_tracking_uri(), spec.experiment_name, tmp_path / "reports",
                         parent_id=outcome.parent_run_id)
    text = (folder / "REPORT.md").read_text()
    for claim in range(1, 6):
        assert f"## {claim}." in text, claim
    assert text.count("**Verdict:") >= 5
    assert spec.spec_hash() in text
    figures = sorted(p.name for p in folder.glob("*.png"))
    assert len(figures) >= 4 and all(f"({name})" in text for name in figures)
    logged = {a.path for a in MlflowClient(spec.resolved_tracking_uri()).list_artifacts(outcome.parent_run_id, "report")}
    assert "report/REPORT.md" in logged


def test_compare_draws_earlier_sweeps_without_training(grid_sweep, tmp_path):
    spec, outcome = grid_sweep
    frontier, out = compare([spec.experiment_name], spec.resolved_tracking_uri(), str(tmp_path / "cmp"))
    assert {"frontier.csv", "frontier.png", "compare.png"} <= {p.name for p in out.iterdir()}
    # the experiment holds just this sweep, so its frontier read back from MLflow is the one the sweep logged
    key = ["G", "criterion", "run_id"]
    assert sorted(map(tuple, frontier[key].to_numpy())) == sorted(map(tuple, outcome.frontier[key].to_numpy()))
