"""Hostile and malformed checkpoints: every one is refused with a CheckpointError naming the file
(and the entry), before a byte outside the file is read and without large allocations.

The files are crafted by hand: ``.bin`` archives laid out as ``torch.save`` does (``archive/data.pkl``
+ ``archive/data/<key>``), whose pickle calls ``torch._utils._rebuild_tensor_v2`` with crafted
arguments, and safetensors files with crafted headers. Every test runs under an address-space cap
(``memory_cap``), so an unbounded allocation fails the test instead of the machine.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import HEADROOM, address_space

from mlx_sora.errors import UserError
from mlx_sora.io import checkpoint, torch_bin
from mlx_sora.io.checkpoint import (
    CheckpointError,
    CheckpointFolder,
    SafetensorsReader,
    TorchBinReader,
    read_config,
    validate_safetensors,
)

FIXTURES = Path(__file__).parent / "fixtures" / "opensora12"
pytestmark = pytest.mark.usefixtures("memory_cap")  # conftest: address space capped at +1 GiB


def test_memory_cap_is_in_force():
    if address_space() is None:
        pytest.skip("no /proc: the cap is Linux-only")
    with pytest.raises(MemoryError):  # np.empty touches no page: harmless should the cap be missing
        np.empty(HEADROOM + (1 << 30), dtype=np.uint8)


# ---------------------------------------------------------------- crafting .bin archives


class Storage:
    """Pickled as torch's persistent id ("storage", torch.<Kind>Storage, key, "cpu", numel)."""

    def __init__(self, key="0", numel=4, kind="FloatStorage", pid=None):
        self.key, self.numel, self.kind, self.pid = key, numel, kind, pid


class Tensor:
    """Pickled as torch does: _rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())."""

    def __init__(self, storage=None, offset=0, shape=(4,), stride=(1,)):
        self.storage = Storage() if storage is None else storage
        self.offset, self.shape, self.stride = offset, shape, stride

    def __reduce__(self):
        args = (self.storage, self.offset, self.shape, self.stride, False, collections.OrderedDict())
        return torch._utils._rebuild_tensor_v2, args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            if obj.pid is not None:
                return obj.pid
            return ("storage", getattr(torch, obj.kind), obj.key, "cpu", obj.numel)
        return None


def dumps(state) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(state)
    return buffer.getvalue()


def float_bytes(n: int) -> bytes:
    return np.arange(n, dtype="<f4").tobytes()


def write_bin(path: Path, state=None, storages: dict[str, bytes] | None = None,
              pickle_bytes: bytes | None = None, compression: int = zipfile.ZIP_STORED) -> Path:
    if storages is None:
        storages = {"0": float_bytes(4)}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", dumps(state) if pickle_bytes is None else pickle_bytes)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data, compress_type=compression)
    return path


def refused(path: Path, *fragments: str, load: str | None = None) -> str:
    """Open (and load ``load``) and return the CheckpointError message; it must name the file."""
    with pytest.raises(CheckpointError) as info:
        reader = TorchBinReader(path)
        if load is not None:
            reader.load(load)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    return message


@pytest.fixture
def bin_path(tmp_path) -> Path:
    return tmp_path / "pytorch_model.bin"


def test_crafted_archive_is_what_torch_reads(bin_path):
    """The crafting helpers are faithful: torch itself loads a well-formed crafted file the same way."""
    state = {"w": Tensor(Storage("0", 6), offset=1, shape=(2, 2), stride=(1, 2)),
             "s": Tensor(Storage("0", 6), offset=5, shape=(), stride=())}
    write_bin(bin_path, state, {"0": float_bytes(6)})
    reference = torch.load(bin_path, weights_only=True)
    reader = TorchBinReader(bin_path)
    for name in state:
        np.testing.assert_array_equal(np.array(reader.load(name)), reference[name].numpy())
    np.testing.assert_array_equal(np.array(reader.load("w")), [[1, 3], [2, 4]])


# ---------------------------------------------------------------- .bin: memory safety


def test_negative_storage_offset(bin_path):
    # the case: leaked heap bytes were written into the converted weights with exit code 0
    write_bin(bin_path, {"w": Tensor(offset=-1000)})
    refused(bin_path, "'w'", "storage offset -1000")


