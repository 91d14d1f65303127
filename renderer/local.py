"""The in-process pool: the ``Pool`` protocol run by threads of this process, without Ray.

``render.py render --workers 0`` (and every ``memory://`` store, which only
this process can see) renders here.  The store, the markers, the lease, resume
and the bytes are those of the Ray path: the driver is the same, and so is
the worker body (``RenderWorker``); only the transport differs.  Nothing here
imports Ray, so this path works where Ray is not installed.

Lanes: ``lanes`` threads take tasks from one queue and share one generator
and one ``TileRenderer`` per job (its weights, line cache and writer
threads).  On a CPU each lane runs torch single-threaded (the pool sets
``torch.set_num_threads(1)`` and puts the old value back on ``shutdown``):
many small ops with a multi-threaded BLAS pay a barrier per op, and with any
other load on the machine each barrier can cost a scheduler time slice
(measured here, a 512x256 ffhq512 block twice: 2 lanes x 1 thread 1.2 s,
1 lane x 2 threads 43 s with the machine busy).  On a GPU one lane is enough:
the renderer's write pipeline keeps the device fed.

Faults: a task that raises is retried with back-off up to ``max_failures``
times, as ``WorkerPool`` does; then the job stops with one line.

Dependencies: ``run(..., ready=...)`` hands out a task only once ``ready(task)``
says what it needs is there (a tile task waits for its line ranges); both
pools take the first queued task that is ready (``next_ready``), so the
queue's order is the tasks' priority.
"""

from __future__ import annotations

import collections
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

import creps
from creps.errors import first_line

from .errors import RendererError
from .tasks import OnResult, Ready, RenderContext, Result, Task
from .worker import RenderWorker


@dataclass
class Attempts:
    """A task and how often it failed so far (shared by the pools' retry rules)."""

    task: Task
    attempts: int = 0
    not_before: float = 0.0
    errors: list[str] = field(default_factory=list)


def retry_later(
    queue: collections.deque[Attempts], task: Attempts, error: str, max_failures: int, backoff: bool
) -> None:
    """Put a failed task back at the front (after a back-off), or give up with one line."""
    task.attempts += 1
    task.errors.append(error)
    if task.attempts > max_failures:
        raise RendererError(
            f"task {task.task.key} failed {task.attempts} times; giving up. Last error: {task.errors[-1]}"
        )
    task.not_before = time.monotonic() + (min(8.0, 0.5 * 2 ** (task.attempts - 1)) if backoff else 0.0)
    queue.appendleft(task)


# How deep the dispatcher looks past tasks that wait for others (``ready``) while some are running.
READY_DEPTH = 256


def next_ready(
    queue: collections.deque[Attempts],
    now: float,
    ready: Ready | None = None,
    depth: int | None = None,
) -> Attempts | None:
    """The first queued task whose back-off is over and that is ``ready`` (its dependencies met),
    looking at most ``depth`` tasks deep (all when None); the others keep their order."""
    for i, task in enumerate(queue):
        if depth is not None and i >= depth:
            break
        if task.not_before <= now and (ready is None or ready(task.task)):
            del queue[i]
            return task
    return None


def stalled(queue: collections.deque[Attempts], now: float) -> float:
    """Nothing runs and nothing queued is ready: seconds until a back-off ends, else the job
    cannot go on (a task waits for something no task will make)."""
    if any(t.not_before > now for t in queue):
        return min(1.0, max(0.05, min(t.not_before for t in queue if t.not_before > now) - now))
    raise RendererError(f"task {queue[0].task.key} waits for work that no task does; giving up")


class LocalPool:
    """``lanes`` render threads in this process on ``device`` (``cpu`` or ``cuda``)."""

    def __init__(
        self,
        checkpoint: str,
        init_seed: int,
        lanes: int,
        device: str,
        max_failures: int = 4,
        generator: creps.Generator | None = None,
    ) -> None:
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes}")
        self.lanes, self.device, self.max_failures = lanes, device, max_failures
        self.retries = self.replaced = self.tiles_retried = 0
        self.nodes_used: dict[str, str] = {}
        self.nodes_lost: dict[str, str] = {}
        self._threads_before = torch.get_num_threads()
        if torch.device(device).type == "cpu":
            torch.set_num_threads(1)
        self.worker = RenderWorker(checkpoint, init_seed, 0, device, generator=generator)
        self._exec = ThreadPoolExecutor(lanes, thread_name_prefix="creps-lane")

    def pids(self, timeout: float = 0.0) -> list[int]:
        return [self.worker.pid()]

    def shutdown(self) -> None:
        """Stop the lanes and writer threads; give torch its thread count back."""
        self._exec.shutdown(wait=True)
        self.worker.close()
        torch.set_num_threads(self._threads_before)

    def run(
        self,
        ctx: RenderContext,
        tasks: list[Task],
        on_result: OnResult,
        ready: Ready | None = None,
    ) -> None:
        """Run the tasks of job ``ctx`` on the lanes; ``on_result(task, result)`` for each, in this thread.

        A task is handed out once ``ready(task)`` (when given) is true: the first
        ready task in the order of ``tasks``; ``ready`` is asked in this thread.

        If anything raises here (a task that keeps failing, ``on_result``, an
        interrupt), the queued tasks are dropped and the running ones finish
        before the error goes on: nothing of the job runs after ``run`` returns.
        """
        self.worker.renderer(ctx)  # made once, here, before the lanes share it
        queue = collections.deque(Attempts(t) for t in tasks)
        pending: dict[Future[Result], Attempts] = {}
        try:
            while queue or pending:
                now = time.monotonic()
                while len(pending) < self.lanes and queue:
                    task = next_ready(queue, now, ready, READY_DEPTH if pending else None)
                    if task is None:
                        break
                    pending[self._exec.submit(self.worker.run, ctx, task.task)] = task
                if not pending:
                    time.sleep(stalled(queue, now))
                    continue
                done, _ = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                for fut in done:
                    task = pending.pop(fut)
                    try:
                        value = fut.result()
                    except Exception as e:
                        self.retries += 1
                        retry_later(queue, task, f"{type(e).__name__}: {first_line(e)}", self.max_failures, True)
                    else:
                        on_result(task.task, value)
        except BaseException:
            for fut in pending:
                fut.cancel()
            wait(pending)
            raise
