"""Assemble as block work (renderer.pyramid's builder on renderer.scaleout runners, renderer.blocks,
renderer.arrays): levels, dask arrays, tiles.

The cluster path (`render.py assemble --address`, DeepZoom to S3) is in test_assemble_cluster.py.
"""

from __future__ import annotations

import io
import itertools
import os

import numpy as np
import pytest
import tifffile
from conftest import pyramid_complete

import renderer
from renderer.blocks import TiffTiles, export_bands
from renderer.pyramid import build_levels, pyramid_plan, reference_pyramid
from renderer.scaleout import ThreadRunner
from renderer.store import open_store
from renderer.tiff import tile_encoder


def _store(url: str, img: np.ndarray, chunk: int):
    store = open_store(url, mode="w")
    store.create_level(0, img.shape[1], img.shape[2], chunk=chunk)
    store.write_region(0, 0, 0, img)
    return store


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (3, h, w), dtype=np.uint8)


@pytest.mark.parametrize("where", ["dask", "threads"])
def test_levels_equal_the_reference_at_odd_sizes(tmp_path, where):
    """3001 x 1999 in 256 chunks: every level odd somewhere, edge replication at each."""
    img = _image(1999, 3001)
    store = _store(str(tmp_path / "s.zarr"), img, 256)
    runner = ThreadRunner(2) if where == "threads" else None
    try:
        n = build_levels(store, runner, workers=2, band_pixels=1 << 18)  # several bands per level
    finally:
        if runner is not None:
            runner.close()
    ref = reference_pyramid(img, 256)
    assert n == len(ref) == store.level_count() == 5 and pyramid_complete(store)
    for k, r in enumerate(ref):
        np.testing.assert_array_equal(store.read_region(k, 0, r.shape[1], 0, r.shape[2]), r, err_msg=f"level {k}")
    assert build_levels(store, runner=None) == n  # complete: nothing to do


def test_levels_written_by_the_render_are_kept(tmp_path):
    """A store whose levels 1..2 came with the render (meta render_levels): only levels 3.. are built,
    from level 2, and the record counts 1..2 as written."""
    img = _image(701, 523, seed=1)
    store = _store(str(tmp_path / "s.zarr"), img, 32)
    ref = reference_pyramid(img, 32)
    for k in (1, 2):
        store.create_level(k, ref[k].shape[1], ref[k].shape[2], chunk=32)
        store.write_region(k, 0, 0, ref[k])
    store.update_meta(render_levels={"block": 4, "levels": 2})
    chunk_file = tmp_path / "s.zarr" / "1" / "c" / "0" / "0" / "0"
    stamp = os.stat(chunk_file).st_mtime_ns
    before = {k: store.level(k) for k in (1, 2)}
    n = build_levels(store, workers=2)
    assert n == len(ref) and pyramid_complete(store)
    assert os.stat(chunk_file).st_mtime_ns == stamp  # level 1 not rewritten
    assert all(store.level(k).shape == before[k].shape for k in (1, 2))
    for k, r in enumerate(ref):
        np.testing.assert_array_equal(store.read_region(k, 0, r.shape[1], 0, r.shape[2]), r, err_msg=f"level {k}")
    assert store.pyramid_progress()["rows"] == {str(k): h for k, (h, _) in enumerate(pyramid_plan(store)) if k}


def test_open_pyramid_is_lazy_and_equals_zarr_reads(tmp_path):
    img = _image(301, 517, seed=2)
    store = _store(str(tmp_path / "s.zarr"), img, 64)
    build_levels(store, workers=2)
    levels = renderer.open_pyramid(store.url)
    assert len(levels) == store.level_count() == 5
    for k, lv in enumerate(levels):
        arr = store.level(k)
        assert lv.shape == arr.shape and lv.dtype == np.uint8
        assert lv.chunksize == (3, min(64, arr.shape[1]), min(64, arr.shape[2]))
        np.testing.assert_array_equal(lv.compute(), np.asarray(arr[:]))
    # a lazy expression: a level's mean colour, and an odd window of level 1
    np.testing.assert_allclose(levels[2].mean(axis=(1, 2)).compute(), np.asarray(store.level(2)[:]).mean(axis=(1, 2)))
    np.testing.assert_array_equal(levels[1][:, 13:101, 7:200].compute(), np.asarray(store.level(1)[:, 13:101, 7:200]))


