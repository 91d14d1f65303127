"""A failed assemble never destroys good exports (renderer.exports staging), and every export says its source.

Faults are real where they can be: a chunk file overwritten with random bytes,
a process killed with SIGKILL, a real S3 endpoint (moto_server); a full disk is
injected into the TIFF writer.
"""

from __future__ import annotations

import calendar
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import tifffile
from conftest import REPO, mark_tile, render_cli_env

import render
from jobs.assemble import assemble
from renderer.dzi import max_level, tile_grid
from renderer.errors import RendererError
from renderer.exports import write_dzi
from renderer.pyramid import reference_pyramid
from renderer.store import open_store

H, W, T = 300, 420, 64
TMP = ".creps-tmp-"


def make_store(url: str, height: int = H, width: int = W, chunk: int = T, options: dict | None = None, seed: int = 0):
    img = np.random.default_rng(seed).integers(0, 256, (3, height, width), dtype=np.uint8)
    store = open_store(url, options, mode="w")
    store.create_level(0, height, width, chunk=chunk)
    store.write_region(0, 0, 0, img)
    store.update_meta(identity={"seed": seed, "checkpoint_sha256": "ab" * 32}, checkpoint_sha256="ab" * 32)
    return store, img


def snapshot(folder) -> dict[str, str]:
    """sha256 of every file under ``folder`` (the store excluded), by relative path."""
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.endswith(".zarr")]
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def corrupt(store_dir, key: str = "0/c/0/1/2", seed: int = 1) -> None:
    path = os.path.join(str(store_dir), *key.split("/"))
    assert os.path.isfile(path), path
    with open(path, "wb") as f:
        f.write(np.random.default_rng(seed).integers(0, 256, 700, dtype=np.uint8).tobytes())


def cli(*args: str) -> list[str]:
    return ["assemble", *args]


def messages(stderr: str) -> list[str]:
    """What stays on a terminal: the last carriage-return segment of each line (progress bars erase themselves)."""
    return [m for m in (line.split("\r")[-1].strip() for line in stderr.split("\n")) if m]


def assert_readable(folder, img: np.ndarray) -> None:
    """The exports in ``folder`` are whole: TIFF levels exact (zstd), pyvips opens it, tiles and zip decode."""
    import pyvips
    from PIL import Image

    with tifffile.TiffFile(os.path.join(folder, "o.tif")) as tif:
        for lv, ref in zip(tif.series[0].levels, reference_pyramid(img, T), strict=True):
            np.testing.assert_array_equal(lv.asarray(), ref.transpose(1, 2, 0))
    v = pyvips.Image.new_from_file(os.path.join(folder, "o.tif"))
    assert (v.width, v.height) == (W, H) and v.get("n-subifds") == len(reference_pyramid(img, T)) - 1
    assert "<Image" in open(os.path.join(folder, "o.dzi")).read()
    top = max(int(d) for d in os.listdir(os.path.join(folder, "o_files")) if d.isdigit())
    with Image.open(os.path.join(folder, "o_files", str(top), "0_0.jpg")) as tile:
        tile.load()
    with zipfile.ZipFile(os.path.join(folder, "o.szi")) as zf:
        assert zf.testzip() is None and "o/o.dzi" in zf.namelist()


def no_debris(folder) -> None:
    left = [n for n in os.listdir(folder) if TMP in n]
    assert not left, left


def good_assemble(store, folder, engine: str = "zarr") -> None:
    rc = render.main(
        cli(
            store.url,
            "--tiff",
            f"{folder}/o.tif",
            "--compression",
            "zstd",
            "--dzi",
            f"{folder}/o",
            "--dzi-engine",
            engine,
        )
    )
    assert rc == 0


