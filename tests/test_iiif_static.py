"""`render.py assemble --iiif DIR [--iiif-id URL] [--html]`: an IIIF level-0 static tree and a viewer page,
checked with real clients only.

A static folder served by ``python -m http.server``: the IIIF community's
validator (its level-0 tests for 3.0) and OpenSeadragon in headless Chromium
(the page --html writes, painting the validator's 100 coloured squares where
they belong, through the IIIF tree and through the DeepZoom pyramid). Every
URL info.json advertises, fetched the way the spec's tile algorithm builds it,
is the JPEG of the right crop of the right pyramid level, byte for byte, and
the tree holds nothing else. The same tree written by Ray tasks to a real S3
endpoint (moto_server) is served over its HTTP, byte-identical to the local
one, and the page opens from the bucket in Chromium. A failed assemble leaves
the previous tree and page as they were; bad flags are one line, exit 2.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, VENV_BIN, free_port, render_cli_env, wait_port

import render
from jobs.assemble import assemble
from renderer.blocks import hwc
from renderer.dzi import encode_tile
from renderer.options import IiifOptions
from renderer.pyramid import downsample, reference_pyramid
from renderer.store import open_store

CHROMIUM = "/usr/bin/chromium"
TMP = ".creps-tmp-"
LOADED = "() => window.viewer && viewer.world.getItemCount() > 0 && viewer.world.getItemAt(0).getFullyLoaded()"
# The drawn colour at the viewer position of each image point (null when off screen).
COLOURS_AT = """(points) => {
  const item = viewer.world.getItemAt(0);
  const c = viewer.drawer.canvas;
  const ctx = c.getContext('2d');
  const ratio = c.width / viewer.container.clientWidth;
  return points.map(([x, y]) => {
    const p = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
    const px = Math.round(p.x * ratio), py = Math.round(p.y * ratio);
    if (px < 0 || py < 0 || px >= c.width || py >= c.height) return null;
    return Array.from(ctx.getImageData(px, py, 1, 1).data.slice(0, 3));
  });
}"""


# ---------------------------------------------------------------- helpers
def validator_colours() -> np.ndarray:
    """[x][y] -> rgb of the validator's test image squares."""
    from iiif_validator.validator import ValidationInfo

    return np.array(ValidationInfo().colorInfo, np.uint8)


def validator_image() -> np.ndarray:
    """The validator's test image: 1000x1000, 10x10 squares of 100 px, square (column x, row y) in colorInfo[x][y]."""
    squares = validator_colours().transpose(2, 1, 0)  # (3, row y, column x)
    return np.repeat(np.repeat(squares, 100, axis=1), 100, axis=2)


