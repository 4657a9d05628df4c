"""Reading Hugging Face checkpoints safely and lazily, tensor by tensor.

Two source formats:

* ``.safetensors``: the whole header is validated when the file is opened (``validate_safetensors``)
  and each tensor is read from a memory map on demand.
* PyTorch ``.bin`` (a zip archive holding ``data.pkl`` + raw storages): ``data.pkl`` is read with a
  restricted unpickler that only knows how to rebuild tensors and ordered dicts. No code from the
  checkpoint runs, and torch is not needed.

Checkpoints are untrusted input. Every byte range a tensor can reach is proven to lie inside its
file (or its storage) when the file is opened, before a byte of weights is read; a reader never
reads or allocates much more than the file really holds. Anything malformed raises
``CheckpointError`` naming the file and the entry.

Every reader exposes ``keys()``, ``shape(key)``, ``dtype(key)`` and ``load(key) -> mx.array``, so a
converter can walk a 19 GB checkpoint while holding one tensor at a time.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import reprlib
import stat
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import numpy as np

from .errors import CheckpointError, describe_os_error

__all__ = [
    "CheckpointError", "CheckpointFolder", "SafetensorsReader", "TorchBinReader", "read_config",
    "validate_safetensors",
]

MAX_HEADER_BYTES = 100_000_000
"""The safetensors format's own limit on the JSON header."""
MAX_DIM = 2**31 - 1
"""MLX shapes are 32-bit: a larger dimension cannot be loaded, so it is refused with a clear message."""
MAX_NDIM = 32
MAX_PICKLE_BYTES = 32 << 20
"""``data.pkl`` of a real state dict is ~150 bytes per tensor: 32 MiB is ~200k tensors."""
MAX_EXPANSION_BYTES = 64 << 20
EXPANSION_FACTOR = 4
"""A ``.bin`` tensor may be a view with zero or overlapping strides (torch's ``expand``), so it can
hold more elements than its storage. Materialising it is allowed up to
``max(MAX_EXPANSION_BYTES, EXPANSION_FACTOR * storage bytes)``; an ordinary (non-overlapping) view is
never larger than its storage, so this only refuses crafted views such as strides (0, 0) with a huge
shape."""
MAX_CONFIG_BYTES = 16 << 20

_STORAGE_KEY = re.compile(r"[A-Za-z0-9_]{1,64}")

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother = 2, 40, 40
_repr.maxtuple, _repr.maxlist, _repr.maxdict = 6, 6, 4


def _short(value: object) -> str:
    """A bounded repr of an untrusted value (no deep recursion, no megabyte strings)."""
    try:
        return _repr.repr(value)
    except Exception:  # a hostile object whose repr fails: its type is enough
        return f"<{type(value).__name__}>"


def _json_kind(value: object) -> str:
    return {dict: "object", list: "list", str: "string", int: "number", float: "number",
            bool: "boolean", type(None): "null"}.get(type(value), type(value).__name__)


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _is_int(value: object) -> bool:
    return type(value) is int  # bool (an int subclass) and floats are refused


# safetensors dtype name -> (numpy dtype used to read the bytes, mlx dtype of the result)
_SAFETENSORS_DTYPES: dict[str, tuple[np.dtype, mx.Dtype]] = {
    "F64": (np.dtype("<f8"), mx.float32),
    "F32": (np.dtype("<f4"), mx.float32),
    "F16": (np.dtype("<f2"), mx.float16),
    "BF16": (np.dtype("<u2"), mx.bfloat16),
    "I64": (np.dtype("<i8"), mx.int64),
    "I32": (np.dtype("<i4"), mx.int32),
    "I16": (np.dtype("<i2"), mx.int16),
    "I8": (np.dtype("i1"), mx.int8),
    "U8": (np.dtype("u1"), mx.uint8),
    "U32": (np.dtype("<u4"), mx.uint32),  # packed quantized weights (mx.quantize)
    "BOOL": (np.dtype("?"), mx.bool_),
}


def _to_mx(array: np.ndarray, dtype: mx.Dtype) -> mx.array:
    if dtype == mx.bfloat16:  # numpy has no bfloat16: the raw 16-bit words are reinterpreted
        return mx.array(np.asarray(array, order="C")).view(mx.bfloat16)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    return mx.array(np.asarray(array, order="C"))


