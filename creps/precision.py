"""Arithmetic precision of the pixel stage, and exact fp32 matmuls on CUDA.

A render job picks one precision for all of its tiles (it is part of the job's
identity, like the seed: it decides the bytes):

* ``fp32`` (the default): every operation in float32, bit-exact tiles
  (docs/exactness.md).  On CUDA that means TF32 off: cuBLAS would otherwise
  round fp32 matmul inputs to 10-bit mantissas, and tiles would no longer
  equal the fp32 reference to float tolerance.
* ``fp16``: the pixel stage's matmuls take fp16 operands (tensor cores on a
  GPU) with fp32 accumulation, and its activations are fp16 between layers.
* ``bf16``: every pixel-stage matmul is three bf16 products with fp32
  accumulation (weights and activations split into a bf16 high part and a
  bf16 low part; ``x W ~ xh Wh + xl Wh + xh Wl``), activations fp32.  Plain
  bf16 (8-bit mantissa) does not meet the error budget: rounding the folded
  weights alone left 83.6 % of ffhq512 pixels within one uint8 level.

In both, the line stage, the rank fusion, the residual sums and the RGB sum
and clamp stay fp32.  The error budget (uint8 within 1 level of fp32 on >= 99 %
of pixels, at most 4) and its measurements are in docs/performance.md.

On a device without native kernels for a format (any CPU: PyTorch's CPU fp16
matmul runs at 0.2-4 GFLOP/s, and CPU bf16 matmuls round their output to
bf16) the same arithmetic is *emulated*: fp32 matmuls of operands that hold
exactly the fp16/bf16 values, whose products are exact in fp32, so results
match the native ones up to the order of the fp32 sums.  That is how the
normal (CPU) test suite checks the error budget.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from typing import Literal

import torch

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_dtype(precision: str) -> torch.dtype:
    """The torch dtype of ``precision`` (ValueError naming the choices for anything else)."""
    try:
        return _DTYPES[precision]
    except (KeyError, TypeError):
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}") from None


def check_precision(precision: str) -> torch.dtype:
    """The dtype of ``precision``; ValueError (one line naming the choices) for anything else."""
    return precision_dtype(precision)


def matmul_mode(precision: str, device: torch.device | str) -> str:
    """How the pixel stage's matmuls run: ``fp32``, ``bf16``/``fp16`` (native kernels with
    fp32 accumulation) or ``bf16-emulated``/``fp16-emulated`` (exact fp32 products, see above)."""
    precision_dtype(precision)
    if precision == "fp32":
        return "fp32"
    dev = torch.device(device)
    if dev.type == "cuda" and (precision == "fp16" or _native_bf16_fp32_out(str(dev))):
        return precision
    return f"{precision}-emulated"


@functools.cache
def _native_bf16_fp32_out(device: str) -> bool:
    """Whether ``torch.mm(bf16, bf16, out_dtype=float32)`` runs on ``device`` (CUDA, torch >= 2.8)."""
    try:
        a = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


# ---------------------------------------------------------------- low-precision layers
def _hi_lo(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 high and low parts of an fp32 tensor: t ~ hi + lo to about 16 mantissa bits."""
    hi = t.to(torch.bfloat16)
    return hi, (t - hi.float()).to(torch.bfloat16)


def lower_weight(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """A folded [.., in, out] fp32 matrix prepared for ``low_matmul`` in ``mode``.

    bf16: ``[Wh; Wh; Wl]`` (3*in rows, bf16) for one product with ``[xh, xl, xh]``;
    emulated: ``[Wh + Wl; Wh]`` (2*in rows, fp32: the sum is exact in fp32) for one
    fp32 product with ``[xh, xl]``.  fp16: the matrix in fp16 (emulated: its fp16
    values held in fp32).
    """
    if mode == "fp32":
        return weight
    if mode.startswith("fp16"):
        w16 = weight.to(torch.float16)
        return w16 if mode == "fp16" else w16.float()
    hi, lo = _hi_lo(weight)
    if mode == "bf16":
        return torch.cat([hi, hi, lo], dim=-2)
    return torch.cat([hi.float() + lo.float(), hi.float()], dim=-2)


def lower_bias(bias: torch.Tensor, mode: str) -> torch.Tensor:
    """The bias for ``low_matmul``: fp32 for bf16 (added to the fp32 product), fp16 values for fp16."""
    if mode == "fp16":
        return bias.to(torch.float16)
    if mode == "fp16-emulated":
        return bias.to(torch.float16).float()
    return bias


def activation_dtype(mode: str) -> torch.dtype:
    """The dtype of the pixel MLP's activations between layers in ``mode``."""
    return torch.float16 if mode.startswith("fp16") else torch.float32


def low_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mode: str) -> torch.Tensor:
    """``x [n, in] @ W + b`` with a matrix from ``lower_weight`` (2-D operands), in ``mode``.

    x and the result are fp32 for bf16 modes, fp16 for fp16 modes.
    """
    if mode == "fp16":
        return torch.addmm(bias, x, weight)
    if mode == "fp16-emulated":
        return torch.addmm(bias, x.float(), weight).to(torch.float16)
    hi, lo = _hi_lo(x)
    if mode == "bf16":
        y = torch.mm(torch.cat([hi, lo, hi], dim=1), weight, out_dtype=torch.float32)
        return y.add_(bias)
    if mode == "bf16-emulated":
        return torch.addmm(bias, torch.cat([hi.float(), lo.float()], dim=1), weight)
    raise ValueError(f"unknown matmul mode {mode!r}")


# ---------------------------------------------------------------- exact matmuls on CUDA
# cuBLAS's process-wide switches.  Several threads of one process may render at
# once (in-process lanes, a viewer): the first to enter sets them, the last to
# leave restores what the user had, so one render never turns TF32 back on
# under another.
_lock = threading.Lock()
_depth = 0
_saved: dict[str, object] = {}


def _flags() -> dict[str, object]:
    m = torch.backends.cuda.matmul
    names = ["allow_bf16_reduced_precision_reduction", "allow_fp16_reduced_precision_reduction"]
    # torch >= 2.9 has fp32_precision ("ieee" | "tf32"); mixing it with the legacy allow_tf32 is an error there.
    names.insert(0, "fp32_precision" if hasattr(m, "fp32_precision") else "allow_tf32")
    return {n: getattr(m, n) for n in names}


_EXACT = {
    "fp32_precision": "ieee",
    "allow_tf32": False,
    "allow_bf16_reduced_precision_reduction": False,
    "allow_fp16_reduced_precision_reduction": False,
}


@contextlib.contextmanager
def exact_matmuls(device: torch.device | str) -> Iterator[None]:
    """Within: CUDA matmuls in full fp32 (no TF32) and fp32 accumulation for bf16/fp16 (no
    reduced-precision split-K reductions).  A no-op on other devices."""
    global _depth
    if torch.device(device).type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    with _lock:
        if _depth == 0:
            _saved.clear()
            _saved.update(_flags())
            for name in _saved:
                setattr(m, name, _EXACT[name])
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for name, value in _saved.items():
                    setattr(m, name, value)
