"""verify: check every tile and every pyramid level of a store; repair what is damaged; check its exports.

  render.py verify out/img.zarr
  render.py verify s3://bucket/img.zarr --storage-options '{"anon": false}' --no-repair
  render.py verify out/img.zarr --export elsewhere/img.tif    (an export the store does not list)
  render.py render ... --verify                     (the same check after a render)

Each finished tile's completion marker holds the crc32 of its pixels.  verify
reads every marked tile back from level 0 (a few at a time, on --threads
threads), decodes it and compares; every chunk of every pyramid level present
must hold the 2x2 rule over the level below (renderer.verify).  Each bad
tile or level chunk is reported on one line.  Then the repair:

- bad tiles are rendered again by the store's own job (its saved spec;
  --storage-options, --workers and --address given here win, since saved
  storage options may be stale) -- with their blocks' levels 1..L -- and
  checked again.  Re-rendering runs the job, so tiles not rendered yet are
  rendered too;
- bad level chunks are rebuilt from the level below, and so is every chunk
  above a rebuilt chunk or a re-rendered tile, up to the top of the levels
  checked (renderer.pyramid.rebuild_chunks), under the store's writer lease;
  the rebuilt chunks are checked again.  A pyramid found current stays current.

Then each export the store lists (assemble records them) or given with
--export is compared with the store through its ``<export>.source.json``
(renderer.provenance.export_state): a repair changes the store's generation,
so every export made before reads stale until `render.py assemble` makes it
again; the line says which command does.

Exit code 0: every tile and level chunk is good (or was repaired); 1: damage
remains (--no-repair, or a repair that did not fix it); 2: bad input.  The
state of the exports does not change the exit code: they are not the store.

A store made by `render.py import` has no job to re-render from: its bad
tiles are reported and the error line says how to import the picture again
(exit 1); its level chunks are rebuilt as any store's.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from collections.abc import Callable
from typing import Any

from creps.cli import command, follow_up
from renderer.errors import RendererError
from renderer.fsio import parse_storage_options
from renderer.provenance import ExportState, export_key, export_state, recorded_exports
from renderer.pyramid import Chunk, rebuild_chunks, restore_record, source_state
from renderer.store import ImageStore, open_store, store_lease
from renderer.verify import DEFAULT_WORKERS, BadTile, VerifyReport, rerendered, verify_store
from renderer.verify_levels import BadChunk, level_chunk_count, recheck, upper_levels

from . import JobSpecError
from .importer import ReimportNeeded, reimport_command
from .spec import JobSpec

Log = Callable[[str], None]


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


@dataclasses.dataclass(frozen=True)
class VerifyOutcome:
    """One check of a store, and the repair that followed it (if any)."""

    report: VerifyReport  # the first check: every marked tile, every level checked
    rerendered: tuple[str, ...] = ()  # tiles rendered again
    remaining: tuple[BadTile, ...] = ()  # bad after the repair (or all bad ones without one)
    rebuilt: tuple[tuple[int, int, int], ...] = ()  # (level, row, column) of level chunks written again
    remaining_chunks: tuple[BadChunk, ...] = ()  # level chunks bad after the repair (or all, without one)

    @property
    def ok(self) -> bool:
        return not self.remaining and not self.remaining_chunks

    def to_dict(self) -> dict[str, Any]:
        return {
            "checked": self.report.checked,
            "bad": [b.to_dict() for b in self.report.bad],
            "rerendered": list(self.rerendered),
            "remaining": [b.id for b in self.remaining],
            "levels": list(self.report.levels),
            "chunks_checked": self.report.chunks_checked,
            "bad_chunks": [b.to_dict() for b in self.report.bad_chunks],
            "rebuilt_chunks": [list(c) for c in self.rebuilt],
            "remaining_chunks": [b.path for b in self.remaining_chunks],
        }

    def headline(self) -> str:
        """A few words for a summary line: 'verified 16 tiles: 2 bad, re-rendered'."""
        n, bad = self.report.checked, len(self.report.bad)
        text = f"verified {n} tiles: " + ("all good" if not bad else f"{bad} bad")
        if self.rerendered:
            text += ", re-rendered" if not self.remaining else f", re-rendered, {len(self.remaining)} still bad"
        elif bad:
            text += " (not repaired)"
        chunks = len(self.report.bad_chunks)
        if chunks:
            text += f"; {chunks} bad level chunks" + (", rebuilt" if self.rebuilt else " (not repaired)")
        return text

    @classmethod
    def unrepaired(cls, report: VerifyReport) -> VerifyOutcome:
        return cls(report, remaining=report.bad, remaining_chunks=report.bad_chunks)


def check(store: ImageStore, threads: int = DEFAULT_WORKERS, progress: bool = False) -> VerifyReport:
    """``verify_store`` with progress bars on stderr (tiles, then the levels assemble built)."""
    from tqdm import tqdm

    total = len(store.done_tiles())
    chunks = level_chunk_count(store, upper_levels(store)) if progress else 0
    with (
        tqdm(total=total, unit="tile", desc="verify", disable=not progress, dynamic_ncols=True, file=sys.stderr) as bar,
        tqdm(total=chunks, unit="chunk", desc="levels", disable=not chunks, dynamic_ncols=True, file=sys.stderr) as lv,
    ):
        return verify_store(
            store, workers=threads, on_tile=lambda _id, _bad: bar.update(1), on_chunks=lambda n: lv.update(n)
        )


def repair(
    store: ImageStore,
    spec: JobSpec | None,
    report: VerifyReport,
    threads: int = DEFAULT_WORKERS,
    progress: bool = False,
    log: Log = _stderr,
    storage_options: dict | None = None,
) -> VerifyOutcome:
    """Repair what ``report`` found: bad tiles rendered again with ``spec`` (the store's job), bad level
    chunks and every chunk above them or above those tiles rebuilt; then check what was repaired again.

    ``spec`` may be None when no tile is bad (a level chunk needs no job).
    """
    from .run import run_job

    if report.ok:
        return VerifyOutcome(report)
    options = copy.deepcopy(spec.storage_options) if spec is not None else storage_options
    lease = store_lease(store.url, copy.deepcopy(options) or None)
    before = lease.newest()
    expect = (before.gen if before is not None else 0) + 1  # the lease the level repair takes, if nothing else did
    ids = report.bad_ids
    if ids:
        if spec is None:
            raise JobSpecError(f"{store.url} was not made by a render job (no saved job spec); cannot re-render")
        log(f"re-rendering {len(ids)} bad tiles")
        run_job(spec, redo=ids, progress=progress, log=log)
        expect += 1  # the render's lease
    rebuilt = _rebuild(store.url, options, report, expect, threads, log)
    fresh = open_store(store.url, copy.deepcopy(options) or None, mode="r")
    again = verify_store(fresh, workers=threads, ids=ids) if ids else VerifyReport(0)
    left = (*again.bad_chunks, *recheck(fresh, rebuilt))
    flat = tuple((k, y, x) for k in sorted(rebuilt) for y, x in sorted(rebuilt[k]))
    return VerifyOutcome(report, tuple(ids), again.bad, flat, left)


def _rebuild(
    url: str, options: dict | None, report: VerifyReport, expect: int, threads: int, log: Log
) -> dict[int, set[Chunk]]:
    """Rebuild the bad level chunks of ``report`` and everything above them and above the tiles it names
    (rendered again just now), under the store's writer lease, which must be the ``expect``-th: another
    writer between the check and now would make the report's findings moot."""
    bad: dict[int, set[Chunk]] = {}
    for b in report.bad_chunks:
        bad.setdefault(b.level, set()).add(b.chunk)
    low = report.render_levels
    top = max(report.levels, default=0)
    store = open_store(url, copy.deepcopy(options) or None, mode="r")
    ids = report.bad_ids
    if ids and (report.record is None or source_state(store) != report.record.get("source")):
        top = low  # the levels above the render's are not current (or the job rendered more): assemble's part
    written = rerendered(store, store.tile_plan(), ids, low) if ids else {}
    if not bad and top <= low:
        return {}
    lease = store_lease(url, copy.deepcopy(options) or None)
    rec = lease.acquire("verify repair")
    with lease:
        if rec.gen != expect:
            raise RendererError(
                f"{url} was written by another process during the repair; re-run `render.py verify {url}`"
            )
        store = open_store(url, copy.deepcopy(options) or None, mode="a")
        rebuilt = rebuild_chunks(store, bad, top, written, workers=threads)
        n = sum(len(c) for c in rebuilt.values())
        if n:
            log(f"rebuilt {n} level chunks from the level below")
            store.advance_generation(f"verify rebuilt {n} level chunks")
        if ids and report.record is not None and top > low:
            restore_record(store, report.record)
    return rebuilt


def verify_after_render(
    spec: JobSpec, threads: int = DEFAULT_WORKERS, progress: bool = False, log: Log = _stderr
) -> VerifyOutcome:
    """``render --verify``: check the store of a finished job and repair it with the same spec."""
    store = open_store(spec.out, copy.deepcopy(spec.storage_options) or None, mode="r")
    report = check(store, threads, progress)
    for line in _found(report):
        print(line)
    return repair(store, spec, report, threads, progress, log) if not report.ok else VerifyOutcome(report)


def _found(report: VerifyReport) -> list[str]:
    """One line per bad tile and per bad level chunk, and the note on levels not checked."""
    lines = [b.describe() for b in report.bad] + [c.describe() for c in report.bad_chunks]
    return lines + ([f"note: {report.note}"] if report.note else [])


def spec_of_store(
    store: ImageStore,
    url: str,
    storage_options: dict | None,
    workers: int | None = None,
    address: str | None = None,
) -> JobSpec:
    """The job that made ``store`` (its saved spec), to render tiles again.

    The URL and, when given, the storage options, workers and Ray address
    of this command win over the saved ones.
    """
    saved = store.meta.get("spec")
    if not isinstance(saved, dict):
        raise JobSpecError(f"{url} was not made by a render job (no saved job spec); cannot re-render its tiles")
    if "precision" not in saved and saved.get("workers") == 0:
        # saved before `workers = 0` meant "in this process": then it meant "one actor per core or GPU"
        saved = {**saved, "workers": None}
    over: dict[str, Any] = {"out": url, "exports": False}
    if storage_options is not None:
        over["storage_options"] = storage_options
    if workers is not None:
        over["workers"] = workers
    if address is not None:
        over["address"] = address
    return JobSpec.from_dict({**saved, **over})


def _cannot_repair(store: ImageStore, url: str, bad: int, no_spec: JobSpecError) -> RendererError | JobSpecError:
    """Why the bad tiles of a store without a saved job are not re-rendered, as the error to raise.

    An imported picture has no checkpoint to render from: the line says how to import it again.
    """
    again = reimport_command(store.meta, url)
    if again is None:
        return no_spec
    return ReimportNeeded(f"{bad} bad tiles in {url}, an imported picture", again)


# ---------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="image store (OME-Zarr group) URL or path")
    p.add_argument(
        "--storage-options", default=None, metavar="JSON", help="fsspec options for the store and exports, as JSON"
    )
    p.add_argument(
        "--repair",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="re-render bad tiles and rebuild bad level chunks (default); --no-repair only reports them",
    )
    p.add_argument(
        "--export",
        action="append",
        default=[],
        metavar="PATH",
        help="also say whether this export (TIFF, .dzi, .szi) matches the store, by its sidecar "
        "(the exports assemble wrote are checked anyway); repeatable",
    )
    p.add_argument("--threads", type=int, default=DEFAULT_WORKERS, metavar="N", help="tiles read at once [4]")
    p.add_argument("--workers", type=int, metavar="N", help="render actors for the repair (default: the job's)")
    p.add_argument("--address", metavar="ADDR", help="Ray cluster for the repair (default: the job's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _open(url: str, options: dict | None) -> ImageStore:
    try:
        store = open_store(url, copy.deepcopy(options), mode="r")
        store.level(0)
    except RendererError as e:
        raise JobSpecError(str(e)) from None
    return store


def exports_of(store: ImageStore, given: list[str], options: dict | None) -> list[ExportState]:
    """The state of every export the store lists and of those ``given`` (each once)."""
    urls = dict.fromkeys([*recorded_exports(store), *(export_key(u) for u in given)])
    return [export_state(u, copy.deepcopy(options), store) for u in urls]


def assemble_command(url: str, states: list[ExportState]) -> str:
    """The `render.py assemble` that writes these exports again, with the settings their sidecars record."""
    flags: dict[str, str] = {}
    for st in states:
        settings = (st.record or {}).get("settings") or {}
        if st.kind == "tiff":
            flags["--tiff"] = st.url
            if settings.get("compression", "jpeg") != "jpeg":
                flags["--compression"] = str(settings["compression"])
            if settings.get("tile", 256) != 256:
                flags["--tiff-tile"] = str(settings["tile"])
        elif st.kind in ("dzi", "szi"):
            flags["--dzi"] = st.url.rsplit(".", 1)[0]
            if settings.get("engine", "zarr") != "zarr":
                flags["--dzi-engine"] = str(settings["engine"])
        if settings.get("quality", 90) != 90:
            flags["--quality"] = str(settings["quality"])
    return " ".join([f"render.py assemble {url}", *(f"{k} {v}" for k, v in flags.items())])


@command(interrupted="interrupted; re-run the same command", failed_hint=" (re-run the same command to continue)")
def run(args: argparse.Namespace) -> int:
    options = parse_storage_options(args.storage_options, JobSpecError)
    if args.threads < 1:
        raise JobSpecError(f"--threads must be >= 1, got {args.threads}")
    if args.workers is not None and args.workers < 0:
        raise JobSpecError(f"--workers must be >= 0, got {args.workers}")
    store = _open(args.url, options)
    spec, no_spec = None, None
    if args.repair:  # bad input is reported before the (maybe long) check
        try:
            spec = spec_of_store(store, args.url, options, args.workers, args.address)
        except JobSpecError as e:  # a store not made by a job: fine as long as no tile needs repair
            no_spec = e
    report = check(store, args.threads, progress=not args.quiet)
    for line in _found(report):
        print(line)
    outcome = VerifyOutcome.unrepaired(report)
    if report.bad and args.repair and no_spec is not None:
        raise _cannot_repair(store, args.url, len(report.bad), no_spec)
    if not report.ok and args.repair:
        total = store.meta.get("tiles_total")
        unrendered = total - len(store.done_tiles()) if isinstance(total, int) else 0
        if report.bad and unrendered > 0:
            print(f"note: the repair runs the job, so it also renders the {unrendered} tiles not rendered yet")
        outcome = repair(store, spec, report, args.threads, not args.quiet, storage_options=options)
        for b in outcome.remaining:
            print(f"still {b.describe()}")
        for c in outcome.remaining_chunks:
            print(f"still {c.describe()}")
        store = _open(args.url, options)  # what the repair changed: meta, pyramid record
        if (store.pyramid_progress() or {}).get("stale"):
            print(f"the pyramid is stale now: run `{follow_up(f'render.py assemble {args.url}')}` to rebuild it")
    _exports(store, args.export, options, args.url)
    print(
        f"verify: {report.checked} tiles checked, {len(report.bad)} bad, "
        f"{len(outcome.rerendered)} re-rendered, {len(outcome.remaining)} bad left; "
        f"{report.chunks_checked} level chunks checked{_levels(report)}, {len(report.bad_chunks)} bad, "
        f"{len(outcome.rebuilt)} rebuilt, {len(outcome.remaining_chunks)} bad left -> {args.url}"
    )
    return 0 if outcome.ok else 1


def _exports(store: ImageStore, given: list[str], options: dict | None, url: str) -> None:
    """A line per export, and the command that makes the stale ones again."""
    states = exports_of(store, given, options)
    for st in states:
        print(st.describe())
    redo = [st for st in states if st.state in ("stale", "damaged") and st.kind]  # a missing one may be meant
    if redo:
        print(f"to make them match the store again: `{assemble_command(url, redo)}`")


def _levels(report: VerifyReport) -> str:
    levels = report.levels
    if not levels:
        return ""
    return f" (level {levels[0]})" if len(levels) == 1 else f" (levels {levels[0]}..{levels[-1]})"
