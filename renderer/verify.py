"""Check a store: its level-0 tiles against their completion markers, and every pyramid level present.

Every marker (renderer.markers) holds the crc32 of the tile's uint8
pixels as the worker wrote them.  Verifying a tile reads its region of level 0
back, decodes it and compares the crc32.  A tile is bad when

  * its chunks cannot be read or decoded (overwritten, truncated: zarr or the
    codec raises),
  * its pixels do not match the marker's crc32 (a chunk that was deleted reads
    as the fill value, which is reported as missing data),
  * or its marker is unreadable or malformed (the tile cannot be checked).

Every chunk of a pyramid level k >= 1 must hold the 2x2 rule over level k-1
(renderer.verify_levels; a bad one is a ``BadChunk``). In a store whose render
writes levels 1..L with its blocks (``ImageStore.block_levels``), each block
is read once as a whole: its tiles are checked from that read, and its chunks
of levels 1..L are compared with the halvings of its level-0 pixels
(renderer.pyramid.halvings). The levels assemble built (L+1..n-1) are checked
after, level by level, when the pyramid record is current. A bad tile is
rendered again (its block, levels 1..L included); a bad level chunk is rebuilt
from the level below, and so are the chunks above either (jobs.verify, with
renderer.pyramid.rebuild_chunks).

Tiles are read on a small thread pool with at most ``workers`` tiles in
memory at a time, so a gigapixel store is checked in bounded memory.  Errors
that say the storage itself cannot be reached (connection, timeout,
permission) stop the check with a ``RendererError`` instead of condemning
every tile.  Repairing is the job driver's part: ``jobs.verify``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from creps.errors import first_line

from .errors import RendererError
from .markers import Marked, tile_crc
from .pyramid import Chunk, halvings
from .store import ImageStore
from .tasks import TilePlan
from .verify_levels import FATAL_ERRORS, BadChunk, Found, LevelState, block_chunks, check_levels, upper_levels

DEFAULT_WORKERS = 4


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
    """What one check found: the tiles checked and the bad ones, the level chunks checked and the bad ones.

    ``levels``: the pyramid levels checked (1..L with the blocks, L+1..n-1 when
    the pyramid was current); ``note`` says which were not and why;
    ``record``: the pyramid progress record that was current (a repair that
    re-renders tiles puts it back once the levels above them are rebuilt);
    ``render_levels``: L.
    """

    checked: int
    bad: tuple[BadTile, ...] = ()
    seconds: float = 0.0
    chunks_checked: int = 0
    bad_chunks: tuple[BadChunk, ...] = ()
    levels: tuple[int, ...] = ()
    note: str = ""
    record: dict | None = None
    render_levels: int = 0

    @property
    def ok(self) -> bool:
        return not self.bad and not self.bad_chunks

    @property
    def bad_ids(self) -> list[str]:
        return [b.id for b in self.bad]

    def to_dict(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "bad": [b.to_dict() for b in self.bad],
            "chunks_checked": self.chunks_checked,
            "bad_chunks": [b.to_dict() for b in self.bad_chunks],
            "levels": list(self.levels),
            "seconds": round(self.seconds, 3),
        }


def _natural(tile_id: str) -> list[Any]:
    """Sort key: r2_c10 after r2_c9."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", tile_id)]


Reader = Callable[[tuple[int, int], tuple[int, int]], np.ndarray]  # (rows, cols) -> (3, h, w) uint8


def check_tile(store: ImageStore, record: dict, shape: tuple[int, int]) -> BadTile | None:
    """None when the tile of this marker reads back with the marker's crc32, else why not."""
    return _check_record(store, record, shape, lambda rows, cols: store.read_region(0, *rows, *cols))


def _check_record(store: ImageStore, record: dict, shape: tuple[int, int], read: Reader) -> BadTile | None:
    m = Marked.of(record)
    tile_id, rows, cols, crc = m.id, m.rows, m.cols, m.crc32
    if rows is None or cols is None or crc is None:
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


Judged = list[tuple[str, BadTile | None]]  # (tile id, why it is bad or None), one per record checked
Checked = tuple[Judged, list[Found], int]  # one unit's tiles, its bad level chunks, level chunks compared


