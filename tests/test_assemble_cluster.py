"""`render.py assemble --address`: the block work as Ray tasks on a real `ray start --head` cluster
on 127.0.0.1, with the DeepZoom tiles written by the tasks straight to S3 (moto_server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from conftest import REPO, pyramid_complete, render_cli_env

from jobs.assemble import assemble
from renderer.pyramid import reference_pyramid
from renderer.store import open_store

H, W, T = 301, 517, 64


def _store(url: str, seed: int = 7) -> np.ndarray:
    img = np.random.default_rng(seed).integers(0, 256, (3, H, W), dtype=np.uint8)
    store = open_store(url, mode="w")
    store.create_level(0, H, W, chunk=T)
    store.write_region(0, 0, 0, img)
    return img


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for folder, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(folder, n), "rb") as f:
                out[os.path.relpath(os.path.join(folder, n), root)] = f.read()
    return out


def _levels(tif) -> list[np.ndarray]:
    return [lv.asarray() for lv in tif.series[0].levels]


def test_assemble_on_a_cluster_equals_the_local_run(ray_head, moto_s3, tmp_path):
    s3fs = pytest.importorskip("s3fs")
    opts = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": moto_s3, "region_name": "us-east-1"},
    }
    s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": moto_s3}).mkdir("dzout")
    fs = s3fs.S3FileSystem(**opts)

    img = _store(str(tmp_path / "local.zarr"))
    _store(str(tmp_path / "cluster.zarr"))
    assemble(str(tmp_path / "local.zarr"), tiff=str(tmp_path / "local.tif"), dzi=str(tmp_path / "local"), szi=False)

    argv = [sys.executable, str(REPO / "render.py"), "assemble", str(tmp_path / "cluster.zarr"), "--address", ray_head]
    argv += [
        "--tiff",
        str(tmp_path / "cluster.tif"),
        "--dzi",
        "s3://dzout/cluster",
        "--storage-options",
        json.dumps(opts),
    ]
    proc = subprocess.run(argv, env=render_cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "assembled:" in proc.stdout

    # the levels the cluster built are the rule's
    store = open_store(str(tmp_path / "cluster.zarr"), mode="r")
    assert pyramid_complete(store)
    ref = reference_pyramid(img, T)
    for k, r in enumerate(ref):
        np.testing.assert_array_equal(store.read_region(k, 0, r.shape[1], 0, r.shape[2]), r, err_msg=f"level {k}")
    # the same TIFF pixels at every level
    with tifffile.TiffFile(tmp_path / "local.tif") as a, tifffile.TiffFile(tmp_path / "cluster.tif") as b:
        for x, y in zip(_levels(a), _levels(b), strict=True):
            np.testing.assert_array_equal(x, y)
    # the same DeepZoom files, byte for byte, now on S3 (and no temporary keys left)
    local = _files(str(tmp_path / "local_files"))
    fs.invalidate_cache()
    remote = {k[len("dzout/cluster_files/") :]: fs.cat_file(k) for k in fs.find("dzout/cluster_files")}
    assert len(local) > 10 and remote == local
    assert fs.cat_file("dzout/cluster.dzi") == (tmp_path / "local.dzi").read_bytes()
    assert fs.exists("dzout/cluster.szi") and fs.exists("dzout/cluster.dzi.source.json")
    assert not [k for k in fs.find("dzout") if ".creps-tmp-" in k]
