"""Exports of an image store: a pyramidal tiled TIFF, a DeepZoom (.dzi + .szi) pyramid and an IIIF static tree.

`write_exports` is block work (renderer.blocks, run by a renderer.scaleout
``Runner``: local threads, or Ray tasks with renderer.cluster): first the
pyramid levels that are missing (renderer.pyramid.build_levels), then every
level in bands of rows, each band read once for both exports and holding a
chunk row or two of its level at a time (docs/assemble.md); `write_tiff` and
`write_dzi` are the single-export forms. What is made is said by option
objects that check themselves (renderer.options: ``TiffOptions``,
``DziOptions``).

- TIFF (renderer.tiff, tifffile): BigTIFF, tiled, RGB contig, level 0 as the
  main image and levels 1..n-1 as its SubIFDs, copied from the zarr levels (no
  recomputation), OME-XML. The bands encode its tiles (the bytes tifffile
  would make) and return them; one writer puts them in the file in order.
- DeepZoom, engine "zarr" (renderer.dzi, the default): tiles cut from the zarr
  levels, JPEG-encoded and written by the bands; the DeepZoom levels are our
  pyramid levels (tests: decoded tiles equal dzsave's). The .szi zip:
  renderer.dzi.
- DeepZoom, engine "vips": libvips ``dzsave`` (renderer.vips).
- IIIF Image API 3.0 level-0 static tree (renderer.iiif_tree): its tiles of
  scale factor 2^k cut from zarr level k by the same bands (the DeepZoom
  tiles' cutting and encoder), then the listed sizes and info.json.

Never half an export: each is staged under a temporary name and put in
place only when every export succeeded (renderer.publish; on any failure the
previous exports are left as they were), with a ``<export>.source.json``
sidecar saying what it was built from (renderer.provenance). One line for a
broken input: an unreadable chunk is a ``RendererError`` naming the level and
the chunk (ImageStore.read_rows); a failed write or upload names the
target.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from creps.errors import first_line

from .blocks import (
    Band,
    BandResult,
    DziTiles,
    IiifTiles,
    Source,
    TiffTiles,
    export_band,
    export_bands,
    hwc,
    small_dzi_levels,
)
from .dzi import DZI_FOLDER, dzi_base, dzi_parts, dzi_xml, max_level, zip_szi
from .errors import RendererError
from .iiif import INFO
from .iiif_tree import IIIF_PARTS, finish_tree, tree_tiles
from .options import DziOptions, IiifOptions, TiffOptions
from .progress import pixel_bar
from .provenance import dzi_records, export_record
from .publish import Target, check_replaceable, check_target, staged, writing
from .pyramid import BAND_PIXELS, pyramid_current, pyramid_plan, run_level_pass, start_level_pass
from .scaleout import Runner, ThreadRunner, in_order
from .store import ImageStore
from .tiff import write_levels
from .vips import write_vips_dzi

TIFF_PARTS = ("",)


@dataclass(frozen=True)
class _Job:
    """One ``write_exports`` call: the store, the targets (None: not asked for) and how to make them."""

    store: ImageStore
    tiff: str | None
    dzi: str | None  # the DeepZoom base name (no .dzi)
    tiff_options: TiffOptions
    dzi_options: DziOptions
    storage_options: dict | None
    progress: bool
    iiif: str | None = None  # the IIIF tree's folder
    iiif_options: IiifOptions = field(default_factory=IiifOptions)


def write_exports(
    store: ImageStore,
    tiff: str | None = None,
    dzi: str | None = None,
    tiff_options: TiffOptions | None = None,
    dzi_options: DziOptions | None = None,
    storage_options: dict | None = None,
    workers: int | None = None,
    progress: bool = False,
    runner: Runner | None = None,
    iiif: str | None = None,
    iiif_options: IiifOptions | None = None,
) -> None:
    """The TIFF, the DeepZoom pyramid (zarr engine) and/or the IIIF tree, as block work on ``runner``.

    The pyramid levels that are missing (renderer.pyramid.run_level_pass;
    nothing when the pyramid is current, renderer.pyramid.pyramid_current) are
    built beside the bands of the levels already there; then every level in bands
    (renderer.blocks.export_band), each band read once for every export: its
    TIFF tiles come back encoded and go to the one TIFF writer in order, its
    DeepZoom and IIIF tiles are written by the band itself (straight to the
    staged folder, or to temporary keys next to a remote target). Without ``runner``:
    ``workers`` local threads (and dask for the levels). Each export is
    staged under a temporary name and put in place only when every export
    succeeded; on any failure the previous exports are left as they were
    (renderer.publish) and the error is raised.
    """
    job = _Job(
        store,
        tiff,
        dzi_base(dzi) if dzi else dzi,
        tiff_options or TiffOptions(),
        dzi_options or DziOptions(),
        storage_options,
        progress,
        iiif.rstrip("/") if iiif else None,
        iiif_options or IiifOptions(),
    )
    if job.dzi and job.dzi_options.engine != "zarr":
        raise RendererError("write_exports cuts DeepZoom tiles from the zarr levels; use write_dzi for the vips engine")
    for target in (job.tiff, job.dzi, job.iiif):
        if target:
            check_target(target, storage_options)
    if job.iiif:
        check_replaceable(job.iiif, INFO, "an IIIF tree", storage_options)
    if not job.tiff and not job.dzi and not job.iiif:
        return
    # the missing levels are built beside the bands of the levels already there (L = 0: level 0's bands)
    levels = None if pyramid_current(store) else start_level_pass(store)
    ready = levels.first if levels is not None else len(pyramid_plan(store))
    run = runner or ThreadRunner(workers)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="levels") as background:  # waits for the pass to end
            built = background.submit(run_level_pass, levels, runner, storage_options, workers) if levels else None
            _export_levels(job, run, ready, built)
    finally:
        if runner is None:
            run.close()


def _export_levels(job: _Job, runner: Runner, ready: int, built: Future | None) -> None:
    """Stage the exports, write every level into them, put them in place (nothing in place on a failure)."""
    so = job.storage_options
    with ExitStack() as stack:
        tiff_target = stack.enter_context(staged(job.tiff, TIFF_PARTS, (), so)) if job.tiff else None
        dzi_target = iiif_target = None
        if job.dzi:
            dzi_target = stack.enter_context(staged(job.dzi, dzi_parts(job.dzi_options.szi), (DZI_FOLDER,), so))
        if job.iiif:
            iiif_target = stack.enter_context(staged(job.iiif, IIIF_PARTS, IIIF_PARTS, so))
        bands = _Bands(job, runner, tiff_target, dzi_target, iiif_target)
        bands.run(runner, ready, built, tiff_target)
        if dzi_target is not None:
            assert job.dzi is not None and bands.dzi is not None
            with writing("DeepZoom pyramid", job.dzi):
                _finish_dzi(job, dzi_target, bands.dzi, bands.shapes, bands.written)
        if iiif_target is not None:
            assert job.iiif is not None and bands.iiif is not None
            with writing("IIIF tree", job.iiif):
                _finish_iiif(job, iiif_target, bands.iiif, bands.shapes, bands.iiif_written)
        if tiff_target is not None:
            assert job.tiff is not None
            tiff_target.publish({"": export_record(job.store, "tiff", job.tiff, job.tiff_options.settings())})
        if dzi_target is not None:
            assert job.dzi is not None
            record = export_record(job.store, "dzi", job.dzi + ".dzi", job.dzi_options.settings())
            dzi_target.publish(dzi_records(record, job.dzi, job.dzi_options.szi))
        if iiif_target is not None:
            assert job.iiif is not None
            settings = {**job.iiif_options.settings(), "id": job.iiif_options.service_id(job.iiif)}
            iiif_target.publish({"": export_record(job.store, "iiif", job.iiif, settings)})


def band_pixels(level0: int, workers: int) -> int:
    """Pixels per export band: BAND_PIXELS, smaller when level 0 alone would not give every worker four bands."""
    return max(1 << 16, min(BAND_PIXELS, level0 // (4 * max(1, workers))))


class _Bands:
    """Every pyramid level in bands (renderer.blocks.export_band), each band read once for every export."""

    def __init__(self, job: _Job, runner: Runner, tiff: Target | None, dzi: Target | None, iiif: Target | None) -> None:
        self.job = job
        self.shapes = pyramid_plan(job.store)
        height, width = self.shapes[0]
        chunk = int(job.store.level(0).chunks[1])
        t, d = job.tiff_options, job.dzi_options
        self.tiff = TiffTiles(t.tile, t.compression, t.quality) if tiff is not None else None
        self.dzi = None
        if dzi is not None:
            self.dzi = DziTiles(dzi.tile_folder(DZI_FOLDER), d.tile_size, d.overlap, d.quality, job.storage_options)
        self.iiif: IiifTiles | None = None
        if iiif is not None:
            self.iiif = tree_tiles(iiif.tile_folder(""), width, height, job.iiif_options, job.storage_options)
        top = max_level(width, height)
        pixels = band_pixels(height * width, runner.workers)
        self.levels = [
            export_bands(h, w, k, top - k, chunk, self.tiff, self.dzi, pixels, self.iiif)
            for k, (h, w) in enumerate(self.shapes)
        ]
        self.written: list[str] = []  # the DeepZoom tiles the bands wrote, relative to the folder
        self.iiif_written: list[str] = []  # the IIIF tiles the bands wrote, relative to the tree

    def run(self, runner: Runner, ready: int, built: Future | None, tiff: Target | None) -> None:
        """Run every band (levels from ``ready`` on once ``built`` is done); the TIFF's tiles go to its writer."""
        results = in_order(runner, self._calls(ready, built), ahead=2 * runner.workers)
        bar = pixel_bar(self.job.progress, sum(h * w for h, w in self.shapes), "exports")
        try:
            if tiff is not None:
                assert self.job.tiff is not None
                t = self.job.tiff_options
                tiles = (
                    (h, w, self._level_tiles(results, bands, bar))
                    for (h, w), bands in zip(self.shapes, self.levels, strict=True)
                )
                with writing("TIFF", self.job.tiff):
                    write_levels(tiff.stage, tiles, len(self.shapes), t.tile, t.compression, t.quality)
            else:
                for bands in self.levels:
                    for _ in self._level_tiles(results, bands, bar):
                        pass
        finally:
            results.close()  # cancels what has not run (after an error)
            if bar is not None:
                bar.close()

    def _calls(self, ready: int, built: Future | None) -> Iterator[tuple[Callable[..., BandResult], tuple]]:
        source = Source(self.job.store.url, self.job.storage_options)
        for k, bands in enumerate(self.levels):
            if k == ready and built is not None:
                built.result()  # the levels are written (or the pass failed: its error)
            for band in bands:
                yield export_band, (source, band, self.tiff, self.dzi, self.iiif)

    def _level_tiles(self, results: Iterator[BandResult], bands: list[Band], bar: Any) -> Iterator[bytes]:
        """The TIFF tiles of one level's bands, in order, as their results come back."""
        for _ in bands:
            try:
                res = next(results)
            except OSError as e:  # only the DeepZoom and IIIF tiles are written by the bands
                raise RendererError(f"cannot write {self._tile_exports()}: {first_line(e)}") from e
            self.written.extend(res.dzi)
            self.iiif_written.extend(res.iiif)
            if bar is not None:
                bar.update(res.band.width * (res.band.b - res.band.a))
            yield from res.tiff

    def _tile_exports(self) -> str:
        """The exports whose tiles the bands write, for an error message."""
        names = [f"the DeepZoom pyramid {self.job.dzi!r}"] if self.job.dzi else []
        names += [f"the IIIF tree {self.job.iiif!r}"] if self.job.iiif else []
        return " or ".join(names)


