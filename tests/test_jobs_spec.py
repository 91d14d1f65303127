"""Job spec, tile plan and bad input (no Ray: every error comes before any rendering)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

import render
from jobs import JobSpecError
from jobs.plan import TilePlan, auto_batch, line_chunk, line_ranges
from jobs.spec import JobSpec, parse_size, parse_storage_options, parse_view

EXAMPLES = Path(__file__).resolve().parent.parent / "jobs" / "examples"


def test_defaults_are_the_demo_job():
    s = JobSpec()
    assert (s.width, s.height, s.tile, s.seed) == (6144, 6144, 512, 0)
    assert s.out == "out/demo.zarr"
    assert s.checkpoint.endswith("default.safetensors") or s.checkpoint == "preset:ffhq512"


def test_roundtrip_and_identity():
    s = JobSpec(checkpoint="preset:tiny", width=300, height=200, tile=64, view=(0, 0.5, 0.25, 1), workers=3)
    assert JobSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    # how a job runs does not decide its bytes
    assert JobSpec.from_dict({**s.to_dict(), "workers": 1, "address": "x:1"}).identity() == s.identity()
    assert JobSpec.from_dict({**s.to_dict(), "seed": 1}).identity() != s.identity()


def test_toml_and_flag_override(tmp_path):
    p = tmp_path / "job.toml"
    p.write_text(
        '[job]\ncheckpoint = "preset:tiny"\nsize = "320x200"\ntile = 64\nseed = 3\nstorage_options = {anon = true}\n'
    )
    s = JobSpec.from_toml(p, {"seed": 7})
    assert (s.width, s.height, s.tile, s.seed, s.storage_options) == (320, 200, 64, 7, {"anon": True})
    p.write_text("tile = [")
    with pytest.raises(JobSpecError, match="not valid TOML"):
        JobSpec.from_toml(p)
    p.write_text("tiles = 3")
    with pytest.raises(JobSpecError, match="unknown job keys: tiles"):
        JobSpec.from_toml(p)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_examples_load(path):
    assert JobSpec.from_toml(path).tile % 16 == 0


def test_scale_resolves_from_training_resolution():
    s = JobSpec(checkpoint="preset:tiny", scale=2.5).resolved(32)
    assert (s.height, s.width, s.scale) == (80, 80, None)
    with pytest.raises(JobSpecError, match="1..2\\^20"):
        JobSpec(scale=1e9).resolved(512)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"width": 0}, "width must be an integer in 1..1048576"),
        ({"height": -3}, "height"),
        ({"width": 2**20 + 1}, "width"),
        ({"tile": 30}, "multiple of 16"),
        ({"tile": 0}, "multiple of 16"),
        ({"tile": 16384}, "larger than 8192"),
        ({"psi": float("nan")}, "psi"),
        ({"view": (0, 0, 0, 1)}, "empty"),
        ({"shard": -1}, "shard"),
        ({"shard": 65}, "shard"),
    ],
)
def test_bad_specs(kwargs, message):
    with pytest.raises(JobSpecError, match=message):
        JobSpec(checkpoint="preset:tiny", **kwargs)


def test_parsers():
    assert parse_size("1024x768") == (1024, 768) and parse_size("64") == (64, 64)
    assert parse_view("0,0.5,0.5,1") == (0, 0.5, 0.5, 1)
    for bad in ("x", "10x", "0x5", "1x2x3"):
        with pytest.raises(JobSpecError):
            parse_size(bad)
    with pytest.raises(JobSpecError, match="not valid JSON"):
        parse_storage_options("{key: 1}")
    with pytest.raises(JobSpecError, match="JSON object"):
        parse_storage_options("[1]")


@pytest.mark.parametrize("h, w, t, shard", [(100, 150, 32, 1), (64, 64, 64, 1), (1, 1000, 16, 1), (300, 130, 32, 3)])
def test_plan_covers_canvas_once_on_chunk_grid(h, w, t, shard):
    import numpy as np

    tiles = list(TilePlan(h, w, t * shard))
    cover = np.zeros((h, w), int)
    for tile in tiles:
        assert tile.r0 % (t * shard) == 0 and tile.c0 % (t * shard) == 0  # one chunk/shard per tile
        cover[tile.r0 : tile.r1, tile.c0 : tile.c1] += 1
    assert (cover == 1).all()
    assert len({tile.id for tile in tiles}) == len(tiles)
    assert tiles[0].id == "r0_c0"


def test_line_ranges_are_whole_chunks():
    c = line_chunk(48)
    assert c % 48 == 0 and c % 64 == 0
    r = line_ranges(1000, c, 4)
    assert r[0][0] == 0 and r[-1][1] == 1000
    assert all(a % c == 0 for a, _ in r) and all(b == a2 for (_, b), (a2, _) in itertools.pairwise(r))
    assert 1 <= auto_batch(100, 2, 32 * 32) <= 64 and auto_batch(10, 2, 512 * 512) == 1


# ---------------------------------------------------------------- bad input on the CLI
BASE = ["render", "--checkpoint", "preset:tiny", "--size", "64x48", "--tile", "32", "--no-exports", "--quiet"]


def _cli(args, capsys):
    rc = render.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--checkpoint", "preset:nope"], "unknown preset 'nope'"),
        (["--checkpoint", "/no/such/weights.safetensors"], "checkpoint not found"),
        (["--size", "0x10"], "canvas sides must be 1..2^20"),
        (["--size=-5x10"], "canvas sides must be 1..2^20"),
        (["--size", "1048577x4"], "canvas sides must be 1..2^20"),
        (["--tile", "40"], "tile must be a positive multiple of 16"),
        (["--storage-options", "{not json"], "storage options are not valid JSON"),
        (["--out", "nosuchproto://bucket/x.zarr"], "Protocol not known"),
    ],
)
def test_cli_bad_input_one_line_exit_2(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    rc, err = _cli([*BASE, "--out", str(tmp_path / "o.zarr"), *extra], capsys)
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_cli_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, err = _cli([*BASE, "--out", str(blocker / "o.zarr")], capsys)
    assert rc == 2 and len(err) == 1 and "cannot" in err[0]
    assert blocker.read_text() == "x"


def test_cli_refuses_foreign_directory(tmp_path, capsys):
    (tmp_path / "o.zarr").mkdir()
    (tmp_path / "o.zarr" / "keep.txt").write_text("mine")
    rc, err = _cli([*BASE, "--out", str(tmp_path / "o.zarr"), "--overwrite"], capsys)
    assert rc == 2 and "not an image store" in err[0]
    assert (tmp_path / "o.zarr" / "keep.txt").read_text() == "mine"


def test_cli_dry_run_prints_resolved_job(capsys, tmp_path):
    rc = render.main(
        [
            "render",
            "--checkpoint",
            "preset:tiny",
            "--scale",
            "3",
            "--tile",
            "32",
            "--out",
            str(tmp_path / "d.zarr"),
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and '"height": 96' in out and "plan: 9 tiles" in out
    assert not (tmp_path / "d.zarr").exists()


@pytest.mark.parametrize(
    "h, w, tile, object_store, want",
    [
        (32768, 32768, 512, False, 1),  # local disks: never sharded by default
        (8192, 8192, 512, True, 1),  # 256 chunks: already few objects
        (32768, 32768, 512, True, 2),  # 1 Gpx: 4,096 chunks -> 1,024 shards
        (262144, 262144, 512, True, 16),  # 262,144 chunks -> 1,024 shards of 8192^2
        (2**20, 2**20, 512, True, 32),  # capped by the 16384 shard side: 4,096 shards
        (100, 40000, 16, True, 8),  # 7 x 2,500 chunks; x4: 2 x 625 = 1,250; x8: 1 x 313
    ],
)
def test_auto_shard_keeps_object_store_levels_small(h, w, tile, object_store, want):
    from jobs.plan import OBJECTS_PER_LEVEL, auto_shard

    s = auto_shard(h, w, tile, object_store)
    assert s == want
    side = tile * s
    if object_store and side < 16384:
        assert -(-h // side) * -(-w // side) <= OBJECTS_PER_LEVEL
