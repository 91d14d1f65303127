"""The IIIF routes of the viewer: ``/iiif/3/...`` in, status + body + headers out.

``IIIFService.answer`` is what ``viewer.server`` calls for every path under
``/iiif/``; the HTTP handler only sends what it returns. Routes (identifier
``image``, the one image this server shows):

  /iiif/3/image                  303 to its info.json (baseUriRedirect)
  /iiif/3/image/info.json        the image information (viewer.iiif.info_json)
  /iiif/3/image/{region}/{size}/{rotation}/{quality}.{format}
  /iiif/3/manifest.json          a Presentation 3.0 manifest: one canvas, the service as its body
  /iiif/3/<anything else>/...    404 (unknown identifier)

Every IIIF answer carries ``Access-Control-Allow-Origin: *`` (the spec's
CORS requirement: IIIF viewers on other sites read these URLs); images add
``Link`` headers with their canonical URI and the level-2 profile. JSON is
``application/ld+json`` with the context as profile when the client asks
for JSON-LD, else ``application/json``. A request is parsed and checked
completely (``viewer.iiif.parse_request``) before the source is asked for
pixels, so a refused one (400, 404, 501, or over ``maxArea``) costs no work;
the source then makes it under the same bounds as its tiles (a store's
``TileGate`` and LRU, the endless scheduler, memory LRU and cache).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from renderer.iiif import CONTEXT

from .iiif import (
    IMAGE_ID,
    MEDIA_TYPES,
    PRESENTATION_CONTEXT,
    PROFILE_URI,
    IIIFError,
    ImageRequest,
    Limits,
    describe,
    info_json,
    manifest_json,
    parse_request,
)

CORS = {"Access-Control-Allow-Origin": "*"}


class IIIFSource(Protocol):
    """What the IIIF service needs of a tile source (StoreTiles, DziFiles, EndlessTiles)."""

    width: int
    height: int

    def info(self) -> dict[str, Any]: ...

    def iiif(self, req: ImageRequest, client: str, alive: Callable[[], bool]) -> bytes | None: ...


@dataclass
class Answer:
    """One HTTP answer: status, body, content type, extra headers, Cache-Control."""

    status: int
    body: bytes
    ctype: str
    headers: dict[str, str] = field(default_factory=lambda: dict(CORS))
    cache: str = "no-cache"


def _error(e: IIIFError) -> Answer:
    return Answer(e.status, (str(e) + "\n").encode(), "text/plain; charset=utf-8")


class IIIFService:
    """The IIIF Image API 3.0 (level 2) and manifest of one tile source, within ``limits``."""

    def __init__(self, source: IIIFSource, limits: Limits) -> None:
        self.source, self.limits = source, limits

    def answer(
        self, parts: list[str], root: str, accept: str = "", client: str = "", alive: Callable[[], bool] = lambda: True
    ) -> Answer | None:
        """The answer to ``/iiif/<parts...>`` on a server reached at ``root`` (``http://host:port``);
        None when the client left before its image was made."""
        if parts[:1] != ["3"] or len(parts) < 2:
            return _error(IIIFError(404, "not found: the IIIF Image API is at /iiif/3/image/"))
        rest = parts[1:]
        if rest == ["manifest.json"]:
            return self._json(self.manifest(root), accept, PRESENTATION_CONTEXT)
        if rest[0] != IMAGE_ID:
            return _error(IIIFError(404, f"no image {rest[0]!r} here: the identifier is {IMAGE_ID!r}"))
        base = f"{root}/iiif/3/{IMAGE_ID}"
        if len(rest) == 1:
            return Answer(303, b"", "text/plain; charset=utf-8", {**CORS, "Location": f"{base}/info.json"})
        if rest[1:] == ["info.json"]:
            preferred = {"jpeg": "jpg", "jpg": "jpg", "png": "png"}.get(str(self.source.info().get("tile_format")))
            return self._json(info_json(base, self.source.width, self.source.height, self.limits, preferred), accept)
        if len(rest) != 5:
            return _error(IIIFError(400, "expected /iiif/3/image/{region}/{size}/{rotation}/{quality}.{format}"))
        try:
            region, size, rotation, quality_format = rest[1:]
            req = parse_request(
                region, size, rotation, quality_format, self.source.width, self.source.height, self.limits
            )
        except IIIFError as e:
            return _error(e)
        data = self.source.iiif(req, client, alive)
        if data is None:
            return None
        canonical = f"{base}/{req.canonical(self.source.width, self.source.height)}"
        link = f'<{canonical}>;rel="canonical",<{PROFILE_URI}>;rel="profile"'
        return Answer(200, data, MEDIA_TYPES[req.fmt], {**CORS, "Link": link})

    def manifest(self, root: str) -> dict[str, Any]:
        info = self.source.info()
        url = getattr(self.source, "url", None)
        if isinstance(url, str):
            name = os.path.basename(url.rstrip("/")) or url
        else:
            name = f"{os.path.basename(str(info.get('checkpoint')))} seed {info.get('seed')} (endless zoom)"
        label, metadata = describe(info, name)
        return manifest_json(root, self.source.width, self.source.height, label, metadata)

    @staticmethod
    def _json(doc: dict[str, Any], accept: str, context: str = CONTEXT) -> Answer:
        if "application/ld+json" in accept:
            ctype = f'application/ld+json;profile="{context}"'
        else:
            ctype = "application/json"
        return Answer(200, json.dumps(doc, indent=1).encode(), ctype)