def pattern(h: int, w: int) -> np.ndarray:
    """Every pixel different from its neighbours: a crop off by one pixel is another tile."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 7 + y) % 256, (y * 5 + x * 3) % 256, (x * y) % 251]).astype(np.uint8)


def make_store(path: Path, img: np.ndarray, chunk: int) -> str:
    url = str(path)
    s = open_store(url, mode="w")
    s.create_level(0, img.shape[1], img.shape[2], chunk)
    s.write_region(0, 0, 0, img)
    s.update_meta(status="done", spec={"seed": 3, "checkpoint": "test-image"})
    return url


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(REPO / "render.py"), "assemble", *args]
    return subprocess.run(argv, env=render_cli_env(), capture_output=True, text=True, timeout=timeout)


def tree_files(folder: Path) -> dict[str, bytes]:
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            path = os.path.join(root, n)
            out[os.path.relpath(path, folder).replace(os.sep, "/")] = Path(path).read_bytes()
    return out


@contextlib.contextmanager
def http_server(folder: Path, port: int):
    """``python -m http.server`` serving ``folder`` on 127.0.0.1:port (the static web server of the docs)."""
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def expected_requests(info: dict) -> list[tuple[str, int, tuple[int, int, int, int]]]:
    """(request, level k, (y0, y1, x0, x1) in level k) of every tile info.json advertises, built as the spec's
    tile algorithm builds them (Image API 3.0 implementation notes, section 3), written out independently."""
    width, height = info["width"], info["height"]
    (tiles,) = info["tiles"]
    tw, th = tiles["width"], tiles["height"]
    out = []
    for s in tiles["scaleFactors"]:
        k = s.bit_length() - 1
        for n in range(-(-width // (tw * s))):
            for m in range(-(-height // (th * s))):
                xr, yr = n * tw * s, m * th * s
                wr, hr = min(tw * s, width - xr), min(th * s, height - yr)
                ws = tw if xr + tw * s <= width else (width - xr + s - 1) // s
                hs = th if yr + th * s <= height else (height - yr + s - 1) // s
                region = "full" if (xr, yr, wr, hr) == (0, 0, width, height) else f"{xr},{yr},{wr},{hr}"
                size = "max" if (ws, hs) == (width, height) else f"{ws},{hs}"
                out.append((f"{region}/{size}/0/default.jpg", k, (m * th, m * th + hs, n * tw, n * tw + ws)))
    return out


def all_levels(img: np.ndarray, chunk: int, n: int) -> list[np.ndarray]:
    """Pyramid levels 0..n-1 of ``img`` by the documented rule (the zarr levels, then further halvings)."""
    levels = reference_pyramid(img, chunk)
    while len(levels) < n:
        levels.append(downsample(levels[-1]))
    return levels


def check_tree(files: dict[str, bytes], img: np.ndarray, chunk: int, quality: int = 90) -> dict:
    """Every advertised URL of the tree is the JPEG of its level crop, byte for byte; nothing else is there."""
    from PIL import Image

    info = json.loads(files["info.json"])
    tiles = expected_requests(info)
    top = max(img.shape[1:]).bit_length() + 1
    levels = all_levels(img, chunk, top + 1)
    by_size = {(lv.shape[2], lv.shape[1]): lv for lv in reversed(levels)}  # (w, h) -> the level (any of equal size)
    expected: dict[str, np.ndarray] = {}
    for request, k, (y0, y1, x0, x1) in tiles:
        expected[request] = levels[k][:, y0:y1, x0:x1]
    for size in info["sizes"]:
        expected.setdefault(
            f"full/{size['width']},{size['height']}/0/default.jpg", by_size[size["width"], size["height"]]
        )
    largest = info["sizes"][-1]
    expected.setdefault("full/max/0/default.jpg", by_size[largest["width"], largest["height"]])
    assert set(files) == {*expected, "info.json"}, sorted(set(files) ^ {*expected, "info.json"})[:10]
    for request, px in expected.items():
        assert files[request] == encode_tile(hwc(px), quality), request
        decoded = np.asarray(Image.open(io.BytesIO(files[request])).convert("RGB")).astype(int)
        assert decoded.shape == (px.shape[1], px.shape[2], 3), request
        assert np.abs(decoded - hwc(px)).mean() < 8, request  # and looks like it (a wrong crop: tens)
    return info


def square_centres(x0: int = 0, x1: int = 10, y0: int = 0, y1: int = 10) -> list[tuple[int, int, int, int]]:
    """(column, row, image x, image y) of the validator squares' centres in that range."""
    return [(x, y, 100 * x + 50, 100 * y + 50) for x in range(x0, x1) for y in range(y0, y1)]


def painted_squares(page, centres) -> tuple[int, list]:
    """How many of the squares are painted in their own colour (within JPEG's error), and the misses."""
    colours = validator_colours()
    got = page.evaluate(COLOURS_AT, [[px, py] for _, _, px, py in centres])
    good, bad = 0, []
    for (x, y, _, _), rgb in zip(centres, got, strict=True):
        if rgb is not None and np.abs(np.array(rgb) - colours[x][y].astype(int)).max() <= 12:
            good += 1
        else:
            bad.append(((x, y), rgb, colours[x][y].tolist()))
    return good, bad


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


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 900, "height": 700})
    page.route(re.compile(r"^(?!http://127\.0\.0\.1[:/]).*"), lambda route: route.abort())  # nothing beyond loopback
    responses: list[tuple[str, int, str]] = []
    page.on("response", lambda r: responses.append((r.url, r.status, r.headers.get("content-type", ""))))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_function(LOADED, timeout=60000)
    return page, responses, errors


def check_page_paints_the_image(page, responses, errors) -> None:
    """The whole image at the home view (all 100 squares in place), then a deep zoom (full-resolution tiles)."""
    good, bad = painted_squares(page, square_centres())
    assert good == 100, bad
    page.evaluate(
        "() => { const item = viewer.world.getItemAt(0);"
        " viewer.viewport.zoomTo(item.imageToViewportZoom(2), null, true);"
        " viewer.viewport.panTo(item.imageToViewportCoordinates(750, 250), true); }"
    )
    page.wait_for_function(
        "() => performance.getEntriesByType('resource').some(e => /\\/512,0,488,512\\/488,512\\//.test(e.name) || /_files\\/10\\//.test(e.name))",
        timeout=60000,
    )
    page.wait_for_function(LOADED, timeout=60000)
    good, bad = painted_squares(page, square_centres(6, 10, 1, 4))
    assert good >= 6 and not [b for b in bad if b[1] is not None], bad  # every square on screen is right
    failed = [(u, s) for u, s, _ in responses if s != 200]
    assert not failed and not errors, (failed, errors)


