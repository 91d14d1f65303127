"""The worker body: one resident generator that does line and tile tasks.

The same class runs inside a Ray actor (``renderer.pool`` wraps it with
``ray.remote``) and on the lanes of the in-process pool (``renderer.local``).
It imports nothing of Ray, so the in-process path works where Ray is not
installed.  Jobs arrive with each task as a ``RenderContext``, so the same
worker serves several jobs of one checkpoint without reloading it.
"""

from __future__ import annotations

import os
import threading

import torch

import creps

from .tasks import LineTask, RenderContext, Result, Task, TileTask
from .tiles import TileRenderer


def resolve_device(device: str) -> str:
    """``cuda`` falls back to ``cpu`` where no GPU is visible (a Ray actor placed on a CPU node)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "cpu"
    return device


class RenderWorker:
    """A resident generator and the renderer of the job it works on now."""

    def __init__(
        self,
        checkpoint: str,
        init_seed: int,
        threads: int,
        device: str,
        generator: creps.Generator | None = None,
        writers: int | None = None,
    ) -> None:
        if threads > 0:
            torch.set_num_threads(threads)
        device = resolve_device(device)
        self.G = generator if generator is not None else creps.load(checkpoint, init_seed=init_seed, device=device)
        self.device = device
        self.writers = writers
        self._ctx: RenderContext | None = None
        self._r: TileRenderer | None = None
        self._lock = threading.Lock()  # tasks may run on two threads (GPU actors, in-process lanes)

    def renderer(self, ctx: RenderContext) -> TileRenderer:
        """The renderer of job ``ctx`` (made on its first task, replaced when the job changes)."""
        with self._lock:
            if self._r is None or ctx != self._ctx:
                if self._r is not None:
                    self._r.close()
                self._r, self._ctx = TileRenderer(self.G, ctx, self.device, writers=self.writers), ctx
            return self._r

    def node(self) -> str:
        """The Ray node this actor runs on (the pool reports the nodes a job used and lost)."""
        import ray  # only ever called inside a Ray actor

        return str(ray.get_runtime_context().get_node_id())

    def pid(self) -> int:
        return os.getpid()

    def run(self, ctx: RenderContext, task: Task) -> Result:
        """Do one task of job ``ctx``; the task's type says what."""
        r = self.renderer(ctx)
        if isinstance(task, LineTask):
            return r.lines(task.which, task.start, task.stop)
        if isinstance(task, TileTask):
            return r.tiles(task.start, task.stop)
        raise TypeError(f"unknown task {task!r}")

    def close(self) -> None:
        if self._r is not None:
            self._r.close()
            self._r = None
