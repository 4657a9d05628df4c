"""The spatial VAE of Open-Sora 1.2: diffusers' ``AutoencoderKL`` (the SDXL VAE) in MLX.

Mirrors diffusers ``models/autoencoders/autoencoder_kl.py`` + ``vae.py`` (Encoder/Decoder),
``unets/unet_2d_blocks.py`` (DownEncoderBlock2D, UpDecoderBlock2D, UNetMidBlock2D),
``resnet.py`` (ResnetBlock2D), ``downsampling.py``/``upsampling.py`` and the
``_from_deprecated_attn_block`` self-attention of the mid block, with the same parameter names, so a
diffusers state dict loads after transposing the conv weights to channels-last.

Layout: images and latents are channels-last here, ``[N, H, W, C]`` (MLX convention); the video
pipeline (``vae.py``) converts at its boundary.

Deliberate deviation: GroupNorm computes its statistics in float32 whatever the input dtype (PyTorch's
CPU kernel accumulates in float for bf16 too), so a bf16 decode is no worse than the reference's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator

import mlx.core as mx
import mlx.nn as nn

from . import fast_ops, winograd
from .config_checks import require_int, require_ints
from .conv import conv_by_taps, upsample2x_conv3x3

# The spatial VAE of hpcai-tech/OpenSora-VAE-v1.2 is loaded by the reference from
# "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers" (subfolder "vae"): the SDXL VAE. Its config.json:
SDXL_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

KNOWN_SPATIAL_VAES: dict[str, dict[str, Any]] = {
    "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers": SDXL_VAE_CONFIG,
    "stabilityai/sdxl-vae": SDXL_VAE_CONFIG,
}

RESNET_EPS = 1e-6  # diffusers Encoder/Decoder pass resnet_eps=1e-6 everywhere (also the attention GroupNorm)


@dataclass(frozen=True)
class AutoencoderKLConfig:
    """A diffusers ``AutoencoderKL`` config (only the fields that shape the network)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 1024
    scaling_factor: float = 0.13025
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "AutoencoderKLConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in known}
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            if key in values:
                if not isinstance(values[key], (list, tuple)):
                    raise ValueError(f"AutoencoderKL config: {key} must be a list, got {values[key]!r}")
                values[key] = tuple(values[key])
        if isinstance(values.get("sample_size"), (list, tuple)) and values["sample_size"]:
            values["sample_size"] = values["sample_size"][0]
        return cls(**values)

    def __post_init__(self) -> None:
        owner = "AutoencoderKL config"
        require_ints(owner, "block_out_channels", self.block_out_channels, 1, 4096, max_len=8)
        for name, high in (("in_channels", 64), ("out_channels", 64), ("layers_per_block", 16),
                           ("latent_channels", 64), ("norm_num_groups", 1024)):
            require_int(owner, name, getattr(self, name), 1, high)
        n = len(self.block_out_channels)
        if set(self.down_block_types) != {"DownEncoderBlock2D"} or len(self.down_block_types) != n:
            raise ValueError(
                f"AutoencoderKL config: down_block_types must be {n} x 'DownEncoderBlock2D', "
                f"got {self.down_block_types}"
            )
        if set(self.up_block_types) != {"UpDecoderBlock2D"} or len(self.up_block_types) != n:
            raise ValueError(
                f"AutoencoderKL config: up_block_types must be {n} x 'UpDecoderBlock2D', got {self.up_block_types}"
            )
        if self.act_fn != "silu":
            raise ValueError(f"AutoencoderKL config: act_fn {self.act_fn!r} is not supported (only 'silu')")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"AutoencoderKL config: block_out_channels {self.block_out_channels} must be multiples of "
                f"norm_num_groups={self.norm_num_groups}"
            )
        if self.layers_per_block < 1 or self.latent_channels < 1:
            raise ValueError("AutoencoderKL config: layers_per_block and latent_channels must be >= 1")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


# float32 exp by range reduction + the Cephes expf polynomial (max relative error 8e-8 on [-87, 88]).
# The VAEs now use fast_ops.silu; this stays for scripts/train_demo.py, which builds on it.
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def _exp_f32(x: mx.array) -> mx.array:
    x = mx.clip(x, -87.0, 88.0)
    n = mx.floor(x * 1.4426950408889634 + 0.5)
    r = x - n * 0.693359375 + n * 2.12194440e-4  # x - n ln2 in two parts
    p = _EXP_POLY[0]
    for c in _EXP_POLY[1:]:
        p = p * r + c
    two_n = mx.view(mx.left_shift(n.astype(mx.int32) + 127, 23), mx.float32)
    return (p * r * r + r + 1.0) * two_n


@mx.compile
def _square_deviation(x: mx.array, mean: mx.array) -> mx.array:
    return mx.square(x - mean)


