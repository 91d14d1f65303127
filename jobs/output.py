"""The job's output store: the one it resumes or the one it makes, and what is left to render there.

Inspection writes nothing: it refuses (JobSpecError, one line) an output
that is not an image store, a store of another job (unless ``overwrite``) or
an unreachable URL before any work starts.  The store is created only by the
holder of its writer lease (jobs.run), and its markers say what is done:
resume is re-running the same job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Collection

import numpy as np

from creps.errors import first_line
from renderer.errors import RendererError
from renderer.fsio import filesystem, is_local
from renderer.lease import Lease
from renderer.provenance import software_version
from renderer.store import ImageStore, create_job_store, is_foreign_folder, open_store, store_exists

from . import JobSpecError
from .job import Prepared, store_options
from .plan import auto_block, auto_shard
from .spec import JobSpec, same_identity, stored_identity


def resolve_layout(spec: JobSpec, sha: str) -> JobSpec:
    """``shard = 0`` and ``block = 0`` (auto) made concrete: those of the store this job resumes,
    else ``auto_shard`` / ``auto_block``.

    A store of the same job made with another shard or block (explicit ones,
    or older defaults; stores from before blocks hold block 1) is resumed as
    it is rather than refused as another job.
    """
    if spec.shard and spec.block:
        return spec
    shard = spec.shard or auto_shard(
        spec.height, spec.width, spec.tile, object_store=not (is_local(spec.out) or spec.in_process)
    )
    block = spec.block
    try:
        if store_exists(spec.out, store_options(spec)):
            old_meta = open_store(spec.out, store_options(spec), mode="r").meta
            old = stored_identity(old_meta.get("identity") or {})
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


def inspect_output(job: Prepared, overwrite: bool) -> ImageStore | None:
    """The existing store this job resumes, or None when a new one must be made; writes nothing.

    Refuses (JobSpecError, one line) an output that is not an image store,
    a store of another job (unless ``overwrite``), or an unreachable URL.
    """
    spec = job.spec
    try:
        filesystem(spec.out, store_options(spec))
        exists = store_exists(spec.out, store_options(spec))
        if not exists and is_foreign_folder(spec.out, store_options(spec)):
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
        store = open_store(spec.out, store_options(spec), mode="a")
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
            store_options(spec),
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


def tiles_todo(job: Prepared, store: ImageStore | None, redo: Collection[str], max_tiles: int | None) -> np.ndarray:
    """Sorted indices of the tiles this run renders: those without a marker, and ``redo``.

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


def identity_tag(job: Prepared) -> str:
    """A short, stable name of the job for lease records and logs."""
    text = json.dumps(job.identity, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def record_failure(spec: JobSpec, e: BaseException, lease: Lease) -> None:
    """Best effort: say in the store how this run ended (the markers stay the truth)."""
    if lease.record is None:
        return  # not ours to write
    status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
    try:
        store = open_store(spec.out, store_options(spec), mode="a")
        if store.has_level(0):
            store.update_meta(status=status, error=None if status == "interrupted" else first_line(e))
    except Exception:
        pass
