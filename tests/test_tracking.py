"""The MLflow layout on SQLite: runs are reused by their keys (what makes --resume duplicate nothing)."""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.evidence import latest_parent
from orchestrator.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    PARENT_TAG,
    UI_URL_ENV,
    Tracker,
    latest_sweep_run,
    newest_sweep_url,
    run_url,
)


@pytest.fixture
def tracker(tmp_path):
    return Tracker(f"sqlite:///{tmp_path}/mlflow.db", "exp")


def test_parent_and_child_runs_are_reused_by_key(tracker):
    parent = tracker.parent_run("sweep-1", name="sweep-1", spec_hash="h1", spec_yaml="name: x\n", params={"spec": "x"})
    assert tracker.parent_run("sweep-1", name="sweep-1", spec_hash="h1", spec_yaml="", params={}) == parent
    assert tracker.parent_run("sweep-2", name="sweep-2", spec_hash="h1", spec_yaml="", params={}) != parent
    child = tracker.child_run(parent, "point_a", tune_trial="t1", name="a", params={"n_latents": 64})
    # identity is the grid point: another Tune trial (restored, retried, a fresh Tuner of --resume) reuses the run
    assert tracker.child_run(parent, "point_a", tune_trial="t2", name="a", params={"n_latents": 64}) == child
    assert tracker.client.get_run(child).data.tags["sae_frontier.tune_trial"] == "t2"
    other = tracker.child_run(parent, "point_b", tune_trial="t3", name="b", params={"n_latents": 64})
    assert other != child and {r.info.run_id for r in tracker.runs_of(parent)} == {child, other}
    tracker.finish(child)
    assert tracker.finished_points(parent) == {"point_a"}
    assert tracker.close_stale_runs(parent) == 1  # point_b's run, left RUNNING by a dead driver
    assert tracker.client.get_run(other).info.status == "KILLED"
    assert tracker.child_run(parent, "point_b", tune_trial="t4", name="b", params={}) == other  # reopened
    assert tracker.client.get_run(other).info.status == "RUNNING"
    assert tracker.client.get_run(child).info.status == "FINISHED"  # a finished run is never reopened
    assert tracker.client.get_run(child).data.tags[PARENT_TAG] == parent
    assert tracker.client.list_artifacts(parent)[0].path == "spec.yaml"


def test_curves_are_histories_with_step_G(tracker):
    parent = tracker.parent_run("s", name="s", spec_hash="h", spec_yaml="", params={})
    run = tracker.child_run(parent, "t", tune_trial="t", name="t", params={})
    tracker.log_curves(run, {"fvu/prune_ez2": [[64, 0.3], [128, 0.2], [256, float("nan")]]})
    hist = tracker.client.get_metric_history(run, "fvu/prune_ez2")
    assert [(m.step, m.value) for m in hist] == [(64, 0.3), (128, 0.2)]  # NaN is not logged


def test_resume_with_another_spec_is_refused(tracker):
    tracker.parent_run("sweep-1", name="sweep-1", spec_hash="h1", spec_yaml="", params={})
    tracker.check_resumable("sweep-1", "h1")
    with pytest.raises(ValueError, match="another spec"):
        tracker.check_resumable("sweep-1", "h2")


def test_a_new_experiment_opens_in_the_model_training_view(tracker):
    assert EXPERIMENT_KIND_TAG == "mlflow.experimentKind" and EXPERIMENT_KIND == "custom_model_development"
    assert tracker.client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_an_existing_experiment_is_tagged_once(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    plain = client.create_experiment("made-before-the-tag")  # no kind: the UI shows it as GenAI
    genai = client.create_experiment("set-to-genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    for name, exp_id in (("made-before-the-tag", plain), ("set-to-genai", genai)):
        assert Tracker(uri, name).experiment_id == exp_id
        assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
        assert Tracker(uri, name).experiment_id == exp_id  # again: the same experiment, the same tag
        assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert len(client.search_experiments()) == 3  # the two above and MLflow's Default
    chosen = client.create_experiment("kind-chosen-in-the-ui", tags={EXPERIMENT_KIND_TAG: "finetuning"})
    assert Tracker(uri, "kind-chosen-in-the-ui").experiment_id == chosen
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "finetuning"  # a person's choice is kept


def test_run_url_points_at_the_ui_of_the_store(monkeypatch):
    monkeypatch.delenv(UI_URL_ENV, raising=False)
    route = "#/experiments/7/runs/abc123?workflowType=machine_learning"
    assert run_url("sqlite:////data/mlflow/mlflow.db", "7", "abc123") == f"http://127.0.0.1:5000/{route}"
    assert run_url("file:///data/mlruns", "7", "abc123") == f"http://127.0.0.1:5000/{route}"
    assert run_url("https://mlflow.lab.example:8443/", "7", "abc123") == f"https://mlflow.lab.example:8443/{route}"
    monkeypatch.setenv(UI_URL_ENV, "http://127.0.0.1:5001/")  # `make ui UI_PORT=5001`, or a tunnel's port
    assert run_url("sqlite:////data/mlflow/mlflow.db", "7", "abc123") == f"http://127.0.0.1:5001/{route}"
    assert run_url("http://10.0.0.5:5000", "7", "abc123") == f"http://10.0.0.5:5000/{route}"  # a server: itself


def test_newest_sweep_is_the_last_parent_run_of_any_experiment(tmp_path, monkeypatch):
    monkeypatch.delenv(UI_URL_ENV, raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert newest_sweep_url(uri) is None
    first, second = Tracker(uri, "exp-a"), Tracker(uri, "exp-b")
    old = first.parent_run("s1", name="s1", spec_hash="h", spec_yaml="", params={})
    time.sleep(0.01)  # start times are in milliseconds
    new = second.parent_run("s2", name="s2", spec_hash="h", spec_yaml="", params={})
    time.sleep(0.01)
    first.child_run(old, "p", tune_trial="t", name="p", params={})  # a trial is never the sweep
    first.finish(old)
    assert newest_sweep_url(uri) == run_url(uri, second.experiment_id, new) == second.run_url(new)
    assert latest_sweep_run(first.client, [first.experiment_id, second.experiment_id], finished=True).info.run_id == old
    assert latest_parent(first.client, "exp-a") == old  # what the claims report reads by default
    with pytest.raises(ValueError, match="no FINISHED sweep run"):
        latest_parent(first.client, "exp-b")


def test_report_phases_read_back_from_what_tune_stores():
    """A restored sweep reads the phases Tune stored as plain strings (result.json): the values never change."""
    import json

    from orchestrator.bundle import PHASE, Phase, phase_of

    for phase, stored in ((Phase.TRAIN, "train"), (Phase.EVALUATED, "evaluated"), (Phase.DONE, "eval")):
        assert json.loads(json.dumps({PHASE: phase}))[PHASE] == stored
        assert phase_of({PHASE: stored}) is phase
    assert phase_of(None) is None and phase_of({"training_iteration": 3}) is None and phase_of({PHASE: "x"}) is None
