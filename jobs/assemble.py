"""render.py assemble URL: pyramid levels, a pyramidal TIFF, a DeepZoom pyramid and an IIIF tree from a store.

  render.py assemble out/img.zarr --tiff out/img.tif --dzi out/img
  render.py assemble s3://bucket/img.zarr --storage-options '{"anon": false}' --tiff s3://bucket/img.tif
  render.py assemble out/img.zarr --dzi out/img --address 10.0.0.5:6379     (block work on a Ray cluster)
  render.py assemble out/img.zarr --iiif out/site/img --dzi out/site/img --html   (a folder for any web server)

The pyramid levels that are missing are built (or finished, if a previous run
stopped) unless --skip-pyramid -- only levels coarser than those the render
wrote with its tiles (renderer.pyramid.render_levels) -- then the requested
exports, all fed from one read of each pyramid level in bands (DeepZoom and
IIIF tiles are cut from the zarr levels; --dzi-engine vips runs libvips
dzsave instead, side by side with the others). All of it is block work (renderer.blocks): on
--workers local threads (dask for the levels), or, with --address, as Ray
tasks on that cluster (docs/assemble.md). Re-running is safe.

An unfinished store (fewer level-0 tiles done than the job has) is refused
with one line and exit code 2, before anything is written: finish the render,
or pass --partial to build the pyramid and exports from the tiles there are
(it says so: "partial: ... N of M tiles"). A partial pyramid is recorded as
partial, and a pyramid whose tiles were re-rendered since is stale
(renderer.pyramid), so the next assemble rebuilds it; assembling after the
render finished always gives the exports of the finished image.

Exports are staged under temporary names and put in place only when whole
(renderer.publish): a failed assemble -- e.g. a corrupt chunk, reported as
one line naming it and the `render.py verify` that repairs it -- leaves the
previous exports as they were. Each export gets a ``<export>.source.json``
sidecar saying what it was built from, and the store's meta lists the
exports put in place (renderer.provenance.record_exports) so `render.py
verify` can tell whether they still match it.

--iiif DIR writes an IIIF Image API 3.0 level-0 tree (renderer.iiif_tree):
DIR/info.json, the tiles at every advertised scale factor and the listed
sizes, as files at the URLs an IIIF client asks for, so any static web
server (or a bucket's HTTP endpoint) serves DIR as an IIIF image service.
Its info.json carries the public URL DIR is served at (--iiif-id; the spec
requires an absolute URL). --html adds index.html and the OpenSeadragon
files it needs beside the DeepZoom pyramid and/or the IIIF tree (they must
share a folder): serve that folder with any web server and open index.html.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from creps.cli import command, follow_up
from renderer.dzi import dzi_base
from renderer.errors import BadInputError, IncompleteStoreError, RendererError
from renderer.exports import write_exports
from renderer.fsio import is_local, parse_storage_options
from renderer.iiif import INFO
from renderer.options import DEFAULT_IIIF_ID, DZI_ENGINES, DziOptions, IiifOptions, OptionError, TiffOptions
from renderer.page import PAGE, check_page, page_folder, write_page
from renderer.provenance import record_exports
from renderer.publish import check_replaceable, check_target
from renderer.pyramid import build_levels, source_state
from renderer.scaleout import Runner
from renderer.store import ImageStore, open_store, store_lease
from renderer.tiff import COMPRESSIONS, TIFF_TILES
from renderer.vips import write_vips_dzi

from . import JobSpecError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="image store (OME-Zarr group) URL or path")
    parser.add_argument(
        "--storage-options",
        default=None,
        metavar="JSON",
        help="fsspec options for the store and remote outputs, as JSON",
    )
    g = parser.add_argument_group("pyramidal TIFF")
    g.add_argument("--tiff", default=None, metavar="OUT.tif", help="write a pyramidal BigTIFF here")
    g.add_argument("--tiff-tile", type=int, default=256, choices=TIFF_TILES, help="TIFF tile side")
    g.add_argument("--compression", default="jpeg", choices=list(COMPRESSIONS), help="TIFF compression")
    g.add_argument("--quality", type=int, default=90, help="JPEG quality (TIFF, DeepZoom and IIIF tiles), 1..100")
    g = parser.add_argument_group("DeepZoom")
    g.add_argument("--dzi", default=None, metavar="OUT", help="write OUT.dzi + OUT_files/ (+ OUT.szi)")
    g.add_argument("--no-szi", action="store_true", help="skip the .szi zip")
    g.add_argument(
        "--dzi-engine",
        default="zarr",
        choices=DZI_ENGINES,
        help="zarr: cut tiles from the pyramid levels (fast, same files as dzsave); vips: libvips dzsave",
    )
    g = parser.add_argument_group("IIIF (a static level-0 image service) and the viewer page")
    g.add_argument(
        "--iiif",
        default=None,
        metavar="DIR_OR_URL",
        help="write an IIIF Image API 3.0 level-0 tree here: info.json + tiles + sizes, for any static web server",
    )
    g.add_argument(
        "--iiif-id",
        default=None,
        metavar="BASE_URL",
        help="the public URL the --iiif folder is served at: info.json's id, which IIIF clients build every "
        "request from (the spec requires an absolute URL; default "
        + DEFAULT_IIIF_ID.format(name="NAME")
        + ", NAME the folder's name: where `python -m http.server` started in the folder above serves it)",
    )
    g.add_argument(
        "--html",
        action="store_true",
        help="also write index.html + the OpenSeadragon files it needs beside the --dzi and/or --iiif output "
        "(same folder); it opens them by relative URL, so any static web server can serve the folder or bucket",
    )
    g = parser.add_argument_group("pyramid")
    g.add_argument(
        "--skip-pyramid",
        action="store_true",
        help="do not build pyramid levels (the TIFF still needs them and builds them if missing)",
    )
    g = parser.add_argument_group("where the block work runs")
    g.add_argument(
        "--address",
        default=None,
        metavar="ADDR",
        help="run the pyramid levels and export bands as Ray tasks on this cluster (host:port or auto); "
        "default: local threads",
    )
    g.add_argument(
        "--workers", type=int, default=None, help="local threads, or Ray tasks at once (default: cores / cluster CPUs)"
    )
    g.add_argument(
        "--partial",
        action="store_true",
        help="assemble an unfinished render from the tiles it has (else it is refused); the next assemble rebuilds",
    )


def assemble(
    url: str,
    tiff: str | None = None,
    dzi: str | None = None,
    storage_options: dict | None = None,
    tiff_tile: int = 256,
    compression: str = "jpeg",
    quality: int = 90,
    szi: bool = True,
    dzi_engine: str = "zarr",
    skip_pyramid: bool = False,
    workers: int | None = None,
    progress: bool = False,
    partial: bool = False,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    address: str | None = None,
    iiif: str | None = None,
    iiif_options: IiifOptions | None = None,
    html: bool = False,
) -> dict:
    """Build the missing pyramid levels (unless skipped) and the requested exports; return seconds per stage.

    Exports always need the pyramid, so --skip-pyramid only matters without
    exports. An unfinished store raises ``IncompleteStoreError`` (exit code 2,
    nothing done) unless ``partial``; then everything is built from the tiles
    there are and ``log`` says so. With ``address`` the block work runs as
    Ray tasks on that cluster (joined before anything is written). ``iiif``:
    the IIIF tree's folder (``iiif_options``: its id and tiling); ``html``:
    the viewer page beside the exports, written once they are in place.
    """
    tiff_options, dzi_options = _export_options(tiff_tile, compression, quality, szi, dzi_engine)
    targets = _Targets(tiff, dzi, iiif, iiif_options or IiifOptions(quality=quality), html)
    try:  # bad input (exit 2, nothing done): a target that cannot be written, a store or level 0 missing
        targets.check(storage_options)
        open_store(url, storage_options, mode="r").level(0)
    except RendererError as e:
        raise BadInputError(str(e)) from None
    runner = _cluster(address, workers) if address else None
    try:
        lease = store_lease(url, storage_options)
        lease.acquire("assemble")  # one writer at a time: not while a render or another assemble runs
        with lease:
            return _assemble(
                url, targets, storage_options, tiff_options, dzi_options, skip_pyramid, workers, progress, partial,
                log, runner,
            )  # fmt: skip
    finally:
        if runner is not None:
            runner.close()


def _export_options(
    tiff_tile: int, compression: str, quality: int, szi: bool, dzi_engine: str
) -> tuple[TiffOptions, DziOptions]:
    """The export settings of the flags, checked by the option objects (--quality named as the flag)."""
    try:
        dzi = DziOptions(quality=quality, engine=dzi_engine, szi=szi)
        return TiffOptions(tiff_tile, compression, quality), dzi
    except OptionError as e:
        if e.option != "quality":
            raise
        raise BadInputError(f"--quality must be {e.allowed}, got {e.value}") from None


@dataclass(frozen=True)
class _Targets:
    """What an assemble writes: the exports (None: not asked for) and whether the page goes beside them."""

    tiff: str | None
    dzi: str | None
    iiif: str | None
    iiif_options: IiifOptions
    html: bool

    def check(self, storage_options: dict | None) -> None:
        """Every target writable and free for us, before any work (JobSpecError: exit 2, nothing done)."""
        for target in (self.tiff, self.dzi, self.iiif):
            if target:
                check_target(target, storage_options)
        if self.html and not (self.dzi or self.iiif):
            raise JobSpecError("--html writes a page beside the exports: pass --dzi and/or --iiif too")
        try:
            if self.iiif:
                check_replaceable(self.iiif, INFO, "an IIIF tree", storage_options)
            if self.html:
                check_page(self.iiif, self.dzi, storage_options)
        except RendererError as e:
            raise JobSpecError(str(e)) from None


def _cluster(address: str, workers: int | None) -> Runner:
    """Join the Ray cluster at ``address`` (Ray is imported only here, for this path)."""
    from renderer.cluster import RayRunner

    from .pools import probe_address

    probe_address(address)
    try:
        return RayRunner(address, workers)
    except RendererError as e:
        raise JobSpecError(str(e)) from None


def _assemble(
    url: str,
    targets: _Targets,
    storage_options: dict | None,
    tiff_options: TiffOptions,
    dzi_options: DziOptions,
    skip_pyramid: bool,
    workers: int | None,
    progress: bool,
    partial: bool,
    log: Callable[[str], None],
    runner: Runner | None,
) -> dict:
    store = open_store(url, storage_options, mode="a")
    _check_finished(store, url, partial, log)
    times: dict[str, float] = {}
    tiff, dzi, iiif = targets.tiff, targets.dzi, targets.iiif
    vips_dzi = dzi if dzi_options.engine == "vips" else None
    # the zarr engine's exports build the missing levels beside their bands of the levels already there
    fused = not vips_dzi and bool(tiff or dzi or iiif)
    t = time.perf_counter()
    if not fused and (not skip_pyramid or tiff):  # the TIFF needs every level (vips dzsave reads level 0)
        build_levels(store, runner, storage_options, workers)
    times["pyramid"] = time.perf_counter() - t

    t = time.perf_counter()

    def exports(tiff: str | None, dzi: str | None) -> None:
        write_exports(
            store, tiff, dzi, tiff_options, dzi_options, storage_options, workers, progress, runner, iiif,
            targets.iiif_options,
        )  # fmt: skip

    if fused:  # one read of every level feeds every export
        exports(tiff, dzi)
    else:  # the vips engine: dzsave side by side with the others
        jobs: list[Callable[[], object]] = []
        if tiff or iiif:
            jobs.append(lambda: exports(tiff, None))
        if vips_dzi:
            jobs.append(lambda: write_vips_dzi(store, vips_dzi, dzi_options, storage_options, progress))
        with ThreadPoolExecutor(max(1, len(jobs))) as pool:
            for fut in [pool.submit(f) for f in jobs]:
                fut.result()
    times["pyramid+exports" if fused else "exports"] = time.perf_counter() - t
    _record(store, tiff, dzi, dzi_options.szi)
    if targets.html:
        t = time.perf_counter()
        write_page(store, iiif, dzi, storage_options)
        times["page"] = time.perf_counter() - t
    return times


def _check_finished(store: ImageStore, url: str, partial: bool, log: Callable[[str], None]) -> None:
    """An unfinished store is refused (exit 2, nothing done) unless ``partial``; then the log says so."""
    source = source_state(store)
    if not source["partial"]:
        return
    done, total = source["tiles_done"], source["tiles_total"]
    if not partial:
        raise IncompleteStoreError(
            f"{url} is not finished: {total - done} of {total} tiles are missing; finish the render "
            "(re-run the same render command), or pass --partial to assemble the tiles there are"
        )
    log(
        f"partial: the pyramid and exports are built from {done} of {total} tiles ({total - done} missing); "
        "re-run assemble once the render is finished"
    )


def _record(store: ImageStore, tiff: str | None, dzi: str | None, szi: bool) -> None:
    """List the exports put in place in the store's meta, so `render.py verify` can check them."""
    parts = {tiff: "tiff"} if tiff else {}
    if dzi:
        parts[dzi_base(dzi) + ".dzi"] = "dzi"
        if szi:
            parts[dzi_base(dzi) + ".szi"] = "szi"
    if parts:
        record_exports(store, parts)


