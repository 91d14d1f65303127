"""The pixels of an IIIF image request: which level to read, resampling, mirror, rotation, quality, encoding.

Every tile source of the viewer offers the same primitive: ``window(k, y0,
y1, x0, x1)``, the uint8 pixels of its image downsampled ``2**k`` times (the
DeepZoom level ``max_level - k``) over a window of that level's pixels. For
a store these are the pyramid's 2x2 means (``StoreTiles.window``), for an
exported DZI its tiles (``DziFiles.window``), for an endless canvas the
generator sampled on that level's canvas (``TileMaker.window``). On top of it:

* ``plan_read`` picks the read. When the request is exactly a window of some
  level (a region at full resolution; an IIIF tile at a scale factor
  ``2**k``, region aligned to ``2**k`` and size ``ceil(region / 2**k)``;
  one of info.json's ``sizes``) that window is the answer, unresampled: so
  a full-resolution region of an endless canvas is exactly the creps API's
  crop (the render job's pixels) and a downscaled one shows exactly the
  pixels of the DeepZoom level at that scale. Otherwise it reads the
  coarsest level still at least as fine as the output on both axes and
  resamples it with ``RESAMPLE`` (PIL's Lanczos-3, centre-aligned, on the
  exact sub-pixel box of the region), going coarser while the window would
  exceed ``16 x`` the output's area (only very distorted ``w,h`` sizes do).
* ``^`` (upscaled) requests of a stored image (store, DZI) are that Lanczos
  resampling of the full-resolution pixels. Of an endless canvas they are
  rendered (``viewer.endless.iiif_image``): the generator evaluated on
  ``creps.scaling.window_canvas``, the canvas whose pixels sit where a
  centre-aligned resize of the region would sample, i.e. CREPS at the finer
  sampling, with detail an interpolation cannot invent.
* ``finish`` mirrors (left-right), rotates clockwise, converts to ``gray``
  (ITU-R 601-2 luma, PIL's ``L``) or ``bitonal`` (that luma, >= 128 white)
  and encodes (JPEG at the viewer's ``--quality``, PNG at compression 1,
  WebP).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from renderer.dzi import max_level

from .iiif import ImageRequest

RESAMPLE = Image.Resampling.LANCZOS
Window = Callable[[int, int, int, int, int], np.ndarray]  # (k, y0, y1, x0, x1) -> uint8 (3, h, w)


@dataclass(frozen=True)
class Read:
    """A window of level ``k`` (``2**k`` times smaller) and the sub-pixel ``box`` of it to resample
    to the output (None: the window is the output as it is)."""

    k: int
    y0: int
    y1: int
    x0: int
    x1: int
    box: tuple[float, float, float, float] | None


def plan_read(req: ImageRequest, width: int, height: int) -> Read:
    """The read that answers ``req`` on a ``width x height`` image (see the module docstring)."""
    top = max_level(width, height)
    for k in range(top + 1):
        s = 2**k
        if req.x % s or req.y % s:
            break  # not aligned to 2**k: not to any coarser level either
        x0, y0, x1, y1 = req.x // s, req.y // s, -(-(req.x + req.w) // s), -(-(req.y + req.h) // s)
        if (x1 - x0, y1 - y0) == (req.width, req.height):
            return Read(k, y0, y1, x0, x1, None)
    k = 0
    if not req.upscaled:  # floor(log2(region / output)) on the finer axis: still at least as fine as the output
        k = min((req.w // req.width).bit_length(), (req.h // req.height).bit_length()) - 1
    budget = 16 * req.width * req.height + 65536
    while True:
        s = 2**k
        x0, y0 = req.x // s, req.y // s
        x1, y1 = -(-(req.x + req.w) // s), -(-(req.y + req.h) // s)
        if (x1 - x0) * (y1 - y0) <= budget or k >= top:
            break
        k += 1
    box = (req.x / s - x0, req.y / s - y0, (req.x + req.w) / s - x0, (req.y + req.h) / s - y0)
    return Read(k, y0, y1, x0, x1, box)


def resample(img: np.ndarray, width: int, height: int, box: tuple[float, float, float, float]) -> np.ndarray:
    """(3, h, w) uint8 -> (3, height, width): the ``box`` of it (in its pixels) resized with ``RESAMPLE``."""
    pil = Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)), "RGB")
    return np.asarray(pil.resize((width, height), RESAMPLE, box=box)).transpose(2, 0, 1)


def window_pixels(window: Window, req: ImageRequest, width: int, height: int) -> np.ndarray:
    """(3, req.height, req.width) uint8 of a request, read through a source's ``window``."""
    r = plan_read(req, width, height)
    img = window(r.k, r.y0, r.y1, r.x0, r.x1)
    return img if r.box is None else resample(img, req.width, req.height, r.box)


def finish(img: np.ndarray, req: ImageRequest, jpeg_quality: int) -> bytes:
    """Mirror, rotate, apply the quality and encode the output pixels (3, h, w) of ``req``."""
    if req.mirror:
        img = img[:, :, ::-1]
    if req.rotation:
        img = np.rot90(img, k=-(req.rotation // 90), axes=(1, 2))  # negative k: clockwise
    pil = Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)), "RGB")
    if req.quality == "gray":
        pil = pil.convert("L")
    elif req.quality == "bitonal":
        pil = pil.convert("L").convert("1", dither=Image.Dither.NONE)  # without dithering: >= 128 is white
    buf = io.BytesIO()
    if req.fmt == "jpg":
        pil.save(buf, "JPEG", quality=jpeg_quality)
    elif req.fmt == "png":
        pil.save(buf, "PNG", compress_level=1)
    else:
        pil.save(buf, "WEBP", quality=jpeg_quality)
    return buf.getvalue()
