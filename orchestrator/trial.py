"""One Ray Tune trial: stream the shared shards, train a pack of SAEs, evaluate each, leave one bundle per point.

A trial holds one or several grid points (orchestrator.packing): they train together from one pass over the
shards and are evaluated one after another with one LM load and one clean pass. Each point keeps its own
outcome: a non-finite loss stops that SAE only, an evaluation error fails that point only, and each finished
point's bundle is checkpointed as soon as it exists, so a restarted trial redoes neither its training nor the
evaluations already done. The trial only computes; it never writes MLflow. It reports training metrics to Tune
as `<point key>/<metric>` (the driver's tracking callback logs them to each point's run) and saves its state as
a Tune checkpoint every few steps (no more often than `train.checkpoint_min_seconds`) and when training ends.
Its checkpoint holds trainer.safetensors + trainer.json (no pickle) and
points/<point key>/ with either the result bundle (result.json: final metrics, curves with step = G, power law;
the SAE as safetensors + cfg.json; its SAELens export in sae_lens/; plots) or error.txt.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import resource
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from orchestrator.bundle import (
    ERROR_FILE,
    DoneReport,
    EvaluatedReport,
    TrainedReport,
    TrainReport,
    point_dir,
    point_done,
)
from orchestrator.packing import MB
from orchestrator.shards import iter_batches, iter_records, read_manifest
from orchestrator.spec import SweepSpec, TrialPoint, points_from_config
from sae.checkpoint import load_trainer_state, save_sae, save_trainer_state
from sae.corpus import special_ids
from sae.evaluate import EVAL_BATCH_TOKENS, EvalData, evaluate_progressive, principal_method
from sae.export import RESULT_FILE, SAE_DIR, SAELENS_DIR, SPEC_KEYS, spec_metadata, write_saelens
from sae.importance import latent_stats
from sae.lm import load_lm
from sae.plots import plot_importance, plot_pruning_curves
from sae.splice import SpliceScorer
from sae.train import Trainer, prefetched, to_device

TRAINER_STATE = "trainer"  # trainer.safetensors + trainer.json (sae.checkpoint.save_trainer_state)
TRAIN_FINAL = "train_final.json"  # each point's last training metrics, for a trial restarted after training
PREFETCH_BATCHES = 4  # training batches a GPU trial's host prepares ahead of the step
INJECT_NAN_ENV = "SAE_FRONTIER_INJECT_NAN"
INJECT_CRASH_ENV = "SAE_FRONTIER_INJECT_CRASH"
INJECT_CRASH_AT_ENV = "SAE_FRONTIER_INJECT_CRASH_AT"  # "evaluated" (default: after the first bundle) or "trained"
# errors that repeat on every attempt (bad input, a corrupt shard, NaN/Inf, a bug): failed at once, not retried
DETERMINISTIC_ERRORS = (ValueError, TypeError, ArithmeticError, LookupError, AssertionError, NotImplementedError)


def pick_device(requested: str) -> str:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def training_batches(store: str, spec: SweepSpec, seed: int, device: str):
    """The deterministic stream of training batches over all epochs (reshuffled per epoch). Each shard's hash is
    checked in the first epoch; the later ones read the same, already checked files."""
    for epoch in range(spec.train.epochs):
        for batch in iter_batches(store, spec.train.batch_size, shuffle=True, seed=seed * 1009 + epoch,
                                  verify=epoch == 0):
            yield to_device(batch, device)


def importance_sample(store: str, tokens: int, batch_size: int = EVAL_BATCH_TOKENS):
    """A fixed, seeded sample of TRAINING activations that ranks the latents (eval tokens only score them)."""
    got = 0
    for batch in iter_batches(store, batch_size, shuffle=True, seed=7919):
        if got >= tokens:
            return
        batch = batch[: tokens - got]
        got += batch.shape[0]
        yield batch


def load_eval_data(store: str, spec: SweepSpec) -> tuple[EvalData, torch.Tensor]:
    """Eval activations in memory plus the first `splice_contexts` contexts' token ids (with BOS re-added)."""
    acts, toks, ctx, docs, pos, labels = [], [], [], [], [], []
    for rec in iter_records(store, batch_size=8192):
        acts.append(rec["act"].float())
        toks.append(rec["token_id"])
        ctx.append(rec["context_id"])
        docs.append(rec["doc_id"])
        pos.append(rec["position"])
        labels.extend(rec["label"])
    data = EvalData(
        acts=torch.cat(acts), token_ids=torch.cat(toks), context_ids=torch.cat(ctx), doc_ids=torch.cat(docs),
        labels=labels if spec.label_column and any(labels) else None,
    )
    return data, torch.cat(pos)


