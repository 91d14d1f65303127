"""Nothing lost, ever: corrupt or deleted chunks are found and re-rendered, the viewer answers
a corrupt chunk with a clear 500, and broken (NaN) weights fail a tile instead of marking it done."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import mark_tile, serving, tiny_job
from PIL import Image

import creps
import render
from jobs import JobSpecError
from jobs.run import run_job
from jobs.spec import JobSpec
from jobs.verify import spec_of_store
from renderer.errors import RendererError
from renderer.store import open_store
from renderer.verify import verify_store
from viewer.tiles import StoreTiles, max_level, tile_bounds

SIDE, TILE = 128, 32  # 4 x 4 = 16 tiles


def _level0(url: str) -> np.ndarray:
    return np.asarray(zarr.open_group(url, mode="r")["0"][:])


def _chunk(out: str, i: int, j: int) -> Path:
    """The level-0 chunk file of tile r{i}_c{j} (Zarr v3 default chunk keys)."""
    return Path(out) / "0" / "c" / "0" / str(i) / str(j)


def _snapshot(root: str) -> dict[str, str]:
    """sha256 of every file under ``root``: to show that a check changed nothing."""
    base = Path(root)
    return {
        str(p.relative_to(base)): hashlib.sha256(p.read_bytes()).hexdigest() for p in base.rglob("*") if p.is_file()
    }


def _damage(out: str) -> None:
    """r1_c2: its chunk overwritten with random bytes; r3_c0: its chunk file deleted."""
    _chunk(out, 1, 2).write_bytes(np.random.default_rng(7).integers(0, 256, 300, dtype=np.uint8).tobytes())
    _chunk(out, 3, 0).unlink()


@pytest.fixture
def rendered(tmp_path, render_ray) -> str:
    """A finished 128^2 render of the tiny preset at tile 32 (16 tiles), on the embedded Ray."""
    spec = tiny_job(str(tmp_path / "img.zarr"), height=SIDE, width=SIDE, tile=TILE)
    summary = run_job(spec, progress=False)
    assert summary["status"] == "done" and summary["tiles_rendered"] == 16
    return spec.out


# ---------------------------------------------------------------- 1. verify + repair
def test_verify_finds_corrupt_and_deleted_chunks_and_repairs_them(rendered, render_reference, capsys):
    out = rendered
    report = verify_store(open_store(out, mode="r"))
    assert report.ok and report.checked == 16

    _damage(out)
    # a plain re-run trusts the markers: nothing to do (which is why verify exists)
    assert run_job(tiny_job(out, height=SIDE, width=SIDE, tile=TILE), progress=False)["tiles_skipped"] == 16

    report = verify_store(open_store(out, mode="r"), workers=2)
    assert report.checked == 16 and report.bad_ids == ["r1_c2", "r3_c0"]
    reasons = {b.id: b.reason for b in report.bad}
    assert "cannot be decoded" in reasons["r1_c2"] and "RuntimeError" in reasons["r1_c2"]
    assert "no data" in reasons["r3_c0"]
    assert report.bad[0].rows == (32, 64) and report.bad[0].cols == (64, 96)

    # --no-repair: exit 1, one line per bad tile and a total, and not one byte of the store changed
    before = _snapshot(out)
    capsys.readouterr()
    assert render.main(["verify", out, "--no-repair", "--quiet"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split(" ")[2] for ln in lines[:2]] == ["r1_c2", "r3_c0"], lines
    assert all(ln.startswith("bad tile ") for ln in lines[:2])
    assert lines[-1].startswith("verify: 16 tiles checked, 2 bad, 0 re-rendered, 2 bad left")
    assert len(lines) == 3
    assert _snapshot(out) == before

    # repair: exactly those two re-rendered, the store equals the single-process truth byte for byte
    assert render.main(["verify", out, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "verify: 16 tiles checked, 2 bad, 2 re-rendered, 0 bad left" in printed
    store = open_store(out, mode="r")
    assert store.meta["last_run"]["tiles_rendered"] == 2
    np.testing.assert_array_equal(_level0(out), render_reference(SIDE, SIDE))
    assert verify_store(store).ok
    assert render.main(["verify", out, "--quiet"]) == 0  # clean now: nothing to do
    assert "16 tiles checked, 0 bad" in capsys.readouterr().out


def test_repair_spec_is_the_saved_job_with_this_commands_options(tmp_path):
    """Saved storage options may be stale (or secret): the command's own win, as do URL, workers, address."""
    url = str(tmp_path / "moved.zarr")
    store = open_store(url, mode="w")
    saved = JobSpec(checkpoint="preset:tiny", out="old/place.zarr", storage_options={"key": "old"}, workers=3)
    store.update_meta(spec=saved.to_dict())
    spec = spec_of_store(store, url, {"key": "new"}, workers=1, address="127.0.0.1:6379")
    assert (spec.out, spec.storage_options, spec.workers, spec.address) == (url, {"key": "new"}, 1, "127.0.0.1:6379")
    assert spec.identity() == saved.identity() and spec.checkpoint == "preset:tiny"
    kept = spec_of_store(store, url, None)
    assert (kept.storage_options, kept.workers, kept.address) == ({"key": "old"}, 3, None)
    with pytest.raises(JobSpecError, match="not made by a render job"):
        spec_of_store(open_store(str(tmp_path / "bare.zarr"), mode="w"), "bare", None)


