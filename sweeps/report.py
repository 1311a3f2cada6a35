"""The claims report of a finished sweep, computed from MLflow alone (no training, no Ray).

    python sweeps/report.py --experiment NAME [--parent RUN_ID] [--tracking-uri URI] [--out reports]

Writes <out>/<NAME>/REPORT.md and its figures, and logs that folder under `report/` on the sweep's parent run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.spec import default_tracking_uri, resolve_path  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Confirm or refute the five claims from one sweep's MLflow runs.")
    p.add_argument("--experiment", required=True, help="MLflow experiment of the sweep")
    p.add_argument("--parent", default=None, help="the sweep's parent run id (default: its latest FINISHED sweep run)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, sqlite)")
    p.add_argument("--out", default="reports", help="folder that receives <experiment>/REPORT.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from orchestrator.report import make_report

    uri = default_tracking_uri(args.tracking_uri)
    try:
        folder = make_report(uri, args.experiment, Path(resolve_path(args.out)), args.parent)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {folder / 'REPORT.md'} (logged under report/ on parent run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
