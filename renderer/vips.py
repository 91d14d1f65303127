"""The vips DeepZoom engine: libvips ``dzsave`` from a store's level 0 or from a TIFF.

From a store, level 0 is copied strip by strip into a planar raw file in a
scratch folder next to the staged export, which libvips maps and interleaves
itself; dzsave then reads it sequentially (a TIFF source is read
sequentially too), so no Python array of the image is ever made. The output
is staged and published like every export (renderer.publish), with the .szi
zip of renderer.dzi and the provenance of renderer.provenance. The default
engine, "zarr", cuts the same tiles from the pyramid levels instead
(renderer.exports).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from creps.errors import first_line

from .dzi import DZI_FOLDER, dzi_base, dzi_parts, zip_szi
from .errors import RendererError
from .options import DziOptions
from .progress import pixel_bar
from .provenance import dzi_records, export_record, read_sidecar
from .publish import check_target, staged, writing
from .pyramid import source_state
from .store import ImageStore, object_rows


def write_vips_dzi(
    source: ImageStore | str,
    url: str,
    options: DziOptions,
    storage_options: dict | None = None,
    progress: bool = False,
) -> str:
    """``<base>.dzi`` + ``<base>_files/`` (and ``<base>.szi``) by dzsave from a store or a TIFF path; return base."""
    url = dzi_base(url)
    check_target(url, storage_options)
    store = source if isinstance(source, ImageStore) else None
    snapshot = source_state(store) if store is not None else None
    with staged(url, dzi_parts(options.szi), (DZI_FOLDER,), storage_options) as target:
        with writing("DeepZoom pyramid", url):
            image = _dz_source(source, target.scratch(), progress)
            try:
                image.dzsave(
                    target.stage,
                    tile_size=options.tile_size,
                    overlap=options.overlap,
                    suffix=f".jpg[Q={options.quality}]",
                    depth="onepixel",
                )
            except Exception as e:  # pyvips.Error: libvips' own message, often many lines
                raise RendererError(f"libvips dzsave failed for {url!r}: {first_line(e)}") from e
            if options.szi:
                zip_szi(target, target.name)
        record = export_record(store, "dzi", url + ".dzi", options.settings(), source=snapshot)
        if store is None:
            record["source_tiff"] = os.path.abspath(str(source))
            record["tiff_source"] = read_sidecar(str(source))
        target.publish(dzi_records(record, url, options.szi))
    return url


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
    _check_vips_reads(source)
    # fail=True: a tile libvips cannot decode is an error, never black pixels in the pyramid
    return pyvips.Image.new_from_file(source, access="sequential", fail=True)


def _check_vips_reads(path: str) -> None:
    """Refuse, before any work, a TIFF whose compression the bundled libvips cannot decode.

    The libvips of pyvips-binary has no zstd in its TIFF reader: it reads such
    a file as zeros and says so only in a warning, so the DeepZoom would be black.
    """
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            compression = tifffile.COMPRESSION(tif.pages[0].compression)
    except Exception as e:
        raise RendererError(f"cannot read the TIFF {path!r}: {first_line(e)}") from e
    if compression.name in ("ZSTD", "WEBP", "JPEGXL", "LERC"):
        raise RendererError(
            f"{path!r} is {compression.name.lower()}-compressed, which libvips here cannot decode; "
            "make the DeepZoom from the store (or a TIFF with --compression jpeg or deflate)"
        )


def _raw_planes(store: ImageStore, path: str, progress: bool) -> None:
    """Level 0 as three planes (R, G, B) of H*W bytes each, copied chunk row by chunk row."""
    arr = store.level(0)
    _, h, w = arr.shape
    step = object_rows(arr)  # whole stored objects per read: no range requests
    bar = pixel_bar(progress, h * w, "raw")

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
