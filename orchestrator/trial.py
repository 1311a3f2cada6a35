"""One Ray Tune trial: stream the shared shards, train one SAE, evaluate it, leave a result bundle.

The trial only computes; it never writes MLflow. It reports training metrics to Tune as it goes (the driver's
tracking callback logs them) and saves the trainer state as a Tune checkpoint every few steps, so a failed
trial restarts from its last checkpoint rather than from scratch. Its last report carries a checkpoint holding
the result bundle: result.json (final metrics, curves with step = G, power law), the SAE (safetensors +
cfg.json) and the plots.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from ray import tune

from orchestrator.shards import iter_batches, iter_records, read_manifest
from orchestrator.spec import SweepSpec, point_from_config
from sae.checkpoint import save_sae
from sae.config import SAEConfig
from sae.corpus import special_ids
from sae.evaluate import EvalData, evaluate_progressive, principal_method
from sae.importance import latent_stats
from sae.lm import compute_dtype_for, load_lm
from sae.plots import plot_importance, plot_pruning_curves
from sae.splice import SpliceScorer
from sae.train import Trainer

TRAINER_STATE = "trainer.pt"
RESULT_FILE = "result.json"  # the result bundle's index, read by orchestrator.tracking


def pick_device(requested: str) -> str:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def training_batches(store: str, spec: SweepSpec, seed: int, device: str):
    """The deterministic stream of training batches over all epochs (reshuffled per epoch)."""
    for epoch in range(spec.train.epochs):
        for batch in iter_batches(store, spec.train.batch_size, shuffle=True, seed=seed * 1009 + epoch):
            yield batch.to(device, non_blocking=True)


def importance_sample(store: str, tokens: int, batch_size: int = 4096):
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


def _report_train(trainer: Trainer, metrics: dict[str, float], spec: SweepSpec) -> None:
    """Report every `report_every_steps`; save the trainer state every `checkpoint_every_steps`."""
    checkpoint = trainer.step % spec.train.checkpoint_every_steps == 0
    if not checkpoint and trainer.step % spec.train.report_every_steps:
        return
    payload = {"phase": "train", "tokens_seen": trainer.tokens_seen, "step": trainer.step, **metrics}
    if not checkpoint:
        tune.report(payload)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(trainer.state_dict(), Path(d) / TRAINER_STATE)
        tune.report(payload, checkpoint=tune.Checkpoint.from_directory(d))


def run_trial(config: dict[str, Any], *, spec_json: str, train_store: str, eval_store: str) -> None:
    """The Tune trainable (wrapped with tune.with_parameters and tune.with_resources by the sweep)."""
    spec = SweepSpec.model_validate_json(spec_json)
    point = point_from_config(config, spec)
    device = pick_device(spec.device)
    torch.set_num_threads(max(1, int(spec.resources.cpus)))
    manifest = read_manifest(train_store)
    sae_cfg = SAEConfig(
        d_in=manifest.d, n_latents=point["n_latents"], k=point["k"], architecture=point["architecture"],
        partition=tuple(point["boundaries"]) if point["boundaries"] else None,
    )
    trainer = Trainer([(sae_cfg, spec.train_config(point, device))])

    resumed = tune.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            if (Path(d) / RESULT_FILE).exists():  # evaluation already finished: report it again, nothing to redo
                final = json.loads((Path(d) / RESULT_FILE).read_text())["final"]
                tune.report({"phase": "eval", **final, **_objectives(final, spec, point)}, checkpoint=resumed)
                return
            trainer.load_state_dict(torch.load(Path(d) / TRAINER_STATE, weights_only=True, map_location=device))

    t0 = time.perf_counter()
    start, start_tokens = trainer.step, trainer.tokens_seen
    metrics: dict[str, float] = {}
    for batch in itertools.islice(training_batches(train_store, spec, point["seed"], device), start, None):
        metrics = trainer.train_step(batch)[0]
        _report_train(trainer, metrics, spec)
    train_seconds = time.perf_counter() - t0
    sae = trainer.saes[0].eval()

    data, positions = load_eval_data(eval_store, spec)
    lm = load_lm(spec.model, device=device, dtype=compute_dtype_for(device, spec.lm_dtype), revision=spec.revision)
    contexts = splice_contexts(data, positions, spec.eval.splice_contexts, special_ids(lm.tokenizer)[0],
                               spec.eval.splice_length)
    scorer = SpliceScorer(lm, contexts, spec.site)
    opts = spec.eval.options(spec.granularities())
    t1 = time.perf_counter()
    ranking = latent_stats(sae, importance_sample(train_store, spec.eval.importance_tokens))
    label = f"n={point['n_latents']} k={point['k']} {point['partition']}"
    report = evaluate_progressive(sae, data, opts, scorer, ranking=ranking,
                                  progress=lambda msg: print(f"[eval {label}] {msg}", flush=True))
    final = {
        **report.final,
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - t1,
        "train_tokens_per_second": (trainer.tokens_seen - start_tokens) / max(train_seconds, 1e-9),
        "tokens_seen": float(trainer.tokens_seen),
        "ce_clean": scorer.ce_clean,
        "splice_contexts": float(contexts.shape[0]),
        "splice_tokens": float(contexts.numel()),
        "ce_zero": scorer.ce_zero,
        "objective_fvu": report.at("fvu", principal_method(sae_cfg.is_matryoshka), spec.objective_granularity()),
        **{f"train_final/{k}": v for k, v in metrics.items()},
    }
    with tempfile.TemporaryDirectory() as d:
        bundle = Path(d)
        save_sae(sae, bundle / "sae")
        (bundle / "plots").mkdir()
        if report.fit is not None:
            plot_importance(report.importance, report.fit).savefig(bundle / "plots" / "power_law.png", dpi=110)
        for metric, rule in itertools.product(("fvu", "ce_score", "l0"), opts.rules):
            rows = report.curve_rows(metric, rule)
            if rows:
                plot_pruning_curves(rows, metric=metric, log_y=metric == "fvu", title=f"{metric} vs G ({rule} rule)"
                                    ).savefig(bundle / "plots" / f"pruning_{metric}.{rule}.png", dpi=110)
        result = {
            "final": final, "curves": report.curves, "power_law": report.power_law, "point": point,
            "resolved": {"d_in": manifest.d, "input_scale": sae.cfg.input_scale, "device": device,
                         "lr": spec.train_config(point, device).learning_rate(point["n_latents"])},
        }
        (bundle / RESULT_FILE).write_text(json.dumps(result, indent=1))
        tune.report({"phase": "eval", **final, **_objectives(final, spec, point)},
                    checkpoint=tune.Checkpoint.from_directory(d))


def _objectives(final: dict[str, float], spec: SweepSpec, point: dict[str, Any]) -> dict[str, float]:
    """The two numbers an Optuna study minimises: FVU at the objective G, and dictionary size (or L0)."""
    return {"objective_fvu": final["objective_fvu"],
            "objective_size": float(point["n_latents"] if spec.optuna.size_objective == "n_latents" else final["l0"])}