def splice_contexts(data: EvalData, positions: torch.Tensor, n: int, bos_id: int, length: int | None = None
                    ) -> torch.Tensor:
    """Rebuild n eval contexts [n, T] from the per-token records (BOS was dropped at harvest), cut to `length`
    tokens (BOS included) when given: CE/KL cost grows with tokens, their interval with contexts."""
    chosen = torch.unique(data.context_ids)[:n]
    rows = []
    for c in chosen.tolist():
        mask = data.context_ids == c
        order = torch.argsort(positions[mask])
        rows.append(torch.cat([torch.tensor([bos_id]), data.token_ids[mask][order]]))
    width = min(min(len(r) for r in rows), length or len(rows[0]))
    return torch.stack([r[:width] for r in rows])


def peak_memory_mb(device: str) -> float:
    """This process's peak resident memory (CPU), or the peak memory torch allocated on the GPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / MB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _CheckpointClock:
    """When training saves the trial's state: at every `checkpoint_every_steps`-th step that comes at least
    `checkpoint_min_seconds` after the last save. A save writes every SAE's weights and Adam moments and Tune
    copies them into its storage (an upload on a cluster), which on a GPU takes longer than the 50 steps between
    two saves; a crash costs at most the time between saves."""

    def __init__(self, spec: SweepSpec, now: Callable[[], float] = time.monotonic):
        self.every, self.min_seconds = spec.train.checkpoint_every_steps, spec.train.checkpoint_min_seconds
        self.now = now
        self.last = now()

    def due(self, step: int) -> bool:
        if step % self.every or self.now() - self.last < self.min_seconds:
            return False
        self.last = self.now()
        return True


def _report_train(trainer: Trainer, metrics: list[dict[str, float]], keys: list[str], spec: SweepSpec,
                  work: Path, clock: _CheckpointClock) -> None:
    """Report every `report_every_steps`; save the trainer state when `clock` says."""
    checkpoint = not trainer.finished and clock.due(trainer.step)  # the last step's is taken with TRAINED
    if not checkpoint and trainer.step % spec.train.report_every_steps:
        return
    payload = TrainReport(trainer.tokens_seen, trainer.step, dict(zip(keys, metrics, strict=True))).to_tune()
    if not checkpoint:
        tune.report(payload)
        return
    save_trainer_state(trainer.state_dict(), work, TRAINER_STATE)
    tune.report(payload, checkpoint=tune.Checkpoint.from_directory(work))


def run_trial(config: dict[str, Any], *, spec_json: str, train_store: str, eval_store: str) -> None:
    """The Tune trainable (wrapped with tune.with_parameters and tune.with_resources by the sweep).

    A deterministic error (`DETERMINISTIC_ERRORS`: a corrupt shard, a bad setting, a non-finite value, a bug)
    would fail again on every retry, so it fails the trial's unfinished points at once, each with its reason
    (error.txt, the run's `sae_frontier.error` tag), and the trial ends without a Tune retry. Anything else (a
    lost node, out of memory, a full disk, a network error) propagates, and Tune retries the trial from its last
    checkpoint (`FailureConfig.max_failures`).
    """
    spec = SweepSpec.model_validate_json(spec_json)
    points = points_from_config(config, spec)
    work = Path(tempfile.mkdtemp(prefix="sae-trial-"))
    trainer: Trainer | None = None
    try:
        resumed = tune.get_checkpoint()
        if resumed is not None:
            with resumed.as_directory() as d:
                shutil.copytree(d, work, dirs_exist_ok=True)
            if all(point_done(work, p) for p in points):  # evaluation already finished: report it again
                tune.report(_final_report(work, points, spec), checkpoint=resumed)
                return
        device = pick_device(spec.device)
        trainer = _trainer(spec, points, train_store, device)
        if resumed is not None:
            trainer.load_state_dict(load_trainer_state(work, TRAINER_STATE))
        estimated_mb = float(config.get("pack", {}).get("estimated_memory_mb", float("nan")))
        _train_and_evaluate(trainer, points, [p.trial_key for p in points], spec, device, train_store,
                            eval_store, work, estimated_mb)
    except DETERMINISTIC_ERRORS as err:
        why = f"{type(err).__name__}: {err}\n\nnot retried: this error repeats on every attempt\n\n" \
              f"{traceback.format_exc()}"
        for point in points:
            if not point_done(work, point):
                _write_error(work, point, why)
        tune.report(_final_report(work, points, spec), checkpoint=tune.Checkpoint.from_directory(work))
    finally:
        if trainer is not None:
            trainer.close()
        shutil.rmtree(work, ignore_errors=True)


def _trainer(spec: SweepSpec, points: list[TrialPoint], train_store: str, device: str) -> Trainer:
    """The pack's Trainer: one member per point, stepped `min(points, cpus)` at a time."""
    cpus = max(1, int(spec.resources.cpus))
    torch.set_num_threads(cpus)
    manifest = read_manifest(train_store)
    members = [(p.sae_config(manifest.d), spec.train_config(p, device)) for p in points]
    if len({p.seed for p in points}) != 1:
        keys = [p.trial_key for p in points]
        raise ValueError(f"a pack reads one ordered stream of batches, so its points must share a seed: {keys}")
    return Trainer(members, parallel=min(len(points), cpus), isolate_failures=True)


