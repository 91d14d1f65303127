"""video: a smooth zoom from the whole image to a deep point, or a latent interpolation, as H.264 MP4.

  render.py video out/wide.zarr --zoom 0.42,0.61,256 --out zoom.mp4          frames from the store's pyramid
  render.py video CKPT --zoom 0.42,0.61,1e4 --size 640x360 --out zoom.mp4    frames rendered on demand
  render.py video CKPT --seeds 1,2,3 --frames 90 --out lerp.mp4              latent interpolation
  (CKPT: a .safetensors / official .pkl file or preset:NAME)

--zoom Y,X,FACTOR zooms towards the point (Y, X), fractions of the image,
until the frame shows 1/FACTOR of it in each direction.  The point stays
where it is on the screen (the window shrinks towards it), the scale changes
geometrically, eased in and out, so the zoom looks steady.

From a store, each frame is cut from the coarsest pyramid level that still
has at least the frame's resolution (`render.py assemble` builds them) and
resampled with Lanczos over a sub-pixel box, so frames glide.  From a
checkpoint, each frame is the canvas of the frame's size over the frame's
coordinate window, rendered directly: detail keeps coming however deep the
zoom goes.  --seeds interpolates the latent w between consecutive seeds
(checkpoints only); with --zoom too, both happen at once.

Frames are encoded with the ffmpeg that the imageio-ffmpeg wheel bundles
(libx264, yuv420p, so frame sides must be even).  The file is written beside
--out under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import creps
from creps.cli import QUICK_FRAMES, add_warp_arguments, command, quick, quick_size, warp_flags
from creps.errors import CheckpointError

from . import JobSpecError
from .spec import default_checkpoint, parse_size, parse_storage_options, parse_view

MAX_READ_PX = 64_000_000  # a frame may read at most this many store pixels (else: build the pyramid first)
MAX_FRAME_SIDE = 8192


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source", nargs="?", help="image store URL, or a checkpoint (file or preset:NAME) [default: bundled]"
    )
    g = p.add_argument_group("what")
    g.add_argument("--zoom", metavar="Y,X,FACTOR", help="zoom towards (Y, X) (fractions of the image) by FACTOR > 1")
    g.add_argument("--seeds", metavar="S,S,...", help="interpolate the latent between these seeds (checkpoint)")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="latent seed without --seeds [default: 0]")
    g.add_argument("--psi", type=float, default=1.0, metavar="F", help="truncation psi [default: 1]")
    g.add_argument("--init-seed", type=int, default=0, metavar="N", help="weights seed for preset:NAME [default: 0]")
    g.add_argument("--view", metavar="Y0,Y1,X0,X1", help="the whole image's coordinate window [default: 0,1,0,1]")
    add_warp_arguments(g)
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, metavar="MP4", help="the video file")
    g.add_argument("--size", default="512x512", metavar="WxH", help="frame size, even sides [default: 512x512]")
    g.add_argument("--frames", type=int, default=120, metavar="N", help="number of frames [default: 120]")
    g.add_argument("--fps", type=float, default=30.0, metavar="F", help="frames per second [default: 30]")
    g.add_argument("--crf", type=int, default=18, metavar="Q", help="x264 quality, 0 (lossless) .. 51 [default: 18]")
    g.add_argument("--storage-options", metavar="JSON", help="fsspec storage options of a store URL")
    g.add_argument("--device", default=None, help="cpu or cuda for on-demand frames [default: cuda if available]")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


# ------------------------------------------------------------------ the path of the camera
@dataclass(frozen=True)
class Zoom:
    """Towards (y, x), fractions of the image, until 1/factor of it shows."""

    y: float
    x: float
    factor: float

    @staticmethod
    def parse(text: str) -> Zoom:
        try:
            y, x, f = (float(v) for v in text.split(","))
        except ValueError:
            raise JobSpecError(f"--zoom must be Y,X,FACTOR (three numbers), got {text!r}") from None
        if not (0 <= y <= 1 and 0 <= x <= 1):
            raise JobSpecError(f"--zoom point must lie in the image (0..1), got {y},{x}")
        if not (math.isfinite(f) and f >= 1):
            raise JobSpecError(f"--zoom factor must be a number >= 1, got {f}")
        return Zoom(y, x, f)

    def window(self, t: float) -> tuple[float, float, float, float]:
        """The frame's window at time t in [0, 1], as fractions Y0, Y1, X0, X1 of the image.

        The magnification is factor ** e(t) with the eased e(t) = (1 - cos(pi t)) / 2:
        geometric in between (a steady zoom), gentle at both ends.
        """
        m = self.factor ** ((1 - math.cos(math.pi * t)) / 2)
        return self.y - self.y / m, self.y + (1 - self.y) / m, self.x - self.x / m, self.x + (1 - self.x) / m


def ease_steps(n_frames: int) -> list[float]:
    return [i / (n_frames - 1) if n_frames > 1 else 0.0 for i in range(n_frames)]


# ------------------------------------------------------------------ frame sources
class CheckpointFrames:
    """Frames rendered on demand: a Canvas of the frame's size over the frame's window."""

    def __init__(
        self,
        G: creps.Generator,
        view: tuple[float, float, float, float],
        seeds: tuple[int, ...],
        psi: float,
        warps: dict[str, str],
    ) -> None:
        self.G, self.view, self.warps = G, view, warps
        self.device = next(G.parameters()).device
        with torch.no_grad():
            self.ws = [G.ws(G.z_from_seed(s).to(self.device), psi) for s in seeds]

    def latent(self, t: float) -> torch.Tensor:
        """w at time t: piecewise linear between consecutive seeds, eased within each piece."""
        if len(self.ws) == 1:
            return self.ws[0]
        pos = t * (len(self.ws) - 1)
        i = min(int(pos), len(self.ws) - 2)
        u = pos - i
        u = (1 - math.cos(math.pi * u)) / 2
        return self.ws[i].lerp(self.ws[i + 1], u)

    def frame(self, t: float, frac: tuple[float, float, float, float], height: int, width: int) -> np.ndarray:
        y0, y1, x0, x1 = self.view
        fy0, fy1, fx0, fx1 = frac
        canvas = creps.Canvas(
            height,
            width,
            y=(y0 + (y1 - y0) * fy0, y0 + (y1 - y0) * fy1),
            x=(x0 + (x1 - x0) * fx0, x0 + (x1 - x0) * fx1),
            **self.warps,
        )
        with torch.no_grad():
            img = self.G.render(self.latent(t), canvas)
        return creps.to_uint8(img)[0].permute(1, 2, 0).cpu().numpy()


class StoreFrames:
    """Frames cut from a store's pyramid levels and resampled over a sub-pixel box."""

    def __init__(self, url: str, storage_options: dict | None) -> None:
        from renderer.store import open_store

        self.store = open_store(url, storage_options, mode="r")
        self.height, self.width = self.store.shape
        self.levels = self.store.level_count()
        self.url = url

    def frame(self, t: float, frac: tuple[float, float, float, float], height: int, width: int) -> np.ndarray:
        from PIL import Image

        fy0, fy1, fx0, fx1 = frac
        y0, y1, x0, x1 = fy0 * self.height, fy1 * self.height, fx0 * self.width, fx1 * self.width
        # the coarsest level with at least one stored pixel per frame pixel
        ratio = min((y1 - y0) / height, (x1 - x0) / width)
        level = max(0, min(self.levels - 1, math.floor(math.log2(ratio)) if ratio >= 1 else 0))
        d = 2.0**level
        arr = self.store.level(level)
        _, lh, lw = arr.shape
        r0, r1 = max(0, math.floor(y0 / d)), min(lh, math.ceil(y1 / d))
        c0, c1 = max(0, math.floor(x0 / d)), min(lw, math.ceil(x1 / d))
        if (r1 - r0) * (c1 - c0) > MAX_READ_PX:
            raise JobSpecError(
                f"{self.url} has {self.levels} level(s); a frame would read {(r1 - r0) * (c1 - c0):,} px of level "
                f"{level}; build the pyramid first: render.py assemble {self.url}"
            )
        region = self.store.read_region(level, r0, r1, c0, c1).transpose(1, 2, 0)
        box = (x0 / d - c0, y0 / d - r0, x1 / d - c0, y1 / d - r0)
        img = Image.fromarray(np.ascontiguousarray(region)).resize((width, height), Image.Resampling.LANCZOS, box=box)
        return np.asarray(img)