# ---------------------------------------------------------------- local
@pytest.mark.parametrize(
    "case",
    ["level0", "level1", "stale-rebuild", "vips"],
    ids=["level0-chunk", "level1-chunk", "level0-during-pyramid-rebuild", "vips-engine"],
)
def test_corrupt_chunk_fails_in_one_line_and_keeps_the_old_exports(tmp_path, capsys, case):
    out = tmp_path / "out"
    store, img = make_store(str(tmp_path / "s.zarr"))
    engine = "vips" if case == "vips" else "zarr"
    good_assemble(store, out, engine)
    capsys.readouterr()
    before = snapshot(out)
    assert {"o.tif", "o.dzi", "o.szi", "o.tif.source.json", "o.dzi.source.json", "o.szi.source.json"} <= set(before)
    if case == "level1":
        corrupt(tmp_path / "s.zarr", "1/c/0/0/1")
    else:
        corrupt(tmp_path / "s.zarr", "0/c/0/1/2")
    if case == "stale-rebuild":
        store.invalidate_pyramid("test")  # the next assemble rebuilds the pyramid in its pass over level 0

    rc = render.main(
        cli(store.url, "--tiff", f"{out}/o.tif", "--compression", "zstd", "--dzi", f"{out}/o", "--dzi-engine", engine)
    )
    err = capsys.readouterr().err
    assert rc == 1
    lines = messages(err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    if case == "level1":
        assert "level 1 chunk 1/c/0/0/1" in err and "rows 0:64, cols 64:128" in err
    else:
        assert "level 0 chunk 0/c/0/1/2" in err and "rows 64:128, cols 128:192" in err
    assert "unreadable" in err and "Traceback" not in err
    assert snapshot(out) == before  # byte-identical: TIFF, .dzi, every tile, .szi, sidecars
    assert_readable(out, img)
    no_debris(out)


def test_failing_export_stops_the_other_and_publishes_nothing(tmp_path, monkeypatch):
    """A full disk in the TIFF writer: the DeepZoom cutter stops too (no hang), nothing is replaced."""
    import renderer.exports as exports

    out = tmp_path / "out"
    store, img = make_store(str(tmp_path / "s.zarr"))
    good_assemble(store, out)
    before = snapshot(out)
    real = exports.write_levels

    def disk_full(path, levels, *a, **kw):
        def first_level_then_fail():
            for k, item in enumerate(levels):
                if k == 1:
                    raise OSError(28, "No space left on device")
                yield item

        real(path, first_level_then_fail(), *a, **kw)

    monkeypatch.setattr(exports, "write_levels", disk_full)
    t0 = time.monotonic()
    with pytest.raises(RendererError, match=r"cannot write the TIFF .*No space left on device"):
        assemble(store.url, tiff=f"{out}/o.tif", dzi=f"{out}/o", compression="zstd")
    assert time.monotonic() - t0 < 60
    assert snapshot(out) == before
    no_debris(out)
    monkeypatch.setattr(exports, "write_levels", real)
    assert_readable(out, img)


def test_debris_of_a_killed_run_is_cleaned_and_an_old_folder_put_back(tmp_path, capsys):
    """What kill -9 leaves (temporary names; old _files moved aside, new not yet in) is repaired by the next run."""
    out = tmp_path / "out"
    store, img = make_store(str(tmp_path / "s.zarr"))
    good_assemble(store, out)
    before = snapshot(out)
    (out / f".o.tif{TMP}1-dead").write_bytes(b"II*\x00half a tiff")
    (out / f".o{TMP}1-dead_files" / "9").mkdir(parents=True)
    (out / f".o{TMP}1-dead_files" / "9" / "0_0.jpg").write_bytes(b"\xff\xd8")
    (out / f".o{TMP}1-dead.dzi").write_text("<Image")
    os.rename(out / "o_files", out / f".o{TMP}1-dead.old_files")  # killed mid-swap
    corrupt(tmp_path / "s.zarr")
    rc = render.main(cli(store.url, "--tiff", f"{out}/o.tif", "--compression", "zstd", "--dzi", f"{out}/o"))
    assert rc == 1 and len(messages(capsys.readouterr().err)) == 1
    assert snapshot(out) == before  # the old tiles are back where viewers look for them
    no_debris(out)
    assert_readable(out, img)


def test_kill_9_during_an_assemble_keeps_the_old_exports(tmp_path):
    out = tmp_path / "out"
    h, w = 2048, 3072
    store, img = make_store(str(tmp_path / "s.zarr"), h, w, 256)
    args = [store.url, "--tiff", f"{out}/o.tif", "--compression", "zstd", "--dzi", f"{out}/o"]
    assert render.main(cli(*args)) == 0
    before = snapshot(out)
    store.invalidate_pyramid("test")  # more work for the killed run: pyramid and exports
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "render.py"), *cli(*args)],
        env=render_cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        t_end = time.monotonic() + 120
        while not any(TMP in n and n.endswith("_files") for n in os.listdir(out)):
            assert proc.poll() is None, "the assemble finished before it could be killed"
            assert time.monotonic() < t_end
            time.sleep(0.005)
        time.sleep(0.05)  # some tiles written under the temporary name
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any(TMP in n for n in os.listdir(out))  # kill -9 leaves debris ...
    assert {k: v for k, v in snapshot(out).items() if TMP not in k} == before  # ... next to the old exports
    assert render.main(cli(*args)) == 0  # ... the next run removes it and publishes whole exports
    no_debris(out)
    with tifffile.TiffFile(out / "o.tif") as tif:
        np.testing.assert_array_equal(tif.series[0].levels[0].asarray(), img.transpose(1, 2, 0))
    with zipfile.ZipFile(out / "o.szi") as zf:
        assert zf.testzip() is None