def _train_and_evaluate(trainer: Trainer, points: list[TrialPoint], keys: list[str], spec: SweepSpec,
                        device: str, train_store: str, eval_store: str, work: Path, estimated_mb: float) -> None:
    t0 = time.perf_counter()
    start, start_tokens = trainer.step, trainer.tokens_seen
    saved = json.loads((work / TRAIN_FINAL).read_text()) if (work / TRAIN_FINAL).exists() else {}
    last: list[dict[str, float]] = [saved.get("points", {}).get(key, {}) for key in keys]  # kept across restarts
    trained_here = not trainer.finished
    if trained_here:
        clock = _CheckpointClock(spec)

        def on_report(_tokens: int, metrics: list[dict[str, float]]) -> None:
            nonlocal last
            last = [m or old for m, old in zip(metrics, last, strict=True)]
            _report_train(trainer, metrics, keys, spec, work, clock)

        batches = itertools.islice(training_batches(train_store, spec, points[0].seed, device), start, None)
        if device != "cpu":  # the host prepares the next batches while the GPU steps (sae.train.prefetched)
            batches = prefetched(batches, PREFETCH_BATCHES)
        if os.environ.get(INJECT_NAN_ENV):
            batches = _faults_after_first_step(batches, trainer, keys)
        try:
            trainer.fit(batches, callback=on_report,
                        log_every=math.gcd(spec.train.report_every_steps, spec.train.checkpoint_every_steps))
        finally:  # fit may stop early or raise: a prefetch thread stops with it
            close = getattr(batches, "close", None)
            if close is not None:
                close()
    train_seconds = time.perf_counter() - t0
    training = {"pack_train_seconds": train_seconds,  # of the process that finished the training
                "train_tokens_per_second": (trainer.tokens_seen - start_tokens) / max(train_seconds, 1e-9),
                "peak_memory_train_mb": peak_memory_mb(device)} if trained_here or "training" not in saved \
        else saved["training"]
    for i, why in trainer.failures.items():
        _write_error(work, points[i], f"training stopped at step {trainer.step}: {why}")
    save_trainer_state(trainer.state_dict(), work, TRAINER_STATE)  # a restart after this point never retrains
    _write_text_atomic(work / TRAIN_FINAL, json.dumps({"points": dict(zip(keys, last, strict=True)),
                                                      "training": training}))
    if trained_here:  # loading the LM and the first evaluation can take minutes: a crash there keeps the training
        tune.report(TrainedReport(trainer.step).to_tune(), checkpoint=tune.Checkpoint.from_directory(work))
        _inject_crash("trained")
    todo = [(i, p) for i, p in enumerate(points) if not point_done(work, p)]
    compute_dtypes = trainer.compute_dtypes
    saes = trainer.release()  # fp32 for scoring; the optimiser moments are not needed for evaluation

    t1 = time.perf_counter()
    if todo:
        import transformers

        splice_dtype = spec.eval.splice_dtype_on(device)
        # a trial's output reaches the driver through Ray's log lines, where a "Loading weights" bar is just noise
        transformers.utils.logging.disable_progress_bar()
        data, positions = load_eval_data(eval_store, spec)
        lm = load_lm(spec.model, device=device, dtype=splice_dtype, revision=spec.revision)
        contexts = splice_contexts(data, positions, spec.eval.splice_contexts, special_ids(lm.tokenizer)[0],
                                   spec.eval.splice_length)
        scorer = SpliceScorer(lm, contexts, spec.site)
        print(f"[eval] LM splice: {scorer.path} path, {splice_dtype}, {contexts.shape[0]} contexts x "
              f"{contexts.shape[1]} tokens{f' ({scorer.fallback_reason})' if scorer.path == 'full' else ''}", flush=True)
        sample = list(importance_sample(train_store, spec.eval.importance_tokens))
    shared_eval = time.perf_counter() - t1
    shared = {"pack_size": float(len(points)), **training,
              "train_seconds": training["pack_train_seconds"] / len(points), "estimated_memory_mb": estimated_mb}
    for i, point in todo:
        t2 = time.perf_counter()
        try:
            final, report = _evaluate_point(saes[i], point, spec, data, scorer, sample)
        except Exception:  # noqa: BLE001 - one point's failure must not take the pack's other points with it
            _write_error(work, point, traceback.format_exc())
        else:
            final.update(shared)
            final.update({"eval_seconds": time.perf_counter() - t2 + shared_eval / len(todo),
                          "tokens_seen": float(trainer.tokens_seen), "ce_clean": scorer.ce_clean,
                          "ce_zero": scorer.ce_zero, "splice_contexts": float(contexts.shape[0]),
                          "splice_tokens": float(contexts.numel()), "peak_memory_mb": peak_memory_mb(device),
                          **{f"train_final/{k}": v for k, v in last[i].items()}})
            _write_bundle(point_dir(work, point), saes[i], point, spec, report, final,
                          {"device": device, "compute_dtype": compute_dtypes[i],
                           "splice_dtype": splice_dtype})
        tune.report(EvaluatedReport(point.trial_key).to_tune(), checkpoint=tune.Checkpoint.from_directory(work))
        _inject_crash("evaluated")
    tune.report(_final_report(work, points, spec), checkpoint=tune.Checkpoint.from_directory(work))


