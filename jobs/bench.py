"""Measure the machine and the renderer: matmul peak, pixel stage, end to end, per-tile overhead.

Prints human-readable lines, then as its LAST line one JSON object with at
least: peak_gflops, pixel_gflops, pixel_fraction, pixel_executed_fraction,
e2e_mpx_s, e2e_fraction, line_flop_share, device, precision, tile_overhead_ms,
startup_s, gpu_mem_gb, gpx_seconds.  Record figures in docs/performance.md
with the machine.

* **Peak**: the ceiling the pixel stage can approach, measured in the same run.
  On a CPU the better of one fp32 2048^3 matmul on all cores and one
  single-threaded matmul per core at once; on a GPU an 8192^3 matmul in fp32
  (TF32 off) and in the chosen precision.  ``peak_gflops`` is the peak of the
  arithmetic the pixel stage really runs: the chosen precision's on a GPU,
  fp32 on a CPU (where bf16/fp16 are emulated with fp32 matmuls,
  creps.precision); fractions are of it.
* **Pixel stage**: one ``--tile``^2 tile of the model from precomputed lines
  (357 kFLOP per pixel for ffhq512), run as the renderer runs it: on a CPU one
  single-threaded process per core side by side, on a GPU one stream.
  ``pixel_fraction`` counts the useful FLOPs (each layer's product once);
  ``pixel_executed_fraction`` the products really run: 3 per layer for
  bf16x3, 2 for its CPU emulation (``creps.precision.matmul_products``).
* **End to end**: a ``--e2e-size`` canvas through the real job runner into a
  temporary local store (line stage, tiles, zstd chunks, markers, lease).  On a
  CPU by default the default job's way (Ray actors, one per core); on a GPU in
  this process (``--e2e-workers 0``), with its peak GPU memory.
* **Overhead**: a small job (``--overhead-*``, default preset:tiny 1024^2 in
  32^2 tiles, 1024 tiles) in this process: ``startup_s`` is the time from
  ``run_job`` to the first finished tile task; ``tile_overhead_ms`` is the
  render threads' wall time per tile beyond the pixel stage's own (measured
  alone, one thread, on the same groups of tiles afterwards; the wall time is
  the tile stage's, from its first tile task, which starts while the line
  stage's last tasks still run: their lane time counts here, under 0.1 ms
  per tile for the default small job, whose line stage takes ~0.1 s), and
  ``tile_overhead_cpu_ms`` the same from the job's CPU time (an upper bound
  that does not grow when other processes share the cores).
* **API**: ``G.render`` of a ``--api-size`` canvas (default 2048^2) in this
  process, as a notebook calls it (``creps.render_image``'s path: line blocks
  and pixel blocks on one single-threaded lane per core): ``api_mpx_s``.
* **In process**: on a CPU, the end-to-end job again with ``--workers 0`` in
  the same run as the Ray one (``e2e_inprocess_mpx_s``; with the first-tile,
  line-stage and tile-stage seconds of both runs, which say where the Ray
  path's time goes).
* **Endless zoom**: ``python -m viewer.bench --tiles`` in a process of its own
  (the viewer sets torch's thread count process-wide, and jobs does not
  import viewer): deepest-level 256^2 tiles of a ``--endless-side``^2 canvas
  of ``--endless-checkpoint`` as the server answers them: ``endless_first_ms``
  (the level's first tile), ``endless_cold_ms`` (five tiles never rendered,
  next to it), ``endless_warm_ms`` (the same again, from memory) and
  ``endless_tile_compute_ms`` (their pixel stage alone, one thread); medians.
* **Ratios** of one run (the targets of docs/performance.md are stated in
  them): ``api_vs_inprocess`` (api_mpx_s / e2e_inprocess_mpx_s; and
  ``api_vs_inprocess_per_flop``, the same from the fractions of the peak:
  lines are a larger share of a 2048^2 canvas than of the 6144^2 job),
  ``e2e_vs_inprocess`` (e2e_mpx_s / e2e_inprocess_mpx_s) and
  ``endless_cold_vs_compute`` (endless_cold_ms / endless_tile_compute_ms);
  null where a part was skipped.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import creps
from creps.cli import command
from creps.flops import pixel_flops
from creps.precision import PRECISIONS, exact_matmuls, matmul_products, precision_dtype

from . import JobSpecError
from .spec import JobSpec, parse_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="preset:ffhq512", help="model to measure (default: %(default)s)")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to measure (default: cuda when a GPU is visible)",
    )
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32", help="pixel-stage precision [fp32]")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="threads for the peak matmul, and single-threaded pixel-stage workers on CPU (0 = all cores)",
    )
    p.add_argument("--tile", type=int, default=0, help="pixel-stage tile side (default: 512 on CPU, 2048 on GPU)")
    p.add_argument("--pixel-block", type=int, default=0, help="pixels per block (default: 0 = the device default)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, best kept (default: %(default)s)")
    p.add_argument(
        "--e2e-size",
        default="",
        help="end-to-end canvas WIDTHxHEIGHT (default: 6144x6144 on CPU, 32768x32768 on GPU; 0 skips)",
    )
    p.add_argument(
        "--e2e-workers",
        type=int,
        default=None,
        help="workers of the end-to-end job (default: Ray actors on CPU, 0 = in this process on GPU)",
    )
    p.add_argument("--overhead-size", default="1024x1024", help="small job for startup/overhead (0 skips)")
    p.add_argument("--overhead-tile", type=int, default=32, help="tile side of the small job [32]")
    p.add_argument("--overhead-checkpoint", default="preset:tiny", help="model of the small job [preset:tiny]")
    p.add_argument("--overhead-workers", type=int, default=2, help="render threads of the small job on CPU [2]")
    p.add_argument("--api-size", default="2048x2048", help="G.render canvas in this process (0 skips) [2048x2048]")
    p.add_argument(
        "--endless-checkpoint",
        default="preset:ffhq512",
        help="endless-zoom tiles of this model ('' skips) [%(default)s]",
    )
    p.add_argument("--endless-side", type=int, default=1 << 20, help="endless-zoom canvas side [2^20]")


# ---------------------------------------------------------------- peak
def matmul_peak(threads: int, device: str = "cpu", n: int = 2048, repeats: int = 5, precision: str = "fp32") -> float:
    """Best-of GFLOP/s of an n^3 matmul in ``precision`` (fp32: TF32 off on CUDA)."""
    if device == "cpu":
        torch.set_num_threads(threads)
    dtype = precision_dtype(precision)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    with exact_matmuls(device):
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


# ---------------------------------------------------------------- pixel stage
@torch.no_grad()
def pixel_stage(
    G: creps.Generator, tile: int, pixel_block: int, repeats: int, device: str, precision: str = "fp32"
) -> dict:
    """GFLOP/s of the pixel stage alone on one tile (lines precomputed, as in a job)."""
    cv = creps.Canvas(tile, tile)
    ws = G.ws(G.z_from_seed(0).to(device))
    _sync(device)
    t = time.perf_counter()
    R = G.lines(ws, cv.row_coords().to(device), "row")
    C = G.lines(ws, cv.col_coords().to(device), "col")
    _sync(device)
    line_s = time.perf_counter() - t
    weights = G.pixel_weights(ws).lowered(creps.matmul_mode(precision, device))
    G.pixels(ws, R[:, :, :8], C, pixel_block=pixel_block, weights=weights, precision=precision)  # warm up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        G.pixels(ws, R, C, pixel_block=pixel_block, weights=weights, precision=precision)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    f = creps.flops(G.cfg, tile, tile)
    return {
        "pixel_gflops": f.pixel / best / 1e9,
        "pixel_seconds": best,
        "pixel_mpx_s": tile * tile / best / 1e6,
        "line_gflops": f.line / line_s / 1e9,
    }


def _cpu_worker(
    checkpoint: str, tile: int, pixel_block: int, repeats: int, precision: str, barrier: Any, results: Any
) -> None:
    torch.set_num_threads(1)
    G = creps.load(checkpoint)
    barrier.wait()
    peak = matmul_peak(1)  # all workers at once: the per-core ceiling with every core busy
    barrier.wait()
    out = pixel_stage(G, tile, pixel_block, repeats, "cpu", precision)
    out["peak_gflops"] = peak
    results.put(out)


def pixel_stage_cpu(checkpoint: str, workers: int, tile: int, pixel_block: int, repeats: int, precision: str) -> dict:
    """The pixel stage as the renderer runs it on a CPU: ``workers`` single-threaded
    processes side by side (one per core, like the Ray actors or in-process lanes), summed.

    Many small ops with a multi-threaded BLAS pay a barrier per op, and any
    other load on the machine turns each barrier into a scheduler time slice;
    one thread per process has no barriers, so this is also what a job gets."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [
        ctx.Process(target=_cpu_worker, args=(checkpoint, tile, pixel_block, repeats, precision, barrier, results))
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


