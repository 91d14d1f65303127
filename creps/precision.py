"""Arithmetic precision of the pixel stage, and exact fp32 matmuls on CUDA.

A render job picks one precision for all of its tiles (it is part of the job's
identity, like the seed: it decides the bytes):

* ``fp32`` (the default): every operation in float32, bit-exact tiles
  (docs/exactness.md).  On CUDA that means TF32 off: cuBLAS would otherwise
  round fp32 matmul inputs to 10-bit mantissas, and tiles would no longer
  equal the fp32 reference to float tolerance.
* ``fp16``: the pixel stage's matmuls take fp16 operands (tensor cores on a
  GPU) with fp32 accumulation, and its activations are fp16 between layers.
  The fast mode: one product per layer, half the bytes of fp32.
* ``bf16``: the same in bf16 (8-bit mantissa): one product per layer, bf16
  activations.  Its error is larger than fp16's and on some latents outside
  the fp16 budget (docs/exactness.md states what it meets).
* ``bf16x3``: the accurate bf16 mode: every matmul is three bf16 products with
  fp32 accumulation (weights and activations split into a bf16 high part and
  a bf16 low part; ``x W ~ xh Wh + xl Wh + xh Wl``), activations fp32.  Three
  times the products of ``bf16`` (and more bytes per pixel than fp32): for
  GPUs where fp16's range would not do, not for speed.

In all of them the line stage, the rank fusion, the residual sums and the RGB
sum and clamp stay fp32.  The error budget (uint8 within 1 level of fp32 on >=
99 % of pixels, at most 4) and its measurements are in docs/performance.md and
docs/exactness.md.

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

Precision = Literal["fp32", "bf16", "bf16x3", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "bf16x3", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16x3": torch.bfloat16, "fp16": torch.float16}
EMULATED = "-emulated"


def precision_dtype(precision: str) -> torch.dtype:
    """The torch dtype of ``precision``'s matmul operands (ValueError naming the choices for anything else)."""
    try:
        return _DTYPES[precision]
    except (KeyError, TypeError):
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}") from None


def check_precision(precision: str) -> torch.dtype:
    """The dtype of ``precision``; ValueError (one line naming the choices) for anything else."""
    return precision_dtype(precision)


def precision_identity(precision: str) -> dict[str, object]:
    """What a job's or a tile cache's identity records for ``precision``.

    Until issue 24 ``bf16`` meant three bf16 products per layer (today's
    ``bf16x3``), and stores and caches of that time say ``"bf16"``.  Plain bf16
    also records ``bf16_products: 1``, so neither is ever taken for the other
    (``jobs.spec.stored_identity`` reads the old records as bf16x3).
    """
    return {"precision": precision, **({"bf16_products": 1} if precision == "bf16" else {})}


def matmul_mode(precision: str, device: torch.device | str) -> str:
    """How the pixel stage's matmuls run: ``fp32``, ``bf16``/``bf16x3``/``fp16`` (native kernels
    with fp32 accumulation) or the same with ``-emulated`` (exact fp32 products, see above)."""
    precision_dtype(precision)
    if precision == "fp32":
        return "fp32"
    dev = torch.device(device)
    if dev.type == "cuda" and (precision != "bf16x3" or _native_bf16_fp32_out(str(dev))):
        return precision
    return precision + EMULATED


def matmul_products(mode: str) -> int:
    """Products of a layer's nominal shape that one pixel-stage matmul executes in ``mode``:
    3 for bf16x3 (one GEMM with the inner dimension tripled), 2 for its emulation
    (``[xh, xl] @ [Wh + Wl; Wh]``), else 1.  The bench's executed-FLOP count."""
    if mode == "bf16x3":
        return 3
    return 2 if mode == "bf16x3" + EMULATED else 1


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


def _one_product_dtype(mode: str) -> torch.dtype | None:
    """The operand and activation dtype of a one-product mode (fp16, bf16, emulated or not); else None."""
    base = mode.removesuffix(EMULATED)
    return _DTYPES[base] if base in ("fp16", "bf16") else None


