"""A validated job (``Prepared``): the resolved spec, the model config, the checkpoint hash and the plan.

``jobs.run.prepare`` makes one; the output, pool and stage modules take it
and derive from it what they need (the identity a store is checked against,
the ``RenderContext`` a worker gets with each task, the line arrays' shape),
so those derivations are written once, here.
"""

from __future__ import annotations

import copy
import dataclasses

import creps
from renderer.store import LineShape
from renderer.tasks import RenderContext

from .plan import TilePlan, block_levels, line_chunk
from .spec import JobSpec


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
            storage_options=store_options(s),
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


def store_options(spec: JobSpec) -> dict:
    """A private copy of the job's storage options: botocore rewrites nested config dicts it is given."""
    return copy.deepcopy(spec.storage_options)
