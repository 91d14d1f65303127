"""Check a store's level-0 tiles against their completion markers.

Every marker (``TileResult.marker()``) holds the crc32 of the tile's uint8
pixels as the worker wrote them.  Verifying a tile reads its region of level 0
back, decodes it and compares the crc32.  A tile is bad when

  * its chunks cannot be read or decoded (overwritten, truncated: zarr or the
    codec raises),
  * its pixels do not match the marker's crc32 (a chunk that was deleted reads
    as the fill value, which is reported as missing data),
  * or its marker is unreadable or malformed (the tile cannot be checked).

In a store whose render writes pyramid levels 1..L with its blocks
(``ImageStore.block_levels``), each block is read once as a whole: its tiles
are checked from that read, and then its chunks of levels 1..L are compared
with the 2x2 means of its level-0 pixels (renderer.pyramid.downsample). A
block whose levels do not match (a damaged or lost level chunk) makes its
first tile bad with that reason, so a repair renders the block again, levels
included.

Tiles are read on a small thread pool with at most ``workers`` tiles in
memory at a time, so a gigapixel store is checked in bounded memory.  Errors
that say the storage itself cannot be reached (connection, timeout,
permission) stop the check with a ``RendererError`` instead of condemning
every tile.  Repairing (rendering bad tiles again) is the job driver's part:
``jobs.verify``.
"""

from __future__ import annotations

import functools
import re
import time
import zlib
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from creps.errors import first_line

from .errors import RendererError
from .pyramid import downsample
from .store import ImageStore
from .tasks import TilePlan

DEFAULT_WORKERS = 4
# storage unreachable or refused: the check cannot go on, no tile is judged
FATAL_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, PermissionError)


@dataclass(frozen=True)
class BadTile:
    """A tile whose stored pixels do not match its marker; ``reason`` says how."""

    id: str
    rows: tuple[int, int] | None
    cols: tuple[int, int] | None
    reason: str

    def describe(self) -> str:
        where = ""
        if self.rows is not None and self.cols is not None:
            where = f" (rows {self.rows[0]}:{self.rows[1]}, cols {self.cols[0]}:{self.cols[1]})"
        return f"bad tile {self.id}{where}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "rows": list(self.rows) if self.rows else None,
            "cols": list(self.cols) if self.cols else None,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class VerifyReport:
    """What one check found: how many tiles were checked and which of them are bad."""

    checked: int
    bad: tuple[BadTile, ...] = ()
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.bad

    @property
    def bad_ids(self) -> list[str]:
        return [b.id for b in self.bad]

    def to_dict(self) -> dict[str, Any]:
        return {"checked": self.checked, "bad": [b.to_dict() for b in self.bad], "seconds": round(self.seconds, 3)}


def _natural(tile_id: str) -> list[Any]:
    """Sort key: r2_c10 after r2_c9."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", tile_id)]


def tile_crc(data: np.ndarray) -> int:
    """The crc32 a marker holds: of the C-order bytes of the uint8 (3, h, w) tile."""
    return zlib.crc32(np.ascontiguousarray(data, dtype=np.uint8).tobytes())


def _span(record: dict, key: str) -> tuple[int, int] | None:
    value = record.get(key)
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and 0 <= value[0] < value[1]
    ):
        return int(value[0]), int(value[1])
    return None


Reader = Callable[[tuple[int, int], tuple[int, int]], np.ndarray]  # (rows, cols) -> (3, h, w) uint8


def check_tile(store: ImageStore, record: dict, shape: tuple[int, int]) -> BadTile | None:
    """None when the tile of this marker reads back with the marker's crc32, else why not."""
    return _check_record(store, record, shape, lambda rows, cols: store.read_region(0, *rows, *cols))


