"""Differentiable augmentation for small datasets (ADA, Karras et al. 2020), reduced
to the transforms that matter most: x-flip, integer translation, brightness,
contrast and saturation.

Each transform is applied to each image independently with probability ``p``;
at ``p = 0`` the input comes back unchanged.  Both real and generated images
go through the same pipe before D, so D never sees a distribution that G
could learn to imitate ("leaking"): gradients flow through every transform.
Randomness comes from an explicit ``torch.Generator``, so the loop can make it
a function of (seed, step).  The adaptive controller is in ``AdaController``.
"""

from __future__ import annotations

import torch

LUMA = torch.tensor([0.299, 0.587, 0.114])


def _reflect(idx: torch.Tensor, n: int) -> torch.Tensor:
    period = 2 * (n - 1)
    idx = idx.remainder(period)
    return torch.where(idx >= n, period - idx, idx)


def augment(img: torch.Tensor, p: float, gen: torch.Generator, share: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Augmented copy of ``img`` [B, C, H, W] (float, about [-1, 1]).

    ``share = (rank, world)``: ``img`` is images ``rank, rank + world, ...`` of
    a global batch of ``B * world`` split over ``world`` processes.  Every
    random draw is made for the whole global batch (the same on every rank,
    from the same generator) and each rank takes its images' values, so a
    distributed step augments each image exactly as a single process would.
    """
    if p <= 0:
        return img
    b, _, h, w = img.shape
    dev = img.device
    rank, world = share
    n = b * world

    def mine(t: torch.Tensor) -> torch.Tensor:
        return t[rank::world]

    def mask() -> torch.Tensor:
        return mine(torch.rand(n, generator=gen) < p).to(dev).reshape(b, 1, 1, 1)

    def normal(std: float) -> torch.Tensor:
        return (mine(torch.randn(n, generator=gen)) * std).to(dev).reshape(b, 1, 1, 1)

    x = torch.where(mask(), img.flip(3), img)
    # integer translation up to 1/8 of the size, reflect padding
    m = mask().reshape(b)
    ty = (mine(torch.randint(-(h // 8), h // 8 + 1, (n,), generator=gen)).to(dev) * m).reshape(b, 1)
    tx = (mine(torch.randint(-(w // 8), w // 8 + 1, (n,), generator=gen)).to(dev) * m).reshape(b, 1)
    rows = _reflect(torch.arange(h, device=dev).reshape(1, h) - ty, h)  # [B, H]
    cols = _reflect(torch.arange(w, device=dev).reshape(1, w) - tx, w)  # [B, W]
    bi = torch.arange(b, device=dev).reshape(b, 1, 1)
    x = x.permute(0, 2, 3, 1)[bi, rows.reshape(b, h, 1), cols.reshape(b, 1, w)].permute(0, 3, 1, 2)
    # colour: brightness (add), contrast (scale about the image mean), saturation (about luma)
    x = torch.where(mask(), x + normal(0.2), x)
    c = torch.exp2(normal(0.5))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = torch.where(mask(), mean + (x - mean) * c, x)
    if x.shape[1] == 3:
        s = torch.exp2(normal(1.0))
        luma = (x * LUMA.to(dev, x.dtype).reshape(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        x = torch.where(mask(), luma + (x - luma) * s, x)
    return x


class AdaController:
    """Adjusts p so that E[sign(D(real))] approaches ``target`` (overfitting heuristic r_t).

    Every ``interval`` steps p moves by sign(r_t - target) * (images seen since
    the last adjustment) / (ada_kimg * 1000): it can go from 0 to 1 in
    ``ada_kimg`` kimg."""

    def __init__(self, target: float = 0.6, ada_kimg: float = 100.0, interval: int = 4, p: float = 0.0):
        self.target, self.ada_kimg, self.interval = target, ada_kimg, interval
        self.p, self.sign_sum, self.count = p, 0.0, 0

    def accumulate(self, real_logits: torch.Tensor) -> None:
        self.sign_sum += float(real_logits.detach().sign().sum())
        self.count += int(real_logits.numel())

    def step(self, step: int, batch: int) -> None:
        """Call after every training step ``step`` (0-based)."""
        if (step + 1) % self.interval or not self.count:
            return
        rt = self.sign_sum / self.count
        adjust = (1.0 if rt > self.target else -1.0) * batch * self.interval / (self.ada_kimg * 1000)
        self.p = min(max(self.p + adjust, 0.0), 1.0)
        self.sign_sum, self.count = 0.0, 0

    def state(self) -> dict:
        return {"p": self.p, "sign_sum": self.sign_sum, "count": self.count}

    def load(self, state: dict) -> None:
        self.p, self.sign_sum, self.count = float(state["p"]), float(state["sign_sum"]), int(state["count"])