def test_sidecars_say_what_each_export_was_built_from(tmp_path):
    out = tmp_path / "out"
    store, _ = make_store(str(tmp_path / "s.zarr"))
    store.update_meta(tiles_total=35)  # 5 x 7 tiles of 64
    for i in range(5):
        for j in range(7):
            mark_tile(store, f"r{i}_c{j}")
    t0 = time.time()
    assemble(store.url, tiff=f"{out}/o.tif", dzi=f"{out}/o", compression="zstd", quality=80)
    for name, kind in (("o.tif", "tiff"), ("o.dzi", "dzi"), ("o.szi", "szi")):
        rec = json.loads((out / f"{name}.source.json").read_text())
        assert rec["export"] == kind and rec["url"] == f"{out}/{name}"
        assert rec["store"] == store.url and rec["checkpoint_sha256"] == "ab" * 32
        assert rec["identity"] == {"seed": 0, "checkpoint_sha256": "ab" * 32}
        assert (rec["tiles_done"], rec["tiles_total"], rec["partial"]) == (35, 35, False)
        assert rec["pyramid"]["levels"] == len(reference_pyramid(np.zeros((3, H, W), np.uint8), T))
        assert rec["pyramid"]["stale"] is False
        assert rec["software"].startswith("creps-gigapixel")
        created = calendar.timegm(time.strptime(rec["created"], "%Y-%m-%dT%H:%M:%SZ"))
        assert abs(created - t0) < 120
        if kind != "dzi":
            assert rec["bytes"] == (out / name).stat().st_size
    assert json.loads((out / "o.tif.source.json").read_text())["settings"]["compression"] == "zstd"
    assert json.loads((out / "o.dzi.source.json").read_text())["settings"]["quality"] == 80


# ---------------------------------------------------------------- S3 (moto_server)
def _options(endpoint: str) -> dict:
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }


def _s3(endpoint: str, bucket: str):
    s3fs = pytest.importorskip("s3fs")
    # no region for the bucket: moto refuses a us-east-1 LocationConstraint (S3 does too)
    s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint}).mkdir(bucket)
    return s3fs.S3FileSystem(**_options(endpoint))


def _s3_snapshot(fs, bucket: str) -> dict[str, str]:
    fs.invalidate_cache()
    return {k: hashlib.sha256(fs.cat_file(k)).hexdigest() for k in fs.find(bucket) if "/s.zarr/" not in k}


