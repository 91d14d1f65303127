"""A real multi-process Ray cluster (`ray start --head` on 127.0.0.1) joined with --address."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import REPO, VENV_BIN, free_port, render_cli_env, session_pids, stop_session, wait_port


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


@pytest.fixture
def two_nodes(tmp_path):
    """A head (`ray start --head`, 1 CPU, resource creps_head) and a second node (`ray start
    --address`, 1 CPU, resource creps_second), each in its own session; yields (address, second
    node's session id).  The second node joins through 127.0.0.2: Ray turns the loopback names
    127.0.0.1/localhost into this machine's network address, and other loopback addresses
    reach the head's GCS the same way while staying on this machine."""
    port = free_port()
    temp = f"/tmp/creps-ray-{port}"
    env = render_cli_env()
    token = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if "RAY_AUTH_MODE" not in env and (env.get("RAY_AUTH_TOKEN") or os.path.isfile(token)):
        env["RAY_AUTH_MODE"] = "token"  # `ray start --head` turned token auth on; a joining node must too
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats"]
    head_cmd = [str(VENV_BIN / "ray"), "start", "--head", f"--port={port}", "--include-dashboard=false"]
    head = subprocess.Popen(
        [*head_cmd, f"--temp-dir={temp}", *common, '--resources={"creps_head": 1}'],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    second, log = None, tmp_path / "second-node.log"
    try:
        wait_port(port, timeout=180)
        time.sleep(2.0)  # the raylet registers after the GCS listens
        with open(log, "w") as out:
            second = subprocess.Popen(
                [
                    str(VENV_BIN / "ray"),
                    "start",
                    f"--address=127.0.0.2:{port}",
                    *common,
                    '--resources={"creps_second": 1}',
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        t_end = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text() and time.monotonic() < t_end and second.poll() is None:
            time.sleep(0.2)
        assert "Ray runtime started" in log.read_text(), log.read_text()[-3000:]
        yield f"127.0.0.1:{port}", second.pid
    finally:
        for proc in (second, head):
            if proc is not None:
                stop_session(proc)
        shutil.rmtree(temp, ignore_errors=True)


def _marker_pids(markers: Path) -> set[int]:
    pids = set()
    for name in os.listdir(markers):
        try:
            record = json.loads((markers / name).read_text())
        except (OSError, ValueError):
            continue  # being written
        for tile in record.get("tiles", [record]):
            if isinstance(tile, dict) and "pid" in tile:
                pids.add(tile["pid"])
    return pids


def test_node_lost_mid_job_finishes_on_the_head(two_nodes, tmp_path, render_reference):
    """Two workers, one per node; the second node's raylet is killed mid-job.  The job finishes
    on the head with the bytes of an uninterrupted render, and its summary names the lost node
    (by its custom resource) and the tiles it sent again."""
    address, second_sid = two_nodes
    out = tmp_path / "lost.zarr"
    argv = [sys.executable, str(REPO / "render.py"), "render", "--checkpoint", "preset:tiny", "--seed", "9"]
    argv += ["--size", "640x640", "--tile", "32", "--block", "1", "--batch", "1", "--workers", "2"]
    argv += ["--threads-per-worker", "1"]  # block 1: tasks of one tile, so both nodes render early
    argv += ["--address", address, "--out", str(out), "--no-exports", "--quiet"]
    job = subprocess.Popen(argv, env=render_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    markers = out / "tiles"
    t_end = time.monotonic() + 300
    while time.monotonic() < t_end and job.poll() is None:
        # both workers have rendered (two pids in the markers): on a loaded machine the second
        # node's actor can start late, and a node lost before it rendered is not what this tests
        if markers.is_dir() and len(os.listdir(markers)) >= 6 and len(_marker_pids(markers)) >= 2:
            break
        time.sleep(0.05)
    raylets = session_pids(second_sid, "raylet/raylet")
    workers = _marker_pids(markers)
    assert job.poll() is None and len(raylets) == 1 and len(workers) == 2, (job.poll(), raylets, workers)
    os.kill(raylets[0], signal.SIGKILL)
    stdout, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr[-3000:]
    summary = json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("summary "))[8:])
    assert summary["status"] == "done" and summary["tiles_left"] == 0, summary
    assert summary["workers"] == 2
    # both nodes rendered, the second one (known by its custom resource) was lost
    assert len(summary["nodes"]) == 2 and any("creps_second" in n for n in summary["nodes"]), summary["nodes"]
    assert len(summary["nodes_lost"]) == 1 and "creps_second" in summary["nodes_lost"][0], (summary, stderr[-3000:])
    assert summary["tiles_retried"] >= 1 and summary["tasks_retried"] >= 1, summary
    assert "lost node" in stderr
    got = np.asarray(zarr.open_group(str(out), mode="r")["0"][:])
    np.testing.assert_array_equal(got, render_reference(640, 640, seed=9))
