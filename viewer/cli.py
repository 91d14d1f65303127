"""render.py view URL_OR_DZI: serve an OpenSeadragon viewer on 127.0.0.1.

URL_OR_DZI is either an exported DeepZoom file (NAME.dzi next to NAME_files/)
or an image store on any fsspec URL (a local folder, s3://bucket/img.zarr,
...). A store is tiled on the fly from its zarr levels, so a render in
progress can be watched: the page polls the job's progress and reloads tiles
as they are written. Coarse levels that the pyramid does not have yet are
averaged from the coarsest level present (at most 4096 source pixels per
tile side, strided beyond that); run `render.py assemble` for a full pyramid.

The server listens on 127.0.0.1 only, unless --host names another address
and --allow-remote says so explicitly (the viewer has no authentication).
"""

from __future__ import annotations

import argparse
import webbrowser

from creps.cli import command
from renderer.fsio import parse_storage_options

from .errors import ViewerError
from .server import check_bind, make_server, open_source
from .tiles import FORMATS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="URL_OR_DZI", help="image store URL/path, or an exported .dzi")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0 = any free port) [8000]")
    p.add_argument("--host", default="127.0.0.1", help="address to bind [127.0.0.1]")
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback --host (anyone who can reach it sees the image; no authentication)",
    )
    p.add_argument("--storage-options", default=None, metavar="JSON", help="fsspec options for the URL, as JSON")
    p.add_argument("--tile-format", choices=sorted(FORMATS), default="jpeg", help="on-the-fly tile format [jpeg]")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of on-the-fly tiles [90]")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")


@command()
def run(args: argparse.Namespace) -> int:
    options = parse_storage_options(args.storage_options, ViewerError)
    if not 0 <= args.port <= 65535:
        raise ViewerError(f"--port {args.port} is not a TCP port (0..65535)")
    if not 1 <= args.quality <= 100:
        raise ViewerError(f"--quality {args.quality} must be in 1..100")
    # Check the bind address before touching the (maybe remote) source.
    check_bind(args.host, args.allow_remote)
    source = open_source(args.source, options, fmt=args.tile_format, quality=args.quality)
    server = make_server(source, args.host, args.port, allow_remote=args.allow_remote)
    url = server.url
    print(f"viewing {args.source} at {url}  (Ctrl-C to stop)", flush=True)
    if args.open:
        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
