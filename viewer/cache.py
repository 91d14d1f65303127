"""The endless viewer's persistent cache: encoded tiles and line blocks, bounded, least recently used out.

Layout under the cache URL (any fsspec URL; default ``out/view-cache``)::

    <image key>/image.json                         what the image is (ImageSpec.identity, for people)
    <image key>/tiles/<png | jpeg-q<Q>>/<L>/<C>_<R>.<ext>
    <image key>/lines/<L>/<row | col>/<block>.npy

``<image key>`` is ``ImageSpec.key``, a hash of everything that decides the
pixels (checkpoint hash, seed, psi, size, view, pixel block, cache format;
warps and precision when set), so two images never share an entry and a changed flag never serves stale
tiles; the tile folder adds the encoding.

**Bound.** The cache keeps an index of its files (path -> size, in least
recently used order), built by one listing at start (ordered by modification
time) and kept up to date by its own reads and writes; a read of a local
file also refreshes its mtime, so the order survives a restart (on object
stores it falls back to write order after a restart). When a write takes
the total past ``max_bytes``, the least recently used files -- of any image
in the cache -- are deleted until the total is below 90 % of the bound. So a
full cache keeps working: new tiles replace the oldest, nothing is refused,
and an evicted tile is simply rendered again when it is next looked at.
The bound is exact for one viewer per cache folder; files written by another
process at the same time are seen at the next start.

Writes are whole-file (renderer.fsio: temp + rename locally, one PUT on
object stores) and happen on one background thread, so a slow bucket never
delays a response; when more than ``WRITE_QUEUE`` writes are waiting, new
ones are dropped (counted; those tiles are rendered again next time).

**Checked.** Every entry (tiles, line blocks) is stored as a 15-byte header
``crc32:<8 hex digits>\n`` -- the crc32 of what follows, recorded when it was
written -- then the payload, one object, so the checksum and the bytes it
covers are replaced together on any filesystem.  A read checks it: an entry
whose bytes do not match (truncated, bit-flipped, a header damaged) is never
returned; it is counted, logged (one line), deleted, and the caller renders
it again and puts the replacement (a whole-file write).  A matching tile
decodes: its bytes are the ones the encoder produced.  Entries without the
header (written before it existed) are treated the same way, counted apart
(``unverified``).  ``image.json``, which nobody reads back, stays plain JSON
for people.
"""

from __future__ import annotations

import datetime
import os
import queue
import sys
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from creps.errors import first_line
from renderer.errors import RendererError
from renderer.fsio import filesystem, fs_is_local, write_bytes

from .errors import ViewerError

WRITE_QUEUE = 512
LOW_WATER = 0.9  # eviction frees down to this fraction of the bound
MAGIC = b"crc32:"
HEADER = len(MAGIC) + 9  # "crc32:" + 8 hex digits + "\n"


def with_checksum(data: bytes) -> bytes:
    """``data`` as a cache entry: the crc32 header, then the bytes."""
    return b"%s%08x\n%s" % (MAGIC, zlib.crc32(data), data)


def checked(entry: bytes) -> tuple[bytes | None, str]:
    """(payload, "") when the entry's bytes match its header; else (None, why not).

    Why not: "unverified" for an entry without the header (written before
    checksums), else a damage report (truncated or changed bytes).
    """
    if not entry.startswith(MAGIC) or entry[HEADER - 1 : HEADER] != b"\n":
        return None, "unverified"
    try:
        want = int(entry[len(MAGIC) : HEADER - 1], 16)
    except ValueError:
        return None, "its checksum header is damaged"
    payload = entry[HEADER:]
    got = zlib.crc32(payload)
    if got != want:
        return None, f"crc32 {got:08x} of {len(payload)} bytes, {want:08x} when written"
    return payload, ""


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _mtime(info: dict[str, Any]) -> float:
    """Modification time of an fsspec listing entry, whatever the backend calls it (0 if none)."""
    for k in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(k)
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, datetime.datetime):
            return v.timestamp()
        if isinstance(v, str):
            try:
                return datetime.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return 0.0


