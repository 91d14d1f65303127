"""The endless viewer's --precision and --warp-rows / --warp-cols: the same pixels as a render job.

A full-resolution endless tile is the render job's canvas; with a warp it is
the warped job's crop bit for bit, with bf16 it is within the error budget of
fp32 (docs/performance.md) and has its own cache key, and fp32 / unwarped
images keep the keys they had before these options existed.
"""

from __future__ import annotations

import argparse
import io

import numpy as np
import pytest
import torch
from PIL import Image

import creps
from renderer.dzi import level_size, max_level, tile_bounds, tile_grid
from viewer import cli
from viewer.endless import EndlessTiles, TileWorker, open_endless
from viewer.errors import ViewerError
from viewer.ondemand import ImageSpec

H, W, VIEW, SEED, PSI = 200, 300, (-0.25, 1.5, 0.1, 0.9), 7, 0.8
WARP_ROWS = ["sine:0.05,2", "mirror"]  # chained, as a repeated flag
WARP_COLS = ["barrel:0.3"]


def decode(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).transpose(2, 0, 1)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(argv)


def tiny(**kw) -> EndlessTiles:
    """The tiny preset's H x W image over VIEW, PNG tiles in memory, one render thread."""
    base = dict(seed=SEED, psi=PSI, width=W, height=H, view=VIEW, fmt="png", threads=1, cache_url=None)
    return open_endless("preset:tiny", **{**base, **kw})


def full_resolution(src: EndlessTiles) -> np.ndarray:
    """Every top-level tile of ``src`` pasted into one uint8 (3, H, W) image."""
    top = max_level(W, H)
    out = np.zeros((3, H, W), dtype=np.uint8)
    ncols, nrows = tile_grid(W, H, top)
    for col in range(ncols):
        for row in range(nrows):
            y0, y1, x0, x1 = tile_bounds(W, H, top, col, row)
            out[:, y0:y1, x0:x1] = decode(src.tile(top, col, row))
    return out


def spec(**kw) -> ImageSpec:
    base = dict(
        checkpoint="preset:tiny",
        checkpoint_sha256="preset:tiny@init0",
        init_seed=0,
        seed=SEED,
        psi=PSI,
        height=H,
        width=W,
        view=VIEW,
        pixel_block=8192,
    )
    return ImageSpec(**{**base, **kw})


# ---------------------------------------------------------------- cache keys
def test_fp32_and_unwarped_images_keep_their_cache_keys():
    """Defaults add nothing to the identity: caches made before these options keep their keys."""
    plain = spec()
    assert plain.key == "a71b412edf4d47f548f04c68ff4014b3"  # computed before precision and warps existed
    assert {"precision", "warp_rows", "warp_cols"}.isdisjoint(plain.identity())
    assert spec(precision="fp32", warp_rows="", warp_cols="none").key == plain.key
    lows = [spec(precision=p) for p in ("bf16", "bf16x3", "fp16")]
    keys = {s.key for s in (plain, *lows, spec(warp_rows="mirror"))}
    assert len(keys) == 5
    # plain bf16 records one product: a cache of when "bf16" meant three (bf16x3) is never its own
    assert spec(precision="bf16").identity()["precision"] == "bf16"
    assert spec(precision="bf16").identity()["bf16_products"] == 1
    # canonical text: the same warp written two ways is one image
    assert spec(warp_rows="mirror").key == spec(warp_rows="mirror:0.5").key
    assert spec(warp_cols="sine:0.1,2").identity()["warp_cols"] == "sine:0.1,2,0"
    for bad in (dict(precision="fp8"), dict(warp_rows="twist:1"), dict(warp_cols="scale:0")):
        with pytest.raises(ViewerError):
            spec(**bad)


# ---------------------------------------------------------------- precision
def test_bf16_tiles_are_within_the_error_budget_of_fp32_and_equal_the_render_path():
    fp32, bf16 = tiny(), tiny(precision="bf16")
    try:
        assert fp32.spec.key != bf16.spec.key and "bf16" in bf16.engine.describe()
        exact, low = full_resolution(fp32), full_resolution(bf16)
        diff = np.abs(exact.astype(np.int16) - low.astype(np.int16))
        assert (diff <= 1).mean() >= 0.99 and diff.max() <= 4, (diff.max(), (diff <= 1).mean())
        assert diff.any()  # bf16 did run: a few pixels round the other way
        # the precision is really used: the bf16 pixels are G.render's in bf16 (lowered weights, fp32 lines)
        G = creps.load("preset:tiny")
        canvas = creps.Canvas(H, W, y=VIEW[:2], x=VIEW[2:])
        with torch.no_grad():
            ref = G.render(G.z_from_seed(SEED), canvas, psi=PSI, pixel_block=bf16.spec.pixel_block, precision="bf16")
        np.testing.assert_array_equal(low, creps.to_uint8(ref)[0].numpy())
        # a Ray actor's body gets precision (and warps) from the spec alone
        key = (max_level(W, H), 1, 0)
        assert TileWorker(bf16.spec, "cpu", 0).tile(*key, "png", 90)[0] == bf16.tile(*key)
    finally:
        fp32.close()
        bf16.close()


