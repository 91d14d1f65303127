"""import: any picture (PNG, JPEG, TIFF: anything libvips reads) into an image store,
as a render would have made it.

  render.py import photo.jpg out/photo.zarr
  render.py import scan.tif s3://bucket/scan.zarr --storage-options '{"anon": false}'
  render.py import big.tif out/big.zarr --tile 1024 --overwrite

The store is the one a render makes (OME-Zarr level 0 in chunks of --tile,
sharded on object stores, see --shard), so everything that works on a render
works on it: `render.py assemble URL --tiff OUT.tif --dzi OUT` (pyramid,
pyramidal TIFF, DeepZoom), `render.py view URL`, `render.py video URL --zoom
...`, `render.py verify URL`, renderer.open_pyramid(URL).

Pixels are stored as 8-bit sRGB RGB, the store's only format: an alpha
channel is flattened onto black, greyscale becomes RGB, 16-bit and float
pictures are scaled to 8 bits, CMYK and Lab are converted to sRGB (libvips);
an embedded ICC profile and an EXIF orientation are not applied. A multi-page
file gives its first page. The store records what was done, with the source
file's name, size and sha256 (meta ``creps_gigapixel.import``; no checkpoint).

The picture streams through in strips of one row of tiles (--tile rows, or
a shard's rows when sharded), so memory stays near tile x width x 3 bytes
whatever the height: a 30000 x 30000 TIFF imports in well under 1 GB. Each
strip is written as whole chunks, then its marker with every tile's crc32:
`render.py verify` checks them, and, with no checkpoint to re-render from,
names the bad tiles and says to re-import (exit 1).

Resume: re-run the same command; strips whose marker is there are skipped.
A store holding another picture or a render is refused unless --overwrite,
and so is a store another process is writing (one writer at a time).
Bad input (a missing, unreadable or damaged file, not a picture, a store in
the way) is one `error:` line, exit 2, and nothing written: a picture found
damaged part-way has the store this run made removed again.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

from creps.cli import command
from creps.errors import first_line
from renderer.errors import RendererError
from renderer.fsio import filesystem, is_local, parse_storage_options, remove_tree
from renderer.lease import Lease
from renderer.markers import tile_crc, tile_marker
from renderer.picture import Picture, PictureError, file_digest, open_picture
from renderer.store import ImageStore, create_job_store, is_foreign_folder, open_store, store_exists, store_lease
from renderer.tasks import TilePlan, TileResult
from renderer.tiles import peak_rss_mb

from . import JobSpecError
from .output import software_version
from .plan import auto_shard
from .spec import MAX_SHARD_SIDE, MAX_TILE, TILE_MULTIPLE, JobSpec

IMPORT_KEY = "import"  # the store meta's record of the picture it holds
DEFAULT_TILE: int = JobSpec.tile  # a render's default chunk side
META_EVERY_S = 5.0  # progress written to the store meta (for watchers) at most this often


class ReimportNeeded(RendererError):
    """An imported store has bad tiles; with no checkpoint they can only come from the picture again."""

    def __init__(self, message: str, command_line: str) -> None:
        super().__init__(message)
        self.hint = f"; re-import it: {command_line}"


# ---------------------------------------------------------------- the record in the store
def imported_from(meta: dict) -> dict | None:
    """The import record of a store's meta (source, bytes, sha256, ...), None for a store not imported."""
    record = meta.get(IMPORT_KEY)
    return record if isinstance(record, dict) else None


def reimport_command(meta: dict, url: str) -> str | None:
    """The command that imports the store's picture again (None for a store not imported)."""
    record = imported_from(meta)
    if record is None:
        return None
    source = record.get("path") or record.get("source") or "IMAGE"
    return f"render.py import {source} {url} --tile {record.get('tile', DEFAULT_TILE)} --overwrite"


