"""Where a sweep's time goes, and what packing grid points into one trial saves.

    python benchmarks/sweep_cost.py [--spec default] [--skip-packed]

Runs the spec's grid through the real sweep driver (Ray Tune, MLflow on a throwaway SQLite store, the spec's
shard store, so a warm store costs no harvest), up to three times in the same run:
  1. as the spec says (the default spec: two points per trial, two single-threaded trials at a time);
  2. unpacked: one point per trial, otherwise the same (skipped when the spec does not pack);
  3. packed: every point of a seed in one trial with all the CPUs (cpus x max_concurrent) and max_concurrent 1,
     so runs 2 and 3 get the same cores.
Prints per-trial training and evaluation seconds; eval_to_train (sum of evaluation / sum of training seconds) of
run 1, and of run 2 as eval_to_train_unpacked; spec_speedup (trials wall time of run 2 / run 1) and
packed_speedup (run 2 / run 3); and the packed trial's peak memory against the estimate the sweep printed before
it started (peak_vs_estimate; orchestrator/packing.py).
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


def run(spec_name: str, overrides: dict, label: str):
    from orchestrator.sweep import run_sweep

    with tempfile.TemporaryDirectory() as tmp:
        spec = load_spec(spec_name, {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "results_path": f"{tmp}/results",
                                     **overrides})
        t0 = time.perf_counter()
        outcome = run_sweep(spec, log=lambda msg: print(f"  [{label}] {msg}") if "grid points" in msg else None)
        wall = time.perf_counter() - t0
    t = outcome.timings.sort_values("run_name")
    print(f"{label}: {len(t)} points, wall {wall:.1f}s (harvest {outcome.harvest_seconds:.1f}s, "
          f"trials {outcome.trials_seconds:.1f}s)")
    for r in t.itertuples():
        print(f"  {r.run_name:<48} train {r.train_seconds:7.1f}s  eval {r.eval_seconds:7.1f}s  "
              f"peak {r.peak_memory_mb:6.0f} MB (estimate {r.estimated_memory_mb:6.0f} MB)")
    return spec, outcome


def eval_to_train(outcome) -> float:
    t = outcome.timings
    return float(t.eval_seconds.sum()) / float(t.train_seconds.sum())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default="default", help="spec name or YAML path (default: default)")
    p.add_argument("--skip-packed", action="store_true", help="time the spec as it is only")
    args = p.parse_args(argv)
    spec, base = run(args.spec, {}, "as specified")
    t = base.timings
    print(f"harvest_seconds {base.harvest_seconds:.1f}")
    print(f"train_seconds_per_point {t.train_seconds.mean():.1f}")
    print(f"eval_seconds_per_point {t.eval_seconds.mean():.1f}")
    print(f"eval_to_train {eval_to_train(base):.3f}")
    if args.skip_packed:
        return 0
    r = spec.resources
    unpacked = base
    if r.pack != 1:
        _, unpacked = run(args.spec, {"resources": {**r.model_dump(), "pack": 1}}, "unpacked")
        print(f"eval_to_train_unpacked {eval_to_train(unpacked):.3f}")
        print(f"spec_speedup {unpacked.trials_seconds / base.trials_seconds:.2f}")
    _, packed = run(args.spec, {"resources": {**r.model_dump(), "cpus": r.cpus * r.max_concurrent,
                                              "max_concurrent": 1, "pack": len(spec.trial_points())}}, "packed")
    pt = packed.timings
    print(f"packed_trials_seconds {packed.trials_seconds:.1f} (unpacked {unpacked.trials_seconds:.1f})")
    print(f"packed_speedup {unpacked.trials_seconds / packed.trials_seconds:.2f}")
    print(f"packed_peak_memory_mb {pt.peak_memory_mb.max():.0f}")
    print(f"packed_estimated_memory_mb {pt.estimated_memory_mb.max():.0f}")
    print(f"peak_vs_estimate {pt.peak_memory_mb.max() / pt.estimated_memory_mb.max():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
