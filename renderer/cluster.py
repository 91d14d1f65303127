"""Block work as Ray tasks on a cluster (``render.py assemble --address``).

``RayRunner`` submits the plain functions of renderer.blocks as Ray tasks of
one CPU each; every task opens the store by URL and writes its own outputs
(pyramid chunk rows, DeepZoom tiles), and only small results (rows counts,
file names, a band's encoded TIFF tiles) come back to the driver. Ray joins
the cluster the way a render does (renderer.pool.start_ray, which puts this
repository on the workers' PYTHONPATH); this module and renderer.pool are the
only ones that import Ray, after renderer.ray_env has set Ray's environment.

Why not Dask-on-Ray (``ray.util.dask.ray_dask_get``): with the versions we
install it does not import (it pulls in dask.dataframe, which needs pandas
and pyarrow); see docs/assemble.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .ray_env import token_auth_like_ray_start

token_auth_like_ray_start()  # Ray reads RAY_AUTH_MODE once, when it is imported: before `import ray`
import ray
from ray.exceptions import RayError, RayTaskError

from creps.errors import first_line

from .errors import RendererError
from .pool import start_ray, stop_ray

CANCEL_WAIT_S = 60.0  # how long a failed assemble waits for its running tasks to end before cleaning up


class RayRunner:
    """Runs block work as Ray tasks on the cluster at ``address``; ``workers`` tasks at once (default: its CPUs)."""

    def __init__(self, address: str, workers: int | None = None) -> None:
        self.started = start_ray(address)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = workers or max(1, cpus)
        self._remote: dict[Callable[..., Any], Any] = {}

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = ray.remote(num_cpus=1, max_retries=2)(fn)
        return remote.remote(*args)

    def result(self, handle: Any) -> Any:
        try:
            return ray.get(handle)
        except RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None  # the task's own error: a RendererError naming a chunk, an OSError
            raise RendererError(f"a block task failed on the cluster: {first_line(e)}") from None
        except RayError as e:
            raise RendererError(f"the Ray cluster lost a block task: {first_line(e)}") from None

    def cancel(self, handles: Iterable[Any]) -> None:
        """Cancel tasks not yet run; wait (a while) for running ones, so they do not write after a cleanup."""
        refs = list(handles)
        for h in refs:
            try:
                ray.cancel(h)
            except Exception:
                pass  # finished or gone already
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=CANCEL_WAIT_S)

    def close(self) -> None:
        if self.started:
            stop_ray()