@dataclass(frozen=True)
class Source:
    """The picture to import: opened (header only) and hashed."""

    picture: Picture
    sha256: str
    size: int

    def record(self, tile: int, shard: int) -> dict[str, Any]:
        pic = self.picture
        return {
            "source": os.path.basename(pic.path),
            "path": os.path.abspath(pic.path),
            "bytes": self.size,
            "sha256": self.sha256,
            "loader": pic.loader,
            "source_format": pic.source_format,
            "conversions": list(pic.conversions),
            "height": pic.height,
            "width": pic.width,
            "tile": tile,
            "shard": shard,
        }


def read_source(path: str, progress: bool = False) -> Source:
    """Open the picture (header) and hash the file; ``PictureError`` (exit 2) when it cannot be read."""
    from tqdm import tqdm

    picture = open_picture(path)
    total = os.path.getsize(path)
    with tqdm(
        total=total, unit="B", unit_scale=True, desc="sha256", disable=not progress, file=sys.stderr, leave=False
    ) as bar:
        sha, size = file_digest(path, bar.update)
    return Source(picture, sha, size)


# ---------------------------------------------------------------- the store
def check_layout(tile: int, shard: int) -> None:
    """The chunking flags, checked as a render job checks them."""
    if tile <= 0 or tile % TILE_MULTIPLE or tile > MAX_TILE:
        raise JobSpecError(f"--tile must be a positive multiple of {TILE_MULTIPLE} up to {MAX_TILE}, got {tile}")
    if not 0 <= shard <= 64:
        raise JobSpecError(f"--shard must be 0 (auto) .. 64 tiles per shard side, got {shard}")
    if tile * max(shard, 1) > MAX_SHARD_SIDE:
        raise JobSpecError(f"shard side tile*shard = {tile * shard} > {MAX_SHARD_SIDE}; use a smaller --shard")


def _access(url: str, options: dict | None) -> bool:
    """Whether a store is at ``url``; JobSpecError (one line) for a foreign folder or an unreachable URL."""
    try:
        filesystem(url, options)
        exists = store_exists(url, options)
        if not exists and is_foreign_folder(url, options):
            raise JobSpecError(f"{url} exists and is not an image store; choose another URL")
    except JobSpecError:
        raise
    except Exception as e:  # RendererError, unreachable endpoint, bad credentials, malformed URL
        raise JobSpecError(f"cannot access {url!r}: {first_line(e)}") from None
    return exists


def inspect_store(url: str, options: dict | None, src: Source, tile: int, shard: int, overwrite: bool) -> int | None:
    """The shard of the store at ``url`` that this import resumes, or None when a new one must be made.

    Writes nothing.  A store of another picture, of a render, or of another
    --tile / --shard is refused (JobSpecError) unless ``overwrite``.
    """
    if not _access(url, options) or overwrite:
        return None
    try:
        store = open_store(url, options, mode="r")
        record = imported_from(store.meta)
    except RendererError as e:
        raise JobSpecError(f"{e} (use --overwrite to replace it)") from None
    if record is None or not store.has_level(0):
        kind = "a render job's image" if store.meta.get("identity") else "an image store not made by an import"
        raise JobSpecError(f"{url} holds {kind}; use --overwrite to replace it")
    if (record.get("sha256"), record.get("bytes")) != (src.sha256, src.size):
        raise JobSpecError(
            f"{url} holds an import of another file ({record.get('source')}, sha256 {str(record.get('sha256'))[:12]}); "
            "use --overwrite to replace it"
        )
    if record.get("tile") != tile or (shard and record.get("shard") != shard):
        raise JobSpecError(
            f"{url} holds this picture in tiles of {record.get('tile')} (shard {record.get('shard')}), not "
            f"{tile} (shard {shard or 'auto'}); re-run with those, or --overwrite"
        )
    return int(record.get("shard") or 1)


