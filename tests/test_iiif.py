"""IIIF Image API 3.0 (level 2) and the Presentation manifest of `render.py view`, with real clients.

The IIIF community's validator (PyPI ``iiif-validator``) against ``render.py
view`` of a store holding its own test image; the protocol's details over
real HTTP for a store and an exported DZI (exact full-resolution regions,
rotation, mirror, qualities, canonical numbers, errors, tokens); an endless
1048576² canvas of the bundled model (deep regions equal the creps API crop,
downscaled requests equal the DeepZoom levels, ``^`` requests are CREPS at
the finer sampling, requests over maxArea cost nothing); Mirador and
OpenSeadragon's IIIF tile source in headless Chromium.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, VENV_BIN, free_port, render_cli_env, serving, wait_port
from PIL import Image

import creps
from creps.scaling import window_canvas
from renderer.store import open_store
from viewer.endless import open_endless
from viewer.server import open_source

BUNDLED = str(REPO / "creps" / "weights" / "default.safetensors")
SIDE = 2**20
VIEW = (0.0, 65536.0, 0.0, 65536.0)  # a wide window: the deepest level has detail beyond interpolation
CHROMIUM = "/usr/bin/chromium"
MIRADOR = REPO / "viewer" / "node_modules" / "mirador" / "dist" / "mirador.min.js"


# ---------------------------------------------------------------- helpers
def get(server, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=300)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def decode(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).transpose(2, 0, 1)


def validator_image() -> np.ndarray:
    """The validator's test image: 1000x1000, 10x10 squares of 100 px, square (column x, row y) in
    ``ValidationInfo().colorInfo[x][y]``."""
    from iiif_validator.validator import ValidationInfo

    colours = np.array(ValidationInfo().colorInfo, np.uint8)  # [x][y] -> rgb
    squares = colours.transpose(2, 1, 0)  # (3, row y, column x)
    return np.repeat(np.repeat(squares, 100, axis=1), 100, axis=2)


def make_store(path: Path, img: np.ndarray, chunk: int = 256) -> str:
    """A finished store holding ``img`` (the public store API; `render.py import` makes the same)."""
    url = str(path)
    s = open_store(url, mode="w")
    s.create_level(0, img.shape[1], img.shape[2], chunk)
    s.write_region(0, 0, 0, img)
    s.update_meta(status="done", spec={"seed": 7, "psi": 0.5, "checkpoint": "test-image"})
    return url


def pattern(h: int, w: int) -> np.ndarray:
    """Every pixel different from its neighbours: an exact-equality test catches any off-by-one."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 7 + y) % 256, (y * 5 + x * 3) % 256, (x * y) % 251]).astype(np.uint8)