# ---------------------------------------------------------------- warps
def test_warped_full_resolution_tiles_equal_a_warped_render_job(tmp_path):
    """`render.py render --warp-rows ... --warp-cols ...` (in process) and `render.py view` with the same flags."""
    import render
    from renderer.store import open_store

    flags = [f"--warp-rows={w}" for w in WARP_ROWS] + [f"--warp-cols={w}" for w in WARP_COLS]
    where = ["--seed", str(SEED), "--psi", str(PSI), "--size", f"{W}x{H}", "--view=" + ",".join(map(str, VIEW))]
    out = tmp_path / "warped.zarr"
    argv = ["render", "--checkpoint", "preset:tiny", *where, *flags, "--tile", "64", "--workers", "0"]
    assert render.main([*argv, "--no-exports", "--quiet", "--out", str(out)]) == 0
    job = open_store(str(out)).read_region(0, 0, H, 0, W)

    opts = cli.endless_options(parse(["--checkpoint", "preset:tiny", *where, *flags, "--tile-format", "png"]), None)
    assert (opts["warp_rows"], opts["warp_cols"]) == ("sine:0.05,2,0;mirror:0.5", "barrel:0.3,0.5,0.5")
    src = open_endless("preset:tiny", **{**opts, "threads": 1, "cache_url": None})
    try:
        assert src.spec.identity()["warp_rows"] == "sine:0.05,2,0;mirror:0.5"
        np.testing.assert_array_equal(full_resolution(src), job)
        # a coarser level: the same warp on the coarser grid of the same window
        top = max_level(W, H)
        lw, lh = level_size(W, H, top - 1)
        canvas = creps.Canvas(lh, lw, y=VIEW[:2], x=VIEW[2:], warp_rows=";".join(WARP_ROWS), warp_cols=WARP_COLS[0])
        G = creps.load("preset:tiny")
        with torch.no_grad():
            ref = creps.to_uint8(G.render(G.z_from_seed(SEED), canvas, psi=PSI))[0].numpy()
        got = decode(src.tile(top - 1, 0, 0))
        np.testing.assert_array_equal(got, ref[:, : got.shape[1], : got.shape[2]])
        unwarped = tiny()
        try:
            assert unwarped.spec.key != src.spec.key
            y0, y1, x0, x1 = tile_bounds(W, H, top, 0, 0)
            assert not np.array_equal(decode(unwarped.tile(top, 0, 0)), job[:, y0:y1, x0:x1])
        finally:
            unwarped.close()
    finally:
        src.close()


# ---------------------------------------------------------------- CLI
def test_view_help_lists_precision_and_warps(capsys):
    import render

    with pytest.raises(SystemExit) as e:
        render.main(["view", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--precision {fp32,bf16,bf16x3,fp16}", "--warp-rows WARP", "--warp-cols WARP"):
        assert flag in text
    assert "pixel-stage arithmetic: fp32 (default, exact), bf16, bf16x3 or fp16" in " ".join(text.split())


def test_bad_precision_or_warp_is_one_error_line(capsys):
    import render

    tiny_flags = ["--checkpoint", "preset:tiny", "--cache-max-gb", "0"]  # nothing written, not even a cache folder

    with pytest.raises(SystemExit) as e:
        render.main(["view", "--checkpoint", "preset:tiny", "--precision", "fp8"])
    assert e.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--precision" in errors[0] and "fp8" in errors[0], errors
    for argv, message in (
        ([*tiny_flags, "--warp-rows", "twist:1"], "--warp-rows: unknown warp 'twist'"),
        ([*tiny_flags, "--warp-cols", "scale:1e300"], "beyond float32"),
        (["out/x.zarr", "--precision", "bf16"], "--precision only apply to --checkpoint"),
        (["out/x.zarr", "--warp-rows", "mirror"], "--warp-rows only apply to --checkpoint"),
    ):
        assert cli.run(parse([*argv, "--port", "0"])) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
