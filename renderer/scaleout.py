"""Who runs the block work after the render: a ``Runner``.

A ``Runner`` runs plain functions (renderer.pyramid.level_rows,
renderer.blocks.export_band): ``ThreadRunner`` on local threads,
renderer.cluster.RayRunner as Ray tasks (the only one that imports Ray).
Results come back through ``result`` in the order the caller asks for them
(``in_order``); ``cancel`` drops what has not run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Runner(Protocol):
    """Where block work runs: ``submit`` a plain function, ``result`` waits for it,
    ``cancel`` drops what has not started and waits for the rest to end."""

    workers: int

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    def result(self, handle: Any) -> Any: ...

    def cancel(self, handles: Iterable[Any]) -> None: ...

    def close(self) -> None: ...


class ThreadRunner:
    """Block work on ``workers`` local threads (default: one per core)."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or os.cpu_count() or 2
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="block")

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self.pool.submit(fn, *args)

    def result(self, handle: Future) -> Any:
        return handle.result()

    def cancel(self, handles: Iterable[Future]) -> None:
        """Drop what has not started and wait for what has (so nothing writes after the caller cleans up)."""
        running = [h for h in handles if not h.cancel()]
        wait(running)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def in_order(runner: Runner, calls: Iterable[tuple[Callable[..., T], tuple]], ahead: int) -> Generator[T, None, None]:
    """Results of ``calls`` in order, with at most ``ahead`` submitted and not yet taken (memory bound).

    On any error (or when the consumer stops early) the calls not yet run are cancelled.
    """
    it = iter(calls)
    queue: list[Any] = []
    try:
        for fn, args in it:
            queue.append(runner.submit(fn, *args))
            if len(queue) >= ahead:
                yield runner.result(queue.pop(0))
        while queue:
            yield runner.result(queue.pop(0))
    finally:
        if queue:
            runner.cancel(queue)
