"""The viewer page in headless Debian Chromium (Playwright): draws tiles, zooms deeper, refreshes live."""

from __future__ import annotations

import contextlib
import io
import os
import re

import numpy as np
import pytest
import torch
from conftest import mark_tile, serving, wait_until
from PIL import Image

import creps
from renderer.store import open_store
from viewer.server import open_source
from viewer.tiles import max_level, tile_bounds

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
        mark_tile(s, f"r0_c{i}", {})
    with serving(open_source(url)) as server:
        base = server.url
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
    with serving(open_source(url)) as server:
        base = server.url
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
    with serving(open_source(str(tmp_path / "out.dzi"))) as server:
        base = server.url
        page, requests, errors = open_page(browser, base)
        assert page.evaluate(CANVAS_STATS)["lit"] > 0.5
        assert any("/dzi/out_files/" in u for u in requests)
        assert "exported DeepZoom" in page.inner_text("#panel")
        assert not errors, errors
        page.close()


# ---------------------------------------------------------------- endless zoom (render.py view --checkpoint)
BUNDLED = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "creps", "weights", "default.safetensors"
)
# Loaded, and the page's own tile loader has nothing left to fetch for this view.
SETTLED = (
    "() => window.viewer && viewer.world.getItemCount() > 0 && viewer.world.getItemAt(0).getFullyLoaded()"
    " && window.creps.pending === 0 && !viewer.isAnimating()"
)


@contextlib.contextmanager
def serving_endless(**kw):
    from viewer.endless import open_endless

    with serving(open_endless(BUNDLED, width=2**20, height=2**20, view=(0.0, 1024.0, 0.0, 1024.0), **kw)) as server:
        yield server


