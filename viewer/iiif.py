"""IIIF Image API 3.0 (compliance level 2) and a Presentation 3.0 manifest: the protocol side.

`render.py view` serves one image, identifier ``image``, at
``/iiif/3/image/{region}/{size}/{rotation}/{quality}.{format}`` and
``/iiif/3/image/info.json``, and a one-canvas manifest at
``/iiif/3/manifest.json``. This module knows the grammar and the documents,
nothing of where pixels come from (``viewer.iiif_image`` makes the pixels,
each tile source runs that under its own bounds):

* ``parse_request`` turns the four path segments into a typed
  ``ImageRequest`` (region in full-resolution pixels, output size, mirror,
  rotation, quality, format) or raises ``IIIFError`` with the spec's status:
  400 for bad syntax or a request that cannot be met (a region outside the
  image, a size above 100 % without ``^``, a size above ``maxArea`` /
  ``maxWidth`` / ``maxHeight``), 501 for a valid but unsupported value (an
  arbitrary rotation angle, a format we do not write). Nothing is computed
  before it returns, so a refused request costs nothing.
* **Canonical numbers only.** A number in a URL is ASCII digits without
  leading zeros or a sign (``0``, ``17``; decimals ``0.5`` where the spec
  allows them). Anything else that reads as a number (``05``, ``+5``, a
  non-ASCII digit such as Arabic-Indic five) names no resource: 404, as for
  DeepZoom tile URLs; other garbage is a syntax error (400).
* ``ImageRequest.canonical`` is the canonical URI path (the ``Link:
  rel="canonical"`` header): region ``full`` or ``x,y,w,h``; size ``max``
  when it is the region's largest size without upscaling, else ``w,h`` (``^w,h``
  when upscaled); rotation with ``!`` when mirrored; quality ``default`` for
  colour.
* ``!w,h`` never upscales without ``^``: a box larger than the region on
  both sides is refused (400) like the other sizes above 100 %, which is how
  the IIIF validator reads the 3.0 rule "upscaling only with ^".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from PIL import features

from renderer.iiif import TILE, level_sizes
from renderer.iiif import info_json as build_info

from .errors import ViewerError

IMAGE_ID = "image"  # the one identifier this server has
PRESENTATION_CONTEXT = "http://iiif.io/api/presentation/3/context.json"
PROFILE_URI = "http://iiif.io/api/image/3/level2.json"
DEFAULT_MAX_AREA = 2**20  # 1024 x 1024 output pixels: seconds of CREPS on 2 cores, tens of MB of work
MAX_OUTPUT_SIDE = 16383  # WebP's limit (JPEG's is 65535): one limit whatever the format
QUALITIES = ("default", "color", "gray", "bitonal")
KNOWN_FORMATS = ("jpg", "png", "webp", "tif", "gif", "jp2", "pdf")  # the spec's list: others are 400, these 501
MEDIA_TYPES = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
EXTRA_FEATURES = ["canonicalLinkHeader", "mirroring", "profileLinkHeader", "sizeUpscaling"]

_INT = re.compile(r"0|[1-9][0-9]*")
_DEC = re.compile(r"(0|[1-9][0-9]*)(\.[0-9]+)?")


class IIIFError(ViewerError):
    """A refused IIIF request: ``status`` is the HTTP code the spec asks for (400, 404 or 501)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def formats() -> tuple[str, ...]:
    """Output formats served: jpg, png, and webp when Pillow has the codec."""
    return ("jpg", "png", "webp") if features.check("webp") else ("jpg", "png")


