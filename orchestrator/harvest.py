"""Harvest LM activations once per key into a content-addressed shard store, with Ray Data.

Pipeline: the driver cuts token contexts (sae.corpus) and groups them into shards of whole contexts; a Ray
Dataset of one row per missing shard flows through `map_batches` on an ActorPoolStrategy whose actors each hold
the LM; every actor runs its shard's contexts up to the site only, writes the shard (parquet, temp name then
rename) and its sidecar straight to storage, and returns a few numbers. Activations never travel back through
the object store, so the pipeline costs little more than the forward passes themselves.

Reuse and resume: `<storage>/<key>/manifest.json` marks a complete store (returned at once, no LM work);
otherwise every shard whose file and sidecar exist and whose sha256 verifies is kept and only the rest is run.
The shard plan (contexts per shard) is fixed in plan.json by the first attempt, so a resume cuts identical shards.

Concurrency: a harvest holds the lease `<storage>/<key>.lock` (orchestrator.lease) from its first write to its
manifest. A second harvest of the key (another sweep of the same spec) waits for it and then reuses the complete
store; a holder that crashed is taken over once its lease lapses. Temp files are cleaned up only by the holder,
and only those no live writer can still be writing (Lease.stale_before).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow.fs as pafs
import torch
from pydantic import Field, field_validator, model_validator

from orchestrator.lease import Lease, acquire
from orchestrator.progress import Progress
from orchestrator.shards import (
    PLAN,
    STORAGE_DTYPES,
    Manifest,
    ShardStore,
    manifest_entry,
    shard_name,
    sidecar_name,
    write_manifest,
    write_shard,
)
from sae.corpus import options_key
from sae.lm import (
    check_site,
    compute_dtype_for,
    describe_model,
    harvest_activations,
    load_lm,
    load_tokenizer,
)
from sae.lm import resolve_revision as _resolve_revision
from sae.messages import name_list
from sae.source import ActivationSource

log = logging.getLogger(__name__)
DType = Literal["float32", "float16", "bfloat16"]


class HarvestConfig(ActivationSource):
    """What to harvest (sae.source.ActivationSource: model, site, corpus, contexts) and with which resources.

    tokens counts stored activation rows (BOS positions are dropped): ceil(tokens / (context_length - 1))
    contexts are cut and the last is trimmed so the store holds exactly `tokens` rows.
    dtype is the storage dtype; lm_dtype the dtype the LM computes in (None: bfloat16 on GPU, float32 on CPU).
    num_gpus_per_actor None: 1 when the cluster has a GPU per actor, else 0. num_cpus_per_actor is the Ray
    reservation (None: 1); torch_threads (None: max(num_cpus_per_actor, node cores // num_actors)) is what an
    actor computes with, set explicitly because Ray pins OMP_NUM_THREADS to the reservation.
    shard_rows: target rows per shard, rounded down to whole contexts.
    """

    corpus_subset: str | None = None
    split: Literal["train", "eval"] = "train"
    seed: int = 0
    tokens: int = Field(100_000, ge=1)
    dtype: DType = "float32"
    storage: str = ".cache/shards"
    num_actors: int = Field(1, ge=1)
    num_gpus_per_actor: float | None = Field(None, ge=0, description="null: automatic")
    num_cpus_per_actor: float | None = Field(None, ge=0, description="null: automatic")
    torch_threads: int | None = Field(None, ge=1, description="null: automatic")
    batch_size: int = Field(16, ge=1)
    shard_rows: int = Field(16384, ge=1)

    @field_validator("storage", mode="before")
    @classmethod
    def _storage(cls, v: Any) -> Any:
        return os.fspath(v) if isinstance(v, os.PathLike) else v

    @model_validator(mode="after")
    def _check(self) -> HarvestConfig:
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {name_list(STORAGE_DTYPES)}, got {self.dtype!r}")
        return self

    def content_fields(self) -> dict[str, Any]:
        """Everything that decides the stored values (not resources, not storage, not shard size). The corpus
        options appear only off their defaults (and always for .txt corpora), so older keys still hold:
        sae.corpus.options_key."""
        return {"model": self.model, "revision": _resolve_revision(self.model, self.revision), "site": self.site,
                "corpus": self.corpus, "corpus_subset": self.corpus_subset, "corpus_split": self.corpus_split,
                "text_column": self.text_column, "label_column": self.label_column, "split": self.split,
                "eval_fraction": self.eval_fraction, "seed": self.seed, "tokens": self.tokens,
                "context_length": self.context_length, "dtype": self.dtype, "lm_dtype": self.lm_dtype,
                **options_key(self.corpus, self.corpus_options())}

    def key(self) -> str:
        """Readable prefix + sha256 of content_fields(), e.g. smollm2-135m.resid_post.15.train.3f2a...."""
        digest = hashlib.sha256(json.dumps(self.content_fields(), sort_keys=True).encode()).hexdigest()[:20]
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", os.path.basename(self.model.rstrip("/")))[:40]
        return f"{slug}.{self.site}.{self.split}.{digest}"


class _HarvestActor:
    """Holds the LM; turns one shard of contexts into a written shard file and returns its sidecar."""

    def __init__(self, cfg_json: str, store: ShardStore, labels: list[str], device: str, threads: int):
        import transformers

        torch.set_num_threads(threads)
        transformers.utils.logging.disable_progress_bar()
        self.cfg = HarvestConfig.model_validate_json(cfg_json)
        self.store = store
        self.labels = labels
        lm_dtype = compute_dtype_for(device, self.cfg.lm_dtype)
        self.lm = load_lm(self.cfg.model, device=device, dtype=lm_dtype, revision=self.cfg.revision)
        self.store_dtype = getattr(torch, self.cfg.dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {"index": [], "rows": [], "seconds": []}
        for j in range(len(batch["index"])):
            t0 = time.perf_counter()
            info = self._shard(int(batch["index"][j]), int(batch["first_context"][j]), int(batch["rows"][j]),
                               batch["input_ids"][j], batch["token_doc"][j], batch["token_label"][j])
            out["index"].append(info["index"])
            out["rows"].append(info["rows"])
            out["seconds"].append(time.perf_counter() - t0)
        return {k: np.asarray(v) for k, v in out.items()}

    def _shard(self, index: int, first_context: int, rows: int, input_ids: np.ndarray, token_doc: np.ndarray,
               token_label: np.ndarray) -> dict[str, Any]:
        ids = torch.tensor(input_ids, dtype=torch.long)
        n_ctx, T = ids.shape
        act = torch.empty(n_ctx, T - 1, self.lm.d_model, dtype=self.store_dtype)
        bs = self.cfg.batch_size
        t0 = time.perf_counter()
        for i in range(0, n_ctx, bs):
            x = harvest_activations(self.lm, ids[i: i + bs], self.cfg.site)
            act[i: i + bs].copy_(x[:, 1:])  # drop BOS; one converting copy into the shard buffer
        forward_seconds = time.perf_counter() - t0
        act = act.view(-1, self.lm.d_model)[:rows]
        pos = np.tile(np.arange(1, T, dtype=np.int32), n_ctx)[:rows]
        ctx = np.repeat(np.arange(first_context, first_context + n_ctx, dtype=np.int32), T - 1)[:rows]
        columns = {"token_id": input_ids[:, 1:].reshape(-1)[:rows].astype(np.int32), "context_id": ctx,
                   "position": pos, "doc_id": token_doc[:, 1:].reshape(-1)[:rows].astype(np.int64)}
        label_idx = token_label[:, 1:].reshape(-1)[:rows].astype(np.int32)
        # act is already in the storage dtype, so write_shard's cast is a no-op
        return write_shard(self.store, index, act, self.cfg.dtype, columns, self.labels, label_idx,
                           first_context, n_ctx, extra={"forward_seconds": forward_seconds})


def _verified_sidecar(store: ShardStore, index: int) -> dict[str, Any] | None:
    """The sidecar of a shard whose file is there and matches its recorded sha256, else None (it is rerun)."""
    side, shard = sidecar_name(index), shard_name(index)
    if not (store.has(side) and store.has(shard)):
        return None
    info = store.read_json(side)
    if hashlib.sha256(store.read_buffer(shard)).hexdigest() != info["sha256"]:
        log.warning("shard %s fails its checksum; recomputing it", store.file(shard))
        return None
    return info


def _resources(cfg: HarvestConfig) -> tuple[float, float, int, str]:
    """(num_gpus, num_cpus, torch threads, device) per actor."""
    import ray

    cluster = ray.cluster_resources()
    gpus = cfg.num_gpus_per_actor
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) >= cfg.num_actors else 0.0
    cpus = cfg.num_cpus_per_actor if cfg.num_cpus_per_actor is not None else 1.0
    threads = cfg.torch_threads or max(int(cpus), (os.cpu_count() or 1) // cfg.num_actors, 1)
    return gpus, cpus, threads, "cuda" if gpus > 0 else "cpu"


def _plan(cfg: HarvestConfig, store: ShardStore, n_contexts: int) -> int:
    """Contexts per shard: fixed by the first attempt (plan.json) so a resume cuts the same shards."""
    if store.has(PLAN):
        plan = store.read_json(PLAN)
        if plan.get("n_contexts") == n_contexts:
            return int(plan["contexts_per_shard"])
    per = max(1, cfg.shard_rows // (cfg.context_length - 1))
    store.write(PLAN, json.dumps({"n_contexts": n_contexts, "contexts_per_shard": per,
                                        "config": cfg.model_dump()}, indent=1).encode())
    return per


def store_complete(cfg: HarvestConfig) -> bool:
    """Whether the store of this config is already complete (a harvest would only reuse it)."""
    return ShardStore.at(cfg.storage, cfg.key()).complete() is not None


def harvest(cfg: HarvestConfig, *, progress: bool = True) -> str:
    """Harvest cfg's activations into <storage>/<key>/ and return that store's path (or URI).

    A complete store is returned without touching the LM; an interrupted one resumes from its verified shards.
    While another process harvests the same key, this one waits for it and then returns its store.
    """
    key = cfg.key()
    store = ShardStore.at(cfg.storage, key)
    if store.complete() is not None:
        log.info("harvest %s: reusing complete store %s", key, store)
        return store.uri
    info = describe_model(cfg.model, revision=cfg.revision)
    check_site(cfg.site, info.n_layers, cfg.model)
    with acquire(store.fs, store.lock_path, label=f"harvest {key}") as lease:
        if store.complete() is not None:  # the holder we waited for finished it
            print(f"harvest {key}: reusing complete store {store}, harvested meanwhile by another process",
                  flush=True)
            return store.uri
        _harvest_held(cfg, store, info, lease, progress)
    return store.uri


def _remove_stale_temps(store: ShardStore, lease: Lease) -> None:
    """Delete the `.tmp-*` leftovers of writes cut short, but only those no live writer can still be writing:
    older than a lease, or left by the holder whose lapsed lease this one took over. Called before this
    holder's own writes start, so a fresh temp file is another process's write in progress."""
    cutoff = lease.stale_before()
    for f in store.fs.get_file_info(pafs.FileSelector(store.path, allow_not_found=True)):
        if f.base_name.startswith(".tmp-") and f.mtime_ns is not None and f.mtime_ns / 1e9 < cutoff:
            log.info("removing stale temp file %s", f.path)
            store.fs.delete_file(f.path)


def _harvest_held(cfg: HarvestConfig, store: ShardStore, info: Any, lease: Lease, progress: bool) -> None:
    """The harvest proper, run while holding the key's lease."""
    key = cfg.key()
    t_start = time.perf_counter()
    from sae.corpus import load_corpus, tokenize_contexts

    corpus = load_corpus(cfg.corpus, split=cfg.corpus_split, text_column=cfg.text_column,
                         label_column=cfg.label_column, subset=cfg.corpus_subset, options=cfg.corpus_options())
    ctx = tokenize_contexts(corpus, load_tokenizer(cfg.model, revision=cfg.revision),
                            context_length=cfg.context_length, max_tokens=cfg.tokens, split=cfg.split,
                            eval_fraction=cfg.eval_fraction, seed=cfg.seed)
    per = _plan(cfg, store, len(ctx))
    n_shards = math.ceil(len(ctx) / per)
    labels = sorted(set(ctx.doc_labels.values()))
    plan = _ShardPlan(ctx, per, labels, {d: labels.index(lab) for d, lab in ctx.doc_labels.items()})
    _remove_stale_temps(store, lease)
    done = {i: s for i in range(n_shards) if (s := _verified_sidecar(store, i)) is not None}
    todo = [i for i in range(n_shards) if i not in done]
    log.info("harvest %s: %d contexts in %d shards, %d already complete, %d to run",
             key, len(ctx), n_shards, len(done), len(todo))
    if todo:
        _run_actors(cfg, store, plan, todo, done, progress)
    shards = [done[i] for i in range(n_shards)]
    total = sum(s["rows"] for s in shards)
    if total != cfg.tokens:
        raise RuntimeError(f"harvest {key}: shards hold {total} rows, expected {cfg.tokens}")
    manifest = Manifest(
        key=key, model=cfg.model, revision=info.revision, site=cfg.site, corpus=cfg.corpus, split=cfg.split,
        tokens=total, d=info.d_model, dtype=cfg.dtype, mean_norm=sum(s["norm_sum"] for s in shards) / total,
        context_length=cfg.context_length, n_contexts=len(ctx), contexts_per_shard=per, labels=labels,
        shards=[manifest_entry(s) for s in shards],
        config={**cfg.model_dump(), "content": cfg.content_fields()})
    write_manifest(store, manifest)
    log.info("harvest %s: %d tokens in %.1fs -> %s", key, total, time.perf_counter() - t_start, store)


@dataclass(frozen=True)
class _ShardPlan:
    """How the tokenized contexts split into shards, and the label index of each document."""

    ctx: Any  # sae.corpus's tokenized contexts
    per: int  # contexts per shard
    labels: list[str]
    label_of: dict[int, int]  # document id -> index into labels

    def items(self, todo: list[int], tokens: int, span: int) -> list[dict[str, Any]]:
        """The Ray Data items of the shards still to harvest: contexts, token documents and labels, row count
        (span: stored rows per context, its tokens less BOS)."""
        docs = np.array(sorted(self.label_of), dtype=np.int64)
        doc_label = np.array([self.label_of[d] for d in docs.tolist()], dtype=np.int32)
        items = []
        for i in todo:
            a, b = i * self.per, min((i + 1) * self.per, len(self.ctx))
            doc = self.ctx.token_doc_ids[a:b].numpy()
            items.append({"index": i, "first_context": a, "rows": min(b * span, tokens) - a * span,
                          "input_ids": self.ctx.input_ids[a:b].numpy().astype(np.int32),
                          "token_doc": doc, "token_label": doc_label[np.searchsorted(docs, doc)]})
        return items


def _run_actors(cfg: HarvestConfig, store: ShardStore, plan: _ShardPlan, todo: list[int],
                done: dict[int, dict[str, Any]], progress: bool) -> None:
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True)
    gpus, cpus, threads, device = _resources(cfg)
    items = plan.items(todo, cfg.tokens, cfg.context_length - 1)
    labels = plan.labels
    # Ray Data's own progress is off: ours below counts tokens, and Ray's bar would interleave with it on a
    # terminal and, in a log, becomes a dump of the whole pipeline's state every 10 s. A dataset copies the
    # current DataContext when it is created, so the setting is made before and undone right after.
    data_ctx = ray.data.DataContext.get_current()
    old_bars = data_ctx.enable_progress_bars
    data_ctx.enable_progress_bars = False
    try:
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(
            _HarvestActor, batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cfg.num_actors), num_cpus=cpus, num_gpus=gpus,
            fn_constructor_kwargs={"cfg_json": cfg.model_dump_json(), "store": store, "labels": labels,
                                   "device": device, "threads": threads})
    finally:
        data_ctx.enable_progress_bars = old_bars
    with Progress(cfg.tokens, initial=sum(s["rows"] for s in done.values()), enabled=progress,
                  desc=f"harvest {cfg.site} {cfg.split}") as bar:
        for row in ds.iter_rows():
            i = int(row["index"])
            done[i] = store.read_json(sidecar_name(i))
            bar.update(int(row["rows"]))
            log.debug("shard %d: %d rows in %.2fs", i, int(row["rows"]), float(row["seconds"]))
