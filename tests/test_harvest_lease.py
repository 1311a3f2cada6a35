"""The harvest lease (orchestrator/lease.py in orchestrator/harvest.py), with real processes: two harvests of one
key started at once harvest it once; a lease left by a killed holder is taken over; a live holder's temp file
survives another harvest while an earlier crash's stale one is removed."""

from __future__ import annotations

import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray

import orchestrator.lease as lease
from orchestrator.harvest import HarvestConfig
from orchestrator.shards import read_manifest, storage_fs, verify_store

REPO = Path(__file__).resolve().parent.parent
TOKENS, T = 600, 32  # the tiny store of tests/test_harvest.py: 5 shards of 4 contexts

# Harvests cfg (argv[1]); with argv[2:4], first touches a ready file and waits for a go file (a start barrier).
HARVESTER = r"""
import sys, time, pathlib
import orchestrator.lease as lease
from orchestrator.harvest import HarvestConfig, harvest
lease.POLL_SECONDS = lease.SETTLE_SECONDS = 0.1
cfg = HarvestConfig.model_validate_json(sys.argv[1])
if len(sys.argv) > 2:
    pathlib.Path(sys.argv[2]).touch()
    while not pathlib.Path(sys.argv[3]).exists():
        time.sleep(0.01)
print("result", harvest(cfg, progress=False), flush=True)
"""

# Holds the lease (2 s, renewed) and starts writing the manifest, then hangs until killed: a crash mid-harvest.
DOOMED = r"""
import sys, time, pathlib
import orchestrator.lease as lease
from orchestrator.shards import storage_fs
lock, store = sys.argv[1:3]
lease.acquire(storage_fs(store)[0], lock, label="doomed", lease_seconds=2.0)
pathlib.Path(store, ".tmp-manifest.json-crashed").write_bytes(b"{partial")
print("held", flush=True)
time.sleep(600)
"""

# Holds the lease while writing shard 4 the way write_shard does (temp file, then rename); finishes on a go file.
WRITER = r"""
import os, sys, time, pathlib
import orchestrator.lease as lease
from orchestrator.shards import storage_fs, write_atomic
lock, store, ref, go = sys.argv[1:5]
fs = storage_fs(store)[0]
with lease.acquire(fs, lock, label="writer"):
    data = pathlib.Path(ref, "shard-00004.parquet").read_bytes()
    tmp = pathlib.Path(store, ".tmp-shard-00004.parquet-live")
    with open(tmp, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        print("held", flush=True)
        while not os.path.exists(go):
            time.sleep(0.05)
        f.write(data[len(data) // 2:])
    os.rename(tmp, pathlib.Path(store, "shard-00004.parquet"))  # fails if another harvest deleted the temp file
    write_atomic(fs, f"{store}/shard-00004.json", pathlib.Path(ref, "shard-00004.json").read_bytes())
print("done", flush=True)
"""

# Takes the lease at argv[1] and says so.
TAKER = r"""
import sys
import orchestrator.lease as lease
from orchestrator.shards import storage_fs
lease.POLL_SECONDS = lease.SETTLE_SECONDS = 0.05
with lease.acquire(storage_fs(sys.argv[1])[0], sys.argv[1], label="taker"):
    print("acquired", flush=True)
"""


# Claims the lease at argv[2], as a claimant that has just found it absent, after a start barrier: on a local
# filesystem ("local": a hard link) or on a pyarrow filesystem that is not one ("object-store": write, settle,
# read back, as on s3://). Prints whether it won.
CLAIMER = r"""
import os, sys, time, pathlib
import pyarrow.fs as pafs
import orchestrator.lease as lease
mode, lock, ready, go = sys.argv[1:5]
fs = pafs.LocalFileSystem() if mode == "local" else pafs.SubTreeFileSystem("/", pafs.LocalFileSystem())
record = lease.LeaseRecord(f"pid {os.getpid()}", f"token{os.getpid()}", time.time() + 60)
pathlib.Path(ready).touch()
while not pathlib.Path(go).exists():
    time.sleep(0.005)
won = lease._claim(fs, lock if mode == "local" else lock.lstrip("/"), record, absent=True)
print("won" if won else "lost", record.token, flush=True)
"""


