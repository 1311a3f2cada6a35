"""Packed grid points: the plan (one seed per pack, sizes, the memory budget) and a packed smoke sweep end to end
(one run per point, the same numbers as unpacked, one point's NaN failing that point only)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from orchestrator.bundle import Phase, phase_of
from orchestrator.packing import MB, describe_plan, pack_name, plan_packs, trial_memory
from orchestrator.spec import SpecError, load_spec
from orchestrator.sweep import PointsFailed, run_sweep
from orchestrator.tracking import ERROR_TAG, PARENT_TAG
from orchestrator.trial import INJECT_CRASH_AT_ENV, INJECT_CRASH_ENV, INJECT_NAN_ENV
from sae.lm import ModelInfo

LM = ModelInfo(name="x", revision="r", n_layers=4, d_model=64, model_type="llama", n_params=10_000_000,
               vocab_size=1000)


def spec_with(**resources):
    return load_spec("smoke", {"grid": {"n_latents": [128, 256], "k": [8], "partition": [None, "doubling:2"],
                                        "seed": [0, 1]},
                               "resources": {"cpus": 2, "max_concurrent": 1, **resources}})


def keys(packs):
    return [[(p.n_latents, p.partition, p.seed) for p in pack] for pack in packs]


def test_packs_never_mix_seeds_and_keep_grid_order():
    spec = spec_with(pack=3)
    packs = plan_packs(spec, d=64, lm=LM, shard_rows=512, budget=1 << 40)
    assert [len(p) for p in packs] == [3, 1, 3, 1]
    assert all(len({p.seed for p in pack}) == 1 for pack in packs)
    assert [p.trial_key for pack in packs for p in pack] == [
        p.trial_key for p in sorted(spec.trial_points(), key=lambda p: p.seed)]
    one = plan_packs(spec_with(pack=1), d=64, lm=LM, shard_rows=512, budget=1 << 40)
    assert [len(p) for p in one] == [1] * 8


def test_a_pack_is_named_by_its_first_point_and_how_many_more():
    """The Tune trial's name in the sweep's status table (orchestrator.status.grid_trial_name)."""
    packs = plan_packs(spec_with(pack=3), d=64, lm=LM, shard_rows=512, budget=1 << 40)
    assert [pack_name(p) for p in packs] == ["n128-k8-topk-none-s0 +2", "n256-k8-topk-doubling:2-s0",
                                             "n128-k8-topk-none-s1 +2", "n256-k8-topk-doubling:2-s1"]


def test_auto_fills_each_trial_up_to_the_memory_budget():
    spec = spec_with(pack="auto")
    everything = plan_packs(spec, d=64, lm=LM, shard_rows=512, budget=1 << 40)
    assert [len(p) for p in everything] == [4, 4]
    two = trial_memory(spec, everything[0][:2], d=64, lm=LM, shard_rows=512).peak
    three = trial_memory(spec, everything[0][:3], d=64, lm=LM, shard_rows=512).peak
    assert two < three  # each SAE adds its weights, moments and (up to `cpus` at once) its step temporaries
    budget = (two + three) // 2
    packs = plan_packs(spec, d=64, lm=LM, shard_rows=512, budget=budget)
    assert len(packs[0]) == 2 and sum(map(len, packs)) == 8
    seeds = [p.seed for p in spec.trial_points()]
    for pack, following in zip(packs, packs[1:], strict=False):
        assert len(pack) == 1 or trial_memory(spec, pack, d=64, lm=LM, shard_rows=512).peak <= budget
        if following[0].seed == pack[0].seed:  # the next point of the seed did not fit
            assert trial_memory(spec, [*pack, following[0]], d=64, lm=LM, shard_rows=512).peak > budget
    assert seeds.count(0) == 4
    alone = plan_packs(spec, d=64, lm=LM, shard_rows=512, budget=1)  # nothing fits: one point per trial still runs
    assert [len(p) for p in alone] == [1] * 8
    estimates = [trial_memory(spec, p, d=64, lm=LM, shard_rows=512) for p in packs]
    text = describe_plan(spec, packs, estimates, budget)
    assert f"8 grid points in {len(packs)} trial(s)" in text and f"budget {budget / MB:.0f} MB" in text


def test_memory_estimate_grows_with_the_dictionary_and_the_lm():
    spec = spec_with()
    small, big = spec.trial_points()[0], spec.trial_points()[4]
    assert small.n_latents == 128 and big.n_latents == 256
    a = trial_memory(spec, [small], d=64, lm=LM, shard_rows=512)
    b = trial_memory(spec, [big], d=64, lm=LM, shard_rows=512)
    assert b.train > a.train
    bigger_lm = ModelInfo(**{**LM.__dict__, "n_params": 2 * LM.n_params})
    for dtype, width in (("float32", 4), ("bfloat16", 2)):  # the evaluation's LM is loaded in eval.splice_dtype
        spec = load_spec("smoke", {**spec.model_dump(), "eval": {**spec.eval.model_dump(), "splice_dtype": dtype}})
        grown = trial_memory(spec, [small], d=64, lm=bigger_lm, shard_rows=512).eval
        assert grown - trial_memory(spec, [small], d=64, lm=LM, shard_rows=512).eval == 2 * width * LM.n_params


def test_gpu_estimate_counts_one_eval_batch_not_the_eval_set():
    """A GPU trial keeps the eval set and its codes in host memory (one batch at a time on the GPU), so its
    estimate must not grow with eval_tokens x n_latents, which would refuse sweeps that fit (a paper-sized eval
    set is tens of GB of codes); a CPU trial holds them all."""
    point = spec_with().trial_points()[4]
    est = {}
    for tokens in (8192, 65536):
        spec = load_spec("smoke", {**spec_with().model_dump(), "eval_tokens": tokens})
        est[tokens] = {dev: trial_memory(spec, [point], d=64, lm=LM, shard_rows=512, device=dev).eval
                       for dev in ("cpu", "cuda")}
    assert est[65536]["cpu"] - est[8192]["cpu"] >= (65536 - 8192) * point.n_latents * 8
    assert est[65536]["cuda"] == est[8192]["cuda"]


def test_pack_setting_is_validated():
    for bad in (0, -1, "all", True):
        with pytest.raises(SpecError, match="pack"):
            spec_with(pack=bad)
    with pytest.raises(SpecError, match="memory_gb"):
        spec_with(pack="auto", gpus=1)
    assert spec_with(pack="auto", gpus=1, memory_gb=40).resources.memory_gb == 40


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    path = tmp_path_factory.mktemp("packing_home")
    yield path
    ray.shutdown()


def _finals(uri: str, experiment: str, parent: str) -> dict[str, object]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'")
    return {r.data.tags["sae_frontier.point_key"]: r for r in runs}


@pytest.mark.slow
def test_packed_sweep_keeps_one_run_per_point_and_fails_only_the_poisoned_one(home):
    over = {"storage": str(home / "shards"), "results_path": str(home / "results"),
            "tracking_uri": f"sqlite:///{home}/mlflow.db"}
    unpacked = load_spec("smoke", {**over, "experiment": "unpacked"})
    packed = load_spec("smoke", {**over, "experiment": "packed",
                                 "resources": {"cpus": 2, "max_concurrent": 1, "pack": 4}})
    poisoned = next(p for p in packed.trial_points() if p.n_latents == 256 and p.partition == "none")
    base = run_sweep(unpacked)
    ray.shutdown()  # Ray's workers inherit the environment of the Ray that starts next
    os.environ[INJECT_NAN_ENV] = poisoned.trial_key
    try:
        with pytest.raises(PointsFailed, match="1 grid point") as failed:
            run_sweep(packed)
    finally:
        ray.shutdown()
        del os.environ[INJECT_NAN_ENV]
    uri = packed.resolved_tracking_uri()
    client = MlflowClient(uri)
    parent = client.search_runs([client.get_experiment_by_name("packed").experiment_id],
                                "tags.`sae_frontier.kind` = 'sweep'")[0]
    assert parent.info.status == "FAILED" and parent.data.metrics["trials_failed"] == 1
    runs = _finals(uri, "packed", parent.info.run_id)
    assert set(runs) == {p.trial_key for p in packed.trial_points()}
    bad = runs.pop(poisoned.trial_key)
    assert bad.info.status == "FAILED" and "loss is" in bad.data.tags[ERROR_TAG]
    # one line per failed point, and the frontier of the three that finished
    assert len(failed.value.failures) == 1 and failed.value.failures[0].startswith(f"{bad.info.run_name}: ")
    assert set(failed.value.outcome.frontier["run_name"]) <= {r.info.run_name for r in runs.values()}
    assert not failed.value.outcome.frontier.empty
    reference = _finals(uri, "unpacked", base.parent_run_id)
    for key, run in runs.items():
        m = run.data.metrics
        assert run.info.status == "FINISHED" and m["pack_size"] == 4
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) > 1  # each point its own curve
        assert 0 < m["peak_memory_mb"] and 0 < m["estimated_memory_mb"]
        assert m["train_seconds"] == pytest.approx(m["pack_train_seconds"] / 4)
        assert client.get_metric_history(run.info.run_id, "fvu/prefix.masked" if "doubling" in run.data.params[
            "partition"] else "fvu/prune_ez2.masked")
        ref = reference[key].data.metrics
        for metric in ("fvu", "l0", "train_final/fvu"):  # packing changes where SAEs train, not what they learn
            assert m[metric] == pytest.approx(ref[metric], rel=1e-4, abs=1e-6), (key, metric)


@pytest.mark.slow
@pytest.mark.parametrize("crash_at", ["evaluated", "trained"])
def test_a_pack_killed_after_its_first_point_resumes_without_redoing_work(home, tmp_path, crash_at):
    """Killed after its first point's bundle, or when training ends (with no checkpoint during training, so only
    the one taken at its end can keep it): the retried trial redoes neither the training nor a finished point."""
    spec = load_spec("smoke", {"storage": str(home / "shards"), "results_path": str(home / "results"),
                               "tracking_uri": f"sqlite:///{home}/mlflow.db", "experiment": f"crashed-{crash_at}",
                               "resources": {"cpus": 2, "max_concurrent": 1, "pack": 4}})
    if crash_at == "trained":
        spec = spec.model_copy(update={"train": spec.train.model_copy(update={"checkpoint_min_seconds": 1e6})})
    marker = tmp_path / "crashed"
    ray.shutdown()
    os.environ[INJECT_CRASH_ENV] = str(marker)  # the trial process dies once
    os.environ[INJECT_CRASH_AT_ENV] = crash_at
    try:
        outcome = run_sweep(spec)
    finally:
        ray.shutdown()
        del os.environ[INJECT_CRASH_ENV], os.environ[INJECT_CRASH_AT_ENV]
    assert marker.exists()  # the crash happened, and Tune restarted the trial from its checkpoint
    uri = spec.resolved_tracking_uri()
    client = MlflowClient(uri)
    runs = _finals(uri, f"crashed-{crash_at}", outcome.parent_run_id)
    assert set(runs) == {p.trial_key for p in spec.trial_points()}
    ends = []
    for run in runs.values():
        m = run.data.metrics
        assert run.info.status == "FINISHED" and "train_final/fvu" in m and m["pack_train_seconds"] > 0
        steps = [h.step for h in client.get_metric_history(run.info.run_id, "train/loss")]
        assert steps and len(steps) == len(set(steps))  # training ran once: no step logged twice
        ends.append((m["tokens_seen"], m["pack_train_seconds"]))
    assert len(set(ends)) == 1  # the points evaluated after the restart report the one training that ran
    # what the trial sent Tune, restart included: a retrained pack would report its training steps again
    reported = [json.loads(line) for path in Path(outcome.experiment_dir).glob("run_trial_*/result.json")
                for line in path.read_text().splitlines()]
    train_steps = [r["step"] for r in reported if phase_of(r) is Phase.TRAIN]
    assert train_steps and len(train_steps) == len(set(train_steps))
    assert sum(phase_of(r) is Phase.TRAINED for r in reported) == 1


@pytest.mark.slow
def test_a_corrupt_shard_fails_its_points_at_once_without_retries(home, tmp_path):
    """A deterministic error repeats on every attempt: the trial's points fail with the reason on their runs, and
    Tune does not retry the trial (orchestrator.trial.DETERMINISTIC_ERRORS)."""
    over = {"storage": str(tmp_path / "shards"), "results_path": str(tmp_path / "results"),
            "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "corrupt",
            "resources": {"cpus": 2, "max_concurrent": 1, "pack": 4}}
    spec = load_spec("smoke", over)
    shutil.copytree(home / "shards", tmp_path / "shards")  # the module's store, harvested by the tests above
    shard = sorted((tmp_path / "shards").glob("*.train.*/shard-*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    ray.shutdown()
    try:
        with pytest.raises(RuntimeError, match="4 grid point"):
            run_sweep(spec)
    finally:
        ray.shutdown()
    trials = list((tmp_path / "results").glob("smoke-grid-*/run_trial_*"))
    assert len(trials) == 1 and not list(trials[0].glob("error.*"))  # ended by itself: no Tune error, no retry
    uri = spec.resolved_tracking_uri()
    parent = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("corrupt").experiment_id],
                                           "tags.`sae_frontier.kind` = 'sweep'")[0]
    runs = _finals(uri, "corrupt", parent.info.run_id)
    assert set(runs) == {p.trial_key for p in spec.trial_points()}
    for run in runs.values():
        tag = run.data.tags[ERROR_TAG]
        assert run.info.status == "FAILED" and tag.startswith("ShardError: shard ") and shard.name in tag


def test_cost_summary_says_reused_only_when_the_stores_were_complete():
    import pandas as pd

    from orchestrator.sweep import SweepOutcome

    timings = pd.DataFrame({"run_name": ["a", "b"], "train_seconds": [10.0, 12.0], "eval_seconds": [5.0, 7.0]})
    empty = pd.DataFrame()
    for reused, seconds in ((True, 12.0), (False, 3.0)):  # a slow reuse (object store) and a fast real harvest
        text = SweepOutcome("e", "p", empty, empty, seconds, 40.0, "d", timings, harvest_reused=reused).cost_summary()
        assert ("reused from the store" in text) is reused
        assert ("would take" in text) is (not reused)


def test_a_trial_checkpoints_every_n_steps_but_at_most_once_per_min_seconds():
    """On a GPU 50 steps take less than copying a pack's weights and Adam moments into Tune's storage: the clock
    keeps checkpoints at least checkpoint_min_seconds apart; 0 restores one every checkpoint_every_steps."""
    from orchestrator import trial

    now = [1000.0]
    spec = load_spec("default")
    assert spec.train.checkpoint_every_steps == 50 and spec.train.checkpoint_min_seconds == 120
    clock = trial._CheckpointClock(spec, now=lambda: now[0])
    due = []
    for step, t in ((50, 1030.0), (100, 1125.0), (120, 1300.0), (150, 1300.0), (200, 1310.0), (250, 1430.0)):
        now[0] = t
        due.append(clock.due(step))
    assert due == [False, True, False, True, False, True]
    every = trial._CheckpointClock(spec.model_copy(update={"train": spec.train.model_copy(
        update={"checkpoint_min_seconds": 0.0})}))
    assert [every.due(s) for s in (49, 50, 51, 100)] == [False, True, False, True]
