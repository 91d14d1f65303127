"""The generator: official shapes, exact tiles (docs/exactness.md), determinism, truncation."""

from __future__ import annotations

import dataclasses
import random
import threading

import pytest
import torch

import creps
from creps import Canvas, Generator, preset

OFFICIAL = {  # preset -> (parameters, state-dict entries, num_ws)
    "ffhq512": (30_867_785, 204, 17),
    "church256": (30_530_825, 184, 15),
    "metfaces1024": (31_034_377, 224, 19),
}


@pytest.fixture(scope="module")
def tiny() -> Generator:
    torch.manual_seed(1)
    return Generator(preset("tiny")).eval()


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_shapes(name: str) -> None:
    params, entries, num_ws = OFFICIAL[name]
    G = Generator(preset(name))
    sd = G.state_dict()
    assert sum(p.numel() for p in G.parameters()) == params
    assert len(sd) == entries
    assert G.num_ws == num_ws
    if name == "ffhq512":
        assert sd["synthesis.b4.input.freqs"].shape == (1, 4096)
        assert sd["synthesis.b8.fc0.weight"].shape == (1024, 1024)
        assert sd["synthesis.b8.fc0.affine.weight"].shape == (1024, 512)
        assert sd["synthesis.decoder_16.0.weight"].shape == (64, 32)
        assert sd["synthesis.block0.fc0.weight"].shape == (128, 32)
        assert sd["mapping.fc0.weight"].shape == (512, 512)
        assert sd["mapping.w_avg"].shape == (512,)
        assert len(list(G.parameters())) == 201


def test_official_key_layout_round_trips() -> None:
    torch.manual_seed(0)
    a = Generator(preset("church256"))
    b = Generator(preset("church256"))
    b.load_state_dict(a.state_dict(), strict=True)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_ffhq512_flops() -> None:
    f = creps.flops(preset("ffhq512"), 512, 512)
    assert round(f.per_pixel / 1e3) == 357
    assert round(f.per_line_position / 1e6) == 340
    big = creps.flops(preset("ffhq512"), 6144, 6144)
    assert 13.4e12 < big.pixel < 13.6e12 and 2.0e12 < big.line < 2.2e12


def _random_case(rng: random.Random) -> tuple[Canvas, tuple[int, int], tuple[int, int]]:
    h, w = rng.randint(1, 150), rng.randint(1, 150)
    y0, x0 = rng.uniform(-1, 1), rng.uniform(-1, 1)
    cv = Canvas(h, w, y=(y0, y0 + rng.uniform(0.1, 3)), x=(x0, x0 + rng.uniform(0.1, 3)))
    r0 = rng.randrange(h)
    c0 = rng.randrange(w)
    return cv, (r0, rng.randint(r0 + 1, h)), (c0, rng.randint(c0 + 1, w))


@torch.no_grad()
def test_tiles_are_bit_exact_crops_of_the_full_frame(tiny: Generator) -> None:
    rng = random.Random(7)
    z = tiny.z_from_seed(3)
    for _ in range(12):
        cv, rows, cols = _random_case(rng)
        full = tiny.render(z, cv)
        tile = tiny.render(z, cv, rows=rows, cols=cols)
        crop = full[:, :, rows[0] : rows[1], cols[0] : cols[1]]
        assert tile.shape == crop.shape
        assert torch.equal(tile, crop), (cv, rows, cols)


@torch.no_grad()
def test_tiles_exact_with_small_pixel_blocks_and_many_line_blocks(tiny: Generator) -> None:
    # Canvas longer than several line blocks; tiles straddle block boundaries.
    cv = Canvas(3 * creps.LINE_BLOCK + 5, 2 * creps.LINE_BLOCK + 3)
    z = tiny.z_from_seed(0)
    full = tiny.render(z, cv, pixel_block=256)
    for rows, cols in [((60, 70), (1, 130)), ((127, 193), (64, 65)), ((0, 197), (100, 131))]:
        tile = tiny.render(z, cv, rows=rows, cols=cols, pixel_block=256)
        assert torch.equal(tile, full[:, :, rows[0] : rows[1], cols[0] : cols[1]])


