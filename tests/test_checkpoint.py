"""Safe, lazy checkpoint readers against what torch and safetensors write."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mlx_sora.io.checkpoint import CheckpointError, CheckpointFolder, SafetensorsReader, TorchBinReader


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    return {
        "f32": torch.randn(3, 4, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(4, 3, generator=g).bfloat16(),
        "i64": torch.arange(10, dtype=torch.int64),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "transposed": base.t(),  # non-contiguous view: strides must be honoured
        "slice": base[2:5, 1:7],  # offset into a shared storage
    }


def _check(reader, tensors):
    assert set(reader.keys()) == set(tensors)
    for name, ref in tensors.items():
        got = reader.load(name)
        assert tuple(got.shape) == tuple(ref.shape) == reader.shape(name)
        if ref.dtype == torch.bfloat16:
            assert got.dtype == mx.bfloat16
        np.testing.assert_array_equal(np.array(got.astype(mx.float32) if got.dtype == mx.bfloat16 else got),
                                      _as_numpy(ref))


def test_torch_bin_reader_rebuilds_tensors(tmp_path):
    tensors = _tensors()
    path = tmp_path / "pytorch_model.bin"
    torch.save(tensors, path)
    _check(TorchBinReader(path), tensors)


def test_safetensors_reader(tmp_path):
    tensors = {k: v.contiguous() for k, v in _tensors().items()}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    reader = SafetensorsReader(path)
    assert reader.metadata == {"format": "pt"}
    _check(reader, tensors)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_bin_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2), "evil": _Evil(marker)}, path)
    with pytest.raises(CheckpointError, match="refusing to load global"):
        TorchBinReader(path)
    assert not marker.exists()


def test_legacy_or_garbage_bin_is_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    with pytest.raises(CheckpointError, match="not a PyTorch zip checkpoint"):
        TorchBinReader(path)


def test_truncated_files_give_clear_errors(tmp_path):
    tensors = {"a": torch.randn(64, 64), "b": torch.randn(64)}
    st = tmp_path / "model.safetensors"
    save_file(tensors, str(st))
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        SafetensorsReader(st)

    bin_path = tmp_path / "pytorch_model.bin"
    torch.save(tensors, bin_path)
    bin_path.write_bytes(bin_path.read_bytes()[: bin_path.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        TorchBinReader(bin_path).load("a")


def test_folder_reads_shards_through_index(tmp_path):
    shard1, shard2 = {"x.weight": torch.randn(3, 3)}, {"y.weight": torch.randn(2)}
    torch.save(shard1, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save(shard2, tmp_path / "pytorch_model-00002-of-00002.bin")
    index = {"weight_map": {"x.weight": "pytorch_model-00001-of-00002.bin",
                            "y.weight": "pytorch_model-00002-of-00002.bin"}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(__import__("json").dumps(index))
    folder = CheckpointFolder(tmp_path)
    assert sorted(folder.keys()) == ["x.weight", "y.weight"]
    np.testing.assert_array_equal(np.array(folder.load("y.weight")), shard2["y.weight"].numpy())

    (tmp_path / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        CheckpointFolder(tmp_path)


def test_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no weights"):
        CheckpointFolder(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointFolder(tmp_path / "nope")


def test_zip_without_pickle(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/other", b"x")
    with pytest.raises(CheckpointError, match="data.pkl"):
        TorchBinReader(path)
