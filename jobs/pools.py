"""The job's pool: how many workers fit, where they run, and reaching a Ray cluster.

In process (``workers = 0``, memory:// stores) the pool is lanes of this
process (renderer.local) and Ray is never imported, so that path runs where
Ray is not installed; otherwise Ray is started or joined here, and only
here (renderer.pool, which sets Ray's environment before ``import ray``).
Everything is sized and checked before the store is touched: an absent
device, a cluster that does not answer or does not fit the workers asked
for is refused with one line.
"""

from __future__ import annotations

import os
import socket

import torch

from renderer.errors import RendererError
from renderer.tasks import Pool

from . import JobSpecError
from .spec import JobSpec

CONNECT_TIMEOUT_S = 5.0


def local_device(spec: JobSpec) -> str:
    """The device of an in-process job: ``spec.device``, else cuda when visible; one line if absent."""
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise JobSpecError("--device cuda, but this process sees no CUDA GPU; use --device cpu")
    if spec.device is not None:
        return spec.device
    if spec.gpus_per_worker == 0:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def local_lanes(spec: JobSpec, device: str) -> int:
    """Render threads of an in-process job: one per core on a CPU (``--threads-per-worker`` sets it);
    two on a GPU, so one computes while the other waits for its run's writes before the marker."""
    if device == "cuda":
        return 2
    cpus = os.cpu_count() or 1
    if spec.threads_per_worker > cpus:
        raise JobSpecError(f"--threads-per-worker {spec.threads_per_worker} is more than the {cpus} CPUs here")
    return spec.threads_per_worker or cpus


def pool_shape(spec: JobSpec, cpus: float, gpus: float) -> tuple[int, int, float]:
    """(workers, threads per worker, GPUs per worker) that fit ``cpus`` and ``gpus``; else one line."""
    if spec.gpus_per_worker >= 0:
        gpw = spec.gpus_per_worker
    elif spec.device == "cpu":
        gpw = 0.0
    else:
        gpw = 1.0 if gpus >= 1 or spec.device == "cuda" else 0.0
    if spec.device == "cuda" and gpw == 0:
        raise JobSpecError("--device cuda with --gpus-per-worker 0 is a contradiction; drop one")
    where = "the cluster" if spec.address else "this machine"
    if gpw > 0:
        if gpus <= 0:
            raise JobSpecError(f"--gpus-per-worker {gpw:g}, but {where} has no GPU; use --gpus-per-worker 0")
        workers = spec.workers or max(1, int(gpus // gpw))
        if gpus < workers * gpw:
            raise JobSpecError(
                f"{where} has {gpus:g} GPUs; {workers} workers x {gpw:g} GPUs do not fit (lower --workers)"
            )
        return workers, spec.threads_per_worker or 1, gpw
    if spec.threads_per_worker > cpus:
        raise JobSpecError(f"--threads-per-worker {spec.threads_per_worker} is more than the {cpus:g} CPUs of {where}")
    threads = spec.threads_per_worker or (max(1, int(cpus) // spec.workers) if spec.workers else 1)
    workers = spec.workers or max(1, int(cpus) // threads)
    if cpus < workers * threads:
        raise JobSpecError(
            f"{where} has {cpus:g} CPUs; {workers} workers x {threads} threads do not fit "
            f"(use --workers {max(1, int(cpus) // threads)} or fewer)"
        )
    return workers, threads, 0.0


def probe_address(address: str) -> None:
    """Fail in seconds, with one line, when nothing listens at a Ray address (Ray itself retries for
    minutes); for a render's ``--address`` and `render.py assemble --address`."""
    if address == "auto":
        return  # Ray answers "no running instance" at once
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        host, port = address, "6379"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise JobSpecError(
            f"no Ray cluster answers at {address} ({e.strerror or e}); start one with `ray start --head` "
            "or drop --address for an embedded one"
        ) from None


def connect(spec: JobSpec) -> tuple[Pool, int, bool]:
    """Make the pool: (pool, workers, whether we started Ray).  In process (``workers = 0``,
    memory://): lanes of this process, Ray not imported.  Else start or join Ray.

    Runs before anything is written: a device that is absent, or a cluster that
    cannot be reached or does not fit the requested workers, is refused with
    one line.
    """
    if spec.in_process:
        from renderer.local import LocalPool

        device = local_device(spec)
        lanes = local_lanes(spec, device)
        return LocalPool(spec.checkpoint, spec.init_seed, lanes, device, spec.max_retries), lanes, False
    # Ray only from here on: renderer.pool sets Ray's environment before `import ray`
    from renderer.pool import cluster_resources, get_pool, start_ray, stop_ray

    if spec.address:
        probe_address(spec.address)
        try:
            started = start_ray(spec.address)
        except RendererError as e:
            raise JobSpecError(str(e)) from None
        cpus, gpus = cluster_resources()
    else:
        cpus, gpus = float(os.cpu_count() or 1), float(torch.cuda.device_count())
        pool_shape(spec, cpus, gpus)  # refuse before starting anything
        started = start_ray(None, num_cpus=int(cpus), num_gpus=int(gpus))
        cpus, gpus = cluster_resources()
    try:
        workers, threads, gpw = pool_shape(spec, cpus, gpus)
        return get_pool(spec.checkpoint, spec.init_seed, workers, threads, gpw, spec.max_retries), workers, started
    except BaseException:
        if started:
            stop_ray()
        raise


def release_ray_pools() -> None:
    """Kill the cached Ray actors: a failed or interrupted job leaves no half-busy actors behind."""
    from renderer.pool import release_pools

    release_pools()


def close(spec: JobSpec, pool: Pool | None, started_ray: bool) -> None:
    """After a run: stop the lanes of an in-process pool (torch gets its thread count back), and
    leave nothing of a Ray we started; a Ray we joined keeps its actors for the next job."""
    if pool is not None and spec.in_process:
        pool.shutdown()
    if started_ray:
        from renderer.pool import release_pools, stop_ray

        release_pools()
        stop_ray()
