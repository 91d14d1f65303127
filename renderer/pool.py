"""The Ray worker pool: resident-generator actors, dynamic load balancing, fault handling.

One actor per GPU (``num_gpus=1``) or per CPU slot (``num_cpus=threads``, torch
limited to that many threads); each loads the checkpoint once.  The driver keeps
``in_flight`` tasks queued per actor and hands out the next as soon as one
returns (``ray.wait``), so fast and slow workers stay busy.  A task that raises
is retried with back-off; a dead actor (killed, out of memory, lost node) is
replaced and its tasks resubmitted.  After ``max_failures`` failures of one
task, or of actors overall, the job stops with a report.  Tasks return only
metadata: pixels go from the worker straight into the store.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .ray_env import token_auth_like_ray_start

token_auth_like_ray_start()  # Ray reads RAY_AUTH_MODE once, when it is imported: before `import ray`
import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayError, RayTaskError

from creps.errors import first_line

from .errors import RendererError
from .local import READY_DEPTH, Attempts, next_ready, retry_later, stalled
from .tasks import OnResult, Ready, RenderContext, Task, TileTask
from .worker import RenderWorker

REPO_ROOT = str(Path(__file__).resolve().parent.parent)


# ---------------------------------------------------------------- Ray start-up
def start_ray(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None) -> bool:
    """Join ``address`` or start an embedded, quiet, loopback-only Ray; True if we started it.

    The workers need this repository on their ``PYTHONPATH``.  On a cluster
    it goes in the job's runtime environment.  An embedded Ray gets it in the
    environment its processes inherit instead (set around ``ray.init`` only):
    then the workers Ray starts while it comes up (one per CPU) already match
    the job, and the first actors take them at once.  With a runtime
    environment each actor waits for a worker process of its own to start and
    import Ray (measured: 2 actors ready 0.6 s after ``ray.init`` instead of
    11 s, on this 2-core VM under load; docs/performance.md).
    """
    if ray.is_initialized():
        return False
    path = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    kwargs: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.ERROR, namespace="creps-gigapixel")
    try:
        if address:
            if address.split(":")[0] in ("127.0.0.1", "localhost"):
                kwargs["_node_ip_address"] = "127.0.0.1"  # a loopback cluster: stay on loopback
            ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": path}}, **kwargs)
        else:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            with _environ(PYTHONPATH=path):
                ray.init(
                    address="local",  # never attach to a cluster found on this machine
                    num_cpus=num_cpus,
                    num_gpus=num_gpus,
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    **kwargs,
                )
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "an embedded Ray"
        raise RendererError(f"cannot start {where}: {first_line(e)}") from None
    return True


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """``os.environ`` with ``values`` set for the block (what processes started in it inherit)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def stop_ray() -> None:
    """Disconnect (and, for an embedded Ray, stop it)."""
    ray.shutdown()


def cluster_resources() -> tuple[float, float]:
    res = ray.cluster_resources()
    return float(res.get("CPU", 0)), float(res.get("GPU", 0))


# ---------------------------------------------------------------- the pool
@dataclass
class _Slot:
    actor: Any
    generation: int = 0
    in_flight: int = 0
    node_ref: Any = None  # the actor's answer to node(): it runs before any task of the actor
    node: str = ""
    suspect: Any = None  # the ping sent when the actor became unreachable; no tasks until it is settled
    retired: bool = False  # its node is gone and the cluster has no room for a replacement