@pytest.mark.parametrize("stride", [(-1,), (-(2**40),), (1, -3)])
def test_negative_strides(bin_path, stride):
    shape = (4,) if len(stride) == 1 else (2, 2)
    write_bin(bin_path, {"w": Tensor(Storage(numel=16), shape=shape, stride=stride)}, {"0": float_bytes(16)})
    refused(bin_path, "'w'", "strides")


def test_scalar_with_offset_beyond_storage(bin_path):
    write_bin(bin_path, {"w": Tensor(offset=4, shape=(), stride=())})
    refused(bin_path, "'w'", "outside its storage")


@pytest.mark.parametrize("offset, shape, stride", [(1, (4,), (1,)), (0, (2, 3), (3, 1)), (0, (3,), (2,))])
def test_view_reaching_past_its_storage(bin_path, offset, shape, stride):
    write_bin(bin_path, {"w": Tensor(offset=offset, shape=shape, stride=stride)})
    refused(bin_path, "'w'", "outside its storage")


def test_storage_member_larger_than_declared_is_refused_before_reading(bin_path):
    # the case: a 306 KB file was decompressed whole (665 MB). 16 MiB of zeros deflate to ~16 KB.
    write_bin(bin_path, {"w": Tensor(Storage(numel=4))}, {"0": bytes(16 << 20)},
              compression=zipfile.ZIP_DEFLATED)
    assert bin_path.stat().st_size < 100_000
    refused(bin_path, "'w'", "declares 4 elements (16 bytes)", f"holds {16 << 20} bytes")


def test_storage_member_shorter_than_declared(bin_path):
    write_bin(bin_path, {"w": Tensor(Storage(numel=400))}, {"0": float_bytes(4)})
    refused(bin_path, "'w'", "declares 400 elements")


def test_only_the_bytes_a_tensor_reaches_are_decompressed(bin_path):
    numel = 4 << 20  # a 16 MiB storage, deflated; the tensor reads 4 elements at its end
    state = {"w": Tensor(Storage(numel=numel), offset=numel - 4)}
    write_bin(bin_path, state, {"0": bytes(4 * numel)}, compression=zipfile.ZIP_DEFLATED)
    reader = TorchBinReader(bin_path)
    tracemalloc.start()
    try:
        value = reader.load("w")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(np.array(value), np.zeros(4, np.float32))
    assert peak < 4 << 20, f"reading 16 bytes allocated {peak} bytes"


def test_zero_strides_with_a_huge_shape_fail_fast(bin_path):
    # the case: tens of GB were allocated before failing
    write_bin(bin_path, {"w": Tensor(shape=(1 << 20, 1 << 20), stride=(0, 0))})
    start = time.perf_counter()
    refused(bin_path, "'w'", "expand", "crafted view")
    assert time.perf_counter() - start < 1.0


def test_small_expanded_views_still_load(tmp_path):
    """torch's expand() saves stride-0 views (e.g. transformers' position_ids): they stay legal."""
    path = tmp_path / "pytorch_model.bin"
    tensors = {"pos": torch.arange(7).expand(1, -1), "grid": torch.tensor([1.0, 2.0]).expand(3, 2),
               "empty": torch.zeros(0, 5), "one": torch.ones(1, 3)}
    torch.save(tensors, path)
    reader = TorchBinReader(path)
    for name, ref in tensors.items():
        np.testing.assert_array_equal(np.array(reader.load(name)), ref.numpy())


def test_size_one_dimension_with_huge_stride_is_legal(bin_path):
    # torch ignores the stride of a size-1 dimension; it must not overflow the view's byte strides
    write_bin(bin_path, {"w": Tensor(shape=(1, 4), stride=(2**70, 1))})
    np.testing.assert_array_equal(np.array(TorchBinReader(bin_path).load("w")), [[0, 1, 2, 3]])


def test_module_state_dict_with_metadata_loads(tmp_path):
    """module.state_dict() carries _metadata (set through a pickle BUILD): read, not refused."""
    path = tmp_path / "pytorch_model.bin"
    state = torch.nn.Linear(3, 2).state_dict()
    torch.save(state, path)
    reader = TorchBinReader(path)
    assert sorted(reader.keys()) == ["bias", "weight"]
    np.testing.assert_array_equal(np.array(reader.load("weight")), state["weight"].numpy())


# ---------------------------------------------------------------- .bin: malformed structure


