"""Benchmark: zarr -> pyramid + TIFF + DZI (ours) against vips dzsave + tiffsave from a raw file.

  python -m jobs.bench_exports [--size 16384] [--height H] [--dir /tmp/creps-bench-exports]

Both sides get the same pixels (a synthetic smooth-plus-noise RGB image, made
once and cached in --dir as a raw interleaved file and a zarr store with 512
chunks), the same JPEG quality (90), 256 px TIFF tiles and 254/1 DeepZoom
tiles. "ours" cuts DeepZoom tiles from the zarr levels, "ours-dzsave" feeds
libvips dzsave instead. Each side runs in its own process so its peak RSS is its own. Prints one
line per side and a JSON line last.
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

import numpy as np


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


def _clean(folder: str, size: int, height: int | None = None) -> None:
    """Remove outputs and the pyramid levels, so each run does the full work."""
    for name in os.listdir(folder):
        if name.startswith(("ours", "vips")):
            p = os.path.join(folder, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    url = os.path.join(folder, f"{_stem(size, height)}.zarr")
    for name in os.listdir(url):
        if name not in ("0", "zarr.json"):
            p = os.path.join(url, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def run_ours(folder: str, size: int, engine: str = "zarr", height: int | None = None) -> dict:
    from jobs.assemble import assemble

    t = time.perf_counter()
    times = assemble(
        os.path.join(folder, f"{_stem(size, height)}.zarr"),
        tiff=os.path.join(folder, "ours.tif"),
        dzi=os.path.join(folder, "ours"),
        dzi_engine=engine,
    )
    return {"total_s": time.perf_counter() - t, **{f"{k}_s": v for k, v in times.items()}}


def run_vips(folder: str, size: int, height: int | None = None) -> dict:
    import pyvips

    raw = os.path.join(folder, f"{_stem(size, height)}.raw")
    h = height or size
    t = time.perf_counter()
    pyvips.Image.rawload(raw, size, h, 3).dzsave(
        os.path.join(folder, "vips"), tile_size=254, overlap=1, suffix=".jpg[Q=90]"
    )
    t1 = time.perf_counter()
    pyvips.Image.rawload(raw, size, h, 3).tiffsave(
        os.path.join(folder, "vips.tif"),
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


def _child(side: str, folder: str, size: int, height: int | None = None) -> None:
    if side == "vips":
        result = run_vips(folder, size, height)
    else:
        result = run_ours(folder, size, engine="zarr" if side == "ours" else "vips", height=height)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    result.update(peak_rss_mb=ru.ru_maxrss / 1024, cpu_s=ru.ru_utime + ru.ru_stime)
    print(json.dumps(result))


SIDES = ("vips", "ours", "ours-dzsave")


def bench(
    size: int = 16384, folder: str = "/tmp/creps-bench-exports", sides: tuple[str, ...] = SIDES, height: int = 0
) -> dict:
    make_inputs(folder, size, height=height or None, raw_file=any(side.startswith("vips") for side in sides))
    results: dict = {}
    for side in sides:
        _clean(folder, size, height or None)
        child = ["--child", side, "--size", str(size), "--height", str(height), "--dir", folder]
        out = subprocess.run(
            [sys.executable, "-m", "jobs.bench_exports", *child],
            check=True,
            capture_output=True,
            text=True,
        )
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
        print(side, " ".join(f"{k}={v:.2f}" for k, v in results[side].items()), flush=True)
    results.update(size=size, height=height or size, cpus=os.cpu_count())
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=16384, help="width (and height unless --height)")
    p.add_argument("--height", type=int, default=0, help="height (default: --size)")
    p.add_argument("--dir", default="/tmp/creps-bench-exports")
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of " + ",".join(SIDES))
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        _child(a.child, a.dir, a.size, a.height or None)
        return 0
    print(json.dumps(bench(a.size, a.dir, tuple(a.sides.split(",")), a.height)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
