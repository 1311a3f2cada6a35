"""The sweep driver: harvest once, run every trial through Ray Tune, track in MLflow, compute the frontier.

It runs in the Ray driver (a plain `python sweeps/frontier.py`, or the entrypoint of `ray job submit`). The
spec was validated before this point; the LM and corpus were checked by `preflight`; Ray starts only here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import secrets
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import ray
from ray import tune

from orchestrator.bundle import Phase, phase_of
from orchestrator.frontier import (
    compare_experiments_figure,
    compute_frontier,
    describe_activations,
    frontier_table,
    matched_l0,
    plot_frontier,
    save_figure,
)
from orchestrator.harvest import HarvestConfig, harvest, store_complete
from orchestrator.lease import acquire, live_holder
from orchestrator.packing import MB, describe_plan, memory_budget, plan_packs, trial_device, trial_memory
from orchestrator.search import grid_space, optuna_searcher, optuna_space, pareto_trials
from orchestrator.shards import exists, iter_batches, read_bytes, read_manifest, storage_fs, write_atomic
from orchestrator.spec import SweepSpec, home, resolve_path
from orchestrator.status import grid_status, grid_trial_dirname, grid_trial_name
from orchestrator.tracking import ERROR_TAG, MLflowSweepCallback, Tracker
from orchestrator.trial import run_trial
from sae.evaluate import PRIMARY_RULE
from sae.lm import describe_model
from sae.metrics import variance_share_of_top_tokens

# per point: its share of the pack's training, its own evaluation (plus a share of the pack's LM load and clean
# pass), and the trial's peak memory against the estimate printed before the sweep (orchestrator.packing)
TIMING_METRICS = ("train_seconds", "eval_seconds", "pack_size", "pack_train_seconds", "peak_memory_mb",
                  "peak_memory_train_mb", "estimated_memory_mb")


class SweepInterrupted(RuntimeError):
    """The sweep stopped before every trial finished; `--resume` continues it."""


class PointsFailed(RuntimeError):
    """Some grid points failed; the others finished and are in `outcome` (its frontier is logged). The message
    has one line per failed point: its run name and why."""

    def __init__(self, outcome: SweepOutcome, failures: list[str]):
        self.outcome, self.failures = outcome, failures
        super().__init__(f"{len(failures)} grid point(s) failed (their runs are FAILED, tag {ERROR_TAG}); the "
                         "others are logged and in the frontier:\n" + "\n".join(failures))


@dataclass
class SweepOutcome:
    experiment: str
    parent_run_id: str
    frontier: pd.DataFrame
    points: pd.DataFrame
    harvest_seconds: float
    trials_seconds: float
    experiment_dir: str
    timings: pd.DataFrame | None = None
    harvest_reused: bool = False  # both stores were complete before the sweep: the harvest only read manifests
    pareto_trials: list[dict] | None = None
    parent_run_url: str = ""  # the parent run in the MLflow UI's model-training view (tracking.run_url)

    def cost_summary(self) -> str:
        """Where the time went, and what the shared harvest saved against N runs that each harvest."""
        t = self.timings
        if t is None or t.empty:
            return f"harvest {self.harvest_seconds:.1f}s, trials {self.trials_seconds:.1f}s"
        n = len(t)
        train, evals = t["train_seconds"].sum(), t["eval_seconds"].sum()
        lines = [
            f"harvest {self.harvest_seconds:.1f}s (once{', reused from the store' if self.harvest_reused else ''}); "
            f"{n} trials in {self.trials_seconds:.1f}s wall: training {train:.1f}s in all "
            f"(mean {train / n:.1f}s), evaluation {evals:.1f}s in all (mean {evals / n:.1f}s)",
        ]
        if not self.harvest_reused:
            shared = self.harvest_seconds + self.trials_seconds
            alone = n * self.harvest_seconds + self.trials_seconds
            lines.append(f"a sweep that harvested per trial would take ~{alone:.0f}s instead of {shared:.0f}s "
                         f"({alone / shared:.2f}x)")
        return "\n".join(lines)


def init_ray() -> None:
    """Join the cluster this runs on (a job's RAY_ADDRESS), else start a local Ray that listens on loopback only.

    A Ray node binds its gRPC servers (GCS, raylet, workers, agents) to 127.0.0.1 only when its node IP is
    127.0.0.1, and ray.init replaces 127.0.0.1 by the host's address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    (Ray's one-machine mode, its default on macOS and Windows). Ray reads that variable when it is imported, so
    while the local Ray starts it is set both for the processes ray.init spawns and, as Ray's parsed constant,
    for this one; both are restored afterwards, so a later connection to a real cluster is unaffected.
    A new local Ray turns token auth on and would write a missing ~/.ray/auth_token world-readable: the token is
    made owner-only first (orchestrator.ray_token), unless RAY_AUTH_MODE=disabled.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    from ray._private import ray_constants

    from orchestrator.ray_token import ensure_token

    if os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled":
        ensure_token()

    var = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    env_before, const_before = os.environ.get(var), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[var], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        # address="local": a new Ray, never one that `ray start` left running on this machine (ray.init with no
        # address would join it: another user's cluster, or a test's); a cluster is joined through RAY_ADDRESS
        ray.init(address="local", include_dashboard=False, log_to_driver=True)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = const_before
        if env_before is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = env_before