@pytest.mark.parametrize(
    "tensor, fragment",
    [
        (Tensor(shape=(2, 2), stride=(1,)), "2 dimensions but 1 strides"),
        (Tensor(shape=(4,), stride=(1, 1)), "1 dimensions but 2 strides"),
        (Tensor(offset=1.5), "storage offset 1.5"),
        (Tensor(offset=True), "storage offset True"),
        (Tensor(shape=("4",)), "shape ('4',)"),
        (Tensor(shape=(-4,), stride=(1,)), "shape (-4,)"),
        (Tensor(shape=(True,)), "shape (True,)"),
        (Tensor(shape=(2**63,)), "dimensions must be integers between 0 and"),
        (Tensor(stride=(1.0,)), "strides (1.0,)"),
        (Tensor(shape={"a": 1}, stride=(1,)), "sequences of integers"),
        (Tensor(shape=(1,) * 40, stride=(1,) * 40), "40 dimensions"),
        (Tensor(storage={"not": "a storage"}), "stands where its storage belongs"),
        (Tensor(storage=Storage(key="../../etc/passwd")), "not a plain name"),
        (Tensor(storage=Storage(key=7)), "not a plain name"),
        (Tensor(storage=Storage(numel=-4)), "declares -4 elements"),
        (Tensor(storage=Storage(numel="4")), "declares '4' elements"),
        (Tensor(storage=Storage(pid="storage")), "unexpected persistent id"),
        (Tensor(storage=Storage(pid=("storage", "FloatStorage", "0", "cpu"))), "unexpected persistent id"),
        (Tensor(storage=Storage(pid=("module", None, "0", "cpu", 4))), "unexpected persistent id"),
        (Tensor(storage=Storage(pid=("storage", "FloatStorage", "0", "cpu", 4))), "unexpected storage type"),
        (Tensor(storage=Storage(key="1")), "missing from the archive"),
    ],
)
def test_malformed_tensor_references(bin_path, tensor, fragment):
    write_bin(bin_path, {"w": tensor})
    refused(bin_path, "'w'", fragment)


def test_unknown_storage_type_is_refused(bin_path):
    write_bin(bin_path, {"w": Tensor(Storage(kind="ComplexFloatStorage"))})
    refused(bin_path, "refusing to load global torch.ComplexFloatStorage")


def test_storage_declared_twice_with_different_sizes(bin_path):
    write_bin(bin_path, {"a": Tensor(Storage(numel=4)), "b": Tensor(Storage(numel=2), shape=(2,))})
    refused(bin_path, "'b'", "declared twice")


@pytest.mark.parametrize(
    "state, fragment",
    [
        ([Tensor()], "does not hold a state dict"),
        ({"w": 3}, "entry 'w' is not a tensor"),
        ({"w": {"nested": Tensor()}}, "entry 'w' is not a tensor"),
        ({5: Tensor()}, "a state dict key is 5"),
        ({"state_dict": {"w": "text"}}, "entry 'w' is not a tensor"),
    ],
)
def test_state_that_is_not_a_flat_dict_of_tensors(bin_path, state, fragment):
    write_bin(bin_path, state)
    refused(bin_path, fragment)


def _tensor_pickle(storage_ops: bytes) -> bytes:
    """{"w": _rebuild_tensor_v2(storage, 0, (4,), (1,), False)} whose storage type comes from memo 0,
    built by ``storage_ops``."""
    return (b"\x80\x02" + storage_ops + b"q\x000}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n"
            b"((X\x07\x00\x00\x00storageh\x00X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ"
            b"K\x00K\x04\x85K\x01\x85\x89tRs.")


def test_pickle_opcodes_that_mutate_objects_after_creation(bin_path):
    """BUILD can set attributes of what the unpickler made (slot state): validated after loading."""
    plain = b"ctorch\nFloatStorage\n"
    write_bin(bin_path, pickle_bytes=_tensor_pickle(plain))
    np.testing.assert_array_equal(np.array(TorchBinReader(bin_path).load("w")), [0, 1, 2, 3])
    renamed = plain + b"N}X\x04\x00\x00\x00name]s\x86b"  # BUILD (None, {"name": []})
    write_bin(bin_path, pickle_bytes=_tensor_pickle(renamed))
    refused(bin_path, "'w'", "unexpected storage type")