def _check_record(store: ImageStore, record: dict, shape: tuple[int, int], read: Reader) -> BadTile | None:
    tile_id = str(record.get("id"))
    rows, cols = _span(record, "rows"), _span(record, "cols")
    crc = record.get("crc32")
    if rows is None or cols is None or not isinstance(crc, int) or isinstance(crc, bool):
        return BadTile(tile_id, rows, cols, "malformed marker (no rows/cols/crc32)")
    h, w = shape
    if rows[1] > h or cols[1] > w:
        return BadTile(tile_id, rows, cols, f"marker lies outside the {w}x{h} image")
    try:
        data = read(rows, cols)
    except FATAL_ERRORS as e:
        raise RendererError(f"cannot read tile {tile_id} of {store.url}: {first_line(e)}") from None
    except Exception as e:  # zarr / codec errors: the chunk bytes are damaged
        return BadTile(tile_id, rows, cols, f"chunk cannot be decoded ({type(e).__name__}: {first_line(e)})")
    got = tile_crc(data)
    if got == crc:
        return None
    if not data.any():  # what an absent chunk reads as (fill value 0)
        return BadTile(tile_id, rows, cols, "no data (chunk missing: reads as empty)")
    return BadTile(tile_id, rows, cols, f"crc32 mismatch (marker {crc:#010x}, data {got:#010x})")


Found = list[tuple[str, BadTile | None]]  # (tile id, why it is bad or None), one per record checked


