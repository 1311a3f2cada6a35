"""The only MLflow writer: one parent run per sweep, one child run per grid point, written from the driver alone.

Trials never talk to MLflow; they report through Ray Tune and leave one result bundle per grid point (result.json,
the SAE checkpoint and its SAELens export, plots; or error.txt) in their final Tune checkpoint. A trial may hold several points
(orchestrator.packing): each still gets its own run, its own training curves and its own FAILED status. `MLflowSweepCallback` runs in the driver and turns those
reports into MLflow runs, so a SQLite store only ever sees one writer. Runs are matched by tags (the sweep key
on the parent, the trial key on each child), which is what makes `--resume` reuse runs instead of duplicating.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray import tune

from orchestrator.bundle import ERROR_FILE, Phase, TrainReport, phase_of, point_dir
from orchestrator.frontier import ACTIVATION_FIELDS as ACTIVATION_PARAMS
from orchestrator.spec import SweepSpec, TrialPoint, is_tracking_server, points_from_config, sqlite_path
from sae.evaluate import CURVE_METHODS, split_curve_key
from sae.export import RESULT_FILE, SAE_DIR, SAELENS_DIR
from sae.train import METRIC_NAMES, PREFIX_FVU

SWEEP_KEY_TAG = "sae_frontier.sweep_key"
TUNE_TRIAL_TAG = "sae_frontier.tune_trial"  # the Tune trial that last ran the point (information only)
ERROR_TAG = "sae_frontier.error"  # why a point's run FAILED
POINT_KEY_TAG = "sae_frontier.point_key"  # the grid point (orchestrator.spec.TrialPoint.trial_key): a child run's identity
SPEC_HASH_TAG = "sae_frontier.spec_hash"
PARENT_TAG = "mlflow.parentRunId"
KIND_TAG = "sae_frontier.kind"  # "sweep" on a parent run, "trial" on a child run
BUNDLE_DIRS = (SAE_DIR, SAELENS_DIR, "plots")  # a trial bundle's folders, logged as artifact folders of the same names
SPEC_ARTIFACT = "spec.yaml"  # the sweep's validated spec, on its parent run
# MLflow 3.17's UI opens an experiment in its GenAI view (traces, no runs) unless told otherwise. The kind tag is what
# its experiment-type selector reads and writes; the page itself follows the URL's `workflowType` parameter (else
# the last choice, kept in the browser), so the links this module builds carry WORKFLOW_QUERY as well.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the UI's "Machine learning" kind
GENAI_KIND = "genai_development"  # the UI's default kind: replaced; any other kind a person chose is kept
WORKFLOW_QUERY = "workflowType=machine_learning"
UI_URL_ENV = "SAE_FRONTIER_UI_URL"  # where the UI of a SQLite/file store is served
DEFAULT_UI_URL = "http://127.0.0.1:5000"  # `make ui`'s default UI_HOST and UI_PORT
_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch


def _artifact_root(tracking_uri: str) -> str | None:
    """Keep artifacts beside a SQLite store (mlflow/artifacts), not wherever the process happens to run."""
    db = sqlite_path(tracking_uri)
    return (db.parent / "artifacts").resolve().as_uri() if db is not None else None


@contextlib.contextmanager
def _sqlite_init_lock(tracking_uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a SQLite store while a client opens it. MLflow creates and migrates a new
    store's tables on first open, and two processes doing that at once fail ("duplicate column name"); the
    experiment, too, would be created twice. Other stores (a server, a database) serialise this themselves."""
    db = sqlite_path(tracking_uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Tracker:
    """Thin, explicit wrapper over MlflowClient for this project's run layout."""

    def __init__(self, tracking_uri: str, experiment: str):
        self.tracking_uri = tracking_uri
        with _sqlite_init_lock(tracking_uri):  # two sweeps started at once: one creates the schema and experiment
            self.client = MlflowClient(tracking_uri=tracking_uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                root = _artifact_root(tracking_uri)
                location = f"{root}/{experiment}" if root else None
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            else:
                self.experiment_id = found.experiment_id
                if found.tags.get(EXPERIMENT_KIND_TAG) in (None, GENAI_KIND):  # made before the tag, or GenAI
                    self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)

    def run_url(self, run_id: str) -> str:
        return run_url(self.tracking_uri, self.experiment_id, run_id)

    # ---- runs ------------------------------------------------------------------------------------------------
    def _find(self, filter_string: str) -> str | None:
        runs = self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=1)
        return runs[0].info.run_id if runs else None

    def _sweep_run(self, sweep_key: str) -> str | None:
        return self._find(f"tags.`{SWEEP_KEY_TAG}` = '{sweep_key}' and tags.`{PARENT_TAG}` IS NULL")

    def parent_run(self, sweep_key: str, *, name: str, spec_hash: str, spec_yaml: str, params: dict[str, Any]) -> str:
        """The sweep's parent run: reused when a run with the same sweep key exists (a resumed sweep)."""
        run_id = self._sweep_run(sweep_key)
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(
            self.experiment_id, run_name=name,
            tags={SWEEP_KEY_TAG: sweep_key, SPEC_HASH_TAG: spec_hash, KIND_TAG: "sweep"},
        )
        self.client.log_text(run.info.run_id, spec_yaml, SPEC_ARTIFACT)
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def check_resumable(self, sweep_key: str, spec_hash: str) -> None:
        """--resume continues a sweep only with the spec it started with (trials and checkpoints depend on it)."""
        run_id = self._sweep_run(sweep_key)
        if run_id is None:
            return
        old = self.client.get_run(run_id).data.tags.get(SPEC_HASH_TAG)
        if old != spec_hash:
            raise ValueError(f"--resume: sweep {sweep_key} was started with another spec (hash {old}, now {spec_hash}); "
                             "restore the spec it ran with (a sweep from before train.aux_tokens existed ran AuxK on "
                             "the whole batch: set train.aux_tokens: null), or start a new sweep without --resume")

    def child_run(self, parent_id: str, point_key: str, *, tune_trial: str, name: str,
                  params: dict[str, Any]) -> str:
        """The one child run of a grid point, matched by (parent run, point key) whatever Tune trial runs it: a
        restored trial, a retried one or a fresh Tuner of `--resume` all reuse it. An unfinished run (KILLED or
        FAILED by an earlier attempt) is reopened."""
        run_id = self._find(f"tags.`{POINT_KEY_TAG}` = '{point_key}' and tags.`{PARENT_TAG}` = '{parent_id}'")
        if run_id is not None:
            if self.client.get_run(run_id).info.status not in ("FINISHED", "RUNNING"):
                self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, TUNE_TRIAL_TAG, tune_trial)
            return run_id
        run = self.client.create_run(
            self.experiment_id, run_name=name,
            tags={PARENT_TAG: parent_id, POINT_KEY_TAG: point_key, TUNE_TRIAL_TAG: tune_trial,
                  KIND_TAG: "trial"},
        )
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def finished_points(self, parent_id: str) -> set[str]:
        """Point keys whose child run is FINISHED: what `--resume` never schedules again."""
        return {r.data.tags[POINT_KEY_TAG] for r in self.runs_of(parent_id)
                if r.info.status == "FINISHED" and POINT_KEY_TAG in r.data.tags}

    def close_stale_runs(self, parent_id: str) -> int:
        """Child runs left RUNNING by a driver that died: KILLED until a trial reopens them. Returns how many."""
        stale = [r for r in self.runs_of(parent_id) if r.info.status == "RUNNING"]
        for r in stale:
            self.finish(r.info.run_id, "KILLED")
        return len(stale)

    def is_finished(self, run_id: str) -> bool:
        return self.client.get_run(run_id).info.status == "FINISHED"

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    # ---- logging ---------------------------------------------------------------------------------------------
    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if _is_number(v)]
        self._log_metric_items(run_id, items)

    def log_curves(self, run_id: str, curves: dict[str, list[list[float]]]) -> None:
        """Each curve is a metric history with step = G (latents kept), which the MLflow UI draws natively."""
        now = int(time.time() * 1000)
        items = [Metric(key, float(v), now, int(g)) for key, pts in curves.items() for g, v in pts if _is_number(v)]
        self._log_metric_items(run_id, items)

    def _log_metric_items(self, run_id: str, items: list[Metric]) -> None:
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, metrics=items[i : i + _BATCH])

    def log_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_trial_bundle(self, run_id: str, bundle: Path) -> dict[str, Any]:
        """Log a finished trial's result bundle (written by orchestrator.trial) to its child run."""
        result = json.loads((bundle / RESULT_FILE).read_text())
        self.log_metrics(run_id, result["final"])
        self.log_curves(run_id, result["curves"])
        self.log_params(run_id, {f"resolved.{k}": v for k, v in result.get("resolved", {}).items()})
        for sub in BUNDLE_DIRS:
            if (bundle / sub).is_dir():
                self.log_artifacts(run_id, bundle / sub, sub)
        self.client.log_artifact(run_id, str(bundle / RESULT_FILE))
        return result

    # ---- reading (for the frontier) ---------------------------------------------------------------------------
    def curve_points(self, experiment_names: list[str], parent_id: str | None = None) -> pd.DataFrame:
        """Every (child run, method, scoring rule, G) point of finished trials, one row each, for the frontier.

        Columns: POINT_COLUMNS, the parent sweep's ACTIVATION_PARAMS (None where an older sweep lacks one), then
        one column per curve metric (fvu, l0, ce_score, ce_score_lo, proxy/token_conc, ...). With `parent_id`,
        only the trials of that sweep.
        """
        ids = []
        for name in experiment_names:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise ValueError(f"experiment {name!r} not found in {self.tracking_uri}")
            ids.append(exp.experiment_id)
        query = f"tags.`{KIND_TAG}` = 'trial' and attributes.status = 'FINISHED'"
        if parent_id:
            query += f" and tags.`{PARENT_TAG}` = '{parent_id}'"
        exp_names = dict(zip(ids, experiment_names, strict=True))
        identities: dict[str | None, dict[str, str | None]] = {}
        rows = []
        for run in self.client.search_runs(ids, filter_string=query, max_results=5000):
            parent = run.data.tags.get(PARENT_TAG)
            if parent not in identities:
                identities[parent] = self._activations_identity(parent)
            p = run.data.params
            base = {
                "experiment": exp_names[run.info.experiment_id], "run_id": run.info.run_id, "parent_run_id": parent,
                "run_name": run.info.run_name, "n_latents": int(p["n_latents"]), "k": int(p["k"]),
                "architecture": p["architecture"], "partition": p["partition"], "seed": int(p["seed"]),
            }
            by_point: dict[tuple[str, str, int], dict[str, float]] = {}
            for key in run.data.metrics:
                parsed = parse_curve_key(key)
                if parsed is None:
                    continue
                metric, method, rule = parsed
                for m in self.client.get_metric_history(run.info.run_id, key):
                    by_point.setdefault((method, rule, int(m.step)), {})[metric] = m.value
            for (method, rule, g), metrics in sorted(by_point.items()):
                rows.append({**base, "method": method, "rule": rule, "G": g, **identities[parent], **metrics})
        return pd.DataFrame(rows, columns=None if rows else [*POINT_COLUMNS, *ACTIVATION_PARAMS])

    def _activations_identity(self, parent_id: str | None) -> dict[str, str | None]:
        """The parent sweep's params naming its activations; None for those an older sweep did not log."""
        params = self.client.get_run(parent_id).data.params if parent_id else {}
        return {name: params.get(name) for name in ACTIVATION_PARAMS}

    def runs_of(self, parent_id: str) -> list:
        return self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=5000)


