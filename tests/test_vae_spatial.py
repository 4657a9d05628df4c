"""Spatial VAE (AutoencoderKL) against diffusers.AutoencoderKL on a tiny random config."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from tolerances import f32

from mlx_sora.conversion.loading import expected_parameters
from mlx_sora.models.vae import _transform
from mlx_sora.models.vae_spatial import SDXL_VAE_CONFIG, AutoencoderKL, AutoencoderKLConfig

TINY = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 16, 24],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 64,
    "scaling_factor": 0.13025,
}
RTOL = 1e-5  # max|mlx - ref| / max|ref|


def rel_err(a: mx.array, ref: torch.Tensor) -> float:
    ref = ref.detach().numpy()
    return float(np.abs(np.array(a) - ref).max() / np.abs(ref).max())


def nchw(x: mx.array) -> torch.Tensor:
    return torch.from_numpy(np.array(x.transpose(0, 3, 1, 2)))


def nhwc(x: torch.Tensor) -> mx.array:
    return mx.array(x.detach().permute(0, 2, 3, 1).numpy())


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ref = TorchAutoencoderKL(**TINY).eval()
    with torch.no_grad():  # nothing trivially zero/one: GroupNorm affine and biases re-drawn too
        for name, p in ref.named_parameters():
            if name.endswith("weight") and p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) * min(0.5, 1.5 / fan_in**0.5))
    model = AutoencoderKL(TINY)
    weights = {k: _transform("spatial_vae." + k, mx.array(v.numpy())) for k, v in ref.state_dict().items()}
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return ref, model


@pytest.mark.gpu
def test_encode_matches_diffusers(models):
    ref, model = models
    x = torch.rand(2, 3, 40, 56) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
    mean, logvar = model.encode_moments(nhwc(x))
    assert mean.shape == (2, 5, 7, 4)
    assert rel_err(mean.transpose(0, 3, 1, 2), dist.mean) < f32(RTOL)
    assert rel_err(logvar.transpose(0, 3, 1, 2), dist.logvar) < f32(RTOL)
    assert mx.array_equal(model.encode(nhwc(x)), mean)
    sampled = model.encode(nhwc(x), key=mx.random.key(1))
    assert sampled.shape == mean.shape and not mx.allclose(sampled, mean)


@pytest.mark.gpu
def test_encode_odd_size_matches_diffusers(models):
    ref, model = models  # Downsample2D's (0, 1, 0, 1) padding path on odd sizes
    x = torch.rand(1, 3, 30, 45) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
    assert rel_err(model.encode(nhwc(x)).transpose(0, 3, 1, 2), dist.mean) < f32(RTOL)


@pytest.mark.gpu
def test_decode_matches_diffusers(models):
    ref, model = models
    z = torch.randn(3, 4, 5, 6)
    with torch.no_grad():
        out = ref.decode(z).sample
    ours = model.decode(nhwc(z))
    assert ours.shape == (3, 40, 48, 3)
    assert rel_err(ours.transpose(0, 3, 1, 2), out) < f32(RTOL)


@pytest.mark.gpu
def test_tiled_decode_matches_diffusers_tiled_decode(models):
    ref, model = models
    tile, overlap = 8, 2  # diffusers: tile_latent_min_size 8, tile_sample_min_size 64, overlap factor 0.25
    z = torch.randn(1, 4, 13, 19)
    ref.enable_tiling()
    ref.tile_latent_min_size, ref.tile_sample_min_size, ref.tile_overlap_factor = tile, 8 * tile, overlap / tile
    try:
        with torch.no_grad():
            out = ref.decode(z).sample
    finally:
        ref.disable_tiling()
    ours = model.tiled_decode(nhwc(z), tile, overlap)
    assert ours.shape == (1, 104, 152, 3)
    assert rel_err(ours.transpose(0, 3, 1, 2), out) < f32(RTOL)
    # tiling changes the result (GroupNorm statistics are per tile), but not wildly
    untiled = model.decode(nhwc(z))
    assert 1e-3 < float(mx.abs(ours - untiled).max() / mx.abs(untiled).max()) < 1.0


@pytest.mark.gpu
def test_single_tile_equals_untiled(models):
    _, model = models
    z = mx.random.normal((2, 6, 7, 4), key=mx.random.key(3))
    assert mx.array_equal(model.tiled_decode(z, 8, 2), model.decode(z))


def test_bad_input_is_rejected(models):
    _, model = models
    with pytest.raises(ValueError, match=r"channels-last \[N, H, W, 4\]"):
        model.decode(mx.zeros((1, 4, 5, 6)))  # NCHW by mistake
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        model.encode(mx.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="overlap"):
        model.tiled_decode(mx.zeros((1, 8, 8, 4)), 4, 4)


def test_config_validation():
    with pytest.raises(ValueError, match="multiples of norm_num_groups"):
        AutoencoderKLConfig.from_dict({**TINY, "norm_num_groups": 3})
    with pytest.raises(ValueError, match="up_block_types"):
        AutoencoderKLConfig.from_dict({**TINY, "up_block_types": ["UpDecoderBlock2D"] * 3})
    config = AutoencoderKLConfig.from_dict({**TINY, "_class_name": "AutoencoderKL", "force_upcast": True})
    assert config.block_out_channels == (8, 16, 16, 24) and config.downsample_factor == 8


def test_sdxl_architecture_names_and_shapes_match_diffusers():
    with torch.device("meta"):  # no allocation
        ref = TorchAutoencoderKL(**SDXL_VAE_CONFIG)
    have = {k: tuple(_transform("spatial_vae." + k, mx.zeros(v.shape)).shape) for k, v in ref.state_dict().items()}
    assert have == expected_parameters(AutoencoderKL(SDXL_VAE_CONFIG))
    assert sum(int(np.prod(s)) for s in have.values()) == 83_653_863
