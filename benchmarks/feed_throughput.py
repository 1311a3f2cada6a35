"""What a trial's feed costs next to its training step, on the default spec's harvested store.

    python benchmarks/feed_throughput.py [--repeats 3] [--n-latents 2048] [--store PATH]

On one thread, as a CPU trial runs (best of --repeats, the machine is shared):
  - read: every shard file read once (`ShardStore.read_buffer`), the floor any feed pays;
  - feed: one epoch of the trial's stream (`orchestrator.trial.training_batches`: shards hashed, decoded,
    shuffled in a buffer of 4, batches of train.batch_size), tokens/s and MB/s;
  - step: the training step of a TopK SAE (n = --n-latents, the spec's k and batch size) on batches of that feed.
Prints `feed_vs_read` (feed seconds / read seconds for the same bytes) and `feed_share`: the fraction of a
trial's training time the feed takes (feed / (feed + step) per token). A GPU trial prefetches its batches in a
thread instead (benchmarks/cuda_step.py times that on the device).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_quality import default_stores  # noqa: E402

from orchestrator.shards import ShardStore  # noqa: E402
from orchestrator.spec import load_spec  # noqa: E402
from orchestrator.trial import training_batches  # noqa: E402
from sae.config import SAEConfig  # noqa: E402
from sae.train import Trainer  # noqa: E402


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n-latents", type=int, default=2048)
    p.add_argument("--steps", type=int, default=40, help="training steps timed")
    p.add_argument("--store", help="another store of the default spec's activations (say, one of format 1)")
    a = p.parse_args(argv)
    found = {"train": [a.store]} if a.store else default_stores()
    if found is None:
        return 1
    torch.set_num_threads(1)
    spec = load_spec("default")
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"epochs": 1})})
    store = ShardStore(found["train"][0])
    m = store.manifest()
    total_bytes = sum(s["bytes"] for s in m.shards)

    read = best_of(a.repeats, lambda: [store.read_buffer(s["name"]) for s in m.shards])
    feed = best_of(a.repeats, lambda: sum(b.shape[0] for b in training_batches(str(store), spec, 0, "cpu")))
    print(f"store {store.path}: format {m.format}, {m.tokens:,} tokens x d={m.d} {m.dtype}, "
          f"{total_bytes / 2**20:.0f} MB in {len(m.shards)} shards")
    print(f"read  {read:6.2f} s  {total_bytes / 2**20 / read:7.0f} MB/s")
    print(f"feed  {feed:6.2f} s  {total_bytes / 2**20 / feed:7.0f} MB/s  {m.tokens / feed:9,.0f} tok/s")

    point = next(pt for pt in spec.trial_points() if pt.n_latents == a.n_latents and pt.boundaries is None)
    cfg = SAEConfig(d_in=m.d, n_latents=a.n_latents, k=point.k)
    trainer = Trainer([(cfg, spec.train_config(point, "cpu"))])
    batches = list(itertools.islice(training_batches(str(store), spec, 0, "cpu"), a.steps + 5))
    for b in batches[:5]:
        trainer.train_step(b)
    step = best_of(a.repeats, lambda: [trainer.train_step(b) for b in batches[5:]])
    step_tok_s = a.steps * spec.train.batch_size / step
    print(f"step  {step_tok_s:,.0f} tok/s (TopK n={a.n_latents}, k={point.k}, batch {spec.train.batch_size})")
    feed_per_token, step_per_token = feed / m.tokens, 1 / step_tok_s
    print(f"feed_vs_read {feed / read:.2f}")
    print(f"feed_share {feed_per_token / (feed_per_token + step_per_token):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
