"""Bounded plans: a canvas of 2^20 x 2^20 pixels plans, prints and starts in seconds and bounded
memory; the done set is one bit per tile and work goes out as runs of tile indices."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from conftest import REPO, render_cli_env


# ---------------------------------------------------------------- bounded plans
def test_dry_run_of_a_terapixel_canvas_is_bounded(tmp_path):
    code = (
        f"import resource, sys; sys.path.insert(0, {str(REPO)!r}); import render\n"
        "rc = render.main(sys.argv[1:])\n"
        "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, rc)"
    )
    base = [
        "render",
        "--checkpoint",
        "preset:ffhq512",
        "--size",
        "1048576x1048576",
        "--dry-run",
        "--out",
        str(tmp_path / "huge.zarr"),
    ]
    ok = subprocess.run(
        [sys.executable, "-c", code, *base, "--tile", "512"],
        env=render_cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "plan: 4,194,304 tiles" in ok.stdout, ok.stderr
    peak_mb, rc = (int(x) for x in ok.stdout.split("PEAK")[1].split())
    assert rc == 0 and peak_mb < 1024, peak_mb
    fine = subprocess.run(
        [sys.executable, "-c", code, *base, "--tile", "16"],
        env=render_cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "use a larger --tile or --shard" in fine.stderr and fine.stdout.split()[-1] == "2"
    assert not (tmp_path / "huge.zarr").exists()


def test_done_mask_from_batch_and_per_tile_markers(tmp_path):
    """Markers of runs of tiles (this version) and of single tiles (older stores) both count."""
    from jobs.plan import runs
    from renderer.store import LineShape, create_job_store

    store = create_job_store(
        str(tmp_path / "m.zarr"),
        None,
        height=64 * 40,
        width=64 * 50,
        tile=64,
        shard=1,
        compressor="zstd",
        lines=LineShape(1, 1, 1, 64),
        name="m",
        meta={},
    )
    plan = store.tile_plan()
    assert len(plan) == 2000
    store.mark_tiles(10, 20, [])
    for name in ("r1_c5", "not-a-tile"):  # per-tile markers of stores written before runs: r1_c5 is index 55
        (tmp_path / "m.zarr" / "tiles" / f"{name}.json").write_text("{}")
    mask = store.done_mask()
    assert mask.sum() == 11 and mask[10:20].all() and mask[55]
    todo = np.flatnonzero(~mask)
    got = list(runs(todo, 16))
    assert got[0] == (0, 10) and got[1] == (20, 36) and (52, 55) in got and (56, 72) in got and got[-1][1] == 2000
    assert sum(b - a for a, b in got) == 2000 - 11 and all(b - a <= 16 for a, b in got)


def test_a_four_million_tile_job_starts_bounded(tmp_path):
    """Planning what is left of a 2^20 x 2^20 job at tile 512 (4,194,304 tiles), with some
    done: the done set is one bit per tile and the work goes out as runs, in bounded memory."""
    code = """
import resource, sys
sys.path.insert(0, {repo!r})
from jobs.output import create_output, tiles_todo
from jobs.run import prepare
from jobs.plan import runs
from jobs.spec import JobSpec
spec = JobSpec(checkpoint="preset:tiny", width=1 << 20, height=1 << 20, tile=512, out={out!r})
job = prepare(spec)
store = create_output(job)
store.mark_tiles(0, 5000, [])
store.mark_tiles(100000, 100064, [])
todo = tiles_todo(job, store, (), None)
tasks = list(runs(todo, 64))
print("RESULT", len(job.plan), len(todo), len(tasks), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
""".format(repo=str(REPO), out=str(tmp_path / "tera.zarr"))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=render_cli_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    n, left, tasks, peak_mb = (int(x) for x in proc.stdout.split("RESULT")[1].split())
    assert n == 4_194_304 and left == n - 5064 and tasks == -(-(100000 - 5000) // 64) + -(-(n - 100064) // 64)
    assert peak_mb < 1024, peak_mb
