"""Scale consistency (CREPS Sec. 3.2-3.3): does the image at k*R, averaged down to R, agree with the image at R?

For each seed the generator renders its training canvas (R x R) and the
k-times finer canvas of the same window, with the finer grid placed so that
each k x k block averages to one coarse pixel centre
(``creps.scaling.upsampled_canvas``; on the official ``linspace(0, 1, k R)``
grid the blocks sit up to half a coarse pixel off, a systematic error that
cost the bundled model 0.1 dB at k = 2 and 1.1 dB at k = 4).  The fine image is area-downsampled by k and compared with
the coarse one: PSNR (dB, 8-bit peak) and mean absolute difference (8-bit
levels), on unrounded renders mapped to 0..255.

Reference: the same round trip with PIL's Lanczos-3 in place of the
generator (enlarge the R render by k, area-downsample back).  It is
consistent almost by construction and adds no detail; it is the ceiling an
interpolator reaches, not a competitor that adds detail.  ``highfreq`` (the
share of spectral power above half Nyquist of the k R image,
``creps.scaling.highfreq_share``) says how much new detail each k R image
carries.  The two figures pull against each other: a generator that renders
real detail at k R cannot also average back exactly to point samples at R.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from creps import Canvas, Generator
from creps.scaling import area_downsample, highfreq_share, lanczos_resize, mean_abs_diff, psnr, to_unit

from .errors import TrainError

MAX_SIDE = 16384  # k * R beyond this is refused before anything renders (a 16k^2 render is minutes on a GPU)


def parse_scales(text: str) -> tuple[int, ...]:
    """``1,2,4`` -> (1, 2, 4): positive integers (area downsampling needs whole blocks)."""
    try:
        scales = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise TrainError(f"--scales must be integers like 1,2,4, got {text!r}") from None
    if not scales or any(k < 1 for k in scales):
        raise TrainError(f"--scales must be positive integers like 1,2,4, got {text!r}")
    return scales


def parse_seeds(text: str) -> tuple[int, ...]:
    """``0-3`` or ``1,5,9`` (or a mix) -> the seeds, in order."""
    seeds: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            a, sep, b = part.partition("-")
            seeds.extend(range(int(a), int(b) + 1) if sep else [int(a)])
    except ValueError:
        raise TrainError(f"seeds must look like 0-3 or 1,5,9, got {text!r}") from None
    if not seeds or any(not 0 <= s < 2**32 for s in seeds):
        raise TrainError(f"seeds must be in 0..2^32-1 (like 0-3 or 1,5,9), got {text!r}")
    return tuple(seeds)


def _figures(coarse: list[np.ndarray], down: list[np.ndarray], fine: list[np.ndarray]) -> dict[str, Any]:
    """Pooled over seeds: PSNR of the mean squared error, mean |difference|, mean high-frequency share."""
    a, b = np.stack(coarse), np.stack(down)
    return {
        "psnr": psnr(a, b),
        "mad": mean_abs_diff(a, b),
        "highfreq": float(np.mean([highfreq_share(f) for f in fine])),
    }


@torch.no_grad()
def scale_consistency(
    G: Generator,
    seeds: Sequence[int] = (0, 1, 2, 3),
    scales: Sequence[int] = (2, 4),
    psi: float = 1.0,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Figures per k for the generator and for the Lanczos reference (see the module doc)."""
    from creps.scaling import upsampled_canvas

    R = G.cfg.image_size
    for k in scales:
        if k * R > MAX_SIDE:
            raise TrainError(f"scale {k} gives a {k * R}^2 render (over {MAX_SIDE}); use smaller --scales")
    G = G.to(device).eval()
    base = Canvas(R, R)
    out: dict[str, Any] = {"resolution": R, "seeds": list(seeds), "psi": psi, "scales": {}}
    coarse = {}
    ws = {}
    for s in seeds:
        ws[s] = G.ws(G.z_from_seed(s).to(device), psi)
        coarse[s] = to_unit(G.render(ws[s], base)[0].cpu().numpy())
    for k in scales:
        fine_canvas = upsampled_canvas(base, k * R, k * R)
        ours: dict[str, list[np.ndarray]] = {"down": [], "fine": []}
        ref: dict[str, list[np.ndarray]] = {"down": [], "fine": []}
        for s in seeds:
            fine = to_unit(G.render(ws[s], fine_canvas)[0].cpu().numpy())
            up = lanczos_resize(coarse[s], k * R, k * R)
            ours["down"].append(area_downsample(fine, k))
            ours["fine"].append(fine)
            ref["down"].append(area_downsample(up, k))
            ref["fine"].append(up)
        cs = [coarse[s] for s in seeds]
        out["scales"][str(k)] = {
            "creps": _figures(cs, ours["down"], ours["fine"]),
            "lanczos": _figures(cs, ref["down"], ref["fine"]),
        }
    return out
