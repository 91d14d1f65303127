"""What the driver sends to a worker and what comes back: small frozen records.

Tasks are typed (a worker dispatches on the type, never on a method name) and
cheap to ship to Ray: pixels never travel, they go from the worker straight
into the store and only these records return.

The records sit at the bottom of renderer (they import nothing of it): the
plan of tiles, the ``RenderContext`` a job sends with each task, the tasks,
their results and the ``Pool`` protocol, so the store, the pixel stage, the
pools and the driver all name them without importing one another.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

import creps


@dataclass(frozen=True)
class Tile:
    """Rows [r0, r1) x columns [c0, c1) of level 0; ``id`` names its marker."""

    id: str
    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def pixels(self) -> int:
        return (self.r1 - self.r0) * (self.c1 - self.c0)


@dataclass(frozen=True)
class TilePlan:
    """The tiles of a canvas: squares of ``side`` pixels (edge tiles smaller), in blocks.

    Pure arithmetic, index -> rectangle, so a plan of any size costs nothing
    until a tile is asked for.  Tile (row i, column j) has the id ``r{i}_c{j}``.

    Order: blocks of ``block`` x ``block`` tiles (edge blocks smaller) in
    row-major order, the tiles of a block row-major inside it, so a block is
    one contiguous index range and one run of work (one marker): a worker that
    renders a whole block can write that block's coarser pyramid levels too
    (renderer.tiles).  ``block = 1`` is plain row-major order, the order of
    every store written before blocks existed.
    """

    height: int
    width: int
    side: int
    block: int = 1

    @property
    def rows(self) -> int:
        return -(-self.height // self.side)

    @property
    def cols(self) -> int:
        return -(-self.width // self.side)

    def __len__(self) -> int:
        return self.rows * self.cols

    # ------------------------------------------------------------ blocks
    @property
    def block_rows(self) -> int:
        return -(-self.rows // self.block)

    @property
    def block_cols(self) -> int:
        return -(-self.cols // self.block)

    @property
    def blocks(self) -> int:
        return self.block_rows * self.block_cols

    def _block_dims(self, bi: int, bj: int) -> tuple[int, int]:
        """(tile rows, tile columns) of block (bi, bj)."""
        g = self.block
        return min(g, self.rows - bi * g), min(g, self.cols - bj * g)

    def block_range(self, b: int) -> tuple[int, int]:
        """[start, stop) of the tile indices of block ``b`` (row-major over blocks)."""
        bi, bj = divmod(b, self.block_cols)
        gh, gw = self._block_dims(bi, bj)
        start = bi * self.block * self.cols + bj * gh * self.block
        return start, start + gh * gw

    def block_of(self, k: int) -> int:
        """The block holding tile index ``k``."""
        g = self.block
        bi = k // (g * self.cols)
        gh = min(g, self.rows - bi * g)
        return bi * self.block_cols + (k - bi * g * self.cols) // (gh * g)

    def block_at(self, y: int, x: int) -> int:
        """The block holding pixel (y, x)."""
        s = self.side * self.block
        return (y // s) * self.block_cols + x // s

    def block_rect(self, b: int) -> tuple[int, int, int, int]:
        """(r0, r1, c0, c1) in pixels of block ``b``."""
        bi, bj = divmod(b, self.block_cols)
        s = self.side * self.block
        return bi * s, min((bi + 1) * s, self.height), bj * s, min((bj + 1) * s, self.width)

    def _position(self, k: int) -> tuple[int, int]:
        """(tile row, tile column) of index ``k``."""
        g = self.block
        if g == 1:
            return divmod(k, self.cols)
        bi, rem = divmod(k, g * self.cols)
        gh = min(g, self.rows - bi * g)
        bj, rem = divmod(rem, gh * g)
        gw = min(g, self.cols - bj * g)
        i, j = divmod(rem, gw)
        return bi * g + i, bj * g + j

    def _index(self, i: int, j: int) -> int:
        g = self.block
        if g == 1:
            return i * self.cols + j
        bi, bj = i // g, j // g
        gh, gw = self._block_dims(bi, bj)
        return bi * g * self.cols + bj * gh * g + (i - bi * g) * gw + (j - bj * g)

    # ------------------------------------------------------------ tiles
    def tile(self, k: int) -> Tile:
        if not 0 <= k < len(self):
            raise IndexError(f"tile {k} outside 0..{len(self) - 1}")
        i, j = self._position(k)
        r0, c0 = i * self.side, j * self.side
        return Tile(f"r{i}_c{j}", r0, min(r0 + self.side, self.height), c0, min(c0 + self.side, self.width))

    def tiles(self, start: int = 0, stop: int | None = None) -> list[Tile]:
        return [self.tile(k) for k in range(start, len(self) if stop is None else stop)]

    def __iter__(self) -> Iterator[Tile]:
        return (self.tile(k) for k in range(len(self)))

    def index(self, tile_id: str) -> int | None:
        """Index of ``r{i}_c{j}`` in this plan, None for another name or a tile outside it."""
        m = _TILE_ID.fullmatch(tile_id)
        if m is None:
            return None
        i, j = int(m.group(1)), int(m.group(2))
        return self._index(i, j) if i < self.rows and j < self.cols else None

    def pixels(self, indices: np.ndarray) -> int:
        """Total pixels of the tiles at ``indices`` (vectorised: plans can be huge)."""
        i, j = self._positions(np.asarray(indices, dtype=np.int64))
        h = np.minimum(self.side, self.height - i * self.side)
        w = np.minimum(self.side, self.width - j * self.side)
        return int((h * w).sum())

    def _positions(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``_position`` over an index array."""
        g = self.block
        if g == 1:
            return np.divmod(k, self.cols)
        bi, rem = np.divmod(k, g * self.cols)
        gh = np.minimum(g, self.rows - bi * g)
        bj, rem = np.divmod(rem, gh * g)
        gw = np.minimum(g, self.cols - bj * g)
        i, j = np.divmod(rem, gw)
        return bi * g + i, bj * g + j

    def whole_blocks(self, indices: np.ndarray) -> np.ndarray:
        """Sorted indices of every tile in a block that any of ``indices`` is in."""
        if self.block == 1 or len(indices) == 0:
            return np.unique(np.asarray(indices, dtype=np.int64))
        parts = [np.arange(*self.block_range(b)) for b in np.unique([self.block_of(int(k)) for k in indices])]
        return np.concatenate(parts)


