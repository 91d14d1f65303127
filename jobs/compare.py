"""compare: Lanczos upsampling of the training-resolution render next to CREPS rendered at a higher scale.

  render.py compare --checkpoint CKPT --seed 3 --scale 4 --crop 0.25,0.75,0.25,0.75 --out cmp.png

The paper's Fig. 1 as a command.  The generator renders its training canvas
(R x R) once; PIL's Lanczos-3 enlarges that to N = round(R * scale); the
generator also renders N x N directly, on the grid the enlargement samples
(creps.scaling.upsampled_canvas), so both panels show the same points.
--crop picks a region (fractions of the image, Y0,Y1,X0,X1), the same for
both panels; only that region is rendered at N.
Prints a sharpness figure for each panel: the share of spectral power above
half Nyquist (an upsampler adds none there), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import creps
from creps.cli import command

from . import JobSpecError
from .spec import default_checkpoint, parse_view

MARGIN = 8  # px around and between the panels
LABEL = 30  # px of the two label lines above each panel
MIN_COLUMN = 132  # px: a column is at least this wide, so the labels of small crops still fit
MAX_PANEL_PX = 16_000_000  # a crop larger than this (per panel) is refused: the picture would not open anywhere


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, metavar="CKPT", help="weights file or preset:NAME [default: bundled]")
    p.add_argument("--init-seed", type=int, default=0, metavar="N", help="weights seed for preset:NAME [default: 0]")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="latent seed [default: 0]")
    p.add_argument("--psi", type=float, default=1.0, metavar="F", help="truncation psi [default: 1]")
    p.add_argument("--scale", type=float, default=4.0, metavar="S", help="N = round(R * S), S > 1 [default: 4]")
    p.add_argument(
        "--crop", default="0,1,0,1", metavar="Y0,Y1,X0,X1", help="window, fractions of the image [default: all]"
    )
    p.add_argument("--magnify", type=int, default=1, metavar="M", help="show each pixel as M x M [default: 1]")
    p.add_argument("--out", required=True, metavar="PNG", help="the labelled picture")
    p.add_argument("--device", default=None, help="cpu or cuda [default: cuda if available]")


@dataclass(frozen=True)
class Comparison:
    """The two panels (uint8 [h, w, 3], same crop) and their sharpness figures."""

    lanczos: np.ndarray
    creps: np.ndarray
    resolution: int
    size: int
    rows: tuple[int, int]
    cols: tuple[int, int]

    @property
    def highfreq(self) -> dict[str, float]:
        from creps.scaling import highfreq_share

        return {"lanczos": highfreq_share(self.lanczos), "creps": highfreq_share(self.creps)}


def crop_pixels(crop: tuple[float, float, float, float], height: int, width: int) -> tuple[tuple[int, int], ...]:
    """Rows and columns of an ``height x width`` image that the crop covers.

    The crop is in fractions of the image's extent (pixel j of n covers
    [j/n, (j+1)/n)), so it names the same region at every resolution; the
    pixels partly inside are kept.
    """
    y0, y1, x0, x1 = crop
    if not (0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1):
        raise JobSpecError(f"--crop must be 0 <= Y0 < Y1 <= 1 and 0 <= X0 < X1 <= 1, got {crop}")

    def span(n: int, a: float, b: float) -> tuple[int, int]:
        first = min(n - 1, math.floor(a * n + 1e-9))
        return first, max(first + 1, min(n, math.ceil(b * n - 1e-9)))

    return span(height, y0, y1), span(width, x0, x1)


def compare(
    G: creps.Generator,
    seed: int,
    scale: float,
    crop: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 1.0),
    psi: float = 1.0,
) -> Comparison:
    """Render and resample (see the module doc); the generator's device does the rendering."""
    import torch

    from creps.scaling import lanczos_resize, to_unit, upsampled_canvas

    if not (math.isfinite(scale) and scale > 1):
        raise JobSpecError(f"--scale must be a number > 1, got {scale}")
    R = G.cfg.image_size
    n = round(R * scale)
    base = creps.Canvas(R, R)
    fine = upsampled_canvas(base, n, n)
    rows, cols = crop_pixels(crop, n, n)
    if (rows[1] - rows[0]) * (cols[1] - cols[0]) > MAX_PANEL_PX:
        raise JobSpecError(
            f"the crop is {rows[1] - rows[0]}x{cols[1] - cols[0]} px at scale {scale}; use a smaller --crop"
        )
    device = next(G.parameters()).device
    with torch.no_grad():
        ws = G.ws(G.z_from_seed(seed).to(device), psi)
        coarse = to_unit(G.render(ws, base)[0].cpu().numpy())
        ours = G.render(ws, fine, rows=rows, cols=cols)[0].cpu()
    up = lanczos_resize(coarse, n, n)[rows[0] : rows[1], cols[0] : cols[1]]
    lanczos = np.clip(up, 0, 255).astype(np.uint8)  # truncation, as creps.to_uint8 does
    return Comparison(lanczos, creps.to_uint8(ours).permute(1, 2, 0).numpy(), R, n, rows, cols)


