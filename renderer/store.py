"""The image store: an OME-Zarr 0.5 (Zarr v3) image group on any fsspec URL.

Layout (see docs/architecture.md):
  <url>/zarr.json        group; attributes ``ome`` (NGFF 0.5) and ``creps_gigapixel``
  <url>/0                level 0, (3, H, W) uint8, chunks (3, T, T), dims c/y/x
  <url>/1 .. n           pyramid levels (renderer.pyramid)
  <url>/lines/...        row/column line features of the job (renderer.lines)
  <url>/tiles/<id>.json  one completion marker per finished tile, written after its data

Markers are plain files next to the arrays, so "which tiles are done" is one
listing, on any filesystem, with no locking: each tile is written by exactly
one worker and its marker only after its chunks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import warnings

import fsspec
import numpy as np
import zarr
from zarr.storage import FsspecStore, LocalStore

from .errors import RendererError

ATTRS_KEY = "creps_gigapixel"
# Our marker and line folders are not zarr nodes; zarr warns when it lists them.
warnings.filterwarnings("ignore", message=r"Object at .* is not recognized as a component of a Zarr hierarchy")
MARKER_DIR = "tiles"
CHANNEL_COLORS = ("FF0000", "00FF00", "0000FF")
CHANNEL_LABELS = ("red", "green", "blue")


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


@dataclass
class ImageStore:
    """Handle on one image group: its zarr group plus the fsspec filesystem for markers."""

    url: str
    fs: Any
    root: str
    group: zarr.Group

    # ------------------------------------------------------------ arrays
    def has_level(self, level: int) -> bool:
        return str(level) in self.group.array_keys()

    def level(self, level: int = 0) -> zarr.Array:
        try:
            return self.group[str(level)]  # type: ignore[return-value]
        except KeyError:
            raise RendererError(f"{self.url} has no level {level}; render it first") from None

    def level_count(self) -> int:
        n = 0
        while self.has_level(n):
            n += 1
        return n

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of level 0."""
        _, h, w = self.level(0).shape
        return h, w

    def create_level(
        self,
        level: int,
        height: int,
        width: int,
        chunk: int,
        shard: int | None = None,
        compressor: str = "zstd",
        overwrite: bool = False,
    ) -> zarr.Array:
        """Create the (3, H, W) uint8 array of one level (shard = tiles per shard side)."""
        compressors: Any
        if compressor == "zstd":
            compressors = zarr.codecs.ZstdCodec(level=3)
        elif compressor == "none":
            compressors = None
        else:
            raise RendererError(f"unknown compressor {compressor!r}; use zstd or none")
        shards = (3, chunk * shard, chunk * shard) if shard and shard > 1 else None
        return self.group.create_array(
            str(level),
            shape=(3, height, width),
            chunks=(3, chunk, chunk),
            shards=shards,
            dtype="uint8",
            fill_value=0,
            compressors=compressors,
            dimension_names=["c", "y", "x"],
            overwrite=overwrite,
        )

    def write_region(self, level: int, r0: int, c0: int, data: np.ndarray) -> None:
        """Write a (3, h, w) uint8 block at (r0, c0)."""
        arr = self.level(level)
        _, h, w = data.shape
        arr[:, r0 : r0 + h, c0 : c0 + w] = data

    def read_region(self, level: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        return np.asarray(self.level(level)[:, r0:r1, c0:c1])

    # ------------------------------------------------------------ attributes
    @property
    def meta(self) -> dict:
        """Our own attributes (job spec, checkpoint hash, version, timing)."""
        return dict(self.group.attrs.get(ATTRS_KEY, {}))

    def update_meta(self, **values: Any) -> None:
        meta = self.meta
        meta.update(values)
        self.group.attrs[ATTRS_KEY] = meta

    def write_ome(self, name: str = "creps") -> None:
        """(Re)write NGFF 0.5 ``multiscales`` + ``omero`` for the levels present."""
        self.group.attrs["ome"] = ome_metadata(
            [self.level(i).shape for i in range(self.level_count())], name=name
        )

    # ------------------------------------------------------------ markers
    def _marker_path(self, tile_id: str) -> str:
        return f"{self.root}/{MARKER_DIR}/{tile_id}.json"

    def mark_done(self, tile_id: str, info: dict) -> None:
        path = self._marker_path(tile_id)
        if _is_local(self.url):
            self.fs.makedirs(os.path.dirname(path), exist_ok=True)
        self.fs.pipe_file(path, json.dumps(info).encode())

    def done_tiles(self) -> set[str]:
        path = f"{self.root}/{MARKER_DIR}"
        try:
            names = self.fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            return set()
        except TypeError:  # filesystems without ``refresh``
            names = self.fs.ls(path, detail=False)
        return {os.path.basename(n)[: -len(".json")] for n in names if n.endswith(".json")}

    def clear_markers(self) -> None:
        path = f"{self.root}/{MARKER_DIR}"
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)


def ome_metadata(shapes: list[tuple[int, ...]], name: str = "creps") -> dict:
    """NGFF 0.5 attributes for a c/y/x pyramid whose level i is 2**i smaller."""
    datasets = []
    h0, w0 = shapes[0][1], shapes[0][2]
    for i, shp in enumerate(shapes):
        sy, sx = h0 / shp[1], w0 / shp[2]
        datasets.append({"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [1.0, sy, sx]}]})
    return {
        "version": "0.5",
        "multiscales": [
            {
                "name": name,
                "axes": [
                    {"name": "c", "type": "channel"},
                    {"name": "y", "type": "space"},
                    {"name": "x", "type": "space"},
                ],
                "datasets": datasets,
                "type": "mean",
            }
        ],
        "omero": {
            "channels": [
                {
                    "color": color,
                    "label": label,
                    "active": True,
                    "window": {"start": 0, "end": 255, "min": 0, "max": 255},
                }
                for color, label in zip(CHANNEL_COLORS, CHANNEL_LABELS)
            ],
            "rdefs": {"model": "color"},
        },
    }


def filesystem(url: str, storage_options: dict | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a URL or plain path."""
    try:
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ValueError, ImportError, TypeError) as e:
        raise RendererError(f"cannot open {url!r}: {e}") from None
    return fs, root.rstrip("/")


def open_store(
    url: str,
    storage_options: dict | None = None,
    mode: str = "a",
) -> ImageStore:
    """Open (mode 'r' / 'a') or create (mode 'w': wipe) the image group at ``url``."""
    fs, root = filesystem(url, storage_options)
    if mode == "r" and not fs.exists(f"{root}/zarr.json"):
        raise RendererError(f"no image store at {url!r} (missing zarr.json); render one first")
    try:
        if _is_local(url):
            path = _local_path(url)
            if mode != "r":
                os.makedirs(path, exist_ok=True)
            zstore: Any = LocalStore(path, read_only=mode == "r")
        else:
            zstore = FsspecStore.from_url(url, storage_options=storage_options or None, read_only=mode == "r")
        group = zarr.open_group(zstore, mode=mode, zarr_format=3)
    except RendererError:
        raise
    except (OSError, ValueError, PermissionError) as e:
        raise RendererError(f"cannot open store {url!r}: {e}") from None
    if mode == "w":
        fs.invalidate_cache()
    return ImageStore(url=url, fs=fs, root=root, group=group)
