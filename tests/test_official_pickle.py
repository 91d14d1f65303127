"""Official CREPS network pickles: read them without executing anything.

The test builds, without importing any official code, a pickle with the same
record structure as the released snapshots: fake modules named
``torch_utils.persistence`` (the reconstructor), ``training.networks_creps``
(``SynthesisInput``, pickled by reference) and ``dnnlib.util`` (``EasyDict``)
live in ``sys.modules`` only while pickling; every persistent network object
reduces to ``_reconstruct_persistent_obj(meta)`` with the module source text
and its ``__dict__`` (OrderedDict ``_parameters`` / ``_buffers`` / ``_modules``
holding real tensors); ``torch.nn.Sequential`` decoders, numpy scalars
(``weight_gain`` is a numpy float64 in the real files) and torch's own
tensor/parameter/storage rebuilds appear as they do in the real files.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import creps
from creps import convert, official
from creps.layers import FullyConnected, ModulatedFC
from creps.network import FourierInput, LineBlock, Mapping, RefineBlock, Synthesis

FAKE_MODULES = [
    "torch_utils",
    "torch_utils.persistence",
    "training",
    "training.networks_creps",
    "dnnlib",
    "dnnlib.util",
]


@contextlib.contextmanager
def fake_official_modules():
    """Stand-ins for the official modules, present in sys.modules only inside the block."""
    saved = {name: sys.modules.get(name) for name in FAKE_MODULES}
    mods = {name: types.ModuleType(name) for name in FAKE_MODULES}

    def _reconstruct_persistent_obj(meta):  # never called: loading must not import this
        raise AssertionError("the fake reconstructor ran")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mods["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj

    class SynthesisInput(torch.nn.Module):  # not persistent in the official code: pickled by reference
        pass

    SynthesisInput.__module__ = "training.networks_creps"
    SynthesisInput.__qualname__ = SynthesisInput.__name__ = "SynthesisInput"
    mods["training.networks_creps"].SynthesisInput = SynthesisInput

    class EasyDict(dict):
        pass

    EasyDict.__module__ = "dnnlib.util"
    EasyDict.__qualname__ = EasyDict.__name__ = "EasyDict"
    mods["dnnlib.util"].EasyDict = EasyDict

    sys.modules.update(mods)
    try:
        yield types.SimpleNamespace(
            reconstruct=_reconstruct_persistent_obj, SynthesisInput=SynthesisInput, EasyDict=EasyDict
        )
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod


class Persistent(torch.nn.Module):
    """Reduces like an official ``@persistent_class`` object."""

    module_src = ""
    reconstruct = None

    def __init__(self, class_name: str) -> None:
        super().__init__()
        self._official_class = class_name

    def __reduce__(self):
        meta = {
            "type": "class",
            "version": 6,
            "module_src": self.module_src,
            "class_name": self._official_class,
            "state": dict(self.__dict__),
        }
        return (Persistent.reconstruct, (meta,), None)


def _official_name(module: torch.nn.Module) -> str:
    if isinstance(module, creps.Generator):
        return "Generator"
    if isinstance(module, Mapping):
        return "MappingNetwork"
    if isinstance(module, Synthesis):
        return "SynthesisNetwork"
    if isinstance(module, (LineBlock, RefineBlock)):
        return "SynthesisBlock"
    if isinstance(module, ModulatedFC):
        return "ToResLayer" if module.tores else "SynthesisLayer"
    if isinstance(module, FullyConnected):
        return "FullyConnectedLayer"
    raise AssertionError(type(module))


def official_tree(module: torch.nn.Module, ns) -> torch.nn.Module:
    """Mirror of ``module`` built from official-looking classes, sharing nothing."""
    if isinstance(module, FourierInput):
        node = ns.SynthesisInput()
        node.channels, node.rank, node.bandwidth = module.channels, module.rank, 10
    elif isinstance(module, torch.nn.Sequential):
        node = torch.nn.Sequential()
    else:
        node = Persistent(_official_name(module))
    if isinstance(module, FullyConnected):
        node.weight_gain = np.float64(module.weight_gain)  # a numpy scalar, as in the real files
        node.bias_gain = module.bias_gain
        node.activation = "lrelu" if module.lrelu else "linear"
    if isinstance(module, ModulatedFC):
        node.fc_clamp = 256
    if isinstance(module, Mapping):
        node.w_avg_beta, node.num_layers = 0.998, module.cfg.mapping_layers
        node._init_kwargs = ns.EasyDict(num_layers=module.cfg.mapping_layers)
    for name, p in module._parameters.items():
        node.register_parameter(name, torch.nn.Parameter(p.detach().clone(), requires_grad=False))
    for name, b in module._buffers.items():
        node.register_buffer(name, b.detach().clone())
    for name, child in module._modules.items():
        node.add_module(name, official_tree(child, ns))
    return node


MARKER_SRC = "import pathlib\npathlib.Path({marker!r}).write_text('module_src was executed')\n"


def official_pickle(G: creps.Generator, marker: Path, protocol: int = 4) -> bytes:
    """Bytes of an official-structured snapshot whose G_ema is ``G``."""
    noisy = creps.Generator(G.cfg)  # G differs from G_ema: the loader must pick G_ema
    with fake_official_modules() as ns:
        Persistent.reconstruct = ns.reconstruct
        Persistent.module_src = MARKER_SRC.format(marker=str(marker))
        D = Persistent("Discriminator")
        D.register_parameter("weight", torch.nn.Parameter(torch.randn(4, 3)))
        aug = Persistent("AugmentPipe")
        aug.register_buffer("Hz_geom", torch.randn(12))
        aug.register_buffer("unused", torch.zeros(2), persistent=False)
        snapshot = {
            "G": official_tree(noisy, ns),
            "D": D,
            "G_ema": official_tree(G, ns),
            "augment_pipe": aug,
            "training_set_kwargs": ns.EasyDict(
                path="ffhq.zip", resolution=np.int64(G.cfg.resolution), xflip=False, ratio=np.float32(0.5)
            ),
        }
        return pickle.dumps(snapshot, protocol=protocol)


@pytest.fixture(scope="module")
def source_G() -> creps.Generator:
    torch.manual_seed(1)
    G = creps.Generator(creps.preset("tiny")).eval().requires_grad_(False)
    with torch.no_grad():  # make every tensor matter (official init has zero biases)
        for name, t in G.state_dict().items():
            if name.endswith(("bias", "w_avg")):
                t.add_(torch.randn_like(t) * 0.1)
    return G


def _assert_same_generator(G: creps.Generator, H: creps.Generator) -> None:
    assert G.cfg == H.cfg
    a, b = G.state_dict(), H.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    z = G.z_from_seed(3, batch=2)
    canvas = creps.Canvas(13, 19)  # small blocks keep this fast; both sides use the same blocking
    for psi in (1.0, 0.6):
        assert torch.equal(G.render(z, canvas, psi=psi, pixel_block=256), H.render(z, canvas, psi=psi, pixel_block=256))


def test_official_structure_loads_bit_exact(tmp_path, source_G):
    marker = tmp_path / "marker"
    data = official_pickle(source_G, marker)
    assert b"training.networks_creps" in data and b"torch_utils.persistence" in data
    assert b"numpy._core.multiarray" in data or b"numpy.core.multiarray" in data
    assert "training.networks_creps" not in sys.modules and "torch_utils" not in sys.modules
    path = tmp_path / "network-snapshot.pkl"
    path.write_bytes(data)
    G = creps.load(path)
    _assert_same_generator(source_G, G)
    assert not G.training and not any(p.requires_grad for p in G.parameters())
    assert not marker.exists(), "embedded module_src must never be executed"
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules


def test_numpy1_names_and_protocol3(tmp_path, source_G):
    """Files written under numpy 1.x name numpy.core.multiarray.scalar; networks
    re-saved after loading a pickle name SynthesisInput's module _imported_module_*."""
    data = official_pickle(source_G, tmp_path / "marker", protocol=3)
    old = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    old = old.replace(b"ctraining.networks_creps\n", b"c_imported_module_2f1e4c\n")
    assert b"cnumpy.core.multiarray\nscalar\n" in old and b"numpy._core" not in old
    assert b"c_imported_module_2f1e4c\nSynthesisInput\n" in old
    path = tmp_path / "old.pkl"
    path.write_bytes(old)
    _assert_same_generator(source_G, creps.load(path))


