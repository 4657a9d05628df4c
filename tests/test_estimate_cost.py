"""The FLOP counts of mlx_sora.estimate.cost against an independent count: the real models run on
small configs with their layers instrumented (every linear layer, convolution and attention call
records 2 x multiply-adds from the shapes it really sees), with TDTM, the CFG batch, caption masks,
VAE chunks and micro-batches as the pipeline runs them."""

from __future__ import annotations

from collections import Counter

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_sora.estimate import cost
from mlx_sora.models import fast_ops
from mlx_sora.models import t5 as t5_module
from mlx_sora.models.stdit3 import STDiT3, STDiT3Config
from mlx_sora.models.t5 import T5Config, T5Encoder
from mlx_sora.models.vae import OpenSoraVAE, VideoAutoencoderConfig
from mlx_sora.models.vae_spatial import AutoencoderKLConfig
from mlx_sora.models.vae_temporal import VAETemporalConfig


@pytest.fixture
def counted(monkeypatch):
    """FLOPs per kind of every layer call while the fixture is active (MLX's own kernels: the CPU
    fast path's Winograd and upsampling shortcuts compute the same convolutions with fewer products)."""
    monkeypatch.setenv("MLX_SORA_FAST_OPS", "0")
    flops: Counter = Counter()

    def linear(original):
        def call(self, x):
            out = original(self, x)
            flops["matmul"] += 2 * x.size * self.weight.shape[0]  # x [..., in] @ W.T [in, out]
            return out
        return call

    def conv(original):
        def call(self, x):
            out = original(self, x)
            flops["conv"] += 2 * out.size * (self.weight.size // self.weight.shape[0])
            return out
        return call

    original_attention = fast_ops.attention

    def attention(q, k, v, scale, mask=None):
        flops["attention"] += 4 * q.size * k.shape[-2]  # q k^T and (.) v: 2 x Lq x Lk x d each
        return original_attention(q, k, v, scale, mask)

    monkeypatch.setattr(nn.Linear, "__call__", linear(nn.Linear.__call__))
    monkeypatch.setattr(t5_module.Linear, "__call__", linear(t5_module.Linear.__call__))
    monkeypatch.setattr(nn.Conv2d, "__call__", conv(nn.Conv2d.__call__))
    monkeypatch.setattr(nn.Conv3d, "__call__", conv(nn.Conv3d.__call__))
    monkeypatch.setattr(fast_ops, "attention", attention)
    return flops


def _kinds(calls) -> Counter:
    total: Counter = Counter()
    for call in calls:
        for kind in ("matmul", "attention", "conv"):
            total[kind] += call.flops(kind)
    return +total


def _per_unit(units, carry, flops: Counter) -> tuple[dict[str, Counter], object]:
    measured = {}
    for unit in units:
        before = Counter(flops)
        carry = unit.run(carry)
        measured[unit.name] = +(Counter(flops) - before)
    return measured, carry


def test_t5_flops_per_unit(counted):
    config = T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=3,
                      relative_attention_num_buckets=8, relative_attention_max_distance=20,
                      feed_forward_proj="gated-gelu")
    model = T5Encoder(config)
    mask = mx.array([[1] * 7 + [0] * 5, [1] * 12])
    measured, _ = _per_unit(model.units, (mx.zeros((2, 12), dtype=mx.int32), mask), counted)
    for call in cost.t5_calls(config, 2, 12, 4):
        assert _kinds([call]) == measured[call.unit], call.unit


@pytest.mark.parametrize("merge, frames", [(False, 5), (True, 5), (True, 4), (False, 1)])
def test_stdit3_flops_per_unit_with_tdtm_cfg_and_caption_keys(counted, merge, frames):
    config = STDiT3Config(depth=2, hidden_size=48, num_heads=4, caption_channels=24, model_max_length=10)
    model = STDiT3(config)
    batch = 4  # the CFG batch 2B of two prompts
    mask = mx.array([[1] * 6 + [0] * 4, [1] * 3 + [0] * 7])  # the union of valid tokens: 6
    inputs = dict(x=mx.zeros((batch, 4, frames, 6, 10)), timestep=mx.array([900.0] * batch),
                  y=mx.zeros((batch, 1, 10, 24)), mask=mask, fps=mx.array([24.0, 24.0]),
                  height=mx.array([48.0, 48.0]), width=mx.array([80.0, 80.0]), merge=merge)
    measured, out = _per_unit(model.units, inputs, counted)
    assert out.shape == (batch, 8, frames, 6, 10)
    calls = cost.stdit3_calls(config, batch, (frames, 6, 10), 6, merge, 4)
    assert [c.unit for c in calls] == [u.name for u in model.units]
    for call in calls:
        assert _kinds([call]) == measured[call.unit], call.unit


