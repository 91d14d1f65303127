"""Precision as a job parameter: fp32 stays exact, fp16 and bf16x3 stay within the error budget
(uint8 within 1 level of fp32 on >= 99 % of pixels, at most 4 levels; docs/performance.md), plain
bf16 within the error docs/exactness.md states for it, and a store remembers the precision it was
rendered in.  exact_matmuls sets and restores every cuBLAS switch (settable without a GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import creps
from creps import Canvas
from creps.flops import pixel_flops
from creps.precision import exact_matmuls, matmul_mode, matmul_products
from jobs import JobSpecError
from jobs.run import prepare, run_job
from jobs.spec import JobSpec, same_identity
from renderer.store import open_store

BUNDLED = Path(creps.__file__).parent / "weights" / "default.safetensors"
BUDGET_WITHIN_1 = 0.99
BUDGET_MAX = 4
# plain bf16 (one bf16 product per layer, bf16 activations; docs/exactness.md): >= 99 % within one
# level on the trained bundled model but up to 5 levels; random ffhq512 weights far less (seed 1:
# 81.5 % here, 81.6 % at 256^2, where seeds 0-3 reach 6 levels)
BF16 = {"bundled": (0.99, 5), "ffhq512": (0.80, 6)}


def _budget(ref: torch.Tensor, low: torch.Tensor) -> tuple[float, int]:
    """(share of uint8 values within one level of the reference, largest difference in levels)."""
    d = (creps.to_uint8(ref).int() - creps.to_uint8(low).int()).abs()
    return float((d <= 1).float().mean()), int(d.max())


@pytest.fixture(scope="module")
def ffhq() -> creps.Generator:
    return creps.load("preset:ffhq512")


@pytest.mark.parametrize("precision", ["bf16", "bf16x3", "fp16"])
@pytest.mark.parametrize("model", ["ffhq512", "bundled"])
@torch.no_grad()
def test_low_precision_within_its_error_on_cpu(ffhq, model, precision):
    """The CPU emulation (creps.precision) on small canvases; the same rounding as the GPU kernels up
    to the order of fp32 sums.  fp16 and bf16x3 meet the budget on both models; plain bf16 what
    docs/exactness.md says (seed 1 of ffhq512 is its worst here), and it is the least accurate."""
    if model == "bundled" and not BUNDLED.exists():
        pytest.skip("no bundled weights in this checkout")
    G = ffhq if model == "ffhq512" else creps.load(str(BUNDLED))
    need_within, need_max = BF16[model] if precision == "bf16" else (BUDGET_WITHIN_1, BUDGET_MAX)
    for seed in (0, 1):
        z = G.z_from_seed(seed)
        cv = Canvas(96, 128, x=(0.1, 0.9))
        ref = G.render(z, cv)
        low = G.render(z, cv, precision=precision)
        within, worst = _budget(ref, low)
        assert within >= need_within and worst <= need_max, (model, precision, seed, within, worst)
        assert not torch.equal(ref, low)  # it did run in another arithmetic
        if precision == "bf16":  # 8 mantissa bits against fp16's 11 and bf16x3's ~16
            err = float((ref - low).abs().max())
            for better in ("fp16", "bf16x3"):
                assert float((ref - G.render(z, cv, precision=better)).abs().max()) < err, (model, seed, better)


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
    for precision in ("bf16", "bf16x3", "fp16"):
        full = G.render(z, cv, precision=precision)
        tile = G.render(z, cv, rows=(13, 61), cols=(30, 88), precision=precision)
        assert torch.equal(tile, full[:, :, 13:61, 30:88]), precision


def test_precision_modes_weights_and_refusals():
    assert matmul_mode("fp32", "cpu") == "fp32"
    assert matmul_mode("bf16", "cpu") == "bf16-emulated"
    assert matmul_mode("bf16x3", "cpu") == "bf16x3-emulated"
    assert matmul_mode("fp16", "cpu") == "fp16-emulated"
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, bf16x3, fp16"):
        matmul_mode("int8", "cpu")
    # products executed per layer (the bench's executed FLOPs): bf16x3 is three on a GPU, two emulated
    assert [matmul_products(m) for m in ("fp32", "bf16", "fp16", "bf16x3", "bf16x3-emulated")] == [1, 1, 1, 3, 2]
    cfg = creps.preset("ffhq512")
    assert creps.flops(cfg, 1, 1).pixel == pixel_flops(cfg) == 357184
    fusion = 2 * cfg.num_bilines * cfg.biline_channels * cfg.rank  # elementwise, fp32: run once in every mode
    assert pixel_flops(cfg, 3) - fusion == 3 * (pixel_flops(cfg) - fusion)
    torch.manual_seed(0)
    G = creps.Generator(creps.preset("tiny")).eval()
    with torch.no_grad():
        ws = G.ws(G.z_from_seed(0))
        pw = G.pixel_weights(ws)
        low = pw.lowered("bf16x3-emulated")
        plain = pw.lowered("bf16-emulated")
    assert pw.mode == "fp32" and low.mode == "bf16x3-emulated" and low.lowered("bf16x3-emulated") is low
    c = G.cfg.biline_channels
    assert low.last[0].weight.shape == (2 * c, 2 * c)  # [Wh + Wl; Wh]: one product with [xh, xl]
    w0 = plain.last[0].weight  # plain bf16: the bf16 values of the fp32 matrix, one product
    assert w0.shape == (c, 2 * c) and w0.dtype == torch.float32
    assert torch.equal(w0, pw.last[0].weight.to(torch.bfloat16).float()) and not torch.equal(w0, pw.last[0].weight)
    with pytest.raises(ValueError, match="already prepared for bf16x3-emulated"):
        low.lowered("fp16-emulated")
    with pytest.raises(ValueError, match="training pass is fp32"):
        cv = Canvas(8, 8)
        G.pixels(ws, G.lines(ws, cv.row_coords(), "row"), G.lines(ws, cv.col_coords(), "col"), None, precision="bf16")
    with exact_matmuls("cpu"):  # a no-op off CUDA
        pass
    with pytest.raises(JobSpecError, match="precision must be one of fp32, bf16, bf16x3, fp16, got 'fp8'"):
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
    # a bf16 job of its own: the bytes of a bf16 render, which differ from the fp32 store's
    out = run_job(JobSpec.from_dict({**bf16.to_dict(), "out": str(tmp_path / "b.zarr")}), progress=False)
    assert out["status"] == "done"
    a = open_store(spec.out, mode="r").read_region(0, 0, 64, 0, 96).astype(int)
    b = open_store(str(tmp_path / "b.zarr"), mode="r").read_region(0, 0, 64, 0, 96).astype(int)
    G = creps.load("preset:tiny")
    with torch.no_grad():
        low = creps.to_uint8(G.render(G.z_from_seed(0), Canvas(64, 96), precision="bf16"))[0].numpy()
    np.testing.assert_array_equal(b, low)
    d = np.abs(a - b)
    assert 0 < d.max() <= BF16["ffhq512"][1] and (d <= 1).mean() >= BF16["ffhq512"][0]
    meta = json.loads((tmp_path / "b.zarr" / "zarr.json").read_text())["attributes"]["creps_gigapixel"]
    assert meta["identity"]["precision"] == "bf16" and meta["spec"]["precision"] == "bf16"
    assert meta["identity"]["bf16_products"] == 1  # plain bf16, told from the bf16 of older stores
    # a store from when bf16 meant three products (its identity says "bf16", nothing more): it is bf16x3
    store = open_store(str(tmp_path / "b.zarr"), mode="a")
    store.update_meta(identity={k: v for k, v in store.meta["identity"].items() if k != "bf16_products"})
    plain = JobSpec.from_dict({**bf16.to_dict(), "out": str(tmp_path / "b.zarr")})
    with pytest.raises(JobSpecError, match=r"holds a different job \(precision: 'bf16x3' -> 'bf16'\)"):
        run_job(plain, progress=False, log=lambda s: None)
    x3 = run_job(JobSpec.from_dict({**plain.to_dict(), "precision": "bf16x3"}), progress=False, log=lambda s: None)
    assert x3["status"] == "done" and x3["tiles_rendered"] == 0


def test_exact_matmuls_sets_and_restores_every_cublas_switch():
    """TF32 off in the legacy API (set_float32_matmul_precision / allow_tf32) and the new one
    (fp32_precision) at once, no fp16 accumulation, no reduced-precision reductions; on leaving,
    the user's values, 'high' included (these switches are settable on a CPU-only torch)."""
    m = torch.backends.cuda.matmul
    fp32_precision = hasattr(torch.backends, "fp32_precision")  # torch >= 2.9: the new API

    def state() -> dict:
        s = {"legacy": torch.get_float32_matmul_precision(), "allow_tf32": m.allow_tf32}
        s["bf16_reduction"] = m.allow_bf16_reduced_precision_reduction
        s["fp16_reduction"] = m.allow_fp16_reduced_precision_reduction
        s["fp16_accumulation"] = getattr(m, "allow_fp16_accumulation", None)
        if fp32_precision:
            s["new"] = (m.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
        return s

    before = state()
    torch.set_float32_matmul_precision("high")
    try:
        if before["fp16_accumulation"] is not None:
            m.allow_fp16_accumulation = True
        m.allow_fp16_reduced_precision_reduction = True
        m.allow_bf16_reduced_precision_reduction = False
        user = state()
        assert user["legacy"] == "high" and user["allow_tf32"] is True
        with exact_matmuls("cuda"):
            inside = state()
            with exact_matmuls("cuda:0"):  # nested (another render thread): still exact, nothing restored early
                assert state() == inside
            assert state() == inside
        assert inside["legacy"] == "highest" and inside["allow_tf32"] is False  # readable: the APIs agree
        assert not inside["bf16_reduction"] and not inside["fp16_reduction"] and not inside["fp16_accumulation"]
        if fp32_precision:
            assert inside["new"] == ("ieee", "ieee")
        assert state() == user
        with exact_matmuls("cpu"):  # a no-op off CUDA
            assert state() == user
        if fp32_precision:  # a user who mixed the APIs (allow_tf32 then raises): that mix comes back
            m.fp32_precision = "ieee"
            with exact_matmuls("cuda"):
                assert state()["allow_tf32"] is False
            assert (torch.get_float32_matmul_precision(), m.fp32_precision) == ("high", "ieee")
    finally:
        torch.set_float32_matmul_precision(before["legacy"])
        m.allow_bf16_reduced_precision_reduction = before["bf16_reduction"]
        m.allow_fp16_reduced_precision_reduction = before["fp16_reduction"]
        if before["fp16_accumulation"] is not None:
            m.allow_fp16_accumulation = before["fp16_accumulation"]
        if fp32_precision:
            m.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision = before["new"]
    assert state() == before