def _finish_dzi(job: _Job, target: Target, spec: DziTiles, shapes: list[tuple[int, int]], written: list[str]) -> None:
    """The DeepZoom levels below the last zarr level, the .dzi descriptor and the .szi."""
    height, width = shapes[0]
    last = len(shapes) - 1
    below = max_level(width, height) - last  # DeepZoom level of the last zarr level
    if below > 0:
        written.extend(small_dzi_levels(hwc(job.store.read_rows(last, 0, shapes[last][0])), below, spec))
    target.tiles_written(DZI_FOLDER, written)
    with open(target.stage + ".dzi", "w") as f:
        f.write(dzi_xml(width, height, "jpg", spec.tile, spec.overlap))
    if job.dzi_options.szi:
        zip_szi(target, target.name)


def _finish_iiif(job: _Job, target: Target, spec: IiifTiles, shapes: list[tuple[int, int]], banded: list[str]) -> None:
    """The IIIF tree's small levels, listed sizes and info.json (renderer.iiif_tree.finish_tree)."""
    assert job.iiif is not None
    service_id = job.iiif_options.service_id(job.iiif)
    written = finish_tree(job.store, shapes, spec, job.iiif_options, service_id, banded)
    target.tiles_written("", [*banded, *written])


# ---------------------------------------------------------------- the single-export forms
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
    options = TiffOptions(tile, compression, quality)
    write_exports(
        store, tiff=url, tiff_options=options, storage_options=storage_options, workers=workers, progress=progress,
        runner=runner,
    )  # fmt: skip
    return url


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
    for a store; renderer.vips). Staged and put in place whole, like every export.
    """
    engine = engine or ("zarr" if isinstance(source, ImageStore) else "vips")
    options = DziOptions(tile_size, overlap, quality, engine, szi)
    if engine == "vips":
        return write_vips_dzi(source, url, options, storage_options, progress)
    if not isinstance(source, ImageStore):
        raise RendererError("the zarr DeepZoom engine needs an image store as source, not a TIFF")
    write_exports(
        source, dzi=url, dzi_options=options, storage_options=storage_options, workers=workers, progress=progress
    )
    return url
