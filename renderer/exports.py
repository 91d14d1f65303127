"""Exports of an image store: a pyramidal tiled TIFF and a DeepZoom (.dzi + .szi) pyramid.

`write_exports` is block work (renderer.blocks, run by a renderer.scaleout
``Runner``: local threads, or Ray tasks with renderer.cluster): first the
pyramid levels that are missing (renderer.pyramid.build_levels), then every
level in bands of rows, each band read once for both exports and holding a
chunk row or two of its level at a time (docs/assemble.md); `write_tiff` and
`write_dzi` are the single-export forms.

- TIFF (renderer.tiff, tifffile): BigTIFF, tiled, RGB contig, level 0 as the
  main image and levels 1..n-1 as its SubIFDs, copied from the zarr levels (no
  recomputation), OME-XML. The bands encode its tiles (the bytes tifffile
  would make) and return them; one writer puts them in the file in order.
- DeepZoom, engine "zarr" (renderer.dzi, the default): tiles cut from the zarr
  levels, JPEG-encoded and written by the bands; the DeepZoom levels are our
  pyramid levels (tests: decoded tiles equal dzsave's).
- DeepZoom, engine "vips" (pyvips ``dzsave``): level 0 is copied strip by
  strip into a planar raw file in a scratch folder, which libvips maps and
  interleaves itself; dzsave then reads it sequentially (or a TIFF source).
- The .szi is a zip (stored, JPEG tiles do not shrink) of the same files in
  the layout libvips writes for ``.szi``.

Never half an export (``Target``): every export is written under a temporary
name next to its target (``.<name>.creps-tmp-<token>...``) and put in place only
once it is whole, so a failure at any point (a corrupt chunk, a full disk, an
outage, Ctrl-C) leaves the previous exports as they were and removes its own
temporary files.

- Local: the TIFF and the .szi by ``os.replace``; DeepZoom's ``<base>_files``
  folder by renaming the old one aside, the new one in, then deleting the old
  (rolled back if the rename fails); the ``.dzi`` last, as it is what viewers
  open. Debris of a run killed outright (kill -9) is removed by the next run
  for the same target; an old ``_files`` folder found aside with no live one
  is put back first. (So two assembles must not write the same target at
  once: the second would take the first one's files for debris.) A part not
  asked for this time (``.szi`` with ``szi=False``) is left as it was, with
  its own sidecar.
- Remote (any fsspec URL): written locally in a temporary folder (the
  DeepZoom tiles: by the bands, straight to the temporary keys, so tasks on
  any node can write them), uploaded to temporary keys next to the target,
  then copied into place (folders first,
  ``.dzi`` last) and the temporary keys removed; old DeepZoom tiles the new
  pyramid does not have are deleted only after the new ones are all in place.
  Object stores have no rename, so that final server-side copy is not atomic:
  a failure during it can leave a mix of old and new tiles (re-run to fix);
  everything before it -- reading, encoding, uploading -- leaves the old
  exports untouched.
- Provenance: next to each export a sidecar ``<export>.source.json``
  (``out.tif.source.json``, ``out.dzi.source.json``, ``out.szi.source.json``)
  says what it was built from: the store URL, the job identity and checkpoint
  sha256 (``store.meta``), ``tiles_done`` / ``tiles_total`` / ``partial``, the
  pyramid levels, the export settings, the time and the software version.
  It is written atomically right after its export is put in place.
- One line for a broken input: an unreadable chunk is a ``RendererError``
  naming the level and the chunk (ImageStore.read_rows); a failed write
  or upload names the target.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from importlib import metadata
from typing import Any

import numpy as np

from creps.errors import UserError, first_line

from .blocks import (
    Band,
    BandResult,
    DziTiles,
    Source,
    TiffTiles,
    export_band,
    export_bands,
    hwc,
    small_dzi_levels,
)
from .dzi import dzi_xml, max_level
from .errors import RendererError
from .fsio import atomic_local_write, filesystem, fresh_ls, is_local, local_path, write_bytes
from .pyramid import BAND_PIXELS, RULE, pyramid_current, pyramid_plan, run_level_pass, source_state, start_level_pass
from .scaleout import Runner, ThreadRunner, in_order
from .store import ImageStore, object_rows
from .tiff import COMPRESSIONS, TIFF_TILES, write_levels

DZI_ENGINES = ("vips", "zarr")
SIDECAR = ".source.json"  # provenance record next to each export: <export>.source.json
TEMP_TAG = ".creps-tmp-"  # temporary names: .<name>.creps-tmp-<token>...
TIFF_PARTS = ("",)
DZI_FOLDER = "_files"


def dzi_parts(szi: bool) -> tuple[str, ...]:
    """What a DeepZoom export is, in the order it is put in place: tiles, .szi, then the .dzi."""
    return (DZI_FOLDER, ".szi", ".dzi") if szi else (DZI_FOLDER, ".dzi")


# ---------------------------------------------------------------- targets
def check_target(url: str, storage_options: dict | None = None) -> None:
    """Fail early (one line) when ``url``'s parent cannot be written."""
    if is_local(url):
        parent = os.path.dirname(os.path.abspath(local_path(url))) or "."
        probe = parent
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.access(probe, os.W_OK) or (os.path.exists(parent) and not os.path.isdir(parent)):
            raise RendererError(f"cannot write {url!r}: {parent} is not a writable folder")
    else:
        filesystem(url, storage_options)