def test_block_shape_fills_blocks_of_rows_longer_than_a_block() -> None:
    from creps.network import block_shape

    assert block_shape(512, 512, 4096) == (8, 512)  # whole rows, as a job's 512² tile
    assert block_shape(3001, 1999, 4096) == (2, 1999)
    nr, seg = block_shape(6144, 6144, 4096)  # was 1 x 4096: each row two blocks, a third of it padding
    assert nr * seg == 4096 and -(-6144 // nr) * -(-6144 // seg) == 6144 * 6144 // 4096
    assert block_shape(1, 10000, 4096) == (1, 4096)  # one row: nothing to stack
    assert block_shape(7, 4097, 4096) == (8, 512)  # 9 blocks instead of 14


@torch.no_grad()
def test_rows_longer_than_a_pixel_block_give_the_same_bytes(tiny: Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Segments of several rows (block_shape) against the former one-row segments, and tiles
    against the frame, with rows of 700 px in 256-px blocks."""
    import creps.network as network

    cv = Canvas(37, 700, y=(0.1, 0.9), x=(-2.0, 3.0))
    z = tiny.z_from_seed(4)
    assert network.block_shape(37, 700, 256) == (4, 64)
    full = tiny.render(z, cv, pixel_block=256)
    for rows, cols in [((0, 37), (0, 700)), ((5, 30), (63, 641)), ((36, 37), (1, 699))]:
        tile = tiny.render(z, cv, rows=rows, cols=cols, pixel_block=256)
        assert torch.equal(tile, full[:, :, rows[0] : rows[1], cols[0] : cols[1]])
    monkeypatch.setattr(network, "block_shape", lambda h, w, pb: (1, min(w, pb)))
    assert torch.equal(tiny.render(z, cv, pixel_block=256), full)


@torch.no_grad()
def test_fourier_amplitudes_folded_once_per_latent(tiny: Generator) -> None:
    """LineWeights.input_amp (once per latent) gives the features the per-call input gives, for
    each latent of a batch and each half, and lines with or without weights passed agree."""
    ws = tiny.ws(torch.cat([tiny.z_from_seed(1), tiny.z_from_seed(2)]), psi=0.6)
    lw = tiny.line_weights(ws)
    inp, t = tiny.synthesis.b4.input, Canvas(70, 9).row_coords()[:64]
    for half in (0, 1):
        assert torch.equal(inp.features(lw.input_amp, t, half), inp(ws[:, 0], t, half))
    coords = Canvas(130, 70, y=(-0.3, 2.2)).row_coords()
    assert torch.equal(tiny.lines(ws, coords, "row", 3, 129, weights=lw), tiny.lines(ws, coords, "row", 3, 129))


@torch.no_grad()
def test_shared_line_features_equal_per_tile_lines(tiny: Generator) -> None:
    cv = Canvas(90, 140, y=(0.2, 1.7), x=(-0.5, 0.5))
    ws = tiny.ws(tiny.z_from_seed(5), psi=0.7)
    rows_all = tiny.lines(ws, cv.row_coords(), "row")
    cols_all = tiny.lines(ws, cv.col_coords(), "col")
    for (r0, r1), (c0, c1) in [((0, 90), (0, 140)), ((13, 77), (65, 139)), ((89, 90), (0, 1))]:
        shared = tiny.pixels(ws, rows_all[:, :, r0:r1], cols_all[:, :, c0:c1])
        own = tiny.render(ws, cv, rows=(r0, r1), cols=(c0, c1))
        assert torch.equal(shared, own)
        # A tile's own lines equal the slice of the job's lines.
        assert torch.equal(tiny.lines(ws, cv.row_coords(), "row", r0, r1), rows_all[:, :, r0:r1])


def test_render_on_lanes_equals_one_lane_byte_for_byte(tiny: Generator) -> None:
    """G.render / G.pixels spread line blocks and pixel blocks over single-threaded lanes (creps.lanes):
    the same bytes as one lane, for a batch, small pixel blocks and a window over several line blocks;
    the work runs on the lanes, each with one torch thread, and the caller's thread count is kept."""
    cv = Canvas(3 * creps.LINE_BLOCK + 5, 2 * creps.LINE_BLOCK + 3, y=(0.1, 1.3))
    z = tiny.z_from_seed(6, batch=2)
    seen: set[tuple[str, int]] = set()
    mlp = tiny._pixel_mlp

    def spy(*args, **kwargs):  # where each pixel block runs, and with how many torch threads
        seen.add((threading.current_thread().name, torch.get_num_threads()))
        return mlp(*args, **kwargs)

    threads = torch.get_num_threads()
    tiny._pixel_mlp = spy  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            one = tiny.render(z, cv, rows=(7, 190), cols=(3, 131), psi=0.8, pixel_block=512, lanes=1)
            assert seen == {(threading.current_thread().name, threads)}  # one lane: this thread, as before
            seen.clear()
            for lanes in (2, 3):
                many = tiny.render(z, cv, rows=(7, 190), cols=(3, 131), psi=0.8, pixel_block=512, lanes=lanes)
                assert torch.equal(many, one), lanes
            # which lanes took blocks depends on the scheduler (one may take them all on a busy machine): only
            # that every block of the 2- and 3-lane renders ran on a lane with one torch thread is fixed
            assert seen and all(name.startswith("creps-lane") and n == 1 for name, n in seen), seen
        with torch.inference_mode():  # the caller's mode holds in the lanes (out is an inference tensor)
            assert torch.equal(tiny.render(z, cv, rows=(7, 190), cols=(3, 131), psi=0.8, pixel_block=512), one)
    finally:
        del tiny._pixel_mlp
    assert torch.get_num_threads() == threads


def test_lanes_raise_the_first_error_and_run_every_item() -> None:
    from creps import lanes

    assert lanes.run(list(range(50)), lambda _, i: i * i, 2) == [i * i for i in range(50)]

    def bad(_: None, i: int) -> int:
        if i == 7:
            raise RuntimeError("block 7 broke")
        return i

    with pytest.raises(RuntimeError, match="block 7 broke"):
        lanes.run(list(range(20)), bad, 2)
    with pytest.raises(ValueError, match="lanes must be >= 1"):
        lanes.resolve("cpu", 0)


@torch.no_grad()
def test_folded_weights_are_typed_and_reusable(tiny: Generator) -> None:
    ws = tiny.ws(tiny.z_from_seed(1, batch=2))
    lw, pw = tiny.line_weights(ws), tiny.pixel_weights(ws)
    assert isinstance(lw, creps.LineWeights) and isinstance(pw, creps.PixelWeights)
    c4 = tiny.cfg.channels(4)
    assert lw.first_fc1.weight.shape == (2, c4, c4) and lw.first_fc1.bias.shape == (2, 1, c4)
    assert len(lw.blocks) == tiny.cfg.num_bilines
    assert all(blk.tores.weight.shape[-1] == tiny.cfg.biline_channels for blk in lw.blocks)
    assert len(pw.decoders) == tiny.cfg.num_bilines - 1 and all(len(d) == 4 for d in pw.decoders)
    assert isinstance(pw.img, creps.Affine) and pw.img.weight.dim() == 2
    one = pw.sample(1)
    layers = [a for blk in one.refine for a in (blk.fc0, blk.fc1, blk.tores)]
    assert len(layers) == 6 and all(a.weight.dim() == 2 and a.bias.dim() == 1 for a in layers)
    assert torch.equal(one.refine[0].fc0.weight, pw.refine[0].fc0.weight[1])
    assert one.decoders is pw.decoders and one.last is pw.last and one.img is pw.img
    with pytest.raises(dataclasses.FrozenInstanceError):
        lw.blocks = ()  # type: ignore[misc]
    cv = Canvas(30, 50)
    R = tiny.lines(ws, cv.row_coords(), "row", weights=lw)
    C = tiny.lines(ws, cv.col_coords(), "col", weights=lw)
    assert torch.equal(tiny.pixels(ws, R, C, weights=pw), tiny.render(ws, cv))


@torch.no_grad()
def test_rows_and_columns_are_independent_inputs(tiny: Generator) -> None:
    # Non-square canvas == crop of a square one sharing its row or column vector.
    z = tiny.z_from_seed(2)
    tall = tiny.render(z, Canvas(100, 40, x=(0.25, 0.75)))
    square = tiny.render(z, Canvas(100, 100, x=(0.25, 0.75)))
    assert not torch.equal(tall, square[:, :, :, :40])  # columns differ (other spacing) ...
    wide_rows = tiny.render(z, Canvas(100, 40, x=(0.25, 0.75)), rows=(0, 100), cols=(0, 40))
    assert torch.equal(tall, wide_rows)


@torch.no_grad()
def test_full_frame_matches_training_forward(tiny: Generator) -> None:
    z = torch.randn(2, tiny.cfg.z_dim, generator=torch.Generator().manual_seed(0))
    ref = tiny(z)
    r = tiny.cfg.resolution
    blocked = torch.cat([tiny.render(z[i : i + 1], Canvas(r, r)) for i in range(2)])
    assert ref.shape == (2, 3, r, r)
    torch.testing.assert_close(blocked, ref, rtol=0, atol=1e-5)


@torch.no_grad()
def test_determinism_per_seed(tiny: Generator) -> None:
    cv = Canvas(40, 60)
    a = tiny.render(tiny.z_from_seed(11), cv)
    b = tiny.render(tiny.z_from_seed(11), cv)
    c = tiny.render(tiny.z_from_seed(12), cv)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(1)
    again = Generator(preset("tiny")).eval()
    assert torch.equal(again.render(again.z_from_seed(11), cv), a)


@torch.no_grad()
def test_truncation_psi(tiny: Generator) -> None:
    z = tiny.z_from_seed(4)
    tiny.mapping.w_avg.copy_(torch.randn(tiny.cfg.w_dim))
    try:
        w1 = tiny.ws(z, psi=1.0)
        assert torch.allclose(tiny.ws(z, psi=0.0), tiny.mapping.w_avg.expand_as(w1))
        half = tiny.ws(z, psi=0.5)
        torch.testing.assert_close(half, tiny.mapping.w_avg + 0.5 * (w1 - tiny.mapping.w_avg))
        ws_in = tiny.ws(z, psi=0.5)
        assert torch.equal(tiny.ws(ws_in), ws_in)  # ws pass through untouched
    finally:
        tiny.mapping.w_avg.zero_()


def test_bad_inputs(tiny: Generator) -> None:
    with pytest.raises(ValueError, match="canvas height"):
        Canvas(0, 10)
    with pytest.raises(ValueError, match="canvas width"):
        Canvas(10, 2**20 + 1)
    with pytest.raises(ValueError, match="not inside"):
        tiny.render(tiny.z_from_seed(0), Canvas(10, 10), rows=(5, 11))
    with pytest.raises(ValueError, match="z must be"):
        tiny.ws(torch.zeros(1, 3))
    with pytest.raises(KeyError, match="unknown preset"):
        preset("nope")


def test_to_uint8_rule() -> None:
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 5.0])
    assert creps.to_uint8(x).tolist() == [0, 0, 128, 255, 255, 255]


