"""The researcher's world: the links the docs give open what a sweep wrote, on real servers.

`make ui`'s link (python -m orchestrator.ui, then `mlflow ui` on the SQLite store) and a tracking server's run
link resolve to the sweep's run in an experiment tagged for the model-training view.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from servers import free_port, get_json, serving

from orchestrator.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, UI_URL_ENV, Tracker

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RUN_ROUTE = re.compile(r"(?P<base>http://[^/]+)/#/experiments/(?P<exp>\d+)/runs/(?P<run>[0-9a-f]+)\?workflowType=machine_learning")


def assert_link_opens_the_sweep(link: str, run_name: str) -> None:
    """The link's page is the MLflow UI, whose router has the link's route and view parameter, and the run and
    the experiment it names are served with the model-training kind."""
    m = RUN_ROUTE.fullmatch(link)
    assert m, link
    base = m["base"]
    run = get_json(f"{base}/api/2.0/mlflow/runs/get?run_id={m['run']}")["run"]
    assert run["info"]["experiment_id"] == m["exp"] and run["info"]["run_name"] == run_name
    experiment = get_json(f"{base}/api/2.0/mlflow/experiments/get?experiment_id={m['exp']}")["experiment"]
    assert {t["key"]: t["value"] for t in experiment["tags"]}[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    listed = get_json(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [m["exp"]]})["runs"]  # the run list
    assert [r["info"]["run_id"] for r in listed] == [m["run"]]
    with urllib.request.urlopen(link.split("#")[0], timeout=30) as r:
        script = re.search(r'src="(static-files/static/js/main\.\w+\.js)"', r.read().decode()).group(1)
    with urllib.request.urlopen(f"{base}/{script}", timeout=30) as r:
        js = r.read().decode()
    assert '"/experiments/:experimentId/runs/:runUuid"' in js and '"workflowType"' in js and '"machine_learning"' in js


def test_make_ui_link_and_a_tracking_server_link_open_the_sweep(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    local = Tracker(uri, "sae-frontier-local")  # a sweep on this machine writes the SQLite store
    local.parent_run("local-sweep", name="local-sweep", spec_hash="h", spec_yaml="name: x\n", params={})
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # what `make ui` runs (Makefile): the link, then `mlflow ui` on the store
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, UI_URL_ENV: base}
    printed = subprocess.run([sys.executable, "-m", "orchestrator.ui"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300, check=True).stdout
    link = printed.split()[-1]
    assert printed.startswith("the newest sweep:") and link.startswith(base), printed
    with serving([BIN / "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port),
                  "--workers", "1"], f"{base}/health", cwd=tmp_path):
        assert_link_opens_the_sweep(link, "local-sweep")
        # a sweep that tracks to the server (a cluster's MLFLOW_TRACKING_URI) links to the server itself
        remote = Tracker(base, "sae-frontier-remote")
        parent = remote.parent_run("remote-sweep", name="remote-sweep", spec_hash="h", spec_yaml="", params={})
        assert remote.run_url(parent).startswith(f"{base}/#/experiments/{remote.experiment_id}/runs/{parent}?")
        assert_link_opens_the_sweep(remote.run_url(parent), "remote-sweep")
