"""Provenance: what an export was built from, and which software made a store or an export.

Next to each export a sidecar ``<export>.source.json`` (``out.tif.source.json``,
``out.dzi.source.json``, ``out.szi.source.json``; written by
renderer.publish when the export is put in place) says what it was built
from: the store URL, the job identity and checkpoint sha256
(``store.meta``), ``tiles_done`` / ``tiles_total`` / ``partial``, the
pyramid levels, the export settings, the time and the software version. A
DeepZoom made from a TIFF names the TIFF and carries the TIFF's own record.
"""

from __future__ import annotations

import json
import time
from importlib import metadata
from typing import Any

from .publish import SIDECAR
from .pyramid import RULE, pyramid_plan, source_state
from .store import ImageStore


def software_version() -> str:
    """``creps-gigapixel <version>`` of the installed package (``(source)`` when run from a checkout)."""
    try:
        return f"creps-gigapixel {metadata.version('creps-gigapixel')}"
    except metadata.PackageNotFoundError:
        return "creps-gigapixel (source)"


def export_record(
    store: ImageStore | None,
    kind: str,
    url: str,
    settings: dict,
    source: dict | None = None,
) -> dict:
    """The sidecar record of an export: what it was built from, how, when and by what.

    ``source`` is the store's level-0 state the export was read from (default:
    the one its pyramid was built from, else the store's now).
    """
    record: dict[str, Any] = {"export": kind, "url": url, "settings": settings}
    if store is not None:
        meta = store.meta
        prog = store.pyramid_progress() or {}
        built = prog.get("source") if isinstance(prog.get("source"), dict) else None
        src = source or built or source_state(store)
        record.update(
            store=store.url,
            identity=meta.get("identity"),
            checkpoint=meta.get("checkpoint"),
            checkpoint_sha256=meta.get("checkpoint_sha256"),
            render_version=meta.get("version"),
            tiles_done=src.get("tiles_done"),
            tiles_total=src.get("tiles_total"),
            partial=bool(src.get("partial")),
            pyramid={
                "levels": len(pyramid_plan(store)),
                "rule": RULE,
                "stale": bool(prog.get("stale")),
            },
        )
    record.update(created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), software=software_version())
    return record


def dzi_records(record: dict, base: str, szi: bool) -> dict[str, dict]:
    """The sidecars of a DeepZoom export by part: the .dzi's ``record``, and the .szi's (same source)."""
    records = {".dzi": record}
    if szi:
        records[".szi"] = {**record, "export": "szi", "url": base + ".szi"}
    return records


def read_sidecar(path: str) -> dict | None:
    """The provenance record next to a local export, if any."""
    try:
        with open(path + SIDECAR) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
