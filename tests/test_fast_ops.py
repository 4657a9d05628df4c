"""The CPU kernels of ``mlx_sora.models.fast_ops`` against float64 references and MLX's own ops, on the
CPU device with the fast path on (``cpu_fast_path``: on a Mac the default device is the GPU, where
these functions are MLX's own)."""

from __future__ import annotations

import math
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_sora.models import fast_ops
from mlx_sora.models.conv import conv_by_taps, upsample2x_conv3x3
from mlx_sora.models.stdit3_layers import CaptionKeys, MultiHeadCrossAttention

pytestmark = pytest.mark.usefixtures("cpu_fast_path")


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def test_exp_relative_error_and_limits():
    x = np.concatenate([np.linspace(-87.3, 88.0, 400_001), [0.0, -1e-30, 1e-30]]).astype(np.float32)
    got, ref = _np(fast_ops.exp(mx.array(x))), np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - ref) / ref) < 2e-7  # MLX's CPU exp: ~2.4e-7
    # below the normal range exp underflows to 0 (no denormals), NaN stays NaN
    low = _np(fast_ops.exp(mx.array([-88.0, -100.0, -np.inf, np.nan], dtype=mx.float32)))
    assert np.array_equal(low[:3], [0.0, 0.0, 0.0]) and np.isnan(low[3])


def test_gelu_tanh_matches_the_formula():
    x = np.linspace(-12, 12, 200_001).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3)))
    got = _np(fast_ops.gelu_tanh(mx.array(x)))
    # the rational tanh is within ~6 float32 ulp of 1 (torch's float32 GELU: within ~4e-7 absolute)
    assert np.max(np.abs(got - ref) / np.maximum(1.0, np.abs(x64))) < 3e-7
    mlx = _np(nn.gelu_approx(mx.array(x)))
    assert np.max(np.abs(got - mlx)) < 2e-6
    assert fast_ops.gelu_tanh(mx.array(x[:10]).astype(mx.bfloat16)).dtype == mx.bfloat16


def test_silu_relative_error():
    x = np.linspace(-60, 60, 200_001).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = x64 / (1 + np.exp(-x64))
    got = _np(fast_ops.silu(mx.array(x)))
    nonzero = ref != 0
    assert np.max(np.abs(got - ref)[nonzero] / np.abs(ref[nonzero])) < 3e-7


@pytest.mark.parametrize("shape", [(3, 5, 17), (2, 4, 144, 144), (1, 1, 1)])
def test_softmax(shape):
    x = mx.random.normal(shape, key=mx.random.key(0)) * 8
    ref = mx.softmax(x.astype(mx.float32), axis=-1, precise=True)
    assert float(mx.abs(fast_ops.softmax(x) - ref).max()) < 1e-6


@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_attention_matches_mlx_sdpa(mask_kind):
    keys = mx.random.split(mx.random.key(1), 4)
    q, k, v = (mx.random.normal((2, 4, n, 16), key=kk) for n, kk in zip((33, 40, 40), keys))
    mask = None
    if mask_kind == "bool":
        mask = mx.random.uniform(shape=(2, 1, 1, 40), key=keys[3]) > 0.3
    elif mask_kind == "additive":
        mask = mx.random.normal((1, 4, 33, 40), key=keys[3])
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    got = fast_ops.attention(q, k, v, scale=0.25, mask=mask)
    assert float(mx.abs(got - ref).max() / mx.abs(ref).max()) < 1e-6


def test_off_switch_gives_mlx_ops(monkeypatch):
    """MLX_SORA_FAST_OPS=0 runs MLX's own kernels on the CPU too: the code a GPU runs."""
    x = mx.random.normal((4096,), key=mx.random.key(9)) * 4
    assert fast_ops.fast_cpu()
    fast_gelu, fast_silu = fast_ops.gelu_tanh(x), fast_ops.silu(x)
    assert not mx.array_equal(fast_gelu, nn.gelu_approx(x)) and not mx.array_equal(fast_silu, nn.silu(x))
    monkeypatch.setenv("MLX_SORA_FAST_OPS", "0")
    assert not fast_ops.fast_cpu()
    assert mx.array_equal(fast_ops.gelu_tanh(x), nn.gelu_approx(x))
    assert mx.array_equal(fast_ops.silu(x), nn.silu(x))


@pytest.mark.parametrize("fold", [0, 1])
def test_conv_by_taps_2d(fold):
    x = mx.random.normal((2, 9, 7, 5), key=mx.random.key(2))
    conv = nn.Conv2d(5, 6, 3, padding=1)
    got = conv_by_taps(x, conv.weight, conv.bias, [(1, 1), (1, 1)], fold=fold)
    ref = conv(x)
    assert got.shape == ref.shape
    assert float(mx.abs(got - ref).max() / mx.abs(ref).max()) < 1e-6


