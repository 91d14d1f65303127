"""Exports of an image store: a pyramidal tiled TIFF and a DeepZoom (.dzi + .szi) pyramid.

Both stream: nothing holds more than a few strips of chunk rows of one level.
`write_exports` reads every level once (LevelStream: a reader thread, one
small queue per consumer) and feeds the TIFF writer and the DeepZoom cutter
side by side; `write_tiff` and `write_dzi` are the single-export forms.

- TIFF (renderer.tiff, tifffile): BigTIFF, tiled, RGB contig, level 0 as the
  main image and levels 1..n-1 as its SubIFDs, copied from the zarr levels (no
  recomputation; the pyramid is built first unless it is complete, see
  renderer.pyramid), OME-XML.
- DeepZoom, engine "zarr" (renderer.dzi, the default): tiles cut from the zarr
  levels and JPEG-encoded on a thread pool; the DeepZoom levels are our
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
- Remote (any fsspec URL): written locally in a temporary folder, uploaded to
  temporary keys next to the target, then copied into place (folders first,
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
  naming the level and the chunk (renderer.pyramid.read_rows); a failed write
  or upload names the target.
"""

from __future__ import annotations

import json
import os
import posixpath
import queue
import shutil
import tempfile
import threading
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

from .dzi import DziWriter
from .errors import RendererError
from .fsio import atomic_local_write, filesystem, fresh_ls, is_local, local_path, write_bytes
from .pyramid import RULE, build_pyramid, pyramid_complete, pyramid_plan, read_rows, source_state
from .store import ImageStore
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
            if part in self.folders:
                for rel in _local_files(self.stage + part):
                    lpaths.append(os.path.join(self.stage + part, *rel.split("/")))
                    rpaths.append(f"{self.remote_stage}{part}/{rel}")
            else:
                lpaths.append(self.stage + part)
                rpaths.append(self.remote_stage + part)
        self._uploaded = rpaths
        fs.put(lpaths, rpaths)
        # 2. copied into place, folders first and the .dzi last; then old tiles the new one lacks
        for part in self.parts:
            if part in self.folders:
                rels = _local_files(self.stage + part)
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
        fs.rm(rpaths)
        self._uploaded = []

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
        elif self._uploaded:
            try:
                self.fs.rm(self._uploaded)
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


# ---------------------------------------------------------------- one read for all exports
def hwc(chw: np.ndarray) -> np.ndarray:
    """(3, h, w) -> contiguous (h, w, 3); three strided copies, ~4x faster than a transpose copy."""
    out = np.empty((chw.shape[1], chw.shape[2], chw.shape[0]), chw.dtype)
    for c in range(chw.shape[0]):
        out[..., c] = chw[c]
    return out


class _Stop(Exception):
    pass


class LevelStream:
    """Reads every level once, a chunk row at a time, and hands each strip to every consumer.

    A reader thread decodes strips (zarr) and interleaves them to (h, w, 3)
    (with ``build``, it first runs the pyramid, whose one pass over level 0
    also hands those strips on, so level 0 is decoded once for everything);
    each consumer pulls ``strips(i, k)`` for levels k = 0, 1, ... in order from
    its own small queue (so memory is a few strips). A failing consumer calls
    ``fail`` and the reader stops; a failing reader passes its error on.
    """

    def __init__(
        self,
        store: ImageStore,
        consumers: int,
        bar: Any = None,
        depth: int = 2,
        build: bool = False,
        workers: int | None = None,
    ) -> None:
        self.store, self.build, self.workers = store, build, workers
        self.shapes = pyramid_plan(store)
        self.queues: list[queue.Queue] = [queue.Queue(depth) for _ in range(consumers)]
        self.failed = threading.Event()
        self.bar = bar
        self.thread = threading.Thread(target=self._run, name="level-reader", daemon=True)
        self.thread.start()

    def _put(self, item: Any) -> None:
        for q in self.queues:
            while True:
                if self.failed.is_set():
                    raise _Stop
                try:
                    q.put(item, timeout=0.2)
                    break
                except queue.Full:
                    continue

    def _strip(self, k: int, r0: int, chw: np.ndarray) -> None:
        self._put((k, r0, hwc(chw)))
        if self.bar is not None:
            self.bar.update(chw.shape[1] * chw.shape[2])

    def _run(self) -> None:
        try:
            first = 0
            if self.build:  # level 0 comes from the pyramid's own pass, if that pass reads all of it
                seen = [0]

                def tap(r0: int, chw: np.ndarray) -> None:
                    if r0 == seen[0]:
                        self._strip(0, r0, chw)
                        seen[0] += chw.shape[1]

                build_pyramid(self.store, workers=self.workers, tap=tap)
                if seen[0] == self.shapes[0][0]:
                    self._put((0, None, None))
                    first = 1
                # else: a resumed pass started part-way; level 0 is read below like the others
            for k in range(first, len(self.shapes)):
                arr = self.store.level(k)
                _, h, _ = arr.shape
                shards = getattr(arr, "shards", None)  # whole stored objects per read: no range requests
                step = int(shards[1]) if shards else int(arr.chunks[1])
                for r0 in range(0, h, step):
                    self._strip(k, r0, read_rows(self.store, k, r0, min(r0 + step, h), arr))
                self._put((k, None, None))
        except _Stop:
            pass
        except BaseException as e:  # hand the reader's error to the consumers
            try:
                self._put((-1, e, None))
            except _Stop:
                pass

    def strips(self, i: int, k: int) -> Iterator[tuple[int, np.ndarray]]:
        """Consumer i's (r0, strip) pieces of level k (skips what an earlier level left unread).

        Raises ``_Stop`` when another consumer failed (the reader then stops
        feeding everyone), and the reader's own error when it failed.
        """
        q = self.queues[i]
        while True:
            try:
                lev, r0, strip = q.get(timeout=0.2)
            except queue.Empty:
                if self.failed.is_set():
                    raise _Stop from None
                continue
            if lev == -1:
                raise r0
            if lev < k:
                continue
            if r0 is None:
                return
            yield r0, strip

    def fail(self) -> None:
        self.failed.set()


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


