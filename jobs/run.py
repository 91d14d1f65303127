"""The job driver: validate, prepare the store, line stage, tile stage, summary.

Everything that can be wrong with a job is checked before anything expensive
starts or anything is written: the spec, the checkpoint (its config is read
from the file's header, no weights are loaded), the canvas, the output URL
and, for an existing store, that it was made by the same job (else
``--overwrite``).  Then the pool starts: Ray actors (embedded, or
``address``), or lanes in this process (``workers = 0`` and ``memory://``
stores, renderer.local); they compute the missing line ranges and render the
missing tiles.  Resume is re-running the same job: markers in the store say
what is already there.  Ray is imported only when the job uses it, so the
in-process path runs where Ray is not installed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Collection, Sequence
from importlib import metadata
from typing import Any

import numpy as np
import torch

import creps
from creps.errors import first_line
from renderer.errors import RendererError
from renderer.fsio import filesystem, io_counts, is_local
from renderer.lease import Lease
from renderer.store import (
    ImageStore,
    LineShape,
    create_job_store,
    is_foreign_folder,
    open_store,
    store_exists,
    store_lease,
)
from renderer.tasks import LineResult, LineTask, OnResult, Pool, Result, Task, TileResult, TileTask
from renderer.tiles import RenderContext, peak_rss_mb

from . import JobSpecError
from .plan import (
    TilePlan,
    auto_batch,
    auto_block,
    auto_shard,
    block_levels,
    block_runs,
    job_plan,
    line_chunk,
    line_ranges,
)
from .spec import JobSpec, same_identity, stored_identity

CONNECT_TIMEOUT_S = 5.0


def software_version() -> str:
    try:
        return f"creps-gigapixel {metadata.version('creps-gigapixel')}"
    except metadata.PackageNotFoundError:
        return "creps-gigapixel (source)"


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What one run of a job did (printed as JSON, kept in the store's ``runs``)."""

    out: str
    height: int
    width: int
    tiles_total: int
    tiles_skipped: int
    tiles_rendered: int = 0
    line_ranges_computed: int = 0
    # wall-clock seconds: the line stage, from its start until its last range was stored; the tile
    # stage, from its first tile task handed out until its last tile came back.  The two overlap
    # when tiles start before the line stage ends (jobs.run._LineStage); first_tile_seconds counts
    # from the start of the run (as `seconds` does) until the first tile task came back
    line_seconds: float = 0.0
    render_seconds: float = 0.0
    first_tile_seconds: float = 0.0
    workers: int = 0
    workers_replaced: int = 0
    tasks_retried: int = 0
    pixels: int = 0
    seconds: float = 0.0
    mpx_s: float = 0.0
    tiles_left: int = 0
    status: str = "running"  # running | done | partial
    driver_peak_rss_mb: float = 0.0
    worker_peak_rss_mb: float = 0.0
    # what the run cost an object store: storage calls (requests) and objects written, by the
    # driver and every worker (renderer.fsio.io_counts; 0 for local disks, which are not counted)
    requests: int = 0
    objects_written: int = 0
    # the cluster: the nodes whose workers rendered for this run, the nodes that died under a
    # worker during it, and the tiles of the tasks sent again because a worker failed or was lost
    nodes: tuple[str, ...] = ()
    nodes_lost: tuple[str, ...] = ()
    tiles_retried: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __getitem__(self, key: str) -> Any:
        """Mapping-style reads (``summary["status"]``), as scripts written for the JSON line use."""
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A validated job: resolved spec, model config, checkpoint hash, plan."""

    spec: JobSpec
    config: creps.GeneratorConfig
    checkpoint_sha256: str
    plan: TilePlan

    @property
    def identity(self) -> dict:
        return {**self.spec.identity(), "checkpoint_sha256": self.checkpoint_sha256}

    def context(self) -> RenderContext:
        s = self.spec
        return RenderContext(
            url=s.out,
            storage_options=_options(s),
            checkpoint=s.checkpoint,
            init_seed=s.init_seed,
            seed=s.seed,
            psi=s.psi,
            height=s.height,
            width=s.width,
            view=s.view,
            chunk=s.tile,
            tile_side=s.tile * s.shard,
            warp_rows=s.warp_rows,
            warp_cols=s.warp_cols,
            precision=s.precision,
            block=s.block,
            levels=self.levels,
        )

    @property
    def levels(self) -> int:
        """Pyramid levels 1..L the workers write with each block (jobs.plan.block_levels)."""
        s = self.spec
        return block_levels(s.height, s.width, s.tile, s.shard, s.block)

    def line_shape(self) -> LineShape:
        cfg = self.config
        return LineShape(cfg.num_bilines, cfg.rank, cfg.biline_channels, line_chunk(self.spec.tile))


def prepare(spec: JobSpec) -> Prepared:
    """Check the checkpoint and canvas without loading weights or touching the output.

    A training run directory given as the checkpoint is resolved here, once,
    to its newest G_ema file: the hash, the job record and every worker then
    name the same weights even if training writes a newer snapshot meanwhile.
    """
    spec = dataclasses.replace(spec, checkpoint=creps.resolve_checkpoint(spec.checkpoint))
    cfg = creps.read_config(spec.checkpoint, init_seed=spec.init_seed)
    sha = creps.checkpoint_hash(spec.checkpoint, spec.init_seed)
    spec = _resolve_layout(spec.resolved(cfg.image_size), sha)
    y0, y1, x0, x1 = spec.view
    try:
        canvas = creps.Canvas(
            spec.height, spec.width, y=(y0, y1), x=(x0, x1), warp_rows=spec.warp_rows, warp_cols=spec.warp_cols
        )
        if spec.warp_rows or spec.warp_cols:  # a warp may overflow float32 somewhere: find out before any work
            canvas.row_coords(), canvas.col_coords()
    except ValueError as e:
        raise JobSpecError(str(e)) from None
    return Prepared(spec, cfg, sha, job_plan(spec))


def _resolve_layout(spec: JobSpec, sha: str) -> JobSpec:
    """``shard = 0`` and ``block = 0`` (auto) made concrete: those of the store this job resumes,
    else ``auto_shard`` / ``auto_block``.

    A store of the same job made with another shard or block (explicit ones,
    or older defaults; stores from before blocks hold block 1) is resumed as
    it is rather than refused as another job.
    """
    if spec.shard and spec.block:
        return spec
    shard = spec.shard or auto_shard(
        spec.height, spec.width, spec.tile, object_store=not (is_local(spec.out) or in_process(spec))
    )
    block = spec.block
    try:
        if store_exists(spec.out, _options(spec)):
            old = stored_identity(open_store(spec.out, _options(spec), mode="r").meta.get("identity") or {})
            mine = {**stored_identity(spec.identity()), "checkpoint_sha256": sha}
            layout = ("shard", "block")
            if all(old.get(k) == v for k, v in mine.items() if k not in layout):
                if not spec.shard and isinstance(old.get("shard"), int):
                    shard = old["shard"]
                if not block and isinstance(old.get("block"), int):
                    block = old["block"]
    except Exception:  # unreachable or unreadable: inspect_output reports it with one line
        pass
    block = block or auto_block(spec.height, spec.width, spec.tile * shard)
    return dataclasses.replace(spec, shard=shard, block=block)


def in_process(spec: JobSpec) -> bool:
    """Render in this process, without Ray: ``workers = 0``, or a memory:// store (only here)."""
    return spec.in_process


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


