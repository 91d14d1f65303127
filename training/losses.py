"""GAN losses: non-saturating logistic (Goodfellow et al.) and the R1 penalty.

Kept as pure functions of logits and images so the unit tests can check them
against hand-computed values.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: mean softplus(-D(G(z)))."""
    return F.softplus(-fake_logits).mean()


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Logistic discriminator loss: mean softplus(D(fake)) + mean softplus(-D(real))."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def r1_penalty(real_img: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ||grad_x D(x)||^2 on real images [B] (``real_img`` must require grad).

    The loss adds ``gamma / 2 * mean(penalty) * interval`` every ``interval``
    steps (lazy regularisation), which matches the expected gradient of
    applying it every step."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real_img, create_graph=True)
    return grad.float().square().sum(dim=(1, 2, 3))


def r1_loss(real_img: torch.Tensor, real_logits: torch.Tensor, gamma: float, interval: int) -> torch.Tensor:
    return r1_penalty(real_img, real_logits).mean() * (gamma / 2) * interval