class WorkerPool:
    """``n`` render actors of one checkpoint."""

    def __init__(
        self,
        checkpoint: str,
        init_seed: int,
        n: int,
        threads: int = 1,
        gpus: float = 0.0,
        in_flight: int = 2,
        max_failures: int = 4,
    ) -> None:
        self.checkpoint, self.init_seed = checkpoint, init_seed
        self.n, self.threads, self.gpus = n, threads, gpus
        self.in_flight, self.max_failures = in_flight, max_failures
        self.device = "cuda" if gpus > 0 else "cpu"
        # A GPU actor runs two tasks at once (threads): while one waits for its run's writes
        # before the marker, the other keeps the device busy.  A CPU actor runs one.
        self._cls = ray.remote(RenderWorker).options(
            num_cpus=threads if gpus == 0 else 1,
            num_gpus=gpus,
            max_restarts=0,
            max_task_retries=0,
            max_concurrency=2 if gpus > 0 else 1,
        )
        self.actor_failures: list[str] = []
        self.replaced = 0
        self.retries = 0
        self.tiles_retried = 0
        self.nodes_used: dict[str, str] = {}
        self.nodes_lost: dict[str, str] = {}
        self._node_check = 0.0
        self.slots = [self._slot(self._new_actor()) for _ in range(n)]

    def _new_actor(self) -> Any:
        return self._cls.remote(self.checkpoint, self.init_seed, self.threads, self.device)

    @staticmethod
    def _slot(actor: Any) -> _Slot:
        return _Slot(actor, node_ref=actor.node.remote())

    def pids(self, timeout: float = 120.0) -> list[int]:
        """Process ids of the live actors (waits for them to start)."""
        return ray.get([s.actor.pid.remote() for s in self.slots if not s.retired], timeout=timeout)

    def shutdown(self) -> None:
        for s in self.slots:
            try:
                ray.kill(s.actor)
            except Exception:
                pass

    def _replace(self, i: int, reason: str) -> None:
        self.actor_failures.append(reason)
        if len(self.actor_failures) > self.max_failures * max(1, self.n):
            raise RendererError(
                f"workers died {len(self.actor_failures)} times; giving up. Last: {self.actor_failures[-1]}"
            )
        slot = self.slots[i]
        try:
            ray.kill(slot.actor)
        except Exception:
            pass
        slot.generation += 1
        slot.in_flight = 0
        slot.suspect = None
        if slot.node and not _node_alive(slot.node):
            # described as it was while alive: a dead node's record has no resources left
            self.nodes_lost[slot.node] = self.nodes_used.get(slot.node) or _describe_node(slot.node)
            if not self._room_for_one():  # a replacement could never start: go on with the others
                slot.retired = True
                if all(s.retired for s in self.slots):
                    raise RendererError(
                        f"every worker's node is gone ({', '.join(self.nodes_lost.values())}); "
                        "add nodes or re-run without --address"
                    )
                return
        fresh = self._slot(self._new_actor())
        slot.actor, slot.node_ref, slot.node = fresh.actor, fresh.node_ref, ""
        self.replaced += 1

    def _room_for_one(self) -> bool:
        """Whether the cluster has the CPUs (GPUs) for one more actor right now."""
        free = ray.available_resources()
        need_cpu = self.threads if self.gpus == 0 else 1
        return float(free.get("CPU", 0)) >= need_cpu and float(free.get("GPU", 0)) >= self.gpus

    def _started(self, i: int, slot: _Slot) -> bool:
        """Whether the slot's actor is up (it answered node()); only then does it get tasks.

        A replacement that cannot be placed (its node died and no other has
        room) never answers, so it never holds work the others could do.
        """
        if slot.node:
            return True
        ready, _ = ray.wait([slot.node_ref], timeout=0)
        if not ready:
            return False
        try:
            ray.get(ready[0])
        except RayError as e:
            self._replace(i, f"starting: {_root_cause(e)}")
            return False
        self._learn_node(slot)
        return bool(slot.node)

    def _learn_node(self, slot: _Slot) -> None:
        """Record the node of an actor that answered (its node() ran before its first task)."""
        if slot.node or slot.node_ref is None:
            return
        try:
            slot.node = str(ray.get(slot.node_ref, timeout=0))
        except Exception:
            return
        if slot.node not in self.nodes_used:
            self.nodes_used[slot.node] = _describe_node(slot.node)

    def _settle_suspects(self, final: bool = False) -> None:
        """Decide about actors that became unreachable (``ActorUnavailableError``).

        Such an actor is either back (its ping answers: it gets tasks again),
        dead (its ping fails: replaced), or on a node that died: the GCS marks
        the node dead once its heartbeats stop (seconds), and the slot is
        replaced or retired.  Checked at most once a second; ``final`` (the
        tasks are done) waits for the verdict, so the summary names a lost node.
        """
        waiting = [(i, s) for i, s in enumerate(self.slots) if s.suspect is not None and not s.retired]
        if not waiting or (not final and time.monotonic() - self._node_check < 1.0):
            return
        t_end = time.monotonic() + NODE_VERDICT_S
        while waiting:
            self._node_check = time.monotonic()
            for i, slot in waiting:
                ready, _ = ray.wait([slot.suspect], timeout=0)
                if slot.node and not _node_alive(slot.node):
                    self._replace(i, f"its node {slot.node[:12]} died")
                elif ready:
                    try:
                        ray.get(ready[0])
                        slot.suspect = None  # it answers again: a blip
                    except ActorUnavailableError:
                        slot.suspect = slot.actor.pid.remote()  # still unreachable: ask again, wait for the GCS
                    except RayError as e:
                        self._replace(i, f"unreachable, then: {_root_cause(e)}")
            waiting = [(i, s) for i, s in enumerate(self.slots) if s.suspect is not None and not s.retired]
            if not final or time.monotonic() > t_end:
                return
            time.sleep(1.0)

    def run(
        self,
        ctx: RenderContext,
        tasks: list[Task],
        on_result: OnResult,
        ready: Ready | None = None,
    ) -> None:
        """Run the tasks of job ``ctx`` on the actors; ``on_result(task, result)`` for each, in this thread.

        A task is handed out once ``ready(task)`` (when given) is true: the first
        ready task in the order of ``tasks``; ``ready`` is asked in this thread.
        """
        queue = collections.deque(Attempts(t) for t in tasks)
        pending: dict[Any, tuple[int, int, Attempts]] = {}
        while queue or pending:
            now = time.monotonic()
            self._settle_suspects()
            asked = self._hand_out(ctx, queue, pending, ready, now)
            if not pending:
                time.sleep(stalled(queue, now) if asked else 0.05)  # else no actor is up to take a task yet
                continue
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in done:
                self._collect(ref, pending.pop(ref), queue, on_result)
        self._settle_suspects(final=True)

    def _hand_out(
        self,
        ctx: RenderContext,
        queue: collections.deque[Attempts],
        pending: dict[Any, tuple[int, int, Attempts]],
        ready: Ready | None,
        now: float,
    ) -> bool:
        """Fill the started slots up to ``in_flight`` with the first ready tasks; whether any slot
        was up to ask.  Once nothing queued is ready, no further slot is asked this round."""
        asked = waiting = False
        for i, slot in enumerate(self.slots):
            if slot.retired or slot.suspect is not None or not self._started(i, slot):
                continue
            asked = True
            while not waiting and slot.in_flight < self.in_flight and queue:
                task = next_ready(queue, now, ready, READY_DEPTH if pending else None)
                if task is None:
                    waiting = True
                    break
                ref = slot.actor.run.remote(ctx, task.task)
                pending[ref] = (i, slot.generation, task)
                slot.in_flight += 1
        return asked

    def _collect(
        self, ref: Any, sent: tuple[int, int, Attempts], queue: collections.deque[Attempts], on_result: OnResult
    ) -> None:
        """Take one finished task: its result to ``on_result``, or its failure to the slot (an
        unreachable actor is suspect, a dead one replaced) and the task back on the queue."""
        i, gen, task = sent
        slot = self.slots[i]
        if gen == slot.generation:
            slot.in_flight -= 1
        try:
            value = ray.get(ref)
        except ActorUnavailableError as e:
            # unreachable: a blip, or its node is dying; its tasks go elsewhere meanwhile
            if gen == slot.generation and slot.suspect is None:
                self._learn_node(slot)
                slot.suspect = slot.actor.pid.remote()
            self._retry(queue, task, _root_cause(e), backoff=False)
        except RayActorError as e:
            if gen == slot.generation:  # first news of this actor's death: replace it
                self._learn_node(slot)
                self._replace(i, f"{task.task.key}: {_root_cause(e)}")
            self._retry(queue, task, _root_cause(e), backoff=False)
        except (RayTaskError, RayError, GetTimeoutError) as e:
            self._retry(queue, task, _root_cause(e), backoff=True)
        else:
            if gen == slot.generation:
                self._learn_node(slot)
            on_result(task.task, value)

    def _retry(self, queue: collections.deque[Attempts], task: Attempts, error: str, backoff: bool) -> None:
        self.retries += 1
        if isinstance(task.task, TileTask):
            self.tiles_retried += task.task.stop - task.task.start
        retry_later(queue, task, error, self.max_failures, backoff)


