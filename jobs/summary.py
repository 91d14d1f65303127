"""What one run of a job did: the frozen ``RunSummary`` and the ``Tally`` it is made from.

The stages count into a ``Tally`` while they run (tiles, pixels, the
workers' storage calls, their peak memory); the driver turns it into the
summary that is printed as JSON and kept in the store's ``runs``.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What one run of a job did (printed as JSON, kept in the store's ``runs``)."""

    out: str
    height: int
    width: int
    tiles_total: int
    tiles_skipped: int
    tiles_rendered: int = 0
    line_ranges_computed: int = 0
    # wall-clock seconds: the line stage, from its start until its last range was stored; the tile
    # stage, from its first tile task handed out until its last tile came back.  The two overlap
    # when tiles start before the line stage ends (jobs.stages.LineStage); first_tile_seconds counts
    # from the start of the run (as `seconds` does) until the first tile task came back
    line_seconds: float = 0.0
    render_seconds: float = 0.0
    first_tile_seconds: float = 0.0
    workers: int = 0
    workers_replaced: int = 0
    tasks_retried: int = 0
    pixels: int = 0
    seconds: float = 0.0
    mpx_s: float = 0.0
    tiles_left: int = 0
    status: str = "running"  # running | done | partial
    driver_peak_rss_mb: float = 0.0
    worker_peak_rss_mb: float = 0.0
    # what the run cost an object store: storage calls (requests) and objects written, by the
    # driver and every worker (renderer.fsio.io_counts; 0 for local disks, which are not counted)
    requests: int = 0
    objects_written: int = 0
    # the cluster: the nodes whose workers rendered for this run, the nodes that died under a
    # worker during it, and the tiles of the tasks sent again because a worker failed or was lost
    nodes: tuple[str, ...] = ()
    nodes_lost: tuple[str, ...] = ()
    tiles_retried: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __getitem__(self, key: str) -> Any:
        """Mapping-style reads (``summary["status"]``), as scripts written for the JSON line use."""
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)


class Tally:
    """Counters of a run in progress (the frozen RunSummary is made from them)."""

    def __init__(self, base: RunSummary, t_start: float) -> None:
        self.base = base
        self.t_start = t_start  # when the run began (perf_counter)
        self.tiles_rendered = 0
        self.pixels = 0
        self.worker_rss = 0.0
        self.requests = 0  # the workers' storage calls (the driver's are added at the end)
        self.objects = 0
        self.fields: dict[str, Any] = {}

    def add_io(self, requests: int, objects: int) -> None:
        self.requests += requests
        self.objects += objects

    def summary(self, **more: Any) -> RunSummary:
        values = {
            "tiles_rendered": self.tiles_rendered,
            "pixels": self.pixels,
            "worker_peak_rss_mb": round(self.worker_rss, 1),
            "requests": self.requests,
            "objects_written": self.objects,
            **self.fields,
            **more,
        }
        return dataclasses.replace(self.base, **values)
