"""DeepZoom tiles straight from the zarr pyramid (the default, fast DZI engine).

DeepZoom level sizes are ceil(W / 2**s), exactly the sizes of our pyramid
levels (renderer.pyramid halves with ceil division), and libvips' 2x2 mean
for dzsave gives the same pixels as our rule (the tests compare decoded tiles
with dzsave's: equal). So the zarr levels *are* the upper DeepZoom levels:
this module only cuts and JPEG-encodes them (libjpeg-turbo via imagecodecs,
on a thread pool, chroma subsampling as libvips' "auto": off for Q >= 90)
instead of re-shrinking level 0. The few levels smaller than the last zarr
level (<= one chunk) are made in memory with the same rule.

Tile (c, r) of a level covers x in [c*ts - o, (c+1)*ts + o) clipped to the
level (o = overlap, none on the outer sides); files are
``<base>_files/<level>/<c>_<r>.jpg``, level 0 being 1x1 px.
Input is a stream of (r0, (h, w, 3) strip) per level, so memory stays one
window of rows (a tile row plus a strip) and the encodes in flight.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .pyramid import downsample

KEEP_PIXELS = 1 << 24  # a level this small is kept whole to make the levels below it

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


def row_windows(strips: Iterable[tuple[int, np.ndarray]], yspans: list[tuple[int, int]]) -> Iterator[np.ndarray]:
    """Rows [y0, y1) of each span out of consecutive (r0, strip) pieces of a level."""
    it = iter(strips)
    buf: np.ndarray | None = None
    b0 = 0
    for y0, y1 in yspans:
        while buf is None or b0 + buf.shape[0] < y1:
            r0, strip = next(it)
            if buf is None:
                buf, b0 = strip, r0
            else:
                buf, b0 = np.concatenate([buf[y0 - b0 :], strip], axis=0), y0
        yield buf[y0 - b0 : y1 - b0]


class DziWriter:
    """Cuts the levels it is given (largest first) into ``<base>_files``; ``finish`` adds the rest."""

    def __init__(
        self,
        base: str,
        width: int,
        height: int,
        quality: int = 90,
        tile: int = 254,
        overlap: int = 1,
        pool: ThreadPoolExecutor | None = None,
        max_pending: int = 256,
    ) -> None:
        self.base, self.width, self.height = base, width, height
        self.quality, self.tile, self.overlap = quality, tile, overlap
        self.subsampling = (1, 1) if quality >= 90 else (2, 2)
        self.level = dzi_level_count(width, height)  # next DeepZoom level to write, minus one
        self.pool = pool or ThreadPoolExecutor(os.cpu_count() or 2)
        self.pending: list[Future] = []
        self.max_pending = max_pending
        self.smallest: np.ndarray | None = None
        os.makedirs(base + "_files", exist_ok=True)

    def _save(self, path: str, px: np.ndarray) -> None:
        import imagecodecs

        if px.strides != (px.shape[1] * 3, 3, 1):  # views of 1 px can look contiguous with odd strides
            px = px.copy()
        data = imagecodecs.jpeg8_encode(px, level=self.quality, subsampling=self.subsampling)
        with open(path, "wb") as f:
            f.write(data)

    def _cut(self, level: int, r: int, rows: np.ndarray, xspans: list[tuple[int, int]]) -> None:
        for c, (x0, x1) in enumerate(xspans):
            self.pending.append(self.pool.submit(self._save, f"{self.base}_files/{level}/{c}_{r}.jpg", rows[:, x0:x1]))
        if len(self.pending) > self.max_pending:
            self.wait()

    def wait(self) -> None:
        for f in self.pending:
            f.result()
        self.pending.clear()

    def add_level(self, height: int, width: int, strips: Iterable[tuple[int, np.ndarray]]) -> None:
        """The next (half-size) level, as a stream of (r0, (h, w, 3) strip)."""
        self.level -= 1
        os.makedirs(f"{self.base}_files/{self.level}", exist_ok=True)
        yspans, xspans = spans(height, self.tile, self.overlap), spans(width, self.tile, self.overlap)
        keep: list[np.ndarray] | None = [] if height * width <= KEEP_PIXELS else None

        def kept(it: Iterable[tuple[int, np.ndarray]]) -> Iterator[tuple[int, np.ndarray]]:
            for r0, strip in it:
                if keep is not None:
                    keep.append(strip)
                yield r0, strip

        for r, rows in enumerate(row_windows(kept(strips), yspans)):
            self._cut(self.level, r, rows, xspans)
        self.smallest = np.concatenate(keep, axis=0) if keep else None

    def finish(self, smallest: np.ndarray | None = None) -> None:
        """Levels below the last one added (from ``smallest``, (h, w, 3), else the kept one) and the .dzi."""
        img = smallest if smallest is not None else self.smallest
        if self.level > 0:
            assert img is not None, "the last level added must be small (renderer.pyramid's last level is)"
            chw = img.transpose(2, 0, 1)
            while self.level > 0:
                chw = downsample(chw)
                self.add_level(chw.shape[1], chw.shape[2], [(0, chw.transpose(1, 2, 0))])
        self.wait()
        with open(self.base + ".dzi", "w") as f:
            f.write(dzi_xml(self.width, self.height, "jpg", self.tile, self.overlap))
