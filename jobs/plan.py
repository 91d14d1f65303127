"""The tile plan: disjoint tiles aligned to the store's chunks (or shards), and how they are batched.

One tile = one chunk (or one shard when sharding is on), so no two workers ever
write the same chunk or shard object and no locking is needed.  The plan is
arithmetic (``renderer.tasks.TilePlan``: index -> rectangle), so a canvas of
2^20 x 2^20 pixels costs nothing to plan; what is left to do is a boolean mask
over tile indices, and work goes out as runs of consecutive indices (one
marker per run).  The line stage is split the same way: ranges of whole
line-array chunks, each chunk a multiple of the model's ``LINE_BLOCK`` so no
line block is computed twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from creps import LINE_BLOCK
from renderer.store import level_shapes
from renderer.tasks import Tile, TilePlan

from . import JobSpecError
from .spec import MAX_SHARD_SIDE, JobSpec

__all__ = [
    "BLOCK_SIDE",
    "MAX_TILES",
    "OBJECTS_PER_LEVEL",
    "Tile",
    "TilePlan",
    "auto_batch",
    "auto_block",
    "auto_shard",
    "block_levels",
    "block_runs",
    "job_plan",
    "line_chunk",
    "line_ranges",
    "runs",
]

# A job's done set is one bit per tile in the driver (and markers on the store):
# 2^26 tiles is 64 Mi of them, e.g. 2^20 x 2^20 px at tile 128.
MAX_TILES = 1 << 26


def job_plan(spec: JobSpec) -> TilePlan:
    """The plan of a resolved spec; refuses plans too fine to track (one line, before any work)."""
    plan = TilePlan(spec.height, spec.width, spec.tile * spec.shard, spec.block or 1)
    if len(plan) > MAX_TILES:
        raise JobSpecError(
            f"{spec.width}x{spec.height} at tile {spec.tile * spec.shard} is {len(plan):,} tiles (limit "
            f"{MAX_TILES:,}); use a larger --tile or --shard"
        )
    return plan


# Object stores bill and throttle per request and list slowly: level 0 of a job on one is
# sharded so it has at most about this many objects (and as many tile markers, one per shard).
OBJECTS_PER_LEVEL = 1024


def auto_shard(height: int, width: int, tile: int, object_store: bool) -> int:
    """Tiles per shard side for ``--shard`` auto: 1 on local disks and in memory; on an object
    store the smallest power of two that keeps level 0 at <= OBJECTS_PER_LEVEL shard objects,
    within a shard side of MAX_SHARD_SIDE (a worker renders a whole shard in memory).

    A power of two keeps shards aligned with the 2x2 pyramid.  1 Gpx (32768^2) at tile 512 is
    4,096 chunks, so shards of 2x2 tiles: 1,024 objects; 262144^2 is 16x16 tiles: 1,024.
    """
    if not object_store:
        return 1
    s = 1
    while (
        -(-height // (tile * s)) * -(-width // (tile * s)) > OBJECTS_PER_LEVEL
        and tile * s * 2 <= MAX_SHARD_SIDE
        and s * 2 <= 64
    ):
        s *= 2
    return s


# Blocks: a worker renders whole blocks of G x G plan tiles and writes their pyramid levels 1..L
# (renderer.tiles), so after a render only levels coarser than a block are left for assemble.
BLOCK_SIDE = 2048  # pixels per block side at most (auto): 12 MB of level-0 pixels held per block
MIN_BLOCKS = 16  # blocks per job at least (auto), so whole-block tasks still balance over the workers


def auto_block(height: int, width: int, side: int) -> int:
    """Plan tiles per block side for ``--block`` auto: the largest power of two G with a block of
    at most BLOCK_SIDE pixels and at least MIN_BLOCKS blocks (1 when none fits: no levels).

    6144² at tile 512: G = 2 (1024² blocks, 36 of them, level 1 with the tiles); 32768²: G = 4
    (2048² blocks, 256, levels 1-2).
    """
    rows, cols = -(-height // side), -(-width // side)
    g = 1
    while side * g * 2 <= BLOCK_SIDE and -(-rows // (g * 2)) * -(-cols // (g * 2)) >= MIN_BLOCKS:
        g *= 2
    return g


def block_levels(height: int, width: int, tile: int, shard: int, block: int) -> int:
    """L: the pyramid levels a block of ``block`` x ``block`` plan tiles (each ``shard`` x ``shard``
    chunks of ``tile``) owns whole chunks of: 2**L divides the block's chunks per side; at most the
    pyramid's last level (renderer.store.level_shapes with one chunk as the smallest side)."""
    chunks = block * shard
    levels = (chunks & -chunks).bit_length() - 1  # 2-adic valuation
    return min(levels, len(level_shapes(height, width, tile)) - 1)


def block_runs(plan: TilePlan, todo: np.ndarray, size: int) -> Iterator[tuple[int, int]]:
    """Like ``runs``, cut only at block boundaries (``todo`` holds whole blocks): each run is one
    or more whole blocks, about ``size`` tiles (at least one block)."""
    if plan.block == 1:
        yield from runs(todo, size)
        return
    for first, last in runs(todo, len(plan)):  # contiguous stretches of whole blocks
        a = first
        while a < last:
            b = plan.block_range(plan.block_of(a))[1]
            while b < last and b - a < size:
                b = plan.block_range(plan.block_of(b))[1]
            yield a, b
            a = b


def runs(todo: np.ndarray, size: int) -> Iterator[tuple[int, int]]:
    """[start, stop) runs of consecutive tile indices from a sorted index array, at most ``size`` long."""
    if len(todo) == 0:
        return
    breaks = np.flatnonzero(np.diff(todo) != 1) + 1
    for seg in np.split(todo, breaks):
        first, last = int(seg[0]), int(seg[-1]) + 1
        for a in range(first, last, size):
            yield a, min(a + size, last)


def line_chunk(tile: int) -> int:
    """Chunk length of the line arrays: a common multiple of the tile and LINE_BLOCK."""
    return tile * LINE_BLOCK // math.gcd(tile, LINE_BLOCK)


def line_ranges(length: int, chunk: int, parts: int) -> list[tuple[int, int]]:
    """Split [0, length) into about ``parts`` ranges of whole chunks (the last one short)."""
    n_chunks = math.ceil(length / chunk)
    per = max(1, math.ceil(n_chunks / max(1, parts)))
    step = per * chunk
    return [(a, min(a + step, length)) for a in range(0, length, step)]


TASK_PIXELS = {"cpu": 1 << 16, "cuda": 1 << 22}  # pixels per task at least (when the plan is big enough)


def auto_batch(n_tiles: int, n_workers: int, tile_pixels: int, device: str = "cpu") -> int:
    """Tiles per task: small tasks keep the load balanced; several tiny tiles amortise overhead.

    A GPU task holds ~4M pixels (four device calls of 2^20): a task ends by
    waiting for its writes before its marker, and that wait is worth paying
    only once per several calls (a second render thread computes meanwhile).
    """
    target = TASK_PIXELS["cuda" if device.startswith("cuda") else "cpu"]
    by_size = max(1, target // max(1, tile_pixels))
    by_balance = max(1, n_tiles // max(1, 8 * n_workers))  # >= ~8 tasks per worker
    return max(1, min(by_size, by_balance, 64))