def test_training_forward_is_differentiable(tiny: Generator) -> None:
    z = torch.randn(2, tiny.cfg.z_dim)
    img = tiny(z)
    img.square().mean().backward()
    grads = {name: p.grad for name, p in tiny.named_parameters() if p.grad is not None}
    # every parameter gets a gradient but the two the image never uses: b4's tores output and
    # decoder_8 (the pixel stage decodes bi-lines 16 ... R, see creps.folded.PixelWeights)
    unused = {n for n, _ in tiny.named_parameters()} - set(grads)
    assert unused == {f"synthesis.b4.tores.{k}" for k in ("weight", "bias", "affine.weight", "affine.bias")} | {
        f"synthesis.decoder_8.{i}.{k}" for i in range(4) for k in ("weight", "bias")
    }
    assert len(grads) == 97 and all(torch.isfinite(g).all() for g in grads.values())
    tiny.zero_grad(set_to_none=True)


def test_render_image_is_the_render_jobs_picture(render_reference) -> None:
    """creps.render_image: a checkpoint, seed, size (width, height) and psi -> uint8 (H, W, 3), the
    pixels of render_reference (which tests/test_in_process.py holds equal to a job's level 0)."""
    import numpy as np

    img = creps.render_image("preset:tiny", seed=4, size=(200, 120), psi=0.8)
    assert img.shape == (120, 200, 3) and img.dtype == np.uint8 and img.flags.c_contiguous
    np.testing.assert_array_equal(img.transpose(2, 0, 1), render_reference(120, 200, seed=4, psi=0.8))
    G = creps.load("preset:tiny")
    r = G.cfg.image_size
    assert creps.render_image(G, seed=1).shape == (r, r, 3)  # default: the training resolution
    with torch.no_grad():
        want = creps.to_uint8(G.render(G.z_from_seed(1), Canvas(48, 48)))[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(creps.render_image(G, seed=1, size=48, lanes=1), want)  # N: N x N
