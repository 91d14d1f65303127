"""render.py assemble URL: pyramid levels, a pyramidal TIFF and a DeepZoom pyramid from a store.

  render.py assemble out/img.zarr --tiff out/img.tif --dzi out/img
  render.py assemble s3://bucket/img.zarr --storage-options '{"anon": false}' --tiff s3://bucket/img.tif
  render.py assemble out/img.zarr --dzi out/img --address 10.0.0.5:6379     (block work on a Ray cluster)

The pyramid levels that are missing are built (or finished, if a previous run
stopped) unless --skip-pyramid -- only levels coarser than those the render
wrote with its tiles (renderer.pyramid.render_levels) -- then the requested
exports, both fed from one read of each pyramid level in bands (DeepZoom tiles
are cut from the zarr levels; --dzi-engine vips runs libvips dzsave instead,
side by side with the TIFF). All of it is block work (renderer.blocks): on
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
(renderer.exports): a failed assemble -- e.g. a corrupt chunk, reported as
one line naming it -- leaves the previous exports as they were. Each export
gets a ``<export>.source.json`` sidecar saying what it was built from.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from creps.cli import command, follow_up
from renderer.errors import IncompleteStoreError, RendererError
from renderer.exports import COMPRESSIONS, DZI_ENGINES, TIFF_TILES, check_target, write_dzi, write_exports, write_tiff
from renderer.fsio import parse_storage_options
from renderer.pyramid import source_state
from renderer.scaleout import Runner, build_levels
from renderer.store import open_store, store_lease

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
    g.add_argument("--quality", type=int, default=90, help="JPEG quality (TIFF and DeepZoom tiles), 1..100")
    g = parser.add_argument_group("DeepZoom")
    g.add_argument("--dzi", default=None, metavar="OUT", help="write OUT.dzi + OUT_files/ (+ OUT.szi)")
    g.add_argument("--no-szi", action="store_true", help="skip the .szi zip")
    g.add_argument(
        "--dzi-engine",
        default="zarr",
        choices=DZI_ENGINES,
        help="zarr: cut tiles from the pyramid levels (fast, same files as dzsave); vips: libvips dzsave",
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
) -> dict:
    """Build the missing pyramid levels (unless skipped) and the requested exports; return seconds per stage.

    Exports always need the pyramid, so --skip-pyramid only matters without
    exports. An unfinished store raises ``IncompleteStoreError`` (exit code 2,
    nothing done) unless ``partial``; then everything is built from the tiles
    there are and ``log`` says so. With ``address`` the block work runs as
    Ray tasks on that cluster (joined before anything is written).
    """
    if not 1 <= quality <= 100:
        raise RendererError(f"--quality must be 1..100, got {quality}")
    for target in (tiff, dzi):
        if target:
            check_target(target, storage_options)
    open_store(url, storage_options, mode="r").level(0)  # one clear error when the store or level 0 is missing
    runner = _cluster(address, workers) if address else None
    try:
        lease = store_lease(url, storage_options)
        lease.acquire("assemble")  # one writer at a time: not while a render or another assemble runs
        with lease:
            return _assemble(
                url, tiff, dzi, storage_options, tiff_tile, compression, quality, szi, dzi_engine, skip_pyramid,
                workers, progress, partial, log, runner,
            )  # fmt: skip
    finally:
        if runner is not None:
            runner.close()


def _cluster(address: str, workers: int | None) -> Runner:
    """Join the Ray cluster at ``address`` (Ray is imported only here, for this path)."""
    from renderer.cluster import RayRunner

    from .run import probe_address

    probe_address(address)
    try:
        return RayRunner(address, workers)
    except RendererError as e:
        raise JobSpecError(str(e)) from None


def _assemble(
    url: str,
    tiff: str | None,
    dzi: str | None,
    storage_options: dict | None,
    tiff_tile: int,
    compression: str,
    quality: int,
    szi: bool,
    dzi_engine: str,
    skip_pyramid: bool,
    workers: int | None,
    progress: bool,
    partial: bool,
    log: Callable[[str], None],
    runner: Runner | None,
) -> dict:
    store = open_store(url, storage_options, mode="a")
    source = source_state(store)
    if source["partial"]:
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
    times: dict[str, float] = {}
    # the zarr engine's exports build the missing levels beside their bands of the levels already there
    fused = dzi_engine == "zarr" and bool(tiff or dzi)
    t = time.perf_counter()
    if not fused and (not skip_pyramid or tiff):  # the TIFF needs every level (vips dzsave reads level 0)
        build_levels(store, runner, storage_options, workers)
    times["pyramid"] = time.perf_counter() - t

    t = time.perf_counter()
    if dzi_engine == "zarr":  # one read of every level feeds both exports
        write_exports(
            store,
            tiff=tiff,
            dzi=dzi,
            tiff_tile=tiff_tile,
            compression=compression,
            quality=quality,
            szi=szi,
            storage_options=storage_options,
            workers=workers,
            progress=progress,
            runner=runner,
        )
    else:
        jobs = []
        if tiff:
            jobs.append(
                lambda: write_tiff(
                    store,
                    tiff,
                    tile=tiff_tile,
                    compression=compression,
                    quality=quality,
                    storage_options=storage_options,
                    workers=workers,
                    progress=progress,
                    runner=runner,
                )
            )
        if dzi:
            jobs.append(
                lambda: write_dzi(
                    store,
                    dzi,
                    quality=quality,
                    szi=szi,
                    storage_options=storage_options,
                    progress=progress,
                    engine="vips",
                    workers=workers,
                )
            )
        with ThreadPoolExecutor(max(1, len(jobs))) as pool:
            for fut in [pool.submit(f) for f in jobs]:
                fut.result()
    times["pyramid+exports" if fused else "exports"] = time.perf_counter() - t
    return times


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
    )
    print("assembled: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    if args.dzi:
        dzi = args.dzi.removesuffix(".dzi") + ".dzi"
        print(f"view it: {follow_up(f'render.py view {dzi}')}")
    return 0