def _first_error(futures: list[Future]) -> None:
    """Wait for all; raise the first real error (a consumer stopped by another's failure is not one)."""
    errors = [f.exception() for f in futures]
    real = [e for e in errors if e is not None and not isinstance(e, _Stop)]
    if real:
        raise real[0]
    stopped = [e for e in errors if e is not None]
    if stopped:
        raise RendererError("an export stopped without an error")  # cannot happen: _Stop follows a failure


def _written(what: str, url: str, fn: Callable[[], None]) -> None:
    """Run an export writer; a plain OSError (disk full, permissions) becomes one RendererError."""
    try:
        fn()
    except (UserError, _Stop):
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
) -> None:
    """The TIFF and/or the DeepZoom pyramid (zarr engine) from one read of every level.

    The pyramid is (re)built in the same pass unless it is complete
    (renderer.pyramid.pyramid_complete). Each export is staged under a
    temporary name and put in place only when every export succeeded; on any
    failure the previous exports are left as they were (see the module
    docstring) and the error is raised.
    """
    _check_tiff_args(tiff_tile, compression, quality)
    _check_dzi_args(dzi_tile, overlap, "zarr")
    dzi = _dzi_base(dzi) if dzi else dzi
    for target in (tiff, dzi):
        if target:
            check_target(target, storage_options)
    if not tiff and not dzi:
        return
    build = not pyramid_complete(store)  # then the pyramid pass also feeds level 0 to the exports
    height, width = store.shape
    workers = workers or os.cpu_count() or 2
    parts = dzi_parts(szi)
    with ExitStack() as stack:
        tiff_target = stack.enter_context(staged(tiff, TIFF_PARTS, (), storage_options)) if tiff else None
        dzi_target = stack.enter_context(staged(dzi, parts, (DZI_FOLDER,), storage_options)) if dzi else None
        consumers = [c for c in ("tiff", "dzi") if (tiff_target if c == "tiff" else dzi_target)]
        shapes = pyramid_plan(store)
        n = len(shapes)
        total = sum(h * w for h, w in shapes)
        stream = LevelStream(
            store,
            len(consumers),
            bar=_bar(progress, total, "pyramid+exports" if build else "exports"),
            build=build,
            workers=workers,
        )

        def run_tiff(i: int) -> None:
            assert tiff_target is not None and tiff is not None
            levels = ((h, w, stream.strips(i, k)) for k, (h, w) in enumerate(shapes))
            _written(
                "TIFF",
                tiff,
                lambda: write_levels(
                    tiff_target.stage,
                    levels,
                    n,
                    tile=tiff_tile,
                    compression=compression,
                    quality=quality,
                    workers=workers,
                ),
            )

        def cut_dzi(i: int) -> None:
            assert dzi_target is not None
            base = dzi_target.stage
            with ThreadPoolExecutor(workers) as pool:
                writer = DziWriter(base, width, height, quality, dzi_tile, overlap, pool)
                for k, (h, w) in enumerate(shapes):
                    writer.add_level(h, w, stream.strips(i, k))
                writer.finish()
            if szi:
                _zip_szi(base, dzi_target.name)

        def run_dzi(i: int) -> None:
            assert dzi is not None
            _written("DeepZoom pyramid", dzi, lambda: cut_dzi(i))

        def guarded(fn: Any, i: int) -> None:
            try:
                fn(i)
            except BaseException:
                stream.fail()
                raise

        try:
            with ThreadPoolExecutor(len(consumers)) as runners:
                futs = [
                    runners.submit(guarded, run_tiff if c == "tiff" else run_dzi, i) for i, c in enumerate(consumers)
                ]
                try:
                    _first_error(futs)
                except BaseException:  # Ctrl-C here too: stop the consumers before waiting for them
                    stream.fail()
                    raise
        finally:
            stream.thread.join()
            if stream.bar is not None:
                stream.bar.close()
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
    shards = getattr(arr, "shards", None)  # whole stored objects per read: no range requests
    step = int(shards[1]) if shards else int(arr.chunks[1])
    bar = _bar(progress, h * w, "raw")

    def read(r: int) -> np.ndarray:
        return read_rows(store, 0, r, min(r + step, h), arr)

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
                _zip_szi(target.stage, target.name)

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


def _zip_szi(base: str, name: str) -> None:
    """``<base>.szi``: a stored zip with ``name/name.dzi`` and ``name/name_files/...``.

    ``base`` is where the DeepZoom files are (a temporary name while staged);
    ``name`` the name they are published under, which the zip's entries use.
    """
    with zipfile.ZipFile(base + ".szi", "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.write(base + ".dzi", f"{name}/{name}.dzi")
        for rel in _local_files(base + DZI_FOLDER):
            zf.write(os.path.join(base + DZI_FOLDER, *rel.split("/")), f"{name}/{name}{DZI_FOLDER}/{rel}")