_TILE_ID = re.compile(r"r(\d+)_c(\d+)")


@dataclass(frozen=True)
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
    chunk: int  # level-0 chunk side
    tile_side: int = 0  # side of a plan tile (a chunk, or a shard when sharded); 0 = chunk
    warp_rows: str = ""  # creps.warp text of the row / column coordinates ("" = none)
    warp_cols: str = ""
    precision: str = "fp32"  # of the pixel stage (creps.precision); part of the job's identity
    block: int = 1  # plan tiles per block side (renderer.tasks.TilePlan)
    levels: int = 0  # pyramid levels 1..levels written with each block

    @property
    def plan(self) -> TilePlan:
        return TilePlan(self.height, self.width, self.tile_side or self.chunk, self.block)

    @property
    def canvas(self) -> creps.Canvas:
        y0, y1, x0, x1 = self.view
        return creps.Canvas(
            self.height, self.width, y=(y0, y1), x=(x0, x1), warp_rows=self.warp_rows, warp_cols=self.warp_cols
        )


@dataclass(frozen=True)
class LineTask:
    """Compute and store the line features of positions [start, stop) of ``which`` (row | col)."""

    which: str
    start: int
    stop: int

    @property
    def key(self) -> str:
        return f"lines {self.which} {self.start}:{self.stop}"


@dataclass(frozen=True)
class TileTask:
    """Render tiles [start, stop) of the job's plan, each written, then one marker for all."""

    start: int
    stop: int
    label: str = ""  # the tile ids, for messages ("r1_c1" or "r1_c1..r1_c4")

    @property
    def key(self) -> str:
        return self.label or f"tiles {self.start}:{self.stop}"


Task = LineTask | TileTask


@dataclass(frozen=True)
class LineResult:
    which: str
    start: int
    stop: int
    seconds: float
    peak_rss_mb: float
    requests: int = 0  # storage calls of the task (renderer.fsio.io_counts)
    objects_written: int = 0


@dataclass(frozen=True)
class TileResult:
    """One rendered tile; its marker record is renderer.markers.tile_marker of it."""

    id: str
    rows: tuple[int, int]
    cols: tuple[int, int]
    crc32: int
    seconds: float
    pid: int
    host: str
    peak_rss_mb: float = 0.0
    # storage calls and objects written by the task; all on its last tile (the run's marker is written after it)
    requests: int = 0
    objects_written: int = 0

    @property
    def pixels(self) -> int:
        return (self.rows[1] - self.rows[0]) * (self.cols[1] - self.cols[0])


Result = LineResult | list[TileResult]


OnResult = Callable[[Task, Result], None]
# Whether a task may be handed out now (its dependencies are met: a tile task's line ranges are stored)
Ready = Callable[[Task], bool]


class Pool(Protocol):
    """What the job driver needs of a pool: run tasks, report faults, stop.

    ``renderer.pool.WorkerPool`` (Ray actors) and ``renderer.local.LocalPool``
    (this process) implement it; the protocol lives here, beside the tasks, so
    the driver can name it without importing Ray.  ``run`` hands out the first
    queued task (in the order given) that ``ready`` accepts.
    """

    retries: int
    replaced: int
    device: str  # where the workers render: cpu | cuda
    tiles_retried: int  # tiles of the tile tasks sent again
    nodes_used: dict[str, str]  # node id -> description, of nodes whose workers returned results
    nodes_lost: dict[str, str]  # node id -> description, of nodes that died under a worker

    def run(self, ctx: RenderContext, tasks: list[Task], on_result: OnResult, ready: Ready | None = None) -> None: ...

    def pids(self, timeout: float = ...) -> list[int]: ...

    def shutdown(self) -> None: ...
