"""A lease: a lock file with an expiry, on any pyarrow filesystem (local path, s3://, gs://, ...).

Two sweeps of one spec harvest the same store key; the lease makes the second wait for the first instead of
writing the store beside it, and a crashed holder blocks others for at most one lease length.

The lock file holds JSON {holder, token, expires}: who holds it (host and pid, for the waiting line), a random
token (to tell claims apart) and the unix time it lapses. The holder rewrites it every lease/3 seconds from a
background thread; a waiter polls it and takes it over once `expires` has passed.

Claiming. pyarrow has no atomic create-if-absent on object stores, so a claim writes the lock file (temp +
rename, or one PUT: never seen half-written), waits SETTLE_SECONDS, reads it back and holds the lease only if its
own token is still there; of claimants racing, the last writer wins and the others wait for it. The race this
leaves: a claimant that read the old state and writes more than SETTLE_SECONDS later (a long stall between its
read and its write) overwrites a claim already confirmed, and both believe they hold the lease. Where the lock
file is absent on a local filesystem the claim is exact instead: a hard link, which fails if the name exists.
Expiry compares wall clocks of different machines, so they must agree to well within a lease (NTP does).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass

import pyarrow.fs as pafs

from orchestrator.shards import read_bytes, write_atomic

log = logging.getLogger(__name__)

LEASE_SECONDS = 60.0  # a crashed holder blocks others this long at most; tests shorten it
POLL_SECONDS = 5.0  # how often a waiter looks at the lock file
SETTLE_SECONDS = 1.0  # write-to-read-back delay of a claim: the race window described above


@dataclass(frozen=True)
class LeaseRecord:
    holder: str  # "host pid N"
    token: str
    expires: float  # unix time


def _say(msg: str) -> None:
    print(msg, flush=True)  # a sweep's user must see why it is waiting; logging is not configured there


def _read(fs: pafs.FileSystem, path: str) -> LeaseRecord | None:
    """The lock file's record; None if absent. An unreadable one (damaged by hand) reads as long expired."""
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        raw = json.loads(read_bytes(fs, path))
        return LeaseRecord(holder=str(raw["holder"]), token=str(raw["token"]), expires=float(raw["expires"]))
    except FileNotFoundError:
        return None  # released between the two calls
    except (ValueError, KeyError, TypeError) as err:
        log.warning("lock file %s is unreadable (%s); treating it as expired", path, err)
        return LeaseRecord(holder=f"unreadable lock file {path}", token="", expires=0.0)


def _encode(record: LeaseRecord) -> bytes:
    return json.dumps(asdict(record)).encode()


def _link_exclusive(path: str, data: bytes) -> bool | None:
    """Create a local `path` holding `data` only if it does not exist (atomic: a hard link of a complete temp
    file). None where the filesystem has no hard links."""
    base, _, name = path.rpartition("/")
    tmp = f"{base}/.tmp-{name}-{secrets.token_hex(6)}"
    with open(tmp, "wb") as f:
        f.write(data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        return None
    finally:
        os.unlink(tmp)


def _claim(fs: pafs.FileSystem, path: str, record: LeaseRecord, absent: bool) -> bool:
    if absent and isinstance(fs, pafs.LocalFileSystem):
        won = _link_exclusive(path, _encode(record))
        if won is not None:
            return won
    write_atomic(fs, path, _encode(record))
    time.sleep(SETTLE_SECONDS)
    back = _read(fs, path)
    return back is not None and back.token == record.token


class Lease:
    """A held lease, renewed in the background until release() (or the end of a `with` block).

    taken_over is the expired record this lease replaced (its holder crashed or stalled); lost is set if someone
    else took the lease over while this holder still ran (it stalled beyond the lease).
    """

    def __init__(self, fs: pafs.FileSystem, path: str, record: LeaseRecord, lease_seconds: float,
                 taken_over: LeaseRecord | None):
        self.fs, self.path, self.record, self.lease_seconds = fs, path, record, lease_seconds
        self.taken_over = taken_over
        self.lost: LeaseRecord | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease {path}", daemon=True)
        self._thread.start()

    def stale_before(self) -> float:
        """Unix time before which a file's last write cannot belong to a live writer: more than a lease ago, or
        while the lease this one took over still ran (its holder is gone). Newer files may be another's writes
        in progress (a holder that stalled past its lease) and are left alone."""
        cutoff = time.time() - self.lease_seconds
        return max(cutoff, self.taken_over.expires) if self.taken_over is not None else cutoff

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                current = _read(self.fs, self.path)
                if current is None or current.token != self.record.token:
                    self.lost = current or LeaseRecord("nobody (the lock file was deleted)", "", 0.0)
                    log.warning("lease %s was taken over by %s while %s held it (it stalled past the lease); "
                                "both write the same content-addressed files", self.path, self.lost.holder,
                                self.record.holder)
                    return
                self.record = LeaseRecord(self.record.holder, self.record.token, time.time() + self.lease_seconds)
                write_atomic(self.fs, self.path, _encode(self.record))
            except OSError as err:  # a storage hiccup: try again at the next beat, before the lease runs out
                log.warning("could not renew lease %s: %s", self.path, err)

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        current = _read(self.fs, self.path)
        if current is not None and current.token == self.record.token:
            self.fs.delete_file(self.path)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder_is_dead(record: LeaseRecord) -> bool:
    """True when the holder ran on this host and its process is gone (a SIGKILLed driver): its lease need not be
    waited out. A holder on another host can only be judged by its expiry."""
    host, _, pid = record.holder.partition(" pid ")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def live_holder(fs: pafs.FileSystem, path: str) -> LeaseRecord | None:
    """The record of whoever holds the lease at `path` now; None if nobody does (absent, lapsed or dead)."""
    current = _read(fs, path)
    if current is None or current.expires <= time.time() or _holder_is_dead(current):
        return None
    return current


def acquire(fs: pafs.FileSystem, path: str, *, label: str, lease_seconds: float | None = None) -> Lease:
    """Hold the lease at `path`, waiting (a line says who holds it) while another holder's lease is live and
    taking it over once it lapses. `label` names the work in those lines, e.g. "harvest <key>"."""
    lease_seconds = lease_seconds or LEASE_SECONDS
    holder = f"{socket.gethostname()} pid {os.getpid()}"
    fs.create_dir(path.rpartition("/")[0], recursive=True)
    announced = ""
    while True:
        current = _read(fs, path)
        if current is not None and current.expires > time.time() and not _holder_is_dead(current):
            if current.token != announced:
                announced = current.token
                until = time.strftime("%H:%M:%S", time.localtime(current.expires))
                _say(f"{label}: waiting for {current.holder}, which holds {path} (lease renewed until {until}; "
                     f"taken over if its holder dies)")
            time.sleep(POLL_SECONDS)
            continue
        record = LeaseRecord(holder, secrets.token_hex(8), time.time() + lease_seconds)
        if _claim(fs, path, record, absent=current is None):
            if current is not None:
                why = "which is no longer running" if current.expires > time.time() else \
                    f"whose lease lapsed {time.time() - current.expires:.0f}s ago"
                _say(f"{label}: took over {path} from {current.holder}, {why}")
            return Lease(fs, path, record, lease_seconds, taken_over=current)