# ---------------------------------------------------------------- whole jobs
def end_to_end(
    checkpoint: str,
    cfg: creps.GeneratorConfig,
    width: int,
    height: int,
    device: str = "cpu",
    precision: str = "fp32",
    workers: int | None = None,
) -> dict:
    """A whole job through the real runner into a temporary local store."""
    from .run import run_job

    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="creps-bench-") as tmp:
        spec = JobSpec(
            checkpoint=checkpoint,
            width=width,
            height=height,
            name="bench",
            out=os.path.join(tmp, "bench.zarr"),
            exports=False,
            precision=precision,
            device=device,
            workers=workers,
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
        "e2e_render_seconds": summary.render_seconds,
        "e2e_first_tile_seconds": summary.first_tile_seconds,
        "e2e_workers": summary.workers,
        "gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }


@torch.no_grad()
def api_render(checkpoint: str, width: int, height: int, device: str, precision: str) -> dict:
    """``G.render`` of a whole ``width`` x ``height`` canvas in this process (lines and pixels)."""
    G = creps.load(checkpoint, device=device)
    z = G.z_from_seed(0)
    G.render(z, creps.Canvas(8, 8), precision=precision)  # warm up: the lanes start
    _sync(device)
    t = time.perf_counter()
    G.render(z, creps.Canvas(height, width), precision=precision)
    _sync(device)
    seconds = time.perf_counter() - t
    return {
        "api_seconds": seconds,
        "api_mpx_s": width * height / seconds / 1e6,
        "api_gflops": creps.flops(G.cfg, height, width).total / seconds / 1e9,
    }


def endless_tiles(checkpoint: str, side: int, device: str) -> dict:
    """``python -m viewer.bench --tiles``'s JSON (its last line), run in its own process."""
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "viewer.bench", "--tiles", checkpoint, "--side", str(side), "--device", device]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise JobSpecError(f"the endless-zoom bench failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    print(lines[-2] if len(lines) > 1 else "", flush=True)
    return dict(json.loads(lines[-1]))


@torch.no_grad()
def _group_compute_seconds(checkpoint: str, spec: JobSpec, device: str) -> float:
    """The pixel stage alone, one thread, on the groups of tiles the renderer forms for this job."""
    from renderer.tiles import CALL_PIXELS, group_rect, tile_groups

    from .run import prepare

    G = creps.load(checkpoint, device=device)
    cv = creps.Canvas(spec.height, spec.width)
    ws = G.ws(G.z_from_seed(spec.seed).to(device))
    R = G.lines(ws, cv.row_coords().to(device), "row")
    C = G.lines(ws, cv.col_coords().to(device), "col")
    mode = creps.matmul_mode(spec.precision, device)
    weights = G.pixel_weights(ws).lowered(mode)
    plan = prepare(spec).plan  # the job's own plan: shard and block resolved as the run resolved them
    groups = list(tile_groups(plan, 0, len(plan), CALL_PIXELS["cuda" if device == "cuda" else "cpu"]))
    G.pixels(ws, R[:, :, :1], C[:, :, :1], weights=weights, precision=spec.precision)  # warm up
    best = float("inf")
    for _ in range(2):
        _sync(device)
        t = time.perf_counter()
        for g in groups:
            r0, r1, c0, c1 = group_rect(g)
            G.pixels(ws, R[:, :, r0:r1], C[:, :, c0:c1], weights=weights, precision=spec.precision)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def overhead(checkpoint: str, width: int, height: int, tile: int, lanes: int, device: str, precision: str) -> dict:
    """A small job in this process: start-up to the first tile, and per-tile time beyond compute."""
    from .run import RunSummary, run_job

    first: list[float] = []
    threads_before = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="creps-overhead-") as tmp:
        spec = JobSpec(
            checkpoint=checkpoint,
            width=width,
            height=height,
            tile=tile,
            name="overhead",
            out=os.path.join(tmp, "overhead.zarr"),
            exports=False,
            precision=precision,
            device=device,
            workers=0,
            threads_per_worker=lanes if device == "cpu" else 0,
        )

        def on_progress(s: RunSummary, pool: Any) -> None:
            if not first:
                first.append(time.perf_counter())

        t0, cpu0 = time.perf_counter(), time.process_time()
        summary = run_job(spec, progress=False, log=lambda s: None, on_progress=on_progress)
        total, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    torch.set_num_threads(1)
    try:
        compute = _group_compute_seconds(checkpoint, spec, device)
    finally:
        torch.set_num_threads(threads_before)
    n = summary.tiles_rendered
    lane_seconds = summary.render_seconds * summary.workers
    return {
        "startup_s": first[0] - t0 if first else None,
        "overhead_job_seconds": total,
        "overhead_tiles": n,
        "overhead_lanes": summary.workers,
        "tile_compute_ms": 1000 * compute / n,
        "tile_overhead_ms": 1000 * (lane_seconds - compute) / n,
        # CPU time of the whole job (line stage and set-up included) beyond the pixel stage's: an upper
        # bound that other load on the machine does not inflate, unlike the wall-clock figure above
        "tile_overhead_cpu_ms": 1000 * (cpu - compute) / n,
    }


