#!/usr/bin/env python3
"""Train CREPS generators on a folder of images.

  train.py --data DS --out RUNDIR [options]     train (resume = re-run the same command)
  train.py dataset SRC DEST --resolution R      folder / zip / glob of images -> dataset
  train.py metrics CKPT --data DS --num N       FID / KID of a generator against a dataset
  train.py metrics CKPT --scale-consistency     R vs k*R renders against a Lanczos round trip (no dataset)

`train` is the default subcommand: `train.py --data ...` = `train.py train --data ...`.
Multi-GPU: torchrun --nproc_per_node=N train.py --data ... (one process on CPU).
Errors are one `error: ...` line (exit 2 for bad input); --debug or CREPS_DEBUG=1
shows the traceback instead.

Each subcommand lives in its own module (training/cli_*.py); this file only
dispatches, so `--help` on every subcommand is the reference.
"""

from __future__ import annotations

import argparse
import sys

from creps import cli

# subcommand -> (module, one-line help). Modules expose add_arguments(parser) and run(args) -> int.
SUBCOMMANDS = {
    "train": ("training.cli_train", "train a generator (the default subcommand; resume = re-run the same command)"),
    "dataset": ("training.cli_dataset", "convert a folder, zip or glob of images into a dataset"),
    "metrics": (
        "training.cli_metrics",
        "FID / KID against a dataset, or --scale-consistency; prints one JSON line",
    ),
}
DEFAULT = "train"
GLOBAL_FLAGS = ("--debug",)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; its help ends with the default subcommand's options, which most runs use."""
    parser, subparsers = cli.build_parser("train.py", __doc__, SUBCOMMANDS)
    parser.epilog = f"options of `{DEFAULT}`, the default subcommand:\n\n{subparsers[DEFAULT].format_help()}"
    return parser


def with_default_command(argv: list[str]) -> list[str]:
    """Insert ``train`` unless a subcommand (or top-level help) follows the global flags,
    so `train.py --data D --out R` keeps working as it did before subcommands existed."""
    i = 0
    while i < len(argv) and argv[i] in GLOBAL_FLAGS:
        i += 1
    if i < len(argv) and (argv[i] in SUBCOMMANDS or argv[i] in ("-h", "--help")):
        return argv
    return [*argv[:i], DEFAULT, *argv[i:]]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return cli.dispatch(parser, parser.parse_args(with_default_command(list(sys.argv[1:] if argv is None else argv))))


if __name__ == "__main__":
    sys.exit(main())