@mx.compile
def _normalize(x: mx.array, mean: mx.array, inv_std: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
    return (x - mean) * inv_std * weight + bias


@mx.compile
def _normalize_silu_fused(
    x: mx.array, mean: mx.array, inv_std: mx.array, weight: mx.array, bias: mx.array
) -> mx.array:
    y = (x - mean) * inv_std * weight + bias
    return y * mx.sigmoid(y)


def _normalize_silu(
    x: mx.array, mean: mx.array, inv_std: mx.array, weight: mx.array, bias: mx.array
) -> mx.array:
    if not fast_ops.fast_cpu():  # GPU: one fused kernel
        return _normalize_silu_fused(x, mean, inv_std, weight, bias)
    # CPU: the normalisation broadcasts per-channel statistics (a strided, scalar kernel), so the
    # SiLU runs separately on its contiguous result, in fast_ops' vectorized kernels
    return fast_ops.silu(_normalize(x, mean, inv_std, weight, bias))


class GroupNorm(nn.Module):
    """``torch.nn.GroupNorm`` over channels-last input of any rank (groups of consecutive channels).

    Statistics over all non-batch positions of a group, in float32, two-pass (mean, then mean squared
    deviation), reduced per channel first (fast contiguous reductions), then per group.
    ``norm(x, silu=True)`` fuses the SiLU that follows every GroupNorm of the VAEs but one.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-6):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
        self.num_groups = num_groups
        self.eps = eps
        self.weight = mx.ones((num_channels,))
        self.bias = mx.zeros((num_channels,))

    def _per_channel(self, per_group: mx.array) -> mx.array:  # [B, G, 1] -> [B, 1, C]
        b, channels = per_group.shape[0], self.weight.shape[0]
        return mx.broadcast_to(per_group, (b, self.num_groups, channels // self.num_groups)).reshape(b, 1, channels)

    def __call__(self, x: mx.array, silu: bool = False) -> mx.array:
        batch, channels = x.shape[0], x.shape[-1]
        flat = x.reshape(batch, -1, channels).astype(mx.float32)
        count = flat.shape[1] * (channels // self.num_groups)

        def group_mean(per_channel_sum: mx.array) -> mx.array:
            return per_channel_sum.reshape(batch, self.num_groups, -1).sum(axis=-1, keepdims=True) / count

        mean = self._per_channel(group_mean(flat.sum(axis=1)))
        var = group_mean(_square_deviation(flat, mean).sum(axis=1))
        inv_std = self._per_channel(mx.rsqrt(var + self.eps))
        weight, bias = self.weight.astype(mx.float32), self.bias.astype(mx.float32)
        out = (_normalize_silu if silu else _normalize)(flat, mean, inv_std, weight, bias)
        return out.reshape(x.shape).astype(x.dtype)


def _all_one(value: int | tuple[int, ...]) -> bool:
    return all(v == 1 for v in (value if isinstance(value, tuple) else (value,)))


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters) that runs stride-1 float32 convolutions on the CPU as matrix
    products: 3x3 with padding 1 by Winograd's F(2x2, 3x3) (``winograd.conv3x3``), others one product
    per tap (``conv_by_taps``, 1x1 as one product), instead of MLX's im2col copy + product."""

    def __call__(self, x: mx.array) -> mx.array:
        if not (fast_ops.fast_cpu() and x.dtype == mx.float32 and _all_one(self.stride)
                and _all_one(self.dilation) and self.groups == 1):
            return super().__call__(x)
        bias = self.bias if "bias" in self else None
        if winograd.applies(x, self.weight, self.padding):
            return winograd.conv3x3(x, self.weight, bias)
        return conv_by_taps(x, self.weight, bias, [(p, p) for p in self.padding])


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D without time embedding (temb=None, output_scale_factor=1)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, RESNET_EPS)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_channels, RESNET_EPS)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1)

    def steps(self, x: mx.array) -> Iterator[mx.array]:
        """The block's intermediate results, then its output (``fast_ops.CpuParallel.run``)."""
        h = self.norm1(x, silu=True)
        yield h
        h = self.conv1(h)
        yield h
        h = self.norm2(h, silu=True)
        yield h
        h = self.conv2(h)
        yield h
        yield (self.conv_shortcut(x) if "conv_shortcut" in self else x) + h

    def __call__(self, x: mx.array) -> mx.array:
        for out in self.steps(x):
            pass
        return out