def _regular_file_size(path: Path) -> int:
    """Size of ``path``; refuses folders, FIFOs and devices (opening a FIFO would block forever)."""
    try:
        info = os.stat(path)
    except OSError as e:
        raise CheckpointError(describe_os_error(e, "read")) from e
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path} is not a regular file")
    return info.st_size


# ---------------------------------------------------------------- safetensors


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):  # json.loads would silently keep the last one
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise ValueError(f"the name {_short(name)} appears twice")
            seen.add(name)
    return result


def _read_safetensors_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """Validated (tensor entries, metadata, offset of the data region) of one safetensors file.

    The file must be exactly: u64 header length, a JSON object, then the tensors' bytes, tiling the
    data region in full (the format has no holes, overlaps or trailing bytes).
    """
    size = _regular_file_size(path)
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise CheckpointError(f"{path} is too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > size - 8:
                raise CheckpointError(
                    f"{path} is truncated or corrupt: its header claims {header_len} bytes but the file "
                    f"has {size} (re-download or re-convert it)"
                )
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: the safetensors header is {header_len} bytes, over the "
                                      f"format's limit of {MAX_HEADER_BYTES}")
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"cannot read safetensors file {path}: {describe_os_error(e, 'read')}") from e
    if len(raw) != header_len:
        raise CheckpointError(f"{path} changed while it was read")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_refuse_duplicates)
    except RecursionError as e:
        raise CheckpointError(f"{path}: the safetensors header is nested too deeply to be a header") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, a duplicate name, a 5000-digit number
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: the safetensors header is a JSON {_json_kind(header)}, not an object: "
            "the file is not a safetensors file"
        )

    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map names to strings, got {_short(metadata)}")

    data_len = size - 8 - header_len
    entries: dict[str, dict] = {}
    for name, entry in header.items():
        where = f"{path}: tensor {_short(name)}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where} is a JSON {_json_kind(entry)}, not an object with dtype, "
                                  "shape and data_offsets")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
        if missing:
            raise CheckpointError(f"{where} has no {' or '.join(missing)}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{where} has unsupported dtype {_short(dtype)} "
                                  f"(supported: {', '.join(_SAFETENSORS_DTYPES)})")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(
            _is_int(n) and 0 <= n <= MAX_DIM for n in shape
        ):
            raise CheckpointError(f"{where} has shape {_short(shape)}; a shape is a list of at most "
                                  f"{MAX_NDIM} integers between 0 and {MAX_DIM}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where} has data_offsets {_short(offsets)}; they must be two "
                                  "integers [begin, end] with 0 <= begin <= end")
        begin, end = offsets
        if end > data_len:
            raise CheckpointError(
                f"{path} is truncated or corrupt: tensor {_short(name)} lies outside the file "
                "(re-download or re-convert it)"
            )
        expected = math.prod(shape) * _SAFETENSORS_DTYPES[dtype][0].itemsize
        if end - begin != expected:
            raise CheckpointError(f"{where} has {end - begin} bytes for shape {shape} of {dtype} "
                                  f"({expected} expected)")
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}

    position, previous = 0, None
    for name, entry in sorted(entries.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        begin, end = entry["data_offsets"]
        if begin < position:
            raise CheckpointError(
                f"{path}: tensors {_short(previous)} and {_short(name)} overlap (bytes {begin}..{position} "
                "of the data): the file is corrupt or crafted"
            )
        if begin > position:
            raise CheckpointError(
                f"{path}: bytes {position}..{begin} of the data, before tensor {_short(name)}, belong to no "
                "tensor (the safetensors format has no holes): the file is corrupt or crafted"
            )
        position, previous = end, name
    if position != data_len:
        raise CheckpointError(
            f"{path}: {data_len - position} bytes after the last tensor belong to no tensor: "
            "the file is corrupt or crafted (re-download or re-convert it)"
        )
    return entries, metadata, 8 + header_len


def validate_safetensors(path: str | Path) -> dict[str, dict]:
    """Check a safetensors file's whole header without reading any tensor.

    Returns tensor name -> ``{"dtype", "shape", "data_offsets"}`` (``__metadata__`` left out); raises
    ``CheckpointError`` naming the file and the entry. Cheap: reads only the header. Call it before
    handing a file to a reader that trusts the header (such as ``mx.load``).
    """
    return _read_safetensors_header(Path(path))[0]


class SafetensorsReader:
    """Lazy reader of one ``.safetensors`` file (memory-mapped, one tensor per ``load``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._entries, self.metadata, self._data_start = _read_safetensors_header(self.path)
        self._mmap: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> mx.Dtype:
        return _SAFETENSORS_DTYPES[self._entries[key]["dtype"]][1]

    def load(self, key: str) -> mx.array:
        entry = self._entries[key]
        np_dtype, mx_dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        shape = tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        if begin == end:
            return mx.zeros(shape, dtype=mx_dtype)
        if self._mmap is None:
            try:
                self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
            except (OSError, ValueError) as e:
                raise CheckpointError(f"cannot read safetensors file {self.path}: {e}") from e
        raw = self._mmap[self._data_start + begin : self._data_start + end]
        if raw.size != end - begin:  # the file shrank after it was validated
            raise CheckpointError(f"{self.path} changed while it was read: tensor {key} is cut short")
        return _to_mx(raw.view(np_dtype).reshape(shape), mx_dtype)


# ---------------------------------------------------------------- PyTorch .bin (zip + pickle)

_TORCH_STORAGES: dict[str, tuple[np.dtype, mx.Dtype]] = {
    "DoubleStorage": (np.dtype("<f8"), mx.float32),
    "FloatStorage": (np.dtype("<f4"), mx.float32),
    "HalfStorage": (np.dtype("<f2"), mx.float16),
    "BFloat16Storage": (np.dtype("<u2"), mx.bfloat16),
    "LongStorage": (np.dtype("<i8"), mx.int64),
    "IntStorage": (np.dtype("<i4"), mx.int32),
    "ShortStorage": (np.dtype("<i2"), mx.int16),
    "CharStorage": (np.dtype("i1"), mx.int8),
    "ByteStorage": (np.dtype("u1"), mx.uint8),
    "BoolStorage": (np.dtype("?"), mx.bool_),
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
            f"refusing to load global {_clip(module, 100)}.{_clip(name, 100)}: a weights file should only "
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
        _regular_file_size(self.path)
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
                f"{self.path}: expected one data.pkl in the archive, found {_short(pkl_names)}"
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
            detail = _clip(str(e))
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
                raise CheckpointError(f"{self.path}: a state dict key is {_short(name)}, not a tensor name")
            if not isinstance(value, _RawTensor):
                raise CheckpointError(f"{self.path}: entry {_short(name)} is not a tensor "
                                      f"(found {_short(value)})")
            tensors[name] = self._validate_tensor(name, value, storages)
        return tensors

    def _validate_storage(
        self, where: str, raw: _RawStorage, storages: dict[str, _StorageRef]
    ) -> _StorageRef:
        pid = raw.pid
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{where}: unexpected persistent id {_short(pid)}")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if not (type(storage_type) is _StorageType and type(storage_type.name) is str
                and storage_type.name in _TORCH_STORAGES):  # BUILD opcodes can set any name
            raise CheckpointError(f"{where}: unexpected storage type {_short(storage_type)}")
        if not (isinstance(key, str) and _STORAGE_KEY.fullmatch(key)):
            raise CheckpointError(f"{where}: storage key {_short(key)} is not a plain name")
        if not _is_int(numel) or numel < 0:
            raise CheckpointError(f"{where}: storage {key} declares {_short(numel)} elements")
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
        where = f"{self.path}: tensor {_short(name)}"
        args = raw.args
        if type(args) is not tuple or len(args) < 4:
            raise CheckpointError(f"{where} is rebuilt from malformed arguments {_short(args)}")
        storage, offset, shape, stride = args[:4]
        if not isinstance(storage, _RawStorage):
            raise CheckpointError(f"{where}: {_short(storage)} stands where its storage belongs")
        ref = self._validate_storage(where, storage, storages)
        if not _is_int(offset) or offset < 0:
            raise CheckpointError(f"{where} has storage offset {_short(offset)}; it must be an integer >= 0")
        if type(shape) not in (tuple, list) or type(stride) not in (tuple, list):
            raise CheckpointError(f"{where} has shape {_short(shape)} and strides {_short(stride)}; "
                                  "both must be sequences of integers")
        if len(shape) != len(stride):
            raise CheckpointError(f"{where} has {len(shape)} dimensions but {len(stride)} strides")
        if len(shape) > MAX_NDIM:
            raise CheckpointError(f"{where} has {len(shape)} dimensions (at most {MAX_NDIM} are supported)")
        if not all(_is_int(n) and 0 <= n <= MAX_DIM for n in shape):
            raise CheckpointError(f"{where} has shape {_short(shape)}; dimensions must be integers "
                                  f"between 0 and {MAX_DIM}")
        if not all(_is_int(s) and s >= 0 for s in stride):
            raise CheckpointError(f"{where} has strides {_short(stride)}; strides must be integers >= 0")
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
                f"{_clip(str(e))}); re-download the file"
            ) from e
        if len(raw) != nbytes:
            raise CheckpointError(f"{self.path} is truncated: storage {ref.storage.key} is short")
        reachable = np.frombuffer(raw, dtype=np_dtype)
        # Safe: at open time every element (offset + sum(i_k * stride_k)) was proven < end.
        view = np.lib.stride_tricks.as_strided(
            reachable, shape=ref.shape, strides=tuple(s * itemsize for s in ref.stride), writeable=False
        )
        return _to_mx(view, mx_dtype)


# ---------------------------------------------------------------- a whole (possibly sharded) folder


def _read_json(path: Path, what: str) -> object:
    size = _regular_file_size(path)
    if size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path} is {size} bytes, too large for {what}")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise CheckpointError(describe_os_error(e, "read")) from e
    except RecursionError as e:
        raise CheckpointError(f"{path} is nested too deeply to be {what}") from e
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download it") from e


class CheckpointFolder:
    """All weight files of a Hugging Face snapshot folder behind one lazy key -> tensor view.

    Prefers ``*.safetensors``; falls back to ``pytorch_model*.bin``. Sharded checkpoints are read
    through their ``*.index.json`` when present so that a missing shard is named; the index may only
    name plain files inside the folder.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder {self.folder} does not exist")
        files = self._weight_files()
        self._readers: list[SafetensorsReader | TorchBinReader] = []
        self._where: dict[str, SafetensorsReader | TorchBinReader] = {}
        for path in files:
            reader = SafetensorsReader(path) if path.suffix == ".safetensors" else TorchBinReader(path)
            self._readers.append(reader)
            for k in reader.keys():
                if k in self._where:
                    raise CheckpointError(
                        f"{self.folder}: tensor {_short(k)} is in both {self._where[k].path.name} and "
                        f"{path.name}; the checkpoint is inconsistent (re-download it)"
                    )
                self._where[k] = reader

    def _shards_from_index(self, index: Path, suffix: str) -> list[Path]:
        data = _read_json(index, "a checkpoint index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} has no weight_map of tensor name -> shard file; re-download it")
        names = sorted(set(weight_map.values()))
        for name in names:
            if (name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
                    or not name.endswith(suffix)):
                raise CheckpointError(
                    f"{index} lists shard {_short(name)}, which is not a {suffix} file name; shards must "
                    f"be plain file names inside {self.folder}"
                )
        missing = [n for n in names if not (self.folder / n).is_file()]
        if missing:
            raise CheckpointError(
                f"{self.folder}: shards listed in {index.name} are missing: {missing} "
                "(the download is incomplete: run the conversion again)"
            )
        return [self.folder / n for n in names]

    def _weight_files(self) -> list[Path]:
        for suffix, index_name in ((".safetensors", "model.safetensors.index.json"),
                                   (".bin", "pytorch_model.bin.index.json")):
            index = self.folder / index_name
            if index.exists():
                return self._shards_from_index(index, suffix)
            files = sorted(p for p in self.folder.glob(f"*{suffix}") if p.is_file())
            if files:
                return files
        raise CheckpointError(
            f"no weights in {self.folder}: expected *.safetensors or pytorch_model*.bin files"
        )

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def dtype(self, key: str) -> mx.Dtype:
        return self._where[key].dtype(key)

    def load(self, key: str) -> mx.array:
        return self._where[key].load(key)

    def items(self) -> Iterator[tuple[str, mx.array]]:
        for k in self._where:
            yield k, self.load(k)


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder} has no config.json: is it a model folder?")
    config = _read_json(path, "a model config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is a JSON {_json_kind(config)}, not an object: not a model config")
    return config
