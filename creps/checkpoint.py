"""Generator checkpoints: our safetensors format, official pickles, presets.

Our format is one ``.safetensors`` file: the state dict under the official key
names plus, in the safetensors metadata, ``format`` (``creps-gigapixel/1``)
and ``creps_config`` (the GeneratorConfig as JSON).  Loading it executes no
code and needs nothing else.  Official ``*.pkl`` snapshots are read by
``creps.official`` (restricted unpickler, nothing executed).  ``preset:NAME``
builds fresh, seeded weights, which is what tests and demos render.

Every failure is a ``CheckpointError`` (defined in ``creps.errors``, re-exported
here) with one line saying what is wrong, raised before any generator is built.
``read_config`` answers "which generator is this?" from the same readers
without loading a weight, with the same error for the same bad file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError
from .files import put_in_place, temp_beside
from .network import Generator
from .official import read_official
from .presets import GeneratorConfig, preset

__all__ = [
    "FORMAT",
    "PRESET_PREFIX",
    "TRAIN_FORMAT",
    "CheckpointError",
    "checkpoint_hash",
    "load",
    "read_config",
    "resolve_checkpoint",
    "save",
]

FORMAT = "creps-gigapixel/1"
PRESET_PREFIX = "preset:"
# training/state.py writes these; only the G_ema part is read here, so creps needs nothing of training
TRAIN_FORMAT = "creps-train/1"
TRAIN_EMA_PREFIX = "G_ema/"
TRAIN_CKPT = re.compile(r"^ckpt-(\d+)\.safetensors$")
RUN_EXPORT = "G_ema.safetensors"


def save(G: Generator, path: str | os.PathLike[str]) -> Path:
    """Write ``G`` as ``path`` (.safetensors) atomically: temp file + rename,
    so a reader never sees half a checkpoint."""
    # Looked up per call, not at module level: tests replace it to simulate a full disk.
    from safetensors.torch import save_file

    path = Path(path)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in G.state_dict().items()}
    meta = {"format": FORMAT, "creps_config": json.dumps(G.cfg.to_dict(), sort_keys=True)}
    tmp = temp_beside(path)
    try:
        save_file(sd, tmp, metadata=meta)
        put_in_place(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(spec: str | os.PathLike[str], init_seed: int = 0, device: str | torch.device = "cpu") -> Generator:
    """A Generator in eval mode, gradients off, on ``device``.

    ``spec`` is a ``.safetensors`` file of ours, an official CREPS ``.pkl``, or
    ``preset:NAME`` (fresh weights: ``torch.manual_seed(init_seed)`` then
    ``Generator(preset)`` on the CPU, identical on every machine).
    """
    if isinstance(spec, str) and spec.startswith(PRESET_PREFIX):
        cfg = _preset_config(spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            G = Generator(cfg)
    else:
        path = _existing(spec)
        if _sniff(path) == "safetensors":
            cfg, sd = _read_safetensors(path, tensors=True)
        else:
            cfg, sd = _read_official(path, tensors=True)
        G = Generator(cfg)
        _check_state(G, sd, path)
        G.load_state_dict(sd, strict=True)
    return G.eval().requires_grad_(False).to(device)


def read_config(spec: str | os.PathLike[str], init_seed: int = 0) -> GeneratorConfig:
    """The config ``load(spec, init_seed).cfg`` would have, without loading weights.

    For planning and dry runs: an ffhq512 job can be sized and checked without
    reading 30 M parameters.  It goes through the readers ``load`` uses, so the
    answer and, for every failure it can see, the ``CheckpointError`` message
    are the ones ``load`` gives for the same file:

    * ``preset:NAME``: the preset (``init_seed`` only seeds weights; it is
      accepted so callers can pass what they pass to ``load``);
    * our ``.safetensors``: the header alone (format and ``creps_config``
      metadata); no tensor is read;
    * an official ``.pkl``: the same restricted unpickler, with storages left
      undecoded (shape-only ``meta`` tensors), then the same shape-based
      config inference as ``load`` rather than the pickle's recorded init
      kwargs, so the two cannot disagree.  This still reads the whole file, and
      holds about its size in memory until unpickling ends; no Generator is
      built and nothing is copied into tensors.

    The tensors' names and shapes are checked against a Generator built on
    the ``meta`` device (no storage), with ``load``'s message.  Not checked:
    whether a safetensors file's tensor bytes are intact; ``load`` can still
    fail on such a file after ``read_config`` accepted it.
    """
    if isinstance(spec, str) and spec.startswith(PRESET_PREFIX):
        return _preset_config(spec)
    path = _existing(spec)
    read = _read_safetensors if _sniff(path) == "safetensors" else _read_official
    cfg, shapes = read(path, tensors=False)
    with torch.device("meta"):  # a Generator without storage: its state dict gives the expected shapes
        _check_state(Generator(cfg), shapes, path)
    return cfg


def resolve_checkpoint(spec: str | os.PathLike[str]) -> str:
    """The file a checkpoint spec stands for: a training run directory becomes its newest G_ema.

    That is the highest-step ``ckpt-*.safetensors`` (written before the
    exported ``G_ema.safetensors`` of the same snapshot, so it is never older),
    else ``G_ema.safetensors``.  A render job resolves its spec once, before it
    starts, so every worker loads the file that was hashed even if training
    writes a newer snapshot meanwhile.  Presets and files come back unchanged.
    """
    if isinstance(spec, str) and spec.startswith(PRESET_PREFIX):
        return spec
    path = Path(spec)
    if not path.is_dir():
        return str(spec)
    steps = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := TRAIN_CKPT.match(p.name)) and p.is_file())
    if steps:
        return str(steps[-1][1])
    if (path / RUN_EXPORT).is_file():
        return str(path / RUN_EXPORT)
    raise CheckpointError(f"{path} is a directory without ckpt-*.safetensors or {RUN_EXPORT}; not a training run")


def checkpoint_hash(spec: str | os.PathLike[str], init_seed: int = 0) -> str:
    """Identity of a checkpoint for job manifests: sha256 of the file bytes, or
    ``preset:NAME@init<seed>`` for seeded preset weights."""
    if isinstance(spec, str) and spec.startswith(PRESET_PREFIX):
        _preset_config(spec)  # an unknown preset fails here, as in load
        return f"{spec}@init{init_seed}"
    h = hashlib.sha256()
    with open(_existing(spec), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------- helpers
def _preset_config(spec: str) -> GeneratorConfig:
    try:
        return preset(spec[len(PRESET_PREFIX) :])
    except KeyError as e:
        raise CheckpointError(str(e.args[0])) from None


def _existing(spec: str | os.PathLike[str]) -> Path:
    path = Path(resolve_checkpoint(spec))
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def _sniff(path: Path) -> str:
    """'safetensors' or 'pickle' from the first bytes; anything else is refused."""
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if len(head) == 9 and head[8:9] == b"{":
        raise CheckpointError(f"{path}: truncated safetensors file (header longer than the file)")
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if head.startswith(b"PK\x03\x04"):
        raise CheckpointError(
            f"{path}: torch.save zip archives are not supported; use an official .pkl or our .safetensors"
        )
    raise CheckpointError(f"{path}: unknown checkpoint format (neither safetensors nor an official CREPS pickle)")


def _read_safetensors(path: Path, tensors: bool) -> tuple[GeneratorConfig, dict[str, torch.Tensor]]:
    """Config and state dict of our format; ``tensors=False`` reads only the
    header and returns shape-only ``meta`` tensors."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            training = meta.get("format") == TRAIN_FORMAT and "creps_train" in meta
            if not training and (meta.get("format") != FORMAT or "creps_config" not in meta):
                raise CheckpointError(
                    f"{path}: safetensors file is not a creps-gigapixel checkpoint "
                    f"(metadata format={meta.get('format')!r}, expected {FORMAT!r} with creps_config "
                    f"or a training checkpoint {TRAIN_FORMAT!r})"
                )
            # a training checkpoint holds G, G_ema, D and optimiser state: only G_ema renders
            keys = (
                {k[len(TRAIN_EMA_PREFIX) :]: k for k in f.keys() if k.startswith(TRAIN_EMA_PREFIX)}
                if training
                else {k: k for k in f.keys()}
            )
            if tensors:
                sd = {name: f.get_tensor(k) for name, k in keys.items()}
            else:  # shapes from the header, as data-less tensors on the meta device
                sd = {name: torch.empty(f.get_slice(k).get_shape(), device="meta") for name, k in keys.items()}
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error type, and OS errors
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    try:
        if training:
            cfg = GeneratorConfig.from_dict(json.loads(meta["creps_train"])["config"]["generator"])
        else:
            cfg = GeneratorConfig.from_dict(json.loads(meta["creps_config"]))
    except (ValueError, TypeError, KeyError) as e:
        what = "creps_train config.generator" if training else "creps_config"
        raise CheckpointError(f"{path}: bad {what} metadata ({e})") from None
    if training and not sd:
        raise CheckpointError(f"{path}: training checkpoint without G_ema tensors")
    return cfg, sd


def _read_official(path: Path, tensors: bool) -> tuple[GeneratorConfig, dict[str, torch.Tensor]]:
    """``creps.official.read_official`` of a file, its errors prefixed with the path."""
    with open(path, "rb") as f:
        try:
            return read_official(f, tensors=tensors)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None


def _check_state(G: Generator, sd: dict[str, torch.Tensor], path: Path) -> None:
    """Strict key and shape check against the generator, one line naming the culprits."""
    expected = {k: tuple(v.shape) for k, v in G.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unknown = [k for k in sd if k not in expected]
    wrong = [
        f"{k} {list(sd[k].shape)} (expected {list(shape)})"
        for k, shape in expected.items()
        if k in sd and tuple(sd[k].shape) != shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if unknown:
        problems.append(f"{len(unknown)} unknown keys ({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''})")
    if wrong:
        problems.append(f"{len(wrong)} wrong shapes ({'; '.join(wrong[:3])}{'; ...' if len(wrong) > 3 else ''})")
    if problems:
        raise CheckpointError(f"{path}: weights do not match the generator config: {'; '.join(problems)}")