@command(interrupted="interrupted; re-run the same command")
def run(args: argparse.Namespace) -> int:
    options = parse_storage_options(args.storage_options, JobSpecError)
    times = assemble(
        args.url,
        tiff=args.tiff,
        dzi=args.dzi,
        storage_options=options,
        tiff_tile=args.tiff_tile,
        compression=args.compression,
        quality=args.quality,
        szi=not args.no_szi,
        dzi_engine=args.dzi_engine,
        skip_pyramid=args.skip_pyramid,
        workers=args.workers,
        progress=True,
        partial=args.partial,
        log=print,
        address=args.address,
        iiif=args.iiif,
        iiif_options=_iiif_options(args),
        html=args.html,
    )
    print("assembled: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    if args.dzi:
        dzi = args.dzi.removesuffix(".dzi") + ".dzi"
        print(f"view it: {follow_up(f'render.py view {dzi}')}")
    if args.iiif:
        service = IiifOptions(base_id=args.iiif_id).service_id(args.iiif.rstrip("/"))
        print(f"IIIF: {args.iiif.rstrip('/')}/{INFO} (served at {service}/{INFO}; --iiif-id sets that URL)")
    if args.html:
        folder = page_folder([u for u in (args.iiif, args.dzi) if u])
        how = "e.g. `python -m http.server` in it" if is_local(str(folder)) else "public read"
        print(f"page: {folder}/{PAGE} (serve {folder} over HTTP, {how}, and open {PAGE})")
    return 0


def _iiif_options(args: argparse.Namespace) -> IiifOptions:
    """The IIIF tree's options from the flags (--iiif-id needs --iiif; a bad id is one line, exit 2)."""
    if args.iiif_id is not None and not args.iiif:
        raise JobSpecError("--iiif-id sets the id of the --iiif tree: pass --iiif too")
    try:
        return IiifOptions(base_id=args.iiif_id, quality=args.quality)
    except OptionError as e:
        if e.option == "base_id":
            raise JobSpecError(f"--iiif-id: {e}") from None
        raise BadInputError(f"--quality must be {e.allowed}, got {e.value}") from None  # worded as _export_options
