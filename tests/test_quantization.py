"""Quantized weights: convert -> load -> run (int8 / int4), what is kept in full precision, streaming."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_sora
from mlx_sora.conversion.quantization import QuantizedLinear, parse_quantization
from mlx_sora.errors import UserError
from mlx_sora.models.units import run_units
from mlx_sora.runtime.streaming import StreamingWeights, plan_phase, unit_sizes

FIXTURES = Path(__file__).parent / "fixtures" / "opensora12"


def _inputs() -> dict:
    io = mx.load(str(FIXTURES / "stdit3_io.safetensors"))
    return dict(x=io["plain.x"], timestep=io["plain.timestep"], y=io["plain.y"], mask=io["plain.mask"],
                fps=io["plain.fps"], height=io["plain.height"], width=io["plain.width"])


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The fixture STDiT3 converted in float32 and, through the CLI, in int8 and int4."""
    root = tmp_path_factory.mktemp("quant")
    out = {"fp32": mlx_sora.convert(FIXTURES / "stdit3_checkpoint", root / "fp32")}
    env = dict(os.environ, MLX_SORA_BLAS_CHECKED="1")
    for name in ("int8", "int4"):
        done = subprocess.run(
            [sys.executable, "-m", "mlx_sora.convert", "--hf-path", str(FIXTURES / "stdit3_checkpoint"),
             "--mlx-path", str(root / name), "--quantize", name, "--group-size", "32"],
            capture_output=True, text=True, env=env,
        )
        assert done.returncode == 0, done.stderr
        assert f"linear layers {name}" in done.stdout
        out[name] = root / name
    return out


def test_quantized_folder_records_and_keeps_full_precision_parts(folders):
    config = json.loads((folders["int8"] / "config.json").read_text())
    assert config["mlx_sora"]["quantization"] == {"bits": 8, "group_size": 32, "mode": "affine", "layers": 28}  # 2 x 2 blocks x 7
    model = mlx_sora.load_model(folders["int8"])
    block = model.spatial_blocks[0]
    for layer in (block.attn.qkv, block.attn.proj, block.cross_attn.q_linear, block.cross_attn.kv_linear,
                  block.cross_attn.proj, block.mlp.fc1, block.mlp.fc2):
        assert isinstance(layer, QuantizedLinear) and layer.bits == 8
    # embedders and the final layer stay full precision
    assert type(model.y_embedder.y_proj.fc1) is nn.Linear and type(model.final_layer.linear) is nn.Linear
    assert type(model.t_block[1]) is nn.Linear
    int8_bytes = sum(p.stat().st_size for p in folders["int8"].glob("block_*.safetensors"))
    fp32_bytes = sum(p.stat().st_size for p in folders["fp32"].glob("block_*.safetensors"))
    assert int8_bytes < 0.4 * fp32_bytes


@pytest.mark.gpu
@pytest.mark.parametrize("name, tolerance", [("int8", 0.02), ("int4", 0.3)])
def test_quantized_outputs_are_close_to_float32(folders, name, tolerance):
    """Measured (tiny random fixture model, hidden 64): int8 max rel. error ~4e-3, int4 ~7e-2."""
    reference = np.array(mlx_sora.load_model(folders["fp32"])(**_inputs()))
    out = np.array(mlx_sora.load_model(folders[name])(**_inputs()))
    rel = np.abs(out - reference).max() / np.abs(reference).max()
    cos = (out * reference).sum() / np.linalg.norm(out) / np.linalg.norm(reference)
    assert rel < tolerance and cos > 1 - tolerance / 10, (rel, cos)


@pytest.mark.gpu
def test_quantized_folder_streams_bit_identically(folders):
    folder = folders["int8"]
    expected = np.array(mlx_sora.load_model(folder, dtype="float32")(**_inputs()))
    model = mlx_sora.load_model(folder, dtype="float32", lazy=True)
    plan = plan_phase("test", unit_sizes(model, folder, mx.float32), 10**12, 0, 0)
    weights = StreamingWeights(model, folder, plan, mx.float32)
    out = run_units(model.units, dict(_inputs(), merge=False), weights, evaluate=True)
    np.testing.assert_array_equal(np.array(out), expected)
    # streamed bytes are the quantized ones (uint32 packed weights) plus full-precision scales
    sizes = {s.name: s for s in unit_sizes(model, folder, mx.float32)}
    fp32 = {s.name: s for s in unit_sizes(mlx_sora.load_model(folders["fp32"], lazy=True), folders["fp32"],
                                            mx.float32)}
    assert sizes["block_00"].bytes < 0.45 * fp32["block_00"].bytes


def test_cpu_path_dequantizes_exactly(cpu_fast_path):
    layer = nn.Linear(128, 48)
    mx.eval(layer.parameters())
    q = QuantizedLinear(128, 48, bias=True, group_size=64, bits=8)
    q.weight, q.scales, q.biases = mx.quantize(layer.weight, group_size=64, bits=8)
    q.bias = layer.bias
    x = mx.random.normal((5, 128))
    dense = mx.dequantize(q.weight, q.scales, q.biases, group_size=64, bits=8)
    np.testing.assert_array_equal(np.array(q(x)), np.array(x @ dense.T + layer.bias))
    reference = mx.quantized_matmul(x, q.weight, q.scales, q.biases, transpose=True, group_size=64, bits=8)
    np.testing.assert_allclose(np.array(q(x)), np.array(reference + layer.bias), rtol=1e-4, atol=1e-5)


def test_save_model_quantizes_t5_blocks_only(tiny_model_folder, tmp_path):
    from mlx_sora.models import family_for_type

    config = json.loads((tiny_model_folder / "text_encoder" / "config.json").read_text())
    t5 = mlx_sora.load_model(tiny_model_folder / "text_encoder")
    config = {k: v for k, v in config.items() if k not in ("model_type", "mlx_sora")}
    out = mlx_sora.save_model(t5, tmp_path / "t5_int8", "t5", config, quantize="int8", group_size=32,
                              source_dir=tiny_model_folder / "text_encoder")
    loaded = mlx_sora.load_model(out)
    assert isinstance(loaded.blocks[0].ff.wo, QuantizedLinear)
    assert isinstance(loaded.embed_tokens, nn.Embedding) and not isinstance(loaded.embed_tokens, nn.QuantizedEmbedding)
    ids = np.array([[5, 6, 7, 1, 0]])
    mask = np.array([[1, 1, 1, 1, 0]])
    ref, got = np.array(t5(ids, mask)), np.array(loaded(ids, mask))
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.05
    assert family_for_type("t5").quantizable("blocks.0.ff.wo") and not family_for_type("t5").quantizable("embed_tokens")


@pytest.mark.parametrize("name, group", [("int3", 64), ("int8", 48), (16, 64)])
def test_bad_quantization_options(name, group):
    with pytest.raises(UserError):
        parse_quantization(name, group)
