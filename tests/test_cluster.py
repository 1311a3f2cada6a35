"""A real multi-node run on shared object storage (what `make cluster-demo` does): an S3-compatible server holds
the shards and Tune's results, `mlflow server` tracks with artifacts proxied into the bucket, and the smoke sweep
is submitted with `ray job submit --working-dir .` to a Ray head that a second node has joined."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from orchestrator import cluster_demo
from orchestrator.spec import load_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run():
    """The whole demo once: start, submit, inspect, stop; plus the demo's Ray processes while up and after."""
    spec = load_spec(cluster_demo.SPEC)
    before = cluster_demo.snapshot()
    work = Path(tempfile.mkdtemp(prefix="sfc-test-"))
    lines: list[str] = []
    try:
        with cluster_demo.cluster(work, log=lines.append) as demo:
            job, said = cluster_demo.submit(demo, log=lines.append, echo=None)
            facts = cluster_demo.inspect(demo, spec.experiment_name, before)
            running = len(cluster_demo.processes_under(demo.ray_temp))
        left = len(cluster_demo.processes_under(demo.ray_temp))
        yield spec, said, facts, (running, left)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_shards_and_manifests_are_in_the_bucket(demo_run):
    _, said, facts, _ = demo_run
    assert "frontier of sae-frontier-smoke" in said
    assert len(facts["manifests"]) == 2, facts["manifests"]  # the train and the eval store
    assert {m.split("/")[1].split(".")[-2] for m in facts["manifests"]} == {"train", "eval"}
    assert len(facts["shard_files"]) >= 2


def test_trials_ran_on_both_nodes(demo_run):
    spec, _, facts, _ = demo_run
    assert facts["nodes"] == 2
    assert facts["trials"] == len(spec.trial_points())  # smoke: one grid point per trial
    assert facts["trials_on_second_node"] >= 1 and facts["trials_on_head"] >= 1, facts


def test_every_child_run_and_its_artifacts_are_in_the_mlflow_server(demo_run):
    spec, _, facts, _ = demo_run
    runs = facts["child_runs"]
    assert len(runs) == len(spec.trial_points())
    for run in runs:
        assert run["status"] == "FINISHED", run
        assert {"sae", "sae_lens", "plots", "result.json"} <= set(run["artifacts"]), run
        # proxied artifacts: the server wrote them into the bucket, under the run's id
        assert any(f"/{run['run_id']}/artifacts/sae/" in key for key in facts["artifact_objects"]), run["run_id"]


def test_nothing_was_written_under_the_checkout(demo_run):
    _, _, facts, _ = demo_run
    assert facts["checkout_changed"] == []


def test_the_demo_stops_its_own_ray_nodes(demo_run):
    """Its nodes are found by their temp dir and stopped on exit, without `ray stop` (which stops every Ray)."""
    _, _, _, (running, left) = demo_run
    assert running >= 4  # two raylets, the GCS, the dashboard and their workers
    assert left == 0