def picture(cmp: Comparison, scale: float, magnify: int = 1) -> np.ndarray:
    """The labelled side-by-side picture, uint8 [H, W, 3] (size: ``picture_size``)."""
    from PIL import Image, ImageDraw

    h, w = cmp.creps.shape[:2]
    ph, pw = h * magnify, w * magnify
    col = max(pw, MIN_COLUMN)
    height, width = picture_size(h, w, magnify)
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    hf = cmp.highfreq
    panels = (
        (cmp.lanczos, f"Lanczos x{scale:g} of {cmp.resolution} px", hf["lanczos"]),
        (cmp.creps, f"CREPS at {cmp.size} px", hf["creps"]),
    )
    for i, (pixels, title, share) in enumerate(panels):
        x = MARGIN + i * (col + MARGIN)
        draw.text((x, MARGIN - 4), title, fill=(0, 0, 0))
        draw.text((x, MARGIN + LABEL // 2 - 4), f"above Nyquist/2: {100 * share:.2f} %", fill=(60, 60, 60))
        panel = Image.fromarray(pixels).resize((pw, ph), Image.Resampling.NEAREST)
        img.paste(panel, (x, MARGIN + LABEL))
    return np.asarray(img)


def picture_size(h: int, w: int, magnify: int = 1) -> tuple[int, int]:
    """(height, width) of the picture for crops of h x w pixels."""
    return MARGIN + LABEL + h * magnify + MARGIN, MARGIN + 2 * max(w * magnify, MIN_COLUMN) + 2 * MARGIN


def write_png(pixels: np.ndarray, out: str) -> None:
    """Whole or not at all: a temporary file beside ``out``, then a rename."""
    from PIL import Image

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(pixels).save(tmp)
    os.replace(tmp, path)


@command(interrupted="interrupted; nothing was written")
def run(args: argparse.Namespace) -> int:
    import torch

    if args.magnify < 1 or args.magnify > 16:
        raise JobSpecError(f"--magnify must be 1..16, got {args.magnify}")
    crop = parse_view(args.crop)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    G = creps.load(args.checkpoint or default_checkpoint(), init_seed=args.init_seed, device=device)
    cmp = compare(G, args.seed, args.scale, crop, args.psi)
    write_png(picture(cmp, args.scale, args.magnify), args.out)
    hf = cmp.highfreq
    print(
        f"power above half Nyquist: Lanczos {100 * hf['lanczos']:.2f} %, CREPS {100 * hf['creps']:.2f} % "
        f"({cmp.creps.shape[0]}x{cmp.creps.shape[1]} px crop of {cmp.size}px) -> {args.out}"
    )
    record = {
        "out": args.out,
        "resolution": cmp.resolution,
        "size": cmp.size,
        "rows": list(cmp.rows),
        "cols": list(cmp.cols),
        "highfreq": hf,
    }
    print(json.dumps(record))
    return 0
