"""The paper's experiments as commands: scale consistency, CREPS vs Lanczos, zoom and latent videos."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import creps
from creps import Canvas
from creps.scaling import area_downsample, highfreq_share, lanczos_resize, psnr, upsampled_canvas
from jobs import JobSpecError
from training.dataset import build_dataset
from training.loop import Trainer
from training.scale import parse_scales, parse_seeds, scale_consistency

torch.set_num_threads(1)


def decode(path: Path) -> tuple[str, list[np.ndarray]]:
    """Codec name and RGB frames, read with PyAV (FFmpeg's libraries), not with the writer we use."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return stream.codec_context.name, frames


# ------------------------------------------------------------------ grids and references
def test_upsampled_canvas_blocks_average_to_the_coarse_pixels():
    base = Canvas(9, 12, y=(-0.5, 2.0), x=(0.0, 1.0))
    for k in (2, 3, 4):
        fine = upsampled_canvas(base, 9 * k, 12 * k)
        rows = fine.row_coords().double().reshape(9, k).mean(dim=1)
        cols = fine.col_coords().double().reshape(12, k).mean(dim=1)
        assert torch.allclose(rows, base.row_coords().double(), atol=1e-6)
        assert torch.allclose(cols, base.col_coords().double(), atol=1e-6)
    # and PIL's Lanczos samples exactly there: a ramp of the coarse coordinates, enlarged, is the fine ramp
    ramp = np.repeat(base.col_coords().numpy()[None, :, None], 9, axis=0).astype(np.float64)
    up = lanczos_resize(ramp, 36, 48)[:, 8:40, 0]
    assert np.allclose(up, upsampled_canvas(base, 36, 48).col_coords().numpy()[None, 8:40], atol=5e-3)


def test_reference_figures_on_known_images():
    rng = np.random.default_rng(0)
    img = rng.random((16, 16, 3)) * 255
    assert psnr(img, img) is None
    assert psnr(img, img + 1) == pytest.approx(20 * np.log10(255))
    assert area_downsample(np.ones((4, 6, 3)), 2).shape == (2, 3, 3)
    with pytest.raises(ValueError):
        area_downsample(np.ones((5, 6, 3)), 2)
    assert highfreq_share(np.full((8, 8, 3), 7.0)) == 0.0
    checker = (np.indices((32, 32)).sum(axis=0) % 2 * 255.0)[:, :, None].repeat(3, axis=2)
    assert highfreq_share(checker) > 0.9  # all power at Nyquist
    assert highfreq_share(lanczos_resize(checker[::4, ::4] * 0 + checker[:8, :8], 32, 32)) < 0.05


def test_scale_and_seed_lists():
    assert parse_scales("1,2,4") == (1, 2, 4) and parse_seeds("0-3,9") == (0, 1, 2, 3, 9)
    from training import TrainError

    for bad in ("0,2", "1.5", ""):
        with pytest.raises(TrainError):
            parse_scales(bad)
    with pytest.raises(TrainError):
        parse_seeds("a-b")


# ------------------------------------------------------------------ scale consistency
def test_scale_consistency_command_on_the_tiny_preset(capsys):
    import train

    code = train.main(["metrics", "preset:tiny", "--scale-consistency", "--scales", "1,2", "--seeds", "0,1"])
    assert code == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["scale_consistency"]
    assert res["resolution"] == 32 and res["seeds"] == [0, 1]
    one, two = res["scales"]["1"], res["scales"]["2"]
    assert one["creps"]["psnr"] is None and one["creps"]["mad"] == 0.0  # k = 1 is the same render
    for method in ("creps", "lanczos"):
        figs = two[method]
        assert all(np.isfinite(figs[key]) for key in ("psnr", "mad", "highfreq")), figs
    # without --data and without --scale-consistency there is nothing to measure
    assert train.main(["metrics", "preset:tiny"]) == 2
    assert "--data is required" in capsys.readouterr().err


def sharp_images(folder: Path, n: int = 16, size: int = 32) -> Path:
    """Hard-edged synthetic pictures: checkerboards and stripes of random period, phase and colours."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        period = int(rng.integers(3, 9))
        if i % 2:
            mask = ((yy + rng.integers(period)) // period + (xx + rng.integers(period)) // period) % 2
        else:
            mask = ((xx + yy * int(rng.integers(-1, 2)) + rng.integers(period)) // period) % 2
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        img = np.where(mask[:, :, None] == 1, a, b).astype(np.uint8)
        Image.fromarray(img).save(folder / f"s{i:02d}.png")
    return folder


def test_creps_vs_lanczos_after_a_few_steps_on_sharp_data(tmp_path):
    """What a few CPU steps on sharp data show (docs/experiments.md states it the same way):
    CREPS at k R carries far more power above half Nyquist than Lanczos enlargement (detail an
    interpolator cannot add), while the Lanczos round trip is the more consistent of the two
    (it averages back to its own input almost exactly, by construction)."""
    build_dataset(str(sharp_images(tmp_path / "src")), str(tmp_path / "ds"), 32, log=lambda s: None)
    from test_training_e2e import config

    t = Trainer(config(str(tmp_path / "ds"), 0.016, aug="noaug"), str(tmp_path / "run"), log=lambda s: None)
    t.run(progress=False)
    res = scale_consistency(t.G_ema, seeds=(0, 1), scales=(2, 4))
    for k in ("2", "4"):
        ours, ref = res["scales"][k]["creps"], res["scales"][k]["lanczos"]
        assert all(np.isfinite([ours["psnr"], ours["mad"], ref["psnr"], ref["mad"]]))
        assert ours["highfreq"] > 10 * ref["highfreq"], res
        assert ref["psnr"] > ours["psnr"], res


# ------------------------------------------------------------------ compare
def test_compare_writes_a_labelled_picture_of_the_expected_size(tmp_path, capsys):
    import render
    from jobs.compare import MARGIN, compare, crop_pixels, picture_size

    out = tmp_path / "cmp.png"
    argv = ["compare", "--checkpoint", "preset:tiny", "--seed", "1", "--scale", "4", "--crop", "0.25,0.75,0,1"]
    assert render.main([*argv, "--magnify", "2", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rec = json.loads(lines[-1])
    assert "Lanczos" in lines[0] and "CREPS" in lines[0]
    assert (rec["size"], rec["rows"], rec["cols"]) == (128, [32, 96], [0, 128])
    assert rec["highfreq"]["creps"] > rec["highfreq"]["lanczos"]
    pic = np.asarray(Image.open(out).convert("RGB"))
    assert pic.shape == (*picture_size(64, 128, 2), 3)
    assert (pic[: MARGIN + 20].min(axis=2) < 100).sum() > 50  # the labels are there
    cmp = compare(creps.load("preset:tiny"), 1, 4.0, (0.25, 0.75, 0.0, 1.0))
    top = pic.shape[0] - MARGIN - 128
    assert np.array_equal(pic[top : top + 128 : 2, MARGIN : MARGIN + 256 : 2], cmp.lanczos)
    right = MARGIN + 256 + MARGIN
    assert np.array_equal(pic[top : top + 128 : 2, right : right + 256 : 2], cmp.creps)
    # the CREPS panel is exactly the crop of the full N x N render on the aligned grid
    G = creps.load("preset:tiny")
    with torch.no_grad():
        full = creps.to_uint8(G.render(G.z_from_seed(1), upsampled_canvas(Canvas(32, 32), 128, 128)))[0]
    assert np.array_equal(full.permute(1, 2, 0).numpy()[32:96], cmp.creps)
    assert crop_pixels((0, 1, 0, 1), 128, 96) == ((0, 128), (0, 96))
    assert crop_pixels((0.999, 1, 0, 0.001), 128, 128) == ((127, 128), (0, 1))
    for bad in (["--crop", "0.5,0.2,0,1"], ["--scale", "1"], ["--magnify", "0"]):
        assert render.main([*argv[:7], *bad, "--out", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(JobSpecError):
        crop_pixels((0, 1.5, 0, 1), 8, 8)


# ------------------------------------------------------------------ videos
def test_zoom_and_latent_videos_from_a_checkpoint_decode(tmp_path, capsys):
    import render

    zoom = tmp_path / "zoom.mp4"
    base = ["video", "preset:tiny", "--size", "64x48", "--quiet", "--device", "cpu"]
    assert render.main([*base, "--zoom", "0.3,0.7,20", "--frames", "6", "--out", str(zoom)]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (rec["frames"], rec["width"], rec["height"], rec["source"]) == (6, 64, 48, "checkpoint")
    codec, frames = decode(zoom)
    assert codec == "h264" and len(frames) == 6 and all(f.shape == (48, 64, 3) for f in frames)
    # the first frame is the whole image, as rendered, the last the zoomed window (up to H.264's loss,
    # which 4:2:0 chroma makes large on this noisy untrained model: compared on luma)
    G = creps.load("preset:tiny")

    def luma_err(frame: np.ndarray, canvas: Canvas, seed: int = 0) -> float:
        with torch.no_grad():
            want = creps.to_uint8(G.render(G.z_from_seed(seed), canvas))[0].permute(1, 2, 0).numpy()
        return float(np.abs(frame.astype(float).mean(axis=2) - want.astype(float).mean(axis=2)).mean())

    from jobs.video import Zoom

    y0, y1, x0, x1 = Zoom(0.3, 0.7, 20).window(1.0)
    deep = Canvas(48, 64, y=(y0, y1), x=(x0, x1))
    assert luma_err(frames[0], Canvas(48, 64)) < 8 < luma_err(frames[0], deep)
    assert luma_err(frames[-1], deep) < 8 < luma_err(frames[-1], Canvas(48, 64))
    lerp = tmp_path / "lerp.mp4"
    assert render.main([*base, "--seeds", "1,2,3", "--frames", "5", "--out", str(lerp)]) == 0
    codec, frames = decode(lerp)
    assert codec == "h264" and len(frames) == 5 and frames[0].shape == (48, 64, 3)
    assert luma_err(frames[-1], Canvas(48, 64), seed=3) < 8 < luma_err(frames[-1], Canvas(48, 64), seed=1)
    assert not list(tmp_path.glob(".*partial*"))


def test_zoom_video_from_a_store_pyramid(tmp_path, capsys):
    import render
    from renderer.pyramid import build_levels
    from renderer.store import open_store

    # left half red, right half blue, a green square holding the zoom's last window (rows 120-136, cols 324-348)
    h, w = 256, 384
    img = np.zeros((3, h, w), np.uint8)
    img[0, :, : w // 2] = 220
    img[2, :, w // 2 :] = 220
    img[:, 112:144, 316:356] = np.array([0, 230, 0], np.uint8)[:, None, None]
    store = open_store(str(tmp_path / "s.zarr"), mode="w")
    store.create_level(0, h, w, chunk=64)
    store.write_region(0, 0, 0, img)
    assert build_levels(store, workers=2) == 4  # 256x384 in 64 chunks: down to 32x48
    out = tmp_path / "z.mp4"
    argv = ["video", str(tmp_path / "s.zarr"), "--zoom", "0.5,0.9,16", "--size", "96x64", "--frames", "8"]
    assert render.main([*argv, "--quiet", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["source"] == "store"
    codec, frames = decode(out)
    assert codec == "h264" and len(frames) == 8 and frames[0].shape == (64, 96, 3)
    first, last = frames[0].astype(int), frames[-1].astype(int)
    assert first[:, :40, 0].mean() > 150 and first[:, 56:, 2].mean() > 150  # the whole image
    assert last[:, :, 1].mean() > 150 and last[:, :, 0].mean() < 60 and last[:, :, 2].mean() < 60  # deep inside
    # bad input is one line, exit 2, no file
    for bad in (["--seeds", "1,2"], ["--warp-rows", "mirror"], ["--size", "95x64"]):
        assert render.main([*argv, *bad, "--quiet", "--out", str(tmp_path / "bad.mp4")]) == 2
    assert render.main(["video", "preset:tiny", "--out", str(tmp_path / "bad.mp4")]) == 2
    assert "--zoom" in capsys.readouterr().err
    assert not (tmp_path / "bad.mp4").exists()