def test_endless_zoom_from_the_whole_view_to_the_deepest_level(browser, tmp_path):
    """A 1048576² canvas of the bundled model: every level visited draws detailed, non-black tiles."""
    with serving_endless(cache_url=str(tmp_path / "cache"), fmt="png") as server:
        page = browser.new_page(viewport={"width": 900, "height": 600})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.add_init_script("window.crepsMeasure = true")
        page.goto(server.url)
        page.wait_for_function(SETTLED, timeout=120000)
        # Pending areas are drawn as such (a hatched fill), never left black, even before a tile arrives.
        assert page.evaluate("() => typeof viewer.world.getItemAt(0).placeholderFillStyle") == "function"
        levels = [page.evaluate("() => window.creps.currentLevel()")]
        while levels[-1] < 20:
            page.evaluate("() => { viewer.viewport.zoomBy(4, null, true); viewer.viewport.applyConstraints(true); }")
            # The next frame notices the zoom: wait for the new level's first tile, then for the view to settle.
            drawn = "() => { const l = window.creps.currentLevel(); return window.creps.tileStats.some(t => t.level === l); }"
            page.wait_for_function(drawn, timeout=120000)
            page.wait_for_function(SETTLED, timeout=120000)
            levels.append(page.evaluate("() => window.creps.currentLevel()"))
        assert levels[0] <= 11 and levels[-1] == 20 and len(levels) >= 5, levels
        stats = page.evaluate("() => window.creps.tileStats")
        by_level: dict[int, list[dict]] = {}
        for s in stats:
            by_level.setdefault(s["level"], []).append(s)
        for level in levels:  # every level the view went through drew tiles of its own
            assert by_level.get(level), (level, sorted(by_level))
        for level, tiles in by_level.items():
            big = [t for t in tiles if min(t["w"], t["h"]) >= 16]  # 1-8 px tiles of the top levels are flat
            assert all(t["black"] == 0 and t["mean"] > 20 for t in tiles), (level, tiles)
            assert all(t["std"] > 1.0 for t in big), (level, [t["std"] for t in big])
        # A deepest-level tile the page drew, fetched as PNG, is exactly the creps API's pixels for that crop.
        url = next(t["url"] for t in stats if t["level"] == 20 and min(t["w"], t["h"]) == 256)
        level, col, row = (int(v) for v in re.search(r"_files/(\d+)/(\d+)_(\d+)\.png", url).groups())
        got = np.asarray(
            Image.open(io.BytesIO(page.request.get(server.url.rstrip("/") + url).body())).convert("RGB")
        ).transpose(2, 0, 1)
        y0, y1, x0, x1 = tile_bounds(2**20, 2**20, level, col, row)
        G = creps.load(BUNDLED)
        canvas = creps.Canvas(2**20, 2**20, y=(0.0, 1024.0), x=(0.0, 1024.0))
        with torch.no_grad():
            ref = creps.to_uint8(G.render(G.z_from_seed(0), canvas, (y0, y1), (x0, x1)))[0].numpy()
        np.testing.assert_array_equal(got, ref)
        panel = page.inner_text("#panel")
        assert "level 20 of 20" in panel and "1048576 × 1048576" in panel and "rendered" in panel, panel
        assert server.source.stats()["tiles_rendered"] > 0
        # The URL carries the view (centre and zoom, once the view is at rest).
        current = "() => { const p = new URLSearchParams(location.hash.slice(1));"
        current += " return Math.abs(p.get('z') / window.creps.zoom - 1) < 1e-4; }"
        page.wait_for_function(current, timeout=30000)
        view = page.evaluate("() => location.hash")
        centre = page.evaluate(
            "() => viewer.world.getItemAt(0).viewportToImageCoordinates(viewer.viewport.getCenter(true))"
        )
        assert not errors, errors
        page.close()
    # A restarted server on the same cache: that link reopens the same spot, and every tile comes from the cache.
    with serving_endless(cache_url=str(tmp_path / "cache"), fmt="png") as server:
        again = browser.new_page(viewport={"width": 900, "height": 600})
        again.goto(server.url + view)
        again.wait_for_function(SETTLED, timeout=120000)
        assert again.evaluate("() => window.creps.currentLevel()") == 20
        c2 = again.evaluate(
            "() => viewer.world.getItemAt(0).viewportToImageCoordinates(viewer.viewport.getCenter(true))"
        )
        assert abs(c2["x"] - centre["x"]) < 2 and abs(c2["y"] - centre["y"]) < 2, (centre, c2)
        stats = server.source.stats()
        assert stats["tiles_rendered"] == 0 and stats["tiles_from_store"] > 0, stats
        again.close()


def test_endless_page_aborts_tiles_that_left_the_screen(browser):
    """Panning away while tiles are pending aborts their fetches, and the server never renders them."""
    with serving_endless(cache_url=None, fmt="jpeg", threads=1) as server:
        page = browser.new_page(viewport={"width": 900, "height": 600})
        page.goto(server.url + "#x=300000&y=300000&z=1")
        page.wait_for_function(SETTLED, timeout=120000)
        assert page.evaluate("() => window.creps.level") == 20
        src = server.source
        rendered = src.stats()["tiles_rendered"]
        with src.scheduler.hold():  # the server starts nothing: the next view's tiles stay pending
            page.evaluate("() => viewer.viewport.panBy(new OpenSeadragon.Point(0.002, 0), true)")
            wait = "() => window.creps.pending > 0 && window.creps.fetched > window.creps.abandoned"
            page.wait_for_function(wait, timeout=30000)
            wait_until(lambda: src.scheduler.counts()["queued"] > 0, "the server to queue them")
            queued = src.scheduler.counts()["queued"]
            # The view moves on before they are rendered: the page aborts those fetches...
            page.evaluate("() => viewer.viewport.panBy(new OpenSeadragon.Point(0.05, 0), true)")
            page.wait_for_function("() => window.creps.abandoned > 0", timeout=30000)
            # ...the connections close, and the server drops the renders it had not started.
            wait_until(lambda: src.scheduler.abandoned >= queued, "the server to drop them")
        page.wait_for_function(SETTLED, timeout=120000)
        stats = src.stats()
        assert stats["tiles_abandoned"] >= queued and stats["tiles_rendered"] > rendered
        page.close()
