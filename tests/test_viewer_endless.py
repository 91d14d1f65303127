"""The endless viewer (render.py view --checkpoint) over real HTTP on 127.0.0.1.

What a tile is (exactly the creps API's pixels; exactly a render job's bytes),
the persistent cache across a restart, scheduling (abandoned requests are
not rendered, identical requests render once, bounds answer 503), bad tile
requests cost nothing, token access beyond loopback, and the CLI.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import serving, wait_until
from PIL import Image

import creps
from renderer.dzi import level_size, max_level, tile_bounds, tile_grid
from viewer import cli
from viewer.cache import TileCache, checked
from viewer.endless import EndlessTiles, open_endless

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = str(ROOT / "creps" / "weights" / "default.safetensors")
SIDE = 2**20
VIEW = (0.0, 1024.0, 0.0, 1024.0)  # a wide window: every level of a 2^20 canvas has detail
TOP = max_level(SIDE, SIDE)


# ---------------------------------------------------------------- helpers
def get(server, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=120)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def decode(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).transpose(2, 0, 1)


def send_raw(server, path: str, source: str = "127.0.0.1") -> socket.socket:
    """A connection (from ``source``, another loopback address = another client) that sent one GET."""
    s = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=60, source_address=(source, 0))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    return s


def read_raw(s: socket.socket) -> tuple[int, bytes]:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split(b" ", 2)[1]), body


@pytest.fixture(scope="module")
def bundled():
    """The bundled generator and its latent, for reference pixels through the creps API."""
    return creps.load(BUNDLED)


def reference(G, canvas: creps.Canvas, rows: tuple[int, int], cols: tuple[int, int], seed: int = 0) -> np.ndarray:
    with torch.no_grad():
        return creps.to_uint8(G.render(G.z_from_seed(seed), canvas, rows, cols))[0].numpy()


def endless(tmp: Path | None = None, checkpoint: str = BUNDLED, **kw) -> EndlessTiles:
    """The bundled model's 2^20 x 2^20 canvas over VIEW, PNG tiles, memory-only unless ``tmp``."""
    base = dict(width=SIDE, height=SIDE, view=VIEW, fmt="png", threads=2)
    base.update(kw)
    if tmp is None:
        base.setdefault("cache_url", None)
    else:
        base.setdefault("cache_url", str(tmp))
    return open_endless(checkpoint, **base)


