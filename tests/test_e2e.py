"""End to end as a user meets it: `ray job submit` of the smoke sweep to a local head, then the MLflow server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest
from servers import free_port, free_ports, get_json, serving

from orchestrator.spec import load_spec

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def submitted(tmp_path_factory):
    """Start a head with token auth, submit the smoke sweep with --working-dir ., wait, stop the head."""
    # `ray stop` at the end stops every Ray on this machine: never run this beside a cluster in use
    if any(p.info["name"] in ("raylet", "gcs_server") for p in psutil.process_iter(["name"])):
        pytest.skip("a Ray cluster already runs on this machine; this test would stop it")
    home = tmp_path_factory.mktemp("job_home")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_ports(2)  # two calls of free_port() can return the same port
    start = subprocess.run(
        [BIN / "ray", "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
         "--num-cpus=2", "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    uri = f"sqlite:///{home}/mlflow.db"
    try:
        submit = subprocess.run(
            [BIN / "ray", "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", ".",
             "--runtime-env", "sweeps/runtime_env.yaml", "--",
             "env", f"SAE_FRONTIER_HOME={home}", f"MLFLOW_TRACKING_URI={uri}",
             "python", "sweeps/frontier.py", "--spec", "sweeps/specs/smoke.yaml"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
        job = re.search(r"raysubmit_\w+", submit.stdout + submit.stderr)
        status = subprocess.run([BIN / "ray", "job", "status", "--address", f"http://127.0.0.1:{dash}", job.group(0)],
                                env=env, capture_output=True, text=True, timeout=60) if job else None
        yield home, uri, submit, status
    finally:
        subprocess.run([BIN / "ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_ray_job_submit_runs_the_sweep_and_writes_mlflow(submitted):
    home, uri, submit, status = submitted
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-2000:]
    assert status is not None, submit.stdout[-2000:]
    said = status.stdout + status.stderr  # `ray job status` ends with "Job '<id>' succeeded" (or failed/stopped)
    assert re.search(r"\bsucceeded\b", said, re.I) and not re.search(r"\bfailed\b", said, re.I), said
    assert "frontier of sae-frontier-smoke" in submit.stdout
    # the sweep ends with its parent run's link in the MLflow UI's model-training view (tracking.run_url)
    assert re.search(r"the sweep in the MLflow UI:  http://\S+/#/experiments/\d+/runs/[0-9a-f]+\?workflowType=machine_learning",
                     submit.stdout), submit.stdout[-2000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sae-frontier-smoke")
    trials = client.search_runs([exp.experiment_id], "tags.`sae_frontier.kind` = 'trial'")
    assert len(trials) == len(load_spec("smoke").trial_points())
    assert all(r.info.status == "FINISHED" for r in trials)
    assert any((home / ".cache" / "shards").iterdir())  # shards went to the checkout's home, not the upload


def test_mlflow_server_serves_the_runs_over_rest(submitted):
    _home, uri, _, _ = submitted
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with serving([BIN / "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port),
                  "--workers", "1"], f"{base}/health"):
        exp_id = get_json(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=sae-frontier-smoke")[
            "experiment"]["experiment_id"]
        runs = get_json(f"{base}/api/2.0/mlflow/runs/search",
                        {"experiment_ids": [exp_id], "filter": "tags.`sae_frontier.kind` = 'trial'"})["runs"]
        assert len(runs) == len(load_spec("smoke").trial_points())
        metric_keys = {m["key"] for m in runs[0]["data"]["metrics"]}
        assert "fvu/prune_ez2.masked" in metric_keys and "l0/prune_ez2.reselect" in metric_keys and "power_law/exponent" in metric_keys
        run_id = runs[0]["info"]["run_id"]  # the UI shows the trial's plots, served from the artifact store
        with urllib.request.urlopen(f"{base}/get-artifact?path=plots/power_law.png&run_uuid={run_id}") as r:
            assert r.read(8) == b"\x89PNG\r\n\x1a\n"
