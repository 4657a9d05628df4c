"""The PyTorch ``.bin`` checkpoint reader (a zip archive holding ``data.pkl`` + raw storages).

``data.pkl`` is read with a restricted unpickler that only knows how to rebuild tensors and ordered
dicts: no code from the checkpoint runs, and torch is not needed. Every tensor reference is validated
once the pickle is read (types, shapes, strides, offsets, storage sizes against the zip members), so
every element a tensor can reach is proven inside its storage before a byte of weights is read, and a
read decompresses no more than the tensor needs.
"""

from __future__ import annotations

import io
import math
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import CheckpointError
from .untrusted import MAX_DIM, MAX_NDIM, SAFETENSORS_DTYPES, clip_text, is_int, regular_file_size, short_repr, to_mx

MAX_PICKLE_BYTES = 32 << 20
"""``data.pkl`` of a real state dict is ~150 bytes per tensor: 32 MiB is ~200k tensors."""
MAX_EXPANSION_BYTES = 64 << 20
EXPANSION_FACTOR = 4
"""A ``.bin`` tensor may be a view with zero or overlapping strides (torch's ``expand``), so it can
hold more elements than its storage. Materialising it is allowed up to
``max(MAX_EXPANSION_BYTES, EXPANSION_FACTOR * storage bytes)``; an ordinary (non-overlapping) view is
never larger than its storage, so this only refuses crafted views such as strides (0, 0) with a huge
shape."""

_STORAGE_KEY = re.compile(r"[A-Za-z0-9_]{1,64}")


_TORCH_STORAGES: dict[str, tuple[np.dtype, mx.Dtype]] = {
    name: SAFETENSORS_DTYPES[code]
    for name, code in (
        ("DoubleStorage", "F64"), ("FloatStorage", "F32"), ("HalfStorage", "F16"), ("BFloat16Storage", "BF16"),
        ("LongStorage", "I64"), ("IntStorage", "I32"), ("ShortStorage", "I16"), ("CharStorage", "I8"),
        ("ByteStorage", "U8"), ("BoolStorage", "BOOL"),
    )
}


# What the unpickler builds. They hold the pickle's raw arguments and are validated only once the
# whole pickle is loaded: BUILD opcodes can still change objects until then.
class _StorageType:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _RawStorage:
    __slots__ = ("pid",)

    def __init__(self, pid: object):
        self.pid = pid


class _RawTensor:
    __slots__ = ("args",)

    def __init__(self, args: tuple):
        self.args = args


class _PickledDict(dict):
    """Stand-in for ``collections.OrderedDict``: torch sets ``_metadata`` on state dicts (a BUILD
    opcode), which lands in this object's ``__dict__`` and is ignored."""


def _rebuild_tensor(*args) -> _RawTensor:
    return _RawTensor(args)


def _rebuild_parameter(data=None, *_unused):
    return data


