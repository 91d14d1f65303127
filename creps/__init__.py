"""CREPS generator: the model, its presets, checkpoints and cost model."""

from .canvas import Canvas
from .checkpoint import CheckpointError, checkpoint_hash, load, save
from .flops import Flops, flops
from .network import LINE_BLOCK, PIXEL_BLOCK, Generator, default_pixel_block, to_uint8
from .presets import PRESETS, GeneratorConfig, preset

__all__ = [
    "Canvas",
    "CheckpointError",
    "checkpoint_hash",
    "load",
    "save",
    "Flops",
    "flops",
    "Generator",
    "GeneratorConfig",
    "LINE_BLOCK",
    "PIXEL_BLOCK",
    "default_pixel_block",
    "PRESETS",
    "preset",
    "to_uint8",
]
