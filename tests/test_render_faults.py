"""Faults: a worker killed mid-job, a driver killed mid-job, a task that keeps failing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr
from conftest import REPO, kill_session, render_cli_env, tiny_job

import render
from jobs.run import run_job
from renderer.errors import RendererError
from renderer.pyramid import reference_pyramid, render_levels
from renderer.store import open_store


def _level0(url: str) -> np.ndarray:
    return np.asarray(zarr.open_group(url, mode="r")["0"][:])


def test_killed_worker_is_replaced_and_bytes_identical(tmp_path, render_ray, render_reference):
    spec = tiny_job(str(tmp_path / "k.zarr"), height=160, width=176, tile=16)
    killed: list[int] = []

    def kill_one(summary, pool):
        if not killed and summary["tiles_rendered"] >= 3:
            pid = pool.pids()[0]
            os.kill(pid, signal.SIGKILL)  # the worker process, mid-job, tasks in flight
            killed.append(pid)

    summary = run_job(spec, progress=False, on_progress=kill_one)
    assert killed and summary["workers_replaced"] >= 1
    assert summary["status"] == "done" and summary["tiles_rendered"] == summary["tiles_total"] == 110
    np.testing.assert_array_equal(_level0(spec.out), render_reference(160, 176))


def test_killed_driver_then_rerun_renders_only_missing_tiles(tmp_path, render_ray, render_reference):
    out = tmp_path / "d.zarr"
    args = [
        "render",
        "--checkpoint",
        "preset:tiny",
        "--size",
        "512x384",
        "--tile",
        "32",
        "--batch",
        "1",
        "--workers",
        "2",
        "--threads-per-worker",
        "1",
        "--out",
        str(out),
        "--no-exports",
        "--quiet",
    ]
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "render.py"), *args],
        env=render_cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    tiles_dir = out / "tiles"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if tiles_dir.is_dir() and len(os.listdir(tiles_dir)) >= 8:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the job ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:  # the orphaned Ray of the killed driver: its session, process by process
        kill_session(proc.pid)
    time.sleep(0.5)
    done_before = len(open_store(str(out), mode="r").done_tiles())
    total = 16 * 12
    assert 8 <= done_before < total

    # re-run the same command (in this process, on the test session's Ray)
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert render.main(args) == 0
    summary = json.loads(next(ln for ln in buf.getvalue().splitlines() if ln.startswith("summary "))[8:])
    assert summary["tiles_rendered"] == total - done_before
    assert summary["tiles_skipped"] == done_before and summary["status"] == "done"
    np.testing.assert_array_equal(_level0(str(out)), render_reference(384, 512))
    store = open_store(str(out), mode="r")  # the levels written with the blocks are consistent too
    assert render_levels(store) == 1
    np.testing.assert_array_equal(np.asarray(store.level(1)[:]), reference_pyramid(render_reference(384, 512), 32)[1])


def test_repeated_failures_stop_with_a_report(tmp_path, render_ray):
    """A tile whose chunk can never be written: retried, then one clear error naming it;
    the other tiles are kept, and once the store is fixed a re-run finishes the job."""
    spec = tiny_job(str(tmp_path / "f.zarr"), height=64, width=64, tile=32, max_retries=1)
    run_job(spec, max_tiles=0, progress=False)  # creates the store and computes the lines only
    blocker = tmp_path / "f.zarr" / "0" / "c" / "0" / "1" / "1"  # chunk of tile r1_c1 is now a directory
    blocker.mkdir(parents=True)
    (blocker / "keep").write_text("x")
    with pytest.raises(RendererError, match=r"task r1_c1 failed 2 times; giving up. Last error: IsADirectoryError"):
        run_job(spec, progress=False)
    store = open_store(spec.out, mode="r")
    assert store.meta["status"] == "failed" and "giving up" in store.meta["error"]
    assert "r1_c1" not in store.done_tiles()
    (blocker / "keep").unlink()
    blocker.rmdir()
    summary = run_job(spec, progress=False)
    assert summary["tiles_rendered"] == 4 - len(store.done_tiles() - {"r1_c1"}) and summary["status"] == "done"