# ---------------------------------------------------------------- what a tile is
def test_deep_and_coarse_tiles_equal_creps_api_pixels(bundled):
    """A deepest-level PNG tile of a 2^20 canvas is G.render's crop; a coarse level is the coarse canvas."""
    with serving(endless()) as server:
        for level, col, row in ((TOP, 2100, 3000), (TOP, 0, 0), (TOP - 9, 3, 2), (TOP - 14, 0, 0)):
            status, hdr, body = get(server, f"/image_files/{level}/{col}_{row}.png?v=x")
            assert status == 200 and hdr["Content-Type"] == "image/png"
            k = TOP - level
            canvas = creps.Canvas(-(-SIDE // 2**k), -(-SIDE // 2**k), y=VIEW[:2], x=VIEW[2:])
            y0, y1, x0, x1 = tile_bounds(SIDE, SIDE, level, col, row)
            np.testing.assert_array_equal(decode(body), reference(bundled, canvas, (y0, y1), (x0, x1)))
        info = json.loads(get(server, "/api/info")[2])
        assert info["mode"] == "endless" and (info["width"], info["height"]) == (SIDE, SIDE)
        assert info["dzi_levels"] == TOP + 1 == 21 and info["endless"]["tiles_rendered"] == 4
        dzi = get(server, "/image.dzi")[2].decode()
        assert 'Width="1048576"' in dzi and 'TileSize="254"' in dzi and 'Format="png"' in dzi


def test_full_resolution_tiles_equal_the_bytes_a_render_job_writes(tmp_path, render_reference):
    """Every full-resolution PNG tile equals run_job's pixels (tiny preset, 300x200 canvas, view, psi)."""
    from jobs.run import run_job
    from jobs.spec import JobSpec
    from renderer.store import open_store

    h, w, view, seed, psi = 200, 300, (-0.25, 1.5, 0.1, 0.9), 7, 0.8
    url = "memory://endless-equals-job.zarr"  # renders in this process, without Ray
    spec = JobSpec(checkpoint="preset:tiny", seed=seed, psi=psi, width=w, height=h, view=view, tile=64, out=url)
    assert run_job(spec, progress=False).status == "done"
    job = open_store(url).read_region(0, 0, h, 0, w)
    np.testing.assert_array_equal(job, render_reference(h, w, seed, psi, view))
    src = endless(checkpoint="preset:tiny", seed=seed, psi=psi, width=w, height=h, view=view)
    top = max_level(w, h)
    with serving(src) as server:
        ncols, nrows = tile_grid(w, h, top)
        for col in range(ncols):
            for row in range(nrows):
                status, _, body = get(server, f"/image_files/{top}/{col}_{row}.png")
                assert status == 200
                y0, y1, x0, x1 = tile_bounds(w, h, top, col, row)
                np.testing.assert_array_equal(decode(body), job[:, y0:y1, x0:x1], err_msg=f"tile {col}_{row}")
        # A coarser level is the generator on the coarser canvas (same window), not a mean of the job.
        lw, lh = level_size(w, h, top - 1)
        got = decode(get(server, f"/image_files/{top - 1}/0_0.png")[2])
        np.testing.assert_array_equal(got, render_reference(lh, lw, seed, psi, view)[:, : got.shape[1], : got.shape[2]])


@pytest.mark.parametrize("width,height", [(1, 1), (3, 1), (1, 700), (257, 255)])
def test_any_size_serves_every_level(width, height, render_reference):
    """Down to 1 x 1: every tile of every level is served, the full-resolution ones equal the render."""
    src = endless(checkpoint="preset:tiny", width=width, height=height, view=(0.0, 1.0, 0.0, 1.0), threads=1)
    top = max_level(width, height)
    full = render_reference(height, width)
    try:
        for level in range(top + 1):
            ncols, nrows = tile_grid(width, height, level)
            for col in range(ncols):
                for row in range(nrows):
                    got = decode(src.tile(level, col, row))
                    y0, y1, x0, x1 = tile_bounds(width, height, level, col, row)
                    assert got.shape == (3, y1 - y0, x1 - x0)
                    if level == top:
                        np.testing.assert_array_equal(got, full[:, y0:y1, x0:x1])
    finally:
        src.close()


# ---------------------------------------------------------------- the cache lasts
def test_a_restarted_server_serves_the_same_tiles_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    tiles = [(TOP, 500, 700), (TOP, 501, 700), (TOP - 3, 60, 80), (TOP - 12, 1, 1)]
    with serving(endless(cache)) as server:
        first = {t: get(server, f"/image_files/{t[0]}/{t[1]}_{t[2]}.png")[2] for t in tiles}
        stats = server.source.stats()
        assert stats["tiles_rendered"] == len(tiles) and stats["tiles_from_cache"] == 0
        assert stats["lines"]["computed"] > 0 and stats["lines"]["loaded"] == 0
    # close_source() above finished the cache writes; a new process-like start reads them back
    with serving(endless(cache)) as server:
        for t, data in first.items():
            status, _, body = get(server, f"/image_files/{t[0]}/{t[1]}_{t[2]}.png")
            assert status == 200 and body == data
        stats = server.source.stats()
        assert stats["tiles_rendered"] == 0, stats  # nothing rendered again
        assert stats["tiles_from_store"] == len(tiles)
        # A new neighbour reuses the stored line blocks of its row instead of computing them.
        assert get(server, f"/image_files/{TOP}/502_700.png")[0] == 200
        stats = server.source.stats()
        assert stats["tiles_rendered"] == 1 and stats["lines"]["loaded"] > 0
    # Another seed is another image: nothing is shared with it.
    with serving(endless(cache, seed=1)) as server:
        get(server, f"/image_files/{TOP}/500_700.png")
        assert server.source.stats()["tiles_rendered"] == 1


class _At:
    """``get``'s view of a server in another process: its port."""

    def __init__(self, port: int) -> None:
        self.server_address = ("127.0.0.1", port)


def _start_view(cache: str, *extra: str) -> tuple[subprocess.Popen, _At]:
    """`render.py view --checkpoint BUNDLED --cache CACHE` as its own process (PNG tiles); its address."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "render.py"), "view", "--checkpoint", BUNDLED, "--port", "0",
         "--view", "0,1024,0,1024", "--cache", cache, "--tile-format", "png", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    line = proc.stdout.readline()
    assert "http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    proc.stdout.readline()  # "rendering: ..."
    return proc, _At(int(line.split("http://127.0.0.1:")[1].split("/")[0]))


def _stop_view(proc: subprocess.Popen) -> str:
    """SIGTERM (stops like Ctrl-C: queued cache writes are finished); its stderr."""
    proc.terminate()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return err


DAMAGED = [(TOP, 7, 7), (TOP - 6, 2, 3)]  # one truncated to 300 bytes, one with 40 bytes flipped
WHOLE = (TOP, 8, 7)


def _damage_a_restarted_cache(cache: str, options: list[str], read, write, find) -> None:
    """Serve three tiles, stop; truncate one cached tile, flip 40 bytes of another; restart: both
    are served with the bytes of a fresh render, counted on the page's stats and in the log, and
    their cache entries are whole again; the untouched one comes from the cache."""
    tiles = [*DAMAGED, WHOLE]
    proc, at = _start_view(cache, *options)
    try:
        first = {t: get(at, f"/image_files/{t[0]}/{t[1]}_{t[2]}.png") for t in tiles}
    finally:
        _stop_view(proc)
    assert all(status == 200 for status, _, _ in first.values())
    cut, flipped = find(DAMAGED[0]), find(DAMAGED[1])
    write(cut, read(cut)[:300])
    entry = bytearray(read(flipped))
    for i in range(40):
        entry[40 + 13 * i] ^= 0x5A
    write(flipped, bytes(entry))

    proc, at = _start_view(cache, *options)
    try:
        again = {t: get(at, f"/image_files/{t[0]}/{t[1]}_{t[2]}.png") for t in tiles}
        stats = json.loads(get(at, "/api/info")[2])["endless"]
    finally:
        err = _stop_view(proc)
    fresh = endless()  # memory only: a fresh render of the same tiles
    try:
        for t in tiles:
            status, headers, body = again[t]
            assert status == 200 and headers["Content-Type"] == "image/png", (t, status)
            assert body == first[t][2] == fresh.tile(*t), t
    finally:
        fresh.close()
    assert stats["tiles_damaged"] == 2 and stats["tiles_rendered"] == 2 and stats["tiles_from_store"] == 1, stats
    assert stats["cache"]["damaged"] == 2 and stats["cache"]["unverified"] == 0, stats["cache"]
    logged = [line for line in err.splitlines() if "is damaged" in line]
    assert len(logged) == 2 and "never served" in logged[0], err[-3000:]
    assert any(f"/{t[0]}/{t[1]}_{t[2]}.png" in line for line in logged for t in DAMAGED), logged
    for t in DAMAGED:  # replaced with a whole entry: header + the served bytes
        assert checked(read(find(t))) == (first[t][2], ""), t


def test_a_damaged_cached_tile_is_rendered_again_never_served(tmp_path):
    """A real server over a local cache folder, stopped, damaged, restarted."""
    cache = tmp_path / "cache"

    def find(t):
        (path,) = cache.glob(f"*/tiles/png/{t[0]}/{t[1]}_{t[2]}.png")
        return path

    _damage_a_restarted_cache(str(cache), [], lambda p: p.read_bytes(), lambda p, b: p.write_bytes(b), find)


def test_a_damaged_cached_tile_on_s3_is_rendered_again_never_served(moto_s3):
    """The same on a cache in an S3 bucket (moto_server): the checksum travels in the object."""
    s3fs = pytest.importorskip("s3fs")
    options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": moto_s3, "region_name": "us-east-1"}}
    fs = s3fs.S3FileSystem(key="k", secret="s", client_kwargs={"endpoint_url": moto_s3})
    fs.mkdir("viewcache")

    def find(t):
        fs.invalidate_cache()
        (path,) = [p for p in fs.find("viewcache/c") if p.endswith(f"/tiles/png/{t[0]}/{t[1]}_{t[2]}.png")]
        return path

    _damage_a_restarted_cache(
        "s3://viewcache/c", ["--storage-options", json.dumps(options)], fs.cat_file, fs.pipe_file, find
    )


def test_tile_cache_entries_carry_their_checksum(tmp_path):
    """Each entry is a crc32 header and the bytes; an entry whose bytes or header changed, or an
    entry without the header (an older cache), reads as missing, is counted and deleted."""
    lines: list[str] = []
    cache = TileCache(str(tmp_path / "c"), log=lines.append)
    for name in ("a", "b", "c", "d"):
        cache.put(f"img/{name}.png", name.encode() * 100)
    cache.put("img/image.json", b"{}", checksum=False)
    cache.flush()
    folder = tmp_path / "c" / "img"
    assert (folder / "a.png").read_bytes() == b"crc32:%08x\n" % zlib.crc32(b"a" * 100) + b"a" * 100
    assert (folder / "image.json").read_bytes() == b"{}"
    (folder / "b.png").write_bytes((folder / "b.png").read_bytes()[:-1])  # truncated
    (folder / "c.png").write_bytes(b"crc32:0000zzzz\n" + b"c" * 100)  # a damaged header
    (folder / "d.png").write_bytes(b"d" * 100)  # no header: written before checksums
    cache.close()
    again = TileCache(str(tmp_path / "c"), log=lines.append)
    assert again.get("img/a.png") == b"a" * 100
    got, want = zlib.crc32(b"b" * 99), zlib.crc32(b"b" * 100)
    assert again.read("img/b.png") == (None, f"crc32 {got:08x} of 99 bytes, {want:08x} when written")
    assert again.read("img/c.png") == (None, "its checksum header is damaged")
    assert again.read("img/d.png") == (None, "unverified")
    assert again.stats()["damaged"] == 2 and again.stats()["unverified"] == 1
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "image.json"]  # the bad ones are gone
    assert len(lines) == 3 and "img/b.png is damaged" in lines[0] and "without a checksum" in lines[2], lines
    again.close()


def test_tile_cache_evicts_least_recently_used_beyond_its_bound(tmp_path):
    """Writes past max_bytes delete the least recently used files down to 90 %; reads refresh an entry."""
    cache = TileCache(str(tmp_path / "c"), max_bytes=10_000)
    for i in range(8):
        cache.put(f"img/tiles/{i}.png", bytes(1000))
        cache.flush()
        os.utime(tmp_path / "c" / "img" / "tiles" / f"{i}.png", (1000 + i, 1000 + i))  # distinct mtimes
    assert cache.get("img/tiles/0.png") == bytes(1000)  # 0 becomes the most recently used
    for i in range(8, 11):
        cache.put(f"img/tiles/{i}.png", bytes(1000))
    cache.flush()
    kept = sorted(p.name for p in (tmp_path / "c" / "img" / "tiles").iterdir())
    assert cache.bytes <= 10_000 and cache.evicted == 2
    assert "0.png" in kept and "1.png" not in kept and "2.png" not in kept and "10.png" in kept
    cache.close()
    # A restart rebuilds the index from the files (order: modification time, which reads refresh).
    again = TileCache(str(tmp_path / "c"), max_bytes=10_000)
    assert again.bytes == cache.bytes and len(again) == len(kept)
    again.close()
    # A smaller bound at start evicts at once.
    small = TileCache(str(tmp_path / "c"), max_bytes=3_000)
    assert small.bytes <= 3_000 and len(list((tmp_path / "c" / "img" / "tiles").iterdir())) == 2
    small.close()


# ---------------------------------------------------------------- scheduling for a person
def test_an_abandoned_request_is_not_rendered():
    with serving(endless()) as server:
        src = server.source
        with src.scheduler.hold():  # nothing starts: the request waits in the queue
            s = send_raw(server, f"/image_files/{TOP}/9_9.png")
            wait_until(lambda: src.scheduler.counts()["queued"] == 1, "the request to be queued")
            s.close()  # the browser gave up on it (OpenSeadragon / the page aborted the fetch)
            wait_until(lambda: src.scheduler.abandoned == 1, "the request to be dropped")
        assert src.scheduler.counts() == {"queued": 0, "rendering": 0}
        # The worker is free and renders what is still wanted; the abandoned tile never was.
        assert get(server, f"/image_files/{TOP}/10_9.png")[0] == 200
        stats = src.stats()
        assert stats["tiles_rendered"] == 1 and stats["tiles_abandoned"] == 1
        assert (TOP, 9, 9) not in src._memory


def test_client_gone_sees_a_closed_peer_even_beyond_1024_descriptors():
    """The check must work in a busy process (Ray, browsers): select() fails past descriptor 1023."""
    import resource

    from viewer.schedule import client_gone

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the descriptor limit ({hard}) is below 1200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200) if soft != resource.RLIM_INFINITY else soft, hard))
    spare = [open(os.devnull) for _ in range(1100)]  # held open on purpose
    try:
        a, b = socket.socketpair()
        assert b.fileno() > 1024
        assert not client_gone(b)
        a.sendall(b"x")  # readable with data: a pipelined request, not a close
        assert not client_gone(b)
        a.close()
        b.recv(1)
        assert client_gone(b)
        b.close()
    finally:
        for f in spare:
            f.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_worker_drops_a_job_whose_clients_left_before_it_started():
    """The worker-side check: a queued job whose every request has gone is dropped, not run."""
    from viewer.schedule import TileScheduler

    ran = []
    sched = TileScheduler([lambda key: ran.append(key) or b"tile"])
    try:
        with sched.hold():
            gone, _ = sched.submit((5, 0, 0), "a", lambda: False)  # its client closed while it waited
            live, waiter = sched.submit((5, 1, 0), "a", lambda: True)
        assert sched.wait(live, waiter) == b"tile"
        assert gone.done.wait(60) and gone.state == "dropped"
        assert ran == [(5, 1, 0)] and (sched.rendered, sched.abandoned) == (1, 1)
    finally:
        sched.close()


def test_identical_concurrent_requests_render_once_and_newest_goes_first():
    with serving(endless(threads=1)) as server:
        src = server.source
        with src.scheduler.hold():
            a = send_raw(server, f"/image_files/{TOP}/1_1.png")
            wait_until(lambda: src.scheduler.counts()["queued"] == 1, "the first request")
            c = send_raw(server, f"/image_files/{TOP}/2_1.png")
            wait_until(lambda: src.scheduler.counts()["queued"] == 2, "the second tile")
            b = send_raw(server, f"/image_files/{TOP}/1_1.png")  # asked for again: joins, and is newest now
            wait_until(lambda: src.scheduler.joined == 1, "the repeated request to join the first")
        (sa, ba), (sb, bb), (sc, _) = read_raw(a), read_raw(b), read_raw(c)
        assert sa == sb == sc == 200 and ba == bb
        assert src.stats()["tiles_rendered"] == 2
        assert list(src._memory) == [(TOP, 1, 1), (TOP, 2, 1)]  # one worker: rendered newest first


def test_bounded_queue_and_per_client_cap_answer_503():
    with serving(endless(per_client=2, queue_max=3)) as server:
        src = server.source
        with src.scheduler.hold():
            waiting = [send_raw(server, f"/image_files/{TOP}/{i}_0.png") for i in range(2)]
            wait_until(lambda: src.scheduler.counts()["queued"] == 2, "two queued requests")
            status, hdr, body = get(server, f"/image_files/{TOP}/5_0.png")
            assert status == 503 and hdr["Retry-After"] == "1" and b"at most 2" in body
            # Another client still gets in, until the queue itself is full (3).
            waiting.append(send_raw(server, f"/image_files/{TOP}/2_0.png", source="127.0.0.2"))
            wait_until(lambda: src.scheduler.counts()["queued"] == 3, "the other client's request")
            full = send_raw(server, f"/image_files/{TOP}/3_0.png", source="127.0.0.2")
            status, body = read_raw(full)
            assert status == 503 and b"3 waiting" in body
            # The page, the DZI and the metadata never wait behind tiles.
            assert get(server, "/")[0] == 200 and get(server, "/image.dzi")[0] == 200
            assert json.loads(get(server, "/api/info")[2])["endless"]["queued"] == 3
        assert [read_raw(s)[0] for s in waiting] == [200, 200, 200]


@pytest.mark.parametrize(
    "path",
    [
        f"/image_files/{TOP + 1}/0_0.png",  # beyond the deepest level
        "/image_files/-1/0_0.png",  # negative level
        f"/image_files/{TOP}/-3_0.png",  # negative column
        f"/image_files/{TOP}/4129_0.png",  # one column beyond the level (4129 tiles: 0..4128)
        f"/image_files/{TOP}/0_4129.png",
        "/image_files/3/8_0.png",  # beyond a coarse level (8x8 px: one tile)
        "/image_files/x/0_0.png",  # non-numeric
        f"/image_files/{TOP}/a_b.png",
        f"/image_files/{TOP}/99999999999999999999_0.png",  # huge
        "/image_files/99999/0_0.png",
        f"/image_files/{TOP}/0_0.jpeg",  # the other format
        f"/image_files/{TOP}/0_0.gif",
        f"/image_files/{TOP}/0_0",
    ],
)
def test_bad_tile_requests_are_404_with_one_line_and_no_work(endless_server, path):
    src = endless_server.source
    before = src.stats()
    status, hdr, body = get(endless_server, path)
    assert status == 404 and hdr["Content-Type"].startswith("text/plain")
    assert body.endswith(b"\n") and body.count(b"\n") == 1, body
    after = src.stats()
    for key in ("tiles_rendered", "tiles_from_cache", "tiles_abandoned", "requests_joined", "queued", "rendering"):
        assert after[key] == before[key], key
    assert after["lines"]["computed"] == before["lines"]["computed"]


@pytest.fixture(scope="module")
def endless_server():
    with serving(endless()) as server:
        yield server


# ---------------------------------------------------------------- access
def test_remote_bind_requires_the_token():
    with serving(endless(), host="0.0.0.0", allow_remote=True) as server:
        token = server.token
        assert token and len(token) >= 32 and f"?token={token}" in server.url
        for path in ("/", "/api/info", "/image.dzi", f"/image_files/{TOP}/0_0.png", f"/?token={token[:-1]}x"):
            status, _, body = get(server, path)
            assert status == 403 and b"token" in body, path
        assert server.source.stats()["tiles_rendered"] == 0
        status, hdr, _ = get(server, f"/?token={token}")
        assert status == 200
        cookie = hdr["Set-Cookie"]
        assert cookie.startswith(f"creps_token_{server.server_address[1]}={token}") and "HttpOnly" in cookie
        jar = {"Cookie": cookie.split(";", 1)[0]}
        assert get(server, "/api/info", jar)[0] == 200
        assert get(server, f"/image_files/{TOP}/0_0.png", jar)[0] == 200
        assert get(server, "/api/info", {"Cookie": jar["Cookie"][:-2] + "zz"})[0] == 403


def test_loopback_is_token_free_and_remote_needs_allow_remote():
    with serving(endless()) as server:
        assert server.token is None and server.server_address[0] == "127.0.0.1"
        assert get(server, "/api/info")[0] == 200


# ---------------------------------------------------------------- CLI
def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(argv)


@pytest.mark.parametrize(
    "argv,message",
    [
        ([], "either URL_OR_DZI"),
        (["out/x.zarr", "--checkpoint", BUNDLED], "either URL_OR_DZI"),
        (["out/x.zarr", "--seed", "3"], "--seed only apply to --checkpoint"),
        (["--checkpoint", BUNDLED, "--size", "0x5"], "1..2^20"),
        (["--checkpoint", BUNDLED, "--size", "2097152"], "1..2^20"),
        (["--checkpoint", BUNDLED, "--size", "wide"], "WIDTHxHEIGHT"),
        (["--checkpoint", BUNDLED, "--view", "1,1,0,1"], "is empty"),
        (["--checkpoint", BUNDLED, "--view", "0,1,nan,1"], "finite"),
        (["--checkpoint", BUNDLED, "--scale", "1e9"], "1..2^20"),
        (["--checkpoint", BUNDLED, "--cache-max-gb", "-1"], ">= 0"),
        (["--checkpoint", "nope.safetensors"], "nope.safetensors"),
        (["--checkpoint", "preset:nope"], "nope"),
        (["--checkpoint", BUNDLED, "--host", "0.0.0.0"], "--allow-remote"),
    ],
)
def test_cli_bad_input_is_one_line(capsys, argv, message):
    assert cli.run(parse([*argv, "--port", "0"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_cuda_workers_beyond_the_gpus_are_refused_at_start(capsys, monkeypatch):
    """Each CUDA actor takes a whole GPU (num_gpus=1): one more would wait, unscheduled, until the
    300 s start timeout.  Refused in one line before the model loads or Ray starts (the GPU count faked)."""
    import ray

    from viewer.endless import check_cuda_workers
    from viewer.errors import ViewerError

    started = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append(a))  # (Ray may be up from other tests)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_cuda_workers("cuda", 2, None)  # one actor per GPU
    check_cuda_workers("cpu", 3, None)  # CPU actors need no GPU
    check_cuda_workers("cuda", 0, None)  # in process: no actors
    check_cuda_workers("cuda", 3, "10.0.0.1:6379")  # a cluster: checked against its own GPUs once joined
    with pytest.raises(ViewerError, match="the Ray cluster at 10.0.0.1:6379 has 2: use --workers 2 or fewer"):
        check_cuda_workers("cuda", 3, "10.0.0.1:6379", gpus=2.0)
    argv = ["--checkpoint", BUNDLED, "--device", "cuda", "--cache-max-gb", "0", "--port", "0"]
    assert cli.run(parse([*argv, "--workers", "3"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(
        "--workers 3 --device cuda needs one GPU per actor, but this machine has 2: use --workers 2 or fewer"
    ), err
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert cli.run(parse([*argv, "--workers", "1"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("but this machine has 0: use --device cpu"), err
    assert started == []  # refused before Ray was started


def test_render_py_view_checkpoint_serves_on_loopback(tmp_path):
    """`render.py view --checkpoint ...` binds 127.0.0.1, prints its URL and renders tiles on request."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "render.py"), "view", "--checkpoint", BUNDLED, "--port", "0",
         "--view", "0,1024,0,1024", "--cache", str(tmp_path / "cache"), "--tile-format", "png"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line and "endless zoom" in line, (line, proc.stderr.read() if proc.poll() else "")
        assert "in-process" in proc.stdout.readline()
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])

        class At:
            server_address = ("127.0.0.1", port)

        info = json.loads(get(At, "/api/info")[2])
        assert info["mode"] == "endless" and info["width"] == SIDE and info["view"] == list(VIEW)
        assert get(At, f"/image_files/{TOP}/7_7.png")[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert proc.returncode in (0, -15)
    assert list((tmp_path / "cache").glob("*/tiles/png/20/7_7.png"))  # written before the server ended


# ---------------------------------------------------------------- Ray actors
def test_ray_actor_renders_the_same_tiles(render_ray):
    """--workers: the same bytes from a Ray actor as in-process."""
    local = endless(checkpoint="preset:tiny", width=4096, height=4096, view=(0, 4, 0, 4))
    remote = endless(checkpoint="preset:tiny", width=4096, height=4096, view=(0, 4, 0, 4), workers=1)
    assert "Ray" in remote.engine.describe()
    try:
        for key in ((12, 5, 7), (9, 1, 0)):
            assert remote.tile(*key) == local.tile(*key)
        assert remote.stats()["tiles_rendered"] == 2
    finally:
        remote.close()
        local.close()


def test_render_py_ends_with_the_endless_zoom_command(render_ray, tmp_path, capsys):
    """The default job's last lines: today's view command, then the endless one, which is a valid command."""
    import shlex

    from conftest import tiny_job

    from jobs import cli as jobs_cli
    from jobs.run import run_job

    spec = tiny_job(str(tmp_path / "demo.zarr"), height=64, width=64, tile=64)
    assert run_job(spec, progress=False).status == "done"
    jobs_cli._exports(spec.out, {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("view it: ") and "render.py view " in lines[-2] and lines[-2].endswith(".dzi")
    assert lines[-1].startswith("endless zoom: ") and "default.safetensors" in lines[-1]
    argv = shlex.split(lines[-1].split("render.py view ", 1)[1])
    opts = cli.endless_options(parse(argv), None)
    assert (opts["width"], opts["height"], opts["view"]) == (SIDE, SIDE, VIEW)
    assert os.path.samefile(parse(argv).checkpoint, BUNDLED)  # relative to where render.py runs
