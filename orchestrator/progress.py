"""Progress output that suits where it goes: a live bar on a terminal, a few plain lines in a log.

A sweep's output is often not a terminal: `ray job submit` forwards it into a job log, and a sweep run with
`> file` or under CI writes a file. There a carriage-return bar is one ever-growing line and a periodic dump is
noise, so `interactive()` is the one test of which case this is, and `Progress` prints a tqdm bar on a terminal
and otherwise one line per tenth of the work (at most 11 lines, each with the count, the elapsed time and rate).
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any


def interactive(stream: IO[str] | None = None) -> bool:
    """Whether output goes to a terminal someone watches: `stream` (default sys.stderr, where progress goes) is a
    tty. A closed or replaced stream without a file behind it counts as not interactive."""
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Progress towards `total` units, starting from `initial` (work a resumed run already has).

    On a terminal: a tqdm bar. Elsewhere: a line `<desc>: <done>/<total> <unit> (<pct>%) in <s>s, <rate> <unit>/s`
    each time the done share reaches a further tenth, and at the end if the last tenth was not reached (an
    interrupted run). disabled: prints nothing.
    """

    def __init__(self, total: int, *, desc: str, unit: str = "tokens", initial: int = 0, enabled: bool = True,
                 stream: IO[str] | None = None):
        self.total, self.desc, self.unit, self.done = total, desc, unit, initial
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self._bar: Any = None
        if enabled and interactive(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, file=self.stream)
        self._start, self._start_done = time.perf_counter(), initial
        self._tenth = self._tenths(initial)
        self._printed = initial

    def _tenths(self, done: int) -> int:
        return 10 * done // self.total if self.total > 0 else 10

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and self._tenths(self.done) > self._tenth:
            self._tenth = self._tenths(self.done)
            self._line()

    def _line(self) -> None:
        seconds = time.perf_counter() - self._start
        rate = (self.done - self._start_done) / seconds if seconds > 0 else 0.0
        pct = 100 * self.done // self.total if self.total > 0 else 100
        print(f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct}%) in {seconds:.0f}s, "
              f"{rate:.0f} {self.unit}/s", file=self.stream, flush=True)
        self._printed = self.done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.done != self._printed:
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
