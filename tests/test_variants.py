"""Model variants of the supplementary's Tab. 4 and resolution transfer (docs/experiments.md):
configs, checkpoints, exact tiles, training a few steps, rendering like any other model."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_training_e2e import config, make_images

import creps
from creps import Canvas, Generator, GeneratorConfig, preset
from training import TrainError
from training.dataset import build_dataset
from training.loop import Trainer
from training.state import latest_checkpoint

torch.set_num_threads(1)

VARIANTS = {  # the rows of Tab. 4, on the tiny preset
    "multiple decoders, d=4": {},
    "multiple decoders, d=2": {"rank": 2},
    "no decoders": {"decoders": "none"},
    "bi-line": {"decoders": "none", "bilines": "last"},
}


def variant(**kw) -> GeneratorConfig:
    return dataclasses.replace(preset("tiny"), **kw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("vdata")
    build_dataset(str(make_images(root / "src")), str(root / "ds"), 32, log=lambda s: None)
    return str(root / "ds")


def test_config_fields_defaults_and_json_compatibility():
    base = preset("tiny")
    assert (base.decoders, base.bilines, base.size, base.image_size) == ("multiple", "all", 0, 32)
    # The official architecture writes the JSON it always wrote, and reads back without the new keys.
    assert not {"decoders", "bilines", "size"} & set(base.to_dict())
    assert GeneratorConfig.from_dict(base.to_dict()) == base
    v = variant(decoders="none", bilines="last", size=64)
    assert v.to_dict()["decoders"] == "none" and v.to_dict()["bilines"] == "last" and v.to_dict()["size"] == 64
    assert GeneratorConfig.from_dict(v.to_dict()) == v
    assert v.num_bilines == 1 and v.image_size == 64 and variant(decoders="none").num_bilines == 3
    for bad, match in (
        ({"decoders": "some"}, "decoders must be one of"),
        ({"bilines": "first"}, "bilines must be one of"),
        ({"bilines": "last"}, "use decoders='none'"),
        ({"size": -1}, "size must be"),
    ):
        with pytest.raises(ValueError, match=match):
            variant(**bad)


def test_state_dict_of_no_decoders_lacks_exactly_the_decoders():
    full = set(Generator(preset("tiny")).state_dict())
    for kw in (VARIANTS["no decoders"], VARIANTS["bi-line"]):
        keys = set(Generator(variant(**kw)).state_dict())
        gone = full - keys
        assert not keys - full
        assert gone and all(k.startswith("synthesis.decoder_") and k.split(".")[1][8:].isdigit() for k in gone)
        assert any(k.startswith("synthesis.decoder_last.") for k in keys)
    # The pixel stage's MAC count drops by the decoders; the line stage is unchanged.
    f_full, f_none = creps.flops(preset("tiny"), 64, 64), creps.flops(variant(decoders="none"), 64, 64)
    assert f_none.per_pixel < f_full.per_pixel and f_none.line == f_full.line


@pytest.mark.parametrize("name", sorted(VARIANTS))
@torch.no_grad()
def test_variant_tiles_are_bit_exact_crops(name: str, tmp_path: Path):
    torch.manual_seed(4)
    G = Generator(variant(**VARIANTS[name])).eval()
    path = creps.save(G, tmp_path / "g.safetensors")
    with safe_open(str(path), framework="pt") as f:
        stored = json.loads(f.metadata()["creps_config"])
    assert GeneratorConfig.from_dict(stored) == G.cfg
    G = creps.load(path)  # rendered from the checkpoint, like any other model
    assert creps.read_config(path) == G.cfg
    ws = G.ws(G.z_from_seed(2), psi=0.8)
    rng = random.Random(name)
    for _ in range(4):
        h, w = rng.randint(2, 90), rng.randint(2, 90)
        cv = Canvas(h, w, y=(rng.uniform(-1, 0), rng.uniform(1, 2)), x=(rng.uniform(-1, 0), rng.uniform(1, 2)))
        r0, c0 = rng.randrange(h), rng.randrange(w)
        rows, cols = (r0, rng.randint(r0 + 1, h)), (c0, rng.randint(c0 + 1, w))
        full = G.render(ws, cv, pixel_block=512)
        tile = G.render(ws, cv, rows=rows, cols=cols, pixel_block=512)
        assert torch.equal(tile, full[:, :, rows[0] : rows[1], cols[0] : cols[1]])
        # the job path: slices of line features computed once for the whole canvas
        R, C = G.lines(ws, cv.row_coords(), "row"), G.lines(ws, cv.col_coords(), "col")
        assert R.shape[1] == G.cfg.num_bilines
        shared = G.pixels(ws, R[:, :, rows[0] : rows[1]], C[:, :, cols[0] : cols[1]], pixel_block=512)
        assert torch.equal(shared, tile)
    assert torch.allclose(G(G.z_from_seed(2), psi=0.8), G.render(ws, Canvas(32, 32)), atol=1e-5)


def test_no_decoders_fusion_is_the_plain_sum():
    """decoders="none": E^(l+1) = E^(l) + F^(l+1), so the pixel stage sees the sum of the bi-lines."""
    torch.manual_seed(0)
    G = Generator(variant(decoders="none")).eval()
    ws = G.ws(G.z_from_seed(0))
    cv = Canvas(8, 8)
    with torch.no_grad():
        R, C = G.lines(ws, cv.row_coords(), "row"), G.lines(ws, cv.col_coords(), "col")
        # One bi-line holding the sum of all K fused bi-lines gives the same image (to float tolerance).
        fused = (R.unsqueeze(3) * C.unsqueeze(2)).sum(dim=4).sum(dim=1)  # [B, h, w, C]
        wts = G.pixel_weights(ws)
        assert wts.decoders == ()
        one = G._pixel_mlp(lambda k: fused.reshape(1, 64, -1), 1, wts)
        ref = G.pixels(ws, R, C, pixel_block=None)
    assert torch.allclose(one.reshape(1, 8, 8, 3).permute(0, 3, 1, 2), ref, atol=1e-5)


def test_variants_train_from_the_command_line_and_render(dataset, tmp_path):
    import train

    run = tmp_path / "run"
    argv = ["--data", dataset, "--out", str(run), "--preset", "tiny", "--rank", "2", "--decoders", "none"]
    argv += ["--batch", "4", "--kimg", "0.008", "--snap", "0.008", "--no-progress", "--threads", "1"]
    assert train.main(argv) == 0
    cfg = creps.read_config(run / "G_ema.safetensors")
    assert (cfg.rank, cfg.decoders, cfg.bilines) == (2, "none", "all")
    assert json.loads((run / "config.json").read_text())["generator"]["decoders"] == "none"
    # the trained weights render through a job like any checkpoint: tiles == one full-frame render
    from jobs.run import run_job
    from jobs.spec import JobSpec
    from renderer.store import open_store

    ckpt = str(run / "G_ema.safetensors")
    spec = JobSpec(checkpoint=ckpt, height=40, width=56, tile=16, seed=1, out="memory://variants/a.zarr", exports=False)
    assert run_job(spec, progress=False, log=lambda s: None)["status"] == "done"
    got = open_store(spec.out, mode="r").read_region(0, 0, 40, 0, 56)
    G = creps.load(ckpt)
    with torch.no_grad():
        want = creps.to_uint8(G.render(G.z_from_seed(1), Canvas(40, 56)))[0].numpy()
    assert np.array_equal(got, want)


def test_biline_baseline_trains(dataset, tmp_path):
    t = Trainer(config(dataset, 0.008, bilines="last"), str(tmp_path / "b"), log=lambda s: None)
    assert (t.cfg.gen.decoders, t.cfg.gen.bilines) == ("none", "last")  # --bilines last implies no decoders
    t.run(progress=False)
    G = creps.load(tmp_path / "b" / "G_ema.safetensors")
    assert G.cfg.num_bilines == 1 and torch.isfinite(G(G.z_from_seed(0))).all()


def test_bad_variant_flags_refused():
    with pytest.raises(TrainError, match="--decoders must be one of"):
        config("D", 1.0, decoders="few")
    with pytest.raises(TrainError, match="--rank must be positive"):
        config("D", 1.0, rank=-1)


# ------------------------------------------------------------------ resolution transfer
def test_resolution_transfer_resumes_at_twice_the_resolution(dataset, tmp_path):
    Trainer(config(dataset, 0.004, decoders="none"), str(tmp_path / "r32"), log=lambda s: None).run(progress=False)
    ck = str(latest_checkpoint(tmp_path / "r32"))
    build_dataset(str(make_images(tmp_path / "src64", n=8, size=64)), str(tmp_path / "ds64"), 64, log=lambda s: None)
    ds64 = str(tmp_path / "ds64")
    logs: list[str] = []
    t = Trainer(config(ds64, 0.008, resolution=64, resume=ck), str(tmp_path / "r64"), log=logs.append)
    # the checkpoint's network (blocks of 32, its variant), its coordinate vectors twice as long
    assert (t.cfg.gen.resolution, t.cfg.gen.size, t.cfg.gen.image_size, t.cfg.gen.decoders) == (32, 64, 64, "none")
    src = creps.load(tmp_path / "r32" / "G_ema.safetensors").state_dict()
    assert all(torch.equal(v, src[k]) for k, v in t.G.state_dict().items())
    assert any("D starts fresh" in line for line in logs)
    with torch.no_grad():
        assert t.G(torch.zeros(2, t.cfg.gen.z_dim)).shape == (2, 3, 64, 64)
    t.run(progress=False)
    assert t.step == 2
    G = creps.load(tmp_path / "r64" / "G_ema.safetensors")
    assert G.cfg.image_size == 64 and G.cfg.resolution == 32
    # `render --scale 1` of the transferred model is its 64 px training canvas
    from jobs.run import prepare
    from jobs.spec import JobSpec

    job = prepare(JobSpec(checkpoint=str(tmp_path / "r64" / "G_ema.safetensors"), scale=1.0, out=str(tmp_path / "x")))
    assert (job.spec.height, job.spec.width) == (64, 64)
    # re-running the same command continues the run (same resolved config)
    again = Trainer(config(ds64, 0.016, resolution=64, resume=ck), str(tmp_path / "r64"), log=lambda s: None)
    assert again.step == 2 and again.cfg.gen == t.cfg.gen
    # a transferred model fine-tunes further at its own size (its architecture, not the preset's at 64)
    more = Trainer(
        config(ds64, 0.004, resolution=64, resume=str(tmp_path / "r64" / "G_ema.safetensors")),
        str(tmp_path / "r64more"),
        log=lambda s: None,
    )
    assert more.cfg.gen == t.cfg.gen
    # the architecture comes from the checkpoint
    with pytest.raises(TrainError, match="keeps the checkpoint's architecture; drop rank"):
        Trainer(config(ds64, 0.008, resolution=64, resume=ck, rank=2), str(tmp_path / "r64b"), log=lambda s: None)
