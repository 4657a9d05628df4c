"""precision.py: each component's compute dtype, and float32 with TF32 off (the GPU path with the
device substituted: this machine has no GPU)."""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
import pytest

from mlx_sora import Pipeline
from mlx_sora.runtime import precision
from mlx_sora.runtime.streaming import unit_sizes

F32, BF16 = mx.float32, mx.bfloat16


def test_defaults_per_device(monkeypatch):
    monkeypatch.setattr(precision, "on_gpu", lambda: False)
    assert precision.default_compute_dtypes() == {"text_encoder": F32, "stdit3": F32, "vae": F32}
    monkeypatch.setattr(precision, "on_gpu", lambda: True)  # T5 in float32 as Open-Sora 1.2 runs it
    assert precision.default_compute_dtypes() == {"text_encoder": F32, "stdit3": BF16, "vae": BF16}


def test_dtype_for_all_and_text_dtype_for_t5(monkeypatch):
    monkeypatch.setattr(precision, "on_gpu", lambda: True)
    assert precision.compute_dtypes("bfloat16") == {"text_encoder": BF16, "stdit3": BF16, "vae": BF16}
    assert precision.compute_dtypes("float32") == {"text_encoder": F32, "stdit3": F32, "vae": F32}
    assert precision.compute_dtypes(None, "bfloat16") == {"text_encoder": BF16, "stdit3": BF16, "vae": BF16}
    assert precision.compute_dtypes("float16", "float32") == {"text_encoder": F32, "stdit3": mx.float16,
                                                              "vae": mx.float16}
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        precision.compute_dtypes(None, "float8")


def tf32_matmul(a: mx.array, b: mx.array) -> mx.array:
    """A float32 product whose inputs are rounded to TF32's 10-bit mantissa, as matrix units do."""

    def to_tf32(x: mx.array) -> mx.array:
        bits = np.array(x).view(np.uint32)
        return mx.array(((bits + 0x1000) & 0xFFFFE000).view(np.float32))

    return to_tf32(a) @ to_tf32(b)


def test_one_product_tells_full_float32_from_tf32():
    assert precision.matmul_relative_error() < precision.REDUCED_PRECISION_ERROR / 10  # this device: float32
    assert precision.matmul_relative_error(tf32_matmul) > 10 * precision.REDUCED_PRECISION_ERROR


def test_on_a_gpu_float32_turns_tf32_off_and_says_so(monkeypatch):
    monkeypatch.setattr(precision, "on_gpu", lambda: True)
    monkeypatch.delenv("MLX_ENABLE_TF32", raising=False)
    note = precision.full_float32_matmuls.__wrapped__()
    assert os.environ["MLX_ENABLE_TF32"] == "0"
    assert note.startswith("float32 matmuls in full precision (MLX_ENABLE_TF32=0; one product checked")
    # a user's explicit choice is kept, and what it gives is reported
    monkeypatch.setenv("MLX_ENABLE_TF32", "1")
    tf32_error = precision.matmul_relative_error(tf32_matmul)  # what a GPU with matrix units would show
    monkeypatch.setattr(precision, "matmul_relative_error", lambda: tf32_error)
    note = precision.full_float32_matmuls.__wrapped__()
    assert os.environ["MLX_ENABLE_TF32"] == "1"
    assert "REDUCED precision (MLX_ENABLE_TF32=1" in note and "Start the process with MLX_ENABLE_TF32=0" in note


def test_the_suite_claims_reference_float32():
    assert os.environ["MLX_ENABLE_TF32"] == "0"  # tests/conftest.py, before any GPU matmul
    assert "full precision" in precision.full_float32_matmuls()


def test_pipeline_sizes_each_component_in_its_own_dtype(tiny_model_folder, monkeypatch):
    """GPU defaults (device substituted): T5 planned and loaded in float32, STDiT3 and the VAE in
    bfloat16; the planner's unit sizes are those dtypes' (2 bytes per parameter against 4)."""
    import mlx_sora.pipeline as pipeline_module

    monkeypatch.setattr(precision, "on_gpu", lambda: True)
    monkeypatch.setattr(pipeline_module, "full_float32_matmuls", lambda: "float32 matmuls in full precision (test)")
    pipe = Pipeline.from_pretrained(tiny_model_folder, memory_budget="8GB")
    assert pipe.dtypes == {"text_encoder": F32, "stdit3": BF16, "vae": BF16}
    assert pipe.precision == ("compute: text_encoder float32, stdit3 bfloat16, vae bfloat16; "
                              "float32 matmuls in full precision (test)")
    for component, dtype in pipe.dtypes.items():
        skeleton = pipe.planner.skeletons[component]
        assert skeleton.compute_dtype == dtype  # its activation estimates follow it
        planned = {s.name: s.bytes for s in pipe.planner._unit_sizes(component)}
        expected = {s.name: s.bytes for s in unit_sizes(skeleton, pipe.components[component], dtype)}
        assert planned == {name: expected[name] for name in planned}
    t5_f32 = sum(s.bytes for s in pipe.planner._unit_sizes("text_encoder"))
    stdit_units = pipe.planner._unit_sizes("stdit3")
    stdit_f32 = sum(s.bytes for s in unit_sizes(pipe.planner.skeletons["stdit3"], pipe.components["stdit3"], F32))
    assert sum(s.bytes for s in stdit_units) < 0.55 * stdit_f32 and t5_f32 > 0


def test_mixed_dtypes_generate_and_report(tiny_model_folder):
    pipe = Pipeline.from_pretrained(tiny_model_folder, dtype="bfloat16", text_dtype="float32", memory_budget=None)
    result = pipe.generate("a cat", resolution="144p", aspect_ratio="1:1", num_frames=1, steps=1, seed=0)
    assert result.videos[0].shape == (1, 192, 192, 3)
    assert "compute: text_encoder float32, stdit3 bfloat16, vae bfloat16" in result.summary()
