"""One writer per store: the lease (local and S3), concurrent jobs, takeover after a crash,
and refusals that happen before anything is written (cluster, workers, plan size)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import s3fs
from conftest import REPO, free_port, race_leases, render_cli_env, tiny_job

from jobs.run import run_job
from renderer import lease as lease_mod
from renderer.lease import LeaseLost, StoreBusyError
from renderer.store import open_store, store_lease

RENDER = [sys.executable, str(REPO / "render.py"), "render", "--checkpoint", "preset:tiny", "--quiet", "--no-exports"]


def _s3_options(endpoint: str) -> dict:
    return {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}


def test_lease_race_local_has_one_winner(tmp_path):
    for attempt in range(5):
        url = str(tmp_path / f"race{attempt}.zarr")
        got = race_leases(lambda url=url: store_lease(url))
        winners = [g for g in got if not isinstance(g, StoreBusyError)]
        assert len(winners) == 1, got
        assert all("another process" in str(g) for g in got if isinstance(g, StoreBusyError))


def test_lease_race_s3_has_one_winner(moto_s3):
    options = _s3_options(moto_s3)
    s3fs.S3FileSystem(key="k", secret="s", client_kwargs={"endpoint_url": moto_s3}).mkdir("leases")
    for attempt in range(3):
        url = f"s3://leases/race{attempt}.zarr"
        got = race_leases(lambda url=url: store_lease(url, options))
        winners = [g for g in got if not isinstance(g, StoreBusyError)]
        assert len(winners) == 1, got


def test_released_or_dead_holder_can_be_taken_over(tmp_path):
    url = str(tmp_path / "t.zarr")
    first = store_lease(url)
    rec1 = first.acquire("first")
    with pytest.raises(StoreBusyError, match="being written by another process: first"):
        store_lease(url).acquire("second")
    first.release()
    second = store_lease(url)
    assert second.acquire("second").gen == rec1.gen + 1
    second.release()
    # a holder whose process is gone (kill -9) does not block
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    path = f"{second.folder}/{rec1.gen + 2:08d}.json"
    record = {**json.loads(open(f"{second.folder}/{rec1.gen + 1:08d}.json").read()), "gen": rec1.gen + 2}
    record.update(pid=pid, released=False, purpose="crashed job")
    with open(path, "w") as f:
        json.dump(record, f)
    third = store_lease(url)
    assert third.acquire("third").gen == rec1.gen + 3
    third.release()


def test_a_live_pid_with_another_start_time_is_a_stale_lease(tmp_path):
    """A lease names its holder by pid and process start time: a record whose pid is alive but
    belongs to a process started at another time (the pid was reused after a crash) is taken
    over; the same record with the live process's start time blocks."""
    from renderer.lease import process_start

    t0 = time.time()
    other = subprocess.Popen(["sleep", "60"])
    try:
        t1 = time.time()
        started = process_start(other.pid)
        assert t0 - 1.0 <= started <= t1 + 1.0, (t0, started, t1)  # the real start time, not 0.0
        url = str(tmp_path / "pid.zarr")
        mine = store_lease(url)
        rec = mine.acquire("mine")
        assert rec.pid == os.getpid() and rec.pid_started == process_start(os.getpid()) > 0
        mine.release()

        def fake(gen: int, pid_started: float) -> None:
            record = {**json.loads(open(f"{mine.folder}/{rec.gen:08d}.json").read()), "gen": gen}
            record.update(pid=other.pid, pid_started=pid_started, released=False, purpose="holder", owner="x")
            with open(f"{mine.folder}/{gen:08d}.json", "w") as f:
                json.dump(record, f)

        fake(rec.gen + 1, started)  # the live process itself: it holds the store
        with pytest.raises(StoreBusyError, match=f"holder \\(pid {other.pid} "):
            store_lease(url).acquire("second")
        fake(rec.gen + 2, started - 100.0)  # the same pid, another process (started 100 s earlier): gone
        taker = store_lease(url)
        assert taker.acquire("taker").gen == rec.gen + 3
        taker.release()
        assert other.poll() is None  # it was alive all along
    finally:
        other.kill()
        other.wait()


def test_a_holder_on_another_host_is_judged_by_its_heartbeat(tmp_path):
    """Another host's pid says nothing here: its record blocks while its heartbeat is younger than
    STALE_AFTER_S (90 s) and is taken over once it is older."""
    url = str(tmp_path / "host.zarr")
    folder = store_lease(url).folder
    os.makedirs(folder)
    record = {"owner": "x", "purpose": "elsewhere", "host": "another-host", "pid": os.getpid(),
              "pid_started": 1.0, "started": 0.0, "released": False}  # fmt: skip
    with open(f"{folder}/{1:08d}.json", "w") as f:
        json.dump({**record, "gen": 1, "heartbeat": time.time() - lease_mod.STALE_AFTER_S + 30}, f)
    with pytest.raises(StoreBusyError, match="elsewhere \\(pid .* on another-host, last heartbeat 60 s ago\\)"):
        store_lease(url).acquire("here")
    with open(f"{folder}/{2:08d}.json", "w") as f:
        json.dump({**record, "gen": 2, "heartbeat": time.time() - lease_mod.STALE_AFTER_S - 1}, f)
    taker = store_lease(url)
    assert taker.acquire("here").gen == 3
    taker.release()