def _e2e_figures(
    args: argparse.Namespace,
    cfg: creps.GeneratorConfig,
    size: tuple[int, int] | None,
    device: str,
    precision: str,
    peak: float,
) -> dict[str, Any]:
    """The end-to-end job (Ray actors on a CPU by default) and, when that ran on Ray, the same job
    in this process (``--workers 0``) right after it: the figures of both, side by side."""
    if size is None:
        f = creps.flops(cfg, 6144, 6144)
        return dict(
            e2e_mpx_s=None, e2e_fraction=None, line_flop_share=round(f.line_share, 4), gpx_seconds=None, gpu_mem_gb=None
        )
    w, h = size
    cuda = device == "cuda"
    workers = args.e2e_workers if args.e2e_workers is not None else (0 if cuda else None)
    runs = [end_to_end(args.checkpoint, cfg, w, h, device, precision, workers)]
    if workers != 0:
        runs.append(end_to_end(args.checkpoint, cfg, w, h, device, precision, 0))
    for e2e, how in zip(runs, (workers, 0), strict=False):
        where = "in this process" if how == 0 else f"{e2e['e2e_workers']} Ray workers"
        mem = f", peak GPU memory {e2e['gpu_mem_gb']:.2f} GB" if cuda else ""
        print(
            f"end to end {w}x{h} ({where}): {e2e['e2e_seconds']:.1f} s (first tile {e2e['e2e_first_tile_seconds']:.1f} "
            f"s, line stage {e2e['e2e_line_seconds']:.1f} s, tiles {e2e['e2e_render_seconds']:.1f} s), "
            f"{e2e['e2e_mpx_s']:.3f} Mpx/s, {e2e['e2e_gflops']:.1f} GFLOP/s = {e2e['e2e_gflops'] / peak:.0%} of peak; "
            f"line work {e2e['line_flop_share']:.1%} of FLOPs{mem}"
        )
    e2e, local = runs[0], runs[-1]
    return dict(
        e2e_mpx_s=round(e2e["e2e_mpx_s"], 4),
        e2e_fraction=round(e2e["e2e_gflops"] / peak, 4),
        e2e_seconds=round(e2e["e2e_seconds"], 2),
        e2e_size=f"{w}x{h}",
        e2e_workers=e2e["e2e_workers"],
        line_seconds=e2e["e2e_line_seconds"],
        e2e_first_tile_seconds=e2e["e2e_first_tile_seconds"],
        e2e_render_seconds=e2e["e2e_render_seconds"],
        line_flop_share=round(e2e["line_flop_share"], 4),
        gpx_seconds=round(e2e["e2e_seconds"] * 1e9 / (w * h), 2),
        gpu_mem_gb=round(e2e["gpu_mem_gb"], 3) if e2e["gpu_mem_gb"] is not None else None,
        e2e_inprocess_mpx_s=round(local["e2e_mpx_s"], 4),
        e2e_inprocess_fraction=round(local["e2e_gflops"] / peak, 4),
        e2e_inprocess_seconds=round(local["e2e_seconds"], 2),
        e2e_inprocess_line_seconds=local["e2e_line_seconds"],
        e2e_inprocess_first_tile_seconds=local["e2e_first_tile_seconds"],
        e2e_inprocess_render_seconds=local["e2e_render_seconds"],
    )


