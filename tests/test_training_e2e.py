"""End to end on CPU: tiny dataset -> a few steps -> checkpoint -> resume equals
an uninterrupted run -> the exported generator renders.  Plus bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import creps
from creps.checkpoint import load
from training import TrainError
from training.config import TrainConfig
from training.dataset import build_dataset, open_dataset
from training.loop import Trainer
from training.state import latest_checkpoint, read_checkpoint

torch.set_num_threads(1)


def make_images(folder: Path, n: int = 32, size: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        c = rng.random((3, 1, 1))
        img = np.stack([yy, xx, (yy + xx) / 2]) * c + 0.2 * rng.random((3, size, size + i % 5))[:, :, :size]
        Image.fromarray((img.transpose(1, 2, 0) * 255).clip(0, 255).astype(np.uint8)).save(folder / f"img{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("data")
    src = make_images(root / "src")
    build_dataset(str(src), str(root / "ds"), 32, log=lambda s: None)
    return str(root / "ds")


def config(data: str, kimg: float, **kw) -> TrainConfig:
    base = {
        "data": data,
        "preset": "tiny",
        "batch": 4,
        "kimg": kimg,
        "snap": 0.008,
        "tick_kimg": 0.004,
        "seed": 3,
        "aug": "ada",
        "ada_kimg": 0.1,
        "ada_interval": 1,
        "r1_interval": 2,
    }
    base.update(kw)
    return TrainConfig(**base)


def states(run: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(latest_checkpoint(run)).tensors


def test_train_resume_equals_uninterrupted_and_renders(dataset, tmp_path, render_ray):
    # uninterrupted: 4 steps
    a = Trainer(config(dataset, 0.016), str(tmp_path / "a"), log=lambda s: None)
    a.run(progress=False)
    assert a.step == 4
    # interrupted after 2 steps, then the same command with a longer --kimg resumes
    b = Trainer(config(dataset, 0.008), str(tmp_path / "b"), log=lambda s: None)
    b.run(progress=False)
    assert b.step == 2 and latest_checkpoint(tmp_path / "b").name == "ckpt-00000002.safetensors"
    b2 = Trainer(config(dataset, 0.016), str(tmp_path / "b"), log=lambda s: None)
    assert b2.step == 2  # the checkpoint was found and loaded
    b2.run(progress=False)
    assert b2.step == 4
    sa, sb = states(tmp_path / "a"), states(tmp_path / "b")
    assert sa.keys() == sb.keys()
    for k in sa:
        if not k.startswith("rng/"):
            assert torch.equal(sa[k], sb[k]), k
    meta = read_checkpoint(latest_checkpoint(tmp_path / "b")).meta
    assert meta["step"] == 4 and meta["ada"]["p"] == a.ada.p
    # log, config, grids beside the run
    lines = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "b" / "config.json").read_text())["preset"] == "tiny"
    assert (tmp_path / "b" / "fakes00000004.png").is_file() and (tmp_path / "b" / "reals.png").is_file()
    # the exported generator renders through the public API
    G = load(tmp_path / "b" / "G_ema.safetensors")
    img = G.render(G.z_from_seed(1), creps.Canvas(24, 40), rows=(4, 20), cols=(8, 40))
    assert img.shape == (1, 3, 16, 32) and torch.isfinite(img).all()
    for k, v in G.state_dict().items():
        assert torch.equal(v, sa[f"G_ema/{k}"]), k
    # ... and through the render job, which is what `render.py render --checkpoint` runs
    import numpy as np
    import zarr

    from jobs.run import run_job
    from jobs.spec import JobSpec

    out = str(tmp_path / "render.zarr")
    spec = JobSpec(
        checkpoint=str(tmp_path / "b" / "G_ema.safetensors"),
        width=40,
        height=24,
        tile=16,
        out=out,
        workers=2,
        threads_per_worker=1,
        exports=False,
    )
    assert run_job(spec, progress=False, log=lambda s: None)["status"] == "done"
    with torch.no_grad():
        want = creps.to_uint8(G.render(G.z_from_seed(0), creps.Canvas(24, 40)))[0].numpy()
    assert np.array_equal(np.asarray(zarr.open_group(out, mode="r")["0"][:]), want)


def test_changed_config_refused_and_resume_from_weights(dataset, tmp_path):
    Trainer(config(dataset, 0.004), str(tmp_path / "r"), log=lambda s: None).run(progress=False)
    with pytest.raises(TrainError, match="different config.*gamma"):
        Trainer(config(dataset, 0.004, gamma=3.0), str(tmp_path / "r"), log=lambda s: None)
    # fine-tuning from a training checkpoint and from an exported generator
    ck = latest_checkpoint(tmp_path / "r")
    t = Trainer(config(dataset, 0.004, resume=str(ck)), str(tmp_path / "ft1"), log=lambda s: None)
    assert t.step == 0 and torch.equal(t.D.out.weight, read_checkpoint(ck).tensors["D/out.weight"])
    t = Trainer(
        config(dataset, 0.004, resume=str(tmp_path / "r" / "G_ema.safetensors")),
        str(tmp_path / "ft2"),
        log=lambda s: None,
    )
    assert torch.equal(t.G.mapping.fc0.weight, read_checkpoint(ck).tensors["G_ema/mapping.fc0.weight"])


# ------------------------------------------------------------------ bad input
def test_empty_folder_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainError, match="0 usable images"):
        build_dataset(str(tmp_path / "empty"), str(tmp_path / "out"), 32, log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_unreadable_and_non_image_files_skipped(tmp_path):
    src = make_images(tmp_path / "src", n=10)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (src / "truncated.jpg").write_bytes((src / "img00.png").read_bytes()[:50])
    (src / "notes.txt").write_text("hello")
    report = build_dataset(str(src), str(tmp_path / "ds"), 16, log=lambda s: None)
    assert len(report.names) == 10
    assert sorted(report.unreadable) == ["broken.png", "truncated.jpg"] and report.not_images == ["notes.txt"]
    assert "skipped 2 unreadable (broken.png, truncated.jpg)" in report.summary()
    ds = open_dataset(str(tmp_path / "ds"))
    assert len(ds) == 10 and ds.batch(np.arange(3)).shape == (3, 3, 16, 16)
    # nothing overwritten
    with pytest.raises(TrainError, match="already exists"):
        build_dataset(str(src), str(tmp_path / "ds"), 16, log=lambda s: None)


def test_too_few_images_refused(tmp_path):
    src = make_images(tmp_path / "src", n=3)
    with pytest.raises(TrainError, match="3 usable images, need at least 8"):
        build_dataset(str(src), str(tmp_path / "ds"), 16, log=lambda s: None)


def test_wrong_resolution_resume_refused(dataset, tmp_path):
    Trainer(config(dataset, 0.004), str(tmp_path / "r32"), log=lambda s: None).run(progress=False)
    src = make_images(tmp_path / "src64", n=8, size=64)
    build_dataset(str(src), str(tmp_path / "ds64"), 64, log=lambda s: None)
    ck = str(latest_checkpoint(tmp_path / "r32"))
    with pytest.raises(TrainError, match="shapes differ.*b4,b8,b16,b32.*b64"):
        Trainer(config(str(tmp_path / "ds64"), 0.004, resume=ck), str(tmp_path / "r64"), log=lambda s: None)
    assert not (tmp_path / "r64").exists()
    with pytest.raises(TrainError, match="dataset is 64x64"):
        Trainer(config(str(tmp_path / "ds64"), 0.004, resolution=32), str(tmp_path / "r64"), log=lambda s: None)


def test_corrupt_checkpoint_reported_not_overwritten(dataset, tmp_path):
    run = tmp_path / "run"
    Trainer(config(dataset, 0.004), str(run), log=lambda s: None).run(progress=False)
    ck = latest_checkpoint(run)
    data = ck.read_bytes()
    ck.write_bytes(data[: len(data) // 2])
    with pytest.raises(TrainError, match=f"checkpoint {ck} is corrupt"):
        Trainer(config(dataset, 0.008), str(run), log=lambda s: None)
    assert ck.read_bytes() == data[: len(data) // 2]
    # a --resume generator file that creps cannot read: its CheckpointError travels unchanged, naming the file
    with pytest.raises(creps.CheckpointError, match="not found.*nope.safetensors"):
        Trainer(
            config(dataset, 0.004, resume=str(tmp_path / "nope.safetensors")), str(tmp_path / "x"), log=lambda s: None
        )
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"garbage")
    with pytest.raises(creps.CheckpointError, match="junk.pkl: unknown checkpoint format"):
        Trainer(config(dataset, 0.004, resume=str(junk)), str(tmp_path / "y"), log=lambda s: None)


def test_cli_errors_are_one_line(tmp_path, capsys):
    import train

    (tmp_path / "empty").mkdir()
    assert train.main(["dataset", str(tmp_path / "empty"), str(tmp_path / "o"), "--resolution", "32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: dataset") and "0 usable images" in err[0]
    assert train.main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), "--resolution", "32"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_help_is_grouped(capsys):
    import train

    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = capsys.readouterr().out
    for header in ("main options", "hyperparameters", "I/O and fine-tuning", "performance"):
        assert header in out


def test_zip_glob_and_on_the_fly_sources(tmp_path):
    import zipfile

    src = make_images(tmp_path / "src", n=8, size=20)
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(src.iterdir()):
            zf.write(p, f"a/{p.name}")
    r_zip = build_dataset(str(tmp_path / "imgs.zip"), str(tmp_path / "dz"), 8, mirror=True, log=lambda s: None)
    r_glob = build_dataset(str(src / "img0[0-7].png"), str(tmp_path / "dg"), 8, log=lambda s: None)
    assert len(r_zip.names) == 16 and len(r_glob.names) == 8
    dz, dg = open_dataset(str(tmp_path / "dz")), open_dataset(str(tmp_path / "dg"))
    assert np.array_equal(dz.images[0], dg.images[0]) and np.array_equal(dz.images[1], dg.images[0][:, ::-1])
    fly = open_dataset(str(src), resolution=8)  # a raw folder, converted in memory
    assert np.array_equal(fly.images, np.asarray(dg.images))
    with pytest.raises(TrainError, match="give --resolution"):
        open_dataset(str(src))


def test_dry_run_prints_config_and_writes_nothing(dataset, tmp_path, capsys):
    import train

    assert (
        train.main(["--data", dataset, "--out", str(tmp_path / "run"), "--preset", "tiny", "--batch", "4", "--dry-run"])
        == 0
    )
    err = capsys.readouterr().err
    cfg = json.loads(err[err.index("{") : err.rindex("}") + 1])
    assert cfg["resolution"] == 32 and cfg["generator"]["resolution"] == 32 and cfg["r1_interval"] == 16
    assert not (tmp_path / "run").exists()


def test_minutes_budget_stops_cleanly_with_a_checkpoint(dataset, tmp_path, monkeypatch):
    """--minutes: the run stops at a step boundary once its wall-clock budget is spent, writes a
    checkpoint and G_ema, logs the first-window throughput; re-running the same command goes on."""
    import json

    from training import loop

    monkeypatch.setattr(loop, "FIRST_RATE_S", 0.0)
    run = tmp_path / "budget"
    cfg = config(dataset, kimg=1000.0, minutes=0.02, snap=1000.0)
    Trainer(cfg, str(run), log=lambda s: None).run(progress=False)
    ckpts = sorted(run.glob("ckpt-*.safetensors"))
    assert ckpts and (run / "G_ema.safetensors").exists()
    recs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert any("first_kimg_per_s" in r for r in recs)
    step = int(ckpts[-1].stem.split("-")[1])
    assert 0 < step < cfg.total_steps
    Trainer(cfg, str(run), log=lambda s: None).run(progress=False)  # resumes and stops again, later
    assert int(sorted(run.glob("ckpt-*.safetensors"))[-1].stem.split("-")[1]) > step


def test_an_interrupted_run_writes_a_checkpoint_and_resumes_bit_exactly(dataset, tmp_path, capsys):
    """SIGINT and SIGTERM to a real `train.py` process, and --minutes: the run stops at the next
    step boundary with a checkpoint of that step (exit 130 for a signal, one line), and the same
    command run again continues from it to the weights, optimiser state and ADA state of an
    uninterrupted run, bit for bit (CPU, one thread)."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO, render_cli_env

    import train

    steps = 20
    flags = ["--preset", "tiny", "--batch", "4", "--kimg", str(steps * 4 / 1000), "--snap", "1000", "--tick", "0.004",
             "--seed", "3", "--ada-kimg", "0.1", "--device", "cpu", "--threads", "1", "--no-progress"]  # fmt: skip

    def command(run: str) -> list[str]:
        return ["--data", dataset, "--out", str(tmp_path / run), *flags]

    def logged_steps(run: str) -> list[int]:
        log = tmp_path / run / "log.jsonl"
        return [json.loads(x)["step"] for x in log.read_text().splitlines()] if log.exists() else []

    assert train.main(command("whole")) == 0
    whole = read_checkpoint(latest_checkpoint(tmp_path / "whole"))
    assert whole.meta["step"] == steps

    stopped_at = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        run = sig.name
        env = {**render_cli_env(), "OMP_NUM_THREADS": "1"}
        env.pop("CREPS_DEBUG", None)
        proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *command(run)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        deadline = time.monotonic() + 300
        while len(logged_steps(run)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 130, err[-3000:]
        assert err.strip().splitlines()[-1] == "interrupted; re-run the same command to resume", err[-3000:]
        ckpt = latest_checkpoint(tmp_path / run)
        k = read_checkpoint(ckpt).meta["step"]
        assert 2 <= k < steps and ckpt.name == f"ckpt-{k:08d}.safetensors", (sig.name, k)
        assert logged_steps(run) == list(range(1, k + 1))  # it stopped where the checkpoint is
        stopped_at[run] = k

    # --minutes: the same boundary rule (a tiny budget: it stops after its first step or two)
    assert train.main([*command("minutes"), "--minutes", "0.0001"]) == 0
    stopped_at["minutes"] = read_checkpoint(latest_checkpoint(tmp_path / "minutes")).meta["step"]
    assert 1 <= stopped_at["minutes"] < steps

    for run in stopped_at:  # the same command again: resumes at its checkpoint and ends equal
        assert train.main(command(run)) == 0
        resumed = read_checkpoint(latest_checkpoint(tmp_path / run))
        assert resumed.meta["step"] == steps and resumed.meta["ada"] == whole.meta["ada"], run
        assert resumed.tensors.keys() == whole.tensors.keys()
        for key, value in whole.tensors.items():
            if not key.startswith("rng/"):
                assert torch.equal(resumed.tensors[key], value), (run, key)
        assert logged_steps(run) == list(range(1, steps + 1)), run
    err = capsys.readouterr().err
    assert f"resuming {tmp_path / 'SIGINT'} from ckpt-{stopped_at['SIGINT']:08d}" in err


def test_device_training_script_runs_end_to_end_on_cpu(dataset, tmp_path):
    """tests/gpu/train_bundled.sh, the prepared device run, on the CPU with the tiny preset."""
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "out"
    env = {
        **__import__("os").environ,
        "OUT": str(out), "DATA": dataset, "MINUTES": "0.05", "PRESET": "tiny", "RESOLUTION": "32",
        "BATCH": "4", "DEVICE": "cpu", "PY": sys.executable, "RUN": str(tmp_path / "run"),
    }  # fmt: skip
    proc = subprocess.run(["bash", str(repo / "tests/gpu/train_bundled.sh")], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p.name for p in out.iterdir()} >= {"G_ema.safetensors", "fakes.png", "log.jsonl", "train.log"}
    summary = json.loads((out / "summary.txt").read_text().strip().splitlines()[-1])
    ticks = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "kimg" in r]
    last = ticks[-1]  # the summary is the last tick of the copied log; its kimg is steps x batch (4)
    assert (summary["kimg"], summary["loss_G"]) == (last["kimg"], last["loss_G"]) and math.isfinite(last["loss_G"])
    assert last["step"] >= 1 and last["kimg"] == round(last["step"] * 4 / 1000, 3)
    import creps

    assert creps.load(out / "G_ema.safetensors").cfg == creps.preset("tiny")


