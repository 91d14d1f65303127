"""Exports of an image store: a pyramidal tiled TIFF and a DeepZoom (.dzi + .szi) pyramid.

Both stream: nothing holds more than a strip of chunk rows of one level.

- TIFF (tifffile): BigTIFF, tiled, RGB contig, level 0 as the main image and
  levels 1..n-1 as its SubIFDs, copied from the zarr levels (no recomputation;
  the pyramid is built first if it is missing). OME-XML in the description.
  Tiles come from a generator that reads one zarr chunk row ahead on a thread,
  so tifffile compresses while the next strip decodes.
- DeepZoom (pyvips ``dzsave``): level 0 is copied strip by strip into a planar
  raw file in a temporary folder, which libvips maps and interleaves itself;
  dzsave then reads it sequentially. The .szi is a zip (stored, JPEG tiles do
  not shrink) of the same files in the layout libvips writes for ``.szi``.

Remote targets (any fsspec URL): written locally in a temporary folder, then
uploaded with ``fs.put``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from .errors import RendererError
from .pyramid import build_pyramid, pyramid_complete
from .store import ImageStore, _is_local, _local_path, filesystem

COMPRESSIONS = {"jpeg": "jpeg", "zstd": "zstd", "deflate": "adobe_deflate", "none": None}
TIFF_TILES = (256, 512)


# ---------------------------------------------------------------- targets
def check_target(url: str, storage_options: dict | None = None) -> None:
    """Fail early (one line) when ``url``'s parent cannot be written."""
    if _is_local(url):
        parent = os.path.dirname(os.path.abspath(_local_path(url))) or "."
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
    if _is_local(url):
        path = os.path.abspath(_local_path(url))
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


def _ensure_pyramid(store: ImageStore, progress: bool) -> int:
    if not pyramid_complete(store):
        build_pyramid(store, progress=progress)
    return store.level_count()


# ---------------------------------------------------------------- TIFF
def _strips(arr: Any, pool: ThreadPoolExecutor) -> Iterator[tuple[int, np.ndarray]]:
    """(r0, (h, w, 3) strip) per zarr chunk row, the next one read ahead on ``pool``."""
    _, height, _ = arr.shape
    step = int(arr.chunks[1])

    def read(r0: int) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(arr[:, r0 : r0 + step, :]).transpose(1, 2, 0))

    nxt = pool.submit(read, 0)
    for r0 in range(0, height, step):
        strip = nxt.result()
        if r0 + step < height:
            nxt = pool.submit(read, r0 + step)
        yield r0, strip


def _tiles(arr: Any, tile: int, pool: ThreadPoolExecutor, bar: Any = None) -> Iterator[np.ndarray]:
    """The level's tiles in TIFF order (row-major), read strip by strip."""
    _, height, width = arr.shape
    buf: np.ndarray | None = None  # rows carried over when tile and chunk rows do not align
    base = 0
    for r0, strip in _strips(arr, pool):
        if buf is not None:
            strip = np.concatenate([buf, strip], axis=0)
            r0 = base
        end = r0 + strip.shape[0]
        t0 = r0
        while t0 + tile <= end or (end >= height and t0 < height):
            rows = strip[t0 - r0 : t0 - r0 + tile]
            for c0 in range(0, width, tile):
                yield rows[:, c0 : c0 + tile]
            t0 += tile
            if bar is not None:
                bar.update(rows.shape[0] * width)
        buf, base = (strip[t0 - r0 :], t0) if t0 < end else (None, end)


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
    import tifffile

    if tile not in TIFF_TILES:
        raise RendererError(f"TIFF tile must be one of {TIFF_TILES}, got {tile}")
    if compression not in COMPRESSIONS:
        raise RendererError(f"unknown TIFF compression {compression!r}; use {', '.join(COMPRESSIONS)}")
    if not 1 <= quality <= 100:
        raise RendererError(f"JPEG quality must be 1..100, got {quality}")
    check_target(url, storage_options)
    n = _ensure_pyramid(store, progress)
    levels = [store.level(k) for k in range(n)]
    codec = COMPRESSIONS[compression]
    args: dict[str, Any] = dict(
        tile=(tile, tile),
        dtype=np.uint8,
        photometric="rgb",
        planarconfig="contig",
        compression=codec,
        maxworkers=workers or os.cpu_count(),
    )
    if compression == "jpeg":
        args["compressionargs"] = {"level": quality}
    elif codec is not None:
        args["predictor"] = True  # horizontal differencing: smaller zstd/deflate output
    bar = _bar(progress, sum(a.shape[1] * a.shape[2] for a in levels), "tiff")
    h, w = store.shape
    with _local_target(url, storage_options) as path, ThreadPoolExecutor(1) as pool:
        with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
            tif.write(
                _tiles(levels[0], tile, pool, bar),
                shape=(h, w, 3),
                subifds=n - 1,
                metadata={"axes": "YXS", "Name": "creps-gigapixel", "SignificantBits": 8},
                software="creps-gigapixel",
                **args,
            )
            for arr in levels[1:]:
                _, lh, lw = arr.shape
                tif.write(_tiles(arr, tile, pool, bar), shape=(lh, lw, 3), subfiletype=1, metadata=None, **args)
    if bar is not None:
        bar.close()
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
                f.write(memoryview(np.ascontiguousarray(strip[c])).cast("B"))
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
) -> str:
    """Write ``<url>.dzi`` + ``<url>_files/`` (and ``<url>.szi``) from a store or a TIFF; return url.

    ``url`` is the base name (a trailing .dzi is dropped).
    """
    if not 1 <= quality <= 100:
        raise RendererError(f"JPEG quality must be 1..100, got {quality}")
    if tile_size < 1 or overlap < 0 or 2 * overlap >= tile_size:
        raise RendererError(f"bad DeepZoom tiling: tile_size={tile_size}, overlap={overlap}")
    url = url[: -len(".dzi")] if url.endswith(".dzi") else url
    check_target(url, storage_options)
    with _local_target(url, storage_options) as base, tempfile.TemporaryDirectory(
        prefix="creps-dz-", dir=os.path.dirname(base)
    ) as tmp:
        name = os.path.basename(base)
        shutil.rmtree(base + "_files", ignore_errors=True)
        image = _dz_source(source, tmp, progress)
        image.dzsave(base, tile_size=tile_size, overlap=overlap, suffix=f".jpg[Q={quality}]", depth="onepixel")
        if szi:
            _zip_szi(base, name)
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
