"""Real faults on the smoke sweep (docs/reliability.md): the driver SIGKILLed at three instants, then --resume.

Each case runs `python sweeps/frontier.py` in its own process with its own store, results and MLflow SQLite
file, kills it with SIGKILL (no handler runs, as when a node dies), and resumes. Afterwards there is exactly
one parent run and one FINISHED child run per grid point, no training step is logged twice, and no point that
had finished before the kill was run again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient
from spec_helpers import smoke_dict

from orchestrator.shards import read_manifest
from orchestrator.spec import load_spec

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


# Harvests the smoke spec's train and eval stores into argv[1] (the uninterrupted reference).
HARVEST_BOTH = """
import sys
from orchestrator.harvest import harvest
from orchestrator.spec import load_spec
from orchestrator.sweep import harvest_config
spec = load_spec("smoke", {"storage": sys.argv[1]})
for split in ("train", "eval"):
    harvest(harvest_config(spec, split), progress=False)
"""


def _children(uri: str, experiment: str, status: str | None = None) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    query = "tags.`sae_frontier.kind` = 'trial'" + (f" and attributes.status = '{status}'" if status else "")
    return client.search_runs([exp.experiment_id], query)


def _mid_harvest(home: Path, uri: str, experiment: str) -> bool:
    # the plan is written before the first shard (the smoke store is a single shard: waiting for it races)
    stores = [p for p in (home / "shards").glob("*.train.*") if p.is_dir()]  # not the <key>.lock beside it
    return bool(stores) and (stores[0] / "plan.json").exists() and not (stores[0] / "manifest.json").exists()


def _mid_trial(home: Path, uri: str, experiment: str) -> bool:
    return any((home / ".cache" / "ray_results").glob("smoke-grid-*/run_trial_*/checkpoint_*")) and \
        not _children(uri, experiment, "FINISHED")


def _after_first_point(home: Path, uri: str, experiment: str) -> bool:
    return bool(_children(uri, experiment, "FINISHED"))


@pytest.mark.parametrize("instant", [_mid_harvest, _mid_trial, _after_first_point],
                         ids=["mid-harvest", "mid-trial", "after-first-point"])
def test_driver_killed_then_resumed_gives_one_finished_run_per_point(tmp_path, instant):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = load_spec("smoke")
    args = [sys.executable, str(ROOT / "sweeps" / "frontier.py"), "--spec", "smoke", "--tracking-uri", uri,
            "--storage", str(tmp_path / "shards")]
    env = {**os.environ, "SAE_FRONTIER_HOME": str(tmp_path)}  # results_path resolves under it
    driver = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and driver.poll() is None and not instant(tmp_path, uri, spec.experiment_name):
        time.sleep(0.2)
    assert driver.poll() is None, "the sweep ended before the instant to kill it at:\n" + driver.stdout.read()[-3000:]
    ray_processes = psutil.Process(driver.pid).children(recursive=True)
    driver.send_signal(signal.SIGKILL)
    driver.communicate(timeout=60)
    finished_before = {r.info.run_id: r.info.end_time for r in _children(uri, spec.experiment_name, "FINISHED")}
    try:
        done = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=900)
    finally:
        for p in ray_processes:  # the killed driver's local Ray outlives it (docs/reliability.md): end it here
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(spec.experiment_name)
    parents = client.search_runs([exp.experiment_id], "tags.`sae_frontier.kind` = 'sweep'")
    trials = _children(uri, spec.experiment_name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.tags["sae_frontier.point_key"] for r in trials) == \
        sorted(p.trial_key for p in spec.trial_points())  # exactly one run per grid point
    assert all(r.info.status == "FINISHED" for r in trials)
    for r in trials:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")]
        assert steps and len(steps) == len(set(steps))  # no training step logged twice
    after = {r.info.run_id: r.info.end_time for r in trials}
    assert all(after[rid] == end for rid, end in finished_before.items())  # finished points were not redone
    if instant is _mid_harvest:  # the resumed store is byte-identical to an uninterrupted harvest
        ref = tmp_path / "reference"
        subprocess.run([sys.executable, "-c", HARVEST_BOTH, str(ref)], env=env, check=True, timeout=600)
        for split in ("train", "eval"):
            [resumed] = [p for p in (tmp_path / "shards").glob(f"*.{split}.*") if p.is_dir()]
            [clean] = [p for p in ref.glob(f"*.{split}.*") if p.is_dir()]
            assert resumed.name == clean.name
            assert read_manifest(str(resumed)).shards == read_manifest(str(clean)).shards  # names, rows, sha256
    assert parents[0].data.metrics["trials_finished"] == len(spec.trial_points())  # the frontier is complete


def test_two_sweeps_of_one_spec_at_once_share_one_harvest_and_keep_their_own_runs(tmp_path):
    """Both finish; the shared store is harvested once (the second harvest waits on the first's lease and reuses
    the store); each sweep has its own name and parent run, and one run per grid point under it."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = load_spec("smoke")
    args = [sys.executable, str(ROOT / "sweeps" / "frontier.py"), "--spec", "smoke", "--tracking-uri", uri,
            "--storage", str(tmp_path / "shards")]
    env = {**os.environ, "SAE_FRONTIER_HOME": str(tmp_path)}
    sweeps = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    outs = [p.communicate(timeout=1200)[0] for p in sweeps]
    assert [p.returncode for p in sweeps] == [0, 0], "\n\n".join(o[-3000:] for o in outs)
    # one sweep harvests the train and the eval store, the other waits on each lease and reuses the store
    assert sum(o.count("harvested meanwhile by another process") for o in outs) == 2, "\n\n".join(outs)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(spec.experiment_name)
    parents = client.search_runs([exp.experiment_id], "tags.`sae_frontier.kind` = 'sweep'")
    assert len(parents) == 2 and len({p.info.run_name for p in parents}) == 2
    for parent in parents:
        assert parent.info.status == "FINISHED"
        runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert sorted(r.data.tags["sae_frontier.point_key"] for r in runs) == \
            sorted(p.trial_key for p in spec.trial_points())


