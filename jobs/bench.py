"""Measure the machine and the renderer: matmul peak, pixel stage, end to end.

Prints human-readable lines, then as its LAST line one JSON object with at
least: peak_gflops, pixel_gflops, pixel_fraction, e2e_mpx_s, e2e_fraction,
line_flop_share.  Fractions are of the measured fp32 matmul peak of this
machine (2048^3 products: the better of one matmul on all cores and one
single-threaded matmul per core at once), which is the ceiling the pixel stage
can approach, so the ratio is comparable across machines.  On a CPU the pixel
stage runs as the renderer runs it: one single-threaded worker per core.  Record figures in docs/performance.md with the machine.

The fixed jobs: the pixel stage renders one 512x512 tile of an ``ffhq512``
model from precomputed lines (357 kFLOP per pixel); end to end renders a
``--e2e-size`` canvas (default 6144x6144, the default job's size) through the real job runner (Ray,
store, markers) into a temporary local store.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import tempfile
import time
from typing import Any

import torch

import creps
from creps.cli import command

from .spec import JobSpec


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="preset:ffhq512", help="model to measure (default: %(default)s)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="threads for the peak matmul, and single-threaded pixel-stage workers on CPU (0 = all cores)",
    )
    p.add_argument("--tile", type=int, default=512, help="pixel-stage tile side (default: %(default)s)")
    p.add_argument("--pixel-block", type=int, default=0, help="pixels per block (default: 0 = the device default)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, best kept (default: %(default)s)")
    p.add_argument(
        "--e2e-size",
        default="6144x6144",
        help="end-to-end canvas WIDTHxHEIGHT (default: the default job's %(default)s; 0 skips)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def matmul_peak(threads: int, device: str = "cpu", n: int = 2048, repeats: int = 5) -> float:
    """Best-of fp32 GFLOP/s of an n^3 matmul: the ceiling for dense fp32 work here."""
    torch.set_num_threads(threads)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = float("inf")
    for i in range(repeats + 2):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 2:
            best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def pixel_stage(G: creps.Generator, tile: int, pixel_block: int, repeats: int, device: str) -> dict:
    """GFLOP/s of the pixel stage alone on one tile (lines precomputed, as in a job)."""
    cv = creps.Canvas(tile, tile)
    ws = G.ws(G.z_from_seed(0).to(device))
    t = time.perf_counter()
    R = G.lines(ws, cv.row_coords().to(device), "row")
    C = G.lines(ws, cv.col_coords().to(device), "col")
    _sync(device)
    line_s = time.perf_counter() - t
    weights = G.pixel_weights(ws)
    G.pixels(ws, R[:, :, :8], C, pixel_block=pixel_block, weights=weights)  # warm up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        G.pixels(ws, R, C, pixel_block=pixel_block, weights=weights)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    f = creps.flops(G.cfg, tile, tile)
    return {
        "pixel_gflops": f.pixel / best / 1e9,
        "pixel_seconds": best,
        "pixel_mpx_s": tile * tile / best / 1e6,
        "line_gflops": f.line / line_s / 1e9,
    }


def _cpu_worker(checkpoint: str, tile: int, pixel_block: int, repeats: int, barrier: Any, results: Any) -> None:
    torch.set_num_threads(1)
    G = creps.load(checkpoint)
    barrier.wait()
    peak = matmul_peak(1)  # all workers at once: the per-core ceiling with every core busy
    barrier.wait()
    out = pixel_stage(G, tile, pixel_block, repeats, "cpu")
    out["peak_gflops"] = peak
    results.put(out)


def pixel_stage_cpu(checkpoint: str, workers: int, tile: int, pixel_block: int, repeats: int) -> dict:
    """The pixel stage as the renderer runs it on a CPU: ``workers`` single-threaded
    processes side by side (one per core, like the Ray actors), summed.

    Many small ops with a multi-threaded BLAS pay a barrier per op, and any
    other load on the machine turns each barrier into a scheduler time slice;
    one thread per process has no barriers, so this is also what a job gets."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [
        ctx.Process(target=_cpu_worker, args=(checkpoint, tile, pixel_block, repeats, barrier, results))
        for _ in range(workers)
    ]
    for p in procs:
        p.start()
    parts = [results.get() for _ in procs]
    for p in procs:
        p.join()
    slowest = max(r["pixel_seconds"] for r in parts)
    return {
        "pixel_gflops": sum(r["pixel_gflops"] for r in parts),
        "pixel_seconds": slowest,
        "pixel_mpx_s": sum(r["pixel_mpx_s"] for r in parts),
        "line_gflops": sum(r["line_gflops"] for r in parts),
        "per_worker_gflops": [round(r["pixel_gflops"], 2) for r in parts],
        "per_process_peak_gflops": sum(r["peak_gflops"] for r in parts),
    }


