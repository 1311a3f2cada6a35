"""The LM splice in bfloat16 against float32 (eval.splice_dtype): what it changes in the CE/KL scores, and what
it saves.

    python benchmarks/splice_dtype.py [--n-latents 2048] [--threads 1]

Trains the default spec's vanilla SAE (its train settings, on its harvested train store; `make frontier`
harvests it), then evaluates it as a trial does (sae.evaluate.evaluate_progressive with the spec's eval options
and splice contexts) twice, with the LM loaded in float32 and in bfloat16. Prints, per G of the pruning curve
(prune_ez2, masked rule), ce_score and kl_score under both and their difference next to the float32 95%
interval's half-width; then the scorer's set-up seconds and the evaluation's seconds under each, and
`max_shift_over_halfwidth` (the largest |bf16 - fp32| over the interval half-width at the same G).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.train_quality import default_stores  # noqa: E402
from orchestrator.shards import iter_batches  # noqa: E402
from orchestrator.spec import load_spec, make_point  # noqa: E402
from orchestrator.trial import importance_sample, load_eval_data, splice_contexts  # noqa: E402
from sae.corpus import special_ids  # noqa: E402
from sae.evaluate import evaluate_progressive  # noqa: E402
from sae.importance import latent_stats  # noqa: E402
from sae.lm import load_lm  # noqa: E402
from sae.splice import SpliceScorer  # noqa: E402
from sae.train import Trainer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-latents", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    found = default_stores()
    if found is None:
        return 2
    train_store, eval_store = found["train"][0], found["eval"][0]
    spec = load_spec("default")
    point = make_point(a.n_latents, spec.grid.k[0], "topk", None, 0)
    data, positions = load_eval_data(eval_store, spec)
    cfg = point.sae_config(data.acts.shape[1])
    t = time.perf_counter()
    batches = iter_batches(train_store, spec.train.batch_size, seed=0, epochs=spec.train.epochs)
    sae = Trainer([(cfg, spec.train_config(point, "cpu"))]).fit(batches)[0].eval()
    print(f"trained {point.name} in {time.perf_counter() - t:.0f} s")
    ranking = latent_stats(sae, importance_sample(train_store, spec.eval.importance_tokens))
    opts = spec.eval.options(spec.granularities())
    curves, seconds = {}, {}
    for dtype in ("float32", "bfloat16"):
        lm = load_lm(spec.model, dtype=dtype)
        contexts = splice_contexts(data, positions, spec.eval.splice_contexts, special_ids(lm.tokenizer)[0],
                                   spec.eval.splice_length)
        t = time.perf_counter()
        scorer = SpliceScorer(lm, contexts, spec.site)
        setup = time.perf_counter() - t
        t = time.perf_counter()
        curves[dtype] = evaluate_progressive(sae, data, opts, scorer, ranking=ranking).curves
        seconds[dtype] = (setup, time.perf_counter() - t)
        print(f"{dtype}: scorer set-up {setup:.1f} s, evaluation {seconds[dtype][1]:.1f} s "
              f"(path {scorer.path}, ce_clean {scorer.ce_clean:.4f}, ce_zero {scorer.ce_zero:.4f})")
    worst = 0.0
    for metric in ("ce_score", "kl_score"):
        key = f"{metric}/prune_ez2.masked"
        fp32, bf16 = dict(curves["float32"][key]), dict(curves["bfloat16"][key])
        lo, hi = dict(curves["float32"][f"{metric}_lo/prune_ez2.masked"]), \
            dict(curves["float32"][f"{metric}_hi/prune_ez2.masked"])
        for g in sorted(fp32):
            half = (hi[g] - lo[g]) / 2
            shift = bf16[g] - fp32[g]
            worst = max(worst, abs(shift) / half)
            print(f"  {metric} G={int(g):5d}: fp32 {fp32[g]:.4f}  bf16 {bf16[g]:.4f}  shift {shift:+.4f}  "
                  f"interval half-width {half:.4f}")
    f32, b16 = seconds["float32"], seconds["bfloat16"]
    print(f"setup_speedup {f32[0] / b16[0]:.2f}")
    print(f"evaluation_speedup {f32[1] / b16[1]:.2f}")
    print(f"max_shift_over_halfwidth {worst:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
