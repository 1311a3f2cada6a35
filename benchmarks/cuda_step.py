"""The GPU check: host syncs and speed of one training step, a profile of it, the LM splice and an evaluation on
the device. Prepared for a short lease of a GPU machine (docs/architecture.md, "Checking the CUDA paths"); it
needs only torch, transformers, safetensors and pydantic (pyarrow for section 4), so it runs without Ray or
MLflow.

    python benchmarks/cuda_step.py [--device cuda] [--out DIR] [--quick]

1. Training steps, per case (TopK fp32/bf16, BatchTopK, Matryoshka, TopK with 25% of the latents dead so AuxK
   runs), the sync-free step (`Trainer(sync_free=True)`, an accelerator's default) against the host-read step:
   tokens/s (`sync_free_speedup`), and on CUDA the host syncs per step the sync-free one still makes, counted
   with torch.cuda.set_sync_debug_mode (0 is the target; the first one's stack is printed); and the step fed
   from host memory, pageable non-blocking copies against pinned ones (`sae.train.to_device`).
2. A torch.profiler table of three sync-free bf16 steps (profile.txt under --out).
3. The LM splice on the device: a tiny random Llama's fast path against its full spliced forward (CE/KL within
   1e-4), and `evaluate_progressive` of a small SAE trained on the device, scorer included, with its host syncs.
4. The feed from a shard store (needs pyarrow): its tokens/s alone, and the sync-free step fed in line against
   fed through the GPU trial's prefetch thread (`sae.train.prefetched`).
5. The splice's speed on a SmolLM2-shaped random LM at the scorer's CPU-sized batching and at a GPU-sized one.
Writes cuda_step.json (every number above) and profile.txt to --out (default: $OUT, else ./cuda_step_out).
`--quick` shrinks every size (a CPU smoke run: tests/test_sync_free.py). Each section's numbers are written as
soon as it ends, and a section that fails records its traceback instead, so one late failure loses nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_throughput import make_data  # noqa: E402

from sae.config import SAEConfig, TrainConfig  # noqa: E402
from sae.matryoshka import resolve_partition  # noqa: E402
from sae.train import Trainer, to_device  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_syncs(device: torch.device, fn) -> tuple[int | None, str]:
    """(host syncs fn made, where the first one was) on CUDA; (None, '') elsewhere, where there is nothing to count."""
    if device.type != "cuda":
        fn()
        return None, ""
    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    if not syncs:
        return 0, ""
    torch.cuda.set_sync_debug_mode("error")  # once more, to get the first sync's Python stack
    try:
        fn()
        where = f"{syncs[0].filename}:{syncs[0].lineno}"
    except RuntimeError:
        where = traceback.format_exc(limit=12)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return len(syncs), where


class Case:
    """One Trainer on the device, with a fixed set of latents held dead before every step (AuxK runs)."""

    def __init__(self, cfg: SAEConfig, tc: TrainConfig, sync_free: bool, dead_fraction: float = 0.0):
        self.trainer = Trainer([(cfg, tc)], sync_free=sync_free)
        self.member = self.trainer._members[0]
        n = cfg.n_latents
        self.dead = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: round(dead_fraction * n)]
        self.dead = self.dead.to(self.member.device)

    def step(self, x: torch.Tensor) -> None:
        if self.dead.numel():
            self.member.since_fired.zero_().index_fill_(0, self.dead, self.member.train_cfg.dead_tokens)
        self.trainer.train_step(x, sync=False)  # as the training loop runs the steps it does not report


def training(device: torch.device, a, out: Path) -> dict:
    d, n, k, B = a.d_in, a.n_latents, a.k, a.batch_size
    data = make_data(2, B, d, device)
    tc = TrainConfig(device=str(device), warmup_steps=0, compute_dtype="float32", aux_tokens=None)
    bf16 = tc.model_copy(update={"compute_dtype": "bfloat16"})
    base = SAEConfig(d_in=d, n_latents=n, k=k)
    cases = {
        "topk_fp32": (base, tc, 0.0),
        "topk_bf16": (base, bf16, 0.0),
        "batchtopk_bf16": (base.model_copy(update={"architecture": "batchtopk"}), bf16, 0.0),
        "matryoshka_bf16": (base.model_copy(update={"partition": resolve_partition("doubling:4", n)}), bf16, 0.0),
        "topk_dead25_bf16": (base, bf16, 0.25),
    }
    results = {}
    for name, (cfg, train_cfg, dead) in cases.items():
        row = {}
        for sync_free in (True, False):
            case = Case(cfg, train_cfg, sync_free, dead)
            for i in range(a.warmup):
                case.step(data[i % 2])
            _sync(device)
            t = time.perf_counter()
            for i in range(a.steps):
                case.step(data[i % 2])
            _sync(device)
            key = "sync_free" if sync_free else "host_reads"
            row[f"{key}_tokens_per_s"] = a.steps * B / (time.perf_counter() - t)
            syncs, where = count_syncs(device, lambda c=case: [c.step(data[i % 2]) for i in range(3)])
            row[f"{key}_syncs_per_step"] = None if syncs is None else syncs / 3
            if sync_free and where:
                row["first_sync"] = where
            case.trainer.check_finite()
        row["sync_free_speedup"] = row["sync_free_tokens_per_s"] / row["host_reads_tokens_per_s"]
        results[name] = row
        free, host = (row[f"{key}_syncs_per_step"] for key in ("sync_free", "host_reads"))
        counts = "n/a" if free is None else f"{free:g} sync-free, {host:g} host reads"
        print(f"{name}: sync-free {row['sync_free_tokens_per_s']:,.0f} tok/s, host reads "
              f"{row['host_reads_tokens_per_s']:,.0f} tok/s (sync_free_speedup {row['sync_free_speedup']:.2f}); "
              f"syncs/step: {counts}", flush=True)
        if row.get("first_sync"):
            print(f"  first sync of the sync-free step:\n{row['first_sync']}", flush=True)

    # the trial's feed: batches arrive in host memory; a pageable copy may wait for the queue, a pinned one does not
    host = [x.cpu() for x in data]
    case = Case(base, bf16, True)
    for i in range(a.warmup):
        case.step(data[i % 2])
    feed = results["feed_from_host"] = {}
    moves = {"pageable": lambda x: x.to(device, non_blocking=True), "pinned": lambda x: to_device(x, device)}
    for name, move in moves.items():
        _sync(device)
        t = time.perf_counter()
        for i in range(a.steps):
            case.step(move(host[i % 2]))
        _sync(device)
        feed[f"{name}_tokens_per_s"] = a.steps * B / (time.perf_counter() - t)
    print(f"topk_bf16 fed from host memory: pageable {feed['pageable_tokens_per_s']:,.0f} tok/s, pinned "
          f"(sae.train.to_device) {feed['pinned_tokens_per_s']:,.0f} tok/s", flush=True)
    return results


def profile_step(device: torch.device, a, out: Path) -> dict:
    """A torch.profiler table of three sync-free topk_bf16 steps, the slowest kernels first, in profile.txt."""
    d, n, k, B = a.d_in, a.n_latents, a.k, a.batch_size
    data = make_data(2, B, d, device)
    tc = TrainConfig(device=str(device), warmup_steps=0, compute_dtype="bfloat16", aux_tokens=None)
    case = Case(SAEConfig(d_in=d, n_latents=n, k=k), tc, True)
    for i in range(a.warmup):
        case.step(data[i % 2])
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(3):
            case.step(data[i % 2])
        _sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30)
    (out / "profile.txt").write_text(f"three sync-free topk_bf16 steps, d={d} n={n} k={k} B={B}\n{table}\n")
    print(table, flush=True)
    return {"profile": str(out / "profile.txt")}


def splice_and_evaluate(device: torch.device, a) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from sae.evaluate import EvalData, EvalOptions, evaluate_progressive
    from sae.importance import latent_stats
    from sae.lm import wrap_model
    from sae.splice import SpliceScorer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)
    lm = wrap_model(LlamaForCausalLM(cfg).to(device).eval(), name="tiny-llama")
    ids = torch.randint(0, 512, (16, 33), generator=torch.Generator().manual_seed(1))

    def noisy(x: torch.Tensor) -> torch.Tensor:
        return x * 0.9 + 0.1 * x.std() * torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(x.device)

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: zero-ablation need not raise the loss
        fast = SpliceScorer(lm, ids, "resid_post.1", n_boot=50)
        full = SpliceScorer(lm, ids, "resid_post.1", n_boot=50, fast=False)
    got, ref = fast(noisy), full(noisy)
    out["splice_path"] = fast.path
    assert full.path == "full", full.fallback_reason
    out["splice_ce_diff"] = abs(got["ce_sae"] - ref["ce_sae"])
    out["splice_kl_diff"] = abs(got["kl_sae"] - ref["kl_sae"])
    print(f"splice on {device}: {fast.path} path, |CE fast - full| {out['splice_ce_diff']:.2e}, "
          f"|KL fast - full| {out['splice_kl_diff']:.2e}", flush=True)

    n_tok = 2048 if a.quick else 16384
    x = make_data(1, n_tok, 64, torch.device("cpu"), seed=2)[0]
    tc = TrainConfig(device=str(device), warmup_steps=5, lr=3e-3, total_tokens=n_tok * 4)
    n_eval = 16 * 32
    data = EvalData(acts=x[:n_eval], token_ids=ids[:, 1:].reshape(-1), context_ids=torch.arange(n_eval) // 32,
                    doc_ids=torch.arange(n_eval) // 32, labels=["a" if i % 64 < 32 else "b" for i in range(n_eval)],
                    batch_size=256)
    opts = EvalOptions(granularities=(32, 64, 128, 256), random_draws=2)
    kinds = {"matryoshka_topk": SAEConfig(d_in=64, n_latents=256, k=8, partition=(32, 64, 128, 256)),
             "batchtopk": SAEConfig(d_in=64, n_latents=256, k=8, architecture="batchtopk")}
    for kind, cfg in kinds.items():
        trainer = Trainer([(cfg, tc)])
        trainer.fit(b for _ in range(4) for b in x[torch.randperm(n_tok)].split(256))
        sae = trainer.release()[0]
        ranking = latent_stats(sae, x[:2048].to(device))
        t = time.perf_counter()
        report = evaluate_progressive(sae, data, opts, fast, ranking=ranking)
        row = out[f"evaluate_{kind}"] = {"seconds": time.perf_counter() - t}
        syncs, where = count_syncs(device, lambda s=sae, r=ranking: evaluate_progressive(s, data, opts, fast, ranking=r))
        row["syncs"], row["first_sync"] = syncs, where
        row["full_fvu"] = report.final.get("fvu")
        row["kl_score"] = report.final.get("kl_score")  # random LM weights: ce_score may be NaN (no CE gap)
        print(f"evaluate_progressive ({kind}) on {device}: {row['seconds']:.1f}s, fvu {row['full_fvu']:.4f}, "
              f"kl_score {row['kl_score']:.4f}, host syncs {'n/a' if syncs is None else syncs}", flush=True)
        if where:
            print(f"  first sync of the evaluation:\n{where}", flush=True)
    return out


def splice_speed(device: torch.device, a) -> dict:
    """Seconds to splice 6 reconstructions into a SmolLM2-135M-shaped Llama (random weights: no download) on 64
    contexts of 33 tokens, the default spec's splice, per (batch_size, max_batch_tokens): the scorer's defaults
    are sized for a CPU, and this says what a GPU wants (`SpliceScorer`'s two knobs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sae.lm import wrap_model
    from sae.splice import SpliceScorer

    shape = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152)
    if a.quick:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=128, **shape)).to(device=device, dtype=dtype)
    lm = wrap_model(model.eval(), name="smollm2-shaped")
    ids = torch.randint(0, shape["vocab_size"], (64, 33), generator=torch.Generator().manual_seed(3))
    recs = [lambda x, s=s: x * (1 - 0.02 * s) for s in range(6)]
    out = {}
    for batch_size, max_tokens in ((8, 8192), (64, 65536)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scorer = SpliceScorer(lm, ids, f"resid_post.{shape['num_hidden_layers'] // 2}", batch_size=batch_size,
                                  max_batch_tokens=max_tokens, n_boot=100)
        scorer.score_many(recs[:1])  # warm-up
        _sync(device)
        t = time.perf_counter()
        scorer.score_many(recs)
        _sync(device)
        # in bf16 the fast path's self-check can fail at some batchings (seen on CPU), and the full path is slower
        out[f"batch{batch_size}_tokens{max_tokens}"] = {"seconds": time.perf_counter() - t, "path": scorer.path}
    print(f"splice of 6 reconstructions, SmolLM2-shaped, {dtype}: " +
          ", ".join(f"{k} {v['seconds']:.3f}s ({v['path']} path)" for k, v in out.items()), flush=True)
    return out


def feed_from_store(device: torch.device, a, out: Path) -> dict:
    """A trial's feed on the device: a shard store's batches (orchestrator.shards, needs pyarrow) shuffled, pinned
    and copied, alone and feeding the sync-free bf16 step, with and without the GPU trial's prefetch thread."""
    with tempfile.TemporaryDirectory() as tmp:  # ~600 MB at the default sizes: never left in --out
        return _feed_from_store(device, a, Path(tmp) / "feed_store")


def _feed_from_store(device: torch.device, a, store: Path) -> dict:
    import numpy as np

    from orchestrator.shards import Manifest, iter_batches, manifest_entry, write_manifest, write_shard
    from sae.train import prefetched

    d, n, k, B = a.d_in, a.n_latents, a.k, a.batch_size
    rows, n_shards = 2 * B, 8  # 16 batches per pass, a buffer of 4 shards as in a trial
    infos = []
    for i in range(n_shards):
        ids = np.arange(i * rows, (i + 1) * rows)
        cols = {"token_id": ids.astype(np.int32), "context_id": ids.astype(np.int32),
                "position": np.ones(rows, np.int32), "doc_id": ids.astype(np.int64)}
        info = write_shard(str(store), i, torch.randn(rows, d), "float32", cols, ["-"], np.zeros(rows, np.int32),
                           first_context=i * rows, n_contexts=rows)
        infos.append(manifest_entry(info))
    write_manifest(str(store), Manifest(
        key="feed", model="-", revision="-", site="-", corpus="-", split="train", tokens=n_shards * rows, d=d,
        dtype="float32", mean_norm=1.0, context_length=2, n_contexts=n_shards * rows, contexts_per_shard=rows,
        labels=["-"], shards=infos))

    def stream(epoch: int):
        for x in iter_batches(str(store), B, seed=epoch, verify=epoch == 0):
            yield to_device(x, device)

    tc = TrainConfig(device=str(device), warmup_steps=0, compute_dtype="bfloat16", aux_tokens=None)
    case = Case(SAEConfig(d_in=d, n_latents=n, k=k), tc, True)
    for x in stream(0):  # warm-up pass: hashes the shards once, warms the page cache and the kernels
        case.step(x)
    feed = {}
    for name, depth in (("feed_only", None), ("step_fed_in_line", 0), ("step_fed_prefetched", 4)):
        _sync(device)
        t = time.perf_counter()
        tokens = 0
        for x in stream(1) if depth is None else prefetched(stream(1), depth):
            tokens += x.shape[0]
            if depth is not None:
                case.step(x)
        _sync(device)
        feed[f"{name}_tokens_per_s"] = tokens / (time.perf_counter() - t)
    print(f"feed from a shard store (d={d}): feed alone {feed['feed_only_tokens_per_s']:,.0f} tok/s; topk_bf16 fed "
          f"in line {feed['step_fed_in_line_tokens_per_s']:,.0f} tok/s, prefetched "
          f"{feed['step_fed_prefetched_tokens_per_s']:,.0f} tok/s", flush=True)
    return feed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=os.environ.get("OUT") or "cuda_step_out")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run (CPU)")
    p.add_argument("--d-in", type=int, default=2304)
    p.add_argument("--n-latents", type=int, default=65536)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args(argv)
    if a.quick:
        a.d_in, a.n_latents, a.k, a.batch_size, a.warmup, a.steps = 32, 256, 8, 256, 1, 2
    device = torch.device(a.device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "device": str(device),
           "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "shape": {"d_in": a.d_in, "n_latents": a.n_latents, "k": a.k, "batch": a.batch_size}}
    print(json.dumps(env), flush=True)
    result: dict = {"env": env}
    failed = []
    for name, section in (("training", training), ("profile", profile_step), ("feed_from_store", feed_from_store),
                          ("splice_and_evaluate", lambda dev, args, _out: splice_and_evaluate(dev, args)),
                          ("splice_speed", lambda dev, args, _out: splice_speed(dev, args))):
        try:
            result[name] = section(device, a, out)
        except Exception:  # noqa: BLE001 - a lease has no time to rerun: keep every other section's numbers
            result[name] = {"error": traceback.format_exc()}
            failed.append(name)
            print(f"{name} failed:\n{result[name]['error']}", flush=True)
        tmp = out / "cuda_step.json.partial"
        tmp.write_text(json.dumps(result, indent=1))
        tmp.rename(out / "cuda_step.json")
    print(f"wrote {out / 'cuda_step.json'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