def test_takeover_during_a_job_stops_it(tmp_path, render_ray, monkeypatch):
    monkeypatch.setattr(lease_mod, "HEARTBEAT_S", 0.1)
    spec = tiny_job(str(tmp_path / "l.zarr"), height=192, width=192, tile=16)
    folder = store_lease(spec.out).folder
    taken: list[bool] = []

    def take_over(summary, pool) -> None:
        if not taken and summary.tiles_rendered >= 2:
            newest = max(int(n[:-5]) for n in os.listdir(folder) if n.endswith(".json"))
            rec = json.loads(open(f"{folder}/{newest:08d}.json").read())
            with open(f"{folder}/{newest + 1:08d}.json", "w") as f:
                json.dump({**rec, "gen": newest + 1, "owner": "thief", "purpose": "thief"}, f)
            taken.append(True)
            time.sleep(0.5)  # a heartbeat notices

    with pytest.raises(LeaseLost, match="another process took over"):
        run_job(spec, progress=False, on_progress=take_over)
    assert open_store(spec.out, mode="r").done_count() < 144


def test_two_jobs_started_together_one_wins(tmp_path):
    """Different seeds, same new --out, synchronised start: exactly one renders, the other
    exits 2 with one line, and the store holds the winner's image."""
    out = str(tmp_path / "both.zarr")
    go = tmp_path / "go"
    # each process waits for the go file after its imports, so both reach the lease together
    code = (
        f"import os, sys, time; sys.path.insert(0, {str(REPO)!r}); import render, jobs.run\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
        "sys.exit(render.main(sys.argv[1:]))"
    )
    procs = []
    for seed in (1, 2):
        args = [
            "render",
            "--checkpoint",
            "preset:tiny",
            "--quiet",
            "--no-exports",
            "--size",
            "96x64",
            "--tile",
            "32",
            "--workers",
            "1",
            "--seed",
            str(seed),
            "--out",
            out,
        ]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code, *args],
                env=render_cli_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    time.sleep(6)  # both imported
    go.write_text("go")
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    errors = [ln for ln in loser[2].splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and ("another process" in errors[0] or "holds a different job" in errors[0]), loser
    winner_seed = 1 if results[0][0] == 0 else 2
    store = open_store(out, mode="r")
    assert store.meta["spec"]["seed"] == winner_seed and store.done_count() == 6


def test_same_job_while_running_is_refused_then_resumes_after_kill(tmp_path):
    out = str(tmp_path / "same.zarr")
    args = [*RENDER, "--size", "512x512", "--tile", "16", "--workers", "1", "--batch", "1", "--out", out]
    first = subprocess.Popen(
        args, env=render_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    t_end = time.monotonic() + 120
    while time.monotonic() < t_end and not os.path.isdir(os.path.join(out, "tiles")):
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGSTOP)  # the first job is alive (its pid exists) but makes no progress
    second = subprocess.run(args, env=render_cli_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr[-2000:]
    assert (
        second.stderr.strip().splitlines()[-1].startswith("error: ")
        and "being written by another process" in second.stderr
    )
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    again = subprocess.run(args, env=render_cli_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert open_store(out, mode="r").done_count() == 1024


# ---------------------------------------------------------------- refused before anything is written
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--workers", "1000"], "do not fit"),
        (["--threads-per-worker", "64"], "more than the"),
        (["--gpus-per-worker", "1"], "has no GPU"),
    ],
)
def test_pool_that_does_not_fit_is_refused(tmp_path, extra, message):
    out = tmp_path / "never.zarr"
    proc = subprocess.run(
        [*RENDER, "--size", "64", "--tile", "32", "--out", str(out), *extra],
        env=render_cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if "--gpus-per-worker" in extra and "has no GPU" not in proc.stderr and proc.returncode == 0:
        pytest.skip("this machine has a GPU")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


def test_address_with_nothing_listening_fails_fast_and_writes_nothing(tmp_path):
    out = tmp_path / "never.zarr"
    t0 = time.monotonic()
    proc = subprocess.run(
        [*RENDER, "--size", "64", "--tile", "32", "--out", str(out), "--address", f"127.0.0.1:{free_port()}"],
        env=render_cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "no Ray cluster answers" in proc.stderr, proc.stderr
    assert time.monotonic() - t0 < 60 and not out.exists()
