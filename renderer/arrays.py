"""The image as dask arrays: every pyramid level lazily, and a level as a dask graph of the one above.

  levels = renderer.open_pyramid("out/img.zarr")      # level 0 first, each (3, h, w) uint8
  levels[3].mean(axis=(1, 2)).compute()               # the mean colour of level 3

Arrays are chunked like the store (the zarr arrays' chunks) and read only
when computed (``ImageStore.read_block``: an unreadable chunk is one error
naming it). renderer.pyramid builds a level as a dask graph over the one above
(``downsampled``) from ``level_array``. dask is imported only when these
functions run.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np

from .store import ImageStore, open_store


class _StoredLevel:
    """A stored level as dask reads it: an unreadable chunk is one RendererError naming it."""

    def __init__(self, store: ImageStore, k: int) -> None:
        self.store, self.k, self.arr = store, k, store.level(k)
        self.shape, self.dtype, self.ndim = tuple(self.arr.shape), np.dtype(self.arr.dtype), 3

    def __getitem__(self, index: tuple[slice, slice, slice]) -> np.ndarray:
        c, y, x = index
        block = self.store.read_block(self.k, y.start or 0, y.stop, x.start or 0, x.stop, self.arr)
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
