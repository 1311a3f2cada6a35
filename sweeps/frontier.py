"""SAE Frontier: the entry point of a sweep.

    python sweeps/frontier.py [--spec sweeps/specs/default.yaml]            # one machine (starts a local Ray)
    ray job submit --working-dir . -- python sweeps/frontier.py --spec ...  # any Ray cluster
    python sweeps/frontier.py --search optuna --trials 8                    # an Optuna study instead of the grid
    python sweeps/frontier.py --resume [SWEEP]                              # continue the last (or that) sweep
    python sweeps/frontier.py --compare EXP [EXP ...]                       # frontiers of earlier sweeps, no training
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# the working directory Ray uploads is the repo root: import the project from it, not from wherever it was installed
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.spec import SPEC_DIR, SpecError, is_tracking_server, load_spec  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Sweep SAEs (pruned vanilla vs Matryoshka) and track the frontier.")
    p.add_argument("--spec", default=str(SPEC_DIR / "default.yaml"), help="spec YAML (or a name in sweeps/specs)")
    p.add_argument("--search", choices=["grid", "optuna"], default="grid")
    p.add_argument("--trials", type=int, default=None, help="Optuna trials (default: the spec's optuna.trials)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="SWEEP",
                   help="continue the last sweep of this spec, or the sweep named SWEEP (its parent run's name)")
    p.add_argument("--compare", nargs="+", metavar="EXPERIMENT", help="draw the frontiers of these MLflow experiments")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: spec, $MLFLOW_TRACKING_URI, sqlite)")
    p.add_argument("--storage", default=None, help="shard store path or URI every node can reach (overrides the spec)")
    p.add_argument("--results-path", default=None,
                   help="where Tune keeps trial state and checkpoints, a path or URI every node can reach (overrides the spec)")
    p.add_argument("--out", default=".cache/compare", help="where --compare writes its CSV and plots")
    args = p.parse_args(argv)
    if args.trials is not None and args.trials < 1:
        p.error(f"--trials must be >= 1, got {args.trials}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {k: v for k, v in {"tracking_uri": args.tracking_uri, "storage": args.storage,
                                   "results_path": args.results_path}.items() if v}
    if args.compare:
        import pandas as pd

        from orchestrator.frontier import L0_BINS_PER_OCTAVE, PRIMARY_RULE, matched_l0_table
        from orchestrator.spec import default_tracking_uri, resolve_path
        from orchestrator.sweep import compare, frontier_table

        uri = default_tracking_uri(args.tracking_uri)
        frontier, out = compare(args.compare, uri, resolve_path(args.out))
        print(f"activations: {(out / 'activations.txt').read_text().strip()}")
        print(f"\n=== frontier (size vs FVU, Pareto per G, {PRIMARY_RULE} rule) ===")
        print(frontier_table(frontier))
        print(f"\n=== matched L0: best FVU per L0 bin (log-spaced, {L0_BINS_PER_OCTAVE} per doubling of L0), "
              "pruned vanilla vs Matryoshka, per scoring rule ===")
        matched = out / "matched_l0.csv"
        print(matched_l0_table(pd.read_csv(matched)) if matched.exists() else "(no scoring rules in the runs)")
        print(f"\nfrontier plots and tables: {out}")
        return 0
    try:
        spec = load_spec(args.spec, overrides)
        from orchestrator.preflight import preflight

        preflight(spec)
    except (SpecError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from orchestrator.sweep import PointsFailed, SweepInterrupted, frontier_table, run_sweep

    failed: PointsFailed | None = None
    try:
        outcome = run_sweep(spec, search=args.search, trials=args.trials, resume=args.resume)
    except SweepInterrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return 130
    except PointsFailed as err:  # the frontier of the points that finished, then one line per failed point
        failed, outcome = err, err.outcome
    print(f"\n=== frontier of {outcome.experiment} (size vs FVU, Pareto per G) ===")
    print(frontier_table(outcome.frontier))
    if outcome.pareto_trials is not None:
        print("\n=== Optuna Pareto trials (objective_fvu at G, objective_size) ===")
        for t in outcome.pareto_trials:
            print(t)
    print(f"\n{outcome.cost_summary()}\nparent run {outcome.parent_run_id} in experiment {outcome.experiment}")
    print(f"the sweep in the MLflow UI:  {outcome.parent_run_url}")
    uri = spec.resolved_tracking_uri()
    if not is_tracking_server(uri):  # a server serves its UI already; a store on disk needs one
        print(f"  (serve this store first: make ui, or mlflow ui --backend-store-uri {uri})")
    if failed is not None:
        print(f"\nfailed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
