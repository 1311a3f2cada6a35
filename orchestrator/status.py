"""What a grid sweep prints about its Tune trials: each trial named by its grid points, in Tune's status table.

Tune's console reporter shows every searched value of the param space as a column cut to its last 20
characters. A grid trial's searched value is its pack, a dict of grid points, so the table showed
`...mory_mb': 1733.7}` where the point belongs, and a starting trial printed its points as `... '089530519335'}]`.
Here a grid trial is named by its points (`grid_trial_name`), and `GridStatus` prints Tune's own status table
and trial start through a second instance of Tune's reporter that has no parameter column, and a finished trial
as one line (Tune's result box lists every metric of the trial, some 120 lines each).

Tune adds its built-in reporter whatever the callbacks hold, so a grid sweep runs with it silenced
(RunConfig verbose=0). Silenced, it still prints the experiment's header and trial errors, and it stays the one
Tune sets up and drives: a second reporter among the callbacks would be set up without a start time and fail on
the first trial error, so `GridStatus` is a plain callback that drives its reporter itself. Its table lacks the
built-in one's "Logical resource usage" line, which only Tune's controller can compute.
"""

from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.experimental.output import AirVerbosity, TuneTerminalReporter, get_air_verbosity

from orchestrator.bundle import DoneReport
from orchestrator.packing import pack_name
from orchestrator.spec import TrialPoint


def grid_trial_name(trial: Trial) -> str:
    """A grid trial's name in Tune's output: its points (packing.pack_name) and its Tune id, e.g.
    `n256-k8-topk-doubling:2-s0 (5b9e0_00003)`; the id is the MLflow runs' tag `sae_frontier.tune_trial`."""
    return f"{pack_name([TrialPoint.from_config(p) for p in trial.config['pack']['points']])} ({trial.trial_id})"


def grid_trial_dirname(trial: Trial) -> str:
    """A grid trial's folder under the sweep's results: `<trainable>_<Tune id>` (Tune would build it from the
    trial's name, which holds spaces and characters it replaces)."""
    return f"{trial.trainable_name}_{trial.trial_id}"


SUMMARY_METRICS = ("fvu", "l0", "ce_score", "kl_score")  # a finished one-point trial's headline numbers


def completion_line(trial: Trial) -> str:
    """`Trial <name> completed after N iterations in T s: P points, F failed; fvu=... l0=...` (the metrics of a
    one-point trial; a pack's points each have their MLflow run)."""
    r = trial.last_result or {}
    done = DoneReport.from_tune(r)
    out = (f"Trial {trial} completed after {r.get('training_iteration', 0)} iterations in "
           f"{r.get('time_total_s', 0.0):.0f} s: " + (f"{done.points} points, {done.points_failed} failed"
                                                     if done else "? points, 0 failed"))
    shown = [f"{m}={done.final[m]:.4g}" for m in SUMMARY_METRICS if done and m in done.final]
    return out + ("; " + " ".join(shown) if shown else "")


class _NamedTrialsReporter(TuneTerminalReporter):
    """Tune's console reporter with no parameter column; a starting trial shows its points by name."""

    def __init__(self):
        super().__init__(AirVerbosity.DEFAULT, config={})

    def _print_config(self, trial: Trial) -> None:
        pack = trial.config["pack"]
        print(f"  points: {', '.join(TrialPoint.from_config(p).name for p in pack['points'])} "
              f"(estimated peak memory {pack['estimated_memory_mb']:.0f} MB)")


class GridStatus(Callback):
    """Tune's status table (every 30 s and at the end), trial starts and results, for grid trials named by
    their points (see the module docstring)."""

    def __init__(self):
        self._reporter = _NamedTrialsReporter()

    def setup(self, **info: Any) -> None:
        self._reporter.setup(start_time=time.time())

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        self._reporter.print_heartbeat(trials)

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._reporter.on_trial_start(iteration, trials, trial, **info)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        print(completion_line(trial))  # one line: Tune's own box lists every metric, ~120 lines per trial

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self._reporter.print_heartbeat(trials, force=True)
        self._reporter.on_experiment_end(trials, **info)


def grid_status() -> tuple[list[Callback], int]:
    """(callbacks, RunConfig verbose) for a grid sweep's console output: GridStatus with Tune's built-in
    reporter silenced; under Tune's legacy output engine (RAY_AIR_NEW_OUTPUT=0), that engine as it is."""
    if get_air_verbosity(AirVerbosity.DEFAULT) is None:
        return [], 1
    return [GridStatus()], 0
