"""How images are made: line stage, pixel stage on tiles, Ray pool, store, pyramid, exports."""

from __future__ import annotations

from typing import Any

from .errors import RendererError

__all__ = ["RendererError", "open_pyramid"]


def open_pyramid(url: str, storage_options: dict | None = None) -> list[Any]:
    """Every pyramid level of the image store at ``url`` as a lazy dask array, level 0 first.

    Each is (3, h, w) uint8, chunked like the store (renderer.arrays; dask is
    imported only when this is called).
    """
    from .arrays import open_pyramid as open_levels

    return open_levels(url, storage_options)
