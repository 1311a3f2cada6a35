"""The MLflow layout on SQLite: runs are reused by their keys (what makes --resume duplicate nothing)."""

from __future__ import annotations

import pytest

from orchestrator.tracking import PARENT_TAG, Tracker


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