def test_truncated_pickle(bin_path):
    data = dumps({"w": Tensor()})
    write_bin(bin_path, pickle_bytes=data[: len(data) // 2])
    refused(bin_path, "cannot read")


def test_deeply_nested_pickle(bin_path):
    depth = 200_000  # EMPTY_LIST x depth, then APPEND x (depth - 1): lists nested 200k deep
    data = b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."
    write_bin(bin_path, pickle_bytes=data)
    refused(bin_path, "does not hold a state dict")
    data = b"\x80\x02}X\x01\x00\x00\x00w" + b"]" * depth + b"a" * (depth - 1) + b"s."  # {"w": [[[...]]]}
    write_bin(bin_path, pickle_bytes=data)
    refused(bin_path, "entry 'w' is not a tensor")


def test_pickle_declaring_a_huge_bytes_object(bin_path):
    # BINBYTES8 with a 2**40-byte length: the unpickler must not allocate it
    write_bin(bin_path, pickle_bytes=b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"xx.")
    refused(bin_path, "cannot read")


def test_oversized_pickle(bin_path, monkeypatch):
    monkeypatch.setattr(torch_bin, "MAX_PICKLE_BYTES", 64)
    write_bin(bin_path, {"w": Tensor(), "v": Tensor()})
    refused(bin_path, "too large for a state dict")


def test_pickled_code_never_runs(bin_path, tmp_path):
    marker = tmp_path / "pwned"

    class Exec:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    write_bin(bin_path, {"w": Exec()})
    refused(bin_path, "refusing to load global", "exec")
    assert not marker.exists()


def test_corrupt_storage_bytes_give_a_clear_error(bin_path):
    write_bin(bin_path, {"w": Tensor()}, {"0": os.urandom(16)}, compression=zipfile.ZIP_DEFLATED)
    raw = bytearray(bin_path.read_bytes())
    start = raw.index(b"archive/data/0") + len("archive/data/0")  # the local header's name; data follows
    raw[start : start + 16] = bytes(16)
    bin_path.write_bytes(bytes(raw))
    refused(bin_path, "storage 0", load="w")


def test_not_a_regular_file(tmp_path):
    fifo = tmp_path / "pytorch_model.bin"
    os.mkfifo(fifo)
    refused(fifo, "not a regular file")  # and does not block reading a FIFO
    with pytest.raises(CheckpointError, match="not a regular file"):
        SafetensorsReader(fifo)


# ---------------------------------------------------------------- safetensors


def write_safetensors(path: Path, header, data: bytes = b"", raw_header: bytes | None = None) -> Path:
    encoded = json.dumps(header).encode() if raw_header is None else raw_header
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


@pytest.fixture
def st_path(tmp_path) -> Path:
    return tmp_path / "model.safetensors"


def st_refused(path: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        SafetensorsReader(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    with pytest.raises(CheckpointError):
        validate_safetensors(path)
    return message


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F16", "shape": [2, 2], "data_offsets": [8, 16]}}


def entry(**fields):
    base = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    base.update(fields)
    return {key: value for key, value in base.items() if value is not None}


def test_valid_file_passes_validation(st_path):
    write_safetensors(st_path, {"__metadata__": {"format": "pt"}, **GOOD}, bytes(16))
    assert validate_safetensors(st_path) == GOOD
    reader = SafetensorsReader(st_path)
    assert reader.metadata == {"format": "pt"} and reader.shape("b") == (2, 2)


def test_mlx_written_file_passes_validation(tmp_path):
    """What the converter writes (mx.save_safetensors) is accepted, including empty tensors."""
    path = tmp_path / "unit.safetensors"
    arrays = {"w": mx.ones((3, 2)), "e": mx.zeros((0,)), "h": mx.ones((5,), mx.bfloat16)}
    mx.save_safetensors(str(path), arrays, metadata={"format": "mlx"})
    assert set(validate_safetensors(path)) == {"w", "e", "h"}
    assert SafetensorsReader(path).load("h").dtype == mx.bfloat16


@pytest.mark.parametrize(
    "header, fragment",
    [
        ([1, 2], "is a JSON list, not an object"),
        (7, "is a JSON number, not an object"),
        ("x", "is a JSON string, not an object"),
        ({"a": "F32"}, "tensor 'a' is a JSON string, not an object"),
        ({"a": entry(dtype=None)}, "tensor 'a' has no dtype"),
        ({"a": entry(data_offsets=None)}, "tensor 'a' has no data_offsets"),
        ({"a": entry(shape=None)}, "tensor 'a' has no shape"),
        ({"a": entry(dtype="F8_E4M3")}, "unsupported dtype 'F8_E4M3'"),
        ({"a": entry(dtype=4)}, "unsupported dtype 4"),
        ({"a": entry(data_offsets=["0", "8"])}, "data_offsets ['0', '8']"),
        ({"a": entry(data_offsets=[0.0, 8.0])}, "data_offsets [0.0, 8.0]"),
        ({"a": entry(data_offsets=[0, 8, 9])}, "data_offsets [0, 8, 9]"),
        ({"a": entry(data_offsets=[8, 0])}, "data_offsets [8, 0]"),
        ({"a": entry(data_offsets=[-8, 0])}, "data_offsets [-8, 0]"),
        ({"a": entry(shape=[-2])}, "shape [-2]"),
        ({"a": entry(shape=["2"])}, "shape ['2']"),
        ({"a": entry(shape=[True, 2])}, "shape [True, 2]"),
        ({"a": entry(shape=2)}, "shape 2"),
        ({"a": entry(shape=[2**62, 2**62])}, "integers between 0 and"),  # numel overflows int64
        ({"a": entry(shape=[2**64])}, "integers between 0 and"),
        ({"a": entry(shape=[3])}, "has 8 bytes for shape [3] of F32 (12 expected)"),
        ({"__metadata__": ["x"], "a": entry()}, "__metadata__ must map names to strings"),
        ({"__metadata__": {"k": 1}, "a": entry()}, "__metadata__ must map names to strings"),
    ],
)
def test_malformed_headers(st_path, header, fragment):
    write_safetensors(st_path, header, bytes(8))
    st_refused(st_path, fragment)


def test_overlapping_tensors(st_path):
    # "b" silently duplicated part of "a" before
    header = {"a": entry(shape=[4], data_offsets=[0, 16]), "b": entry(data_offsets=[8, 16])}
    write_safetensors(st_path, header, bytes(16))
    st_refused(st_path, "'a'", "'b'", "overlap")


def test_trailing_bytes(st_path):
    write_safetensors(st_path, {"a": entry()}, bytes(8 + 100))
    st_refused(st_path, "100 bytes after the last tensor")


def test_hole_between_tensors(st_path):
    write_safetensors(st_path, {"a": entry(), "b": entry(data_offsets=[12, 20])}, bytes(20))
    st_refused(st_path, "bytes 8..12", "'b'", "no holes")


def test_tensor_outside_the_file(st_path):
    write_safetensors(st_path, {"a": entry(shape=[4], data_offsets=[0, 16])}, bytes(8))
    st_refused(st_path, "truncated or corrupt", "'a'")


def test_deeply_nested_header(st_path):
    depth = 100_000
    write_safetensors(st_path, None, raw_header=b"[" * depth + b"]" * depth)
    st_refused(st_path, "nested too deeply")
    write_safetensors(st_path, None, raw_header=b'{"a": ' + b"[" * depth + b"]" * depth + b"}")
    st_refused(st_path, "nested too deeply")


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
         b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', "'a' appears twice"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b'{"a": ', "not valid JSON"),
        (b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 8]}}',
         "not valid JSON"),  # a 5000-digit number
    ],
)
def test_unparseable_headers(st_path, raw, fragment):
    write_safetensors(st_path, None, bytes(8), raw_header=raw)
    st_refused(st_path, fragment)


