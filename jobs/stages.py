"""The two stages of a run: line features, then tiles, handed to the pool in one ``pool.run``.

``LineStage`` knows which line positions are stored and holds a tile task
back until the lines it reads are; ``tile_stage`` cuts the tiles to render
into tasks of whole blocks, counts what comes back into the run's ``Tally``
and checks the writer lease after every result.  Only task and result
records cross to the workers (renderer.tasks): pixels go straight into the
store.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from renderer.lease import Lease
from renderer.store import ImageStore
from renderer.tasks import LineResult, LineTask, OnResult, Pool, Result, Task, TileResult, TileTask

from .job import Prepared
from .plan import TilePlan, auto_batch, block_runs, line_chunk, line_ranges
from .summary import RunSummary, Tally


class LineStage:
    """The line tasks of a run, and which line positions are stored so far (in whole line chunks).

    The line stage runs in the same ``pool.run`` as the tile stage
    (``run``), and the pool hands out a tile task only when ``ready`` finds
    every row and column line it reads stored: a range counts when its marker
    was in the store as the run began (a marker follows its data) or when its
    LineResult came back.  The order (``_schedule``): the line chunks of the
    first tile task, that task, the other line tasks (the rest of the first
    row range, the column ranges, the other row ranges), the other tile tasks.
    Line tasks otherwise keep their priority: tiles do not delay the line
    stage, whose end lets each worker read the whole line arrays once (until
    then a tile reads its own lines from the store); tile tasks take the lanes
    the last line tasks leave free.  After the last range the lines are
    marked complete.
    """

    def __init__(self, store: ImageStore, job: Prepared, workers: int, log: Callable[[str], None], tally: Tally):
        self.t0 = time.perf_counter()
        self.store, self.job, self.log, self.tally = store, job, log, tally
        spec = job.spec
        self.chunk = chunk = line_chunk(spec.tile)
        self.length = {"row": spec.height, "col": spec.width}
        self.stored = {w: np.zeros(-(-n // chunk), dtype=bool) for w, n in self.length.items()}
        for which, a, b in store.line_ranges_done():
            if which in self.stored:
                self._mark(which, a, b)
        todo = {
            which: [LineTask(which, a, b) for a, b in line_ranges(n, chunk, 2 * workers) if not self._has(which, a, b)]
            for which, n in self.length.items()
        }
        self.tasks: list[Task] = [*todo["row"][:1], *todo["col"], *todo["row"][1:]]
        self.left = set(self.tasks)
        self.seconds = 0.0  # from the start of the stage to the last range stored
        self.tiles_from: float | None = None  # when the first tile task was found ready
        self._needs: dict[Task, tuple[int, int, int, int]] = {}
        log(f"line stage: {len(self.tasks)} ranges of {spec.height} rows + {spec.width} columns on {workers} workers")

    def _mark(self, which: str, a: int, b: int) -> None:
        """Positions [a, b) stored: the line chunks wholly inside (the last chunk may be short)."""
        n = self.length[which]
        self.stored[which][-(-a // self.chunk) : (b // self.chunk if b < n else len(self.stored[which]))] = True

    def _has(self, which: str, a: int, b: int) -> bool:
        return bool(self.stored[which][a // self.chunk : -(-b // self.chunk)].all())

    def _box(self, task: TileTask) -> tuple[int, int, int, int]:
        """Rows [r0, r1) and columns [c0, c1) that a tile task's tiles read (r0, r1, c0, c1)."""
        needs = self._needs.get(task)
        if needs is None:
            tiles = self.job.plan.tiles(task.start, task.stop)
            needs = self._needs[task] = (
                min(t.r0 for t in tiles),
                max(t.r1 for t in tiles),
                min(t.c0 for t in tiles),
                max(t.c1 for t in tiles),
            )
        return needs

    def ready(self, task: Task) -> bool:
        """Whether ``task`` may be handed out: a line task always, a tile task once its lines are stored."""
        if isinstance(task, TileTask) and self.left:
            r0, r1, c0, c1 = self._box(task)
            if not (self._has("row", r0, r1) and self._has("col", c0, c1)):
                return False
        if isinstance(task, TileTask) and self.tiles_from is None:
            self.tiles_from = time.perf_counter()
        return True

    def on_result(self, task: Task, result: Result) -> bool:
        """Take a line task's result (True); False for any other."""
        if not isinstance(result, LineResult):
            return False
        self.tally.add_io(result.requests, result.objects_written)
        self._mark(result.which, result.start, result.stop)
        self.left.discard(task)
        if not self.left:
            self._complete()
        return True

    def _complete(self) -> None:
        spec = self.job.spec
        self.seconds = round(time.perf_counter() - self.t0, 3)
        self._needs.clear()
        self.log(f"line stage done in {self.seconds:.1f} s (stored under {spec.out}/lines)")
        self.store.mark_lines_complete({"height": spec.height, "width": spec.width, "chunk": self.chunk})

    def _schedule(self, tiles: Sequence[Task]) -> list[Task]:
        """All tasks in the pool's order: the line chunks the first tile task reads (split off their
        ranges), that tile task, the other line tasks, the other tile tasks.  So the first tile comes
        after two small line tasks, not after the line stage; the rest keeps the line stage first."""
        first = tiles[0] if tiles else None
        if not isinstance(first, TileTask) or not self.left:
            return [*self.tasks, *tiles]
        r0, r1, c0, c1 = self._box(first)
        head: list[Task] = []
        rest: list[Task] = []
        for t in self.tasks:
            assert isinstance(t, LineTask)
            lo, hi = (r0, r1) if t.which == "row" else (c0, c1)
            a, b = max(t.start, lo // self.chunk * self.chunk), min(t.stop, -(-hi // self.chunk) * self.chunk)
            if a >= b:
                rest.append(t)
                continue
            head.append(LineTask(t.which, a, b))
            rest.extend(LineTask(t.which, x, y) for x, y in ((t.start, a), (b, t.stop)) if x < y)
        self.tasks = [*head, *rest]
        self.left = set(self.tasks)
        return [*head, first, *rest, *tiles[1:]]

    def run(self, pool: Pool, tiles: Sequence[Task] = (), on_tile: OnResult | None = None) -> None:
        """The line tasks and ``tiles`` (each once its lines are stored) in one ``pool.run``."""
        if not self.left:  # every range was stored by an earlier run, which stopped before marking them complete
            self._complete()

        def on_result(task: Task, result: Result) -> None:
            if not self.on_result(task, result) and on_tile is not None:
                on_tile(task, result)

        pool.run(self.job.context(), self._schedule(tiles), on_result, self.ready if self.left else None)


def tile_stage(
    store: ImageStore,
    job: Prepared,
    todo: np.ndarray,
    pool: Pool,
    workers: int,
    lease: Lease,
    progress: bool,
    on_progress: Callable[[RunSummary, Pool], None] | None,
    tally: Tally,
    lines: LineStage | None = None,
) -> None:
    """Render the tiles ``todo``; with ``lines``, the line stage runs first in the same pool run
    and each tile task waits for its lines (``LineStage``)."""
    from tqdm import tqdm

    spec = job.spec
    tile_px = spec.tile * spec.tile * spec.shard * spec.shard
    size = spec.batch or auto_batch(len(todo), workers, tile_px, getattr(pool, "device", "cpu"))
    plan = job.plan
    tasks: list[Task] = [TileTask(a, b, _label(plan, a, b)) for a, b in block_runs(plan, todo, size)]
    t0 = time.perf_counter()
    last_meta = time.monotonic()
    n_done0 = tally.base.tiles_skipped
    bar = tqdm(total=len(todo), unit="tile", disable=not progress, dynamic_ncols=True, file=sys.stderr)

    def on_result(task: Task, result: Result) -> None:
        nonlocal last_meta, t0
        assert isinstance(result, list)
        tiles: list[TileResult] = result
        if not tally.tiles_rendered:
            tally.fields["first_tile_seconds"] = round(time.perf_counter() - tally.t_start, 3)
            if lines is not None and lines.tiles_from is not None:
                t0 = lines.tiles_from  # the tile stage began with its first task, inside the line stage
        for info in tiles:
            tally.pixels += info.pixels
            tally.worker_rss = max(tally.worker_rss, info.peak_rss_mb)
            tally.add_io(info.requests, info.objects_written)
        tally.tiles_rendered += len(tiles)
        bar.update(len(tiles))
        dt = time.perf_counter() - t0
        bar.set_postfix_str(f"{tally.pixels / max(dt, 1e-9) / 1e6:.2f} Mpx/s", refresh=False)
        if time.monotonic() - last_meta > 5.0:
            last_meta = time.monotonic()
            try:  # progress for watchers (viewer); best effort, the markers are the truth
                store.update_meta(tiles_done=n_done0 + tally.tiles_rendered)
            except Exception:
                pass
        if on_progress is not None:
            on_progress(tally.summary(), pool)
        lease.check()  # another writer took the store over: stop before more is written

    try:
        if lines is None:
            pool.run(job.context(), tasks, on_result)
        else:
            lines.run(pool, tasks, on_result)
    finally:
        bar.close()
    tally.fields["render_seconds"] = round(time.perf_counter() - t0, 3)


def _label(plan: TilePlan, start: int, stop: int) -> str:
    first = plan.tile(start).id
    return first if stop - start == 1 else f"{first}..{plan.tile(stop - 1).id}"
