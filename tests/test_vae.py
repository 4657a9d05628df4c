"""OpenSoraVAE_V1_2 pipeline against the reference fixtures (vae_v12_*), through convert + load_model."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tolerances import f32

import mlx_sora
from mlx_sora.conversion.loading import expected_parameters, read_converted_config
from mlx_sora.io.checkpoint import CheckpointFolder
from mlx_sora.models import detect_family, winograd
from mlx_sora.models.vae import FAMILY, OpenSoraVAE, VideoAutoencoderConfig
from mlx_sora.models.vae_spatial import SDXL_VAE_CONFIG
from mlx_sora.models.vae_temporal import VAE_TEMPORAL_SD_CONFIG

FIXTURES = Path(__file__).parent / "fixtures" / "opensora12"
CHECKPOINT = FIXTURES / "vae_v12_checkpoint"
BF16_DEVIATION = json.loads((FIXTURES / "vae_v12_meta.json").read_text())["bf16_vs_fp32_maxabs"]["decode_nf17"]


def tolerance(ref: mx.array) -> float:
    return f32(1e-4) * max(1.0, float(mx.abs(ref).max()))  # fixtures README, VAE outputs


def assert_close(ours: mx.array, ref: mx.array, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    err = float(mx.abs(ours.astype(mx.float32) - ref).max())
    assert err <= tolerance(ref), f"{what}: max abs err {err}"
    assert err / float(mx.abs(ref).max()) < f32(1e-5), f"{what}: relative err {err / float(mx.abs(ref).max())}"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return mlx_sora.convert(CHECKPOINT, tmp_path_factory.mktemp("vae") / "vae_v12")


@pytest.fixture(scope="module")
def vae(converted) -> OpenSoraVAE:
    return mlx_sora.load_model(converted)


@pytest.fixture(scope="module")
def decode_io() -> dict[str, mx.array]:
    return mx.load(str(FIXTURES / "vae_v12_decode.safetensors"))


@pytest.fixture(scope="module")
def encode_io() -> dict[str, mx.array]:
    return mx.load(str(FIXTURES / "vae_v12_encode.safetensors"))


@pytest.mark.gpu
@pytest.mark.parametrize("frames", [1, 17, 34, 51])
def test_decode_matches_reference(vae, decode_io, frames):
    video = vae.decode(decode_io[f"nf{frames}.z"], num_frames=frames)
    assert_close(video, decode_io[f"nf{frames}.video"], f"decode nf{frames}")


@pytest.mark.parametrize("frames", [17, 51])
def test_decode_matches_reference_with_winograd_on_every_conv(vae, decode_io, encode_io, frames, monkeypatch,
                                                                cpu_fast_path):
    # the fixture VAE is narrower than winograd.MIN_CHANNELS: lower it so that every 3x3 convolution
    # of both decoders (and encoders) takes the F(2x2, 3x3) path, at the same tolerance
    calls = []
    original = winograd.conv3x3
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "conv3x3", lambda *a, **k: calls.append(1) or original(*a, **k))
    video = vae.decode(decode_io[f"nf{frames}.z"], num_frames=frames)
    assert_close(video, decode_io[f"nf{frames}.video"], f"winograd decode nf{frames}")
    assert len(calls) > 20
    assert_close(vae.encode(encode_io["nf17.x"]), encode_io["nf17.z"], "winograd encode nf17")


@pytest.mark.gpu
def test_temporal_decode_output_matches_reference(vae, decode_io):
    z = decode_io["nf17.z"].transpose(0, 2, 3, 4, 1) * vae.scale + vae.shift
    x_z = vae.temporal_vae.decode(z, num_frames=17).transpose(0, 4, 1, 2, 3)
    assert_close(x_z, decode_io["nf17.x_z"], "nf17 x_z")


@pytest.mark.gpu
@pytest.mark.parametrize("frames", [1, 17, 34])
def test_encode_matches_reference(vae, encode_io, frames):
    assert_close(vae.encode(encode_io[f"nf{frames}.x"]), encode_io[f"nf{frames}.z"], f"encode nf{frames}")


@pytest.mark.gpu
def test_spatial_encode_matches_reference(vae, encode_io):
    x = encode_io["nf17.x"].transpose(0, 2, 3, 4, 1)[0]  # [T, H, W, 3]
    x_z = vae.spatial_vae.encode(x) * vae.config.spatial_scaling_factor
    assert_close(x_z.transpose(3, 0, 1, 2)[None], encode_io["nf17.x_z"], "nf17 spatial x_z")


@pytest.mark.gpu
def test_bf16_decode_within_reference_bf16_deviation(converted, decode_io):
    vae = mlx_sora.load_model(converted, dtype="bfloat16")
    video = vae.decode(decode_io["nf17.z"].astype(mx.bfloat16), num_frames=17)
    assert video.dtype == mx.bfloat16
    video = video.astype(mx.float32)
    err = float(mx.abs(video - decode_io["nf17.video_bf16"]).max())
    assert err <= 1.5 * BF16_DEVIATION, f"bf16 decode: max abs err {err} (reference bf16 vs fp32: {BF16_DEVIATION})"
    # on average as close to the float32 reference as the reference's own bf16 run
    ref_mean_dev = float(mx.abs(decode_io["nf17.video_bf16"] - decode_io["nf17.video"]).mean())
    assert float(mx.abs(video - decode_io["nf17.video"]).mean()) <= 1.5 * ref_mean_dev


@pytest.mark.gpu
def test_partial_last_chunk_is_independent(vae, decode_io):
    # 20 frames = one full 17-frame chunk (5 latents) + a 3-frame chunk (1 latent), decoded independently
    z = decode_io["nf34.z"][:, :, :6]
    video = vae.decode(z, num_frames=20)
    assert video.shape == (1, 3, 20, 24, 32)
    assert mx.allclose(video[:, :, :17], vae.decode(z[:, :, :5], num_frames=17), rtol=0, atol=f32(1e-6))
    assert mx.allclose(video[:, :, 17:], vae.decode(z[:, :, 5:], num_frames=3), rtol=0, atol=f32(1e-6))
    assert mx.allclose(video[:, :, :17], decode_io["nf34.video"][:, :, :17], rtol=0, atol=tolerance(video))


@pytest.mark.gpu
def test_micro_batch_size_and_chunks_do_not_change_the_result(vae, decode_io):
    z, ref = decode_io["nf34.z"], decode_io["nf34.video"]
    baseline = vae.decode(z, num_frames=34)
    try:
        for size in (1, 3, 17, None):
            vae.micro_batch_size = size
            assert float(mx.abs(vae.decode(z, num_frames=34) - baseline).max()) <= f32(1e-5) * float(mx.abs(ref).max())
        vae.micro_batch_size = 4
        pieces = list(vae.decode_chunks(z, num_frames=34))
        assert [p.shape[2] for p in pieces] == [4, 4, 4, 4, 1] * 2
        assert mx.array_equal(mx.concatenate(pieces, axis=2), baseline)
        cl = list(vae.decode_chunks(z, num_frames=34, channels_last=True))
        assert mx.array_equal(mx.concatenate(cl, axis=1), baseline.transpose(0, 2, 3, 4, 1))
        seen = []
        vae.decode(z, num_frames=34, progress=lambda done, total: seen.append((done, total)))
        assert seen[-1] == (34, 34) and len(seen) == len(pieces)
    finally:
        vae.micro_batch_size = 4


@pytest.mark.gpu
def test_batch_of_two(vae, decode_io):
    z = mx.concatenate([decode_io["nf17.z"], decode_io["nf17.z"][:, :, ::-1]], axis=0)
    video = vae.decode(z, num_frames=17)
    assert_close(video[:1], decode_io["nf17.video"], "batch row 0")
    assert mx.allclose(video[1:], vae.decode(z[1:], num_frames=17), rtol=0, atol=f32(1e-5))


@pytest.mark.gpu
def test_tiled_pipeline_decode(vae, decode_io):
    z = decode_io["nf17.z"][:, :, :5]
    untiled = vae.decode(z, num_frames=17)
    try:
        vae.set_tiling(True, 4, 1)  # latent 3x4: one tile, no tiling
        assert mx.array_equal(vae.decode(z, num_frames=17), untiled)
        vae.set_tiling(True, 2, 1)  # 2x2-latent tiles with 1 latent pixel (8 px) blended
        tiled = vae.decode(z, num_frames=17)
        x_z = vae.temporal_vae.decode(
            z.transpose(0, 2, 3, 4, 1) * vae.scale + vae.shift, num_frames=17
        )[0] / vae.config.spatial_scaling_factor
        per_frame = vae.spatial_vae.tiled_decode(x_z, 2, 1)  # tested against diffusers in test_vae_spatial
        assert mx.allclose(tiled, per_frame.transpose(3, 0, 1, 2)[None], rtol=0, atol=f32(1e-5))
        # tiling is in effect: tiles this small (16 px) see their own GroupNorm statistics
        assert float(mx.abs(tiled - untiled).max() / mx.abs(untiled).max()) > 1e-3
        with pytest.raises(ValueError, match="overlap < tile_size"):
            vae.set_tiling(True, 8, 8)
    finally:
        vae.set_tiling(False)


def test_latent_size(vae):
    assert [vae.latent_frames(n) for n in (1, 2, 16, 17, 20, 34, 51, 68, 102)] == [1, 1, 4, 5, 6, 10, 15, 20, 30]
    assert vae.get_latent_size((51, 240, 426)) == [15, 30, 53]  # 240p 9:16 bucket
    assert vae.get_latent_size((68, 192, 192)) == [20, 24, 24]
    assert vae.get_latent_size((None, 720, 1280)) == [None, 90, 160]
    assert [vae.max_frames(t) for t in (1, 5, 6, 15)] == [4, 17, 21, 51]


def test_bad_input_is_rejected(vae, decode_io):
    z = decode_io["nf17.z"]
    with pytest.raises(ValueError, match=r"latents \[B, 4, T_lat, H/8, W/8\]"):
        vae.decode(z[:, :3], num_frames=17)  # wrong channel count
    with pytest.raises(ValueError, match=r"latents \[B, 4, T_lat, H/8, W/8\]"):
        vae.decode(z[0], num_frames=17)  # wrong rank
    with pytest.raises(ValueError, match="num_frames=34 gives 10 latent frames but z has 5"):
        vae.decode(z, num_frames=34)
    with pytest.raises(ValueError, match=r"video \[B, 3, T, H, W\]"):
        vae.encode(mx.zeros((1, 17, 24, 32, 3)))


def test_converted_folder_layout(converted, tmp_path):
    config = read_converted_config(converted)
    assert config["model_type"] == "vae"
    assert config["mlx_sora"]["units"] == [
        "latent_stats", "temporal_decoder_in", "temporal_decoder_up_3", "temporal_decoder_up_2",
        "temporal_decoder_up_1", "temporal_decoder_up_0", "temporal_decoder_out", "spatial_decoder_in",
        "spatial_decoder_up_0", "spatial_decoder_up_1", "spatial_decoder_up_2", "spatial_decoder_up_3",
        "spatial_decoder_out", "spatial_encoder", "temporal_encoder",
    ]
    vae = mlx_sora.load_model(converted)
    assert [u.name for u in vae.temporal_decoder_units + vae.spatial_decoder_units] == config["mlx_sora"]["units"][:13]
    assert config["spatial_scaling_factor"] == 0.18215 and config["micro_frame_size"] == 17
    assert config["micro_batch_size"] == 4 and config["spatial_vae"]["block_out_channels"] == [8, 8, 16, 16]
    bf16 = mlx_sora.convert(CHECKPOINT, tmp_path / "bf16", dtype="bfloat16")
    stats = mx.load(str(bf16 / "latent_stats.safetensors"))
    assert stats["scale"].dtype == mx.float32
    assert np.allclose(np.array(stats["scale"]), [3.85, 2.32, 2.33, 3.06])


def test_release_config_is_understood():
    hf_config = json.loads((CHECKPOINT / "config.json").read_text())
    release = {k: v for k, v in hf_config.items() if not k.startswith(("vae_2d", "real_release_"))}
    release["vae_2d"] = hf_config["real_release_vae_2d"]
    release["vae_temporal"] = hf_config["real_release_vae_temporal"]
    assert detect_family(release, CheckpointFolder(CHECKPOINT)) is FAMILY
    config = VideoAutoencoderConfig.from_dict(FAMILY.config_from_hf(release, None))
    assert config.spatial_vae.block_out_channels == tuple(SDXL_VAE_CONFIG["block_out_channels"])
    assert config.spatial_vae.layers_per_block == 2 and config.spatial_vae.norm_num_groups == 32
    assert config.temporal_vae.filters == VAE_TEMPORAL_SD_CONFIG["filters"] == 128
    assert config.temporal_vae.num_res_blocks == 4 and config.temporal_vae.temporal_downsample == (False, True, True)
    assert config.spatial_scaling_factor == 0.18215 and config.micro_batch_size == 4
    shapes = expected_parameters(OpenSoraVAE(config))  # lazy: nothing allocated
    assert sum(int(np.prod(s)) for s in shapes.values()) == 83_653_863 + 309_687_144 + 8
    unknown = dict(release, vae_2d={"type": "VideoAutoencoderKL", "from_pretrained": "someone/other-vae"})
    with pytest.raises(ValueError, match="unknown spatial VAE"):
        FAMILY.config_from_hf(unknown, None)