def inspect_output(job: Prepared, overwrite: bool) -> ImageStore | None:
    """The existing store this job resumes, or None when a new one must be made; writes nothing.

    Refuses (JobSpecError, one line) an output that is not an image store,
    a store of another job (unless ``overwrite``), or an unreachable URL.
    """
    spec = job.spec
    try:
        filesystem(spec.out, _options(spec))
        exists = store_exists(spec.out, _options(spec))
        if not exists and is_foreign_folder(spec.out, _options(spec)):
            raise JobSpecError(f"{spec.out} exists and is not an image store; choose another --out")
    except RendererError as e:
        raise JobSpecError(str(e)) from None
    except JobSpecError:
        raise
    except Exception as e:  # unreachable endpoint, bad credentials, malformed URL
        raise JobSpecError(f"cannot access {spec.out!r}: {first_line(e)}") from None
    if not exists or overwrite:
        return None
    try:
        store = open_store(spec.out, _options(spec), mode="a")
    except RendererError as e:
        raise JobSpecError(f"{e} (use --overwrite to replace it)") from None
    old = store.meta.get("identity")
    if not isinstance(old, dict) or not store.has_level(0):
        raise JobSpecError(f"{spec.out} is an image store not made by a render job; use --overwrite to replace it")
    if not same_identity(old, job.identity):
        old = stored_identity(old)  # a store from before a key existed holds its default (fp32)
        mine = stored_identity(job.identity)
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in mine.items() if old.get(k) != v)
        raise JobSpecError(f"{spec.out} holds a different job ({diff}); re-run with the same job or --overwrite")
    recorded = store.block_levels
    if recorded != (spec.block, job.levels):  # same job, but its levels would not be the ones the store records
        raise JobSpecError(
            f"{spec.out} records pyramid levels 1..{recorded[1]} written with blocks of {recorded[0]} tiles, but this "
            f"version writes 1..{job.levels} with blocks of {spec.block}; finish it with the version that made it, "
            "or --overwrite"
        )
    return store


