"""`render.py verify` checks every pyramid level present and repairs it exactly (issue 20, the verify item).

A real 2048^2 render (tile 256) of the tiny model and a real assemble; then
bytes are flipped in stored chunk files: in levels the render's blocks wrote,
in levels assemble built, in a level-0 tile. verify --no-repair names exactly
the damaged chunks and changes nothing; verify rebuilds them from the level
below (and everything above them), after which every level equals the bytes
it had before the damage; the exports' sidecars then read stale until the
next assemble.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_job

import render
from jobs.assemble import assemble
from jobs.run import run_job
from renderer.provenance import export_state, recorded_exports
from renderer.pyramid import pyramid_current
from renderer.store import open_store
from renderer.verify import verify_store
from viewer.dzifiles import DziFiles
from viewer.tiles import usable_levels

SIDE, TILE = 2048, 256  # 8 x 8 tiles; levels 2048, 1024, 512, 256 (4 levels, chunks of 256)


def _render(out: Path, **fields) -> str:
    spec = tiny_job(str(out), height=SIDE, width=SIDE, tile=TILE, workers=0, **fields)
    assert run_job(spec, progress=False, log=lambda s: None)["status"] == "done"
    return spec.out


@pytest.fixture(scope="module")
def auto_block(tmp_path_factory) -> str:
    """The default plan: blocks of 2 x 2 tiles, so the render writes level 1 and assemble levels 2 and 3."""
    return _render(tmp_path_factory.mktemp("auto") / "img.zarr")


@pytest.fixture(scope="module")
def block4(tmp_path_factory) -> str:
    """Blocks of 4 x 4 tiles: the render writes levels 1 and 2, assemble level 3."""
    return _render(tmp_path_factory.mktemp("b4") / "img.zarr", block=4)


def _copy(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _flip(path: Path, n: int = 16) -> None:
    """Flip ``n`` bytes in the middle of a stored chunk file."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _levels(url: str) -> list[np.ndarray]:
    store = open_store(url, mode="r")
    return [np.asarray(store.level(k)[:]) for k in range(store.level_count())]


def _snapshot(root: str) -> dict[str, str]:
    base = Path(root)
    return {
        str(p.relative_to(base)): hashlib.sha256(p.read_bytes()).hexdigest() for p in base.rglob("*") if p.is_file()
    }


