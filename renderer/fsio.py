"""fsspec helpers every store-touching module shares: URLs, small JSON records, listings.

One implementation each, because the copies had drifted (one listing guarded
against a missing folder, another did not).  Small records (markers, progress
files, leases) are written whole: on a local filesystem through a temporary
name and ``os.replace`` (a reader sees the old record or the new one, never
half), on object stores with one PUT, which is atomic by itself.
"""

from __future__ import annotations

import atexit
import functools
import json
import mimetypes
import os
import threading
from typing import Any

import fsspec
import fsspec.asyn

from creps.files import open_temp_beside

from .errors import RendererError


def is_local(url: str) -> bool:
    """True for plain paths and file:// URLs (where folders must exist before files)."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    """The filesystem path of a local URL (file:// stripped)."""
    return url[len("file://") :] if url.startswith("file://") else url


# gcsfs >= 2025.10 probes every bucket over gRPC for "zonal" buckets (an experimental layer,
# on by default); where that API is not reachable (emulators, restricted networks) each probe
# waits 60 s and is never cached.  Off unless the user turned it on: set before gcsfs is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def filesystem(url: str, storage_options: dict | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it without a trailing slash) for a URL or plain path.

    The first time a process meets an object store's endpoint it probes it
    (``probe_endpoint``): a dead endpoint is one RendererError in seconds.
    """
    try:
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ValueError, ImportError, TypeError) as e:
        raise RendererError(f"cannot open {url!r}: {e}") from None
    count_io(fs)
    probe_endpoint(fs, url)
    return fs, root.rstrip("/")


# ---------------------------------------------------------------- the first probe of an object store
# The clients' own patience is made for stores that answer: botocore retries a refused
# connection 5 times with back-off (and s3fs again around it), gcsfs 6 times (up to 32 s
# apart), the Azure SDK for over a minute; with dummy credentials a dead endpoint took 22 s to
# report on S3, 33 s on GCS, 79 s on Azure.  So before the first request to an endpoint a
# process opens one TCP connection to it (through the proxy, when one is configured), with a
# bounded budget: at most 3 connect attempts of <= 1.5 s, 0.25 s apart, within PROBE_BUDGET_S.
# Nothing answering is one line at once; a store that answers, however slowly, is not
# affected (only the TCP handshake is timed, and the clients keep their settings for data).
PROBE_BUDGET_S = float(os.environ.get("CREPS_STORE_PROBE_S", "3") or 0)  # 0: no probe
PROBE_CONNECT_S = 1.5
PROBE_ATTEMPTS = 3
PROBE_FAILURE_KEPT_S = 30.0  # a failed probe is answered from memory this long (a command asks twice)
_probe_lock = threading.Lock()
_probed: dict[tuple[str, int], tuple[float, str]] = {}  # (host, port) -> (when, "" or why it failed)
DEFAULT_ENDPOINTS = {"s3": "https://s3.amazonaws.com", "gs": "https://storage.googleapis.com"}


def endpoint_url(fs: Any) -> str | None:
    """The URL the requests of an S3, GCS or Azure filesystem go to; None for other filesystems."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "s3" in protocols:
        given = (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url") or getattr(fs, "endpoint_url", None)
        env = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return str(given or env or DEFAULT_ENDPOINTS["s3"])
    if "gs" in protocols or "gcs" in protocols:
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        if emulator and "://" not in emulator:
            emulator = f"http://{emulator}"
        return str(getattr(fs, "_endpoint", None) or emulator or DEFAULT_ENDPOINTS["gs"])
    if "abfs" in protocols or "az" in protocols:
        client = getattr(fs, "service_client", None)
        return str(client.url) if client is not None and getattr(client, "url", None) else None
    return None


def _host_port(url: str) -> tuple[str, int] | None:
    """(host, port) a client connects to for ``url``: the proxy's when one applies."""
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        return None
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname):
        via = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if via.hostname:
            return via.hostname, via.port or (443 if via.scheme == "https" else 80)
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def _connect(host: str, port: int, budget: float) -> str:
    """ "" when a TCP connection to host:port opens within ``budget`` seconds, else why not."""
    import socket
    import time

    deadline, why = time.monotonic() + budget, "no answer"
    result: list[str] = []

    def attempt() -> None:
        nonlocal why
        for _ in range(PROBE_ATTEMPTS):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                socket.create_connection((host, port), timeout=min(PROBE_CONNECT_S, left)).close()
                result.append("")
                return
            except socket.gaierror as e:  # the name does not resolve: no retry will change that soon
                result.append(f"{host} does not resolve ({e.strerror or e})")
                return
            except OSError as e:
                why = e.strerror or type(e).__name__
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
        result.append(why)

    # a thread, so a name lookup that hangs is bounded by the budget too
    thread = threading.Thread(target=attempt, name="store-probe", daemon=True)
    thread.start()
    thread.join(budget + 0.5)
    return result[0] if result else f"no answer within {budget:g} s"


def probe_endpoint(fs: Any, url: str) -> None:
    """RendererError (one line) when nothing answers at the object store's endpoint.

    Once per endpoint and process (a success is remembered for good, a
    failure for PROBE_FAILURE_KEPT_S); local, memory and other filesystems
    are not probed.  ``CREPS_STORE_PROBE_S`` sets the budget (0: no probe).
    """
    import time

    if PROBE_BUDGET_S <= 0 or fs_is_local(fs):
        return
    endpoint = endpoint_url(fs)
    target = _host_port(endpoint) if endpoint else None
    if target is None:
        return
    with _probe_lock:
        seen = _probed.get(target)
    if seen is None or (seen[1] and time.monotonic() - seen[0] > PROBE_FAILURE_KEPT_S):
        seen = (time.monotonic(), _connect(*target, PROBE_BUDGET_S))
        with _probe_lock:
            _probed[target] = seen
    if seen[1]:
        where = f"{target[0]}:{target[1]}"
        raise RendererError(
            f"cannot access {url!r}: the endpoint {endpoint} does not answer ({seen[1]} at {where}); "
            "check the endpoint and that the service is up"
        )


_released: set[type] = set()


def _release_at_exit(cls: type) -> None:
    """Close the Azure clients of zarr's adlfs instances at exit, on zarr's event loop.

    zarr opens its filesystem with ``asynchronous=True``; adlfs then registers
    a ``weakref.finalize`` that closes the client through
    ``sync(self.loop, ...)`` with ``self.loop`` None, which can only fail: every
    process that touched an ``az://`` store ended with a "Loop is not running"
    traceback and "Unclosed client session" warnings on stderr.  Registered
    after zarr's own exit hook, this runs before zarr stops its loop: it closes
    those clients there and drops the finalizers that would fail.
    """
    if cls in _released:
        return
    _released.add(cls)

    def release() -> None:
        import weakref

        try:
            from zarr.core.sync import sync as zarr_sync
        except ImportError:
            return
        doomed = [fs for fs in list(getattr(cls, "_cache", {}).values()) if getattr(fs, "asynchronous", False)]
        for fs in doomed:
            try:
                zarr_sync(fs.service_client.close())
            except Exception:  # already closed, or never connected
                pass
        registry = getattr(weakref.finalize, "_registry", {})
        for fin, info in list(registry.items()):
            if info.args and info.args[0] is None and any(info.weakref() is fs for fs in doomed):
                fin.detach()

    atexit.register(release)


# ---------------------------------------------------------------- storage calls of this process
# Object stores bill and throttle per request, so a job reports what it cost: the requests
# it sent and the objects it wrote.  Counted per process by wrapping methods of each remote
# filesystem instance we use (ours and zarr's); workers report their deltas with their
# results.  Where the filesystem has one method per HTTP request, that is what is counted:
# s3fs's ``_call_s3`` (one S3 API call; botocore's own retries inside it are not seen) and
# gcsfs's ``_request`` (one HTTP request, each retry included).  Elsewhere (adlfs: the Azure
# SDK has no such seam) the fsspec primitives are counted, one request each, which is what
# they cost for the small objects and records we write.
_PRIMITIVES = ("_cat_file", "_info", "_ls", "_rm_file", "_cp_file", "_get_file", "_pipe_file", "_put_file")
_REQUEST_SEAMS = ("_call_s3", "_request")  # s3fs, gcsfs
_WRITES = ("_pipe_file", "_put_file")
_io_lock = threading.Lock()
_io = {"requests": 0, "objects_written": 0}


def io_counts() -> tuple[int, int]:
    """(requests, objects written) made by this process so far."""
    with _io_lock:
        return _io["requests"], _io["objects_written"]


def _counted(fn: Any, request: bool, write: bool) -> Any:
    @functools.wraps(fn)
    async def call(*args: Any, **kwargs: Any) -> Any:
        if request:
            with _io_lock:
                _io["requests"] += 1
        out = await fn(*args, **kwargs)
        if write:
            with _io_lock:
                _io["objects_written"] += 1
        return out

    return call


def count_io(fs: Any) -> Any:
    """Count the requests and object writes of a remote async filesystem instance (once; local ones are not counted)."""
    if fs_is_local(fs) or not getattr(fs, "async_impl", False) or getattr(fs, "_creps_counted", False):
        return fs
    if "abfs" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        _release_at_exit(type(fs))
    seam = next((n for n in _REQUEST_SEAMS if callable(getattr(fs, n, None))), None)
    names = (seam, *_WRITES) if seam else _PRIMITIVES
    for name in names:
        fn = getattr(fs, name, None)
        if fn is None:
            continue
        counted = _counted(fn, request=seam is None or name == seam, write=name in _WRITES)
        setattr(fs, name, counted)
        if name[1:] in vars(fs):  # fsspec bound a sync twin to the original at construction: rebind it
            setattr(fs, name[1:], fsspec.asyn.sync_wrapper(counted, obj=fs))
    fs._creps_counted = True
    return fs


def fs_is_local(fs: Any) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


# How s3fs and gcsfs take the Content-Type of an object they write (a web server or a bucket's HTTP
# endpoint sends it as stored; other filesystems: none given).
_CONTENT_TYPE_KWARG = {"s3": "ContentType", "s3a": "ContentType", "gs": "content_type", "gcs": "content_type"}


def upload_kwargs(fs: Any, name: str) -> dict[str, str]:
    """The keyword arguments that give an object written with ``fs.pipe`` the Content-Type of ``name``
    (``image/jpeg`` for ``.jpg``, ...): what a static site on a bucket needs; ``put`` guesses it itself."""
    ctype = mimetypes.guess_type(name)[0]
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    kwarg = next((_CONTENT_TYPE_KWARG[p] for p in protocols if p in _CONTENT_TYPE_KWARG), None)
    return {kwarg: ctype} if kwarg and ctype else {}


def write_bytes(fs: Any, path: str, data: bytes) -> None:
    """Write a whole small file so no reader ever sees a part of it."""
    if fs_is_local(fs):
        atomic_local_write(path, data)
    else:
        fs.pipe_file(path, data)


def _complete_temp(path: str, data: bytes) -> str:
    """A complete temp file holding ``data`` beside ``path`` (folder created); its name."""
    fd, tmp = open_temp_beside(os.path.abspath(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def atomic_local_write(path: str, data: bytes) -> None:
    """Temp file in the same folder + ``os.replace``; the folder is created if needed."""
    tmp = _complete_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def create_exclusive(fs: Any, path: str, data: bytes) -> bool:
    """Create ``path`` with ``data`` only if it does not exist; False if it already did.

    The primitive that makes ownership atomic on every filesystem: locally a
    complete temp file hard-linked to the name (``link`` fails if the name
    exists, and a reader never sees a partial file); on object stores a
    conditional PUT through fsspec's ``mode="create"``: ``If-None-Match: *``
    on S3 (s3fs) and Azure Blob (adlfs turns it into ``overwrite=False``),
    ``ifGenerationMatch=0`` on GCS (gcsfs; a 412 becomes FileExistsError).
    Each is raced by several writers in the tests, on moto, fake-gcs-server
    and azurite.
    """
    if fs_is_local(fs):
        tmp = _complete_temp(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return True


def write_json(fs: Any, path: str, record: Any) -> None:
    write_bytes(fs, path, json.dumps(record).encode())


def read_json(fs: Any, path: str) -> Any | None:
    """The JSON record at ``path``; None when it is missing or unreadable (not yet written)."""
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None


def list_names(fs: Any, folder: str, suffix: str = ".json") -> set[str]:
    """Names (suffix stripped) of the files in ``folder`` ending in ``suffix``; empty if no folder.

    Listings bypass fsspec's listing cache: markers are written by other
    processes, and a stale listing would make finished work look missing.
    """
    try:
        names = fresh_ls(fs, folder)
    except (FileNotFoundError, NotADirectoryError):
        return set()
    base = (os.path.basename(str(n).rstrip("/")) for n in names)
    return {n[: -len(suffix)] for n in base if n.endswith(suffix) and not n.startswith(".")}


def fresh_ls(fs: Any, folder: str) -> list[str]:
    """Names in ``folder`` as the store has them now, never from a listing cache.

    ``refresh=True`` alone is not enough: adlfs takes it without a word and
    answers from its cache (its flag is ``invalidate_cache``), so a
    long-running process would never see markers written by others.  The
    folder's cache entry is dropped first, which every fsspec filesystem supports.
    """
    fs.invalidate_cache(folder)
    try:
        return list(fs.ls(folder, detail=False, refresh=True))
    except TypeError:  # filesystems without ``refresh``
        return list(fs.ls(folder, detail=False))


def remove_tree(fs: Any, path: str) -> None:
    if fs.exists(path):
        fs.rm(path, recursive=True)


def parse_storage_options(text: str | None, error: type[Exception] = RendererError) -> dict | None:
    """fsspec storage options from a JSON object on the command line (None stays None).

    ``error`` is the caller's bad-input exception type, so each CLI reports it
    with its own exit code.
    """
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"storage options are not valid JSON ({e.msg} at char {e.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise error(f"storage options must be a JSON object, got {text!r}")
    return value