def check_block(
    store: ImageStore, plan: TilePlan, block: int, records: list[dict], shape: tuple[int, int], levels: int
) -> tuple[Found, BadTile | None]:
    """The records of one block checked from one read of it, then its levels 1..``levels``.

    Returns the per-record findings and, when every tile of the block is in
    ``records`` and good, a ``BadTile`` (the block's first tile) if a level
    chunk does not hold the 2x2 means of the block's pixels.
    """
    r0, r1, c0, c1 = plan.block_rect(block)
    try:
        pixels = store.read_region(0, r0, r1, c0, c1)
    except FATAL_ERRORS as e:
        raise RendererError(
            f"cannot read block rows {r0}:{r1} cols {c0}:{c1} of {store.url}: {first_line(e)}"
        ) from None
    except Exception:  # some chunk of the block is damaged: each tile on its own, to name it
        return [(str(r.get("id")), check_tile(store, r, shape)) for r in records], None

    def read(rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        if rows[0] < r0 or rows[1] > r1 or cols[0] < c0 or cols[1] > c1:  # not this block's: read it
            return store.read_region(0, *rows, *cols)
        return pixels[:, rows[0] - r0 : rows[1] - r0, cols[0] - c0 : cols[1] - c0]

    found = [(str(r.get("id")), _check_record(store, r, shape, read)) for r in records]
    a, z = plan.block_range(block)
    good = {tile_id for tile_id, bad in found if bad is None}
    if not levels or not all(plan.tile(k).id in good for k in range(a, z)):
        return found, None
    first = plan.tile(a)
    img, y, x = pixels, r0, c0
    for k in range(1, levels + 1):
        img, y, x = downsample(img), y // 2, x // 2
        where = f"pyramid level {k} of its block (level-0 rows {r0}:{r1}, cols {c0}:{c1})"
        try:
            stored = store.read_region(k, y, y + img.shape[1], x, x + img.shape[2])
        except FATAL_ERRORS as e:
            raise RendererError(f"cannot read level {k} of {store.url}: {first_line(e)}") from None
        except Exception as e:
            reason = f"{where} cannot be decoded ({type(e).__name__}: {first_line(e)})"
            return found, BadTile(first.id, (first.r0, first.r1), (first.c0, first.c1), reason)
        if not np.array_equal(stored, img):
            reason = f"{where} does not hold the 2x2 means of its tiles"
            return found, BadTile(first.id, (first.r0, first.r1), (first.c0, first.c1), reason)
    return found, None


def _one(store: ImageStore, record: dict, shape: tuple[int, int]) -> tuple[Found, BadTile | None]:
    return [(str(record["id"]), check_tile(store, record, shape))], None


def verify_store(
    store: ImageStore,
    workers: int = DEFAULT_WORKERS,
    ids: Collection[str] | None = None,
    on_tile: Callable[[str, BadTile | None], None] | None = None,
) -> VerifyReport:
    """Check every tile marked done in ``store`` (or only those of ``ids``) against its marker's crc32.

    ``workers`` threads read tiles; at most that many tiles are in flight (and
    in memory) at once.  A tile with several records (marked again after a
    repair) is good when its pixels match any of them.  ``on_tile(id,
    bad_or_None)`` is called once per tile as it is checked, in this thread.
    """
    t0 = time.perf_counter()
    workers = max(1, int(workers))
    shape = store.shape
    plan = store.tile_plan()
    _, levels = store.block_levels
    done = store.done_tiles()
    names = done & set(ids) if ids is not None else done
    seen: set[str] = set()  # tiles with a readable record
    good: set[str] = set()
    bad: dict[str, BadTile] = {}
    level_bad: dict[str, BadTile] = {}  # blocks whose levels do not match: bad whatever their crc32 says

    def units() -> Iterator[Callable[[], tuple[Found, BadTile | None]]]:
        """The checks to run: one per record, or one per block (of one marker) in a store with levels."""
        for group in store.tile_record_groups():
            ours = [
                r for r in group if isinstance(r.get("id"), str) and r["id"] in done
            ]  # records outside the plan: not ours
            if levels:
                blocks: dict[int, list[dict]] = {}
                for r in ours:
                    k = plan.index(r["id"])
                    if k is not None:
                        blocks.setdefault(plan.block_of(k), []).append(r)
                for b, recs in blocks.items():
                    if any(r["id"] in names for r in recs):
                        yield functools.partial(check_block, store, plan, b, recs, shape, levels)
            else:
                for r in ours:
                    if r["id"] in names:
                        yield functools.partial(_one, store, r, shape)

    def finish(fut: Future) -> None:
        found, level_problem = fut.result()  # a fatal storage error propagates from here
        for tile_id, result in found:
            if tile_id not in names:
                continue
            seen.add(tile_id)
            first = tile_id not in good and tile_id not in bad
            if result is None:
                good.add(tile_id)
                bad.pop(tile_id, None)
            elif tile_id not in good:
                bad.setdefault(tile_id, result)
            if first and on_tile is not None:
                on_tile(tile_id, result)
        if level_problem is not None:  # reported on the block's first tile we were asked about
            asked = [tile_id for tile_id, _ in found if tile_id in names]
            if level_problem.id not in names and asked:
                t = plan.tile(plan.index(asked[0]) or 0)
                level_problem = BadTile(t.id, (t.r0, t.r1), (t.c0, t.c1), level_problem.reason)
            level_bad[level_problem.id] = level_problem

    with ThreadPoolExecutor(workers, thread_name_prefix="verify") as pool:
        pending: set[Future] = set()
        try:
            for unit in units():
                while len(pending) >= workers:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        finish(fut)
                pending.add(pool.submit(unit))
            for fut in list(pending):
                pending.discard(fut)
                finish(fut)
        finally:
            for fut in pending:
                fut.cancel()
    for tile_id, problem in level_bad.items():
        good.discard(tile_id)
        bad[tile_id] = problem
        seen.add(tile_id)
    # marked done, but no readable record says what its pixels were: it cannot be trusted
    for name in sorted(names - seen):
        unreadable = BadTile(name, None, None, "marker unreadable (no record of this tile's crc32)")
        bad[name] = unreadable
        if on_tile is not None:
            on_tile(name, unreadable)
    report = tuple(sorted(bad.values(), key=lambda b: _natural(b.id)))
    return VerifyReport(checked=len(good) + len(bad), bad=report, seconds=time.perf_counter() - t0)
