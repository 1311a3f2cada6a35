"""The researcher's world: the links and commands the docs give open what a sweep wrote, on real servers.

`make ui`'s link (python -m orchestrator.ui, then `mlflow ui` on the SQLite store) and a tracking server's run
link resolve to the sweep's run in an experiment tagged for the model-training view; the optuna-dashboard
command of mlflow/README.md lists the sweep's study with its trials and objective names.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import optuna
import pytest
from servers import free_port, get_json, serving

from orchestrator.search import OBJECTIVES, open_study, optuna_space, optuna_storage_url, study_name
from orchestrator.spec import load_spec
from orchestrator.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, UI_URL_ENV, Tracker

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RUN_ROUTE = re.compile(r"(?P<base>http://[^/]+)/#/experiments/(?P<exp>\d+)/runs/(?P<run>[0-9a-f]+)\?workflowType=machine_learning")


def readme_command(program: str) -> list[str]:
    """The command line mlflow/README.md gives for `program` (in a code block, comment stripped)."""
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "mlflow" / "README.md").read_text().splitlines()]
    found = [ln for ln in lines if ln.startswith(program + " ")]
    assert len(found) == 1, f"mlflow/README.md should give one `{program} ...` command line, found {found}"
    return shlex.split(found[0])


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


def test_optuna_dashboard_command_of_the_readme_lists_the_sweeps_study(tmp_path):
    # the sweep's own storage and study (orchestrator.search) in a checkout at tmp_path: mlflow/optuna.db
    spec = load_spec("smoke", {"tracking_uri": f"sqlite:///{tmp_path}/mlflow/mlflow.db"})
    assert optuna_storage_url(spec) == f"sqlite:///{tmp_path}/mlflow/optuna.db"
    study = open_study(spec)
    space = optuna_space(spec)
    distributions = {name: optuna.distributions.CategoricalDistribution(dim.categories) for name, dim in space.items()}
    combos = itertools.product(*(dim.categories for dim in space.values()))
    for i, combo in enumerate(itertools.islice(combos, 3)):
        params = dict(zip(space, combo, strict=True))
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions,
                                                  values=[0.5 - 0.1 * i, float(params["n_latents"])]))
    cmd = readme_command("optuna-dashboard")
    assert cmd[1:] == ["sqlite:///mlflow/optuna.db"], cmd  # run from the repo root, like every command there
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with serving([BIN / cmd[0], *cmd[1:], "--host", "127.0.0.1", "--port", str(port)], f"{base}/api/studies",
                 cwd=tmp_path):
        listed = {s["study_name"]: s for s in get_json(f"{base}/api/studies")["study_summaries"]}
        assert list(listed) == [study_name(spec)]
        detail = get_json(f"{base}/api/studies/{listed[study_name(spec)]['study_id']}")
    assert detail["name"] == study_name(spec) and detail["directions"] == ["minimize", "minimize"]
    assert len(detail["trials"]) == 3 and all(t["state"] == "Complete" for t in detail["trials"])
    assert detail["objective_names"] == OBJECTIVES
    assert {p["name"] for p in detail["intersection_search_space"]} == set(space)