def test_s3_corrupt_chunk_keeps_the_old_dzi_and_tiff(moto_s3, capsys):
    from PIL import Image

    fs = _s3(moto_s3, "atomic")
    opts = _options(moto_s3)
    store, img = make_store("s3://atomic/s.zarr", options=opts)
    args = ["--storage-options", json.dumps(opts), "--tiff", "s3://atomic/o.tif", "--compression", "zstd"]
    args += ["--dzi", "s3://atomic/out"]
    assert render.main(cli(store.url, *args)) == 0
    capsys.readouterr()
    before = _s3_snapshot(fs, "atomic")
    assert {"atomic/out.dzi", "atomic/out.szi", "atomic/o.tif", "atomic/out.dzi.source.json"} <= set(before)
    assert any(k.startswith("atomic/out_files/") for k in before)

    fs.pipe_file("atomic/s.zarr/0/c/0/1/2", np.random.default_rng(2).integers(0, 256, 500, np.uint8).tobytes())
    rc = render.main(cli(store.url, *args))
    err = capsys.readouterr().err
    assert rc == 1 and len(messages(err)) == 1 and "level 0 chunk 0/c/0/1/2" in err, err
    after = _s3_snapshot(fs, "atomic")
    assert after == before
    assert not [k for k in after if TMP in k]
    with fs.open("atomic/o.tif", "rb") as f, tifffile.TiffFile(f) as tif:
        np.testing.assert_array_equal(tif.series[0].levels[0].asarray(), img.transpose(1, 2, 0))
    Image.open(io.BytesIO(fs.cat_file("atomic/out_files/9/0_0.jpg"))).load()
    with zipfile.ZipFile(io.BytesIO(fs.cat_file("atomic/out.szi"))) as zf:
        assert zf.testzip() is None


def _dzi_keys(prefix: str, width: int, height: int, tile: int) -> set[str]:
    """Every tile object of a DeepZoom pyramid of ``tile`` px tiles under ``prefix``."""
    return {
        f"{prefix}/{level}/{c}_{r}.jpg"
        for level in range(max_level(width, height) + 1)
        for c in range(tile_grid(width, height, level, tile)[0])
        for r in range(tile_grid(width, height, level, tile)[1])
    }


def test_s3_republish_replaces_tiles_and_removes_old_ones(moto_s3):
    fs = _s3(moto_s3, "republish")
    opts = _options(moto_s3)
    store, _ = make_store("s3://republish/s.zarr", options=opts)
    write_dzi(store, "s3://republish/out", storage_options=opts, szi=False)
    first = {k for k in _s3_snapshot(fs, "republish") if k.startswith("republish/out_files/")}
    # debris of a killed run next to the target is removed by the next one
    fs.pipe_file(f"republish/.out{TMP}1-dead_files/9/0_0.jpg", b"x")
    write_dzi(store, "s3://republish/out", storage_options=opts, szi=False, tile_size=126)
    keys = _s3_snapshot(fs, "republish")
    second = {k for k in keys if k.startswith("republish/out_files/")}
    assert first == _dzi_keys("republish/out_files", W, H, 254) and not [k for k in keys if TMP in k]
    assert second == _dzi_keys("republish/out_files", W, H, 126)  # at 126 px the top level has 4 x 3 tiles
    assert "republish/out_files/9/3_2.jpg" in second
    assert 'TileSize="126"' in fs.cat_file("republish/out.dzi").decode()
    write_dzi(store, "s3://republish/out", storage_options=opts, szi=False)  # back to 254 px tiles
    third = {k for k in _s3_snapshot(fs, "republish") if k.startswith("republish/out_files/")}
    assert third == first  # the 126 px tiles the new pyramid does not have are gone
    rec = json.loads(fs.cat_file("republish/out.dzi.source.json"))
    assert rec["store"] == store.url and rec["settings"]["tile_size"] == 254
