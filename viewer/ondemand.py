"""Tiles of a CREPS image computed when, and only when, someone looks at them.

A CREPS pixel depends only on (latent, row coordinate, column coordinate), so
any DeepZoom tile of any level can be rendered on its own:

* **What a tile is.** DZI level ``L`` of a ``W x H`` image (``k = max_level -
  L``) is the canvas ``Canvas(ceil(H / 2**k), ceil(W / 2**k))`` over the *same*
  coordinate window ``view``: the generator evaluated on a 2**k times coarser
  grid, not an average of the finer level (docs/viewer.md shows the
  difference). Axis warps (``creps.warp``) map coordinates, not pixel
  indices, so every level's canvas carries the same warp text and shows the
  same warped image. At ``k = 0`` this is exactly the canvas of ``render.py
  render`` with the same size, view and warps, so a full-resolution tile has
  exactly the bytes a render job writes there (docs/exactness.md: any window
  of a canvas is bit-identical to the same crop of the full frame, for one
  pixel block and one precision).
* **Lines on demand.** A tile needs the line features of its rows and of its
  columns. They are computed in the generator's globally aligned blocks of
  ``LINE_BLOCK`` positions (``G.lines`` on the level's global coordinate
  vector), one block at a time, and kept in an LRU keyed by (level, row|col,
  block index), optionally backed by a persistent store: neighbouring tiles
  share blocks, and a 2**20-long axis is never computed whole (its coordinate
  vector, 4 MiB, is).

``TileMaker`` is the unit of work: one resident generator bound to one
``ImageSpec``. The viewer runs it in this process (``viewer.endless``) or
inside Ray actors, one per worker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

import creps
import creps.lanes
from creps import LINE_BLOCK
from creps.latent import finite_uint8, prepare_latent
from creps.precision import PRECISIONS, precision_identity
from renderer.dzi import max_level, tile_bounds, tile_grid

from .errors import ViewerError
from .tiles import encode

CACHE_FORMAT = 1  # bump when the bytes of a tile for the same ImageSpec change (it enters the cache key)
LINE_CACHE_BYTES = 256 << 20  # default in-memory line LRU bound per TileMaker


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """Everything that decides the pixels of an on-demand image (and so its cache key).

    ``checkpoint_sha256`` stands for the weights (``creps.checkpoint_hash``:
    the file's sha256, or ``preset:NAME@init<seed>``); ``checkpoint`` and
    ``init_seed`` say how to load them. ``pixel_block`` is the pixel-stage
    block size: two block sizes agree to float tolerance only
    (docs/exactness.md), so it is part of the identity like the latent.
    ``precision`` is the pixel stage's (``creps.precision``) and
    ``warp_rows`` / ``warp_cols`` are ``creps.warp`` text (kept canonical);
    they enter the identity only when not the default, so caches made before
    they existed keep their keys.
    """

    checkpoint: str
    checkpoint_sha256: str
    init_seed: int
    seed: int
    psi: float
    height: int
    width: int
    view: tuple[float, float, float, float]  # y0, y1, x0, x1
    pixel_block: int
    precision: str = "fp32"
    warp_rows: str = ""
    warp_cols: str = ""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ViewerError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        try:
            canvas = creps.Canvas(
                self.height,
                self.width,
                y=self.view[:2],
                x=self.view[2:],
                warp_rows=self.warp_rows,
                warp_cols=self.warp_cols,
            )
        except ValueError as e:
            raise ViewerError(str(e)) from None
        object.__setattr__(self, "warp_rows", canvas.warp_rows)  # canonical: "mirror" and "mirror:0.5" are one key
        object.__setattr__(self, "warp_cols", canvas.warp_cols)

    @property
    def top(self) -> int:
        """The full-resolution DZI level."""
        return max_level(self.width, self.height)

    def identity(self) -> dict:
        """The fields that decide the bytes, as JSON values (``checkpoint`` enters by hash only)."""
        return {
            "format": CACHE_FORMAT,
            "checkpoint_sha256": self.checkpoint_sha256,
            "seed": self.seed,
            "psi": self.psi,
            "height": self.height,
            "width": self.width,
            "view": list(self.view),
            "pixel_block": self.pixel_block,
            **(precision_identity(self.precision) if self.precision != "fp32" else {}),
            **{k: getattr(self, k) for k in ("warp_rows", "warp_cols") if getattr(self, k)},
        }

    @property
    def key(self) -> str:
        """A short stable name of the identity (the image's folder in the tile cache)."""
        blob = json.dumps(self.identity(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    def level_canvas(self, level: int) -> creps.Canvas:
        """The canvas DZI level ``level`` is rendered on: ceil(H / 2**k) x ceil(W / 2**k), same window.

        The warps are the same text on every level: they map coordinates (the
        window's, on a coarser grid), not pixel indices, so a level shows the
        same warped image and the top level is the render job's canvas.
        """
        k = self.top - level
        y0, y1, x0, x1 = self.view
        return creps.Canvas(
            -(-self.height // 2**k),
            -(-self.width // 2**k),
            y=(y0, y1),
            x=(x0, x1),
            warp_rows=self.warp_rows,
            warp_cols=self.warp_cols,
        )

    def check_tile(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of a tile in its level's pixels; ViewerError if there is no such tile.

        Called before any work is queued, so a bad request costs nothing.
        """
        if not 0 <= level <= self.top:
            raise ViewerError(f"no DZI level {level} (0..{self.top})")
        ncols, nrows = tile_grid(self.width, self.height, level)
        if not (0 <= col < ncols and 0 <= row < nrows):
            raise ViewerError(f"no tile {col}_{row} at level {level} ({ncols}x{nrows} tiles)")
        return tile_bounds(self.width, self.height, level, col, row)


class BlobStore(Protocol):
    """Where line blocks persist between runs (the viewer's tile cache implements it)."""

    def get(self, rel: str) -> bytes | None: ...

    def put(self, rel: str, data: bytes) -> None: ...


def line_path(level: int, which: str, block: int) -> str:
    """Name of one line block inside an image's cache folder."""
    return f"lines/{level}/{which}/{block}.npy"


class LineCache:
    """Line blocks [1, K, n <= LINE_BLOCK, rank, C] by (level, which, block), LRU-bounded by bytes.

    Concurrent requests for one block compute it once (the others wait for
    it). ``store``, when given, is read before computing and written after.
    """

    def __init__(self, max_bytes: int = LINE_CACHE_BYTES, store: BlobStore | None = None) -> None:
        self.max_bytes = max_bytes
        self.store = store
        self.bytes = 0
        self.computed = 0  # blocks computed by the generator
        self.loaded = 0  # blocks read from the store
        self._lru: OrderedDict[tuple[int, str, int], torch.Tensor] = OrderedDict()
        self._busy: dict[tuple[int, str, int], threading.Event] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, key: tuple[int, str, int]) -> bool:
        """Whether block ``key`` is in memory now (the LRU order is left alone)."""
        with self._lock:
            return key in self._lru

    def block(self, key: tuple[int, str, int], compute: Callable[[], torch.Tensor], device: str) -> torch.Tensor:
        """The block ``key`` from memory, else from the store, else ``compute()`` (then kept)."""
        while True:
            with self._lock:
                hit = self._lru.get(key)
                if hit is not None:
                    self._lru.move_to_end(key)
                    return hit
                wait = self._busy.get(key)
                if wait is None:
                    self._busy[key] = threading.Event()
                    break
            wait.wait()  # another thread is making this block; then take it from memory
        try:
            feats = self._load(key, device)
            loaded = feats is not None
            if feats is None:
                feats = compute()
                if self.store is not None:
                    self.store.put(line_path(*key), encode_lines(feats))
            with self._lock:
                if loaded:
                    self.loaded += 1
                else:
                    self.computed += 1
                self._lru[key] = feats
                self.bytes += feats.numel() * feats.element_size()
                while self.bytes > self.max_bytes and len(self._lru) > 1:
                    _, old = self._lru.popitem(last=False)
                    self.bytes -= old.numel() * old.element_size()
            return feats
        finally:
            with self._lock:
                self._busy.pop(key).set()

    def _load(self, key: tuple[int, str, int], device: str) -> torch.Tensor | None:
        if self.store is None:
            return None
        data = self.store.get(line_path(*key))
        if data is None:
            return None
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError):
            return None  # a damaged file: compute the block again (and overwrite it)
        return torch.from_numpy(arr).unsqueeze(0).to(device)


def encode_lines(feats: torch.Tensor) -> bytes:
    """A line block [1, K, n, rank, C] as .npy bytes (float32, exact)."""
    buf = io.BytesIO()
    np.save(buf, feats[0].detach().to("cpu", torch.float32).numpy(), allow_pickle=False)
    return buf.getvalue()


class TileMaker:
    """One resident generator bound to one image: line blocks on demand and tile pixels.

    Thread-safe: several threads may render tiles at once (the generator is
    read-only, the line cache locks). Runs in the viewer's process or inside
    a Ray actor (``viewer.endless.RayEngine``).

    A tile's missing line blocks (rows and columns) and then its pixel blocks
    are spread over ``lanes`` single-threaded lanes (``creps.lanes``; default
    the torch thread count when made: 1 in a one-CPU Ray actor), so one tile
    takes every core the engine has; concurrent tiles share the same lanes.
    """

    def __init__(
        self,
        G: creps.Generator,
        spec: ImageSpec,
        device: str = "cpu",
        store: BlobStore | None = None,
        line_cache_bytes: int = LINE_CACHE_BYTES,
        lanes: int | None = None,
    ) -> None:
        self.G, self.spec, self.device = G, spec, device
        self.lanes = creps.lanes.resolve(device, lanes)
        self.lines = LineCache(line_cache_bytes, store)
        self._coords: dict[tuple[int, str], torch.Tensor] = {}
        self._coords_lock = threading.Lock()
        # as the render job's workers prepare it (renderer.tiles.TileRenderer): same latent, same weights, same bytes
        self.latent = prepare_latent(G, spec.seed, spec.psi, spec.precision, device)

    def coords(self, level: int, which: str) -> torch.Tensor:
        """The level's global row or column coordinate vector (Canvas.row_coords / col_coords), kept."""
        with self._coords_lock:
            got = self._coords.get((level, which))
            if got is None:
                canvas = self.spec.level_canvas(level)
                got = (canvas.row_coords() if which == "row" else canvas.col_coords()).to(self.device)
                self._coords[(level, which)] = got
            return got

    def line_block(self, level: int, which: str, b: int) -> torch.Tensor:
        """Line block ``b`` ([1, K, <= LINE_BLOCK, rank, C]) of the level's rows or columns, via the LRU."""
        coords = self.coords(level, which)
        b0, b1 = b * LINE_BLOCK, min(coords.shape[0], (b + 1) * LINE_BLOCK)

        def compute() -> torch.Tensor:
            with torch.no_grad():
                return self.G.lines(self.latent.ws, coords, which, b0, b1, weights=self.latent.line_weights)

        return self.lines.block((level, which, b), compute, self.device)

    def line_range(self, level: int, which: str, start: int, stop: int) -> torch.Tensor:
        """Line features [1, K, stop-start, rank, C] of positions [start, stop), from whole blocks."""
        parts = []
        for b in range(start // LINE_BLOCK, (stop - 1) // LINE_BLOCK + 1):
            feats = self.line_block(level, which, b)
            b0 = b * LINE_BLOCK
            parts.append(feats[:, :, max(start, b0) - b0 : min(stop, b0 + feats.shape[2]) - b0])
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    def pixels(self, level: int, col: int, row: int) -> np.ndarray:
        """uint8 (3, h, w) of one DZI tile (overlap included), exactly as a render writes them."""
        y0, y1, x0, x1 = self.spec.check_tile(level, col, row)
        return self.window(level, y0, y1, x0, x1, what=f"{level}/{col}_{row}")

    def window(self, level: int, y0: int, y1: int, x0: int, x1: int, what: str = "") -> np.ndarray:
        """uint8 (3, y1-y0, x1-x0) of any window of DZI level ``level``'s canvas.

        The same lines and pixel blocks as a tile, so a window is exactly the
        tiles it covers (at the top level: exactly the render job's pixels);
        the IIIF service reads its regions through it.
        """
        canvas = self.spec.level_canvas(level)
        if not (0 <= level <= self.spec.top and 0 <= y0 < y1 <= canvas.height and 0 <= x0 < x1 <= canvas.width):
            raise ViewerError(f"window [{y0}, {y1}) x [{x0}, {x1}) is not inside DZI level {level}")
        # The blocks not in memory, rows and columns alike, computed side by side on the lanes.
        need = [
            (level, which, b)
            for which, a, z in (("row", y0, y1), ("col", x0, x1))
            for b in range(a // LINE_BLOCK, (z - 1) // LINE_BLOCK + 1)
        ]
        creps.lanes.run([k for k in need if k not in self.lines], lambda _, k: self.line_block(*k), self.lanes)
        R = self.line_range(level, "row", y0, y1)
        C = self.line_range(level, "col", x0, x1)
        return self._uint8(R, C, what or f"window {level}/{y0}:{y1},{x0}:{x1}")

    def canvas_pixels(self, canvas: creps.Canvas) -> np.ndarray:
        """uint8 (3, H, W) of a whole free ``canvas`` (any sampling of this image's coordinate plane).

        Its lines are computed here and not kept: such a canvas (the IIIF
        service's ``^`` upscaled regions, ``creps.scaling.window_canvas``)
        shares no grid with the DZI levels.
        """
        coords = {"row": canvas.row_coords().to(self.device), "col": canvas.col_coords().to(self.device)}

        def lines(which: str, a: int, b: int) -> torch.Tensor:
            return self.G.lines(self.latent.ws, coords[which], which, a, b, weights=self.latent.line_weights)

        with torch.no_grad():
            R, C = creps.lanes.window_lines(lines, (0, canvas.height), (0, canvas.width), LINE_BLOCK, self.lanes)
        return self._uint8(R, C, f"canvas {canvas.height}x{canvas.width}")

    def _uint8(self, R: torch.Tensor, C: torch.Tensor, what: str) -> np.ndarray:
        """The pixel stage on row and column lines, as uint8 (3, h, w)."""
        with torch.no_grad():
            img = self.G.pixels(
                self.latent.ws,
                R,
                C,
                pixel_block=self.spec.pixel_block,
                weights=self.latent.pixel_weights,
                precision=self.spec.precision,
                lanes=self.lanes,
            )
            return finite_uint8(img, what, ViewerError)

    def tile(self, level: int, col: int, row: int, fmt: str, quality: int) -> tuple[bytes, float]:
        """(encoded tile, seconds spent on it)."""
        t0 = time.perf_counter()
        data = encode(self.pixels(level, col, row), fmt, quality)
        return data, time.perf_counter() - t0
