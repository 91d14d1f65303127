"""The pixel stage on tiles: one resident generator renders tiles into the store.

A ``TileRenderer`` lives inside one worker (a Ray actor, or the in-process
pool of renderer.local).  It holds the generator, the job's latent and its
folded per-latent weights (prepared once for the job's precision), computes
line ranges for the line stage, and renders runs of tiles from the stored
line features.

How a run of tiles ``[start, stop)`` goes (``tiles``):

* **groups**: a whole block of tiles (or, when it is larger, consecutive tiles
  of one plan row) forms one rectangle, rendered by one pixel-stage call of up
  to ``call_pixels`` pixels (2^18 on a CPU, 2^20 on a GPU): small tiles waste
  no padded pixel blocks and a GPU gets enough pixels per call.  A rectangle is exact whatever its size (any window
  of the canvas equals the crop of the full frame, docs/exactness.md), so
  grouping does not change a byte.  A tile larger than ``call_pixels`` is
  rendered in bands of whole rows and assembled on the host.
* **overlap**: each group's output goes to a bounded ``WritePipeline`` (NaN
  check, uint8, crc32, compression and write on writer threads) while the
  next group computes.  On CUDA the uint8 conversion and the finite check run
  on the device, the copy to pinned host memory is non_blocking on a side
  stream, and a writer thread waits for that copy's event alone: the compute
  stream never waits for the host.
* **marker last**: the run's marker is written after every chunk of the run
  (``WriteBatch.drain``), so a tile with a marker is complete whatever was
  killed when.
* **levels with the tiles**: a job planned in blocks of G x G tiles
  (``RenderContext.block``) that writes pyramid levels 1..L
  (``RenderContext.levels``) has every task cover whole blocks; each block's
  level-0 pixels are gathered in host memory as its tiles are written, and the
  writer thread that writes its last tile averages and writes the block's
  chunks of levels 1..L (renderer.pyramid.write_block_levels; a block owns
  whole chunks of each of those levels, so no two workers share one) -- all
  before the run's marker (renderer.markers: one record per tile, its crc32).
* **lines**: the job's whole line arrays are read once into host memory when
  they fit ``LINE_CACHE_BYTES`` (256 MiB on a CPU, 2 GiB pinned on CUDA; laid
  out position-major so a group's slice is one contiguous block); each group
  copies only its own rows and columns to the device.  Larger arrays are read
  per group from the store.

Memory per renderer: the line cache (at most ``LINE_CACHE_BYTES``), one
pixel-stage call (its lines, output and blocks: ~1 GB for ffhq512 on a GPU,
~60 MB on a CPU), at most ``depth`` groups waiting for their writes
(12 bytes per pixel on a CPU, 3 on a GPU) and, with levels, the level-0
pixels of the blocks being rendered (one or two per render thread: 3 bytes
per pixel, 12 MB for a 2048² block).  Only small metadata is returned.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import resource
import socket
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

import creps
from creps.latent import finite_uint8, non_finite, prepare_latent

from . import fsio
from .errors import RendererError
from .markers import tile_crc, tile_marker
from .pipeline import WriteBatch, WritePipeline
from .pyramid import write_block_levels
from .store import ImageStore, open_store
from .tasks import LineResult, RenderContext, Tile, TilePlan, TileResult

CALL_PIXELS = {"cpu": 1 << 18, "cuda": 1 << 20}  # pixels per pixel-stage call (a group of tiles)
# Whole line arrays kept in host memory up to this size (both axes): on a CPU every worker holds its own,
# and reading a group's lines from the store costs ~0.4 % of its compute there; on a GPU the store reads
# would cost more than the compute (18 MB per 2^20 pixels of ffhq512), so the budget is larger.
LINE_CACHE_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30}


# ---------------------------------------------------------------- helpers
def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def tile_groups(plan: TilePlan, start: int, stop: int, max_pixels: int) -> Iterator[list[Tile]]:
    """Tiles [start, stop) as groups that are one rectangle each, at most ``max_pixels`` together:
    a whole block of a block plan when it fits (tile-row-major inside, so ``group[0]`` is its top
    left tile), else consecutive tiles of one plan row; a tile larger than that is a group of its own."""
    if plan.block == 1:
        yield from _row_groups(plan, start, stop, max_pixels)
        return
    k = start
    while k < stop:
        b = plan.block_of(k)
        a, z = plan.block_range(b)
        r0, r1, c0, c1 = plan.block_rect(b)
        end = min(z, stop)
        if a == k and z <= stop and (r1 - r0) * (c1 - c0) <= max_pixels:
            yield plan.tiles(a, z)
        else:
            yield from _row_groups(plan, k, end, max_pixels)
        k = end


def _row_groups(plan: TilePlan, start: int, stop: int, max_pixels: int) -> Iterator[list[Tile]]:
    group: list[Tile] = []
    pixels = 0
    for t in plan.tiles(start, stop):
        if group and (t.r0 != group[0].r0 or t.c0 != group[-1].c1 or pixels + t.pixels > max_pixels):
            yield group
            group, pixels = [], 0
        group.append(t)
        pixels += t.pixels
    if group:
        yield group


def group_rect(group: list[Tile]) -> tuple[int, int, int, int]:
    """(r0, r1, c0, c1) of a group of tiles (``tile_groups``: one rectangle, its top left tile first)."""
    return group[0].r0, max(t.r1 for t in group), group[0].c0, max(t.c1 for t in group)


def _tile_flags(img: torch.Tensor, group: list[Tile]) -> torch.Tensor:
    """bool [len(group)]: whether each tile of a group's output [1, 3, h, w] is finite everywhere."""
    finite = torch.isfinite(img[0]).all(dim=0)  # [h, w]
    r0, _, c0, _ = group_rect(group)
    if len(group) == 1:
        return finite.all().reshape(1)
    return torch.stack([finite[t.r0 - r0 : t.r1 - r0, t.c0 - c0 : t.c1 - c0].all() for t in group])


