"""HTTP server of the viewer: the page, OpenSeadragon, job info and DZI tiles.

Standard library only (ThreadingHTTPServer): the viewer is a local tool, one
user, a handful of concurrent tile requests. Routes:

  /, /index.html, /static/*   the page (viewer/static)
  /osd/*                      OpenSeadragon, vendored in viewer/static/osd (package data of the wheel)
  /api/info                   JSON: size, levels, progress, job metadata
  /image.dzi, /image_files/L/C_R.jpeg|png     zarr mode: tiles made on the fly from the store;
                                              endless mode: tiles rendered on demand (viewer.endless)
  /dzi/NAME.dzi, /dzi/NAME_files/...          DZI mode: files of an exported DZI

Safety: loopback only unless ``allow_remote``; GET/HEAD only; a request path
is percent-decoded once and refused (403) if any segment is empty, '.' or
'..', or holds a backslash or NUL, so neither '../' nor '%2e%2e%2f' nor
'//etc/passwd' can leave a root; files are served only if their real path
(symlinks resolved) lies inside the root they were asked from. On a
loopback bind the Host header must name a loopback host too (a page on
another site cannot reach the server through DNS rebinding).

Access beyond loopback: a server bound to another address (``allow_remote``)
requires a token, the way Jupyter does: a random one (``new_token``) unless
given, printed in the URL (``/?token=...``), compared in constant time
(``hmac.compare_digest``), and kept in an HttpOnly, SameSite=Strict cookie
after the first visit so the page's own requests carry it. Every route (the
page, DZI, tiles, metadata) answers 403 without it. Loopback stays
token-free unless a token is given.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import re
import secrets
import socket
import urllib.parse
import xml.etree.ElementTree as ET
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from creps.errors import first_line
from renderer.errors import RendererError
from renderer.fsio import filesystem, is_local

from .endless import EndlessTiles
from .errors import ViewerError
from .schedule import client_gone
from .tiles import FORMATS, StoreTiles, TileReadError, ViewerBusy

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
OSD_DIR = STATIC_DIR / "osd"  # openseadragon.min.js + images/ (buttons) from npm openseadragon, see its README.md
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".png": "image/png",
    ".jpeg": "image/jpeg",
    ".jpg": "image/jpeg",
    ".webp": "image/webp",
    ".dzi": "application/xml",
    ".xml": "application/xml",
    ".svg": "image/svg+xml",
}
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'"
)
TILE_RE = re.compile(r"^(\d{1,3})/(\d{1,9})_(\d{1,9})\.(jpeg|png)$")


def new_token() -> str:
    """A random access token (192 bits, URL-safe)."""
    return secrets.token_urlsafe(24)


def token_matches(given: str | None, token: str) -> bool:
    """Constant-time comparison, so response timing does not leak how much of a guess was right."""
    return given is not None and hmac.compare_digest(given.encode("utf-8", "replace"), token.encode())


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost names (what a local-only server may bind)."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """Host name of a Host header ('127.0.0.1:8000' -> '127.0.0.1', '[::1]:80' -> '::1')."""
    header = header.strip()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def split_path(raw: str) -> list[str] | None:
    """Decoded path segments of a request target, or None if it is not a plain path under '/'."""
    path = raw.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        return None  # absolute-form (http://...) or garbage
    try:
        decoded = urllib.parse.unquote(path, errors="strict")
    except UnicodeDecodeError:
        return None
    parts = decoded[1:].split("/")
    if parts == [""]:
        return []
    for p in parts:
        if p in ("", ".", "..") or "\\" in p or "\x00" in p:
            return None
    return parts


def _tile_address(parts: list[str], fmt: str) -> tuple[int, int, int] | None:
    """(level, col, row) of the path segments after ``image_files/`` (``L/C_R.FMT``), None unless
    they name a tile in the source's format ``fmt``."""
    m = TILE_RE.match("/".join(parts))
    if m is None or m.group(4) != fmt:
        return None
    level, col, row = (int(g) for g in m.groups()[:3])
    return level, col, row


def safe_file(root: Path, parts: list[str]) -> Path | None:
    """root/parts if it is a regular file whose real path stays inside root's real path."""
    if not parts:
        return None
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, *parts))
    if os.path.commonpath([real_root, real]) != real_root or not os.path.isfile(real):
        return None
    return Path(real)


