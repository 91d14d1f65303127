"""Exports of an image store: a pyramidal tiled TIFF and a DeepZoom (.dzi + .szi) pyramid.

Both stream: nothing holds more than a few strips of chunk rows of one level.
`write_exports` reads every level once (LevelStream: a reader thread, one
small queue per consumer) and feeds the TIFF writer and the DeepZoom cutter
side by side; `write_tiff` and `write_dzi` are the single-export forms.

- TIFF (renderer.tiff, tifffile): BigTIFF, tiled, RGB contig, level 0 as the
  main image and levels 1..n-1 as its SubIFDs, copied from the zarr levels (no
  recomputation; the pyramid is built first if it is missing), OME-XML.
- DeepZoom, engine "zarr" (renderer.dzi, the default): tiles cut from the zarr
  levels and JPEG-encoded on a thread pool; the DeepZoom levels are our
  pyramid levels (tests: decoded tiles equal dzsave's).
- DeepZoom, engine "vips" (pyvips ``dzsave``): level 0 is copied strip by
  strip into a planar raw file in a temporary folder, which libvips maps and
  interleaves itself; dzsave then reads it sequentially (or a TIFF source).
- The .szi is a zip (stored, JPEG tiles do not shrink) of the same files in
  the layout libvips writes for ``.szi``.

Remote targets (any fsspec URL): written locally in a temporary folder, then
uploaded with ``fs.put``.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np

from .dzi import DziWriter
from .errors import RendererError
from .fsio import filesystem, is_local, local_path
from .pyramid import build_pyramid, pyramid_complete, pyramid_plan
from .store import ImageStore
from .tiff import COMPRESSIONS, TIFF_TILES, write_levels

DZI_ENGINES = ("vips", "zarr")


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


@contextmanager
def _local_target(url: str, storage_options: dict | None) -> Iterator[str]:
    """A local path to write to; for remote URLs a temp path uploaded on success."""
    if is_local(url):
        path = os.path.abspath(local_path(url))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        yield path
        return
    fs, root = filesystem(url, storage_options)
    with tempfile.TemporaryDirectory(prefix="creps-export-") as tmp:
        path = os.path.join(tmp, os.path.basename(root))
        yield path
        for name in sorted(os.listdir(tmp)):
            src, dst = os.path.join(tmp, name), f"{os.path.dirname(root)}/{name}"
            fs.put(src, dst, recursive=os.path.isdir(src))


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
                step = int(arr.chunks[1])
                for r0 in range(0, h, step):
                    self._strip(k, r0, np.asarray(arr[:, r0 : r0 + step, :]))
                self._put((k, None, None))
        except _Stop:
            pass
        except BaseException as e:  # hand the reader's error to the consumers
            try:
                self._put((-1, e, None))
            except _Stop:
                pass

    def strips(self, i: int, k: int) -> Iterator[tuple[int, np.ndarray]]:
        """Consumer i's (r0, strip) pieces of level k (skips what an earlier level left unread)."""
        q = self.queues[i]
        while True:
            lev, r0, strip = q.get()
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
    """The TIFF and/or the DeepZoom pyramid (zarr engine) from one read of every level."""
    _check_tiff_args(tiff_tile, compression, quality)
    _check_dzi_args(dzi_tile, overlap, "zarr")
    dzi = dzi[: -len(".dzi")] if dzi and dzi.endswith(".dzi") else dzi
    for target in (tiff, dzi):
        if target:
            check_target(target, storage_options)
    if not tiff and not dzi:
        return
    build = not pyramid_complete(store)  # then the pyramid pass also feeds level 0 to the exports
    height, width = store.shape
    workers = workers or os.cpu_count() or 2
    with ExitStack() as stack:
        tiff_path = stack.enter_context(_local_target(tiff, storage_options)) if tiff else None
        dzi_base = stack.enter_context(_local_target(dzi, storage_options)) if dzi else None
        consumers = [c for c in ("tiff", "dzi") if (tiff_path if c == "tiff" else dzi_base)]
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
            assert tiff_path is not None
            levels = ((h, w, stream.strips(i, k)) for k, (h, w) in enumerate(shapes))
            write_levels(
                tiff_path,
                levels,
                n,
                tile=tiff_tile,
                compression=compression,
                quality=quality,
                workers=workers,
            )

        def run_dzi(i: int) -> None:
            assert dzi_base is not None
            shutil.rmtree(dzi_base + "_files", ignore_errors=True)
            with ThreadPoolExecutor(workers) as pool:
                writer = DziWriter(dzi_base, width, height, quality, dzi_tile, overlap, pool)
                for k, (h, w) in enumerate(shapes):
                    writer.add_level(h, w, stream.strips(i, k))
                writer.finish()
            if szi:
                _zip_szi(dzi_base, os.path.basename(dzi_base))

        def guarded(fn: Any, i: int) -> None:
            try:
                fn(i)
            except BaseException:
                stream.fail()
                raise

        with ThreadPoolExecutor(len(consumers)) as runners:
            futs = [runners.submit(guarded, run_tiff if c == "tiff" else run_dzi, i) for i, c in enumerate(consumers)]
            for f in futs:
                f.result()
        stream.thread.join()
        if stream.bar is not None:
            stream.bar.close()


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

    return tqdm(total=total, unit="px", unit_scale=True, desc=desc, leave=False)


# ---------------------------------------------------------------- DeepZoom
def _raw_planes(store: ImageStore, path: str, progress: bool) -> None:
    """Level 0 as three planes (R, G, B) of H*W bytes each, copied chunk row by chunk row."""
    arr = store.level(0)
    _, h, w = arr.shape
    step = int(arr.chunks[1])
    bar = _bar(progress, h * w, "raw")
    with open(path, "wb") as f, ThreadPoolExecutor(1) as pool:
        f.truncate(3 * h * w)
        nxt = pool.submit(lambda r: np.asarray(arr[:, r : r + step, :]), 0)
        for r0 in range(0, h, step):
            strip = nxt.result()
            if r0 + step < h:
                nxt = pool.submit(lambda r: np.asarray(arr[:, r : r + step, :]), r0 + step)
            for c in range(3):
                f.seek(c * h * w + r0 * w)
                f.write(np.ascontiguousarray(strip[c]).tobytes())
            if bar is not None:
                bar.update(strip.shape[1] * w)
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
    for a store).
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
    url = url[: -len(".dzi")] if url.endswith(".dzi") else url
    check_target(url, storage_options)
    with (
        _local_target(url, storage_options) as base,
        tempfile.TemporaryDirectory(prefix="creps-dz-", dir=os.path.dirname(base)) as tmp,
    ):
        shutil.rmtree(base + "_files", ignore_errors=True)
        image = _dz_source(source, tmp, progress)
        image.dzsave(base, tile_size=tile_size, overlap=overlap, suffix=f".jpg[Q={quality}]", depth="onepixel")
        if szi:
            _zip_szi(base, os.path.basename(base))
    return url


def _zip_szi(base: str, name: str) -> None:
    """``<base>.szi``: a stored zip with ``name/name.dzi`` and ``name/name_files/...``."""
    folder = os.path.dirname(base)
    with zipfile.ZipFile(base + ".szi", "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.write(base + ".dzi", f"{name}/{name}.dzi")
        for root, _, files in os.walk(base + "_files"):
            rel = os.path.relpath(root, folder)
            for f in sorted(files):
                zf.write(os.path.join(root, f), f"{name}/{rel}/{f}")
