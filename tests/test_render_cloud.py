"""GCS and Azure for real: emulators on 127.0.0.1 (fake-gcs-server, azurite), reached through the
same fsspec filesystems a user gets from the [gcs] and [azure] extras (gcsfs, adlfs).

On each: the writer lease's exclusive create has one winner in a race; a render job is killed
mid-job, resumed by the same command, assembled with its DeepZoom pyramid written into the same
bucket, and viewed through `render.py view`, with every byte equal to the same job done locally."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import fsspec
import numpy as np
import pytest
from conftest import REPO, free_port, race_leases, render_cli_env, tiny_job, wait_port

from jobs.assemble import assemble
from jobs.run import run_job
from renderer import fsio
from renderer.lease import StoreBusyError
from renderer.store import open_store, store_lease

CLOUDS = {"gcs": ("fake_gcs", "gs"), "azure": ("azurite", "az")}
SIZE, TILE, SHARD = "768x512", "32", "2"  # 12 x 8 shards of 2 x 2 tiles: 96 tasks, one marker each
SHARDS = 96


@pytest.fixture(params=sorted(CLOUDS))
def cloud(request) -> tuple[str, dict]:
    """(URL prefix of a fresh bucket/container, storage options) on the cloud's emulator."""
    fixture, scheme = CLOUDS[request.param]
    options = request.getfixturevalue(fixture)
    bucket = f"creps-{request.node.name.split('[')[0].replace('_', '-')[:30]}-{request.param}".lower()
    fs = fsspec.filesystem(scheme, **options)
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    return f"{scheme}://{bucket}", options


def test_exclusive_create_and_lease_race_have_one_winner(cloud):
    prefix, options = cloud
    fs, root = fsio.filesystem(f"{prefix}/x", options)
    assert fsio.create_exclusive(fs, f"{root}/once.json", b"1") is True
    assert fsio.create_exclusive(fs, f"{root}/once.json", b"2") is False
    assert fs.cat_file(f"{root}/once.json") == b"1"  # the loser did not overwrite
    for attempt in range(3):
        url = f"{prefix}/race{attempt}.zarr"
        got = race_leases(lambda url=url: store_lease(url, options))
        winners = [g for g in got if not isinstance(g, StoreBusyError)]
        assert len(winners) == 1, got
        assert all("another process" in str(g) for g in got if isinstance(g, StoreBusyError))


def _render_argv(url: str, options: dict) -> list[str]:
    return [
        sys.executable,
        str(REPO / "render.py"),
        "render",
        "--checkpoint",
        "preset:tiny",
        "--size",
        SIZE,
        "--tile",
        TILE,
        "--shard",
        SHARD,
        "--seed",
        "7",
        "--workers",
        "1",
        "--threads-per-worker",
        "1",
        "--batch",
        "1",
        "--out",
        url,
        "--storage-options",
        json.dumps(options),
        "--no-exports",
        "--quiet",
    ]


def _tree(fs, root: str) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with its bytes."""
    return {p[len(root) + 1 :]: fs.cat_file(p) for p in fs.find(root)}


def test_render_kill_resume_assemble_view(cloud, tmp_path, render_ray, render_reference):
    prefix, options = cloud
    url = f"{prefix}/img.zarr"
    fs, root = fsio.filesystem(url, options)
    # 1. render, killed (the whole process group, Ray included) after a few shards are marked
    first = subprocess.Popen(
        _render_argv(url, options),
        env=render_cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    t_end = time.monotonic() + 300
    marked = 0
    while time.monotonic() < t_end and first.poll() is None:
        marked = len(fsio.list_names(fs, f"{root}/tiles"))
        if marked >= 3:
            break
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL, first.stderr.read()[-2000:] if first.stderr else ""
    done_at_kill = open_store(url, options, mode="r").done_count()
    assert 0 < done_at_kill < SHARDS, done_at_kill
    # 2. the same command resumes: only the missing shards are rendered
    again = subprocess.run(
        _render_argv(url, options), env=render_cli_env(), capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(next(ln for ln in again.stdout.splitlines() if ln.startswith("summary "))[8:])
    assert summary["status"] == "done" and summary["tiles_skipped"] >= done_at_kill
    assert summary["tiles_rendered"] + summary["tiles_skipped"] == summary["tiles_total"] == SHARDS
    assert summary["requests"] >= summary["objects_written"] >= summary["tiles_rendered"] > 0  # a write is a request
    # 3. assemble: pyramid in the store, DeepZoom into the same bucket
    dzi = f"{prefix}/img"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "render.py"),
            "assemble",
            url,
            "--dzi",
            dzi,
            "--storage-options",
            json.dumps(options),
        ],
        env=render_cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    # the same job done locally: level 0 is the single-process truth, and every export byte matches
    local = tiny_job(str(tmp_path / "img.zarr"), height=512, width=768, tile=32, shard=2, seed=7)
    assert run_job(local, progress=False, log=lambda s: None)["status"] == "done"
    assemble(local.out, dzi=str(tmp_path / "img"), log=lambda s: None)
    remote, mine = open_store(url, options, mode="r"), open_store(local.out, mode="r")
    assert remote.level_count() == mine.level_count() >= 3
    np.testing.assert_array_equal(remote.read_region(0, 0, 512, 0, 768), render_reference(512, 768, seed=7))
    for k in range(remote.level_count()):
        np.testing.assert_array_equal(np.asarray(remote.level(k)[:]), np.asarray(mine.level(k)[:]))
    bfs, broot = fsio.filesystem(f"{dzi}_files", options)
    got, want = _tree(bfs, broot), _tree(fsspec.filesystem("file"), str(tmp_path / "img_files"))
    assert got.keys() == want.keys() and len(got) > 10
    assert all(got[k] == want[k] for k in want), [k for k in want if got[k] != want[k]][:5]
    assert bfs.cat_file(f"{broot[: -len('_files')]}.dzi") == (tmp_path / "img.dzi").read_bytes()
    # 4. view: `render.py view` serves the DeepZoom pyramid straight from the bucket
    port = free_port()
    view = [sys.executable, str(REPO / "render.py"), "view", f"{dzi}.dzi", "--port", str(port)]
    server = subprocess.Popen(
        [*view, "--storage-options", json.dumps(options)],
        env=render_cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, timeout=120)
        base = f"http://127.0.0.1:{port}"
        info = json.loads(urllib.request.urlopen(f"{base}/api/info", timeout=30).read())
        assert (info["width"], info["height"]) == (768, 512)
        assert urllib.request.urlopen(f"{base}/dzi/img.dzi", timeout=30).read() == (tmp_path / "img.dzi").read_bytes()
        top = max(int(k.split("/")[0]) for k in want)
        tile = urllib.request.urlopen(f"{base}/dzi/img_files/{top}/1_1.jpg", timeout=30).read()
        assert tile == want[f"{top}/1_1.jpg"]
    finally:
        server.terminate()
        server.wait(30)