# ---------------------------------------------------------------- exported DZI
class DziFiles:
    """An exported DeepZoom pyramid (NAME.dzi + NAME_files/) on any fsspec URL.

    Serves exactly those two entries of the DZI's folder, nothing else there.
    """

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        try:
            self.fs, path = filesystem(url, storage_options)
        except RendererError as e:
            raise ViewerError(str(e)) from None
        self.local = is_local(url)
        self.dir, self.name = path.rsplit("/", 1) if "/" in path else (".", path)
        self.stem = self.name[: -len(".dzi")]
        try:
            xml = self.fs.cat_file(path)
        except Exception as e:  # missing file, endpoint down, bad credentials
            raise ViewerError(f"cannot read {url!r}: {first_line(e)}") from None
        try:
            node = ET.fromstring(xml)
            size = next(el for el in node if el.tag.endswith("Size"))
            self.width, self.height = int(size.get("Width", "")), int(size.get("Height", ""))
            self.format = node.get("Format", "jpeg")
        except (ET.ParseError, StopIteration, ValueError) as e:
            raise ViewerError(f"{url!r} is not a DeepZoom .dzi file: {e}") from None
        self.url = url

    def info(self) -> dict[str, Any]:
        return {
            "mode": "dzi",
            "tile_source": f"/dzi/{urllib.parse.quote(self.name)}",
            "width": self.width,
            "height": self.height,
            "tile_format": self.format,
            "tiles_done": None,
            "tiles_total": None,
            "version": "static",
            "checkpoint": None,
            "checkpoint_sha256": None,
            "seed": None,
            "psi": None,
            "status": None,
            "error": None,
            "meta": {},
        }

    def read(self, parts: list[str]) -> tuple[bytes, str] | None:
        """(bytes, content type) of NAME.dzi or a file under NAME_files/, else None."""
        if parts == [self.name]:
            root, inner = self.dir, parts
        elif len(parts) >= 2 and parts[0] == f"{self.stem}_files":
            root, inner = f"{self.dir}/{parts[0]}", parts[1:]  # a tile may not even point to NAME.dzi's folder
        else:
            return None
        ctype = CONTENT_TYPES.get(os.path.splitext(parts[-1])[1].lower())
        if ctype is None:
            return None
        if self.local:
            p = safe_file(Path(root), inner)
            return (p.read_bytes(), ctype) if p else None
        try:
            return self.fs.cat_file(f"{self.dir}/{'/'.join(parts)}"), ctype
        except (FileNotFoundError, OSError):
            return None


Source = StoreTiles | DziFiles | EndlessTiles


# ---------------------------------------------------------------- HTTP
class ViewerServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # a burst of connections waits in the kernel instead of being reset

    def __init__(self, addr: tuple[str, int], source: Source, local_only: bool, token: str | None = None) -> None:
        self.source = source
        self.local_only = local_only
        self.token = token
        super().__init__(addr, Handler)

    @property
    def cookie_name(self) -> str:
        """One cookie per port: cookies ignore ports, and two viewers on one host must not clash."""
        return f"creps_token_{self.server_address[1]}"

    @property
    def url(self) -> str:
        """The address to open; with a token, the URL that carries it (as printed on start)."""
        host, port = self.server_address[:2]
        host = str(host)
        base = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
        return f"{base}?token={self.token}" if self.token else base

    def close_source(self) -> None:
        """Release what the source holds (render workers, the cache writer); safe to call twice."""
        if isinstance(self.source, EndlessTiles):
            self.source.close()


class ViewerServer6(ViewerServer):
    address_family = socket.AF_INET6


