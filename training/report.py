"""Loss curves of a run as a PNG, drawn with PIL only (no plotting library needed).

python -m training.report RUNDIR OUT.png
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"loss_G": (31, 119, 180), "loss_D": (214, 39, 40), "augment_p": (44, 160, 44)}


def read_log(run_dir: str | Path) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "log.jsonl").read_text().splitlines() if x.strip()]


def plot_curves(
    run_dir: str | Path,
    out: str | Path,
    keys: Sequence[str] = ("loss_G", "loss_D", "augment_p"),
    size: tuple[int, int] = (720, 360),
) -> Path:
    recs = read_log(run_dir)
    if not recs:
        raise ValueError(f"{run_dir}/log.jsonl is empty")
    x = np.array([r["kimg"] for r in recs])
    w, h = size
    left, right, top, bottom = 50, 20, 30, 40
    ys = {k: np.array([r[k] for r in recs], dtype=float) for k in keys}
    lo, hi = 0.0, max(float(np.nanmax(v)) for v in ys.values()) * 1.05
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)

    def px(xv: float, yv: float) -> tuple[float, float]:
        return (
            left + (xv - x.min()) / max(x.max() - x.min(), 1e-9) * (w - left - right),
            h - bottom - (yv - lo) / (hi - lo) * (h - top - bottom),
        )

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for t in np.linspace(lo, hi, 5):
        _, yy = px(x.min(), t)
        d.line([left - 4, yy, left, yy], fill="black")
        d.text((4, yy - 6), f"{t:.2f}", fill="black")
    for t in np.linspace(x.min(), x.max(), 6):
        xx, _ = px(t, lo)
        d.line([xx, h - bottom, xx, h - bottom + 4], fill="black")
        d.text((xx - 10, h - bottom + 8), f"{t:.2f}" if x.max() - x.min() < 5 else f"{t:.1f}", fill="black")
    d.text((w // 2 - 20, h - 16), "kimg", fill="black")
    for i, (k, v) in enumerate(ys.items()):
        col = COLORS.get(k, (0, 0, 0))
        d.line([px(a, b) for a, b in zip(x, v, strict=False)], fill=tuple(c // 2 + 127 for c in col), width=1)
        n = max(1, len(v) // 25)  # moving average over ~4 % of the run
        sm = np.convolve(v, np.ones(n) / n, mode="valid")
        d.line([px(a, b) for a, b in zip(x[n - 1 :], sm, strict=False)], fill=col, width=2)
        d.text((left + 10 + 110 * i, 8), k, fill=col)
    out = Path(out)
    img.save(out)
    return out


if __name__ == "__main__":
    plot_curves(sys.argv[1], sys.argv[2])