@pytest.mark.parametrize("fold", [0, 1, 2])
def test_conv_by_taps_causal_3d(fold):
    x = mx.random.normal((1, 4, 6, 5, 3), key=mx.random.key(3))
    conv = nn.Conv3d(3, 4, 3, padding=(0, 1, 1))
    got = conv_by_taps(x, conv.weight, conv.bias, [(2, 0), (1, 1), (1, 1)], fold=fold)
    ref = conv(mx.pad(x, [(0, 0), (2, 0), (0, 0), (0, 0), (0, 0)]))
    assert got.shape == ref.shape
    assert float(mx.abs(got - ref).max() / mx.abs(ref).max()) < 1e-6


def test_conv_by_taps_pointwise_without_bias():
    x = mx.random.normal((2, 3, 4, 8))
    w = mx.random.normal((5, 1, 1, 8))
    got = conv_by_taps(x, w, None, [(0, 0), (0, 0)])
    assert mx.allclose(got, x @ w.reshape(5, 8).T, atol=1e-5)


def test_caption_keys_drop_only_keys_no_sample_attends_to():
    mask = np.array([[1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 0, 0]], dtype=bool)
    keys = CaptionKeys.from_mask(mask)
    assert keys.index.tolist() == [0, 1, 2, 4]
    assert np.array_equal(np.array(keys.mask[:, 0, 0]), mask[:, [0, 1, 2, 4]])
    same = CaptionKeys.from_mask(np.array([[1, 1, 0], [1, 1, 0]], dtype=bool))
    assert same.index.tolist() == [0, 1] and same.mask is None  # equal lengths: no mask at all
    full = CaptionKeys.from_mask(np.ones((2, 3), dtype=bool))
    assert full.index is None and full.mask is None and full.arrays() == []


def test_packed_cross_attention_equals_the_masked_one():
    mx.random.seed(4)
    attn = MultiHeadCrossAttention(32, 4)
    x, y = mx.random.normal((2, 10, 32)), mx.random.normal((2, 12, 32))
    mask = np.zeros((2, 12), dtype=bool)
    mask[0, :5], mask[1, :8] = True, True
    packed = attn(x, y, CaptionKeys.from_mask(mask))
    masked = attn(x, y, mx.array(mask)[:, None, None, :])
    assert float(mx.abs(packed - masked).max()) < 1e-6


def test_upsample_conv_on_the_small_grid():
    from mlx_sora.models.vae_spatial import upsample_nearest_2x

    x = mx.random.normal((2, 5, 7, 6), key=mx.random.key(5))
    conv = nn.Conv2d(6, 8, 3, padding=1)
    ref = conv(upsample_nearest_2x(x))
    got = upsample2x_conv3x3(x, conv.weight, conv.bias)
    assert got.shape == ref.shape
    assert float(mx.abs(got - ref).max() / mx.abs(ref).max()) < 1e-6


class _CountingBlock:
    """A VAE resnet block that counts how it is driven: whole (``__call__``) or step by step."""

    def __init__(self, block):
        self.block, self.whole, self.stepped = block, 0, 0

    def __call__(self, x: mx.array) -> mx.array:
        self.whole += 1
        return self.block(x)

    def steps(self, x: mx.array):
        self.stepped += 1
        yield from self.block.steps(x)


@pytest.mark.parametrize("fast", ["1", "0"])
def test_one_part_runs_whole_layers_and_several_parts_step_by_step(monkeypatch, fast):
    """One stream (a GPU, the fast path off, one core): the layer is one evaluation; the same numbers
    as step by step. Several parts on the CPU: step by step, all parts' steps together."""
    from mlx_sora.models.vae_spatial import ResnetBlock2D

    monkeypatch.setenv("MLX_SORA_FAST_OPS", fast)
    mx.random.seed(6)
    block = ResnetBlock2D(32, 48, 8)
    x = mx.random.normal((2, 12, 10, 32))
    stepped = list(block.steps(x))[-1]
    mx.eval(stepped)
    layer = _CountingBlock(block)
    (whole,) = fast_ops.CpuParallel(1).run(layer, [x])
    assert (layer.whole, layer.stepped) == (1, 0)
    assert mx.array_equal(whole, stepped)
    if fast == "1":
        parts = fast_ops.CpuParallel(2).run(layer, [x[:1], x[1:]])
        assert (layer.whole, layer.stepped) == (1, 2)
        assert mx.array_equal(mx.concatenate(parts), stepped)


def test_cpu_parts_without_sched_getaffinity(monkeypatch):
    """macOS has no os.sched_getaffinity: one part per CPU the OS reports, at most 8."""
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.delenv("MLX_SORA_CPU_PARTS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 12)
    assert fast_ops.cpu_parts() == 8
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert fast_ops.cpu_parts() == 4
    monkeypatch.setenv("MLX_SORA_CPU_PARTS", "1")
    assert fast_ops.cpu_parts() == 1
