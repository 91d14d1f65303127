"""Pyramid levels written by the render's workers, block by block (issue: scale out after the render).

A job planned in blocks of G x G tiles has every task render whole blocks and
write each block's levels 1..L before its marker (renderer.tiles); assemble
then builds only the coarser levels. What is pinned here: those levels equal
an independent 2x2 mean of level 0 (odd sizes too), on both pools, sharded
too; no task splits a block; resume, redo and --max-tiles keep levels
consistent; stores of row-major plans (block 1) work as before.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from conftest import pyramid_complete, tiny_job

from jobs.plan import auto_block, block_levels, block_runs
from jobs.run import run_job
from renderer.pyramid import build_levels, reference_pyramid, render_levels
from renderer.store import open_store
from renderer.tasks import TilePlan


def mean2x2(img: np.ndarray) -> np.ndarray:
    """The rule written out once more, independently: round-half-up mean of the 2x2 block,
    the last row / column repeated when the size is odd."""
    c, h, w = img.shape
    p = np.zeros((c, h + h % 2, w + w % 2), np.int64)
    p[:, :h, :w] = img
    if h % 2:
        p[:, h, :w] = img[:, h - 1]
    if w % 2:
        p[:, :, w] = p[:, :, w - 1]
    total = p[:, 0::2, 0::2] + p[:, 1::2, 0::2] + p[:, 0::2, 1::2] + p[:, 1::2, 1::2]
    return ((total + 2) // 4).astype(np.uint8)


def _levels(url: str) -> list[np.ndarray]:
    store = open_store(url, mode="r")
    return [np.asarray(store.level(k)[:]) for k in range(store.level_count())]


def _check_levels(url: str, levels: int) -> None:
    got = _levels(url)
    assert render_levels(open_store(url, mode="r")) == levels and len(got) >= levels + 1
    want = got[0]
    for k in range(1, levels + 1):
        want = mean2x2(want)
        np.testing.assert_array_equal(got[k], want, err_msg=f"level {k}")


# ---------------------------------------------------------------- the plan
@pytest.mark.parametrize(("h", "w", "side", "block"), [(100, 100, 32, 1), (300, 170, 32, 4), (33, 999, 32, 8)])
def test_block_plan_is_a_bijection_with_contiguous_blocks(h, w, side, block):
    plan = TilePlan(h, w, side, block)
    ids = [plan.tile(k).id for k in range(len(plan))]
    assert len(set(ids)) == len(plan) and all(plan.index(t) == k for k, t in enumerate(ids))
    assert plan.pixels(np.arange(len(plan))) == h * w
    bounds = [plan.block_range(b) for b in range(plan.blocks)]
    assert bounds[0][0] == 0 and bounds[-1][1] == len(plan)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    for b, (a, z) in enumerate(bounds):  # a block's tiles lie inside its rectangle, and nowhere else
        r0, r1, c0, c1 = plan.block_rect(b)
        tiles = plan.tiles(a, z)
        assert sum(t.pixels for t in tiles) == (r1 - r0) * (c1 - c0)
        assert all(r0 <= t.r0 and t.r1 <= r1 and c0 <= t.c0 and t.c1 <= c1 for t in tiles)
        assert {plan.block_of(k) for k in range(a, z)} == {b} == {plan.block_at(t.r0, t.c0) for t in tiles}


def test_runs_never_split_a_block():
    plan = TilePlan(300, 170, 32, 4)  # 10 x 6 tiles: blocks of 16, 8, 12, 6 (edges)
    todo = np.concatenate([np.arange(*plan.block_range(b)) for b in (0, 1, 3, 4, 5)])
    for size in (1, 7, 16, 1000):
        got = list(block_runs(plan, todo, size))
        assert np.array_equal(np.concatenate([np.arange(a, b) for a, b in got]), todo)
        starts = {plan.block_range(b)[0] for b in range(plan.blocks)}
        ends = {plan.block_range(b)[1] for b in range(plan.blocks)}
        assert all(a in starts and b in ends for a, b in got)


def test_auto_block_and_levels():
    assert auto_block(6144, 6144, 512) == 2 and block_levels(6144, 6144, 512, 1, 2) == 1
    assert auto_block(32768, 32768, 512) == 4 and block_levels(32768, 32768, 512, 1, 4) == 2
    assert auto_block(1024, 1024, 512) == 1 and block_levels(1024, 1024, 512, 1, 1) == 0  # too few tiles
    assert block_levels(32768, 32768, 512, 2, 2) == 2  # shards of 2x2 chunks, blocks of 2x2 shards
    assert block_levels(262144, 262144, 512, 16, 1) == 4  # a 16-chunk shard alone owns levels 1-4
    assert block_levels(256, 256, 32, 1, 64) == 3  # never past the pyramid's last level (one chunk)


# ---------------------------------------------------------------- renders
def test_in_process_levels_equal_the_mean_of_level_0_odd_sizes(tmp_path):
    url = str(tmp_path / "odd.zarr")
    spec = tiny_job(url, height=199, width=301, tile=32, block=4, workers=0, batch=0)
    summary = run_job(spec, progress=False, log=lambda s: None)
    assert summary["status"] == "done"
    _check_levels(url, 2)
    # assemble builds only the coarser levels and leaves the render's as they are
    store = open_store(url)
    level1 = os.path.join(url, "1")
    before = {os.path.join(r, f): os.stat(os.path.join(r, f)).st_mtime_ns for r, _, fs in os.walk(level1) for f in fs}
    n = build_levels(store)
    after = {os.path.join(r, f): os.stat(os.path.join(r, f)).st_mtime_ns for r, _, fs in os.walk(level1) for f in fs}
    assert before == after and before
    got = _levels(url)
    assert pyramid_complete(store) and len(got) == n
    for k, want in enumerate(reference_pyramid(got[0], 32)):
        np.testing.assert_array_equal(got[k], want, err_msg=f"level {k}")


def test_ray_and_in_process_levels_are_the_same_bytes(tmp_path, render_ray, render_reference):
    a, b = str(tmp_path / "ray.zarr"), str(tmp_path / "local.zarr")
    run_job(tiny_job(a, height=192, width=256, tile=32, block=2, batch=4), progress=False, log=lambda s: None)
    run_job(tiny_job(b, height=192, width=256, tile=32, block=2, workers=0), progress=False, log=lambda s: None)
    np.testing.assert_array_equal(_levels(a)[0], render_reference(192, 256))
    _check_levels(a, 1)
    for x, y in zip(_levels(a), _levels(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_sharded_store_levels(tmp_path):
    url = "memory://levels/sharded.zarr"
    spec = tiny_job(url, height=256, width=224, tile=32, shard=2, block=2, workers=0)
    assert run_job(spec, progress=False, log=lambda s: None)["status"] == "done"
    _check_levels(url, 2)  # blocks of 2 x 2 shards of 2 x 2 chunks own whole chunks of levels 1 and 2


def test_max_tiles_redo_and_resume_keep_levels_consistent(tmp_path):
    url = str(tmp_path / "r.zarr")
    spec = tiny_job(url, height=256, width=256, tile=32, block=4, workers=0)  # 4 blocks of 16 tiles
    first = run_job(spec, max_tiles=5, progress=False, log=lambda s: None)
    assert first["tiles_rendered"] == 16 and first["status"] == "partial"  # rounded up to a whole block
    _check_levels(url, 2)  # the missing blocks are zeros at every level, like their tiles
    rest = run_job(spec, progress=False, log=lambda s: None)
    assert rest["tiles_rendered"] == 48 and rest["status"] == "done"
    _check_levels(url, 2)

    # a tile rendered again takes its block with it (its levels were averaged from it too)
    store = open_store(url)
    store.write_region(0, 32, 64, np.zeros((3, 32, 32), np.uint8))  # tile r1_c2: damaged
    store.write_region(1, 0, 0, np.zeros((3, 64, 64), np.uint8))  # and level 1 of its block
    again = run_job(spec, progress=False, log=lambda s: None, redo=["r1_c2"])
    assert again["tiles_rendered"] == 16
    _check_levels(url, 2)
    assert _levels(url)[1][:, :64, :64].any()


def test_row_major_stores_still_resume_and_assemble(tmp_path):
    """block 1 (every store from before blocks): no levels with the tiles; auto keeps a store's block."""
    url = str(tmp_path / "old.zarr")
    run_job(tiny_job(url, height=256, width=256, tile=32, block=1, workers=0), max_tiles=7, progress=False)
    store = open_store(url, mode="r")
    assert store.block_levels == (1, 0) and store.level_count() == 1
    rest = run_job(tiny_job(url, height=256, width=256, tile=32, workers=0), progress=False, log=lambda s: None)
    assert rest["tiles_rendered"] == 57 and open_store(url).meta["identity"]["block"] == 1
    store = open_store(url)
    build_levels(store)
    got = _levels(url)
    for k, want in enumerate(reference_pyramid(got[0], 32)):
        np.testing.assert_array_equal(got[k], want)


