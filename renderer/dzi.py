"""DeepZoom tiles straight from the zarr pyramid (the default, fast DZI engine).

DeepZoom level sizes are ceil(W / 2**s), exactly the sizes of our pyramid
levels (renderer.pyramid halves with ceil division), and libvips' 2x2 mean
for dzsave gives the same pixels as our rule (the tests compare decoded tiles
with dzsave's: equal). So the zarr levels *are* the upper DeepZoom levels:
this project only cuts and JPEG-encodes them (``encode_tile``: libjpeg-turbo
via imagecodecs, chroma subsampling as libvips' "auto": off for Q >= 90;
the cutting is block work, renderer.blocks) instead of re-shrinking level 0.
The few levels smaller than the last zarr level (<= one chunk) are made in
memory with the same rule.

A DeepZoom export is ``<base>_files/``, ``<base>.dzi`` and, unless asked not
to, ``<base>.szi``: a zip (stored, JPEG tiles do not shrink) of the same
files in the layout libvips writes for ``.szi`` (``zip_szi``).

Tile (c, r) of a level covers x in [c*ts - o, (c+1)*ts + o) clipped to the
level (o = overlap, none on the outer sides); files are
``<base>_files/<level>/<c>_<r>.jpg``, level 0 being 1x1 px.
"""

from __future__ import annotations

import os
import zipfile
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .publish import Target

TILE_SIZE = 254  # libvips' dzsave default: 254 + 2 px overlap = 256 px tiles
OVERLAP = 1
DZI_FOLDER = "_files"  # <base>_files/<level>/<col>_<row>.jpg


# ---------------------------------------------------------------- geometry (the DeepZoom convention)
def max_level(width: int, height: int) -> int:
    """Index of the full-resolution DZI level: ceil(log2(max side)) (0 for a 1x1 image)."""
    return (max(width, height) - 1).bit_length()


def level_size(width: int, height: int, level: int) -> tuple[int, int]:
    """(w, h) of DZI level ``level``: ceil(W / 2**k), k = max_level - level."""
    k = max_level(width, height) - level
    return -(-width // 2**k), -(-height // 2**k)


def tile_grid(width: int, height: int, level: int, tile: int = TILE_SIZE) -> tuple[int, int]:
    """(columns, rows) of tiles at a DZI level."""
    w, h = level_size(width, height, level)
    return -(-w // tile), -(-h // tile)


def span(i: int, size: int, tile: int, overlap: int) -> tuple[int, int]:
    """[start, end) of tile ``i`` along an axis of ``size`` pixels."""
    return max(0, i * tile - overlap), min(size, (i + 1) * tile + overlap)


def tile_bounds(
    width: int, height: int, level: int, col: int, row: int, tile: int = TILE_SIZE, overlap: int = OVERLAP
) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a tile in its level's pixels, overlap included."""
    w, h = level_size(width, height, level)
    y0, y1 = span(row, h, tile, overlap)
    x0, x1 = span(col, w, tile, overlap)
    return y0, y1, x0, x1


def dzi_xml(width: int, height: int, fmt: str, tile: int = TILE_SIZE, overlap: int = OVERLAP) -> str:
    """The .dzi descriptor OpenSeadragon reads."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{fmt}" '
        f'Overlap="{overlap}" TileSize="{tile}">\n'
        f'  <Size Width="{width}" Height="{height}"/>\n'
        "</Image>\n"
    )


def encode_tile(px: np.ndarray, quality: int = 90) -> bytes:
    """One (h, w, 3) uint8 tile as JPEG (libjpeg-turbo), chroma subsampling as libvips' "auto": off for Q >= 90."""
    import imagecodecs

    if px.strides != (px.shape[1] * 3, 3, 1):  # a view into wider rows (views of 1 px can look contiguous)
        px = px.copy()
    return bytes(imagecodecs.jpeg8_encode(px, level=quality, subsampling=(1, 1) if quality >= 90 else (2, 2)))


# ---------------------------------------------------------------- the export's files
def dzi_base(url: str) -> str:
    """The base name of a DeepZoom export (a trailing .dzi dropped)."""
    return url[: -len(".dzi")] if url.endswith(".dzi") else url


def dzi_parts(szi: bool) -> tuple[str, ...]:
    """What a DeepZoom export is, in the order it is put in place: tiles, .szi, then the .dzi."""
    return (DZI_FOLDER, ".szi", ".dzi") if szi else (DZI_FOLDER, ".dzi")


def zip_szi(target: Target, name: str) -> None:
    """``<stage>.szi``: a stored zip with ``name/name.dzi`` and ``name/name_files/...``.

    The DeepZoom files are where the target staged them (a temporary name;
    tiles written straight to temporary keys of a remote target are read back
    from there); ``name`` is the name they are published under, which the
    zip's entries use.
    """
    base = target.stage
    rels = target.folder_files(DZI_FOLDER)
    with zipfile.ZipFile(base + ".szi", "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.write(base + ".dzi", f"{name}/{name}.dzi")
        if target.local or DZI_FOLDER not in target.direct_parts():
            for rel in rels:
                zf.write(os.path.join(base + DZI_FOLDER, *rel.split("/")), f"{name}/{name}{DZI_FOLDER}/{rel}")
            return
        folder = target.remote_stage + DZI_FOLDER
        for i in range(0, len(rels), 256):  # a batch of concurrent reads at a time
            batch = rels[i : i + 256]
            data = target.fs.cat([f"{folder}/{rel}" for rel in batch])
            for rel in batch:
                zf.writestr(f"{name}/{name}{DZI_FOLDER}/{rel}", data[f"{folder}/{rel}"])