class _Evil:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: _Evil(os.system, f"touch {m}"),
        lambda m: _Evil(eval, f"open({str(m)!r}, 'w').write('x')"),
        lambda m: _Evil(subprocess.Popen, ["touch", str(m)]),
        lambda m: {"state": [_Evil(os.system, f"touch {m}")]},
    ],
    ids=["os.system", "builtins.eval", "subprocess.Popen", "nested"],
)
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, make):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G": None, "G_ema": make(marker)}))
    with pytest.raises(creps.CheckpointError, match="refusing to load: the pickle calls"):
        creps.load(path)
    assert not marker.exists()


def test_malicious_call_inside_persistent_state_is_refused(tmp_path, source_G):
    marker = tmp_path / "pwned"
    with fake_official_modules() as ns:
        Persistent.reconstruct = ns.reconstruct
        Persistent.module_src = ""
        G = Persistent("Generator")
        G.sneaky = _Evil(os.system, f"touch {marker}")
        data = pickle.dumps({"G_ema": G})
    path = tmp_path / "evil.pkl"
    path.write_bytes(data)
    with pytest.raises(creps.CheckpointError, match="system"):
        creps.load(path)
    assert not marker.exists()


def test_truncated_pickle(tmp_path, source_G):
    data = official_pickle(source_G, tmp_path / "marker")
    path = tmp_path / "cut.pkl"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(creps.CheckpointError, match=r"truncated|corrupt"):
        creps.load(path)


