"""What the driver sends to a worker and what comes back: small frozen records.

Tasks are typed (a worker dispatches on the type, never on a method name) and
cheap to ship to Ray: pixels never travel, they go from the worker straight
into the store and only these records return.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Tile:
    """Rows [r0, r1) x columns [c0, c1) of level 0; ``id`` names its marker."""

    id: str
    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def pixels(self) -> int:
        return (self.r1 - self.r0) * (self.c1 - self.c0)

    def as_tuple(self) -> tuple[str, int, int, int, int]:
        return (self.id, self.r0, self.r1, self.c0, self.c1)


@dataclass(frozen=True)
class LineTask:
    """Compute and store the line features of positions [start, stop) of ``which`` (row | col)."""

    which: str
    start: int
    stop: int

    @property
    def key(self) -> str:
        return f"lines {self.which} {self.start}:{self.stop}"


@dataclass(frozen=True)
class TileTask:
    """Render these tiles, one after another, each written and then marked."""

    tiles: tuple[Tile, ...]

    @property
    def key(self) -> str:
        return self.tiles[0].id


Task = LineTask | TileTask


@dataclass(frozen=True)
class LineResult:
    which: str
    start: int
    stop: int
    seconds: float
    peak_rss_mb: float


@dataclass(frozen=True)
class TileResult:
    """One rendered tile; also the content of its completion marker."""

    id: str
    rows: tuple[int, int]
    cols: tuple[int, int]
    crc32: int
    seconds: float
    pid: int
    host: str
    peak_rss_mb: float = 0.0

    @property
    def pixels(self) -> int:
        return (self.rows[1] - self.rows[0]) * (self.cols[1] - self.cols[0])

    def marker(self) -> dict[str, Any]:
        """The marker record (JSON): everything but the worker's memory figure."""
        d = asdict(self)
        d.pop("peak_rss_mb")
        d["rows"], d["cols"] = list(self.rows), list(self.cols)
        return d


Result = LineResult | list[TileResult]
