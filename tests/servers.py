"""Real servers for tests: a free loopback port, a server process polled until it answers, and JSON over HTTP."""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

from orchestrator.cluster_demo import free_port, free_ports, stop_process  # noqa: F401 - the one free-port finder, re-exported for tests


def get_json(url: str, data: dict | None = None) -> Any:
    """GET `url` (POST `data` as JSON when given) and decode the JSON answer."""
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


@contextlib.contextmanager
def serving(cmd: list, probe: str, *, timeout: float = 120, **popen) -> Iterator[subprocess.Popen]:
    """Start `cmd`, wait until GET `probe` answers 200, yield the process, terminate it after. Fails with the
    server's output if it exits first or does not answer within `timeout` seconds."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, **popen)
        try:
            deadline = time.time() + timeout
            while True:
                try:
                    with urllib.request.urlopen(probe, timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    raise AssertionError(f"{cmd[0]} did not answer {probe} within {timeout:.0f} s "
                                         f"(exit code {proc.poll()}):\n{log.read()[-4000:]}")
                time.sleep(0.5)
            yield proc
        finally:
            stop_process(proc)
