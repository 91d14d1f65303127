"""The overlapped tile pipeline: bounded writer threads, groups of tiles per pixel-stage call,
direct chunk writes with zarr's bytes, and markers only after every chunk of their run."""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from jobs.run import run_job
from jobs.spec import JobSpec
from renderer import tiles as tiles_mod
from renderer.errors import RendererError
from renderer.pipeline import WritePipeline
from renderer.store import ImageStore, open_store
from renderer.tasks import TilePlan
from renderer.tiles import group_rect, tile_groups


def _job(tmp_path, **kw) -> JobSpec:
    base = dict(checkpoint="preset:tiny", out=str(tmp_path / "img.zarr"), workers=0, threads_per_worker=2)
    return JobSpec(**{**base, "exports": False, **kw})


def _level0(url: str) -> np.ndarray:
    store = open_store(url, mode="r")
    h, w = store.shape
    return store.read_region(0, 0, h, 0, w)


# ---------------------------------------------------------------- the write pipeline
def test_write_pipeline_is_bounded_ordered_and_waits_before_raising():
    pipe = WritePipeline(threads=3, depth=4)
    active, peak, lock = [0], [0], threading.Lock()

    def job(i: int) -> int:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.01)
        with lock:
            active[0] -= 1
        return i

    batch = pipe.batch()
    for i in range(20):
        batch.submit(lambda i=i: job(i))
        assert batch.outstanding <= 4  # submit blocks while `depth` jobs are outstanding
    assert batch.drain() == list(range(20)) and peak[0] <= 3

    finished: list[int] = []

    def slow_then_record(i: int) -> int:
        time.sleep(0.05)
        finished.append(i)
        return i

    def boom() -> int:
        raise OSError("disk full")

    bad = pipe.batch()
    bad.submit(boom)
    bad.submit(lambda: slow_then_record(1))
    with pytest.raises(OSError, match="disk full"):
        bad.drain()
    assert finished == [1]  # the error came only after every job of the batch had stopped
    early = pipe.batch()
    early.submit(boom)
    time.sleep(0.05)
    with pytest.raises(OSError, match="disk full"):
        early.submit(lambda: 0)  # a failed batch stops taking work
    early.discard()
    pipe.close()


def test_tile_groups_are_rectangles_within_one_plan_row():
    plan = TilePlan(100, 100, 32)  # 4 x 4 tiles, the last row and column short
    groups = list(tile_groups(plan, 2, 11, max_pixels=3 * 32 * 32))
    assert [[t.id for t in g] for g in groups] == [
        ["r0_c2", "r0_c3"],
        ["r1_c0", "r1_c1", "r1_c2"],
        ["r1_c3"],
        ["r2_c0", "r2_c1", "r2_c2"],
    ]
    for g in groups:
        assert all(t.r0 == g[0].r0 and t.r1 == g[0].r1 for t in g)
        assert all(a.c1 == b.c0 for a, b in itertools.pairwise(g))
    assert [len(g) for g in tile_groups(TilePlan(64, 64, 64), 0, 1, max_pixels=10)] == [1]  # a big tile alone


def test_tile_groups_of_a_block_plan_are_whole_blocks_when_they_fit():
    plan = TilePlan(100, 100, 32, block=2)  # blocks of 2 x 2 tiles (64², edges 64 x 36, 36²)
    groups = list(tile_groups(plan, 0, len(plan), max_pixels=64 * 64))
    assert [[t.id for t in g] for g in groups][:2] == [
        ["r0_c0", "r0_c1", "r1_c0", "r1_c1"],
        ["r0_c2", "r0_c3", "r1_c2", "r1_c3"],
    ]
    assert len(groups) == plan.blocks and [t for g in groups for t in g] == plan.tiles()
    for g in groups:  # one rectangle, exactly covered by its tiles
        r0, r1, c0, c1 = group_rect(g)
        assert sum(t.pixels for t in g) == (r1 - r0) * (c1 - c0)
    # a block larger than a call, or only part of one: rows of tiles, as in a row-major plan
    small = list(tile_groups(plan, 0, len(plan), max_pixels=2 * 32 * 32))
    assert [[t.id for t in g] for g in small][:2] == [["r0_c0", "r0_c1"], ["r1_c0", "r1_c1"]]
    part = list(tile_groups(plan, 1, 4, max_pixels=64 * 64))
    assert [[t.id for t in g] for g in part] == [["r0_c1"], ["r1_c0", "r1_c1"]]


