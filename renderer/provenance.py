"""Provenance: what an export was built from, and which software made a store or an export.

Next to each export a sidecar ``<export>.source.json`` (``out.tif.source.json``,
``out.dzi.source.json``, ``out.szi.source.json``; written by
renderer.publish when the export is put in place) says what it was built
from: the store URL, the job identity and checkpoint sha256
(``store.meta``), ``tiles_done`` / ``tiles_total`` / ``partial``, the
pyramid levels, the export settings, the time and the software version. A
DeepZoom made from a TIFF names the TIFF and carries the TIFF's own record.

Staleness, by generation: the store counts the changes to its pixels
(``ImageStore.generation``: a count and a random id, advanced by every render
run that writes tiles and by every ``render.py verify`` repair) and a sidecar
records the generation the export was read from. ``export_state`` reads a
sidecar back and compares: another generation (or another job) means the
store changed after the export was made, so the export reads *stale* until the
next assemble writes it again. A repair counts too, although it restores the
bytes the export was made from: the damage it repaired may already have been
in the store when the export was read. Sidecars and stores from before
generations read as generation 0.

The store also lists the exports assemble put in place (``record_exports``,
meta ``exports``: URL -> kind and generation), so ``render.py verify`` finds
their sidecars without being told.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from creps.errors import first_line

from .errors import RendererError
from .fsio import filesystem, is_local, local_path, read_json
from .publish import SIDECAR
from .pyramid import RULE, pyramid_plan, source_state
from .store import ImageStore, open_store

EXPORTS = "exports"  # store meta: {url: {"kind", "generation", "time"}} of the exports assemble put in place


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
            generation=store.generation,
        )
    record.update(created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), software=software_version())
    return record


def dzi_records(record: dict, base: str, szi: bool) -> dict[str, dict]:
    """The sidecars of a DeepZoom export by part: the .dzi's ``record``, and the .szi's (same source)."""
    records = {".dzi": record}
    if szi:
        records[".szi"] = {**record, "export": "szi", "url": base + ".szi"}
    return records


def read_sidecar(path: str, storage_options: dict | None = None) -> dict | None:
    """The provenance record next to an export (a path or any fsspec URL), if any."""
    try:
        fs, root = filesystem(path, storage_options)
        record = read_json(fs, root + SIDECAR)
    except (OSError, RendererError):
        return None
    return record if isinstance(record, dict) else None


def export_key(url: str) -> str:
    """How the store names an export: an absolute path when local (verify may run elsewhere), else the URL."""
    return os.path.abspath(local_path(url)) if is_local(url) else url


def record_exports(store: ImageStore, exports: dict[str, str]) -> None:
    """Add ``exports`` (URL -> kind: tiff, dzi, szi, ...) just put in place to the store's meta (one atomic
    write of the group's attributes), with the generation they were read from."""
    recorded = dict(store.meta.get(EXPORTS) or {})
    n, now = store.generation["n"], time.time()
    for url, kind in exports.items():
        recorded[export_key(url)] = {"kind": kind, "generation": n, "time": now}
    store.update_meta(**{EXPORTS: recorded})


def recorded_exports(store: ImageStore) -> dict[str, str]:
    """URL -> kind of the exports assemble recorded in the store's meta."""
    recorded = store.meta.get(EXPORTS)
    if not isinstance(recorded, dict):
        return {}
    return {str(url): str(v.get("kind", "")) if isinstance(v, dict) else "" for url, v in recorded.items()}


@dataclass(frozen=True)
class ExportState:
    """Whether an export still matches its store: ``state`` is ``current``, ``stale`` (the store changed
    after it was made), ``damaged`` (its size is not its sidecar's), ``missing`` or ``unknown``
    (no sidecar, or its store cannot be read); ``reason`` says why, ``record`` is its sidecar."""

    url: str
    state: str
    reason: str = ""
    record: dict | None = None

    @property
    def current(self) -> bool:
        return self.state == "current"

    @property
    def kind(self) -> str:
        return str((self.record or {}).get("export") or "")

    def describe(self) -> str:
        return f"export {self.url}: {self.state}" + (f": {self.reason}" if self.reason else "")

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "state": self.state, "reason": self.reason}


def _generation(record: dict) -> dict:
    g = record.get("generation")
    if not isinstance(g, dict) or not isinstance(g.get("n"), int):
        return {"n": 0, "id": None}  # written before generations
    return {"n": g["n"], "id": g.get("id")}


def export_state(url: str, storage_options: dict | None = None, store: ImageStore | None = None) -> ExportState:
    """Read the sidecar of the export at ``url`` and compare it with ``store`` (default: the store it names)."""
    try:
        fs, path = filesystem(url, storage_options)
        there = fs.exists(path)
        record = read_json(fs, path + SIDECAR)
    except (OSError, RendererError) as e:
        return ExportState(url, "unknown", f"cannot read it: {first_line(e)}")
    if not there:
        return ExportState(url, "missing", "the export is not there", record if isinstance(record, dict) else None)
    if not isinstance(record, dict):
        return ExportState(url, "unknown", f"no sidecar {url}{SIDECAR}: what it was built from is not known")
    try:
        if store is None:
            if not isinstance(record.get("store"), str):
                return ExportState(url, "unknown", "its sidecar names no store", record)
            store = open_store(record["store"], storage_options, mode="r")
        return _compare(url, fs, path, record, store)
    except (OSError, RendererError) as e:
        return ExportState(url, "unknown", f"its store cannot be read: {first_line(e)}", record)


def _compare(url: str, fs: Any, path: str, record: dict, store: ImageStore) -> ExportState:
    meta = store.meta
    if record.get("identity") != meta.get("identity"):
        return ExportState(url, "stale", f"built from another job than the one in {store.url}", record)
    was, now = _generation(record), store.generation
    if was != now:
        g = meta.get("generation")
        why = g.get("reason") if isinstance(g, dict) and g.get("reason") else "changed"
        return ExportState(
            url, "stale", f"{store.url} changed after it was built (generation {was['n']} -> {now['n']}: {why})", record
        )
    size = record.get("bytes")
    if isinstance(size, int):
        got = fs.size(path)
        if got != size:
            return ExportState(url, "damaged", f"{got} bytes, its sidecar says {size}", record)
    return ExportState(url, "current", "", record)
