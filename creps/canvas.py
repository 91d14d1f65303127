"""The global coordinate grid of one image.

Every tile of a render takes *slices* of the two vectors built here; a tile
never builds its own linspace (a tile's linspace would round differently and
break seamlessness).  Axis warps (``creps.warp``) act on these vectors, so a
warped canvas keeps that property.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import warp

MAX_SIDE = 2**20


@dataclass(frozen=True)
class Canvas:
    """An H x W pixel grid over the view window ``y`` x ``x`` of coordinate space.

    Row i sits at ``y0 + (y1 - y0) * i / (height - 1)`` (the same for columns),
    so ``Canvas(N, N)`` with ``N = int(R * scale)`` is the official ``--scale``
    grid ``linspace(0, 1, N)``.  ``warp_rows`` / ``warp_cols`` (``creps.warp``
    text, stored in canonical form) then map each row / column coordinate.
    """

    height: int
    width: int
    y: tuple[float, float] = (0.0, 1.0)
    x: tuple[float, float] = (0.0, 1.0)
    warp_rows: str = ""
    warp_cols: str = ""

    def __post_init__(self) -> None:
        for name, n in (("height", self.height), ("width", self.width)):
            if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_SIDE:
                raise ValueError(f"canvas {name} must be an integer in 1..{MAX_SIDE}, got {n!r}")
        for name, (a, b) in (("y", self.y), ("x", self.x)):
            if not (float("-inf") < a < float("inf") and float("-inf") < b < float("inf")):
                raise ValueError(f"view window {name}={self.y if name == 'y' else self.x} must be finite")
        object.__setattr__(self, "y", (float(self.y[0]), float(self.y[1])))
        object.__setattr__(self, "x", (float(self.x[0]), float(self.x[1])))
        object.__setattr__(self, "warp_rows", warp.canonical(self.warp_rows))  # ValueError on a bad warp
        object.__setattr__(self, "warp_cols", warp.canonical(self.warp_cols))

    @staticmethod
    def _coords(n: int, lo: float, hi: float, warp_text: str = "") -> torch.Tensor:
        if n == 1:
            t = torch.tensor([lo], dtype=torch.float64)
        else:
            i = torch.arange(n, dtype=torch.float64)
            t = lo + (hi - lo) * i / (n - 1)
        if not warp_text:
            return t.to(torch.float32)
        out = warp.apply(warp_text, t).to(torch.float32)
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"warp {warp_text!r} gives coordinates beyond float32 on this canvas")
        return out

    def row_coords(self) -> torch.Tensor:
        return self._coords(self.height, *self.y, self.warp_rows)

    def col_coords(self) -> torch.Tensor:
        return self._coords(self.width, *self.x, self.warp_cols)

    def check_window(self, r0: int, r1: int, c0: int, c1: int) -> None:
        if not (0 <= r0 < r1 <= self.height and 0 <= c0 < c1 <= self.width):
            raise ValueError(
                f"tile rows [{r0}, {r1}) x cols [{c0}, {c1}) is not inside the {self.height}x{self.width} canvas"
            )

    @property
    def pixels(self) -> int:
        return self.height * self.width
