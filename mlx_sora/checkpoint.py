"""Reading Hugging Face checkpoints safely and lazily, tensor by tensor.

Two source formats:

* ``.safetensors``: the header is parsed here and each tensor is read from a memory map on demand.
* PyTorch ``.bin`` (a zip archive holding ``data.pkl`` + raw storages): ``data.pkl`` is read with a
  restricted unpickler that only knows how to rebuild tensors and ordered dicts. No code from the
  checkpoint runs, and torch is not needed.

Every reader exposes ``keys()``, ``shape(key)``, ``dtype(key)`` and ``load(key) -> mx.array``, so a
converter can walk a 19 GB checkpoint while holding one tensor at a time.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or not of the expected kind."""


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
    "BOOL": (np.dtype("?"), mx.bool_),
}


def _to_mx(array: np.ndarray, dtype: mx.Dtype) -> mx.array:
    if dtype == mx.bfloat16:  # numpy has no bfloat16: the raw 16-bit words are reinterpreted
        return mx.array(np.asarray(array, order="C")).view(mx.bfloat16)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    return mx.array(np.asarray(array, order="C"))


class SafetensorsReader:
    """Lazy reader of one ``.safetensors`` file (memory-mapped, one tensor per ``load``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                raw_len = f.read(8)
                if len(raw_len) != 8:
                    raise CheckpointError(f"{self.path} is too short to be a safetensors file")
                (header_len,) = struct.unpack("<Q", raw_len)
                size = self.path.stat().st_size
                if header_len > size - 8 or header_len > 100_000_000:
                    raise CheckpointError(f"{self.path}: corrupt safetensors header (length {header_len})")
                header = json.loads(f.read(header_len))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read safetensors file {self.path}: {e}") from e
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries: dict[str, dict] = header
        self._data_start = 8 + header_len
        data_len = size - self._data_start
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            if entry["dtype"] not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {entry['dtype']}")
            if not 0 <= begin <= end <= data_len:
                raise CheckpointError(
                    f"{self.path} is truncated or corrupt: tensor {name} lies outside the file "
                    "(re-download or re-convert it)"
                )
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
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = entry["data_offsets"]
        raw = self._mmap[self._data_start + begin : self._data_start + end]
        shape = tuple(entry["shape"])
        if raw.size != int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize:
            raise CheckpointError(f"{self.path}: tensor {key} has {raw.size} bytes for shape {shape}")
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


@dataclass(frozen=True)
class _StorageRef:
    key: str
    storage_type: str
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class _StorageType:
    name: str


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused) -> _TensorRef:
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *_unused):
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds only tensor references; any other global in the pickle is refused."""

    _ALLOWED = {
        ("collections", "OrderedDict"): dict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _TORCH_STORAGES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: a weights file should only hold tensors"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1], pid[2], pid[3], pid[4]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unexpected storage type {storage_type!r}")
        return _StorageRef(str(key), storage_type.name, int(numel))


class TorchBinReader:
    """Lazy reader of a PyTorch zip checkpoint (``torch.save`` format since torch 1.6)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (OSError, zipfile.BadZipFile) as e:
            raise CheckpointError(
                f"{self.path} is not a PyTorch zip checkpoint ({e}); legacy (pre-1.6) pickles and "
                "corrupt downloads are not read: re-download the file"
            ) from e
        pkl_names = [n for n in self._zip.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl_names) != 1:
            raise CheckpointError(f"{self.path}: expected one data.pkl in the archive, found {pkl_names}")
        self._prefix = pkl_names[0][: -len("data.pkl")]
        try:
            with self._zip.open(pkl_names[0]) as f:
                state = _RestrictedUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError) as e:
            raise CheckpointError(f"cannot read {self.path}: {e}") from e
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, _TensorRef) for v in state.values()):
            raise CheckpointError(f"{self.path} does not hold a flat state dict of tensors")
        self._tensors: dict[str, _TensorRef] = state
        self._cached: tuple[str, np.ndarray] | None = None

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._tensors[key].shape

    def dtype(self, key: str) -> mx.Dtype:
        return _TORCH_STORAGES[self._tensors[key].storage.storage_type][1]

    def _storage(self, ref: _StorageRef) -> np.ndarray:
        if self._cached is None or self._cached[0] != ref.key:
            np_dtype = _TORCH_STORAGES[ref.storage_type][0]
            try:
                raw = self._zip.read(f"{self._prefix}data/{ref.key}")
            except (KeyError, zipfile.BadZipFile, OSError) as e:
                raise CheckpointError(f"{self.path} is corrupt: storage {ref.key} unreadable ({e})") from e
            if len(raw) < ref.numel * np_dtype.itemsize:
                raise CheckpointError(f"{self.path} is truncated: storage {ref.key} is short")
            self._cached = (ref.key, np.frombuffer(raw, dtype=np_dtype, count=ref.numel))
        return self._cached[1]

    def load(self, key: str) -> mx.array:
        ref = self._tensors[key]
        storage = self._storage(ref.storage)
        itemsize = storage.dtype.itemsize
        if ref.shape and ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride)) >= storage.size:
            raise CheckpointError(f"{self.path}: tensor {key} lies outside its storage")
        view = np.lib.stride_tricks.as_strided(
            storage[ref.offset :],
            shape=ref.shape,
            strides=tuple(s * itemsize for s in ref.stride),
        )
        return _to_mx(np.array(view), _TORCH_STORAGES[ref.storage.storage_type][1])


# ---------------------------------------------------------------- a whole (possibly sharded) folder


class CheckpointFolder:
    """All weight files of a Hugging Face snapshot folder behind one lazy key -> tensor view.

    Prefers ``*.safetensors``; falls back to ``pytorch_model*.bin``. Sharded checkpoints are read
    through their ``*.index.json`` when present so that a missing shard is named.
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
                self._where[k] = reader

    def _weight_files(self) -> list[Path]:
        for suffix, index_name in ((".safetensors", "model.safetensors.index.json"),
                                   (".bin", "pytorch_model.bin.index.json")):
            index = self.folder / index_name
            if index.exists():
                weight_map = json.loads(index.read_text())["weight_map"]
                names = sorted(set(weight_map.values()))
                missing = [n for n in names if not (self.folder / n).exists()]
                if missing:
                    raise CheckpointError(
                        f"{self.folder}: shards listed in {index_name} are missing: {missing} "
                        "(the download is incomplete: run the conversion again)"
                    )
                return [self.folder / n for n in names]
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
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