def test_verify_checks_the_levels_of_each_block_and_repairs_them(tmp_path):
    from jobs.verify import verify_after_render
    from renderer.verify import verify_store

    url = str(tmp_path / "v.zarr")
    spec = tiny_job(url, height=256, width=192, tile=32, block=2, workers=0)  # 12 blocks of 2 x 2 tiles
    run_job(spec, progress=False, log=lambda s: None)
    store = open_store(url)
    assert verify_store(store, workers=2).ok and verify_store(store, workers=2).checked == 48
    level1 = np.asarray(store.level(1)[:, 32:64, 64:96])  # block 1 x 2 (tiles r2..3_c4..5)
    store.write_region(1, 32, 64, 255 - level1)  # a damaged level chunk; level 0 and its crc32 are fine
    report = verify_store(store, workers=2)
    # the level chunk is bad, not the tiles: it is rebuilt from level 0, nothing is rendered again
    assert report.bad == () and [(b.level, b.chunk) for b in report.bad_chunks] == [(1, (1, 2))]
    assert "2x2 rule over level 0" in report.bad_chunks[0].reason and report.bad_chunks[0].path == "1/c/0/1/2"
    assert [(b.level, b.chunk) for b in verify_store(store, ids=["r3_c5"]).bad_chunks] == [(1, (1, 2))]  # its block
    outcome = verify_after_render(spec, log=lambda s: None)
    assert outcome.ok and outcome.rerendered == () and outcome.rebuilt == ((1, 1, 2),)
    np.testing.assert_array_equal(np.asarray(open_store(url).level(1)[:, 32:64, 64:96]), level1)
    _check_levels(url, 1)


def test_a_store_whose_recorded_levels_differ_is_refused_before_anything_runs(tmp_path):
    from jobs import JobSpecError

    url = str(tmp_path / "rec.zarr")
    spec = tiny_job(url, height=256, width=256, tile=32, block=4, workers=0)
    run_job(spec, max_tiles=16, progress=False, log=lambda s: None)
    store = open_store(url)
    store.update_meta(render_levels={"block": 4, "levels": 1})  # as if another version had made it
    before = store.done_count()
    with pytest.raises(JobSpecError, match=r"records pyramid levels 1\.\.1 .* writes 1\.\.2"):
        run_job(spec, progress=False, log=lambda s: None)
    assert open_store(url).done_count() == before
