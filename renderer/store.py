"""The image store: an OME-Zarr 0.5 (Zarr v3) image group on any fsspec URL.

This module is the one owner of the on-store layout; every other module asks
an ``ImageStore`` for what it needs and never builds a path inside a store:

  <url>/zarr.json                    group; attributes ``ome`` (NGFF 0.5) and ``creps_gigapixel``
  <url>/0                            level 0, (3, H, W) uint8, chunks (3, T, T), dims c/y/x
  <url>/1 .. n                       pyramid levels (renderer.pyramid); 1..L written by the render's
                                     workers with their blocks (meta ``render_levels``), the rest by assemble
  <url>/lines/row, lines/col         line features of the job (``write_lines`` / ``read_lines``)
  <url>/lines/done/<which>_<a>_<b>.json, lines/done/all.json   line-range completion markers
  <url>/tiles/b<start>_<stop>.json   completion marker of tiles [start, stop), written after their data
                                     (stores written before batches: tiles/<id>.json, one per tile);
                                     what a marker holds and its crc32: renderer.markers
  <url>/pyramid.json                 how far each pyramid level got (renderer.pyramid)
  <url>/lease/<gen>.json             who writes the store now (renderer.lease)

Markers are plain files next to the arrays, so "which tiles are done" is one
listing, on any filesystem, with no locking: each tile is written by exactly
one worker and its marker only after its chunks.  The non-zarr entries
(``tiles/``, ``pyramid.json``, ``lines/done``, ``lease/``) are never reached through a
zarr listing here (levels are probed by name), so zarr never meets them.

Reads go through here too: ``read_block`` / ``read_rows`` turn an unreadable
chunk into one ``RendererError`` naming the level and the stored object,
``object_rows(arr)`` is the row height of a level's stored objects (a chunk, or a
shard when sharded: whole objects per read, no range requests), and
``read_rows_hwc`` decodes plain local chunks straight into interleaved rows
(renderer.chunks). ``level_shapes`` is the halving of level shapes that every
pyramid level follows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.storage import FsspecStore, LocalStore

from creps.errors import UserError, first_line

from . import fsio
from .chunks import DirectChunks
from .errors import RendererError
from .lease import Lease, LeaseRecord, holder_alive
from .markers import marker_records, run_name, run_of, run_record
from .tasks import TilePlan

ATTRS_KEY = "creps_gigapixel"
MARKER_DIR = "tiles"
LINES_GROUP = "lines"
LINES_DONE_DIR = "lines/done"
LINES_ALL_DONE = "all"
PYRAMID_PROGRESS = "pyramid.json"
RENDER_LEVELS = "render_levels"  # meta key: {"block": G, "levels": L} (renderer.pyramid.render_levels)
LEASE_DIR = "lease"
CHANNEL_COLORS = ("FF0000", "00FF00", "0000FF")
CHANNEL_LABELS = ("red", "green", "blue")
LINE_KINDS = ("row", "col")


def level_shapes(height: int, width: int, min_size: int) -> list[tuple[int, int]]:
    """(h, w) of levels 0..n-1: halve (ceil) until the larger side is <= min_size.

    The one statement of the pyramid's level sizes: renderer.pyramid plans
    with it (``min_size`` = the chunk side), ``create_job_store`` makes the
    render's levels with it and jobs.plan bounds a block's levels by it.
    """
    if min_size < 1:
        raise RendererError(f"pyramid min_size must be >= 1, got {min_size}")
    shapes = [(height, width)]
    while max(shapes[-1]) > min_size:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def _object_side(arr: Any) -> tuple[int, int]:
    """(rows, cols) of one stored object of a level array: a shard when sharded, else a chunk."""
    outer = getattr(arr, "shards", None) or arr.chunks
    return int(outer[1]), int(outer[2])


def object_rows(arr: Any) -> int:
    """Rows of one stored object of a level array (``ImageStore.level``): a shard when sharded, else
    a chunk. Reads of whole object rows need no range requests, and a plan tile is one object of level 0."""
    return _object_side(arr)[0]


@dataclass(frozen=True)
class LineShape:
    """Shape of a job's line features: K blocks x rank x channels per line, stored in chunks."""

    blocks: int
    rank: int
    channels: int
    chunk: int


