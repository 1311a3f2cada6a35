"""Harvest throughput: the Ray Data pipeline vs a plain truncated forward vs a full forward, same tokens.

Steady state, measured fairly: the pipeline's rate counts only the shards after the first one to finish, each
over the interval since the previous shard finished (shard files' mtimes), so Ray start-up, actor start and the
actor's model load are excluded while every inter-shard overhead (Ray Data scheduling, parquet encoding,
checksums, writes) is included. The plain truncated forward runs in this process over the same contexts, with the
same batch size and thread count, timed per group of contexts the size of a shard, once before and once after
the pipeline. The machine is shared (other processes come and go), so, as timeit does, the headline compares
the fastest shard-sized interval on each side, the best estimate of each side's uncontended rate; medians and
means are printed too. The full forward (with LM head) runs over a quarter of the same contexts. Prints
`harvest_efficiency: X` (pipeline / plain truncated, fastest intervals) last. Numbers, never pass/fail.

    python benchmarks/harvest_throughput.py [--tokens 40000] [--site resid_post.15] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import ray
import torch

from orchestrator.harvest import HarvestConfig, harvest
from orchestrator.shards import read_manifest, sidecar_name
from sae.corpus import load_corpus, tokenize_contexts
from sae.lm import harvest_activations, load_lm


def plain_rates(lm, ids: torch.Tensor, site: str, batch_size: int, group: int, full: bool = False) -> list[float]:
    """Stored rows per second (BOS excluded, as the pipeline counts them), one rate per `group` contexts."""
    rates = []
    with torch.no_grad():
        for g in range(0, ids.shape[0], group):
            t0 = time.perf_counter()
            for i in range(g, min(g + group, ids.shape[0]), batch_size):
                chunk = ids[i: min(i + batch_size, g + group)]
                if full:
                    lm.model(input_ids=chunk, use_cache=False)
                else:
                    harvest_activations(lm, chunk, site)[:, 1:].contiguous()
            rates.append(min(group, ids.shape[0] - g) * (ids.shape[1] - 1) / (time.perf_counter() - t0))
    return rates


def summary(rates: list[float]) -> str:
    return (f"best {max(rates):7.1f} tok/s, median {statistics.median(rates):7.1f}, mean {statistics.fmean(rates):7.1f}"
            f" (n={len(rates)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=40_000)
    ap.add_argument("--site", default="resid_post.15")
    ap.add_argument("--context-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shard-rows", type=int, default=4096)
    args = ap.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)

    lm = load_lm("smollm2-135m")
    ctx = tokenize_contexts(load_corpus("wiki-extracts"), lm.tokenizer, context_length=args.context_length,
                            max_tokens=args.tokens, split="train")
    ids = ctx.input_ids
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    group = max(1, args.shard_rows // (args.context_length - 1))  # contexts per shard, as the harvest cuts them
    plain_rates(lm, ids[: args.batch_size], args.site, args.batch_size, group)  # warm-up
    before = plain_rates(lm, ids, args.site, args.batch_size, group)
    print(f"plain truncated forward ({args.site}), before: {summary(before)}")

    ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as storage:
        cfg = HarvestConfig(site=args.site, tokens=tokens, context_length=args.context_length, storage=storage,
                            batch_size=args.batch_size, shard_rows=args.shard_rows, num_actors=1,
                            num_cpus_per_actor=1, torch_threads=threads)
        t0 = time.perf_counter()
        store = harvest(cfg, progress=False)
        wall = time.perf_counter() - t0
        m = read_manifest(store)
        done = sorted((os.stat(os.path.join(store, s["name"])).st_mtime_ns / 1e9, s["rows"], i)
                      for i, s in enumerate(m.shards))
        pipeline = [rows / (t - t_prev) for (t_prev, _, _), (t, rows, _) in zip(done, done[1:], strict=False)]
        steady = sum(r for _, r, _ in done[1:]) / (done[-1][0] - done[0][0])
        print(f"ray data pipeline: {len(m.shards)} shards, {m.tokens} tokens, wall {wall:.1f}s incl. ray/actor "
              f"start-up and model load ({m.tokens / wall:.1f} tok/s)")
        print(f"ray data pipeline, steady state (shards 2..{len(m.shards)}): {summary(pipeline)}; "
              f"overall {steady:.1f} tok/s")
        forward = 0.0  # the actor's own truncated forwards over the same steady-state shards
        for _, _, i in done[1:]:
            with open(os.path.join(store, sidecar_name(i))) as f:
                forward += json.load(f)["forward_seconds"]
        print(f"inside the pipeline: the truncated forward is {forward / (done[-1][0] - done[0][0]):.3f} of the steady-"
              f"state wall time (the rest is Ray Data, parquet encoding, checksums and writes; robust to load)")
    ray.shutdown()

    after = plain_rates(lm, ids, args.site, args.batch_size, group)
    print(f"plain truncated forward ({args.site}), after:  {summary(after)}")
    sub = ids[: max(args.batch_size, ids.shape[0] // 4)]
    full = max(plain_rates(lm, sub, args.site, args.batch_size, group, full=True))
    trunc_sub = max(plain_rates(lm, sub, args.site, args.batch_size, group))
    print(f"full forward (all {lm.n_layers} layers + LM head): {full:8.1f} tok/s; truncated on the same "
          f"{sub.shape[0]} contexts: {trunc_sub:8.1f} tok/s; truncated / full = {trunc_sub / full:.2f}x")
    baseline = before + after
    print(f"threads {threads}, batch {args.batch_size} x {args.context_length} tokens, {group} contexts per shard, "
          f"{tokens} tokens; efficiency by medians {statistics.median(pipeline) / statistics.median(baseline):.3f}, "
          f"by means {statistics.fmean(pipeline) / statistics.fmean(baseline):.3f}")
    print(f"harvest_efficiency: {max(pipeline) / max(baseline):.3f}")


if __name__ == "__main__":
    main()
