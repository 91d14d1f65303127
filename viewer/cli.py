"""render.py view: serve an OpenSeadragon viewer on 127.0.0.1.

  render.py view URL_OR_DZI                     a store (tiled on the fly) or an exported .dzi
  render.py view --checkpoint CKPT [...]        endless zoom: tiles rendered when looked at

URL_OR_DZI is either an exported DeepZoom file (NAME.dzi next to NAME_files/)
or an image store on any fsspec URL (a local folder, s3://bucket/img.zarr,
...). A store is tiled on the fly from its zarr levels, so a render in
progress can be watched: the page polls the job's progress and reloads tiles
as they are written. Coarse levels that the pyramid does not have yet are
averaged from the coarsest level present (at most 4096 source pixels per
tile side, strided beyond that); run `render.py assemble` for a full pyramid.

With --checkpoint nothing is rendered in advance: each DeepZoom tile is
computed when the page asks for it (up to 2^20 x 2^20 pixels, 2^20 x 2^20 by
default), in this process (--threads) or on Ray actors (--workers,
--address), and kept in a persistent cache (--cache, LRU-bounded by
--cache-max-gb). A full-resolution tile has exactly the pixels `render.py
render` writes with the same checkpoint, seeds, psi, size, view, warps and
precision; a coarser level is the generator evaluated on a coarser grid
(docs/viewer.md). --warp-rows / --warp-cols take the warps of `render.py
render` (docs/experiments.md); --precision fp16|bf16x3|bf16 runs the pixel
stage's matmuls in that format (each one's error: docs/exactness.md; emulated
on a CPU), fp32, the default, is exact. Both enter the cache key.

The server listens on 127.0.0.1 only, unless --host names another address
and --allow-remote says so explicitly; then every request needs the random
token printed in the URL (kept in a cookie after the first visit).
"""

from __future__ import annotations

import argparse
import math
import signal
import threading
import webbrowser
from typing import Any

from creps.canvas import MAX_SIDE
from creps.cli import add_warp_arguments, command, parse_size, parse_view, warp_flags
from creps.precision import PRECISIONS
from renderer.fsio import parse_storage_options
from renderer.options import OptionError, check_quality

from .errors import ViewerError
from .iiif import DEFAULT_MAX_AREA
from .server import check_bind, make_server, open_source
from .tiles import FORMATS

# flags that only mean something with --checkpoint (dest -> flag)
ENDLESS_ONLY = {
    "init_seed": "--init-seed",
    "seed": "--seed",
    "psi": "--psi",
    "size": "--size",
    "scale": "--scale",
    "view": "--view",
    "warp_rows": "--warp-rows",
    "warp_cols": "--warp-cols",
    "precision": "--precision",
    "cache": "--cache",
    "cache_max_gb": "--cache-max-gb",
    "workers": "--workers",
    "address": "--address",
    "device": "--device",
    "threads": "--threads",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", metavar="URL_OR_DZI", help="image store URL/path, or an exported .dzi")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0 = any free port) [8000]")
    p.add_argument("--host", default="127.0.0.1", help="address to bind [127.0.0.1]")
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback --host; every request then needs the token printed in the URL",
    )
    p.add_argument("--token", default=None, help="access token (default: random when --allow-remote, else none)")
    p.add_argument("--storage-options", default=None, metavar="JSON", help="fsspec options for the URL, as JSON")
    p.add_argument("--tile-format", choices=sorted(FORMATS), default="jpeg", help="tile format [jpeg]")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the tiles made [90]")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    p.add_argument(
        "--max-area",
        type=int,
        default=DEFAULT_MAX_AREA,
        metavar="PX",
        help="IIIF: the most output pixels one image request may ask for (info.json maxArea; "
        f"larger requests are refused with 400, before any work) [{DEFAULT_MAX_AREA} = 1024x1024]",
    )
    g = p.add_argument_group("endless zoom (tiles rendered when looked at)")
    g.add_argument("--checkpoint", metavar="CKPT", help="weights file (.safetensors / official .pkl) or preset:NAME")
    g.add_argument("--init-seed", type=int, metavar="N", help="weights seed for preset:NAME [0]")
    g.add_argument("--seed", type=int, metavar="N", help="latent seed [0]")
    g.add_argument("--psi", type=float, metavar="F", help="truncation psi [1]")
    size = g.add_mutually_exclusive_group()
    size.add_argument("--size", metavar="WxH", help="canvas WIDTHxHEIGHT (or N) [1048576x1048576]")
    size.add_argument("--scale", type=float, metavar="S", help="square canvas of int(R*S) px, R = training resolution")
    g.add_argument("--view", metavar="Y0,Y1,X0,X1", help="coordinate window [0,1,0,1]")
    add_warp_arguments(g)
    g.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        help="pixel-stage arithmetic: fp32 (default, exact), bf16, bf16x3 or fp16 (errors: docs/exactness.md; "
        "part of the cache key: each precision keeps its own tiles) [fp32]",
    )
    g.add_argument("--cache", metavar="URL", help="persistent tile cache, any fsspec URL [out/view-cache]")
    g.add_argument(
        "--cache-max-gb",
        type=float,
        metavar="G",
        help="cache size bound; least recently used tiles are deleted beyond it (0 = memory only) [4]",
    )
    g.add_argument("--workers", type=int, metavar="N", help="render on N Ray actors instead of in this process")
    g.add_argument("--address", metavar="ADDR", help="render on the Ray cluster at ADDR (host:port or auto)")
    g.add_argument("--device", choices=["cpu", "cuda"], help="where the generator runs [cpu]")
    g.add_argument("--threads", type=int, metavar="N", help="in-process render threads [one per core, at most 4]")
    g.add_argument("--queue", type=int, default=64, metavar="N", help="tiles that may wait to render [64]")
    g.add_argument(
        "--per-client",
        type=int,
        default=8,
        metavar="N",
        help="tiles one client may have waiting or rendering at once (more: 503, retried) [8]",
    )