@dataclass
class ImageStore:
    """Handle on one image group: its zarr group plus the fsspec filesystem for markers."""

    url: str
    fs: Any
    root: str
    group: zarr.Group
    # Keep array handles (their metadata) once opened: a render worker's arrays do not change
    # during its job, and reopening them cost two requests to an object store on every tile.
    # Off by default: readers beside a writer (viewer, assemble) must see arrays it recreates.
    cache_arrays: bool = False
    _arrays: dict[str, zarr.Array] = field(default_factory=dict, repr=False)
    _direct: dict[int, DirectChunks | None] = field(default_factory=dict, repr=False, compare=False)

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    # ------------------------------------------------------------ levels
    def has_level(self, level: int) -> bool:
        return self._array(str(level)) is not None

    def _array(self, key: str) -> zarr.Array | None:
        """The array at ``key`` or None; a lookup by name, never a listing of the group."""
        if key in self._arrays:
            return self._arrays[key]
        try:
            node = self.group[key]
        except KeyError:
            return None
        if not isinstance(node, zarr.Array):
            return None
        if self.cache_arrays:
            self._arrays[key] = node
        return node

    def level(self, level: int = 0) -> zarr.Array:
        arr = self._array(str(level))
        if arr is None:
            raise RendererError(f"{self.url} has no level {level}; render it first")
        return arr

    def level_count(self) -> int:
        n = 0
        while self.has_level(n):
            n += 1
        return n

    def delete_levels_from(self, first: int) -> None:
        """Remove levels ``first``, ``first``+1, ... (a deeper pyramid of an older plan)."""
        # one fsspec listing (gaps are possible); zarr's own listing would trip on our non-zarr entries
        names = {os.path.basename(str(n).rstrip("/")) for n in fsio.fresh_ls(self.fs, self.root)}
        for name in sorted(n for n in names if n.isdigit() and int(n) >= first):
            if self.has_level(int(name)):
                del self.group[name]
            self._arrays.pop(name, None)
            self._direct.pop(int(name), None)

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
            compressors = ZstdCodec(level=3)
        elif compressor == "none":
            compressors = None
        else:
            raise RendererError(f"unknown compressor {compressor!r}; use zstd or none")
        shards = (3, chunk * shard, chunk * shard) if shard and shard > 1 else None
        self._arrays.pop(str(level), None)
        self._direct.pop(level, None)
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

    def write_chunks(self, level: int, r0: int, c0: int, data: np.ndarray) -> None:
        """Write a (3, h, w) uint8 block of whole chunks (tiles side by side) at (r0, c0).

        The same stored bytes as ``write_region``, faster: on a local store
        with plain chunks (no shards; bytes + optional zstd codecs) each chunk
        is encoded here and stored as one file, atomically (temp file +
        rename), skipping zarr's per-chunk async round trips (measured 0.12
        instead of 0.4-0.6 ms per 32x32 chunk).  Anything else (object stores,
        shards, other codecs, a block not aligned to chunks) goes through zarr.
        """
        direct = self._direct_chunks(level)
        if direct is None or not direct.aligned(r0, c0, data.shape[1], data.shape[2]):
            self.write_region(level, r0, c0, data)
            return
        direct.write(r0, c0, data)

    def _direct_chunks(self, level: int) -> DirectChunks | None:
        if level not in self._direct:
            arr = self.level(level)
            self._direct[level] = DirectChunks.of(arr, self.url) if fsio.is_local(self.url) else None
        return self._direct[level]

    # ------------------------------------------------------------ reads
    def read_region(self, level: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Pixels [r0:r1, c0:c1] of a level as they read, errors as zarr raises them (renderer.verify
        tells a damaged chunk from unreachable storage by them)."""
        return np.asarray(self.level(level)[:, r0:r1, c0:c1])

    def read_block(self, level: int, r0: int, r1: int, c0: int, c1: int, arr: Any = None) -> np.ndarray:
        """Pixels [r0:r1, c0:c1] of a level, (3, h, w); an unreadable chunk is one ``RendererError``
        naming the level and the first stored object of rows [r0, r1) that does not read by itself.
        ``arr``: the level's array when the caller holds it (saves a metadata read)."""
        arr = self.level(level) if arr is None else arr
        try:
            return np.asarray(arr[:, r0:r1, c0:c1])
        except UserError:
            raise
        except Exception as e:
            raise RendererError(self._unreadable(level, arr, r0, r1, e)) from e

    def read_rows(self, level: int, r0: int, r1: int, arr: Any = None) -> np.ndarray:
        """Rows [r0, r1) of a level as (3, r1 - r0, w), errors as ``read_block``."""
        arr = self.level(level) if arr is None else arr
        return self.read_block(level, r0, r1, 0, int(arr.shape[2]), arr)

    def read_rows_hwc(self, level: int, r0: int, r1: int) -> np.ndarray | None:
        """Rows [r0, r1) of a plain local level as (r1 - r0, w, 3), decoded without zarr's machinery.

        For the exports (renderer.blocks), which want interleaved pixels. None
        when the level is not a plain local array (``DirectChunks.of``: object
        stores, shards, other codecs) or any chunk does not decode: then read
        through ``read_rows`` (which names an unreadable chunk).
        """
        if not fsio.is_local(self.url):
            return None
        direct = self._direct_chunks(level)
        return direct.read_rows_hwc(r0, r1) if direct is not None else None

    def _unreadable(self, level: int, arr: Any, r0: int, r1: int, error: Exception) -> str:
        """Name the first stored object of rows [r0, r1) that does not read by itself (best effort)."""
        sy, sx = _object_side(arr)
        width = int(arr.shape[2])
        for y0 in range(r0 // sy * sy, r1, sy):
            for x0 in range(0, width, sx):
                try:
                    np.asarray(arr[:, y0 : y0 + sy, x0 : x0 + sx])
                except Exception as e:
                    return (
                        f"level {level} chunk {self.chunk_path(level, y0, x0)} of {self.url} (rows "
                        f"{y0}:{min(y0 + sy, int(arr.shape[1]))}, cols {x0}:{min(x0 + sx, width)}) is unreadable: "
                        f"{first_line(e)}; re-render those tiles (or restore the store) and re-run"
                    )
        return f"cannot read rows {r0}:{r1} of level {level} of {self.url}: {first_line(error)}"

    def chunk_path(self, level: int, y: int, x: int) -> str:
        """The stored object (chunk, or shard when sharded) holding pixel (y, x) of a level, relative to the URL."""
        arr = self.level(level)
        sy, sx = _object_side(arr)
        key = arr.metadata.encode_chunk_key((0, y // sy, x // sx))
        return f"{level}/{key}"

    # ------------------------------------------------------------ attributes
    @property
    def meta(self) -> dict:
        """Our own attributes (job spec, checkpoint hash, version, timing)."""
        meta = self.group.attrs.get(ATTRS_KEY)
        return dict(meta) if isinstance(meta, dict) else {}

    def update_meta(self, **values: Any) -> None:
        meta = self.meta
        meta.update(values)
        self.group.attrs[ATTRS_KEY] = meta

    def write_ome(self, name: str = "creps") -> None:
        """(Re)write NGFF 0.5 ``multiscales`` + ``omero`` for the levels present."""
        self.group.attrs["ome"] = ome_metadata([self.level(i).shape for i in range(self.level_count())], name=name)

    def ome_level_paths(self) -> set[str] | None:
        """Dataset paths listed in the OME ``multiscales`` metadata; None without usable metadata."""
        ome = self.group.attrs.get("ome")
        if not isinstance(ome, dict) or not ome.get("multiscales"):
            return None
        try:
            return {d["path"] for d in ome["multiscales"][0]["datasets"]}
        except (KeyError, TypeError, IndexError):
            return None

    @property
    def block_levels(self) -> tuple[int, int]:
        """(G, L): the render works in blocks of G x G plan tiles and writes levels 1..L with them.

        (1, 0) for stores without the record (row-major plans, every level built by assemble).
        """
        info = self.meta.get(RENDER_LEVELS)
        if not isinstance(info, dict):
            return 1, 0
        block, levels = info.get("block", 1), info.get("levels", 0)
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (block, levels))
        return (block, levels) if ok and block >= 1 and levels >= 0 else (1, 0)

    # ------------------------------------------------------------ tile markers
    def tile_plan(self) -> TilePlan:
        """The tile grid of level 0: one tile per stored object (shard, or chunk when unsharded), in the job's blocks."""
        arr = self.level(0)
        _, h, w = arr.shape
        return TilePlan(h, w, object_rows(arr), self.block_levels[0])

    def mark_tiles(self, start: int, stop: int, records: list[dict]) -> None:
        """Record finished tiles [start, stop) of the plan; call only after all their data is written.

        One marker per rendered run of tiles (``tiles/b<start>_<stop>.json``,
        renderer.markers), so a job of millions of tiles has a few thousand
        markers and its done set comes from names alone.
        """
        path = self._path(f"{MARKER_DIR}/{run_name(start, stop)}.json")
        fsio.write_json(self.fs, path, run_record(start, stop, records))

    def _marker_names(self) -> set[str]:
        return fsio.list_names(self.fs, self._path(MARKER_DIR))

    def done_mask(self, plan: TilePlan | None = None) -> np.ndarray:
        """Boolean mask over the plan's tile indices: True where a marker says the tile is done."""
        plan = plan or self.tile_plan()
        mask = np.zeros(len(plan), dtype=bool)
        for name in self._marker_names():
            run = run_of(name)
            if run is not None:
                mask[run[0] : run[1]] = True
                continue
            k = plan.index(name)
            if k is not None:
                mask[k] = True
        return mask

    def done_count(self) -> int:
        return int(self.done_mask().sum())

    def done_tiles(self) -> set[str]:
        """Ids of the done tiles (small stores and tests; large jobs use ``done_mask``)."""
        plan = self.tile_plan()
        return {plan.tile(int(k)).id for k in np.flatnonzero(self.done_mask(plan))}

    def tile_record_groups(self) -> Iterator[list[dict]]:
        """The done tiles' records (renderer.markers.tile_marker), one list per marker (a run of
        tiles: whole blocks in a block plan); an unreadable marker yields nothing."""
        for name in sorted(self._marker_names()):
            content = fsio.read_json(self.fs, self._path(f"{MARKER_DIR}/{name}.json"))
            if isinstance(content, dict):
                yield marker_records(name, content)

    # ------------------------------------------------------------ line features
    def create_line_arrays(self, height: int, width: int, shape: LineShape) -> None:
        """Create (or replace) the empty row/column line arrays of a job, and clear their markers."""
        fsio.remove_tree(self.fs, self._path(LINES_DONE_DIR))
        self._arrays.clear()
        grp = self.group.require_group(LINES_GROUP)
        for which, length in (("row", height), ("col", width)):
            grp.create_array(
                which,
                shape=(shape.blocks, length, shape.rank, shape.channels),
                chunks=(shape.blocks, min(shape.chunk, length), shape.rank, shape.channels),
                dtype="float32",
                fill_value=0.0,
                compressors=None,  # line features are noise to a compressor; keep reads cheap
                dimension_names=["block", which, "rank", "channel"],
                overwrite=True,
            )

    def line_array(self, which: str) -> zarr.Array:
        if which not in LINE_KINDS:
            raise ValueError(f"which must be 'row' or 'col', got {which!r}")
        arr = self._array(f"{LINES_GROUP}/{which}")
        if arr is None:
            raise RendererError(f"{self.url} has no {which} line features; re-run the render job")
        return arr

    def write_lines(self, which: str, start: int, data: np.ndarray) -> None:
        """Store float32 features [K, n, rank, C] at line positions [start, start + n), then mark the range."""
        stop = start + data.shape[1]
        self.line_array(which)[:, start:stop] = data
        self.mark_lines(which, start, stop)

    def read_lines(self, which: str, start: int, stop: int) -> np.ndarray:
        """Features [K, stop - start, rank, C] of positions [start, stop), exactly as stored (C-ordered)."""
        return np.ascontiguousarray(np.asarray(self.line_array(which)[:, start:stop]))

    def mark_lines(self, which: str, start: int, stop: int) -> None:
        """Record a stored line range; call only after its data is written."""
        record = {"which": which, "start": start, "stop": stop}
        fsio.write_json(self.fs, self._path(f"{LINES_DONE_DIR}/{which}_{start}_{stop}.json"), record)

    def line_ranges_done(self) -> set[tuple[str, int, int]]:
        out = set()
        for name in fsio.list_names(self.fs, self._path(LINES_DONE_DIR)):
            parts = name.split("_")
            if len(parts) == 3 and parts[0] in LINE_KINDS and parts[1].isdigit() and parts[2].isdigit():
                out.add((parts[0], int(parts[1]), int(parts[2])))
        return out

    def mark_lines_complete(self, info: dict) -> None:
        fsio.write_json(self.fs, self._path(f"{LINES_DONE_DIR}/{LINES_ALL_DONE}.json"), info)

    def lines_complete(self) -> bool:
        return LINES_ALL_DONE in fsio.list_names(self.fs, self._path(LINES_DONE_DIR))

    # ------------------------------------------------------------ writer
    def writer(self) -> LeaseRecord | None:
        """The process writing this store now, if any (a live lease holder)."""
        rec = Lease(self.fs, self._path(LEASE_DIR), self.url).newest()
        return rec if rec is not None and holder_alive(rec) else None

    # ------------------------------------------------------------ pyramid progress
    def pyramid_progress(self) -> dict | None:
        """renderer.pyramid's progress record; None when no pyramid pass has started."""
        record = fsio.read_json(self.fs, self._path(PYRAMID_PROGRESS))
        return record if isinstance(record, dict) else None

    def write_pyramid_progress(self, record: dict) -> None:
        fsio.write_json(self.fs, self._path(PYRAMID_PROGRESS), record)

    def invalidate_pyramid(self, reason: str) -> None:
        """Mark the pyramid built so far as stale (level-0 tiles are about to change).

        Called by a render run before it writes any tile, so a pyramid (and
        the exports cut from it) built before can never pass for current.
        """
        record = self.pyramid_progress()
        if record is not None and not record.get("stale"):
            self.write_pyramid_progress({**record, "stale": True, "stale_reason": reason})


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
                for color, label in zip(CHANNEL_COLORS, CHANNEL_LABELS, strict=False)
            ],
            "rdefs": {"model": "color"},
        },
    }


