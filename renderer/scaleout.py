"""Block work after the render: who runs it (a ``Runner``) and the remaining pyramid levels.

A ``Runner`` runs plain functions of renderer.blocks: ``ThreadRunner`` on
local threads, renderer.cluster.RayRunner as Ray tasks (the only one that
imports Ray). Results come back through ``result`` in the order the caller
asks for them; ``cancel`` drops what has not run.

``build_levels`` builds the pyramid levels that are missing -- L+1..n-1 from
level L, where levels 1..L came with the render (renderer.pyramid.render_levels)
-- one level at a time, each in bands of whole chunk rows, and records each
level's finished prefix in the pyramid progress record
(renderer.pyramid.start_level_pass: the same current / complete / stale /
partial rules as ``build_pyramid``). Locally the level is a dask graph over
the zarr level above (renderer.arrays.downsampled) stored by dask's threaded
scheduler; on a runner each band is one task (renderer.blocks.level_rows).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Protocol, TypeVar

from creps.errors import UserError, first_line

from .blocks import BAND_PIXELS, Source, level_bands, level_rows
from .errors import RendererError
from .pyramid import LevelPass, pyramid_plan, start_level_pass
from .store import ImageStore

T = TypeVar("T")


class Runner(Protocol):
    """Where block work runs: ``submit`` a function of renderer.blocks, ``result`` waits for it,
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


# ---------------------------------------------------------------- the remaining levels
def build_levels(
    store: ImageStore,
    runner: Runner | None = None,
    storage_options: dict | None = None,
    workers: int | None = None,
    force: bool = False,
    band_pixels: int = BAND_PIXELS,
) -> int:
    """Build the pyramid levels that are missing (see the module docstring); return the level count.

    Nothing is done when the pyramid is complete (renderer.pyramid.pyramid_complete)
    unless ``force``. Without ``runner`` a dask graph per level runs on
    ``workers`` threads (default: one per core); with one, a task per band
    of about ``band_pixels`` output pixels (whole chunk rows).
    """
    lp = start_level_pass(store, force=force)
    if lp is None:
        return len(pyramid_plan(store))
    return run_level_pass(lp, runner, storage_options, workers, band_pixels)


def run_level_pass(
    lp: LevelPass,
    runner: Runner | None = None,
    storage_options: dict | None = None,
    workers: int | None = None,
    band_pixels: int = BAND_PIXELS,
) -> int:
    """Build levels ``lp.first``.. of a started pass (``build_levels``; the exports run it beside
    their bands of the levels already there); return the level count."""
    store = lp.store
    source = Source(store.url, storage_options)
    for k in range(lp.first, len(lp.shapes)):
        h, w = lp.shapes[k]
        bands = level_bands(h, w, lp.chunk, start=lp.done[k], pixels=band_pixels)
        try:
            if runner is None:
                _dask_level(store, lp, k, bands, workers or os.cpu_count() or 2)
            else:
                calls = [(level_rows, (source, k, r0, r1)) for r0, r1 in bands]
                for (_, r1), _rows in zip(bands, in_order(runner, calls, ahead=len(calls)), strict=True):
                    lp.record(k, r1)
        except UserError:
            raise
        except Exception as e:
            raise RendererError(f"cannot build pyramid level {k} of {store.url}: {first_line(e)}") from e
    return lp.finish()


def _dask_level(store: ImageStore, lp: LevelPass, k: int, bands: list[tuple[int, int]], workers: int) -> None:
    import dask.array as da

    from .arrays import downsampled

    graph = downsampled(store, k - 1)
    arr: Any = store.level(k)
    for r0, r1 in bands:
        region = (slice(None), slice(r0, r1), slice(None))
        da.store(graph[region], arr, regions=region, lock=False, scheduler="threads", num_workers=workers)
        lp.record(k, r1)