# ---------------------------------------------------------------- reuse across jobs
_POOLS: dict[tuple, WorkerPool] = {}


def get_pool(checkpoint: str, init_seed: int, n: int, threads: int, gpus: float, max_failures: int = 4) -> WorkerPool:
    """A pool for these weights and shape, reusing the live one of an earlier job in this
    Ray session (loading a generator into fresh actors is the slow part of a small job).
    Pools of other shapes are shut down first so their resources free up."""
    key = (ray.get_runtime_context().get_job_id(), checkpoint, init_seed, n, threads, gpus)
    for k in [k for k in _POOLS if k != key]:
        _POOLS.pop(k).shutdown()
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS[key] = WorkerPool(checkpoint, init_seed, n, threads, gpus, max_failures=max_failures)
    pool.max_failures = max_failures
    return pool


def release_pools() -> None:
    """Kill every cached pool's actors (before ``ray.shutdown`` or to free resources)."""
    while _POOLS:
        _POOLS.popitem()[1].shutdown()


# How long a pool whose tasks are done waits for the GCS to say whether an unreachable
# actor's node died (it marks a node dead after missed heartbeats: ~15-30 s by default).
NODE_VERDICT_S = 90.0

_STANDARD_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def _node_alive(node: str) -> bool:
    """Whether the GCS still counts ``node`` as alive (an unknown node counts as gone)."""
    return any(n.get("NodeID") == node and n.get("Alive") for n in ray.nodes())


def _describe_node(node: str) -> str:
    """``<id12> (<address>; <custom resources>)``: enough to tell which machine it was."""
    for n in ray.nodes():
        if n.get("NodeID") == node:
            custom = sorted(
                k
                for k in n.get("Resources", {})
                if k not in _STANDARD_RESOURCES and not k.startswith(("node:", "accelerator_type:"))
            )
            extra = f"; {', '.join(custom)}" if custom else ""
            return f"{node[:12]} ({n.get('NodeManagerAddress', '?')}{extra})"
    return node[:12]


def _root_cause(e: BaseException) -> str:
    """One line naming what went wrong inside a Ray task or actor.

    Ray wraps the worker's exception; its ``cause`` is the original one.
    Without a cause the text is a formatted traceback, whose *last* line is
    the exception itself.
    """
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {first_line(cause)}"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__
