"""One call from a checkpoint to a picture: ``creps.render_image`` (what a notebook looks for).

It is ``Generator.render`` of the whole canvas with the render job's latent
(``render.py render --seed S --psi P --size WxH``: the same pixels as the
job's level 0) and the job's uint8 rule, on every core (``creps.lanes``).
The whole image is held as float32 while it is made (12 bytes per pixel):
for canvases beyond a few thousand pixels a side, a render job
(``render.py render``) writes tiles into a store in bounded memory instead.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .canvas import Canvas
from .checkpoint import load
from .errors import UserError
from .latent import finite_uint8
from .network import Generator


def render_image(
    model: Generator | str | os.PathLike[str],
    seed: int = 0,
    size: int | tuple[int, int] | None = None,
    psi: float = 1.0,
    *,
    view: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 1.0),
    precision: str = "fp32",
    device: str = "cpu",
    lanes: int | None = None,
) -> np.ndarray:
    """The image of latent ``seed`` as uint8 ``(height, width, 3)`` (``PIL.Image.fromarray`` takes it).

    ``model``: a generator, or anything ``creps.load`` reads (a checkpoint
    file, ``preset:NAME``, a training run directory), loaded on ``device``.
    ``size``: ``N`` (N x N) or ``(width, height)``; default the model's
    training resolution.  ``view``: the coordinate window ``(y0, y1, x0,
    x1)``, as ``--view``.  ``precision``: the pixel stage's
    (``creps.precision``).  ``lanes``: CPU threads (default: torch's count).
    UserError when the weights give NaN or inf.
    """
    G = model if isinstance(model, Generator) else load(model, device=device)
    if size is None:
        width = height = G.cfg.image_size
    elif isinstance(size, int):
        width = height = size
    else:
        width, height = size
    canvas = Canvas(height, width, y=view[:2], x=view[2:])
    with torch.no_grad():
        img = G.render(G.z_from_seed(seed), canvas, psi=psi, precision=precision, lanes=lanes)
        return np.ascontiguousarray(finite_uint8(img, "image", UserError).transpose(1, 2, 0))
