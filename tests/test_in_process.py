"""Rendering without Ray: `render.py render --workers 0` in this process, with the Ray path's
store, markers, lease, resume and bytes, and working where Ray cannot even be imported."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, render_cli_env

from jobs import JobSpecError
from jobs.run import run_job
from jobs.spec import JobSpec
from jobs.verify import spec_of_store
from renderer.lease import StoreBusyError
from renderer.store import open_store, store_lease

# Installed as sitecustomize.py on PYTHONPATH: `import ray` (and the optional heavy extras) fail.
BLOCK = """
import sys
for name in ("ray", "pyvips", "imagecodecs", "dask", "s3fs"):
    sys.modules[name] = None
"""


CLI = [sys.executable, str(REPO / "render.py"), "render", "--checkpoint", "preset:tiny"]


def _level0(url: str) -> np.ndarray:
    store = open_store(url, mode="r")
    h, w = store.shape
    return store.read_region(0, 0, h, 0, w)


def _spec(out: str, **kw) -> JobSpec:
    base = dict(checkpoint="preset:tiny", height=120, width=200, tile=32, seed=4, psi=0.8, exports=False)
    return JobSpec(out=out, **{**base, **kw})


def test_in_process_without_ray_writes_the_ray_paths_bytes(tmp_path, render_ray):
    ray_spec = _spec(str(tmp_path / "ray.zarr"), workers=2, threads_per_worker=1, batch=1)
    assert run_job(ray_spec, progress=False, log=lambda s: None)["status"] == "done"

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK)
    env = render_cli_env()
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    out = str(tmp_path / "local.zarr")
    args = ["--checkpoint", "preset:tiny", "--size", "200x120", "--tile", "32", "--seed", "4", "--psi", "0.8"]
    cmd = [sys.executable, str(REPO / "render.py"), "render", *args, "--workers", "0", "--device", "cpu"]
    run = subprocess.run([*cmd, "--out", out, "--no-exports", "--quiet"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(next(ln for ln in run.stdout.splitlines() if ln.startswith("summary "))[8:])
    assert summary["status"] == "done" and summary["tiles_rendered"] == 28
    np.testing.assert_array_equal(_level0(out), _level0(ray_spec.out))
    a, b = open_store(ray_spec.out, mode="r"), open_store(out, mode="r")
    assert a.done_tiles() == b.done_tiles()
    crcs = [{r["id"]: r["crc32"] for g in s.tile_record_groups() for r in g} for s in (a, b)]
    assert crcs[0] == crcs[1] and len(crcs[0]) == len(a.tile_plan())
    assert a.meta["identity"] == b.meta["identity"]  # the same job: either path may resume the other's store

    # the modules of the in-process path import without Ray
    probe = "import creps, renderer.tiles, renderer.local, jobs.run, jobs.cli, jobs.bench, render; print('ok')"
    ok = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=REPO)
    assert ok.stdout.strip() == "ok", ok.stderr[-2000:]


def test_in_process_resume_lease_and_threads(tmp_path, render_reference):
    spec = _spec(str(tmp_path / "r.zarr"), workers=0, threads_per_worker=2)
    threads = torch.get_num_threads()
    first = run_job(spec, max_tiles=9, progress=False, log=lambda s: None)
    assert first["status"] == "partial" and first["tiles_rendered"] == 9 and first["workers"] == 2
    assert torch.get_num_threads() == threads  # the lanes' single-thread setting was put back
    holder = store_lease(spec.out)
    holder.acquire("someone else")
    try:
        with pytest.raises(StoreBusyError, match="being written by another process: someone else"):
            run_job(spec, progress=False, log=lambda s: None)
    finally:
        holder.release()
    second = run_job(spec, progress=False, log=lambda s: None)
    assert second["tiles_rendered"] == 19 and second["tiles_skipped"] == 9 and second["line_ranges_computed"] == 0
    np.testing.assert_array_equal(_level0(spec.out), render_reference(120, 200, seed=4, psi=0.8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_before_anything_is_written(tmp_path):
    spec = _spec(str(tmp_path / "c.zarr"), workers=0, device="cuda")
    with pytest.raises(JobSpecError, match="--device cuda, but this process sees no CUDA GPU; use --device cpu"):
        run_job(spec, progress=False, log=lambda s: None)
    assert not (tmp_path / "c.zarr").exists()
    out = subprocess.run(
        [*CLI, "--size", "64", "--workers", "0", "--device", "cuda", "--out", str(tmp_path / "d.zarr")],
        capture_output=True,
        text=True,
        env=render_cli_env(),
    )
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: --device cuda, but this process sees no CUDA GPU; use --device cpu"
    ]


def test_specs_saved_before_workers_0_meant_in_process_keep_their_meaning(tmp_path):
    spec = _spec(str(tmp_path / "old.zarr"), workers=0)
    assert run_job(spec, progress=False, log=lambda s: None)["status"] == "done"
    store = open_store(spec.out, mode="a")
    old = {k: v for k, v in store.meta["spec"].items() if k not in ("precision", "device")}
    store.update_meta(spec={**old, "workers": 0})  # as written before: 0 = one worker per core or GPU
    assert spec_of_store(store, spec.out, None).workers is None
    store.update_meta(spec=spec.to_dict())
    assert spec_of_store(store, spec.out, None).workers == 0


def test_device_picks_the_ray_pool_shape():
    from jobs.pools import pool_shape

    assert pool_shape(JobSpec(checkpoint="preset:tiny", device="cpu"), cpus=4, gpus=1) == (4, 1, 0.0)
    assert pool_shape(JobSpec(checkpoint="preset:tiny"), cpus=4, gpus=1) == (1, 1, 1.0)
    with pytest.raises(JobSpecError, match="has no GPU"):
        pool_shape(JobSpec(checkpoint="preset:tiny", device="cuda"), cpus=4, gpus=0)
    with pytest.raises(JobSpecError, match="contradiction"):
        pool_shape(JobSpec(checkpoint="preset:tiny", device="cuda", gpus_per_worker=0), cpus=4, gpus=1)
    with pytest.raises(JobSpecError, match="device must be cpu or cuda"):
        JobSpec(checkpoint="preset:tiny", device="tpu")


def test_in_process_to_s3(moto_s3, render_reference):
    """An object store through fsspec: chunks go through zarr there (no direct writes), same bytes."""
    s3fs = pytest.importorskip("s3fs")
    options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": moto_s3, "region_name": "us-east-1"}}
    s3fs.S3FileSystem(key="k", secret="s", client_kwargs={"endpoint_url": moto_s3}).mkdir("inproc")
    spec = _spec("s3://inproc/img.zarr", workers=0, threads_per_worker=2, storage_options=options, tile=48)
    summary = run_job(spec, progress=False, log=lambda s: None)
    assert summary["status"] == "done" and summary["tiles_rendered"] == 15
    got = open_store(spec.out, dict(options), mode="r").read_region(0, 0, 120, 0, 200)
    np.testing.assert_array_equal(got, render_reference(120, 200, seed=4, psi=0.8))


def test_bench_overhead_job_runs_on_the_jobs_own_plan(monkeypatch):
    """`render.py bench`'s small-job figures: the pixel stage is timed on the groups the job
    formed (its resolved shard and block), and every figure is there (its timings are not checked)."""
    from jobs.bench import overhead
    from renderer import tiles

    calls = []  # (plan, start, stop, max_pixels) of every grouping: the job's runs, then the bench's
    groups = tiles.tile_groups

    def recorded(plan, start, stop, max_pixels):
        calls.append((plan, start, stop, max_pixels))
        return groups(plan, start, stop, max_pixels)

    monkeypatch.setattr(tiles, "tile_groups", recorded)
    o = overhead("preset:tiny", 256, 128, 32, 1, "cpu", "fp32")
    *job, timed = calls
    plan = timed[0]
    assert (plan.height, plan.width, plan.side) == (128, 256, 32) and len(plan) == 32
    assert timed[1:] == (0, 32, tiles.CALL_PIXELS["cpu"])  # every tile of the job, grouped as the job's renderer
    assert {c[0] for c in job} == {plan} and sum(stop - start for _, start, stop, _ in job) == 32
    assert set(o) == {
        "startup_s", "overhead_job_seconds", "overhead_tiles", "overhead_lanes",
        "tile_compute_ms", "tile_overhead_ms", "tile_overhead_cpu_ms",
    }  # fmt: skip
    assert o["overhead_tiles"] == 32 and o["overhead_lanes"] == 1
    assert 0 < o["startup_s"] < o["overhead_job_seconds"] and o["tile_compute_ms"] > 0
