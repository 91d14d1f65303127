"""Per-core lanes: independent pieces of one render spread over single-threaded threads.

Why lanes and not torch's own threads: the pixel stage is many small ops (a
4096-pixel block is ~50 matmuls of a few MFLOP each), and a multi-threaded
BLAS pays a barrier per op; with any other load on the machine each barrier
can cost a scheduler time slice.  One single-threaded thread per core, each
on its own pieces, has no barriers: this is how a render job's workers run
(renderer.local's LocalPool: 2 lanes x 1 thread rendered two 512x256
ffhq512 blocks in 1.2 s, 1 lane x 2 threads in 43 s with the machine busy),
and here ``Generator.render`` / ``Generator.pixels`` get the same.

Bytes: a piece (a line block, a pixel block) is computed by one thread with
the same shapes whichever lane takes it, so N lanes give exactly the bytes
of one (tests/test_model.py).

Threads: torch's intra-op thread count is per thread once a thread has run
an op (OpenMP and MKL keep it thread-local), and a new thread takes the
process-wide value then.  The lanes are made once per process with that
value briefly at 1 and put back at once, so every lane is single-threaded
for good and no other thread's count changes (``torch.get_num_threads()`` is
the same before and after; a caller's own thread is never touched).  One
pool per process, shared by every caller (a second render queues behind the
first instead of oversubscribing the cores); a lane that asks for lanes runs
its pieces itself.  After ``fork`` the child makes its own.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
S = TypeVar("S")
R = TypeVar("R")

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_size = 0
_local = threading.local()  # .lane: True inside a lane


def _reset_after_fork() -> None:
    global _lock, _pool, _size
    _lock, _pool, _size = threading.Lock(), None, 0


os.register_at_fork(after_in_child=_reset_after_fork)


def resolve(device: torch.device | str, lanes: int | None, *inputs: torch.Tensor) -> int:
    """How many lanes a call on ``device`` uses: ``lanes`` when given (>= 1), else on a CPU the
    calling thread's torch thread count (1 inside a lane or a single-threaded worker); 1 on a GPU,
    and 1 when autograd records the call (any of ``inputs`` requires grad: one graph, in order)."""
    if lanes is not None and lanes < 1:
        raise ValueError(f"lanes must be >= 1, got {lanes}")
    if torch.device(device).type != "cpu" or in_lane():
        return 1
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return 1
    return lanes if lanes is not None else max(1, torch.get_num_threads())


def in_lane() -> bool:
    """Whether this thread is one of the lanes."""
    return bool(getattr(_local, "lane", False))


def _start_lane(barrier: threading.Barrier) -> int:
    _local.lane = True
    n = torch.get_num_threads()  # the first torch call of this thread fixes its count: 1 (see the docstring)
    barrier.wait(timeout=60)  # every lane is a thread of its own, started while the count is 1
    return n


def _lanes(n: int) -> ThreadPoolExecutor:
    """The process's lane pool, with at least ``n`` lanes (made or grown here, under the lock)."""
    global _pool, _size
    with _lock:
        if _pool is not None and _size >= n:
            return _pool
        old, before = _pool, torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            pool = ThreadPoolExecutor(n, thread_name_prefix="creps-lane")
            barrier = threading.Barrier(n)
            counts = [f.result() for f in [pool.submit(_start_lane, barrier) for _ in range(n)]]
        finally:
            torch.set_num_threads(before)
        assert counts == [1] * n, counts
        _pool, _size = pool, n
    if old is not None:
        old.shutdown(wait=False)  # its queued work still runs; new work goes to the larger pool
    return pool


def run(
    items: Sequence[T],
    work: Callable[[S, T], R],
    lanes: int,
    scratch: Callable[[], S] = lambda: None,  # type: ignore[assignment,return-value]
) -> list[R]:
    """``[work(state, item) for item in items]``, the items spread over ``lanes`` lanes.

    Each lane makes its own ``state = scratch()`` (a work buffer) and takes the
    next item as soon as it is free, so a slow lane (another process on its
    core) takes fewer.  ``lanes <= 1`` (or one item, or a call from a lane)
    runs here, in order, in this thread: exactly the serial loop.  The
    caller's grad mode (and inference mode) holds in the lanes.  The first
    error stops the other lanes after their current item and is raised here.
    """
    lanes = min(lanes, len(items))
    if lanes <= 1 or in_lane():  # a lane never waits for the others: they may all be waiting for it
        state = scratch()
        return [work(state, item) for item in items]
    results: list[R | None] = [None] * len(items)
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()
    taken = iter(range(len(items)))
    take_lock = threading.Lock()
    failed = threading.Event()

    def lane() -> None:
        mode = torch.inference_mode() if inference else torch.set_grad_enabled(grad)
        with mode:
            state = scratch()
            while not failed.is_set():
                with take_lock:
                    i = next(taken, None)
                if i is None:
                    return
                try:
                    results[i] = work(state, items[i])
                except BaseException:
                    failed.set()
                    raise

    futures: list[Future[None]] = [_lanes(lanes).submit(lane) for _ in range(lanes)]
    for f in futures:
        f.exception()  # wait for all: nothing of this call runs after it returns
    for f in futures:
        f.result()  # the first error, if any
    return results  # type: ignore[return-value]


def window_lines(
    lines: Callable[[str, int, int], torch.Tensor],
    rows: tuple[int, int],
    cols: tuple[int, int],
    block: int,
    lanes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column line features of a window ([B, K, n, rank, C] each), one globally aligned
    line block of ``block`` positions per lane task: ``lines(which, a, b)`` gives positions
    [a, b) inside one block, and a block's features do not depend on the range asked for (each
    block is computed alone, at its global place), so the result is the whole range's."""
    pieces = [
        (which, max(a, b0), min(b, b0 + block))
        for which, (a, b) in (("row", rows), ("col", cols))
        for b0 in range(a // block * block, b, block)
    ]
    parts = run(pieces, lambda _, p: lines(*p), lanes)
    row = [f for p, f in zip(pieces, parts, strict=True) if p[0] == "row"]
    col = [f for p, f in zip(pieces, parts, strict=True) if p[0] == "col"]
    return torch.cat(row, dim=2), torch.cat(col, dim=2)
