"""Train a CREPS generator on a dataset (resume = re-run the same command).

  train.py --data DS --out RUNDIR [options]         `train` is the default subcommand
  train.py train --data DS --out RUNDIR [options]   the same, spelled out

Several processes: torchrun --nproc_per_node=N train.py --data ... (NCCL on GPUs, gloo on
CPUs); it trains the same run as one process with --batch-gpu batch/N.
"""

from __future__ import annotations

import argparse
import sys

from creps.cli import QUICK_BATCH, command, quick


def kimg_amount(text: str) -> float:
    """``--kimg`` value: thousands of images, with an ``M`` suffix for millions, as runs are usually quoted."""
    return float(text[:-1]) * 1000 if text.lower().endswith("m") else float(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``train`` options, grouped like the StyleGAN/edm2 CLIs.

    A flag that sets a ``TrainConfig`` field stores under the field's name
    (``dest``) and shows its old name as ``metavar``, so ``TrainConfig.from_args``
    needs no table and ``--help`` reads as before.
    """
    from .cli_metrics import metric_list

    g = p.add_argument_group("main options")
    g.add_argument(
        "--data",
        required=True,
        metavar="PATH",
        help="built dataset dir, or a folder/zip/glob of images (converted in memory)",
    )
    g.add_argument(
        "--out", required=True, metavar="RUNDIR", help="run directory: checkpoints, grids, log.jsonl, config.json"
    )
    g.add_argument(
        "--preset",
        default="small64",
        metavar="NAME",
        help="generator preset (tiny, small64, ffhq512, ...) [default: small64]",
    )
    g.add_argument(
        "--resolution",
        type=int,
        default=0,
        metavar="R",
        help="training resolution [default: the dataset's]; with --resume of an R/2 model: resolution transfer "
        "(same network, coordinate vectors twice as long)",
    )
    g.add_argument("--batch", type=int, default=16, metavar="B", help="total batch size [default: 16]")
    g.add_argument(
        "--batch-gpu",
        type=int,
        default=0,
        metavar="B",
        help="images per process per pass; fewer than batch/processes accumulates gradients "
        "(the result depends on batch and B, not on the number of processes) [default: batch/processes]",
    )
    g.add_argument(
        "--kimg",
        type=kimg_amount,
        default=100.0,
        metavar="K",
        help="train until K thousand images shown (1.5M ok) [default: 100]",
    )
    v = p.add_argument_group("model variants (docs/experiments.md)")
    v.add_argument("--rank", type=int, default=0, metavar="D", help="bi-line thickness d [default: the preset's]")
    v.add_argument(
        "--decoders",
        choices=["multiple", "none"],
        default="",
        help="fusion between blocks: a decoder each (official) or E^(l+1) = E^(l) + F^(l+1) [default: multiple]",
    )
    v.add_argument(
        "--bilines",
        choices=["all", "last"],
        default="",
        help="fuse every block's bi-line (official) or only the last one (the bi-line baseline) [default: all]",
    )
    h = p.add_argument_group("hyperparameters")
    h.add_argument(
        "--gamma", type=float, default=-1.0, metavar="G", help="R1 weight [default: by resolution, 10 at 512]"
    )
    h.add_argument("--aug", choices=["ada", "noaug"], default="ada", help="adaptive augmentation [default: ada]")
    h.add_argument(
        "--target",
        dest="ada_target",
        metavar="TARGET",
        type=float,
        default=0.6,
        help="ADA target for E[sign D(real)] [default: 0.6]",
    )
    h.add_argument("--ada-kimg", type=float, default=100.0, help="kimg for p to move 0 -> 1 [default: 100]")
    h.add_argument(
        "--glr", dest="lr_g", metavar="GLR", type=float, default=0.002, help="G learning rate [default: 0.002]"
    )
    h.add_argument(
        "--dlr", dest="lr_d", metavar="DLR", type=float, default=0.002, help="D learning rate [default: 0.002]"
    )
    h.add_argument("--ema-kimg", type=float, default=-1.0, help="G EMA half-life [default: batch*10/32]")
    h.add_argument(
        "--d-cbase",
        dest="d_channel_base",
        metavar="D_CBASE",
        type=int,
        default=0,
        help="D channel base [default: half of G's]",
    )
    h.add_argument(
        "--d-cmax",
        dest="d_channel_max",
        metavar="D_CMAX",
        type=int,
        default=0,
        help="D channel max [default: min(512, max(128, G's))]",
    )
    h.add_argument("--mirror", action="store_true", help="random x-flips of the reals")
    h.add_argument("--seed", type=int, default=0, help="random seed: init, data order, latents [default: 0]")
    io = p.add_argument_group("I/O and fine-tuning")
    io.add_argument(
        "--resume",
        default="",
        metavar="PATH",
        help="start from these weights (training ckpt, our .safetensors, official .pkl)",
    )
    io.add_argument(
        "--snap", type=float, default=10.0, metavar="N", help="checkpoint + sample grid every N kimg [default: 10]"
    )
    io.add_argument(
        "--minutes",
        type=float,
        default=0.0,
        metavar="M",
        help="stop after M minutes of training in this run, cleanly, with a checkpoint; re-run to go on "
        "[default: 0 = until --kimg]",
    )
    io.add_argument(
        "--tick", dest="tick_kimg", type=float, default=1.0, metavar="K", help="log line every K kimg [default: 1]"
    )
    io.add_argument(
        "--metrics", type=metric_list, default=(), metavar="LIST", help="fid,kid at each snapshot [default: none]"
    )
    io.add_argument(
        "--metrics-num", type=int, default=2000, metavar="N", help="images per metric evaluation [default: 2000]"
    )
    io.add_argument("--force", action="store_true", help="continue RUNDIR even though the config changed")
    perf = p.add_argument_group("performance")
    perf.add_argument("--device", default=None, help="cpu or cuda [default: cuda if available]")
    perf.add_argument("--no-amp", dest="amp", action="store_false", help="no bf16 autocast on CUDA")
    perf.add_argument("--threads", type=int, default=0, help="torch CPU threads [default: torch's]")
    perf.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    perf.add_argument("--no-progress", action="store_true", help="no progress bar")


@command()
def run(args: argparse.Namespace) -> int:
    """Resolve the config (printed first, so a refused run still shows what it would have been), then train."""
    import torch  # here, not at import time: `train.py --help` should not wait for torch

    from .config import TrainConfig
    from .loop import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    if quick():  # CREPS_QUICK (creps.cli): one step of a few images
        args.batch = min(args.batch, QUICK_BATCH)
        if args.batch_gpu and args.batch % args.batch_gpu:
            args.batch_gpu = 0
        args.kimg = min(args.kimg, args.batch / 1000)
    trainer = Trainer(TrainConfig.from_args(args), args.out, force=args.force, device=args.device)
    print(trainer.cfg.to_json(), file=sys.stderr)
    if args.dry_run:
        return 0
    trainer.run(progress=not args.no_progress)
    print(
        f"done: {trainer.kimg:.1f} kimg, step {trainer.step}; generator: {args.out}/G_ema.safetensors", file=sys.stderr
    )
    return 0