def software_version() -> str:
    try:
        return f"creps-gigapixel {metadata.version('creps-gigapixel')}"
    except metadata.PackageNotFoundError:
        return "creps-gigapixel (source)"


def _rm_local(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.unlink(path)
        except OSError:
            pass


def _local_files(folder: str) -> list[str]:
    """Paths of the files under ``folder``, relative to it, '/'-separated."""
    out = []
    for root, _, files in os.walk(folder):
        rel = os.path.relpath(root, folder)
        for f in files:
            out.append(f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}")
    return sorted(out)


class Target:
    """One export at ``url``: staged under temporary names, then put in place whole.

    ``parts`` are the suffixes that make up the export (``("",)`` for one file;
    ``dzi_parts`` for DeepZoom, ``url`` then being the base name) in the order
    they are put in place; ``folders`` those that are folders. Writers write
    ``stage + part``; ``publish`` swaps every part in and writes the sidecars;
    ``abort`` removes what was staged. Use it through ``staged``.
    """

    def __init__(
        self,
        url: str,
        parts: tuple[str, ...],
        folders: tuple[str, ...] = (),
        storage_options: dict | None = None,
    ) -> None:
        self.url, self.parts, self.folders = url, parts, folders
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.local = is_local(url)
        self._tmpdir: str | None = None
        self._uploaded: list[str] = []
        self._direct: dict[str, list[str] | None] = {}  # remote folders the block work writes itself
        if self.local:
            self.fs: Any = None
            self.final = os.path.abspath(local_path(url))
            self.folder = os.path.dirname(self.final)
            self.name = os.path.basename(self.final)
            os.makedirs(self.folder, exist_ok=True)
            self.stage = os.path.join(self.folder, f".{self.name}{TEMP_TAG}{self.token}")
        else:
            self.fs, self.final = filesystem(url, storage_options)
            self.folder = posixpath.dirname(self.final)
            self.name = posixpath.basename(self.final)
            self._tmpdir = tempfile.mkdtemp(prefix="creps-export-")
            self.stage = os.path.join(self._tmpdir, self.name)
            self.remote_stage = f"{self.folder}/.{self.name}{TEMP_TAG}{self.token}"
        try:
            self.clean_debris()
        except BaseException as e:
            self.cleanup()
            if isinstance(e, Exception) and not isinstance(e, UserError):
                raise RendererError(f"cannot prepare {url!r}: {first_line(e)}") from e
            raise

    # ------------------------------------------------------------ names
    def tile_folder(self, part: str) -> str:
        """Where the block work writes folder ``part``: the staged local folder, or temporary keys
        next to a remote target (a URL any node can write; the upload step then skips it)."""
        if self.local:
            return self.stage + part
        self._direct[part] = None
        return self.fs.unstrip_protocol(self.remote_stage + part)

    def tiles_written(self, part: str, rels: list[str]) -> None:
        """The files the block work wrote under ``tile_folder(part)``, relative to it."""
        if not self.local:
            self._direct[part] = sorted(rels)

    def folder_files(self, part: str) -> list[str]:
        """The files of staged folder ``part``, relative to it."""
        rels = self._direct.get(part)
        return rels if rels is not None else _local_files(self.stage + part)

    def direct_parts(self) -> set[str]:
        """Folders written straight to temporary keys of a remote target (``tile_folder``)."""
        return set(self._direct)

    def scratch(self) -> str:
        """A scratch folder next to the staged files (same disk), removed with them."""
        path = self.stage + ".scratch"
        os.makedirs(path, exist_ok=True)
        return path

    def _debris_prefix(self) -> str:
        return f".{self.name}{TEMP_TAG}"

    def clean_debris(self) -> None:
        """Remove what a killed earlier run left for this target; put back an old folder left aside."""
        prefix = self._debris_prefix()
        if self.local:
            for entry in sorted(os.listdir(self.folder)):
                if not entry.startswith(prefix) or entry.startswith(os.path.basename(self.stage)):
                    continue
                path = os.path.join(self.folder, entry)
                restored = False
                for part in self.folders:
                    live = self.final + part
                    if entry.endswith(".old" + part) and os.path.isdir(path) and not os.path.lexists(live):
                        os.rename(path, live)  # killed between moving the old one aside and the new one in
                        restored = True
                if not restored:
                    _rm_local(path)
            return
        try:
            entries = fresh_ls(self.fs, self.folder)
        except FileNotFoundError:
            return
        for entry in entries:
            if posixpath.basename(str(entry).rstrip("/")).startswith(prefix):
                self.fs.rm(entry, recursive=True)

    # ------------------------------------------------------------ publish / abort
    def publish(self, records: dict[str, dict]) -> None:
        """Put every staged part in place (``.dzi`` last), then write ``records[part]`` as its sidecar."""
        try:
            if self.local:
                self._publish_local()
            else:
                self._publish_remote()
            for part, record in records.items():
                self._write_sidecar(part, record)
        except UserError:
            raise
        except Exception as e:
            raise RendererError(f"cannot put {self.url!r} in place: {first_line(e)}") from e
        finally:
            self.cleanup()

    def _publish_local(self) -> None:
        moved: list[tuple[str, str, str]] = []  # (new, live, aside) of swapped folders, for a rollback
        try:
            for part in self.parts:
                src, dst = self.stage + part, self.final + part
                if part in self.folders:
                    aside = f"{self.stage}.old{part}"
                    if os.path.lexists(dst):
                        os.rename(dst, aside)
                    try:
                        os.rename(src, dst)
                    except BaseException:  # Ctrl-C included: never leave the live name empty
                        if os.path.lexists(aside) and not os.path.lexists(dst):
                            os.rename(aside, dst)
                        raise
                    moved.append((src, dst, aside))
                else:
                    os.replace(src, dst)
        except BaseException:
            for src, dst, aside in reversed(moved):  # new folders back out, old ones back in
                os.rename(dst, src)
                if os.path.lexists(aside):
                    os.rename(aside, dst)
            raise
        for _, _, aside in moved:
            _rm_local(aside)

    def _publish_remote(self) -> None:
        fs = self.fs
        # 1. the whole new export under temporary keys (the long step; the old one is untouched)
        lpaths, rpaths = [], []
        for part in self.parts:
            if part in self._direct:
                continue  # already under the temporary keys
            if part in self.folders:
                for rel in _local_files(self.stage + part):
                    lpaths.append(os.path.join(self.stage + part, *rel.split("/")))
                    rpaths.append(f"{self.remote_stage}{part}/{rel}")
            else:
                lpaths.append(self.stage + part)
                rpaths.append(self.remote_stage + part)
        self._uploaded = rpaths
        if lpaths:
            fs.put(lpaths, rpaths)
        # 2. copied into place, folders first and the .dzi last; then old tiles the new one lacks
        for part in self.parts:
            if part in self.folders:
                rels = self.folder_files(part)
                live = self.final + part
                fs.copy([f"{self.remote_stage}{part}/{r}" for r in rels], [f"{live}/{r}" for r in rels])
                fs.invalidate_cache(live)
                try:
                    old = {str(p)[len(live) + 1 :] for p in fs.find(live)}
                except FileNotFoundError:
                    old = set()
                stale = sorted(old - set(rels))
                if stale:
                    fs.rm([f"{live}/{r}" for r in stale])
            else:
                fs.copy([self.remote_stage + part], [self.final + part])
        # 3. the temporary keys
        if rpaths:
            fs.rm(rpaths)
        self._uploaded = []
        self._remove_direct()

    def _remove_direct(self) -> None:
        for part in self._direct:
            try:
                self.fs.rm(self.remote_stage + part, recursive=True)
            except FileNotFoundError:
                pass
        self._direct = {}

    def _write_sidecar(self, part: str, record: dict) -> None:
        path = self.final + part + SIDECAR
        if part not in self.folders and self.local:
            record = {**record, "bytes": os.path.getsize(self.final + part)}
        elif part not in self.folders:
            record = {**record, "bytes": os.path.getsize(self.stage + part)}
        data = json.dumps(record, indent=1).encode()
        if self.local:
            atomic_local_write(path, data)
        else:
            write_bytes(self.fs, path, data)

    def abort(self) -> None:
        """Remove everything staged (local files, temporary keys); the old export stays as it was."""
        if self.local:
            for part in self.parts:
                _rm_local(self.stage + part)
        else:
            try:
                if self._uploaded:
                    self.fs.rm(self._uploaded)
                self._remove_direct()
            except Exception:
                pass  # best effort: the next run removes them (clean_debris)
            self._uploaded = []
        self.cleanup()

    def cleanup(self) -> None:
        """Remove the scratch folder and, for remote targets, the local staging folder."""
        _rm_local(self.stage + ".scratch")
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None


@contextmanager
def staged(
    url: str,
    parts: tuple[str, ...],
    folders: tuple[str, ...] = (),
    storage_options: dict | None = None,
) -> Iterator[Target]:
    """A ``Target`` whose staged files are removed if the body (or its ``publish``) fails."""
    target = Target(url, parts, folders, storage_options)
    try:
        yield target
    except BaseException:
        target.abort()
        raise
    finally:
        target.cleanup()


def provenance(
    store: ImageStore | None,
    kind: str,
    url: str,
    settings: dict,
    source: dict | None = None,
) -> dict:
    """The sidecar record of an export: what it was built from, how, when and by what."""
    record: dict[str, Any] = {"export": kind, "url": url, "settings": settings}
    if store is not None:
        meta = store.meta
        prog = store.pyramid_progress() or {}
        built = prog.get("source") if isinstance(prog.get("source"), dict) else None
        src = source or built or source_state(store)
        record.update(
            store=store.url,
            identity=meta.get("identity"),
            checkpoint=meta.get("checkpoint"),
            checkpoint_sha256=meta.get("checkpoint_sha256"),
            render_version=meta.get("version"),
            tiles_done=src.get("tiles_done"),
            tiles_total=src.get("tiles_total"),
            partial=bool(src.get("partial")),
            pyramid={
                "levels": len(pyramid_plan(store)),
                "rule": RULE,
                "stale": bool(prog.get("stale")),
            },
        )
    record.update(created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), software=software_version())
    return record