def download_trial_bundle(tracking_uri: str, run_id: str, dst: str | Path) -> tuple[Path, dict[str, Any]]:
    """Read a trial run back as a bundle: its `sae/` and result.json (as `log_trial_bundle` logged them) into `dst`,
    plus its sweep's spec (the parent run's spec.yaml as a dict; {} if there is none). Reads only.

    A store that does not exist, a run it does not hold, a sweep's parent run or a run without a trained SAE (a
    failed point) raises ValueError saying which run to give instead.
    """
    from mlflow.exceptions import MlflowException

    if (db := sqlite_path(tracking_uri)) is not None and not db.is_file():
        raise ValueError(f"--tracking-uri: no MLflow store at {tracking_uri}; give the store that holds the run "
                         "(or set MLFLOW_TRACKING_URI)")
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise ValueError(f"run {run_id} is not in {tracking_uri} ({e.error_code}): give --tracking-uri of the store "
                         "that holds it") from e
    tags = run.data.tags
    if tags.get(KIND_TAG) == "sweep":
        raise ValueError(f"run {run_id} is the parent run of sweep {run.info.run_name!r}: give one of its trial runs "
                         "(the child runs, one per grid point)")
    if not client.list_artifacts(run_id, SAE_DIR):
        raise ValueError(f"run {run_id} ({run.info.status}) has no {SAE_DIR}/ artifact: only a finished trial run "
                         "holds a trained SAE")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    client.download_artifacts(run_id, SAE_DIR, str(dst))
    if any(a.path == RESULT_FILE for a in client.list_artifacts(run_id)):
        client.download_artifacts(run_id, RESULT_FILE, str(dst))
    spec: dict[str, Any] = {}
    parent = tags.get(PARENT_TAG)
    if parent and any(a.path == SPEC_ARTIFACT for a in client.list_artifacts(parent)):
        with tempfile.TemporaryDirectory(prefix="sae-spec-") as tmp:
            loaded = yaml.safe_load(Path(client.download_artifacts(parent, SPEC_ARTIFACT, tmp)).read_text())
        spec = loaded if isinstance(loaded, dict) else {}
    return dst, spec


