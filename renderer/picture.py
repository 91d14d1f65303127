"""A picture file (PNG, JPEG, TIFF, anything libvips reads) as 8-bit sRGB RGB strips, in bounded memory.

``render.py import`` (jobs.importer) brings pictures into image stores; this
module is the reading half.  libvips opens the file for *sequential* access
and hands out horizontal strips top to bottom, so a 30000^2 TIFF is never
held whole: one strip of pixels (and libvips' few lines of read-ahead) is in
memory at a time.  A strip that was already imported is skipped without being
copied out (libvips still decodes through it where the format has no random
access, e.g. PNG).

Every picture is made 8-bit sRGB RGB, the store's only pixel format, in one
libvips pipeline: an alpha channel is flattened onto black (the store's fill
value), greyscale becomes three equal channels, 16-bit and float pixels are
scaled to 8 bits by libvips' colour-space conversion (rgb16 / grey16 >> 8,
scRGB through the sRGB curve), CMYK and Lab are converted to sRGB.  An
embedded ICC profile and an EXIF orientation are not applied: pixels are taken
as stored, so a plain sRGB picture round-trips byte for byte.
``Picture.conversions`` says which of these happened (the import records it).

Errors a user can act on are ``PictureError`` (exit code 2: bad input):
a missing or unreadable file, a file that is not a picture libvips knows,
a damaged one (libvips is told to fail on decoder errors instead of filling
the rest with grey).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from creps.errors import first_line

from .errors import RendererError

HASH_BLOCK = 1 << 22  # bytes read at a time while hashing the file
SRGB_ALIKE = ("srgb", "rgb", "rgb16", "scrgb")  # RGB interpretations: made 8-bit sRGB without a colour change


class PictureError(RendererError):
    """The picture cannot be read (missing, not a picture, damaged): bad input, exit code 2."""

    exit_code = 2


@dataclass
class Picture:
    """One picture file opened for sequential reading as 8-bit sRGB RGB."""

    path: str
    width: int
    height: int
    loader: str  # libvips' loader, e.g. "pngload", "tiffload"
    source_format: str  # how the file stores pixels: "<bands> x <band format> <interpretation>"
    conversions: tuple[str, ...]  # what was done to make it 8-bit sRGB RGB (empty: nothing)
    _image: Any = field(repr=False, default=None)

    def strips(self, side: int, skip: Callable[[int], bool] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(r0, pixels)`` for the strips of ``side`` rows, top to bottom; pixels are (3, h, W) uint8.

        The array is a channel-first *view* of the strip libvips decoded
        (h, W, 3): one copy of the strip in memory, no transpose.  ``skip(r0)``
        True leaves that strip out.  A decoder error raises ``PictureError``
        naming the rows.
        """
        import pyvips

        for r0 in range(0, self.height, side):
            if skip is not None and skip(r0):
                continue
            h = min(side, self.height - r0)
            try:
                raw = self._image.crop(0, r0, self.width, h).write_to_memory()
            except pyvips.Error as e:
                raise PictureError(
                    f"{self.path} cannot be decoded at rows {r0}:{r0 + h} ({_vips_reason(e)}); is the file damaged?"
                ) from None
            yield r0, np.frombuffer(raw, dtype=np.uint8).reshape(h, self.width, 3).transpose(2, 0, 1)


def open_picture(path: str) -> Picture:
    """Open ``path`` (its header only) for sequential strips; ``PictureError`` when it cannot be read."""
    import pyvips

    if not os.path.exists(path):
        raise PictureError(f"{path}: no such file")
    if os.path.isdir(path):
        raise PictureError(f"{path} is a folder, not a picture file")
    if not os.access(path, os.R_OK):
        raise PictureError(f"{path} cannot be read (permission denied)")
    try:
        image = pyvips.Image.new_from_file(path, access="sequential", fail_on="error")
    except pyvips.Error as e:
        raise PictureError(f"{path} is not a picture libvips can read ({_vips_reason(e)})") from None
    if image.width < 1 or image.height < 1:
        raise PictureError(f"{path} has no pixels ({image.width} x {image.height})")
    source = f"{image.bands} x {image.format} {image.interpretation}"
    loader = str(image.get("vips-loader")) if image.get_typeof("vips-loader") else "unknown"
    rgb, conversions = to_srgb8(image)
    return Picture(path, image.width, image.height, loader, source, tuple(conversions), rgb)


def to_srgb8(image: Any) -> tuple[Any, list[str]]:
    """``image`` as a 3-band uchar sRGB pipeline, and the conversions that made it so."""
    import pyvips

    done = []
    if image.hasalpha():
        image = image.flatten(background=[0] * (image.bands - 1))
        done.append("alpha flattened onto black")
    if image.format != "uchar":
        done.append(f"{image.format} samples scaled to 8 bits")
    if image.bands == 1:
        done.append("greyscale -> RGB")
    elif str(image.interpretation) not in SRGB_ALIKE:
        done.append(f"{image.interpretation} -> sRGB")
    if image.interpretation != "srgb" or image.format != "uchar":
        try:
            image = image.colourspace("srgb")
        except pyvips.Error:  # no known route (e.g. "multiband"): the bands are taken as they are
            pass
    if image.format == "ushort":  # a 16-bit image labelled sRGB, or one with no route
        image = image >> 8
    if image.bands < 3:
        image = image[0].bandjoin([image[0], image[0]])
    elif image.bands > 3:
        image = image.extract_band(0, n=3)
        done.append("bands after the first 3 dropped")
    if image.format != "uchar":
        image = image.cast("uchar")  # clips to 0..255
    return image, done


def file_digest(path: str, on_bytes: Callable[[int], None] | None = None) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file, read in blocks (bounded memory)."""
    h = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as f:
            while block := f.read(HASH_BLOCK):
                h.update(block)
                size += len(block)
                if on_bytes is not None:
                    on_bytes(len(block))
    except OSError as e:
        raise PictureError(f"{path} cannot be read ({e.strerror or first_line(e)})") from None
    return h.hexdigest(), size


def _vips_reason(e: Exception) -> str:
    """libvips' own reason from a many-line pyvips error ("unable to load ...\\n  VipsForeignLoad: ...")."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    detail = [ln for ln in lines if not ln.startswith("unable to")]
    return detail[-1] if detail else "libvips could not decode it"
