"""The contract between a trial and the driver, so that neither imports the other: where a trial keeps each grid
point's outcome inside its checkpoint, and which kind of report it sends Tune.

A point's folder `points/<point key>/` holds either its result bundle (sae.export's layout: result.json, sae/,
sae_lens/, plots/) or error.txt saying why the point failed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
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
    TRAINED = "trained"  # training ended: the trained SAEs are in the checkpoint just reported
    EVALUATED = "evaluated"  # one point's bundle is in the checkpoint just reported
    DONE = "eval"  # the trial's last report: every point has its bundle or its error.txt


def phase_of(result: Mapping[str, Any] | None) -> Phase | None:
    """The kind of a Tune result, or None for one without (Tune's own bookkeeping)."""
    try:
        return Phase((result or {}).get(PHASE))
    except ValueError:
        return None


@dataclass(frozen=True)
class TrainReport:
    """Training metrics of a trial's points at one step. Tune keeps a flat dict, so each point's metrics travel as
    "<point key>/<metric>"; a point whose SAE stopped has none."""

    tokens_seen: int
    step: int
    metrics: Mapping[str, Mapping[str, float]]  # point key -> {metric: value}

    def to_tune(self) -> dict[str, Any]:
        out: dict[str, Any] = {PHASE: Phase.TRAIN, "tokens_seen": self.tokens_seen, "step": self.step}
        for key, metrics in self.metrics.items():
            out.update({f"{key}/{name}": float(v) for name, v in metrics.items()})
        return out

    @classmethod
    def from_tune(cls, result: Mapping[str, Any], keys: list[str]) -> TrainReport:
        """The report of the points `keys` (their keys are what tells their metrics apart)."""
        return cls(int(result["tokens_seen"]), int(result.get("step", 0)),
                   {key: {k.removeprefix(f"{key}/"): v for k, v in result.items() if k.startswith(f"{key}/")}
                    for key in keys})


@dataclass(frozen=True)
class TrainedReport:
    """Training ended at `step`: a retry from the checkpoint reported with this goes straight to evaluation."""

    step: int

    def to_tune(self) -> dict[str, Any]:
        return {PHASE: Phase.TRAINED, "step": self.step}


@dataclass(frozen=True)
class EvaluatedReport:
    """One point's bundle is in the checkpoint reported with this."""

    point: str  # its key

    def to_tune(self) -> dict[str, Any]:
        return {PHASE: Phase.EVALUATED, "point": self.point}


@dataclass(frozen=True)
class DoneReport:
    """A trial's last report. A one-point trial (an Optuna trial's) also carries its final metrics and objectives at
    the top level, where Tune's searchers and its table look for them."""

    points: int
    points_failed: int
    node_id: str  # the Ray node that ran the trial
    final: Mapping[str, float] = field(default_factory=dict)  # the trial's metrics (Tune's own counters left out)

    def to_tune(self) -> dict[str, Any]:
        return {**self.final, PHASE: Phase.DONE, "points": self.points, "points_failed": self.points_failed,
                "node_id": self.node_id}

    @classmethod
    def from_tune(cls, result: Mapping[str, Any] | None) -> DoneReport | None:
        """The last report of a finished trial, or None for any other result."""
        if phase_of(result) is not Phase.DONE:
            return None
        from ray.tune.result import AUTO_RESULT_KEYS, DONE

        fixed = {PHASE, "points", "points_failed", "node_id", DONE, *AUTO_RESULT_KEYS}
        return cls(int(result["points"]), int(result["points_failed"]), str(result.get("node_id", "")),
                   {k: v for k, v in result.items() if k not in fixed and isinstance(v, int | float)})
