"""Several grid points per Tune trial: which points share a trial, and what such a trial costs in memory.

A pack trains its SAEs from one pass over the shards (`sae.train.Trainer` with several members) and evaluates
them with one LM load and one clean pass. Only points that read the same batches in the same order can share
one pass, so a pack never mixes seeds (the seed orders the batches). Every point keeps its own MLflow run,
checkpointed state, result bundle and failure (orchestrator.trial, orchestrator.tracking).

The memory estimate is printed before the sweep and `pack: auto` fills each trial up to the budget with it.
It is a sum of the big buffers (weights, optimiser moments, the step's [B, n] and per-group temporaries, the
shard buffer, the LM and its cached clean log-probs), plus the process itself; the trial records its measured
peak beside the estimate (`peak_memory_mb`, `estimated_memory_mb`) so the model can be checked on any machine.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

from orchestrator.spec import SweepSpec, TrialPoint
from sae.evaluate import EVAL_BATCH_TOKENS
from sae.lm import ModelInfo
from sae.splice import LOSS_CHUNK_ELEMS
from sae.train import AUXK_DENSE_MIN_DENSITY

MB = 1 << 20
# A trial process with torch, transformers, pyarrow and a Ray worker loaded, before any big tensor (measured on
# the 2-core dev box: peak_memory_train_mb of the smoke spec's trials, whose SAEs and shards are tiny: 581-640 MB).
PROCESS_BYTES_CPU = 600 * MB
PROCESS_BYTES_CUDA = 600 * MB  # the CUDA context and cuBLAS workspaces, counted against the GPU
BUFFER_SHARDS = 4  # orchestrator.shards.iter_batches keeps this many shards in its shuffle buffer


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of one trial: the larger of its training and its evaluation phase."""

    train: int
    eval: int

    @property
    def peak(self) -> int:
        return max(self.train, self.eval)


def trial_device(spec: SweepSpec) -> str:
    """Where a trial's SAEs will live, as planning sees it: a GPU when the spec asks for one (or `auto` with GPUs
    per trial), else the CPU."""
    return "cuda" if spec.device == "cuda" or (spec.device == "auto" and spec.resources.gpus > 0) else "cpu"


def sae_state_bytes(d: int, n: int) -> int:
    """Weights, gradients and both Adam moments, all fp32."""
    return 16 * (2 * d * n + n + d)


def sae_step_bytes(d: int, n: int, batch: int, groups: int, compute_dtype: str, aux_k: int) -> int:
    """The step's temporaries: pre-activations [B, n] (and their low-precision copy), the input and its
    centred and normalised copies [B, d], per group a partial reconstruction and its gradient [B, d], and once
    latents die, AuxK's dense path over up to aux_k / AUXK_DENSE_MIN_DENSITY dead columns (three [B, dead])."""
    low = 0 if compute_dtype == "float32" else 2  # "auto" may resolve to bf16: count its copy
    dead = min(n, int(aux_k / AUXK_DENSE_MIN_DENSITY))
    return batch * ((4 + low) * n + 4 * (3 + 2 * groups) * d + 3 * 4 * dead)