def ui_base_url(tracking_uri: str) -> str:
    """Where a browser finds the MLflow UI of this store: the tracking server itself for an http(s) URI, else
    $SAE_FRONTIER_UI_URL, else DEFAULT_UI_URL (what `make ui` serves a SQLite or file store on)."""
    if is_tracking_server(tracking_uri):
        return tracking_uri.rstrip("/")
    return (os.environ.get(UI_URL_ENV) or DEFAULT_UI_URL).rstrip("/")


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI, in its model-training view (the route MLflow's own run links use)."""
    return f"{ui_base_url(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}?{WORKFLOW_QUERY}"


def latest_sweep_run(client: MlflowClient, experiment_ids: list[str], *, finished: bool = False) -> Any | None:
    """The parent run (an mlflow Run) of the sweep started last in these experiments, or None; with `finished`,
    of the last FINISHED one."""
    query = f"tags.`{KIND_TAG}` = 'sweep'" + (" and attributes.status = 'FINISHED'" if finished else "")
    runs = client.search_runs(experiment_ids, query, order_by=["attributes.start_time DESC"],
                              max_results=1) if experiment_ids else []
    return runs[0] if runs else None


def newest_sweep_url(tracking_uri: str) -> str | None:
    """The UI link to the parent run of the sweep started last in any experiment of the store (what `make ui`
    prints), or None when the store holds no sweep."""
    client = MlflowClient(tracking_uri=tracking_uri)
    run = latest_sweep_run(client, [e.experiment_id for e in client.search_experiments()])
    return run_url(tracking_uri, run.info.experiment_id, run.info.run_id) if run else None


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


POINT_COLUMNS = ("experiment", "run_id", "parent_run_id", "run_name", "n_latents", "k", "architecture", "partition",
                 "seed", "method", "rule", "G")
LEGACY_RULE = "reselect"  # curves logged before scoring rules existed re-selected the top k among kept latents


def parse_curve_key(key: str) -> tuple[str, str, str] | None:
    """A curve key -> (metric, method, rule) (see sae.evaluate.curve_key), or None if the key is not a curve.

    Also reads the legacy `<metric>/<method>` keys of sweeps logged before scoring rules existed, as the
    `reselect` rule they were scored with.
    """
    parsed = split_curve_key(key)
    if parsed is not None:
        return parsed
    metric, _, tail = key.rpartition("/")
    return (metric, tail, LEGACY_RULE) if metric and tail in CURVE_METHODS else None


class MLflowSweepCallback(tune.Callback):
    """Driver-side Tune callback: the one process that writes MLflow during a sweep.

    It is pickled with the Tuner (so `Tuner.restore` brings it back): it holds only names and ids, and opens
    its MLflow client lazily.
    """

    TRAIN_KEYS = METRIC_NAMES  # what Trainer.train_step reports for every SAE
    TRAIN_PREFIXES = (PREFIX_FVU,)  # a Matryoshka SAE's per-prefix training loss, one history per boundary

    def __init__(self, tracking_uri: str, experiment: str, parent_id: str, spec_json: str):
        self.tracking_uri, self.experiment, self.parent_id = tracking_uri, experiment, parent_id
        self.spec_json = spec_json
        self.spec = SweepSpec.model_validate_json(spec_json)
        self._tracker: Tracker | None = None
        self._runs: dict[str, list[tuple[dict[str, Any], str]]] = {}  # Tune trial id -> (point, run id)
        self._logged_up_to: dict[str, int] = {}  # run id -> last training step (tokens) logged

    def __getstate__(self) -> dict:
        return {"tracking_uri": self.tracking_uri, "experiment": self.experiment, "parent_id": self.parent_id,
                "spec_json": self.spec_json}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(self.tracking_uri, self.experiment)
        return self._tracker

    def _runs_for(self, trial) -> list[tuple[TrialPoint, str]]:
        """(point, child run id) for every grid point of the trial (`Tracker.child_run`: one run per point)."""
        if trial.trial_id not in self._runs:
            runs = []
            for point in points_from_config(trial.config, self.spec):
                run_id = self.tracker.child_run(self.parent_id, point.trial_key, tune_trial=trial.trial_id,
                                                name=point.name, params=point.model_dump(mode="json"))
                history = self.tracker.client.get_metric_history(run_id, "train/loss")
                self._logged_up_to[run_id] = max((m.step for m in history), default=-1)
                runs.append((point, run_id))
            self._runs[trial.trial_id] = runs
        return self._runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._runs_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if phase_of(result) is not Phase.TRAIN:
            return
        runs = self._runs_for(trial)
        report = TrainReport.from_tune(result, [point.trial_key for point, _ in runs])
        step = report.tokens_seen
        for point, run_id in runs:
            if step <= self._logged_up_to[run_id]:
                continue  # a trial restarted from a checkpoint re-reports steps this run already has
            metrics = {f"train/{k}": v for k, v in report.metrics[point.trial_key].items()
                       if k in self.TRAIN_KEYS or k.startswith(self.TRAIN_PREFIXES)}
            if metrics:  # a point whose SAE stopped (non-finite loss) reports nothing more
                self.tracker.log_metrics(run_id, metrics, step=step)
                self._logged_up_to[run_id] = step

    def on_trial_complete(self, iteration, trials, trial, **info):
        checkpoint = trial.checkpoint
        if checkpoint is None:
            for _, run_id in self._runs_for(trial):
                if not self.tracker.is_finished(run_id):
                    self._fail(run_id, "the trial ended without a checkpoint")
            return
        with checkpoint.as_directory() as path:
            for point, run_id in self._runs_for(trial):
                if self.tracker.is_finished(run_id):
                    continue  # a restored sweep re-reported a point whose results this run already holds
                bundle = point_dir(path, point)
                if (bundle / RESULT_FILE).exists():
                    self.tracker.log_trial_bundle(run_id, bundle)
                    self.tracker.finish(run_id)
                elif (bundle / ERROR_FILE).exists():
                    self._fail(run_id, (bundle / ERROR_FILE).read_text())
                else:
                    self._fail(run_id, "the trial finished without a result for this point")

    def on_trial_error(self, iteration, trials, trial, **info):
        error = info.get("error") or getattr(trial, "error_file", None) or "the trial raised"
        for _, run_id in self._runs_for(trial):
            if not self.tracker.is_finished(run_id):
                self._fail(run_id, str(error))

    def _fail(self, run_id: str, why: str) -> None:
        """Mark a point's run FAILED and say why: in a tag (the UI's run list) and as error.txt."""
        self.tracker.log_tags(run_id, {ERROR_TAG: why.strip().splitlines()[0][:500] if why.strip() else "unknown"})
        self.tracker.client.log_text(run_id, why, ERROR_FILE)
        self.tracker.finish(run_id, "FAILED")
