"""The tile plan: disjoint tiles aligned to the store's chunks (or shards).

One tile = one chunk (or one shard when sharding is on), so no two workers ever
write the same chunk or shard object and no locking is needed.  The line stage
is split the same way: ranges of whole line-array chunks, each chunk a multiple
of the model's ``LINE_BLOCK`` so no line block is computed twice.
"""

from __future__ import annotations

import math

from creps import LINE_BLOCK
from renderer.tasks import Tile

from .spec import JobSpec

__all__ = ["Tile", "auto_batch", "batches", "line_chunk", "line_ranges", "spec_tiles", "tile_plan"]


def tile_plan(height: int, width: int, tile: int, shard: int = 1) -> list[Tile]:
    """Row-major tiles of side ``tile * shard`` (edge tiles smaller), ids ``r{row}_c{col}``."""
    side = tile * shard
    tiles = []
    for i in range(math.ceil(height / side)):
        for j in range(math.ceil(width / side)):
            r0, c0 = i * side, j * side
            tiles.append(Tile(f"r{i}_c{j}", r0, min(r0 + side, height), c0, min(c0 + side, width)))
    return tiles


def spec_tiles(spec: JobSpec) -> list[Tile]:
    return tile_plan(spec.height, spec.width, spec.tile, spec.shard)


def line_chunk(tile: int) -> int:
    """Chunk length of the line arrays: a common multiple of the tile and LINE_BLOCK."""
    return tile * LINE_BLOCK // math.gcd(tile, LINE_BLOCK)


def line_ranges(length: int, chunk: int, parts: int) -> list[tuple[int, int]]:
    """Split [0, length) into about ``parts`` ranges of whole chunks (the last one short)."""
    n_chunks = math.ceil(length / chunk)
    per = max(1, math.ceil(n_chunks / max(1, parts)))
    step = per * chunk
    return [(a, min(a + step, length)) for a in range(0, length, step)]


def batches(tiles: list[Tile], size: int) -> list[list[Tile]]:
    return [tiles[i : i + size] for i in range(0, len(tiles), size)]


def auto_batch(n_tiles: int, n_workers: int, tile_pixels: int) -> int:
    """Tiles per task: small tasks keep the load balanced; several tiny tiles amortise overhead."""
    by_size = max(1, (256 * 256) // max(1, tile_pixels))  # ~64K pixels per task at least
    by_balance = max(1, n_tiles // max(1, 8 * n_workers))  # >= ~8 tasks per worker
    return max(1, min(by_size, by_balance, 64))
