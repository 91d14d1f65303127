"""A real multi-process Ray cluster (`ray start --head` on 127.0.0.1) joined with --address."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr
from conftest import REPO, VENV_BIN, free_port, render_cli_env, wait_port


def _session_kill(sid: int) -> None:
    """SIGKILL every process of the session we started, one pid at a time."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            try:
                os.kill(int(name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def ray_head():
    """`ray start --head --block` in its own session and temp dir (so no other `ray.init()`
    on this machine finds it); stopped by ending exactly the processes it started."""
    port = free_port()
    temp = f"/tmp/creps-ray-{port}"
    head = subprocess.Popen(
        [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            "--num-gpus=0",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
        ],
        env=render_cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_port(port, timeout=180)
        time.sleep(2.0)  # the raylet registers after the GCS listens
        yield f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(20)
        except subprocess.TimeoutExpired:
            pass
        _session_kill(head.pid)
        shutil.rmtree(temp, ignore_errors=True)


def test_render_through_address(ray_head, tmp_path, render_reference):
    out = tmp_path / "c.zarr"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "render.py"),
            "render",
            "--checkpoint",
            "preset:tiny",
            "--size",
            "140x100",
            "--tile",
            "32",
            "--seed",
            "4",
            "--address",
            ray_head,
            "--out",
            str(out),
            "--no-exports",
            "--quiet",
        ],
        env=render_cli_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("summary "))[8:])
    assert summary["workers"] == 2  # one per cluster CPU
    assert summary["tiles_rendered"] == summary["tiles_total"] == 20
    got = np.asarray(zarr.open_group(str(out), mode="r")["0"][:])
    np.testing.assert_array_equal(got, render_reference(100, 140, seed=4))