class Downsample2D(nn.Module):
    """diffusers Downsample2D(use_conv=True, padding=0): pad right/bottom by one, 3x3 conv, stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


def upsample_nearest_2x(x: mx.array) -> mx.array:
    n, h, w, c = x.shape
    x = mx.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c))
    return x.reshape(n, 2 * h, 2 * w, c)


class Upsample2D(nn.Module):
    """diffusers Upsample2D(use_conv=True): nearest x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        conv = self.conv
        if fast_ops.fast_cpu() and x.dtype == mx.float32:  # the same, on the small grid (0.44x the work)
            return upsample2x_conv3x3(x, conv.weight, conv.bias if "bias" in conv else None)
        return conv(upsample_nearest_2x(x))


class Attention(nn.Module):
    """The VAE mid-block self-attention (diffusers ``Attention`` with heads=1, dim_head=channels,
    group norm, residual connection, rescale_output_factor=1)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, RESNET_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]
        self.scale = 1.0 / math.sqrt(channels)

    def __call__(self, x: mx.array) -> mx.array:
        n, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(n, 1, h * w, c)
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        out = fast_ops.attention(q, k, v, scale=self.scale)
        return x + self.to_out[0](out).reshape(n, h, w, c)


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)
        ]
        if add_downsample:
            self.downsamplers = [Downsample2D(out_channels)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers if "downsamplers" in self else []:
            x = down(x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)
        ]
        if add_upsample:
            self.upsamplers = [Upsample2D(out_channels)]

    @property
    def layers(self) -> list[nn.Module]:
        return self.resnets + (self.upsamplers if "upsamplers" in self else [])

    def __call__(self, x: mx.array, evaluate_layers: bool = False) -> mx.array:
        for layer in self.layers:
            x = layer(x)
            if evaluate_layers:
                mx.eval(x)
        return x


class UNetMidBlock2D(nn.Module):
    """resnet -> attention -> resnet (attention optional: mid_block_add_attention)."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(channels, channels, groups) for _ in range(2)]
        if add_attention:
            self.attentions = [Attention(channels, groups)]

    @property
    def layers(self) -> list[nn.Module]:
        return [self.resnets[0], *(self.attentions if "attentions" in self else []), self.resnets[1]]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x


class Encoder(nn.Module):
    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = [
            DownEncoderBlock2D(
                channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups, i < len(channels) - 1
            )
            for i in range(len(channels))
        ]
        self.mid_block = UNetMidBlock2D(channels[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, channels[-1], RESNET_EPS)
        self.conv_out = Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x, silu=True))


class Decoder(nn.Module):
    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        reversed_channels = list(reversed(channels))
        self.conv_in = Conv2d(config.latent_channels, channels[-1], 3, padding=1)
        self.mid_block = UNetMidBlock2D(channels[-1], groups, config.mid_block_add_attention)
        self.up_blocks = [
            UpDecoderBlock2D(
                reversed_channels[max(i - 1, 0)],
                reversed_channels[i],
                config.layers_per_block + 1,
                groups,
                i < len(channels) - 1,
            )
            for i in range(len(channels))
        ]
        self.conv_norm_out = GroupNorm(groups, channels[0], RESNET_EPS)
        self.conv_out = Conv2d(channels[0], config.out_channels, 3, padding=1)
        # Evaluate after every layer (resnet, attention, upsampler): the lazy graph of a whole
        # decoder keeps more full-resolution temporaries alive (MLX peak -22% at 4 x 120x216 frames,
        # same speed), and on the CPU each stage then runs in parallel parts (fast_ops.cpu_parallel).
        # Set False to trace the decoder (mx.compile, gradients).
        self.evaluate_layers = True

    # The decoder in stages (the VAE's units): input stage, one stage per up block, output stage.
    def stage_in(self, z: mx.array) -> mx.array:
        return fast_ops.run_layers([self.conv_in, *self.mid_block.layers], z, self.evaluate_layers)

    def stage_up(self, index: int, x: mx.array) -> mx.array:
        return fast_ops.run_layers(self.up_blocks[index].layers, x, self.evaluate_layers)

    def stage_out(self, x: mx.array) -> mx.array:
        layers = [lambda h: self.conv_out(self.conv_norm_out(h, silu=True))]
        return fast_ops.run_layers(layers, x, self.evaluate_layers)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.stage_in(z)
        for index in range(len(self.up_blocks)):
            x = self.stage_up(index, x)
        return self.stage_out(x)


def blend_weights(extent: int, dtype: mx.Dtype) -> mx.array:
    """diffusers blend_v/blend_h ramp: the new tile gets weight y / extent at offset y."""
    return (mx.arange(extent, dtype=mx.float32) / extent).astype(dtype)