def store_exists(url: str, storage_options: dict | None = None) -> bool:
    """True when ``url`` holds a zarr group (the marker of an image store)."""
    fs, root = fsio.filesystem(url, storage_options)
    return bool(fs.exists(f"{root}/zarr.json"))


def is_foreign_folder(url: str, storage_options: dict | None = None) -> bool:
    """True when ``url`` is a non-empty folder that is not an image store (never overwrite it)."""
    fs, root = fsio.filesystem(url, storage_options)
    if fs.exists(f"{root}/zarr.json"):
        return False
    if not (fs.exists(root) and fs.isdir(root)):
        return False
    names = {os.path.basename(str(n).rstrip("/")) for n in fs.ls(root, detail=False)}
    return bool(names - {LEASE_DIR})  # a lease alone: a job that took the place and has not written yet


def open_store(url: str, storage_options: dict | None = None, mode: str = "a") -> ImageStore:
    """Open (mode 'r' / 'a') or create (mode 'w': wipe) the image group at ``url``."""
    fs, root = fsio.filesystem(url, storage_options)
    try:
        exists = fs.exists(f"{root}/zarr.json")
    except Exception as e:  # endpoint down, bad credentials: whatever the filesystem raises
        raise RendererError(f"cannot access {url!r}: {first_line(e)}") from None
    if mode == "r" and not exists:
        raise RendererError(f"no image store at {url!r} (missing zarr.json); render one first")
    try:
        if fsio.is_local(url):
            path = fsio.local_path(url)
            if mode != "r":
                os.makedirs(path, exist_ok=True)
            zstore: Any = LocalStore(path, read_only=mode == "r")
        else:
            zstore = FsspecStore.from_url(url, storage_options=storage_options or None, read_only=mode == "r")
            fsio.count_io(zstore.fs)
        group = zarr.open_group(zstore, mode=mode, zarr_format=3)  # type: ignore[arg-type]
    except Exception as e:  # zarr passes on whatever the filesystem raises
        raise RendererError(f"cannot open store {url!r}: {first_line(e)}") from None
    if mode == "w":
        fs.invalidate_cache()
    return ImageStore(url=url, fs=fs, root=root, group=group)