def check_block(
    store: ImageStore, plan: TilePlan, block: int, records: list[dict], shape: tuple[int, int], levels: int
) -> Checked:
    """The records of one block checked from one read of it, then its chunks of levels 1..``levels``.

    Returns the per-record findings and, when every tile of the block is in
    ``records`` and good, its level chunks that do not hold the halvings of
    the block's pixels (with the pixels they should hold) and how many were
    compared. A block with a bad tile is rendered again whole, levels too.
    """
    r0, r1, c0, c1 = plan.block_rect(block)
    try:
        pixels = store.read_region(0, r0, r1, c0, c1)
    except FATAL_ERRORS as e:
        raise RendererError(
            f"cannot read block rows {r0}:{r1} cols {c0}:{c1} of {store.url}: {first_line(e)}"
        ) from None
    except Exception:  # some chunk of the block is damaged: each tile on its own, to name it
        return [(str(r.get("id")), check_tile(store, r, shape)) for r in records], [], 0

    def read(rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        if rows[0] < r0 or rows[1] > r1 or cols[0] < c0 or cols[1] > c1:  # not this block's: read it
            return store.read_region(0, *rows, *cols)
        return pixels[:, rows[0] - r0 : rows[1] - r0, cols[0] - c0 : cols[1] - c0]

    found = [(str(r.get("id")), _check_record(store, r, shape, read)) for r in records]
    a, z = plan.block_range(block)
    good = {tile_id for tile_id, bad in found if bad is None}
    if not levels or not all(plan.tile(k).id in good for k in range(a, z)):
        return found, [], 0
    bad: list[Found] = []
    n = 0
    for k, y, x, img in halvings(pixels, r0, c0, levels):
        compared, wrong = block_chunks(store, k, y, x, img)
        n += compared
        bad += wrong
    return found, bad, n


def _one(store: ImageStore, record: dict, shape: tuple[int, int]) -> Checked:
    return [(str(record["id"]), check_tile(store, record, shape))], [], 0


def _units(store: ImageStore, plan: TilePlan, done: set[str], names: set[str]) -> Iterator[Callable[[], Checked]]:
    """The checks to run: one per record, or one per block (of one marker) in a store with levels."""
    shape = store.shape
    _, levels = store.block_levels
    for group in store.tile_record_groups():
        ours = [r for r in group if isinstance(r.get("id"), str) and r["id"] in done]  # others: not ours
        if not levels:
            yield from (functools.partial(_one, store, r, shape) for r in ours if r["id"] in names)
            continue
        blocks: dict[int, list[dict]] = {}
        for r in ours:
            k = plan.index(r["id"])
            if k is not None:
                blocks.setdefault(plan.block_of(k), []).append(r)
        for b, recs in blocks.items():
            if any(r["id"] in names for r in recs):
                yield functools.partial(check_block, store, plan, b, recs, shape, levels)


class _Tally:
    """What the checks found so far, tile by tile (a tile with several records is good when any matches),
    and the bad chunks of the levels written with the blocks (each once, however many markers name its block)."""

    def __init__(
        self, names: set[str], plan: TilePlan, levels: int, on_tile: Callable[[str, BadTile | None], None] | None
    ):
        self.names, self.plan, self.levels, self.on_tile = names, plan, levels, on_tile
        self.seen: set[str] = set()  # tiles with a readable record
        self.good: set[str] = set()
        self.bad: dict[str, BadTile] = {}
        self.chunks = LevelState()
        self.chunk_seen: set[tuple[int, Chunk]] = set()

    def add(self, checked: Checked) -> None:
        found, chunks, compared = checked
        for tile_id, result in found:
            if tile_id in self.names:
                self._tile(tile_id, result)
        fresh = [(b, px) for b, px in chunks if (b.level, b.chunk) not in self.chunk_seen]
        self.chunk_seen |= {(b.level, b.chunk) for b, _ in fresh}
        self.chunks.checked += compared
        # only level L's pixels are needed: to judge the chunks above it (verify_levels)
        self.chunks.add([f for f in fresh if f[0].level == self.levels])
        self.chunks.bad += [b for b, _ in fresh if b.level != self.levels]

    def _tile(self, tile_id: str, result: BadTile | None) -> None:
        self.seen.add(tile_id)
        first = tile_id not in self.good and tile_id not in self.bad
        if result is None:
            self.good.add(tile_id)
            self.bad.pop(tile_id, None)
        elif tile_id not in self.good:
            self.bad.setdefault(tile_id, result)
        if first and self.on_tile is not None:
            self.on_tile(tile_id, result)

    def report(self, seconds: float) -> VerifyReport:
        # marked done, but no readable record says what its pixels were: it cannot be trusted
        for name in sorted(self.names - self.seen):
            unreadable = BadTile(name, None, None, "marker unreadable (no record of this tile's crc32)")
            self.bad[name] = unreadable
            if self.on_tile is not None:
                self.on_tile(name, unreadable)
        report = tuple(sorted(self.bad.values(), key=lambda b: _natural(b.id)))
        return VerifyReport(
            checked=len(self.good) + len(self.bad),
            bad=report,
            seconds=seconds,
            chunks_checked=self.chunks.checked,
            bad_chunks=_sorted(self.chunks.bad),
            levels=tuple(range(1, self.levels + 1)),
            render_levels=self.levels,
        )


def _sorted(chunks: list[BadChunk]) -> tuple[BadChunk, ...]:
    return tuple(sorted(chunks, key=lambda b: (b.level, b.chunk)))


def rerendered(store: ImageStore, plan: TilePlan, ids: Collection[str], levels: int) -> dict[int, set[Chunk]]:
    """The chunks of levels 0..``levels`` (L) that rendering tiles ``ids`` again writes: their blocks' (with
    L >= 1 a tile is rendered with its block, levels 1..L included), or the tiles' own chunks (L = 0)."""
    side = int(store.level(0).chunks[1])
    out: dict[int, set[Chunk]] = {k: set() for k in range(levels + 1)}
    for tile_id in ids:
        i = plan.index(tile_id)
        if i is None:
            continue
        t = plan.tile(i)
        r0, r1, c0, c1 = plan.block_rect(plan.block_of(i)) if levels else (t.r0, t.r1, t.c0, t.c1)
        for k in range(levels + 1):
            y0, y1, x0, x1 = r0 >> k, -(-r1 >> k), c0 >> k, -(-c1 >> k)
            out[k] |= {
                (y, x) for y in range(y0 // side, (y1 - 1) // side + 1) for x in range(x0 // side, (x1 - 1) // side + 1)
            }
    return out


def _run_bounded(units: Iterator[Callable[[], Checked]], workers: int, add: Callable[[Checked], None]) -> None:
    """Run ``units`` on ``workers`` threads, at most ``workers`` in flight; ``add`` each result in this thread."""
    with ThreadPoolExecutor(workers, thread_name_prefix="verify") as pool:
        pending: set[Future] = set()
        try:
            for unit in units:
                while len(pending) >= workers:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        add(fut.result())  # a fatal storage error propagates from here
                pending.add(pool.submit(unit))
            for fut in list(pending):
                pending.discard(fut)
                add(fut.result())
        finally:
            for fut in pending:
                fut.cancel()


def verify_store(
    store: ImageStore,
    workers: int = DEFAULT_WORKERS,
    ids: Collection[str] | None = None,
    on_tile: Callable[[str, BadTile | None], None] | None = None,
    on_chunks: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check every tile marked done in ``store`` against its marker's crc32, and every level present.

    ``workers`` threads read tiles; at most that many tiles are in flight (and
    in memory) at once.  A tile with several records (marked again after a
    repair) is good when its pixels match any of them.  ``on_tile(id,
    bad_or_None)`` is called once per tile as it is checked, in this thread;
    ``on_chunks(n)`` as n more chunks of the levels assemble built are.
    With ``ids`` only those tiles (and the levels of their blocks) are checked.
    """
    t0 = time.perf_counter()
    plan = store.tile_plan()
    done = store.done_tiles()
    names = done & set(ids) if ids is not None else done
    levels = store.block_levels[1]
    tally = _Tally(names, plan, levels, on_tile)
    workers = max(1, int(workers))
    _run_bounded(_units(store, plan, done, names), workers, tally.add)
    report = tally.report(time.perf_counter() - t0)
    if ids is not None:
        return report
    upper = upper_levels(store)
    state = tally.chunks
    # what a repair renders again cannot be judged here, nor anything above it
    for k, chunks in rerendered(store, plan, report.bad_ids, levels).items():
        state.unknown.setdefault(k, set()).update(chunks)
    check_levels(store, upper, state, workers, on_chunks)
    return dataclasses.replace(
        report,
        seconds=time.perf_counter() - t0,
        chunks_checked=state.checked,
        bad_chunks=_sorted(state.bad),
        levels=tuple(range(1, upper.last + 1)),
        note=upper.note,
        record=upper.record,
    )
