"""The Ray side of security: a one-machine sweep's Ray listens on loopback only, and `make cluster` has a token.

Every Ray started here gets its own HOME (so the real ~/.ray/auth_token is never touched) and RAY_TMPDIR (so it
never attaches to, or is confused with, another Ray on this machine); leftovers are killed by pid, found by that
RAY_TMPDIR, never by name.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

LISTENERS = """
import json, os, time
import psutil, ray
from ray._private import ray_constants
from orchestrator.sweep import init_ray

init_ray()
restored = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ and ray_constants.ENABLE_RAY_CLUSTER
ray.get(ray.remote(lambda: 1).remote())  # a worker is up (and listening) too
me, seen, deadline = psutil.Process(), {}, time.time() + 20
while time.time() < deadline:  # the agents may open their ports a moment after ray.init returns
    for p in [me, *me.children(recursive=True)]:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    seen[f"{p.name()}@{c.laddr.ip}:{c.laddr.port}"] = c.laddr.ip
        except psutil.Error:
            pass
    names = {k.split("@")[0] for k in seen}
    if {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names:
        break
    time.sleep(0.5)
ray.shutdown()
print(json.dumps({"listeners": seen, "restored": restored}))
"""


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def kill_rays_under(ray_tmpdir: str) -> None:
    """Kill (by pid) every process whose RAY_TMPDIR or command line names this test's temp dir, with its
    descendants (Ray's agents write their title over both, so they are found as the raylet's children): only
    Rays this test started."""
    doomed: dict[int, psutil.Process] = {}
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and (p.environ().get("RAY_TMPDIR") == ray_tmpdir
                                         or any(ray_tmpdir in a for a in p.cmdline())):
                doomed.update({q.pid: q for q in [p, *p.children(recursive=True)]})
        except psutil.Error:
            pass
    for p in doomed.values():
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(doomed.values()), timeout=10)


@pytest.fixture
def isolated_env(tmp_path):
    """A fresh HOME and a short RAY_TMPDIR (Ray's unix socket paths must stay under ~107 characters)."""
    ray_tmpdir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    env = {**os.environ, "HOME": str(tmp_path / "home"), "RAY_TMPDIR": ray_tmpdir,
           "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(var, None)
    (tmp_path / "home").mkdir()
    try:
        yield env, tmp_path / "home"
    finally:
        kill_rays_under(ray_tmpdir)
        shutil.rmtree(ray_tmpdir, ignore_errors=True)


def test_local_ray_of_a_sweep_listens_on_loopback_only(isolated_env):
    env, home = isolated_env
    env.pop("RAY_AUTH_MODE", None)
    done = subprocess.run([sys.executable, "-c", LISTENERS], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    listeners = out["listeners"]
    names = {k.split("@")[0] for k in listeners}
    assert {"gcs_server", "raylet"} <= names, listeners  # the check saw Ray's servers, it is not vacuous
    exposed = {k: ip for k, ip in listeners.items() if not is_loopback(ip)}
    assert not exposed, f"Ray processes listening beyond loopback: {exposed}"
    assert out["restored"], "init_ray left Ray's one-machine switch set for later ray.init calls"
    assert stat.S_IMODE((home / ".ray" / "auth_token").stat().st_mode) == 0o600  # not Ray's default 0644


def run_token_step(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.ray_token"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_token_step_creates_an_owner_only_token_once(isolated_env):
    env, home = isolated_env
    first = run_token_step(env)
    token = home / ".ray" / "auth_token"
    assert first.returncode == 0, first.stderr
    assert str(token) in first.stdout and "created" in first.stdout
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    value = token.read_text().strip()
    assert len(value) >= 32 and value not in first.stdout + first.stderr  # the secret is never printed
    token.chmod(0o644)  # a token Ray itself wrote (default umask) is kept but narrowed
    second = run_token_step(env)
    assert second.returncode == 0, second.stderr
    assert token.read_text().strip() == value and "narrowed" in second.stdout
    assert stat.S_IMODE(token.stat().st_mode) == 0o600


def test_token_step_names_a_missing_custom_token_file(isolated_env):
    env, home = isolated_env
    missing = home / "elsewhere" / "token"
    done = run_token_step({**env, "RAY_AUTH_TOKEN_PATH": str(missing)})
    assert done.returncode == 1 and str(missing) in done.stderr and "unset RAY_AUTH_TOKEN_PATH" in done.stderr
    assert not missing.exists() and not (home / ".ray" / "auth_token").exists()


@pytest.mark.slow
def test_make_cluster_starts_a_token_head_from_a_fresh_home(isolated_env):
    """`make cluster` on a machine with no token: it used to fail ('no authentication token was found')."""
    busy = {c.laddr.port for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN} & {6379, 8265}
    if busy:
        pytest.skip(f"port(s) {sorted(busy)} in use (another head?); make cluster uses the fixed ports 6379 and 8265")
    env, home = isolated_env
    # the venv prerequisite is this interpreter's; -o keeps make from (re)building a venv in the checkout
    done = subprocess.run(["make", "-o", ".venv/.installed", "cluster", f"PY={sys.executable}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    token = home / ".ray" / "auth_token"
    assert f"Ray auth token: {token} (created 0600)" in done.stdout
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    status = subprocess.run([BIN / "ray", "status"], cwd=ROOT, env={**env, "RAY_AUTH_MODE": "token"},
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stdout[-2000:] + status.stderr[-2000:]  # the head accepts that token
