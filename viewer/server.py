"""HTTP server of the viewer: the page, OpenSeadragon, job info and DZI tiles.

Standard library only (ThreadingHTTPServer): the viewer is a local tool, one
user, a handful of concurrent tile requests. Routes:

  /, /index.html, /static/*   the page (viewer/static)
  /osd/*                      OpenSeadragon, vendored in viewer/static/osd (package data of the wheel)
  /api/info                   JSON: size, levels, progress, job metadata
  /image.dzi, /image_files/L/C_R.jpeg|png     zarr mode: tiles made on the fly from the store;
                                              endless mode: tiles rendered on demand (viewer.endless)
  /dzi/NAME.dzi, /dzi/NAME_files/...          DZI mode: files of an exported DZI
  /iiif/3/image/..., /iiif/3/manifest.json    IIIF Image API 3.0 (level 2) and a Presentation
                                              manifest, every mode (viewer.iiif_service)

Routing is a table (``Handler.ROUTES``: first path segment -> method). Numbers
in tile URLs are canonical: ASCII digits, no leading zero (``/image_files/05/0_0.jpeg``
or a non-ASCII digit is 404, before any work), as in IIIF URLs.

Safety: loopback only unless ``allow_remote``; GET/HEAD only; a request path
is percent-decoded once and refused (403; 400 under /iiif/, whose spec asks
for it) if any segment is empty, '.' or '..', or holds a backslash or NUL, so neither '../' nor '%2e%2e%2f' nor
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
import re
import secrets
import socket
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from creps.errors import first_line
from renderer.page import OSD_DIR  # the OpenSeadragon build: one place says where (the static page ships it too)

from .dzifiles import CONTENT_TYPES, DziFiles, safe_file
from .endless import EndlessTiles
from .errors import ViewerError
from .iiif import DEFAULT_MAX_AREA, Limits
from .iiif_service import CORS, IIIFService
from .schedule import client_gone
from .tiles import FORMATS, StoreTiles, TileReadError, ViewerBusy

__all__ = ["DziFiles", "ViewerServer", "check_bind", "make_server", "new_token", "open_source", "split_path"]

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'"
)
NUM = r"(0|[1-9][0-9]{0,8})"  # a canonical number: ASCII digits, no leading zero, no sign
TILE_RE = re.compile(rf"{NUM}/{NUM}_{NUM}\.(jpeg|png)")  # used with fullmatch (``$`` would allow a newline)
HOST_RE = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")  # fullmatch


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
    m = TILE_RE.fullmatch("/".join(parts))
    if m is None or m.group(4) != fmt:
        return None
    level, col, row = (int(g) for g in m.groups()[:3])
    return level, col, row


Source = StoreTiles | DziFiles | EndlessTiles


# ---------------------------------------------------------------- HTTP
class ViewerServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # a burst of connections waits in the kernel instead of being reset

    def __init__(
        self,
        addr: tuple[str, int],
        source: Source,
        local_only: bool,
        token: str | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.source = source
        self.local_only = local_only
        self.token = token
        self.iiif = IIIFService(source, limits or Limits())
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
    extra: dict[str, str] = {}  # headers every response to this request carries (IIIF: CORS)  # noqa: RUF012

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
        for key, value in self.extra.items():
            self.send_header(key, value)
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
        self.extra = {}
        hosts = self.headers.get_all("Host") or []
        if self.server.local_only and (len(hosts) != 1 or not is_loopback(host_name(hosts[0]))):
            return self._error(403, "forbidden: Host is not a loopback name")
        parts = split_path(self.path)
        if parts is None:
            if self.path.startswith("/iiif/"):  # IIIF asks for 400 on a malformed request
                self.extra = dict(CORS)
                return self._error(400, "bad request: malformed path")
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
            for key, value in self.extra.items():
                self.send_header(key, value)
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
        handler = self.ROUTES.get(parts[0] if parts else "")
        if handler is None:
            return self._error(404, "not found")
        handler(self, parts[1:])

    # ------------------------------------------------------------ routes (ROUTES: first segment -> method)
    def _index(self, rest: list[str]) -> None:
        if rest:
            return self._error(404, "not found")
        self._static(STATIC_DIR, ["index.html"], "no-cache")

    def _page_file(self, rest: list[str]) -> None:
        self._static(STATIC_DIR, rest, "no-cache")

    def _osd(self, rest: list[str]) -> None:
        self._static(OSD_DIR, rest, "max-age=3600")

    def _api(self, rest: list[str]) -> None:
        if rest != ["info"]:
            return self._error(404, "not found")
        self._send(200, json.dumps(self.server.source.info()).encode(), "application/json")

    def _dzi_xml(self, rest: list[str]) -> None:
        src = self.server.source
        if rest or isinstance(src, DziFiles):
            return self._error(404, "not found")
        self._send(200, src.dzi().encode(), "application/xml")

    def _tile(self, rest: list[str]) -> None:
        src = self.server.source
        address = None if isinstance(src, DziFiles) else _tile_address(rest, src.fmt)
        if address is None:
            return self._error(404, "not found")
        if isinstance(src, StoreTiles):
            return self._send(200, src.tile(*address), FORMATS[src.fmt])
        assert isinstance(src, EndlessTiles)
        data = src.tile(*address, client=self.client_address[0], alive=self._client_alive)
        if data is None:  # the client left before its tile was rendered: nobody to answer
            self.close_connection = True
            return None
        # Tile URLs carry ?v=<image key> (viewer.js): the bytes behind one URL never change.
        self._send(200, data, FORMATS[src.fmt], "private, max-age=86400")

    def _dzi_files(self, rest: list[str]) -> None:
        src = self.server.source
        got = src.read(rest) if isinstance(src, DziFiles) else None
        if got is None:
            return self._error(404, "not found")
        self._send(200, got[0], got[1], "max-age=3600")

    def _iiif(self, rest: list[str]) -> None:
        self.extra = dict(CORS)  # errors on the way (503, 500) carry it too: IIIF clients read them cross-origin
        answer = self.server.iiif.answer(
            rest,
            root=self._root(),
            accept=self.headers.get("Accept", ""),
            client=self.client_address[0],
            alive=self._client_alive,
        )
        if answer is None:  # the client left before its image was made
            self.close_connection = True
            return None
        self.extra = answer.headers
        self._send(answer.status, answer.body, answer.ctype, answer.cache)

    def _root(self) -> str:
        """``http://host:port`` as this client reached the server (the Host header when it is a
        plain host name or address, else the bound address): the base of IIIF ids."""
        host = (self.headers.get("Host") or "").strip()
        if not HOST_RE.fullmatch(host):
            return self.server.url.split("/?", 1)[0].rstrip("/")
        return f"http://{host}"

    ROUTES: dict[str, Callable[[Handler, list[str]], None]] = {  # noqa: RUF012
        "": _index,
        "index.html": _index,
        "static": _page_file,
        "osd": _osd,
        "api": _api,
        "image.dzi": _dzi_xml,
        "image_files": _tile,
        "dzi": _dzi_files,
        "iiif": _iiif,
    }

    def _static(self, root: Path, parts: list[str], cache: str) -> None:
        path = safe_file(root, parts)
        ctype = CONTENT_TYPES.get(path.suffix.lower()) if path else None
        if path is None or ctype is None:
            return self._error(404, "not found")
        self._send(200, path.read_bytes(), ctype, cache)


def open_source(url: str, storage_options: dict | None = None, fmt: str = "jpeg", quality: int = 90) -> Source:
    """A .dzi path/URL -> DziFiles; anything else is an image store -> StoreTiles."""
    if url.rstrip("/").lower().endswith(".dzi"):
        return DziFiles(url.rstrip("/"), storage_options, quality=quality)
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
    source: Source,
    host: str = "127.0.0.1",
    port: int = 0,
    allow_remote: bool = False,
    token: str | None = None,
    max_area: int = DEFAULT_MAX_AREA,
) -> ViewerServer:
    """Bind (not yet serve) the viewer; refuses a non-loopback host unless ``allow_remote``.

    A non-loopback server always has a token (``token``, else a new random
    one: ``server.token``, and ``server.url`` carries it); a loopback one has
    one only when ``token`` is given. ``max_area`` bounds the output pixels of
    one IIIF image request (info.json's ``maxArea``; larger ones are refused).
    """
    local = check_bind(host, allow_remote)
    limits = Limits(max_area)  # ViewerError for a bad --max-area, before binding
    if token is not None and not token:
        raise ViewerError("--token must not be empty")
    if not local and token is None:
        token = new_token()
    if not OSD_DIR.is_dir():
        raise ViewerError(f"OpenSeadragon is missing from {OSD_DIR}; reinstall creps-gigapixel")
    cls = ViewerServer6 if ":" in host.strip("[]") else ViewerServer
    try:
        return cls((host.strip("[]"), port), source, local_only=local, token=token, limits=limits)
    except OSError as e:
        raise ViewerError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
