"""Training checkpoints: one safetensors file per snapshot, written atomically.

Tensors (prefixed ``G/``, ``G_ema/``, ``D/``, ``opt_G/``, ``opt_D/``,
``rng/``) go in the tensor section; the step, images seen, the ADA state,
optimiser hyper-parameters and the resolved config go as JSON in the
metadata under ``creps_train``.  Loading executes no code.  A checkpoint that
cannot be read is reported with its path and never overwritten.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from creps.files import put_in_place, temp_beside

from .errors import TrainError

FORMAT = "creps-train/1"
PATTERN = re.compile(r"^ckpt-(\d{8})\.safetensors$")


def ckpt_name(step: int) -> str:
    return f"ckpt-{step:08d}.safetensors"


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step in ``run_dir`` (None if there is none)."""
    d = Path(run_dir)
    if not d.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in d.iterdir() if (m := PATTERN.match(p.name)))
    return found[-1][1] if found else None


def _opt_tensors(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Per-parameter state as tensors (0-d ones stored as [1]); groups as JSON."""
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            t = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu()
            tensors[f"{prefix}/{idx}/{k}"] = (t.reshape(1) if t.dim() == 0 else t).contiguous().clone()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups}


def _opt_load(prefix: str, opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, t in tensors.items():
        if key.startswith(prefix + "/"):
            _, idx, k = key.split("/")
            state.setdefault(int(idx), {})[k] = t.reshape(()) if k == "step" else t
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def _module_tensors(prefix: str, m: nn.Module) -> dict:
    return {f"{prefix}/{k}": v.detach().cpu().contiguous().clone() for k, v in m.state_dict().items()}


@dataclass
class Snapshot:
    tensors: dict[str, torch.Tensor]
    meta: dict

    def module_state(self, prefix: str) -> dict[str, torch.Tensor]:
        n = len(prefix) + 1
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(prefix + "/")}


def save_checkpoint(
    path: Path, modules: dict[str, nn.Module], opts: dict[str, torch.optim.Optimizer], meta: dict
) -> Path:
    """Write modules, optimisers and ``meta`` (JSON-able) to ``path`` atomically."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta = dict(meta)
    for name, m in modules.items():
        tensors.update(_module_tensors(name, m))
    for name, opt in opts.items():
        t, groups = _opt_tensors(name, opt)
        tensors.update(t)
        meta[name] = groups
    tensors["rng/torch"] = torch.get_rng_state()
    tmp = temp_beside(path)
    try:
        save_file(tensors, tmp, metadata={"format": FORMAT, "creps_train": json.dumps(meta)})
        put_in_place(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: str | os.PathLike) -> Snapshot:
    """A training checkpoint's tensors and metadata, or TrainError naming the file."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise TrainError(f"checkpoint not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            md = f.metadata() or {}
            if md.get("format") != FORMAT:
                raise TrainError(f"{p} is not a training checkpoint (format {md.get('format')!r})")
            names = list(f.keys())  # a safe_open handle, not a dict
            tensors = {k: f.get_tensor(k) for k in names}
        meta = json.loads(md["creps_train"])
    except TrainError:
        raise
    except Exception as e:
        raise TrainError(
            f"checkpoint {p} is corrupt ({type(e).__name__}: {e}); delete or move it to resume from an earlier one"
        ) from None
    return Snapshot(tensors, meta)


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:
        return False


def load_modules(snap: Snapshot, modules: dict[str, nn.Module], opts: dict[str, torch.optim.Optimizer]) -> None:
    for name, m in modules.items():
        m.load_state_dict(snap.module_state(name), strict=True)
    for name, opt in opts.items():
        _opt_load(name, opt, snap.tensors, snap.meta[name])
    if "rng/torch" in snap.tensors:
        torch.set_rng_state(snap.tensors["rng/torch"])
