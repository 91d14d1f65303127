"""A self-contained viewer page beside the static exports (`render.py assemble --html`), and where
OpenSeadragon comes from.

``write_page`` puts ``index.html`` (renderer/static_page.html, filled in)
and ``openseadragon/`` (OpenSeadragon's script, button images and licence)
into the folder that holds the DeepZoom pyramid and/or the IIIF tree, so
that folder, or bucket, can be served by any static web server: the page
opens the exports by URLs relative to itself (the IIIF tree where the page
finds it, whatever id its info.json carries), so it works wherever the
folder is served. Both are staged and put in place whole (renderer.publish:
the assets first, then the page) and ``index.html`` gets a provenance
sidecar like every export.

OpenSeadragon is the copy vendored in the viewer's package data
(viewer/static/osd: the npm package the viewer pins, shipped in the wheel);
``OSD_DIR`` is the one place that says where it is, for this page and for
the viewer's server (viewer.server serves it at ``/osd/``).
"""

from __future__ import annotations

import html
import json
import os
import posixpath
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import RendererError
from .fsio import is_local, local_path
from .iiif import INFO
from .provenance import export_record
from .publish import check_replaceable, staged
from .store import ImageStore

# OpenSeadragon as vendored in the viewer's package data (viewer/static/osd, its README says from where);
# the viewer's server serves this folder at /osd/, the page ships a copy.
OSD_DIR = Path(__file__).resolve().parent.parent / "viewer" / "static" / "osd"
OSD_FILES = ("openseadragon.min.js", "images", "LICENSE.txt")  # the script, the button images, its licence
TEMPLATE = Path(__file__).with_name("static_page.html")
PAGE = "index.html"
ASSETS = "openseadragon"


@dataclass(frozen=True)
class PageSource:
    """One export the page can show: ``kind`` "iiif" or "dzi", ``url`` relative to the page."""

    kind: str
    label: str
    url: str


def check_assets() -> None:
    """One line, before any work, when the OpenSeadragon files the page needs are missing (a broken install)."""
    missing = [name for name in OSD_FILES if not (OSD_DIR / name).exists()]
    if missing:
        raise RendererError(f"OpenSeadragon is missing from {OSD_DIR} ({missing[0]}); reinstall creps-gigapixel")


def _parent(url: str) -> str:
    return os.path.dirname(os.path.abspath(local_path(url))) if is_local(url) else posixpath.dirname(url.rstrip("/"))


def _join(folder: str, name: str) -> str:
    return os.path.join(folder, name) if is_local(folder) else f"{folder.rstrip('/')}/{name}"


def page_folder(exports: list[str]) -> str | None:
    """The folder that holds every export in ``exports`` (DeepZoom base names, IIIF folders), where the page
    goes; None when they are not all in one folder."""
    folders = {_parent(url) for url in exports}
    return folders.pop() if len(folders) == 1 else None


def page_sources(iiif: str | None, dzi: str | None) -> list[PageSource]:
    """What the page shows, the IIIF tree first: relative URLs from the folder holding both."""
    out = []
    if iiif:
        name = posixpath.basename(iiif.rstrip("/"))
        out.append(PageSource("iiif", "IIIF", f"{name}/{INFO}"))
    if dzi:
        out.append(PageSource("dzi", "DeepZoom", posixpath.basename(dzi.removesuffix(".dzi")) + ".dzi"))
    return out


def page_html(title: str, sources: list[PageSource]) -> str:
    """``index.html``: the template with the title and the sources (as JSON a script block cannot end early)."""
    data = json.dumps([asdict(s) for s in sources]).replace("<", "\\u003c")
    text = TEMPLATE.read_text()
    return text.replace("__TITLE__", html.escape(title)).replace("__SOURCES__", data)


def check_page(iiif: str | None, dzi: str | None, storage_options: dict | None = None) -> str:
    """The folder the page goes to (the one holding the exports); RendererError, before any work, when
    OpenSeadragon is missing, the exports are not in one folder, or what is there was not written by us."""
    check_assets()
    folder = page_folder([url for url in (iiif, dzi) if url])
    if folder is None:
        raise RendererError(
            "the page goes beside the exports: put the DeepZoom pyramid and the IIIF tree in one folder"
        )
    check_replaceable(_join(folder, ASSETS), OSD_FILES[0], "an OpenSeadragon folder", storage_options)
    check_replaceable(_join(folder, PAGE), "", "a page written by assemble --html", storage_options)
    return folder


def write_page(store: ImageStore, iiif: str | None, dzi: str | None, storage_options: dict | None = None) -> str:
    """``index.html`` + ``openseadragon/`` beside the exports (staged, put in place whole, sidecar); its URL."""
    folder = check_page(iiif, dzi, storage_options)
    sources = page_sources(iiif, dzi)
    height, width = store.shape
    title = f"{posixpath.basename(store.url.rstrip('/'))} ({width} x {height} px)"
    page_url = _join(folder, PAGE)
    with staged(_join(folder, ASSETS), ("",), ("",), storage_options) as assets:
        os.makedirs(assets.stage)
        for name in OSD_FILES:
            src, dst = OSD_DIR / name, os.path.join(assets.stage, name)
            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                shutil.copy(src, dst)
        with staged(page_url, ("",), (), storage_options) as page:
            with open(page.stage, "w") as f:
                f.write(page_html(title, sources))
            assets.publish({})
            settings = {"sources": [asdict(s) for s in sources], "openseadragon": ASSETS}
            page.publish({"": export_record(store, "html", page_url, settings)})
    return page_url
