"""Axis warps: named maps of one coordinate axis, applied to a canvas's row or column vector.

A CREPS pixel depends on (w, y_i, x_j) only, through row features of y_i and
column features of x_j.  Any map ``y -> f(y)`` of the row coordinates and
``x -> g(x)`` of the column coordinates therefore renders the warped image
``I(f(y), g(x))`` with the same two-stage machinery, and tiles stay exact:
the warp is applied to the canvas's global coordinate vectors (in float64,
before the one rounding to float32, see ``Canvas``), and tiles slice those
vectors as before (docs/exactness.md).  A rotation mixes y and x and has no
such form; docs/experiments.md says why.

A warp is text, parsed here and never evaluated: steps separated by ``;``,
applied left to right, each ``name`` or ``name:a,b,...`` with numbers::

    shift:d            t + d
    scale:s[,c]        c + s * (t - c)       (c = 0.5; s = 2 shows twice the range, so content looks half as big)
    mirror[:c]         2c - t                (c = 0.5)
    sine:a,f[,p]       t + a * sin(2 pi (f t + p))
    barrel:k[,c,r]     c + r u (1 + k u^2),  u = (t - c) / r   (c = 0.5, r = 0.5; k > 0 barrel, k < 0 pincushion)

Each step is a function of the coordinate alone, not of the canvas: the same
warp gives the same picture at every size, view window and zoom level, which
is what scale consistency and an endless zoom need.  ``canonical(text)`` is
the normal form (every argument written out), used in job identities and
cache keys so that ``mirror`` and ``mirror:0.5`` are one job.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["WARPS", "Step", "apply", "canonical", "parse"]


def _shift(t: torch.Tensor, d: float) -> torch.Tensor:
    return t + d


def _scale(t: torch.Tensor, s: float, c: float) -> torch.Tensor:
    return c + s * (t - c)


def _mirror(t: torch.Tensor, c: float) -> torch.Tensor:
    return 2 * c - t


def _sine(t: torch.Tensor, a: float, f: float, p: float) -> torch.Tensor:
    return t + a * torch.sin(2 * math.pi * (f * t + p))


def _barrel(t: torch.Tensor, k: float, c: float, r: float) -> torch.Tensor:
    u = (t - c) / r
    return c + r * u * (1 + k * u * u)


@dataclass(frozen=True)
class _Kind:
    fn: Callable[..., torch.Tensor]
    required: int
    defaults: tuple[float, ...]  # values of the optional arguments, in order
    usage: str


WARPS: dict[str, _Kind] = {
    "shift": _Kind(_shift, 1, (), "shift:d"),
    "scale": _Kind(_scale, 1, (0.5,), "scale:s[,c]"),
    "mirror": _Kind(_mirror, 0, (0.5,), "mirror[:c]"),
    "sine": _Kind(_sine, 2, (0.0,), "sine:amp,freq[,phase]"),
    "barrel": _Kind(_barrel, 1, (0.5, 0.5), "barrel:k[,c,r]"),
}


@dataclass(frozen=True)
class Step:
    """One parsed step: its name and every argument (defaults filled in)."""

    name: str
    args: tuple[float, ...]

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return WARPS[self.name].fn(t, *self.args)

    def __str__(self) -> str:
        return self.name + (":" + ",".join(_num(a) for a in self.args) if self.args else "")


def _num(x: float) -> str:
    """Shortest text that reads back as the same float (integers without '.0')."""
    return str(int(x)) if x == int(x) and abs(x) < 1e15 else repr(x)


def parse(text: str | Sequence[str]) -> tuple[Step, ...]:
    """The steps of a warp; ``""``, ``"none"`` and ``"identity"`` are no warp.

    ``text`` may also be a list of such strings (a repeated command-line flag),
    which are chained in order.  Raises ValueError with the usage of the step
    that is wrong; numbers go through ``float()`` only and must be finite.
    """
    parts = [text] if isinstance(text, str) else list(text)
    steps: list[Step] = []
    for part in parts:
        if not isinstance(part, str):
            raise ValueError(f"a warp is text like 'sine:0.02,3', got {part!r}")
        for item in part.split(";"):
            item = item.strip()
            if item.lower() in ("", "none", "identity"):
                continue
            name, _, rest = item.partition(":")
            name = name.strip().lower()
            kind = WARPS.get(name)
            if kind is None:
                raise ValueError(
                    f"unknown warp {name!r} in {item!r}; known: {', '.join(k.usage for k in WARPS.values())}"
                )
            try:
                args = [float(a) for a in rest.split(",")] if rest.strip() else []
            except ValueError:
                raise ValueError(f"warp {item!r}: arguments must be numbers ({kind.usage})") from None
            n_max = kind.required + len(kind.defaults)
            if not kind.required <= len(args) <= n_max:
                raise ValueError(f"warp {item!r}: expected {kind.usage}")
            if not all(math.isfinite(a) for a in args):
                raise ValueError(f"warp {item!r}: arguments must be finite numbers")
            full = (*args, *kind.defaults[len(args) - kind.required :])
            if name == "scale" and full[0] == 0:
                raise ValueError(f"warp {item!r}: scale 0 maps every line to one coordinate")
            if name == "barrel" and full[2] == 0:
                raise ValueError(f"warp {item!r}: radius r must not be 0")
            steps.append(Step(name, tuple(full)))
    return tuple(steps)


def canonical(text: str | Sequence[str]) -> str:
    """The normal form of a warp (``""`` for none): steps joined by ``;``, every argument written."""
    return ";".join(str(s) for s in parse(text))


def apply(text: str | Sequence[str], coords: torch.Tensor) -> torch.Tensor:
    """``coords`` (any float tensor) mapped by the warp, computed in float64, returned as float64.

    ``Canvas`` calls this on its float64 coordinates before rounding them to
    float32 once; a caller that builds its own coordinate vectors (a viewer
    rendering on demand) gets the same numbers by calling it the same way,
    but the simplest and exact way is ``Canvas(..., warp_rows=..., warp_cols=...)``.
    """
    t = coords.to(torch.float64)
    for step in parse(text):
        t = step(t)
    return t
