"""Temporal VAE (VAE_Temporal) against the Open-Sora 1.2 reference fixtures (vae_temporal_*)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tolerances import f32

from mlx_sora.conversion.loading import expected_parameters
from mlx_sora.models.vae_temporal import (
    VAE_TEMPORAL_SD_CONFIG,
    VAE_Temporal,
    VAETemporalConfig,
    depth_to_time,
)

FIXTURES = Path(__file__).parent / "fixtures" / "opensora12"


def tolerance(ref: mx.array) -> float:
    return f32(1e-4) * max(1.0, float(mx.abs(ref).max()))  # fixtures README, VAE outputs


def to_cl(x: mx.array) -> mx.array:  # [B, C, T, H, W] -> [B, T, H, W, C]
    return x.transpose(0, 2, 3, 4, 1)


def to_ref(x: mx.array) -> mx.array:
    return x.transpose(0, 4, 1, 2, 3)


@pytest.fixture(scope="module")
def model() -> VAE_Temporal:
    config = json.loads((FIXTURES / "vae_temporal_config.json").read_text())  # bare kwargs + "type"
    vae = VAE_Temporal(VAETemporalConfig.from_dict(config))
    weights = VAE_Temporal.sanitize(mx.load(str(FIXTURES / "vae_temporal.safetensors")))
    vae.load_weights(list(weights.items()), strict=True)
    mx.eval(vae.parameters())
    return vae


@pytest.fixture(scope="module")
def io() -> dict[str, mx.array]:
    return mx.load(str(FIXTURES / "vae_temporal_io.safetensors"))


@pytest.mark.gpu
@pytest.mark.parametrize("frames", [1, 9, 17])
def test_encode_matches_reference(model, io, frames):
    mean, logvar = model.encode_moments(to_cl(io[f"T{frames}.x"]))
    for name, ours in (("mean", mean), ("logvar", logvar)):
        ref = io[f"T{frames}.posterior_{name}"]
        assert to_ref(ours).shape == ref.shape
        err = float(mx.abs(to_ref(ours) - ref).max())
        assert err <= tolerance(ref), f"T{frames} posterior {name}: max abs err {err}"
        assert err / float(mx.abs(ref).max()) < f32(1e-5)
    assert mx.array_equal(model.encode(to_cl(io[f"T{frames}.x"])), mean)


@pytest.mark.gpu
@pytest.mark.parametrize("frames", [1, 9, 17])
def test_decode_matches_reference(model, io, frames):
    ref = io[f"T{frames}.decoded"]
    ours = to_ref(model.decode(to_cl(io[f"T{frames}.posterior_mean"]), num_frames=frames))
    assert ours.shape == ref.shape
    err = float(mx.abs(ours - ref).max())
    assert err <= tolerance(ref), f"T{frames} decoded: max abs err {err}"
    assert err / float(mx.abs(ref).max()) < f32(1e-5)


@pytest.mark.gpu
def test_decode_crops_front_padding(model, io):
    z = to_cl(io["T9.posterior_mean"])  # 3 latent frames: 12 decoded frames, 9..12 requested
    full = model.decode(z, num_frames=12)
    for frames in (9, 10, 11):
        assert mx.array_equal(model.decode(z, num_frames=frames), full[:, 12 - frames :])


def test_latent_size(model):
    assert [model.get_latent_size((n, 6, 7))[0] for n in (1, 4, 5, 9, 17)] == [1, 1, 2, 3, 5]
    assert model.get_latent_size((None, 6, 7)) == [None, 6, 7]


def test_depth_to_time_layout():
    # reference: rearrange "B (C ts) T H W -> B C (T ts) H W": channel c*2+s becomes frame 2t+s
    x = mx.arange(2 * 3 * 4).reshape(1, 2, 1, 1, 12).astype(mx.float32)  # T=2, C*ts=12
    y = depth_to_time(x, 2)
    assert y.shape == (1, 4, 1, 1, 6)
    for t in range(2):
        for s in range(2):
            assert mx.array_equal(y[0, 2 * t + s, 0, 0], x[0, t, 0, 0, s::2])


def test_bad_input_is_rejected(model):
    with pytest.raises(ValueError, match=r"channels-last \[B, T, H, W, 4\]"):
        model.decode(mx.zeros((1, 4, 5, 6, 7)), num_frames=17)  # reference layout by mistake
    with pytest.raises(ValueError, match="cannot decode to num_frames=25"):
        model.decode(mx.zeros((1, 5, 6, 7, 4)), num_frames=25)
    with pytest.raises(ValueError, match=r"\[B, T, H, W, 4\]"):
        model.encode(mx.zeros((17, 6, 7, 4)))


def test_config_validation():
    with pytest.raises(ValueError, match="temporal_downsample"):
        VAETemporalConfig.from_dict({"temporal_downsample": [True, True]})
    with pytest.raises(ValueError, match="num_groups"):
        VAETemporalConfig.from_dict({"filters": 6, "num_groups": 4})
    with pytest.raises(ValueError, match="activation_fn"):
        VAETemporalConfig.from_dict({"activation_fn": "gelu"})


def test_vae_temporal_sd_size():
    # VAE_Temporal_SD (the released temporal VAE): parameter count of the reference module
    shapes = expected_parameters(VAE_Temporal(VAETemporalConfig.from_dict(VAE_TEMPORAL_SD_CONFIG)))
    assert sum(int(np.prod(s)) for s in shapes.values()) == 309_687_144
    assert shapes["decoder.conv_blocks.1.conv.weight"] == (512, 3, 3, 3, 256)
    assert "decoder.conv_blocks.0.conv.weight" not in shapes  # no temporal upsampling at level 0