def harvest_config(spec: SweepSpec, split: str) -> HarvestConfig:
    return HarvestConfig(**spec.source_fields(), **spec.harvest.model_dump(), split=split,
                         tokens=spec.train_tokens if split == "train" else spec.eval_tokens,
                         dtype=spec.activation_dtype, storage=resolve_path(spec.storage))


def activations_identity(train_store: str, eval_store: str) -> dict[str, str]:
    """What makes two sweeps' numbers comparable: the same model weights, site, corpus and token budgets.

    The stores are content-addressed, so their keys name exactly that; the frontier and the report group runs by
    `activations_key` and never rank FVUs of different activation distributions against each other.
    """
    train, evals = read_manifest(train_store), read_manifest(eval_store)
    return {"revision": train.revision, "context_length": str(train.context_length),
            "activations_key": hashlib.sha256(f"{train.key}|{evals.key}".encode()).hexdigest()[:16]}


def eval_variance_concentration(eval_store: str) -> float:
    """Share of the eval activations' variance held by their top 1% of tokens (sae.metrics), on at most the
    first 65,536 eval tokens so the driver's memory stays bounded on a large store."""
    return variance_share_of_top_tokens(next(iter(iter_batches(eval_store, 65536, shuffle=False))), 0.01)


def code_commit() -> str:
    """The git commit of the code that ran (with '+dirty' for uncommitted changes), or 'unknown' outside a
    checkout (e.g. a Ray job's unpacked working dir)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _sweep_name(spec: SweepSpec, search: str, resume: bool | str) -> str:
    """A fresh sweep gets a new name; --resume continues the last one of this spec and search (the name kept in
    <results_path>/<spec>.<search>.latest), or the one it names. A name becomes a path under results_path, so
    only names of this spec's sweeps are accepted."""
    if isinstance(resume, str):
        return _own_sweep(resume, spec, search, "--resume {name} is", "as in the sweep's parent run name")
    fs, root = storage_fs(resolve_path(spec.results_path))
    latest = _latest_path(root, spec, search)
    if resume:
        if not exists(fs, latest):
            raise ValueError(f"--resume: no earlier {search} sweep of spec {spec.name!r} under {spec.results_path}")
        name = read_bytes(fs, latest).decode(errors="replace").strip()
        return _own_sweep(name, spec, search, f"--resume: {latest} names {{name}},",
                          "delete the file and start a new sweep")
    # a random suffix: two sweeps of one spec started in the same second still get two names
    return f"{spec.name}-{search}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _own_sweep(name: str, spec: SweepSpec, search: str, says: str, fix: str) -> str:
    """`name` when it names one of this spec's sweeps, else an error that `says` where the name came from."""
    if not re.fullmatch(_sweep_pattern(spec, search), name):
        raise ValueError(f"{says.format(name=repr(name[:80]))} not a {search} sweep of spec {spec.name!r} "
                         f"(<spec>-{search}-<date>-<time>-<suffix>); {fix}")
    return name


def _sweep_pattern(spec: SweepSpec, search: str) -> str:
    """What the names of this spec's sweeps look like (see _sweep_name)."""
    return rf"{re.escape(spec.name)}-{search}-\d{{8}}-\d{{6}}(-[0-9a-f]{{6}})?"


def _latest_path(root: str, spec: SweepSpec, search: str) -> str:
    return f"{root.rstrip('/')}/{spec.name}.{search}.latest"