class Proc:
    """A Python child in the repo root whose stdout lines are collected as they come."""

    def __init__(self, script: str, *args: str):
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if ray.is_initialized():  # a child that harvests drives this module's Ray cluster
            env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        self.p = subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.append(line)
            self._q.put(line)
        self._q.put(None)

    def wait_for(self, text: str, timeout: float = 60) -> bool:
        """True once a line contains text; False if the child ended first."""
        end = time.monotonic() + timeout
        while (line := self._q.get(timeout=max(end - time.monotonic(), 0.01))) is not None:
            if text in line:
                return True
        return False

    def finish(self, timeout: float = 90) -> str:
        self.p.wait(timeout)
        time.sleep(0.1)  # let the pump take the last lines
        return "".join(self.lines)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def config(storage: Path) -> HarvestConfig:
    return HarvestConfig(site="resid_post.6", tokens=TOKENS, context_length=T, shard_rows=4 * (T - 1),
                         batch_size=4, storage=str(storage), num_cpus_per_actor=1, torch_threads=2)


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.name.startswith(".tmp-") or p.name.endswith(".lock"))


@pytest.fixture(scope="module")
def concurrent(tmp_path_factory):
    """Two processes harvest the same key, released at once (children drive the module's Ray cluster)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    tmp = tmp_path_factory.mktemp("concurrent")
    cfg = config(tmp / "shards")
    procs = [Proc(HARVESTER, cfg.model_dump_json(), str(tmp / f"ready{i}"), str(tmp / "go")) for i in (0, 1)]
    try:
        while not all((tmp / f"ready{i}").exists() for i in (0, 1)):
            assert all(p.p.poll() is None for p in procs), "".join(procs[0].lines + procs[1].lines)
            time.sleep(0.05)
        (tmp / "go").touch()
        outs = [p.finish() for p in procs]
    finally:
        for p in procs:
            p.kill()
    yield cfg, procs, outs
    ray.shutdown()


@pytest.mark.slow
def test_two_harvests_at_once_harvest_the_store_once(concurrent):
    cfg, procs, outs = concurrent
    assert [p.p.returncode for p in procs] == [0, 0], outs
    store = str(Path(cfg.storage, cfg.key()))
    assert [o.splitlines()[-1] for o in outs] == [f"result {store}"] * 2, outs
    waited = [i for i, o in enumerate(outs) if "waiting for" in o]
    assert len(waited) == 1, outs  # one harvested, the other waited for it ...
    w, h = waited[0], 1 - waited[0]
    assert f"waiting for {socket.gethostname()} pid {procs[h].p.pid}, which holds {store}.lock" in outs[w]
    assert "reusing complete store" in outs[w] and "harvested meanwhile by another process" in outs[w]
    assert "reusing" not in outs[h]  # ... and harvested nothing itself
    m = read_manifest(store)
    assert m.tokens == TOKENS and len(m.shards) == 5
    verify_store(store)
    assert leftovers(Path(cfg.storage)) == []  # no temp file, and the lock released


def test_lease_of_a_killed_holder_is_taken_over(concurrent, tmp_path):
    cfg, _, _ = concurrent
    ref = Path(cfg.storage, cfg.key())
    work = tmp_path / "shards" / cfg.key()
    shutil.copytree(ref, work)
    (work / "manifest.json").unlink()  # the dead holder had harvested every shard but not written the manifest
    lock = f"{work}.lock"
    doomed = Proc(DOOMED, lock, str(work))
    try:
        assert doomed.wait_for("held"), doomed.lines
    finally:
        doomed.kill()  # SIGKILL: no release, the lock file stays
    expired_at = json.loads(Path(lock).read_text())["expires"]
    # a temp file written after the dead lease lapsed: a stalled holder may still be writing it, so it is kept
    zombie = work / ".tmp-shard-00002.parquet-stalled"
    zombie.write_bytes(b"in progress")
    os.utime(zombie, (expired_at + 0.5, expired_at + 0.5))
    harvester = Proc(HARVESTER, config(tmp_path / "shards").model_dump_json())
    try:
        out = harvester.finish(timeout=60)  # a lease never taken over would block it: a timeout, not a hang
    finally:
        harvester.kill()
    assert harvester.p.returncode == 0 and out.splitlines()[-1] == f"result {work}", out
    # same host, process gone: taken over at once ("no longer running"), else once the lease lapsed
    assert f"took over {lock} from {socket.gethostname()} pid {doomed.p.pid}, " in out
    assert read_manifest(str(work)).shards == read_manifest(str(ref)).shards
    verify_store(str(work))
    assert not Path(lock).exists()
    assert leftovers(tmp_path) == [zombie.name]  # the crashed holder's temp manifest is gone, the newer one kept


def test_live_holders_temp_file_survives_and_a_stale_one_goes(concurrent, tmp_path):
    cfg, _, _ = concurrent
    ref = Path(cfg.storage, cfg.key())
    work = tmp_path / "shards" / cfg.key()
    shutil.copytree(ref, work)
    for name in ("manifest.json", "shard-00004.parquet", "shard-00004.json"):
        (work / name).unlink()
    stale = work / ".tmp-shard-00001.parquet-crashed"  # from a harvest that crashed an hour ago
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    lock, go = f"{work}.lock", tmp_path / "go"
    writer = Proc(WRITER, lock, str(work), str(ref), str(go))
    harvester = None
    try:
        assert writer.wait_for("held"), writer.lines
        harvester = Proc(HARVESTER, config(tmp_path / "shards").model_dump_json())
        waiting = harvester.wait_for(f"waiting for {socket.gethostname()} pid {writer.p.pid}")
        go.touch()
        writer_out, harvester_out = writer.finish(), harvester.finish()
    finally:
        for p in (writer, harvester):
            if p is not None:
                p.kill()
    assert waiting, harvester.lines  # the lease held the second harvest off while the writer wrote
    assert writer.p.returncode == 0 and "done" in writer_out, writer_out  # its temp file lived to its rename
    assert harvester.p.returncode == 0 and harvester_out.splitlines()[-1] == f"result {work}", harvester_out
    assert read_manifest(str(work)).shards == read_manifest(str(ref)).shards
    verify_store(str(work))
    assert leftovers(tmp_path) == []  # the stale temp file removed, the lock released


def test_a_held_lease_is_renewed_past_its_length(tmp_path):
    lock = str(tmp_path / "key.lock")
    held = lease.acquire(storage_fs(lock)[0], lock, label="holder", lease_seconds=0.6)
    taker = None
    try:
        time.sleep(1.5)  # 2.5 lease lengths: only renewal keeps it live
        record = json.loads(Path(lock).read_text())
        assert record["token"] == held.record.token and record["expires"] > time.time()
        taker = Proc(TAKER, lock)
        assert taker.wait_for(f"waiting for {socket.gethostname()} pid {os.getpid()}"), taker.lines
        time.sleep(1.0)
        assert taker.p.poll() is None and held.lost is None  # still waiting, not taken over
    finally:
        held.release()
    try:
        assert taker.wait_for("acquired", timeout=30), taker.lines  # and it gets the lease once released
        assert taker.finish() and taker.p.returncode == 0
    finally:
        taker.kill()
    assert not Path(lock).exists()


@pytest.mark.parametrize("mode", ["local", "object-store"])
def test_racing_claims_have_one_winner(mode, tmp_path):
    n = 3
    lock = tmp_path / "key.lock"
    go = str(tmp_path / "go")
    claimers = [Proc(CLAIMER, mode, str(lock), str(tmp_path / f"ready{i}"), go) for i in range(n)]
    try:
        while not all((tmp_path / f"ready{i}").exists() for i in range(n)):
            assert all(c.p.poll() is None for c in claimers), [c.lines for c in claimers]
            time.sleep(0.05)
        (tmp_path / "go").touch()
        outs = [c.finish(timeout=60).split() for c in claimers]
    finally:
        for c in claimers:
            c.kill()
    assert sorted(o[0] for o in outs) == ["lost"] * (n - 1) + ["won"], outs
    assert json.loads(lock.read_text())["token"] == next(o[1] for o in outs if o[0] == "won")


def test_a_dead_holder_on_this_host_is_not_waited_for(tmp_path):
    """A SIGKILLed driver's lease is taken over at once on its own host (its pid is gone), not after the lease;
    a live holder (this process) still counts."""
    lock = str(tmp_path / "sweep.lock")
    fs = storage_fs(lock)[0]
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = lease.LeaseRecord(f"{socket.gethostname()} pid {int(gone.stdout)}", "t0", time.time() + 600)
    Path(lock).write_text(json.dumps({"holder": dead.holder, "token": dead.token, "expires": dead.expires}))
    assert lease.live_holder(fs, lock) is None
    t0 = time.perf_counter()
    with lease.acquire(fs, lock, label="resume", lease_seconds=600) as held:
        assert time.perf_counter() - t0 < 5 and held.taken_over == dead
        assert lease.live_holder(fs, lock) == held.record  # this process: alive
    assert lease.live_holder(fs, lock) is None