def test_run_dir_and_training_checkpoint_render(dataset, tmp_path, capsys):
    """`--checkpoint RUN_DIR` renders the run's newest G_ema, and so does a training-state
    ckpt-*.safetensors given directly; a folder that is no run is refused with one line."""
    import zarr

    import render

    run = tmp_path / "run"
    Trainer(config(dataset, 0.008, snap=0.004), str(run), log=lambda s: None).run(progress=False)
    ckpts = sorted(p.name for p in run.glob("ckpt-*.safetensors"))
    assert ckpts == ["ckpt-00000001.safetensors", "ckpt-00000002.safetensors"]
    newest = run / "ckpt-00000002.safetensors"
    assert creps.resolve_checkpoint(str(run)) == str(newest)
    G = load(newest)
    for k, v in G.state_dict().items():  # the training state's G_ema, nothing else
        assert torch.equal(v, read_checkpoint(newest).tensors[f"G_ema/{k}"]), k
    assert creps.read_config(str(run)) == G.cfg
    with torch.no_grad():
        want = creps.to_uint8(G.render(G.z_from_seed(2), creps.Canvas(24, 40)))[0].numpy()
    for i, ckpt in enumerate((str(run), str(newest))):
        url = f"memory://ckpt{i}.zarr"
        argv = ["render", "--checkpoint", ckpt, "--size", "40x24", "--tile", "16", "--seed", "2", "--out", url]
        assert render.main([*argv, "--quiet", "--no-exports"]) == 0, capsys.readouterr().err
        assert np.array_equal(np.asarray(zarr.open_group(url, mode="r")["0"][:]), want)
        meta = zarr.open_group(url, mode="r").attrs["creps_gigapixel"]
        assert meta["spec"]["checkpoint"] == str(newest)  # the job names the file it rendered
    # only the exported G_ema left (checkpoints pruned by hand): that one renders
    for p in run.glob("ckpt-*.safetensors"):
        p.unlink()
    assert creps.resolve_checkpoint(str(run)) == str(run / "G_ema.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    rc = render.main(["render", "--checkpoint", str(empty), "--out", "memory://no.zarr", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not a training run" in err[0], err
