"""Scheduling tile renders for a person looking at the image.

The endless viewer answers each tile request on its own HTTP thread, but the
pixels are computed by a fixed set of render workers (threads over a
resident generator, or Ray actors). Between the two sits ``TileScheduler``:

* **Newest first.** Waiting tiles are started last-requested first (a tile
  asked for again moves to the front): what a person looks at now was asked
  for last, and tiles queued before a zoom or pan are for a view that is gone.
* **Abandoned requests are not started.** Each request carries an ``alive()``
  check of its client socket (``client_gone``). A worker drops a job whose
  requests have all gone instead of starting it, and a waiting request whose
  client closes leaves the queue at once. (The page aborts tile fetches that
  scrolled out of view, which closes their connections; see viewer.js.)
* **Identical requests render once.** A request for a tile that is queued or
  rendering joins that job and gets the same bytes.
* **Bounded.** At most ``queue_max`` jobs wait, and one client may have at
  most ``per_client`` requests queued or rendering; beyond that a request
  gets ``ViewerBusy`` (HTTP 503 + Retry-After; OpenSeadragon retries), so
  memory and work stay bounded whatever arrives, and one page cannot fill
  the queue for everyone.
* **The page never waits behind tiles**: the page, DZI and metadata are
  answered on their own HTTP threads and never enter this queue.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .tiles import ViewerBusy

TileKey = tuple[int, int, int]  # (level, col, row)
JobKey = Hashable  # a TileKey, or another request for the same workers (an IIIF ImageRequest)
Work = Callable[[JobKey], Any]


def client_gone(sock: socket.socket) -> bool:
    """True when the peer of a connected socket has closed it (or reset it).

    A socket that is readable but has nothing to read is at end of file: the
    client closed its side. HTTP clients do not half-close while waiting for a
    response (browsers close the connection to abort a request), so that
    means the response would go nowhere. Non-blocking: a poll and a peek, no
    read. ``poll``, not ``select``: a busy process has descriptors beyond
    select's limit of 1024.
    """
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLPRI)
        events = poller.poll(0)
        if not events:
            return False
        if events[0][1] & (select.POLLERR | select.POLLNVAL):
            return True
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False  # readable a moment ago, nothing now: still there
    except (OSError, ValueError):  # reset, or already closed on our side
        return True


@dataclass(eq=False)
class Waiter:
    """One request waiting for a tile: which client, and how to tell it is still there."""

    client: str
    alive: Callable[[], bool]


@dataclass(eq=False)
class Job:
    """One tile to render and the requests waiting for it."""

    key: JobKey
    seq: int
    submitted: float
    waiters: list[Waiter] = field(default_factory=list)
    state: str = "queued"  # queued | running | done | dropped
    result: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class TileScheduler:
    """Bounded, newest-first, de-duplicating queue in front of ``len(workers)`` render workers.

    ``workers`` are callables ``key -> result`` (a key: a tile's ``(level,
    col, row)`` or an IIIF ``ImageRequest``), one thread each (a thread per
    Ray actor, or several threads over one in-process generator).
    """

    def __init__(self, workers: Sequence[Work], queue_max: int = 64, per_client: int = 8, poll_s: float = 0.05) -> None:
        if not workers:
            raise ValueError("a scheduler needs at least one worker")
        self.queue_max, self.per_client, self.poll_s = queue_max, per_client, poll_s
        self._queued: dict[JobKey, Job] = {}
        self._running: dict[JobKey, Job] = {}
        self._cond = threading.Condition()
        self._seq = 0
        self._held = 0
        self._closing = False
        # counters (read by the page through /api/info)
        self.rendered = 0  # jobs whose pixels were computed
        self.abandoned = 0  # jobs dropped before they started: every request for them had gone
        self.joined = 0  # requests that joined a job already queued or rendering
        self.failed = 0
        self.last_seconds: float | None = None  # request -> rendered, of the last job done
        self._threads = [
            threading.Thread(target=self._loop, args=(w,), name=f"tile-render-{i}", daemon=True)
            for i, w in enumerate(workers)
        ]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------ requests
    def submit(self, key: JobKey, client: str, alive: Callable[[], bool]) -> tuple[Job, Waiter]:
        """Queue ``key`` for ``client`` (or join its job); ViewerBusy when a bound is reached."""
        waiter = Waiter(client, alive)
        with self._cond:
            if self._closing:
                raise ViewerBusy("the viewer is shutting down")
            mine = sum(w.client == client for j in (*self._queued.values(), *self._running.values()) for w in j.waiters)
            if mine >= self.per_client:
                raise ViewerBusy(f"{mine} tiles of this client are queued or rendering (at most {self.per_client})")
            self._seq += 1
            job = self._queued.get(key) or self._running.get(key)
            if job is not None:
                self.joined += 1
                job.seq = self._seq  # asked for again: wanted now
            else:
                if len(self._queued) >= self.queue_max:
                    raise ViewerBusy(f"{len(self._running)} tiles rendering and {len(self._queued)} waiting")
                job = Job(key, self._seq, time.monotonic())
                self._queued[key] = job
                self._cond.notify()
            job.waiters.append(waiter)
            return job, waiter

    def wait(self, job: Job, waiter: Waiter) -> Any:
        """The job's result for this request; None if the request's client went away first.

        Re-raises the worker's exception if the render failed.
        """
        while not job.done.wait(self.poll_s):
            if not waiter.alive():
                self._leave(job, waiter)
                return None
        if job.error is not None:
            raise job.error
        return job.result if job.state == "done" else None

    def _leave(self, job: Job, waiter: Waiter) -> None:
        with self._cond:
            if waiter in job.waiters:
                job.waiters.remove(waiter)
            if job.state == "queued" and not job.waiters:
                self._drop(job)

    def _drop(self, job: Job) -> None:
        """(Lock held.) Remove a job nobody waits for any more, before it started."""
        self._queued.pop(job.key, None)
        job.state = "dropped"
        self.abandoned += 1
        job.done.set()

    # ------------------------------------------------------------ workers
    def _take(self) -> Job | None:
        """(Lock held.) The newest queued job with a live request; jobs with none are dropped."""
        while self._queued:
            job = max(self._queued.values(), key=lambda j: j.seq)
            job.waiters = [w for w in job.waiters if w.alive()]
            if job.waiters:
                del self._queued[job.key]
                return job
            self._drop(job)
        return None

    def _loop(self, work: Work) -> None:
        while True:
            with self._cond:
                job = None
                while not self._closing and (self._held or (job := self._take()) is None):
                    self._cond.wait()
                if job is None:  # closing
                    return
                job.state = "running"
                self._running[job.key] = job
            try:
                job.result = work(job.key)
            except BaseException as e:  # handed to every waiting request; the worker goes on
                job.error = e
            with self._cond:
                del self._running[job.key]
                job.state = "done"
                if job.error is None:
                    self.rendered += 1
                    self.last_seconds = time.monotonic() - job.submitted
                else:
                    self.failed += 1
                job.done.set()

    # ------------------------------------------------------------ control
    @contextmanager
    def hold(self) -> Iterator[None]:
        """Start no new job while inside (running ones finish): a pause for tests and shutdown."""
        with self._cond:
            self._held += 1
        try:
            yield
        finally:
            with self._cond:
                self._held -= 1
                self._cond.notify_all()

    def counts(self) -> dict[str, int]:
        with self._cond:
            return {"queued": len(self._queued), "rendering": len(self._running)}

    def close(self, timeout: float = 30.0) -> None:
        """Stop the workers after the tiles they are rendering; waiting requests get ViewerBusy."""
        with self._cond:
            self._closing = True
            for job in list(self._queued.values()):
                job.error = ViewerBusy("the viewer is shutting down")
                job.state = "dropped"
                job.done.set()
            self._queued.clear()
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)
