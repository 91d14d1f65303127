"""DeepZoom tiles made on the fly from an OME-Zarr image store.

The viewer shows a store while it is being rendered, before any export
exists, so it cannot rely on a .dzi on disk: it serves a virtual DZI whose
tiles it cuts from the zarr levels on request.

Geometry (the DeepZoom convention OpenSeadragon expects):
  max_level = ceil(log2(max(W, H))); DZI level L has downsampling factor
  2**(max_level - L) and size ceil(W / 2**k) x ceil(H / 2**k); tile (col, row)
  covers [col*T - o, col*T + T + o) clipped to the level, with overlap o only
  on sides that have a neighbour.

Source of each tile: zarr level i = max_level - L when the pyramid has it
(renderer.pyramid: level i is 2**i smaller). Otherwise the coarsest level
that is still finer than needed, area-averaged (mean over the valid source
pixels of each block, rounded half up). So that one coarse tile of a huge
level-0-only store cannot read gigapixels, the source read is capped at
MAX_SOURCE_SIDE pixels per side by striding: beyond that a tile is the mean
of a regular subsample (every s-th pixel), not of every pixel. That bounds
the pixels a tile holds in memory, not the chunks it decodes: while the
stride is below the chunk side every chunk under the tile is still read, so
coarse views of a huge level-0-only store are slow (seconds per tile);
`render.py assemble` builds the pyramid that makes them cheap. Chunks that
are not written yet read as the fill value (0, black), so a render in
progress shows blank tiles that fill in as it goes.
"""

from __future__ import annotations

import io
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from creps.errors import first_line
from renderer.dzi import OVERLAP, TILE_SIZE, dzi_xml, level_size, max_level, tile_bounds, tile_grid
from renderer.errors import RendererError
from renderer.pyramid import render_levels
from renderer.store import ImageStore, open_store

from .errors import ViewerError
from .iiif import ImageRequest
from .iiif_image import finish, window_pixels

__all__ = [
    "OVERLAP",
    "TILE_SIZE",
    "StoreTiles",
    "TileReadError",
    "block_mean",
    "dzi_xml",
    "encode",
    "level_size",
    "max_level",
    "tile_bounds",
    "tile_grid",
    "usable_levels",
]
MAX_SOURCE_SIDE = 4096  # source pixels read per tile side at most (then strided)
MEMORY_BYTES = 256 << 20  # encoded images kept in memory per source at most
FORMATS = {"jpeg": "image/jpeg", "png": "image/png"}


class TileReadError(ViewerError):
    """A tile inside the image whose pixels cannot be read (a corrupt chunk, an unreachable store).

    The server answers it with HTTP 500 and its message; other tiles are unaffected.
    """

    exit_code = 1


def block_mean(img: np.ndarray, b: int) -> np.ndarray:
    """Mean of b x b blocks of a (3, h, w) uint8 image; edge blocks average their valid pixels.

    Rounded half up: (sum + n // 2) // n, integers only, so results are exact.
    Sums accumulate in uint32 without a uint32 copy of the image, so a tile's
    memory stays about twice its source read (see ``TileGate`` for the bound).
    """
    if b == 1:
        return img
    c, h, w = img.shape
    oh, ow = -(-h // b), -(-w // b)
    if h % b or w % b:
        padded = np.zeros((c, oh * b, ow * b), dtype=np.uint8)
        padded[:, :h, :w] = img
    else:
        padded = img
    sums = padded.reshape(c, oh, b, ow, b).sum(axis=(2, 4), dtype=np.uint32)
    ys = np.minimum(b, h - np.arange(oh) * b)
    xs = np.minimum(b, w - np.arange(ow) * b)
    counts = (ys[:, None] * xs[None, :]).astype(np.uint32)
    return ((sums + counts // 2) // counts).astype(np.uint8)


def encode(img: np.ndarray, fmt: str, quality: int = 90) -> bytes:
    """(3, h, w) uint8 -> JPEG or PNG bytes."""
    pil = Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)), "RGB")
    buf = io.BytesIO()
    if fmt == "jpeg":
        pil.save(buf, "JPEG", quality=quality)
    else:
        pil.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