class TileCache:
    """Files under one root URL with an LRU size bound (see the module docstring)."""

    def __init__(
        self,
        url: str,
        storage_options: dict | None = None,
        max_bytes: int = 4 << 30,
        log: Callable[[str], None] = _stderr,
    ) -> None:
        try:
            self.fs, self.root = filesystem(url, storage_options)
        except RendererError as e:
            raise ViewerError(str(e)) from None
        self.url = url
        self.local = fs_is_local(self.fs)
        self.max_bytes = max_bytes
        self.bytes = 0
        self.evicted = 0  # files deleted to stay under the bound
        self.dropped = 0  # writes not done because the write queue was full
        self.failed = 0  # writes or deletes that raised (the entry is simply not cached)
        self.damaged = 0  # entries read back whose bytes did not match their checksum (made again)
        self.unverified = 0  # entries read back without a checksum (written before them; made again)
        self.log = log
        self._index: OrderedDict[str, int] = OrderedDict()  # relative path -> size, least recent first
        self._lock = threading.Lock()
        try:
            if self.local:
                os.makedirs(self.root, exist_ok=True)
            found = self.fs.find(self.root, detail=True) if self.fs.exists(self.root) else {}
        except Exception as e:  # unreachable endpoint, bad credentials, a file where the folder should be
            raise ViewerError(f"cannot use {url!r} as the tile cache: {first_line(e)}") from None
        entries, leftovers = [], []
        for path, info in found.items():
            rel = str(path)[len(self.root) + 1 :]
            if not rel or info.get("type") == "directory":
                continue
            if os.path.basename(rel).startswith("."):
                leftovers.append(str(path))  # the temp file of a write that was interrupted
                continue
            entries.append((_mtime(info), rel, int(info.get("size") or 0)))
        if leftovers:
            try:
                self.fs.rm(leftovers)
            except Exception:
                pass  # a later start tries again
        for _, rel, size in sorted(entries):
            self._index[rel] = size
            self.bytes += size
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(WRITE_QUEUE)
        self._writer = threading.Thread(target=self._write_loop, name="tile-cache-writer", daemon=True)
        self._writer.start()
        self._evict()

    def __len__(self) -> int:
        return len(self._index)

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def get(self, rel: str) -> bytes | None:
        """The bytes of entry ``rel``, or None (missing or damaged); a hit becomes the most recently used."""
        return self.read(rel)[0]

    def read(self, rel: str) -> tuple[bytes | None, str]:
        """(bytes of entry ``rel``, "") when it is there and whole; (None, "") when it is not there;
        (None, why) when it was there and did not match its checksum (it is gone now: make it again)."""
        with self._lock:
            if rel not in self._index:
                return None, ""
            self._index.move_to_end(rel)
        path = self._path(rel)
        try:
            entry = bytes(self.fs.cat_file(path))
        except (FileNotFoundError, OSError):  # deleted behind our back: forget it
            self._forget(rel)
            return None, ""
        data, why = checked(entry)
        if data is None:
            self._discard(rel, path, why)
            return None, why
        if self.local:
            try:
                os.utime(path)  # the LRU order outlives this process
            except OSError:
                pass
        return data, ""

    def _forget(self, rel: str) -> None:
        with self._lock:
            size = self._index.pop(rel, None)
            if size is not None:
                self.bytes -= size

    def _discard(self, rel: str, path: str, why: str) -> None:
        """A damaged or unverified entry: counted, said (one line), out of the index and the store."""
        self._forget(rel)
        if why == "unverified":
            self.unverified += 1
            if self.unverified == 1:
                self.log(f"tile cache {self.url}: entries without a checksum (older cache) are made again")
        else:
            self.damaged += 1
            self.log(f"tile cache {self.url}: {rel} is damaged ({why}); made again and replaced, never served")
        try:
            self.fs.rm_file(path)
        except Exception:  # already gone, or the store refuses: the replacement overwrites it
            pass

    def put(self, rel: str, data: bytes, checksum: bool = True) -> None:
        """Store ``data`` as entry ``rel`` in the background (dropped if the write queue is full).

        ``checksum=False`` writes the bytes as they are: only for entries that
        are never read back (``image.json``, for people).
        """
        entry = with_checksum(data) if checksum else data
        if len(entry) > self.max_bytes:
            return
        try:
            self._queue.put_nowait((rel, entry))
        except queue.Full:
            self.dropped += 1

    def flush(self) -> None:
        """Wait until every write queued so far is on the store."""
        self._queue.join()

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._writer.join()

    def stats(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "files": len(self._index),
            "evicted": self.evicted,
            "writes_dropped": self.dropped,
            "writes_failed": self.failed,
            "damaged": self.damaged,
            "unverified": self.unverified,
        }

    # ------------------------------------------------------------ writer thread
    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                rel, data = item
                try:
                    write_bytes(self.fs, self._path(rel), data)
                except Exception:  # a full disk or a bucket that went away: serve on, uncached
                    self.failed += 1
                    continue
                with self._lock:
                    self.bytes += len(data) - self._index.pop(rel, 0)
                    self._index[rel] = len(data)
                self._evict()
            finally:
                self._queue.task_done()

    def _evict(self) -> None:
        """Delete least recently used entries until the total is under LOW_WATER x the bound."""
        victims = []
        with self._lock:
            if self.bytes <= self.max_bytes:
                return
            while self._index and self.bytes > self.max_bytes * LOW_WATER:
                rel, size = self._index.popitem(last=False)
                self.bytes -= size
                victims.append(self._path(rel))
        try:
            self.fs.rm(victims)
            self.evicted += len(victims)
        except FileNotFoundError:
            self.evicted += len(victims)
        except Exception:
            self.failed += 1


class CacheView:
    """The entries of one image inside a TileCache (``prefix/...``): what TileMaker stores lines in."""

    def __init__(self, cache: TileCache, prefix: str) -> None:
        self.cache, self.prefix = cache, prefix

    def get(self, rel: str) -> bytes | None:
        return self.cache.get(f"{self.prefix}/{rel}")

    def put(self, rel: str, data: bytes) -> None:
        self.cache.put(f"{self.prefix}/{rel}", data)