class _BlockLevels:
    """One block's level-0 pixels, gathered tile by tile by the writer threads.

    The thread that adds the last tile writes the block's levels 1..L
    (renderer.pyramid.write_block_levels: the block starts at an even row and
    column of every level it averages, so its pixels are exactly the whole
    image's).
    """

    def __init__(self, store: ImageStore, rect: tuple[int, int, int, int], tiles: int, levels: int) -> None:
        self.store, self.levels = store, levels
        self.r0, r1, self.c0, c1 = rect
        self.pixels: np.ndarray | None = np.empty((3, r1 - self.r0, c1 - self.c0), dtype=np.uint8)
        self.left = tiles
        self._lock = threading.Lock()

    def add(self, tile: Tile, data: np.ndarray) -> None:
        assert self.pixels is not None
        self.pixels[:, tile.r0 - self.r0 : tile.r1 - self.r0, tile.c0 - self.c0 : tile.c1 - self.c0] = data
        with self._lock:
            self.left -= 1
            last = self.left == 0
        if last:
            img, self.pixels = self.pixels, None
            write_block_levels(self.store, img, self.r0, self.c0, self.levels)


def _non_finite(name: str) -> RendererError:
    return RendererError(non_finite(name))


Fetch = Callable[[], tuple[np.ndarray, np.ndarray]]  # -> (uint8 [3, h, w], finite per tile of the group)


