"""Precision as a job parameter: fp32 stays exact, bf16/fp16 stay within the error budget
(uint8 within 1 level of fp32 on >= 99 % of pixels, at most 4 levels; docs/performance.md),
and a store remembers the precision it was rendered in."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import creps
from creps import Canvas
from creps.precision import exact_matmuls, matmul_mode
from jobs import JobSpecError
from jobs.run import prepare, run_job
from jobs.spec import JobSpec, same_identity
from renderer.store import open_store

BUNDLED = Path(creps.__file__).parent / "weights" / "default.safetensors"
BUDGET_WITHIN_1 = 0.99
BUDGET_MAX = 4


def _budget(ref: torch.Tensor, low: torch.Tensor) -> tuple[float, int]:
    """(share of uint8 values within one level of the reference, largest difference in levels)."""
    d = (creps.to_uint8(ref).int() - creps.to_uint8(low).int()).abs()
    return float((d <= 1).float().mean()), int(d.max())


@pytest.fixture(scope="module")
def ffhq() -> creps.Generator:
    return creps.load("preset:ffhq512")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("model", ["ffhq512", "bundled"])
@torch.no_grad()
def test_low_precision_within_error_budget_on_cpu(ffhq, model, precision):
    """The CPU emulation of bf16/fp16 (creps.precision) on small canvases; the same rounding as the
    GPU kernels up to the order of fp32 sums.  Seed 1 of ffhq512 is the one plain bf16 failed (83.6 %)."""
    if model == "bundled" and not BUNDLED.exists():
        pytest.skip("no bundled weights in this checkout")
    G = ffhq if model == "ffhq512" else creps.load(str(BUNDLED))
    for seed in (0, 1):
        z = G.z_from_seed(seed)
        cv = Canvas(96, 128, x=(0.1, 0.9))
        ref = G.render(z, cv)
        low = G.render(z, cv, precision=precision)
        within, worst = _budget(ref, low)
        assert within >= BUDGET_WITHIN_1 and worst <= BUDGET_MAX, (model, precision, seed, within, worst)
        assert not torch.equal(ref, low)  # it did run in another arithmetic


@torch.no_grad()
def test_fp32_is_the_default_and_unchanged():
    torch.manual_seed(1)
    G = creps.Generator(creps.preset("tiny")).eval()
    cv = Canvas(50, 70)
    z = G.z_from_seed(3)
    base = G.render(z, cv)
    assert torch.equal(G.render(z, cv, precision="fp32"), base)
    tile = G.render(z, cv, rows=(5, 40), cols=(10, 69), precision="fp32")
    assert torch.equal(tile, base[:, :, 5:40, 10:69])
    ws = G.ws(z)
    R, C = G.lines(ws, cv.row_coords(), "row"), G.lines(ws, cv.col_coords(), "col")
    assert torch.equal(G.pixels(ws, R, C, precision="fp32"), base)


@torch.no_grad()
def test_low_precision_tiles_are_exact_crops_too():
    """bf16/fp16 change the arithmetic, not the blocking: a tile still equals the crop of a full render."""
    torch.manual_seed(2)
    G = creps.Generator(creps.preset("tiny")).eval()
    cv = Canvas(70, 90)
    z = G.z_from_seed(0)
    for precision in ("bf16", "fp16"):
        full = G.render(z, cv, precision=precision)
        tile = G.render(z, cv, rows=(13, 61), cols=(30, 88), precision=precision)
        assert torch.equal(tile, full[:, :, 13:61, 30:88]), precision


def test_precision_modes_weights_and_refusals():
    assert matmul_mode("fp32", "cpu") == "fp32"
    assert matmul_mode("bf16", "cpu") == "bf16-emulated"
    assert matmul_mode("fp16", "cpu") == "fp16-emulated"
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        matmul_mode("int8", "cpu")
    torch.manual_seed(0)
    G = creps.Generator(creps.preset("tiny")).eval()
    with torch.no_grad():
        ws = G.ws(G.z_from_seed(0))
        pw = G.pixel_weights(ws)
        low = pw.lowered("bf16-emulated")
    assert pw.mode == "fp32" and low.mode == "bf16-emulated" and low.lowered("bf16-emulated") is low
    c = G.cfg.biline_channels
    assert low.last[0].weight.shape == (2 * c, 2 * c)  # [Wh + Wl; Wh]: one product with [xh, xl]
    with pytest.raises(ValueError, match="already prepared for bf16-emulated"):
        low.lowered("fp16-emulated")
    with pytest.raises(ValueError, match="training pass is fp32"):
        cv = Canvas(8, 8)
        G.pixels(ws, G.lines(ws, cv.row_coords(), "row"), G.lines(ws, cv.col_coords(), "col"), None, precision="bf16")
    with exact_matmuls("cpu"):  # a no-op off CUDA
        pass
    with pytest.raises(JobSpecError, match="precision must be one of fp32, bf16, fp16, got 'fp8'"):
        JobSpec(checkpoint="preset:tiny", precision="fp8")


def test_precision_is_part_of_the_identity_and_old_stores_read_as_fp32(tmp_path, render_reference):
    spec = JobSpec(
        checkpoint="preset:tiny", height=64, width=96, tile=32, out=str(tmp_path / "p.zarr"), workers=0, exports=False
    )
    assert spec.identity()["precision"] == "fp32"
    first = run_job(spec, progress=False, log=lambda s: None)
    assert first["status"] == "done"
    np.testing.assert_array_equal(open_store(spec.out, mode="r").read_region(0, 0, 64, 0, 96), render_reference(64, 96))
    bf16 = JobSpec.from_dict({**spec.to_dict(), "precision": "bf16"})
    with pytest.raises(JobSpecError, match=r"holds a different job \(precision: 'fp32' -> 'bf16'\)"):
        run_job(bf16, progress=False, log=lambda s: None)
    # a store written before precision existed: its identity has no such key, and it is fp32
    store = open_store(spec.out, mode="a")
    old = {k: v for k, v in store.meta["identity"].items() if k != "precision"}
    store.update_meta(identity=old)
    # (prepare resolves what the spec leaves open, e.g. shard 0 = auto, as the stored identity has it)
    assert same_identity(old, prepare(spec).identity) and not same_identity(old, prepare(bf16).identity)
    again = run_job(spec, progress=False, log=lambda s: None)
    assert again["tiles_rendered"] == 0 and again["status"] == "done"
    with pytest.raises(JobSpecError, match=r"precision: 'fp32' -> 'bf16'"):
        run_job(bf16, progress=False, log=lambda s: None)
    # a bf16 job of its own: within the budget of the fp32 store's bytes
    out = run_job(JobSpec.from_dict({**bf16.to_dict(), "out": str(tmp_path / "b.zarr")}), progress=False)
    assert out["status"] == "done"
    a = open_store(spec.out, mode="r").read_region(0, 0, 64, 0, 96).astype(int)
    b = open_store(str(tmp_path / "b.zarr"), mode="r").read_region(0, 0, 64, 0, 96).astype(int)
    d = np.abs(a - b)
    assert (d <= 1).mean() >= BUDGET_WITHIN_1 and d.max() <= BUDGET_MAX
    meta = json.loads((tmp_path / "b.zarr" / "zarr.json").read_text())["attributes"]["creps_gigapixel"]
    assert meta["identity"]["precision"] == "bf16" and meta["spec"]["precision"] == "bf16"
