"""`render.py bench` in a tiny mode: every figure of its JSON line is there, a positive finite number,
and the figures keep the relations they must (no timed assertion: the machine may be loaded)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

TINY = [
    "--checkpoint", "preset:tiny", "--device", "cpu", "--tile", "64", "--repeats", "1",
    "--e2e-size", "256x192", "--api-size", "192x128", "--overhead-size", "128x128",
    "--endless-checkpoint", "preset:tiny", "--endless-side", "4096",
]  # fmt: skip
POSITIVE = [
    "peak_gflops", "pixel_gflops", "pixel_fraction", "pixel_mpx_s", "line_gflops",
    "e2e_mpx_s", "e2e_fraction", "e2e_seconds", "line_seconds", "e2e_first_tile_seconds", "e2e_render_seconds",
    "e2e_inprocess_mpx_s", "e2e_inprocess_fraction", "e2e_inprocess_seconds", "e2e_inprocess_line_seconds",
    "e2e_inprocess_first_tile_seconds", "e2e_inprocess_render_seconds",
    "api_mpx_s", "api_fraction", "startup_s", "tile_compute_ms", "tile_overhead_cpu_ms",
    "endless_first_ms", "endless_cold_ms", "endless_warm_ms", "endless_tile_compute_ms",
]  # fmt: skip


def test_bench_json_has_every_figure_with_its_relations():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, str(REPO / "render.py"), "bench", *TINY],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=1500,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    r = json.loads(lines[-1])
    for key in POSITIVE:
        assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, (key, r.get(key))
    assert r["device"] == "cpu" and r["precision"] == "fp32" and r["e2e_size"] == "256x192"
    assert r["api_size"] == "192x128" and r["e2e_workers"] == (os.cpu_count() or 1)  # Ray: one actor per core
    # each run's stages lie inside it; the first tile comes before the last
    for p in ("e2e", "e2e_inprocess"):
        seconds = r[f"{p}_seconds"]
        assert r[f"{p}_first_tile_seconds"] < seconds and r[f"{p}_render_seconds"] < seconds, p
    assert r["line_seconds"] < r["e2e_seconds"] and r["e2e_inprocess_line_seconds"] < r["e2e_inprocess_seconds"]
    # endless: a tile answered from memory costs less than rendering one; the first tile of the level
    # computes all its line blocks (5 + 5 for a 256-px tile straddling 64-px blocks), the neighbours only
    # the new ones, and the last two tiles of the 3 x 2 patch none
    assert r["endless_warm_ms"] < r["endless_cold_ms"] and r["endless_warm_ms"] < r["endless_first_ms"]
    blocks = r["endless_line_blocks"]
    assert blocks[0] == 10 and all(0 < b < 10 for b in blocks[1:4]) and blocks[4:] == [0, 0], blocks
    assert len(r["endless_cold_each_ms"]) == 5 and r["endless_lanes"] == min(os.cpu_count() or 1, 4)
    # the ratios the targets are stated in, from the figures of the same run
    for name, (a, b) in {
        "api_vs_inprocess": ("api_mpx_s", "e2e_inprocess_mpx_s"),
        "api_vs_inprocess_per_flop": ("api_fraction", "e2e_inprocess_fraction"),
        "e2e_vs_inprocess": ("e2e_mpx_s", "e2e_inprocess_mpx_s"),
        "endless_cold_vs_compute": ("endless_cold_ms", "endless_tile_compute_ms"),
    }.items():
        assert r[name] == round(r[a] / r[b], 3), (name, r[name])
    # the printed lines name what the JSON holds
    text = out.stdout
    assert "in this process" in text and "Ray workers" in text and "G.render 192x128" in text
    assert "endless zoom (preset:tiny, 4096² canvas" in text
