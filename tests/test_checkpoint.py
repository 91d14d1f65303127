"""Our checkpoint format (safetensors + JSON config), preset specs, bad files, and
reading a checkpoint's config without its weights (``creps.read_config``)."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

# The builder of official-structured pickles (pytest puts tests/ on sys.path).
from test_official_pickle import official_pickle

import creps
from creps.checkpoint import FORMAT
from creps.official import infer_config, read_official

OFFICIAL = {"ffhq512": (30_867_785, 204), "church256": (30_530_825, 184), "metfaces1024": (31_034_377, 224)}


@pytest.fixture(scope="module")
def tiny() -> creps.Generator:
    torch.manual_seed(2)
    G = creps.Generator(creps.preset("tiny")).eval().requires_grad_(False)
    with torch.no_grad():
        for name, t in G.state_dict().items():
            if name.endswith(("bias", "w_avg")):
                t.add_(torch.randn_like(t) * 0.1)
    return G


@pytest.fixture()
def saved(tmp_path, tiny):
    return creps.save(tiny, tmp_path / "tiny.safetensors")


def _rewrite(src, dst, edit) -> None:
    """Copy a checkpoint of ours with its tensors edited, metadata kept."""
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        sd = {k: f.get_tensor(k) for k in f.keys()}
    edit(sd)
    save_file(sd, str(dst), metadata=meta)


def _error(spec, match: str) -> str:
    with pytest.raises(creps.CheckpointError, match=match) as e:
        creps.load(spec)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_round_trip_is_exact(tmp_path, tiny, saved):
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.safetensors"]  # no temp file left
    with safe_open(str(saved), framework="pt") as f:
        meta = f.metadata()
        assert list(f.keys()) == sorted(tiny.state_dict())
    assert meta["format"] == FORMAT
    assert creps.GeneratorConfig.from_dict(json.loads(meta["creps_config"])) == tiny.cfg
    G = creps.load(saved)
    assert not G.training and not any(p.requires_grad for p in G.parameters())
    a, b = tiny.state_dict(), G.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    z = tiny.z_from_seed(0)
    canvas = creps.Canvas(11, 17)
    assert torch.equal(tiny.render(z, canvas, psi=0.7, pixel_block=256), G.render(z, canvas, psi=0.7, pixel_block=256))
    assert creps.checkpoint_hash(saved) == hashlib.sha256(saved.read_bytes()).hexdigest()
    assert creps.load(str(saved), device=torch.device("cpu")).cfg == tiny.cfg


def test_save_replaces_atomically(tmp_path, tiny, saved, monkeypatch):
    before = saved.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError):
        creps.save(tiny, saved)
    assert saved.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.safetensors"]


def test_preset_spec_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(99)
    state = torch.get_rng_state()
    a = creps.load("preset:tiny", init_seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = creps.load("preset:tiny", init_seed=5)
    c = creps.load("preset:tiny", init_seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["synthesis.b4.input.freqs"], sc["synthesis.b4.input.freqs"])
    torch.manual_seed(5)  # the documented recipe: manual_seed then Generator(preset) on the CPU
    ref = creps.Generator(creps.preset("tiny")).state_dict()
    assert all(torch.equal(sa[k], ref[k]) for k in sa)
    assert creps.checkpoint_hash("preset:tiny", init_seed=5) == "preset:tiny@init5"
    with pytest.raises(creps.CheckpointError, match="unknown preset 'nope'"):
        creps.load("preset:nope")


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_presets_shapes_and_config_inference(name):
    params, entries = OFFICIAL[name]
    G = creps.load(f"preset:{name}")
    sd = G.state_dict()
    assert sum(p.numel() for p in G.parameters()) == params
    assert len(sd) == entries and len(list(G.buffers())) == 3
    assert round(params / 1e6, 2) == {"ffhq512": 30.87, "church256": 30.53, "metfaces1024": 31.03}[name]
    # what the official-pickle reader infers from the shapes alone
    assert infer_config(sd, {}) == creps.preset(name)


def test_missing_file(tmp_path):
    _error(tmp_path / "nope.safetensors", "checkpoint not found: .*nope.safetensors")
    with pytest.raises(creps.CheckpointError, match="checkpoint not found"):
        creps.checkpoint_hash(tmp_path / "nope.pkl")


@pytest.mark.parametrize(
    "content, match",
    [
        (b"hello, I am a text file\n", "unknown checkpoint format"),
        (b"", "unknown checkpoint format"),
        (b"PK\x03\x04" + b"\0" * 40, "torch.save zip archives are not supported"),
    ],
    ids=["text", "empty", "zip"],
)
def test_unknown_format(tmp_path, content, match):
    path = tmp_path / "x.bin"
    path.write_bytes(content)
    _error(path, match)


def test_truncated_safetensors(tmp_path, saved):
    data = saved.read_bytes()
    for cut in (len(data) // 2, 12, len(data) - 1):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        _error(path, "truncated")


def test_wrong_shape(tmp_path, saved):
    bad = tmp_path / "bad.safetensors"
    _rewrite(saved, bad, lambda sd: sd.__setitem__("mapping.fc0.weight", torch.zeros(3, 3)))
    msg = _error(bad, "wrong shapes")
    assert "mapping.fc0.weight [3, 3] (expected [64, 64])" in msg


def test_unknown_and_missing_keys(tmp_path, saved):
    bad = tmp_path / "bad.safetensors"
    _rewrite(saved, bad, lambda sd: sd.__setitem__("synthesis.b64.fc0.weight", torch.zeros(1)))
    assert "synthesis.b64.fc0.weight" in _error(bad, "1 unknown keys")
    _rewrite(saved, bad, lambda sd: sd.pop("mapping.w_avg"))
    assert "mapping.w_avg" in _error(bad, "1 missing keys")


def test_safetensors_of_someone_else(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    _error(path, "not a creps-gigapixel checkpoint")
    save_file({"weight": torch.zeros(2)}, str(path), metadata={"format": FORMAT, "creps_config": '{"resolution": 7}'})
    _error(path, "bad creps_config metadata")


# ------------------------------------------------------------------ read_config
@pytest.fixture()
def official_pkl(tmp_path, tiny) -> Path:
    path = tmp_path / "network-snapshot.pkl"
    path.write_bytes(official_pickle(tiny, tmp_path / "marker"))
    return path


def _same_error(spec) -> str:
    """read_config refuses ``spec`` with exactly the one-line error load gives."""
    with pytest.raises(creps.CheckpointError) as loaded:
        creps.load(spec)
    with pytest.raises(creps.CheckpointError) as read:
        creps.read_config(spec)
    assert str(read.value) == str(loaded.value)
    assert "\n" not in str(read.value)
    return str(read.value)


def test_read_config_equals_load(saved, official_pkl):
    assert creps.read_config("preset:tiny", init_seed=5) == creps.load("preset:tiny", init_seed=5).cfg
    assert creps.read_config("preset:ffhq512") == creps.preset("ffhq512")
    for spec in (saved, str(saved), official_pkl, str(official_pkl)):
        assert creps.read_config(spec) == creps.load(spec).cfg


def test_read_config_allocates_no_weights_and_decodes_no_storage(monkeypatch, saved, official_pkl, tiny):
    """The only Generator read_config builds lives on the meta device (no storage), and no
    storage of the file is decoded."""
    real = creps.checkpoint.Generator
    devices = []

    def meta_only(cfg):
        G = real(cfg)
        devices.append({p.device.type for p in G.parameters()})
        return G

    def forbidden(*args, **kwargs):
        raise AssertionError("read_config must not decode weights")

    monkeypatch.setattr("creps.checkpoint.Generator", meta_only)
    monkeypatch.setattr(torch, "frombuffer", forbidden)  # how official storages are decoded
    assert creps.read_config(saved) == tiny.cfg
    assert creps.read_config(official_pkl) == tiny.cfg
    assert creps.read_config("preset:tiny") == tiny.cfg
    assert devices == [{"meta"}, {"meta"}]


def test_official_reader_without_tensors_gives_shapes_only(official_pkl):
    with open(official_pkl, "rb") as f:
        cfg, sd = read_official(f)
    with open(official_pkl, "rb") as f:
        cfg_meta, sd_meta = read_official(f, tensors=False)
    assert cfg_meta == cfg
    assert list(sd_meta) == list(sd)
    assert all(t.is_meta for t in sd_meta.values())
    assert all(sd_meta[k].shape == sd[k].shape and sd_meta[k].dtype == sd[k].dtype for k in sd)


def test_read_config_refuses_what_load_refuses(tmp_path, saved, official_pkl):
    assert "unknown preset 'nope'" in _same_error("preset:nope")
    assert "checkpoint not found" in _same_error(tmp_path / "nope.safetensors")
    for name, content in [("text", b"hello\n"), ("empty", b""), ("zip", b"PK\x03\x04" + b"\0" * 40)]:
        path = tmp_path / f"{name}.bin"
        path.write_bytes(content)
        _same_error(path)
    data = saved.read_bytes()
    for cut in (len(data) // 2, 12, len(data) - 1):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        assert "truncated" in _same_error(path)
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(other))
    assert "not a creps-gigapixel checkpoint" in _same_error(other)
    save_file({"weight": torch.zeros(2)}, str(other), metadata={"format": FORMAT, "creps_config": '{"resolution": 7}'})
    assert "bad creps_config metadata" in _same_error(other)


def test_read_config_refuses_bad_pickles_like_load(tmp_path, official_pkl):
    data = official_pkl.read_bytes()
    for i in range(1, 8):  # cuts anywhere: between records and inside storage blobs
        path = tmp_path / f"cut{i}.pkl"
        path.write_bytes(data[: len(data) * i // 8])
        msg = _same_error(path)
        assert "truncated" in msg or "corrupt" in msg
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": print}))
    assert "refusing to load: the pickle calls builtins.print" in _same_error(path)
    path.write_bytes(pickle.dumps({"something": 1}))
    assert "no G_ema or G" in _same_error(path)


def test_read_config_checks_tensor_shapes_like_load(tmp_path, saved):
    """Names and shapes are checked against a meta-device generator: the same error as load."""
    bad = tmp_path / "bad.safetensors"
    _rewrite(saved, bad, lambda sd: sd.__setitem__("mapping.fc0.weight", torch.zeros(3, 3)))
    assert "wrong shapes" in _same_error(bad)
