"""The endless viewer's tile source: DeepZoom tiles of a CREPS image rendered when they are looked at.

``EndlessTiles`` is what ``viewer.server`` serves for ``render.py view
--checkpoint ...``: the same URLs as a store (``/image.dzi``,
``/image_files/L/C_R.FMT``, ``/api/info``), but no tile exists before it is
requested. A request is answered from, in order:

1. the in-memory LRU of encoded tiles (``memory_tiles`` entries);
2. the persistent cache (``viewer.cache.TileCache``: survives restarts,
   LRU-bounded in bytes; each entry checked against the crc32 recorded when
   it was written: a damaged tile is counted, ``tiles_damaged``, and falls
   through to 3., whose result replaces it);
3. a render: ``viewer.schedule.TileScheduler`` queues it (newest first,
   abandoned requests dropped, identical requests joined, bounded) for the
   engines -- ``LocalEngine`` (threads over one resident generator in this
   process, the default) or ``RayEngine`` (one Ray actor each, ``--workers``
   / ``--address``). The rendered tile goes into both caches.

IIIF image requests (``EndlessTiles.iiif``, ``viewer.iiif``) take the same
path with the checked ``ImageRequest`` as their key, rendered by
``iiif_image`` on the same engines.

What a tile is, and why it is exact: viewer.ondemand.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, Protocol, cast

import numpy as np
import torch

import creps
from creps.canvas import MAX_SIDE
from creps.errors import first_line
from creps.scaling import window_canvas
from renderer.dzi import dzi_xml

from .cache import CacheView, TileCache
from .errors import ViewerError
from .iiif import ImageRequest
from .iiif_image import finish, window_pixels
from .ondemand import LINE_CACHE_BYTES, ImageSpec, TileMaker
from .schedule import TileKey, TileScheduler
from .tiles import FORMATS, EncodedLRU, TileReadError, ViewerBusy

RAY_START_TIMEOUT_S = 300.0
Render = Callable[[Hashable], tuple[bytes, float]]  # a tile key (level, col, row) or an ImageRequest -> bytes


def iiif_image(maker: TileMaker, req: ImageRequest, jpeg_quality: int) -> tuple[bytes, float]:
    """(encoded image, seconds) of an IIIF request on an endless canvas (viewer.iiif_image).

    Not upscaled: windows of the DeepZoom levels' canvases, exactly a level's
    pixels where the request is a window of it (a full-resolution region is
    the render job's crop), Lanczos-resampled otherwise. Upscaled (``^``):
    the region rendered on its finer canvas (``creps.scaling.window_canvas``).
    """
    t0 = time.perf_counter()
    spec = maker.spec
    if req.upscaled:
        top = spec.level_canvas(spec.top)
        fine = window_canvas(top, (req.y, req.y + req.h), (req.x, req.x + req.w), req.height, req.width)
        img = maker.canvas_pixels(fine)
    else:

        def window(k: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            return maker.window(spec.top - k, y0, y1, x0, x1)

        img = window_pixels(window, req, spec.width, spec.height)
    return finish(img, req, jpeg_quality), time.perf_counter() - t0


class Engine(Protocol):
    """Renders encoded tiles and IIIF images; ``workers()`` are the callables the scheduler runs, one thread each."""

    def workers(self) -> list[Render]: ...

    def describe(self) -> str: ...

    def line_stats(self) -> dict[str, int] | None: ...

    def close(self) -> None: ...


class LocalEngine:
    """``threads`` render threads in this process over one resident generator (one TileMaker).

    Torch is limited to one intra-op thread: the threads render different
    tiles side by side, which keeps every core busy without the per-op
    barriers of a multi-threaded BLAS (docs/performance.md).
    """

    def __init__(self, maker: TileMaker, fmt: str, quality: int, threads: int) -> None:
        self.maker, self.fmt, self.quality, self.threads = maker, fmt, quality, threads
        if maker.device == "cpu":
            torch.set_num_threads(1)

    def _render(self, key: Hashable) -> tuple[bytes, float]:
        if isinstance(key, ImageRequest):
            return iiif_image(self.maker, key, self.quality)
        level, col, row = cast(TileKey, key)
        return self.maker.tile(level, col, row, self.fmt, self.quality)

    def workers(self) -> list[Render]:
        return [self._render] * self.threads

    def describe(self) -> str:
        threads = f"{self.threads} render thread{'s' if self.threads > 1 else ''}"
        return f"in-process, {self.maker.device}{_precision_note(self.maker.spec)}, {threads}"

    def line_stats(self) -> dict[str, int] | None:
        lines = self.maker.lines
        return {"computed": lines.computed, "loaded": lines.loaded, "in_memory": len(lines)}

    def close(self) -> None:
        pass


class TileWorker:
    """The body of a Ray actor of the endless viewer: one resident generator bound to one image.

    Its line blocks stay in its own memory LRU (not in the cache store: that
    store's size bound is kept by the viewer process alone).
    """

    def __init__(self, spec: ImageSpec, device: str, threads: int) -> None:
        if threads > 0:
            torch.set_num_threads(threads)
        if device == "cuda" and not torch.cuda.is_available():
            raise ViewerError(f"--device cuda: no CUDA device is visible to the Ray worker on {os.uname().nodename}")
        self.maker = TileMaker(creps.load(spec.checkpoint, init_seed=spec.init_seed, device=device), spec, device)

    def ready(self) -> int:
        return os.getpid()

    def tile(self, level: int, col: int, row: int, fmt: str, quality: int) -> tuple[bytes, float]:
        return self.maker.tile(level, col, row, fmt, quality)

    def iiif(self, req: ImageRequest, quality: int) -> tuple[bytes, float]:
        return iiif_image(self.maker, req, quality)


class RayEngine:
    """``workers`` Ray actors (embedded Ray, or the cluster at ``address``), one scheduler thread each."""

    def __init__(self, spec: ImageSpec, fmt: str, quality: int, workers: int, address: str | None, device: str) -> None:
        from renderer.errors import RendererError
        from renderer.pool import cluster_resources, release_pools, start_ray, stop_ray  # imports ray: on demand

        self.spec, self.fmt, self.quality, self.device, self.address = spec, fmt, quality, device, address
        # after renderer.pool, which sets RAY_AUTH_MODE first (renderer.ray_env): imported earlier, Ray
        # would run without the token that the GCS it starts then requires (~/.ray/auth_token exists)
        import ray

        try:
            self.started = start_ray(address, num_cpus=None if address else max(workers, os.cpu_count() or 1))
        except RendererError as e:
            raise ViewerError(str(e)) from None
        if address:
            try:  # the cluster's GPUs are known once joined: refuse before any actor waits for one
                check_cuda_workers(device, workers, address, cluster_resources()[1])
            except ViewerError:
                if self.started:
                    stop_ray()
                raise
        release_pools()  # render-job actors cached in this process would hold the CPUs/GPUs the viewer needs
        gpus = 1 if device == "cuda" else 0
        actor: Any = ray.remote(TileWorker).options(num_cpus=1, num_gpus=gpus, max_restarts=2, max_task_retries=2)
        # The spec carries precision and warps: each actor's TileMaker lowers its weights for its own device.
        self.actors: list[Any] = [actor.remote(spec, device, 1) for _ in range(workers)]
        try:
            ray.get([a.ready.remote() for a in self.actors], timeout=RAY_START_TIMEOUT_S)
        except Exception as e:
            self.close()
            raise ViewerError(f"the Ray workers did not start: {first_line(e)}") from None

    def _call(self, actor: Any) -> Render:
        import ray

        def render(key: Hashable) -> tuple[bytes, float]:
            if isinstance(key, ImageRequest):
                return ray.get(actor.iiif.remote(key, self.quality))
            return ray.get(actor.tile.remote(*cast(TileKey, key), self.fmt, self.quality))

        return render

    def workers(self) -> list[Render]:
        return [self._call(a) for a in self.actors]

    def describe(self) -> str:
        where = f"Ray cluster {self.address}" if self.address else "embedded Ray"
        actors = (
            f"{len(self.actors)} {self.device}{_precision_note(self.spec)} actor{'s' if len(self.actors) > 1 else ''}"
        )
        return f"{where}, {actors}"

    def line_stats(self) -> dict[str, int] | None:
        return None  # each actor keeps its own

    def close(self) -> None:
        import ray

        from renderer.pool import stop_ray

        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:
                pass
        if self.started:
            stop_ray()


def _precision_note(spec: ImageSpec) -> str:
    """`` bf16`` / `` fp16`` for an engine's description; nothing for exact fp32."""
    return "" if spec.precision == "fp32" else f" {spec.precision}"


class EndlessTiles:
    """The on-demand tile source the viewer serves (see the module docstring)."""

    mode = "endless"

    def __init__(
        self,
        spec: ImageSpec,
        engine: Engine,
        fmt: str = "jpeg",
        quality: int = 90,
        cache: TileCache | None = None,
        queue_max: int = 64,
        per_client: int = 8,
        memory_tiles: int = 512,
    ) -> None:
        if fmt not in FORMATS:
            raise ViewerError(f"unknown tile format {fmt!r}; use jpeg or png")
        self.spec, self.engine, self.fmt, self.quality, self.cache = spec, engine, fmt, quality, cache
        self.width, self.height = spec.width, spec.height
        self._memory = EncodedLRU(memory_tiles)  # tiles and IIIF images
        self._closed = False
        self._lock = threading.Lock()
        self.from_memory = 0
        self.from_store = 0
        self.tiles_damaged = 0  # cached tiles that failed their checksum (rendered again, replaced)
        self.last_served: dict[str, Any] | None = None  # {"ms", "source", "tile"} of the last tile answered
        self.last_rendered_ms: float | None = None  # render time of the last tile computed (worker side)
        self._tile_dir = f"{spec.key}/tiles/{'png' if fmt == 'png' else f'jpeg-q{quality}'}"
        self.scheduler = TileScheduler(
            [self._keeping(w) for w in engine.workers()], queue_max=queue_max, per_client=per_client
        )
        if cache is not None:
            record = {**spec.identity(), "checkpoint": spec.checkpoint, "init_seed": spec.init_seed}
            cache.put(f"{spec.key}/image.json", json.dumps(record, indent=1).encode(), checksum=False)

    # ------------------------------------------------------------ page and metadata
    def dzi(self) -> str:
        return dzi_xml(self.width, self.height, self.fmt)

    def stats(self) -> dict[str, Any]:
        s = self.scheduler
        return {
            "tiles_rendered": s.rendered,
            "tiles_from_cache": self.from_memory + self.from_store,
            "tiles_from_memory": self.from_memory,
            "tiles_from_store": self.from_store,
            "tiles_damaged": self.tiles_damaged,
            "tiles_abandoned": s.abandoned,
            "tiles_failed": s.failed,
            "requests_joined": s.joined,
            **s.counts(),
            "last_tile": self.last_served,
            "last_render_ms": self.last_rendered_ms,
            "lines": self.engine.line_stats(),
            "cache": self.cache.stats() if self.cache is not None else None,
            "engine": self.engine.describe(),
        }

    def info(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "mode": "endless",
            "tile_source": "/image.dzi",
            "width": self.width,
            "height": self.height,
            "dzi_levels": spec.top + 1,
            "tile_format": self.fmt,
            "tiles_done": None,
            "tiles_total": None,
            "version": spec.key,
            "checkpoint": spec.checkpoint,
            "checkpoint_sha256": spec.checkpoint_sha256,
            "seed": spec.seed,
            "psi": spec.psi,
            "status": None,
            "error": None,
            "view": list(spec.view),
            "meta": {"image": {**spec.identity(), "init_seed": spec.init_seed}, "key": spec.key},
            "endless": self.stats(),
        }

    # ------------------------------------------------------------ tiles
    def tile(
        self, level: int, col: int, row: int, client: str = "", alive: Callable[[], bool] = lambda: True
    ) -> bytes | None:
        """Encoded tile bytes; None when the client went away before it was rendered.

        ViewerError (404) for a tile outside the pyramid, before any work;
        ViewerBusy (503) when the queue or this client's share is full;
        TileReadError (500) when the render fails.
        """
        self.spec.check_tile(level, col, row)
        return self._answer((level, col, row), f"tile {level}/{col}_{row}", client, alive)

    def iiif(self, req: ImageRequest, client: str = "", alive: Callable[[], bool] = lambda: True) -> bytes | None:
        """Encoded IIIF image of a checked request, as tiles are answered: the memory LRU, the
        persistent cache, else rendered through the same scheduler (queue bound, per-client share,
        abandoned requests dropped) by the same engine. None when the client went away."""
        return self._answer(req, f"IIIF image {req.canonical(self.width, self.height)}", client, alive)

    def _answer(self, key: Hashable, what: str, client: str, alive: Callable[[], bool]) -> bytes | None:
        """Bytes of a tile key or an ImageRequest from memory, the cache, or a render (see ``tile``)."""
        t0 = time.perf_counter()
        hit = self._memory.get(key)
        if hit is not None:
            with self._lock:
                self.from_memory += 1
            return self._served(hit, t0, "memory", key)
        if self.cache is not None:
            data, damaged = self.cache.read(self._path(key))
            if data is not None:
                with self._lock:
                    self.from_store += 1
                self._remember(key, data)
                return self._served(data, t0, "cache", key)
            if damaged and damaged != "unverified":
                with self._lock:
                    self.tiles_damaged += 1  # never served: rendered below, and the cache entry replaced
        job, waiter = self.scheduler.submit(key, client, alive)
        try:
            got = self.scheduler.wait(job, waiter)
        except ViewerBusy:
            raise
        except ViewerError as e:
            raise TileReadError(str(e)) from None
        except Exception as e:
            raise TileReadError(f"cannot render {what}: {type(e).__name__}: {first_line(e)}") from e
        if got is None:
            return None
        return self._served(got, t0, "rendered", key)

    def _path(self, key: Hashable) -> str:
        """Where a tile (or an IIIF image: by a hash of its canonical form) lives in the cache."""
        if isinstance(key, ImageRequest):
            name = hashlib.sha256(key.canonical(self.width, self.height).encode()).hexdigest()[:32]
            return f"{self.spec.key}/iiif/q{self.quality}/{name}.{key.fmt}"
        level, col, row = cast(TileKey, key)
        return f"{self._tile_dir}/{level}/{col}_{row}.{self.fmt}"

    def _keeping(self, render: Render) -> Callable[[Hashable], bytes]:
        """A scheduler worker: render, then keep the result in both caches (even if its requests left)."""

        def work(key: Hashable) -> bytes:
            data, seconds = render(key)
            self.last_rendered_ms = round(seconds * 1000, 1)
            self._remember(key, data)
            if self.cache is not None:
                self.cache.put(self._path(key), data)
            return data

        return work

    def _remember(self, key: Hashable, data: bytes) -> None:
        self._memory.put(key, data)

    def _served(self, data: bytes, t0: float, source: str, key: Hashable) -> bytes:
        if not isinstance(key, ImageRequest):  # the page's panel names the last DeepZoom tile
            self.last_served = {"ms": round((time.perf_counter() - t0) * 1000, 1), "source": source, "tile": list(key)}  # type: ignore[call-overload]
        return data

    def close(self) -> None:
        """Stop rendering, finish the cache writes, release the engine (a second call does nothing)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.scheduler.close()
        if self.cache is not None:
            self.cache.close()
        self.engine.close()


def check_cuda_workers(device: str, workers: int, address: str | None, gpus: float | None = None) -> None:
    """Refuse more CUDA actors than GPUs, at start, in one line.

    Each CUDA actor asks Ray for a whole GPU (``num_gpus=1``); one more than
    there are would wait unscheduled until ``RAY_START_TIMEOUT_S``.  An
    embedded Ray (no ``address``) gets this machine's GPUs
    (``torch.cuda.device_count()``); on a cluster ``RayEngine`` passes the
    cluster's count (``gpus``) once it has joined.
    """
    if device != "cuda" or workers <= 0 or (address and gpus is None):
        return
    have = int(torch.cuda.device_count() if gpus is None else gpus)
    if workers > have:
        where = f"the Ray cluster at {address} has" if address else "this machine has"
        fix = f"--workers {have} or fewer" if have else "--device cpu"
        raise ViewerError(f"--workers {workers} --device cuda needs one GPU per actor, but {where} {have}: use {fix}")


def open_endless(
    checkpoint: str,
    *,
    init_seed: int = 0,
    seed: int = 0,
    psi: float = 1.0,
    width: int | None = None,
    height: int | None = None,
    scale: float | None = None,
    view: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 1.0),
    precision: str = "fp32",
    warp_rows: str = "",
    warp_cols: str = "",
    fmt: str = "jpeg",
    quality: int = 90,
    device: str = "cpu",
    threads: int = 0,
    workers: int = 0,
    address: str | None = None,
    cache_url: str | None = "out/view-cache",
    storage_options: dict | None = None,
    cache_max_bytes: int = 4 << 30,
    queue_max: int = 64,
    per_client: int = 8,
    line_cache_bytes: int = LINE_CACHE_BYTES,
) -> EndlessTiles:
    """Check everything, load the generator once, and build the tile source.

    Size: ``width`` x ``height``, or ``scale`` (N = int(R * scale), R the
    checkpoint's training resolution), else 2^20 x 2^20. ``workers > 0`` or
    ``address`` renders on Ray actors, else ``threads`` render threads here
    (0: one per core, at most 4). ``cache_url=None`` or ``cache_max_bytes=0``
    keeps tiles in memory only. ``precision`` is the pixel stage's, as
    ``render.py render --precision`` (fp16 and bf16 are emulated on a CPU);
    ``warp_rows`` / ``warp_cols`` are ``creps.warp`` text, as ``--warp-rows`` /
    ``--warp-cols`` of a render.
    """
    if fmt not in FORMATS:
        raise ViewerError(f"unknown tile format {fmt!r}; use jpeg or png")
    if device not in ("cpu", "cuda"):
        raise ViewerError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not (address or workers) and not torch.cuda.is_available():
        raise ViewerError("--device cuda: no CUDA device is visible to this process")
    check_cuda_workers(device, workers, address)
    cfg = creps.read_config(checkpoint, init_seed=init_seed)  # CheckpointError (one line) before any work
    if scale is not None:
        n = int(cfg.resolution * scale) if scale > 0 else 0
        if not 1 <= n <= MAX_SIDE:
            raise ViewerError(
                f"--scale {scale} gives a {n}x{n} canvas at resolution {cfg.resolution}; sides must be 1..2^20"
            )
        width = height = n
    width = MAX_SIDE if width is None else width
    height = MAX_SIDE if height is None else height
    spec = ImageSpec(
        checkpoint=checkpoint,
        checkpoint_sha256=creps.checkpoint_hash(checkpoint, init_seed),
        init_seed=init_seed,
        seed=seed,
        psi=float(psi),
        height=height,
        width=width,
        view=view,
        pixel_block=creps.default_pixel_block(device),
        precision=precision,
        warp_rows=warp_rows,
        warp_cols=warp_cols,
    )
    if spec.warp_rows or spec.warp_cols:
        try:  # a warp that leaves float32 on the full-resolution grid: say so now, not at the first tile
            top = spec.level_canvas(spec.top)
            top.row_coords(), top.col_coords()
        except ValueError as e:
            raise ViewerError(str(e)) from None
    cache = TileCache(cache_url, storage_options, cache_max_bytes) if cache_url and cache_max_bytes > 0 else None
    engine: Engine
    try:
        if workers > 0 or address:
            engine = RayEngine(spec, fmt, quality, max(workers, 1), address, device)
        else:
            G = creps.load(checkpoint, init_seed=init_seed, device=device)
            store = CacheView(cache, spec.key) if cache is not None else None
            n = threads or min(4, os.cpu_count() or 1)  # render threads; a tile's blocks take up to one lane per core
            maker = TileMaker(G, spec, device, store, line_cache_bytes, lanes=min(n, os.cpu_count() or 1))
            engine = LocalEngine(maker, fmt, quality, n)
    except BaseException:
        if cache is not None:
            cache.close()
        raise
    return EndlessTiles(spec, engine, fmt, quality, cache, queue_max=queue_max, per_client=per_client)
