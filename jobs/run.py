"""The job driver: validate, prepare the store, run the stages, summarise.

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

The parts: jobs.job (the validated job), jobs.output (the store it resumes
or makes), jobs.pools (workers and Ray), jobs.stages (line and tile stages),
jobs.summary (RunSummary).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Collection

import numpy as np

import creps
from creps.errors import first_line
from renderer.fsio import io_counts
from renderer.lease import Lease
from renderer.store import ImageStore, store_lease
from renderer.tasks import Pool
from renderer.tiles import peak_rss_mb

from . import JobSpecError, pools
from .job import Prepared, store_options
from .output import create_output, identity_tag, inspect_output, record_failure, resolve_layout, tiles_todo
from .plan import job_plan
from .spec import JobSpec
from .stages import LineStage, tile_stage
from .summary import RunSummary, Tally


def prepare(spec: JobSpec) -> Prepared:
    """Check the checkpoint and canvas without loading weights or touching the output.

    A training run directory given as the checkpoint is resolved here, once,
    to its newest G_ema file: the hash, the job record and every worker then
    name the same weights even if training writes a newer snapshot meanwhile.
    """
    spec = dataclasses.replace(spec, checkpoint=creps.resolve_checkpoint(spec.checkpoint))
    cfg = creps.read_config(spec.checkpoint, init_seed=spec.init_seed)
    sha = creps.checkpoint_hash(spec.checkpoint, spec.init_seed)
    spec = resolve_layout(spec.resolved(cfg.image_size), sha)
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
    todo = tiles_todo(job, existing, redo, max_tiles)
    lines_needed = existing is None or not existing.lines_complete()
    pool: Pool | None = None
    started_ray = False
    workers = 0
    if len(todo) or lines_needed:
        pool, workers, started_ray = pools.connect(spec)
    lease = store_lease(spec.out, store_options(spec))
    try:
        try:
            lease.acquire(f"render job {identity_tag(job)}")
        except OSError as e:
            raise JobSpecError(f"cannot write {spec.out!r}: {first_line(e)}") from None
        # another writer may have made or changed the store before we held the lease: look again
        existing = inspect_output(job, overwrite)
        store = existing or create_output(job)
        if existing is None:
            todo, lines_needed = tiles_todo(job, None, redo, max_tiles), True
        summary, io_mark = _run(
            job, store, todo, lines_needed, pool, workers, lease, progress, on_progress, log, t_start, io_start
        )
    except BaseException as e:
        if pool is not None and not spec.in_process:
            pools.release_ray_pools()  # a failed or interrupted job leaves no half-busy actors behind
        record_failure(spec, e, lease)
        raise
    finally:
        lease.release()
        pools.close(spec, pool, started_ray)
    # the requests after the summary was made (its own metadata write, the lease release) belong to
    # the run too: the summary returned and printed has them, the copy in the store's runs cannot
    tail_requests, tail_objects = (b - a for a, b in zip(io_mark, io_counts(), strict=True))
    return dataclasses.replace(
        summary,
        requests=summary.requests + tail_requests,
        objects_written=summary.objects_written + tail_objects,
    )


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
    tally = Tally(
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
        lines = LineStage(store, job, workers, log, tally) if lines_needed else None
        if n_todo:
            store.invalidate_pyramid(f"{n_todo} level-0 tiles (re)rendered")
            tile_stage(store, job, todo, pool, workers, lease, progress, on_progress, tally, lines)
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
    if spec.in_process:  # the workers' calls were this process's: counted once, below
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
