"""Export work of an assemble: plain functions that one thread or one Ray task runs on a band of rows.

Every function here opens the store by URL and writes its own outputs, so
the same code runs on a local thread (renderer.scaleout.ThreadRunner) or as a
Ray task on any node (renderer.cluster.RayRunner); no Ray and no dask here.
(The pyramid levels' own band task is renderer.pyramid.level_rows.)

- ``export_band``: rows [a, b) of a level: its TIFF tiles (encoded here, the
  bytes returned, in TIFF order, for the one TIFF writer) and the DeepZoom
  and IIIF tile rows that start in [a, b) (encoded and written here, to a
  local folder or any fsspec URL). The band reads its rows once, a chunk row
  at a time; a tile row that runs past b makes it read up to one more chunk
  row. DeepZoom and IIIF tiles are cut by the same code (``_TileRows``):
  they differ in overlap and file names only.
"""

from __future__ import annotations

import gc
import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .dzi import encode_tile, span
from .fsio import filesystem, is_local, local_path, upload_kwargs
from .iiif import TILE, tile_request
from .pyramid import BAND_PIXELS, downsample
from .store import ImageStore, object_rows, open_store
from .tiff import tile_encoder


# ---------------------------------------------------------------- where things go
@dataclass(frozen=True)
class Source:
    """The store a task reads (by URL: tasks may run in another process or on another node)."""

    url: str
    storage_options: dict | None = None

    def open(self, mode: str = "r") -> ImageStore:
        return open_store(self.url, self.storage_options, mode=mode)


@dataclass(frozen=True)
class TiffTiles:
    """How TIFF tiles are encoded (renderer.tiff.tile_encoder)."""

    tile: int = 256
    compression: str = "jpeg"
    quality: int = 90


@dataclass(frozen=True)
class DziTiles:
    """Where and how DeepZoom tiles are written: ``<folder>/<level>/<col>_<row>.jpg``.

    ``folder`` is a local path or an fsspec URL (``storage_options`` for it).
    """

    folder: str
    tile: int = 254
    overlap: int = 1
    quality: int = 90
    storage_options: dict | None = None

    def sink(self) -> TileSink:
        return TileSink(self.folder, self.storage_options)


@dataclass(frozen=True)
class IiifTiles:
    """Where and how the tiles of an IIIF level-0 tree are written: ``<folder>/{region}/{size}/0/default.jpg``
    (renderer.iiif.tile_request) for the scale factors 2^0 .. 2^(levels-1) of a ``width x height`` image."""

    folder: str
    width: int
    height: int
    levels: int
    tile: int = TILE
    quality: int = 90
    storage_options: dict | None = None

    def sink(self) -> TileSink:
        return TileSink(self.folder, self.storage_options)

    def name(self, k: int) -> Callable[[int, int], str]:
        """The file of tile (col, row) at scale factor 2^k, relative to the folder."""
        return lambda col, row: tile_request(self.width, self.height, k, col, row, self.tile)


class TileSink:
    """Writes tile files under a folder, a tile row at a time (``flush``): local files on this
    process's one file-writer thread, remote ones as one batch of concurrent uploads (each object
    with its Content-Type where the store keeps one: renderer.fsio.upload_kwargs).

    One thread creates the local files because creating files in one
    directory is serial in the kernel anyway (the directory lock), and
    encoders that wait for it would spin on that lock instead of encoding
    (measured on ext4: docs/assemble.md). ``close`` waits for every write
    and raises the first error.
    """

    MAX_ROWS = 8  # tile rows queued for the writer thread by one sink (memory: a row is ~2 MB of JPEG)

    def __init__(self, folder: str, storage_options: dict | None = None) -> None:
        self.local = is_local(folder)
        if self.local:
            self.fs: Any = None
            self.root = local_path(folder)
        else:
            self.fs, self.root = filesystem(folder, storage_options)
        self.pending: dict[str, bytes] = {}
        self.writes: list[Future] = []
        self.made: set[str] = set()

    def put(self, rel: str, data: bytes) -> None:
        if self.local:
            sub = rel.rsplit("/", 1)[0] if "/" in rel else ""
            if sub not in self.made:
                os.makedirs(os.path.join(self.root, sub), exist_ok=True)
                self.made.add(sub)
            self.pending[os.path.join(self.root, *rel.split("/"))] = data
        else:
            self.pending[f"{self.root}/{rel}"] = data

    def flush(self) -> None:
        if not self.pending:
            return
        if self.local:
            self.writes.append(_file_writer().submit(_write_files, self.pending))
            if len(self.writes) > self.MAX_ROWS:
                self._wait(len(self.writes) - self.MAX_ROWS)
        else:
            by_type: dict[str, dict[str, bytes]] = {}
            for path, data in self.pending.items():
                by_type.setdefault(path.rsplit(".", 1)[-1], {})[path] = data
            for suffix, files in by_type.items():  # concurrent uploads, each with its Content-Type
                self.fs.pipe(files, **upload_kwargs(self.fs, f"x.{suffix}"))
        self.pending = {}

    def close(self) -> None:
        self.flush()
        self._wait(len(self.writes))

    def _wait(self, n: int) -> None:
        done, self.writes = self.writes[:n], self.writes[n:]
        for f in done:
            f.result()


