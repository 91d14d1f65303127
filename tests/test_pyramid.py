"""renderer.pyramid: exact 2x2 rule against numpy, shapes, NGFF validation, the builder's record and resume, fsspec URLs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from conftest import pyramid_complete

from renderer.errors import RendererError
from renderer.pyramid import build_levels, downsample, halvings, level_bands, reference_pyramid
from renderer.store import level_shapes, open_store


def make_store(url: str, height: int, width: int, chunk: int, seed: int = 0):
    img = np.random.default_rng(seed).integers(0, 256, (3, height, width), dtype=np.uint8)
    store = open_store(url, mode="w")
    store.create_level(0, height, width, chunk=chunk)
    store.write_region(0, 0, 0, img)
    return store, img


def read_level(store, k: int) -> np.ndarray:
    return np.asarray(store.level(k)[:])


def test_rule_on_hand_values():
    # 2x2 block (1,2,3,4) -> (10+2)//4 = 3; odd column repeats: (5,5,6,6) -> 5.5 -> 6 (half up);
    # lone corner stays 7
    block = np.array([[[1, 2, 5], [3, 4, 6], [7, 0, 7]]], np.uint8)[:, :, :]
    out = downsample(block)
    assert out.shape == (1, 2, 2)
    assert out[0, 0, 0] == 3 and out[0, 0, 1] == 6
    assert out[0, 1, 0] == (7 + 0 + 1) // 2 and out[0, 1, 1] == 7
    assert downsample(np.full((1, 2, 2), 255, np.uint8))[0, 0, 0] == 255  # no overflow


@pytest.mark.parametrize(
    "height,width,chunk",
    [(301, 517, 64), (517, 301, 64), (64, 64, 64), (65, 1, 16), (1000, 37, 16), (128, 256, 32)],
)
def test_levels_equal_numpy_reference(tmp_path, height, width, chunk):
    store, img = make_store(str(tmp_path / "s.zarr"), height, width, chunk)
    n = build_levels(store, workers=2)
    ref = reference_pyramid(img, chunk)
    assert n == len(ref) == store.level_count()
    assert [store.level(k).shape[1:] for k in range(n)] == level_shapes(height, width, chunk)
    assert max(store.level(n - 1).shape[1:]) <= chunk
    if n > 1:
        assert max(store.level(n - 2).shape[1:]) > chunk
    for k in range(1, n):
        assert store.level(k).chunks == (3, chunk, chunk)
        np.testing.assert_array_equal(read_level(store, k), ref[k])


def test_shapes_for_odd_nonsquare():
    assert level_shapes(301, 517, 64) == [(301, 517), (151, 259), (76, 130), (38, 65), (19, 33)]
    assert level_shapes(16384, 16384, 512)[-1] == (512, 512)
    assert len(level_shapes(16384, 16384, 512)) == 6
    with pytest.raises(RendererError, match="min_size must be >= 1"):
        level_shapes(10, 10, 0)


def test_halvings_of_a_block_are_the_whole_image_levels():
    """A block of whole chunks (2^L of them per side, or up to the image's edge) halved L times is
    exactly its part of each level of the whole image; the render writes it, verify compares it."""
    img = np.random.default_rng(5).integers(0, 256, (3, 150, 201), dtype=np.uint8)
    ref = reference_pyramid(img, 16)
    for y, x in [(0, 0), (64, 128), (128, 192)]:  # inside, and blocks cut by the bottom/right edges
        block = img[:, y : y + 64, x : x + 64]
        got = list(halvings(block, y, x, 2))
        assert [(k, yk, xk) for k, yk, xk, _ in got] == [(1, y // 2, x // 2), (2, y // 4, x // 4)]
        for k, yk, xk, px in got:
            np.testing.assert_array_equal(px, ref[k][:, yk : yk + px.shape[1], xk : xk + px.shape[2]])


def test_level_bands_are_whole_chunk_rows_from_the_resume_row():
    assert level_bands(151, 259, 16, pixels=16 * 259 * 2) == [(0, 32), (32, 64), (64, 96), (96, 128), (128, 151)]
    assert level_bands(151, 259, 16, start=64, pixels=1) == [(r, min(r + 16, 151)) for r in range(64, 151, 16)]
    assert level_bands(40, 7, 16, pixels=1 << 20) == [(0, 40)]


def test_ome_zarr_models_validates(tmp_path):
    from ome_zarr_models.v05.image import Image

    store, _ = make_store(str(tmp_path / "s.zarr"), 301, 517, 64)
    build_levels(store)
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    image = Image.from_zarr(group)
    ms = image.ome_attributes.multiscales[0]
    assert [d.path for d in ms.datasets] == ["0", "1", "2", "3", "4"]
    scale = ms.datasets[1].coordinateTransformations[0].scale
    assert scale[0] == 1.0 and scale[1] == pytest.approx(301 / 151) and scale[2] == pytest.approx(517 / 259)
    assert group.attrs["ome"]["omero"]["channels"][0]["color"] == "FF0000"


def test_memory_url_and_rerun_is_noop():
    store, img = make_store("memory://pyr-test", 200, 130, 32)
    assert not pyramid_complete(store)
    n = build_levels(store)
    assert pyramid_complete(store)
    ref = reference_pyramid(img, 32)
    for k in range(1, n):
        np.testing.assert_array_equal(read_level(store, k), ref[k])
    store.level(1)[:, :32, :32] = 0  # a complete pyramid is left alone on re-run
    assert build_levels(store) == n
    assert not read_level(store, 1)[:, :32, :32].any()
    build_levels(store, force=True)
    np.testing.assert_array_equal(read_level(store, 1), ref[1])


def test_resume_finishes_and_keeps_finished_rows(tmp_path):
    url = str(tmp_path / "s.zarr")
    store, img = make_store(url, 301, 517, 16)
    n = build_levels(store)
    ref = reference_pyramid(img, 16)
    # Simulate a run killed part-way: each level's recorded prefix is shorter and the rows after
    # it hold garbage; a sentinel inside a finished prefix shows finished rows are not recomputed.
    prog_path = tmp_path / "s.zarr" / "pyramid.json"
    prog = json.loads(prog_path.read_text())
    partial = {1: 64, 2: 32, 3: 16, 4: 0}
    for k, rows in partial.items():
        prog["rows"][str(k)] = rows
        store.level(k)[:, rows:, :] = 77
    prog_path.write_text(json.dumps(prog))
    store.level(1)[:, 0, 0] = 1  # sentinel in a finished chunk row
    assert not pyramid_complete(store)
    assert build_levels(store) == n
    assert pyramid_complete(store)
    lvl1 = read_level(store, 1)
    assert (lvl1[:, 0, 0] == 1).all()
    lvl1[:, 0, 0] = ref[1][:, 0, 0]
    np.testing.assert_array_equal(lvl1, ref[1])
    for k in range(2, n):
        np.testing.assert_array_equal(read_level(store, k), ref[k])


def test_resume_clamps_inconsistent_progress(tmp_path):
    store, img = make_store(str(tmp_path / "s.zarr"), 150, 90, 16)
    n = build_levels(store)
    prog_path = tmp_path / "s.zarr" / "pyramid.json"
    prog = json.loads(prog_path.read_text())
    prog["rows"] = {"1": 16, "2": 38, "3": 19, "4": 10}  # deeper levels claim more than level 1 supports
    prog_path.write_text(json.dumps(prog))
    for k in range(1, n):
        store.level(k)[:, 16:, :] = 5
    build_levels(store)
    for k, r in enumerate(reference_pyramid(img, 16)[1:], start=1):
        np.testing.assert_array_equal(read_level(store, k), r)


def test_stale_levels_replaced(tmp_path):
    url = str(tmp_path / "s.zarr")
    store, _ = make_store(url, 300, 300, 16, seed=1)
    build_levels(store)
    assert store.level_count() == 6
    store2, img2 = make_store(url, 100, 40, 16, seed=2)  # re-rendered smaller, old levels gone by 'w'
    store2.create_level(5, 3, 3, chunk=16)  # a stray deeper level from an older plan
    n = build_levels(store2)
    assert n == store2.level_count() == 4
    assert not store2.has_level(5)
    for k, r in enumerate(reference_pyramid(img2, 16)[1:], start=1):
        np.testing.assert_array_equal(read_level(store2, k), r)


def test_missing_level0_is_one_clear_error(tmp_path):
    store = open_store(str(tmp_path / "empty.zarr"), mode="w")
    with pytest.raises(RendererError, match="no level 0"):
        build_levels(store)
