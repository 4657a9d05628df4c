"""winograd.conv3x3 (F(2x2, 3x3)) against float64 convolutions, the tap-by-tap product and nn.Conv*: a
CPU fast-path kernel, tested on the CPU device with the fast path on (``cpu_fast_path``)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_sora.models import fast_ops, winograd
from mlx_sora.models.conv import conv_by_taps
from mlx_sora.models.vae_spatial import Conv2d
from mlx_sora.models.vae_temporal import CausalConv3d

pytestmark = pytest.mark.usefixtures("cpu_fast_path")


def reference(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, time_padding: tuple[int, int]) -> np.ndarray:
    """float64 correlation, channels-last: x [N, T, H, W, C], w [O, kt, 3, 3, C], zero padding 1 in H, W."""
    x = np.pad(x, [(0, 0), time_padding, (1, 1), (1, 1), (0, 0)])
    n, frames, h, w_, _ = x.shape
    o, kt = w.shape[:2]
    out = np.zeros((n, frames - kt + 1, h - 2, w_ - 2, o))
    for k in range(kt):
        for i in range(3):
            for j in range(3):
                out += x[:, k : k + frames - kt + 1, i : i + h - 2, j : j + w_ - 2] @ w[:, k, i, j].T
    return out if b is None else out + b


def case(rng, n, frames, h, w, c, o, kt, bias=True):
    x = rng.standard_normal((n, frames, h, w, c))
    weight = rng.standard_normal((o, kt, 3, 3, c)) / np.sqrt(9 * c * kt)
    b = rng.standard_normal(o) if bias else None
    return x, weight, b


def relative(ours: mx.array, ref: np.ndarray) -> float:
    return float(np.abs(np.array(ours, dtype=np.float64) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize(
    "n, h, w, c, o, bias",
    [(2, 9, 7, 32, 48, True), (1, 24, 24, 128, 128, True), (3, 5, 12, 64, 32, False), (1, 1, 6, 32, 32, True)],
)
def test_2d_matches_float64_and_beats_taps(n, h, w, c, o, bias):
    x, weight, b = case(np.random.default_rng(h * w + c), n, 1, h, w, c, o, 1, bias)
    ref = reference(x, weight, b, (0, 0))[:, 0]
    xm, wm = mx.array(x[:, 0], dtype=mx.float32), mx.array(weight[:, 0], dtype=mx.float32)
    bm = None if b is None else mx.array(b, dtype=mx.float32)
    ours = winograd.conv3x3(xm, wm, bm)
    taps = conv_by_taps(xm, wm, bm, [(1, 1), (1, 1)])
    assert ours.shape == (n, h, w, o)
    err, taps_err = relative(ours, ref), relative(taps, ref)
    assert err < 1e-6, err
    assert err <= 1.5 * taps_err + 1e-7, (err, taps_err)  # no worse than the direct product


@pytest.mark.parametrize("frames, kt, time_padding", [(5, 3, (2, 0)), (4, 3, (1, 1)), (3, 1, (0, 0))])
def test_3d_time_taps_match_float64(frames, kt, time_padding):
    x, weight, b = case(np.random.default_rng(frames + kt), 2, frames, 8, 10, 32, 64, kt)
    ref = reference(x, weight, b, time_padding)
    ours = winograd.conv3x3(mx.array(x, dtype=mx.float32), mx.array(weight, dtype=mx.float32),
                            mx.array(b, dtype=mx.float32), time_padding)
    assert ours.shape == ref.shape
    assert relative(ours, ref) < 1e-6


def test_filter_transform_is_g_g_gt():
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((5, 2, 3, 3, 4)).astype(np.float32)
    g_matrix = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
    expected = np.einsum("ai,okijc,bj->abkoc", g_matrix, weight.astype(np.float64), g_matrix)
    ours = winograd.filter_transform(mx.array(weight))
    for a in range(4):
        for b in range(4):
            np.testing.assert_allclose(np.array(ours[4 * a + b]), expected[a, b], rtol=1e-6, atol=1e-6)


def test_split_over_streams_is_bit_identical():
    x, weight, b = case(np.random.default_rng(7), 1, 1, 20, 20, 64, 64, 1)
    xm, wm, bm = mx.array(x[:, 0], dtype=mx.float32), mx.array(weight[:, 0], dtype=mx.float32), mx.array(b)
    one = winograd.conv3x3(xm, wm, bm.astype(mx.float32))
    mx.eval(one)
    token = fast_ops._ROW_PARTS.set(2)  # what cpu_parallel sets for a batch it cannot split
    try:
        two = winograd.conv3x3(xm, wm, bm.astype(mx.float32))
        mx.eval(two)
    finally:
        fast_ops._ROW_PARTS.reset(token)
    assert mx.array_equal(one, two)


def test_layers_use_it_and_agree_with_mlx_convolutions(monkeypatch):
    calls = []
    original = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda *a, **k: calls.append(1) or original(*a, **k))
    mx.random.seed(0)
    conv = Conv2d(32, 48, 3, padding=1)
    x = mx.random.normal((2, 11, 13, 32))
    ours = conv(x)
    expected = nn.Conv2d.__call__(conv, x)
    assert len(calls) == 1 and ours.shape == expected.shape
    assert float(mx.abs(ours - expected).max()) < 1e-5
    causal = CausalConv3d(32, 32, 3)
    video = mx.random.normal((1, 5, 6, 7, 32))
    ours = causal(video)
    expected = causal.conv(mx.pad(video, [(0, 0), (2, 0), (0, 0), (0, 0), (0, 0)]))
    assert len(calls) == 2
    assert float(mx.abs(ours - expected).max()) < 1e-5


def test_not_used_where_it_does_not_pay():
    x = mx.zeros((1, 8, 8, 64))
    assert not winograd.applies(x, mx.zeros((64, 3, 3, 16)), (1, 1))  # too few channels
    assert not winograd.applies(x, mx.zeros((64, 1, 1, 64)), (0, 0))
    assert not winograd.applies(x, mx.zeros((64, 3, 3, 64)), (0, 0))  # other padding
    assert not winograd.applies(x.astype(mx.bfloat16), mx.zeros((64, 3, 3, 64)), (1, 1))
    assert winograd.applies(x, mx.zeros((64, 3, 3, 64)), (1, 1))
    assert winograd.applies(mx.zeros((1, 5, 8, 8, 64)), mx.zeros((64, 3, 3, 3, 64)), (1, 1))
