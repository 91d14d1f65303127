"""Pyramid levels 1..n-1 of an image store: the 2x2 rule, the one builder of levels, and its record.

The averaging rule (exact, uint8), level k+1 from level k (``downsample``)::

    out[y, x] = (a + b + c + d + 2) // 4      a..d = in[2y:2y+2, 2x:2x+2]

A block that runs off the bottom or right edge (odd height or width) repeats
its last row / column (edge replication), so sizes go down by ceil(n / 2)
(renderer.store.level_shapes). That is the same as the round-half-up mean of
the pixels that exist: two pixels give (a + b + 1) // 2 and a lone corner
pixel stays as it is. ``reference_pyramid`` is the whole-image numpy
statement of the rule; tests compare against it.

Levels stop at the first one whose larger side fits the chunk side T of
level 0 (one tile). Every level is a (3, h, w) uint8 array with chunks
(3, T, T), no shards (whole-chunk writes from one thread each are race free).

The builder: every writer of levels k+1..m from level k goes through here.

- a block of pixels in memory (``halvings``: levels 1..L of a block of level 0,
  each the rule of the one above): the render's workers write them with each
  block they render (``write_block_levels``, renderer.tiles) and
  renderer.verify compares the stored ones with them;
- a pass over the levels that are missing (``build_levels``, or
  ``run_level_pass`` of a started pass): level by level, each level in bands
  of whole chunk rows (``level_bands``) from the level above, either a dask
  graph on local threads (``downsampled``) or one task per band on a
  renderer.scaleout Runner (``level_rows``: local threads or Ray tasks);
  each finished band advances the level's prefix in the progress record.

A render job in blocks writes levels 1..L itself (``render_levels``); a pass
then starts from level L and builds L+1..n-1 only. Stores without that record
(L = 0) are built from level 0.

The progress record (``ImageStore.pyramid_progress``, ``pyramid.json``): each
level's written prefix of rows, and ``source`` (``source_state``: ``tiles_done``
of ``tiles_total`` level-0 tiles when the pass started, and ``partial`` when
some were missing). Pyramid levels are only as good as the tiles they were
averaged from, so:

- a record is *current* (``pyramid_current``) when every level is written, it
  is not ``stale`` and its ``source`` equals the store's tiles now; it is
  *complete* when it is current and not partial (``start_level_pass`` then
  has nothing to do);
- a render marks the record ``stale`` before it writes any tile
  (``ImageStore.invalidate_pyramid``); a pass that sees the mark appear while
  it runs keeps it, and a pass whose source changed under it marks it stale
  itself, so levels averaged from old tiles never pass for current;
- a pass resumes only a record of a finished store that is current except for
  missing rows (each level from its recorded prefix, clamped to what the level
  above has); anything else -- stale, built from other tiles, or partial
  (always rebuilt by the next pass, even when nothing changed) -- is a full
  rebuild of levels L+1..n-1 (no per-region bookkeeping: one pass is cheap
  next to the render it follows). Rewriting a chunk row is idempotent.

Unreadable chunks (a corrupt object, an outage) are one ``RendererError``
naming the level and the chunk (``ImageStore.read_rows``), never a traceback.

Repairs (renderer.verify finds, jobs.verify repairs): ``rebuild_chunks``
writes chosen chunks of levels 1..m again from the level below, level by
level, and with them every parent of a chunk that changed (cascading up), so
one damaged chunk, or one re-rendered tile, leaves no level above it out of
date. A repair that re-rendered tiles had the record marked stale by its
render run; ``restore_record`` puts back the record found current before
once every level above those tiles is rebuilt (the levels are then the
pyramid of the level 0 there, which is what the record says).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from creps.errors import UserError, first_line

from .arrays import level_array
from .errors import RendererError
from .scaleout import Runner, in_order
from .store import ImageStore, level_shapes, open_store

RULE = "level k+1 = (a+b+c+d+2)//4 over 2x2 blocks of level k; odd edges replicate the last row/column"
BAND_PIXELS = 64 << 20  # level pixels per band of block work: a few bands per large level, each a few seconds


# ---------------------------------------------------------------- the rule
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


# ---------------------------------------------------------------- the record: current, complete, stale
def _plan(store: ImageStore) -> tuple[int, list[tuple[int, int]]]:
    base = store.level(0)
    if base.ndim != 3 or base.shape[0] != 3 or base.dtype != np.uint8:
        raise RendererError(f"{store.url} level 0 is {base.shape} {base.dtype}; expected (3, H, W) uint8")
    chunk = int(base.chunks[1])
    h, w = store.shape
    return chunk, level_shapes(h, w, chunk)


def pyramid_plan(store: ImageStore) -> list[tuple[int, int]]:
    """(h, w) of every level the pyramid of ``store`` has or will have."""
    return _plan(store)[1]


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


def pyramid_current(store: ImageStore) -> bool:
    """True when every level is written, the record is not stale and was built from the tiles there now.

    A partial pyramid (built from an unfinished store) can be current: it is
    then exactly the pyramid of the level 0 the store holds.
    """
    chunk, shapes = _plan(store)
    prog = store.pyramid_progress() or {}
    return _reusable(prog, shapes, chunk, source_state(store)) and _all_written(store, prog, shapes, chunk)


# ---------------------------------------------------------------- a pass and its progress record
class LevelPass:
    """A pass that builds levels ``first``..n-1 one level at a time, each from the level above.

    Made by ``start_level_pass``; levels 1..first-1 are there already (the
    render's, ``render_levels``, or finished by an earlier pass).
    ``run_level_pass`` writes whole chunk rows of a level and calls
    ``record(k, rows)`` with the prefix of level k that is written;
    ``finish`` closes the pass (stale check, OME metadata, store meta).
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
        """Close the pass: stale if level-0 tiles changed while it read, the record, the OME
        metadata and the store meta; the level count."""
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


def start_level_pass(store: ImageStore, force: bool = False) -> LevelPass | None:
    """Start a level-by-level pass; None when the pyramid is complete (current, not partial) and not ``force``.

    The record rules of the module docstring: a current record that stopped
    part-way resumes, anything else starts over. Levels 1..L written by the
    render (``render_levels``) are kept and recorded as written (they are as
    good as the tiles they came with); only levels L+1..n-1 are recreated.
    """
    chunk, shapes = _plan(store)
    source = source_state(store)
    prog = store.pyramid_progress() or {}
    reusable = _reusable(prog, shapes, chunk, source)
    if not force and not source["partial"] and reusable and _all_written(store, prog, shapes, chunk):
        return None
    kept = _render_written(store, shapes, chunk)
    prog = _prepare_levels(store, shapes, chunk, force, source, kept, prog)
    return LevelPass(store, shapes, chunk, source, prog, kept)


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


# ---------------------------------------------------------------- the builder: levels k+1..m from level k
def halvings(pixels: np.ndarray, y: int, x: int, last: int) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """Levels 1..``last`` of a (3, h, w) block of level-0 pixels at (y, x): (k, y_k, x_k, pixels_k),
    each the rule of the one before.

    Exactly the whole image's pixels of each level when the block starts at
    an even row and column of every level it averages (a block of whole
    chunks, 2^last of them per side, or one that ends at the image's edge):
    renderer.tiles writes them, renderer.verify compares them.
    """
    for k in range(1, last + 1):
        pixels, y, x = downsample(pixels), y // 2, x // 2
        yield k, y, x, pixels


def write_block_levels(store: ImageStore, pixels: np.ndarray, y: int, x: int, last: int) -> None:
    """Write levels 1..``last`` of a block of level-0 pixels at (y, x) (``halvings``), whole chunks each."""
    for k, yk, xk, img in halvings(pixels, y, x, last):
        store.write_chunks(k, yk, xk, img)


Chunk = tuple[int, int]  # (row, column) index of a chunk of a level


def chunk_rect(store: ImageStore, k: int, chunk: Chunk) -> tuple[int, int, int, int]:
    """[r0, r1, c0, c1) of level k's pixels in chunk ``chunk`` (clipped at the level's edge)."""
    arr = store.level(k)
    _, h, w = arr.shape
    side_y, side_x = int(arr.chunks[1]), int(arr.chunks[2])
    cy, cx = chunk
    return cy * side_y, min((cy + 1) * side_y, h), cx * side_x, min((cx + 1) * side_x, w)


def rebuild_chunk(store: ImageStore, k: int, chunk: Chunk) -> None:
    """Write chunk ``chunk`` of level k >= 1 again: the rule over the pixels of level k-1 it averages."""
    r0, r1, c0, c1 = chunk_rect(store, k, chunk)
    _, h, w = store.level(k - 1).shape
    below = store.read_block(k - 1, 2 * r0, min(2 * r1, h), 2 * c0, min(2 * c1, w))
    store.write_chunks(k, r0, c0, downsample(below))


def rebuild_chunks(
    store: ImageStore,
    bad: dict[int, set[Chunk]],
    last: int,
    written: dict[int, set[Chunk]] | None = None,
    workers: int = 4,
) -> dict[int, set[Chunk]]:
    """Rebuild the ``bad`` chunks of levels 1..``last`` from the level below, cascading up; return what was written.

    Level by level from 1: the chunks to write at level k are its ``bad`` ones
    and the parents of every chunk of level k-1 that changed (rebuilt here,
    or in ``written``: chunks already written again by someone else, e.g.
    level-0 chunks and levels 1..L of blocks a repair re-rendered); chunks in
    ``written[k]`` are not written again. Each chunk is computed from level
    k-1 as stored after the levels below were repaired, so the result is the
    pyramid of level 0 over every chunk touched.
    """
    written = written or {}
    rebuilt: dict[int, set[Chunk]] = {}
    changed = set(written.get(0, set()))
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="rebuild") as pool:
        for k in range(1, last + 1):
            todo = (bad.get(k, set()) | {(y // 2, x // 2) for y, x in changed}) - written.get(k, set())
            list(pool.map(lambda c, k=k: rebuild_chunk(store, k, c), sorted(todo)))
            rebuilt[k] = todo
            changed = todo | written.get(k, set())
    return rebuilt


def restore_record(store: ImageStore, record: dict) -> bool:
    """Put back a progress ``record`` found current before a repair re-rendered tiles (their render marked it
    stale) once every level above them is rebuilt (``rebuild_chunks``); False (nothing written) when the
    store's level-0 tiles are not the ones the record names (the repair rendered more): then it stays stale."""
    if not _same_source(record, source_state(store)) or record.get("stale"):
        return False
    store.write_pyramid_progress(record)
    return True


def level_bands(
    height: int, width: int, chunk: int, start: int = 0, pixels: int = BAND_PIXELS
) -> list[tuple[int, int]]:
    """[r0, r1) of whole chunk rows of a level to build, from row ``start`` (a chunk row boundary)."""
    rows = max(1, pixels // max(1, width * chunk)) * chunk
    return [(r, min(r + rows, height)) for r in range(start, height, rows)]


def write_rows(store: ImageStore, k: int, r0: int, r1: int) -> int:
    """Write rows [r0, r1) of level k (whole chunk rows) from level k-1, a chunk row at a time; return the rows."""
    above, out = store.level(k - 1), store.level(k)
    h_above = int(above.shape[1])
    step = int(out.chunks[1])
    for y in range(r0, r1, step):
        y1 = min(y + step, r1)
        out[:, y:y1, :] = downsample(store.read_rows(k - 1, 2 * y, min(2 * y1, h_above), above))
    return r1 - r0


def level_rows(url: str, storage_options: dict | None, k: int, r0: int, r1: int) -> int:
    """``write_rows`` on the store at ``url``: the band task a Runner runs (a thread, or a Ray task on any node)."""
    return write_rows(open_store(url, storage_options, mode="a"), k, r0, r1)


def halved(src: Any, chunk: int) -> Any:
    """The next level of a (3, h, w) uint8 dask array as a graph: ``downsample`` per 2x2 block of
    ``chunk`` chunks, so its blocks are ``chunk`` chunks (the last row / column of blocks may be
    odd-sized above: downsample replicates the edge)."""
    blocks = src.rechunk((3, 2 * chunk, 2 * chunk))
    out_chunks = ((3,), tuple((n + 1) // 2 for n in blocks.chunks[1]), tuple((n + 1) // 2 for n in blocks.chunks[2]))
    return blocks.map_blocks(downsample, chunks=out_chunks, dtype=np.uint8)


def downsampled(store: ImageStore, k: int) -> Any:
    """Level k+1 as a dask graph over stored level k, read in blocks of 2x2 stored chunks (``halved``)."""
    chunk = int(store.level(k).chunks[1])
    return halved(level_array(store, k, (3, 2 * chunk, 2 * chunk)), chunk)


def build_levels(
    store: ImageStore,
    runner: Runner | None = None,
    storage_options: dict | None = None,
    workers: int | None = None,
    force: bool = False,
    band_pixels: int = BAND_PIXELS,
) -> int:
    """Build the pyramid levels that are missing (L+1..n-1 from level L); return the level count.

    Nothing is done when the pyramid is complete (``start_level_pass``)
    unless ``force``. Without ``runner`` a dask graph per level runs on
    ``workers`` threads (default: one per core); with one, a task per band
    of about ``band_pixels`` output pixels (whole chunk rows).
    """
    lp = start_level_pass(store, force=force)
    if lp is None:
        return len(pyramid_plan(store))
    return run_level_pass(lp, runner, storage_options, workers, band_pixels)


def run_level_pass(
    lp: LevelPass,
    runner: Runner | None = None,
    storage_options: dict | None = None,
    workers: int | None = None,
    band_pixels: int = BAND_PIXELS,
) -> int:
    """Build levels ``lp.first``.. of a started pass, one level at a time, each in bands from the
    level above, recording each band (``build_levels``; the exports run it beside their bands of
    the levels already there); return the level count."""
    store = lp.store
    for k in range(lp.first, len(lp.shapes)):
        h, w = lp.shapes[k]
        bands = level_bands(h, w, lp.chunk, start=lp.done[k], pixels=band_pixels)
        try:
            if runner is None:
                _dask_level(store, lp, k, bands, workers or os.cpu_count() or 2)
            else:
                calls = [(level_rows, (store.url, storage_options, k, r0, r1)) for r0, r1 in bands]
                for (_, r1), _rows in zip(bands, in_order(runner, calls, ahead=len(calls)), strict=True):
                    lp.record(k, r1)
        except UserError:
            raise
        except Exception as e:
            raise RendererError(f"cannot build pyramid level {k} of {store.url}: {first_line(e)}") from e
    return lp.finish()


def _dask_level(store: ImageStore, lp: LevelPass, k: int, bands: list[tuple[int, int]], workers: int) -> None:
    import dask.array as da

    graph = downsampled(store, k - 1)
    arr: Any = store.level(k)
    for r0, r1 in bands:
        region = (slice(None), slice(r0, r1), slice(None))
        da.store(graph[region], arr, regions=region, lock=False, scheduler="threads", num_workers=workers)
        lp.record(k, r1)