def _point_latest_at(fs, root: str, spec: SweepSpec, search: str, name: str, log) -> None:
    """Make .latest name this sweep, unless it names another sweep of the spec that is still running (its
    lease is held): --resume would otherwise continue this one in its place."""
    latest = _latest_path(root, spec, search)
    if exists(fs, latest):
        other = read_bytes(fs, latest).decode(errors="replace").strip()
        if other != name and re.fullmatch(_sweep_pattern(spec, search), other) and \
                live_holder(fs, f"{root}/{other}.lock"):
            log(f"[sweep] {latest} keeps naming {other}, which is still running; resume this sweep with "
                f"--resume {name}")
            return
    write_atomic(fs, latest, name.encode())


def run_sweep(spec: SweepSpec, *, search: str = "grid", trials: int | None = None,
              resume: bool | str = False, log=print) -> SweepOutcome:
    """Harvest, run the grid (or an Optuna study) through Ray Tune, track it in MLflow and compute the frontier.

    One driver per sweep: the sweep's lease (<results_path>/<name>.lock, orchestrator.lease) is held while it
    runs, so a second --resume of a running sweep waits for it, and a dead driver's lease is taken over at once.
    """
    name = _sweep_name(spec, search, resume)  # fails now, not after the harvest, if nothing to resume
    fs, root = storage_fs(resolve_path(spec.results_path))
    fs.create_dir(root, recursive=True)
    with acquire(fs, f"{root}/{name}.lock", label=f"sweep {name}"):
        if not resume:
            _point_latest_at(fs, root, spec, search, name, log)
        return _run_named(spec, name, search, trials, bool(resume), log)


@dataclass(frozen=True)
class Activations:
    """The sweep's harvested stores, and what the harvest cost."""

    train_store: str
    eval_store: str
    seconds: float
    reused: bool  # both stores were complete before the sweep: the harvest only read their manifests
    concentration: float  # share of the eval activations' variance held by their top 1% of tokens


def _run_named(spec: SweepSpec, name: str, search: str, trials: int | None, resume: bool, log) -> SweepOutcome:
    tracker = _prepare(spec, name, resume, log)
    acts = _harvest_stores(spec, log)
    parent = _open_parent_run(tracker, spec, name, search, acts)
    exp_path = f"{resolve_path(spec.results_path).rstrip('/')}/{name}"
    tuner = _build_tuner(spec, name, search, trials, resume, tracker, parent, acts, exp_path, log)
    t1 = time.perf_counter()
    results = tuner.fit() if tuner is not None else []
    return _finish(spec, search, tracker, parent, acts, results, time.perf_counter() - t1, exp_path, name)


def _prepare(spec: SweepSpec, name: str, resume: bool, log) -> Tracker:
    """The tracker (a resumed sweep must match its spec) and a running Ray."""
    tracker = Tracker(spec.resolved_tracking_uri(), spec.experiment_name)
    if resume:
        tracker.check_resumable(name, spec.spec_hash())
    if os.environ.get("RAY_JOB_ID") and not os.environ.get("SAE_FRONTIER_HOME"):
        log(f"[sweep] relative paths of the spec resolve under {home()} (set SAE_FRONTIER_HOME to change it)")
    init_ray()
    return tracker


def _harvest_stores(spec: SweepSpec, log) -> Activations:
    """Harvest (or reuse) the train and eval stores, once for every trial."""
    t0 = time.perf_counter()
    configs = {split: harvest_config(spec, split) for split in ("train", "eval")}
    reused = all(store_complete(cfg) for cfg in configs.values())
    train_store, eval_store = (str(harvest(configs[split])) for split in ("train", "eval"))
    seconds = time.perf_counter() - t0
    log(f"[sweep] activations ready in {seconds:.1f}s: {train_store} (train), {eval_store} (eval)")
    concentration = eval_variance_concentration(eval_store)
    if concentration > 0.5:
        log(f"[sweep] warning: 1% of the eval tokens hold {concentration:.0%} of the activations' variance, so FVU "
            "mostly measures how well those few tokens are rebuilt (docs/science.md, the miniature's confound)")
    return Activations(train_store, eval_store, seconds, reused, concentration)


def _open_parent_run(tracker: Tracker, spec: SweepSpec, name: str, search: str, acts: Activations) -> str:
    """The sweep's parent run (reopened on resume), with the spec and what identifies its activations."""
    return tracker.parent_run(
        name, name=name, spec_hash=spec.spec_hash(), spec_yaml=spec.to_yaml(),
        params={"spec": spec.name, "search": search, "model": spec.model, "site": spec.site, "corpus": spec.corpus,
                "train_tokens": spec.train_tokens, "eval_tokens": spec.eval_tokens, "train_store": acts.train_store,
                "eval_store": acts.eval_store, "granularities": spec.granularities(),
                **activations_identity(acts.train_store, acts.eval_store),
                "commit": code_commit(), "scoring_rule_primary": PRIMARY_RULE, "eval_rules": ",".join(spec.eval.rules),
                "eval_top1pct_variance_share": f"{acts.concentration:.4f}"},
    )


