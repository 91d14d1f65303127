"""Pyramidal tiled BigTIFF writing with tifffile, from tiles encoded elsewhere (renderer.blocks).

Level 0 is the main image, levels 1..n-1 its SubIFDs (the OME-TIFF pyramid
layout that tifffile, libvips, Bio-Formats and QuPath read). Tiles are
encoded by the block work (on all cores, or on a cluster) with
``tile_encoder``, which makes the bytes tifffile itself would make for that
tile (edge tiles zero-padded to the full tile; JPEG as YCbCr 4:2:0, like
libvips' tiffsave; zstd/deflate after tifffile's horizontal predictor), and
handed to tifffile in TIFF order as pre-encoded bytes, so the one writer only
writes (tests compare the bytes with tifffile's own encoding).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

COMPRESSIONS = {"jpeg": "jpeg", "zstd": "zstd", "deflate": "adobe_deflate", "none": None}
TIFF_TILES = (256, 512)
_TAGS = {"jpeg": 7, "zstd": 50000, "deflate": 8}  # TIFF compression tags


def tile_encoder(compression: str = "jpeg", quality: int = 90, tile: int = 256) -> Callable[[np.ndarray], bytes]:
    """``encode((h, w, 3) uint8 tile, h, w <= tile) -> bytes``, as tifffile encodes it for ``write_levels``."""
    from tifffile import TIFF

    shape = (tile, tile, 3)

    def full(px: np.ndarray) -> np.ndarray:
        px = np.ascontiguousarray(px, np.uint8)
        if px.shape != shape:
            px = np.pad(px, [(0, t - s) for t, s in zip(shape, px.shape, strict=True)])
        return px

    if compression == "none":
        return lambda px: full(px).tobytes()
    compressor = TIFF.COMPRESSORS[_TAGS[compression]]
    if compression == "jpeg":
        args = {"level": quality, "subsampling": (2, 2), "colorspace": "RGB", "outcolorspace": "YCBCR"}
        return lambda px: compressor(full(px), **args)
    predictor = TIFF.PREDICTORS[2]  # horizontal differencing: smaller zstd/deflate output
    return lambda px: compressor(predictor(full(px), axis=-2))


def write_levels(
    path: str,
    levels: Iterable[tuple[int, int, Iterable[bytes]]],
    count: int,
    tile: int = 256,
    compression: str = "jpeg",
    quality: int = 90,
) -> None:
    """Write ``count`` levels, each (height, width, its tiles' bytes in TIFF order), largest first."""
    import tifffile

    args: dict[str, Any] = dict(
        tile=(tile, tile),
        dtype=np.uint8,
        photometric="rgb",
        planarconfig="contig",
        compression=COMPRESSIONS[compression],
    )
    if compression == "jpeg":
        args["compressionargs"] = {"level": quality}
    elif compression != "none":
        args["predictor"] = True
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        for k, (h, w, data) in enumerate(levels):
            tiles = iter(data)
            if k == 0:
                tif.write(
                    tiles,
                    shape=(h, w, 3),
                    subifds=count - 1,
                    software="creps-gigapixel",
                    metadata={"axes": "YXS", "Name": "creps-gigapixel", "SignificantBits": 8},
                    **args,
                )
            else:
                tif.write(tiles, shape=(h, w, 3), subfiletype=1, metadata=None, **args)
