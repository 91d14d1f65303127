"""An exported DeepZoom pyramid as a tile source of the viewer: its files as they are, and IIIF from them.

``render.py view out/img.dzi`` serves NAME.dzi and NAME_files/ unchanged
(OpenSeadragon reads them directly). Whether the export still matches the
store it was made from (its ``NAME.dzi.source.json``:
renderer.provenance.export_state) is in ``info()`` as ``export`` and shown
on the page; a stale export is still served, as it is. For the IIIF service the same files are
the pixels: a window of DeepZoom level L is cut from the tiles it covers
(each tile's core, its overlap dropped), under a ``TileGate`` like a
store's tiles, and ``viewer.iiif_image`` resamples where needed.
"""

from __future__ import annotations

import io
import os
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from creps.errors import first_line
from renderer.dzi import level_size, max_level, span
from renderer.errors import RendererError
from renderer.fsio import filesystem, is_local
from renderer.provenance import ExportState, export_state

from .errors import ViewerError
from .iiif import ImageRequest
from .iiif_image import finish, window_pixels
from .tiles import TileGate, TileReadError

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


def safe_file(root: Path, parts: list[str]) -> Path | None:
    """root/parts if it is a regular file whose real path stays inside root's real path."""
    if not parts:
        return None
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, *parts))
    if os.path.commonpath([real_root, real]) != real_root or not os.path.isfile(real):
        return None
    return Path(real)


class DziFiles:
    """An exported DeepZoom pyramid (NAME.dzi + NAME_files/) on any fsspec URL.

    Serves exactly those two entries of the DZI's folder, nothing else there.
    """

    def __init__(self, url: str, storage_options: dict | None = None, quality: int = 90) -> None:
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
            self.tile_size, self.overlap = int(node.get("TileSize", "254")), int(node.get("Overlap", "1"))
        except (ET.ParseError, StopIteration, ValueError) as e:
            raise ViewerError(f"{url!r} is not a DeepZoom .dzi file: {e}") from None
        self.url = url
        self.storage_options = storage_options
        self.quality = quality  # of the IIIF images made (JPEG / WebP)
        self.gate = TileGate()
        self._export: tuple[float, ExportState] | None = None

    EXPORT_TTL_S = 10.0  # how long the state of the export is reused before its sidecar and store are read again

    def export(self) -> ExportState:
        """Whether this DZI still matches the store it was made from (renderer.provenance), a few seconds old."""
        now = time.monotonic()
        if self._export is None or now - self._export[0] > self.EXPORT_TTL_S:
            self._export = (now, export_state(self.url, self.storage_options))
        return self._export[1]

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
            "export": self.export().to_dict(),
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

    # ------------------------------------------------------------ IIIF
    def iiif(self, req: ImageRequest, client: str = "", alive: Callable[[], bool] = lambda: True) -> bytes:
        """Encoded IIIF image of a checked request, cut from the tiles (at most ``gate.workers`` at once);
        ``client`` and ``alive`` are unused (as for a store)."""
        with self.gate.slot():
            return finish(window_pixels(self.window, req, self.width, self.height), req, self.quality)

    def window(self, k: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """(3, y1-y0, x1-x0) uint8 of DeepZoom level ``max_level - k`` over a window of its pixels."""
        level = max_level(self.width, self.height) - k
        lw, lh = level_size(self.width, self.height, level)
        ts, o = self.tile_size, self.overlap
        out = np.zeros((3, y1 - y0, x1 - x0), np.uint8)
        for row in range(y0 // ts, (y1 - 1) // ts + 1):
            ty0 = span(row, lh, ts, o)[0]
            cy0, cy1 = max(y0, row * ts), min(y1, (row + 1) * ts)
            for col in range(x0 // ts, (x1 - 1) // ts + 1):
                tx0 = span(col, lw, ts, o)[0]
                cx0, cx1 = max(x0, col * ts), min(x1, (col + 1) * ts)
                img = self._tile(level, col, row)
                out[:, cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = img[:, cy0 - ty0 : cy1 - ty0, cx0 - tx0 : cx1 - tx0]
        return out

    def _tile(self, level: int, col: int, row: int) -> np.ndarray:
        name = f"{level}/{col}_{row}.{self.format}"
        got = self.read([f"{self.stem}_files", str(level), f"{col}_{row}.{self.format}"])
        if got is None:
            raise TileReadError(f"DeepZoom tile {name} of {self.url} is missing")
        try:
            with Image.open(io.BytesIO(got[0])) as im:
                return np.asarray(im.convert("RGB")).transpose(2, 0, 1)
        except Exception as e:
            raise TileReadError(f"DeepZoom tile {name} of {self.url} does not decode: {first_line(e)}") from e
