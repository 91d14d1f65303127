"""The line stage's storage: row and column line features of one job, in its store.

Line features (``G.lines``) are computed once per job, in ranges of whole
chunks spread over the workers, and kept as float32 arrays
``lines/row`` [K, H, rank, C] and ``lines/col`` [K, W, rank, C] in the same
store as the image, chunked along the line axis (``ImageStore`` owns where).
Every tile then reads the slices it needs: no tile ever recomputes a line, and
every tile uses slices of the one global line arrays (which is what makes
tiles seamless).  A range is marked done only after its data is stored.
"""

from __future__ import annotations

import numpy as np
import torch

from .store import ImageStore


def write_lines(store: ImageStore, which: str, start: int, feats: torch.Tensor) -> None:
    """Store features [1, K, n, rank, C] at line positions [start, start + n), then mark the range."""
    data = feats[0].detach().to("cpu", torch.float32).numpy()
    stop = start + data.shape[1]
    store.line_array(which)[:, start:stop] = data
    store.mark_lines(which, start, stop)


def read_lines(store: ImageStore, which: str, start: int, stop: int, device: str = "cpu") -> torch.Tensor:
    """Features [1, K, stop-start, rank, C] of positions [start, stop), exactly as stored."""
    data = np.asarray(store.line_array(which)[:, start:stop])
    return torch.from_numpy(np.ascontiguousarray(data)).unsqueeze(0).to(device)
