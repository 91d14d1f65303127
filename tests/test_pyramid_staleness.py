"""Pyramid progress is tied to the level-0 tiles it was built from (renderer.pyramid, jobs.assemble).

The reproduction of the bug: a render stopped part-way, assembled, then
finished, used to keep the levels averaged from the unfinished level 0 (black
where tiles were missing) because pyramid.json said every level was complete.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tifffile
from conftest import mark_tile, pyramid_complete

import render
from jobs.assemble import assemble
from renderer.errors import IncompleteStoreError
from renderer.pyramid import build_levels, pyramid_current, reference_pyramid, render_levels, source_state
from renderer.scaleout import ThreadRunner
from renderer.store import PYRAMID_PROGRESS, open_store
from viewer.tiles import usable_levels

SIDE, TILE = 256, 32  # 8 x 8 = 64 tiles; levels 256, 128, 64, 32


def _job(tmp_path):
    from jobs.spec import JobSpec

    return JobSpec(
        checkpoint="preset:tiny",
        height=SIDE,
        width=SIDE,
        tile=TILE,
        out=str(tmp_path / "img.zarr"),
        workers=2,
        threads_per_worker=1,
        batch=1,
        exports=False,
    )


def _levels(store) -> list[np.ndarray]:
    return [np.asarray(store.level(k)[:]) for k in range(store.level_count())]


def _tiff_levels(path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tif:
        return [lv.asarray().transpose(2, 0, 1) for lv in tif.series[0].levels]


def _sidecar(path) -> dict:
    with open(str(path) + ".source.json") as f:
        return json.load(f)


def test_stopped_render_assembled_then_finished_gives_the_finished_pyramid(tmp_path, render_ray, capsys):
    from jobs.run import run_job

    spec = _job(tmp_path)
    tif, dzi = tmp_path / "img.tif", tmp_path / "img"
    first = run_job(spec, max_tiles=20, progress=False, log=lambda s: None)
    assert first["status"] == "partial" and first["tiles_left"] == 44

    # 1. the default assemble refuses an unfinished store: one line, exit code 2, nothing written
    with pytest.raises(IncompleteStoreError, match=r"44 of 64 tiles are missing.*--partial"):
        assemble(spec.out, tiff=str(tif), dzi=str(dzi), compression="zstd")
    rc = render.main(["assemble", spec.out, "--tiff", str(tif), "--compression", "zstd"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and "--partial" in err
    store = open_store(spec.out)
    assert store.level_count() == 1 + render_levels(store) and store.pyramid_progress() is None
    assert not tif.exists() and not (tmp_path / "img.dzi").exists()

    # 2. --partial builds from the 20 tiles there are, says so, and records it
    said: list[str] = []
    assemble(spec.out, tiff=str(tif), dzi=str(dzi), compression="zstd", partial=True, log=said.append)
    assert len(said) == 1 and said[0].startswith("partial:") and "20 of 64 tiles" in said[0]
    store = open_store(spec.out)
    record = store.pyramid_progress()
    assert record["source"] == {"tiles_done": 20, "tiles_total": 64, "partial": True}
    assert not pyramid_complete(store) and pyramid_current(store)
    partial0 = np.asarray(store.level(0)[:])
    assert not partial0[:, -TILE:, :].any()  # the last tile rows are not rendered yet
    for got, want in zip(_levels(store), reference_pyramid(partial0, TILE), strict=True):
        np.testing.assert_array_equal(got, want)  # a partial pyramid is the pyramid of what is there
    side = _sidecar(tif)
    assert (side["tiles_done"], side["tiles_total"], side["partial"]) == (20, 64, True)
    assert _sidecar(str(dzi) + ".dzi")["partial"] is True
    assert len(usable_levels(store)) == 4  # not stale: the viewer may use it

    # 3. the render goes on: the record turns stale before the first new tile is written
    second = run_job(spec, progress=False, log=lambda s: None)
    assert second["status"] == "done" and second["tiles_rendered"] == 44
    store = open_store(spec.out)
    assert store.pyramid_progress()["stale"] is True
    assert not pyramid_complete(store) and not pyramid_current(store)
    # the viewer never serves the stale levels; the render's own (1..L, written with their blocks) stay
    assert render_levels(store) == 1 and usable_levels(store) == [(SIDE, SIDE), (SIDE // 2, SIDE // 2)]

    # 4. the next assemble rebuilds everything from the finished level 0
    assemble(spec.out, tiff=str(tif), dzi=str(dzi), compression="zstd", log=said.append)
    assert len(said) == 1  # no "partial" line this time
    store = open_store(spec.out)
    final0 = np.asarray(store.level(0)[:])
    assert final0[:, -TILE:, :].any()
    ref = reference_pyramid(final0, TILE)
    assert len(ref) == store.level_count() == 4
    for got, want in zip(_levels(store), ref, strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(_tiff_levels(tif), ref, strict=True):
        np.testing.assert_array_equal(got, want)
    assert pyramid_complete(store) and len(usable_levels(store)) == 4
    assert store.pyramid_progress()["source"] == {"tiles_done": 64, "tiles_total": 64, "partial": False}
    side = _sidecar(tif)
    assert (side["tiles_done"], side["tiles_total"], side["partial"]) == (64, 64, False)
    assert side["checkpoint_sha256"] == store.meta["checkpoint_sha256"] and side["store"] == spec.out
    assert not any(".creps-tmp-" in name for name in os.listdir(tmp_path))


# ---------------------------------------------------------------- the same rules without a render
def _job_store(url: str, done: int, total: int = 4, side: int = 64, chunk: int = 32, seed: int = 0):
    """A store like a render job's: level 0 of 2x2 tiles, ``done`` of them written and marked."""
    rng = np.random.default_rng(seed)
    store = open_store(url, mode="w")
    store.create_level(0, side, side, chunk=chunk)
    store.update_meta(tiles_total=total)
    for k in range(done):
        i, j = divmod(k, side // chunk)
        store.write_region(0, i * chunk, j * chunk, rng.integers(0, 256, (3, chunk, chunk), dtype=np.uint8))
        mark_tile(store, f"r{i}_c{j}")
    return store


def _render_rest(store, start: int, chunk: int = 32, seed: int = 1) -> None:
    """What a render run does: invalidate the pyramid, then write and mark the missing tiles."""
    rng = np.random.default_rng(seed)
    store.invalidate_pyramid("test: tiles rendered")
    side = store.shape[1]
    for k in range(start, (side // chunk) ** 2):
        i, j = divmod(k, side // chunk)
        store.write_region(0, i * chunk, j * chunk, rng.integers(0, 256, (3, chunk, chunk), dtype=np.uint8))
        mark_tile(store, f"r{i}_c{j}")


class _HookRunner(ThreadRunner):
    """Local threads that call ``hook`` once, as the pass hands out its first band (the pass has read
    its source and written its record by then): something happening while a pass runs."""

    def __init__(self, hook) -> None:
        super().__init__(2)
        self.hook = hook

    def submit(self, fn, *args):
        if self.hook is not None:
            self.hook, hook = None, self.hook
            hook()
        return super().submit(fn, *args)


def _build_with(store, hook) -> None:
    runner = _HookRunner(hook)
    try:
        build_levels(store, runner)
    finally:
        runner.close()


def _assert_reference(store, chunk: int = 32) -> None:
    img = np.asarray(store.level(0)[:])
    for got, want in zip(_levels(store), reference_pyramid(img, chunk), strict=True):
        np.testing.assert_array_equal(got, want)


def test_source_state_and_a_store_without_a_job_counts_as_complete(tmp_path):
    store = _job_store(str(tmp_path / "s.zarr"), done=1)
    assert source_state(store) == {"tiles_done": 1, "tiles_total": 4, "partial": True}
    plain = open_store(str(tmp_path / "p.zarr"), mode="w")
    plain.create_level(0, 40, 40, chunk=16)
    assert source_state(plain) == {"tiles_done": 0, "tiles_total": None, "partial": False}
    build_levels(plain)
    assert pyramid_complete(plain)


def test_partial_record_is_rebuilt_by_the_next_pass(tmp_path):
    store = _job_store(str(tmp_path / "s.zarr"), done=2)
    build_levels(store)
    assert store.pyramid_progress()["source"]["partial"] is True
    assert not pyramid_complete(store) and pyramid_current(store)
    store.level(1)[:, :, :] = 7  # a partial record is never trusted by the next pass: rebuilt in full
    build_levels(store)
    _assert_reference(store)


def test_stale_record_rebuilds_from_the_new_tiles(tmp_path):
    store = _job_store(str(tmp_path / "s.zarr"), done=2)
    build_levels(store)
    _render_rest(store, start=2)
    assert store.pyramid_progress()["stale"] is True
    assert not pyramid_current(store) and usable_levels(store) == [(64, 64)]
    build_levels(store)
    assert pyramid_complete(store) and "stale" not in store.pyramid_progress()
    _assert_reference(store)
    assert len(usable_levels(store)) == 2


def test_rewritten_tile_of_a_complete_store_invalidates(tmp_path):
    """A tile re-rendered (same count of done tiles) is caught by the stale mark alone."""
    store = _job_store(str(tmp_path / "s.zarr"), done=4)
    build_levels(store)
    assert pyramid_complete(store)
    store.invalidate_pyramid("test: tile r1_c1 re-rendered")
    store.write_region(0, 32, 32, np.full((3, 32, 32), 200, np.uint8))
    assert not pyramid_complete(store)
    build_levels(store)
    _assert_reference(store)
    assert (store.level(1)[:, 16:, 16:] == 200).all()


def test_record_without_source_is_not_trusted(tmp_path):
    """pyramid.json of an older version (no ``source``) may have been built from an unfinished store."""
    store = _job_store(str(tmp_path / "s.zarr"), done=4)
    build_levels(store)
    path = tmp_path / "s.zarr" / PYRAMID_PROGRESS
    record = json.loads(path.read_text())
    del record["source"]
    path.write_text(json.dumps(record))
    store.level(1)[:, :, :] = 0
    assert not pyramid_complete(store)
    build_levels(store)
    _assert_reference(store)


def test_invalidation_during_a_pass_is_kept(tmp_path):
    """A render that starts while the pyramid is built: its stale mark survives the pass's own records."""
    store = _job_store(str(tmp_path / "s.zarr"), done=4, side=128)
    _build_with(store, lambda: store.invalidate_pyramid("test: a render started"))
    record = store.pyramid_progress()
    assert record["stale"] is True and record["stale_reason"] == "test: a render started"
    assert not pyramid_complete(store)


def test_tiles_landing_during_a_pass_make_it_stale(tmp_path):
    store = _job_store(str(tmp_path / "s.zarr"), done=2)

    def land() -> None:  # a tile finished without invalidating (e.g. an older renderer)
        store.write_region(0, 32, 0, np.full((3, 32, 32), 9, np.uint8))
        mark_tile(store, "r1_c0")

    _build_with(store, land)
    assert store.pyramid_progress()["stale"] is True
    build_levels(store)
    assert store.pyramid_progress()["source"]["tiles_done"] == 3
    _assert_reference(store)


def test_assemble_cli_partial_flag(tmp_path, capsys):
    store = _job_store(str(tmp_path / "s.zarr"), done=3)
    rc = render.main(["assemble", store.url, "--tiff", str(tmp_path / "o.tif"), "--compression", "zstd"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.err.count("\n") == 1
    assert "1 of 4 tiles are missing" in captured.err and "--partial" in captured.err
    assert not (tmp_path / "o.tif").exists()
    rc = render.main(["assemble", store.url, "--tiff", str(tmp_path / "o.tif"), "--compression", "zstd", "--partial"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "partial: the pyramid and exports are built from 3 of 4 tiles" in captured.out
    assert _sidecar(tmp_path / "o.tif")["partial"] is True
    _render_rest(store, start=3)
    rc = render.main(["assemble", store.url, "--tiff", str(tmp_path / "o.tif"), "--compression", "zstd"])
    captured = capsys.readouterr()
    assert rc == 0 and "partial" not in captured.out
    store = open_store(store.url)
    ref = reference_pyramid(np.asarray(store.level(0)[:]), 32)
    for got, want in zip(_tiff_levels(tmp_path / "o.tif"), ref, strict=True):
        np.testing.assert_array_equal(got, want)
    assert _sidecar(tmp_path / "o.tif")["partial"] is False
