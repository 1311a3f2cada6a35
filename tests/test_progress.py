"""orchestrator/progress.py: a bar on a terminal, a line per tenth of the work anywhere else."""

from __future__ import annotations

import io
import os
import re

from orchestrator.progress import Progress, interactive


def test_not_a_terminal_gets_a_line_per_tenth():
    out = io.StringIO()
    with Progress(1000, desc="harvest resid_post.2 train", stream=out) as progress:
        for _ in range(250):
            progress.update(4)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [re.search(r"\((\d+)%\)", line).group(1) for line in lines] == [str(10 * i) for i in range(1, 11)]
    assert lines[-1].startswith("harvest resid_post.2 train: 1000/1000 tokens (100%) in ")


def test_a_resumed_run_counts_from_its_done_work_and_an_interrupted_one_says_where_it_stopped():
    out = io.StringIO()
    with Progress(100, desc="h", initial=45, stream=out) as progress:
        progress.update(10)  # 55%: the first tenth past the 40% already done
        progress.update(2)   # 57%: no new tenth, said only at close
    assert [line.split(" (")[0] for line in out.getvalue().splitlines()] == ["h: 55/100 tokens", "h: 57/100 tokens"]


def test_disabled_prints_nothing():
    out = io.StringIO()
    with Progress(10, desc="h", enabled=False, stream=out) as progress:
        progress.update(10)
    assert out.getvalue() == ""


def test_a_terminal_gets_a_live_bar():
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        assert interactive(tty)
        with Progress(10, desc="h", stream=tty) as progress:
            progress.update(10)
    shown = b""
    while True:  # everything written, until EIO: the terminal's other side is closed and drained
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    shown = shown.decode()
    assert "\r" in shown and "10/10" in shown and "tokens (" not in shown  # tqdm's bar, not our lines


def test_interactive_is_false_for_pipes_files_and_closed_streams(tmp_path):
    assert not interactive(io.StringIO())
    with open(tmp_path / "log", "w") as f:
        assert not interactive(f)
    closed = open(tmp_path / "log2", "w")
    closed.close()
    assert not interactive(closed)