def store_lease(url: str, storage_options: dict | None = None) -> Lease:
    """The writer lease of the store at ``url`` (it may not exist yet: the lease comes first)."""
    fs, root = fsio.filesystem(url, storage_options)
    return Lease(fs, f"{root}/{LEASE_DIR}", url)


def create_job_store(
    url: str,
    storage_options: dict | None,
    *,
    height: int,
    width: int,
    tile: int,
    shard: int,
    compressor: str,
    lines: LineShape | None,
    name: str,
    meta: dict,
    block: int = 1,
    levels: int = 0,
) -> ImageStore:
    """A fresh store for a render job: level 0 (and the empty levels 1..``levels`` its workers
    write block by block), empty line arrays, OME and job metadata.  ``lines=None``: no line
    arrays (an imported picture has no line features: jobs.importer).

    Any earlier content of the group (levels, markers, lines, pyramid progress)
    is wiped first, so nothing of another job can be mistaken for this one's;
    the lease folder stays (the caller holds it).
    """
    fs, root = fsio.filesystem(url, storage_options)
    if fs.exists(root):
        for entry in fs.ls(root, detail=False):
            if os.path.basename(str(entry).rstrip("/")) != LEASE_DIR:
                fs.rm(entry, recursive=True)
    fs.invalidate_cache()
    store = open_store(url, storage_options, mode="a")
    store.create_level(0, height, width, tile, shard, compressor, overwrite=True)
    for k, (h, w) in enumerate(level_shapes(height, width, 1)[1 : levels + 1], start=1):
        store.create_level(
            k, h, w, chunk=tile, overwrite=True
        )  # the pyramid's own arrays (renderer.pyramid), made early
    if lines is not None:
        store.create_line_arrays(height, width, lines)
    store.update_meta(**meta, **{RENDER_LEVELS: {"block": block, "levels": levels}})
    store.write_ome(name=name)
    return store
