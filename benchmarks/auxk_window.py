"""AuxK on a window of the batch (TrainConfig.aux_tokens) against AuxK on every token: does the cheaper estimate
cost quality?

    python benchmarks/auxk_window.py [--tokens 409600] [--dead-tokens 4096] [--aux-tokens 1024]

Trains the same SAE (n=4608, k=32, seed 0) twice on the same batches of real harvested activations (the default
spec's train store, SmolLM2-135M resid_post.15; `make frontier` harvests it): once with AuxK on the whole batch,
once on a window of --aux-tokens rows. A short --dead-tokens makes latents count as dead early, so AuxK runs on
most steps. Prints each run's eval FVU (held-out tokens, the rare huge-norm rows such as BOS left out), last
training FVU and mean dead fraction, then `fvu_window_vs_batch` (target: within 0.5% of 1). The speed side is
`dead_latent_ratio` in benchmarks/train_throughput.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.train_quality import default_stores, score  # noqa: E402
from orchestrator.shards import iter_batches  # noqa: E402
from sae.config import SAEConfig, TrainConfig  # noqa: E402
from sae.train import Trainer  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=409_600)
    p.add_argument("--dead-tokens", type=int, default=4096)
    p.add_argument("--aux-tokens", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    found = default_stores()
    if found is None:
        return 2
    held = torch.cat(list(iter_batches(found["eval"][0], 4096, shuffle=False)))[:16384]
    norms = held.norm(dim=1)
    held = held[norms < 10 * norms.median()]
    cfg = SAEConfig(d_in=held.shape[1], n_latents=4608, k=32)
    fvu = {}
    for aux in (None, a.aux_tokens):
        tc = TrainConfig(warmup_steps=20, aux_tokens=aux, dead_tokens=a.dead_tokens, total_tokens=a.tokens, seed=0,
                         compute_dtype="float32")
        log: list[tuple[float, float]] = []
        t = time.perf_counter()
        sae = Trainer([(cfg, tc)]).fit(
            iter_batches(found["train"][0], a.batch_size, seed=0, epochs=100, drop_last=True), max_tokens=a.tokens,
            callback=lambda n, ms, log=log: log.append((ms[0]["dead_fraction"], ms[0]["fvu"])), log_every=10)[0]
        fvu[aux] = score(lambda x, sae=sae: (sae(x), sae.encode(x)[0]), held)[0]
        print(f"aux_tokens={aux or 'batch'}: eval_fvu={fvu[aux]:.5f} train_fvu_last={log[-1][1]:.5f} "
              f"mean_dead_fraction={sum(d for d, _ in log) / len(log):.4f} ({time.perf_counter() - t:.0f} s)")
    print(f"fvu_window_vs_batch: {fvu[a.aux_tokens] / fvu[None]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
