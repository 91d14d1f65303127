"""Unit tests of the trainer's pieces against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.augment import AdaController, augment
from training.config import TrainConfig
from training.loop import ema_beta, ema_update, step_generator
from training.losses import d_loss, g_loss, r1_loss, r1_penalty
from training.networks import Discriminator, minibatch_std


def sp(x: float) -> float:
    return math.log1p(math.exp(x))


def test_losses_match_hand_computed():
    real, fake = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    assert g_loss(fake).item() == pytest.approx((sp(-0.5) + sp(-3.0)) / 2, rel=1e-6)
    want = (sp(0.5) + sp(3.0)) / 2 + (sp(-1.0) + sp(2.0)) / 2
    assert d_loss(real, fake).item() == pytest.approx(want, rel=1e-6)


def test_r1_penalty_hand_computed():
    # D(x) = sum(a * x^2): grad = 2 a x, so ||grad||^2 = 4 a^2 sum(x^2) per sample.
    a = 0.5
    x = torch.tensor([[[[1.0, 2.0]]], [[[3.0, 0.0]]]], requires_grad=True)  # [2, 1, 1, 2]
    logits = (a * x.square()).sum(dim=(1, 2, 3))
    pen = r1_penalty(x, logits)
    assert pen.tolist() == pytest.approx([4 * a * a * 5, 4 * a * a * 9])
    # loss = mean * gamma / 2 * interval, and it is differentiable (create_graph)
    loss = r1_loss(x, (a * x.square()).sum(dim=(1, 2, 3)), gamma=10.0, interval=16)
    assert loss.item() == pytest.approx(7.0 * 5 * 16)
    loss.backward()  # loss = 40 * sum(x^2) here, so its gradient is 80 x
    assert x.grad.flatten().tolist() == pytest.approx([80.0, 160.0, 240.0, 0.0])


def test_ema_rule():
    G, G_ema = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        G.weight.fill_(1.0), G_ema.weight.fill_(3.0)
    ema_update(G_ema, G, 0.25)
    # p_ema <- p + beta * (p_ema - p) = 1 + 0.25 * 2
    assert torch.allclose(G_ema.weight, torch.full((1, 2), 1.5))
    # half-life ema_nimg: beta = 0.5 ** (batch / ema_nimg); ramp-up caps ema_nimg at nimg * rampup
    assert ema_beta(32, 10**6, 10_000, 0.05) == pytest.approx(0.5 ** (32 / 10_000))
    assert ema_beta(32, 1000, 10_000, 0.05) == pytest.approx(0.5 ** (32 / 50))
    assert TrainConfig(data="x", batch=64).ema_nimg == 20_000


@pytest.mark.parametrize("res", [8, 32, 64])
def test_discriminator_shapes(res):
    torch.manual_seed(0)
    D = Discriminator(res, channel_base=256, channel_max=32)
    assert len(D.blocks) == int(math.log2(res)) - 2
    out = D(torch.randn(6, 3, res, res))
    assert out.shape == (6,) and out.dtype == torch.float32
    with pytest.raises(ValueError, match=f"expects {res}x{res}"):
        D(torch.randn(2, 3, res * 2, res * 2))


def test_minibatch_std_channel():
    x = torch.zeros(4, 2, 4, 4)
    x[0::2] = 1.0  # groups of 4: two ones, two zeros -> std 0.5 everywhere
    y = minibatch_std(x, 4)
    assert y.shape == (4, 3, 4, 4) and torch.allclose(y[:, 2], torch.full((4, 4, 4), 0.5), atol=1e-4)


def test_augment_identity_at_zero_and_keeps_shape():
    x = torch.randn(5, 3, 16, 16)
    assert torch.equal(augment(x, 0.0, step_generator(0, 0)), x)
    y = augment(x, 1.0, step_generator(0, 0))
    assert y.shape == x.shape and not torch.equal(y, x)
    # same (seed, step) -> same augmentation; gradients flow through
    assert torch.equal(augment(x, 0.5, step_generator(1, 7)), augment(x, 0.5, step_generator(1, 7)))
    xr = x.clone().requires_grad_(True)
    augment(xr, 1.0, step_generator(0, 1)).sum().backward()
    assert xr.grad is not None and torch.isfinite(xr.grad).all()


def test_ada_controller_moves_p():
    ada = AdaController(target=0.6, ada_kimg=0.1, interval=2)
    for step in range(4):
        ada.accumulate(torch.ones(10))  # D sure of every real: overfitting -> p up
        ada.step(step, batch=10)
    assert ada.p == pytest.approx(2 * 10 * 2 / 100)
    for step in range(4, 20):
        ada.accumulate(-torch.ones(10))
        ada.step(step, batch=10)
    assert ada.p == 0.0


def test_data_order_is_a_function_of_seed_and_position():
    from training.dataset import ImageDataset

    ds = ImageDataset(np.zeros((10, 8, 8, 3), np.uint8), [str(i) for i in range(10)], seed=5)
    whole = ds.order(0, 30)
    assert sorted(whole[:10]) == list(range(10)) and sorted(whole[10:20]) == list(range(10))
    fresh = ImageDataset(ds.images, ds.names, seed=5)
    assert np.array_equal(fresh.order(13, 9), whole[13:22])


def test_default_gamma_table_and_formula():
    from training.config import default_gamma

    assert [default_gamma(r) for r in (32, 64, 128, 256, 512, 1024)] == [0.05, 0.1, 0.5, 2.0, 10.0, 32.0]
    # outside the table: 0.0002 * r^2, not an interpolation of it
    assert default_gamma(16) == pytest.approx(0.0512) and default_gamma(2048) == pytest.approx(838.8608)


# ------------------------------------------------------------------ the CLI boundary
@pytest.fixture
def no_debug_env(monkeypatch):
    monkeypatch.delenv("CREPS_DEBUG", raising=False)


def parse_train(argv: list[str]):
    import train

    return train.build_parser().parse_args(train.with_default_command(argv))


def test_train_is_the_default_subcommand():
    import train

    assert train.with_default_command(["--data", "D", "--out", "R"]) == ["train", "--data", "D", "--out", "R"]
    assert train.with_default_command(["--debug", "--data", "D"]) == ["--debug", "train", "--data", "D"]
    assert train.with_default_command([]) == ["train"]
    for argv in (["train", "--data", "D"], ["dataset", "a", "b"], ["--debug", "metrics", "c"], ["--help"]):
        assert train.with_default_command(argv) == argv
    a, b = (
        parse_train(["--data", "D", "--out", "R", "--batch", "8"]),
        parse_train(["train", "--data", "D", "--out", "R", "--batch", "8"]),
    )
    assert vars(a) == vars(b) and a.command == "train" and a.debug is False


def test_config_from_args_matches_flag_defaults_and_renames():
    assert TrainConfig.from_args(parse_train(["--data", "D", "--out", "R"])) == TrainConfig(data="D")
    cfg = TrainConfig.from_args(
        parse_train(
            [
                "--data",
                "D",
                "--out",
                "R",
                "--target",
                "0.5",
                "--glr",
                "0.001",
                "--dlr",
                "0.003",
                "--d-cbase",
                "64",
                "--d-cmax",
                "32",
                "--tick",
                "2",
                "--no-amp",
                "--kimg",
                "1.5M",
                "--metrics",
                "fid,kid",
                "--ema-kimg",
                "3",
            ]
        )
    )
    assert (
        cfg.ada_target,
        cfg.lr_g,
        cfg.lr_d,
        cfg.d_channel_base,
        cfg.d_channel_max,
        cfg.tick_kimg,
        cfg.amp,
        cfg.kimg,
        cfg.metrics,
        cfg.ema_kimg,
    ) == (0.5, 0.001, 0.003, 64, 32, 2.0, False, 1500.0, ("fid", "kid"), 3.0)


def test_train_error_is_a_user_error():
    from creps.errors import UserError
    from training import TrainError, TrainingError

    assert issubclass(TrainError, UserError) and TrainError.exit_code == 2 and TrainingError is TrainError


@pytest.mark.parametrize("prefix", [[], ["train"]])
def test_cli_bad_input_is_one_error_line_exit_2(prefix, tmp_path, capsys, no_debug_env):
    import train

    rc = train.main([*prefix, "--data", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "not a built dataset" in err[0]
    assert train.main([*prefix, "--data", "x", "--out", str(tmp_path / "run"), "--batch", "1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --batch must be >= 2 (minibatch-std needs pairs), got 1"
    for bad in ("nan", "inf"):
        assert train.main([*prefix, "--data", "x", "--out", str(tmp_path / "run"), "--kimg", bad]) == 2
        assert capsys.readouterr().err.strip() == f"error: kimg must be a finite number, got {bad}"
    assert not (tmp_path / "run").exists()


def test_cli_checkpoint_error_reaches_the_boundary_unchanged(tmp_path, capsys, no_debug_env):
    from PIL import Image

    import train
    from training.dataset import build_dataset

    (tmp_path / "src").mkdir()
    for i in range(8):
        Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(tmp_path / "src" / f"{i}.png")
    build_dataset(str(tmp_path / "src"), str(tmp_path / "ds"), 8, log=lambda s: None)
    (tmp_path / "junk.pkl").write_bytes(b"garbage")
    rc = train.main(
        [
            "--data",
            str(tmp_path / "ds"),
            "--out",
            str(tmp_path / "run"),
            "--preset",
            "tiny",
            "--batch",
            "4",
            "--resume",
            str(tmp_path / "junk.pkl"),
            "--dry-run",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "junk.pkl: unknown checkpoint format" in err[0]
    )


@pytest.mark.parametrize("before, after", [(["--debug"], []), ([], ["--debug"]), (["train"], ["--debug"])])
def test_cli_debug_reraises_with_traceback(before, after, tmp_path, monkeypatch, no_debug_env):
    """--debug as a global flag (before the implicit subcommand) or among the subcommand's options; or CREPS_DEBUG=1."""
    import train
    from training import TrainError

    bad = ["--data", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "run")]
    with pytest.raises(TrainError, match="not a built dataset"):
        train.main([*before, *bad, *after])
    monkeypatch.setenv("CREPS_DEBUG", "1")
    with pytest.raises(TrainError):
        train.main(bad)


