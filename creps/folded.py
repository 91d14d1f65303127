"""Folded per-latent matrices of both stages: ``LineWeights``, ``PixelWeights``, ``BlockWeights``.

A latent's equalised-lr gains, style modulation, demodulation and activation
gains are folded into one matrix and bias per layer once
(``Generator.line_weights`` / ``Generator.pixel_weights``); a job reuses the
result for every line range and tile it renders (docs/exactness.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .layers import Affine
from .precision import lower_bias, lower_weight


# Frozen and compared by identity (eq=False): they hold tensors, whose ``==`` is
# elementwise, and one instance is meant to be built per latent and shared.
@dataclass(frozen=True, eq=False)
class BlockWeights:
    """The three style-modulated layers of one block, in the order they run.

    Line blocks (b8 ... bR) and the refinement blocks (block0, block1) share
    this shape: ``fc0 -> fc1 -> tores``, the first two with leaky ReLU.
    """

    fc0: Affine
    fc1: Affine
    tores: Affine

    def sample(self, b: int) -> BlockWeights:
        """Sample ``b``'s matrices as plain 2-D ones.

        Per-sample weights are ``[B, in, out]`` (a batched matmul); the pixel
        stage renders one sample at a time, and 2-D operands let it run one
        ``addmm`` per layer instead.
        """
        return BlockWeights(*(Affine(wt[b], bias[b, 0]) for wt, bias in (self.fc0, self.fc1, self.tores)))

    def lowered(self, mode: str) -> BlockWeights:
        """The same layers prepared for ``creps.precision.low_matmul`` in ``mode``."""
        return BlockWeights(*(_lower(a, mode) for a in (self.fc0, self.fc1, self.tores)))


def _lower(a: Affine, mode: str) -> Affine:
    return Affine(lower_weight(a.weight, mode), lower_bias(a.bias, mode))


@dataclass(frozen=True, eq=False)
class LineWeights:
    """Folded matrices of the line stage for one batch of latents.

    ``first_fc1`` is b4's only layer that matters: b4 has no fc0, and its
    tores output is never used.  ``blocks`` are b8 ... bR; each adds its tores
    output to the cumulative bi-line.
    """

    first_fc1: Affine
    blocks: tuple[BlockWeights, ...]
    input_amp: torch.Tensor  # b4's Fourier-feature amplitudes [B, C, 1, 2r] (FourierInput.amplitude)


@dataclass(frozen=True, eq=False)
class PixelWeights:
    """Folded matrices of the pixel stage for one batch of latents.

    ``decoders`` (decoder_16 ... decoder_R, four layers each; empty when the
    config has ``decoders="none"`` or ``bilines="last"``), ``last`` and
    ``img`` do not depend on the latent, so they are plain 2-D layers shared
    by every sample.  ``refine`` (block0, block1) is modulated by the last w
    and so is per sample; see ``sample``.
    """

    decoders: tuple[tuple[Affine, ...], ...]
    last: tuple[Affine, ...]
    img: Affine
    refine: tuple[BlockWeights, ...]
    mode: str = "fp32"  # how the matrices are prepared (creps.precision.matmul_mode)

    def sample(self, b: int) -> PixelWeights:
        """The weights of sample ``b`` alone, every matrix 2-D (see ``BlockWeights.sample``)."""
        return dataclasses.replace(self, refine=tuple(blk.sample(b) for blk in self.refine))

    def lowered(self, mode: str) -> PixelWeights:
        """Every matrix prepared for ``mode`` (``creps.precision.matmul_mode``): folded once
        per latent in fp32, then rounded once, so a bf16/fp16 job rounds exactly the
        weights the fp32 job uses.  A job lowers once and reuses the result."""
        if mode == self.mode:
            return self
        if self.mode != "fp32":
            raise ValueError(f"weights already prepared for {self.mode}; lower the fp32 weights to {mode}")
        return PixelWeights(
            decoders=tuple(tuple(_lower(a, mode) for a in dec) for dec in self.decoders),
            last=tuple(_lower(a, mode) for a in self.last),
            img=_lower(self.img, mode),
            refine=tuple(blk.lowered(mode) for blk in self.refine),
            mode=mode,
        )