class Handler(BaseHTTPRequestHandler):
    server: ViewerServer
    server_version = "creps-viewer"
    sys_version = ""

    failure = ""  # why this request failed with a 5xx: joins its one log line
    set_cookie = ""  # a Set-Cookie value for this response (the token, on the first visit with it)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Log refused and failed requests only; tile traffic would drown the terminal."""
        if str(code)[:1] == "5" and self.failure:
            self.log_message('"%s" %s: %s', self.requestline, str(code), self.failure)
        elif str(code)[:1] in ("4", "5"):
            super().log_request(code, size)

    # ------------------------------------------------------------ responses
    def _send(self, code: int, body: bytes, ctype: str, cache: str = "no-cache") -> None:
        self.send_response(code)
        if self.set_cookie:
            self.send_header("Set-Cookie", self.set_cookie)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", CSP)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, code: int, text: str) -> None:
        self._send(code, (text + "\n").encode(), "text/plain; charset=utf-8")

    def _refuse_method(self) -> None:
        self.send_response(405)
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse_method

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self.failure = ""
        hosts = self.headers.get_all("Host") or []
        if self.server.local_only and (len(hosts) != 1 or not is_loopback(host_name(hosts[0]))):
            return self._error(403, "forbidden: Host is not a loopback name")
        parts = split_path(self.path)
        if parts is None:
            return self._error(403, "forbidden path")
        self.set_cookie = ""
        if self.server.token is not None and not self._authorised(self.server.token):
            return self._error(403, "forbidden: this viewer needs its token; open the URL it printed (.../?token=...)")
        try:
            self._route(parts)
        except TileReadError as e:  # a corrupt chunk: a clear 500 and one log line, the server goes on
            self._fail(str(e))
        except ViewerBusy as e:  # bounded work: the client retries
            self._busy(str(e))
        except ViewerError as e:
            self._error(404, str(e))
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # never drop the connection without an answer
            self._fail(f"internal error: {type(e).__name__}: {first_line(e)}")

    def _authorised(self, token: str) -> bool:
        """The token from the cookie, or from ``?token=`` (which then sets the cookie)."""
        name = self.server.cookie_name
        for header in self.headers.get_all("Cookie") or []:
            for part in header.split(";"):
                key, _, value = part.strip().partition("=")
                if key == name and token_matches(value, token):
                    return True
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        given = query.get("token", [None])[-1]
        if token_matches(given, token):
            self.set_cookie = f"{name}={token}; Path=/; HttpOnly; SameSite=Strict"
            return True
        return False

    def _client_alive(self) -> bool:
        return not client_gone(self.connection)

    def _busy(self, text: str) -> None:
        body = (text + "\n").encode()
        try:
            self.send_response(503)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Retry-After", "1")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _fail(self, text: str) -> None:
        self.failure = text
        try:
            self._error(500, text)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _route(self, parts: list[str]) -> None:
        src = self.server.source
        if parts in ([], ["index.html"]):
            return self._static(STATIC_DIR, ["index.html"], "no-cache")
        head, rest = parts[0], parts[1:]
        if head == "static":
            return self._static(STATIC_DIR, rest, "no-cache")
        if head == "osd":
            return self._static(OSD_DIR, rest, "max-age=3600")
        if parts == ["api", "info"]:
            return self._send(200, json.dumps(src.info()).encode(), "application/json")
        if isinstance(src, (EndlessTiles, StoreTiles)):
            if parts == ["image.dzi"]:
                return self._send(200, src.dzi().encode(), "application/xml")
            if head == "image_files":
                address = _tile_address(rest, src.fmt)
                if address is None:
                    return self._error(404, "not found")
                if isinstance(src, StoreTiles):
                    return self._send(200, src.tile(*address), FORMATS[src.fmt])
                data = src.tile(*address, client=self.client_address[0], alive=self._client_alive)
                if data is None:  # the client left before its tile was rendered: nobody to answer
                    self.close_connection = True
                    return None
                # Tile URLs carry ?v=<image key> (viewer.js): the bytes behind one URL never change.
                return self._send(200, data, FORMATS[src.fmt], "private, max-age=86400")
        elif head == "dzi":
            got = src.read(rest)
            if got is not None:
                return self._send(200, got[0], got[1], "max-age=3600")
        self._error(404, "not found")

    def _static(self, root: Path, parts: list[str], cache: str) -> None:
        path = safe_file(root, parts)
        ctype = CONTENT_TYPES.get(path.suffix.lower()) if path else None
        if path is None or ctype is None:
            return self._error(404, "not found")
        self._send(200, path.read_bytes(), ctype, cache)


def open_source(url: str, storage_options: dict | None = None, fmt: str = "jpeg", quality: int = 90) -> Source:
    """A .dzi path/URL -> DziFiles; anything else is an image store -> StoreTiles."""
    if url.rstrip("/").lower().endswith(".dzi"):
        return DziFiles(url.rstrip("/"), storage_options)
    return StoreTiles(url, storage_options, fmt=fmt, quality=quality)


def check_bind(host: str, allow_remote: bool) -> bool:
    """True if host is loopback; ViewerError for another address unless ``allow_remote``."""
    local = is_loopback(host)
    if not local and not allow_remote:
        raise ViewerError(
            f"refusing to serve on non-loopback address {host!r}; pass --allow-remote to expose the viewer"
        )
    return local


def make_server(
    source: Source, host: str = "127.0.0.1", port: int = 0, allow_remote: bool = False, token: str | None = None
) -> ViewerServer:
    """Bind (not yet serve) the viewer; refuses a non-loopback host unless ``allow_remote``.

    A non-loopback server always has a token (``token``, else a new random
    one: ``server.token``, and ``server.url`` carries it); a loopback one has
    one only when ``token`` is given.
    """
    local = check_bind(host, allow_remote)
    if token is not None and not token:
        raise ViewerError("--token must not be empty")
    if not local and token is None:
        token = new_token()
    if not OSD_DIR.is_dir():
        raise ViewerError(f"OpenSeadragon is missing from {OSD_DIR}; reinstall creps-gigapixel")
    cls = ViewerServer6 if ":" in host.strip("[]") else ViewerServer
    try:
        return cls((host.strip("[]"), port), source, local_only=local, token=token)
    except OSError as e:
        raise ViewerError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