def test_cli_interrupt_is_one_line_exit_130(monkeypatch, capsys, no_debug_env):
    import train
    from creps.cli import command
    from training import cli_train

    @command()
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_train, "run", interrupted)
    assert train.main(["--data", "D", "--out", "R"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted; re-run the same command to resume"


def test_cli_help_lists_subcommands_and_their_options(capsys):
    import train

    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(f"    {name}" in out for name in ("train", "dataset", "metrics"))
    assert "--debug" in out and "--data PATH" in out  # the default subcommand's options follow the list
    for sub, options in {
        "train": ("--kimg", "--glr", "--no-amp", "--debug"),
        "dataset": ("--resolution", "--crops", "--min-images", "--debug"),
        "metrics": ("--num", "--psi", "--metrics", "--debug"),
    }.items():
        with pytest.raises(SystemExit):
            train.main([sub, "--help"])
        out = capsys.readouterr().out
        assert out.startswith(f"usage: train.py {sub}") and all(o in out for o in options)


def test_dataset_reads_16_bit_png_by_its_depth(tmp_path):
    """16-bit grey PNGs are scaled to 8 bits (Pillow's convert('RGB') would clip them white)."""
    from PIL import Image

    from training.dataset import iter_images

    a = np.full((40, 40), 32768, np.uint16)
    a[:20] = 8192
    Image.fromarray(a).save(tmp_path / "deep.png")
    [(name, img)] = list(iter_images(str(tmp_path), 16))
    assert name.endswith("deep.png") and img.shape == (16, 16, 3)
    assert 30 <= img[0, 0, 0] <= 34 and 126 <= img[-1, -1, 0] <= 130