def trial_memory(spec: SweepSpec, points: list[TrialPoint], *, d: int, lm: ModelInfo, shard_rows: int,
                 device: str = "cpu") -> MemoryEstimate:
    """The estimate for one trial training and evaluating `points` together (see the module docstring)."""
    act_bytes = 4 if spec.activation_dtype == "float32" else 2
    base = PROCESS_BYTES_CUDA if device == "cuda" else PROCESS_BYTES_CPU
    batch = spec.train.batch_size
    steps = sorted((sae_step_bytes(d, p.n_latents, batch, len(p.boundaries or (p.n_latents,)),
                                   spec.train.compute_dtype,
                                   spec.train_config(p, device).aux_k_for(d, p.n_latents)) for p in points),
                   reverse=True)
    parallel = max(1, min(len(points), int(spec.resources.cpus)))
    shards = 0 if device == "cuda" else BUFFER_SHARDS * shard_rows * d * (act_bytes + 4)
    train = base + shards + sum(sae_state_bytes(d, p.n_latents) for p in points) + sum(steps[:parallel])

    lm_dtype_bytes = 4 if spec.eval.splice_dtype_on(device) == "float32" else 2  # the evaluation's LM
    # loading holds the checkpoint's tensors and the model's at once (measured: +1.13 GB for SmolLM2's 0.54 GB)
    lm_bytes = lm.n_params * lm_dtype_bytes * (1 if device == "cuda" else 2)
    length = spec.eval.splice_length or spec.context_length
    clean_p = spec.eval.splice_contexts * (length - 1) * lm.vocab_size * 4  # the scorer's cached clean distribution
    # one [tokens, vocab] fp32 logits chunk of the spliced losses. Against peaks measured on the dev box
    # (benchmarks/sweep_cost.py, default spec: 2.30-2.34 GB per one-point trial, 2.41 GB for the 4-point pack)
    # this estimate is 1.12-1.16x (2.58-2.73 GB): on the safe side, within 20%
    loss_chunk = min(LOSS_CHUNK_ELEMS, spec.eval.splice_contexts * (length - 1) * lm.vocab_size) * 4
    # on a CPU the eval set, its normalised copy and one reconstruction, and one SAE's pre-activations and code
    # over it; a GPU trial keeps the eval set and the codes in host memory and holds one batch of each
    # (the largest: an eval batch, RSA's sample, or one splice batch of 8 contexts, encoded at once)
    splice_rows = 8 * ((spec.eval.splice_length or spec.context_length) - 1)
    batch_rows = max(EVAL_BATCH_TOKENS, spec.eval.rsa_tokens, splice_rows)
    rows = spec.eval_tokens if device != "cuda" else min(spec.eval_tokens, batch_rows)
    eval_acts = rows * d * 4 * 3
    rsa = 2 * spec.eval.rsa_tokens**2 * 8  # RSA's float64 Gram matrices of x and of one reconstruction
    widest = max(p.n_latents for p in points)
    encode = rows * widest * 4 * 2
    importance = (spec.eval.importance_tokens if device != "cuda" else min(spec.eval.importance_tokens,
                                                                            EVAL_BATCH_TOKENS)) * d * 4
    weights = sum(4 * (2 * d * p.n_latents) for p in points)
    evaluation = base + lm_bytes + clean_p + loss_chunk + eval_acts + encode + importance + weights + rsa
    return MemoryEstimate(train=train, eval=evaluation)


def memory_budget(spec: SweepSpec) -> int:
    """Bytes one trial may use: resources.memory_gb, else this machine's available memory / max_concurrent."""
    if spec.resources.memory_gb is not None:
        return int(spec.resources.memory_gb * (1 << 30))
    return available_memory() // spec.resources.max_concurrent


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return physical_memory()


def physical_memory() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan_packs(spec: SweepSpec, *, d: int, lm: ModelInfo, shard_rows: int, device: str = "cpu",
               budget: int | None = None, points: list[TrialPoint] | None = None) -> list[list[TrialPoint]]:
    """The grid's points (or `points`, a subset) in packs: one seed per pack, grid order kept, at most
    `resources.pack` points each, or (`auto`) as many as fit the memory budget. A point that alone exceeds the
    budget still gets a trial."""
    size = spec.resources.pack
    limit = budget if budget is not None else memory_budget(spec)
    packs: list[list[TrialPoint]] = []
    todo = spec.trial_points() if points is None else points
    for _, group in itertools.groupby(sorted(todo, key=lambda p: p.seed), key=lambda p: p.seed):
        current: list[TrialPoint] = []
        for point in group:
            full = len(current) >= size if size != "auto" else (
                bool(current) and trial_memory(spec, [*current, point], d=d, lm=lm, shard_rows=shard_rows,
                                               device=device).peak > limit)
            if full:
                packs.append(current)
                current = []
            current.append(point)
        packs.append(current)
    return packs


def pack_name(points: list[TrialPoint]) -> str:
    """A pack's readable name: its point's name (TrialPoint.name), or its first point's and how many more."""
    first = points[0].name
    return first if len(points) == 1 else f"{first} +{len(points) - 1}"


def describe_plan(spec: SweepSpec, packs: list[list[TrialPoint]], estimates: list[MemoryEstimate],
                  budget: int) -> str:
    """What the sweep prints before it starts: packs, points per pack and the largest trial's memory estimate
    against the budget the packs were planned with."""
    worst = max(estimates, key=lambda e: e.peak)
    sizes = sorted({len(p) for p in packs})
    return (f"{sum(map(len, packs))} grid points in {len(packs)} trial(s) of {'-'.join(map(str, sizes))} point(s) "
            f"(resources.pack = {spec.resources.pack}); estimated peak memory per trial <= {worst.peak / MB:.0f} MB "
            f"(training {worst.train / MB:.0f} MB, evaluation {worst.eval / MB:.0f} MB; budget {budget / MB:.0f} MB)")