def test_render_verify_checks_and_repairs_after_the_render(rendered, render_reference, capsys):
    out = rendered
    # r2_c1's chunk replaced by another tile's valid chunk: decodes fine, crc32 differs
    _chunk(out, 2, 1).write_bytes(_chunk(out, 0, 0).read_bytes())
    argv = ["render", "--checkpoint", "preset:tiny", "--size", str(SIDE), "--tile", str(TILE), "--out", out]
    argv += ["--workers", "2", "--threads-per-worker", "1", "--batch", "1", "--no-exports", "--quiet", "--verify"]
    capsys.readouterr()
    assert render.main(argv) == 0
    printed = capsys.readouterr().out
    assert "bad tile r2_c1 (rows 64:96, cols 32:64): crc32 mismatch" in printed
    line = next(ln for ln in printed.splitlines() if ln.startswith("rendered "))
    assert "(16 already done)" in line and line.endswith("verified 16 tiles: 1 bad, re-rendered"), line
    summary = json.loads(next(ln for ln in printed.splitlines() if ln.startswith("summary "))[len("summary ") :])
    assert summary["verify"]["rerendered"] == ["r2_c1"] and summary["verify"]["remaining"] == []
    np.testing.assert_array_equal(_level0(out), render_reference(SIDE, SIDE))
    # clean store: said so in the same line
    assert render.main(argv) == 0
    assert "verified 16 tiles: all good" in capsys.readouterr().out


def test_verify_store_unit(tmp_path):
    """Malformed and unreadable markers are bad too; at most `workers` tiles are read at once."""
    url = str(tmp_path / "u.zarr")
    store = open_store(url, mode="w")
    store.create_level(0, 64, 96, 32)
    img = np.random.default_rng(1).integers(0, 256, (3, 64, 96), dtype=np.uint8)
    store.write_region(0, 0, 0, img)
    for i in range(2):
        for j in range(3):
            tile = img[:, i * 32 : i * 32 + 32, j * 32 : j * 32 + 32]
            record = {"id": f"r{i}_c{j}", "rows": [i * 32, i * 32 + 32], "cols": [j * 32, j * 32 + 32]}
            if (i, j) != (1, 2):
                mark_tile(store, f"r{i}_c{j}", {**record, "crc32": zlib.crc32(tile.tobytes())})
    mark_tile(store, "r0_c1", {"id": "r0_c1", "rows": [0, 32]})  # its marker rewritten: no cols, no crc32
    (tmp_path / "u.zarr" / "tiles" / "r1_c2.json").write_text("{not json")  # a per-tile marker of an older store

    active, peak = 0, 0
    lock = threading.Lock()
    read = store.read_region

    def counting_read(*a):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        try:
            return read(*a)
        finally:
            with lock:
                active -= 1

    store.read_region = counting_read
    seen: list[str] = []
    report = verify_store(store, workers=2, on_tile=lambda tile_id, bad: seen.append(tile_id))
    assert report.checked == 6 and sorted(seen) == sorted(f"r{i}_c{j}" for i in range(2) for j in range(3))
    assert report.bad_ids == ["r0_c1", "r1_c2"]
    assert "malformed" in report.bad[0].reason and "unreadable" in report.bad[1].reason
    assert 1 <= peak <= 2
    assert verify_store(store, ids=["r0_c0", "r1_c1"]).checked == 2