# ---------------------------------------------------------------- the IIIF validator
def test_the_iiif_validator_passes_every_level_2_test_against_render_py_view(tmp_path):
    """All of iiif-validator's tests up to compliance level 2 for version 3.0, against the CLI."""
    url = make_store(tmp_path / "validator.zarr", validator_image())
    port = free_port()
    argv = [sys.executable, str(REPO / "render.py"), "view", url, "--port", str(port)]
    server = subprocess.Popen(argv, env=render_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_port(port, timeout=120)
        validate = [sys.executable, str(VENV_BIN / "iiif-validate.py"), "-s", f"127.0.0.1:{port}", "-p", "iiif/3"]
        validate += ["-i", "image", "--version", "3.0", "--level", "2"]
        run = subprocess.run(validate, capture_output=True, text=True, timeout=600, env=render_cli_env())
    finally:
        server.terminate()
        server.wait(30)
    out = run.stdout + run.stderr
    passed = re.findall(r"test (\w+) PASS", out)
    assert run.returncode == 0 and "Done (33 tests, 0 failures)" in out, out
    for name in ("info_json", "id_squares", "region_percent", "rot_full_basic", "size_bwh", "quality_bitonal"):
        assert name in passed, out


# ---------------------------------------------------------------- a store, over HTTP
@pytest.fixture(scope="module")
def store_server(tmp_path_factory):
    img = pattern(300, 500)
    url = make_store(tmp_path_factory.mktemp("iiif") / "pattern.zarr", img, chunk=128)
    with serving(open_source(url, fmt="png")) as server:
        yield server, img


def test_info_json_manifest_and_headers(store_server):
    server, _ = store_server
    port = server.server_address[1]
    status, hdr, body = get(server, "/iiif/3/image/info.json")
    info = json.loads(body)
    assert status == 200 and hdr["Content-Type"] == "application/json" and hdr["Access-Control-Allow-Origin"] == "*"
    assert info["id"] == f"http://127.0.0.1:{port}/iiif/3/image" and info["type"] == "ImageService3"
    assert (info["width"], info["height"], info["profile"], info["protocol"]) == (
        500,
        300,
        "level2",
        "http://iiif.io/api/image",
    )
    assert info["maxArea"] == 2**20 and info["tiles"] == [{"width": 512, "height": 512, "scaleFactors": [1]}]
    assert info["sizes"][-1] == {"width": 500, "height": 300} and info["preferredFormats"] == ["png"]
    assert set(info["extraQualities"]) == {"color", "gray", "bitonal"} and "mirroring" in info["extraFeatures"]
    status, hdr, _ = get(server, "/iiif/3/image/info.json", {"Accept": "application/ld+json"})
    assert hdr["Content-Type"] == 'application/ld+json;profile="http://iiif.io/api/image/3/context.json"'
    status, hdr, _ = get(server, "/iiif/3/image")
    assert status == 303 and hdr["Location"] == f"http://127.0.0.1:{port}/iiif/3/image/info.json"
    status, hdr, body = get(server, "/iiif/3/manifest.json")
    m = json.loads(body)
    assert status == 200 and hdr["Access-Control-Allow-Origin"] == "*" and m["type"] == "Manifest"
    assert m["label"] == {"none": ["pattern.zarr"]}
    meta = {e["label"]["en"][0]: e["value"]["none"][0] for e in m["metadata"]}
    assert meta["seed"] == "7" and meta["psi"] == "0.5" and meta["size"] == "500 x 300 px"
    canvas = m["items"][0]
    body = canvas["items"][0]["items"][0]["body"]
    assert (canvas["width"], canvas["height"]) == (500, 300) and canvas["items"][0]["items"][0][
        "motivation"
    ] == "painting"
    assert body["service"] == [{"id": info["id"], "type": "ImageService3", "profile": "level2"}]


def test_regions_sizes_rotations_and_qualities_on_a_store(store_server):
    server, img = store_server
    # A region at full resolution is the stored pixels, exactly; the Link header names its canonical form.
    status, hdr, body = get(server, "/iiif/3/image/17,33,201,99/max/0/default.png")
    assert status == 200 and hdr["Content-Type"] == "image/png"
    np.testing.assert_array_equal(decode(body), img[:, 33:132, 17:218])
    port = server.server_address[1]
    assert hdr["Link"] == (
        f'<http://127.0.0.1:{port}/iiif/3/image/17,33,201,99/max/0/default.png>;rel="canonical",'
        '<http://iiif.io/api/image/3/level2.json>;rel="profile"'
    )
    # The same pixels however they are named; canonical form in the Link header.
    for path, canonical in (
        ("pct:0,0,100,100/500,/0/color.png", "full/max/0/default.png"),
        ("0,0,500,300/!1000,300/360/default.png", "full/max/0/default.png"),
        ("full/,300/0/color.png", "full/max/0/default.png"),
    ):
        status, hdr, body = get(server, f"/iiif/3/image/{path}")
        assert status == 200 and canonical in hdr["Link"], (path, hdr.get("Link"))
        np.testing.assert_array_equal(decode(body), img)
    # Mirror, then rotate clockwise.
    region = img[:, 10:60, 20:100]
    for rotation, expect in (
        ("90", np.rot90(region, -1, axes=(1, 2))),
        ("180", region[:, ::-1, ::-1]),
        ("270", np.rot90(region, 1, axes=(1, 2))),
        ("!0", region[:, :, ::-1]),
        ("!90", np.rot90(region[:, :, ::-1], -1, axes=(1, 2))),
    ):
        status, _, body = get(server, f"/iiif/3/image/20,10,80,50/max/{rotation}/default.png")
        np.testing.assert_array_equal(decode(body), expect, err_msg=rotation)
    gray = Image.fromarray(np.ascontiguousarray(region.transpose(1, 2, 0))).convert("L")
    status, _, body = get(server, "/iiif/3/image/20,10,80,50/max/0/gray.png")
    got = Image.open(io.BytesIO(body))
    assert got.mode == "L" and np.array_equal(np.asarray(got), np.asarray(gray))
    status, _, body = get(server, "/iiif/3/image/20,10,80,50/max/0/bitonal.png")
    got = Image.open(io.BytesIO(body))
    assert got.mode == "1" and np.array_equal(np.asarray(got), np.asarray(gray) >= 128)
    # square, sizes by w / h / pct / !w,h, and a power-of-two downscale equal to the 2x2 means.
    assert decode(get(server, "/iiif/3/image/square/max/0/default.png")[2]).shape == (3, 300, 300)
    assert decode(get(server, "/iiif/3/image/full/pct:50/0/default.png")[2]).shape == (3, 150, 250)
    assert decode(get(server, "/iiif/3/image/full/!100,100/0/default.png")[2]).shape == (3, 60, 100)
    half = img.reshape(3, 150, 2, 250, 2).astype(np.uint32).sum(axis=(2, 4))
    np.testing.assert_array_equal(decode(get(server, "/iiif/3/image/full/250,150/0/default.png")[2]), (half + 2) // 4)
    # ^: upscaled (Lanczos on a stored image), and webp / jpg encodings.
    status, _, body = get(server, "/iiif/3/image/0,0,50,40/^200,160/0/default.jpg")
    assert status == 200 and Image.open(io.BytesIO(body)).size == (200, 160)
    assert Image.open(io.BytesIO(get(server, "/iiif/3/image/full/max/0/default.webp")[2])).format == "WEBP"


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/iiif/3/image/05,0,10,10/max/0/default.jpg", 404),  # leading zero
        ("/iiif/3/image/%D9%A5,0,10,10/max/0/default.jpg", 404),  # Arabic-Indic five
        ("/iiif/3/image/0,0,10,10/+5,/0/default.jpg", 404),  # a sign
        ("/iiif/3/image/0,0,10,10/max/090/default.jpg", 404),
        ("/image_files/09/0_0.png", 404),  # DeepZoom tile URLs: canonical numbers too
        ("/image_files/%D9%A9/0_0.png", 404),
        ("/image_files/9/00_0.png", 404),
        ("/image_files/9/0_0.png%0A", 404),
        ("/iiif/3/other/full/max/0/default.jpg", 404),  # unknown identifier
        ("/iiif/3/a/b/full/max/0/default.jpg", 404),
        ("/iiif/3/image/bogus/max/0/default.jpg", 400),
        ("/iiif/3/image/full/max/0/default.j%5Cg", 400),  # a backslash: 400 under /iiif/ (403 elsewhere)
        ("/iiif/3/image/full/full/0/default.jpg", 400),  # 2.x syntax
        ("/iiif/3/image/full/600,/0/default.jpg", 400),  # above 100 % without ^
        ("/iiif/3/image/full/!1000,1000/0/default.jpg", 400),
        ("/iiif/3/image/full/max/400/default.jpg", 400),
        ("/iiif/3/image/full/max/0/sepia.jpg", 400),
        ("/iiif/3/image/full/max/0/default.xyz", 400),
        ("/iiif/3/image/600,0,10,10/max/0/default.jpg", 400),  # outside the image
        ("/iiif/3/image/0,0,0,10/max/0/default.jpg", 400),
        ("/iiif/3/image/full/^2000,2000/0/default.jpg", 400),  # beyond maxArea
        ("/iiif/3/image/full/max/45/default.jpg", 501),  # arbitrary rotation: not supported
        ("/iiif/3/image/full/max/0/default.gif", 501),
    ],
)
def test_refused_requests(store_server, path, status):
    server, _ = store_server
    got, hdr, body = get(server, path)
    assert got == status, (path, got, body)
    if path.startswith("/iiif/"):
        assert hdr["Access-Control-Allow-Origin"] == "*"