# ---------------------------------------------------------------- bounded work
class EncodedLRU:
    """Encoded images by key (tiles, IIIF images), least recently used first out, bounded in count
    and in bytes (an IIIF image can be a hundred tiles' worth). Thread-safe."""

    def __init__(self, max_items: int = 512, max_bytes: int = MEMORY_BYTES) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self.bytes = 0
        self._lru: OrderedDict[Hashable, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._lru)

    def __iter__(self) -> Iterator[Hashable]:
        """The keys, least recently used first (a snapshot)."""
        with self._lock:
            return iter(list(self._lru))

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._lru

    def get(self, key: Hashable) -> bytes | None:
        with self._lock:
            hit = self._lru.get(key)
            if hit is not None:
                self._lru.move_to_end(key)
            return hit

    def put(self, key: Hashable, data: bytes) -> None:
        with self._lock:
            old = self._lru.pop(key, None)
            self.bytes += len(data) - (len(old) if old is not None else 0)
            self._lru[key] = data
            while len(self._lru) > 1 and (len(self._lru) > self.max_items or self.bytes > self.max_bytes):
                self.bytes -= len(self._lru.popitem(last=False)[1])


class ViewerBusy(ViewerError):
    """Too many tiles in flight: the server answers 503 with Retry-After (the page retries)."""


class TileGate:
    """At most ``workers`` tiles computed at once and ``queue`` more waiting; beyond that, ViewerBusy.

    The bound on memory: each computing tile holds its source read (at most
    3 x MAX_SOURCE_SIDE^2 bytes, 48 MiB) and about as much again while it is
    averaged and encoded, so the server's tile work stays under
    ``workers`` x ~100 MiB (4 x 100 MiB by default) however many requests
    arrive; waiting requests hold nothing but their thread.
    """

    def __init__(self, workers: int = 4, queue: int = 64, wait_s: float = 30.0) -> None:
        self.workers, self.queue, self.wait_s = workers, queue, wait_s
        self._sem = threading.BoundedSemaphore(workers)
        self._lock = threading.Lock()
        self.waiting = 0
        self.busy = 0

    @contextmanager
    def slot(self) -> Iterator[None]:
        with self._lock:
            if self.waiting >= self.queue:
                raise ViewerBusy(f"{self.busy} tiles in progress and {self.waiting} waiting; retry shortly")
            self.waiting += 1
        try:
            got = self._sem.acquire(timeout=self.wait_s)
        finally:
            with self._lock:
                self.waiting -= 1
        if not got:
            raise ViewerBusy(f"no tile worker free for {self.wait_s:g} s; retry shortly")
        with self._lock:
            self.busy += 1
        try:
            yield
        finally:
            with self._lock:
                self.busy -= 1
            self._sem.release()


# ---------------------------------------------------------------- the tile source
@dataclass
class StoreState:
    """What the viewer knows about the store at one moment (refreshed while a render runs)."""

    store: ImageStore
    levels: list[tuple[int, int]]  # (h, w) of each usable zarr level, index = level
    meta: dict
    tiles_done: int
    version: str
    at: float


