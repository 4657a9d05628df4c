"""The temporal VAE of Open-Sora 1.2 (``VAE_Temporal`` / ``VAE_Temporal_SD``) in MLX.

Reproduces opensora/models/vae/vae_temporal.py (commit 8d132d7) with the same parameter names
(``encoder.block_res_blocks.1.0.conv1.conv.weight`` ...). It compresses the frame axis of spatial
latents by 4 (2 x 2 temporal strides) and keeps H, W.

Layout: channels-last video ``[B, T, H, W, C]`` (the pipeline in ``vae.py`` converts at its boundary).

Reference behaviour reproduced on purpose:
* CausalConv3d pads with zeros (``F.pad`` mode "constant"): ``dilation*(kt-1) + (1-stride)`` frames in
  front of the clip (none behind), ``k//2`` pixels on each side in H and W.
* ``encode`` prepends ``(4 - T % 4) % 4`` zero frames; ``decode(z, num_frames)`` drops that many
  frames from the front of the decoder output.
* The decoder's upsampling is depth-to-time: a causal conv makes ``2*C`` channels and channel
  ``c*2 + s`` becomes frame ``2*t + s`` (einops "B (C ts) T H W -> B C (T ts) H W").
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator

import mlx.core as mx
import mlx.nn as nn

from . import fast_ops, winograd
from .config_checks import require_int, require_ints
from .conv import conv_by_taps
from .vae_spatial import GroupNorm

TORCH_GROUPNORM_EPS = 1e-5  # the reference uses nn.GroupNorm's default eps

# opensora/models/vae/vae_temporal.py: VAE_Temporal_SD() -> VAE_Temporal(**these, **kwargs)
VAE_TEMPORAL_SD_CONFIG: dict[str, Any] = {
    "in_out_channels": 4,
    "latent_embed_dim": 4,
    "embed_dim": 4,
    "filters": 128,
    "num_res_blocks": 4,
    "channel_multipliers": [1, 2, 2, 4],
    "temporal_downsample": [False, True, True],
    "num_groups": 32,
    "activation_fn": "swish",
}


@dataclass(frozen=True)
class VAETemporalConfig:
    """``VAE_Temporal`` constructor kwargs; the defaults are those of ``VAE_Temporal_SD``."""

    in_out_channels: int = 4
    latent_embed_dim: int = 4
    embed_dim: int = 4
    filters: int = 128
    num_res_blocks: int = 4
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    num_groups: int = 32
    activation_fn: str = "swish"

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "VAETemporalConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in known}
        for key in ("channel_multipliers", "temporal_downsample"):
            if key in values:
                if not isinstance(values[key], (list, tuple)):
                    raise ValueError(f"VAE_Temporal config: {key} must be a list, got {values[key]!r}")
                values[key] = tuple(values[key])
        return cls(**values)

    def __post_init__(self) -> None:
        owner = "VAE_Temporal config"
        for name, high in (("in_out_channels", 64), ("latent_embed_dim", 64), ("embed_dim", 64), ("filters", 4096),
                           ("num_res_blocks", 16), ("num_groups", 1024)):
            require_int(owner, name, getattr(self, name), 1, high)
        require_ints(owner, "channel_multipliers", self.channel_multipliers, 1, 64, max_len=8)
        if not all(isinstance(t, bool) for t in self.temporal_downsample):
            raise ValueError(f"{owner}: temporal_downsample must hold true/false values, got {self.temporal_downsample}")
        if len(self.temporal_downsample) != len(self.channel_multipliers) - 1:
            raise ValueError(
                f"VAE_Temporal config: temporal_downsample {self.temporal_downsample} needs "
                f"len(channel_multipliers) - 1 = {len(self.channel_multipliers) - 1} entries"
            )
        if self.activation_fn not in ("swish", "relu"):
            raise ValueError(f"VAE_Temporal config: activation_fn {self.activation_fn!r} is not 'swish' or 'relu'")
        widths = [self.filters * m for m in self.channel_multipliers]
        if any(w % self.num_groups for w in widths):
            raise ValueError(
                f"VAE_Temporal config: channel widths {widths} must be multiples of num_groups={self.num_groups}"
            )

    @property
    def time_downsample_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)


def norm_act(norm: GroupNorm, x: mx.array, activation_fn: str) -> mx.array:
    """GroupNorm then the activation ("swish" = SiLU, fused into the norm)."""
    return norm(x, silu=True) if activation_fn == "swish" else nn.relu(norm(x))


class CausalConv3d(nn.Module):
    """Zero-padded causal 3D conv: ``time_pad`` frames in front, "same" padding in H and W."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        time_stride: int = 1,
        bias: bool = True,
    ):
        super().__init__()
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError("CausalConv3d needs odd spatial kernel sizes")
        self.time_pad = (kt - 1) + (1 - time_stride)
        self.conv = nn.Conv3d(
            in_channels,
            out_channels,
            (kt, kh, kw),
            stride=(time_stride, 1, 1),
            padding=(0, kh // 2, kw // 2),  # zeros on both sides in H, W = the reference's F.pad
            bias=bias,
        )

    def __call__(self, x: mx.array) -> mx.array:
        conv = self.conv
        if fast_ops.fast_cpu() and x.dtype == mx.float32 and conv.stride == (1, 1, 1):
            # CPU: the convolution as matrix products, time folded into the channels (fast_ops)
            bias = conv.bias if "bias" in conv else None
            if winograd.applies(x, conv.weight, conv.padding[1:]):  # F(2x2, 3x3) per frame
                return winograd.conv3x3(x, conv.weight, bias, time_padding=(self.time_pad, 0))
            padding = [(self.time_pad, 0), *((p, p) for p in conv.padding[1:])]
            return conv_by_taps(x, conv.weight, bias, padding, fold=1)
        if self.time_pad > 0:
            x = mx.pad(x, [(0, 0), (self.time_pad, 0), (0, 0), (0, 0), (0, 0)])
        return conv(x)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, filters: int, num_groups: int, activation_fn: str):
        super().__init__()
        self.activation_fn = activation_fn
        self.norm1 = GroupNorm(num_groups, in_channels, TORCH_GROUPNORM_EPS)
        self.conv1 = CausalConv3d(in_channels, filters, 3, bias=False)
        self.norm2 = GroupNorm(num_groups, filters, TORCH_GROUPNORM_EPS)
        self.conv2 = CausalConv3d(filters, filters, 3, bias=False)
        if in_channels != filters:
            self.conv3 = CausalConv3d(in_channels, filters, 1, bias=False)

    def steps(self, x: mx.array) -> Iterator[mx.array]:
        """The block's intermediate results, then its output (``fast_ops.CpuParallel.run``)."""
        h = norm_act(self.norm1, x, self.activation_fn)
        yield h
        h = self.conv1(h)
        yield h
        h = norm_act(self.norm2, h, self.activation_fn)
        yield h
        h = self.conv2(h)
        yield h
        yield h + (self.conv3(x) if "conv3" in self else x)

    def __call__(self, x: mx.array) -> mx.array:
        for out in self.steps(x):
            pass
        return out


