"""Loss curves of a run as a PNG, drawn with PIL only (no plotting library needed).

  python -m training.report RUNDIR OUT.png

Plots the tick records of RUNDIR/log.jsonl (loss_G, loss_D and the ADA
probability p against kimg), as in docs/training_loss.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from creps.cli import DEBUG_HELP
from creps.errors import run_cli

from .errors import TrainError

COLORS = {"loss_G": (31, 119, 180), "loss_D": (214, 39, 40), "augment_p": (44, 160, 44)}


def read_log(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise TrainError(f"{path} does not exist; give a training run directory (train.py --out)")
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def plot_curves(
    run_dir: str | Path,
    out: str | Path,
    keys: Sequence[str] = ("loss_G", "loss_D", "augment_p"),
    size: tuple[int, int] = (720, 360),
) -> Path:
    # tick records only: the log also holds one-off records (the first throughput) without the curves
    recs = [r for r in read_log(run_dir) if "kimg" in r and all(k in r for k in keys)]
    if not recs:
        raise TrainError(f"{run_dir}/log.jsonl has no tick records yet (train until the first --tick)")
    x = np.array([r["kimg"] for r in recs])
    w, h = size
    left, right, top, bottom = 50, 20, 30, 40
    ys = {k: np.array([r[k] for r in recs], dtype=float) for k in keys}
    lo, hi = 0.0, max(max(float(np.nanmax(v)) for v in ys.values()) * 1.05, 1e-9)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_dir", metavar="RUNDIR", help="training run directory (holds log.jsonl)")
    p.add_argument("out", metavar="OUT.png", help="the picture to write")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = p.parse_args(argv)

    def body() -> int:
        print(plot_curves(args.run_dir, args.out))
        return 0

    return run_cli(body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
