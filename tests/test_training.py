"""Unit tests of the trainer's pieces against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.augment import AdaController, augment
from training.config import TrainConfig
from training.losses import d_loss, g_loss, r1_loss, r1_penalty
from training.loop import ema_beta, ema_update, step_generator
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
    loss.backward()
    assert x.grad is not None


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