def _verify(capsys, *args: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    rc = render.main(["verify", *args, "--quiet"])
    return rc, capsys.readouterr().out.strip().splitlines()


def test_damaged_levels_are_named_then_rebuilt_to_the_same_bytes_and_exports_read_stale(auto_block, tmp_path, capsys):
    out = _copy(auto_block, tmp_path / "img.zarr")
    tif, dzi = str(tmp_path / "img.tif"), str(tmp_path / "img")
    assemble(out, tiff=tif, dzi=dzi, compression="zstd")
    store = open_store(out, mode="r")
    assert store.block_levels == (2, 1) and store.level_count() == 4  # level 1: the render's; 2, 3: assemble's
    assert set(recorded_exports(store)) == {tif, dzi + ".dzi", dzi + ".szi"}
    assert all(export_state(u).current for u in (tif, dzi + ".dzi", dzi + ".szi"))
    original = _levels(out)
    files = {rel: (Path(out) / rel).read_bytes() for rel in ("1/c/0/2/3", "2/c/0/1/0", "3/c/0/0/0")}

    rc, lines = _verify(capsys, out)
    assert rc == 0 and lines[-1].startswith("verify: 64 tiles checked, 0 bad, 0 re-rendered, 0 bad left; ")
    assert "21 level chunks checked (levels 1..3), 0 bad, 0 rebuilt, 0 bad left" in lines[-1]

    _flip(Path(out) / "1/c/0/2/3")  # a chunk the render wrote with its block
    _flip(Path(out) / "2/c/0/1/0")  # a chunk assemble built
    wrong = 255 - original[3]  # decodes, but is not the rule over level 2: judged against level 2 as it should be
    open_store(out).write_region(3, 0, 0, wrong)

    # --no-repair: exactly the three damaged chunks (not the level-2 parent of the damaged level-1 one), exit 1,
    # not one byte changed
    before = _snapshot(out)
    rc, lines = _verify(capsys, out, "--no-repair")
    assert rc == 1
    bad = [ln for ln in lines if ln.startswith("bad ")]
    assert [ln.split(" ")[:5] for ln in bad] == [
        ["bad", "level", "1", "chunk", "1/c/0/2/3"],
        ["bad", "level", "2", "chunk", "2/c/0/1/0"],
        ["bad", "level", "3", "chunk", "3/c/0/0/0"],
    ], lines
    assert "cannot be decoded" in bad[0] and "cannot be decoded" in bad[1]
    assert "does not hold the 2x2 rule over level 2" in bad[2]
    assert "21 level chunks checked (levels 1..3), 3 bad, 0 rebuilt, 3 bad left" in lines[-1]
    assert f"export {tif}: current" in lines
    assert _snapshot(out) == before

    # assemble cannot read the damaged level: one line that names the command that repairs it
    capsys.readouterr()
    assert render.main(["assemble", out, "--tiff", str(tmp_path / "other.tif")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is unreadable" in err[0] and f"`render.py verify {out}` repairs it" in err[0], err

    # verify repairs: the bad chunks, the chunks above them (level 2 over the level-1 one), all exact
    rc, lines = _verify(capsys, out)
    assert rc == 0, lines
    assert "21 level chunks checked (levels 1..3), 3 bad, 4 rebuilt, 0 bad left" in lines[-1]
    for got, want in zip(_levels(out), original, strict=True):
        np.testing.assert_array_equal(got, want)
    assert {rel: (Path(out) / rel).read_bytes() for rel in files} == files  # the very chunk files again
    store = open_store(out, mode="r")
    assert verify_store(store).ok and pyramid_current(store)
    assert store.generation["n"] == 2  # the render, then the repair

    # the exports were made before: they read stale now (verify, the sidecar reader, the viewer)
    for url in (tif, dzi + ".dzi", dzi + ".szi"):
        state = export_state(url)
        assert state.state == "stale" and "verify rebuilt 4 level chunks" in state.reason, state
        assert f"export {url}: stale: " in "\n".join(lines)
    assert f"`render.py assemble {out} --tiff {tif} --compression zstd --dzi {dzi}`" in lines[-2]
    assert DziFiles(dzi + ".dzi").info()["export"]["state"] == "stale"

    # the next assemble makes them current again
    assemble(out, tiff=tif, dzi=dzi, compression="zstd")
    assert all(export_state(u).current for u in (tif, dzi + ".dzi", dzi + ".szi"))
    assert DziFiles(dzi + ".dzi").info()["export"] == {"url": dzi + ".dzi", "state": "current", "reason": ""}
    rc, lines = _verify(capsys, out)
    assert rc == 0 and f"export {dzi}.szi: current" in lines and not any("assemble" in ln for ln in lines)


def test_a_damaged_tile_is_rendered_again_and_every_level_above_it_rebuilt(block4, tmp_path, capsys):
    out = _copy(block4, tmp_path / "img.zarr")
    tif = str(tmp_path / "img.tif")
    assemble(out, tiff=tif)
    store = open_store(out, mode="r")
    assert store.block_levels == (4, 2) and store.level_count() == 4  # levels 1, 2: the render's; 3: assemble's
    original = _levels(out)
    open_store(out).update_meta(exports={})  # as if made before exports were recorded: `--export` names it

    _flip(Path(out) / "2/c/0/0/1")  # a level-2 chunk the render wrote (block 1: tiles r0..3_c4..7)
    _flip(Path(out) / "0/c/0/5/2")  # tile r5_c2 (block 2)
    _flip(Path(out) / "3/c/0/0/0")  # above that tile: not judged (the tile is re-rendered), rebuilt anyway

    report = verify_store(open_store(out, mode="r"), workers=2)
    assert report.bad_ids == ["r5_c2"] and "cannot be decoded" in report.bad[0].reason
    assert [(b.level, b.chunk) for b in report.bad_chunks] == [(2, (0, 1))]
    assert report.levels == (1, 2, 3) and report.chunks_checked == 12 + 3  # block 2's chunks and level 3 not judged

    rc, lines = _verify(capsys, out, "--export", tif)
    assert rc == 0, lines
    assert "64 tiles checked, 1 bad, 1 re-rendered, 0 bad left" in lines[-1]
    assert "15 level chunks checked (levels 1..3), 1 bad, 2 rebuilt, 0 bad left" in lines[-1]  # 2/c/0/0/1, 3/c/0/0/0
    for got, want in zip(_levels(out), original, strict=True):
        np.testing.assert_array_equal(got, want)
    store = open_store(out, mode="r")
    assert store.meta["last_run"]["tiles_rendered"] == 16  # the tile's whole block
    # the render marked the pyramid stale; every level above the tile being rebuilt, it is current again
    assert pyramid_current(store) and len(usable_levels(store)) == 4
    assert any(ln.startswith(f"export {tif}: stale: ") for ln in lines)
    rc, lines = _verify(capsys, out, "--export", tif, "--no-repair")
    assert rc == 0 and "1 bad" not in lines[-1]
