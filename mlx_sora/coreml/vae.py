"""VAE v1.2 decoder stages as ML Program functions (mirrors the units of ``models/vae.py``).

Channels first, as Core ML's convolutions take them; the chains::

    latent_stats           latent [1, 4, t, h, w] (a normalised chunk) -> x  (z * scale + shift)
    temporal_decoder_in    x -> x_out          post-quant conv, conv1, res blocks
    temporal_decoder_up_K  x -> x_out          (K from the deepest level) res blocks, conv + depth-to-time
    temporal_decoder_out   x -> spatial_latents [1, 4, frames, h, w]   norm, conv_out, the front frames
                                                                        the temporal VAE padded dropped
    spatial_decoder_in     spatial_latent [1, 4, h, w] -> x   (/ scaling factor), post-quant conv, conv_in,
                                                              mid block
    spatial_decoder_up_I   x -> x_out          resnets, nearest 2x + conv
    spatial_decoder_out    x -> image [1, 3, 8h, 8w]   (unclamped, ~[-1, 1])

The temporal decoder runs on one chunk of latent frames at a time (5 latent frames = 17 video frames,
as the reference's micro_frame_size; the last chunk of a clip may be shorter), the spatial decoder on
one frame at a time. Function names carry the shapes they take.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..models.vae import VideoAutoencoderConfig
from ..models.vae_spatial import RESNET_EPS
from ..models.vae_temporal import TORCH_GROUPNORM_EPS
from .mil import Net, f32, mb
from .spec import TensorSpec, UnitFunction, function_key

LATENT_CHANNELS_NAME = "latent"


def _conv3d(net: Net, x: Any, weights: dict[str, np.ndarray], prefix: str, label: str, bias: bool = True) -> Any:
    """CausalConv3d: zero padding of kt - 1 frames in front, k // 2 pixels on each side."""
    weight = f32(weights[f"{prefix}.conv.weight"]).transpose(0, 4, 1, 2, 3)  # (O, kt, kh, kw, I) -> (O, I, ...)
    kt, kh, kw = weight.shape[2:]
    return net.conv(x, weight, weights.get(f"{prefix}.conv.bias") if bias else None,
                    (kt - 1, 0, kh // 2, kh // 2, kw // 2, kw // 2), label)


def _conv2d(net: Net, x: Any, weights: dict[str, np.ndarray], prefix: str, label: str) -> Any:
    weight = f32(weights[f"{prefix}.weight"]).transpose(0, 3, 1, 2)  # (O, kh, kw, I) -> (O, I, kh, kw)
    kh, kw = weight.shape[2:]
    return net.conv(x, weight, weights.get(f"{prefix}.bias"), (kh // 2, kh // 2, kw // 2, kw // 2), label)


def _norm_act(net: Net, x: Any, weights: dict[str, np.ndarray], prefix: str, groups: int, eps: float,
              activation: str, label: str) -> Any:
    swish = activation in ("swish", "silu")
    out = net.group_norm(x, groups, weights[f"{prefix}.weight"], weights[f"{prefix}.bias"], eps, label, silu=swish)
    return out if swish else mb().relu(x=out, name=net.name(label + ".relu"))


# ---------------------------------------------------------------------------- temporal decoder


def _temporal_res_block(net: Net, x: Any, weights: dict[str, np.ndarray], prefix: str, groups: int,
                        activation: str) -> Any:
    with net.scope(prefix.rsplit("decoder.", 1)[-1]):
        h = _norm_act(net, x, weights, f"{prefix}.norm1", groups, TORCH_GROUPNORM_EPS, activation, "norm1")
        h = _conv3d(net, h, weights, f"{prefix}.conv1", "conv1", bias=False)
        h = _norm_act(net, h, weights, f"{prefix}.norm2", groups, TORCH_GROUPNORM_EPS, activation, "norm2")
        h = _conv3d(net, h, weights, f"{prefix}.conv2", "conv2", bias=False)
        shortcut = _conv3d(net, x, weights, f"{prefix}.conv3", "conv3", bias=False) \
            if f"{prefix}.conv3.conv.weight" in weights else x
        return net.add(h, shortcut, "residual")


def _depth_to_time(net: Net, x: Any, factor: int) -> Any:
    """[B, C*f, T, H, W] -> [B, C, T*f, H, W]: channel c*f + s becomes frame t*f + s (rank 5 throughout)."""
    b, cf, t, h, w = x.shape
    c = cf // factor
    with net.scope("depth_to_time"):
        x = net.reshape(x, (b * c, factor, t, h * w))
        x = net.transpose(x, (0, 2, 1, 3))
        return net.reshape(x, (b, c, t * factor, h, w))


def _temporal_units(config: VideoAutoencoderConfig) -> list[str]:
    levels = len(config.temporal_vae.channel_multipliers)
    return ["latent_stats", "temporal_decoder_in", *(f"temporal_decoder_up_{level}" for level in reversed(range(levels))),
            "temporal_decoder_out"]


def _temporal_channels(config: VideoAutoencoderConfig, unit: str) -> int:
    """Channels of the input of a temporal-decoder unit."""
    tc = config.temporal_vae
    if unit in ("latent_stats",):
        return tc.embed_dim
    if unit == "temporal_decoder_in":
        return tc.embed_dim
    levels = len(tc.channel_multipliers)
    if unit.startswith("temporal_decoder_up_"):
        level = int(unit.rsplit("_", 1)[1])
        return tc.filters * (tc.channel_multipliers[level + 1] if level + 1 < levels else tc.channel_multipliers[-1])
    return tc.filters * tc.channel_multipliers[0]  # temporal_decoder_out


def _temporal_frames_in(config: VideoAutoencoderConfig, unit: str, latent_frames: int) -> int:
    """Frames of the input of a temporal-decoder unit for a chunk of ``latent_frames``."""
    tc = config.temporal_vae
    levels = len(tc.channel_multipliers)
    frames = latent_frames
    if unit in ("latent_stats", "temporal_decoder_in"):
        return frames
    for level in reversed(range(levels)):
        if unit == f"temporal_decoder_up_{level}":
            return frames
        if level > 0 and tc.temporal_downsample[level - 1]:
            frames *= 2
    return frames  # temporal_decoder_out


def _temporal_function(config: VideoAutoencoderConfig, unit: str, weights: dict[str, np.ndarray], latent_frames: int,
                       h: int, w: int, video_frames: int) -> UnitFunction:
    tc = config.temporal_vae
    groups, act = tc.num_groups, tc.activation_fn
    frames_in = _temporal_frames_in(config, unit, latent_frames)
    channels = _temporal_channels(config, unit)
    input_name = LATENT_CHANNELS_NAME if unit == "latent_stats" else "x"
    key = function_key(latent=f"{latent_frames}x{h}x{w}")

    def build(net: Net, inputs: dict[str, Any]) -> dict[str, Any]:
        x = inputs[input_name]
        if unit == "latent_stats":
            scale, shift = (f32(weights[k]).reshape(1, -1, 1, 1, 1) for k in ("scale", "shift"))
            return {"x": net.add(net.mul(x, scale, "scale"), shift, "shift")}
        p = "temporal_vae.decoder"
        if unit == "temporal_decoder_in":
            x = _conv3d(net, x, weights, "temporal_vae.post_quant_conv", "post_quant_conv")
            x = _conv3d(net, x, weights, f"{p}.conv1", "conv1")
            for i in range(tc.num_res_blocks):
                x = _temporal_res_block(net, x, weights, f"{p}.res_blocks.{i}", groups, act)
            return {"x_out": x}
        if unit.startswith("temporal_decoder_up_"):
            level = int(unit.rsplit("_", 1)[1])
            for i in range(tc.num_res_blocks):
                x = _temporal_res_block(net, x, weights, f"{p}.block_res_blocks.{level}.{i}", groups, act)
            if level > 0 and tc.temporal_downsample[level - 1]:
                x = _depth_to_time(net, _conv3d(net, x, weights, f"{p}.conv_blocks.{level - 1}", "upsample"), 2)
            return {"x_out": x}
        x = _norm_act(net, x, weights, f"{p}.norm1", groups, TORCH_GROUPNORM_EPS, act, "norm1")
        x = _conv3d(net, x, weights, f"{p}.conv_out", "conv_out")
        factor = tc.time_downsample_factor
        drop = (factor - video_frames % factor) % factor  # VAE_Temporal.time_padding
        b, c, t, hh, ww = x.shape
        return {"spatial_latents": net.slice(x, (0, 0, drop, 0, 0), (b, c, t, hh, ww), "drop_padding")}

    if unit == "temporal_decoder_out":
        key += f"_frames{video_frames}"
    return UnitFunction(key, (TensorSpec(input_name, (1, channels, frames_in, h, w)),), build)


# ---------------------------------------------------------------------------- spatial decoder


def _resnet(net: Net, x: Any, weights: dict[str, np.ndarray], prefix: str, groups: int) -> Any:
    with net.scope(prefix.rsplit("decoder.", 1)[-1]):
        h = net.group_norm(x, groups, weights[f"{prefix}.norm1.weight"], weights[f"{prefix}.norm1.bias"], RESNET_EPS,
                           "norm1", silu=True)
        h = _conv2d(net, h, weights, f"{prefix}.conv1", "conv1")
        h = net.group_norm(h, groups, weights[f"{prefix}.norm2.weight"], weights[f"{prefix}.norm2.bias"], RESNET_EPS,
                           "norm2", silu=True)
        h = _conv2d(net, h, weights, f"{prefix}.conv2", "conv2")
        shortcut = _conv2d(net, x, weights, f"{prefix}.conv_shortcut", "shortcut") \
            if f"{prefix}.conv_shortcut.weight" in weights else x
        return net.add(shortcut, h, "residual")


def _mid_attention(net: Net, x: Any, weights: dict[str, np.ndarray], prefix: str, groups: int) -> Any:
    n, c, h, w = x.shape
    with net.scope("mid_attention"):
        normed = net.group_norm(x, groups, weights[f"{prefix}.group_norm.weight"], weights[f"{prefix}.group_norm.bias"],
                                RESNET_EPS, "group_norm")
        tokens = net.transpose(net.reshape(normed, (n, c, h * w), "flatten"), (0, 2, 1), "tokens")
        q, k, v = (net.linear(tokens, weights[f"{prefix}.to_{name}.weight"], weights[f"{prefix}.to_{name}.bias"], name)
                   for name in "qkv")
        out = net.attention(q, k, v, c**-0.5, None, "sdpa")
        out = net.linear(out, weights[f"{prefix}.to_out.0.weight"], weights[f"{prefix}.to_out.0.bias"], "to_out")
        out = net.reshape(net.transpose(out, (0, 2, 1), "channels"), (n, c, h, w), "image")
        return net.add(x, out, "residual")


def _spatial_channels(config: VideoAutoencoderConfig, unit: str) -> tuple[int, int]:
    """(channels, scale over the latent) of the input of a spatial-decoder unit."""
    sc = config.spatial_vae
    channels = list(reversed(sc.block_out_channels))
    if unit == "spatial_decoder_in":
        return sc.latent_channels, 1
    if unit.startswith("spatial_decoder_up_"):
        i = int(unit.rsplit("_", 1)[1])
        return channels[max(i - 1, 0)], 2**i
    return sc.block_out_channels[0], 2 ** (len(channels) - 1)


def _spatial_function(config: VideoAutoencoderConfig, unit: str, weights: dict[str, np.ndarray], h: int,
                      w: int) -> UnitFunction:
    sc = config.spatial_vae
    groups = sc.norm_num_groups
    channels, scale = _spatial_channels(config, unit)
    input_name = "spatial_latent" if unit == "spatial_decoder_in" else "x"
    p = "spatial_vae.decoder"

    def build(net: Net, inputs: dict[str, Any]) -> dict[str, Any]:
        x = inputs[input_name]
        if unit == "spatial_decoder_in":
            x = net.div(x, f32(config.spatial_scaling_factor), "unscale")
            if "spatial_vae.post_quant_conv.weight" in weights:
                x = _conv2d(net, x, weights, "spatial_vae.post_quant_conv", "post_quant_conv")
            x = _conv2d(net, x, weights, f"{p}.conv_in", "conv_in")
            x = _resnet(net, x, weights, f"{p}.mid_block.resnets.0", groups)
            if sc.mid_block_add_attention:
                x = _mid_attention(net, x, weights, f"{p}.mid_block.attentions.0", groups)
            return {"x": _resnet(net, x, weights, f"{p}.mid_block.resnets.1", groups)}
        if unit.startswith("spatial_decoder_up_"):
            i = int(unit.rsplit("_", 1)[1])
            for r in range(sc.layers_per_block + 1):
                x = _resnet(net, x, weights, f"{p}.up_blocks.{i}.resnets.{r}", groups)
            if f"{p}.up_blocks.{i}.upsamplers.0.conv.weight" in weights:
                x = _conv2d(net, net.upsample2x(x), weights, f"{p}.up_blocks.{i}.upsamplers.0.conv", "upsample.conv")
            return {"x_out": x}
        x = net.group_norm(x, groups, weights[f"{p}.conv_norm_out.weight"], weights[f"{p}.conv_norm_out.bias"],
                           RESNET_EPS, "norm_out", silu=True)
        return {"image": _conv2d(net, x, weights, f"{p}.conv_out", "conv_out")}

    spec = TensorSpec(input_name, (1, channels, h * scale, w * scale))
    return UnitFunction(function_key(latent=f"{h}x{w}"), (spec,), build)


# ---------------------------------------------------------------------------- units


def temporal_chunks(config: VideoAutoencoderConfig, vae: Any, latent_frames: int, num_frames: int) -> list[tuple[int, int, int]]:
    """(first latent frame, end latent frame, video frames) of each chunk (``OpenSoraVAE.temporal_chunks``)."""
    return vae.temporal_chunks(latent_frames, num_frames)


def unit_functions(config: VideoAutoencoderConfig, unit: str, weights: dict[str, np.ndarray],
                   chunks: list[tuple[int, int, int, int]], spatial: list[tuple[int, int]]) -> list[UnitFunction]:
    """The functions of one VAE decoder unit: temporal units for every distinct chunk ``(latent frames,
    h, w, video frames)``, spatial units for every distinct latent size ``(h, w)``."""
    functions: dict[str, UnitFunction] = {}
    if unit in _temporal_units(config):
        for latent_frames, h, w, frames in chunks:
            fn = _temporal_function(config, unit, weights, latent_frames, h, w, frames)
            functions.setdefault(fn.name, fn)
    elif unit.startswith("spatial_decoder_"):
        for h, w in spatial:
            fn = _spatial_function(config, unit, weights, h, w)
            functions.setdefault(fn.name, fn)
    else:
        raise ValueError(f"the VAE's unit {unit!r} is not exported (decoder stages only)")
    return list(functions.values())
