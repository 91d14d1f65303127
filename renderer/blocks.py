"""Export work of an assemble: plain functions that one thread or one Ray task runs on a band of rows.

Every function here opens the store by URL and writes its own outputs, so
the same code runs on a local thread (renderer.scaleout.ThreadRunner) or as a
Ray task on any node (renderer.cluster.RayRunner); no Ray and no dask here.
(The pyramid levels' own band task is renderer.pyramid.level_rows.)

- ``export_band``: rows [a, b) of a level: its TIFF tiles (encoded here, the
  bytes returned, in TIFF order, for the one TIFF writer) and the DeepZoom
  tile rows that start in [a, b) (encoded and written here, to a local folder
  or any fsspec URL). The band reads its rows once, a chunk row at a time;
  a DeepZoom row that runs past b makes it read up to one more chunk row.
"""

from __future__ import annotations

import gc
import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .dzi import encode_tile, span
from .fsio import filesystem, is_local, local_path
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


class TileSink:
    """Writes tile files under a folder, a tile row at a time (``flush``): local files on this
    process's one file-writer thread, remote ones as one batch of concurrent uploads.

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
            sub = rel.rsplit("/", 1)[0]
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
            self.fs.pipe(self.pending)  # concurrent uploads
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


@dataclass
class BandResult:
    band: Band
    tiff: list[bytes]  # the band's TIFF tiles in TIFF order (empty without a TIFF)
    dzi: list[str]  # the DeepZoom files written, relative to the folder


def export_bands(
    height: int,
    width: int,
    level: int,
    dzi_level: int,
    chunk: int,
    tiff: TiffTiles | None,
    dzi: DziTiles | None,
    pixels: int = BAND_PIXELS,
) -> list[Band]:
    """The bands of one level: whole TIFF tile rows and whole chunk rows each, about ``pixels`` each."""
    unit = math.lcm(chunk, tiff.tile if tiff else 1)
    rows = max(1, pixels // max(1, width * unit)) * unit
    out = []
    for a in range(0, height, rows):
        b = min(a + rows, height)
        first = last = 0
        if dzi is not None:
            n = math.ceil(height / dzi.tile)
            starts = [span(r, height, dzi.tile, dzi.overlap)[0] for r in range(n)]
            first = next((r for r in range(n) if starts[r] >= a), n)
            last = next((r for r in range(first, n) if starts[r] >= b), n)
        out.append(Band(level, dzi_level, height, width, a, b, (first, last)))
    return out


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


def export_band(source: Source, band: Band, tiff: TiffTiles | None, dzi: DziTiles | None) -> BandResult:
    """Encode the TIFF tiles of rows [a, b) (returned) and write the DeepZoom rows that start there."""
    quiet_gc()
    store = source.open("r")
    h, w = band.height, band.width
    first, last = band.dzi_rows
    ts = dzi.tile if dzi else 0
    dzi_end = span(last - 1, h, ts, dzi.overlap)[1] if dzi and last > first else band.a
    xspans = [span(c, w, ts, dzi.overlap) for c in range(math.ceil(w / ts))] if dzi else []
    encode: Callable[[np.ndarray], bytes] | None = (
        tile_encoder(tiff.compression, tiff.quality, tiff.tile) if tiff else None
    )
    sink = dzi.sink() if dzi else None
    result = BandResult(band, [], [])
    rows = _Rows(band.a)
    t_next = band.a if tiff else band.b  # next TIFF tile row
    d_next = first  # next DeepZoom tile row
    for strip in band_strips(store, band.level, band.a, max(band.b if tiff else band.a, dzi_end)):
        rows.append(strip)
        while encode is not None and tiff and t_next < band.b and rows.end >= min(t_next + tiff.tile, h):
            cols = rows.take(t_next, min(t_next + tiff.tile, h))
            result.tiff.extend(encode(cols(c, c + tiff.tile)) for c in range(0, w, tiff.tile))
            t_next += tiff.tile
        while dzi and sink is not None and d_next < last:
            y0, y1 = span(d_next, h, ts, dzi.overlap)
            if rows.end < y1:
                break
            cols = rows.take(y0, y1)
            for c, (x0, x1) in enumerate(xspans):
                rel = f"{band.dzi_level}/{c}_{d_next}.jpg"
                sink.put(rel, encode_tile(cols(x0, x1), dzi.quality))
                result.dzi.append(rel)
            sink.flush()
            d_next += 1
        keep = [t_next] if t_next < band.b else []
        if d_next < last:
            keep.append(span(d_next, h, ts, dzi.overlap if dzi else 0)[0])
        rows.drop_before(min(keep) if keep else rows.end)
    if sink is not None:
        sink.close()
    return result


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