@dataclass(frozen=True)
class _StorageRef:
    key: str
    storage_type: str
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    """A validated tensor: elements ``[first, end)`` of its storage hold every element it reaches."""

    storage: _StorageRef
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    first: int
    end: int


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds only tensor references; any other global in the pickle is refused."""

    _ALLOWED = {
        ("collections", "OrderedDict"): _PickledDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _TORCH_STORAGES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"refusing to load global {clip_text(module, 100)}.{clip_text(name, 100)}: a weights file should only "
            "hold tensors"
        )

    def persistent_load(self, pid):
        return _RawStorage(pid)


class TorchBinReader:
    """Lazy reader of a PyTorch zip checkpoint (``torch.save`` format since torch 1.6).

    Opening validates every tensor: its storage reference, offset, shape and strides, and that the
    last element it reaches lies inside its storage, whose declared size must equal the size of its
    archive member. ``load`` then decompresses only the bytes the tensor reaches.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        regular_file_size(self.path)
        try:
            self._zip = zipfile.ZipFile(self.path)
            names = self._zip.namelist()
        except Exception as e:  # BadZipFile, OSError, and whatever else a crafted directory triggers
            raise CheckpointError(
                f"{self.path} is not a PyTorch zip checkpoint ({e}); legacy (pre-1.6) pickles and "
                "corrupt downloads are not read: re-download the file"
            ) from e
        pkl_names = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl_names) != 1:
            raise CheckpointError(
                f"{self.path}: expected one data.pkl in the archive, found {short_repr(pkl_names)}"
            )
        self._prefix = pkl_names[0][: -len("data.pkl")]
        state = self._unpickle(pkl_names[0])
        self._tensors = self._validate_state(state)

    def _unpickle(self, name: str) -> object:
        info = self._zip.getinfo(name)
        if info.file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(f"{self.path}: {name} is {info.file_size} bytes, too large for a "
                                  f"state dict (limit {MAX_PICKLE_BYTES})")
        try:
            with self._zip.open(info) as f:
                data = f.read(MAX_PICKLE_BYTES + 1)  # never trust the declared size alone
            if len(data) > MAX_PICKLE_BYTES:
                raise CheckpointError(f"{self.path}: {name} is larger than its declared size")
            return _RestrictedUnpickler(io.BytesIO(data)).load()
        except CheckpointError:
            raise
        # Any failure while unpickling untrusted bytes is the file's fault (truncated, wrong opcodes,
        # bad persistent ids, a huge declared length -> MemoryError, deep nesting -> RecursionError);
        # the unpickler runs none of our logic beyond wrapping its arguments.
        except Exception as e:
            detail = clip_text(str(e))
            if isinstance(e, MemoryError):
                detail = "it declares an object too large for memory"
            raise CheckpointError(
                f"cannot read {self.path}: {type(e).__name__}: {detail} "
                "(the file is corrupt, truncated or not a plain state dict)"
            ) from e

    def _validate_state(self, state: object) -> dict[str, _TensorRef]:
        if type(state) in (dict, _PickledDict) and type(state.get("state_dict")) in (dict, _PickledDict):
            state = state["state_dict"]
        if type(state) not in (dict, _PickledDict):
            found = "a single tensor" if isinstance(state, _RawTensor) else f"a {type(state).__name__}"
            raise CheckpointError(f"{self.path} does not hold a state dict of tensors (found {found})")
        storages: dict[str, _StorageRef] = {}
        tensors: dict[str, _TensorRef] = {}
        for name, value in state.items():
            if not isinstance(name, str):
                raise CheckpointError(f"{self.path}: a state dict key is {short_repr(name)}, not a tensor name")
            if not isinstance(value, _RawTensor):
                raise CheckpointError(f"{self.path}: entry {short_repr(name)} is not a tensor "
                                      f"(found {short_repr(value)})")
            tensors[name] = self._validate_tensor(name, value, storages)
        return tensors

    def _validate_storage(
        self, where: str, raw: _RawStorage, storages: dict[str, _StorageRef]
    ) -> _StorageRef:
        pid = raw.pid
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{where}: unexpected persistent id {short_repr(pid)}")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if not (type(storage_type) is _StorageType and type(storage_type.name) is str
                and storage_type.name in _TORCH_STORAGES):  # BUILD opcodes can set any name
            raise CheckpointError(f"{where}: unexpected storage type {short_repr(storage_type)}")
        if not (isinstance(key, str) and _STORAGE_KEY.fullmatch(key)):
            raise CheckpointError(f"{where}: storage key {short_repr(key)} is not a plain name")
        if not is_int(numel) or numel < 0:
            raise CheckpointError(f"{where}: storage {key} declares {short_repr(numel)} elements")
        ref = _StorageRef(key, storage_type.name, numel)
        known = storages.get(key)
        if known is not None:
            if known != ref:
                raise CheckpointError(
                    f"{where}: storage {key} is declared twice with different types or sizes"
                )
            return known
        member = f"{self._prefix}data/{key}"
        try:
            info = self._zip.getinfo(member)
        except KeyError:
            raise CheckpointError(f"{where}: its storage {member} is missing from the archive "
                                  "(re-download the file)") from None
        nbytes = numel * _TORCH_STORAGES[ref.storage_type][0].itemsize
        if info.file_size != nbytes:
            raise CheckpointError(
                f"{where}: storage {key} declares {numel} elements ({nbytes} bytes) but its archive "
                f"member holds {info.file_size} bytes: the file is corrupt or crafted"
            )
        storages[key] = ref
        return ref

    def _validate_tensor(self, name: str, raw: _RawTensor, storages: dict[str, _StorageRef]) -> _TensorRef:
        where = f"{self.path}: tensor {short_repr(name)}"
        args = raw.args
        if type(args) is not tuple or len(args) < 4:
            raise CheckpointError(f"{where} is rebuilt from malformed arguments {short_repr(args)}")
        storage, offset, shape, stride = args[:4]
        if not isinstance(storage, _RawStorage):
            raise CheckpointError(f"{where}: {short_repr(storage)} stands where its storage belongs")
        ref = self._validate_storage(where, storage, storages)
        if not is_int(offset) or offset < 0:
            raise CheckpointError(f"{where} has storage offset {short_repr(offset)}; it must be an integer >= 0")
        if type(shape) not in (tuple, list) or type(stride) not in (tuple, list):
            raise CheckpointError(f"{where} has shape {short_repr(shape)} and strides {short_repr(stride)}; "
                                  "both must be sequences of integers")
        if len(shape) != len(stride):
            raise CheckpointError(f"{where} has {len(shape)} dimensions but {len(stride)} strides")
        if len(shape) > MAX_NDIM:
            raise CheckpointError(f"{where} has {len(shape)} dimensions (at most {MAX_NDIM} are supported)")
        if not all(is_int(n) and 0 <= n <= MAX_DIM for n in shape):
            raise CheckpointError(f"{where} has shape {short_repr(shape)}; dimensions must be integers "
                                  f"between 0 and {MAX_DIM}")
        if not all(is_int(s) and s >= 0 for s in stride):
            raise CheckpointError(f"{where} has strides {short_repr(stride)}; strides must be integers >= 0")
        shape, stride = tuple(shape), tuple(s if n > 1 else 0 for n, s in zip(shape, stride))
        numel = math.prod(shape)
        if numel == 0:
            return _TensorRef(ref, shape, stride, offset, offset)
        # Python ints: exact whatever the sizes. Strides are >= 0, so the reachable elements are
        # offset .. last, all of which must lie in the storage.
        last = offset + sum((n - 1) * s for n, s in zip(shape, stride))
        if last >= ref.numel:
            raise CheckpointError(
                f"{where} reaches element {last} of storage {ref.key}, which holds {ref.numel} elements: "
                "it lies outside its storage (the file is corrupt or crafted)"
            )
        itemsize = _TORCH_STORAGES[ref.storage_type][0].itemsize
        materialised, stored = numel * itemsize, ref.numel * itemsize
        if materialised > max(MAX_EXPANSION_BYTES, EXPANSION_FACTOR * stored):
            raise CheckpointError(
                f"{where} is a view of shape {shape} with strides {stride} that would expand its "
                f"{stored}-byte storage into {materialised} bytes: refusing a crafted view"
            )
        return _TensorRef(ref, shape, stride, offset, last + 1)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._tensors[key].shape

    def dtype(self, key: str) -> mx.Dtype:
        return _TORCH_STORAGES[self._tensors[key].storage.storage_type][1]

    def load(self, key: str) -> mx.array:
        ref = self._tensors[key]
        np_dtype, mx_dtype = _TORCH_STORAGES[ref.storage.storage_type]
        if ref.first == ref.end:
            return mx.zeros(ref.shape, dtype=mx_dtype)
        itemsize = np_dtype.itemsize
        begin, nbytes = ref.first * itemsize, (ref.end - ref.first) * itemsize
        member = f"{self._prefix}data/{ref.storage.key}"
        try:
            with self._zip.open(member) as f:
                if self._zip.getinfo(member).compress_type == zipfile.ZIP_STORED:
                    f.seek(begin)
                else:  # decompress up to the tensor in small chunks (seek() would use 16 MiB ones)
                    while begin > 0:
                        skipped = len(f.read(min(begin, 1 << 18)))
                        if skipped == 0:
                            break
                        begin -= skipped
                raw = f.read(nbytes)
        except Exception as e:  # zlib/zip/CRC/IO errors of a corrupt archive
            raise CheckpointError(
                f"{self.path} is corrupt: storage {ref.storage.key} is unreadable ({type(e).__name__}: "
                f"{clip_text(str(e))}); re-download the file"
            ) from e
        if len(raw) != nbytes:
            raise CheckpointError(f"{self.path} is truncated: storage {ref.storage.key} is short")
        reachable = np.frombuffer(raw, dtype=np_dtype)
        # Safe: at open time every element (offset + sum(i_k * stride_k)) was proven < end.
        view = np.lib.stride_tricks.as_strided(
            reachable, shape=ref.shape, strides=tuple(s * itemsize for s in ref.stride), writeable=False
        )
        return to_mx(view, mx_dtype)