def _check_tiff_args(tile: int, compression: str, quality: int) -> None:
    if tile not in TIFF_TILES:
        raise RendererError(f"TIFF tile must be one of {TIFF_TILES}, got {tile}")
    if compression not in COMPRESSIONS:
        raise RendererError(f"unknown TIFF compression {compression!r}; use {', '.join(COMPRESSIONS)}")
    _check_quality(quality)


def _check_quality(quality: int) -> None:
    if not 1 <= quality <= 100:
        raise RendererError(f"JPEG quality must be 1..100, got {quality}")


def _check_dzi_args(tile_size: int, overlap: int, engine: str) -> None:
    if tile_size < 1 or overlap < 0 or 2 * overlap >= tile_size:
        raise RendererError(f"bad DeepZoom tiling: tile_size={tile_size}, overlap={overlap}")
    if engine not in DZI_ENGINES:
        raise RendererError(f"unknown DeepZoom engine {engine!r}; use {' or '.join(DZI_ENGINES)}")


def _dzi_base(url: str) -> str:
    return url[: -len(".dzi")] if url.endswith(".dzi") else url


def _written(what: str, url: str, fn: Callable[[], None]) -> None:
    """Run an export writer; a plain OSError (disk full, permissions) becomes one RendererError."""
    try:
        fn()
    except UserError:
        raise
    except OSError as e:
        raise RendererError(f"cannot write the {what} {url!r}: {first_line(e)}") from e


