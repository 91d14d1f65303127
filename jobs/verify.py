"""verify: check every tile of a store against its marker's crc32; re-render the bad ones.

  render.py verify out/img.zarr
  render.py verify s3://bucket/img.zarr --storage-options '{"anon": false}' --no-repair
  render.py render ... --verify                     (the same check after a render)

Each finished tile's completion marker holds the crc32 of its pixels.  verify
reads every marked tile back from level 0 (a few at a time, on --threads
threads), decodes it and compares: a chunk that cannot be decoded, that was
deleted, or whose pixels changed is reported on one line, then re-rendered by
the store's own job (its saved spec; --storage-options, --workers and
--address given here win, since saved storage options may be stale) and
checked again.  Re-rendering runs the job, so tiles not rendered yet are
rendered too.  Pyramid levels and exports made before are marked stale;
`render.py assemble URL` rebuilds them.

Exit code 0: every tile is good (or was repaired); 1: bad tiles remain
(--no-repair, or a repair that did not fix them); 2: bad input.
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
from renderer.store import ImageStore, open_store
from renderer.verify import DEFAULT_WORKERS, BadTile, VerifyReport, verify_store

from . import JobSpecError
from .spec import JobSpec

Log = Callable[[str], None]


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


@dataclasses.dataclass(frozen=True)
class VerifyOutcome:
    """One check of a store, and the repair that followed it (if any)."""

    report: VerifyReport  # the first check: every marked tile
    rerendered: tuple[str, ...] = ()  # tiles rendered again
    remaining: tuple[BadTile, ...] = ()  # bad after the repair (or all bad ones without one)

    @property
    def ok(self) -> bool:
        return not self.remaining

    def to_dict(self) -> dict[str, Any]:
        return {
            "checked": self.report.checked,
            "bad": [b.to_dict() for b in self.report.bad],
            "rerendered": list(self.rerendered),
            "remaining": [b.id for b in self.remaining],
        }

    def headline(self) -> str:
        """A few words for a summary line: 'verified 16 tiles: 2 bad, re-rendered'."""
        n, bad = self.report.checked, len(self.report.bad)
        text = f"verified {n} tiles: " + ("all good" if not bad else f"{bad} bad")
        if self.rerendered:
            text += ", re-rendered" if self.ok else f", re-rendered, {len(self.remaining)} still bad"
        elif bad:
            text += " (not repaired)"
        return text


def check(store: ImageStore, threads: int = DEFAULT_WORKERS, progress: bool = False) -> VerifyReport:
    """``verify_store`` with a progress bar on stderr."""
    from tqdm import tqdm

    total = len(store.done_tiles())
    with tqdm(
        total=total, unit="tile", desc="verify", disable=not progress, dynamic_ncols=True, file=sys.stderr
    ) as bar:
        return verify_store(store, workers=threads, on_tile=lambda _id, _bad: bar.update(1))


def repair(
    store: ImageStore,
    spec: JobSpec,
    report: VerifyReport,
    threads: int = DEFAULT_WORKERS,
    progress: bool = False,
    log: Log = _stderr,
) -> VerifyOutcome:
    """Render the bad tiles of ``report`` again with ``spec`` (the store's job), then check them again."""
    from .run import run_job

    ids = report.bad_ids
    if not ids:
        return VerifyOutcome(report)
    log(f"re-rendering {len(ids)} bad tiles")
    run_job(spec, redo=ids, progress=progress, log=log)
    again = verify_store(store, workers=threads, ids=ids)  # a marker outside the job's plan stays bad
    return VerifyOutcome(report, rerendered=tuple(ids), remaining=again.bad)


def verify_after_render(
    spec: JobSpec, threads: int = DEFAULT_WORKERS, progress: bool = False, log: Log = _stderr
) -> VerifyOutcome:
    """``render --verify``: check the store of a finished job and repair it with the same spec."""
    store = open_store(spec.out, copy.deepcopy(spec.storage_options) or None, mode="r")
    report = check(store, threads, progress)
    for b in report.bad:
        print(b.describe())
    return repair(store, spec, report, threads, progress, log) if report.bad else VerifyOutcome(report)


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


# ---------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="image store (OME-Zarr group) URL or path")
    p.add_argument("--storage-options", default=None, metavar="JSON", help="fsspec options for the store, as JSON")
    p.add_argument(
        "--repair",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="re-render bad tiles (default); --no-repair only reports them",
    )
    p.add_argument("--threads", type=int, default=DEFAULT_WORKERS, metavar="N", help="tiles read at once [4]")
    p.add_argument("--workers", type=int, metavar="N", help="render actors for the repair (default: the job's)")
    p.add_argument("--address", metavar="ADDR", help="Ray cluster for the repair (default: the job's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


@command(interrupted="interrupted; re-run the same command", failed_hint=" (re-run the same command to continue)")
def run(args: argparse.Namespace) -> int:
    options = parse_storage_options(args.storage_options, JobSpecError)
    if args.threads < 1:
        raise JobSpecError(f"--threads must be >= 1, got {args.threads}")
    if args.workers is not None and args.workers < 0:
        raise JobSpecError(f"--workers must be >= 0, got {args.workers}")
    try:
        store = open_store(args.url, copy.deepcopy(options), mode="r")
        store.level(0)
    except RendererError as e:
        raise JobSpecError(str(e)) from None
    spec, no_spec = None, None
    if args.repair:  # bad input is reported before the (maybe long) check
        try:
            spec = spec_of_store(store, args.url, options, args.workers, args.address)
        except JobSpecError as e:  # a store not made by a job: fine as long as nothing needs repair
            no_spec = e
    report = check(store, args.threads, progress=not args.quiet)
    for b in report.bad:
        print(b.describe())
    outcome = VerifyOutcome(report, remaining=report.bad)
    if report.bad and no_spec is not None:
        raise no_spec
    if report.bad and spec is not None:
        meta = store.meta
        total = meta.get("tiles_total")
        unrendered = total - len(store.done_tiles()) if isinstance(total, int) else 0
        if unrendered > 0:
            print(f"note: the repair runs the job, so it also renders the {unrendered} tiles not rendered yet")
        outcome = repair(store, spec, report, args.threads, progress=not args.quiet)
        for b in outcome.remaining:
            print(f"still {b.describe()}")
        if store.pyramid_progress() is not None:
            print(
                f"pyramid and exports are stale now: run `{follow_up(f'render.py assemble {args.url}')}` to rebuild them"
            )
    print(
        f"verify: {report.checked} tiles checked, {len(report.bad)} bad, "
        f"{len(outcome.rerendered)} re-rendered, {len(outcome.remaining)} bad left -> {args.url}"
    )
    return 0 if outcome.ok else 1
