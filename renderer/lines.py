"""The line stage's storage: row and column line features of one job, in its store.

Line features (``G.lines``) are computed once per job, in ranges of whole
chunks spread over the workers, and kept as float32 arrays
``lines/row`` [K, H, rank, C] and ``lines/col`` [K, W, rank, C] in the same
store as the image, chunked along the line axis.  Every tile then reads the
slices it needs: no tile ever recomputes a line, and every tile uses slices of
the one global line arrays (which is what makes tiles seamless).

Completion is recorded like tiles: ``lines/done/<which>_<start>_<stop>.json``
after a range's data, and ``lines/done/all.json`` once every range is present.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import zarr

from .store import ImageStore, _is_local

LINES_GROUP = "lines"
DONE_DIR = "lines/done"
ALL_DONE = "all"


def create_line_arrays(
    store: ImageStore, num_blocks: int, height: int, width: int, rank: int, channels: int, chunk: int
) -> None:
    """Create (or replace) the empty row/column line arrays of a job."""
    grp = store.group.require_group(LINES_GROUP)
    for which, length in (("row", height), ("col", width)):
        grp.create_array(
            which,
            shape=(num_blocks, length, rank, channels),
            chunks=(num_blocks, min(chunk, length), rank, channels),
            dtype="float32",
            fill_value=0.0,
            compressors=None,  # line features are noise to a compressor; keep reads cheap
            dimension_names=["block", which, "rank", "channel"],
            overwrite=True,
        )


def line_array(store: ImageStore, which: str) -> zarr.Array:
    return store.group[f"{LINES_GROUP}/{which}"]  # type: ignore[return-value]


def has_line_arrays(store: ImageStore) -> bool:
    try:
        line_array(store, "row"), line_array(store, "col")
    except KeyError:
        return False
    return True


def write_lines(store: ImageStore, which: str, start: int, feats: torch.Tensor) -> None:
    """Store features [1, K, n, rank, C] at line positions [start, start + n), then mark the range."""
    data = feats[0].detach().to("cpu", torch.float32).numpy()
    line_array(store, which)[:, start : start + data.shape[1]] = data
    _put(store, f"{which}_{start}_{start + data.shape[1]}", {"which": which, "start": start, "stop": start + data.shape[1]})


def read_lines(store: ImageStore, which: str, start: int, stop: int, device: str = "cpu") -> torch.Tensor:
    """Features [1, K, stop-start, rank, C] of positions [start, stop), exactly as stored."""
    data = np.asarray(line_array(store, which)[:, start:stop])
    return torch.from_numpy(np.ascontiguousarray(data)).unsqueeze(0).to(device)


def done_ranges(store: ImageStore) -> set[tuple[str, int, int]]:
    out = set()
    for name in _list(store):
        parts = name.split("_")
        if len(parts) == 3 and parts[0] in ("row", "col"):
            out.add((parts[0], int(parts[1]), int(parts[2])))
    return out


def mark_all_done(store: ImageStore, info: dict) -> None:
    _put(store, ALL_DONE, info)


def all_done(store: ImageStore) -> bool:
    return ALL_DONE in _list(store)


def _put(store: ImageStore, name: str, info: dict) -> None:
    path = f"{store.root}/{DONE_DIR}/{name}.json"
    if _is_local(store.url):
        store.fs.makedirs(os.path.dirname(path), exist_ok=True)
    store.fs.pipe_file(path, json.dumps(info).encode())


def _list(store: ImageStore) -> set[str]:
    path = f"{store.root}/{DONE_DIR}"
    try:
        try:
            names = store.fs.ls(path, detail=False, refresh=True)
        except TypeError:
            names = store.fs.ls(path, detail=False)
    except FileNotFoundError:
        return set()
    return {os.path.basename(n)[: -len(".json")] for n in names if n.endswith(".json")}