def _write_files(files: dict[str, bytes]) -> None:
    for path, data in files.items():
        with open(path, "wb") as f:
            f.write(data)


_WRITER: list[ThreadPoolExecutor] = []
_WRITER_LOCK = threading.Lock()


def _file_writer() -> ThreadPoolExecutor:
    with _WRITER_LOCK:
        if not _WRITER:
            _WRITER.append(ThreadPoolExecutor(1, thread_name_prefix="tile-files"))
        return _WRITER[0]


# ---------------------------------------------------------------- export bands
@dataclass(frozen=True)
class Band:
    """Rows [a, b) of zarr level ``level`` (= DeepZoom level ``dzi_level``): TIFF rows and DeepZoom rows."""

    level: int
    dzi_level: int
    height: int
    width: int
    a: int
    b: int
    dzi_rows: tuple[int, int]  # DeepZoom tile rows [first, last) whose (overlapped) start is in [a, b)
    iiif_rows: tuple[int, int] = (0, 0)  # IIIF tile rows [first, last) that start in [a, b)


@dataclass
class BandResult:
    band: Band
    tiff: list[bytes]  # the band's TIFF tiles in TIFF order (empty without a TIFF)
    dzi: list[str]  # the DeepZoom files written, relative to the folder
    iiif: list[str] = field(default_factory=list)  # the IIIF files written, relative to the folder