def _build_tuner(spec: SweepSpec, name: str, search: str, trials: int | None, resume: bool, tracker: Tracker,
                 parent: str, acts: Activations, exp_path: str, log) -> tune.Tuner | None:
    """Tune's restored experiment, or a new Tuner over the grid points not yet finished (or an Optuna study);
    None when every grid point is finished."""
    finished: frozenset[str] = frozenset()
    if resume:  # identity is the grid point: finished points are never scheduled again, whatever Tune kept
        finished = frozenset(tracker.finished_points(parent))
        stale = tracker.close_stale_runs(parent)
        log(f"[sweep] resuming {name}: {len(finished)} grid point(s) finished"
            + (f", {stale} run(s) left RUNNING by the dead driver marked KILLED until their point runs" if stale else ""))
    restore = resume and tune.Tuner.can_restore(exp_path)
    packs = plan_grid(spec, acts.train_store, log, skip=finished) if search == "grid" and not restore else []
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec_json=spec.model_dump_json(), train_store=acts.train_store,
                             eval_store=acts.eval_store),
        {"cpu": spec.resources.cpus, "gpu": spec.resources.gpus},
    )
    if search == "optuna":
        # training reports carry no objectives (only a trial's final evaluation does, and a multi-objective
        # OptunaSearch reads only that one), so Tune must not demand them on every report
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if restore:
        log(f"[sweep] resuming {exp_path}: finished trials are kept, unfinished ones continue from their checkpoints")
        return tune.Tuner.restore(exp_path, trainable, resume_errored=True)
    if search == "grid" and not packs:
        log(f"[sweep] every grid point of {name} is finished: nothing to run")
        return None
    if resume:
        log(f"[sweep] Tune cannot restore {exp_path}: a new Tuner runs only the unfinished grid points")
    if search == "optuna":
        space = optuna_space(spec)
        tune_config = tune.TuneConfig(search_alg=optuna_searcher(spec), num_samples=trials or spec.optuna.trials,
                                      max_concurrent_trials=spec.resources.max_concurrent)
    else:
        space = grid_space(packs)
        tune_config = tune.TuneConfig(max_concurrent_trials=spec.resources.max_concurrent,
                                      trial_name_creator=grid_trial_name, trial_dirname_creator=grid_trial_dirname)
    status, verbose = grid_status() if search == "grid" else ([], 1)
    return tune.Tuner(
        trainable, param_space=space, tune_config=tune_config,
        run_config=tune.RunConfig(
            name=name, storage_path=resolve_path(spec.results_path),
            callbacks=[*status, MLflowSweepCallback(spec.resolved_tracking_uri(), spec.experiment_name,
                                                       parent, spec.model_dump_json())],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            failure_config=tune.FailureConfig(max_failures=2), verbose=verbose,
        ),
    )


def _failures(tracker: Tracker, parent: str, results) -> list[str]:
    """One line per failed grid point: its run's error tag, else (no run marked FAILED) Tune's own error."""
    failed = [r for r in tracker.runs_of(parent) if r.info.status == "FAILED"]
    errors = [f"{r.info.run_name}: {r.data.tags.get(ERROR_TAG, 'no reason recorded')}" for r in failed]
    errors += [str(r.error) for r in results if r.error and not failed]
    return [" ".join(e.split()) for e in errors]


