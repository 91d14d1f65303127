"""The line stage overlaps the first tiles: a tile task is handed out once the line ranges it
reads are stored (jobs.stages.LineStage, the pools' ``ready``), and the bytes do not change."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import tiny_job

import creps
from jobs import stages
from jobs.plan import line_chunk, line_ranges
from jobs.run import run_job
from renderer.errors import RendererError
from renderer.local import LocalPool
from renderer.store import open_store
from renderer.tasks import LineResult, LineTask, Task, TilePlan, TileTask
from renderer.worker import RenderWorker

H, W, TILE = 192, 256, 32


def _level0(url: str) -> np.ndarray:
    store = open_store(url, mode="r")
    return store.read_region(0, 0, H, 0, W)


def _covered(done: set[tuple[str, int, int]], which: str, a: int, b: int) -> bool:
    """Whether the stored ranges ``done`` hold every position of [a, b) of ``which``."""
    have = np.zeros(max(a, b), dtype=bool)
    for w, s, e in done:
        if w == which:
            have[s:e] = True
    return bool(have[a:b].all())


class _Watch:
    """Driver-side log of a job: what ``ready`` let out and which line results had come back.

    ``hold``: the driver takes the result of this line range only after ``release_after`` tiles
    came back, as if its task were that slow (the tiles that do not read it go on meanwhile).
    """

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, hold: tuple[str, int, int] | None = None, release_after: int = 0
    ) -> None:
        self.lines_back: set[tuple[str, int, int]] = set()
        held: list = []
        tiles_back = 0
        self.handed: list[tuple[TileTask, bool]] = []  # (tile task, line ranges still outstanding)
        self.wrong: list[str] = []
        stage = stages.LineStage
        ready0, on_result0 = stage.ready, stage.on_result
        watch = self

        def ready(self, task: Task) -> bool:
            ok = ready0(self, task)
            if ok and isinstance(task, TileTask):
                tiles = self.job.plan.tiles(task.start, task.stop)
                rows = (min(t.r0 for t in tiles), max(t.r1 for t in tiles))
                cols = (min(t.c0 for t in tiles), max(t.c1 for t in tiles))
                have = watch.lines_back | watch.stored_before
                if not (_covered(have, "row", *rows) and _covered(have, "col", *cols)):
                    watch.wrong.append(f"{task.key} handed out before its lines came back")
                watch.handed.append((task, bool(self.left)))
            return ok

        def on_result(self, task: Task, result) -> bool:
            nonlocal tiles_back
            if isinstance(result, LineResult):
                if (result.which, result.start, result.stop) == hold and not tiles_back >= release_after:
                    held.append((task, result))
                    return True
                watch.lines_back.add((result.which, result.start, result.stop))
                return on_result0(self, task, result)
            taken = on_result0(self, task, result)
            tiles_back += len(result)
            if held and tiles_back >= release_after:
                on_result(self, *held.pop())
            return taken

        self.stored_before: set[tuple[str, int, int]] = set()
        monkeypatch.setattr(stage, "ready", ready)
        monkeypatch.setattr(stage, "on_result", on_result)

    @property
    def overlapped(self) -> int:
        return sum(1 for _, early in self.handed if early)


def test_in_process_tiles_start_inside_the_line_stage_with_the_same_bytes(tmp_path, monkeypatch, render_reference):
    """The line stage's last task (the last row range) is held until every tile that does not read
    it is rendered: the stages overlap, and a tile that reads it must wait.  Each tile, as it starts
    on its lane, finds its row and column lines marked in the store."""
    spec = tiny_job(str(tmp_path / "o.zarr"), height=H, width=W, tile=TILE, workers=0, threads_per_worker=2)
    last_row = line_ranges(H, line_chunk(TILE), 4)[-1]  # the line stage's last task (rows after the columns)
    others = sum(1 for t in TilePlan(H, W, TILE) if t.r1 <= last_row[0])
    others_done = threading.Event()
    rendered: list[str] = []
    seen: list[str] = []
    run0 = RenderWorker.run

    def run(self, ctx, task):
        if isinstance(task, LineTask) and (task.which, task.start, task.stop) == ("row", *last_row):
            assert others_done.wait(120), "the tiles above the last row range did not render meanwhile"
        if isinstance(task, TileTask):
            done = self.renderer(ctx).store.line_ranges_done()
            for t in ctx.plan.tiles(task.start, task.stop):
                if not (_covered(done, "row", t.r0, t.r1) and _covered(done, "col", t.c0, t.c1)):
                    seen.append(f"{t.id} started before its lines were marked")
        result = run0(self, ctx, task)
        if isinstance(task, TileTask):
            rendered.extend(t.id for t in ctx.plan.tiles(task.start, task.stop) if t.r1 <= last_row[0])
            if len(rendered) == others:
                others_done.set()
        return result

    monkeypatch.setattr(RenderWorker, "run", run)
    watch = _Watch(monkeypatch)
    summary = run_job(spec, progress=False, log=lambda s: None)
    assert summary["status"] == "done" and summary["line_ranges_computed"] == 7
    assert not seen and not watch.wrong
    assert watch.overlapped >= 1
    assert 0 < summary["first_tile_seconds"] <= summary["seconds"]
    assert summary["line_seconds"] > 0 and summary["render_seconds"] > 0
    store = open_store(spec.out, mode="r")
    assert store.lines_complete()
    np.testing.assert_array_equal(_level0(spec.out), render_reference(H, W))


def test_first_tile_comes_after_the_line_chunks_it_reads(tmp_path, monkeypatch, render_reference):
    """One lane, so the order is the queue's: the first tile's row and column line chunks (split
    off their ranges), the first tile, then the rest of the line stage, then the other tiles."""
    spec = tiny_job(str(tmp_path / "f.zarr"), height=H, width=W, tile=TILE, workers=0, threads_per_worker=1)
    started: list[str] = []
    run0 = RenderWorker.run

    def run(self, ctx, task):
        started.append(task.key)
        return run0(self, ctx, task)

    monkeypatch.setattr(RenderWorker, "run", run)
    summary = run_job(spec, progress=False, log=lambda s: None)
    assert summary["status"] == "done" and summary["line_ranges_computed"] == 6  # 2 + 2 ranges, 2 split
    assert started[:3] == ["lines row 0:64", "lines col 0:64", "r0_c0"]
    assert started[3:7] == ["lines row 64:128", "lines col 64:128", "lines col 128:256", "lines row 128:192"]
    np.testing.assert_array_equal(_level0(spec.out), render_reference(H, W))


def test_ray_overlapped_job_equals_the_staged_one(tmp_path, monkeypatch, render_ray):
    """On Ray: a job whose tiles are handed out inside the line stage (its last row range is taken
    late) writes the bytes of one whose line stage ran alone first (max_tiles=0, then the tiles)."""
    staged = tiny_job(str(tmp_path / "staged.zarr"), height=H, width=W, tile=TILE)
    first = run_job(staged, max_tiles=0, progress=False, log=lambda s: None)
    assert first["tiles_rendered"] == 0 and open_store(staged.out, mode="r").lines_complete()
    second = run_job(staged, progress=False, log=lambda s: None)
    assert second["status"] == "done" and second["line_ranges_computed"] == 0

    last_row = line_ranges(H, line_chunk(TILE), 4)[-1]
    others = sum(1 for t in TilePlan(H, W, TILE) if t.r1 <= last_row[0])
    watch = _Watch(monkeypatch, hold=("row", *last_row), release_after=others)
    spec = tiny_job(str(tmp_path / "overlap.zarr"), height=H, width=W, tile=TILE)
    summary = run_job(spec, progress=False, log=lambda s: None)
    assert summary["status"] == "done" and summary["line_ranges_computed"] == 7
    assert not watch.wrong and len(watch.handed) == summary["tiles_rendered"] == 48
    assert watch.overlapped >= others  # handed out while the line stage still ran
    np.testing.assert_array_equal(_level0(spec.out), _level0(staged.out))
    a, b = open_store(staged.out, mode="r"), open_store(spec.out, mode="r")
    assert _crcs(a) == _crcs(b) and len(_crcs(a)) == len(TilePlan(H, W, TILE))


def _crcs(store) -> dict[str, int]:
    """Each done tile's crc32, as its marker records it."""
    return {r["id"]: r["crc32"] for group in store.tile_record_groups() for r in group}


