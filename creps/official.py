"""Read official CREPS network pickles without executing anything they contain.

The released ``*.pkl`` files are plain ``pickle.dump`` of a dict ``{G, D, G_ema,
augment_pipe, training_set_kwargs}``.  Their network classes pickle through
``torch_utils.persistence``: each module becomes a call
``_reconstruct_persistent_obj(meta)`` whose ``meta`` holds the *source text* of
the defining module and the module's ``__dict__`` (``_parameters``,
``_buffers``, ``_modules``).  Unpickling them the ordinary way would ``exec``
that source, and a pickle can call any importable function, so we never do it.

Instead ``RestrictedUnpickler.find_class`` resolves a short allow-list:

* the persistence reconstructor and every class of the official code
  (``training.*``, ``_imported_module_*``, ``torch.nn`` containers) map to
  inert stubs that only keep their state dict; ``module_src`` is dropped unread;
* tensor / parameter / storage rebuilds map to our own implementations, which
  parse the legacy ``torch.save`` byte blobs of each storage themselves (again
  with a restricted unpickler) instead of calling ``torch.load``;
* ``collections.OrderedDict``, ``dnnlib.util.EasyDict`` (a stub dict), numpy
  scalars/arrays/dtypes (both the numpy-1 ``numpy.core`` and the numpy-2
  ``numpy._core`` names), ``torch.Size``, ``torch.device`` and torch dtypes.

Anything else (``os.system``, ``builtins.eval``, ...) raises
``CheckpointError`` at the moment the pickle names it, before it could run.

``tensors=False`` (``creps.read_config``) walks the same records with the same
checks but decodes no storage: each becomes a ``meta``-device tensor of the
right dtype and length, so shapes, and with them the config, are known while
no weight is copied.  The unpickler still reads the whole file, and keeps each
storage's bytes in its memo until it finishes (about the file size in memory).
"""

from __future__ import annotations

import collections
import io
import pickle
import re
from typing import Any, BinaryIO

import numpy as np
import torch

from .errors import CheckpointError
from .presets import GeneratorConfig

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.save (non-zip) magic number
LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_TORCH_DTYPES = {
    name: getattr(torch, name)
    for name in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
}
_STUB_MODULE = re.compile(r"(training(\.\w+)*|_imported_module_\w+)")
_TORCH_CONTAINERS = {"Sequential", "ModuleList", "ModuleDict"}
_IDENT = re.compile(r"[A-Za-z_]\w*")


# ----------------------------------------------------------------- inert stubs
class Stub:
    """Stand-in for an official class: keeps the pickled state, runs nothing."""

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {}

    def __repr__(self) -> str:
        return f"<stub {self.qualname}>"


class PersistentStub(Stub):
    """What ``_reconstruct_persistent_obj(meta)`` yields: class name + state."""

    def __init__(self, class_name: str, state: dict[str, Any]) -> None:
        self.qualname, self.state = class_name, state


_stub_classes: dict[str, type] = {}


def _stub_class(module: str, name: str) -> type:
    key = f"{module}.{name}"
    if key not in _stub_classes:
        _stub_classes[key] = type(name, (Stub,), {"qualname": key, "__module__": __name__})
    return _stub_classes[key]


def _reconstruct_persistent_obj(meta: Any) -> PersistentStub:
    """Replacement for ``torch_utils.persistence._reconstruct_persistent_obj``.

    The embedded ``module_src`` is deliberately never looked at.
    """
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise CheckpointError("corrupt persistence record in pickle (expected type='class' meta)")
    name, state = meta.get("class_name"), meta.get("state")
    if not isinstance(name, str) or not isinstance(state, dict):
        raise CheckpointError("corrupt persistence record in pickle (class_name/state missing)")
    return PersistentStub(name, state)