@pytest.mark.parametrize("compression", ["jpeg", "zstd", "deflate", "none"])
def test_tiff_tiles_are_the_bytes_tifffile_makes(compression):
    """Tiles encoded by the bands (edge tiles padded) are byte for byte what tifffile writes itself."""
    y, x = np.mgrid[0:300, 0:520]
    img = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    codec = {"jpeg": "jpeg", "zstd": "zstd", "deflate": "adobe_deflate", "none": None}[compression]
    extra = {"compressionargs": {"level": 90}} if compression == "jpeg" else {"predictor": True} if codec else {}
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf, bigtiff=True) as tif:
        tif.write(img, tile=(256, 256), photometric="rgb", planarconfig="contig", compression=codec, **extra)
    data = buf.getvalue()
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages[0]
        theirs = [data[o : o + n] for o, n in zip(page.dataoffsets, page.databytecounts, strict=True)]
    encode = tile_encoder(compression, 90, 256)
    ours = [encode(img[r : r + 256, c : c + 256]) for r in range(0, 300, 256) for c in range(0, 520, 256)]
    assert ours == theirs


def test_export_bands_cover_every_row_once():
    """Bands split a level into whole TIFF tile rows and chunk rows; DeepZoom rows go to exactly one band."""
    from renderer.blocks import DziTiles

    for h, w, chunk in [(1999, 3001, 256), (301, 517, 64), (5, 7, 64)]:
        bands = export_bands(h, w, 0, 12, chunk, TiffTiles(256), DziTiles("x"), pixels=1 << 18)
        assert bands[0].a == 0 and bands[-1].b == h
        assert all(p.b == q.a for p, q in itertools.pairwise(bands))
        assert all(b.a % 256 == 0 and b.a % chunk == 0 for b in bands)
        rows = [r for b in bands for r in range(*b.dzi_rows)]
        assert rows == list(range(-(-h // 254)))


class _FailingRunner(ThreadRunner):
    """Local threads that fail the ``fail_at``-th task submitted (a node lost mid-pass, say)."""

    def __init__(self, fail_at: int) -> None:
        super().__init__(1)
        self.calls, self.fail_at = 0, fail_at

    def submit(self, fn, *args):
        self.calls += 1
        if self.calls == self.fail_at:
            return super().submit(_boom)
        return super().submit(fn, *args)


def _boom():
    raise OSError("lost")


def test_a_stopped_pass_resumes_from_its_recorded_rows(tmp_path):
    """Each finished band advances its level's prefix in the progress record; the next pass starts
    there (the finished chunk rows are not written again) and ends with the reference pyramid."""
    from renderer.errors import RendererError

    img = _image(700, 300, seed=3)
    store = _store(str(tmp_path / "s.zarr"), img, 32)
    runner = _FailingRunner(fail_at=4)  # level 1 has 11 bands of one chunk row: the 4th fails
    with pytest.raises(RendererError, match="cannot build pyramid level 1 .*lost"):
        build_levels(store, runner, band_pixels=1)
    runner.close()
    assert store.pyramid_progress()["rows"]["1"] == 96 and not pyramid_complete(store)
    first = tmp_path / "s.zarr" / "1" / "c" / "0" / "0" / "0"
    stamp = os.stat(first).st_mtime_ns
    build_levels(store, workers=2)
    assert pyramid_complete(store) and os.stat(first).st_mtime_ns == stamp
    for k, r in enumerate(reference_pyramid(img, 32)):
        np.testing.assert_array_equal(store.read_region(k, 0, r.shape[1], 0, r.shape[2]), r, err_msg=f"level {k}")