def test_header_length_beyond_the_file(st_path):
    st_path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    st_refused(st_path, "truncated or corrupt")
    st_path.write_bytes(b"abc")
    st_refused(st_path, "too short")


def test_header_over_the_format_limit(st_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "MAX_HEADER_BYTES", 16)
    write_safetensors(st_path, {"a": entry()}, bytes(8))
    st_refused(st_path, "over the format's limit")


# ---------------------------------------------------------------- folders and configs


def _good_shard(path: Path, name: str) -> None:
    write_safetensors(path, {name: entry()}, bytes(8))


@pytest.mark.parametrize("shard", ["../model.safetensors", "/etc/model.safetensors", "sub/model.safetensors",
                                   "..", "model.bin", ""])
def test_index_naming_files_outside_the_folder(tmp_path, shard):
    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    _good_shard(tmp_path / "model.safetensors", "x")
    _good_shard(folder / "sub" / "model.safetensors", "x")
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": shard}}))
    with pytest.raises(CheckpointError, match="shards must be plain file names") as info:
        CheckpointFolder(folder)
    assert str(index) in str(info.value)


@pytest.mark.parametrize("text, fragment", [("{not json", "not valid JSON"), ("[1]", "no weight_map"),
                                            ('{"weight_map": ["a"]}', "no weight_map"),
                                            ('{"weight_map": {"x": 3}}', "no weight_map"),
                                            ("[" * 100_000 + "]" * 100_000, "nested too deeply")])