# ---------------------------------------------------------------- a folder, python -m http.server
def test_a_static_folder_is_an_iiif_service_and_a_viewer_page(tmp_path, browser):
    """--iiif + --dzi + --html into one folder; http.server serves it: validator level 0 passes, the page paints."""
    store = make_store(tmp_path / "v.zarr", validator_image(), chunk=256)
    site, port = tmp_path / "site", free_port()
    base = f"http://127.0.0.1:{port}/v"
    run = cli(store, "--iiif", str(site / "v"), "--iiif-id", base, "--dzi", str(site / "v"), "--no-szi", "--html")
    assert run.returncode == 0, run.stderr
    assert f"{site}/v/info.json (served at {base}/info.json" in run.stdout and f"page: {site}/index.html" in run.stdout

    files = tree_files(site / "v")
    info = check_tree(files, validator_image(), chunk=256)
    assert info["id"] == base and info["profile"] == "level0" and info["type"] == "ImageService3"
    assert info["tiles"] == [{"width": 512, "height": 512, "scaleFactors": [1, 2]}] and "maxWidth" not in info
    assert info["sizes"][-1] == {"width": 1000, "height": 1000}  # full/max is the whole image
    record = json.loads((site / "v.source.json").read_text())
    assert record["export"] == "iiif" and record["url"] == str(site / "v") and record["store"] == store
    assert record["settings"] == {"id": base, "tile": 512, "quality": 90, "max_size": 4096}
    page_record = json.loads((site / "index.html.source.json").read_text())
    assert page_record["export"] == "html" and [s["url"] for s in page_record["settings"]["sources"]] == [
        "v/info.json",
        "v.dzi",
    ]
    assert (site / "openseadragon" / "openseadragon.min.js").is_file()
    assert len(list((site / "openseadragon" / "images").glob("*.png"))) >= 40  # the buttons

    with http_server(site, port) as root:
        validate = [sys.executable, str(VENV_BIN / "iiif-validate.py"), "-s", f"127.0.0.1:{port}", "-i", "v"]
        validate += ["--version", "3.0", "--level", "0"]
        out = subprocess.run(validate, capture_output=True, text=True, timeout=300, env=render_cli_env())
        report = out.stdout + out.stderr
        assert out.returncode == 0 and "Done (5 tests, 0 failures)" in report, report
        passed = set(re.findall(r"test (\w+) PASS", report))
        assert {"info_json", "id_basic", "id_squares", "format_jpg", "size_nofull"} <= passed, report

        page, responses, errors = open_page(browser, f"{root}/index.html")
        tiles = [u for u, _, _ in responses if "/v/" in u and u.endswith("/default.jpg")]
        assert f"{root}/v/full/500,500/0/default.jpg" in tiles, responses  # the top scale factor, as OSD asks
        check_page_paints_the_image(page, responses, errors)
        assert any("/v/512,0,488,512/488,512/0/default.jpg" in u for u, _, _ in responses)
        # the same page shows the DeepZoom pyramid beside the tree
        page.select_option("#source", "1")
        page.wait_for_function(
            "() => viewer.world.getItemCount() > 0 && viewer.world.getItemAt(0).source instanceof"
            " OpenSeadragon.DziTileSource && viewer.world.getItemAt(0).getFullyLoaded()",
            timeout=60000,
        )
        page.evaluate("() => viewer.viewport.goHome(true)")
        page.wait_for_function(LOADED, timeout=60000)
        good, bad = painted_squares(page, square_centres())
        assert good == 100, bad
        assert any("/v_files/" in u for u, _, _ in responses) and not errors, errors
        page.close()


def test_every_advertised_url_is_its_pyramid_level_crop(tmp_path):
    """A wide image, chunks wider than a tile (scale factors past the zarr's levels), full/max below full size."""
    h, w, chunk = 1300, 2500, 1024
    img = pattern(h, w)
    store = make_store(tmp_path / "wide.zarr", img, chunk)
    assemble(store, iiif=str(tmp_path / "tree"), iiif_options=IiifOptions(tile=256, max_size=512), workers=2)
    info = check_tree(tree_files(tmp_path / "tree"), img, chunk)
    assert info["tiles"][0]["scaleFactors"] == [1, 2, 4, 8, 16] and len(reference_pyramid(img, chunk)) == 3
    assert info["maxWidth"] == 313 and info["sizes"][-1] == {"width": 313, "height": 163}  # level 3: <= 512 px
    assert info["sizes"][0] == {"width": 1, "height": 1}
    assert info["id"] == "http://localhost:8000/tree"  # the default: `python -m http.server` one folder up


