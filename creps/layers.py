"""Equalised-learning-rate layers of the CREPS generator.

Every layer keeps the official parameter names and shapes (so checkpoints map
one to one) but exposes its computation as *effective matrices*: the
equalised-lr gains, the style modulation, the demodulation and the activation
gain are folded into one ``[in, out]`` matrix and one bias before any pixel is
touched.  Folding costs a few small matrix ops per latent, and leaves each
pixel with a single ``addmm`` + activation per layer, which is what makes the
pixel stage run near matmul peak.

Note on the activation gain: ``lrelu(z) * g == lrelu(g * z)`` for ``g > 0``, so
the sqrt(2) gain is moved into the weights and bias of the same layer.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)


class Affine(NamedTuple):
    """One folded layer, ``y = x @ weight + bias``.

    A named pair rather than a bare tuple so that the weight containers of the
    generator say which tensor is which; it still unpacks as ``wt, b``.
    Shapes are ``[in, out]`` / ``[out]`` for a plain layer and ``[B, in, out]``
    / ``[B, 1, out]`` for a style-modulated one (one matrix per latent).
    """

    weight: torch.Tensor
    bias: torch.Tensor


def activate(y: torch.Tensor, lrelu: bool, clamp: float | None) -> torch.Tensor:
    """Leaky ReLU and clamp; in place when no gradient is wanted (inference)."""
    inplace = not (torch.is_grad_enabled() and y.requires_grad)
    if lrelu:
        y = F.leaky_relu(y, LRELU_SLOPE, inplace=inplace)
    if clamp is not None:
        y = y.clamp_(-clamp, clamp) if inplace else y.clamp(-clamp, clamp)
    return y


def apply(x: torch.Tensor, wt: torch.Tensor, b: torch.Tensor, lrelu: bool, clamp: float | None) -> torch.Tensor:
    """x [..., N, in] @ wt ([in, out] or [B, in, out]) + b ([out] or [B, 1, out])."""
    if wt.dim() == 2:
        if x.dim() == 2:
            y = torch.addmm(b, x, wt)
        else:
            y = torch.matmul(x, wt).add_(b) if not (torch.is_grad_enabled() and x.requires_grad) else x @ wt + b
    else:
        y = torch.baddbmm(b, x, wt)
    return activate(y, lrelu, clamp)


class FullyConnected(nn.Module):
    """Plain equalised-lr linear layer (mapping, affines, decoders)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        lrelu: bool = False,
        lr_multiplier: float = 1.0,
        bias_init: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.lrelu = in_features, out_features, lrelu
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init)))
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def effective(self) -> Affine:
        """(wt [in, out], b [out]) with lr and activation gains folded in."""
        g = LRELU_GAIN if self.lrelu else 1.0
        return Affine((self.weight * (self.weight_gain * g)).t(), self.bias * (self.bias_gain * g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wt, b = self.effective()
        return apply(x, wt, b, self.lrelu, None)


class ModulatedFC(nn.Module):
    """Style-modulated 1x1 layer: official ``SynthesisLayer`` (demodulated,
    lrelu) or ``ToResLayer`` (``tores=True``: styles / sqrt(in), linear)."""

    def __init__(
        self, in_channels: int, out_channels: int, w_dim: int, clamp: float | None, tores: bool = False
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.clamp, self.tores = in_channels, out_channels, clamp, tores
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def effective(self, w: torch.Tensor) -> Affine:
        """Per-sample (wt [B, in, out], b [B, 1, out]) for latents w [B, w_dim]."""
        styles = self.affine(w)
        if self.tores:
            styles = styles * (1.0 / math.sqrt(self.in_channels))
        wm = self.weight.unsqueeze(0) * styles.unsqueeze(1)  # [B, out, in]
        g = 1.0
        if not self.tores:
            wm = wm * (wm.square().sum(dim=2, keepdim=True) + 1e-8).rsqrt()
            g = LRELU_GAIN
        if g != 1.0:
            wm = wm * g
        b = (self.bias * g).expand(w.shape[0], 1, self.out_channels)
        return Affine(wm.transpose(1, 2), b)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        wt, b = self.effective(w)
        return apply(x, wt, b, not self.tores, self.clamp)