def test_invalid_index(tmp_path, text, fragment):
    _good_shard(tmp_path / "model.safetensors", "x")
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=fragment) as info:
        CheckpointFolder(tmp_path)
    assert "model.safetensors.index.json" in str(info.value)


def test_tensor_in_two_shards(tmp_path):
    _good_shard(tmp_path / "a.safetensors", "x")
    _good_shard(tmp_path / "b.safetensors", "x")
    with pytest.raises(CheckpointError, match="'x' is in both a.safetensors and b.safetensors"):
        CheckpointFolder(tmp_path)


def test_hostile_shard_in_a_folder_is_named(tmp_path):
    write_bin(tmp_path / "pytorch_model.bin", {"w": Tensor(offset=-8)})
    with pytest.raises(CheckpointError, match="storage offset -8") as info:
        CheckpointFolder(tmp_path)
    assert str(tmp_path / "pytorch_model.bin") in str(info.value)


@pytest.mark.parametrize("text, fragment", [("[1, 2]", "is a JSON list, not an object"),
                                            ("{", "not valid JSON"), (b"\xff\xfe", "not valid JSON"),
                                            ("[" * 100_000 + "]" * 100_000, "nested too deeply")])
def test_bad_config(tmp_path, text, fragment):
    path = tmp_path / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CheckpointError, match=fragment) as info:
        read_config(tmp_path)
    assert str(path) in str(info.value)


def test_config_that_is_a_folder(tmp_path):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_config(tmp_path)


# ---------------------------------------------------------------- through the convert CLI


@pytest.mark.parametrize(
    "name, make, fragment",
    [
        ("pytorch_model.bin", lambda p: write_bin(p, {"w": Tensor(offset=-1000)}), "storage offset -1000"),
        ("pytorch_model.bin", lambda p: write_bin(p, {"w": Tensor(shape=(1 << 20, 1 << 20), stride=(0, 0))}),
         "crafted view"),
        ("model.safetensors", lambda p: write_safetensors(p, [1, 2]), "is a JSON list"),
        ("model.safetensors", lambda p: write_safetensors(
            p, {"a": entry(shape=[4], data_offsets=[0, 16]), "b": entry(data_offsets=[8, 16])}, bytes(16)),
         "overlap"),
    ],
)
def test_convert_cli_refuses_hostile_checkpoints(tmp_path, name, make, fragment):
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(FIXTURES / "vae_v12_checkpoint" / "config.json", source)
    make(source / name)
    result = subprocess.run(
        [sys.executable, "-m", "mlx_sora.convert", "--hf-path", str(source),
         "--mlx-path", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert str(source / name) in lines[0]
    assert fragment in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, fragment", [("[1, 2]", "must hold a JSON object"), ("{", "JSONDecodeError"),
                                            (b"\xff\xfe", "UnicodeDecodeError"),
                                            ("[" * 100_000 + "]" * 100_000, "RecursionError")])
def test_our_own_json_files_damaged_are_one_clear_error(tmp_path, text, fragment):
    """A converted folder's config.json, a model's defaults.json, a device table: whatever is wrong,
    one error naming the file and the fix (read_json_object), never a traceback."""
    from mlx_sora.conversion.loading import load_model
    from mlx_sora.conversion.registry import GenerationDefaults
    from mlx_sora.errors import UserError
    from mlx_sora.io.untrusted import read_json_object

    path = tmp_path / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UserError, match=fragment) as info:
        read_json_object(path, "make it again", UserError)
    assert str(path) in str(info.value) and str(info.value).endswith("make it again")
    with pytest.raises(CheckpointError, match=f"{fragment}.*convert the model again"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match=f"{fragment}.*restore it from the package"):
        GenerationDefaults.from_file(path)