def endless_options(args: argparse.Namespace, storage_options: dict | None) -> dict[str, Any]:
    """Keyword arguments of ``viewer.endless.open_endless`` from the flags (checked, one line on error)."""
    width = height = None
    if args.size is not None:
        width, height = parse_size(args.size, ViewerError, "--size")
    view = parse_view(args.view, ViewerError, "--view") if args.view is not None else (0.0, 1.0, 0.0, 1.0)
    if (view[0] == view[1] and (height or MAX_SIDE) > 1) or (view[2] == view[3] and (width or MAX_SIDE) > 1):
        raise ViewerError(f"--view {args.view} is empty (Y0 == Y1 or X0 == X1)")
    for name, value, lo, hi in (
        ("--seed", args.seed, 0, 2**32 - 1),
        ("--init-seed", args.init_seed, 0, 2**63 - 1),
        ("--workers", args.workers, 0, 4096),
        ("--threads", args.threads, 0, 256),
        ("--queue", args.queue, 1, 100000),
        ("--per-client", args.per_client, 1, 100000),
    ):
        if value is not None and not lo <= value <= hi:
            raise ViewerError(f"{name} must be in {lo}..{hi}, got {value}")
    psi = 1.0 if args.psi is None else args.psi
    if not math.isfinite(psi):
        raise ViewerError(f"--psi must be a finite number, got {psi}")
    gb = 4.0 if args.cache_max_gb is None else args.cache_max_gb
    if not (math.isfinite(gb) and gb >= 0):
        raise ViewerError(f"--cache-max-gb must be >= 0, got {gb}")
    warps = warp_flags(args)  # canonical text; one line (exit 2) for a bad warp
    return dict(
        init_seed=args.init_seed or 0,
        seed=args.seed or 0,
        psi=psi,
        width=width,
        height=height,
        scale=args.scale,
        view=view,
        precision=args.precision or "fp32",
        warp_rows=warps.get("warp_rows", ""),
        warp_cols=warps.get("warp_cols", ""),
        fmt=args.tile_format,
        quality=args.quality,
        device=args.device or "cpu",
        threads=args.threads or 0,
        workers=args.workers or 0,
        address=args.address,
        cache_url=args.cache or "out/view-cache",
        storage_options=storage_options,
        cache_max_bytes=int(gb * 2**30),
        queue_max=args.queue,
        per_client=args.per_client,
    )


def check_tile_quality(quality: int) -> None:
    """--quality, checked where every JPEG quality is (renderer.options), the error worded after the flag."""
    try:
        check_quality(quality)
    except OptionError as e:
        raise ViewerError(f"--quality {e.value} must be in {e.allowed}") from None


def check_source_flags(args: argparse.Namespace) -> None:
    """A store or a checkpoint, not both, and no endless-zoom flag with a store."""
    if (args.source is None) == (args.checkpoint is None):
        raise ViewerError("give either URL_OR_DZI (a store or an exported .dzi) or --checkpoint CKPT (endless zoom)")
    if args.source is not None:
        given = [flag for dest, flag in ENDLESS_ONLY.items() if getattr(args, dest, None) is not None]
        if given:
            raise ViewerError(f"{', '.join(given)} only apply to --checkpoint (endless zoom), not to {args.source}")


def open_viewed(args: argparse.Namespace, options: dict | None) -> tuple[Any, str]:
    """(the tile source to serve, how the banner names it): an endless image or a store / .dzi."""
    if args.checkpoint is not None:
        from .endless import open_endless

        kwargs = endless_options(args, options)
        source: Any = open_endless(args.checkpoint, **kwargs)
        return source, f"{args.checkpoint} ({source.width}x{source.height}, endless zoom)"
    return open_source(args.source, options, fmt=args.tile_format, quality=args.quality), args.source


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@command()
def run(args: argparse.Namespace) -> int:
    options = parse_storage_options(args.storage_options, ViewerError)
    if not 0 <= args.port <= 65535:
        raise ViewerError(f"--port {args.port} is not a TCP port (0..65535)")
    check_tile_quality(args.quality)
    check_source_flags(args)
    # Check the bind address before touching the (maybe remote) source or loading a model.
    check_bind(args.host, args.allow_remote)
    source, what = open_viewed(args, options)
    try:
        server = make_server(
            source, args.host, args.port, allow_remote=args.allow_remote, token=args.token, max_area=args.max_area
        )
    except BaseException:
        if args.checkpoint is not None:
            source.close()
        raise
    url = server.url
    print(f"viewing {what} at {url}  (Ctrl-C to stop)", flush=True)
    if args.checkpoint is not None:
        cache = source.cache.url if source.cache is not None else "memory only"
        print(f"rendering: {source.engine.describe()}; tile cache: {cache}", flush=True)
    if args.open:
        webbrowser.open(url)
    # SIGTERM (a service manager, `kill`) stops like Ctrl-C: the cache writes still queued are finished.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.close_source()
        if main:
            signal.signal(signal.SIGTERM, previous)
    return 0
