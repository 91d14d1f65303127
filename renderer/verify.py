"""Check a store's level-0 tiles against their completion markers.

Every marker (``TileResult.marker()``) holds the crc32 of the tile's uint8
pixels as the worker wrote them.  Verifying a tile reads its region of level 0
back, decodes it and compares the crc32.  A tile is bad when

  * its chunks cannot be read or decoded (overwritten, truncated: zarr or the
    codec raises),
  * its pixels do not match the marker's crc32 (a chunk that was deleted reads
    as the fill value, which is reported as missing data),
  * or its marker is unreadable or malformed (the tile cannot be checked).

Tiles are read on a small thread pool with at most ``workers`` tiles in
memory at a time, so a gigapixel store is checked in bounded memory.  Errors
that say the storage itself cannot be reached (connection, timeout,
permission) stop the check with a ``RendererError`` instead of condemning
every tile.  Repairing (rendering bad tiles again) is the job driver's part:
``jobs.verify``.
"""

from __future__ import annotations

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
from .store import ImageStore

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


def check_tile(store: ImageStore, record: dict, shape: tuple[int, int]) -> BadTile | None:
    """None when the tile of this marker reads back with the marker's crc32, else why not."""
    tile_id = str(record.get("id"))
    rows, cols = _span(record, "rows"), _span(record, "cols")
    crc = record.get("crc32")
    if rows is None or cols is None or not isinstance(crc, int) or isinstance(crc, bool):
        return BadTile(tile_id, rows, cols, "malformed marker (no rows/cols/crc32)")
    h, w = shape
    if rows[1] > h or cols[1] > w:
        return BadTile(tile_id, rows, cols, f"marker lies outside the {w}x{h} image")
    try:
        data = store.read_region(0, rows[0], rows[1], cols[0], cols[1])
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
    names = store.done_tiles()
    if ids is not None:
        names &= set(ids)
    seen: set[str] = set()  # tiles with a readable record
    good: set[str] = set()
    bad: dict[str, BadTile] = {}

    def records() -> Iterator[dict]:
        for record in store.tile_records():
            tile_id = record.get("id")
            if isinstance(tile_id, str) and tile_id in names:  # records of tiles outside the plan: not ours
                seen.add(tile_id)
                yield record

    def finish(fut: Future, tile_id: str) -> None:
        result = fut.result()  # a fatal storage error propagates from here
        first = tile_id not in good and tile_id not in bad
        if result is None:
            good.add(tile_id)
            bad.pop(tile_id, None)
        elif tile_id not in good:
            bad.setdefault(tile_id, result)
        if first and on_tile is not None:
            on_tile(tile_id, result)

    with ThreadPoolExecutor(workers, thread_name_prefix="verify") as pool:
        pending: dict[Future, str] = {}
        try:
            for record in records():
                while len(pending) >= workers:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        finish(fut, pending.pop(fut))
                pending[pool.submit(check_tile, store, record, shape)] = str(record["id"])
            for fut in list(pending):
                finish(fut, pending.pop(fut))
        finally:
            for fut in pending:
                fut.cancel()
    # marked done, but no readable record says what its pixels were: it cannot be trusted
    for name in sorted(names - seen):
        unreadable = BadTile(name, None, None, "marker unreadable (no record of this tile's crc32)")
        bad[name] = unreadable
        if on_tile is not None:
            on_tile(name, unreadable)
    report = tuple(sorted(bad.values(), key=lambda b: _natural(b.id)))
    return VerifyReport(checked=len(good) + len(bad), bad=report, seconds=time.perf_counter() - t0)