def test_the_token_covers_the_iiif_paths(tmp_path):
    url = make_store(tmp_path / "t.zarr", pattern(64, 64))
    with serving(open_source(url), host="0.0.0.0", allow_remote=True) as server:
        token = server.token
        for path in ("/iiif/3/image/info.json", "/iiif/3/image/full/max/0/default.jpg", "/iiif/3/manifest.json"):
            assert get(server, path)[0] == 403, path
            assert get(server, f"{path}?token={token}")[0] == 200, path


def test_an_exported_dzi_serves_iiif_from_its_tiles(tmp_path):
    import pyvips

    img = pattern(600, 800)
    rgb = np.ascontiguousarray(img.transpose(1, 2, 0))
    pyvips.Image.new_from_memory(rgb.tobytes(), 800, 600, 3, "uchar").dzsave(
        str(tmp_path / "out"), tile_size=254, overlap=1, suffix=".png"
    )
    with serving(open_source(str(tmp_path / "out.dzi"))) as server:
        info = json.loads(get(server, "/iiif/3/image/info.json")[2])
        assert (info["width"], info["height"]) == (800, 600)
        status, _, body = get(server, "/iiif/3/image/240,250,300,100/max/0/default.png")  # across tile seams
        assert status == 200
        np.testing.assert_array_equal(decode(body), img[:, 250:350, 240:540])
        status, _, body = get(server, "/iiif/3/image/full/200,150/0/default.png")  # level -2, as dzsave made it
        assert status == 200
        level = Image.open(tmp_path / "out_files" / "8" / "0_0.png").convert("RGB")
        np.testing.assert_array_equal(decode(body), np.asarray(level).transpose(2, 0, 1))


