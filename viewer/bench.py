"""Benchmark of the endless viewer: first-tile latency (cold and warm lines) and tiles/s while zooming.

  python -m viewer.bench                      both models, and the browser zoom (bundled model)
  python -m viewer.bench --models bundled     one model; --no-browser skips the zoom
  python -m viewer.bench --device cuda        the in-process path on a GPU

What is measured, on a 1048576² canvas at its deepest DZI level (level 20),
for one interior 256 x 256 tile (254 + 2 px overlap), in this process with
the engine's settings (one torch thread per render thread on a CPU):

* **cold**: a fresh generator state (empty line cache): the level's two
  2^20-long coordinate vectors, the tile's row and column line blocks, the
  pixel stage and the JPEG encode;
* **warm**: the same tile again with its lines in memory (the pixel stage and
  the encode: what a tile costs once its lines are known), median of 5;
* **neighbour**: the tile to the right (its rows' lines known, its columns'
  new): the common case while panning.

Then, unless --no-browser, tiles/s while zooming through 10 levels in
headless Chromium (the real page, server and scheduler; 2 render threads;
no persistent cache): open at level 10, zoom in 2x per step, wait until the
view is fully drawn, ten times. Printed figures; the last line is JSON.

``--tiles CHECKPOINT`` measures only what ``render.py bench`` reports of
endless zoom (``tile_figures``; jobs.bench runs it in a process of its own),
as the server answers: the tile source of ``render.py view --checkpoint``
(``open_endless``: in-process engine, one lane per core, no persistent
cache) on a ``--side``² canvas, deepest level.  **first**: the first tile of
the level (its coordinate vectors and all its row and column line blocks
are new); **cold**: five tiles never rendered before, requested one at a
time after it -- its two right neighbours and the three below those three
(a 3 x 2 patch, as a screen fills in): each computes only the line blocks
no earlier tile did (two of them none, three about four), its pixel stage
and its encode; median; **warm**: the same five again (answered from the
server's memory; median); **compute**: each of the five tiles' pixel stage
alone, one thread, from its lines (what the tile's pixels cost; median).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

import creps
from renderer.dzi import tile_grid

from .endless import LocalEngine, open_endless
from .ondemand import ImageSpec, TileMaker

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = str(ROOT / "creps" / "weights" / "default.safetensors")
SIDE = 2**20
MODELS = {
    "bundled": (BUNDLED, (0.0, 1024.0, 0.0, 1024.0)),
    "ffhq512": ("preset:ffhq512", (0.0, 1.0, 0.0, 1.0)),
}
CHROMIUM = "/usr/bin/chromium"


def latency(name: str, device: str) -> dict[str, Any]:
    """Cold, warm and neighbour latency of a deepest-level tile (seconds)."""
    checkpoint, view = MODELS[name]
    torch.set_num_threads(1)
    G = creps.load(checkpoint, device=device)
    spec = ImageSpec(
        checkpoint=checkpoint,
        checkpoint_sha256=creps.checkpoint_hash(checkpoint),
        init_seed=0,
        seed=0,
        psi=1.0,
        height=SIDE,
        width=SIDE,
        view=view,
        pixel_block=creps.default_pixel_block(device),
    )
    top, col, row = spec.top, 2063, 2063  # an interior tile near the centre: 256 x 256 px
    maker = TileMaker(G, spec, device, lanes=os.cpu_count() if device == "cpu" else 1)  # as open_endless
    t0, c0 = time.perf_counter(), time.process_time()
    maker.tile(top, col, row, "jpeg", 90)
    cold, cold_cpu = time.perf_counter() - t0, time.process_time() - c0
    lines_cold = maker.lines.computed
    warm, warm_cpu = [], []
    for _ in range(5):
        t0, c0 = time.perf_counter(), time.process_time()
        maker.tile(top, col, row, "jpeg", 90)
        warm.append(time.perf_counter() - t0)
        warm_cpu.append(time.process_time() - c0)
    t0 = time.perf_counter()
    maker.tile(top, col + 1, row, "jpeg", 90)
    neighbour = time.perf_counter() - t0
    y0, y1, x0, x1 = spec.check_tile(top, col, row)
    out = {
        "model": name,
        "tile_px": [y1 - y0, x1 - x0],
        "cold_s": round(cold, 4),
        "cold_cpu_s": round(cold_cpu, 4),
        "warm_s": round(statistics.median(warm), 4),
        "warm_cpu_s": round(statistics.median(warm_cpu), 4),
        "neighbour_s": round(neighbour, 4),
        "line_blocks_cold": lines_cold,
    }
    print(
        f"{name}: deepest-level {y1 - y0}x{x1 - x0} tile cold {cold:.3f} s ({cold_cpu:.3f} CPU s, "
        f"{lines_cold} line blocks), warm {out['warm_s']:.3f} s ({out['warm_cpu_s']:.3f} CPU s), "
        f"right neighbour {neighbour:.3f} s",
        flush=True,
    )
    return out


PATCH = ((1, 0), (2, 0), (0, 1), (1, 1), (2, 1))  # the cold tiles, after the first one (column, row offsets)


def tile_figures(
    checkpoint: str,
    view: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 1.0),
    side: int = SIDE,
    device: str = "cpu",
    threads: int = 0,
) -> dict[str, Any]:
    """First, cold, warm and compute milliseconds of deepest-level tiles (module docstring: ``--tiles``)."""
    source = open_endless(
        checkpoint, width=side, height=side, view=view, device=device, cache_url=None, threads=threads
    )
    try:
        engine = source.engine
        assert isinstance(engine, LocalEngine)
        maker, spec = engine.maker, source.spec
        top = spec.top
        ncols, nrows = tile_grid(spec.width, spec.height, top)
        if ncols < 3 or nrows < 2:
            raise ValueError(f"a {side}² canvas has no 3 x 2 tiles at its deepest level")
        c, r = (ncols - 3) // 2, (nrows - 2) // 2  # interior: full 256 x 256 tiles (254 + overlap)

        def served(col: int, row: int) -> float:
            t0 = time.perf_counter()
            if not source.tile(top, col, row):
                raise RuntimeError(f"tile {top}/{col}_{row} was not answered")
            return 1000 * (time.perf_counter() - t0)

        first = served(c, r)
        blocks = [maker.lines.computed]
        cold = []
        for dc, dr in PATCH:
            cold.append(served(c + dc, r + dr))
            blocks.append(maker.lines.computed)
        warm = [served(c + dc, r + dr) for dc, dr in PATCH]
        compute = [_pixel_ms(maker, top, c + dc, r + dr) for dc, dr in PATCH]
    finally:
        source.close()
    out = {
        "endless_first_ms": round(first, 1),
        "endless_cold_ms": round(statistics.median(cold), 1),
        "endless_warm_ms": round(statistics.median(warm), 3),
        "endless_tile_compute_ms": round(statistics.median(compute), 1),
        "endless_cold_each_ms": [round(v, 1) for v in cold],
        "endless_line_blocks": [b - a for a, b in zip([0, *blocks], blocks, strict=False)],  # first, then each
        "endless_lanes": maker.lanes,
    }
    print(
        f"endless zoom ({checkpoint}, {side}² canvas, deepest level, {maker.lanes} lanes): first tile "
        f"{first:.0f} ms ({blocks[0]} line blocks), cold tiles {out['endless_cold_ms']:.0f} ms (median of "
        f"{len(cold)}: {', '.join(f'{v:.0f}' for v in cold)}), warm {out['endless_warm_ms']:.2f} ms; "
        f"pixel stage alone (1 thread) {out['endless_tile_compute_ms']:.0f} ms",
        flush=True,
    )
    return out


@torch.no_grad()
def _pixel_ms(maker: TileMaker, level: int, col: int, row: int) -> float:
    """The pixel stage of one tile alone, one thread, from its lines (already in the maker's cache)."""
    y0, y1, x0, x1 = maker.spec.check_tile(level, col, row)
    R, C = maker.line_range(level, "row", y0, y1), maker.line_range(level, "col", x0, x1)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        maker.G.pixels(
            maker.latent.ws,
            R,
            C,
            pixel_block=maker.spec.pixel_block,
            weights=maker.latent.pixel_weights,
            precision=maker.spec.precision,
            lanes=1,
        )
        return 1000 * (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)


def browser_zoom(device: str, steps: int = 10, start_level: int = 10) -> dict[str, Any]:
    """Tiles rendered per second while the real page zooms in 2x per step, ``steps`` times."""
    from playwright.sync_api import sync_playwright

    from .server import make_server

    checkpoint, view = MODELS["bundled"]
    source = open_endless(checkpoint, width=SIDE, height=SIDE, view=view, device=device, cache_url=None, threads=2)
    server = make_server(source, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settled = (
        "() => window.viewer && viewer.world.getItemCount() > 0 && viewer.world.getItemAt(0).getFullyLoaded()"
        " && window.creps.pending === 0 && !viewer.isAnimating()"
    )
    per_step = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            z = 2.0 ** (start_level - 20)  # screen px per full-resolution px at the start level
            page.goto(f"{server.url}#x=524288&y=524288&z={z}")
            page.wait_for_function(settled, timeout=600000)
            levels = [page.evaluate("() => window.creps.currentLevel()")]
            # the next frame notices a zoom: wait for the new level's first tile, then for the view to settle
            drawn = (
                "() => { const l = window.creps.currentLevel();"
                " return window.creps.tileUrls.some(u => u.includes('/image_files/' + l + '/')); }"
            )
            t_all = time.perf_counter()
            n_all = source.stats()["tiles_rendered"]
            for _ in range(steps):
                n0, t0 = source.stats()["tiles_rendered"], time.perf_counter()
                page.evaluate(
                    "() => { viewer.viewport.zoomBy(2, null, true); viewer.viewport.applyConstraints(true); }"
                )
                page.wait_for_function(drawn, timeout=600000)
                page.wait_for_function(settled, timeout=600000)
                dt, dn = time.perf_counter() - t0, source.stats()["tiles_rendered"] - n0
                levels.append(page.evaluate("() => window.creps.currentLevel()"))
                per_step.append({"level": levels[-1], "tiles": dn, "seconds": round(dt, 3)})
                print(f"  zoom to level {levels[-1]}: {dn} tiles in {dt:.2f} s = {dn / dt:.1f} tiles/s", flush=True)
            seconds = time.perf_counter() - t_all
            tiles = source.stats()["tiles_rendered"] - n_all
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
        server.close_source()
    out = {"levels": [levels[0], levels[-1]], "tiles": tiles, "seconds": round(seconds, 2)}
    out["tiles_per_s"] = round(tiles / seconds, 2)
    print(
        f"browser zoom, bundled model, 1280x800 page, levels {levels[0]} -> {levels[-1]}: "
        f"{tiles} tiles in {seconds:.1f} s = {out['tiles_per_s']:.1f} tiles/s",
        flush=True,
    )
    out["steps"] = per_step
    return out


def picture(path: str, side: int = 2048, k: int = 3, span: float = 32.0, crop: int = 160, zoom: int = 2) -> dict:
    """docs/endless_levels.png: a coarse level rendered on demand next to the same level of a 2x2-mean pyramid.

    The bundled model on a ``side``² canvas over (0, span) x (0, span); level
    ``k`` below full resolution (side / 2**k px) rendered directly on its
    canvas, and made by ``k`` rounds of renderer.pyramid's 2x2 mean of the
    full-resolution render; a ``crop``² corner of each, magnified ``zoom``x,
    with their absolute difference x4. Returns the mean and max absolute
    difference per level 1..k.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    from renderer.pyramid import downsample

    G = creps.load(BUNDLED)
    z = G.z_from_seed(0)
    window = (0.0, span)
    with torch.no_grad():
        full = creps.to_uint8(G.render(z, creps.Canvas(side, side, y=window, x=window)))[0].numpy()
    mean, diffs = full, {}
    for level in range(1, k + 1):
        mean = downsample(mean)
        n = side // 2**level
        with torch.no_grad():
            direct = creps.to_uint8(G.render(z, creps.Canvas(n, n, y=window, x=window)))[0].numpy()
        d = np.abs(direct.astype(np.int16) - mean.astype(np.int16))
        diffs[level] = {"mean_abs": round(float(d.mean()), 2), "max_abs": int(d.max())}
    diff = np.clip(np.abs(direct.astype(np.int16) - mean.astype(np.int16)) * 4, 0, 255).astype(np.uint8)
    panels = [a[:, :crop, :crop] for a in (direct, mean, diff)]
    gap, label_h = 8, 22
    width = 3 * crop * zoom + 2 * gap
    out = Image.new("RGB", (width, crop * zoom + label_h), (17, 17, 17))
    draw = ImageDraw.Draw(out)
    labels = ("rendered on demand (this viewer)", "2x2-mean pyramid (render + assemble)", "|difference| x 4")
    for i, (a, text) in enumerate(zip(panels, labels, strict=True)):
        img = Image.fromarray(np.ascontiguousarray(a.transpose(1, 2, 0))).resize(
            (crop * zoom,) * 2, Image.Resampling.NEAREST
        )
        x = i * (crop * zoom + gap)
        out.paste(img, (x, label_h))
        draw.text((x + 4, 5), text, fill=(230, 230, 230))
    out.save(path, optimize=True)
    print(f"{path}: level -{k} of a {side}² canvas over (0, {span})²; |direct - 2x2 mean| per level: {diffs}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m viewer.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="bundled,ffhq512", help="comma-separated: bundled, ffhq512")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--no-browser", action="store_true", help="skip the zoom in Chromium")
    p.add_argument("--picture", metavar="PNG", help="only write the docs picture (on-demand vs 2x2-mean level)")
    p.add_argument("--tiles", metavar="CHECKPOINT", help="only render.py bench's endless figures, of this model")
    p.add_argument("--side", type=int, default=SIDE, help="--tiles: canvas side [2^20]")
    p.add_argument("--view", default="0,1,0,1", help="--tiles: coordinate window Y0,Y1,X0,X1 [0,1,0,1]")
    p.add_argument("--threads", type=int, default=0, help="--tiles: render threads (0: as render.py view)")
    args = p.parse_args(argv)
    if args.picture:
        picture(args.picture)
        return 0
    if args.tiles:
        y0, y1, x0, x1 = (float(v) for v in args.view.split(","))
        print(json.dumps(tile_figures(args.tiles, (y0, y1, x0, x1), args.side, args.device, args.threads)))
        return 0
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    if args.device == "cuda":
        machine += f", {torch.cuda.get_device_name(0)}"
    print(f"machine: {machine}; device {args.device}; load average {os.getloadavg()[0]:.1f}", flush=True)
    result: dict[str, Any] = {"machine": machine, "device": args.device, "latency": []}
    for name in args.models.split(","):
        result["latency"].append(latency(name.strip(), args.device))
    if not args.no_browser and os.path.exists(CHROMIUM):
        result["zoom"] = browser_zoom(args.device)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
