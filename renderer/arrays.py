"""The image as dask arrays: every pyramid level lazily, and a level as a dask graph of the one above.

  levels = renderer.open_pyramid("out/img.zarr")      # level 0 first, each (3, h, w) uint8
  levels[3].mean(axis=(1, 2)).compute()               # the mean colour of level 3

Arrays are chunked like the store (the zarr arrays' chunks) and read only
when computed. ``downsampled(level)`` is level k+1 as a graph over level k
(blocks of 2x2 stored chunks, ``map_blocks`` of renderer.pyramid.downsample),
which renderer.scaleout runs on dask's threaded scheduler to build levels.
dask is imported here only, when these functions run.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np

from .pyramid import downsample, read_block
from .store import ImageStore, open_store


class _StoredLevel:
    """A stored level as dask reads it: an unreadable chunk is one RendererError naming it."""

    def __init__(self, store: ImageStore, k: int) -> None:
        self.store, self.k, self.arr = store, k, store.level(k)
        self.shape, self.dtype, self.ndim = tuple(self.arr.shape), np.dtype(self.arr.dtype), 3

    def __getitem__(self, index: tuple[slice, slice, slice]) -> np.ndarray:
        c, y, x = index
        block = read_block(self.store, self.k, y.start or 0, y.stop, x.start or 0, x.stop, self.arr)
        return block[c]


def level_array(store: ImageStore, k: int, chunks: tuple[int, int, int] | None = None) -> Any:
    """Level k of ``store`` as a lazy (3, h, w) uint8 dask array (default chunks: the zarr array's)."""
    import dask.array as da

    level = _StoredLevel(store, k)
    name = f"creps-level-{k}-{uuid.uuid4().hex}"  # tokenizing a zarr array would read it
    return da.from_array(level, chunks=chunks or tuple(level.arr.chunks), name=name, lock=False, asarray=True)


def open_pyramid(url: str, storage_options: dict | None = None) -> list[Any]:
    """Every stored level of the image at ``url``, level 0 first, as lazy dask arrays (3, h, w) uint8."""
    store = open_store(url, storage_options, mode="r")
    return [level_array(store, k) for k in range(store.level_count())]


def halved(src: Any, chunk: int) -> Any:
    """The next level of a (3, h, w) uint8 dask array as a graph: ``downsample`` per 2x2 block of
    ``chunk`` chunks, so its blocks are ``chunk`` chunks (the last row / column of blocks may be
    odd-sized above: downsample replicates the edge)."""
    blocks = src.rechunk((3, 2 * chunk, 2 * chunk))
    out_chunks = ((3,), tuple((n + 1) // 2 for n in blocks.chunks[1]), tuple((n + 1) // 2 for n in blocks.chunks[2]))
    return blocks.map_blocks(downsample, chunks=out_chunks, dtype=np.uint8)


def downsampled(store: ImageStore, k: int) -> Any:
    """Level k+1 as a dask graph over stored level k, read in blocks of 2x2 stored chunks (``halved``)."""
    chunk = int(store.level(k).chunks[1])
    return halved(level_array(store, k, (3, 2 * chunk, 2 * chunk)), chunk)