def _inject_crash(at: str) -> None:
    """Test hook: with $SAE_FRONTIER_INJECT_CRASH naming a file that does not exist yet, create it and kill this
    process at once (as a lost node would), right after the checkpoint of `at` ($SAE_FRONTIER_INJECT_CRASH_AT:
    "evaluated", a point's bundle, by default; or "trained", the end of training): Tune must restart the trial
    from that checkpoint without redoing finished work. Unset in normal runs."""
    marker = os.environ.get(INJECT_CRASH_ENV)
    if marker and not os.path.exists(marker) and os.environ.get(INJECT_CRASH_AT_ENV, "evaluated") == at:
        Path(marker).write_text(str(os.getpid()))
        os._exit(1)


def _faults_after_first_step(batches, trainer: Trainer, keys: list[str]):
    """Test hook: the points named in $SAE_FRONTIER_INJECT_NAN (comma-separated point keys) get an infinite
    decoder weight after a fresh run's first step, so their next loss is non-finite (tests that one point's
    failure stays its own). Unset in normal runs."""
    poisoned = set(filter(None, os.environ.get(INJECT_NAN_ENV, "").split(",")))
    for batch in batches:
        if trainer.step == 1:  # the generator resumes here once the first step is done
            with torch.no_grad():
                for i, key in enumerate(keys):
                    if key in poisoned:
                        trainer.saes[i].W_dec[:, 0] = float("inf")
        yield batch


