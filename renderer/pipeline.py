"""Overlap compute with the host side of a tile: a small bounded pool of writer threads.

While the device (or the compute thread on a CPU) renders the next group of
tiles, earlier groups are converted to uint8, checked for NaN/inf, crc32'd,
compressed and written by a few threads.  Two rules keep this safe:

* **bounded**: at most ``depth`` jobs (groups of tiles) are submitted and not
  yet finished, across every batch of the pipeline; ``submit`` blocks until
  one finishes, so host memory is at most ``depth`` x (one group's output)
  whatever the canvas;
* **markers after data**: a task renders through one ``WriteBatch``, whose
  ``drain`` waits for every write of the batch and re-raises the first error;
  the caller writes the task's marker only after ``drain`` returned, so a
  marker never names a tile whose chunk is not written (docs/guarantees.md).

zstd (numcodecs), crc32 (zlib), file writes and torch ops release the GIL, so
the writer threads run beside the compute thread(s).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")


class WritePipeline:
    """``threads`` writer threads shared by the batches of one renderer, ``depth`` jobs at most."""

    def __init__(self, threads: int, depth: int, name: str = "creps-write") -> None:
        if threads < 1 or depth < 1:
            raise ValueError(f"threads and depth must be >= 1, got {threads}, {depth}")
        self.threads, self.depth = threads, depth
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=name)
        self._slots = threading.BoundedSemaphore(depth)

    def batch(self) -> WriteBatch:
        """A new batch (one task's writes); batches of several compute threads may run at once."""
        return WriteBatch(self)

    def _submit(self, job: Callable[[], T]) -> Future[T]:
        self._slots.acquire()
        try:
            fut = self._pool.submit(job)
        except BaseException:
            self._slots.release()
            raise
        fut.add_done_callback(lambda _: self._slots.release())
        return fut

    def close(self) -> None:
        """Stop the threads once what is queued is done."""
        self._pool.shutdown(wait=True)


class WriteBatch(Generic[T]):
    """The jobs of one task: submitted in order, drained together before its marker."""

    def __init__(self, pipeline: WritePipeline) -> None:
        self._pipeline = pipeline
        self._futures: list[Future[T]] = []

    def submit(self, job: Callable[[], T]) -> None:
        """Queue ``job``; blocks while the pipeline has ``depth`` jobs outstanding.

        Raises at once the error of an earlier job of this batch that failed (no
        point computing more of a failing task); the caller then ``discard``s.
        """
        for fut in self._futures:
            if fut.done():
                error = fut.exception()
                if error is not None:
                    raise error
        self._futures.append(self._pipeline._submit(job))

    def drain(self) -> list[T]:
        """Wait for every job of the batch; their results in submission order.  Re-raises the
        first failure only after all jobs stopped, so nothing of this batch is still writing."""
        futures, self._futures = self._futures, []
        errors: list[BaseException] = []
        results: list[T] = []
        for fut in futures:
            try:
                results.append(fut.result())
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]
        return results

    def discard(self) -> None:
        """Wait for every job of the batch and drop results and errors (the task failed anyway)."""
        try:
            self.drain()
        except Exception:
            pass

    @property
    def outstanding(self) -> int:
        return sum(not f.done() for f in self._futures)
