"""Render to a real S3 endpoint (moto_server on 127.0.0.1) through s3fs, and through an outage."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import numpy as np
import pytest
import zarr
from conftest import free_port, tiny_job
from zarr.storage import FsspecStore

import render
from jobs.run import run_job
from renderer.store import open_store

s3fs = pytest.importorskip("s3fs")


def _options(endpoint: str) -> dict:
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }


def _bucket(endpoint: str, name: str) -> None:
    # no region here: moto refuses a us-east-1 LocationConstraint (S3 does too)
    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint})
    fs.mkdir(name)


def _level0(url: str, options: dict) -> np.ndarray:
    store = FsspecStore.from_url(url, storage_options=options, read_only=True)
    return np.asarray(zarr.open_group(store, mode="r")["0"][:])


def test_render_to_s3_and_read_back(moto_s3, render_ray, render_reference, capsys):
    _bucket(moto_s3, "renders")
    url = "s3://renders/img.zarr"
    rc = render.main(
        [
            "render",
            "--checkpoint",
            "preset:tiny",
            "--size",
            "120x90",
            "--tile",
            "32",
            "--workers",
            "2",
            "--threads-per-worker",
            "1",
            "--out",
            url,
            "--storage-options",
            json.dumps(_options(moto_s3)),
            "--no-exports",
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "rendered 12 of 12 tiles" in out
    np.testing.assert_array_equal(_level0(url, _options(moto_s3)), render_reference(90, 120))
    fs = s3fs.S3FileSystem(**_options(moto_s3))
    assert len(fs.ls("renders/img.zarr/tiles")) == 12
    assert fs.exists("renders/img.zarr/lines/done/all.json")


def test_unreachable_endpoint_is_one_clear_error(render_ray, capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    rc = render.main(
        [
            "render",
            "--checkpoint",
            "preset:tiny",
            "--size",
            "64",
            "--tile",
            "32",
            "--out",
            "s3://renders/x.zarr",
            "--storage-options",
            json.dumps(_options(dead)),
            "--no-exports",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: cannot access 's3://renders/x.zarr'"), err


def _dead_store(kind: str, endpoint: str) -> tuple[str, dict]:
    """A store URL and storage options whose endpoint is a closed port (credentials per ``kind``)."""
    if kind == "s3, dummy credentials":
        return "s3://renders/x.zarr", _options(endpoint)
    if kind == "s3, no credentials":
        return "s3://renders/x.zarr", {"client_kwargs": {"endpoint_url": endpoint}}
    if kind == "gcs":
        pytest.importorskip("gcsfs")
        return "gs://renders/x.zarr", {"endpoint_url": endpoint, "token": "anon"}
    pytest.importorskip("adlfs")
    from conftest import AZURITE_ACCOUNT, AZURITE_KEY

    connection = (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint={endpoint}/{AZURITE_ACCOUNT};"
    )
    return "az://renders/x.zarr", {"connection_string": connection}


@pytest.mark.parametrize("kind", ["s3, dummy credentials", "s3, no credentials", "gcs", "azure"])
def test_a_dead_endpoint_fails_in_seconds_with_one_line(kind, tmp_path, capsys, monkeypatch):
    """Every command that takes a store, pointed at a closed port on 127.0.0.1: one line, exit 2,
    in under 5 s whatever the credentials (the clients' own retries took 22 s on S3 with dummy
    credentials, 33 s on GCS, 79 s on Azure). Each command gets its own dead port, so none is
    answered from another's probe."""
    monkeypatch.chdir(tmp_path)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    commands = {
        "render": ["render", "--checkpoint", "preset:tiny", "--size", "64", "--tile", "32", "--workers", "0",
                   "--no-exports", "--quiet", "--out"],
        "verify": ["verify"],
        "assemble": ["assemble", "--dzi", str(tmp_path / "x")],
        "view": ["view"],
        "view --cache": ["view", "--checkpoint", "preset:tiny", "--cache"],
    }  # fmt: skip
    for command, argv in commands.items():
        url, options = _dead_store(kind, f"http://127.0.0.1:{free_port()}")
        t0 = time.monotonic()
        rc = render.main([*argv, url, "--storage-options", json.dumps(options)])
        seconds = time.monotonic() - t0
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, (command, rc, err)
        assert err[0].startswith(f"error: cannot access {url!r}: the endpoint http://127.0.0.1:"), (command, err)
        assert "does not answer (Connection refused" in err[0], (command, err)
        assert seconds < 5.0, (command, seconds)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written (no cache folder, no export)


def test_a_live_but_slow_endpoint_is_not_cut_short(moto_s3):
    """The probe times the TCP handshake only: a store that takes longer to answer than the
    probe's whole budget still answers (here every response of the endpoint comes 1 s late)."""
    from renderer import fsio

    _bucket(moto_s3, "slow")
    s3fs.S3FileSystem(**_options(moto_s3)).pipe_file("slow/a.json", b"{}")
    relay = Outage(int(moto_s3.rsplit(":", 1)[1]), delay=1.0 + fsio.PROBE_BUDGET_S)
    fs, root = fsio.filesystem("s3://slow", {**_options(f"http://127.0.0.1:{relay.port}"), "skip_instance_cache": True})
    t0 = time.monotonic()
    assert fs.cat_file(f"{root}/a.json") == b"{}"
    assert time.monotonic() - t0 > fsio.PROBE_BUDGET_S