def export_bands(
    height: int,
    width: int,
    level: int,
    dzi_level: int,
    chunk: int,
    tiff: TiffTiles | None,
    dzi: DziTiles | None,
    pixels: int = BAND_PIXELS,
    iiif: IiifTiles | None = None,
) -> list[Band]:
    """The bands of one level: whole TIFF tile rows and whole chunk rows each, about ``pixels`` each."""
    unit = math.lcm(chunk, tiff.tile if tiff else 1)
    rows = max(1, pixels // max(1, width * unit)) * unit
    out = []
    for a in range(0, height, rows):
        b = min(a + rows, height)
        dzi_rows = _rows_starting(height, dzi.tile, dzi.overlap, a, b) if dzi is not None else (0, 0)
        iiif_rows = (0, 0)
        if iiif is not None and level < iiif.levels:
            iiif_rows = _rows_starting(height, iiif.tile, 0, a, b)
        out.append(Band(level, dzi_level, height, width, a, b, dzi_rows, iiif_rows))
    return out


def _rows_starting(height: int, tile: int, overlap: int, a: int, b: int) -> tuple[int, int]:
    """The tile rows [first, last) of a level ``height`` high whose (overlapped) start is in [a, b)."""
    n = math.ceil(height / tile)
    starts = [span(r, height, tile, overlap)[0] for r in range(n)]
    first = next((r for r in range(n) if starts[r] >= a), n)
    last = next((r for r in range(first, n) if starts[r] >= b), n)
    return first, last


class _Rows:
    """Consecutive rows of a level, (rows, w, 3), appended in order and dropped from the top."""

    def __init__(self, start: int) -> None:
        self.start = self.end = start
        self.parts: list[np.ndarray] = []

    def append(self, rows: np.ndarray) -> None:
        self.parts.append(rows)
        self.end += rows.shape[0]

    def take(self, y0: int, y1: int) -> Callable[[int, int], np.ndarray]:
        """Rows [y0, y1) as ``cols(x0, x1)``: a view when they lie in one piece, else one copy of
        just those columns (never a copy of whole rows: at 32768 px a tile row is 25 MB)."""
        pieces, s = [], self.start
        for p in self.parts:
            e = s + p.shape[0]
            if e > y0 and s < y1:
                pieces.append(p[max(y0 - s, 0) : min(y1, e) - s])
            s = e
        if len(pieces) == 1:
            one = pieces[0]
            return lambda x0, x1: one[:, x0:x1]
        return lambda x0, x1: np.concatenate([p[:, x0:x1] for p in pieces], axis=0)

    def drop_before(self, y: int) -> None:
        while self.parts and self.start + self.parts[0].shape[0] <= y:
            self.start += self.parts.pop(0).shape[0]


def hwc(chw: np.ndarray) -> np.ndarray:
    """(3, h, w) -> contiguous (h, w, 3); three strided copies, ~4x faster than a transpose copy."""
    out = np.empty((chw.shape[1], chw.shape[2], chw.shape[0]), chw.dtype)
    for c in range(chw.shape[0]):
        out[..., c] = chw[c]
    return out


def band_strips(store: ImageStore, k: int, r0: int, r1: int) -> Iterator[np.ndarray]:
    """Rows [r0, r1) of level k as (rows, w, 3) pieces of whole stored chunk rows (or shard rows).

    Plain local levels are decoded straight into interleaved rows
    (``ImageStore.read_rows_hwc``); anything else, or a chunk that does not
    decode, goes through zarr (``ImageStore.read_rows`` names an unreadable chunk).
    """
    arr = store.level(k)
    step = object_rows(arr)
    y = r0
    while y < r1:
        y1 = min((y // step + 1) * step, r1)
        rows = store.read_rows_hwc(k, y, y1)
        yield rows if rows is not None else hwc(store.read_rows(k, y, y1, arr))
        y = y1


def quiet_gc() -> None:
    """Move what is alive now (the imports: torch, zarr, ...) out of the garbage collector's way, once per process.

    The block work makes many short-lived objects (zarr's async reads), and
    each collection otherwise walks every imported object again (measured:
    ~6 % of an export's CPU time in ``gc_collect_main``).
    """
    global _GC_QUIET
    if not _GC_QUIET:
        gc.freeze()
        _GC_QUIET = True


_GC_QUIET = False


class _TileRows:
    """Tile rows [first, last) of one tiling of a level (DeepZoom or IIIF), cut and written as the rows arrive.

    Tile (c, r) covers ``span`` of the level on both axes (``overlap`` px
    more inside the level); ``name(c, r)`` is its file, relative to the sink's
    folder; a tile row is written as one batch (``TileSink.flush``).
    """

    def __init__(
        self,
        height: int,
        width: int,
        rows: tuple[int, int],
        tile: int,
        overlap: int,
        quality: int,
        name: Callable[[int, int], str],
        sink: TileSink,
    ) -> None:
        self.height, self.tile, self.overlap, self.quality = height, tile, overlap, quality
        self.next, self.last = rows
        self.xspans = [span(c, width, tile, overlap) for c in range(math.ceil(width / tile))]
        self.name, self.sink = name, sink
        self.written: list[str] = []

    def end(self, default: int) -> int:
        """The row after the last one these tile rows read (``default`` when there are none)."""
        return span(self.last - 1, self.height, self.tile, self.overlap)[1] if self.last > self.next else default

    def needed(self) -> int | None:
        """The first row still to be cut (None when every tile row is written)."""
        return span(self.next, self.height, self.tile, self.overlap)[0] if self.next < self.last else None

    def cut(self, rows: _Rows) -> None:
        """Write every tile row whose rows have all arrived."""
        while self.next < self.last:
            y0, y1 = span(self.next, self.height, self.tile, self.overlap)
            if rows.end < y1:
                break
            cols = rows.take(y0, y1)
            for c, (x0, x1) in enumerate(self.xspans):
                rel = self.name(c, self.next)
                self.sink.put(rel, encode_tile(cols(x0, x1), self.quality))
                self.written.append(rel)
            self.sink.flush()
            self.next += 1

    def close(self) -> list[str]:
        """Wait for every write; the files written, relative to the folder."""
        self.sink.close()
        return self.written


def _tile_rows(band: Band, dzi: DziTiles | None, iiif: IiifTiles | None) -> tuple[_TileRows | None, _TileRows | None]:
    """The DeepZoom and IIIF tile rows of a band (None where it has none to write)."""
    h, w = band.height, band.width
    d = i = None
    if dzi is not None:
        name = lambda c, r: f"{band.dzi_level}/{c}_{r}.jpg"  # noqa: E731
        d = _TileRows(h, w, band.dzi_rows, dzi.tile, dzi.overlap, dzi.quality, name, dzi.sink())
    if iiif is not None and band.iiif_rows[1] > band.iiif_rows[0]:
        i = _TileRows(h, w, band.iiif_rows, iiif.tile, 0, iiif.quality, iiif.name(band.level), iiif.sink())
    return d, i


def export_band(
    source: Source, band: Band, tiff: TiffTiles | None, dzi: DziTiles | None, iiif: IiifTiles | None = None
) -> BandResult:
    """Encode the TIFF tiles of rows [a, b) (returned) and write the DeepZoom and IIIF rows that start there."""
    quiet_gc()
    store = source.open("r")
    h, w = band.height, band.width
    dzi_rows, iiif_rows = _tile_rows(band, dzi, iiif)
    cutters = [c for c in (dzi_rows, iiif_rows) if c is not None]
    encode: Callable[[np.ndarray], bytes] | None = (
        tile_encoder(tiff.compression, tiff.quality, tiff.tile) if tiff else None
    )
    result = BandResult(band, [], [])
    rows = _Rows(band.a)
    t_next = band.a if tiff else band.b  # next TIFF tile row
    end = max([band.b if tiff else band.a] + [c.end(band.a) for c in cutters])
    for strip in band_strips(store, band.level, band.a, end):
        rows.append(strip)
        while encode is not None and tiff and t_next < band.b and rows.end >= min(t_next + tiff.tile, h):
            cols = rows.take(t_next, min(t_next + tiff.tile, h))
            result.tiff.extend(encode(cols(c, c + tiff.tile)) for c in range(0, w, tiff.tile))
            t_next += tiff.tile
        for cutter in cutters:
            cutter.cut(rows)
        keep = [t_next] if t_next < band.b else []
        keep += [y for y in (c.needed() for c in cutters) if y is not None]
        rows.drop_before(min(keep) if keep else rows.end)
    if dzi_rows is not None:
        result.dzi = dzi_rows.close()
    if iiif_rows is not None:
        result.iiif = iiif_rows.close()
    return result


def level_tiles(px: np.ndarray, k: int, iiif: IiifTiles) -> list[str]:
    """Write every IIIF tile of scale factor 2^k from the whole (h, w, 3) level ``px`` (levels past the zarr's)."""
    rows = _Rows(0)
    rows.append(px)
    h, w = px.shape[:2]
    cutter = _TileRows(h, w, (0, math.ceil(h / iiif.tile)), iiif.tile, 0, iiif.quality, iiif.name(k), iiif.sink())
    cutter.cut(rows)
    return cutter.close()


def small_dzi_levels(smallest: np.ndarray, dzi_level: int, dzi: DziTiles) -> list[str]:
    """DeepZoom levels ``dzi_level``-1 .. 0 from the (h, w, 3) pixels of level ``dzi_level`` (one tile or so)."""
    sink = dzi.sink()
    written = []
    chw = smallest.transpose(2, 0, 1)
    for level in range(dzi_level - 1, -1, -1):
        chw = downsample(chw)
        px = hwc(chw)
        h, w = px.shape[:2]
        for r in range(math.ceil(h / dzi.tile)):
            y0, y1 = span(r, h, dzi.tile, dzi.overlap)
            for c in range(math.ceil(w / dzi.tile)):
                x0, x1 = span(c, w, dzi.tile, dzi.overlap)
                rel = f"{level}/{c}_{r}.jpg"
                sink.put(rel, encode_tile(px[y0:y1, x0:x1], dzi.quality))
                written.append(rel)
    sink.close()
    return written
