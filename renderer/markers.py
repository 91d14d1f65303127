"""Tile completion markers: what a marker holds, its crc32, and how marker files are named.

A worker writes one marker per run of tiles [start, stop) of the plan, after
every chunk of the run (renderer.tiles), as ``b<start>_<stop>.json`` in the
store's marker folder (renderer.store owns where that is): ``{"start",
"stop", "tiles": [record, ...]}`` with one record per tile (``tile_marker``:
id, rows, cols, crc32, seconds, pid, host). Stores written before runs have
one ``<tile id>.json`` per tile holding its record alone; they still open.

The crc32 (``tile_crc``) covers the tile's uint8 (3, h, w) pixels in C order,
as the worker wrote them; renderer.verify reads the pixels back and compares.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .tasks import TileResult

_RUN_NAME = re.compile(r"b(\d+)_(\d+)")
WORKER_FIGURES = ("peak_rss_mb", "requests", "objects_written")  # in a TileResult, not in its marker


def tile_crc(data: np.ndarray) -> int:
    """The crc32 a marker holds: of the C-order bytes of the uint8 (3, h, w) tile (no copy when
    ``data`` is C-ordered uint8 already)."""
    return zlib.crc32(np.ascontiguousarray(data, dtype=np.uint8).data)


def tile_marker(result: TileResult) -> dict[str, Any]:
    """The record of one tile in its marker (JSON): the result without the worker's memory and storage figures."""
    d = asdict(result)
    for key in WORKER_FIGURES:
        d.pop(key)
    d["rows"], d["cols"] = list(result.rows), list(result.cols)
    return d


def run_name(start: int, stop: int) -> str:
    """The marker name (without .json) of the run of tiles [start, stop)."""
    return f"b{start}_{stop}"


def run_record(start: int, stop: int, records: list[dict]) -> dict[str, Any]:
    """The content of a run's marker."""
    return {"start": start, "stop": stop, "tiles": records}


def run_of(name: str) -> tuple[int, int] | None:
    """[start, stop) of a run marker's name; None for any other name (a per-tile marker of an older store)."""
    m = _RUN_NAME.fullmatch(name)
    return (int(m.group(1)), int(m.group(2))) if m is not None else None


def marker_records(name: str, content: Any) -> list[dict]:
    """The tile records in a marker file's content (``name`` says run or per-tile); [] when unusable."""
    if not isinstance(content, dict):
        return []
    if run_of(name) is None:
        return [content]
    return [r for r in content.get("tiles", []) if isinstance(r, dict)]


@dataclass(frozen=True)
class Marked:
    """One tile's record as read back: ``rows``/``cols``/``crc32`` are None where the record lacks a usable value."""

    id: str
    rows: tuple[int, int] | None
    cols: tuple[int, int] | None
    crc32: int | None

    @classmethod
    def of(cls, record: dict) -> Marked:
        crc = record.get("crc32")
        ok = isinstance(crc, int) and not isinstance(crc, bool)
        return cls(str(record.get("id")), _span(record, "rows"), _span(record, "cols"), crc if ok else None)

    @property
    def complete(self) -> bool:
        return self.rows is not None and self.cols is not None and self.crc32 is not None


def _span(record: dict, key: str) -> tuple[int, int] | None:
    value = record.get(key)
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and 0 <= value[0] < value[1]
    ):
        return int(value[0]), int(value[1])
    return None
