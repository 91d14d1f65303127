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

Tile (c, r) of a level covers x in [c*ts - o, (c+1)*ts + o) clipped to the
level (o = overlap, none on the outer sides); files are
``<base>_files/<level>/<c>_<r>.jpg``, level 0 being 1x1 px.
"""

from __future__ import annotations

import math

import numpy as np

TILE_SIZE = 254  # libvips' dzsave default: 254 + 2 px overlap = 256 px tiles
OVERLAP = 1


# ---------------------------------------------------------------- geometry (the DeepZoom convention)
def max_level(width: int, height: int) -> int:
    """Index of the full-resolution DZI level: ceil(log2(max side)) (0 for a 1x1 image)."""
    return (max(width, height) - 1).bit_length()


def dzi_level_count(width: int, height: int) -> int:
    """DeepZoom halves down to 1x1: max_level + 1 levels."""
    return max_level(width, height) + 1


def level_size(width: int, height: int, level: int) -> tuple[int, int]:
    """(w, h) of DZI level ``level``: ceil(W / 2**k), k = max_level - level."""
    k = max_level(width, height) - level
    return -(-width // 2**k), -(-height // 2**k)


def tile_grid(width: int, height: int, level: int, tile: int = TILE_SIZE) -> tuple[int, int]:
    """(columns, rows) of tiles at a DZI level."""
    w, h = level_size(width, height, level)
    return -(-w // tile), -(-h // tile)


def spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) of each tile along one axis, overlap on the inner sides only."""
    return [span(i, size, tile, overlap) for i in range(math.ceil(size / tile))]


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
