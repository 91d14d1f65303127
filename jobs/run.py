"""The job driver: validate, prepare the store, line stage, tile stage, summary.

Everything that can be wrong with a job is checked before anything expensive
starts or anything is written: the spec, the checkpoint (loaded once here to
read its shape and hash), the canvas, the output URL and, for an existing
store, that it was made by the same job (else ``--overwrite``).  Then Ray
starts (embedded, or ``address``), the actors compute the missing line ranges,
and render the missing tiles.  Resume is re-running the same job: markers in
the store say what is already there.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import time
from importlib import metadata
from typing import Any, Callable

import ray
import torch

import creps
from renderer import lines as line_store
from renderer.errors import RendererError
from renderer.pool import LocalPool, WorkerPool, cluster_resources, get_pool, release_pools, start_ray
from renderer.store import ImageStore, filesystem, open_store
from renderer.tiles import RenderContext, checkpoint_hash, load_generator, peak_rss_mb

from . import JobSpecError
from .plan import Tile, auto_batch, batches, line_chunk, line_ranges, spec_tiles
from .spec import JobSpec


def software_version() -> str:
    try:
        return f"creps-gigapixel {metadata.version('creps-gigapixel')}"
    except metadata.PackageNotFoundError:
        return "creps-gigapixel (source)"


@dataclasses.dataclass
class Prepared:
    """A validated job: resolved spec, model config, checkpoint hash, plan."""

    spec: JobSpec
    config: creps.GeneratorConfig
    checkpoint_sha256: str
    tiles: list[Tile]

    @property
    def identity(self) -> dict:
        return {**self.spec.identity(), "checkpoint_sha256": self.checkpoint_sha256}

    def context(self) -> RenderContext:
        s = self.spec
        return RenderContext(
            url=s.out, storage_options=_options(s), checkpoint=s.checkpoint, init_seed=s.init_seed,
            seed=s.seed, psi=s.psi, height=s.height, width=s.width, view=s.view, chunk=s.tile,
        )


def prepare(spec: JobSpec) -> Prepared:
    """Check the checkpoint and canvas (no output is touched); raise JobSpecError."""
    try:
        G = load_generator(spec.checkpoint, spec.init_seed)
        sha = checkpoint_hash(spec.checkpoint, spec.init_seed)
    except (RendererError, OSError) as e:
        raise JobSpecError(str(e)) from None
    cfg = G.cfg
    del G
    spec = spec.resolved(cfg.resolution)
    try:
        RenderContext("", {}, "", 0, 0, 1.0, spec.height, spec.width, spec.view, spec.tile).canvas
    except ValueError as e:
        raise JobSpecError(str(e)) from None
    return Prepared(spec, cfg, sha, spec_tiles(spec))


def in_process(spec: JobSpec) -> bool:
    """memory:// stores exist only in this process: render them here, without Ray."""
    return spec.out.startswith("memory://")


def open_output(job: Prepared, overwrite: bool) -> ImageStore:
    """Create the store, or reopen it for resume after checking it belongs to this job."""
    spec = job.spec
    try:
        fs, root = filesystem(spec.out, _options(spec))
        exists = fs.exists(f"{root}/zarr.json")
        if not exists and fs.exists(root) and fs.isdir(root) and fs.ls(root):
            raise JobSpecError(f"{spec.out} exists and is not an image store; choose another --out")
    except RendererError as e:
        raise JobSpecError(str(e)) from None
    except JobSpecError:
        raise
    except Exception as e:  # unreachable endpoint, bad credentials, malformed URL
        raise JobSpecError(f"cannot access {spec.out!r}: {_one_line(e)}") from None
    if exists and not overwrite:
        try:
            store = open_store(spec.out, _options(spec), mode="a")
        except RendererError as e:
            raise JobSpecError(f"{e} (use --overwrite to replace it)") from None
        old = store.meta.get("identity")
        if old is None or not store.has_level(0):
            raise JobSpecError(f"{spec.out} is an image store not made by a render job; use --overwrite to replace it")
        if old != job.identity:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in job.identity.items() if old.get(k) != v)
            raise JobSpecError(f"{spec.out} holds a different job ({diff}); re-run with the same job or --overwrite")
        return store
    try:
        store = open_store(spec.out, _options(spec), mode="w")
        store.clear_markers()
        store.create_level(0, spec.height, spec.width, spec.tile, spec.shard, spec.compressor, overwrite=True)
        cfg = job.config
        line_store.create_line_arrays(
            store, cfg.num_bilines, spec.height, spec.width, cfg.rank, cfg.biline_channels, line_chunk(spec.tile)
        )
        store.write_ome(name=spec.name)
        store.update_meta(
            spec=spec.to_dict(), identity=job.identity, checkpoint=spec.checkpoint,
            checkpoint_sha256=job.checkpoint_sha256, generator=cfg.to_dict(), version=software_version(),
            tiles_total=len(job.tiles), tiles_done=0, status="created", created=time.time(), runs=[],
        )
    except (RendererError, OSError, ValueError) as e:
        raise JobSpecError(f"cannot write {spec.out!r}: {_one_line(e)}") from None
    return store