def create_store(url: str, options: dict | None, src: Source, tile: int, shard: int) -> ImageStore:
    """A new store for the picture, made as a render makes its store (the caller holds the lease)."""
    pic = src.picture
    plan = TilePlan(pic.height, pic.width, tile * shard)
    meta: dict[str, Any] = {
        IMPORT_KEY: src.record(tile, shard),
        "checkpoint": None,
        "checkpoint_sha256": None,
        "version": software_version(),
        "tiles_total": len(plan),
        "tiles_done": 0,
        "status": "created",
        "created": time.time(),
        "runs": [],
    }
    try:
        return create_job_store(
            url,
            options,
            height=pic.height,
            width=pic.width,
            tile=tile,
            shard=shard,
            compressor="zstd",
            lines=None,
            name=os.path.splitext(os.path.basename(pic.path))[0] or "image",
            meta=meta,
        )
    except (RendererError, OSError, ValueError) as e:
        raise JobSpecError(f"cannot write {url!r}: {first_line(e)}") from None


# ---------------------------------------------------------------- the copy
@dataclass
class Copied:
    """What one run wrote."""

    tiles: int = 0
    pixels: int = 0


def copy_strips(store: ImageStore, picture: Picture, lease: Lease, progress: bool, copied: Copied) -> None:
    """Write every strip (one row of plan tiles) without a marker: its chunks, then its marker."""
    from tqdm import tqdm

    plan = store.tile_plan()
    done = store.done_mask(plan)
    cols, side = plan.cols, plan.side
    strip_done = [bool(row.all()) for row in done.reshape(plan.rows, cols)]
    if not all(strip_done):
        store.invalidate_pyramid("level-0 tiles imported")
    host, pid = socket.gethostname(), os.getpid()
    last_meta = time.monotonic()
    with tqdm(
        total=len(plan),
        initial=sum(strip_done) * cols,
        unit="tile",
        desc="import",
        disable=not progress,
        dynamic_ncols=True,
        file=sys.stderr,
    ) as bar:
        for r0, pixels in picture.strips(side, skip=lambda r0: strip_done[r0 // side]):
            t0 = time.perf_counter()
            i = r0 // side
            store.write_chunks(0, r0, 0, pixels)
            records = []
            for k in range(i * cols, (i + 1) * cols):
                t = plan.tile(k)
                crc = tile_crc(pixels[:, :, t.c0 : t.c1])
                seconds = round((time.perf_counter() - t0) / cols, 4)
                records.append(tile_marker(TileResult(t.id, (t.r0, t.r1), (t.c0, t.c1), crc, seconds, pid, host)))
            lease.check()  # another writer took the store over: mark nothing more
            store.mark_tiles(i * cols, (i + 1) * cols, records)
            copied.tiles += cols
            copied.pixels += pixels.shape[1] * pixels.shape[2]
            bar.update(cols)
            if time.monotonic() - last_meta > META_EVERY_S:
                last_meta = time.monotonic()
                store.update_meta(tiles_done=int(store.done_mask(plan).sum()))


def import_picture(
    path: str,
    url: str,
    storage_options: dict | None = None,
    tile: int = DEFAULT_TILE,
    shard: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Import the picture at ``path`` into the store at ``url`` (resuming one); return the run summary.

    Order, so that a refusal leaves nothing behind: read the picture's header
    and hash the file, look at the store (read-only), take the store's
    writer lease, look again, only then make or change the store.
    """
    t_start = time.perf_counter()
    check_layout(tile, shard)
    src = read_source(path, progress)
    resumed_shard = inspect_store(url, storage_options, src, tile, shard, overwrite)
    pic = src.picture
    object_store = not (is_local(url) or url.startswith("memory://"))
    shard = shard or resumed_shard or auto_shard(pic.height, pic.width, tile, object_store=object_store)
    check_layout(tile, shard)
    lease = store_lease(url, storage_options)
    copied, made = Copied(), False
    try:
        try:
            lease.acquire(f"import {src.sha256[:12]}")
        except OSError as e:
            raise JobSpecError(f"cannot write {url!r}: {first_line(e)}") from None
        resumed = inspect_store(url, storage_options, src, tile, shard, overwrite) is not None
        store = (
            open_store(url, storage_options, mode="a")
            if resumed
            else create_store(url, storage_options, src, tile, shard)
        )
        made = not resumed
        store.update_meta(status="running", error=None)
        _copy(store, src, lease, progress, copied)
        summary = _summary(store, src, url, copied, time.perf_counter() - t_start)
    except PictureError:
        lease.release()
        if made:  # nothing of a picture that cannot be read stays behind
            fs, root = filesystem(url, storage_options)
            remove_tree(fs, root)
        raise
    except BaseException as e:
        _record_failure(url, storage_options, lease, e)
        raise
    finally:
        lease.release()
    return summary


def _copy(store: ImageStore, src: Source, lease: Lease, progress: bool, copied: Copied) -> None:
    """``copy_strips``, with a storage failure made one line (exit 1: re-run to resume)."""
    try:
        copy_strips(store, src.picture, lease, progress, copied)
    except (PictureError, RendererError, KeyboardInterrupt):
        raise
    except Exception as e:  # the filesystem's own errors: endpoint down, disk full, ...
        raise RendererError(f"cannot write {store.url}: {first_line(e)}") from None


def _summary(store: ImageStore, src: Source, url: str, copied: Copied, seconds: float) -> dict[str, Any]:
    """The run's summary, also recorded in the store meta (``runs``, ``last_run``, ``status``)."""
    plan = store.tile_plan()
    left = len(plan) - int(store.done_mask(plan).sum())
    summary = {
        "source": src.picture.path,
        "out": url,
        "height": src.picture.height,
        "width": src.picture.width,
        "tiles_total": len(plan),
        "tiles_imported": copied.tiles,
        "tiles_skipped": len(plan) - copied.tiles - left,
        "tiles_left": left,
        "pixels": copied.pixels,
        "seconds": round(seconds, 3),
        "mpx_s": round(copied.pixels / max(seconds, 1e-9) / 1e6, 3),
        "status": "done" if left == 0 else "partial",
        "conversions": list(src.picture.conversions),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    runs = [*list(store.meta.get("runs", []))[-20:], summary]
    store.update_meta(status=summary["status"], tiles_done=len(plan) - left, runs=runs, last_run=summary)
    return summary


def _record_failure(url: str, options: dict | None, lease: Lease, e: BaseException) -> None:
    """Best effort: say in the store how this run ended (the markers stay the truth)."""
    if lease.record is None:
        return  # not ours to write
    status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
    try:
        store = open_store(url, options, mode="a")
        if store.has_level(0):
            store.update_meta(status=status, error=None if status == "interrupted" else first_line(e))
    except Exception:
        pass


# ---------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMAGE", help="picture file: PNG, JPEG, TIFF, WebP, ... (anything libvips reads)")
    p.add_argument("url", metavar="URL", help="image store to make: a path or any fsspec URL (s3://, gs://, az://)")
    p.add_argument("--storage-options", default=None, metavar="JSON", help="fsspec options for the store, as JSON")
    p.add_argument(
        "--tile",
        type=int,
        default=DEFAULT_TILE,
        metavar="T",
        help=f"chunk side of level 0, a multiple of {TILE_MULTIPLE} (a render's --tile) [{DEFAULT_TILE}]",
    )
    p.add_argument(
        "--shard",
        type=int,
        default=0,
        metavar="N",
        help="tiles per shard side; 0 = auto (object stores: <= 1024 objects), 1 = no shards [0]",
    )
    p.add_argument("--overwrite", action="store_true", help="replace what is at URL (another picture, a render)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


@command(failed_hint=" (re-run the same command to resume)")
def run(args: argparse.Namespace) -> int:
    import json

    options = parse_storage_options(args.storage_options, JobSpecError)
    summary = import_picture(
        args.image, args.url, options, args.tile, args.shard, args.overwrite, progress=not args.quiet
    )
    print("summary " + json.dumps(summary))
    notes = f"; {', '.join(summary['conversions'])}" if summary["conversions"] else ""
    print(
        f"imported {summary['tiles_imported']} of {summary['tiles_total']} tiles ({summary['tiles_skipped']} already "
        f"done) of {summary['width']} x {summary['height']} px in {summary['seconds']:.1f} s{notes} -> {args.url}"
    )
    print(f"next: render.py assemble {args.url} --tiff OUT.tif --dzi OUT   or   render.py view {args.url}")
    return 0
