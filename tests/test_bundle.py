"""The typed reports a trial sends Tune (orchestrator.bundle): what the trial writes is what the driver reads."""

import math

from orchestrator.bundle import (
    PHASE,
    DoneReport,
    EvaluatedReport,
    Phase,
    TrainedReport,
    TrainReport,
    phase_of,
)


def test_train_report_keeps_each_points_metrics_apart():
    report = TrainReport(tokens_seen=4096, step=4, metrics={"aaa": {"loss": 1.5, "prefix_fvu/64": 0.25},
                                                            "bbb": {}})  # bbb's SAE stopped: no metrics
    flat = report.to_tune()
    assert phase_of(flat) is Phase.TRAIN and flat["aaa/prefix_fvu/64"] == 0.25 and "bbb/loss" not in flat
    back = TrainReport.from_tune({**flat, "training_iteration": 3}, ["aaa", "bbb"])
    assert back == TrainReport(4096, 4, {"aaa": {"loss": 1.5, "prefix_fvu/64": 0.25}, "bbb": {}})


def test_done_report_puts_a_one_point_trials_numbers_at_the_top_level():
    flat = DoneReport(points=1, points_failed=0, node_id="n1", final={"fvu": 0.05, "objective_fvu": 0.1}).to_tune()
    assert flat["objective_fvu"] == 0.1 and flat[PHASE] == Phase.DONE  # where Optuna's searcher reads it
    back = DoneReport.from_tune({**flat, "time_total_s": 12.0, "training_iteration": 9, "pid": 7, "done": True})
    assert (back.points, back.points_failed, back.node_id, back.final["fvu"]) == (1, 0, "n1", 0.05)
    assert dict(back.final) == {"fvu": 0.05, "objective_fvu": 0.1}  # Tune's own counters are not the trial's metrics
    assert DoneReport.from_tune(EvaluatedReport("aaa").to_tune()) is None
    trained = TrainedReport(step=12).to_tune()  # the end of training: neither a training step nor the last report
    assert phase_of(trained) is Phase.TRAINED and trained["step"] == 12 and DoneReport.from_tune(trained) is None
    assert DoneReport.from_tune(None) is None
    nan = DoneReport(1, 1, "n1", {"objective_fvu": float("nan")}).to_tune()  # a failed point: Optuna sees NaN
    assert math.isnan(nan["objective_fvu"])