def write_exports(
    store: ImageStore,
    tiff: str | None = None,
    dzi: str | None = None,
    tiff_tile: int = 256,
    compression: str = "jpeg",
    quality: int = 90,
    szi: bool = True,
    dzi_tile: int = 254,
    overlap: int = 1,
    storage_options: dict | None = None,
    workers: int | None = None,
    progress: bool = False,
    runner: Runner | None = None,
) -> None:
    """The TIFF and/or the DeepZoom pyramid (zarr engine), as block work on ``runner``.

    The pyramid levels that are missing (renderer.pyramid.run_level_pass;
    nothing when the pyramid is current, renderer.pyramid.pyramid_current) are
    built beside the bands of the levels already there; then every level in bands
    (renderer.blocks.export_band), each band read once for both exports: its
    TIFF tiles come back encoded and go to the one TIFF writer in order, its
    DeepZoom tiles are written by the band itself (straight to the staged
    folder, or to temporary keys next to a remote target). Without ``runner``:
    ``workers`` local threads (and dask for the levels). Each export is
    staged under a temporary name and put in place only when every export
    succeeded; on any failure the previous exports are left as they were
    (see the module docstring) and the error is raised.
    """
    _check_tiff_args(tiff_tile, compression, quality)
    _check_dzi_args(dzi_tile, overlap, "zarr")
    dzi = _dzi_base(dzi) if dzi else dzi
    for target in (tiff, dzi):
        if target:
            check_target(target, storage_options)
    if not tiff and not dzi:
        return
    # the missing levels are built beside the bands of the levels already there (L = 0: level 0's bands)
    levels = None if pyramid_current(store) else start_level_pass(store)
    ready = levels.first if levels is not None else len(pyramid_plan(store))
    run = runner or ThreadRunner(workers)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="levels") as background:  # waits for the pass to end
            built = background.submit(run_level_pass, levels, runner, storage_options, workers) if levels else None
            _export_levels(
                store, tiff, dzi, tiff_tile, compression, quality, szi, dzi_tile, overlap, storage_options, run,
                progress, ready, built,
            )  # fmt: skip
    finally:
        if runner is None:
            run.close()