def test_tdtm_counts_half_the_frames_in_attention_only():
    config = STDiT3Config(depth=1, hidden_size=48, num_heads=4, caption_channels=24, model_max_length=10)
    plain = cost.stdit3_calls(config, 2, (8, 6, 10), 7, False, 4)[1]
    merged = cost.stdit3_calls(config, 2, (8, 6, 10), 7, True, 4)[1]
    # by hand from the definitions, for the spatial + temporal block pair: patches 2x2 -> S = 3 x 5
    # per frame, N = 2 x 8 x 15 tokens; attention and the linear layers around it (qkv, proj, the
    # cross-attention's q and proj) see N / 2 tokens with TDTM (T // 2 = 4 frames), the MLP all N;
    # the caption's k, v: 2 x 7 keys; spatial attention over 15 patches, temporal over 8 (4) frames
    c, s, keys, n = 48, 15, 7, 2 * 8 * 15
    mlp = 2 * 16 * n * c * c
    caption = 2 * 4 * 2 * keys * c * c
    def linears(tokens):
        return 2 * 12 * tokens * c * c
    def scores(tokens, frames):
        return 4 * tokens * c * (s + frames + 2 * keys)
    assert plain.flops("matmul") == mlp + caption + linears(n)
    assert merged.flops("matmul") == mlp + caption + linears(n // 2)
    assert plain.flops("attention") == scores(n, 8)
    assert merged.flops("attention") == scores(n // 2, 4)


@pytest.fixture
def small_vae():
    return VideoAutoencoderConfig(
        spatial_vae=AutoencoderKLConfig(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4),
        temporal_vae=VAETemporalConfig(filters=8, num_res_blocks=1, channel_multipliers=(1, 2, 2),
                                       temporal_downsample=(True, True), num_groups=4),
        micro_batch_size=3)


def test_vae_decoder_flops_per_unit_chunks_and_micro_batches(counted, small_vae):
    vae = OpenSoraVAE(small_vae)
    latent_frames, frames, h, w = 5, 17, 5, 6
    z = mx.zeros((1, 5, h, w, 4))
    measured, x_z = _per_unit(vae.temporal_decoder_units, (z, frames), counted)
    for call in cost.temporal_decoder_calls(small_vae, 1, latent_frames, h * w, 4):
        assert _kinds([call]) == measured[call.unit], call.unit
    images = x_z.reshape(-1, h, w, 4)[:3]
    measured, frames_out = _per_unit(vae.spatial_decoder_units, images, counted)
    assert frames_out.shape == (3, 8 * h, 8 * w, 3)
    for call in cost.spatial_decoder_calls(small_vae, 3, h, w, 4):
        assert _kinds([call]) == measured[call.unit], call.unit


def test_whole_decode_counts_as_the_projection_lays_it_out(counted, small_vae):
    """All of ``OpenSoraVAE.decode`` (two temporal chunks, micro-batches of 3 frames) against the
    projection's sequence of unit calls for the same request."""
    from mlx_sora.estimate.projection import _decode_steps

    vae = OpenSoraVAE(small_vae)
    frames, latent = 34, (10, 4, 6)
    vae.decode(mx.zeros((1, 4, *latent)), num_frames=frames)

    class Phase:
        micro_batch, tiling = 3, None

    class Request:
        num_frames = frames

    projected: Counter = Counter({k: 0.0 for k in ("matmul", "attention", "conv", "elementwise")})

    class Clock:
        def call_seconds(self, call):
            return 0.0

        def op_seconds(self, *args):
            return 0.0

    _decode_steps(vae, Phase, Request, 1, latent, Clock(), 4, projected)
    assert +Counter({k: v for k, v in projected.items() if k != "elementwise"}) == +counted