class Encoder(nn.Module):
    def __init__(self, config: VAETemporalConfig):
        super().__init__()
        c = config
        self.activation_fn = c.activation_fn
        self.conv_in = CausalConv3d(c.in_out_channels, c.filters, 3, bias=False)
        self.block_res_blocks = []
        self.conv_blocks = []
        prev = c.filters
        for i, mult in enumerate(c.channel_multipliers):
            width = c.filters * mult
            blocks = []
            for _ in range(c.num_res_blocks):
                blocks.append(ResBlock(prev, width, c.num_groups, c.activation_fn))
                prev = width
            self.block_res_blocks.append(blocks)
            if i < len(c.channel_multipliers) - 1:
                # no temporal downsampling: the reference keeps an nn.Identity placeholder (index kept)
                down = CausalConv3d(prev, width, 3, time_stride=2) if c.temporal_downsample[i] else nn.Identity()
                self.conv_blocks.append(down)
                prev = width
        self.res_blocks = [ResBlock(prev, width, c.num_groups, c.activation_fn) for _ in range(c.num_res_blocks)]
        self.norm1 = GroupNorm(c.num_groups, width, TORCH_GROUPNORM_EPS)
        self.conv2 = CausalConv3d(width, 2 * c.latent_embed_dim, 1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for i, blocks in enumerate(self.block_res_blocks):
            for block in blocks:
                x = block(x)
            if i < len(self.conv_blocks):
                x = self.conv_blocks[i](x)
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(norm_act(self.norm1, x, self.activation_fn))


def depth_to_time(x: mx.array, factor: int) -> mx.array:
    """``B (C ts) T H W -> B C (T ts) H W`` in channels-last form."""
    if factor == 1:
        return x
    b, t, h, w, cs = x.shape
    x = x.reshape(b, t, h, w, cs // factor, factor)
    x = x.transpose(0, 1, 5, 2, 3, 4)
    return x.reshape(b, t * factor, h, w, cs // factor)


class Decoder(nn.Module):
    def __init__(self, config: VAETemporalConfig):
        super().__init__()
        c = config
        self.activation_fn = c.activation_fn
        self.temporal_downsample = c.temporal_downsample
        width = c.filters * c.channel_multipliers[-1]
        self.conv1 = CausalConv3d(c.latent_embed_dim, width, 3)
        self.res_blocks = [ResBlock(width, width, c.num_groups, c.activation_fn) for _ in range(c.num_res_blocks)]
        n = len(c.channel_multipliers)
        block_res_blocks: list[list[ResBlock]] = [[] for _ in range(n)]
        conv_blocks: list[nn.Module] = [nn.Identity() for _ in range(n - 1)]
        prev = width
        for i in reversed(range(n)):
            width = c.filters * c.channel_multipliers[i]
            for _ in range(c.num_res_blocks):
                block_res_blocks[i].append(ResBlock(prev, width, c.num_groups, c.activation_fn))
                prev = width
            if i > 0 and c.temporal_downsample[i - 1]:
                conv_blocks[i - 1] = CausalConv3d(prev, prev * 2, 3)
        self.block_res_blocks = block_res_blocks
        self.conv_blocks = conv_blocks
        self.norm1 = GroupNorm(c.num_groups, prev, TORCH_GROUPNORM_EPS)
        self.conv_out = CausalConv3d(width, c.in_out_channels, 3)
        self.evaluate_layers = True

    # The decoder in stages (the VAE's units): input stage, one up stage per level (deepest first),
    # output stage.
    # Each layer is evaluated before the next (``fast_ops.run_layers``: on the CPU the convolutions
    # spread their work over the cores); set ``evaluate_layers`` False to trace the decoder.
    def stage_in(self, x: mx.array) -> mx.array:
        return fast_ops.run_layers([self.conv1, *self.res_blocks], x, self.evaluate_layers)

    def stage_up(self, level: int, x: mx.array) -> mx.array:
        layers: list[Callable[[mx.array], mx.array]] = list(self.block_res_blocks[level])
        if level > 0:
            factor = 2 if self.temporal_downsample[level - 1] else 1
            layers.append(lambda h: depth_to_time(self.conv_blocks[level - 1](h), factor))
        return fast_ops.run_layers(layers, x, self.evaluate_layers)

    def stage_out(self, x: mx.array) -> mx.array:
        layers = [lambda h: self.conv_out(norm_act(self.norm1, h, self.activation_fn))]
        return fast_ops.run_layers(layers, x, self.evaluate_layers)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.stage_in(x)
        for level in reversed(range(len(self.block_res_blocks))):
            x = self.stage_up(level, x)
        return self.stage_out(x)


class VAE_Temporal(nn.Module):  # noqa: N801 - the reference's class name
    """Temporal VAE on channels-last spatial latents ``[B, T, H, W, in_out_channels]``."""

    def __init__(self, config: VAETemporalConfig | dict[str, Any]):
        super().__init__()
        if isinstance(config, dict):
            config = VAETemporalConfig.from_dict(config)
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = CausalConv3d(2 * config.latent_embed_dim, 2 * config.embed_dim, 1)
        self.post_quant_conv = CausalConv3d(config.embed_dim, config.latent_embed_dim, 1)
        self.decoder = Decoder(config)

    def time_padding(self, num_frames: int) -> int:
        factor = self.config.time_downsample_factor
        return (factor - num_frames % factor) % factor

    def get_latent_size(self, input_size: tuple[int | None, int | None, int | None]) -> list[int | None]:
        """(T, H, W) -> (ceil(T / 4), H, W); None stays None (as the reference)."""
        t, h, w = input_size
        if t is not None:
            t = (t + self.time_padding(t)) // self.config.time_downsample_factor
        return [t, h, w]

    def _check(self, x: mx.array, channels: int, what: str) -> None:
        if x.ndim != 5 or x.shape[-1] != channels:
            raise ValueError(
                f"VAE_Temporal.{what} expects channels-last [B, T, H, W, {channels}], got shape {tuple(x.shape)}"
            )

    def encode_moments(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Posterior mean and log-variance (clamped to [-30, 20]), ``[B, ceil(T/4), H, W, embed_dim]``."""
        self._check(x, self.config.in_out_channels, "encode")
        pad = self.time_padding(x.shape[1])
        if pad:
            x = mx.pad(x, [(0, 0), (pad, 0), (0, 0), (0, 0), (0, 0)])
        moments = self.quant_conv(self.encoder(x))
        mean, logvar = mx.split(moments, 2, axis=-1)
        return mean, mx.clip(logvar, -30.0, 20.0)

    def encode(self, x: mx.array, key: mx.array | None = None) -> mx.array:
        """Posterior mean (``posterior.mode()``), or a sample when ``key`` is given."""
        mean, logvar = self.encode_moments(x)
        if key is None:
            return mean
        return mean + mx.exp(0.5 * logvar) * mx.random.normal(mean.shape, dtype=mean.dtype, key=key)

    def check_decode_input(self, z: mx.array, num_frames: int) -> None:
        self._check(z, self.config.embed_dim, "decode")
        expected = self.get_latent_size((num_frames, None, None))[0]
        if num_frames < 1 or expected != z.shape[1]:
            raise ValueError(
                f"VAE_Temporal.decode: {z.shape[1]} latent frames cannot decode to num_frames={num_frames} "
                f"({num_frames} frames have {expected} latent frames)"
            )

    def decode(self, z: mx.array, num_frames: int) -> mx.array:
        """``[B, T_lat, H, W, embed_dim]`` -> ``[B, num_frames, H, W, in_out_channels]``."""
        self.check_decode_input(z, num_frames)
        x = self.decoder(self.post_quant_conv(z))
        return x[:, self.time_padding(num_frames) :]

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """A PyTorch ``VAE_Temporal`` state dict (optionally prefixed ``temporal_vae.``) -> MLX weights:
        Conv3d kernels (O, I, kt, kh, kw) -> (O, kt, kh, kw, I)."""
        out = {}
        for key, value in weights.items():
            key = key.removeprefix("temporal_vae.")
            if value.ndim == 5:
                value = value.transpose(0, 2, 3, 4, 1)
            out[key] = value
        return out
