"""Benchmark `render.py bench-assemble`: pyramid + TIFF + DZI (ours) against vips dzsave + tiffsave.

  python render.py bench-assemble [--sizes 16384,32768] [--dir /var/tmp/creps-bench-exports]
  python -m jobs.bench_exports --sizes 4096 --height 16384 --sides ours      (the same, as a module)

Both sides get the same pixels (a synthetic smooth-plus-noise RGB image, made
once per size and cached in --dir as a raw interleaved file and a zarr store
with 512 chunks), the same JPEG quality (90), 256 px TIFF tiles (JPEG,
pyramid, SubIFDs) and 254/1 DeepZoom tiles, no .szi. The store holds levels
1..--render-levels as after a render whose workers write them (meta
``render_levels`` set the same way; made once, untimed). Per size, in this
order, each in its own process (its peak RSS is its own):

- ``vips``: ``dzsave`` then ``tiffsave`` from the raw file;
- ``ours``: `render.py assemble` of the store: the remaining levels, then
  TIFF and DZI from one read of each level;
- ``levels``: levels 1..--render-levels built again from level 0 (our dask
  path, one read of level 0), timed: the cost the render takes on (an upper
  bound: a render worker has its pixels in memory, this also decodes them).

Outputs go to fresh folders and are deleted only at the end, and no timed
side runs right after a large delete: on ext4 a directory of recently deleted
files makes creating files slow (docs/performance.md); ``file_create_ms``
(an empty file created where the outputs go, before the sizes) says what the
run met; ``--out-dir`` on a tmpfs (/dev/shm) takes the disk out of both sides.
Prints one line per side, then a JSON line last: per size ``vips_s``,
``ours_s``, ``speedup`` (vips / ours), ``speedup_with_levels``
(vips / (ours + levels)) and ``cpu_ratio`` (vips CPU seconds / ours, both of
the timed part only: steadier than wall times when other jobs share the
cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import uuid
from typing import Any

import numpy as np

from creps.cli import command

from . import JobSpecError

DEFAULT_DIR = "/var/tmp/creps-bench-exports"
SIDES = ("vips", "ours", "levels")


def synthetic_strip(r0: int, r1: int, width: int, seed: int = 0) -> np.ndarray:
    """(3, r1-r0, width) uint8: smooth colour waves plus a little noise (JPEG sees realistic work)."""
    y = np.arange(r0, r1, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    rng = np.random.default_rng(seed + r0)
    out = np.empty((3, r1 - r0, width), np.uint8)
    for c in range(3):
        v = (
            128
            + 60 * np.sin(x / (300 + 40 * c) + y / (500 - 30 * c))
            + 40 * np.sin((x + y * (c + 1)) / 37.0) * np.cos(y / 91.0)
        )
        v += rng.integers(-6, 7, size=v.shape)
        out[c] = np.clip(v, 0, 255)
    return out


def _stem(size: int, height: int | None) -> str:
    return f"src{size}" if not height or height == size else f"src{size}x{height}"


def make_inputs(
    folder: str, size: int, chunk: int = 512, height: int | None = None, raw_file: bool = True
) -> tuple[str, str]:
    """Cached raw file (for libvips; skipped without ``raw_file``) + zarr store (level 0 only)
    of the same synthetic image, ``size`` wide and ``height`` (default ``size``) tall."""
    from renderer.store import open_store

    h = height or size
    stem = os.path.join(folder, _stem(size, height))
    raw, url = f"{stem}.raw", f"{stem}.zarr"
    if (os.path.exists(raw) or not raw_file) and os.path.exists(os.path.join(url, "zarr.json")):
        return raw, url
    os.makedirs(folder, exist_ok=True)
    store = open_store(url, mode="w")
    store.create_level(0, h, size, chunk=chunk)
    with open(raw if raw_file else os.devnull, "wb") as f:
        for r0 in range(0, h, chunk):
            strip = synthetic_strip(r0, min(h, r0 + chunk), size)
            store.write_region(0, r0, 0, strip)
            if raw_file:
                f.write(np.ascontiguousarray(strip.transpose(1, 2, 0)).tobytes())
    return raw, url


def _reset_store(url: str, keep: int) -> None:
    """Drop the pyramid record and the levels above ``keep``, so a side does its whole share of work."""
    for name in os.listdir(url):
        if (name.isdigit() and int(name) > keep) or name == "pyramid.json":
            p = os.path.join(url, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def run_levels(url: str, levels: int, workers: int | None = None) -> dict:
    """Levels 1..``levels`` from one read of level 0 (one dask graph of renderer.arrays), recorded as the render's.

    A stand-in for what render workers do with the blocks they rendered (they
    have the pixels in memory: this also pays for decoding level 0).
    """
    import dask.array as da

    from renderer.pyramid import downsampled, halved, pyramid_plan
    from renderer.store import open_store

    store = open_store(url, mode="a")
    shapes = pyramid_plan(store)
    chunk = int(store.level(0).chunks[1])
    t = time.perf_counter()
    graphs: list[Any] = [downsampled(store, 0)]
    arrays: list[Any] = []
    for k in range(1, min(levels, len(shapes) - 1) + 1):
        h, w = shapes[k]
        arrays.append(store.create_level(k, h, w, chunk=chunk, overwrite=True))
        if k > 1:
            graphs.append(halved(graphs[-1], chunk))
    da.store(graphs, arrays, lock=False, scheduler="threads", num_workers=workers or os.cpu_count())
    store.update_meta(render_levels={"block": 2**levels, "levels": levels})
    return {"total_s": time.perf_counter() - t}


def run_ours(url: str, out: str) -> dict:
    from jobs.assemble import assemble

    t = time.perf_counter()
    times = assemble(url, tiff=os.path.join(out, "ours.tif"), dzi=os.path.join(out, "ours"), szi=False)
    return {"total_s": time.perf_counter() - t, **{f"{k}_s": v for k, v in times.items()}}


def run_vips(raw: str, out: str, width: int, height: int) -> dict:
    import pyvips

    t = time.perf_counter()
    pyvips.Image.rawload(raw, width, height, 3).dzsave(
        os.path.join(out, "vips"), tile_size=254, overlap=1, suffix=".jpg[Q=90]"
    )
    t1 = time.perf_counter()
    pyvips.Image.rawload(raw, width, height, 3).tiffsave(
        os.path.join(out, "vips.tif"),
        tile=True,
        tile_width=256,
        tile_height=256,
        pyramid=True,
        subifd=True,
        bigtiff=True,
        compression="jpeg",
        Q=90,
    )
    t2 = time.perf_counter()
    return {"total_s": t2 - t, "dzsave_s": t1 - t, "tiffsave_s": t2 - t1}


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _child(side: str, folder: str, size: int, height: int | None, out: str, levels: int) -> None:
    stem = os.path.join(folder, _stem(size, height))
    if side == "vips":
        import pyvips  # noqa: F401  (imports before the clock, like ours)
    else:
        import dask.array  # noqa: F401

        import jobs.assemble  # noqa: F401
    cpu = _cpu_s()
    if side == "vips":
        result = run_vips(f"{stem}.raw", out, size, height or size)
    elif side == "levels":
        result = run_levels(f"{stem}.zarr", levels)
    else:
        result = run_ours(f"{stem}.zarr", out)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    result.update(peak_rss_mb=ru.ru_maxrss / 1024, cpu_s=_cpu_s() - cpu)  # CPU of the timed part, all threads
    print(json.dumps(result))


def bench_size(
    folder: str, size: int, height: int, sides: tuple[str, ...], levels: int, outs: list[str], out_dir: str
) -> dict:
    _, url = make_inputs(folder, size, height=height or None, raw_file="vips" in sides)
    results: dict = {"size": size, "height": height or size}
    from renderer.pyramid import pyramid_plan, render_levels
    from renderer.store import open_store

    store = open_store(url, mode="r")
    if render_levels(store) != levels or store.level_count() <= min(levels, len(pyramid_plan(store)) - 1):
        _reset_store(url, 0)  # the store must hold levels 1..L, as after a render
        run_levels(url, levels)
    for side in sides:
        _reset_store(url, levels)
        out = os.path.join(out_dir, f"out-{uuid.uuid4().hex[:8]}")
        os.makedirs(out)
        outs.append(out)
        child = ["--child", side, "--sizes", str(size), "--height", str(height), "--dir", folder, "--out", out]
        proc = subprocess.run(
            [sys.executable, "-m", "jobs.bench_exports", *child, "--render-levels", str(levels)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"bench side {side} failed: {proc.stderr[-2000:]}")
        results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
        line = " ".join(f"{k}={v:.2f}" for k, v in results[side].items())
        print(f"{size}x{height or size} {side} {line}", flush=True)
    if "vips" in results and "ours" in results:
        vips, ours = results["vips"]["total_s"], results["ours"]["total_s"]
        results.update(vips_s=vips, ours_s=ours, speedup=vips / ours)
        results["cpu_ratio"] = results["vips"]["cpu_s"] / results["ours"]["cpu_s"]  # vips CPU s / ours
        if "levels" in results:
            results["levels_s"] = results["levels"]["total_s"]
            results["speedup_with_levels"] = vips / (ours + results["levels_s"])
    return results


def file_create_ms(folder: str, outs: list[str], n: int = 200) -> float:
    """Milliseconds to create one empty file in a fresh folder under ``folder`` (what tile writing meets)."""
    probe = os.path.join(folder, f"out-probe-{uuid.uuid4().hex[:8]}")
    os.makedirs(probe)
    outs.append(probe)
    t = time.perf_counter()
    for i in range(n):
        with open(os.path.join(probe, f"{i}.jpg"), "wb"):
            pass
    return (time.perf_counter() - t) / n * 1e3


def bench(
    sizes: tuple[int, ...] = (16384, 32768),
    folder: str = DEFAULT_DIR,
    sides: tuple[str, ...] = SIDES,
    height: int = 0,
    levels: int = 2,
    out_dir: str | None = None,
) -> dict:
    outs: list[str] = []
    out_dir = out_dir or folder
    os.makedirs(out_dir, exist_ok=True)
    load = os.getloadavg()
    try:
        create_ms = file_create_ms(out_dir, outs)
        runs = [bench_size(folder, size, height, sides, levels, outs, out_dir) for size in sizes]
    finally:
        for out in outs:
            shutil.rmtree(out, ignore_errors=True)
    return {
        "runs": runs,
        "cpus": os.cpu_count(),
        "render_levels": levels,
        "load_avg": [round(v, 2) for v in load],
        "file_create_ms": round(create_ms, 3),
        "out_dir": out_dir,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="16384,32768", help="image widths, comma-separated (default %(default)s)")
    p.add_argument("--height", type=int, default=0, help="image height (default: square)")
    p.add_argument("--dir", default=DEFAULT_DIR, help="inputs (cached) and outputs (default %(default)s)")
    p.add_argument(
        "--out-dir", default=None, help="where both sides write their outputs (default: --dir; e.g. a tmpfs)"
    )
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of " + ",".join(SIDES))
    p.add_argument(
        "--render-levels", type=int, default=2, help="levels 1..N stand in for the render's (default %(default)s)"
    )
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)


def parse_sizes(text: str) -> tuple[int, ...]:
    """``--sizes``: widths >= 1024, comma-separated (JobSpecError, one line, before any input is made)."""
    try:
        sizes = tuple(int(s) for s in str(text).split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1024:
        raise JobSpecError(f"--sizes must be image widths >= 1024, comma-separated, got {text!r}")
    return sizes


def parse_sides(text: str) -> tuple[str, ...]:
    sides = tuple(str(text).split(","))
    if not set(sides) <= set(SIDES):
        raise JobSpecError(f"--sides must be a comma-separated subset of {','.join(SIDES)}, got {text!r}")
    return sides


@command()
def run(args: argparse.Namespace) -> int:
    sizes = parse_sizes(args.sizes)
    if args.child:
        _child(args.child, args.dir, sizes[0], args.height or None, args.out, args.render_levels)
        return 0
    sides = parse_sides(args.sides)
    print(json.dumps(bench(sizes, args.dir, sides, args.height, args.render_levels, args.out_dir)))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
