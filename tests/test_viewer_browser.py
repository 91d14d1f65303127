"""The viewer page in headless Debian Chromium (Playwright): draws tiles, zooms deeper, refreshes live."""

from __future__ import annotations

import contextlib
import os
import re
import threading

import numpy as np
import pytest

from renderer.store import open_store
from viewer.server import make_server, open_source
from viewer.tiles import max_level

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium; .ci/setup does it)", allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402

H, W = 2048, 3072
LEVEL_RE = re.compile(r"_files/(\d+)/\d+_\d+\.(?:jpeg|png)")
LOADED = "() => window.viewer && viewer.world.getItemCount() > 0 && viewer.world.getItemAt(0).getFullyLoaded()"
# Fraction of drawn canvas pixels that are not black, and their spread.
CANVAS_STATS = """() => {
  const c = viewer.drawer.canvas;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let lit = 0, sum = 0, sum2 = 0, n = d.length / 4;
  for (let i = 0; i < d.length; i += 4) {
    const v = d[i] + d[i + 1] + d[i + 2];
    if (v > 0) lit++;
    sum += v; sum2 += v * v;
  }
  const mean = sum / n;
  return {lit: lit / n, std: Math.sqrt(sum2 / n - mean * mean), w: c.width, h: c.height};
}"""


@contextlib.contextmanager
def serving(source):
    server = make_server(source, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.url
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield b
        b.close()


def pattern(h: int, w: int) -> np.ndarray:
    """A smooth colourful image with fine stripes (so every zoom level has detail)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([40 + x * 200 // w, 40 + y * 200 // h, 40 + ((x // 7 + y // 5) % 2) * 150]).astype(np.uint8)


def levels_requested(urls: list[str]) -> list[int]:
    return sorted({int(m.group(1)) for u in urls if (m := LEVEL_RE.search(u))})


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 900, "height": 600})
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_function(LOADED, timeout=30000)
    return page, requests, errors


def test_page_draws_tiles_and_zoom_requests_deeper_levels(browser, tmp_path):
    url = str(tmp_path / "img.zarr")
    s = open_store(url, mode="w")
    s.create_level(0, H, W, 256)
    s.write_region(0, 0, 0, pattern(H, W))
    s.update_meta(spec={"seed": 1234, "psi": 0.5, "checkpoint": "tiny"}, tiles_total=4)
    for i in range(4):
        s.mark_done(f"r0_c{i}", {})
    with serving(open_source(url)) as base:
        page, requests, errors = open_page(browser, base)
        stats = page.evaluate(CANVAS_STATS)
        assert stats["lit"] > 0.5 and stats["std"] > 10, stats
        panel = page.inner_text("#panel")
        assert "3072 × 2048" in panel and "1234" in panel and "4 / 4 tiles" in panel, panel
        top = max_level(W, H)
        before = levels_requested(requests)
        assert before and max(before) < top, before
        page.evaluate("() => { viewer.viewport.zoomTo(viewer.viewport.getMaxZoom(), null, true); }")
        # The item reports "fully loaded" until the next frame notices the zoom: wait for a deep tile first.
        page.wait_for_function(
            f"() => window.creps.tileUrls.some(u => u.includes('/image_files/{top}/'))", timeout=30000
        )
        page.wait_for_function(LOADED, timeout=30000)
        after = levels_requested(requests)
        assert max(after) == top, after
        assert page.evaluate(CANVAS_STATS)["lit"] > 0.5
        page.screenshot(path=str(tmp_path / "viewer.png"))
        assert not errors, errors
        page.close()


def test_page_refreshes_while_render_progresses(browser, tmp_path):
    """Half the image is written when the page opens; the rest appears without a reload."""
    url = str(tmp_path / "live.zarr")
    s = open_store(url, mode="w")
    s.create_level(0, 512, 512, 256)
    s.update_meta(tiles_total=4)
    s.write_region(0, 0, 0, np.full((3, 256, 512), 180, np.uint8))
    s.mark_tiles(0, 2, [])  # the top row of tiles
    with serving(open_source(url)) as base:
        page, requests, errors = open_page(browser, base)
        lit0 = page.evaluate(CANVAS_STATS)["lit"]
        s.write_region(0, 256, 0, np.full((3, 256, 512), 90, np.uint8))
        s.mark_tiles(2, 4, [])  # the bottom row
        page.wait_for_function("() => window.creps.swaps >= 1", timeout=30000)
        page.wait_for_function(LOADED, timeout=30000)
        # the bottom half fills in (poll: the canvas is redrawn on the next animation frame)
        page.wait_for_function(f"() => ({CANVAS_STATS})().lit > {lit0 + 0.1}", timeout=30000)
        assert any("v=2." in u for u in requests), "tiles were not re-requested for the new version"
        assert "4 / 4 tiles" in page.inner_text("#panel")
        assert not errors, errors
        page.close()


def test_exported_dzi_draws(browser, tmp_path):
    import pyvips

    rgb = np.ascontiguousarray(pattern(600, 800).transpose(1, 2, 0))
    pyvips.Image.new_from_memory(rgb.tobytes(), 800, 600, 3, "uchar").dzsave(
        str(tmp_path / "out"), tile_size=254, overlap=1, suffix=".jpeg[Q=90]"
    )
    with serving(open_source(str(tmp_path / "out.dzi"))) as base:
        page, requests, errors = open_page(browser, base)
        assert page.evaluate(CANVAS_STATS)["lit"] > 0.5
        assert any("/dzi/out_files/" in u for u in requests)
        assert "exported DeepZoom" in page.inner_text("#panel")
        assert not errors, errors
        page.close()