# ---------------------------------------------------------------- an endless 1048576² canvas
@pytest.fixture(scope="module")
def bundled():
    return creps.load(BUNDLED)


@pytest.fixture(scope="module")
def endless_server():
    src = open_endless(BUNDLED, width=SIDE, height=SIDE, view=VIEW, fmt="png", threads=2, cache_url=None)
    with serving(src) as server:
        yield server


def creps_crop(G, canvas: creps.Canvas, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    with torch.no_grad():
        return creps.to_uint8(G.render(G.z_from_seed(0), canvas, rows, cols))[0].numpy()


def test_endless_regions_at_full_resolution_are_the_creps_api_crop(endless_server, bundled):
    top = creps.Canvas(SIDE, SIDE, y=VIEW[:2], x=VIEW[2:])
    for x, y, w, h in ((700001, 500003, 300, 200), (1048000, 1048100, 576, 476), (0, 0, 1, 1)):
        status, hdr, body = get(endless_server, f"/iiif/3/image/{x},{y},{w},{h}/max/0/default.png")
        assert status == 200, body
        np.testing.assert_array_equal(decode(body), creps_crop(bundled, top, (y, y + h), (x, x + w)))
        assert f"/iiif/3/image/{x},{y},{w},{h}/max/0/default.png>" in hdr["Link"]


def test_endless_downscaled_requests_show_the_deepzoom_levels(endless_server, bundled):
    """An IIIF tile at scale factor 2^9 (as OpenSeadragon asks for it) is DZI level 11's canvas, and the
    DeepZoom tile of that level over the same pixels agrees."""
    s = 2**9
    x, y = 2 * 512 * s, 512 * s
    status, _, body = get(endless_server, f"/iiif/3/image/{x},{y},{512 * s},{512 * s}/512,/0/default.png")
    assert status == 200
    level = creps.Canvas(SIDE // s, SIDE // s, y=VIEW[:2], x=VIEW[2:])
    got = decode(body)
    np.testing.assert_array_equal(got, creps_crop(bundled, level, (512, 1024), (1024, 1536)))
    _, _, tile = get(endless_server, "/image_files/11/4_2.png")  # DZI tile 4_2 of level 11: [1015, 1271) x [507, 763)
    np.testing.assert_array_equal(decode(tile)[:, 5:255, 9:255], got[:, 0:250, 0:246])


def test_endless_upscaled_requests_render_the_finer_sampling(endless_server, bundled):
    x, y = 700000, 500000
    status, _, body = get(endless_server, f"/iiif/3/image/{x},{y},32,32/^256,256/0/default.png")
    assert status == 200
    up = decode(body)
    top = creps.Canvas(SIDE, SIDE, y=VIEW[:2], x=VIEW[2:])
    fine = window_canvas(top, (y, y + 32), (x, x + 32), 256, 256)
    np.testing.assert_array_equal(up, creps_crop(bundled, fine, (0, 256), (0, 256)))
    assert up.std() > 5  # not flat
    base = decode(get(endless_server, f"/iiif/3/image/{x},{y},32,32/max/0/default.png")[2])
    lanczos = np.asarray(Image.fromarray(base.transpose(1, 2, 0)).resize((256, 256), Image.Resampling.LANCZOS))
    diff = np.abs(up.astype(int) - lanczos.transpose(2, 0, 1))
    assert diff.mean() > 1.0 and diff.max() > 10  # detail an interpolation of the 32 px does not have


def test_endless_requests_over_max_area_cost_nothing(endless_server):
    src = endless_server.source
    before = (src.scheduler.rendered, src.engine.line_stats())
    for path in ("full/1025,1025", "0,0,10,10/^1024,1025", "full/pct:0.1", "full/!2000,2000"):
        status, _, body = get(endless_server, f"/iiif/3/image/{path}/0/default.png")
        assert status == 400, (path, body)
    assert (src.scheduler.rendered, src.engine.line_stats()) == before
    assert src.scheduler.counts() == {"queued": 0, "rendering": 0}
    info = json.loads(get(endless_server, "/iiif/3/image/info.json")[2])
    assert info["tiles"][0]["scaleFactors"][-1] == 2048 and info["sizes"][-1] == {"width": 1024, "height": 1024}


def test_ray_actors_make_the_same_iiif_images(render_ray):
    """--workers: IIIF images rendered on a Ray actor (queued as the scheduler's key) equal in-process ones."""
    from viewer.iiif import Limits, parse_request

    kw = dict(width=4096, height=4096, view=(0, 4, 0, 4), fmt="png", cache_url=None)
    local = open_endless("preset:tiny", threads=1, **kw)
    remote = open_endless("preset:tiny", workers=1, **kw)
    assert "Ray" in remote.engine.describe()
    try:
        for parts in (("1001,2002,97,33", "max"), ("full", "300,"), ("5,6,20,10", "^80,40")):
            req = parse_request(*parts, "!90", "default.png", 4096, 4096, Limits())
            assert remote.iiif(req) == local.iiif(req), parts
        assert remote.stats()["tiles_rendered"] == 3
    finally:
        remote.close()
        local.close()


# ---------------------------------------------------------------- real IIIF viewers in Chromium
@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium; .ci/setup does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield b
        b.close()


@contextlib.contextmanager
def page_site(folder: Path):
    """Another origin on 127.0.0.1 serving ``folder``: the IIIF viewers' pages (so every IIIF request is
    cross-origin, as from a museum's site)."""
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(folder), **kw)  # noqa: E731
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{site.server_address[1]}"
    finally:
        site.shutdown()
        site.server_close()


def open_viewer(browser, url: str):
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    page.route(re.compile(r"^(?!http://127\.0\.0\.1[:/]).*"), lambda route: route.abort())  # nothing beyond loopback
    responses: list[tuple[str, int]] = []
    page.on("response", lambda r: responses.append((r.url, r.status)))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    return page, responses, errors


def iiif_images(responses: list[tuple[str, int]]) -> list[tuple[str, int]]:
    return [(u, s) for u, s in responses if re.search(r"/iiif/3/image/[^/]+/[^/]+/0/default\.(jpg|png)$", u)]


@pytest.mark.skipif(not MIRADOR.exists(), reason="Mirador is not installed: run `npm ci` in viewer/ (.ci/setup does)")
def test_mirador_opens_the_manifest_and_paints_tiles(browser, tmp_path):
    (tmp_path / "site").mkdir()
    shutil.copy(MIRADOR, tmp_path / "site" / "mirador.min.js")
    url = make_store(tmp_path / "validator.zarr", validator_image())
    with serving(open_source(url)) as server, page_site(tmp_path / "site") as site:
        manifest = f"http://127.0.0.1:{server.server_address[1]}/iiif/3/manifest.json"
        (tmp_path / "site" / "index.html").write_text(
            '<!doctype html><html><head><meta charset="utf-8"><script src="mirador.min.js"></script></head>'
            '<body style="margin:0"><div id="m" style="position:absolute;inset:0"></div><script>'
            "Mirador.viewer({id: 'm', window: {allowClose: false, sideBarOpen: false}, "
            "workspaceControlPanel: {enabled: false}, "
            f"windows: [{{manifestId: '{manifest}', thumbnailNavigationPosition: 'off'}}]}});"
            "</script></body></html>"
        )
        page, responses, errors = open_viewer(browser, f"{site}/index.html")
        page.wait_for_function(
            "() => [...document.querySelectorAll('.openseadragon-canvas canvas')].some(c => c.width > 0)",
            timeout=120000,
        )
        page.wait_for_function(
            "() => performance.getEntriesByType('resource').some(e => /\\/iiif\\/3\\/image\\/.+\\/default\\.jpg$/.test(e.name))",
            timeout=120000,
        )
        page.wait_for_timeout(2000)  # let the tiles fade in
        shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB")).reshape(-1, 3).astype(int)
        page.close()
    assert any(u == manifest and s == 200 for u, s in responses), responses
    tiles = iiif_images(responses)
    assert tiles and all(s == 200 for _, s in tiles), responses
    from iiif_validator.validator import ValidationInfo

    colours = np.array(ValidationInfo().colorInfo).reshape(-1, 3)
    sample = shot[:: max(1, len(shot) // 200000)]
    seen = sum(bool((np.abs(sample - c).max(axis=1) <= 8).any()) for c in colours)
    assert seen >= 60, f"only {seen} of the 100 squares' colours are on the screen"
    assert not errors, errors


def test_openseadragon_iiif_tile_source_shows_the_endless_canvas(browser, endless_server, tmp_path):
    (tmp_path / "site").mkdir()
    root = f"http://127.0.0.1:{endless_server.server_address[1]}"
    (tmp_path / "site" / "index.html").write_text(
        '<!doctype html><html><head><meta charset="utf-8">'
        f'<script src="{root}/osd/openseadragon.min.js"></script></head>'
        '<body style="margin:0"><div id="v" style="width:900px;height:600px"></div><script>'
        "window.viewer = OpenSeadragon({id: 'v', showNavigationControl: false, crossOriginPolicy: 'Anonymous', "
        f"tileSources: '{root}/iiif/3/image/info.json'}});"
        "</script></body></html>"
    )
    with page_site(tmp_path / "site") as site:
        page, responses, errors = open_viewer(browser, f"{site}/index.html")
        page.wait_for_function(
            "() => window.viewer && viewer.world.getItemCount() > 0 && viewer.world.getItemAt(0).getFullyLoaded()",
            timeout=180000,
        )
        stats = page.evaluate(
            """() => {
              const c = viewer.drawer.canvas;
              const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
              let lit = 0, sum = 0, sum2 = 0, n = d.length / 4;
              for (let i = 0; i < d.length; i += 4) {
                const v = d[i] + d[i + 1] + d[i + 2];
                if (v > 0) lit++; sum += v; sum2 += v * v;
              }
              const mean = sum / n;
              return {lit: lit / n, std: Math.sqrt(sum2 / n - mean * mean)};
            }"""
        )
        page.close()
    tiles = iiif_images(responses)
    assert tiles and all(s == 200 for _, s in tiles), responses
    assert any(u.endswith("/default.png") for u, _ in tiles)  # info.json's preferredFormats
    assert stats["lit"] > 0.3 and stats["std"] > 5, stats
    assert not errors, errors
