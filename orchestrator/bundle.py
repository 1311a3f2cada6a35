"""The contract between a trial and the driver, so that neither imports the other: where a trial keeps each grid
point's outcome inside its checkpoint, and which kind of report it sends Tune.

A point's folder `points/<point key>/` holds either its result bundle (sae.export's layout: result.json, sae/,
sae_lens/, plots/) or error.txt saying why the point failed.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from orchestrator.spec import TrialPoint
from sae.export import RESULT_FILE

POINTS_DIR = "points"
ERROR_FILE = "error.txt"  # why a point failed (its run is marked FAILED with it)


def point_dir(root: str | Path, point: TrialPoint) -> Path:
    """Where a point's bundle (or error.txt) lives inside a trial checkpoint."""
    return Path(root) / POINTS_DIR / point.trial_key


def point_done(root: str | Path, point: TrialPoint) -> bool:
    d = point_dir(root, point)
    return (d / RESULT_FILE).exists() or (d / ERROR_FILE).exists()


PHASE = "phase"  # the key of a trial's report that says which kind it is


class Phase(StrEnum):
    """The kinds of report a trial sends Tune (the values are what Tune stores, so restored sweeps read them)."""

    TRAIN = "train"  # training metrics, per point as "<point key>/<metric>"; the driver logs them to each run
    EVALUATED = "evaluated"  # one point's bundle is in the checkpoint just reported
    DONE = "eval"  # the trial's last report: every point has its bundle or its error.txt


def phase_of(result: Mapping[str, Any] | None) -> Phase | None:
    """The kind of a Tune result, or None for one without (Tune's own bookkeeping)."""
    try:
        return Phase((result or {}).get(PHASE))
    except ValueError:
        return None
