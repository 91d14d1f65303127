"""Convert a folder, zip or glob of png/jpg/webp images (any size and aspect) into a dataset: center-crop, Lanczos resize, uint8 array + index."""

from __future__ import annotations

import argparse

from creps.cli import command


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``train.py dataset`` options; the defaults are those of ``training.dataset.build_dataset``."""
    p.add_argument("src", help="folder, .zip, or glob (quote it)")
    p.add_argument("dest", help="new dataset directory (never overwritten)")
    p.add_argument("--resolution", type=int, required=True, metavar="R", help="output size (power of two)")
    p.add_argument("--mirror", action="store_true", help="add an x-flipped copy of every image")
    p.add_argument(
        "--crops",
        type=int,
        default=0,
        metavar="K",
        help="add K random square crops per image (textures from few photos)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random crops")
    p.add_argument("--min-images", type=int, default=8, help="refuse datasets smaller than this [default: 8]")


@command()
def run(args: argparse.Namespace) -> int:
    """Build the dataset; bad input raises TrainError before anything is written."""
    from .dataset import build_dataset

    build_dataset(
        args.src,
        args.dest,
        args.resolution,
        mirror=args.mirror,
        crops=args.crops,
        seed=args.seed,
        min_images=args.min_images,
    )
    return 0