class AutoencoderKL(nn.Module):
    """diffusers AutoencoderKL, channels-last: images ``[N, H, W, in_channels]``, latents
    ``[N, H/f, W/f, latent_channels]`` with f = 2**(len(block_out_channels)-1). Latents are unscaled
    (multiply by a scaling factor yourself, as Open-Sora's VideoAutoencoderKL does)."""

    def __init__(self, config: AutoencoderKLConfig | dict[str, Any]):
        super().__init__()
        if isinstance(config, dict):
            config = AutoencoderKLConfig.from_dict(config)
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.use_quant_conv:
            self.quant_conv = Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        if config.use_post_quant_conv:
            self.post_quant_conv = Conv2d(config.latent_channels, config.latent_channels, 1)

    def _check(self, x: mx.array, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(
                f"AutoencoderKL.{what} expects channels-last [N, H, W, {channels}], got shape {tuple(x.shape)}"
            )

    def encode_moments(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Posterior mean and log-variance (clamped to [-30, 20] as DiagonalGaussianDistribution)."""
        self._check(x, self.config.in_channels, "encode")
        h = self.encoder(x)
        if "quant_conv" in self:
            h = self.quant_conv(h)
        mean, logvar = mx.split(h, 2, axis=-1)
        return mean, mx.clip(logvar, -30.0, 20.0)

    def encode(self, x: mx.array, key: mx.array | None = None) -> mx.array:
        """Posterior mean (``latent_dist.mode()``), or a sample ``mean + std * eps`` when ``key`` is given."""
        mean, logvar = self.encode_moments(x)
        if key is None:
            return mean
        eps = mx.random.normal(mean.shape, dtype=mean.dtype, key=key)
        return mean + mx.exp(0.5 * logvar) * eps

    def decode(self, z: mx.array) -> mx.array:
        self._check(z, self.config.latent_channels, "decode")
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    # ------------------------------------------------------------------ tiled decoding

    def tiles(self, latent_size: int, tile_size: int, overlap: int) -> list[int]:
        if not 0 <= overlap < tile_size:
            raise ValueError(f"tile overlap {overlap} must be in [0, tile size {tile_size})")
        return list(range(0, latent_size, tile_size - overlap))

    def iter_tiled_decode_rows(
        self, z: mx.array, tile_size: int, overlap: int, decode: Callable[[mx.array], mx.array] | None = None
    ) -> Iterator[mx.array]:
        """Tiled decode, one finished row of tiles at a time (each evaluated), as diffusers'
        ``AutoencoderKL.tiled_decode`` with tile_latent_min_size = ``tile_size`` and overlap factor
        ``overlap / tile_size``: tiles start every ``tile_size - overlap`` latent pixels, each tile is
        blended linearly over ``f * overlap`` pixels with its (already blended) upper and left
        neighbours, then cropped to ``f * (tile_size - overlap)``."""
        self._check(z, self.config.latent_channels, "decode")
        f = self.config.downsample_factor
        blend, keep = f * overlap, f * (tile_size - overlap)
        previous_row: list[mx.array] = []
        for i in self.tiles(z.shape[1], tile_size, overlap):
            row: list[mx.array] = []
            for j_index, j in enumerate(self.tiles(z.shape[2], tile_size, overlap)):
                tile = (decode or self.decode)(z[:, i : i + tile_size, j : j + tile_size])
                if previous_row:
                    tile = _blend(previous_row[j_index], tile, blend, axis=1)
                if row:
                    tile = _blend(row[-1], tile, blend, axis=2)
                mx.eval(tile)
                row.append(tile)
            yield mx.concatenate([t[:, :keep, :keep] for t in row], axis=2)
            previous_row = row

    def tiled_decode(
        self, z: mx.array, tile_size: int, overlap: int, decode: Callable[[mx.array], mx.array] | None = None
    ) -> mx.array:
        """Tiled decode when z is larger than one tile (diffusers' ``_decode`` guard), else ``decode``.
        ``decode`` replaces ``self.decode`` for each tile (e.g. the VAE's unit chain)."""
        decode = decode or self.decode
        if max(z.shape[1:3]) <= tile_size:
            return decode(z)
        return mx.concatenate(list(self.iter_tiled_decode_rows(z, tile_size, overlap, decode)), axis=1)


def _blend(a: mx.array, b: mx.array, extent: int, axis: int) -> mx.array:
    """b with its first ``extent`` rows (axis 1) / columns (axis 2) cross-faded from a's last ones."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent == 0:
        return b
    ramp = blend_weights(extent, b.dtype)
    if axis == 1:
        ramp = ramp[None, :, None, None]
        a_end, b_start, b_rest = a[:, -extent:], b[:, :extent], b[:, extent:]
    else:
        ramp = ramp[None, None, :, None]
        a_end, b_start, b_rest = a[:, :, -extent:], b[:, :, :extent], b[:, :, extent:]
    mixed = a_end * (1 - ramp) + b_start * ramp
    return mx.concatenate([mixed, b_rest], axis=axis)
