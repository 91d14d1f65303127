"""IIIF Image API 3.0: the image information document and the tile geometry, for the live server and the static tree.

One builder of ``info.json`` (``info_json``) serves both image services of
this project: the live level-2 service of `render.py view` (viewer.iiif
adds its limits, qualities and formats) and the level-0 static tree that
`render.py assemble --iiif` writes (renderer.iiif_tree). The renderer has
the builder because the viewer may import the renderer, not the other way.

Tile geometry (``tile_request``): the region and size of tile (c, r) at scale
factor 2^k are those of the spec's tile algorithm (Image API 3.0
implementation notes, section 3): region ``x,y,w,h`` in full-resolution
pixels, size ``ceil(w / 2^k),ceil(h / 2^k)``; ``full`` when the tile is the
whole image and ``max`` when its size is the full size. These are the URLs
OpenSeadragon's IIIF tile source asks for (and so Mirador, which draws with
it); its levels are ceil(W / 2^k) wide, exactly our pyramid levels
(renderer.pyramid halves with ceil division), so tile (c, r) at scale factor
2^k is the pixels [r*T, (r+1)*T) x [c*T, (c+1)*T) of zarr level k. (At
scale factor 1 the spec's canonical size would be ``max``; clients that
build tile URLs with the algorithm ask for ``w,h``, so that is what a static
tree holds.)
"""

from __future__ import annotations

from typing import Any

CONTEXT = "http://iiif.io/api/image/3/context.json"
PROTOCOL = "http://iiif.io/api/image"
TILE = 512  # tile side (output pixels) at every scale factor, live and static by default
INFO = "info.json"  # the image information document, at {id}/info.json
ROTATION_QUALITY = "0/default"  # what a level-0 client asks for: no rotation, the default quality


def level_size(width: int, height: int, k: int) -> tuple[int, int]:
    """(w, h) of the image at scale factor 2^k: ceil(W / 2^k) x ceil(H / 2^k), our pyramid level k."""
    return -(-width // 2**k), -(-height // 2**k)


def scale_factors(width: int, height: int, tile: int = TILE) -> list[int]:
    """1, 2, 4, ... up to the first factor at which the whole image fits in one tile."""
    out = [1]
    while max(level_size(width, height, len(out) - 1)) > tile:
        out.append(out[-1] * 2)
    return out


def level_sizes(width: int, height: int) -> list[tuple[int, int]]:
    """(w, h) of every pyramid level from the smallest (1 px on the longer side) to the full size, no repeats."""
    out: list[tuple[int, int]] = []
    for k in range(max(width - 1, height - 1).bit_length(), -1, -1):
        size = level_size(width, height, k)
        if not out or out[-1] != size:
            out.append(size)
    return out


def info_json(
    base: str,
    width: int,
    height: int,
    *,
    profile: str,
    sizes: list[tuple[int, int]],
    tile: int = TILE,
    limits: dict[str, int] | None = None,
    extras: dict[str, list[str]] | None = None,
    preferred: str | None = None,
) -> dict[str, Any]:
    """The image information document of the image service whose base URI (``id``) is ``base``.

    ``profile``: ``level0`` (the static tree) or ``level2`` (the live server);
    ``sizes``: the full-image sizes a client may ask for (smallest first);
    ``limits``: ``maxArea`` / ``maxWidth`` / ``maxHeight`` (each omitted when
    absent); ``extras``: ``extraQualities`` / ``extraFormats`` /
    ``extraFeatures`` (likewise); ``preferred``: the one preferred format.
    """
    info: dict[str, Any] = {
        "@context": CONTEXT,
        "id": base,
        "type": "ImageService3",
        "protocol": PROTOCOL,
        "profile": profile,
        "width": width,
        "height": height,
    }
    for key in ("maxArea", "maxWidth", "maxHeight"):
        if limits and key in limits:
            info[key] = limits[key]
    info["sizes"] = [{"width": w, "height": h} for w, h in sizes]
    info["tiles"] = [{"width": tile, "height": tile, "scaleFactors": scale_factors(width, height, tile)}]
    for key in ("extraQualities", "extraFormats", "extraFeatures"):
        if extras and key in extras:
            info[key] = extras[key]
    if preferred is not None:
        info["preferredFormats"] = [preferred]
    return info


# ---------------------------------------------------------------- request paths of a level-0 tree
def region_text(x: int, y: int, w: int, h: int, width: int, height: int) -> str:
    """``full`` for the whole image, else ``x,y,w,h``."""
    return "full" if (x, y, w, h) == (0, 0, width, height) else f"{x},{y},{w},{h}"


def size_text(w: int, h: int, width: int, height: int) -> str:
    """``max`` for the full size, else ``w,h``."""
    return "max" if (w, h) == (width, height) else f"{w},{h}"


def tile_request(width: int, height: int, k: int, col: int, row: int, tile: int = TILE) -> str:
    """``{region}/{size}/0/default.jpg`` of tile (col, row) at scale factor 2^k (the spec's tile algorithm)."""
    s = 2**k
    x, y = col * tile * s, row * tile * s
    rw, rh = min(tile * s, width - x), min(tile * s, height - y)
    sw, sh = -(-rw // s), -(-rh // s)
    return f"{region_text(x, y, rw, rh, width, height)}/{size_text(sw, sh, width, height)}/{ROTATION_QUALITY}.jpg"


def size_request(w: int, h: int) -> str:
    """``full/{w},{h}/0/default.jpg``: a listed size, in the form the spec says to request it."""
    return f"full/{w},{h}/{ROTATION_QUALITY}.jpg"


MAX_REQUEST = f"full/max/{ROTATION_QUALITY}.jpg"  # the whole image at the largest size served