class StoreTiles:
    """Virtual DZI over an image store: XML, tiles, and the job's progress.

    Re-reads the store's attributes and completion markers at most every
    ``refresh_s`` seconds, and keeps an LRU of encoded tiles keyed by that
    state, so a finished render costs one encode per tile and a running one
    shows new pixels as they land.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict | None = None,
        fmt: str = "jpeg",
        quality: int = 90,
        refresh_s: float = 1.0,
        cache_tiles: int = 512,
    ) -> None:
        if fmt not in FORMATS:
            raise ViewerError(f"unknown tile format {fmt!r}; use jpeg or png")
        self.url = url
        self.storage_options = storage_options
        self.fmt = fmt
        self.quality = quality
        self.refresh_s = refresh_s
        self._cache = EncodedLRU(cache_tiles)  # encoded tiles and IIIF images
        self._lock = threading.Lock()
        self.gate = TileGate()
        self._state = self._read_state()
        self.height, self.width = self._state.levels[0]

    # ------------------------------------------------------------ state
    def _read_state(self) -> StoreState:
        try:
            store = open_store(self.url, self.storage_options, mode="r")
            if not store.has_level(0):
                raise ViewerError(f"{self.url} has no level 0 yet; start the render first")
            meta = store.meta
            if meta.get("status") == "running" and store.writer() is None:
                meta["status"] = "interrupted"  # its writer is gone (killed): not running any more
            levels = usable_levels(store)
            done = store.done_count()
        except RendererError as e:
            raise ViewerError(str(e)) from None
        return StoreState(store, levels, meta, done, f"{done}.{len(levels)}", time.monotonic())

    def state(self, max_age: float | None = None) -> StoreState:
        """The store state, re-read if older than ``max_age`` (default ``refresh_s``)."""
        age = self.refresh_s if max_age is None else max_age
        with self._lock:
            if time.monotonic() - self._state.at >= age:
                try:
                    self._state = self._read_state()
                except ViewerError:
                    self._state.at = time.monotonic()  # keep serving the last good state
            return self._state

    def info(self) -> dict[str, Any]:
        """JSON-able summary for the page: size, levels, progress, and the job metadata."""
        st = self.state()
        total = st.meta.get("tiles_total")
        return {
            "mode": "zarr",
            "tile_source": "/image.dzi",
            "width": self.width,
            "height": self.height,
            "zarr_levels": len(st.levels),
            "dzi_levels": max_level(self.width, self.height) + 1,
            "tile_format": self.fmt,
            "tiles_done": st.tiles_done,
            "tiles_total": total if isinstance(total, int) else None,
            "version": st.version,
            **job_summary(st.meta),
            "meta": st.meta,
        }

    # ------------------------------------------------------------ tiles
    def dzi(self) -> str:
        return dzi_xml(self.width, self.height, self.fmt)

    def tile(self, level: int, col: int, row: int) -> bytes:
        """Encoded tile bytes; ViewerError if the tile is outside the pyramid."""
        top = max_level(self.width, self.height)
        if not 0 <= level <= top:
            raise ViewerError(f"no DZI level {level} (0..{top})")
        ncols, nrows = tile_grid(self.width, self.height, level)
        if not (0 <= col < ncols and 0 <= row < nrows):
            raise ViewerError(f"no tile {col}_{row} at level {level} ({ncols}x{nrows} tiles)")
        st = self.state()
        return self._made(
            (st.version, level, col, row), lambda: encode(self.pixels(st, level, col, row), self.fmt, self.quality)
        )

    def iiif(self, req: ImageRequest, client: str = "", alive: Callable[[], bool] = lambda: True) -> bytes:
        """Encoded IIIF image of a checked request: read like tiles (the same gate and LRU), then
        resampled where it is not a window of a level (``viewer.iiif_image``). ``client`` and
        ``alive`` are the endless source's; a store read is short and not abandoned."""
        st = self.state()

        def make() -> bytes:
            def window(k: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
                return self.window(st, k, y0, y1, x0, x1)

            return finish(window_pixels(window, req, self.width, self.height), req, self.quality)

        return self._made((st.version, req), make)

    def _made(self, key: Hashable, make: Callable[[], bytes]) -> bytes:
        """The LRU's bytes for ``key``, else ``make()`` inside the gate (then kept)."""
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        with self.gate.slot():
            data = make()
        self._cache.put(key, data)
        return data

    def pixels(self, st: StoreState, level: int, col: int, row: int) -> np.ndarray:
        """(3, h, w) uint8 pixels of one DZI tile, read from the best zarr level."""
        y0, y1, x0, x1 = tile_bounds(self.width, self.height, level, col, row)
        k = max_level(self.width, self.height) - level
        return self.window(st, k, y0, y1, x0, x1, f"tile {level}/{col}_{row}")

    def window(self, st: StoreState, k: int, y0: int, y1: int, x0: int, x1: int, what: str = "") -> np.ndarray:
        """(3, y1-y0, x1-x0) uint8 of the image downsampled 2**k times (DZI level max_level - k), over a
        window of that level's pixels: zarr level k when the pyramid has it, else block means of the
        coarsest finer one (strided beyond MAX_SOURCE_SIDE, see the module docstring)."""
        src = min(k, len(st.levels) - 1)
        f = 2 ** (k - src)  # remaining downsampling from zarr level src
        s = 1  # stride: keep the source read within MAX_SOURCE_SIDE per side
        while s < f and max(y1 - y0, x1 - x0) * f // s > MAX_SOURCE_SIDE:
            s *= 2
        sh, sw = st.levels[src]
        arr = st.store.level(src)
        ry0, ry1 = y0 * f, min(y1 * f, sh)
        rx0, rx1 = x0 * f, min(x1 * f, sw)
        out = np.zeros((3, y1 - y0, x1 - x0), dtype=np.uint8)
        if ry1 <= ry0 or rx1 <= rx0:
            return out
        try:
            region = np.asarray(arr[:, ry0:ry1:s, rx0:rx1:s])
        except Exception as e:  # zarr / codec / storage errors: name the tile, keep the server up
            what = what or f"window {y0}:{y1},{x0}:{x1} of level -{k}"
            raise TileReadError(
                f"cannot read {what} (zarr level {src}): {type(e).__name__}: {first_line(e)}; "
                f"a corrupt chunk? check the store with `render.py verify {self.url}`"
            ) from e
        small = block_mean(region, f // s)
        out[:, : small.shape[1], : small.shape[2]] = small[:, : y1 - y0, : x1 - x0]
        return out


def usable_levels(store: ImageStore) -> list[tuple[int, int]]:
    """(h, w) of the zarr levels to read tiles from: 0, then pyramid levels 1, 2, ...

    A pyramid level counts once it is listed in the OME ``multiscales``
    metadata (written when the pyramid is done) and, while renderer.pyramid's
    progress file exists, once that file says all its rows are written; so a
    half-built level (first build or a resumed one) is never shown as black.
    A stale progress record (level-0 tiles were re-rendered since the levels
    were averaged, see renderer.pyramid) serves level 0 and the levels the
    render writes with its tiles (1..L, ``render_levels``: always those of the
    tiles there are) only, until `render.py assemble` rebuilds the rest.
    Without OME metadata every contiguous level with a plausible shape (within
    a pixel of H / 2**i) is used.
    """
    _, h0, w0 = store.level(0).shape
    progress = store.pyramid_progress()
    with_tiles = render_levels(store)
    stale = progress is not None and bool(progress.get("stale"))
    rows_done = progress.get("rows", {}) if progress is not None else None
    if rows_done is not None and not isinstance(rows_done, dict):
        rows_done = {}
    listed = store.ome_level_paths()
    levels = [(h0, w0)]
    i = 1
    while store.has_level(i) and (listed is None or str(i) in listed):
        _, h, w = store.level(i).shape
        if abs(h - h0 / 2**i) > 1 or abs(w - w0 / 2**i) > 1:
            break
        if i > with_tiles and (stale or (rows_done is not None and rows_done.get(str(i), 0) < h)):
            break
        levels.append((h, w))
        i += 1
    return levels


def _find(meta: dict, *keys: str) -> Any:
    """First value of any of ``keys`` in meta or in meta['spec'] (tolerant of missing keys)."""
    spec = meta.get("spec")
    for where in (meta, spec if isinstance(spec, dict) else {}):
        for k in keys:
            if where.get(k) is not None:
                return where[k]
    return None


def job_summary(meta: dict) -> dict[str, Any]:
    """The few job fields the page headlines; any may be None."""
    sha = _find(meta, "checkpoint_sha256")
    return {
        "checkpoint": _find(meta, "checkpoint"),
        "checkpoint_sha256": sha if isinstance(sha, str) else None,
        "seed": _find(meta, "seed"),
        "psi": _find(meta, "psi"),
        "status": meta.get("status") if isinstance(meta.get("status"), str) else None,
        "error": meta.get("error") if isinstance(meta.get("error"), str) else None,
    }
