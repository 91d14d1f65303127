"""Pyramidal tiled BigTIFF writing with tifffile, tile by tile from streams of strips.

Level 0 is the main image, levels 1..n-1 its SubIFDs (the OME-TIFF pyramid
layout that tifffile, libvips, Bio-Formats and QuPath read). Tiles are fed to
tifffile as a generator in row-major order, so tifffile compresses them
(``maxworkers`` threads) while the next strip is read; nothing holds more
than a strip of chunk rows. JPEG: tifffile stores RGB as YCbCr 4:2:0, like
libvips' tiffsave.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

COMPRESSIONS = {"jpeg": "jpeg", "zstd": "zstd", "deflate": "adobe_deflate", "none": None}
TIFF_TILES = (256, 512)
# tifffile gathers this many bytes of tiles per parallel compression batch (its default,
# 512 MB, would dominate our memory); 128 MB keeps batches large enough to overlap reading.
BUFFER_BYTES = 128 << 20


def tiles(
    strips: Iterable[tuple[int, np.ndarray]], height: int, width: int, tile: int, bar: Any = None
) -> Iterator[np.ndarray]:
    """A level's tiles in TIFF order (row-major) from consecutive (r0, (h, w, 3) strip) pieces."""
    buf: np.ndarray | None = None  # rows left over when tile rows and strips do not align
    base = 0
    for r0, strip in strips:
        if buf is not None:
            strip, r0 = np.concatenate([buf, strip], axis=0), base
        end, t0 = r0 + strip.shape[0], r0
        while t0 + tile <= end or (end >= height and t0 < height):
            rows = strip[t0 - r0 : t0 - r0 + tile]
            for c0 in range(0, width, tile):
                yield rows[:, c0 : c0 + tile]
            t0 += tile
            if bar is not None:
                bar.update(rows.shape[0] * width)
        buf, base = (strip[t0 - r0 :], t0) if t0 < end else (None, end)


def write_levels(
    path: str,
    levels: Iterable[tuple[int, int, Iterable[tuple[int, np.ndarray]]]],
    count: int,
    tile: int = 256,
    compression: str = "jpeg",
    quality: int = 90,
    workers: int | None = None,
    bar: Any = None,
) -> None:
    """Write ``count`` levels, each (height, width, strips), largest first, to a BigTIFF at ``path``."""
    import tifffile

    codec = COMPRESSIONS[compression]
    args: dict[str, Any] = dict(
        tile=(tile, tile),
        dtype=np.uint8,
        photometric="rgb",
        planarconfig="contig",
        compression=codec,
        maxworkers=workers or os.cpu_count(),
        buffersize=BUFFER_BYTES,
    )
    if compression == "jpeg":
        args["compressionargs"] = {"level": quality}
    elif codec is not None:
        args["predictor"] = True  # horizontal differencing: smaller zstd/deflate output
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        for k, (h, w, strips) in enumerate(levels):
            data = tiles(strips, h, w, tile, bar)
            if k == 0:
                tif.write(
                    data,
                    shape=(h, w, 3),
                    subifds=count - 1,
                    software="creps-gigapixel",
                    metadata={"axes": "YXS", "Name": "creps-gigapixel", "SignificantBits": 8},
                    **args,
                )
            else:
                tif.write(data, shape=(h, w, 3), subfiletype=1, metadata=None, **args)