def _evaluate_point(sae, point: TrialPoint, spec: SweepSpec, data: EvalData, scorer: SpliceScorer,
                    sample: list[torch.Tensor]):
    opts = spec.eval.options(spec.granularities())
    ranking = latent_stats(sae, iter(sample))
    report = evaluate_progressive(sae, data, opts, scorer, ranking=ranking,
                                  progress=lambda msg: print(f"[eval {point.name}] {msg}", flush=True))
    final = {**report.final,
             "objective_fvu": report.at("fvu", principal_method(sae.cfg.is_matryoshka), spec.objective_granularity())}
    return final, report


def _write_bundle(out: Path, sae, point: TrialPoint, spec: SweepSpec, report, final: dict[str, float],
                  resolved: dict[str, str]) -> None:
    """The point's result bundle, written under a temporary name and renamed into place."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_sae(sae, tmp / SAE_DIR)
    # what an export needs besides the weights, kept in result.json so `python -m sae.export` can redo this later
    activations = {key: getattr(spec, key) for key in SPEC_KEYS.values()}
    write_saelens(sae, tmp / SAELENS_DIR, **spec_metadata(activations))  # the same SAE for SAELens, scale folded in
    (tmp / "plots").mkdir()
    if report.fit is not None:
        plot_importance(report.importance, report.fit).savefig(tmp / "plots" / "power_law.png", dpi=110)
    for metric, rule in itertools.product(("fvu", "ce_score", "l0"), spec.eval.rules):
        rows = report.curve_rows(metric, rule)
        if rows:
            plot_pruning_curves(rows, metric=metric, log_y=metric == "fvu", title=f"{metric} vs G ({rule} rule)"
                                ).savefig(tmp / "plots" / f"pruning_{metric}.{rule}.png", dpi=110)
    result = {
        "final": final, "curves": report.curves, "power_law": report.power_law, "point": point.as_config(),
        "resolved": {"d_in": sae.cfg.d_in, "input_scale": sae.cfg.input_scale, **activations, **resolved,
                     "lr": spec.train_config(point, resolved["device"]).learning_rate(point.n_latents)},
    }
    (tmp / RESULT_FILE).write_text(json.dumps(result, indent=1))
    tmp.rename(out)


def _write_error(work: Path, point: TrialPoint, why: str) -> None:
    out = point_dir(work, point)
    if (out / ERROR_FILE).exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    _write_text_atomic(out / ERROR_FILE, why)


def _write_text_atomic(path: Path, text: str) -> None:
    """Write beside `path` under a temporary name, then rename: a checkpoint never holds half a file."""
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    tmp.rename(path)


def _final_report(work: Path, points: list[TrialPoint], spec: SweepSpec) -> dict[str, Any]:
    """The trial's last report: how many points failed, plus (one-point trials, e.g. Optuna's) its objectives."""
    failed = [p for p in points if (point_dir(work, p) / ERROR_FILE).exists()]
    final: dict[str, float] = {}
    if len(points) == 1:
        final = {} if failed else json.loads((point_dir(work, points[0]) / RESULT_FILE).read_text())["final"]
        final = {**final, **_objectives(final, spec, points[0])}
    return DoneReport(len(points), len(failed), ray.get_runtime_context().get_node_id(), final).to_tune()


def _objectives(final: dict[str, float], spec: SweepSpec, point: TrialPoint) -> dict[str, float]:
    """The two numbers an Optuna study minimises: FVU at the objective G, and dictionary size (or L0); NaN for a
    failed point, which Optuna records as a failed trial."""
    nan = float("nan")
    return {"objective_fvu": final.get("objective_fvu", nan),
            "objective_size": float(point.n_latents if spec.optuna.size_objective == "n_latents"
                                    else final.get("l0", nan))}
