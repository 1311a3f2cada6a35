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
    child = tracker.child_run(parent, "trial_a", name="a", params={"n_latents": 64}, tags={})
    assert tracker.child_run(parent, "trial_a", name="a", params={"n_latents": 64}, tags={}) == child
    assert tracker.child_run(parent, "trial_b", name="b", params={"n_latents": 64}, tags={}) != child
    assert {r.info.run_id for r in tracker.runs_of(parent)} == {child, tracker.child_run(parent, "trial_b", name="b", params={}, tags={})}
    assert tracker.client.get_run(child).data.tags[PARENT_TAG] == parent
    assert tracker.client.list_artifacts(parent)[0].path == "spec.yaml"


def test_curves_are_histories_with_step_G(tracker):
    parent = tracker.parent_run("s", name="s", spec_hash="h", spec_yaml="", params={})
    run = tracker.child_run(parent, "t", name="t", params={}, tags={})
    tracker.log_curves(run, {"fvu/prune_ez2": [[64, 0.3], [128, 0.2], [256, float("nan")]]})
    hist = tracker.client.get_metric_history(run, "fvu/prune_ez2")
    assert [(m.step, m.value) for m in hist] == [(64, 0.3), (128, 0.2)]  # NaN is not logged


def test_resume_with_another_spec_is_refused(tracker):
    tracker.parent_run("sweep-1", name="sweep-1", spec_hash="h1", spec_yaml="", params={})
    tracker.check_resumable("sweep-1", "h1")
    with pytest.raises(ValueError, match="another spec"):
        tracker.check_resumable("sweep-1", "h2")
