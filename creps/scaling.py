"""Measuring what rendering at a higher scale gives: aligned grids, references, figures.

Used by ``train.py metrics --scale-consistency`` and ``render.py compare``
(docs/experiments.md has the figures).  Three facts decide how:

* **Aligned grids.** ``Canvas(N, N)`` puts pixel i at ``i / (N - 1)``, the
  corners of the window on the first and last pixel.  A k-times finer canvas
  of that kind does not line up with the coarse one: the mean of a k x k block
  sits up to half a coarse pixel away from the coarse pixel it should match.
  ``upsampled_canvas`` builds the finer canvas whose pixels sit where a
  centre-aligned resampler (PIL's) samples, so that (a) the Lanczos image and
  the CREPS image of ``render.py compare`` show the same points, and (b) each
  k x k block of it averages to exactly one coarse pixel centre, which is what
  an area downsample assumes.
* **Lanczos is PIL's.** ``pyvips``' ``resize`` upsizes with its bicubic
  interpolator whatever kernel is asked for (measured on libvips 8.18:
  ``kernel="lanczos3"``, ``"cubic"`` and ``"mitchell"`` give the same bytes
  when enlarging); PIL's ``Image.LANCZOS`` is a true Lanczos-3 filter in both
  directions, centre-aligned, and runs on float32 images.
* **Sharpness** is the share of an image's spectral power above half the
  Nyquist frequency (``highfreq_share``): an upsampler invents nothing there,
  so on a k-times enlarged image it stays near zero, while a generator that
  renders real detail at the finer grid puts power there.
"""

from __future__ import annotations

import math

import numpy as np

from .canvas import Canvas

__all__ = [
    "area_downsample",
    "highfreq_share",
    "lanczos_resize",
    "mean_abs_diff",
    "psnr",
    "to_unit",
    "upsampled_canvas",
    "window_canvas",
]


def upsampled_canvas(base: Canvas, height: int, width: int) -> Canvas:
    """The ``height x width`` canvas whose pixels sit where a centre-aligned resize of ``base`` samples.

    Output pixel j of a resize from n to m pixels samples input position
    ``(j + 0.5) * n / m - 0.5`` (in input pixels); mapped through ``base``'s
    pixel spacing that is a coordinate, and the finer canvas spans the first
    to the last of them.  With ``m = k * n`` every k consecutive pixels average
    to one pixel of ``base``.  Warps are kept (they act on the finer vectors).
    """
    if base.height < 2 or base.width < 2:
        raise ValueError(f"the base canvas must be at least 2x2, got {base.height}x{base.width}")
    return window_canvas(base, (0, base.height), (0, base.width), height, width)


def window_canvas(base: Canvas, rows: tuple[int, int], cols: tuple[int, int], height: int, width: int) -> Canvas:
    """The ``height x width`` canvas sampled where a centre-aligned resize of a window of ``base`` samples.

    ``upsampled_canvas`` for the window rows ``[r0, r1)`` x cols ``[c0, c1)``
    of ``base`` (in its pixels) instead of all of it: output pixel j samples
    input position ``r0 + (j + 0.5) * n / m - 0.5`` (n = r1 - r0), mapped
    through ``base``'s pixel spacing, so the canvas never has to hold ``base``
    scaled whole (a 2^20 canvas enlarged 4x would be beyond ``MAX_SIDE``).
    The viewer's IIIF service renders ``^`` (upscaled) requests of an endless
    canvas on it: CREPS sampled at the finer grid, not an interpolation.
    A one-pixel axis of ``base`` has no spacing: every sample takes its
    coordinate.  Warps are kept.
    """

    def window(n_base: int, lo: float, hi: float, a: int, b: int, m: int) -> tuple[float, float]:
        step = (hi - lo) / (n_base - 1) if n_base > 1 else 0.0
        n = b - a
        first, last = a + 0.5 * n / m - 0.5, a + (m - 0.5) * n / m - 0.5
        return lo + step * first, lo + step * last

    return Canvas(
        height,
        width,
        y=window(base.height, *base.y, *rows, height),
        x=window(base.width, *base.x, *cols, width),
        warp_rows=base.warp_rows,
        warp_cols=base.warp_cols,
    )


def to_unit(img: np.ndarray) -> np.ndarray:
    """A generator image ``[3, H, W]`` (about [-1, 1]) as float64 ``[H, W, 3]`` 8-bit levels.

    The same rule as ``creps.to_uint8`` (``x * 127.5 + 128``, clamped) but
    without truncation, so figures measure the renders, not a rounding step.
    """
    return np.clip(np.asarray(img, dtype=np.float64) * 127.5 + 128.0, 0.0, 255.0).transpose(1, 2, 0)


def area_downsample(img: np.ndarray, k: int) -> np.ndarray:
    """Mean of every k x k block of ``[H, W, C]`` (H and W multiples of k)."""
    h, w = img.shape[:2]
    if k < 1 or h % k or w % k:
        raise ValueError(f"cannot area-downsample {h}x{w} by {k}")
    return img.reshape(h // k, k, w // k, k, -1).mean(axis=(1, 3))


def lanczos_resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[H, W, C]`` resized with PIL's Lanczos-3 (float32 per channel, centre-aligned), float64 out."""
    from PIL import Image

    chans = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(img[:, :, c], dtype=np.float32), mode="F").resize(
                (width, height), Image.Resampling.LANCZOS
            )
        )
        for c in range(img.shape[2])
    ]
    return np.stack(chans, axis=2).astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float | None:
    """Peak signal-to-noise ratio in dB; None when the images are identical (infinite)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return None if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def highfreq_share(img: np.ndarray) -> float:
    """Share (0..1) of the spectral power of ``[H, W, C]`` above half the Nyquist frequency.

    Luminance (channel mean) minus its mean, times a 2-D Hann window (so the
    image border adds no false edges), power spectrum; "above half Nyquist"
    means ``max(|fy|, |fx|) > 0.25`` cycles per pixel.  0 for a flat image.
    """
    g = np.asarray(img, np.float64).mean(axis=2)
    g = g - g.mean()
    h, w = g.shape
    g = g * np.outer(np.hanning(h), np.hanning(w))
    p = np.abs(np.fft.fft2(g)) ** 2
    fy, fx = np.abs(np.fft.fftfreq(h))[:, None], np.abs(np.fft.fftfreq(w))[None, :]
    total = float(p.sum())
    return 0.0 if total == 0 else float(p[np.maximum(fy, fx) > 0.25].sum()) / total