def test_resume_after_a_stop_inside_the_overlap(tmp_path, monkeypatch, render_reference):
    """A run stopped after some tiles but before the line stage ended leaves no 'lines complete'
    marker; the re-run computes only the missing ranges and finishes with the same bytes."""
    spec = tiny_job(
        str(tmp_path / "r.zarr"), height=H, width=W, tile=TILE, workers=0, threads_per_worker=2, max_retries=0
    )
    last_row = line_ranges(H, line_chunk(TILE), 4)[-1]
    run0 = RenderWorker.run
    tiles_done = threading.Event()

    def run(self, ctx, task):
        if isinstance(task, LineTask) and (task.which, task.start, task.stop) == ("row", *last_row):
            tiles_done.wait(120)
            raise RuntimeError("killed")
        result = run0(self, ctx, task)
        if isinstance(task, TileTask):
            tiles_done.set()
        return result

    monkeypatch.setattr(RenderWorker, "run", run)
    with pytest.raises(RendererError, match="killed"):
        run_job(spec, progress=False, log=lambda s: None)
    store = open_store(spec.out, mode="r")
    assert not store.lines_complete() and store.done_count() >= 1
    assert ("row", *last_row) not in store.line_ranges_done()
    monkeypatch.setattr(RenderWorker, "run", run0)
    again = run_job(spec, progress=False, log=lambda s: None)
    assert again["status"] == "done" and again["line_ranges_computed"] == 1 and again["tiles_skipped"] >= 1
    assert open_store(spec.out, mode="r").lines_complete()
    np.testing.assert_array_equal(_level0(spec.out), render_reference(H, W))