def create_output(job: Prepared) -> ImageStore:
    """A new store for this job (the caller holds its lease)."""
    spec = job.spec
    meta = dict(
        spec=spec.to_dict(),
        identity=job.identity,
        checkpoint=spec.checkpoint,
        checkpoint_sha256=job.checkpoint_sha256,
        generator=job.config.to_dict(),
        version=software_version(),
        tiles_total=len(job.plan),
        tiles_done=0,
        status="created",
        created=time.time(),
        runs=[],
    )
    try:
        return create_job_store(
            spec.out,
            _options(spec),
            height=spec.height,
            width=spec.width,
            tile=spec.tile,
            shard=spec.shard,
            compressor=spec.compressor,
            lines=job.line_shape(),
            name=spec.name,
            meta=meta,
            block=spec.block,
            levels=job.levels,
        )
    except (RendererError, OSError, ValueError) as e:
        raise JobSpecError(f"cannot write {spec.out!r}: {first_line(e)}") from None


def open_output(job: Prepared, overwrite: bool) -> ImageStore:
    """The job's store: reopened for resume, or created (no lease taken: tests and tools)."""
    return inspect_output(job, overwrite) or create_output(job)


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


def _probe_address(address: str) -> None:
    """Fail in seconds, with one line, when nothing listens at a Ray address (Ray itself retries for minutes)."""
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
    if in_process(spec):
        from renderer.local import LocalPool

        device = local_device(spec)
        lanes = local_lanes(spec, device)
        return LocalPool(spec.checkpoint, spec.init_seed, lanes, device, spec.max_retries), lanes, False
    # Ray only from here on: renderer.pool sets Ray's environment before `import ray`
    from renderer.pool import cluster_resources, get_pool, start_ray, stop_ray

    if spec.address:
        _probe_address(spec.address)
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


class _Tally:
    """Counters of a run in progress (the frozen RunSummary is made from them)."""

    def __init__(self, base: RunSummary, t_start: float) -> None:
        self.base = base
        self.t_start = t_start  # when the run began (perf_counter)
        self.tiles_rendered = 0
        self.pixels = 0
        self.worker_rss = 0.0
        self.requests = 0  # the workers' storage calls (the driver's are added at the end)
        self.objects = 0
        self.fields: dict[str, Any] = {}

    def add_io(self, requests: int, objects: int) -> None:
        self.requests += requests
        self.objects += objects

    def summary(self, **more: Any) -> RunSummary:
        values = {
            "tiles_rendered": self.tiles_rendered,
            "pixels": self.pixels,
            "worker_peak_rss_mb": round(self.worker_rss, 1),
            "requests": self.requests,
            "objects_written": self.objects,
            **self.fields,
            **more,
        }
        return dataclasses.replace(self.base, **values)


