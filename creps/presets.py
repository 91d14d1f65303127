"""Generator configurations: the official CREPS shapes plus a tiny one for tests.

A config fully determines every parameter shape, so a checkpoint stores its
config next to its weights and nothing else is needed to rebuild the network.

Three fields go beyond the official configuration (docs/experiments.md): the
supplementary material's model variants (``decoders``, ``bilines``) and the
training canvas of a resolution transfer (``size``).  ``to_dict`` leaves them
out while they hold their defaults, so an official-architecture config writes
the JSON it always wrote (checkpoint metadata, job stores and training
``config.json`` compare equal across versions) and a config without them reads
as the official architecture.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

DECODERS = ("multiple", "none")
BILINES = ("all", "last")
# Fields that are not in the official configuration, with the value that means "as official".
EXTENSIONS: dict[str, Any] = {"decoders": "multiple", "bilines": "all", "size": 0}


@dataclass(frozen=True)
class GeneratorConfig:
    """Shape and constants of a CREPS generator.

    Defaults are the official FFHQ-512 configuration (``--cfg=creps``, whose
    channel base/max are doubled to 65536/1024).
    """

    resolution: int = 512  # training resolution R; sets the line blocks b4..bR
    z_dim: int = 512
    w_dim: int = 512
    img_channels: int = 3
    channel_base: int = 65536
    channel_max: int = 1024
    biline_channels: int = 32
    rank: int = 8
    bandwidth: float = 10.0
    mapping_layers: int = 8
    mapping_lr: float = 0.01
    w_avg_beta: float = 0.998
    fc_clamp: float = 256.0
    # Fusion between synthesis blocks: "multiple" = a decoder MLP between consecutive bi-lines,
    # E^(l+1) = decoder_l(E^(l)) + F^(l+1) (official); "none" = E^(l+1) = E^(l) + F^(l+1).
    decoders: str = "multiple"
    # Which bi-lines reach the pixel stage: "all" line blocks' (layer-wise composition, official)
    # or only the "last" one (the supplementary's "bi-line" baseline; needs decoders="none").
    bilines: str = "all"
    # Side of the full frame G(z) renders, i.e. of the training images; 0 = resolution.  A
    # resolution transfer keeps the blocks of R and trains on a 2R canvas of the same window.
    size: int = 0

    def __post_init__(self) -> None:
        r = self.resolution
        if r < 8 or r & (r - 1):
            raise ValueError(f"resolution must be a power of two >= 8, got {r}")
        for name in ("z_dim", "w_dim", "img_channels", "biline_channels", "rank", "mapping_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.decoders not in DECODERS:
            raise ValueError(f"decoders must be one of {', '.join(DECODERS)}, got {self.decoders!r}")
        if self.bilines not in BILINES:
            raise ValueError(f"bilines must be one of {', '.join(BILINES)}, got {self.bilines!r}")
        if self.bilines == "last" and self.decoders != "none":
            raise ValueError(
                "bilines='last' fuses one bi-line, so there is no decoder between blocks: use decoders='none'"
            )
        if not isinstance(self.size, int) or isinstance(self.size, bool) or not 0 <= self.size <= 2**20:
            raise ValueError(f"size must be 0 (= resolution) or a canvas side in 1..2^20, got {self.size!r}")

    @property
    def block_resolutions(self) -> list[int]:
        return [2**i for i in range(2, int(math.log2(self.resolution)) + 1)]

    def channels(self, res: int) -> int:
        return min(self.channel_base // res, self.channel_max)

    @property
    def num_ws(self) -> int:
        # b4 has one fc, every later block two, plus the last block's tores.
        return 1 + 1 + 2 * (len(self.block_resolutions) - 1) + 1

    @property
    def num_bilines(self) -> int:
        """Bi-lines that enter the fusion: one per line block b8..bR, or only bR's (``bilines="last"``)."""
        return len(self.block_resolutions) - 1 if self.bilines == "all" else 1

    @property
    def image_size(self) -> int:
        """Side of the full frame ``G(z)``: the training images' resolution (``--scale`` multiplies it)."""
        return self.size or self.resolution

    def to_dict(self) -> dict[str, Any]:
        """All fields, less the non-official ones that hold their default (see the module doc)."""
        d = dataclasses.asdict(self)
        for key, default in EXTENSIONS.items():
            if d[key] == default:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GeneratorConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown generator config keys: {unknown}")
        return cls(**d)


PRESETS: dict[str, GeneratorConfig] = {
    "ffhq512": GeneratorConfig(resolution=512),
    "church256": GeneratorConfig(resolution=256),
    "metfaces1024": GeneratorConfig(resolution=1024),
    # Small enough that a full forward takes milliseconds on a CPU.
    "tiny": GeneratorConfig(
        resolution=32,
        z_dim=64,
        w_dim=64,
        channel_base=1024,
        channel_max=64,
        biline_channels=16,
        rank=4,
        mapping_layers=2,
    ),
    # Sized for one H100/H200 and a 9-minute training budget (issue: a bundled model worth
    # looking at): 3.4 M parameters, 443 kFLOP per rendered pixel (small64: 126 K), 13 MB of
    # weights; a 6144^2 render stays near a minute on a 2-core CPU.
    "land128": GeneratorConfig(
        resolution=128,
        z_dim=256,
        w_dim=256,
        channel_base=16384,
        channel_max=256,
        biline_channels=32,
        rank=8,
        mapping_layers=4,
    ),
    # Small but trainable on a CPU in reasonable time: the bundled default.
    "small64": GeneratorConfig(
        resolution=64,
        z_dim=128,
        w_dim=128,
        channel_base=4096,
        channel_max=128,
        biline_channels=16,
        rank=8,
        mapping_layers=4,
    ),
}


def preset(name: str) -> GeneratorConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


# Module-level names, so ``creps.presets.ffhq512`` reads like the configs it is.
ffhq512 = PRESETS["ffhq512"]
church256 = PRESETS["church256"]
metfaces1024 = PRESETS["metfaces1024"]
tiny = PRESETS["tiny"]
small64 = PRESETS["small64"]
