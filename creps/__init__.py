"""CREPS generator: the model, its presets, checkpoints and cost model."""

from .canvas import Canvas
from .checkpoint import checkpoint_hash, load, read_config, resolve_checkpoint, save
from .errors import CheckpointError, UserError
from .flops import Flops, flops
from .folded import BlockWeights, LineWeights, PixelWeights
from .image import render_image
from .layers import Affine
from .network import LINE_BLOCK, PIXEL_BLOCK, Generator, default_pixel_block, to_uint8
from .precision import PRECISIONS, check_precision, exact_matmuls, matmul_mode
from .presets import PRESETS, GeneratorConfig, preset

__all__ = [
    "LINE_BLOCK",
    "PIXEL_BLOCK",
    "PRECISIONS",
    "PRESETS",
    "Affine",
    "BlockWeights",
    "Canvas",
    "CheckpointError",
    "Flops",
    "Generator",
    "GeneratorConfig",
    "LineWeights",
    "PixelWeights",
    "UserError",
    "check_precision",
    "checkpoint_hash",
    "default_pixel_block",
    "exact_matmuls",
    "flops",
    "load",
    "matmul_mode",
    "preset",
    "read_config",
    "render_image",
    "resolve_checkpoint",
    "save",
    "to_uint8",
]