@dataclass(frozen=True)
class Limits:
    """The largest output a request may ask for (``maxArea`` / ``maxWidth`` / ``maxHeight`` of info.json)."""

    max_area: int = DEFAULT_MAX_AREA
    max_width: int = MAX_OUTPUT_SIDE
    max_height: int = MAX_OUTPUT_SIDE

    def __post_init__(self) -> None:
        if self.max_area < 1:
            raise ViewerError(f"--max-area must be at least 1 pixel, got {self.max_area}")

    def fit(self, w: int, h: int, upscale: bool) -> tuple[int, int]:
        """The largest size of aspect w:h within the limits (and within w x h unless ``upscale``)."""
        s = min(Fraction(self.max_width, w), Fraction(self.max_height, h))
        s = min(s, Fraction(math.isqrt(self.max_area * w * h), w * h))  # sqrt(max_area / (w h)), rounded down
        if not upscale:
            s = min(s, Fraction(1))
        ow, oh = max(1, math.floor(w * s)), max(1, math.floor(h * s))
        # A one-pixel side rounded up from below 1 can break the area on an extreme aspect: trim the other.
        if ow * oh > self.max_area:
            ow, oh = (max(1, self.max_area // oh), oh) if ow >= oh else (ow, max(1, self.max_area // ow))
        return ow, oh

    def check(self, w: int, h: int) -> None:
        if w > self.max_width or h > self.max_height or w * h > self.max_area:
            raise IIIFError(
                400,
                f"size {w}x{h} is beyond this server's limits (maxWidth {self.max_width}, "
                f"maxHeight {self.max_height}, maxArea {self.max_area}); ask for a smaller one",
            )


@dataclass(frozen=True)
class ImageRequest:
    """One IIIF image request, checked: what to cut, how large, and how to deliver it.

    ``x, y, w, h`` is the region in full-resolution pixels (inside the image),
    ``width x height`` the output size before rotation; ``rotation`` is 0, 90,
    180 or 270 degrees clockwise after an optional mirror. Hashable: the
    viewer's caches and scheduler key on it.
    """

    x: int
    y: int
    w: int
    h: int
    width: int
    height: int
    mirror: bool
    rotation: int
    quality: str  # color | gray | bitonal
    fmt: str  # jpg | png | webp
    is_max: bool = False  # the size is the region's largest without upscaling (canonical "max")

    @property
    def upscaled(self) -> bool:
        """True when some side is larger than the region's (only with ``^``)."""
        return self.width > self.w or self.height > self.h

    def canonical(self, image_width: int, image_height: int) -> str:
        """The canonical ``{region}/{size}/{rotation}/{quality}.{format}``."""
        full = (self.x, self.y, self.w, self.h) == (0, 0, image_width, image_height)
        region = "full" if full else f"{self.x},{self.y},{self.w},{self.h}"
        size = "max" if self.is_max else f"{'^' if self.upscaled else ''}{self.width},{self.height}"
        quality = "default" if self.quality == "color" else self.quality
        return f"{region}/{size}/{'!' if self.mirror else ''}{self.rotation}/{quality}.{self.fmt}"


# ---------------------------------------------------------------- numbers
def _number(text: str, pattern: re.Pattern[str], what: str) -> Fraction:
    """``text`` as an exact number if it matches ``pattern``; IIIFError 404 if it is a number in
    another spelling (leading zero, sign, non-ASCII digit), 400 if it is not a number at all."""
    if pattern.fullmatch(text):
        return Fraction(text)
    if text and any(c.isdigit() for c in text) and all(c.isdigit() or c in "+-." for c in text):
        raise IIIFError(404, f"{what} {text!r} is not a canonical number (ASCII digits, no leading zero, no sign)")
    raise IIIFError(400, f"{what} {text!r} is not a number")


def _numbers(text: str, n: int, what: str, pattern: re.Pattern[str] = _INT) -> list[Fraction]:
    parts = text.split(",")
    if len(parts) != n:
        raise IIIFError(400, f"{what} {text!r}: expected {n} comma-separated numbers")
    return [_number(p, pattern, what) for p in parts]


# ---------------------------------------------------------------- parameters
def parse_region(text: str, width: int, height: int) -> tuple[int, int, int, int]:
    """(x, y, w, h) in image pixels, clipped to the image; 400 if empty or outside it."""
    if text == "full":
        return 0, 0, width, height
    if text == "square":
        s = min(width, height)
        return (width - s) // 2, (height - s) // 2, s, s
    if text.startswith("pct:"):
        px, py, pw, ph = _numbers(text[4:], 4, "region", _DEC)
        if max(px, py, pw, ph) > 100:
            raise IIIFError(400, f"region {text!r}: percentages are 0..100")
        x, y = math.floor(px * width / 100), math.floor(py * height / 100)
        w, h = _round(pw * width / 100), _round(ph * height / 100)
    else:
        x, y, w, h = (int(v) for v in _numbers(text, 4, "region"))
    if w == 0 or h == 0:
        raise IIIFError(400, f"region {text!r} is empty")
    if x >= width or y >= height:
        raise IIIFError(400, f"region {text!r} lies outside the {width}x{height} image")
    return x, y, min(w, width - x), min(h, height - y)


def _round(v: Fraction) -> int:
    """Half up (sizes and percentages: the same rule everywhere)."""
    return math.floor(v + Fraction(1, 2))


def parse_size(text: str, rw: int, rh: int, limits: Limits) -> tuple[int, int, bool]:
    """(width, height, is_max) of the output for a region of rw x rh; 400 when it cannot be met."""
    upscale = text.startswith("^")
    body = text[1:] if upscale else text
    if body == "max":
        w, h = limits.fit(rw, rh, upscale)
        return w, h, not upscale or (w, h) == limits.fit(rw, rh, False)
    w, h = _size_numbers(body, rw, rh)
    if w < 1 or h < 1:
        raise IIIFError(400, f"size {text!r} gives an empty image ({w}x{h})")
    if not upscale and (w > rw or h > rh):
        raise IIIFError(400, f"size {text!r} is larger than the {rw}x{rh} region: upscaling needs the ^ prefix")
    limits.check(w, h)
    return w, h, not upscale and (w, h) == limits.fit(rw, rh, False)


def _size_numbers(body: str, rw: int, rh: int) -> tuple[int, int]:
    """w, h of the numeric size forms (``w,`` ``,h`` ``w,h`` ``!w,h`` ``pct:n``)."""
    if body.startswith("pct:"):
        n = _number(body[4:], _DEC, "size")
        return _round(rw * n / 100), _round(rh * n / 100)
    confined = body.startswith("!")
    parts = (body[1:] if confined else body).split(",")
    if len(parts) != 2 or parts == ["", ""] or (confined and "" in parts):
        raise IIIFError(400, f"size {body!r}: expected max, w, ,h, w,h, !w,h or pct:n (each may start with ^)")
    if parts[0] == "":
        h = _number(parts[1], _INT, "size")
        return _round(rw * h / rh), int(h)
    w = _number(parts[0], _INT, "size")
    if parts[1] == "":
        return int(w), _round(rh * w / rw)
    h = _number(parts[1], _INT, "size")
    if not confined:
        return int(w), int(h)
    s = min(w / rw, h / rh)
    return min(int(w), _round(rw * s)), min(int(h), _round(rh * s))


def parse_rotation(text: str) -> tuple[bool, int]:
    """(mirror, degrees) for 0/90/180/270 (360 is 0); 501 for other angles of 0..360, 400 otherwise."""
    mirror = text.startswith("!")
    deg = _number(text[1:] if mirror else text, _DEC, "rotation")
    if deg > 360:
        raise IIIFError(400, f"rotation {text!r}: degrees are 0..360")
    if deg % 90:
        raise IIIFError(501, f"rotation {text!r}: only multiples of 90 degrees are supported")
    return mirror, int(deg) % 360


def parse_quality_format(text: str) -> tuple[str, str]:
    """(quality, format); ``default`` is colour. 400 for unknown names, 501 for spec formats we do not write."""
    quality, dot, fmt = text.rpartition(".")
    if not dot or quality not in QUALITIES:
        raise IIIFError(400, f"{text!r}: expected {{default|color|gray|bitonal}}.{{format}}")
    if fmt not in formats():
        status = 501 if fmt in KNOWN_FORMATS else 400
        raise IIIFError(status, f"format {fmt!r} is not served here (use {', '.join(formats())})")
    return ("color" if quality == "default" else quality), fmt


def parse_request(
    region: str, size: str, rotation: str, quality_format: str, width: int, height: int, limits: Limits
) -> ImageRequest:
    """The checked request for an image of ``width x height`` (IIIFError with the status to answer)."""
    x, y, w, h = parse_region(region, width, height)
    ow, oh, is_max = parse_size(size, w, h, limits)
    mirror, deg = parse_rotation(rotation)
    quality, fmt = parse_quality_format(quality_format)
    return ImageRequest(x, y, w, h, ow, oh, mirror, deg, quality, fmt, is_max)


# ---------------------------------------------------------------- documents
def info_json(base: str, width: int, height: int, limits: Limits, preferred: str | None = None) -> dict[str, Any]:
    """The level-2 image information of the service at ``base`` (…/iiif/3/image): renderer.iiif.info_json
    (the one builder, shared with the static tree) with this server's limits, qualities, formats and features."""
    sizes = [
        (w, h)
        for w, h in level_sizes(width, height)  # smallest first: 1 px, ..., full size
        if w * h <= limits.max_area and w <= limits.max_width and h <= limits.max_height
    ]
    return build_info(
        base,
        width,
        height,
        profile="level2",
        sizes=sizes,
        tile=TILE,
        limits={"maxArea": limits.max_area, "maxWidth": limits.max_width, "maxHeight": limits.max_height},
        extras={
            "extraQualities": ["color", "gray", "bitonal"],
            "extraFormats": [f for f in formats() if f not in ("jpg", "png")],
            "extraFeatures": EXTRA_FEATURES,
        },
        preferred=preferred if preferred in formats() else None,
    )


def manifest_json(
    root: str, width: int, height: int, label: str, metadata: list[tuple[str, str]], fmt: str = "jpg"
) -> dict[str, Any]:
    """A Presentation 3.0 manifest of one canvas whose painting annotation is the image service.

    ``root`` is the server's origin (``http://host:port``); label and metadata
    come from the job record (see ``describe``).
    """
    service = f"{root}/iiif/3/{IMAGE_ID}"
    canvas = f"{root}/iiif/3/canvas/1"

    def text(value: str, lang: str = "none") -> dict[str, list[str]]:
        return {lang: [value]}

    return {
        "@context": PRESENTATION_CONTEXT,
        "id": f"{root}/iiif/3/manifest.json",
        "type": "Manifest",
        "label": text(label),
        "metadata": [{"label": text(k, "en"), "value": text(v)} for k, v in metadata],
        "items": [
            {
                "id": canvas,
                "type": "Canvas",
                "width": width,
                "height": height,
                "items": [
                    {
                        "id": f"{canvas}/page",
                        "type": "AnnotationPage",
                        "items": [
                            {
                                "id": f"{canvas}/page/image",
                                "type": "Annotation",
                                "motivation": "painting",
                                "target": canvas,
                                "body": {
                                    "id": f"{service}/full/max/0/default.{fmt}",
                                    "type": "Image",
                                    "format": MEDIA_TYPES[fmt],
                                    "width": width,
                                    "height": height,
                                    "service": [{"id": service, "type": "ImageService3", "profile": "level2"}],
                                },
                            }
                        ],
                    }
                ],
            }
        ],
    }


def describe(info: dict[str, Any], name: str) -> tuple[str, list[tuple[str, str]]]:
    """(label, metadata pairs) of a manifest from a tile source's ``info()`` (its job record)."""
    pairs: list[tuple[str, str]] = [("size", f"{info['width']} x {info['height']} px")]
    for key, title in (
        ("checkpoint", "checkpoint"),
        ("checkpoint_sha256", "checkpoint sha256"),
        ("seed", "seed"),
        ("psi", "psi"),
        ("view", "view"),
        ("status", "status"),
    ):
        value = info.get(key)
        if value is not None:
            pairs.append((title, ",".join(map(str, value)) if isinstance(value, list) else str(value)))
    pairs.append(("mode", str(info.get("mode"))))
    return name, pairs
