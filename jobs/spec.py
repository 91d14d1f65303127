"""The job spec: one frozen dataclass, from a TOML file and/or CLI flags.

A spec says *what* to render (checkpoint, latent, canvas, tiling, precision,
output) and *how* (workers, device, threads, Ray address).  Only the first
half decides the bytes; ``identity()`` returns exactly that half, so a resumed
job is compared with the store it continues on what matters and may change its
worker count, device or Ray address freely.  (A GPU's fp32 bytes can differ
from a CPU's in the last bits, see docs/exactness.md; resuming on another
device is allowed and is the user's call, like resuming on another CPU.)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from creps import cli, warp
from creps.canvas import MAX_SIDE
from creps.precision import PRECISIONS, precision_identity
from renderer import fsio

from . import JobSpecError

MAX_TILE = 8192
MAX_SHARD_SIDE = 16384  # a worker holds one shard (uint8): 16384^2 x 3 = 768 MiB
TILE_MULTIPLE = 16
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WEIGHTS = REPO_ROOT / "creps" / "weights" / "default.safetensors"
DEFAULT_PRESET = "preset:ffhq512"


def default_checkpoint() -> str:
    """The bundled trained weights when present, else fresh fixed-seed ffhq512 weights."""
    return str(DEFAULT_WEIGHTS) if DEFAULT_WEIGHTS.exists() else DEFAULT_PRESET


@dataclass(frozen=True)
class JobSpec:
    """A render job.  ``height``/``width`` may be left 0 when ``scale`` is set;
    ``resolved(R)`` then fills them in from the checkpoint's resolution R."""

    # what (decides the bytes)
    checkpoint: str = field(default_factory=default_checkpoint)  # file or preset:NAME
    init_seed: int = 0  # weights seed for preset:NAME
    seed: int = 0  # latent z = RandomState(seed).randn(1, z_dim)
    psi: float = 1.0  # truncation
    width: int = 6144
    height: int = 6144
    scale: float | None = None  # N = int(R * scale), square; overrides width/height
    view: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 1.0)  # y0, y1, x0, x1
    warp_rows: str = ""  # creps.warp text mapping the row coordinates ("" = none)
    warp_cols: str = ""  # the same for the column coordinates
    tile: int = 512  # tile side = chunk side
    shard: int = 0  # tiles per shard side; 1 = no sharding, 0 = auto (jobs.plan.auto_shard: object stores shard)
    block: int = 0  # plan tiles per block side, a power of two: workers render whole blocks and write their
    #                 pyramid levels; 1 = row-major tiles, no levels in the render; 0 = auto (jobs.plan.auto_block)
    compressor: str = "zstd"
    precision: str = "fp32"  # pixel stage: fp32 (exact) | fp16 | bf16x3 | bf16 (creps.precision)
    # where
    name: str = "demo"
    out: str = ""  # default ./out/<name>.zarr
    storage_options: dict = field(default_factory=dict)
    # how (free to change on resume)
    workers: int | None = None  # None = one Ray actor per GPU, else per CPU core; 0 = in this process, no Ray
    device: str | None = None  # cpu | cuda; None = cuda when visible (Ray: via gpus_per_worker)
    gpus_per_worker: float = -1.0  # -1 = 1 when CUDA is visible (and device is not cpu), else 0
    threads_per_worker: int = 0  # 0 = cores / workers (in process: lanes = cores on a CPU)
    address: str | None = None  # Ray cluster; None = embedded
    batch: int = 0  # tiles per task; 0 = auto
    exports: bool = True  # TIFF + DZI after the render (when jobs.assemble exists)
    max_retries: int = 4  # per task, and per actor slot

    def __post_init__(self) -> None:
        if not self.out:
            object.__setattr__(self, "out", f"out/{self.name}.zarr")
        object.__setattr__(self, "view", tuple(float(v) for v in self.view))
        object.__setattr__(self, "storage_options", dict(self.storage_options or {}))
        for name in ("warp_rows", "warp_cols"):  # canonical text: "mirror" and "mirror:0.5" are one job
            try:
                object.__setattr__(self, name, warp.canonical(getattr(self, name)))
            except ValueError as e:
                raise JobSpecError(f"{name}: {e}") from None
        self.validate()

    # ------------------------------------------------------------ checks
    def validate(self) -> None:
        """JobSpecError naming the first bad field: the image, then the store layout, then how it runs."""
        self._check_image()
        self._check_layout()
        self._check_compute()

    def _check_image(self) -> None:
        """The latent and the canvas: seeds, checkpoint, psi, size or scale, view window."""
        _int("seed", self.seed, 0, 2**32 - 1)
        _int("init_seed", self.init_seed, 0, 2**63 - 1)
        if not isinstance(self.checkpoint, str) or not self.checkpoint:
            raise JobSpecError("checkpoint must be a file path or preset:NAME")
        if not _finite(self.psi):
            raise JobSpecError(f"psi must be a finite number, got {self.psi!r}")
        if self.scale is None:
            _int("height", self.height, 1, MAX_SIDE, hint="canvas sides must be 1..2^20 pixels")
            _int("width", self.width, 1, MAX_SIDE, hint="canvas sides must be 1..2^20 pixels")
        elif not (_finite(self.scale) and self.scale > 0):
            raise JobSpecError(f"scale must be a positive number, got {self.scale!r}")
        if len(self.view) != 4 or not all(_finite(v) for v in self.view):
            raise JobSpecError(f"view must be four finite numbers Y0,Y1,X0,X1, got {self.view!r}")
        if (self.view[0] == self.view[1] and self.height > 1) or (self.view[2] == self.view[3] and self.width > 1):
            raise JobSpecError(f"view window {self.view} is empty (Y0 == Y1 or X0 == X1)")

    def _check_layout(self) -> None:
        """How the store is laid out: tile, shard, block, compressor, and where it goes."""
        if not isinstance(self.tile, int) or isinstance(self.tile, bool) or self.tile <= 0 or self.tile % TILE_MULTIPLE:
            raise JobSpecError(f"tile must be a positive multiple of {TILE_MULTIPLE}, got {self.tile!r}")
        if self.tile > MAX_TILE:
            raise JobSpecError(f"tile {self.tile} is larger than {MAX_TILE}; use a smaller tile (and --shard)")
        _int("shard", self.shard, 0, 64, hint="tiles per shard side; 0 = auto")
        _int("block", self.block, 0, 1024, hint="tiles per block side, a power of two; 0 = auto, 1 = no levels")
        if self.block & (self.block - 1):
            raise JobSpecError(f"block must be a power of two (tiles per block side), got {self.block}")
        if self.tile * self.shard > MAX_SHARD_SIDE:
            raise JobSpecError(
                f"shard side tile*shard = {self.tile * self.shard} > {MAX_SHARD_SIDE}; a worker holds one shard"
            )
        if self.compressor not in ("zstd", "none"):
            raise JobSpecError(f"compressor must be zstd or none, got {self.compressor!r}")
        if not isinstance(self.out, str) or not self.out.strip():
            raise JobSpecError("out must be a path or URL")

    def _check_compute(self) -> None:
        """Where and how it renders: workers, precision, device, threads, batch, retries, GPUs, storage, Ray."""
        if self.workers is not None:
            _int("workers", self.workers, 0, 4096, hint="0 renders in this process, without Ray")
        if self.precision not in PRECISIONS:
            raise JobSpecError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.device not in (None, "cpu", "cuda"):
            raise JobSpecError(f"device must be cpu or cuda, got {self.device!r}")
        _int("threads_per_worker", self.threads_per_worker, 0, 1024)
        _int("batch", self.batch, 0, 4096)
        _int("max_retries", self.max_retries, 0, 100)
        if not _finite(self.gpus_per_worker) or not (self.gpus_per_worker == -1 or self.gpus_per_worker >= 0):
            raise JobSpecError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker!r}")
        if not isinstance(self.storage_options, dict):
            raise JobSpecError("storage_options must be a JSON object")
        if self.address is not None and not (isinstance(self.address, str) and self.address):
            raise JobSpecError(f"address must be host:port or 'auto', got {self.address!r}")

    def resolved(self, resolution: int) -> JobSpec:
        """Fill height/width from ``scale`` and the checkpoint's training resolution."""
        if self.scale is None:
            return self
        n = int(resolution * self.scale)
        if not 1 <= n <= MAX_SIDE:
            raise JobSpecError(
                f"scale {self.scale} gives a {n}x{n} canvas at resolution {resolution}; sides must be 1..2^20"
            )
        return dataclasses.replace(self, height=n, width=n, scale=None)

    # ------------------------------------------------------------ identity / serialisation
    def identity(self) -> dict:
        """The fields that decide the output bytes (the checkpoint enters by hash, see jobs.run).

        Warps enter only when set, so stores rendered before warps existed keep their identity.
        Stores written before ``precision`` existed hold identities without it;
        ``same_identity`` reads those as fp32, which is what they were; likewise
        stores from before blocks as ``block`` 1 (row-major tiles).
        """
        keys = (
            "init_seed", "seed", "psi", "height", "width", "view", "tile", "shard", "block", "compressor", "precision",
        )  # fmt: skip
        d = self.to_dict()
        ident = {k: d[k] for k in keys}
        ident.update(precision_identity(self.precision))  # plain bf16 is told from the bf16 of older stores
        ident.update({k: d[k] for k in ("warp_rows", "warp_cols") if d[k]})
        return ident

    @property
    def in_process(self) -> bool:
        """Rendered in this process, without Ray: ``workers = 0``, or a ``memory://`` store
        (only this process can see it)."""
        return self.workers == 0 or self.out.startswith("memory://")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["view"] = list(self.view)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise JobSpecError(f"unknown job keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        d = dict(d)
        if "view" in d:
            d["view"] = parse_view(d["view"])
        if isinstance(d.get("storage_options"), str):
            d["storage_options"] = parse_storage_options(d["storage_options"])
        if "size" in d:
            raise JobSpecError("use width/height (or --size WIDTHxHEIGHT on the command line)")
        try:
            return cls(**d)
        except TypeError as e:
            raise JobSpecError(f"bad job: {e}") from None

    @classmethod
    def from_toml(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> JobSpec:
        """Load a TOML job (a flat table, or a [job] table); ``overrides`` (CLI flags) win."""
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise JobSpecError(f"job file {str(path)!r} not found") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise JobSpecError(f"job file {str(path)!r} is not valid TOML: {e}") from None
        data = dict(data.get("job", data))
        if "size" in data:
            w, h = parse_size(str(data.pop("size")))
            data.update(width=w, height=h)
        data.update(overrides or {})
        return cls.from_dict(data)

    def describe(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ---------------------------------------------------------------- parsers (shared with the CLI)
# identity keys added later, as stores written before them hold: fp32, and row-major plans (block 1)
IDENTITY_DEFAULTS: dict[str, Any] = {"precision": "fp32", "block": 1}


def stored_identity(stored: dict) -> dict:
    """A recorded identity as this version names it: keys added later hold their defaults, and
    ``"bf16"`` recorded before plain bf16 existed (without ``bf16_products: 1``,
    ``creps.precision.precision_identity``) is the three-product bf16x3."""
    ident = {**IDENTITY_DEFAULTS, **stored}
    plain = ident.pop("bf16_products", None) == 1
    if ident["precision"] == "bf16" and not plain:
        ident["precision"] = "bf16x3"
    return ident


def same_identity(stored: dict, current: dict) -> bool:
    """Whether a store's recorded identity is the current job's (older stores lack newer keys)."""
    return stored_identity(stored) == stored_identity(current)


def parse_size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' or 'N' (square) -> (width, height); JobSpecError when bad (creps.cli.parse_size)."""
    return cli.parse_size(text, JobSpecError)


def parse_view(value: Any) -> tuple[float, float, float, float]:
    """'Y0,Y1,X0,X1' or four numbers -> four finite floats; JobSpecError when bad (creps.cli.parse_view)."""
    return cli.parse_view(value, JobSpecError)


def parse_storage_options(text: str) -> dict:
    return fsio.parse_storage_options(text, JobSpecError) or {}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(name: str, v: Any, lo: int, hi: int, hint: str = "") -> None:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        extra = f" ({hint})" if hint else ""
        raise JobSpecError(f"{name} must be an integer in {lo}..{hi}{extra}, got {v!r}")