# ------------------------------------------------------------------ encoding
def encode(frames: Iterator[np.ndarray], out: str, width: int, height: int, fps: float, crf: int) -> int:
    """H.264 (libx264, yuv420p) through the ffmpeg of imageio-ffmpeg; whole file or none. Returns the frame count."""
    try:
        import imageio_ffmpeg
    except ImportError:
        raise JobSpecError("video needs the imageio-ffmpeg package: pip install imageio-ffmpeg") from None
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix or '.mp4'}")
    writer = imageio_ffmpeg.write_frames(
        str(tmp),
        (width, height),
        fps=fps,
        codec="libx264",
        pix_fmt_in="rgb24",
        pix_fmt_out="yuv420p",
        quality=None,
        macro_block_size=1,  # our sides are even; no silent resize to multiples of 16
        output_params=["-crf", str(crf), "-preset", "medium"],
        ffmpeg_log_level="error",
    )
    n = 0
    try:
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame, dtype=np.uint8))
            n += 1
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return n


def frames_of(
    source: CheckpointFrames | StoreFrames,
    zoom: Zoom | None,
    n_frames: int,
    height: int,
    width: int,
    progress: bool,
) -> Iterator[np.ndarray]:
    from tqdm import tqdm

    for t in tqdm(ease_steps(n_frames), unit="frame", disable=not progress, mininterval=1, dynamic_ncols=True):
        frac = zoom.window(t) if zoom is not None else (0.0, 1.0, 0.0, 1.0)
        yield source.frame(t, frac, height, width)


