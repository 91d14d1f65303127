"""Export settings as small typed objects that check themselves: the one place that says which
JPEG qualities, TIFF tiles and compressions, DeepZoom tilings and engines are valid.

``TiffOptions`` and ``DziOptions`` raise ``OptionError`` (a ``RendererError``,
naming the setting) when built with a bad value, so a writer never starts
on one, and a command-line front end (jobs.assemble, viewer.cli) checks its
flags by building the same objects (or ``check_quality``) and words the
error after its own flags from ``OptionError.option/value/allowed``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import BadInputError
from .tiff import COMPRESSIONS, TIFF_TILES

DZI_ENGINES = ("vips", "zarr")
QUALITIES = (1, 100)  # JPEG quality, both ends included


class OptionError(BadInputError):
    """A bad export setting: ``option`` (the field name) had ``value``; ``allowed`` says what would do.
    Bad input found before any work: exit 2."""

    def __init__(self, option: str, value: object, allowed: str, message: str) -> None:
        super().__init__(message)
        self.option, self.value, self.allowed = option, value, allowed


def check_quality(quality: int) -> None:
    """A JPEG quality (TIFF and DeepZoom tiles, the viewer's tiles) must be 1..100."""
    lo, hi = QUALITIES
    if not lo <= quality <= hi:
        raise OptionError("quality", quality, f"{lo}..{hi}", f"JPEG quality must be {lo}..{hi}, got {quality}")


@dataclass(frozen=True)
class TiffOptions:
    """How the pyramidal TIFF is tiled and compressed (checked on construction)."""

    tile: int = 256
    compression: str = "jpeg"
    quality: int = 90

    def __post_init__(self) -> None:
        if self.tile not in TIFF_TILES:
            raise OptionError(
                "tile", self.tile, str(TIFF_TILES), f"TIFF tile must be one of {TIFF_TILES}, got {self.tile}"
            )
        if self.compression not in COMPRESSIONS:
            raise OptionError(
                "compression",
                self.compression,
                ", ".join(COMPRESSIONS),
                f"unknown TIFF compression {self.compression!r}; use {', '.join(COMPRESSIONS)}",
            )
        check_quality(self.quality)

    def settings(self) -> dict:
        """The ``settings`` of the TIFF's provenance record."""
        return {"tile": self.tile, "compression": self.compression, "quality": self.quality}


@dataclass(frozen=True)
class DziOptions:
    """How the DeepZoom pyramid is tiled and made (checked on construction).

    ``tile_size`` + 2 ``overlap`` is a full tile's side (libvips' dzsave
    default: 254 + 2); ``engine`` "zarr" cuts the tiles from the pyramid
    levels, "vips" runs libvips dzsave; ``szi`` adds the .szi zip.
    """

    tile_size: int = 254
    overlap: int = 1
    quality: int = 90
    engine: str = "zarr"
    szi: bool = True

    def __post_init__(self) -> None:
        check_quality(self.quality)
        if self.tile_size < 1 or self.overlap < 0 or 2 * self.overlap >= self.tile_size:
            raise OptionError(
                "tile_size",
                (self.tile_size, self.overlap),
                "tile_size >= 1, 0 <= 2 * overlap < tile_size",
                f"bad DeepZoom tiling: tile_size={self.tile_size}, overlap={self.overlap}",
            )
        if self.engine not in DZI_ENGINES:
            raise OptionError(
                "engine",
                self.engine,
                " or ".join(DZI_ENGINES),
                f"unknown DeepZoom engine {self.engine!r}; use {' or '.join(DZI_ENGINES)}",
            )

    def settings(self) -> dict:
        """The ``settings`` of the DeepZoom's provenance records."""
        return {
            "engine": self.engine,
            "tile_size": self.tile_size,
            "overlap": self.overlap,
            "quality": self.quality,
            "szi": self.szi,
        }
