"""The replay's own kernels (ops coremltools has no value inference for) against MLX, and the replay
of coremltools' value inference on a saved package against the program it was built from."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

pytest.importorskip("coremltools")

from mlx_sora.coreml.mil import Net, mb  # noqa: E402
from mlx_sora.coreml.package import build_function, convert_unit, save_model  # noqa: E402
from mlx_sora.coreml.replay import KERNELS, PackageReplay, replay_function  # noqa: E402
from mlx_sora.coreml.spec import TensorSpec, UnitFunction  # noqa: E402
from mlx_sora.models.vae_spatial import upsample_nearest_2x  # noqa: E402


def run(build, *inputs: np.ndarray) -> np.ndarray:
    specs = tuple(TensorSpec(f"x{i}", x.shape) for i, x in enumerate(inputs))
    function, _ = build_function(UnitFunction("main", specs, lambda net, v: {"y": build(net, *v.values())}))
    return replay_function(function, {f"x{i}": x for i, x in enumerate(inputs)})["y"]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("kernel, stride, padding", [
    ((3, 3), (1, 1), (1, 1, 1, 1)),
    ((3, 3), (2, 2), (0, 1, 0, 1)),  # the VAE encoder's downsampling: pad right/bottom, stride 2
    ((1, 1), (1, 1), (0, 0, 0, 0)),
    ((2, 3), (1, 2), (1, 0, 2, 1)),
])
def test_conv2d_kernel_equals_mlx(rng, kernel, stride, padding):
    x = rng.standard_normal((2, 5, 9, 11)).astype(np.float32)
    w = rng.standard_normal((7, 5, *kernel)).astype(np.float32)
    b = rng.standard_normal(7).astype(np.float32)
    got = run(lambda net, v: net.conv(v, w, b, padding, "conv", strides=stride), x)
    padded = np.pad(x.transpose(0, 2, 3, 1), [(0, 0), padding[:2], padding[2:], (0, 0)])
    want = mx.conv2d(mx.array(padded), mx.array(w.transpose(0, 2, 3, 1)), stride=stride) + mx.array(b)
    assert got.shape == tuple(want.transpose(0, 3, 1, 2).shape)
    assert rel(got, np.array(want).transpose(0, 3, 1, 2)) < 1e-6


def test_causal_conv3d_kernel_equals_mlx(rng):
    x = rng.standard_normal((1, 4, 5, 6, 7)).astype(np.float32)
    w = rng.standard_normal((6, 4, 3, 3, 3)).astype(np.float32)
    got = run(lambda net, v: net.conv(v, w, None, (2, 0, 1, 1, 1, 1), "conv"), x)  # 2 frames in front
    padded = np.pad(x.transpose(0, 2, 3, 4, 1), [(0, 0), (2, 0), (1, 1), (1, 1), (0, 0)])
    want = np.array(mx.conv3d(mx.array(padded), mx.array(w.transpose(0, 2, 3, 4, 1)))).transpose(0, 4, 1, 2, 3)
    assert rel(got, want) < 1e-6


def test_float16_conv_accumulates_in_float32(rng):
    x = rng.standard_normal((1, 64, 8, 8)).astype(np.float16)
    w = (rng.standard_normal((8, 64, 3, 3)) / 24).astype(np.float16)

    class Op:  # the kernel reads its inputs as coremltools ops expose them
        def __init__(self, **values):
            for name, value in values.items():
                setattr(self, name, None if value is None else type("V", (), {"val": value})())

    op = Op(x=x, weight=w, bias=None, strides=np.array([1, 1]), dilations=np.array([1, 1]), groups=np.int32(1),
            pad_type="custom", pad=np.array([1, 1, 1, 1]))
    got = KERNELS["conv"](op)
    assert got.dtype == np.float16
    want = np.array(mx.conv2d(mx.array(np.pad(x.astype(np.float32).transpose(0, 2, 3, 1), [(0, 0), (1, 1), (1, 1), (0, 0)])),
                              mx.array(w.astype(np.float32).transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
    assert np.abs(got.astype(np.float32) - want).max() <= np.abs(want).max() * 2**-10  # one float16 rounding


def test_upsample_kernel_equals_mlx(rng):
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    got = run(lambda net, v: net.upsample2x(v), x)
    want = np.array(upsample_nearest_2x(mx.array(x.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(got, want)


def _op(op_type: str, **values):
    class Var:
        def __init__(self, val):
            self.val = val

    return type(op_type, (), {k: (None if v is None else Var(v)) for k, v in values.items()})()


def test_silu_kernel_equals_mlx(rng):
    x = (rng.standard_normal((3, 40)) * 6).astype(np.float32)
    got = KERNELS["silu"](_op("silu", x=x))
    assert rel(got, np.array(nn.silu(mx.array(x)))) < 1e-6


def test_batch_norm_kernel_equals_mlx(rng):
    x = rng.standard_normal((2, 6, 4, 5)).astype(np.float32)
    mean, var, gamma, beta = (rng.standard_normal(6).astype(np.float32) for _ in range(4))
    var = np.abs(var) + 0.1
    got = KERNELS["batch_norm"](_op("batch_norm", x=x, mean=mean, variance=var, gamma=gamma, beta=beta,
                                    epsilon=np.float32(1e-5)))
    shape = (1, 6, 1, 1)
    want = (mx.array(x) - mx.array(mean).reshape(shape)) * mx.rsqrt(mx.array(var).reshape(shape) + 1e-5)
    want = want * mx.array(gamma).reshape(shape) + mx.array(beta).reshape(shape)
    assert rel(got, np.array(want)) < 1e-6


def test_instance_norm_kernel_equals_mlx(rng):
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    gamma, beta = rng.standard_normal(3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    got = KERNELS["instance_norm"](_op("instance_norm", x=x, gamma=gamma, beta=beta, epsilon=np.float32(1e-6)))
    norm = nn.GroupNorm(3, 3, eps=1e-6, pytorch_compatible=True)  # one group per channel = instance norm
    norm.weight, norm.bias = mx.array(gamma), mx.array(beta)
    want = np.array(norm(mx.array(x.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
    assert rel(got, want) < 1e-6


def test_saved_package_replays_as_the_built_program(rng, tmp_path):
    """Passes fuse ops (silu, batch_norm from GroupNorm's affine, layer_norm) and cast to float16; the
    float32 package replays to the numbers of the program it was built from, within float32 rounding."""
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    gamma, beta = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)

    def build(net: Net, inputs: dict) -> dict:
        h = net.conv(inputs["x"], w, None, (1, 1, 1, 1), "conv")
        h = net.group_norm(h, 2, gamma, beta, 1e-6, "norm", silu=True)
        return {"y": mb().reduce_mean(x=net.upsample2x(h), axes=[1], keep_dims=True, name=net.name("mean"))}

    fn = UnitFunction("main", (TensorSpec("x", (1, 4, 6, 6)),), build)
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    built = replay_function(build_function(fn)[0], {"x": x})["y"]
    model, info = convert_unit([fn], "float32", "none")
    save_model(model, tmp_path / "unit.mlpackage")
    replay = PackageReplay(tmp_path / "unit.mlpackage")
    ops = {op.op_type for op in replay.program.functions["main"].operations}
    assert {"conv", "silu", "upsample_nearest_neighbor"} <= ops  # our kernels ran
    assert rel(replay({"x": x})["y"], built) < 1e-5  # fused ops round differently


@pytest.mark.parametrize("groups", [(1, 1), (4, 1), (2, 3)])
def test_palette_expansion_equals_coremltools(rng, groups):
    """Our expansion of a palettized weight against coremltools' own (which repeats the palette to every
    element: fine at this size, 21 GB for a T5-XXL weight)."""
    from coremltools.optimize._utils import lut_to_dense

    shape = (8, 12)
    lut = rng.standard_normal((*groups, 16, 1)).astype(np.float16)
    indices = rng.integers(0, 16, shape).astype(np.uint8)
    op = _op("constexpr_lut_to_dense", indices=indices, lut=lut, vector_axis=None)
    op.materialized_val_inference = lambda: None  # ours must not fall back on scalar palettes
    got = KERNELS["constexpr_lut_to_dense"](op)
    np.testing.assert_array_equal(got, lut_to_dense(indices, lut))