def run_job(
    spec: JobSpec,
    overwrite: bool = False,
    max_tiles: int | None = None,
    progress: bool = True,
    on_progress: Callable[[RunSummary, Pool], None] | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    redo: Collection[str] = (),
) -> RunSummary:
    """Render ``spec`` (resuming what its store already holds); return the run summary.

    Order, so that a refusal leaves nothing behind: validate the job and read
    the existing store (read-only), reach the cluster and size the pool, take
    the store's writer lease (a second writer is refused), only then create
    or change the store.  ``redo`` names tiles to render again even though
    they are marked done (e.g. tiles whose chunks failed verification).
    """
    t_start, io_start = time.perf_counter(), io_counts()
    job = prepare(spec)
    spec = job.spec
    existing = inspect_output(job, overwrite)
    todo = _todo(job, existing, redo, max_tiles)
    lines_needed = existing is None or not existing.lines_complete()
    pool: Pool | None = None
    started_ray = False
    workers = 0
    if len(todo) or lines_needed:
        pool, workers, started_ray = connect(spec)
    lease = store_lease(spec.out, _options(spec))
    try:
        try:
            lease.acquire(f"render job {_identity_tag(job)}")
        except OSError as e:
            raise JobSpecError(f"cannot write {spec.out!r}: {first_line(e)}") from None
        # another writer may have made or changed the store before we held the lease: look again
        existing = inspect_output(job, overwrite)
        store = existing or create_output(job)
        if existing is None:
            todo, lines_needed = _todo(job, None, redo, max_tiles), True
        summary, io_mark = _run(
            job, store, todo, lines_needed, pool, workers, lease, progress, on_progress, log, t_start, io_start
        )
    except BaseException as e:
        if pool is not None and not in_process(spec):
            _release_ray_pools()  # a failed or interrupted job leaves no half-busy actors behind
        _record_failure(spec, e, lease)
        raise
    finally:
        lease.release()
        if pool is not None and in_process(spec):
            pool.shutdown()  # lanes and writer threads stop; torch gets its thread count back
        if started_ray:  # our own Ray: leave nothing behind; else keep the actors for the next job
            from renderer.pool import release_pools, stop_ray

            release_pools()
            stop_ray()
    # the requests after the summary was made (its own metadata write, the lease release) belong to
    # the run too: the summary returned and printed has them, the copy in the store's runs cannot
    tail_requests, tail_objects = (b - a for a, b in zip(io_mark, io_counts(), strict=True))
    return dataclasses.replace(
        summary,
        requests=summary.requests + tail_requests,
        objects_written=summary.objects_written + tail_objects,
    )


def _release_ray_pools() -> None:
    from renderer.pool import release_pools

    release_pools()