@pytest.mark.parametrize(
    "argv,message",
    [
        (["MISSING"], "no image store"),
        (["STORE", "--storage-options", "{bad"], "not valid JSON"),
        (["STORE", "--threads", "0"], "--threads"),
    ],
)
def test_verify_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    url = str(tmp_path / "s.zarr")
    open_store(url, mode="w").create_level(0, 32, 32, 16)
    args = [a.replace("STORE", url).replace("MISSING", str(tmp_path / "nope.zarr")) for a in argv]
    assert render.main(["verify", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


# ---------------------------------------------------------------- 2. the viewer over a corrupt chunk
def _get(addr, path):
    conn = http.client.HTTPConnection(*addr, timeout=30)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def test_viewer_answers_a_corrupt_chunk_with_500_and_keepsserving(tmp_path, capsys):
    h, w, chunk = 300, 400, 128
    url = str(tmp_path / "v.zarr")
    store = open_store(url, mode="w")
    store.create_level(0, h, w, chunk)
    img = np.random.default_rng(2).integers(0, 256, (3, h, w), dtype=np.uint8)
    store.write_region(0, 0, 0, img)
    _chunk(url, 0, 0).write_bytes(b"\x00garbage" * 40)
    top = max_level(w, h)
    with serving(StoreTiles(url, fmt="png")) as server:
        addr = server.server_address[:2]
        capsys.readouterr()
        for _ in range(2):  # not cached, not fatal: the same answer again
            status, hdr, body = _get(addr, f"/image_files/{top}/0_0.png")
            assert status == 500 and hdr["Content-Type"].startswith("text/plain")
            text = body.decode()
            assert text.startswith("cannot read tile") and "Zstd" in text and "render.py verify" in text
            assert len(text) < 500
        log = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(log) == 2 and all(" 500: cannot read tile" in ln for ln in log), log  # one line per request
        # a tile away from the bad chunk still serves its pixels; so do page and info
        status, _, body = _get(addr, f"/image_files/{top}/1_1.png")
        assert status == 200
        got = np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).transpose(2, 0, 1)
        y0, y1, x0, x1 = tile_bounds(w, h, top, 1, 1)
        np.testing.assert_array_equal(got, img[:, y0:y1, x0:x1])
        assert _get(addr, "/api/info")[0] == 200
        # a coarse tile that needs the bad chunk: 500 as well, the server still up
        assert _get(addr, "/image_files/0/0_0.png")[0] == 500
        assert _get(addr, "/")[0] == 200


# ---------------------------------------------------------------- 3. NaN weights
def test_nan_weights_fail_the_tile_and_leave_no_marker(tmp_path, render_ray):
    G = creps.load("preset:tiny")
    with torch.no_grad():
        G.state_dict()["synthesis.decoder_img.weight"].fill_(float("nan"))
    ckpt = creps.save(G, tmp_path / "nan.safetensors")
    spec = tiny_job(str(tmp_path / "nan.zarr"), checkpoint=str(ckpt), height=64, width=64, tile=TILE, max_retries=1)
    with pytest.raises(RendererError, match=r"tile r\d_c\d: non-finite output \(NaN/inf\): the weights are broken"):
        run_job(spec, progress=False)
    store = open_store(spec.out, mode="r")
    assert store.done_tiles() == set() and not list(store.tile_record_groups())
    assert store.meta["status"] == "failed" and "non-finite output" in store.meta["error"]