@pytest.mark.parametrize("tensors", [True, False], ids=["decoded", "shapes-only"])
def test_truncated_storage_blob(tensors):
    """A storage blob shorter than its record says is refused whether or not it is decoded."""
    _, (blob,) = torch.arange(10.0).__reduce_ex__(4)[1][0].__reduce__()  # as a pickled tensor carries it
    read = official._load_from_bytes if tensors else official._storage_shape_from_bytes
    whole = read(blob)
    assert whole.shape == (10,) and whole.is_meta != tensors
    with pytest.raises(creps.CheckpointError, match="truncated storage data in pickle"):
        read(blob[:-4])


def test_pickle_without_generator(tmp_path):
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps({"something": 1}))
    with pytest.raises(creps.CheckpointError, match="no G_ema or G"):
        creps.load(path)


def test_convert_command(tmp_path, source_G, capsys):
    pkl = tmp_path / "net.pkl"
    pkl.write_bytes(official_pickle(source_G, tmp_path / "marker"))
    out = tmp_path / "net.safetensors"
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    assert convert.run(parser.parse_args([str(pkl), str(out)])) == 0
    printed = capsys.readouterr().out
    n = sum(p.numel() for p in source_G.parameters())
    assert f"{n:,}" in printed and '"resolution": 32' in printed
    _assert_same_generator(source_G, creps.load(out))
    assert convert.run(parser.parse_args([str(pkl), str(out)])) == 2  # exists, no --force: bad input
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"not a checkpoint")
    assert convert.run(parser.parse_args([str(bad), str(tmp_path / "o.safetensors")])) == 2
    assert "unknown checkpoint format" in capsys.readouterr().err
