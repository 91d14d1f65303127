"""The CREPS generator: mapping, line stage and pixel stage.

CREPS has no spatial operation: pixel (i, j) depends on w, the row coordinate
y_i and the column coordinate x_j only.  The computation therefore splits in
two stages that the renderer runs separately:

* the **line stage** (``Generator.lines``) turns a vector of coordinates into
  line features: for every line block k >= 1 the cumulative bi-line, already
  multiplied by sqrt(0.5), as ``[B, K, L, rank, C]``.  Row lines use the first
  ``rank`` slots of the Fourier input, column lines the other ``rank``.
* the **pixel stage** (``Generator.pixels``) fuses one row-line and one
  column-line per pixel (rank-r outer product per block), runs the decoders and
  the two refinement blocks.

Exactness (docs/exactness.md): BLAS may pick a different kernel, hence a
different summation order, for a different matrix size.  So lines are computed
in blocks of ``LINE_BLOCK`` positions aligned to the *global* coordinate index
and the pixel stage runs in blocks of exactly ``pixel_block`` pixels (the last
one padded).  Every matmul a pixel takes part in then has the same shape
whatever tile it belongs to, and a tile is bit-identical to the same crop of
the full frame.

Both stages take their per-latent matrices folded once (``LineWeights``,
``PixelWeights``): a job folds them for its latent and reuses them for every
line range and tile it renders.

Module and parameter names follow the official implementation so that its
state dicts load one to one (see creps.checkpoint).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import numpy as np
import torch
from torch import nn

from .canvas import Canvas
from .folded import BlockWeights, LineWeights, PixelWeights
from .lanes import resolve as cpu_lanes
from .lanes import run as run_lanes
from .lanes import window_lines
from .layers import Affine, FullyConnected, ModulatedFC, activate, apply
from .precision import activation_dtype, check_precision, exact_matmuls, low_matmul, matmul_mode
from .presets import GeneratorConfig

LINE_BLOCK = 64  # line positions per line-stage matmul, aligned to global index
PIXEL_BLOCK = 4096  # pixels per pixel-stage block on CPU (fits L2 with 128 ch)
PIXEL_BLOCK_CUDA = 1 << 18  # on a GPU, blocks big enough to fill the device


def default_pixel_block(device: torch.device | str) -> int:
    """The block size a renderer should use on ``device`` (one value per job)."""
    return PIXEL_BLOCK_CUDA if torch.device(device).type == "cuda" else PIXEL_BLOCK


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


class Mapping(nn.Module):
    w_avg: torch.Tensor  # buffer; declared so type checkers know it is a tensor

    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dims = [cfg.z_dim] + [cfg.w_dim] * cfg.mapping_layers
        for i in range(cfg.mapping_layers):
            setattr(self, f"fc{i}", FullyConnected(dims[i], dims[i + 1], lrelu=True, lr_multiplier=cfg.mapping_lr))
        self.register_buffer("w_avg", torch.zeros(cfg.w_dim))

    def forward(self, z: torch.Tensor, psi: float = 1.0, update_w_avg: bool = False) -> torch.Tensor:
        x = normalize_2nd_moment(z.to(torch.float32))
        for i in range(self.cfg.mapping_layers):
            x = getattr(self, f"fc{i}")(x)
        if update_w_avg:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.cfg.w_avg_beta))
        x = x.unsqueeze(1).repeat(1, self.cfg.num_ws, 1)
        if psi != 1:
            x = self.w_avg.lerp(x, psi)
        return x


class FourierInput(nn.Module):
    """Official ``SynthesisInput``: fixed random frequencies, learned amplitudes."""

    freqs: torch.Tensor  # buffers; declared so type checkers know they are tensors
    coords: torch.Tensor

    def __init__(self, cfg: GeneratorConfig, channels: int) -> None:
        super().__init__()
        self.channels, self.rank = channels, cfg.rank
        self.register_buffer("freqs", torch.randn(1, channels // 2 * cfg.rank) * cfg.bandwidth)
        # Kept only so the official key layout round-trips; coordinates come from Canvas.
        coords = torch.linspace(0, 1, cfg.resolution).reshape(1, -1, 1, 1).repeat(1, 1, 2, 1)
        self.register_buffer("coords", coords)
        self.weight = nn.Parameter(torch.randn(1, channels, 1, 2 * cfg.rank))
        self.affine = FullyConnected(cfg.w_dim, channels * 2 * cfg.rank, bias_init=1.0)

    def amplitude(self, w: torch.Tensor) -> torch.Tensor:
        """Per-latent amplitudes [B, C, 1, 2r] of both halves.  A [C*2r, w_dim] affine (ffhq512:
        16384 x 512): ~30 ms on a CPU core, a sixth of a 64-position line block, so
        ``Generator.line_weights`` computes it once per latent, not once per block."""
        return self.weight * self.affine(w).reshape(w.shape[0], self.channels, 1, 2 * self.rank)

    def features(self, amp: torch.Tensor, t: torch.Tensor, half: int) -> torch.Tensor:
        """Features [B, L, rank, C] for coordinates t [L] from ``amplitude``; half 0 = rows, 1 = columns."""
        c, r = self.channels, self.rank
        f = self.freqs.reshape(c // 2, r)  # [C/2, rank]
        phase = (t.reshape(-1, 1, 1) * f.t().unsqueeze(0)) * (np.pi * 2)  # [L, rank, C/2]
        x = torch.sin(torch.cat([phase, phase + np.pi / 2], dim=2))  # [L, rank, C]
        amp = amp[:, :, 0, half * r : (half + 1) * r].transpose(1, 2)  # [B, rank, C]
        return x.unsqueeze(0) * amp.unsqueeze(1) / np.sqrt(c)

    def forward(self, w: torch.Tensor, t: torch.Tensor, half: int) -> torch.Tensor:
        return self.features(self.amplitude(w), t, half)


class LineBlock(nn.Module):
    """Official ``SynthesisBlock`` of the line stage (b4 ... bR)."""

    def __init__(self, cfg: GeneratorConfig, res: int) -> None:
        super().__init__()
        out_ch = cfg.channels(res)
        self.first = res == 4
        if self.first:
            self.input = FourierInput(cfg, out_ch)
        else:
            self.fc0 = ModulatedFC(cfg.channels(res // 2), out_ch, cfg.w_dim, cfg.fc_clamp)
        self.fc1 = ModulatedFC(out_ch, out_ch, cfg.w_dim, cfg.fc_clamp)
        # b4.tores exists in the official weights but its output is never used.
        self.tores = ModulatedFC(out_ch, cfg.biline_channels, cfg.w_dim, cfg.fc_clamp, tores=True)


class RefineBlock(nn.Module):
    """Official ``block0`` / ``block1``: per-pixel modulated MLP adding to rgb."""

    def __init__(self, cfg: GeneratorConfig, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.fc0 = ModulatedFC(in_ch, out_ch, cfg.w_dim, cfg.fc_clamp)
        self.fc1 = ModulatedFC(out_ch, out_ch, cfg.w_dim, cfg.fc_clamp)
        self.tores = ModulatedFC(out_ch, cfg.img_channels, cfg.w_dim, cfg.fc_clamp, tores=True)


def _fold(decoder: nn.Sequential) -> tuple[Affine, ...]:
    """The layers of a ``_decoder`` (all ``FullyConnected``), folded."""
    return tuple(cast(FullyConnected, layer).effective() for layer in decoder)


def _decoder(c: int) -> nn.Sequential:
    return nn.Sequential(
        FullyConnected(c, 2 * c, lrelu=True),
        FullyConnected(2 * c, 4 * c, lrelu=True),
        FullyConnected(4 * c, 2 * c, lrelu=True),
        FullyConnected(2 * c, c, lrelu=True),
    )


class Synthesis(nn.Module):
    b4: LineBlock  # set with the other line blocks below; declared for type checkers

    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        for res in cfg.block_resolutions:
            setattr(self, f"b{res}", LineBlock(cfg, res))
        # decoder_8 exists in the official weights but is never used.  Variants without decoders
        # between blocks (docs/experiments.md) have no decoder_<res> modules at all.
        if cfg.decoders == "multiple":
            for res in cfg.block_resolutions[1:]:
                setattr(self, f"decoder_{res}", _decoder(cfg.biline_channels))
        self.decoder_last = _decoder(cfg.biline_channels)
        self.decoder_img = FullyConnected(cfg.biline_channels, cfg.img_channels)
        c = cfg.biline_channels
        self.block0 = RefineBlock(cfg, c, 4 * c)
        self.block1 = RefineBlock(cfg, 4 * c, 2 * c)


def block_shape(h: int, w: int, pixel_block: int) -> tuple[int, int]:
    """(rows, columns) of the pixel blocks of an h x w window: the fewest blocks, each run padded
    to ``pixel_block`` pixels.

    Whole rows when a row fits (``pixel_block // w`` of them, as always); a
    longer row is cut into segments of ``pixel_block / 2^k`` columns, ``2^k``
    rows a block, choosing k for the fewest blocks: 6144-px rows in 4096-px
    segments ran every row as two full blocks (a third of the work padding),
    in 512-px segments of 8 rows they fill every block.  Any shape gives the
    same bytes: the fusion is elementwise and every matmul has ``pixel_block``
    rows.
    """
    if w <= pixel_block:
        return pixel_block // w, w
    best = (pixel_block, 1)
    nr = 1
    while pixel_block // nr >= 64 and pixel_block % nr == 0:
        seg = pixel_block // nr
        if -(-h // nr) * -(-w // seg) < -(-h // best[1]) * -(-w // best[0]):
            best = (seg, nr)
        nr *= 2
    return best[1], best[0]


def _block_starts(start: int, stop: int, block: int) -> range:
    return range((start // block) * block, stop, block)


def _padded(coords: torch.Tensor, first: int, stop: int, block: int) -> torch.Tensor:
    """fp32 ``coords[first:]`` up to the end of the block holding position ``stop - 1``, padded past
    the vector's end by repeating its last position.  Blocks are slices of it: no index tensor,
    so no host-to-device copy per block on a GPU (a blocking one, which waits for the stream)."""
    n = coords.shape[0]
    end = first + -(-(stop - first) // block) * block
    t = coords[first : min(end, n)]
    if end > n:
        t = torch.cat([t, coords[n - 1 :].expand(end - n)])
    return t.to(torch.float32)


class Generator(nn.Module):
    """CREPS generator with separately callable line and pixel stages."""

    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.synthesis = Synthesis(cfg)
        self.mapping = Mapping(cfg)

    # ------------------------------------------------------------------ latents
    @property
    def num_ws(self) -> int:
        return self.cfg.num_ws

    def ws(self, z_or_w: torch.Tensor, psi: float = 1.0) -> torch.Tensor:
        """Accept z [B, z_dim] (mapped, truncated) or ws [B, num_ws, w_dim] (as is)."""
        if z_or_w.dim() == 3:
            if tuple(z_or_w.shape[1:]) != (self.num_ws, self.cfg.w_dim):
                raise ValueError(f"ws must be [B, {self.num_ws}, {self.cfg.w_dim}], got {list(z_or_w.shape)}")
            return z_or_w.to(torch.float32)
        if z_or_w.dim() != 2 or z_or_w.shape[1] != self.cfg.z_dim:
            raise ValueError(f"z must be [B, {self.cfg.z_dim}], got {list(z_or_w.shape)}")
        return self.mapping(z_or_w, psi=psi)

    def z_from_seed(self, seed: int, batch: int = 1) -> torch.Tensor:
        """The official scripts' latent: ``RandomState(seed).randn(1, z_dim)``."""
        z = np.random.RandomState(seed).randn(batch, self.cfg.z_dim)
        return torch.from_numpy(z).to(torch.float32)

    # --------------------------------------------------------------- line stage
    def line_weights(self, ws: torch.Tensor) -> LineWeights:
        """Per-sample matrices of every line block.

        Folding costs a few small matmuls per latent; a job computes this once
        and passes it to every ``lines`` call instead of refolding per range.
        """
        syn = self.synthesis
        first_fc1 = syn.b4.fc1.effective(ws[:, 1])
        blocks = []
        for i, res in enumerate(self.cfg.block_resolutions[1:], start=1):
            blk = getattr(syn, f"b{res}")
            blocks.append(
                BlockWeights(
                    blk.fc0.effective(ws[:, 2 * i - 1]),
                    blk.fc1.effective(ws[:, 2 * i]),
                    blk.tores.effective(ws[:, 2 * i + 1]),
                )
            )
        return LineWeights(first_fc1, tuple(blocks), syn.b4.input.amplitude(ws[:, 0]))

    def lines(
        self,
        ws: torch.Tensor,
        coords: torch.Tensor,
        which: str,
        start: int = 0,
        stop: int | None = None,
        weights: LineWeights | None = None,
    ) -> torch.Tensor:
        """Line features [B, K, stop-start, rank, C] for positions [start, stop)
        of the *global* coordinate vector ``coords`` (``which`` = row | col)."""
        if which not in ("row", "col"):
            raise ValueError(f"which must be 'row' or 'col', got {which!r}")
        n = coords.shape[0]
        stop = n if stop is None else stop
        if not 0 <= start < stop <= n:
            raise ValueError(f"line range [{start}, {stop}) outside 0..{n}")
        weights = self.line_weights(ws) if weights is None else weights
        parts = []
        blocks = _block_starts(start, stop, LINE_BLOCK)
        t_all = _padded(coords, blocks.start, blocks.stop, LINE_BLOCK)
        with exact_matmuls(ws.device):  # the line stage is fp32 in every precision; on CUDA: no TF32
            for b0 in blocks:
                t = t_all[b0 - blocks.start : b0 - blocks.start + LINE_BLOCK]
                feats = self._line_block(ws, t, 0 if which == "row" else 1, weights)
                lo, hi = max(start, b0) - b0, min(stop, b0 + LINE_BLOCK) - b0
                parts.append(feats[:, :, lo:hi])
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0].contiguous()

    def _line_block(self, ws: torch.Tensor, t: torch.Tensor, half: int, weights: LineWeights) -> torch.Tensor:
        cfg, syn = self.cfg, self.synthesis
        bsz, L, r = ws.shape[0], t.shape[0], cfg.rank
        clamp = cfg.fc_clamp
        x = syn.b4.input.features(weights.input_amp, t, half).reshape(bsz, L * r, -1)  # [B, L*rank, C]
        x = apply(x, *weights.first_fc1, True, clamp)
        res: torch.Tensor | None = None
        out = []
        last = len(weights.blocks) - 1
        for i, blk in enumerate(weights.blocks):
            x = apply(x, *blk.fc0, True, clamp)
            x = apply(x, *blk.fc1, True, clamp)
            y = apply(x, *blk.tores, False, clamp)
            res = y if res is None else res + y
            if cfg.bilines == "all" or i == last:  # "last": the bi-line baseline keeps bR's only
                out.append(res * math.sqrt(0.5))
        return torch.stack(out, dim=1).reshape(bsz, len(out), L, r, cfg.biline_channels)

    # -------------------------------------------------------------- pixel stage
    def pixel_weights(self, ws: torch.Tensor) -> PixelWeights:
        """Matrices of the pixel stage, folded once per latent like ``line_weights``.

        decoder_8 is skipped: the first bi-line enters the cascade undecoded.
        """
        syn, w = self.synthesis, ws[:, -1]
        has_decoders = self.cfg.decoders == "multiple"
        return PixelWeights(
            decoders=tuple(_fold(getattr(syn, f"decoder_{res}")) for res in self.cfg.block_resolutions[2:])
            if has_decoders
            else (),
            last=_fold(syn.decoder_last),
            img=syn.decoder_img.effective(),
            refine=tuple(
                BlockWeights(blk.fc0.effective(w), blk.fc1.effective(w), blk.tores.effective(w))
                for blk in (syn.block0, syn.block1)
            ),
        )

    def pixels(
        self,
        ws: torch.Tensor,
        row_lines: torch.Tensor,
        col_lines: torch.Tensor,
        pixel_block: int | str | None = "auto",
        weights: PixelWeights | None = None,
        precision: str = "fp32",
        lanes: int | None = None,
    ) -> torch.Tensor:
        """Image [B, 3, h, w] (float32) from row lines [B, K, h, r, C] and col lines [B, K, w, r, C].

        ``pixel_block="auto"`` picks ``default_pixel_block(device)``;
        ``pixel_block=None`` runs all pixels in one differentiable pass
        (training).  Otherwise the image is cut into blocks of whole rows (or
        of row segments a few rows high when a row is longer than the block:
        ``block_shape``) and every block is padded to exactly ``pixel_block``
        pixels, so each matmul has one shape.
        The rank-r fusion uses elementwise multiplies and adds only, which
        round the same whatever the block shape.

        ``precision`` (``creps.precision``): ``fp32`` is exact; ``fp16`` /
        ``bf16`` / ``bf16x3`` run the MLP's matmuls in that format (``weights``
        may come already prepared with ``PixelWeights.lowered``, else they are
        prepared here), while the fusion, the residual sums and the RGB sum
        stay fp32.  Blocked renders only: the training pass is fp32.

        ``lanes`` (blocked renders on a CPU): the pixel blocks are spread over
        that many single-threaded lanes (``creps.lanes``; default: the calling
        thread's torch thread count, so 1 inside a render worker's lane), the
        same bytes as one lane.  One lane when gradients are wanted.
        """
        check_precision(precision)
        weights = self.pixel_weights(ws) if weights is None else weights
        if pixel_block == "auto":
            pixel_block = default_pixel_block(row_lines.device)
        if pixel_block is None:
            if precision != "fp32" or weights.mode != "fp32":
                raise ValueError(f"precision {precision!r} applies to blocked renders; the training pass is fp32")
            return self._pixels_one_pass(row_lines, col_lines, weights)
        if not isinstance(pixel_block, int):
            raise TypeError(f"pixel_block must be 'auto', None or an int, got {pixel_block!r}")
        weights = weights.lowered(matmul_mode(precision, row_lines.device))
        n = cpu_lanes(row_lines.device, lanes, row_lines, col_lines, weights.img.weight)
        with exact_matmuls(row_lines.device):
            return self._pixels_blocked(row_lines, col_lines, pixel_block, weights, n)

    def _pixels_blocked(
        self, row_lines: torch.Tensor, col_lines: torch.Tensor, pixel_block: int, weights: PixelWeights, lanes: int = 1
    ) -> torch.Tensor:
        bsz, _, h, _, _ = row_lines.shape
        w = col_lines.shape[2]
        out = torch.empty(bsz, h, w, self.cfg.img_channels, dtype=torch.float32, device=row_lines.device)
        # Rank-major copies so every fusion operand is a contiguous [L, C] slab.
        R = row_lines.permute(0, 1, 3, 2, 4).contiguous()  # [B, K, r, h, C]
        Cl = col_lines.permute(0, 1, 3, 2, 4).contiguous()  # [B, K, r, w, C]
        K = R.shape[1]
        nr, seg = block_shape(h, w, pixel_block)
        samples = [weights.sample(b) for b in range(bsz)]
        mlp = self._pixel_mlp if weights.mode == "fp32" else self._pixel_mlp_low
        blocks = [
            (b, i0, min(h, i0 + nr), j0, min(w, j0 + seg))
            for b in range(bsz)
            for i0 in range(0, h, nr)
            for j0 in range(0, w, seg)
        ]

        def scratch() -> torch.Tensor:  # one per lane; rows past a short block's end are never read back
            return torch.zeros(K, pixel_block, self.cfg.biline_channels, dtype=torch.float32, device=row_lines.device)

        def block(buf: torch.Tensor, where: tuple[int, int, int, int, int]) -> None:
            b, i0, i1, j0, j1 = where
            n = (i1 - i0) * (j1 - j0)
            # F_k for all k at once: sum over rank slots, one slot at a time.
            view = buf[:, :n].view(K, i1 - i0, j1 - j0, -1)
            for r in range(R.shape[2]):
                rr = R[b, :, r, i0:i1].unsqueeze(2)  # [K, nr, 1, C]
                cc = Cl[b, :, r, j0:j1].unsqueeze(1)  # [K, 1, w, C]
                if r == 0:
                    torch.mul(rr, cc, out=view)
                else:
                    view.add_(rr * cc)
            rgb = mlp(buf.__getitem__, K, samples[b])
            out[b, i0:i1, j0:j1] = rgb[:n].view(i1 - i0, j1 - j0, -1)

        run_lanes(blocks, block, lanes, scratch)
        return out.permute(0, 3, 1, 2)

    def _pixels_one_pass(self, R: torch.Tensor, C: torch.Tensor, weights: PixelWeights) -> torch.Tensor:
        bsz, K, h = R.shape[:3]
        w = C.shape[2]

        def fuse(k: int) -> torch.Tensor:
            f = (R[:, k].unsqueeze(2) * C[:, k].unsqueeze(1)).sum(dim=3)  # [B, h, w, C]
            return f.reshape(bsz, h * w, -1)

        rgb = self._pixel_mlp(fuse, K, weights)
        return rgb.reshape(bsz, h, w, -1).permute(0, 3, 1, 2)

    def _pixel_mlp(self, fuse: Callable[[int], torch.Tensor], K: int, wts: PixelWeights) -> torch.Tensor:
        """Decoder cascade + refinement for one block of pixels.

        ``fuse(k)`` gives the fused bi-line F_k; it is a callable so that each
        F_k is built only when the cascade reaches it (one live at a time).
        Without decoders (``decoders="none"``) the cascade is E_k = E_(k-1) + F_k.
        """
        clamp = self.cfg.fc_clamp
        feat = fuse(0)
        for k in range(1, K):
            for wt, b in wts.decoders[k - 1] if wts.decoders else ():
                feat = apply(feat, wt, b, True, None)
            f = fuse(k)
            feat = feat.add_(f) if not feat.requires_grad else feat + f
        for wt, b in wts.last:
            feat = apply(feat, wt, b, True, None)
        img = apply(feat, *wts.img, False, None)
        x = feat
        for blk in wts.refine:
            x = apply(x, *blk.fc0, True, clamp)
            x = apply(x, *blk.fc1, True, clamp)
            y = apply(x, *blk.tores, False, clamp)
            img = img.add_(y) if not img.requires_grad else img + y
        return img

    def _pixel_mlp_low(self, fuse: Callable[[int], torch.Tensor], K: int, wts: PixelWeights) -> torch.Tensor:
        """``_pixel_mlp`` with every matmul in ``wts.mode`` (fp16/bf16/bf16x3, creps.precision).

        The fused bi-lines F_k are fp32 and added to the cascade in fp32 (an fp16 or
        bf16 ``feat`` takes the fp32 sum rounded once); the RGB sum is fp32.  Inference only.
        """
        mode, clamp = wts.mode, self.cfg.fc_clamp

        def layer(x: torch.Tensor, a: Affine, lrelu: bool, c: float | None) -> torch.Tensor:
            return activate(low_matmul(x, a.weight, a.bias, mode), lrelu, c)

        feat = fuse(0).to(activation_dtype(mode), copy=True)
        for k in range(1, K):
            for a in wts.decoders[k - 1]:
                feat = layer(feat, a, True, None)
            feat.add_(fuse(k))
        for a in wts.last:
            feat = layer(feat, a, True, None)
        img = layer(feat, wts.img, False, None).float()
        x = feat
        for blk in wts.refine:
            x = layer(x, blk.fc0, True, clamp)
            x = layer(x, blk.fc1, True, clamp)
            img.add_(layer(x, blk.tores, False, clamp))
        return img

    # ----------------------------------------------------------------- renders
    def render(
        self,
        z_or_w: torch.Tensor,
        canvas: Canvas,
        rows: tuple[int, int] | None = None,
        cols: tuple[int, int] | None = None,
        psi: float = 1.0,
        pixel_block: int | str | None = "auto",
        precision: str = "fp32",
        lanes: int | None = None,
    ) -> torch.Tensor:
        """Tile [B, 3, r1-r0, c1-c0] of ``canvas``, float32, about [-1, 1].

        Runs on the device of the generator's weights; ``precision`` is the
        pixel stage's (``creps.precision``: fp32 exact, the others within
        their documented errors).  On a CPU it renders as a job's workers do:
        the line blocks of the rows and columns (each computed once), then
        the pixel blocks, spread over ``lanes`` single-threaded lanes
        (``creps.lanes``; default: one per torch thread of the caller), the
        same bytes as one lane.
        """
        r0, r1 = rows if rows is not None else (0, canvas.height)
        c0, c1 = cols if cols is not None else (0, canvas.width)
        canvas.check_window(r0, r1, c0, c1)
        device = self.synthesis.b4.input.freqs.device
        ws = self.ws(z_or_w.to(device), psi)
        n = cpu_lanes(device, lanes, ws)
        coords = {"row": canvas.row_coords().to(device), "col": canvas.col_coords().to(device)}
        weights = self.line_weights(ws)

        def lines(which: str, a: int, b: int) -> torch.Tensor:
            return self.lines(ws, coords[which], which, a, b, weights=weights)

        R, C = window_lines(lines, (r0, r1), (c0, c1), LINE_BLOCK, n)
        return self.pixels(ws, R, C, pixel_block=pixel_block, precision=precision, lanes=n)

    def forward(self, z: torch.Tensor, psi: float = 1.0, update_w_avg: bool = False) -> torch.Tensor:
        """Full frame at the training resolution (``cfg.image_size``; the official default grid)."""
        ws = self.mapping(z, psi=psi, update_w_avg=update_w_avg)
        return self.synthesize(ws)

    def synthesize(self, ws: torch.Tensor, size: int | None = None) -> torch.Tensor:
        n = self.cfg.image_size if size is None else size
        t = Canvas(n, n).row_coords().to(ws.device)
        R = self.lines(ws, t, "row")
        C = self.lines(ws, t, "col")
        return self.pixels(ws, R, C, pixel_block=None)


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    """The official conversion: clamp(x * 127.5 + 128, 0, 255) truncated to uint8."""
    return (img * 127.5 + 128).clamp(0, 255).to(torch.uint8)