def _size(text: str) -> tuple[int, int] | None:
    if text in ("0", ""):
        return None
    return parse_size(text)


@command()
def run(args: argparse.Namespace) -> int:
    device, precision = args.device, args.precision
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise JobSpecError("--device cuda, but no CUDA GPU is visible; use --device cpu")
    threads = args.threads or (os.cpu_count() or 1)
    tile = args.tile or (2048 if cuda else 512)
    e2e_size = _size(args.e2e_size if args.e2e_size else ("32768x32768" if cuda else "6144x6144"))
    name = torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine())
    print(f"machine: {name}, {os.cpu_count()} cores, device {device}, precision {precision}")
    n = 8192 if cuda else 2048
    peak_fp32 = matmul_peak(threads, device, n=n)
    print(f"matmul peak (fp32 {n}^3, {'TF32 off' if cuda else f'{threads} threads'}): {peak_fp32:.1f} GFLOP/s")
    mode = creps.matmul_mode(precision, device)
    native = mode == precision and precision != "fp32"  # emulated modes run fp32 matmuls (creps.precision)
    peak_prec = matmul_peak(threads, device, n=n, precision=precision) if native else None
    if peak_prec is not None:
        print(f"matmul peak ({precision} {n}^3): {peak_prec:.1f} GFLOP/s")
    elif precision != "fp32":
        print(f"{precision} on {device} is emulated with fp32 matmuls ({mode}): its ceiling is the fp32 peak")
    cfg = creps.read_config(args.checkpoint)
    block = args.pixel_block or creps.default_pixel_block(device)
    if not cuda:
        px = pixel_stage_cpu(args.checkpoint, threads, tile, block, args.repeats, precision)
        how = f"{threads} single-threaded workers"
        # The ceiling is the better of one multi-threaded matmul and one matmul per core at once.
        if px["per_process_peak_gflops"] > peak_fp32:
            print(f"matmul peak ({threads} single-threaded processes): {px['per_process_peak_gflops']:.1f} GFLOP/s")
            peak_fp32 = px["per_process_peak_gflops"]
    else:
        px = pixel_stage(creps.load(args.checkpoint, device=device), tile, block, args.repeats, device, precision)
        how = device
    peak = peak_prec if peak_prec is not None else peak_fp32  # the ceiling of what the pixel stage really runs
    # executed/useful: the products a layer's matmul really runs (3 for bf16x3) against one
    executed = pixel_flops(cfg, matmul_products(mode)) / pixel_flops(cfg)
    print(
        f"pixel stage ({how}, {mode}): {px['pixel_mpx_s']:.3f} Mpx/s, {px['pixel_gflops']:.1f} GFLOP/s "
        f"= {px['pixel_gflops'] / peak:.0%} of peak (tile {tile}, block {block})"
        + (f", {executed * px['pixel_gflops'] / peak:.0%} counting the products executed" if executed != 1 else "")
    )
    result: dict[str, Any] = {
        "device": name if cuda else "cpu",
        "precision": precision,
        "matmul_mode": mode,
        "peak_gflops": round(peak, 2),
        "peak_fp32_gflops": round(peak_fp32, 2),
        "peak_precision_gflops": round(peak_prec, 2) if peak_prec is not None else None,
        "pixel_gflops": round(px["pixel_gflops"], 2),
        "pixel_fraction": round(px["pixel_gflops"] / peak, 4),
        "pixel_executed_gflops": round(px["pixel_gflops"] * executed, 2),
        "pixel_executed_fraction": round(px["pixel_gflops"] * executed / peak, 4),
        "pixel_mpx_s": round(px["pixel_mpx_s"], 4),
        "line_gflops": round(px["line_gflops"], 2),
    }
    result.update(_e2e_figures(args, cfg, e2e_size, device, precision, peak))
    api = _size(args.api_size)
    result.update(api_mpx_s=None, api_fraction=None, api_size=None)
    if api is not None:
        a = api_render(args.checkpoint, api[0], api[1], device, precision)
        print(
            f"G.render {api[0]}x{api[1]} in this process: {a['api_seconds']:.1f} s, {a['api_mpx_s']:.3f} Mpx/s, "
            f"{a['api_gflops']:.1f} GFLOP/s = {a['api_gflops'] / peak:.0%} of peak"
        )
        result.update(
            api_mpx_s=round(a["api_mpx_s"], 4),
            api_fraction=round(a["api_gflops"] / peak, 4),
            api_size=f"{api[0]}x{api[1]}",
        )
    small = _size(args.overhead_size)
    if small is not None:
        w, h = small
        lanes = 1 if cuda else args.overhead_workers
        o = overhead(args.overhead_checkpoint, w, h, args.overhead_tile, lanes, device, precision)
        print(
            f"small job {w}x{h} in {args.overhead_tile}^2 tiles ({args.overhead_checkpoint}, in this process, "
            f"{o['overhead_lanes']} render threads): first tile after {o['startup_s']:.2f} s, "
            f"{o['tile_compute_ms']:.2f} ms compute + {o['tile_overhead_ms']:.2f} ms overhead per tile "
            f"(CPU time: {o['tile_overhead_cpu_ms']:.2f} ms), job {o['overhead_job_seconds']:.2f} s"
        )
        result.update(
            startup_s=round(o["startup_s"], 3) if o["startup_s"] is not None else None,
            tile_overhead_ms=round(o["tile_overhead_ms"], 3),
            tile_overhead_cpu_ms=round(o["tile_overhead_cpu_ms"], 3),
            tile_compute_ms=round(o["tile_compute_ms"], 3),
        )
    else:
        result.update(startup_s=None, tile_overhead_ms=None)
    if args.endless_checkpoint:
        result.update(endless_tiles(args.endless_checkpoint, args.endless_side, device))
    figures = ratios(result)
    result.update(figures)
    shown = ", ".join(f"{k} {v}" for k, v in figures.items() if v is not None)
    if shown:
        print(f"ratios (docs/performance.md states the targets in them): {shown}")
    print(json.dumps(result))
    return 0


RATIOS = {  # name -> (numerator, denominator): within one run, so the machine's mood cancels out
    "api_vs_inprocess": ("api_mpx_s", "e2e_inprocess_mpx_s"),
    "api_vs_inprocess_per_flop": ("api_fraction", "e2e_inprocess_fraction"),  # the canvases' line shares differ
    "e2e_vs_inprocess": ("e2e_mpx_s", "e2e_inprocess_mpx_s"),
    "endless_cold_vs_compute": ("endless_cold_ms", "endless_tile_compute_ms"),
}


def ratios(result: dict) -> dict[str, float | None]:
    """The ratios the speed targets are stated in; None where the run skipped a part."""
    out: dict[str, float | None] = {}
    for name, (a, b) in RATIOS.items():
        num, den = result.get(a), result.get(b)
        out[name] = round(num / den, 3) if num and den else None
    return out