def end_to_end(checkpoint: str, cfg: creps.GeneratorConfig, width: int, height: int) -> dict:
    """A whole job through the real runner into a temporary local store."""
    from .run import run_job

    with tempfile.TemporaryDirectory(prefix="creps-bench-") as tmp:
        spec = JobSpec(
            checkpoint=checkpoint,
            width=width,
            height=height,
            name="bench",
            out=os.path.join(tmp, "bench.zarr"),
            exports=False,
        )
        t = time.perf_counter()
        summary = run_job(spec, progress=False, log=lambda s: None)
        seconds = time.perf_counter() - t
    f = creps.flops(cfg, height, width)
    return {
        "e2e_seconds": seconds,
        "e2e_mpx_s": width * height / seconds / 1e6,
        "e2e_gflops": f.total / seconds / 1e9,
        "line_flop_share": f.line_share,
        "e2e_line_seconds": summary.line_seconds,
        "e2e_workers": summary.workers,
    }


@command()
def run(args: argparse.Namespace) -> int:
    device = args.device
    threads = args.threads or (os.cpu_count() or 1)
    peak = matmul_peak(threads, device)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, device {device}")
    print(f"matmul peak (fp32, {threads} threads): {peak:.1f} GFLOP/s")
    cfg = creps.load(args.checkpoint).cfg  # loaded once here; workers load their own copies
    block = args.pixel_block or creps.default_pixel_block(device)
    if device == "cpu":
        px = pixel_stage_cpu(args.checkpoint, threads, args.tile, block, args.repeats)
        how = f"{threads} single-threaded workers"
        # The ceiling is the better of one multi-threaded matmul and one matmul per core at once.
        if px["per_process_peak_gflops"] > peak:
            print(f"matmul peak ({threads} single-threaded processes): {px['per_process_peak_gflops']:.1f} GFLOP/s")
            peak = px["per_process_peak_gflops"]
    else:
        px = pixel_stage(creps.load(args.checkpoint, device=device), args.tile, block, args.repeats, device)
        how = device
    print(
        f"pixel stage ({how}): {px['pixel_mpx_s']:.3f} Mpx/s, {px['pixel_gflops']:.1f} GFLOP/s "
        f"= {px['pixel_gflops'] / peak:.0%} of peak (tile {args.tile}, block {block})"
    )
    result = {
        "peak_gflops": round(peak, 2),
        "pixel_gflops": round(px["pixel_gflops"], 2),
        "pixel_fraction": round(px["pixel_gflops"] / peak, 4),
        "pixel_mpx_s": round(px["pixel_mpx_s"], 4),
        "line_gflops": round(px["line_gflops"], 2),
    }
    if args.e2e_size not in ("0", ""):
        w, h = (int(v) for v in args.e2e_size.lower().split("x"))
        e2e = end_to_end(args.checkpoint, cfg, w, h)
        print(
            f"end to end {w}x{h}: {e2e['e2e_seconds']:.1f} s, {e2e['e2e_mpx_s']:.3f} Mpx/s, "
            f"{e2e['e2e_gflops']:.1f} GFLOP/s = {e2e['e2e_gflops'] / peak:.0%} of peak; "
            f"line work {e2e['line_flop_share']:.1%} of FLOPs"
        )
        result.update(
            e2e_mpx_s=round(e2e["e2e_mpx_s"], 4),
            e2e_fraction=round(e2e["e2e_gflops"] / peak, 4),
            e2e_seconds=round(e2e["e2e_seconds"], 2),
            line_flop_share=round(e2e["line_flop_share"], 4),
        )
    else:
        f = creps.flops(cfg, 6144, 6144)
        result.update(e2e_mpx_s=None, e2e_fraction=None, line_flop_share=round(f.line_share, 4))
    print(json.dumps(result))
    return 0