# ---------------------------------------------------------------- direct chunk writes
def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("compressor", ["zstd", "none"])
def test_direct_chunk_writes_store_zarrs_bytes(tmp_path, compressor):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (3, 100, 70), dtype=np.uint8)
    data[:, 32:64, 32:64] = 0  # a chunk equal to the fill value: zarr stores no file for it
    stores: list[ImageStore] = []
    for name in ("zarr", "direct"):
        s = open_store(str(tmp_path / f"{name}.zarr"), mode="w")
        s.create_level(0, 100, 70, 32, compressor=compressor)
        stores.append(s)
    a, b = stores
    a.write_region(0, 0, 0, data)
    b.write_chunks(0, 0, 0, data)
    zeros = np.zeros((3, 32, 32), dtype=np.uint8)  # overwriting a chunk with the fill value removes it
    a.write_region(0, 64, 0, zeros)
    b.write_chunks(0, 64, 0, zeros)
    ta, tb = _tree(tmp_path / "zarr.zarr"), _tree(tmp_path / "direct.zarr")
    assert ta == tb and len([k for k in tb if k.startswith("0/c/")]) == 10
    np.testing.assert_array_equal(b.read_region(0, 0, 100, 0, 70), a.read_region(0, 0, 100, 0, 70))
    # not aligned to chunks, or sharded: through zarr, same result
    b.write_chunks(0, 5, 3, data[:, :10, :10])
    a.write_region(0, 5, 3, data[:, :10, :10])
    assert _tree(tmp_path / "zarr.zarr") == _tree(tmp_path / "direct.zarr")
    sharded = open_store(str(tmp_path / "sharded.zarr"), mode="w")
    sharded.create_level(0, 64, 64, 16, shard=2, compressor=compressor)
    sharded.write_chunks(0, 0, 0, data[:, :64, :64])
    np.testing.assert_array_equal(sharded.read_region(0, 0, 64, 0, 64), data[:, :64, :64])


# ---------------------------------------------------------------- jobs through the pipeline
@pytest.mark.parametrize(
    "kw",
    [
        dict(height=100, width=150, tile=16, batch=7),  # runs that wrap plan rows: several groups per task
        dict(height=97, width=200, tile=16, shard=3, seed=5, psi=0.7, view=(0.1, 0.6, -0.5, 1.5)),
        dict(height=130, width=70, tile=48, compressor="none", threads_per_worker=1),
    ],
    ids=["t16-batch7", "shard3-view", "t48-1lane"],
)
def test_in_process_groups_and_bands_give_the_reference_bytes(tmp_path, render_reference, monkeypatch, kw):
    # small calls: 16x16 tiles go 3 to a group, 48x48 tiles and 48x48 shards are cut into bands
    monkeypatch.setitem(tiles_mod.CALL_PIXELS, "cpu", 3 * 16 * 16 + 5)
    spec = _job(tmp_path, **kw)
    summary = run_job(spec, progress=False, log=lambda s: None)
    assert summary["status"] == "done" and summary["tiles_rendered"] == summary["tiles_total"]
    np.testing.assert_array_equal(
        _level0(spec.out), render_reference(spec.height, spec.width, spec.seed, spec.psi, spec.view)
    )


def test_a_failed_write_leaves_its_run_without_a_marker_and_resume_completes(tmp_path, render_reference, monkeypatch):
    spec = _job(tmp_path, height=64, width=128, tile=16, batch=8, max_retries=0, threads_per_worker=1)
    real = ImageStore.write_chunks
    calls = [0]

    def flaky(self, level, r0, c0, data):
        calls[0] += 1
        if r0 == 32:  # the third plan row: its run fails after other groups were written
            raise OSError("injected write failure")
        return real(self, level, r0, c0, data)

    monkeypatch.setattr(ImageStore, "write_chunks", flaky)
    with pytest.raises(RendererError, match="failed 1 times; giving up. Last error: OSError: injected write failure"):
        run_job(spec, progress=False, log=lambda s: None)
    store = open_store(spec.out, mode="r")
    done = store.done_mask()
    assert not done[16:24].any()  # the failed run: no marker, whatever of it was written
    assert store.meta["status"] == "failed"
    monkeypatch.setattr(ImageStore, "write_chunks", real)
    again = run_job(spec, progress=False, log=lambda s: None)
    assert again["status"] == "done" and again["tiles_skipped"] == int(done.sum())
    np.testing.assert_array_equal(_level0(spec.out), render_reference(64, 128))