REQUEST_LINE = re.compile(rb"(?:GET|PUT|POST|HEAD|DELETE) /\S* HTTP/1\.1\r\n")


class Outage:
    """A TCP relay in front of the S3 endpoint that can go down and come back on the same
    port: the job sees its S3 endpoint restart (connections reset, then refused) while the
    data behind it survives (moto keeps objects in memory, so moto itself cannot restart)."""

    def __init__(self, target_port: int, delay: float = 0.0) -> None:
        self.target, self.port, self.delay = target_port, free_port(), delay
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.requests = 0  # HTTP requests relayed (request lines seen from clients)
        self.up()

    def up(self) -> None:
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", self.port))
        self.server.listen(64)
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def down(self) -> None:
        self.server.close()
        with self.lock:
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self.conns.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.conns += [client, upstream]
            for a, b, count in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(a, b, count), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket, count: bool) -> None:
        tail = b""
        try:
            while data := a.recv(65536):
                if not count and self.delay:  # a slow endpoint: each response chunk comes late
                    time.sleep(self.delay)
                if count:  # request lines, also when one is split across two reads
                    seen = tail + data
                    n = len(REQUEST_LINE.findall(seen)) - len(REQUEST_LINE.findall(tail))
                    tail = seen[-256:]
                    with self.lock:
                        self.requests += n
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_s3_endpoint_outage_mid_job(moto_s3, render_ray, render_reference):
    """The endpoint goes away for 3 s while tiles are being written: failed writes are
    retried (by s3fs, then by the pool with back-off) and the job completes with identical bytes."""
    _bucket(moto_s3, "flaky")
    relay = Outage(int(moto_s3.rsplit(":", 1)[1]))
    options = _options(f"http://127.0.0.1:{relay.port}")
    options["config_kwargs"] = {"retries": {"max_attempts": 2, "mode": "standard"}, "connect_timeout": 2}
    spec = tiny_job("s3://flaky/img.zarr", height=160, width=128, tile=16, storage_options=options, max_retries=8)
    events: list[str] = []

    def outage(summary, pool):
        if not events and summary["tiles_rendered"] >= 4:
            events.append("down")
            relay.down()
            threading.Timer(3.0, lambda: (relay.up(), events.append("up"))).start()

    t0 = time.monotonic()
    summary = run_job(spec, progress=False, on_progress=outage)
    assert events[0] == "down" and summary["status"] == "done", (events, summary)
    assert summary["tiles_rendered"] == summary["tiles_total"] == 80
    if "up" not in events:  # the job finished its in-flight work before the outage ended
        time.sleep(max(0.0, 3.5 - (time.monotonic() - t0)))
    np.testing.assert_array_equal(_level0(spec.out, _options(moto_s3)), render_reference(160, 128))
    print(json.dumps({"tasks_retried": summary["tasks_retried"], "seconds": summary["seconds"]}))


def test_object_store_default_shards_and_counted_requests(moto_s3, render_ray, render_reference, monkeypatch):
    """On an object store level 0 is sharded by default (here with the per-level object budget
    lowered to 16 so a small canvas shows it): one object and one marker per shard, and the run
    summary's requests equal the HTTP requests that reached the endpoint (counted by a relay)."""
    import jobs.plan

    monkeypatch.setattr(jobs.plan, "OBJECTS_PER_LEVEL", 16)
    _bucket(moto_s3, "scale")
    relay = Outage(int(moto_s3.rsplit(":", 1)[1]))
    options = {**_options(f"http://127.0.0.1:{relay.port}"), "max_concurrency": 1}
    # one worker: a pool of its own shape, so fresh worker processes with no requests of earlier
    # tests' jobs still in flight in them (a process's requests are counted as they happen)
    spec = tiny_job("s3://scale/img.zarr", height=256, width=256, tile=16, storage_options=options, batch=1, workers=1)
    before = relay.requests
    summary = run_job(spec, progress=False, log=lambda s: None)
    relayed = relay.requests - before
    assert summary["status"] == "done" and summary["tiles_total"] == 16  # 256 chunks of 16^2 -> 16 shards of 64^2
    fs = s3fs.S3FileSystem(**_options(moto_s3))
    level0 = [p for p in fs.find("scale/img.zarr/0") if not p.endswith("zarr.json")]
    markers = fs.ls("scale/img.zarr/tiles")
    assert len(level0) == 16 and len(markers) == 16, (level0, markers)
    store = open_store(spec.out, _options(moto_s3), mode="r")
    assert store.level(0).shards == (3, 64, 64) and store.meta["spec"]["shard"] == 4
    np.testing.assert_array_equal(_level0(spec.out, _options(moto_s3)), render_reference(256, 256))
    # every object there was written by this run (workers' counts came back), and every request is counted
    assert summary["objects_written"] >= len(fs.find("scale/img.zarr")), summary
    # every request counted: the relay may see one more (a connection botocore retries on its own)
    assert relayed - 2 <= summary["requests"] <= relayed, (summary["requests"], relayed)