class _FakeWorker:
    """Records when tasks start and end; line task ``a`` runs until a tile task has started."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.tile_started = threading.Event()

    def renderer(self, ctx) -> None:
        return None

    def run(self, ctx, task: Task):
        self.log.append(f"start {task.key}")
        if isinstance(task, LineTask):
            if task.which == "row" and task.start == 0:
                assert self.tile_started.wait(60), "the tile of the other line never started"
            return LineResult(task.which, task.start, task.stop, 0.0, 0.0)
        self.tile_started.set()
        return []

    def close(self) -> None:
        pass


@pytest.fixture
def local_pool():
    pool = LocalPool("preset:tiny", 0, 2, "cpu", max_failures=0, generator=creps.load("preset:tiny"))
    pool.worker.close()
    pool.worker = _FakeWorker()  # type: ignore[assignment]
    yield pool
    pool.shutdown()


def test_pool_hands_out_a_task_once_ready_and_keeps_the_order(local_pool):
    """Two lanes: line ``a`` runs until a tile starts, line ``b`` is quick; tile 1 needs only ``b``
    and runs while ``a`` does; tile 2 needs ``a``; tile 3 needs nothing but comes after tile 1."""
    a, b = LineTask("row", 0, 64), LineTask("col", 0, 64)
    t1, t2, t3 = TileTask(0, 1, "t1"), TileTask(1, 2, "t2"), TileTask(2, 3, "t3")
    back: set[Task] = set()
    needs = {t1: {b}, t2: {a}, t3: set()}
    log = local_pool.worker.log

    def on_result(task: Task, result) -> None:
        log.append(f"back {task.key}")
        back.add(task)

    def ready(task: Task) -> bool:
        return needs.get(task, set()) <= back  # type: ignore[call-overload]

    local_pool.run(None, [a, b, t2, t1, t3], on_result, ready)  # type: ignore[arg-type]
    starts = [e for e in log if e.startswith("start")]
    assert starts[:2] == [f"start {a.key}", f"start {b.key}"]
    assert log.index(f"back {b.key}") < log.index("start t1") < log.index(f"back {a.key}") < log.index("start t2")
    assert log.index("start t1") < log.index("start t3")  # the first ready task in the queue's order


def test_pool_refuses_a_task_that_can_never_be_ready(local_pool):
    with pytest.raises(RendererError, match="waits for work that no task does"):
        local_pool.run(None, [TileTask(0, 1, "t1")], lambda t, r: None, lambda t: False)  # type: ignore[arg-type]
