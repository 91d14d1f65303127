"""The viewer's work is bounded: a few tiles computed at once, a bounded queue, 503 + Retry-After
beyond it, and a memory peak that does not grow with the number of concurrent requests."""

from __future__ import annotations

import http.client
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import REPO, render_cli_env

from renderer.store import open_store
from viewer.tiles import TileGate, ViewerBusy, max_level, tile_grid


def test_gate_bounds_work_and_queue():
    gate = TileGate(workers=2, queue=3, wait_s=10)
    release = threading.Event()
    results: list[str] = []

    def work() -> None:
        try:
            with gate.slot():
                release.wait(timeout=10)
            results.append("done")
        except ViewerBusy:
            results.append("busy")

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    _until(lambda: gate.busy == 2)
    waiters = [threading.Thread(target=work) for _ in range(3)]
    for t in waiters:
        t.start()
    _until(lambda: gate.waiting == 3)
    with pytest.raises(ViewerBusy, match="waiting; retry shortly"):
        with gate.slot():
            pass
    release.set()
    for t in threads + waiters:
        t.join(timeout=10)
    assert results.count("done") == 5 and gate.busy == 0 and gate.waiting == 0


def _until(cond, timeout: float = 10.0) -> None:
    t_end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < t_end, "condition not reached"
        time.sleep(0.01)


def _peak_rss_mb(pid: int) -> float:
    text = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) / 1024


def test_many_concurrent_coarse_tiles_stay_bounded(tmp_path):
    """100 parallel coarse-tile requests on a level-0-only 32768^2 store: every answer is a
    tile or a 503 with Retry-After, and the server's peak memory stays bounded."""
    side = 32768
    url = str(tmp_path / "big.zarr")
    s = open_store(url, mode="w")
    s.create_level(0, side, side, 512)
    rng = np.random.default_rng(0)
    for r in range(0, side, 8192):  # a few chunks with data; the rest read as fill
        s.write_region(0, r, r, rng.integers(0, 255, (3, 512, 512), dtype=np.uint8))
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "render.py"), "view", url, "--port", "0"],
        env=render_cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        port = int(re.search(r"127\.0\.0\.1:(\d+)/", line).group(1))
        top = max_level(side, side)
        paths = []
        for level in (top - 5, top - 6, top - 4):
            cols, rows = tile_grid(side, side, level)
            paths += [f"/image_files/{level}/{c}_{r}.jpeg" for r in range(rows) for c in range(cols)]
        paths = paths[:100]
        base = _peak_rss_mb(proc.pid)

        def get(path: str) -> tuple[int, str | None]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            conn.close()
            return resp.status, resp.getheader("Retry-After")

        with ThreadPoolExecutor(len(paths)) as pool:
            answers = list(pool.map(get, paths))
        peak = _peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    statuses = [a[0] for a in answers]
    print("viewer burst:", statuses.count(200), "x 200,", statuses.count(503), "x 503; rss", base, "->", peak)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 4
    assert all(retry == "1" for status, retry in answers if status == 503)
    # 4 workers x ~100 MiB of tile work on top of what the server held before the burst
    assert peak - base < 700, (base, peak)
