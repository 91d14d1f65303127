"""`render.py import IMAGE URL`: pictures into image stores, read back by real readers.

A small PNG round-trips exactly and resumes; verify checks its crc32s and says
"re-import"; assemble, view and video work on the store; greyscale, alpha and
16-bit inputs become 8-bit RGB; bad input is one line, exit 2, nothing
written; an import to a real S3 endpoint (moto); and a generated 20000 x 15000
tiled TIFF imports in bounded memory (the child process's peak RSS) and comes
back pixel-exact through `render.py assemble --tiff`.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import pyvips
import tifffile
import zarr
from conftest import REPO, render_cli_env, serving
from PIL import Image

import render
from renderer.dzi import max_level, tile_bounds
from renderer.lease import StoreBusyError
from renderer.store import open_store, store_lease
from renderer.verify import verify_store
from viewer.server import OSD_DIR, open_source

GB = 1 << 30


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8 noise: any misplaced, dropped or converted pixel shows."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(arr: np.ndarray, path: Path, interpretation: str = "srgb", **kw) -> Path:
    pyvips.Image.new_from_array(arr, interpretation=interpretation).write_to_file(str(path), **kw)
    return path


def _level0(url: str, options: dict | None = None) -> np.ndarray:
    """Level 0 of the store as (h, w, 3), read through our store API."""
    store = open_store(url, options, mode="r")
    h, w = store.shape
    return store.read_region(0, 0, h, 0, w).transpose(1, 2, 0)


def _import(*argv: str) -> int:
    return render.main(["import", *argv, "--quiet"])


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file of a store but its lease records (written by whoever takes the store)."""
    files = (p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] != "lease")
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# ---------------------------------------------------------------- a small PNG
def test_png_round_trip_record_resume_and_verify(tmp_path, capsys):
    src = _noise(200, 300)
    png = _save(src, tmp_path / "pic.png")
    url = str(tmp_path / "pic.zarr")
    assert _import(str(png), url, "--tile", "64") == 0
    out = capsys.readouterr().out
    assert "imported 20 of 20 tiles (0 already done) of 300 x 200 px" in out
    summary = json.loads(next(line for line in out.splitlines() if line.startswith("summary "))[8:])
    assert summary["status"] == "done" and summary["pixels"] == 300 * 200
    np.testing.assert_array_equal(_level0(url), src)

    store = open_store(url, mode="r")
    meta = store.meta
    record = meta["import"]
    assert record["source"] == "pic.png" and record["path"] == str(png.resolve())
    assert record["bytes"] == png.stat().st_size
    assert record["sha256"] == hashlib.sha256(png.read_bytes()).hexdigest()
    assert record["loader"] == "pngload" and record["conversions"] == []
    assert (record["tile"], record["shard"]) == (64, 1)
    assert meta["checkpoint"] is None and "spec" not in meta and "identity" not in meta
    assert (meta["tiles_total"], meta["tiles_done"], meta["status"]) == (20, 20, "done")
    assert store.level(0).chunks == (3, 64, 64) and not store.has_line_arrays()
    report = verify_store(store)
    assert report.ok and report.checked == 20

    # a crash after strip 2 was written but before its marker: the re-run imports that strip only
    markers = sorted(p.name for p in (tmp_path / "pic.zarr" / "tiles").iterdir())
    assert markers == ["b0_5.json", "b10_15.json", "b15_20.json", "b5_10.json"]
    (tmp_path / "pic.zarr" / "tiles" / "b10_15.json").unlink()
    for chunk in (tmp_path / "pic.zarr" / "0" / "c" / "0" / "2").iterdir():
        chunk.write_bytes(b"\0" * 7)  # half-written chunks
    assert _import(str(png), url, "--tile", "64") == 0
    assert "imported 5 of 20 tiles (15 already done)" in capsys.readouterr().out
    np.testing.assert_array_equal(_level0(url), src)
    assert _import(str(png), url, "--tile", "64") == 0
    assert "imported 0 of 20 tiles (20 already done)" in capsys.readouterr().out

    # verify finds a damaged and a lost chunk; with no checkpoint it says to re-import, exit 1
    (tmp_path / "pic.zarr" / "0" / "c" / "0" / "1" / "2").write_bytes(b"garbage")
    (tmp_path / "pic.zarr" / "0" / "c" / "0" / "3" / "0").unlink()
    assert render.main(["verify", url, "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert "bad tile r1_c2" in out and "bad tile r3_c0" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: 2 bad tiles in ")
    assert f"re-import it: render.py import {png.resolve()} {url} --tile 64 --overwrite" in lines[0]
    assert _import(str(png.resolve()), url, "--tile", "64", "--overwrite") == 0
    capsys.readouterr()
    np.testing.assert_array_equal(_level0(url), src)
    assert render.main(["verify", url, "--quiet"]) == 0


def test_imported_store_assembles_views_and_makes_a_video(tmp_path, capsys):
    src = _noise(300, 500, seed=1)
    url = str(tmp_path / "img.zarr")
    assert _import(str(_save(src, tmp_path / "img.png")), url, "--tile", "128") == 0
    tif, dzi = tmp_path / "img.tif", tmp_path / "img"
    assert render.main(["assemble", url, "--tiff", str(tif), "--compression", "zstd", "--dzi", str(dzi)]) == 0
    np.testing.assert_array_equal(tifffile.imread(tif), src)
    assert 'Width="500"' in (tmp_path / "img.dzi").read_text()
    capsys.readouterr()

    with serving(open_source(url, fmt="png")) as server:
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
        conn.request("GET", "/api/info")
        info = json.loads(conn.getresponse().read())
        assert (info["width"], info["height"]) == (500, 300)
        top = max_level(500, 300)
        conn.request("GET", f"/image_files/{top}/1_0.png")
        resp = conn.getresponse()
        assert resp.status == 200
        y0, y1, x0, x1 = tile_bounds(500, 300, top, 1, 0)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(resp.read()))), src[y0:y1, x0:x1])
        conn.request("GET", "/osd/images/zoomin_rest.png")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == (OSD_DIR / "images" / "zoomin_rest.png").read_bytes()

    av = pytest.importorskip("av")
    mp4 = tmp_path / "zoom.mp4"
    argv = ["video", url, "--zoom", "0.5,0.5,2", "--size", "64x48", "--frames", "4", "--out", str(mp4), "--quiet"]
    assert render.main(argv) == 0
    with av.open(str(mp4)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 4 and frames[0].shape == (48, 64, 3)
    # the first frame shows the whole picture: its mean colour is the picture's (x264 is lossy)
    assert np.abs(frames[0].mean(axis=(0, 1)) - src.mean(axis=(0, 1))).max() < 8


def test_greyscale_alpha_and_16_bit_become_8_bit_rgb(tmp_path, capsys):
    rng = np.random.default_rng(2)
    grey16 = rng.integers(0, 65536, (70, 90), dtype=np.uint16)
    rgba = rng.integers(0, 256, (70, 90, 4), dtype=np.uint8)
    grey_alpha = rng.integers(0, 256, (70, 90, 2), dtype=np.uint8)
    cases = {
        "grey16.png": (_save(grey16, tmp_path / "grey16.png", "grey16"), ["ushort samples scaled to 8 bits"]),
        "rgba.png": (_save(rgba, tmp_path / "rgba.png"), ["alpha flattened onto black"]),
        "ga.png": (_save(grey_alpha, tmp_path / "ga.png", "b-w"), ["alpha flattened onto black", "greyscale -> RGB"]),
    }
    got = {}
    for name, (path, conversions) in cases.items():
        url = str(tmp_path / f"{name}.zarr")
        assert _import(str(path), url, "--tile", "32") == 0
        assert open_store(url, mode="r").meta["import"]["conversions"][: len(conversions)] == conversions
        got[name] = _level0(url).astype(int)
    capsys.readouterr()
    np.testing.assert_array_equal(got["grey16.png"], np.repeat((grey16 >> 8)[..., None], 3, axis=2))
    over_black = rgba[..., :3] * (rgba[..., 3:] / 255.0)
    assert np.abs(got["rgba.png"] - over_black).max() <= 1
    grey = grey_alpha[..., 0] * (grey_alpha[..., 1] / 255.0)
    assert np.abs(got["ga.png"] - np.repeat(grey[..., None], 3, axis=2)).max() <= 1
    assert all(np.array_equal(got["ga.png"][..., 0], got["ga.png"][..., c]) for c in (1, 2))


# ---------------------------------------------------------------- bad input
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _zero_pixel_png() -> bytes:
    """A well-formed PNG header that says 0 x 1 pixels."""
    ihdr = struct.pack(">IIBBBBB", 0, 1, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0")
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _refused(capsys, *argv: str) -> str:
    """Run an import that must be refused: exit 2 and one `error:` line; that line."""
    assert _import(*argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    (tmp_path / "text.png").write_text("not a picture")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "zero.png").write_bytes(_zero_pixel_png())
    (tmp_path / "folder.png").mkdir()
    # a JPEG whose first rows decode and whose end is cut off: found part-way, the new store goes again
    jpeg = _save(_noise(1000, 200, seed=3), tmp_path / "cut.jpg", Q=95)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size * 6 // 10])
    url = tmp_path / "out.zarr"
    expect = {
        "missing.png": "missing.png: no such file",
        "text.png": "is not a picture libvips can read",
        "empty.jpg": "is not a picture libvips can read",
        "zero.png": "zero.png",
        "folder.png": "is a folder, not a picture file",
        "cut.jpg": "cannot be decoded at rows",
    }
    for name, words in expect.items():
        assert words in _refused(capsys, str(tmp_path / name), str(url), "--tile", "64")
        assert not url.exists(), name
    good = _save(_noise(100, 120, seed=4), tmp_path / "good.png")
    assert "--tile must be a positive multiple of 16" in _refused(capsys, str(good), str(url), "--tile", "100")
    assert "storage options are not valid JSON" in _refused(capsys, str(good), str(url), "--storage-options", "{")
    assert not url.exists()

    # a folder that is not a store, a store of another picture: refused, left as they were
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    assert "is not an image store" in _refused(capsys, str(good), str(tmp_path / "notes"))
    assert _import(str(good), str(url), "--tile", "64") == 0
    before = _snapshot(url)
    other = _save(_noise(100, 120, seed=5), tmp_path / "other.png")
    assert "holds an import of another file (good.png" in _refused(capsys, str(other), str(url), "--tile", "64")
    assert "holds this picture in tiles of 64" in _refused(capsys, str(good), str(url), "--tile", "32")
    assert _snapshot(url) == before
    # a second writer is refused while the first holds the store
    lease = store_lease(str(url))
    lease.acquire("another writer")
    try:
        assert "is being written by another process" in _refused(
            capsys, str(other), str(url), "--tile", "64", "--overwrite"
        )
        assert _snapshot(url) == before
        with pytest.raises(StoreBusyError):
            store_lease(str(url)).acquire("a third")
    finally:
        lease.release()
    assert _import(str(other), str(url), "--tile", "64", "--overwrite") == 0
    np.testing.assert_array_equal(_level0(str(url)), np.asarray(Image.open(other).convert("RGB")))


# ---------------------------------------------------------------- object store
def test_import_to_s3_sharded(moto_s3, tmp_path, capsys):
    s3fs = pytest.importorskip("s3fs")
    s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": moto_s3}).mkdir("imports")
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": moto_s3}}
    src = _noise(100, 150, seed=6)
    url = "s3://imports/pic.zarr"
    png = _save(src, tmp_path / "pic.png")
    assert _import(str(png), url, "--tile", "32", "--shard", "2", "--storage-options", json.dumps(options)) == 0
    assert "imported 6 of 6 tiles" in capsys.readouterr().out  # shards of 64 px: 2 rows x 3 columns
    np.testing.assert_array_equal(_level0(url, options), src)
    store = open_store(url, options, mode="r")
    assert store.level(0).shards == (3, 64, 64) and store.level(0).chunks == (3, 32, 32)
    assert store.meta["import"]["shard"] == 2 and store.meta["status"] == "done"
    assert render.main(["verify", url, "--storage-options", json.dumps(options), "--quiet"]) == 0
    assert "6 tiles checked, 0 bad" in capsys.readouterr().out
    # auto shard on an object store, resumed as it is: nothing to do the second time
    again = [str(png), url, "--tile", "32", "--storage-options", json.dumps(options)]
    assert _import(*again) == 0
    assert "imported 0 of 6 tiles (6 already done)" in capsys.readouterr().out


# ---------------------------------------------------------------- a 20000 x 15000 TIFF
W, H, T = 20000, 15000, 256


def _pattern(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Pixels (y, x) of the big test picture: no two places alike at any tile offset."""
    y = np.arange(r0, r1, dtype=np.uint32)[:, None]
    x = np.arange(c0, c1, dtype=np.uint32)[None, :]
    out = np.empty((r1 - r0, c1 - c0, 3), np.uint8)
    out[..., 0] = (x + 3 * y) % 251
    out[..., 1] = ((x >> 7) + (y >> 7)) & 255
    out[..., 2] = ((x >> 5) ^ (y >> 6)) & 255
    return out


def _write_big_tiff(path: Path) -> None:
    """A tiled, deflate-compressed RGB TIFF written tile by tile (never whole in memory)."""

    def tiles():
        for r0 in range(0, H, T):
            strip = _pattern(r0, min(r0 + T, H), 0, W)
            for c0 in range(0, W, T):
                tile = np.zeros((T, T, 3), np.uint8)
                part = strip[:, c0 : c0 + T]
                tile[: part.shape[0], : part.shape[1]] = part
                yield tile

    tifffile.imwrite(
        path,
        tiles(),
        shape=(H, W, 3),
        dtype=np.uint8,
        tile=(T, T),
        photometric="rgb",
        compression="adobe_deflate",
        compressionargs={"level": 1},
        bigtiff=True,
    )


# the import in a fresh child; its peak RSS (the wrapper's only child) on the last line
RSS_WRAPPER = (
    "import resource, subprocess, sys; "
    "rc = subprocess.call([sys.executable, *sys.argv[1:]]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(rc)"
)


def test_big_tiff_imports_in_bounded_memory_and_round_trips_exactly(tmp_path):
    source = tmp_path / "big.tif"
    _write_big_tiff(source)
    url = tmp_path / "big.zarr"
    proc = subprocess.run(
        [sys.executable, "-c", RSS_WRAPPER, str(REPO / "render.py"), "import", str(source), str(url), "--quiet"],
        capture_output=True,
        text=True,
        env=render_cli_env(),
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = int(proc.stdout.strip().splitlines()[-1])
    assert f"imported 1200 of 1200 tiles (0 already done) of {W} x {H} px" in proc.stdout
    assert 100e6 < peak < GB, f"peak RSS {peak / 1e6:.0f} MB"  # the picture alone is 900 MB

    tif = tmp_path / "back.tif"
    assert render.main(["assemble", str(url), "--tiff", str(tif), "--compression", "zstd"]) == 0
    back = zarr.open(tifffile.imread(tif, aszarr=True), mode="r")
    back0 = back["0"] if isinstance(back, zarr.Group) else back
    assert back0.shape == (H, W, 3)
    rng = np.random.default_rng(0)
    windows = [(0, 0), (H - 300, W - 300), (0, W - 300), (H - 300, 0)]
    windows += [(int(rng.integers(0, H - 300)), int(rng.integers(0, W - 300))) for _ in range(8)]
    for y, x in windows:
        np.testing.assert_array_equal(np.asarray(back0[y : y + 300, x : x + 300]), _pattern(y, y + 300, x, x + 300))
    # whole rows across every tile column, at a tile seam of level 0 and of the TIFF
    for y in (511, 512, 7424, H - 1):
        np.testing.assert_array_equal(np.asarray(back0[y : y + 1, :]), _pattern(y, y + 1, 0, W))