def pool_shape(spec: JobSpec) -> tuple[int, int, float]:
    """(workers, threads per worker, GPUs per worker) for the running cluster."""
    cpus, gpus = cluster_resources()
    gpw = spec.gpus_per_worker if spec.gpus_per_worker >= 0 else (1.0 if gpus >= 1 else 0.0)
    if gpw > 0:
        workers = spec.workers or max(1, int(gpus // gpw))
        if gpus < workers * gpw:
            raise JobSpecError(f"the cluster has {gpus:g} GPUs; {workers} workers x {gpw:g} GPUs do not fit")
        return workers, spec.threads_per_worker or 1, gpw
    threads = spec.threads_per_worker or (max(1, int(cpus) // spec.workers) if spec.workers else 1)
    workers = spec.workers or max(1, int(cpus) // threads)
    if cpus < workers * threads:
        raise JobSpecError(
            f"the cluster has {cpus:g} CPUs; {workers} workers x {threads} threads do not fit (lower --workers)"
        )
    return workers, threads, 0.0


def run_job(
    spec: JobSpec,
    overwrite: bool = False,
    max_tiles: int | None = None,
    progress: bool = True,
    on_progress: Callable[[dict, WorkerPool], None] | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> dict:
    """Render ``spec`` (resuming what its store already holds); return the run summary."""
    t_start = time.perf_counter()
    job = prepare(spec)
    spec = job.spec
    store = open_output(job, overwrite)
    log(f"job:\n{spec.describe()}")
    done = store.done_tiles()
    todo = [t for t in job.tiles if t.id not in done]
    if max_tiles is not None:
        todo = todo[:max_tiles]
    summary: dict[str, Any] = {
        "out": spec.out, "height": spec.height, "width": spec.width, "tiles_total": len(job.tiles),
        "tiles_skipped": len(job.tiles) - len(todo) if max_tiles is None else len(done),
        "tiles_rendered": 0, "line_ranges_computed": 0, "line_seconds": 0.0, "workers": 0,
        "workers_replaced": 0, "tasks_retried": 0,
    }
    lines_needed = not line_store.all_done(store)
    pool: WorkerPool | LocalPool | None = None
    started_ray = False
    worker_rss = 0.0
    try:
        if todo or lines_needed:
            if in_process(spec):
                workers = 1
                cuda = spec.gpus_per_worker > 0 or (spec.gpus_per_worker < 0 and torch.cuda.is_available())
                threads = spec.threads_per_worker or (os.cpu_count() or 1)
                pool = LocalPool(spec.checkpoint, spec.init_seed, threads, "cuda" if cuda else "cpu")
            else:
                ncpu = None if spec.address else max(os.cpu_count() or 1, spec.workers * max(1, spec.threads_per_worker))
                started_ray = start_ray(spec.address, num_cpus=ncpu)
                workers, threads, gpus = pool_shape(spec)
                pool = get_pool(spec.checkpoint, spec.init_seed, workers, threads, gpus, max_failures=spec.max_retries)
            summary["workers"] = workers
            retried0, replaced0 = pool.retries, pool.replaced
            store.update_meta(status="running", error=None)
            t_lines = time.perf_counter()
            if lines_needed:
                summary["line_ranges_computed"] = _line_stage(store, job, pool, workers, log)
            summary["line_seconds"] = round(time.perf_counter() - t_lines, 3)
            worker_rss = _tile_stage(store, job, todo, pool, workers, progress, on_progress, summary)
            summary["workers_replaced"] = pool.replaced - replaced0
            summary["tasks_retried"] = pool.retries - retried0
    except BaseException as e:
        release_pools()  # a failed or interrupted job leaves no half-busy actors behind
        if isinstance(e, RendererError):
            store.update_meta(status="failed", error=str(e))
        raise
    finally:
        if started_ray:  # our own Ray: leave nothing behind; else keep the actors for the next job
            release_pools()
            ray.shutdown()
    seconds = time.perf_counter() - t_start
    pixels = sum(t.pixels for t in todo)
    left = len(job.tiles) - len(store.done_tiles())
    summary.update(
        pixels=pixels, seconds=round(seconds, 3), mpx_s=round(pixels / seconds / 1e6, 3),
        tiles_left=left, status="done" if left == 0 else "partial",
        driver_peak_rss_mb=round(peak_rss_mb(), 1), worker_peak_rss_mb=round(worker_rss, 1),
    )
    runs = list(store.meta.get("runs", []))[-20:] + [summary]
    store.update_meta(status=summary["status"], tiles_done=len(job.tiles) - left, runs=runs, last_run=summary)
    return summary


def _line_stage(store: ImageStore, job: Prepared, pool: WorkerPool, workers: int, log) -> int:
    spec, ctx = job.spec, job.context()
    chunk = line_chunk(spec.tile)
    done = line_store.done_ranges(store)
    tasks = []
    for which, length in (("row", spec.height), ("col", spec.width)):
        for a, b in line_ranges(length, chunk, 2 * workers):
            if (which, a, b) not in done:
                tasks.append((f"lines {which} {a}:{b}", "lines", (which, a, b)))
    t0 = time.perf_counter()
    log(f"line stage: {len(tasks)} ranges of {spec.height} rows + {spec.width} columns on {workers} workers")
    pool.run(ctx, tasks, lambda key, value: None)
    log(f"line stage done in {time.perf_counter() - t0:.1f} s (stored under {spec.out}/lines)")
    line_store.mark_all_done(store, {"height": spec.height, "width": spec.width, "chunk": chunk})
    return len(tasks)


def _tile_stage(store, job: Prepared, todo: list[Tile], pool: WorkerPool, workers: int, progress: bool,
                on_progress, summary: dict) -> float:
    from tqdm import tqdm

    spec = job.spec
    tile_px = spec.tile * spec.tile * spec.shard * spec.shard
    size = spec.batch or auto_batch(len(todo), workers, tile_px)
    tasks = [(b[0].id, "tiles", ([t.as_tuple() for t in b],)) for b in batches(todo, size)]
    state = {"rss": 0.0, "px": 0, "last_meta": time.monotonic(), "t0": time.perf_counter()}
    n_done0 = summary["tiles_skipped"]
    bar = tqdm(total=len(todo), unit="tile", disable=not progress, dynamic_ncols=True, file=sys.stderr)

    def on_result(key: str, infos: list[dict]) -> None:
        for info in infos:
            state["px"] += (info["rows"][1] - info["rows"][0]) * (info["cols"][1] - info["cols"][0])
            state["rss"] = max(state["rss"], info.get("peak_rss_mb", 0.0))
        summary["tiles_rendered"] += len(infos)
        bar.update(len(infos))
        dt = time.perf_counter() - state["t0"]
        bar.set_postfix_str(f"{state['px'] / max(dt, 1e-9) / 1e6:.2f} Mpx/s", refresh=False)
        if time.monotonic() - state["last_meta"] > 5.0:
            state["last_meta"] = time.monotonic()
            try:  # progress for watchers (viewer); best effort, the markers are the truth
                store.update_meta(tiles_done=n_done0 + summary["tiles_rendered"])
            except Exception:
                pass
        if on_progress is not None:
            on_progress(summary, pool)

    try:
        pool.run(job.context(), tasks, on_result)
    finally:
        bar.close()
    summary["render_seconds"] = round(time.perf_counter() - state["t0"], 3)
    return state["rss"]


def _options(spec: JobSpec) -> dict:
    """A private copy: botocore rewrites nested config dicts it is given."""
    return copy.deepcopy(spec.storage_options)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
