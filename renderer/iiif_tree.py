"""The IIIF Image API 3.0 level-0 static tree of an image store (`render.py assemble --iiif DIR`).

A folder any static web server (or an object store's HTTP endpoint) serves
as an IIIF image service whose base URI is ``IiifOptions.service_id``:

- ``info.json``: profile ``level0``, the tiles (``TILE`` px, scale factors
  1 .. 2^n until the whole image fits in one tile) and the listed sizes
  (renderer.iiif.info_json, the builder the live server uses too);
- the tiles, ``{x},{y},{w},{h}/{sw},{sh}/0/default.jpg`` (``full`` and
  ``max`` where they apply: renderer.iiif.tile_request), the requests the
  spec's tile algorithm and OpenSeadragon make. Tiles of scale factor 2^k
  are cut from zarr level k by the export bands (renderer.blocks.export_band,
  local threads or Ray tasks), beside the TIFF and DeepZoom tiles; scale
  factors past the zarr's last level (a level <= one chunk) are made here
  from it by the pyramid's rule (renderer.pyramid.downsample);
- the listed sizes, ``full/{w},{h}/0/default.jpg``: every pyramid level
  whose longer side is <= ``IiifOptions.max_size``, from 1 px up, and the
  largest of them again as ``full/max/0/default.jpg``; when that is not the
  full size, ``maxWidth`` says so (clients expect no larger image).

Only ``default`` quality, ``jpg`` and rotation 0 exist; the encoder is the
DeepZoom tiles' (renderer.dzi.encode_tile). Staging, atomic publish and the
``<DIR>.source.json`` sidecar: renderer.exports / renderer.publish.
"""

from __future__ import annotations

import json

import numpy as np

from .blocks import IiifTiles, TileSink, hwc, level_tiles
from .dzi import encode_tile
from .iiif import INFO, MAX_REQUEST, info_json, level_size, scale_factors, size_request
from .options import IiifOptions
from .pyramid import downsample
from .store import ImageStore

IIIF_PARTS = ("",)  # the tree is one folder: the target itself


def tree_tiles(folder: str, width: int, height: int, options: IiifOptions, storage_options: dict | None) -> IiifTiles:
    """Where and how the bands write the tree's tiles."""
    levels = len(scale_factors(width, height, options.tile))
    return IiifTiles(folder, width, height, levels, options.tile, options.quality, storage_options)


def largest_level(width: int, height: int, max_size: int) -> int:
    """The first pyramid level whose longer side is <= ``max_size``: the ``full/max`` image."""
    k = 0
    while max(level_size(width, height, k)) > max_size:
        k += 1
    return k


def listed_sizes(width: int, height: int, max_size: int) -> list[tuple[int, tuple[int, int]]]:
    """(level, (w, h)) of every size the tree lists, smallest first (each size once)."""
    out: list[tuple[int, tuple[int, int]]] = []
    top = max(width - 1, height - 1).bit_length()  # the level of 1 px on the longer side
    for k in range(top, largest_level(width, height, max_size) - 1, -1):
        size = level_size(width, height, k)
        if not out or out[-1][1] != size:
            out.append((k, size))
    return out


def tree_info(service_id: str, width: int, height: int, options: IiifOptions) -> dict:
    """The tree's info.json."""
    k0 = largest_level(width, height, options.max_size)
    limits = {"maxWidth": max(level_size(width, height, k0))} if k0 else None
    sizes = [size for _, size in listed_sizes(width, height, options.max_size)]
    return info_json(service_id, width, height, profile="level0", sizes=sizes, tile=options.tile, limits=limits)


class _Levels:
    """Whole pyramid levels as (3, h, w), read from the store or made from its last level; only small
    ones are asked for (<= max_size, or past the zarr's last level, which is <= one chunk)."""

    def __init__(self, store: ImageStore, shapes: list[tuple[int, int]]) -> None:
        self.store, self.shapes = store, shapes
        self.made: dict[int, np.ndarray] = {}

    def chw(self, k: int) -> np.ndarray:
        if k not in self.made:
            if k < len(self.shapes):
                self.made[k] = self.store.read_rows(k, 0, self.shapes[k][0])
            else:
                self.made[k] = downsample(self.chw(k - 1))
        return self.made[k]

    def hwc(self, k: int) -> np.ndarray:
        return hwc(self.chw(k))


def finish_tree(
    store: ImageStore,
    shapes: list[tuple[int, int]],
    spec: IiifTiles,
    options: IiifOptions,
    service_id: str,
    banded: list[str],
) -> list[str]:
    """Everything of the tree the bands did not write (``banded``): the tiles of the scale factors past the
    zarr's last level, the listed sizes, ``full/max`` and info.json (last); the files written, relative to the folder."""
    levels = _Levels(store, shapes)
    written: list[str] = []
    for k in range(len(shapes), spec.levels):
        written.extend(level_tiles(levels.hwc(k), k, spec))
    done = {rel for rel in [*banded, *written] if rel.startswith("full/")}  # a top tile can be a listed size
    sink = spec.sink()
    sizes = listed_sizes(spec.width, spec.height, options.max_size)
    for k, size in sizes:
        _put(sink, size_request(*size), levels, k, options.quality, done, written)
    _put(sink, MAX_REQUEST, levels, sizes[-1][0], options.quality, done, written)
    sink.flush()
    sink.put(INFO, json.dumps(tree_info(service_id, spec.width, spec.height, options), indent=1).encode())
    sink.close()
    return [*written, INFO]


def _put(sink: TileSink, rel: str, levels: _Levels, k: int, quality: int, done: set[str], written: list[str]) -> None:
    """Write whole level ``k`` as ``rel`` unless it is there already."""
    if rel in done:
        return
    sink.put(rel, encode_tile(levels.hwc(k), quality))
    done.add(rel)
    written.append(rel)
