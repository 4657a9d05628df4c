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

import json
import math
import struct
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import numpy as np

from ..errors import CheckpointError, describe_os_error
from .torch_bin import TorchBinReader
from .untrusted import MAX_DIM, MAX_NDIM, SAFETENSORS_DTYPES, is_int, json_kind, regular_file_size, short_repr, to_mx

__all__ = [
    "CheckpointError", "CheckpointFolder", "SafetensorsReader", "TorchBinReader", "read_config",
    "validate_safetensors",
]

MAX_HEADER_BYTES = 100_000_000
"""The safetensors format's own limit on the JSON header."""
MAX_CONFIG_BYTES = 16 << 20


# ---------------------------------------------------------------- safetensors


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):  # json.loads would silently keep the last one
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise ValueError(f"the name {short_repr(name)} appears twice")
            seen.add(name)
    return result


def _read_safetensors_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """Validated (tensor entries, metadata, offset of the data region) of one safetensors file.

    The file must be exactly: u64 header length, a JSON object, then the tensors' bytes, tiling the
    data region in full (the format has no holes, overlaps or trailing bytes).
    """
    size = regular_file_size(path)
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
            f"{path}: the safetensors header is a JSON {json_kind(header)}, not an object: "
            "the file is not a safetensors file"
        )

    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map names to strings, got {short_repr(metadata)}")

    data_len = size - 8 - header_len
    entries: dict[str, dict] = {}
    for name, entry in header.items():
        where = f"{path}: tensor {short_repr(name)}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where} is a JSON {json_kind(entry)}, not an object with dtype, "
                                  "shape and data_offsets")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
        if missing:
            raise CheckpointError(f"{where} has no {' or '.join(missing)}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{where} has unsupported dtype {short_repr(dtype)} "
                                  f"(supported: {', '.join(SAFETENSORS_DTYPES)})")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(
            is_int(n) and 0 <= n <= MAX_DIM for n in shape
        ):
            raise CheckpointError(f"{where} has shape {short_repr(shape)}; a shape is a list of at most "
                                  f"{MAX_NDIM} integers between 0 and {MAX_DIM}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where} has data_offsets {short_repr(offsets)}; they must be two "
                                  "integers [begin, end] with 0 <= begin <= end")
        begin, end = offsets
        if end > data_len:
            raise CheckpointError(
                f"{path} is truncated or corrupt: tensor {short_repr(name)} lies outside the file "
                "(re-download or re-convert it)"
            )
        expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype][0].itemsize
        if end - begin != expected:
            raise CheckpointError(f"{where} has {end - begin} bytes for shape {shape} of {dtype} "
                                  f"({expected} expected)")
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}

    position, previous = 0, None
    for name, entry in sorted(entries.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        begin, end = entry["data_offsets"]
        if begin < position:
            raise CheckpointError(
                f"{path}: tensors {short_repr(previous)} and {short_repr(name)} overlap (bytes {begin}..{position} "
                "of the data): the file is corrupt or crafted"
            )
        if begin > position:
            raise CheckpointError(
                f"{path}: bytes {position}..{begin} of the data, before tensor {short_repr(name)}, belong to no "
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
        return SAFETENSORS_DTYPES[self._entries[key]["dtype"]][1]

    def load(self, key: str) -> mx.array:
        entry = self._entries[key]
        np_dtype, mx_dtype = SAFETENSORS_DTYPES[entry["dtype"]]
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
        return to_mx(raw.view(np_dtype).reshape(shape), mx_dtype)


# ---------------------------------------------------------------- a whole (possibly sharded) folder


def _read_json(path: Path, what: str) -> object:
    size = regular_file_size(path)
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
                        f"{self.folder}: tensor {short_repr(k)} is in both {self._where[k].path.name} and "
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
                    f"{index} lists shard {short_repr(name)}, which is not a {suffix} file name; shards must "
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
        raise CheckpointError(f"{path} is a JSON {json_kind(config)}, not an object: not a model config")
    return config