def lower_weight(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """A folded [.., in, out] fp32 matrix prepared for ``low_matmul`` in ``mode``.

    fp16/bf16: the matrix in that dtype (emulated: its values held in fp32).
    bf16x3: ``[Wh; Wh; Wl]`` (3*in rows, bf16) for one product with ``[xh, xl, xh]``;
    emulated: ``[Wh + Wl; Wh]`` (2*in rows, fp32: the sum is exact in fp32) for one
    fp32 product with ``[xh, xl]``.
    """
    if mode == "fp32":
        return weight
    dtype = _one_product_dtype(mode)
    if dtype is not None:
        low = weight.to(dtype)
        return low.float() if mode.endswith(EMULATED) else low
    hi, lo = _hi_lo(weight)
    if mode == "bf16x3":
        return torch.cat([hi, hi, lo], dim=-2)
    return torch.cat([hi.float() + lo.float(), hi.float()], dim=-2)


def lower_bias(bias: torch.Tensor, mode: str) -> torch.Tensor:
    """The bias for ``low_matmul``: fp32 for bf16x3 (added to the fp32 product), the fp16/bf16
    values for the one-product modes (held in fp32 when emulated)."""
    dtype = _one_product_dtype(mode)
    if dtype is None:
        return bias
    low = bias.to(dtype)
    return low.float() if mode.endswith(EMULATED) else low


def activation_dtype(mode: str) -> torch.dtype:
    """The dtype of the pixel MLP's activations between layers in ``mode``."""
    return _one_product_dtype(mode) or torch.float32


def low_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mode: str) -> torch.Tensor:
    """``x [n, in] @ W + b`` with a matrix from ``lower_weight`` (2-D operands), in ``mode``.

    x and the result are fp32 for bf16x3 modes, fp16/bf16 for the one-product modes.
    """
    if mode in ("fp16", "bf16"):
        return torch.addmm(bias, x, weight)
    if mode in ("fp16" + EMULATED, "bf16" + EMULATED):
        return torch.addmm(bias, x.float(), weight).to(x.dtype)
    hi, lo = _hi_lo(x)
    if mode == "bf16x3":
        y = torch.mm(torch.cat([hi, lo, hi], dim=1), weight, out_dtype=torch.float32)
        return y.add_(bias)
    if mode == "bf16x3" + EMULATED:
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
_REDUCTIONS = ("allow_bf16_reduced_precision_reduction", "allow_fp16_reduced_precision_reduction")


def _matmul_state() -> dict[str, object]:
    """Every switch that decides how a CUDA matmul rounds, as the user has them now.

    TF32 has two APIs: the legacy ``torch.set_float32_matmul_precision`` (which
    also drives the legacy ``allow_tf32``) and, from torch 2.9, per-backend
    ``fp32_precision`` values.  Reading ``allow_tf32`` raises once the two
    disagree, so it is never read: the legacy value and the new ones are saved
    side by side and restored in that order, which rebuilds even a mixed state.
    """
    m = torch.backends.cuda.matmul
    state: dict[str, object] = {"float32_matmul_precision": torch.get_float32_matmul_precision()}
    if "fp32_precision" in _names(m):
        state["cuda.fp32_precision"] = m.fp32_precision
        # set_float32_matmul_precision writes mkldnn's matmul value too: restore it as well
        state["mkldnn.fp32_precision"] = torch.backends.mkldnn.matmul.fp32_precision  # type: ignore[attr-defined]
    for name in _REDUCTIONS:  # (allow reduced precision, allow split-K) where torch has both
        split = f"{name}_split_k"
        state[name] = (getattr(m, name), getattr(m, split)) if split in _names(m) else getattr(m, name)
    if "allow_fp16_accumulation" in _names(m):  # torch >= 2.7: fp16 GEMMs summing in fp16
        state["allow_fp16_accumulation"] = m.allow_fp16_accumulation
    return state


@functools.cache
def _names(module: object) -> frozenset[str]:
    """The cuBLAS switch names this torch knows (probed once: a getter of an unknown one raises)."""
    known = set()
    for name in ("fp32_precision", "allow_fp16_accumulation", *(f"{r}_split_k" for r in _REDUCTIONS)):
        try:
            getattr(module, name)
        except AttributeError:
            continue
        known.add(name)
    return frozenset(known)


def _exact_state(like: dict[str, object]) -> dict[str, object]:
    """``like``'s switches set for exact arithmetic: TF32 off in both APIs, fp32 accumulation."""
    exact: dict[str, object] = {"float32_matmul_precision": "highest"}
    for key in like:
        if key.endswith("fp32_precision"):
            exact[key] = "ieee"
        elif key != "float32_matmul_precision":
            exact[key] = (False, False) if isinstance(like[key], tuple) else False
    return exact


def _set_matmul_state(state: dict[str, object]) -> None:
    """Apply a ``_matmul_state`` (the legacy TF32 value first: it overwrites the new ones)."""
    m = torch.backends.cuda.matmul
    torch.set_float32_matmul_precision(str(state["float32_matmul_precision"]))
    if "cuda.fp32_precision" in state:
        m.fp32_precision = state["cuda.fp32_precision"]
        torch.backends.mkldnn.matmul.fp32_precision = state["mkldnn.fp32_precision"]  # type: ignore[attr-defined]
    for name in (*_REDUCTIONS, "allow_fp16_accumulation"):
        if name in state:
            setattr(m, name, state[name])


@contextlib.contextmanager
def exact_matmuls(device: torch.device | str) -> Iterator[None]:
    """Within: CUDA matmuls in full fp32 (no TF32, in the legacy and the new API) and fp32
    accumulation for bf16/fp16 (no fp16 accumulation, no reduced-precision split-K
    reductions); on leaving, every switch as it was.  A no-op on other devices."""
    global _depth
    if torch.device(device).type != "cuda":
        yield
        return
    with _lock:
        if _depth == 0:
            _saved.clear()
            _saved.update(_matmul_state())
            _set_matmul_state(_exact_state(_saved))
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set_matmul_state(_saved)
