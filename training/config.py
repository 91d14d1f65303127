"""The resolved training configuration: one frozen dataclass, stored beside the run.

Defaults follow the StyleGAN2/CREPS recipes scaled to the preset: R1 gamma
from the resolution (``default_gamma``), EMA half-life ``batch * 10 / 32`` kimg
with a 5 % ramp-up, Adam (0, 0.99), lazy R1 every 16 steps, a discriminator
half as wide as the generator.

The command line builds a config in one place, ``TrainConfig.from_args``: every
``train.py train`` flag that sets a field stores its value under the field's
name (``--glr`` -> ``lr_g``), so no field is copied by hand.

The generator is the preset with the variant fields (``rank``, ``decoders``,
``bilines``) overridden when given, or, for a resolution transfer (``--resume
CKPT --resolution 2R``), the checkpoint's own architecture rendering a 2R
canvas of the same coordinate window (docs/experiments.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from creps import GeneratorConfig, preset
from creps.presets import BILINES, DECODERS

from .errors import TrainError

# Options that may change between runs of the same RUNDIR without --force:
# they say how long / how often, not what is trained.
MUTABLE = ("kimg", "snap", "metrics", "metrics_num", "resume", "tick_kimg", "minutes")


def default_gamma(resolution: int) -> float:
    """The R1 weight used when ``--gamma`` is not given.

    32..1024 come from a table (0.05, 0.1, 0.5, 2, 10, 32: about 4x per
    doubling).  Any other resolution gets ``0.0002 * r**2``, the r^2 rule of
    StyleGAN2-ADA's automatic config without its division by the batch size.
    Nothing is interpolated, and the formula does not continue the table (it
    gives 4-8x the table's values, e.g. 210 at 1024): it is mild below 32
    (0.013 at 8, 0.05 at 16) but very strong above 1024 (839 at 2048), so give
    ``--gamma`` there.
    """
    table = {32: 0.05, 64: 0.1, 128: 0.5, 256: 2.0, 512: 10.0, 1024: 32.0}
    return table.get(resolution, 0.0002 * resolution**2)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (printed and saved as config.json)."""

    data: str
    preset: str = "small64"
    resolution: int = 0  # 0 = the dataset's resolution
    batch: int = 16
    batch_gpu: int = 0  # images per process per pass; 0 = batch / processes (less: gradient accumulation)
    kimg: float = 100.0
    gamma: float = -1.0  # < 0: default_gamma(resolution)
    aug: str = "ada"  # ada | noaug
    ada_target: float = 0.6
    ada_kimg: float = 100.0
    ada_interval: int = 4
    r1_interval: int = 16
    lr_g: float = 0.002
    lr_d: float = 0.002
    betas: tuple[float, float] = (0.0, 0.99)
    ema_kimg: float = -1.0  # < 0: batch * 10 / 32
    ema_rampup: float = 0.05
    d_channel_base: int = 0  # 0: half the generator's channel base
    d_channel_max: int = 0  # 0: min(512, max(128, generator channel max))
    mbstd_group: int = 4
    mirror: bool = False  # x-flip real images at random (in addition to ADA)
    seed: int = 0
    snap: float = 10.0  # kimg between snapshots (checkpoint + grid)
    tick_kimg: float = 1.0  # kimg between log lines
    minutes: float = 0.0  # wall-clock budget of this run (0: none); stops cleanly with a checkpoint
    metrics: tuple[str, ...] = ()
    metrics_num: int = 2000
    resume: str = ""
    rank: int = 0  # 0: the preset's; else the bi-line thickness (Tab. 4's d)
    decoders: str = ""  # "": the preset's ("multiple"); "none": E^(l+1) = E^(l) + F^(l+1)
    bilines: str = ""  # "": the preset's ("all"); "last": the bi-line baseline (implies decoders "none")
    amp: bool = True  # bf16 autocast on CUDA only
    generator: dict[str, Any] = field(default_factory=dict)  # resolved GeneratorConfig fields

    def __post_init__(self) -> None:
        if self.batch < 2:
            raise TrainError(f"--batch must be >= 2 (minibatch-std needs pairs), got {self.batch}")
        for f in fields(self):  # nan/inf would pass every comparison below and fail deep inside
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise TrainError(f"{f.name} must be a finite number, got {value}")
        if self.batch_gpu < 0 or (self.batch_gpu and self.batch % self.batch_gpu):
            raise TrainError(f"--batch-gpu must divide --batch {self.batch}, got {self.batch_gpu}")
        if self.kimg <= 0:
            raise TrainError(f"--kimg must be positive, got {self.kimg}")
        if self.minutes < 0:
            raise TrainError(f"--minutes must be >= 0, got {self.minutes}")
        if self.aug not in ("ada", "noaug"):
            raise TrainError(f"--aug must be 'ada' or 'noaug', got {self.aug!r}")
        unknown = sorted(set(self.metrics) - {"fid", "kid"})
        if unknown:
            raise TrainError(f"unknown metrics {unknown}; choose from fid, kid")
        if self.rank < 0:
            raise TrainError(f"--rank must be positive (0: the preset's), got {self.rank}")
        if self.decoders not in ("", *DECODERS):
            raise TrainError(f"--decoders must be one of {', '.join(DECODERS)}, got {self.decoders!r}")
        if self.bilines not in ("", *BILINES):
            raise TrainError(f"--bilines must be one of {', '.join(BILINES)}, got {self.bilines!r}")

    # ---------------------------------------------------------------- derived
    @property
    def gen(self) -> GeneratorConfig:
        return GeneratorConfig.from_dict(self.generator)

    @property
    def r1_gamma(self) -> float:
        return self.gamma if self.gamma >= 0 else default_gamma(self.resolution)

    @property
    def ema_nimg(self) -> float:
        kimg = self.ema_kimg if self.ema_kimg >= 0 else self.batch * 10 / 32
        return kimg * 1000

    @property
    def total_steps(self) -> int:
        return max(1, round(self.kimg * 1000 / self.batch))

    def variant(self) -> dict[str, Any]:
        """The generator fields the command line sets (``--rank``, ``--decoders``, ``--bilines``)."""
        over: dict[str, Any] = {}
        if self.rank:
            over["rank"] = self.rank
        if self.decoders:
            over["decoders"] = self.decoders
        if self.bilines:
            over["bilines"] = self.bilines
            if self.bilines == "last" and not self.decoders:
                over["decoders"] = "none"  # one bi-line: nothing to decode between blocks
        return over

    def resolve(self, dataset_resolution: int, transfer_from: GeneratorConfig | None = None) -> TrainConfig:
        """Fill in resolution, generator config and D width from the preset and the data.

        ``transfer_from`` is the ``--resume`` checkpoint's generator config when
        ``--resolution`` was given: if its image size differs from ``--resolution``
        this is a resolution transfer, and the generator is that architecture
        (its blocks, rank, decoders) rendering a ``--resolution`` canvas of the
        same coordinate window: the coordinate vectors get longer, no weight
        changes shape.  A checkpoint that is itself a transfer (``size`` set)
        keeps its architecture too, so it can be fine-tuned further.
        """
        res = self.resolution or dataset_resolution
        if res != dataset_resolution:
            raise TrainError(
                f"--resolution {res} but the dataset is {dataset_resolution}x{dataset_resolution}; "
                f"rebuild it with `train.py dataset SRC DEST --resolution {res}`"
            )
        try:
            if transfer_from is not None and (transfer_from.image_size != res or transfer_from.size):
                differing = {k: v for k, v in self.variant().items() if getattr(transfer_from, k) != v}
                if differing:
                    raise TrainError(
                        f"a resolution transfer keeps the checkpoint's architecture; drop {', '.join(differing)}"
                    )
                gen = dataclasses.replace(transfer_from, size=0 if res == transfer_from.resolution else res)
            else:
                try:
                    base = preset(self.preset)
                except KeyError as e:
                    raise TrainError(str(e.args[0])) from None
                gen = dataclasses.replace(base, resolution=res, **self.variant())
        except ValueError as e:
            raise TrainError(str(e)) from None
        return dataclasses.replace(
            self,
            resolution=res,
            generator=gen.to_dict(),
            d_channel_base=self.d_channel_base or gen.channel_base // 2,
            d_channel_max=self.d_channel_max or min(512, max(128, gen.channel_max)),
        )

    # ------------------------------------------------------------------ io
    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        """The config of a parsed ``train.py train`` command line.

        The parser stores each config flag under its field's name, so this is
        the only place the two meet; attributes that are not fields (``out``,
        ``device``, ``debug``, ...) are ignored and absent fields keep their
        defaults, which are the flags' defaults too (a test checks both).
        """
        given = vars(args)
        return cls(**{f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"], d["metrics"] = list(self.betas), list(self.metrics)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        if "metrics" in d:
            d["metrics"] = tuple(d["metrics"])
        return cls(**d)

    def differences(self, other: TrainConfig) -> list[str]:
        """Fields (other than MUTABLE ones) whose values differ."""
        a, b = self.to_dict(), other.to_dict()
        return sorted(k for k in a if k not in MUTABLE and a[k] != b.get(k))
