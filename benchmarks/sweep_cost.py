"""Where a sweep's time goes: harvest, training and evaluation seconds per trial, and eval_to_train.

    python benchmarks/sweep_cost.py [--spec default]

Runs the spec's grid through the real sweep driver (Ray Tune, MLflow on a throwaway SQLite store, the shard
store of the spec, so a warm store costs no harvest) and prints one line per trial plus the totals. The ratio
that matters is eval_to_train = sum of evaluation seconds / sum of training seconds, in the same run.
(Packing several grid points into one trial is not built yet, so no packed_speedup is printed.)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.spec import load_spec  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default="default", help="spec name or YAML path (default: default)")
    args = p.parse_args(argv)
    from orchestrator.sweep import run_sweep

    with tempfile.TemporaryDirectory() as tmp:
        spec = load_spec(args.spec, {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "results_path": f"{tmp}/results"})
        t0 = time.perf_counter()
        outcome = run_sweep(spec, log=lambda msg: None)
        wall = time.perf_counter() - t0
    t = outcome.timings.sort_values("run_name")
    print(f"spec {spec.name}: {len(t)} trials, wall {wall:.1f}s (harvest {outcome.harvest_seconds:.1f}s, "
          f"trials {outcome.trials_seconds:.1f}s)")
    for r in t.itertuples():
        print(f"  {r.run_name:<48} train {r.train_seconds:7.1f}s  eval {r.eval_seconds:7.1f}s")
    train, evals = float(t.train_seconds.sum()), float(t.eval_seconds.sum())
    print(f"harvest_seconds {outcome.harvest_seconds:.1f}")
    print(f"train_seconds_per_trial {train / len(t):.1f}")
    print(f"eval_seconds_per_trial {evals / len(t):.1f}")
    print(f"eval_to_train {evals / train:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
