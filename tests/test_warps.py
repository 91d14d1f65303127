"""Axis warps (creps.warp): parsed never evaluated, maps of the coordinate vectors, tiles still bit-exact."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

import creps
from creps import Canvas, Generator, preset, warp
from jobs import JobSpecError
from jobs.spec import JobSpec

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny() -> Generator:
    torch.manual_seed(1)
    return Generator(preset("tiny")).eval()


def test_parse_and_canonical_forms():
    assert warp.canonical("") == warp.canonical("none") == warp.canonical("identity") == ""
    assert warp.canonical("mirror") == "mirror:0.5"
    assert warp.canonical(" SCALE:2 ") == "scale:2,0.5"
    assert warp.canonical("sine:0.02,3") == "sine:0.02,3,0"
    assert warp.canonical("barrel:-0.25") == "barrel:-0.25,0.5,0.5"
    assert warp.canonical("shift:0.1;mirror") == "shift:0.1;mirror:0.5"
    assert warp.canonical(["shift:0.1", "mirror:0"]) == "shift:0.1;mirror:0"  # a repeated flag chains
    assert warp.canonical(warp.canonical("sine:1e-2,3.5,0.25")) == warp.canonical("sine:1e-2,3.5,0.25")


@pytest.mark.parametrize(
    "text, match",
    [
        ("twist:1", "unknown warp 'twist'"),
        ("__import__('os').system('true')", "unknown warp"),
        ("shift:1+1", "arguments must be numbers"),
        ("shift", r"expected shift:d"),
        ("sine:0.1", r"expected sine:amp,freq\[,phase\]"),
        ("mirror:0.5,1", r"expected mirror\[:c\]"),
        ("shift:nan", "finite"),
        ("scale:inf", "finite"),
        ("scale:0", "scale 0"),
        ("barrel:0.1,0.5,0", "radius"),
    ],
)
def test_bad_warps_are_refused(text, match):
    with pytest.raises(ValueError, match=match):
        warp.parse(text)


def test_each_warp_maps_coordinates_as_documented():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)

    def ap(text: str) -> list[float]:
        return warp.apply(text, t).tolist()

    assert ap("shift:0.5") == [0.5, 0.75, 1.0, 1.5]
    assert ap("scale:2") == [-0.5, 0.0, 0.5, 1.5]
    assert ap("scale:2,0") == [0.0, 0.5, 1.0, 2.0]
    assert ap("mirror") == [1.0, 0.75, 0.5, 0.0]
    assert ap("mirror:0") == [0.0, -0.25, -0.5, -1.0]
    assert ap("sine:0.1,1") == pytest.approx([v + 0.1 * math.sin(2 * math.pi * v) for v in t.tolist()])
    u = [(v - 0.5) / 0.5 for v in t.tolist()]
    assert ap("barrel:0.2") == pytest.approx([0.5 + 0.5 * x * (1 + 0.2 * x * x) for x in u])
    assert ap("shift:0.5;mirror") == [0.5, 0.25, 0.0, -0.5]  # left to right


def test_canvas_applies_warps_in_float64_before_rounding():
    plain = Canvas(50, 70, y=(-0.3, 1.2))
    cv = Canvas(50, 70, y=(-0.3, 1.2), warp_rows="sine:0.05,3", warp_cols="mirror")
    assert cv.warp_rows == "sine:0.05,3,0" and cv.warp_cols == "mirror:0.5"
    i = torch.arange(50, dtype=torch.float64)
    lin = -0.3 + 1.5 * i / 49
    assert torch.equal(cv.row_coords(), (lin + 0.05 * torch.sin(2 * math.pi * (3 * lin + 0))).to(torch.float32))
    assert torch.equal(cv.col_coords(), (1.0 - torch.arange(70, dtype=torch.float64) / 69).to(torch.float32))
    # no warp: exactly the old vectors
    assert torch.equal(Canvas(50, 70, y=(-0.3, 1.2), warp_rows="none").row_coords(), plain.row_coords())
    with pytest.raises(ValueError, match="unknown warp"):
        Canvas(4, 4, warp_cols="spin:1")
    with pytest.raises(ValueError, match="beyond float32"):
        Canvas(4, 4, warp_rows="barrel:1e300").row_coords()


@torch.no_grad()
def test_warped_tiles_are_bit_exact_crops(tiny: Generator):
    rng = random.Random(11)
    warps = ["sine:0.05,3", "barrel:0.4", "mirror;shift:0.2", "scale:-1.5,0.3", "sine:0.2,0.5,0.1;barrel:-0.3"]
    ws = tiny.ws(tiny.z_from_seed(7), psi=0.9)
    for _ in range(8):
        h, w = rng.randint(1, 120), rng.randint(1, 120)
        cv = Canvas(
            h, w, y=(rng.uniform(-1, 0), rng.uniform(1, 2)), warp_rows=rng.choice(warps), warp_cols=rng.choice(warps)
        )
        r0, c0 = rng.randrange(h), rng.randrange(w)
        rows, cols = (r0, rng.randint(r0 + 1, h)), (c0, rng.randint(c0 + 1, w))
        full = tiny.render(ws, cv, pixel_block=256)
        tile = tiny.render(ws, cv, rows=rows, cols=cols, pixel_block=256)
        assert torch.equal(tile, full[:, :, rows[0] : rows[1], cols[0] : cols[1]]), (cv, rows, cols)


@torch.no_grad()
def test_a_warp_renders_the_warped_image(tiny: Generator):
    """I(f(y), g(x)): a mirror warp mirrors the picture, a shift moves the window."""
    ws = tiny.ws(tiny.z_from_seed(2))
    img = tiny.render(ws, Canvas(33, 41))
    mirrored = tiny.render(ws, Canvas(33, 41, warp_cols="mirror"))
    assert torch.allclose(mirrored, img.flip(3), atol=1e-5)
    shifted = tiny.render(ws, Canvas(33, 41, warp_rows="shift:0.25"))
    assert torch.allclose(shifted, tiny.render(ws, Canvas(33, 41, y=(0.25, 1.25))), atol=1e-5)
    # docs/experiments.md: 180 degrees is two mirrors; 90 degrees is a mirrored render, transposed
    both = tiny.render(ws, Canvas(33, 41, warp_rows="mirror", warp_cols="mirror"))
    assert torch.allclose(both, torch.rot90(img, 2, dims=(2, 3)), atol=1e-5)
    quarter = mirrored.transpose(2, 3)
    assert quarter.shape[2:] == (41, 33) and torch.allclose(quarter, torch.rot90(img, 1, dims=(2, 3)), atol=1e-5)


def test_job_spec_warps_identity_and_flags():
    plain = JobSpec(checkpoint="preset:tiny", out="memory://w/a.zarr")
    assert "warp_rows" not in plain.identity()  # stores rendered before warps keep their identity
    spec = JobSpec(checkpoint="preset:tiny", out="memory://w/a.zarr", warp_rows="mirror", warp_cols="sine:0.1,2")
    assert spec.identity()["warp_rows"] == "mirror:0.5" and spec.identity()["warp_cols"] == "sine:0.1,2,0"
    assert (
        JobSpec(checkpoint="preset:tiny", out="x", warp_rows="mirror:0.5").identity()
        == JobSpec(checkpoint="preset:tiny", out="x", warp_rows="mirror").identity()
    )
    with pytest.raises(JobSpecError, match="warp_cols: unknown warp"):
        JobSpec(checkpoint="preset:tiny", out="x", warp_cols="rotate:30")
    import render
    from jobs.cli import spec_from_args

    args = render.build_parser().parse_args(
        ["render", "--checkpoint", "preset:tiny", "--warp-rows", "shift:0.1", "--warp-rows", "mirror", "--out", "x"]
    )
    assert spec_from_args(args).warp_rows == "shift:0.1;mirror:0.5" and spec_from_args(args).warp_cols == ""


def test_warped_job_writes_the_full_frame_bytes(render_reference):
    """A tiled job (stored line features, many tiles) equals one full-frame render of the warped canvas."""
    from jobs.run import run_job
    from renderer.store import open_store

    spec = JobSpec(
        checkpoint="preset:tiny",
        height=70,
        width=90,
        tile=16,
        seed=3,
        warp_rows="barrel:0.5",
        warp_cols="sine:0.1,2;mirror",
        out="memory://warps/img.zarr",
        exports=False,
    )
    assert run_job(spec, progress=False, log=lambda s: None)["status"] == "done"
    got = open_store(spec.out, mode="r").read_region(0, 0, 70, 0, 90)
    G = creps.load("preset:tiny")
    with torch.no_grad():
        cv = Canvas(70, 90, warp_rows="barrel:0.5", warp_cols="sine:0.1,2;mirror")
        want = creps.to_uint8(G.render(G.z_from_seed(3), cv))[0].numpy()
    assert np.array_equal(got, want)
    assert not np.array_equal(got, render_reference(70, 90, seed=3))


def test_job_with_an_overflowing_warp_is_refused_before_anything_runs(tmp_path):
    from jobs.run import prepare

    with pytest.raises(JobSpecError, match="beyond float32"):
        prepare(JobSpec(checkpoint="preset:tiny", warp_rows="barrel:1e300", out=str(tmp_path / "a.zarr")))
