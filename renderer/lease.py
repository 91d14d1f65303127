"""Exclusive ownership of a store by one writer at a time: a lease made of numbered records.

A writer (a render job, an assemble) owns a store while it holds the newest
lease record ``<gen>.json`` in the store's lease folder.  Taking a store is
*creating* record ``gen + 1`` with an exclusive create (``fsio.create_exclusive``:
hard link locally, conditional PUT on object stores), so of two writers that
start together exactly one wins, on every filesystem we support; the other
gets one line and exit code 2.  Only the newest record counts, and only its
holder writes it again (heartbeats, release), so no record is ever rewritten
by two processes.

A record can be taken over when it is released, or when its holder is gone:
on the same host its process no longer exists (pid + process start time), on
any host its heartbeat is older than ``stale_after`` seconds.  That is what
lets a re-run resume right after a kill -9 or a lost machine.  Two runs of
the *same* job do not cooperate: the second one refuses while the first is
alive (it would render the same bytes, but it would also make the first
one's progress report wrong).

The holder heartbeats from a daemon thread; if a newer record appears (a
takeover after this process looked dead, e.g. a long pause), ``check()``
raises ``LeaseLost`` and the writer stops before writing more.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Any

from . import fsio
from .errors import RendererError

HEARTBEAT_S = 10.0
STALE_AFTER_S = 90.0
PID_START_SLACK_S = 1.0  # start times are read at 1/100 s; boot time is whole seconds


class StoreBusyError(RendererError):
    """Another writer holds the store (bad input for this run: nothing was done)."""

    exit_code = 2


class LeaseLost(RendererError):
    """Another writer took the store over while this one was running."""


@dataclass(frozen=True)
class LeaseRecord:
    gen: int
    owner: str  # random id of the holding process's lease
    purpose: str  # "render <identity hash>", "assemble", ...
    host: str
    pid: int
    pid_started: float  # process start time: a reused pid is not the holder
    started: float
    heartbeat: float
    released: bool = False

    def describe(self) -> str:
        age = time.time() - self.heartbeat
        return f"{self.purpose} (pid {self.pid} on {self.host}, last heartbeat {age:.0f} s ago)"


def process_start(pid: int) -> float:
    """When process ``pid`` started, in seconds since the epoch; 0.0 when it cannot be told.

    A pid alone does not name a process: after a crash the number may be
    given to another one.  (pid, start time) does.  On Linux it is read from
    ``/proc/<pid>/stat`` (field 22, clock ticks since boot) plus the boot time
    of ``/proc/stat``, the computation psutil makes, so both agree; elsewhere
    psutil when it is installed.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        # the command name (field 2) may hold spaces and parentheses: count from the last ")"
        ticks = int(stat[stat.rindex(b")") + 2 :].split()[19])
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # no psutil, or no such process
        return 0.0


def holder_alive(rec: LeaseRecord, stale_after: float = STALE_AFTER_S) -> bool:
    """Whether the record's holder may still be writing."""
    if rec.released:
        return False
    if rec.host == socket.gethostname():
        try:
            os.kill(rec.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        if rec.pid_started:
            now = process_start(rec.pid)
            if now and abs(now - rec.pid_started) > PID_START_SLACK_S:
                return False  # the pid was reused by another process
        return True
    return time.time() - rec.heartbeat < stale_after


class Lease:
    """The lease folder of one store; ``acquire`` makes this process its writer."""

    def __init__(self, fs: Any, folder: str, url: str, stale_after: float = STALE_AFTER_S) -> None:
        self.fs, self.folder, self.url = fs, folder, url
        self.stale_after = stale_after
        self.record: LeaseRecord | None = None
        self._lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _path(self, gen: int) -> str:
        return f"{self.folder}/{gen:08d}.json"

    def newest(self) -> LeaseRecord | None:
        gens = [int(n) for n in fsio.list_names(self.fs, self.folder) if n.isdigit()]
        for gen in sorted(gens, reverse=True):
            data = fsio.read_json(self.fs, self._path(gen))
            if isinstance(data, dict):
                try:
                    return LeaseRecord(**data)
                except TypeError:
                    pass
            # unreadable newest record (a crash between create and write cannot happen, but a
            # hand-edited file can): it still blocks its generation number
            return LeaseRecord(gen, "", "unknown", "", 0, 0.0, 0.0, 0.0, released=True)
        return None

    def acquire(self, purpose: str) -> LeaseRecord:
        """Become the writer, or raise StoreBusyError with one line saying who holds the store."""
        cur = self.newest()
        if cur is not None and holder_alive(cur, self.stale_after):
            raise StoreBusyError(
                f"{self.url} is being written by another process: {cur.describe()}; "
                "wait for it to finish (or stop it) and re-run"
            )
        now = time.time()
        rec = LeaseRecord(
            gen=(cur.gen if cur else 0) + 1,
            owner=uuid.uuid4().hex,
            purpose=purpose,
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_started=process_start(os.getpid()),
            started=now,
            heartbeat=now,
        )
        if not fsio.create_exclusive(self.fs, self._path(rec.gen), json.dumps(asdict(rec)).encode()):
            other = self.newest()
            who = other.describe() if other else "another process"
            raise StoreBusyError(f"{self.url} was just taken by another process: {who}; re-run when it is done")
        self.record = rec
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return rec

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._refresh()
            except Exception:  # an outage must not stop the job; staleness is judged by others
                pass

    def _refresh(self) -> None:
        rec = self.record
        if rec is None:
            return
        newest = self.newest()
        if newest is not None and newest.gen > rec.gen:
            self._lost = True
            return
        self.record = replace(rec, heartbeat=time.time())
        fsio.write_json(self.fs, self._path(rec.gen), asdict(self.record))

    def check(self) -> None:
        """Raise LeaseLost when another writer has taken the store over."""
        if self._lost:
            raise LeaseLost(f"another process took over {self.url} while this one was writing it; this run stops")

    def release(self) -> None:
        """Give the store up (only if still ours); safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        rec, self.record = self.record, None
        if rec is None or self._lost:
            return
        try:
            newest = self.newest()
            if newest is None or newest.gen == rec.gen:
                fsio.write_json(self.fs, self._path(rec.gen), asdict(replace(rec, released=True)))
        except Exception:  # a holder that cannot write its release is seen as gone once stale
            pass

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