# ---------------------------------------------------------------- Ray tasks, S3, the bucket as a web site
def test_ray_tasks_write_the_same_tree_to_s3_and_the_bucket_serves_the_page(ray_head, moto_s3, browser, tmp_path):
    import s3fs

    opts = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": moto_s3, "region_name": "us-east-1"},
    }
    s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": moto_s3}).mkdir("site")
    fs = s3fs.S3FileSystem(**opts)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::site/*"}]}  # fmt: skip
    fs.call_s3("put_bucket_policy", Bucket="site", Policy=json.dumps(policy))  # public read: a static site

    img = validator_image()
    store = make_store(tmp_path / "v.zarr", img, chunk=256)
    assemble(store, iiif=str(tmp_path / "local" / "v"), workers=2)  # local threads: the reference
    base = f"{moto_s3}/site/v"
    run = cli(
        store, "--address", ray_head, "--iiif", "s3://site/v", "--iiif-id", base, "--html",
        "--storage-options", json.dumps(opts),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]

    local = tree_files(tmp_path / "local" / "v")
    fs.invalidate_cache()
    keys = {k[len("site/v/") :] for k in fs.find("site/v")}
    assert keys == set(local) and not [k for k in fs.find("site") if TMP in k]
    for rel, data in local.items():  # every file, over the bucket's HTTP, as a client gets it
        with urllib.request.urlopen(f"{base}/{rel}") as r:
            body, ctype = r.read(), r.headers["Content-Type"]
        if rel == "info.json":
            assert json.loads(body) == {**json.loads(data), "id": base} and ctype == "application/json"
        else:
            assert body == data and ctype == "image/jpeg", rel
    assert fs.exists("site/v.source.json") and fs.exists("site/index.html.source.json")

    page, responses, errors = open_page(browser, f"{moto_s3}/site/index.html")
    assert any(u == f"{moto_s3}/site/index.html" and s == 200 and c.startswith("text/html") for u, s, c in responses)
    check_page_paints_the_image(page, responses, errors)
    page.close()


# ---------------------------------------------------------------- failures
def snapshot(folder: Path) -> dict[str, bytes]:
    return {rel: data for rel, data in tree_files(folder).items() if ".zarr/" not in rel}


def test_a_failed_assemble_leaves_the_previous_tree_and_page(tmp_path, capsys):
    img = pattern(300, 420)
    store = make_store(tmp_path / "out" / "s.zarr", img, chunk=64)
    args = ["assemble", store, "--iiif", str(tmp_path / "out" / "t"), "--html"]
    assert render.main(args) == 0
    before = snapshot(tmp_path / "out")
    assert {"t/info.json", "t.source.json", "index.html", "index.html.source.json"} <= set(before)
    check_tree({k[2:]: v for k, v in before.items() if k.startswith("t/")}, img, 64)
    capsys.readouterr()
    chunk = tmp_path / "out" / "s.zarr" / "0" / "c" / "0" / "1" / "2"
    chunk.write_bytes(np.random.default_rng(1).integers(0, 256, 700, dtype=np.uint8).tobytes())

    assert render.main(args) == 1
    lines = [m for m in (line.split("\r")[-1].strip() for line in capsys.readouterr().err.split("\n")) if m]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "level 0 chunk 0/c/0/1/2" in lines[0], lines
    assert snapshot(tmp_path / "out") == before  # byte for byte: every tile, info.json, the page, the sidecars
    assert not [n for n in os.listdir(tmp_path / "out") if TMP in n]


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--iiif", "{out}/t", "--iiif-id", "ftp://example.org/t"],
            "--iiif-id: the IIIF id must be an absolute http(s) URL",
        ),
        (["--iiif", "{out}/t", "--iiif-id", "t"], "--iiif-id: the IIIF id must be an absolute http(s) URL"),
        (["--iiif-id", "https://example.org/t"], "--iiif-id sets the id of the --iiif tree: pass --iiif too"),
        (["--html"], "--html writes a page beside the exports: pass --dzi and/or --iiif too"),
        (
            ["--html", "--iiif", "{out}/a/t", "--dzi", "{out}/b/t"],
            "put the DeepZoom pyramid and the IIIF tree in one folder",
        ),
        (["--iiif", "{out}/mine"], "refusing to replace"),
        (["--iiif", "{out}/t", "--html"], "refusing to replace"),
    ],
    ids=[
        "id-not-http",
        "id-relative",
        "id-without-iiif",
        "html-alone",
        "html-two-folders",
        "not-a-tree",
        "not-our-page",
    ],
)
def test_bad_flags_are_one_line_exit_2_nothing_written(tmp_path, capsys, extra, message):
    store = make_store(tmp_path / "s.zarr", pattern(100, 150), chunk=64)
    out = tmp_path / "out"
    (out / "mine").mkdir(parents=True)
    (out / "mine" / "notes.txt").write_text("keep me")
    (out / "index.html").write_text("<p>a page of mine</p>")
    before = snapshot(out)
    assert render.main(["assemble", store, *[a.format(out=out) for a in extra]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert snapshot(out) == before and sorted(os.listdir(out)) == ["index.html", "mine"]
