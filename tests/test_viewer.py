"""The viewer server over real HTTP on 127.0.0.1: page, info, DZI XML, tiles, safety."""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from conftest import mark_tile, serving
from PIL import Image

from renderer.store import open_store
from viewer import ViewerError, cli, tiles
from viewer.server import check_bind, make_server, open_source, split_path
from viewer.tiles import StoreTiles, level_size, max_level, tile_bounds

ROOT = Path(__file__).resolve().parents[1]
H, W, CHUNK = 500, 700, 128


# ---------------------------------------------------------------- helpers
def get(addr, path, method="GET", headers=None):
    """(status, headers, body) of one request; path is sent exactly as given (not normalised)."""
    conn = http.client.HTTPConnection(*addr, timeout=30)
    try:
        conn.putrequest(method, path, skip_host="Host" in (headers or {}), skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def raw_request(addr, request_line: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    """Send a request line byte for byte over a socket (no client-side cleaning)."""
    with socket.create_connection(addr, timeout=30) as s:
        s.sendall(f"{request_line}\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode("latin-1"))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def decode(body: bytes) -> np.ndarray:
    """Image bytes -> (3, h, w) uint8."""
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).transpose(2, 0, 1)


def ref_level(img: np.ndarray, f: int) -> np.ndarray:
    """Reference area mean by f x f blocks (edge blocks: mean of their valid pixels, half up)."""
    c, h, w = img.shape
    oh, ow = -(-h // f), -(-w // f)
    out = np.zeros((c, oh, ow), np.uint8)
    for y in range(oh):
        for x in range(ow):
            block = img[:, y * f : (y + 1) * f, x * f : (x + 1) * f].astype(np.int64)
            n = block.shape[1] * block.shape[2]
            out[:, y, x] = (block.sum(axis=(1, 2)) + n // 2) // n
    return out


def make_store(path: Path, img: np.ndarray | None, meta: dict | None = None, chunk: int = CHUNK) -> str:
    url = str(path)
    s = open_store(url, mode="w")
    h, w = (H, W) if img is None else img.shape[1:]
    s.create_level(0, h, w, chunk)
    if img is not None:
        s.write_region(0, 0, 0, img)
    if meta:
        s.update_meta(**meta)
    return url


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (3, H, W), dtype=np.uint8)


@pytest.fixture(scope="module")
def store_url(tmp_path_factory, image) -> str:
    meta = {
        "spec": {"seed": 42, "psi": 0.7, "checkpoint": "tiny.safetensors", "height": H, "width": W},
        "checkpoint_sha256": "0123456789abcdef" * 4,
        "tiles_total": 6,
        "status": "running",
    }
    url = make_store(tmp_path_factory.mktemp("v") / "img.zarr", image, meta)
    s = open_store(url)
    for i in range(4):
        mark_tile(s, f"r0_c{i}", {"i": i})
    return url


@pytest.fixture(scope="module")
def png_server(store_url):
    with serving(StoreTiles(store_url, fmt="png")) as server:
        addr = server.server_address[:2]
        yield addr


# ---------------------------------------------------------------- page and info
def test_page_and_openseadragon_assets(png_server):
    status, hdr, body = get(png_server, "/")
    assert status == 200 and hdr["Content-Type"].startswith("text/html")
    assert b"/osd/openseadragon.min.js" in body and b"/static/viewer.js" in body
    for path in ("/osd/openseadragon.min.js", "/osd/images/home_rest.png", "/static/viewer.js", "/static/viewer.css"):
        status, _, body = get(png_server, path)
        assert status == 200 and body, path
    status, _, body = get(png_server, "/", method="HEAD")
    assert status == 200 and body == b""


def test_api_info_reports_job_and_progress(png_server):
    status, hdr, body = get(png_server, "/api/info")
    assert status == 200 and hdr["Content-Type"] == "application/json"
    info = json.loads(body)
    assert (info["width"], info["height"]) == (W, H)
    assert info["mode"] == "zarr" and info["tile_source"] == "/image.dzi"
    assert (info["tiles_done"], info["tiles_total"]) == (4, 6)
    assert info["seed"] == 42 and info["psi"] == 0.7 and info["checkpoint"] == "tiny.safetensors"
    assert info["checkpoint_sha256"] == "0123456789abcdef" * 4
    # the metadata says running, but no process holds the store: the viewer says so
    assert info["status"] == "interrupted" and info["error"] is None
    assert info["dzi_levels"] == max_level(W, H) + 1 == 11


def test_api_info_tolerates_missing_metadata(tmp_path, image):
    src = StoreTiles(make_store(tmp_path / "bare.zarr", image))
    info = src.info()
    assert info["tiles_done"] == 0 and info["tiles_total"] is None
    assert info["seed"] is None and info["checkpoint"] is None and info["meta"] == {}


# ---------------------------------------------------------------- tiles
def test_virtual_dzi_xml(png_server):
    status, _, body = get(png_server, "/image.dzi")
    assert status == 200
    node = ET.fromstring(body)
    assert node.tag == "{http://schemas.microsoft.com/deepzoom/2008}Image"
    assert (node.get("Format"), node.get("TileSize"), node.get("Overlap")) == ("png", "254", "1")
    size = node[0]
    assert (size.get("Width"), size.get("Height")) == (str(W), str(H))


@pytest.mark.parametrize("col,row", [(0, 0), (1, 0), (2, 1), (1, 1)])
def test_full_resolution_tiles_equal_the_store(png_server, image, col, row):
    top = max_level(W, H)
    status, hdr, body = get(png_server, f"/image_files/{top}/{col}_{row}.png")
    assert status == 200 and hdr["Content-Type"] == "image/png"
    y0, y1, x0, x1 = tile_bounds(W, H, top, col, row)
    np.testing.assert_array_equal(decode(body), image[:, y0:y1, x0:x1])


def test_coarse_levels_are_area_means_of_level0(png_server, image):
    """Every DZI level of a level-0-only store, against a numpy block mean of level 0."""
    top = max_level(W, H)
    for level in range(top + 1):
        f = 2 ** (top - level)
        ref = ref_level(image, f)
        assert ref.shape[1:] == level_size(W, H, level)[::-1]
        y0, y1, x0, x1 = tile_bounds(W, H, level, 0, 0)
        status, _, body = get(png_server, f"/image_files/{level}/0_0.png")
        assert status == 200
        np.testing.assert_array_equal(decode(body), ref[:, y0:y1, x0:x1], err_msg=f"level {level}")


def test_strided_read_caps_source_pixels(tmp_path, image, monkeypatch):
    """Beyond MAX_SOURCE_SIDE source pixels per tile side, a tile averages a regular subsample."""
    monkeypatch.setattr(tiles, "MAX_SOURCE_SIDE", 360)
    src = StoreTiles(make_store(tmp_path / "s.zarr", image), fmt="png")
    top = max_level(W, H)
    sub = image[:, ::2, ::2]
    for level, b in ((top - 3, 4), (top - 2, 2)):  # 704 / 700 source px per side -> stride 2, then b x b means
        got = decode(src.tile(level, 0, 0))
        np.testing.assert_array_equal(got, ref_level(sub, b)[:, : got.shape[1], : got.shape[2]])
    got = decode(src.tile(top - 1, 0, 0))  # 508 source px: stride 2 = the whole factor, plain subsample
    np.testing.assert_array_equal(got, sub[:, : got.shape[1], : got.shape[2]])


def test_pyramid_levels_are_read_when_listed(tmp_path, image):
    """Levels 1..n are used once the OME metadata lists them (a half-built level is not)."""
    url = make_store(tmp_path / "p.zarr", image)
    s = open_store(url)
    for i, value in ((1, 17), (2, 99)):
        h, w = -(-H // 2**i), -(-W // 2**i)
        s.create_level(i, h, w, CHUNK)
        s.write_region(i, 0, 0, np.full((3, h, w), value, np.uint8))
    top = max_level(W, H)
    s.write_ome()  # lists 0, 1, 2
    src = StoreTiles(url, fmt="png")
    assert (decode(src.tile(top - 1, 0, 0)) == 17).all()
    assert (decode(src.tile(top - 2, 0, 0)) == 99).all()
    assert (decode(src.tile(top - 3, 0, 0)) == 99).all()  # averaged from level 2
    # Level 2 not listed any more -> level 2's factor is averaged from level 1.
    attrs = s.group.attrs["ome"]
    attrs["multiscales"][0]["datasets"] = attrs["multiscales"][0]["datasets"][:2]
    s.group.attrs["ome"] = attrs
    src = StoreTiles(url, fmt="png")
    assert (decode(src.tile(top - 2, 0, 0)) == 17).all()


def test_levels_of_a_built_pyramid_are_served(tmp_path, image):
    """With renderer.pyramid's levels, DZI level max-i is zarr level i, pixel for pixel."""
    from renderer.pyramid import build_levels
    from renderer.store import PYRAMID_PROGRESS

    url = make_store(tmp_path / "bp.zarr", image)
    s = open_store(url)
    n = build_levels(s, workers=2)
    assert n >= 3
    src = StoreTiles(url, fmt="png")
    assert src.info()["zarr_levels"] == n
    top = max_level(W, H)
    for i in range(1, n):
        y0, y1, x0, x1 = tile_bounds(W, H, top - i, 0, 0)
        np.testing.assert_array_equal(decode(src.tile(top - i, 0, 0)), s.read_region(i, y0, y1, x0, x1))
    # A level that the progress file says is unfinished (a resumed build) is not read.
    path = tmp_path / "bp.zarr" / PYRAMID_PROGRESS
    record = json.loads(path.read_text())
    record["rows"]["2"] = 0
    path.write_text(json.dumps(record))
    assert StoreTiles(url, fmt="png").info()["zarr_levels"] == 2


def test_jpeg_tiles_match_loosely(tmp_path):
    y, x = np.mgrid[0:H, 0:W]
    img = np.stack([x * 255 // (W - 1), y * 255 // (H - 1), (x + y) * 255 // (W + H)]).astype(np.uint8)
    with serving(StoreTiles(make_store(tmp_path / "j.zarr", img), fmt="jpeg", quality=90)) as server:
        addr = server.server_address[:2]
        top = max_level(W, H)
        status, hdr, body = get(addr, f"/image_files/{top}/1_1.jpeg")
        assert status == 200 and hdr["Content-Type"] == "image/jpeg"
        y0, y1, x0, x1 = tile_bounds(W, H, top, 1, 1)
        diff = np.abs(decode(body).astype(int) - img[:, y0:y1, x0:x1])
        assert diff.mean() < 2 and diff.max() < 24
        assert get(addr, f"/image_files/{top}/1_1.png")[0] == 404  # wrong format for this source


def test_bad_tile_requests_are_404(png_server):
    top = max_level(W, H)
    for path in (
        f"/image_files/{top + 1}/0_0.png",
        f"/image_files/{top}/3_0.png",
        f"/image_files/{top}/0_2.png",
        "/image_files/0/0_0.gif",
        "/image_files/x/0_0.png",
        "/image_files/1/-1_0.png",
        "/nothing",
    ):
        assert get(png_server, path)[0] == 404, path


def test_tiles_refresh_while_a_render_progresses(tmp_path):
    """Unwritten chunks read as black; once new pixels and a marker land, the same tile shows them."""
    url = make_store(tmp_path / "live.zarr", None, {"tiles_total": 2})
    src = StoreTiles(url, fmt="png", refresh_s=0.0)
    with serving(src) as server:
        addr = server.server_address[:2]
        top = max_level(W, H)
        info0 = json.loads(get(addr, "/api/info")[2])
        assert (decode(get(addr, f"/image_files/{top}/0_0.png")[2]) == 0).all()
        s = open_store(url)
        s.write_region(0, 0, 0, np.full((3, 256, 256), 200, np.uint8))
        mark_tile(s, "r0_c0", {})
        info1 = json.loads(get(addr, "/api/info")[2])
        assert info1["tiles_done"] == 1 and info1["version"] != info0["version"]
        assert (decode(get(addr, f"/image_files/{top}/0_0.png")[2]) == 200).all()


# ---------------------------------------------------------------- safety
TRAVERSALS = [
    "/static/../../render.py",
    "/static/../cli.py",
    "/../../../../etc/passwd",
    "/static/%2e%2e/%2e%2e/render.py",
    "/static/%2e%2e%2f%2e%2e%2frender.py",
    "/static/..%2f..%2frender.py",
    "/static/%2E%2E%2Fcli.py",
    "/osd/..%5c..%5cpackage.json",
    "/osd/%2e%2e/%2e%2e/%2e%2e/package.json",
    "/static/./viewer.js",
    "//etc/passwd",
    "/etc/passwd",
    "/static//etc/passwd",
    "/static/%2fetc%2fpasswd",
    "/static/%00",
    "/static/%ff%fe",
    "/image_files/../image.dzi",
]


def test_traversal_attempts_are_refused(png_server):
    for path in TRAVERSALS:
        status, body = raw_request(png_server, f"GET {path} HTTP/1.1")
        assert status in (403, 404), path
        assert b"import" not in body and b"root:" not in body and b"openseadragon" not in body, path
    status, _ = raw_request(png_server, "GET http://127.0.0.1/etc/passwd HTTP/1.1")
    assert status in (400, 403, 404)


def test_split_path_rules():
    assert split_path("/") == []
    assert split_path("/osd/images/a.png?x=1") == ["osd", "images", "a.png"]
    assert split_path("/a%20b") == ["a b"]
    for bad in ("/a/../b", "/%2e%2e/x", "/a/..%2fb", "//x", "/a/./b", "x", "/a\\b", "/a%5cb"):
        assert split_path(bad) is None, bad


def test_only_get_and_head(png_server):
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        assert get(png_server, "/", method=method)[0] == 405, method


def test_foreign_host_header_refused(png_server):
    """DNS rebinding: a loopback server answers only to loopback Host names."""
    assert get(png_server, "/api/info", headers={"Host": "evil.example:80"})[0] == 403
    assert get(png_server, "/api/info", headers={"Host": "localhost:1"})[0] == 200


def test_non_loopback_bind_refused(store_url, capsys):
    src = open_source(store_url)
    with pytest.raises(ViewerError, match="--allow-remote"):
        make_server(src, "0.0.0.0", 0)
    with pytest.raises(ViewerError, match="--allow-remote"):
        make_server(src, "192.168.1.10", 0)
    assert check_bind("0.0.0.0", allow_remote=True) is False  # explicitly allowed: no error
    assert check_bind("127.0.0.2", allow_remote=False) and check_bind("::1", False) and check_bind("localhost", False)
    parser = __import__("argparse").ArgumentParser()
    cli.add_arguments(parser)
    assert cli.run(parser.parse_args([store_url, "--host", "0.0.0.0", "--port", "0"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--allow-remote" in err[0]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["STORE", "--storage-options", "{bad"], "not valid JSON"),
        (["STORE", "--storage-options", "[1]"], "JSON object"),
        (["MISSING"], "no image store"),
        (["MISSING.dzi"], "cannot read"),
        (["STORE", "--port", "70000"], "not a TCP port"),
        (["STORE", "--quality", "0"], "error: --quality 0 must be in 1..100"),
    ],
)
def test_cli_bad_input_one_line(store_url, tmp_path, capsys, argv, message):
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = [a.replace("STORE", store_url).replace("MISSING", str(tmp_path / "nope")) for a in argv]
    assert cli.run(parser.parse_args(args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_render_py_view_prints_url_and_serves(store_url):
    """The real entry point: `render.py view STORE --port 0` prints its URL and answers on it."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "render.py"), "view", store_url, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        status, _, body = get(("127.0.0.1", port), "/api/info")
        assert status == 200 and json.loads(body)["tiles_done"] == 4
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---------------------------------------------------------------- exported DZI
@pytest.fixture(scope="module")
def dzi_dir(tmp_path_factory, image) -> Path:
    import pyvips

    d = tmp_path_factory.mktemp("dzi")
    rgb = np.ascontiguousarray(image.transpose(1, 2, 0))
    vimg = pyvips.Image.new_from_memory(rgb.tobytes(), W, H, 3, "uchar")
    vimg.dzsave(str(d / "out"), tile_size=254, overlap=1, suffix=".jpeg[Q=90]")
    (d / "secret.txt").write_text("root: do not serve me")
    os.symlink(d / "secret.txt", d / "out_files" / "leak.jpeg")
    os.symlink(d, d / "out_files" / "up")
    return d


def test_exported_dzi_is_served(dzi_dir):
    src = open_source(str(dzi_dir / "out.dzi"))
    with serving(src) as server:
        addr = server.server_address[:2]
        info = json.loads(get(addr, "/api/info")[2])
        assert info["mode"] == "dzi" and info["tile_source"] == "/dzi/out.dzi"
        assert (info["width"], info["height"]) == (W, H)
        status, _, body = get(addr, "/dzi/out.dzi")
        assert status == 200 and ET.fromstring(body).get("TileSize") == "254"
        top = max_level(W, H)
        for level in (top, top - 2, 0):
            status, hdr, body = get(addr, f"/dzi/out_files/{level}/0_0.jpeg")
            assert status == 200 and hdr["Content-Type"] == "image/jpeg"
            y0, y1, x0, x1 = tile_bounds(W, H, level, 0, 0)
            assert decode(body).shape == (3, y1 - y0, x1 - x0)
        for path in (
            "/dzi/secret.txt",
            "/dzi/out_files/leak.jpeg",  # symlink to a file outside the pyramid
            "/dzi/out_files/up/secret.txt",  # symlinked folder
            "/dzi/out_files/../secret.txt",
            "/dzi/out_files/%2e%2e/secret.txt",
            "/dzi/out_files%2f..%2fsecret.txt",
            "/image.dzi",
        ):
            status, body = raw_request(addr, f"GET {path} HTTP/1.1")
            assert status in (403, 404), path
            assert b"do not serve" not in body, path


def test_tile_cache_is_bounded(tmp_path, image):
    src = StoreTiles(make_store(tmp_path / "c.zarr", image), fmt="png", cache_tiles=3)
    top = max_level(W, H)
    for col in range(3):
        for row in range(2):
            src.tile(top, col, row)
    assert len(src._cache) == 3
    last = src.tile(top, 2, 1)  # the most recent tile is a cache hit: the very bytes kept
    assert last is src.tile(top, 2, 1) and len(src._cache) == 3


# ---------------------------------------------------------------- a store on S3 (moto on 127.0.0.1)
@pytest.fixture(scope="module")
def s3_options():
    """A real S3 endpoint: moto_server on a free 127.0.0.1 port, for the module."""
    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():
        pytest.skip("moto_server is not installed in this environment")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("moto_server did not start")
                time.sleep(0.2)
        yield {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_store_on_s3_is_served(s3_options, image):
    import s3fs

    s3fs.S3FileSystem(**s3_options).mkdir("viewer-bucket")
    url = "s3://viewer-bucket/img.zarr"
    s = open_store(url, s3_options, mode="w")
    s.create_level(0, H, W, CHUNK)
    s.write_region(0, 0, 0, image)
    s.update_meta(tiles_total=3, spec={"seed": 5})
    mark_tile(s, "r0_c0", {})
    with serving(open_source(url, s3_options, fmt="png")) as server:
        addr = server.server_address[:2]
        info = json.loads(get(addr, "/api/info")[2])
        assert (info["width"], info["tiles_done"], info["tiles_total"], info["seed"]) == (W, 1, 3, 5)
        top = max_level(W, H)
        y0, y1, x0, x1 = tile_bounds(W, H, top, 2, 1)
        status, _, body = get(addr, f"/image_files/{top}/2_1.png")
        assert status == 200
        np.testing.assert_array_equal(decode(body), image[:, y0:y1, x0:x1])
        status, _, body = get(addr, "/image_files/0/0_0.png")
        assert status == 200 and decode(body).shape == (3, 1, 1)
