"""One latent made ready to render many windows: mapped, folded and lowered once.

Both renderers of an image -- a render job's workers (``renderer.tiles.TileRenderer``)
and the endless-zoom tile maker (``viewer.ondemand.TileMaker``) -- render many
windows of a single latent. They prepare it here, once, the same way, so a
full-resolution endless tile keeps exactly the bytes of the render job: the
latent from the seed, ``ws`` through the mapping with truncation ``psi``, the
line-stage weights folded from ``ws`` and the pixel-stage weights folded in
fp32 and then lowered once for the precision on the device
(``creps.precision.matmul_mode``). The message of a tile whose pixels hold
NaN or inf lives here too: broken weights must fail the tile, never become a
black tile, whichever renderer meets them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import UserError
from .folded import LineWeights, PixelWeights
from .network import Generator, to_uint8
from .precision import matmul_mode


@dataclass(frozen=True, eq=False)
class Latent:
    """One latent's ``ws`` [1, num_ws, w_dim] and its weights, on the device that renders it."""

    ws: torch.Tensor
    line_weights: LineWeights
    pixel_weights: PixelWeights  # already lowered: pixel_weights.mode is the precision's matmul mode


def prepare_latent(G: Generator, seed: int, psi: float, precision: str, device: str | torch.device) -> Latent:
    """The latent of ``seed`` (``G.z_from_seed``) truncated by ``psi``, with its weights for ``precision``."""
    mode = matmul_mode(precision, device)
    with torch.no_grad():
        ws = G.ws(G.z_from_seed(seed).to(device), psi)
        return Latent(ws, G.line_weights(ws), G.pixel_weights(ws).lowered(mode))


def non_finite(tile: str) -> str:
    """What is said of tile ``tile`` (its name) when its pixels hold NaN or inf."""
    return f"tile {tile}: non-finite output (NaN/inf): the weights are broken"


def finite_uint8(img: torch.Tensor, tile: str, error: type[UserError]) -> np.ndarray:
    """uint8 (3, h, w) on the host of a pixel-stage output [1, 3, h, w];
    ``error(non_finite(tile))`` when any value is NaN or inf."""
    if not bool(torch.isfinite(img).all()):
        raise error(non_finite(tile))
    return to_uint8(img)[0].cpu().numpy()
