"""Whole render jobs on an embedded 2-CPU Ray: bytes, store layout, resume, memory."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import zarr

import creps
from jobs import JobSpecError
from jobs.run import run_job
from jobs.spec import JobSpec
from renderer.store import open_store


def _spec(tmp_path, **kw) -> JobSpec:
    base = dict(
        checkpoint="preset:tiny",
        tile=32,
        out=str(tmp_path / "img.zarr") if tmp_path else "",
        workers=2,
        threads_per_worker=1,
        exports=False,
    )
    return JobSpec(**{**base, **kw})


def _level0(url: str) -> np.ndarray:
    return np.asarray(zarr.open_group(url, mode="r")["0"][:])


def test_store_layout_metadata_and_lines(tmp_path, render_ray):
    spec = _spec(tmp_path, height=80, width=120, tile=32, seed=2)
    run_job(spec, progress=False)
    store = open_store(spec.out, mode="r")
    arr = store.level(0)
    assert arr.shape == (3, 80, 120) and arr.chunks == (3, 32, 32) and arr.dtype == np.uint8
    assert list(arr.metadata.dimension_names) == ["c", "y", "x"]
    assert type(arr.compressors[0]).__name__.startswith("Zstd")
    meta = store.meta
    # auto shard: 1 on a local disk; auto block: 1 for 3 x 4 tiles (too few for blocks)
    assert meta["spec"] == {**spec.to_dict(), "shard": 1, "block": 1} and meta["status"] == "done"
    assert meta["checkpoint_sha256"] == creps.checkpoint_hash("preset:tiny", 0)
    assert meta["tiles_total"] == meta["tiles_done"] == 12 and meta["version"].startswith("creps-gigapixel")
    assert meta["last_run"]["tiles_rendered"] == 12
    assert store.done_tiles() == {f"r{i}_c{j}" for i in range(3) for j in range(4)}
    ome = store.group.attrs["ome"]
    assert ome["version"] == "0.5" and ome["multiscales"][0]["datasets"][0]["path"] == "0"
    # the line stage ran once for the job and its arrays are exactly G.lines of the full vectors
    assert store.lines_complete()
    G = creps.load("preset:tiny")
    canvas = creps.Canvas(80, 120)
    with torch.no_grad():
        ws = G.ws(G.z_from_seed(2), 1.0)
        rows = G.lines(ws, canvas.row_coords(), "row")[0].numpy()
        cols = G.lines(ws, canvas.col_coords(), "col")[0].numpy()
    np.testing.assert_array_equal(store.line_array("row")[:], rows)
    np.testing.assert_array_equal(store.line_array("col")[:], cols)


def test_ome_zarr_valid(tmp_path, render_ray):
    ome_models = pytest.importorskip("ome_zarr_models.v05.image")
    spec = _spec(tmp_path, height=48, width=40, tile=16)
    run_job(spec, progress=False)
    image = ome_models.Image.from_zarr(zarr.open_group(spec.out, mode="r"))  # raises when not valid OME-Zarr 0.5
    (ms,) = image.attributes.ome.multiscales
    assert ms.name == spec.name
    assert [(a.name, a.type) for a in ms.axes] == [("c", "channel"), ("y", "space"), ("x", "space")]
    # 3 x 3 tiles: no block levels during the render, so level 0 alone, at scale 1
    assert [(d.path, d.coordinateTransformations[0].scale) for d in ms.datasets] == [("0", [1.0, 1.0, 1.0])]
    level0 = image.members["0"]
    assert list(image.members) == ["0"] and level0.shape == (3, 48, 40) and str(level0.data_type) == "uint8"
    assert level0.dimension_names == ("c", "y", "x")
    assert level0.chunk_grid["configuration"]["chunk_shape"] == (3, 16, 16)


def test_resume_renders_only_missing_and_refuses_other_jobs(tmp_path, render_ray, render_reference):
    spec = _spec(tmp_path, height=90, width=100, tile=32)  # 3 x 4 = 12 tiles
    first = run_job(spec, max_tiles=5, progress=False)
    assert first["tiles_rendered"] == 5 and first["status"] == "partial"
    second = run_job(spec, progress=False)
    assert second["tiles_rendered"] == 7 and second["tiles_skipped"] == 5
    assert second["line_ranges_computed"] == 0  # lines reused, never recomputed
    np.testing.assert_array_equal(_level0(spec.out), render_reference(90, 100))
    third = run_job(JobSpec.from_dict({**spec.to_dict(), "workers": 1}), progress=False)
    assert third["tiles_rendered"] == 0 and third["workers"] == 0  # nothing to do: no Ray work at all

    before = sorted(os.listdir(spec.out))
    other = JobSpec.from_dict({**spec.to_dict(), "seed": 1})
    with pytest.raises(JobSpecError, match=r"holds a different job \(seed: 0 -> 1\)"):
        run_job(other, progress=False)
    assert sorted(os.listdir(spec.out)) == before
    again = run_job(other, overwrite=True, progress=False)
    assert again["tiles_rendered"] == 12
    np.testing.assert_array_equal(_level0(spec.out), render_reference(90, 100, seed=1))


@pytest.mark.parametrize(
    "kw",
    [
        dict(height=100, width=150, tile=32),  # sides not multiples of the tile
        dict(height=97, width=200, tile=16, shard=3, seed=5, psi=0.7, view=(0.1, 0.6, -0.5, 1.5)),
        dict(height=64, width=64, tile=64, workers=2, compressor="none"),  # one tile, one idle worker
        dict(height=130, width=70, tile=48, workers=1, batch=1),  # tile not a multiple of LINE_BLOCK
    ],
    ids=["100x150-t32", "97x200-t16-shard3-view", "64x64-one-tile", "130x70-t48-1w"],
)
def test_multiworker_bytes_equal_single_process(tmp_path, render_ray, render_reference, kw):
    spec = _spec(tmp_path, **kw)
    summary = run_job(spec, progress=False)
    assert summary["status"] == "done" and summary["tiles_rendered"] == summary["tiles_total"]
    ref = render_reference(spec.height, spec.width, spec.seed, spec.psi, spec.view)
    np.testing.assert_array_equal(_level0(spec.out), ref)


def test_peak_memory_bounded_by_tiles_not_canvas(tmp_path):
    """The same number of 256^2 tiles rendered from a 2048^2 and an 8192^2 canvas (16x the
    pixels, 4x the lines), each job in a fresh process: peak RSS of the driver and of the
    workers does not grow with the canvas (an 8192^2 uint8 image alone is 192 MB).  Was
    4096^2 vs 16384^2 at tile 512, run by hand; the same ratios fit the suite."""
    import subprocess
    import sys

    from conftest import REPO, render_cli_env

    peaks = {}
    for side in (2048, 8192):
        out = subprocess.run(
            [
                sys.executable,
                str(REPO / "render.py"),
                "render",
                "--checkpoint",
                "preset:tiny",
                "--size",
                str(side),
                "--tile",
                "256",
                "--workers",
                "2",
                "--threads-per-worker",
                "1",
                "--batch",
                "1",
                "--block",
                "4",
                "--max-tiles",
                "32",
                "--out",
                str(tmp_path / f"m{side}.zarr"),
                "--no-exports",
                "--quiet",
            ],
            capture_output=True,
            text=True,
            env=render_cli_env(),
            timeout=1200,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        s = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("summary "))[8:])
        assert s["tiles_rendered"] == 32  # two whole blocks of 4 x 4 tiles, with their levels 1-2
        peaks[side] = (s["driver_peak_rss_mb"], s["worker_peak_rss_mb"])
        print(json.dumps({"side": side, **{k: s[k] for k in ("driver_peak_rss_mb", "worker_peak_rss_mb", "seconds")}}))
    (d4, w4), (d16, w16) = peaks[2048], peaks[8192]
    assert d16 < d4 * 1.2 + 30 and w16 < w4 * 1.2 + 30, peaks


def test_memory_store_renders_in_process(render_reference):
    """memory:// lives in this process only, so the job renders here, without Ray."""
    spec = _spec(None, height=70, width=90, tile=32, seed=3, out="memory://jobs-test/img.zarr")
    summary = run_job(spec, progress=False, log=lambda s: None)
    assert summary["status"] == "done" and summary["workers"] == 1
    from renderer.store import open_store

    got = open_store("memory://jobs-test/img.zarr", mode="r").read_region(0, 0, 70, 0, 90)
    assert np.array_equal(got, render_reference(70, 90, seed=3))
