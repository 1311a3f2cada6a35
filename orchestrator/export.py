"""`python -m sae.export` for MLflow runs too: the same arguments and export, with PATH also an MLflow run id.

    python -m orchestrator.export RUN_ID --to saelens|sparsify OUT [--tracking-uri URI]
    python -m orchestrator.export PATH --to saelens|sparsify OUT      # a local bundle or checkpoint, as sae.export

A PATH that does not exist locally and is 32 hex digits is a trial run's id: its bundle (`sae/`, result.json) is
downloaded into a temporary folder (`orchestrator.tracking.download_trial_bundle`) and exported from there. What the
SAELens cfg names (model, site, context size, corpus) comes from the options, else the run's result.json, else the
spec of the run's sweep (its parent run's spec.yaml), so runs of sweeps from before result.json recorded it export
without options. The tracking store: --tracking-uri, else $MLFLOW_TRACKING_URI, else the project's (mlflow/mlflow.db).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.spec import default_tracking_uri
from sae.export import RUN_ID, SOURCE_HELP, check_out, cli, spec_metadata


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store that holds RUN_ID (default: $MLFLOW_TRACKING_URI, else mlflow/mlflow.db)")


def _resolve(args: argparse.Namespace, stack: contextlib.ExitStack) -> tuple[str, dict[str, Any]]:
    """A local PATH as it is; a run id -> (its downloaded bundle, the SAELens metadata of its sweep's spec)."""
    if Path(args.source).exists() or not RUN_ID.fullmatch(args.source):
        return args.source, {}
    check_out(args.out, args.to)  # before the download
    from orchestrator.tracking import download_trial_bundle  # MLflow and Ray: only for a run id

    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="sae-export-"))
    bundle, spec = download_trial_bundle(default_tracking_uri(args.tracking_uri), args.source, Path(tmp) / "bundle")
    return str(bundle), spec_metadata(spec)


def main(argv: list[str] | None = None) -> int:
    return cli(argv, prog="python -m orchestrator.export", add_arguments=_add_arguments, resolve=_resolve,
               description="Export an MLflow trial run, a trial bundle or an SAE checkpoint for SAELens or sparsify.",
               source_help=f"an MLflow trial run's id (32 hex digits), or {SOURCE_HELP}")


if __name__ == "__main__":
    sys.exit(main())
