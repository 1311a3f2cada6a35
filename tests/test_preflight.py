"""Preflight (orchestrator/preflight.py): every input that cannot work is refused before the sweep writes
anything, in one line that names the field and the fix, and the CLI exits 2 within seconds."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from spec_helpers import smoke_dict

from orchestrator.preflight import (
    GB,
    NodeCapacity,
    check_memory,
    check_model_and_corpus,
    check_resources,
    check_tracking,
    check_writable,
    node_capacity,
    preflight,
)
from orchestrator.spec import SpecError, load_spec, spec_from_dict
from sae.lm import describe_model

ROOT = Path(__file__).resolve().parent.parent




def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: nothing listens there


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"model": "./no/such/model"}, "model"),
        ({"site": "resid_post.99"}, "layer 99 is out of range"),
        ({"text_column": "body"}, "corpus"),
    ],
)
def test_preflight_checks_model_and_corpus(override, needle):
    with pytest.raises(SpecError, match=needle):
        preflight(spec_from_dict(smoke_dict(**override)), log=lambda _: None)


def test_empty_corpus_is_rejected(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SpecError, match="corpus"):
        preflight(spec_from_dict(smoke_dict(corpus=str(empty), label_column=None)), log=lambda _: None)


def test_corpus_check_reads_the_corpus_as_the_harvest_will(tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    (books / "a.txt").write_text("One paragraph.\n\nAnother one.")
    spec = spec_from_dict(smoke_dict(corpus=str(books), label_column=None, text_unit="paragraph"))
    assert check_model_and_corpus(spec).n_layers == 30
    with pytest.raises(SpecError, match=r"^corpus_field: 'data' applies to \.json files"):
        check_model_and_corpus(spec_from_dict(smoke_dict(corpus=str(books), label_column=None, corpus_field="data")))
    (tmp_path / "n.json").write_text(json.dumps({"data": {"items": [{"text": "x"}]}}))
    nested = smoke_dict(corpus=str(tmp_path / "n.json"), label_column=None, corpus_field="data.items")
    check_model_and_corpus(spec_from_dict(nested))
    with pytest.raises(SpecError, match=r"^corpus_field: .* has no key 'rows' at data"):
        check_model_and_corpus(spec_from_dict({**nested, "corpus_field": "data.rows"}))
    with pytest.raises(SpecError, match=r"^label_column: column 'topic' is not in corpus"):
        check_model_and_corpus(spec_from_dict({**nested, "label_column": "topic"}))


def test_paths_under_a_file_or_without_room_are_refused_and_nothing_is_created(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(SpecError, match=r"^storage: .* which is a file, not a folder; choose another storage"):
        check_writable("storage", str(blocker / "shards"), need=0)
    with pytest.raises(SpecError, match=r"^storage: the planned shards need about .* GB free; free some space"):
        check_writable("storage", str(tmp_path / "new" / "shards"), need=1 << 60)
    with pytest.raises(SpecError, match="^results_path: an empty path"):
        check_writable("results_path", " ", need=0)
    check_writable("storage", str(tmp_path / "new" / "shards"), need=1024)
    check_writable("storage", "s3://bucket/prefix", need=1 << 60)  # remote: not probed (it would mean writing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_tracking_store_that_does_not_answer_is_refused_fast(tmp_path):
    uri = f"http://127.0.0.1:{closed_port()}"
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match=rf"^tracking_uri: {uri} does not answer within 10 s"):
        check_tracking(uri)
    assert time.perf_counter() - t0 < 10
    check_tracking(f"sqlite:///{tmp_path}/mlflow.db")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(SpecError, match="^tracking_uri: .* which is a file"):
        check_tracking(f"sqlite:///{blocker}/mlflow.db")


def test_requests_beyond_the_largest_node_are_refused():
    node = NodeCapacity(cpus=2, gpus=0, memory=24 * GB, where="(this machine)")
    check_resources(load_spec("smoke"), node)
    for override, field in [({"resources": {"cpus": 4}}, "resources.cpus"),
                            ({"resources": {"gpus": 1}}, "resources.gpus"),
                            ({"harvest": {"num_gpus_per_actor": 1}}, "harvest.num_gpus_per_actor")]:
        with pytest.raises(SpecError, match=rf"^{field}: a .* but the largest node \(this machine\) has"):
            check_resources(spec_from_dict(smoke_dict(**override)), node)
    here = node_capacity()
    assert here.cpus >= 1 and here.memory > GB and here.gpus == 0


def test_every_trial_must_fit_the_node_and_the_worst_is_reported():
    info = describe_model("smollm2-135m")
    smoke = load_spec("smoke")
    node = NodeCapacity(cpus=2, gpus=0, memory=24 * GB, where="(this machine)")
    worst = check_memory(smoke, info, node)
    assert 0.6 * GB < worst.peak < 4 * GB  # a 600 MB process, the LM twice while loading, tiny SAEs
    huge = spec_from_dict(smoke_dict(grid={"n_latents": [128, 1 << 22], "partition": [None]}))
    with pytest.raises(SpecError, match=r"^grid: a trial of 1 point\(s\) \(n_latents=4194304 k=8\) needs about "
                                        r"\d+\.\d GB .* but the largest node \(this machine\) has 24\.0 GB"):
        check_memory(huge, info, node)
    with pytest.raises(SpecError, match="but resources.memory_gb has 0.5 GB"):
        check_memory(spec_from_dict(smoke_dict(resources={"memory_gb": 0.5})), info, node)


def _cli(tmp_path: Path, raw: dict, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "sweeps" / "frontier.py"), "--spec", str(spec), *extra],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    return proc, time.perf_counter() - t0


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["storage under a file", "closed tracking port", "point too big", "too many cpus"])
def test_cli_refuses_each_fault_in_seconds_and_writes_nothing(tmp_path, fault):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    raw = smoke_dict(storage=str(tmp_path / "shards"), results_path=str(tmp_path / "results"),
               tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    needle = {"storage under a file": "storage: ", "closed tracking port": "tracking_uri: ",
              "point too big": "grid: a trial of", "too many cpus": "resources.cpus: "}[fault]
    if fault == "storage under a file":
        raw["storage"] = str(blocker / "shards")
    elif fault == "closed tracking port":
        raw["tracking_uri"] = f"http://127.0.0.1:{closed_port()}"
    elif fault == "point too big":
        raw["grid"] = {**raw["grid"], "n_latents": [1 << 24], "partition": [None]}
    else:
        raw["resources"] = {**raw["resources"], "cpus": 512}  # valid in a spec, beyond this machine
    proc, seconds = _cli(tmp_path, raw)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[0].startswith(f"error: {needle}"), proc.stderr[-2000:]  # one line
    # refused before any work: Ray never starts and nothing is written (below); the time bound only has to tell
    # that from a harvest (minutes). Importing and checking takes ~8 s on the idle 2-core box, 20-25 s loaded
    assert seconds < 60
    assert "ray" not in proc.stdout.lower()  # Ray never started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "spec.yaml"]  # nothing written
