"""Pyramid levels 1..n of an image store, by 2x2 averaging, from one pass over level 0 (or level L).

A render job in blocks writes levels 1..L itself, block by block with its
tiles (``render_levels``, renderer.tiles); a pass then starts from level L
and builds L+1..n-1 only. Stores without that record (L = 0) are built from
level 0 as below.

The averaging rule (exact, uint8), level k+1 from level k::

    out[y, x] = (a + b + c + d + 2) // 4      a..d = in[2y:2y+2, 2x:2x+2]

A block that runs off the bottom or right edge (odd height or width) repeats
its last row / column (edge replication), so sizes go down by ceil(n / 2).
That is the same as the round-half-up mean of the pixels that exist: two
pixels give (a + b + 1) // 2 and a lone corner pixel stays as it is.
`reference_pyramid` is the whole-image numpy statement of the rule; tests
compare against it.

Levels stop at the first one whose larger side fits ``min_size`` (default: the
chunk side T of level 0, i.e. one tile). Every level is a (3, h, w) uint8
array with chunks (3, T, T), no shards (whole-chunk writes from one thread
each are race free).

Memory is bounded by strips, never by the image: level 0 is read one strip of
chunk rows at a time; each level keeps the rows it produced until they fill a
chunk row (T rows), writes that chunk row and passes the same rows straight
on to the next level (a cascade), so all levels come out of one read of
level 0 with about two strips per level in memory. Reads are prefetched and
writes run on a thread pool (zarr also decodes chunks on its own threads).

Resume: after each chunk row is written the completed prefix of every level
is recorded in the store's pyramid progress record (``ImageStore.pyramid_progress``).
A re-run reads it, restarts level 1 at its first missing row and re-seeds each
deeper level from the few stored rows of the level above that it still needs,
so it finishes without redoing finished work; rewriting a chunk row is
idempotent (same bytes).

Which level 0 it was built from: the record also holds ``source``
(``source_state``: ``tiles_done`` of ``tiles_total`` level-0 tiles when the pass
started, and ``partial`` when some were missing). Pyramid levels are only as
good as the tiles they were averaged from, so:

- a record is *current* (``pyramid_current``) when every level is written, it
  is not ``stale`` and its ``source`` equals the store's tiles now; it is
  *complete* (``pyramid_complete``) when it is current and not partial;
- a render marks the record ``stale`` before it writes any tile
  (``ImageStore.invalidate_pyramid``); a pass that sees the mark appear while
  it runs keeps it, and a pass whose source changed under it marks it stale
  itself, so levels averaged from old tiles never pass for current;
- ``build_pyramid`` resumes only a record of a finished store that is current
  except for missing rows; anything else -- stale, built from other tiles, or
  partial (always rebuilt by the next pass, even when nothing changed) -- is a
  full rebuild of levels 1..n-1 from level 0 (no per-region bookkeeping: one
  pass is cheap next to the render it follows).

Unreadable chunks (a corrupt object, an outage) are one ``RendererError``
naming the level and the chunk (``read_rows``), never a traceback.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from creps.errors import UserError, first_line

from .errors import RendererError
from .store import ImageStore

RULE = "level k+1 = (a+b+c+d+2)//4 over 2x2 blocks of level k; odd edges replicate the last row/column"


# ---------------------------------------------------------------- the rule
def level_shapes(height: int, width: int, min_size: int) -> list[tuple[int, int]]:
    """(h, w) of levels 0..n-1: halve (ceil) until the larger side is <= min_size."""
    if min_size < 1:
        raise RendererError(f"pyramid min_size must be >= 1, got {min_size}")
    shapes = [(height, width)]
    while max(shapes[-1]) > min_size:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def downsample(block: np.ndarray) -> np.ndarray:
    """(c, h, w) uint8 -> (c, ceil(h/2), ceil(w/2)) by the documented 2x2 rule."""
    c, h, w = block.shape
    if h % 2:
        block = np.concatenate([block, block[:, -1:, :]], axis=1)
    rows = block[:, 0::2, :].astype(np.uint16)
    rows += block[:, 1::2, :]
    out = np.empty((c, rows.shape[1], (w + 1) // 2), np.uint16)
    even = w // 2
    np.add(rows[:, :, 0 : 2 * even : 2], rows[:, :, 1 : 2 * even : 2], out=out[:, :, :even])
    if w % 2:
        out[:, :, even] = 2 * rows[:, :, w - 1]
    out += 2
    out >>= 2
    return out.astype(np.uint8)


def reference_pyramid(image: np.ndarray, min_size: int) -> list[np.ndarray]:
    """All levels of a whole (3, H, W) image, computed the plain way (for tests)."""
    levels = [image]
    for _ in level_shapes(image.shape[1], image.shape[2], min_size)[1:]:
        prev = levels[-1].astype(np.int64)
        p = np.pad(prev, ((0, 0), (0, prev.shape[1] % 2), (0, prev.shape[2] % 2)), mode="edge")
        s = p[:, 0::2, 0::2] + p[:, 1::2, 0::2] + p[:, 0::2, 1::2] + p[:, 1::2, 1::2]
        levels.append(((s + 2) // 4).astype(np.uint8))
    return levels


# ---------------------------------------------------------------- levels written by the render
def render_levels(store: ImageStore) -> int:
    """L: levels 1..L are written by the render's workers with their tiles (0 for stores without).

    A worker renders whole blocks of G x G plan tiles (G a power of two) and
    writes each block's levels 1..L (L <= log2 G) before its marker, so for
    every done tile those levels are already there and consistent with it;
    a pyramid pass only builds levels L+1.. from level L.
    """
    return store.block_levels[1]


# ---------------------------------------------------------------- progress
def _plan(store: ImageStore, min_size: int | None) -> tuple[int, list[tuple[int, int]]]:
    base = store.level(0)
    if base.ndim != 3 or base.shape[0] != 3 or base.dtype != np.uint8:
        raise RendererError(f"{store.url} level 0 is {base.shape} {base.dtype}; expected (3, H, W) uint8")
    chunk = int(base.chunks[1])
    h, w = store.shape
    return chunk, level_shapes(h, w, min_size or chunk)


def pyramid_plan(store: ImageStore, min_size: int | None = None) -> list[tuple[int, int]]:
    """(h, w) of every level the pyramid of ``store`` has or will have."""
    return _plan(store, min_size)[1]


def source_state(store: ImageStore) -> dict:
    """The level-0 tiles the store holds now: ``{"tiles_done", "tiles_total", "partial"}``.

    ``tiles_total`` is the render job's tile count (``meta["tiles_total"]``); a
    store without one (not made by a render job) counts as complete.
    """
    done = store.done_count()
    total = store.meta.get("tiles_total")
    if not isinstance(total, int) or isinstance(total, bool):
        return {"tiles_done": done, "tiles_total": None, "partial": False}
    return {"tiles_done": done, "tiles_total": total, "partial": done < total}


def _same_source(prog: dict, source: dict) -> bool:
    src = prog.get("source")
    return isinstance(src, dict) and all(src.get(k) == source[k] for k in ("tiles_done", "tiles_total", "partial"))


def _reusable(prog: dict, shapes: list[tuple[int, int]], chunk: int, source: dict) -> bool:
    """The record belongs to this plan and to the level-0 tiles the store holds now, and is not stale."""
    return (
        prog.get("shapes") == [list(s) for s in shapes]
        and prog.get("chunk") == chunk
        and not prog.get("stale")
        and _same_source(prog, source)
    )


def _all_written(store: ImageStore, prog: dict, shapes: list[tuple[int, int]], chunk: int) -> bool:
    rows = prog.get("rows", {})
    first = _render_written(store, shapes, chunk)
    return isinstance(rows, dict) and all(
        (k <= first or rows.get(str(k)) == h) and store.has_level(k) and store.level(k).shape == (3, h, w)
        for k, (h, w) in enumerate(shapes[1:], start=1)
    )


def pyramid_current(store: ImageStore, min_size: int | None = None) -> bool:
    """True when every level is written, the record is not stale and was built from the tiles there now.

    A partial pyramid (built from an unfinished store) can be current: it is
    then exactly the pyramid of the level 0 the store holds.
    """
    chunk, shapes = _plan(store, min_size)
    prog = store.pyramid_progress() or {}
    return _reusable(prog, shapes, chunk, source_state(store)) and _all_written(store, prog, shapes, chunk)


def pyramid_complete(store: ImageStore, min_size: int | None = None) -> bool:
    """True when the pyramid is current (``pyramid_current``) and was built from every level-0 tile.

    False for a stale record, a partial one, one built from other tiles than
    the store holds now, and a record of an older version (no ``source``).
    """
    chunk, shapes = _plan(store, min_size)
    prog = store.pyramid_progress() or {}
    source = source_state(store)
    return not source["partial"] and _reusable(prog, shapes, chunk, source) and _all_written(store, prog, shapes, chunk)


def read_rows(store: ImageStore, level: int, r0: int, r1: int, arr: Any = None) -> np.ndarray:
    """Rows [r0, r1) of a stored level as (3, r1 - r0, w); an unreadable chunk is one ``RendererError``.

    The error names the level and the first chunk (or shard) object that
    fails to read or decode on its own, e.g. a corrupt chunk file.
    """
    arr = store.level(level) if arr is None else arr
    try:
        return np.asarray(arr[:, r0:r1, :])
    except UserError:
        raise
    except Exception as e:
        raise RendererError(_unreadable(store, level, arr, r0, r1, e)) from e


def _unreadable(store: ImageStore, level: int, arr: Any, r0: int, r1: int, error: Exception) -> str:
    """Name the first chunk of rows [r0, r1) that does not read by itself (best effort)."""
    shards = getattr(arr, "shards", None)
    outer = shards or arr.chunks
    sy, sx = int(outer[1]), int(outer[2])
    width = int(arr.shape[2])
    for y0 in range(r0 // sy * sy, r1, sy):
        for x0 in range(0, width, sx):
            try:
                np.asarray(arr[:, y0 : y0 + sy, x0 : x0 + sx])
            except Exception as e:
                return (
                    f"level {level} chunk {store.chunk_path(level, y0, x0)} of {store.url} (rows {y0}:{min(y0 + sy, int(arr.shape[1]))}, "
                    f"cols {x0}:{min(x0 + sx, width)}) is unreadable: {first_line(e)}; re-render those "
                    "tiles (or restore the store) and re-run"
                )
    return f"cannot read rows {r0}:{r1} of level {level} of {store.url}: {first_line(error)}"


# ---------------------------------------------------------------- the cascade
class _Level:
    """Level k >= 1 as a stream: takes rows of level k-1 in order, emits its own rows.

    Rows it produced are kept until they fill a chunk row of T rows (or the
    level ends), then written with ``write``; the same rows go on to the next
    level at once. ``start`` is the first row not yet written, ``received`` the
    number of input rows seen (resume starts both part-way).
    """

    def __init__(
        self,
        k: int,
        shape: tuple[int, int],
        in_height: int,
        chunk: int,
        write: Callable[[int, int, np.ndarray], None],
        start: int,
    ) -> None:
        self.k, self.height, self.width = k, shape[0], shape[1]
        self.in_height, self.chunk, self.write = in_height, chunk, write
        self.start = start
        self.received = min(2 * start, in_height)
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.carry: np.ndarray | None = None  # an odd input row waiting for its pair
        self.next: _Level | None = None

    def push(self, rows: np.ndarray) -> None:
        self.received += rows.shape[1]
        if self.carry is not None:
            rows = np.concatenate([self.carry, rows], axis=1)
            self.carry = None
        last = self.received >= self.in_height
        if rows.shape[1] % 2 and not last:
            self.carry, rows = rows[:, -1:, :].copy(), rows[:, :-1, :]
        if rows.shape[1]:
            self._emit(downsample(rows))

    def _emit(self, out: np.ndarray) -> None:
        if self.next is not None:
            self.next.push(out)
        self.pending.append(out)
        self.pending_rows += out.shape[1]
        end = self.start + self.pending_rows
        while self.pending_rows and (end - self.start >= self.chunk or end >= self.height):
            block = np.concatenate(self.pending, axis=1) if len(self.pending) > 1 else self.pending[0]
            n = min(self.chunk - self.start % self.chunk, block.shape[1])
            self.write(self.k, self.start, block[:, :n])
            self.start += n
            rest = block[:, n:]
            self.pending = [rest] if rest.shape[1] else []
            self.pending_rows = rest.shape[1]


class _Writer:
    """Writes chunk rows on a pool and keeps the completed prefix per level."""

    def __init__(self, store: ImageStore, pool: ThreadPoolExecutor, progress: dict, max_pending: int) -> None:
        self.store, self.pool, self.progress = store, pool, progress
        self.max_pending = max_pending
        self.inflight: deque[tuple[int, int, Future]] = deque()
        self.arrays: dict[int, Any] = {}  # group lookups re-read metadata; do them once

    def __call__(self, k: int, r0: int, rows: np.ndarray) -> None:
        arr = self.arrays.get(k)
        if arr is None:
            arr = self.arrays[k] = self.store.level(k)
        fut = self.pool.submit(arr.__setitem__, (slice(None), slice(r0, r0 + rows.shape[1]), slice(None)), rows)
        self.inflight.append((k, r0 + rows.shape[1], fut))
        self.retire()
        while len(self.inflight) > self.max_pending:
            self.retire(block=True)

    def retire(self, block: bool = False) -> None:
        """Record finished writes in submission order (so each level's prefix is contiguous)."""
        changed = False
        while self.inflight and (block or self.inflight[0][2].done()):
            k, end, fut = self.inflight.popleft()
            try:
                fut.result()
            except UserError:
                raise
            except Exception as e:
                raise RendererError(f"cannot write level {k} of {self.store.url}: {first_line(e)}") from e
            self.progress["rows"][str(k)] = max(self.progress["rows"].get(str(k), 0), end)
            changed, block = True, False
        if changed:
            self.save()

    def save(self) -> None:
        _save_progress(self.store, self.progress)

    def drain(self) -> None:
        while self.inflight:
            self.retire(block=True)


def _resume_rows(prog: dict, shapes: list[tuple[int, int]], chunk: int) -> list[int]:
    """Completed rows per level, clamped so each level's prefix only rests on finished rows above."""
    rows = [shapes[0][0]]
    for k, (h, _) in enumerate(shapes[1:], start=1):
        r = int(prog.get("rows", {}).get(str(k), 0))
        above, h_above = rows[-1], shapes[k - 1][0]
        if min(2 * r, h_above) > above:  # needs rows above that are not written yet
            r = (above // 2) // chunk * chunk
        rows.append(min(r, h))
    return rows


def _prepare_levels(
    store: ImageStore, shapes: list[tuple[int, int]], chunk: int, force: bool, source: dict, first: int, prog: dict
) -> dict:
    """Create or check arrays first+1..n-1, drop stale deeper ones; return the progress record.

    A record that is not reusable (other plan, stale, built from other tiles,
    partial, or ``force``) starts over: every level the pass builds is
    recreated empty (a full rebuild). Levels 1..``first`` are the render's
    (written with their tiles) and are never touched here. ``prog`` is the
    record as the caller read it.
    """
    if force or source["partial"] or not _reusable(prog, shapes, chunk, source):
        prog = {
            "shapes": [list(s) for s in shapes],
            "chunk": chunk,
            "rule": RULE,
            "rows": {},
            "source": dict(source),
            "started": time.time(),
        }
    for k, (h, w) in enumerate(shapes[1:], start=1):
        if k <= first:
            prog["rows"][str(k)] = h
            continue
        ok = (
            store.has_level(k)
            and store.level(k).shape == (3, h, w)
            and tuple(store.level(k).chunks) == (3, chunk, chunk)
            and str(k) in prog["rows"]
        )
        if not ok:
            store.create_level(k, h, w, chunk=chunk, overwrite=True)
            prog["rows"][str(k)] = 0
    store.delete_levels_from(len(shapes))  # deeper levels of an older plan
    store.write_pyramid_progress(prog)
    return prog


def build_pyramid(
    store: ImageStore,
    min_size: int | None = None,
    workers: int | None = None,
    progress: bool = False,
    force: bool = False,
    tap: Callable[[int, np.ndarray], None] | None = None,
) -> int:
    """Write levels 1..n-1 from one pass over level 0 and the NGFF metadata; return n.

    Levels 1..L written by the render with its tiles (``render_levels``) are
    not rebuilt: the pass reads level L and makes L+1..n-1 from it.
    Does nothing when the pyramid is complete (``pyramid_complete``); resumes a
    current record that stopped part-way; anything else -- a stale record, one
    built from other level-0 tiles, a partial one -- is a full rebuild (see the
    module docstring); ``force`` always rebuilds. The record keeps the source
    it was built from (``source_state`` at the start of the pass; ``partial``
    when tiles were missing), and is marked stale when tiles change under it.
    ``workers`` threads read and write chunk rows (default: CPU count, at least 2).
    ``tap(r0, strip)`` sees every (3, h, W) strip of level 0 read by the pass, in
    order (the exports use it to avoid a second read); a resumed pass reads only
    part of level 0, so a caller must check what it saw.
    """
    lp = start_level_pass(store, min_size, force)
    if lp is None:
        return len(pyramid_plan(store, min_size))
    shapes, chunk, prog, done, first = lp.shapes, lp.chunk, lp.prog, lp.done, lp.kept
    workers = workers or max(2, os.cpu_count() or 2)
    with ThreadPoolExecutor(workers) as pool:
        writer = _Writer(store, pool, prog, max_pending=2 * workers)
        levels = [_Level(k, shapes[k], shapes[k - 1][0], chunk, writer, done[k]) for k in range(first + 1, len(shapes))]
        for a, b in itertools.pairwise(levels):
            a.next = b
        # deepest first: each level gets the stored rows above it that it still needs
        for lev in reversed(levels[1:]):
            _feed(store, pool, lev.k - 1, lev.received, done[lev.k - 1], lev.push, chunk)
        if levels:
            top = levels[0].k - 1  # level 0, or the render's last level L
            _feed(
                store, pool, top, levels[0].received, shapes[top][0], levels[0].push, chunk, progress,
                tap if top == 0 else None,
            )  # fmt: skip
        writer.drain()
    return lp.finish()


def _feed(
    store: ImageStore,
    pool: ThreadPoolExecutor,
    level: int,
    r0: int,
    r1: int,
    push: Callable[[np.ndarray], None],
    chunk: int,
    progress: bool = False,
    tap: Callable[[int, np.ndarray], None] | None = None,
) -> None:
    """Read rows [r0, r1) of a stored level in chunk-row strips (one prefetched) and push them."""
    if r1 <= r0:
        return
    arr = store.level(level)
    shards = getattr(arr, "shards", None)
    step = int(shards[1]) if shards else chunk  # whole stored chunks (or shards) per read
    bounds = [r0, *range((r0 // step + 1) * step, r1, step), r1]
    reads = list(itertools.pairwise(bounds))

    def read(a: int, b: int) -> np.ndarray:
        return read_rows(store, level, a, b, arr)

    bar: Any = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=r1 - r0, unit="row", desc="pyramid", leave=False, disable=None)  # terminals only
    try:
        nxt = pool.submit(read, *reads[0])
        for i in range(len(reads)):
            rows = nxt.result()
            if i + 1 < len(reads):
                nxt = pool.submit(read, *reads[i + 1])
            push(rows)
            if tap is not None:
                tap(reads[i][0], rows)
            if bar is not None:
                bar.update(rows.shape[1])
    finally:
        if bar is not None:
            bar.close()


# ---------------------------------------------------------------- passes level by level (renderer.scaleout)
class LevelPass:
    """A pass that builds levels ``first``..n-1 one level at a time, each from the level above.

    Made by ``start_level_pass``; levels 1..first-1 are there already (the
    render's, ``render_levels``, or finished by an earlier pass). The block
    work writes whole chunk rows of a level and calls ``record(k, rows)`` with
    the prefix of level k that is written; ``finish`` closes the pass like
    ``build_pyramid`` does (stale check, OME metadata, store meta).
    """

    def __init__(
        self, store: ImageStore, shapes: list[tuple[int, int]], chunk: int, source: dict, prog: dict, kept: int = 0
    ) -> None:
        self.store, self.shapes, self.chunk, self.source, self.prog = store, shapes, chunk, source, prog
        self.kept = kept  # levels 1..kept are the render's (render_levels), never rebuilt
        self.done = _resume_rows(prog, shapes, chunk)  # rows of each level already written (level 0: all)
        self.first = next((k for k in range(1, len(shapes)) if self.done[k] < shapes[k][0]), len(shapes))

    def record(self, k: int, rows: int) -> None:
        """Rows [0, rows) of level k are written: save the record (keeping a stale mark a render set)."""
        self.done[k] = max(self.done[k], rows)
        self.prog["rows"][str(k)] = self.done[k]
        _save_progress(self.store, self.prog)

    def finish(self) -> int:
        """Close the pass (either builder): stale if level-0 tiles changed while it read, the
        record, the OME metadata and the store meta; the level count."""
        store, prog, source = self.store, self.prog, self.source
        after = source_state(store)
        if not prog.get("stale") and after != source:  # tiles landed while we read
            prog["stale"] = True
            prog["stale_reason"] = (
                f"level-0 tiles changed during the pyramid pass ({source['tiles_done']} -> {after['tiles_done']} done)"
            )
        _save_progress(store, prog)
        store.write_ome()
        store.update_meta(pyramid={"levels": len(self.shapes), "chunk": self.chunk, "rule": RULE, "source": source})
        return len(self.shapes)


def _save_progress(store: ImageStore, prog: dict) -> None:
    """Write the progress record, keeping a ``stale`` mark a render set since the pass began."""
    if not prog.get("stale"):
        current = store.pyramid_progress() or {}
        if current.get("stale"):
            prog["stale"] = True
            prog["stale_reason"] = current.get("stale_reason", "level-0 tiles changed")
    store.write_pyramid_progress(prog)


def _render_written(store: ImageStore, shapes: list[tuple[int, int]], chunk: int) -> int:
    """How many of levels 1..L (``render_levels``) are there with the planned shape and chunks."""
    n = 0
    for k in range(1, min(render_levels(store), len(shapes) - 1) + 1):
        h, w = shapes[k]
        if not (store.has_level(k) and store.level(k).shape == (3, h, w)):
            break
        if tuple(store.level(k).chunks) != (3, chunk, chunk):
            break
        n = k
    return n


def start_level_pass(store: ImageStore, min_size: int | None = None, force: bool = False) -> LevelPass | None:
    """Start a level-by-level pass; None when the pyramid is complete (``pyramid_complete``) and not ``force``.

    The same record rules as ``build_pyramid``: a current record that stopped
    part-way resumes, anything else starts over. Levels 1..L written by the
    render (``render_levels``) are kept and recorded as written (they are as
    good as the tiles they came with); only levels L+1..n-1 are recreated.
    """
    chunk, shapes = _plan(store, min_size)
    source = source_state(store)
    prog = store.pyramid_progress() or {}
    reusable = _reusable(prog, shapes, chunk, source)
    if not force and not source["partial"] and reusable and _all_written(store, prog, shapes, chunk):
        return None
    kept = _render_written(store, shapes, chunk)
    prog = _prepare_levels(store, shapes, chunk, force, source, kept, prog)
    return LevelPass(store, shapes, chunk, source, prog, kept)


def read_block(store: ImageStore, level: int, r0: int, r1: int, c0: int, c1: int, arr: Any = None) -> np.ndarray:
    """Pixels [r0:r1, c0:c1] of a stored level, (3, h, w); an unreadable chunk is one ``RendererError`` (``read_rows``)."""
    arr = store.level(level) if arr is None else arr
    try:
        return np.asarray(arr[:, r0:r1, c0:c1])
    except UserError:
        raise
    except Exception as e:
        raise RendererError(_unreadable(store, level, arr, r0, r1, e)) from e
