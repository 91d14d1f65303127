"""Export settings as small typed objects that check themselves: the one place that says which
JPEG qualities, TIFF tiles and compressions, DeepZoom tilings and engines, IIIF ids and tilings are valid.

``TiffOptions``, ``DziOptions`` and ``IiifOptions`` raise ``OptionError`` (a ``RendererError``,
naming the setting) when built with a bad value, so a writer never starts
on one, and a command-line front end (jobs.assemble, viewer.cli) checks its
flags by building the same objects (or ``check_quality``) and words the
error after its own flags from ``OptionError.option/value/allowed``.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from .errors import BadInputError
from .tiff import COMPRESSIONS, TIFF_TILES

DZI_ENGINES = ("vips", "zarr")
QUALITIES = (1, 100)  # JPEG quality, both ends included
IIIF_MAX_TILE = 4096
# The IIIF tree's id without --iiif-id: where `python -m http.server` in the folder above the tree serves it.
DEFAULT_IIIF_ID = "http://localhost:8000/{name}"


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


@dataclass(frozen=True)
class IiifOptions:
    """How the IIIF level-0 static tree is made (checked on construction).

    ``base_id`` is the public base URI of the tree (``id`` in its info.json,
    what clients build every request from): absolute http(s), as the spec
    requires; None is ``DEFAULT_IIIF_ID`` with the tree's folder name, where
    ``python -m http.server`` started in the folder above serves it.
    ``tile``: the tile side at every scale factor; ``max_size``: the longer
    side of the largest whole image (``full/max``), the first pyramid level
    that fits (at least two tiles, so every tile fits under ``maxWidth``).
    """

    base_id: str | None = None
    tile: int = 512
    quality: int = 90
    max_size: int = 4096

    def __post_init__(self) -> None:
        check_quality(self.quality)
        if self.base_id is not None:
            parts = urlsplit(self.base_id)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
                raise OptionError(
                    "base_id",
                    self.base_id,
                    "an absolute http(s) URL without query or fragment",
                    f"the IIIF id must be an absolute http(s) URL without query or fragment, got {self.base_id!r}",
                )
        if not 1 <= self.tile <= IIIF_MAX_TILE or self.max_size < 2 * self.tile:
            raise OptionError(
                "tile",
                (self.tile, self.max_size),
                f"1 <= tile <= {IIIF_MAX_TILE}, max_size >= 2 * tile",
                f"bad IIIF tiling: tile={self.tile}, max_size={self.max_size}",
            )

    def service_id(self, target: str) -> str:
        """The ``id`` of the tree written at ``target``: ``base_id`` without a trailing slash, or the default."""
        if self.base_id is not None:
            return self.base_id.rstrip("/")
        return DEFAULT_IIIF_ID.format(name=quote(posixpath.basename(target.rstrip("/"))))

    def settings(self) -> dict:
        """The ``settings`` of the IIIF tree's provenance record."""
        return {"id": self.base_id, "tile": self.tile, "quality": self.quality, "max_size": self.max_size}