def _seed_list(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise JobSpecError(f"--seeds must be integers like 1,2,3, got {text!r}") from None
    if len(seeds) < 2 or any(not 0 <= s < 2**32 for s in seeds):
        raise JobSpecError(f"--seeds needs at least two seeds in 0..2^32-1, got {text!r}")
    return seeds


def _is_store(source: str, storage_options: dict | None) -> bool:
    from renderer.store import store_exists

    if source.startswith("preset:") or (Path(source).is_file()):
        return False
    try:
        return store_exists(source, storage_options)
    except Exception:  # not a URL fsspec understands: treat it as a checkpoint, whose reader says what is wrong
        return False


@command(interrupted="interrupted; nothing was written")
def run(args: argparse.Namespace) -> int:
    width, height = parse_size(args.size)
    if width % 2 or height % 2 or max(width, height) > MAX_FRAME_SIDE:
        raise JobSpecError(f"--size sides must be even (H.264 yuv420p) and <= {MAX_FRAME_SIDE}, got {args.size}")
    if args.frames < 1 or args.frames > 100_000:
        raise JobSpecError(f"--frames must be 1..100000, got {args.frames}")
    if quick():  # CREPS_QUICK: a short, small video (creps.cli)
        width, height = quick_size(width, height, multiple=2)
        args.frames = min(args.frames, QUICK_FRAMES)
    if not (math.isfinite(args.fps) and 0 < args.fps <= 240):
        raise JobSpecError(f"--fps must be in (0, 240], got {args.fps}")
    if not 0 <= args.crf <= 51:
        raise JobSpecError(f"--crf must be 0..51, got {args.crf}")
    if not args.zoom and not args.seeds:
        raise JobSpecError("give --zoom Y,X,FACTOR and/or --seeds S,S,...")
    zoom = Zoom.parse(args.zoom) if args.zoom else None
    options = parse_storage_options(args.storage_options) if args.storage_options else None
    source_text = args.source or default_checkpoint()
    source: CheckpointFrames | StoreFrames
    if _is_store(source_text, options):
        if args.seeds:
            raise JobSpecError("--seeds needs a checkpoint: a store holds one rendered image")
        if warp_flags(args):
            raise JobSpecError("--warp-rows/--warp-cols need a checkpoint: a store's pixels are already rendered")
        source, kind = StoreFrames(source_text, options), "store"
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            G = creps.load(source_text, init_seed=args.init_seed, device=device)
        except CheckpointError as e:
            raise CheckpointError(f"{e} (and {source_text!r} is not an image store either)") from None
        view = parse_view(args.view) if args.view else (0.0, 1.0, 0.0, 1.0)
        seeds = _seed_list(args.seeds) if args.seeds else (args.seed,)
        try:
            source = CheckpointFrames(G, view, seeds, args.psi, warp_flags(args))
        except ValueError as e:
            raise JobSpecError(str(e)) from None
        kind = "checkpoint"
    t0 = time.perf_counter()
    n = encode(
        frames_of(source, zoom, args.frames, height, width, not args.quiet), args.out, width, height, args.fps, args.crf
    )
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "out": args.out,
                "source": kind,
                "frames": n,
                "width": width,
                "height": height,
                "fps": args.fps,
                "seconds": round(seconds, 2),
            }
        )
    )
    return 0