class EasyDict(dict[str, Any]):
    """Inert stand-in for ``dnnlib.util.EasyDict`` (a dict with attribute access)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


# --------------------------------------------------------- tensors and storages
def _check_int(*values: Any) -> None:
    for v in values:
        if not isinstance(v, int) or v < 0:
            raise CheckpointError(f"corrupt tensor record in pickle (bad size/stride {v!r})")


def _rebuild_tensor(storage: Any, offset: int, size: Any, stride: Any, *_ignored: Any) -> torch.Tensor:
    """Safe ``torch._utils._rebuild_tensor(_v2)``: a strided view of a flat storage."""
    if not isinstance(storage, torch.Tensor) or storage.dim() != 1:
        raise CheckpointError("corrupt tensor record in pickle (storage is not a decoded storage)")
    size, stride = tuple(size), tuple(stride)
    _check_int(offset, *size, *stride)
    if len(size) != len(stride):
        raise CheckpointError("corrupt tensor record in pickle (size and stride lengths differ)")
    if all(size):
        last = offset + sum((s - 1) * st for s, st in zip(size, stride, strict=True))
        if last >= storage.numel():
            raise CheckpointError("corrupt tensor record in pickle (view exceeds its storage)")
    return torch.as_strided(storage, size, stride, offset)


def _rebuild_parameter(data: Any, requires_grad: Any = False, hooks: Any = None, state: Any = None) -> torch.Tensor:
    """Safe ``_rebuild_parameter(_with_state)``: the plain tensor is all we need."""
    if not isinstance(data, torch.Tensor):
        raise CheckpointError("corrupt parameter record in pickle")
    return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if func not in (_rebuild_tensor, _rebuild_parameter):
        raise CheckpointError("refusing to load: _rebuild_from_type_v2 with a function outside the allow-list")
    return func(*args)


class _StorageUnpickler(pickle.Unpickler):
    """Reads the pickle inside one legacy ``torch.save`` blob: storage types only."""

    def __init__(self, f: BinaryIO) -> None:
        super().__init__(f)
        self.records: dict[str, tuple[torch.dtype, int]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise CheckpointError(f"refusing to load: storage blob references {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"corrupt storage blob in pickle (persistent id {pid!r:.60})")
        dtype, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(dtype, torch.dtype) or not isinstance(key, str):
            raise CheckpointError("corrupt storage blob in pickle (bad storage record)")
        _check_int(numel)
        self.records[key] = (dtype, numel)
        view = pid[5] if len(pid) > 5 else None
        return ("storage-ref", key, view)


def _load_from_bytes(blob: Any) -> torch.Tensor:
    """Safe ``torch.storage._load_from_bytes``: decode a legacy torch.save of one
    storage (magic, protocol, sys info, pickle, key list, raw data) as a flat tensor."""
    return _storage_from_bytes(blob, decode=True)


def _storage_shape_from_bytes(blob: Any) -> torch.Tensor:
    """``_load_from_bytes`` without the data: a ``meta`` tensor of the storage's
    dtype and length, after the same checks (truncated data is still refused)."""
    return _storage_from_bytes(blob, decode=False)


def _storage_from_bytes(blob: Any, decode: bool) -> torch.Tensor:
    if not isinstance(blob, (bytes, bytearray)):
        raise CheckpointError("corrupt storage record in pickle")
    f = io.BytesIO(blob)
    try:
        up = _StorageUnpickler(f)
        if up.load() != LEGACY_MAGIC or up.load() != LEGACY_PROTOCOL:
            raise CheckpointError("corrupt storage record in pickle (not a legacy torch.save blob)")
        sys_info = up.load()
        if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
            raise CheckpointError("big-endian storages are not supported")
        ref = up.load()
        keys = up.load()
    except CheckpointError:
        raise
    except Exception as e:  # whatever a malformed blob makes pickle raise
        raise CheckpointError(f"corrupt storage record in pickle ({type(e).__name__}: {e})") from None
    flats: dict[str, torch.Tensor] = {}
    for key in keys if isinstance(keys, list) else []:
        if key not in up.records:
            raise CheckpointError("corrupt storage record in pickle (unknown storage key)")
        dtype, numel = up.records[key]
        n = int.from_bytes(f.read(8), "little")
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        if n != numel or len(blob) - f.tell() < nbytes:
            raise CheckpointError("truncated storage data in pickle")
        if not decode:
            f.seek(nbytes, io.SEEK_CUR)
            flats[key] = torch.empty(n, dtype=dtype, device="meta")
            continue
        data = f.read(nbytes)
        flats[key] = torch.frombuffer(bytearray(data), dtype=dtype) if n else torch.empty(0, dtype=dtype)
    if not (isinstance(ref, tuple) and len(ref) == 3 and ref[0] == "storage-ref" and ref[1] in flats):
        raise CheckpointError("corrupt storage record in pickle (storage data missing)")
    flat, view = flats[ref[1]], ref[2]
    if view is not None:  # old torch: (view_key, offset, size)
        _check_int(view[1], view[2])
        flat = flat[view[1] : view[1] + view[2]]
    return flat


# ---------------------------------------------------------------- numpy values
def _np_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, (bytes, bytearray)):
        raise CheckpointError("refusing to load: numpy scalar of an object dtype")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0]


def _np_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise CheckpointError("refusing to load: numpy array of a subclass")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


# ------------------------------------------------------------------ allow-list
_SAFE: dict[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.storage._load_from_bytes": _load_from_bytes,
    "torch.Size": torch.Size,
    "torch.device": torch.device,
    "torch_utils.persistence._reconstruct_persistent_obj": _reconstruct_persistent_obj,
    "dnnlib.util.EasyDict": EasyDict,
    "dnnlib.EasyDict": EasyDict,
    "numpy.dtype": np.dtype,
    "numpy.ndarray": np.ndarray,
}
for _np_mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _SAFE[f"{_np_mod}.scalar"] = _np_scalar
    _SAFE[f"{_np_mod}._reconstruct"] = _np_reconstruct
for _name, _dt in _TORCH_DTYPES.items():
    _SAFE[f"torch.{_name}"] = _dt


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the allow-list above; see the module docstring.

    ``tensors=False`` yields shape-only (``meta``) tensors; see the module docstring.
    """

    def __init__(self, f: BinaryIO, tensors: bool = True) -> None:
        super().__init__(f)
        self.tensors = tensors

    def find_class(self, module: str, name: str) -> Any:
        key = f"{module}.{name}"
        if key == "torch.storage._load_from_bytes" and not self.tensors:
            return _storage_shape_from_bytes
        if key in _SAFE:
            return _SAFE[key]
        if _IDENT.fullmatch(name) and (
            _STUB_MODULE.fullmatch(module) or (module == "torch.nn.modules.container" and name in _TORCH_CONTAINERS)
        ):
            return _stub_class(module, name)
        raise CheckpointError(
            f"refusing to load: the pickle calls {key}, which is not allowed in an official CREPS network pickle"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError("refusing to load: unexpected persistent id in a network pickle")


def read_pickle(f: BinaryIO, tensors: bool = True) -> Any:
    """Unpickle an official network pickle into stubs, tensors and plain values."""
    try:
        return RestrictedUnpickler(f, tensors=tensors).load()
    except CheckpointError:
        raise
    except (EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"truncated or corrupt pickle ({type(e).__name__}: {e})") from None
    except Exception as e:  # a malformed stream can make any rebuild raise
        raise CheckpointError(f"corrupt pickle ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------ official -> ours
def generator_stub(data: Any) -> Stub:
    """The G_ema network of an official snapshot (G as fallback)."""
    if not isinstance(data, dict):
        raise CheckpointError("pickle does not hold an official snapshot dict (expected keys G, D, G_ema)")
    for key in ("G_ema", "G"):
        stub = data.get(key)
        if isinstance(stub, Stub):
            return stub
    raise CheckpointError(f"pickle holds no G_ema or G network (keys: {sorted(map(str, data))})")


def flat_state(root: Stub) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Dotted-name state dict (parameters, persistent buffers) of a stub tree, in
    ``nn.Module.state_dict`` order, plus each module's plain state by path."""
    out: dict[str, torch.Tensor] = {}
    states: dict[str, dict[str, Any]] = {}

    def walk(node: Any, path: str) -> None:
        if not isinstance(node, Stub):
            raise CheckpointError(f"unexpected object at {path or 'the generator'} in pickle: {type(node).__name__}")
        st = node.state
        states[path] = st
        skip = st.get("_non_persistent_buffers_set") or set()
        for group in ("_parameters", "_buffers"):
            for name, t in (st.get(group) or {}).items():
                if t is None or (group == "_buffers" and name in skip):
                    continue
                if not isinstance(t, torch.Tensor):
                    raise CheckpointError(f"{path}.{name} in pickle is not a tensor")
                out[f"{path}.{name}" if path else name] = t
        for name, child in (st.get("_modules") or {}).items():
            if child is not None:
                walk(child, f"{path}.{name}" if path else name)

    walk(root, "")
    return out, states


def _num(states: dict[str, dict[str, Any]], path: str, attr: str, default: Any) -> Any:
    v = states.get(path, {}).get(attr, default)
    return default if v is None else v


def infer_config(sd: dict[str, torch.Tensor], states: dict[str, dict[str, Any]]) -> GeneratorConfig:
    """GeneratorConfig from the shapes (and recorded scalars) of an official G."""
    if "mapping.embed.weight" in sd:
        raise CheckpointError("conditional (c_dim > 0) CREPS generators are not supported")

    def shape(key: str) -> list[int]:
        if key not in sd:
            raise CheckpointError(f"not a CREPS generator: missing {key}")
        return list(sd[key].shape)

    blocks = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(r"synthesis\.b(\d+)\.fc1\.weight", k)))
    if not blocks or blocks != [2**i for i in range(2, len(blocks) + 2)]:
        raise CheckpointError(f"not a CREPS generator: line blocks {blocks} are not b4, b8, ... bR")
    res = blocks[-1]
    ch = {r: shape(f"synthesis.b{r}.fc1.weight")[0] for r in blocks}
    cmax = max(ch.values())
    below = [r for r in blocks if ch[r] < cmax]
    cbase = ch[below[0]] * below[0] if below else cmax * res
    layers = sum(1 for k in sd if re.fullmatch(r"mapping\.fc\d+\.weight", k))
    img_ch, biline = shape("synthesis.decoder_img.weight")
    in_w = shape("synthesis.b4.input.weight")
    try:
        return GeneratorConfig(
            resolution=res,
            z_dim=shape("mapping.fc0.weight")[1],
            w_dim=shape(f"mapping.fc{layers - 1}.weight")[0],
            img_channels=img_ch,
            channel_base=cbase,
            channel_max=cmax,
            biline_channels=biline,
            rank=in_w[-1] // 2,
            bandwidth=float(_num(states, "synthesis.b4.input", "bandwidth", 10.0)),
            mapping_layers=layers,
            mapping_lr=float(_num(states, "mapping.fc0", "bias_gain", 0.01)),
            w_avg_beta=float(_num(states, "mapping", "w_avg_beta", 0.998)),
            fc_clamp=float(_num(states, f"synthesis.b{res}.fc1", "fc_clamp", 256.0)),
        )
    except ValueError as e:
        raise CheckpointError(f"official generator has an unsupported shape: {e}") from None


def read_official(f: BinaryIO, tensors: bool = True) -> tuple[GeneratorConfig, dict[str, torch.Tensor]]:
    """(config, state dict) of the G_ema of an official CREPS network pickle.

    With ``tensors=False`` the state dict holds ``meta`` tensors (shapes and
    dtypes only) and the config is the one ``tensors=True`` gives, by the same
    code.
    """
    sd, states = flat_state(generator_stub(read_pickle(f, tensors=tensors)))
    return infer_config(sd, states), sd