def _export_levels(
    store: ImageStore,
    tiff: str | None,
    dzi: str | None,
    tiff_tile: int,
    compression: str,
    quality: int,
    szi: bool,
    dzi_tile: int,
    overlap: int,
    storage_options: dict | None,
    runner: Runner,
    progress: bool,
    ready: int,
    built: Future | None,
) -> None:
    """Export every level in bands; levels from ``ready`` on wait for ``built`` (the level pass) first."""
    shapes = pyramid_plan(store)
    height, width = shapes[0]
    chunk = int(store.level(0).chunks[1])
    with ExitStack() as stack:
        tiff_target = stack.enter_context(staged(tiff, TIFF_PARTS, (), storage_options)) if tiff else None
        dzi_target = stack.enter_context(staged(dzi, dzi_parts(szi), (DZI_FOLDER,), storage_options)) if dzi else None
        tiff_spec = TiffTiles(tiff_tile, compression, quality) if tiff_target else None
        dzi_spec = None
        if dzi_target is not None:
            dzi_spec = DziTiles(dzi_target.tile_folder(DZI_FOLDER), dzi_tile, overlap, quality, storage_options)
        top = max_level(width, height)
        pixels = band_pixels(height * width, runner.workers)
        levels = [export_bands(h, w, k, top - k, chunk, tiff_spec, dzi_spec, pixels) for k, (h, w) in enumerate(shapes)]
        source = Source(store.url, storage_options)

        def calls() -> Iterator[tuple[Callable[..., BandResult], tuple]]:
            for k, bands in enumerate(levels):
                if k == ready and built is not None:
                    built.result()  # the levels are written (or the pass failed: its error)
                for band in bands:
                    yield export_band, (source, band, tiff_spec, dzi_spec)

        results = in_order(runner, calls(), ahead=2 * runner.workers)
        bar = _bar(progress, sum(h * w for h, w in shapes), "exports")
        written: list[str] = []

        def level_tiles(bands: list[Band]) -> Iterator[bytes]:
            for _ in bands:
                try:
                    res = next(results)
                except OSError as e:  # only the DeepZoom tiles are written by the bands
                    raise RendererError(f"cannot write the DeepZoom pyramid {dzi!r}: {first_line(e)}") from e
                written.extend(res.dzi)
                if bar is not None:
                    bar.update(res.band.width * (res.band.b - res.band.a))
                yield from res.tiff

        try:
            if tiff_target is not None:
                assert tiff is not None
                tiles = ((h, w, level_tiles(bands)) for (h, w), bands in zip(shapes, levels, strict=True))
                _written(
                    "TIFF",
                    tiff,
                    lambda: write_levels(tiff_target.stage, tiles, len(shapes), tiff_tile, compression, quality),
                )
            else:
                for bands in levels:
                    for _ in level_tiles(bands):
                        pass
        finally:
            results.close()  # cancels what has not run (after an error)
            if bar is not None:
                bar.close()
        if dzi_target is not None and dzi_spec is not None:
            assert dzi is not None
            _written("DeepZoom pyramid", dzi, lambda: _finish_dzi(store, dzi_target, dzi_spec, shapes, written, szi))
        settings = {
            "tiff": {"tile": tiff_tile, "compression": compression, "quality": quality},
            "dzi": {"engine": "zarr", "tile_size": dzi_tile, "overlap": overlap, "quality": quality, "szi": szi},
        }
        if tiff_target is not None:
            assert tiff is not None
            tiff_target.publish({"": provenance(store, "tiff", tiff, settings["tiff"])})
        if dzi_target is not None:
            assert dzi is not None
            record = provenance(store, "dzi", dzi + ".dzi", settings["dzi"])
            records = {".dzi": record}
            if szi:
                records[".szi"] = {**record, "export": "szi", "url": dzi + ".szi"}
            dzi_target.publish(records)


