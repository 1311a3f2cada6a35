"""Where a trial keeps each grid point's outcome inside its checkpoint: what the trial writes and the tracking
callback reads, so that neither imports the other.

A point's folder `points/<point key>/` holds either its result bundle (sae.export's layout: result.json, sae/,
sae_lens/, plots/) or error.txt saying why the point failed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sae.export import RESULT_FILE

POINTS_DIR = "points"
ERROR_FILE = "error.txt"  # why a point failed (its run is marked FAILED with it)


def point_dir(root: str | Path, point: dict[str, Any]) -> Path:
    """Where a point's bundle (or error.txt) lives inside a trial checkpoint."""
    return Path(root) / POINTS_DIR / point["trial_key"]


def point_done(root: str | Path, point: dict[str, Any]) -> bool:
    d = point_dir(root, point)
    return (d / RESULT_FILE).exists() or (d / ERROR_FILE).exists()
