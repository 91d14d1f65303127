"""The pixel stage on tiles: one resident generator renders tiles into the store.

A ``TileRenderer`` lives inside one worker (a Ray actor, or the test process).
It holds the generator, the job's latent and its folded per-latent weights,
computes line ranges for the line stage, and renders tiles from slices of the
stored line arrays: pixel stage -> uint8 -> ``store.write_region`` -> marker.
The marker is written only after the tile's data, so a tile with a marker is
complete whatever was killed when.  Only small metadata is returned.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import resource
import socket
import time
import zlib

import numpy as np
import torch

import creps

from . import fsio
from . import lines as line_store
from .errors import RendererError
from .store import ImageStore, open_store
from .tasks import LineResult, Tile, TilePlan, TileResult


@dataclasses.dataclass(frozen=True)
class RenderContext:
    """Everything a worker needs about a job (plain values, cheap to ship to Ray)."""

    url: str
    storage_options: dict
    checkpoint: str
    init_seed: int
    seed: int
    psi: float
    height: int
    width: int
    view: tuple[float, float, float, float]  # y0, y1, x0, x1
    chunk: int  # level-0 chunk side; tiles are rendered chunk by chunk
    tile_side: int = 0  # side of a plan tile (a chunk, or a shard when sharded); 0 = chunk
    warp_rows: str = ""  # creps.warp text of the row / column coordinates ("" = none)
    warp_cols: str = ""

    @property
    def plan(self) -> TilePlan:
        return TilePlan(self.height, self.width, self.tile_side or self.chunk)

    @property
    def canvas(self) -> creps.Canvas:
        y0, y1, x0, x1 = self.view
        return creps.Canvas(
            self.height, self.width, y=(y0, y1), x=(x0, x1), warp_rows=self.warp_rows, warp_cols=self.warp_cols
        )


# ---------------------------------------------------------------- helpers
def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------- renderer
class TileRenderer:
    """One resident generator bound to one job's latent and store."""

    def __init__(self, G: creps.Generator, ctx: RenderContext, device: str = "cpu") -> None:
        self.G, self.ctx, self.device = G, ctx, device
        self.canvas = ctx.canvas
        io0 = fsio.io_counts()
        # a copy: botocore rewrites nested config dicts, and ctx must stay equal to the next task's
        self.store: ImageStore = open_store(ctx.url, copy.deepcopy(ctx.storage_options) or None, mode="a")
        self.store.cache_arrays = True  # this job's arrays stay as they are while it renders
        self._io_mark = io0  # opening the store is reported with the first task's requests
        with torch.no_grad():
            z = G.z_from_seed(ctx.seed).to(device)
            self.ws = G.ws(z, ctx.psi)
            self._line_weights = G.line_weights(self.ws)
            self._pixel_weights = G.pixel_weights(self.ws)

    def lines(self, which: str, start: int, stop: int) -> LineResult:
        """Compute and store line features of positions [start, stop) (``which`` = row | col)."""
        t0 = time.perf_counter()
        coords = self.canvas.row_coords() if which == "row" else self.canvas.col_coords()
        with torch.no_grad():
            feats = self.G.lines(self.ws, coords.to(self.device), which, start, stop, weights=self._line_weights)
        line_store.write_lines(self.store, which, start, feats)
        requests, objects = self._io_since_last()
        return LineResult(which, start, stop, time.perf_counter() - t0, peak_rss_mb(), requests, objects)

    def _io_since_last(self) -> tuple[int, int]:
        """(requests, objects written) since the previous task ended (or the store was opened)."""
        now = fsio.io_counts()
        requests, objects = (b - a for a, b in zip(self._io_mark, now, strict=True))
        self._io_mark = now
        return requests, objects

    def render_tile(self, r0: int, r1: int, c0: int, c1: int, name: str | None = None) -> np.ndarray:
        """uint8 (3, r1-r0, c1-c0) of the canvas, chunk by chunk, from the stored lines.

        RendererError (naming the tile: ``name``, else its rows and columns)
        when the pixel stage gives NaN or inf: broken weights must fail the
        tile, not turn into a black one that is marked done.
        """
        R = line_store.read_lines(self.store, "row", r0, r1, self.device)
        C = line_store.read_lines(self.store, "col", c0, c1, self.device)
        out = np.empty((3, r1 - r0, c1 - c0), dtype=np.uint8)
        step = self.ctx.chunk
        with torch.no_grad():
            for a in range(0, r1 - r0, step):
                for b in range(0, c1 - c0, step):
                    img = self.G.pixels(
                        self.ws, R[:, :, a : a + step], C[:, :, b : b + step], weights=self._pixel_weights
                    )
                    if not bool(torch.isfinite(img).all()):
                        what = name or f"rows {r0}:{r1} cols {c0}:{c1}"
                        raise RendererError(f"tile {what}: non-finite output (NaN/inf): the weights are broken")
                    out[:, a : a + step, b : b + step] = creps.to_uint8(img)[0].cpu().numpy()
        return out

    def tile(self, tile: Tile) -> TileResult:
        """Render one tile and write it (the caller marks it done once its run of tiles is written)."""
        t0 = time.perf_counter()
        data = self.render_tile(tile.r0, tile.r1, tile.c0, tile.c1, name=tile.id)
        self.store.write_region(0, tile.r0, tile.c0, data)
        result = TileResult(
            id=tile.id,
            rows=(tile.r0, tile.r1),
            cols=(tile.c0, tile.c1),
            crc32=zlib.crc32(data.tobytes()),
            seconds=round(time.perf_counter() - t0, 4),
            pid=os.getpid(),
            host=socket.gethostname(),
        )
        return dataclasses.replace(result, peak_rss_mb=peak_rss_mb())

    def tiles(self, start: int, stop: int) -> list[TileResult]:
        """Render tiles [start, stop) of the job's plan, then mark them done with one marker."""
        results = [self.tile(t) for t in self.ctx.plan.tiles(start, stop)]
        self.store.mark_tiles(start, stop, [r.marker() for r in results])
        requests, objects = self._io_since_last()
        results[-1] = dataclasses.replace(results[-1], requests=requests, objects_written=objects)
        return results
