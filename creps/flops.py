"""FLOP counts of the two stages (2 x multiply-accumulate), for benchmarks."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from .presets import GeneratorConfig


@dataclass(frozen=True)
class Flops:
    line: int  # all row and column lines of the canvas
    pixel: int  # all pixels of the canvas
    per_pixel: int
    per_line_position: int  # one row line + one column line

    @property
    def total(self) -> int:
        return self.line + self.pixel

    @property
    def line_share(self) -> float:
        return self.line / self.total


def pixel_flops(cfg: GeneratorConfig, products: int = 1) -> int:
    """One pixel.  ``products``: how many products of each layer's shape a matmul executes
    (``creps.precision.matmul_products``: 3 for bf16x3); 1 counts the useful work."""
    c, r = cfg.biline_channels, cfg.rank
    k = cfg.num_bilines
    dec = c * 2 * c + 2 * c * 4 * c + 4 * c * 2 * c + 2 * c * c
    fusion = k * c * r  # rank-r fusion per block (elementwise, fp32 in every precision)
    between = k - 1 if cfg.decoders == "multiple" else 0  # variants without decoders only add
    macs = between * dec + dec  # decoders per later block + decoder_last
    macs += c * cfg.img_channels  # decoder_img
    c4, c2 = 4 * c, 2 * c
    macs += c * c4 + c4 * c4 + c4 * cfg.img_channels  # block0
    macs += c4 * c2 + c2 * c2 + c2 * cfg.img_channels  # block1
    return 2 * (fusion + products * macs)


def line_flops(cfg: GeneratorConfig) -> int:
    """One line (row or column): rank slots through every line block."""
    macs = 0
    res = cfg.block_resolutions
    macs += cfg.channels(4) * cfg.channels(4)  # b4.fc1
    for prev, cur in itertools.pairwise(res):
        ci, co = cfg.channels(prev), cfg.channels(cur)
        macs += ci * co + co * co + co * cfg.biline_channels
    return 2 * macs * cfg.rank


def flops(cfg: GeneratorConfig, height: int, width: int) -> Flops:
    per_px, per_line = pixel_flops(cfg), line_flops(cfg)
    return Flops(
        line=per_line * (height + width),
        pixel=per_px * height * width,
        per_pixel=per_px,
        per_line_position=2 * per_line,
    )