# ---------------------------------------------------------------- renderer
class TileRenderer:
    """One resident generator bound to one job's latent, precision and store.

    Several threads may call ``tiles`` at once (the CPU lanes of the in-process
    pool share one renderer, its weights and its line cache).
    """

    def __init__(
        self,
        G: creps.Generator,
        ctx: RenderContext,
        device: str = "cpu",
        writers: int | None = None,
        depth: int | None = None,
    ) -> None:
        self.G, self.ctx, self.device = G, ctx, device
        self.canvas = ctx.canvas
        io0 = fsio.io_counts()
        self.cuda = torch.device(device).type == "cuda"
        self.call_pixels = CALL_PIXELS["cuda" if self.cuda else "cpu"]
        self.pixel_block = creps.default_pixel_block(device)
        # a copy: botocore rewrites nested config dicts, and ctx must stay equal to the next task's
        self.store: ImageStore = open_store(ctx.url, copy.deepcopy(ctx.storage_options) or None, mode="a")
        self.store.cache_arrays = True  # this job's arrays stay as they are while it renders
        self._io_mark = io0  # opening the store is reported with the first task's requests
        self.latent = prepare_latent(G, ctx.seed, ctx.psi, ctx.precision, device)
        cpus = os.cpu_count() or 1
        self.writers = writers or (max(2, min(8, cpus // 2)) if self.cuda else 2)
        self.depth = depth or 2 * self.writers
        self._pipeline: WritePipeline | None = None
        self._copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self._lines: dict[str, torch.Tensor] | None = None  # which -> [L, K, rank, C] on the host
        self._lock = threading.Lock()

    # ------------------------------------------------------------ line stage
    def lines(self, which: str, start: int, stop: int) -> LineResult:
        """Compute and store line features of positions [start, stop) (``which`` = row | col)."""
        t0 = time.perf_counter()
        coords = self.canvas.row_coords() if which == "row" else self.canvas.col_coords()
        with torch.no_grad():
            feats = self.G.lines(
                self.latent.ws, coords.to(self.device), which, start, stop, weights=self.latent.line_weights
            )
        self.store.write_lines(which, start, feats[0].detach().to("cpu", torch.float32).numpy())
        requests, objects = self._io_since_last()
        return LineResult(which, start, stop, time.perf_counter() - t0, peak_rss_mb(), requests, objects)

    def _io_since_last(self) -> tuple[int, int]:
        """(requests, objects written) since the previous task ended (or the store was opened)."""
        now = fsio.io_counts()
        requests, objects = (b - a for a, b in zip(self._io_mark, now, strict=True))
        self._io_mark = now
        return requests, objects

    def _line_cache(self) -> dict[str, torch.Tensor] | None:
        """The job's whole line arrays, position-major, read once (None when too large or not complete)."""
        with self._lock:
            if self._lines is None:
                size = sum(4 * int(np.prod(self.store.line_array(w).shape)) for w in ("row", "col"))
                if size > LINE_CACHE_BYTES["cuda" if self.cuda else "cpu"]:
                    self._lines = {}  # too large: read per group, for good
                elif self.store.lines_complete():  # else not yet: ask again next time
                    self._lines = {w: self._host_lines(w) for w in ("row", "col")}
            return self._lines or None

    def _host_lines(self, which: str) -> torch.Tensor:
        """One stored line array [K, L, rank, C] as [L, K, rank, C], read in slabs of its chunks
        (so reading costs one slab beyond the cache itself)."""
        arr = self.store.line_array(which)
        K, L, rank, C = (int(v) for v in arr.shape)
        host = torch.empty((L, K, rank, C), dtype=torch.float32, pin_memory=self.cuda)
        step = int(arr.chunks[1])
        for a in range(0, L, step):
            slab = np.asarray(arr[:, a : a + step])  # [K, n, rank, C]
            host[a : a + slab.shape[1]] = torch.from_numpy(slab).permute(1, 0, 2, 3)
        return host

    def _line_slice(self, which: str, start: int, stop: int) -> torch.Tensor:
        """Line features [1, K, stop-start, rank, C] on the device, exactly as stored."""
        cache = self._line_cache()
        if cache is None:
            return torch.from_numpy(self.store.read_lines(which, start, stop)).unsqueeze(0).to(self.device)
        part = cache[which][start:stop].to(self.device, non_blocking=True)  # one contiguous block
        return part.permute(1, 0, 2, 3).unsqueeze(0)

    # ------------------------------------------------------------ pixel stage
    def _pixels(self, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        """Float image [1, 3, r1-r0, c1-c0] of a window, on the device (not synchronised)."""
        R = self._line_slice("row", r0, r1)
        C = self._line_slice("col", c0, c1)
        with torch.no_grad():
            return self.G.pixels(
                self.latent.ws,
                R,
                C,
                pixel_block=self.pixel_block,
                weights=self.latent.pixel_weights,
                precision=self.ctx.precision,
            )

    def render_tile(self, r0: int, r1: int, c0: int, c1: int, name: str | None = None) -> np.ndarray:
        """uint8 (3, r1-r0, c1-c0) of the canvas from the stored lines, synchronously.

        RendererError (naming the tile: ``name``, else its rows and columns)
        when the pixel stage gives NaN or inf: broken weights must fail the
        tile, not turn into a black one that is marked done.
        """
        what = name or f"rows {r0}:{r1} cols {c0}:{c1}"
        out = np.empty((3, r1 - r0, c1 - c0), dtype=np.uint8)
        band = max(1, self.call_pixels // max(1, c1 - c0))
        for a in range(r0, r1, band):
            b = min(r1, a + band)
            out[:, a - r0 : b - r0] = finite_uint8(self._pixels(a, b, c0, c1), what, RendererError)
        return out

    def _stage(self, img: torch.Tensor, group: list[Tile]) -> Fetch:
        """Start moving a group's output to the host; the writer thread calls the result.

        CPU: nothing to move; the conversion runs in the writer thread.  CUDA:
        uint8 and per-tile finite flags computed on the device, copied to
        pinned memory on the side stream after an event, waited for by the
        writer alone.
        """
        if not self.cuda:

            def fetch_cpu() -> tuple[np.ndarray, np.ndarray]:
                return creps.to_uint8(img)[0].numpy(), _tile_flags(img, group).numpy()

            return fetch_cpu
        u8 = creps.to_uint8(img)[0].contiguous()  # (3, h, w) as the store wants it, made on the compute stream
        finite = _tile_flags(img, group)
        stream = self._copy_stream
        assert stream is not None
        ready = torch.cuda.Event()
        ready.record()
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            host_u8 = torch.empty(u8.shape, dtype=torch.uint8, pin_memory=True)
            host_ok = torch.empty(finite.shape, dtype=torch.bool, pin_memory=True)
            host_u8.copy_(u8, non_blocking=True)
            host_ok.copy_(finite, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        u8.record_stream(stream)  # keep the caching allocator off these until the copy is done
        finite.record_stream(stream)

        def fetch_cuda() -> tuple[np.ndarray, np.ndarray]:
            copied.synchronize()
            return host_u8.numpy(), host_ok.numpy()

        return fetch_cuda

    def _write_group(
        self, group: list[Tile], fetch: Fetch, t0: float, blocks: dict[int, _BlockLevels]
    ) -> list[TileResult]:
        """Writer thread: check a group, write its chunks in one store call, crc32 each tile (no marker).

        One ``write_chunks`` for the whole group (its tiles are whole chunks or
        shards making one rectangle): on a local store each chunk is encoded and stored
        directly, elsewhere one zarr call serves the group.
        """
        u8, finite = fetch()
        for t, ok in zip(group, finite, strict=True):  # all checked before anything is written
            if not bool(ok):
                raise _non_finite(t.id)
        r0, _, c0, _ = group_rect(group)
        self.store.write_chunks(0, r0, c0, u8)
        seconds = round((time.perf_counter() - t0) / len(group), 4)
        results = []
        for t in group:
            data = np.ascontiguousarray(u8[:, t.r0 - r0 : t.r1 - r0, t.c0 - c0 : t.c1 - c0])
            results.append(self._result(t, data, seconds))
            self._add_to_block(t, data, blocks)
        return results

    def _write_tile(self, tile: Tile, data: np.ndarray, t0: float, blocks: dict[int, _BlockLevels]) -> list[TileResult]:
        self.store.write_chunks(0, tile.r0, tile.c0, data)
        result = self._result(tile, data, round(time.perf_counter() - t0, 4))
        self._add_to_block(tile, data, blocks)
        return [result]

    def _add_to_block(self, tile: Tile, data: np.ndarray, blocks: dict[int, _BlockLevels]) -> None:
        if self.ctx.levels:
            blocks[self.ctx.plan.block_at(tile.r0, tile.c0)].add(tile, data)

    def _blocks(self, start: int, stop: int) -> dict[int, _BlockLevels]:
        """The blocks of tiles [start, stop), which must be whole blocks when the job writes levels."""
        if not self.ctx.levels:
            return {}
        plan = self.ctx.plan
        blocks: dict[int, _BlockLevels] = {}
        for b in range(plan.block_of(start), plan.block_of(stop - 1) + 1):
            a, z = plan.block_range(b)
            if a < start or z > stop:
                raise RendererError(
                    f"tiles {start}:{stop} do not cover whole blocks of {plan.block}x{plan.block} tiles; "
                    "a job that writes pyramid levels sends whole blocks"
                )
            blocks[b] = _BlockLevels(self.store, plan.block_rect(b), z - a, self.ctx.levels)
        return blocks

    @staticmethod
    def _result(t: Tile, data: np.ndarray, seconds: float) -> TileResult:
        """The tile's record: ``data`` is its (3, h, w) uint8 pixels, C-ordered, as the crc32 covers them."""
        return TileResult(
            id=t.id,
            rows=(t.r0, t.r1),
            cols=(t.c0, t.c1),
            crc32=tile_crc(data),
            seconds=seconds,
            pid=os.getpid(),
            host=socket.gethostname(),
            peak_rss_mb=peak_rss_mb(),
        )

    def _writer(self) -> WritePipeline:
        with self._lock:
            if self._pipeline is None:
                self._pipeline = WritePipeline(self.writers, self.depth)
            return self._pipeline

    def tiles(self, start: int, stop: int) -> list[TileResult]:
        """Render tiles [start, stop) of the job's plan, write them (and their blocks' levels 1..L),
        then mark them done with one marker."""
        blocks = self._blocks(start, stop)  # with levels: filled by the writers, levels written by the last
        batch: WriteBatch[list[TileResult]] = self._writer().batch()
        try:
            for group in tile_groups(self.ctx.plan, start, stop, self.call_pixels):
                t0 = time.perf_counter()
                if len(group) == 1 and group[0].pixels > self.call_pixels:  # a big tile: bands, then one write
                    t = group[0]
                    data = self.render_tile(t.r0, t.r1, t.c0, t.c1, name=t.id)
                    batch.submit(functools.partial(self._write_tile, t, data, t0, blocks))
                    continue
                img = self._pixels(*group_rect(group))
                fetch = self._stage(img, group)
                batch.submit(functools.partial(self._write_group, group, fetch, t0, blocks))
            results = [r for part in batch.drain() for r in part]
        except BaseException:
            batch.discard()
            raise
        self.store.mark_tiles(start, stop, [tile_marker(r) for r in results])
        requests, objects = self._io_since_last()
        results[-1] = dataclasses.replace(results[-1], requests=requests, objects_written=objects)
        return results

    def close(self) -> None:
        """Stop the writer threads (after what is queued)."""
        with self._lock:
            pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            pipeline.close()