def _identity_tag(job: Prepared) -> str:
    """A short, stable name of the job for lease records and logs."""
    text = json.dumps(job.identity, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _todo(job: Prepared, store: ImageStore | None, redo: Collection[str], max_tiles: int | None) -> np.ndarray:
    """Sorted indices of the tiles this run renders.

    With levels written per block, work is whole blocks: a tile to redo takes
    its block with it (the block's levels were averaged from it too), and
    ``max_tiles`` is rounded up to whole blocks.
    """
    plan = job.plan
    done = store.done_mask(plan) if store is not None else np.zeros(len(plan), dtype=bool)
    again = []
    for tile_id in redo:
        k = plan.index(tile_id)
        if k is None:
            raise JobSpecError(f"no tile {tile_id!r} in this job's plan ({plan.rows} x {plan.cols} tiles)")
        again.append(k)
    if again:
        done[plan.whole_blocks(np.asarray(again)) if job.levels else again] = False
    todo = np.flatnonzero(~done)
    if max_tiles is None or max_tiles >= len(todo):
        return todo
    if job.levels and max_tiles > 0:
        max_tiles = int(np.searchsorted(todo, plan.block_range(plan.block_of(int(todo[max_tiles - 1])))[1]))
    return todo[:max_tiles]


def _record_failure(spec: JobSpec, e: BaseException, lease: Lease) -> None:
    """Best effort: say in the store how this run ended (the markers stay the truth)."""
    if lease.record is None:
        return  # not ours to write
    status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
    try:
        store = open_store(spec.out, _options(spec), mode="a")
        if store.has_level(0):
            store.update_meta(status=status, error=None if status == "interrupted" else first_line(e))
    except Exception:
        pass


def _run(
    job: Prepared,
    store: ImageStore,
    todo: np.ndarray,
    lines_needed: bool,
    pool: Pool | None,
    workers: int,
    lease: Lease,
    progress: bool,
    on_progress: Callable[[RunSummary, Pool], None] | None,
    log: Callable[[str], None],
    t_start: float,
    io_start: tuple[int, int],
) -> tuple[RunSummary, tuple[int, int]]:
    """Run the stages; the summary, and this process's storage counts when it was made."""
    spec, plan = job.spec, job.plan
    log(f"job:\n{spec.describe()}")
    n_todo = len(todo)
    tally = _Tally(
        RunSummary(
            out=spec.out,
            height=spec.height,
            width=spec.width,
            tiles_total=len(plan),
            tiles_skipped=len(plan) - n_todo,
        ),
        t_start,
    )
    if pool is not None and (n_todo or lines_needed):
        tally.fields["workers"] = workers
        retried0, replaced0, tiles0 = pool.retries, pool.replaced, pool.tiles_retried
        lost0 = set(pool.nodes_lost)
        store.update_meta(status="running", error=None)
        lines = _LineStage(store, job, workers, log, tally) if lines_needed else None
        if n_todo:
            store.invalidate_pyramid(f"{n_todo} level-0 tiles (re)rendered")
            _tile_stage(store, job, todo, pool, workers, lease, progress, on_progress, tally, lines)
        elif lines is not None:
            lines.run(pool)
        if lines is not None:
            tally.fields["line_ranges_computed"] = len(lines.tasks)
            tally.fields["line_seconds"] = lines.seconds
        tally.fields["workers_replaced"] = pool.replaced - replaced0
        tally.fields["tasks_retried"] = pool.retries - retried0
        tally.fields["tiles_retried"] = pool.tiles_retried - tiles0
        tally.fields["nodes"] = tuple(sorted(pool.nodes_used.values()))
        tally.fields["nodes_lost"] = tuple(d for n, d in sorted(pool.nodes_lost.items()) if n not in lost0)
        for lost in tally.fields["nodes_lost"]:
            log(f"lost node {lost}: its tasks were rendered again on the other workers")
    pixels = plan.pixels(todo)
    left = len(plan) - int(store.done_mask(plan).sum())
    runs_ = list(store.meta.get("runs", []))[-20:]
    if in_process(spec):  # the workers' calls were this process's: counted once, below
        tally.requests = tally.objects = 0
    # the driver's own calls so far (run_job adds the ones after the summary)
    requests, objects = (b - a for a, b in zip(io_start, io_counts(), strict=True))
    tally.add_io(requests, objects)
    io_mark = io_counts()
    seconds = time.perf_counter() - t_start
    summary = tally.summary(
        pixels=pixels,
        seconds=round(seconds, 3),
        mpx_s=round(pixels / seconds / 1e6, 3),
        tiles_left=left,
        status="done" if left == 0 else "partial",
        driver_peak_rss_mb=round(peak_rss_mb(), 1),
    )
    runs_ = [*runs_, summary.to_dict()]
    store.update_meta(status=summary.status, tiles_done=len(plan) - left, runs=runs_, last_run=summary.to_dict())
    return summary, io_mark


class _LineStage:
    """The line tasks of a run, and which line positions are stored so far (in whole line chunks).

    The line stage runs in the same ``pool.run`` as the tile stage
    (``run``), and the pool hands out a tile task only when ``ready`` finds
    every row and column line it reads stored: a range counts when its marker
    was in the store as the run began (a marker follows its data) or when its
    LineResult came back.  The order (``_schedule``): the line chunks of the
    first tile task, that task, the other line tasks (the rest of the first
    row range, the column ranges, the other row ranges), the other tile tasks.
    Line tasks otherwise keep their priority: tiles do not delay the line
    stage, whose end lets each worker read the whole line arrays once (until
    then a tile reads its own lines from the store); tile tasks take the lanes
    the last line tasks leave free.  After the last range the lines are
    marked complete.
    """

    def __init__(self, store: ImageStore, job: Prepared, workers: int, log: Callable[[str], None], tally: _Tally):
        self.t0 = time.perf_counter()
        self.store, self.job, self.log, self.tally = store, job, log, tally
        spec = job.spec
        self.chunk = chunk = line_chunk(spec.tile)
        self.length = {"row": spec.height, "col": spec.width}
        self.stored = {w: np.zeros(-(-n // chunk), dtype=bool) for w, n in self.length.items()}
        for which, a, b in store.line_ranges_done():
            if which in self.stored:
                self._mark(which, a, b)
        todo = {
            which: [LineTask(which, a, b) for a, b in line_ranges(n, chunk, 2 * workers) if not self._has(which, a, b)]
            for which, n in self.length.items()
        }
        self.tasks: list[Task] = [*todo["row"][:1], *todo["col"], *todo["row"][1:]]
        self.left = set(self.tasks)
        self.seconds = 0.0  # from the start of the stage to the last range stored
        self.tiles_from: float | None = None  # when the first tile task was found ready
        self._needs: dict[Task, tuple[int, int, int, int]] = {}
        log(f"line stage: {len(self.tasks)} ranges of {spec.height} rows + {spec.width} columns on {workers} workers")

    def _mark(self, which: str, a: int, b: int) -> None:
        """Positions [a, b) stored: the line chunks wholly inside (the last chunk may be short)."""
        n = self.length[which]
        self.stored[which][-(-a // self.chunk) : (b // self.chunk if b < n else len(self.stored[which]))] = True

    def _has(self, which: str, a: int, b: int) -> bool:
        return bool(self.stored[which][a // self.chunk : -(-b // self.chunk)].all())

    def _box(self, task: TileTask) -> tuple[int, int, int, int]:
        """Rows [r0, r1) and columns [c0, c1) that a tile task's tiles read (r0, r1, c0, c1)."""
        needs = self._needs.get(task)
        if needs is None:
            tiles = self.job.plan.tiles(task.start, task.stop)
            needs = self._needs[task] = (
                min(t.r0 for t in tiles),
                max(t.r1 for t in tiles),
                min(t.c0 for t in tiles),
                max(t.c1 for t in tiles),
            )
        return needs

    def ready(self, task: Task) -> bool:
        """Whether ``task`` may be handed out: a line task always, a tile task once its lines are stored."""
        if isinstance(task, TileTask) and self.left:
            r0, r1, c0, c1 = self._box(task)
            if not (self._has("row", r0, r1) and self._has("col", c0, c1)):
                return False
        if isinstance(task, TileTask) and self.tiles_from is None:
            self.tiles_from = time.perf_counter()
        return True

    def on_result(self, task: Task, result: Result) -> bool:
        """Take a line task's result (True); False for any other."""
        if not isinstance(result, LineResult):
            return False
        self.tally.add_io(result.requests, result.objects_written)
        self._mark(result.which, result.start, result.stop)
        self.left.discard(task)
        if not self.left:
            self._complete()
        return True

    def _complete(self) -> None:
        spec = self.job.spec
        self.seconds = round(time.perf_counter() - self.t0, 3)
        self._needs.clear()
        self.log(f"line stage done in {self.seconds:.1f} s (stored under {spec.out}/lines)")
        self.store.mark_lines_complete({"height": spec.height, "width": spec.width, "chunk": self.chunk})

    def _schedule(self, tiles: Sequence[Task]) -> list[Task]:
        """All tasks in the pool's order: the line chunks the first tile task reads (split off their
        ranges), that tile task, the other line tasks, the other tile tasks.  So the first tile comes
        after two small line tasks, not after the line stage; the rest keeps the line stage first."""
        first = tiles[0] if tiles else None
        if not isinstance(first, TileTask) or not self.left:
            return [*self.tasks, *tiles]
        r0, r1, c0, c1 = self._box(first)
        head: list[Task] = []
        rest: list[Task] = []
        for t in self.tasks:
            assert isinstance(t, LineTask)
            lo, hi = (r0, r1) if t.which == "row" else (c0, c1)
            a, b = max(t.start, lo // self.chunk * self.chunk), min(t.stop, -(-hi // self.chunk) * self.chunk)
            if a >= b:
                rest.append(t)
                continue
            head.append(LineTask(t.which, a, b))
            rest.extend(LineTask(t.which, x, y) for x, y in ((t.start, a), (b, t.stop)) if x < y)
        self.tasks = [*head, *rest]
        self.left = set(self.tasks)
        return [*head, first, *rest, *tiles[1:]]

    def run(self, pool: Pool, tiles: Sequence[Task] = (), on_tile: OnResult | None = None) -> None:
        """The line tasks and ``tiles`` (each once its lines are stored) in one ``pool.run``."""
        if not self.left:  # every range was stored by an earlier run, which stopped before marking them complete
            self._complete()

        def on_result(task: Task, result: Result) -> None:
            if not self.on_result(task, result) and on_tile is not None:
                on_tile(task, result)

        pool.run(self.job.context(), self._schedule(tiles), on_result, self.ready if self.left else None)


def _tile_stage(
    store: ImageStore,
    job: Prepared,
    todo: np.ndarray,
    pool: Pool,
    workers: int,
    lease: Lease,
    progress: bool,
    on_progress: Callable[[RunSummary, Pool], None] | None,
    tally: _Tally,
    lines: _LineStage | None = None,
) -> None:
    """Render the tiles ``todo``; with ``lines``, the line stage runs first in the same pool run
    and each tile task waits for its lines (``_LineStage``)."""
    from tqdm import tqdm

    spec = job.spec
    tile_px = spec.tile * spec.tile * spec.shard * spec.shard
    size = spec.batch or auto_batch(len(todo), workers, tile_px, getattr(pool, "device", "cpu"))
    plan = job.plan
    tasks: list[Task] = [TileTask(a, b, _label(plan, a, b)) for a, b in block_runs(plan, todo, size)]
    t0 = time.perf_counter()
    last_meta = time.monotonic()
    n_done0 = tally.base.tiles_skipped
    bar = tqdm(total=len(todo), unit="tile", disable=not progress, dynamic_ncols=True, file=sys.stderr)

    def on_result(task: Task, result: Result) -> None:
        nonlocal last_meta, t0
        assert isinstance(result, list)
        tiles: list[TileResult] = result
        if not tally.tiles_rendered:
            tally.fields["first_tile_seconds"] = round(time.perf_counter() - tally.t_start, 3)
            if lines is not None and lines.tiles_from is not None:
                t0 = lines.tiles_from  # the tile stage began with its first task, inside the line stage
        for info in tiles:
            tally.pixels += info.pixels
            tally.worker_rss = max(tally.worker_rss, info.peak_rss_mb)
            tally.add_io(info.requests, info.objects_written)
        tally.tiles_rendered += len(tiles)
        bar.update(len(tiles))
        dt = time.perf_counter() - t0
        bar.set_postfix_str(f"{tally.pixels / max(dt, 1e-9) / 1e6:.2f} Mpx/s", refresh=False)
        if time.monotonic() - last_meta > 5.0:
            last_meta = time.monotonic()
            try:  # progress for watchers (viewer); best effort, the markers are the truth
                store.update_meta(tiles_done=n_done0 + tally.tiles_rendered)
            except Exception:
                pass
        if on_progress is not None:
            on_progress(tally.summary(), pool)
        lease.check()  # another writer took the store over: stop before more is written

    try:
        if lines is None:
            pool.run(job.context(), tasks, on_result)
        else:
            lines.run(pool, tasks, on_result)
    finally:
        bar.close()
    tally.fields["render_seconds"] = round(time.perf_counter() - t0, 3)


def _label(plan: TilePlan, start: int, stop: int) -> str:
    first = plan.tile(start).id
    return first if stop - start == 1 else f"{first}..{plan.tile(stop - 1).id}"


def _options(spec: JobSpec) -> dict:
    """A private copy: botocore rewrites nested config dicts it is given."""
    return copy.deepcopy(spec.storage_options)


def probe_address(address: str) -> None:
    """Fail in seconds, with one line, when nothing listens at a Ray address (for `render.py assemble --address`)."""
    _probe_address(address)