def _finish(spec: SweepSpec, search: str, tracker: Tracker, parent: str, acts: Activations, results,
            trials_seconds: float, exp_path: str, name: str) -> SweepOutcome:
    """Close the parent run with the frontier and the costs; raise if the sweep was cut short or points failed."""
    unfinished = [r for r in results if r.error is None and phase_of(r.metrics) is not Phase.DONE]
    if unfinished:  # interrupted (Ctrl+C / SIGINT): Tune saved its state; the parent run stays open for --resume
        tracker.finish(parent, "KILLED")
        raise SweepInterrupted(f"{len(unfinished)} trial(s) unfinished; continue with: "
                               f"python sweeps/frontier.py --spec <this spec> --resume")
    errors = _failures(tracker, parent, results)
    points = tracker.curve_points([spec.experiment_name], parent_id=parent)
    frontier = compute_frontier(points)
    _log_frontier(tracker, parent, points, frontier, title=f"{spec.experiment_name} / {name}")
    tracker.log_metrics(parent, {"harvest_seconds": acts.seconds, "trials_seconds": trials_seconds,
                                 "trials_finished": float(points["run_id"].nunique() if not points.empty else 0),
                                 "trials_failed": float(len(errors))})
    tracker.finish(parent, "FAILED" if errors else "FINISHED")
    timings = pd.DataFrame([{"run_name": r.info.run_name, **{k: r.data.metrics.get(k, float("nan")) for k in TIMING_METRICS}}
                            for r in tracker.runs_of(parent)])
    outcome = SweepOutcome(spec.experiment_name, parent, frontier, points, acts.seconds, trials_seconds, exp_path,
                           timings, harvest_reused=acts.reused, parent_run_url=tracker.run_url(parent))
    if errors:
        raise PointsFailed(outcome, errors)
    if search == "optuna":
        outcome.pareto_trials = pareto_trials(spec)
    return outcome


def plan_grid(spec: SweepSpec, train_store: str, log=print, skip: frozenset[str] = frozenset()) -> list[dict]:
    """The grid in packs (orchestrator.packing), each with its memory estimate; the plan is printed. Points whose
    key is in `skip` (finished in an earlier attempt of this sweep) are left out."""
    manifest = read_manifest(train_store)
    lm = describe_model(spec.model, revision=spec.revision)
    rows = max(s["rows"] for s in manifest.shards)
    device = trial_device(spec)
    budget = memory_budget(spec)  # read once: the plan and the printed budget must agree
    todo = [p for p in spec.trial_points() if p.trial_key not in skip]
    packs = plan_packs(spec, d=manifest.d, lm=lm, shard_rows=rows, device=device, budget=budget, points=todo)
    estimates = [trial_memory(spec, p, d=manifest.d, lm=lm, shard_rows=rows, device=device) for p in packs]
    log(f"[sweep] {describe_plan(spec, packs, estimates, budget)}")
    return [{"points": [point.as_config() for point in p], "estimated_memory_mb": round(e.peak / MB, 1)}
            for p, e in zip(packs, estimates, strict=True)]


def _log_frontier(tracker: Tracker, run_id: str, points: pd.DataFrame, frontier: pd.DataFrame, title: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        write_frontier_files(out, points, frontier, title)
        tracker.log_artifacts(run_id, out, "frontier")


def write_frontier_files(out: Path, points: pd.DataFrame, frontier: pd.DataFrame, title: str,
                         rule: str = PRIMARY_RULE) -> None:
    """curve_points.csv, frontier.csv (per G), matched_l0.csv (every scoring rule present) and frontier.png."""
    points.to_csv(out / "curve_points.csv", index=False)
    frontier.to_csv(out / "frontier.csv", index=False)
    rules = sorted(points["rule"].dropna().unique()) if "rule" in points else []
    if rules:
        pd.concat([matched_l0(points, rule=r) for r in rules], ignore_index=True).to_csv(out / "matched_l0.csv",
                                                                                      index=False)
    if not points.empty:
        save_figure(plot_frontier(points, frontier, title=title, rule=rule), out / "frontier.png")


def compare(experiments: list[str], tracking_uri: str, out_dir: str) -> tuple[pd.DataFrame, Path]:
    """Frontiers of earlier sweeps side by side, from MLflow alone (nothing is trained).

    Runs are ranked only against runs on the same activations: the frontier, the matched-L0 table and the plots
    are split by activations group (`activations` column); `activations.txt` says which fields tell groups apart.
    """
    tracker = Tracker(tracking_uri, experiments[0])
    points = tracker.curve_points(experiments)
    if points.empty:
        raise ValueError(f"no finished trial runs found in experiments {experiments}")
    # sweeps logged before scoring rules existed hold only `reselect` curves: draw them rather than nothing
    rule = PRIMARY_RULE if (points["rule"] == PRIMARY_RULE).any() else str(points["rule"].iloc[0])
    frontier = compute_frontier(points, rule=rule)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_frontier_files(out, points, frontier, title=" vs ".join(experiments), rule=rule)
    save_figure(compare_experiments_figure(points, rule=rule), out / "compare.png")
    (out / "activations.txt").write_text(describe_activations(points) + "\n")
    (out / "experiments.json").write_text(json.dumps(experiments))
    return frontier, out


__all__ = ["run_sweep", "compare", "SweepOutcome", "SweepInterrupted", "frontier_table"]