def band_pixels(level0: int, workers: int) -> int:
    """Pixels per export band: BAND_PIXELS, smaller when level 0 alone would not give every worker four bands."""
    return max(1 << 16, min(BAND_PIXELS, level0 // (4 * max(1, workers))))


def _finish_dzi(
    store: ImageStore, target: Target, spec: DziTiles, shapes: list[tuple[int, int]], written: list[str], szi: bool
) -> None:
    """The DeepZoom levels below the last zarr level, the .dzi descriptor and the .szi."""
    height, width = shapes[0]
    last = len(shapes) - 1
    below = max_level(width, height) - last  # DeepZoom level of the last zarr level
    if below > 0:
        written.extend(small_dzi_levels(hwc(store.read_rows(last, 0, shapes[last][0])), below, spec))
    target.tiles_written(DZI_FOLDER, written)
    with open(target.stage + ".dzi", "w") as f:
        f.write(dzi_xml(width, height, "jpg", spec.tile, spec.overlap))
    if szi:
        _zip_szi(target, target.name)


# ---------------------------------------------------------------- TIFF
def write_tiff(
    store: ImageStore,
    url: str,
    tile: int = 256,
    compression: str = "jpeg",
    quality: int = 90,
    storage_options: dict | None = None,
    workers: int | None = None,
    progress: bool = False,
    runner: Runner | None = None,
) -> str:
    """Write the pyramidal BigTIFF of ``store`` to ``url`` (local path or fsspec URL); return url."""
    write_exports(
        store,
        tiff=url,
        tiff_tile=tile,
        compression=compression,
        quality=quality,
        storage_options=storage_options,
        workers=workers,
        progress=progress,
        runner=runner,
    )
    return url


def _bar(progress: bool, total: int, desc: str) -> Any:
    if not progress:
        return None
    from tqdm import tqdm

    # disable=None: only on a terminal, so a log or a pipe gets the result lines (and one error line) alone
    return tqdm(total=total, unit="px", unit_scale=True, desc=desc, leave=False, disable=None)


# ---------------------------------------------------------------- DeepZoom
def _raw_planes(store: ImageStore, path: str, progress: bool) -> None:
    """Level 0 as three planes (R, G, B) of H*W bytes each, copied chunk row by chunk row."""
    arr = store.level(0)
    _, h, w = arr.shape
    step = object_rows(arr)  # whole stored objects per read: no range requests
    bar = _bar(progress, h * w, "raw")

    def read(r: int) -> np.ndarray:
        return store.read_rows(0, r, min(r + step, h), arr)

    try:
        with open(path, "wb") as f, ThreadPoolExecutor(1) as pool:
            f.truncate(3 * h * w)
            nxt = pool.submit(read, 0)
            for r0 in range(0, h, step):
                strip = nxt.result()
                if r0 + step < h:
                    nxt = pool.submit(read, r0 + step)
                for c in range(3):
                    f.seek(c * h * w + r0 * w)
                    f.write(np.ascontiguousarray(strip[c]).tobytes())
                if bar is not None:
                    bar.update(strip.shape[1] * w)
    finally:
        if bar is not None:
            bar.close()


def _dz_source(source: ImageStore | str, tmp: str, progress: bool) -> Any:
    """A pyvips image of level 0 that libvips reads sequentially, never a Python array."""
    import pyvips

    if isinstance(source, ImageStore):
        h, w = source.shape
        raw = os.path.join(tmp, "level0.raw")
        _raw_planes(source, raw, progress)
        planes = [pyvips.Image.rawload(raw, w, h, 1, offset=c * h * w) for c in range(3)]
        return planes[0].bandjoin(planes[1:]).copy(interpretation="srgb")
    if not os.path.exists(source):
        raise RendererError(f"no TIFF at {source!r}")
    return pyvips.Image.new_from_file(source, access="sequential")


def write_dzi(
    source: ImageStore | str,
    url: str,
    quality: int = 90,
    tile_size: int = 254,
    overlap: int = 1,
    szi: bool = True,
    storage_options: dict | None = None,
    progress: bool = False,
    engine: str | None = None,
    workers: int | None = None,
) -> str:
    """Write ``<url>.dzi`` + ``<url>_files/`` (and ``<url>.szi``) from a store or a TIFF; return url.

    ``url`` is the base name (a trailing .dzi is dropped). ``engine``: "zarr"
    (default for a store: tiles cut from the zarr pyramid levels by renderer.dzi)
    or "vips" (default for a TIFF path: libvips dzsave, from a raw copy of level 0
    for a store). Staged and put in place whole, like every export.
    """
    engine = engine or ("zarr" if isinstance(source, ImageStore) else "vips")
    _check_quality(quality)
    _check_dzi_args(tile_size, overlap, engine)
    if engine == "zarr":
        if not isinstance(source, ImageStore):
            raise RendererError("the zarr DeepZoom engine needs an image store as source, not a TIFF")
        write_exports(
            source,
            dzi=url,
            quality=quality,
            szi=szi,
            dzi_tile=tile_size,
            overlap=overlap,
            storage_options=storage_options,
            workers=workers,
            progress=progress,
        )
        return url
    url = _dzi_base(url)
    check_target(url, storage_options)
    store = source if isinstance(source, ImageStore) else None
    snapshot = source_state(store) if store is not None else None
    with staged(url, dzi_parts(szi), (DZI_FOLDER,), storage_options) as target:

        def save() -> None:
            image = _dz_source(source, target.scratch(), progress)
            try:
                image.dzsave(
                    target.stage, tile_size=tile_size, overlap=overlap, suffix=f".jpg[Q={quality}]", depth="onepixel"
                )
            except Exception as e:  # pyvips.Error: libvips' own message, often many lines
                raise RendererError(f"libvips dzsave failed for {url!r}: {first_line(e)}") from e
            if szi:
                _zip_szi(target, target.name)

        _written("DeepZoom pyramid", url, save)
        settings = {"engine": "vips", "tile_size": tile_size, "overlap": overlap, "quality": quality, "szi": szi}
        record = provenance(store, "dzi", url + ".dzi", settings, source=snapshot)
        if store is None:
            record["source_tiff"] = os.path.abspath(str(source))
            record["tiff_source"] = _read_sidecar(str(source))
        records = {".dzi": record}
        if szi:
            records[".szi"] = {**record, "export": "szi", "url": url + ".szi"}
        target.publish(records)
    return url


def _read_sidecar(path: str) -> dict | None:
    """The provenance record next to a local export, if any."""
    try:
        with open(path + SIDECAR) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _zip_szi(target: Target, name: str) -> None:
    """``<stage>.szi``: a stored zip with ``name/name.dzi`` and ``name/name_files/...``.

    The DeepZoom files are where the target staged them (a temporary name;
    tiles written straight to temporary keys of a remote target are read back
    from there); ``name`` is the name they are published under, which the
    zip's entries use.
    """
    base = target.stage
    rels = target.folder_files(DZI_FOLDER)
    with zipfile.ZipFile(base + ".szi", "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.write(base + ".dzi", f"{name}/{name}.dzi")
        if target.local or DZI_FOLDER not in target.direct_parts():
            for rel in rels:
                zf.write(os.path.join(base + DZI_FOLDER, *rel.split("/")), f"{name}/{name}{DZI_FOLDER}/{rel}")
            return
        folder = target.remote_stage + DZI_FOLDER
        for i in range(0, len(rels), 256):  # a batch of concurrent reads at a time
            batch = rels[i : i + 256]
            data = target.fs.cat([f"{folder}/{rel}" for rel in batch])
            for rel in batch:
                zf.writestr(f"{name}/{name}{DZI_FOLDER}/{rel}", data[f"{folder}/{rel}"])