def test_trial_worker_killed_mid_training_is_retried_from_its_checkpoint(tmp_path):
    """SIGKILL of the trial's worker process after its first checkpoint: Tune retries the trial from it, and each
    point keeps one FINISHED run with one continuous training curve (no step twice, none missing after the
    restart) and its train_final/* metrics."""
    raw = smoke_dict(storage=str(tmp_path / "shards"), results_path=str(tmp_path / "results"),
                     tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", train={"epochs": 30},
                     resources={"cpus": 2, "max_concurrent": 1, "pack": 4})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    driver = subprocess.Popen([sys.executable, str(ROOT / "sweeps" / "frontier.py"), "--spec", str(tmp_path / "spec.yaml")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed: list[int] = []
    deadline = time.time() + 600
    while time.time() < deadline and driver.poll() is None and not killed:
        if any((tmp_path / "results").glob("smoke-grid-*/run_trial_*/checkpoint_000000")):
            for p in psutil.Process(driver.pid).children(recursive=True):
                try:
                    if "ImplicitFunc" in " ".join([p.name(), *p.cmdline()]):
                        p.kill()
                        killed.append(p.pid)
                except psutil.NoSuchProcess:
                    pass
        time.sleep(0.05)
    out, _ = driver.communicate(timeout=900)
    assert killed, "no trial worker was found to kill:\n" + out[-3000:]
    assert driver.returncode == 0, out[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    spec = load_spec("smoke")
    trials = _children(f"sqlite:///{tmp_path}/mlflow.db", spec.experiment_name)
    assert sorted(r.data.tags["sae_frontier.point_key"] for r in trials) == \
        sorted(p.trial_key for p in spec.trial_points())
    tokens_per_report = raw["train"]["batch_size"] * raw["train"]["report_every_steps"]
    for r in trials:
        assert r.info.status == "FINISHED" and "train_final/fvu" in r.data.metrics
        steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "train/loss"))
        assert steps == list(range(steps[0], steps[-1] + 1, tokens_per_report))  # continuous, each step once
        assert steps[-1] == r.data.metrics["tokens_seen"]
