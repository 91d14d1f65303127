"""The level half of renderer.verify: every pyramid level present checked against the 2x2 rule.

Each chunk of level k >= 1 must hold the rule (renderer.pyramid.downsample)
over the pixels of level k-1 under it. Two places check it, with bounded memory:

- levels 1..L that the render writes with its blocks (renderer.pyramid.render_levels):
  renderer.verify.check_block compares them (``block_chunks``) with the halvings of the
  block's level-0 pixels, which it reads for the tiles' crc32 anyway;
- levels L+1..n-1 that assemble builds: ``check_levels``, level by level, in windows of
  m x m chunks of level k and the 2m x 2m chunks of level k-1 under them (``WINDOW``
  pixels a side), a few windows at once. Only when the pyramid record is current
  (``upper_levels``): a stale or unfinished pyramid is not damage (the next assemble
  rebuilds it), so it is skipped and the report says so.

A chunk is judged against the level below *as it should be*: a chunk of level
k-1 found bad is replaced by the pixels it should hold (kept up to ``KEEP_BYTES``)
before its parent is judged, so one damaged chunk is one bad chunk, not a chain
of them up the pyramid. A chunk above something that cannot be judged (a bad
level-0 tile, which a repair renders again; a bad chunk whose pixels were not
kept) is not judged: a repair rebuilds it anyway (renderer.pyramid.rebuild_chunks
cascades up from everything it changes).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from creps.errors import first_line

from .errors import RendererError
from .pyramid import Chunk, chunk_rect, downsample, pyramid_current, pyramid_plan, render_levels
from .scaleout import ThreadRunner, in_order
from .store import ImageStore

# storage unreachable or refused: the check cannot go on, nothing is judged
FATAL_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, PermissionError)
WINDOW = 1024  # level-k pixels a side per unit of work (2x that of level k-1 in memory)
KEEP_BYTES = 256 << 20  # expected pixels of bad chunks kept to judge their parents


@dataclass(frozen=True)
class BadChunk:
    """A chunk of pyramid level ``level`` >= 1 that does not hold the 2x2 rule over the level below."""

    level: int
    chunk: Chunk  # (row, column) index among the level's chunks
    path: str  # the stored object, relative to the store URL (ImageStore.chunk_path)
    rows: tuple[int, int]
    cols: tuple[int, int]
    reason: str

    def describe(self) -> str:
        return (
            f"bad level {self.level} chunk {self.path} (rows {self.rows[0]}:{self.rows[1]}, "
            f"cols {self.cols[0]}:{self.cols[1]}): {self.reason}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "chunk": list(self.chunk),
            "path": self.path,
            "rows": list(self.rows),
            "cols": list(self.cols),
            "reason": self.reason,
        }


Found = tuple[BadChunk, np.ndarray]  # a bad chunk and the pixels it should hold


def _bad(store: ImageStore, k: int, chunk: Chunk, reason: str) -> BadChunk:
    r0, r1, c0, c1 = chunk_rect(store, k, chunk)
    return BadChunk(k, chunk, store.chunk_path(k, r0, c0), (r0, r1), (c0, c1), reason)


def _why(stored: np.ndarray, want: np.ndarray, below: int) -> str | None:
    """None when ``stored`` equals ``want``, else how they differ."""
    if np.array_equal(stored, want):
        return None
    if not stored.any():  # what an absent chunk reads as (fill value 0)
        return "no data (chunk missing: reads as empty)"
    n = int(np.count_nonzero((stored != want).any(axis=0)))
    return f"does not hold the 2x2 rule over level {below} ({n} pixels differ)"


def _read(store: ImageStore, k: int, rect: tuple[int, int, int, int], side: int) -> tuple[np.ndarray, dict[Chunk, str]]:
    """Pixels of ``rect`` of level k, and the chunks in it that do not read (zeros there), with why."""
    r0, r1, c0, c1 = rect
    try:
        return store.read_region(k, r0, r1, c0, c1), {}
    except FATAL_ERRORS as e:
        raise RendererError(f"cannot read level {k} of {store.url}: {first_line(e)}") from None
    except Exception:  # some chunk does not decode: each on its own, to know which
        pass
    out = np.zeros((3, r1 - r0, c1 - c0), np.uint8)
    failed: dict[Chunk, str] = {}
    for cy in range(r0 // side, (r1 - 1) // side + 1):
        for cx in range(c0 // side, (c1 - 1) // side + 1):
            y0, y1, x0, x1 = max(r0, cy * side), min(r1, (cy + 1) * side), max(c0, cx * side), min(c1, (cx + 1) * side)
            try:
                out[:, y0 - r0 : y1 - r0, x0 - c0 : x1 - c0] = store.read_region(k, y0, y1, x0, x1)
            except FATAL_ERRORS as e:
                raise RendererError(f"cannot read level {k} of {store.url}: {first_line(e)}") from None
            except Exception as e:
                failed[(cy, cx)] = f"cannot be decoded ({type(e).__name__}: {first_line(e)})"
    return out, failed


def _chunks_of(rect: tuple[int, int, int, int], side: int) -> Iterator[tuple[Chunk, tuple[int, int, int, int]]]:
    """The chunks of a chunk-aligned ``rect`` and each one's part of it, relative to the rect."""
    r0, r1, c0, c1 = rect
    for y in range(r0, r1, side):
        for x in range(c0, c1, side):
            yield (y // side, x // side), (y - r0, min(y + side, r1) - r0, x - c0, min(x + side, c1) - c0)


def block_chunks(store: ImageStore, k: int, y: int, x: int, want: np.ndarray) -> tuple[int, list[Found]]:
    """Compare the stored chunks of level k under a chunk-aligned block at (y, x) with ``want``
    (the rule applied to level k-1 as it should be); (chunks compared, bad ones with their pixels)."""
    side = int(store.level(k).chunks[1])
    rect = (y, y + want.shape[1], x, x + want.shape[2])
    stored, failed = _read(store, k, rect, side)
    bad: list[Found] = []
    n = 0
    for chunk, (a, b, c, d) in _chunks_of(rect, side):
        n += 1
        part = want[:, a:b, c:d]
        reason = failed.get(chunk) or _why(stored[:, a:b, c:d], part, k - 1)
        if reason is not None:
            bad.append((_bad(store, k, chunk, reason), part.copy()))
    return n, bad


@dataclass
class LevelState:
    """What the check knows of the levels so far: bad chunks, the pixels they should hold, and chunks
    that cannot be judged (their parents are not judged either)."""

    bad: list[BadChunk] = field(default_factory=list)
    expected: dict[int, dict[Chunk, np.ndarray]] = field(default_factory=dict)
    unknown: dict[int, set[Chunk]] = field(default_factory=dict)
    kept: int = 0
    checked: int = 0

    def add(self, found: list[Found]) -> None:
        """Record bad chunks; keep their pixels while under ``KEEP_BYTES``, else their parents are not judged."""
        for bad, pixels in found:
            self.bad.append(bad)
            if self.kept + pixels.nbytes <= KEEP_BYTES:
                self.expected.setdefault(bad.level, {})[bad.chunk] = pixels
                self.kept += pixels.nbytes
            else:
                self.unknown.setdefault(bad.level, set()).add(bad.chunk)

    def drop(self, k: int) -> None:
        """Forget the pixels of level k (its parents are judged)."""
        for pixels in self.expected.pop(k, {}).values():
            self.kept -= pixels.nbytes


@dataclass(frozen=True)
class Upper:
    """Levels ``first``..``last`` (built by assemble) to check, and the progress record that says they are current;
    ``note`` says why levels are not checked (empty when there is nothing to say)."""

    first: int
    last: int
    record: dict | None
    note: str = ""


def upper_levels(store: ImageStore) -> Upper:
    """The levels above the render's (L+1..n-1) that ``check_levels`` checks: all of them when the pyramid
    record is current (renderer.pyramid.pyramid_current), none otherwise."""
    low = render_levels(store)
    n = len(pyramid_plan(store))
    if n - 1 <= low:
        return Upper(low + 1, low, None)
    record = store.pyramid_progress()
    if record is None and not store.has_level(low + 1):
        return Upper(low + 1, low, None)  # assemble never ran: nothing to check
    if not pyramid_current(store):
        why = (record or {}).get("stale_reason") if (record or {}).get("stale") else None
        state = f"stale ({why})" if why else "not current (unfinished, or built from other tiles)"
        note = (
            f"levels {low + 1}..{n - 1} not checked: the pyramid is {state}; "
            f"`render.py assemble {store.url}` rebuilds them"
        )
        return Upper(low + 1, low, None, note)
    return Upper(low + 1, n - 1, record)


Window = tuple[int, list[Found], set[Chunk]]  # chunks compared, bad ones, chunks not judged


def _window(
    store: ImageStore,
    k: int,
    rect: tuple[int, int, int, int],
    expected: dict[Chunk, np.ndarray],
    unknown: set[Chunk],
) -> Window:
    """Judge the chunks of level k in ``rect`` (chunk-aligned) against the rule over level k-1 as it should be."""
    side = int(store.level(k).chunks[1])
    _, h, w = store.level(k - 1).shape
    r0, r1, c0, c1 = rect
    below_rect = (2 * r0, min(2 * r1, h), 2 * c0, min(2 * c1, w))
    below, failed = _read(store, k - 1, below_rect, side)
    for (cy, cx), (a, b, c, d) in _chunks_of(below_rect, side):
        if (cy, cx) in expected:
            below[:, a:b, c:d] = expected[(cy, cx)]
    blind = (set(failed) - set(expected)) | unknown
    want = downsample(below)
    stored, stored_failed = _read(store, k, rect, side)
    n, bad, not_judged = 0, [], set()
    for chunk, (a, b, c, d) in _chunks_of(rect, side):
        cy, cx = chunk
        if any((2 * cy + i, 2 * cx + j) in blind for i in (0, 1) for j in (0, 1)):
            not_judged.add(chunk)
            continue
        n += 1
        part = want[:, a:b, c:d]
        reason = stored_failed.get(chunk) or _why(stored[:, a:b, c:d], part, k - 1)
        if reason is not None:
            bad.append((_bad(store, k, chunk, reason), part.copy()))
    return n, bad, not_judged


def _windows(store: ImageStore, k: int, state: LevelState) -> Iterator[Callable[[], Window]]:
    """One unit per window of level k, each with what is known of the chunks of level k-1 under it."""
    arr = store.level(k)
    _, h, w = arr.shape
    side = int(arr.chunks[1])
    step = max(1, WINDOW // side) * side
    per = 2 * step // side  # chunks of level k-1 per window side

    expected: dict[Chunk, dict[Chunk, np.ndarray]] = {}
    for c, pixels in state.expected.get(k - 1, {}).items():
        expected.setdefault((c[0] // per, c[1] // per), {})[c] = pixels
    unknown: dict[Chunk, set[Chunk]] = {}
    for c in state.unknown.get(k - 1, set()):
        unknown.setdefault((c[0] // per, c[1] // per), set()).add(c)
    for y in range(0, h, step):
        for x in range(0, w, step):
            rect = (y, min(y + step, h), x, min(x + step, w))
            key = (y // step, x // step)
            yield functools.partial(_window, store, k, rect, expected.get(key, {}), unknown.get(key, set()))


def check_levels(
    store: ImageStore,
    upper: Upper,
    state: LevelState,
    workers: int,
    on_chunks: Callable[[int], None] | None = None,
) -> LevelState:
    """Check levels ``upper.first``..``upper.last`` one after the other, each in windows on ``workers`` threads
    (at most that many windows in memory); ``state`` holds what is known of level ``upper.first - 1``."""
    runner = ThreadRunner(max(1, workers))
    try:
        for k in range(upper.first, upper.last + 1):
            unknown = state.unknown.setdefault(k, set())
            units = ((unit, ()) for unit in _windows(store, k, state))
            for n, bad, not_judged in in_order(runner, units, ahead=runner.workers):
                state.checked += n
                state.add(bad)
                unknown |= not_judged
                if on_chunks is not None:
                    on_chunks(n + len(not_judged))
            state.drop(k - 1)
    finally:
        runner.close()
    return state


def level_chunk_count(store: ImageStore, upper: Upper) -> int:
    """How many chunks ``check_levels`` looks at (a progress bar's total)."""
    total = 0
    for k in range(upper.first, upper.last + 1):
        arr = store.level(k)
        side = int(arr.chunks[1])
        total += -(-int(arr.shape[1]) // side) * -(-int(arr.shape[2]) // side)
    return total


def recheck(store: ImageStore, chunks: dict[int, set[Chunk]]) -> list[BadChunk]:
    """The chunks of ``chunks`` (level -> chunk indices) that do not hold the rule over the level below as
    stored now (after a repair rebuilt them)."""
    bad = []
    for k in sorted(chunks):
        for chunk in sorted(chunks[k]):
            r0, r1, c0, c1 = chunk_rect(store, k, chunk)
            _, h, w = store.level(k - 1).shape
            side = int(store.level(k).chunks[1])
            below, failed = _read(store, k - 1, (2 * r0, min(2 * r1, h), 2 * c0, min(2 * c1, w)), side)
            stored, stored_failed = _read(store, k, (r0, r1, c0, c1), side)
            problems = [*failed.values(), *stored_failed.values()]
            reason = problems[0] if problems else _why(stored, downsample(below), k - 1)
            if reason is not None:
                bad.append(_bad(store, k, chunk, reason))
    return bad
