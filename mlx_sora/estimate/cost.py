"""FLOPs and bytes of every unit call of a generation, counted from the models' configs and the
request's sizes: what ``mlx_sora.estimate`` turns into seconds with a device model.

Each unit call is a list of ops of four kinds:

* ``matmul``: the linear layers, 2 M K N (M rows: tokens, caption tokens, pixels);
* ``attention``: the score and value products, 4 x queries x keys x width per sequence (real
  sequence lengths: spatial S, temporal T, TDTM's T // 2, the caption keys); its bytes are q, k, v
  and the output (the softmax between the products is part of the device's attention rate);
* ``conv``: convolutions counted by their definition, 2 x outputs x C_in x kernel volume (zero
  padding included), whatever algorithm runs them (Winograd on the CPU multiplies less; a device's
  measured rate absorbs that);
* ``elementwise``: norms, activations, residuals, modulation, copies, gathers: bytes only.

Bytes are activations read and written in the compute dtype and weights read as held (the compute
dtype; T5's lookup tables as stored). The structure follows the models' code: ``models/t5.py``
(T5Block), ``models/stdit3_layers.py`` (STDiT3Block, TDTM ``merge_frames``), ``models/vae*.py``
(the decoder stages, ``OpenSoraVAE.temporal_chunks`` and micro-batches, tiling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..models.stdit3 import STDiT3Config
from ..models.t5 import T5Config
from ..models.vae import VideoAutoencoderConfig

KINDS = ("matmul", "attention", "conv", "elementwise")


@dataclass(frozen=True)
class Op:
    kind: str
    flops: float
    bytes: float
    items: float = 0.0
    """Attention: the independent products it batches (sequences x heads), each with a fixed cost."""
    array_bytes: float = 0.0
    """Elementwise: the size of one array it passes over (small arrays stay in the caches)."""
    kernel: int = 0
    """Convolutions: the kernel's volume (9: 3x3, 27: 3x3x3, 1: pointwise)."""
    width: int = 0
    """Convolutions: input channels (a CPU's convolution rate grows with them)."""


@dataclass(frozen=True)
class UnitCall:
    """One run of one unit: what it computes, and the layers it runs (each has a fixed cost per run
    beside its arithmetic: dispatching its ops, evaluating; ``devices.DeviceModel.fixed_s``)."""

    unit: str
    ops: tuple[Op, ...]
    layers: tuple[tuple[str, int], ...] = ()

    def flops(self, kind: str | None = None) -> float:
        return sum(op.flops for op in self.ops if kind is None or op.kind == kind)

    @property
    def bytes(self) -> float:
        return sum(op.bytes for op in self.ops)


@dataclass
class _Ops:
    """Collects the ops of one unit call; ``act``/``weight``: itemsizes of activations / weights."""

    act: int
    weight: int
    ops: list[Op] = field(default_factory=list)
    layers: dict[str, int] = field(default_factory=dict)

    def layer(self, name: str, count: int = 1) -> None:
        self.layers[name] = self.layers.get(name, 0) + count

    def linear(self, rows: float, k: int, n: int, bias: bool = True) -> None:
        weights = (k * n + (n if bias else 0)) * self.weight
        self.ops.append(Op("matmul", 2.0 * rows * k * n, (rows * (k + n)) * self.act + weights))

    def attention(self, sequences: float, heads: int, queries: int, keys: int, head_dim: int) -> None:
        flops = 4.0 * sequences * heads * queries * keys * head_dim
        io = sequences * heads * (2 * queries + 2 * keys) * head_dim * self.act
        self.ops.append(Op("attention", flops, io, sequences * heads))

    def conv(self, outputs: float, c_in: int, c_out: int, kernel: int, inputs: float, bias: bool = True) -> None:
        """``outputs`` / ``inputs``: positions (pixels x frames x images) of the output / input."""
        weights = (c_out * c_in * kernel + (c_out if bias else 0)) * self.weight
        flops = 2.0 * outputs * c_out * c_in * kernel
        self.ops.append(Op("conv", flops, (inputs * c_in + outputs * c_out) * self.act + weights, kernel=kernel,
                           width=c_in))

    def elementwise(self, elements: float, passes: float) -> None:
        """``passes``: arrays of ``elements`` read or written (x + y -> z: 3)."""
        self.ops.append(Op("elementwise", 0.0, passes * elements * self.act, array_bytes=elements * self.act))

    def call(self, unit: str) -> UnitCall:
        return UnitCall(unit, tuple(self.ops), tuple(self.layers.items()))


# ---------------------------------------------------------------- T5 v1.1 encoder


def t5_calls(config: T5Config, batch: int, length: int, itemsize: int) -> list[UnitCall]:
    """One text encoding: ``embed``, ``block_00`` .., ``final_norm`` (``models/t5.py``). ``length``:
    the padded prompt length (every position is computed, as the reference does)."""
    d, heads, d_kv, d_ff = config.d_model, config.num_heads, config.d_kv, config.d_ff
    tokens, inner = batch * length, heads * d_kv
    calls = []
    ops = _Ops(itemsize, itemsize)
    ops.elementwise(tokens * d, 2)  # the rows looked up, cast
    ops.elementwise(batch * heads * length * length, 4)  # position bias gathered, masked ([B, h, L, L])
    ops.layer("t5.embed")
    calls.append(ops.call("embed"))
    for i in range(config.num_layers):
        ops = _Ops(itemsize, itemsize)
        ops.elementwise(tokens * d, 2)  # RMSNorm
        for _ in range(3):
            ops.linear(tokens, d, inner, bias=False)
            ops.elementwise(tokens * inner, 2)  # to heads [B, h, L, d_kv]
        ops.attention(batch, heads, length, length, d_kv)
        ops.elementwise(batch * heads * length * length, 2)  # + the bias
        ops.elementwise(tokens * inner, 2)  # back from heads
        ops.linear(tokens, inner, d, bias=False)
        ops.elementwise(tokens * d, 3)  # residual
        ops.elementwise(tokens * d, 2)  # RMSNorm
        ops.linear(tokens, d, d_ff, bias=False)
        ops.elementwise(tokens * d_ff, 4)  # activation (fast GELU: two kernels)
        if config.is_gated:
            ops.linear(tokens, d, d_ff, bias=False)
            ops.elementwise(tokens * d_ff, 3)  # gate
        ops.linear(tokens, d_ff, d, bias=False)
        ops.elementwise(tokens * d, 3)  # residual
        ops.layer("t5.block")
        calls.append(ops.call(f"block_{i:02d}"))
    ops = _Ops(itemsize, itemsize)
    ops.elementwise(tokens * d, 2)
    ops.layer("t5.final_norm")
    calls.append(ops.call("final_norm"))
    return calls


# ---------------------------------------------------------------- STDiT3


def stdit3_calls(config: STDiT3Config, batch: int, latent: tuple[int, int, int], caption_keys: int,
                 merge: bool, itemsize: int) -> list[UnitCall]:
    """One evaluation of STDiT3 on latents [batch, C, T, H, W] (``batch``: the CFG batch 2B):
    ``embedders``, ``block_00`` .., ``final_layer`` (``models/stdit3.py``, ``stdit3_layers.py``).

    ``caption_keys``: the caption tokens cross-attention reads (those some sample attends to);
    ``merge``: TDTM, consecutive latent-frame pairs averaged before self- and cross-attention, which
    then see T // 2 frames (``merge_frames``; T >= 2); the MLP and the norms see all T."""
    c, heads, head_dim = config.hidden_size, config.num_heads, config.head_dim
    pt, ph, pw = config.patch_size
    t, h, w = (-(-n // p) for n, p in zip(latent, config.patch_size))
    s = h * w
    tokens = batch * t * s
    merged_t = t // 2 if merge and t >= 2 else t
    merged = batch * merged_t * s
    hidden = int(c * config.mlp_ratio)
    caption = config.model_max_length

    calls = []
    ops = _Ops(itemsize, itemsize)
    ops.conv(tokens, config.in_channels, c, pt * ph * pw, batch * math.prod(latent))  # PatchEmbed3D
    ops.elementwise(tokens * c, 3)  # + position embedding
    for _ in range(2):  # t_embedder, fps_embedder: 256 -> C -> C
        ops.linear(batch, 256, c)
        ops.linear(batch, c, c)
    ops.linear(batch, c, 6 * c)  # t_block
    ops.linear(batch * caption, config.caption_channels, c)  # y_embedder: every padded caption token
    ops.elementwise(batch * caption * c, 4)
    ops.linear(batch * caption, c, c)
    ops.layer("stdit3.embedders")
    calls.append(ops.call("embedders"))

    for i in range(config.depth):
        ops = _Ops(itemsize, itemsize)
        for temporal in (False, True):
            ops.elementwise(tokens * c, 4)  # norm1, modulate
            if merged != tokens:
                ops.elementwise(tokens * c + merged * c, 1)  # merge_frames
            if temporal:
                ops.elementwise(merged * c, 2)  # frames to sequences
            ops.linear(merged, c, 3 * c)
            ops.elementwise(merged * c, 6)  # q, k, v to heads
            if config.qk_norm:
                ops.elementwise(merged * c, 4)
            if temporal:
                ops.elementwise(merged * c, 4)  # RoPE on q and k
            seq = merged_t if temporal else s
            ops.attention(merged / seq, heads, seq, seq, head_dim)
            ops.elementwise(merged * c, 2)  # from heads
            ops.linear(merged, c, c)
            if temporal:
                ops.elementwise(merged * c, 2)
            if merged != tokens:
                ops.elementwise(tokens * c + merged * c, 1)  # unmerge_frames
            ops.elementwise(tokens * c, 3)  # gated residual
            # cross-attention (the residual stream merged, no norm)
            if merged != tokens:
                ops.elementwise(tokens * c + merged * c, 1)
            ops.linear(merged, c, c)  # q
            ops.linear(batch * caption_keys, c, 2 * c)  # k, v of the caption keys
            ops.elementwise(merged * c, 2)
            ops.attention(batch, heads, merged // batch, caption_keys, head_dim)
            ops.elementwise(merged * c, 2)
            ops.linear(merged, c, c)
            if merged != tokens:
                ops.elementwise(tokens * c + merged * c, 1)
            ops.elementwise(tokens * c, 3)  # residual
            ops.elementwise(tokens * c, 4)  # norm2, modulate
            ops.linear(tokens, c, hidden)
            ops.elementwise(tokens * hidden, 4)  # GELU (tanh)
            ops.linear(tokens, hidden, c)
            ops.elementwise(tokens * c, 3)  # gated residual
        ops.layer("stdit3.block_tdtm" if merged != tokens else "stdit3.block")
        calls.append(ops.call(f"block_{i:02d}"))

    ops = _Ops(itemsize, itemsize)
    ops.elementwise(tokens * c, 4)  # norm, modulate
    out = pt * ph * pw * config.out_channels
    ops.linear(tokens, c, out)
    ops.elementwise(tokens * out, 2)  # unpatchify
    ops.layer("stdit3.final_layer")
    calls.append(ops.call("final_layer"))
    return calls


# ---------------------------------------------------------------- VAE v1.2 decoders


def _group_norm(ops: _Ops, elements: float, silu: bool = True) -> None:
    ops.elementwise(elements, 6 + (2 if silu else 0))  # statistics (two reductions), normalize, SiLU


def _causal_conv(ops: _Ops, frames: float, pixels: int, c_in: int, c_out: int, kernel: int, bias: bool = True) -> None:
    """``CausalConv3d`` (stride 1): as many output frames as input frames (zeros padded in front)."""
    ops.conv(frames * pixels, c_in, c_out, kernel**3, frames * pixels, bias)


def _conv2d(ops: _Ops, images: float, pixels: int, c_in: int, c_out: int, kernel: int, out_pixels: int = 0) -> None:
    ops.conv(images * (out_pixels or pixels), c_in, c_out, kernel, images * pixels)


# The decoders' stages run layer by layer, each evaluated (``fast_ops.run_layers``); the fixed cost
# of a run is per layer: "vae.res_block" (a temporal ResBlock or a spatial ResnetBlock2D: two norms,
# two 3x3 convolutions), "vae.conv" (a stage's lone convolution: conv_in, an upsampler, the output
# convolution with its norm), "vae.attention" (the mid-block attention).


def _temporal_res_block(ops: _Ops, frames: float, pixels: int, c_in: int, c_out: int) -> None:
    _group_norm(ops, frames * pixels * c_in)
    _causal_conv(ops, frames, pixels, c_in, c_out, 3, bias=False)
    _group_norm(ops, frames * pixels * c_out)
    _causal_conv(ops, frames, pixels, c_out, c_out, 3, bias=False)
    if c_in != c_out:
        _causal_conv(ops, frames, pixels, c_in, c_out, 1, bias=False)
    ops.elementwise(frames * pixels * c_out, 3)
    ops.layer("vae.res_block")


def temporal_decoder_calls(config: VideoAutoencoderConfig, batch: int, latent_frames: int, pixels: int,
                           itemsize: int) -> list[UnitCall]:
    """One temporal chunk (``latent_frames`` latent frames of ``pixels`` latent pixels each) through
    the temporal decoder's units: ``latent_stats``, ``temporal_decoder_in``, ``temporal_decoder_up_N``
    .. ``_0``, ``temporal_decoder_out`` (``vae_temporal.Decoder`` stages)."""
    tc = config.temporal_vae
    frames = batch * latent_frames  # batch folded into frames: every count is per frame
    width = tc.filters * tc.channel_multipliers[-1]
    calls = []
    ops = _Ops(itemsize, itemsize)
    ops.elementwise(frames * pixels * tc.embed_dim, 3)
    calls.append(ops.call("latent_stats"))
    ops = _Ops(itemsize, itemsize)
    _causal_conv(ops, frames, pixels, tc.embed_dim, tc.latent_embed_dim, 1)  # post_quant_conv
    _causal_conv(ops, frames, pixels, tc.latent_embed_dim, width, 3)  # conv1
    ops.layer("vae.conv")
    for _ in range(tc.num_res_blocks):
        _temporal_res_block(ops, frames, pixels, width, width)
    calls.append(ops.call("temporal_decoder_in"))
    prev = width
    for level in reversed(range(len(tc.channel_multipliers))):
        ops = _Ops(itemsize, itemsize)
        width = tc.filters * tc.channel_multipliers[level]
        for _ in range(tc.num_res_blocks):
            _temporal_res_block(ops, frames, pixels, prev, width)
            prev = width
        if level > 0 and tc.temporal_downsample[level - 1]:
            _causal_conv(ops, frames, pixels, prev, 2 * prev, 3)
            ops.elementwise(frames * pixels * 2 * prev, 2)  # depth to time
            ops.layer("vae.conv")
            frames *= 2
        calls.append(ops.call(f"temporal_decoder_up_{level}"))
    ops = _Ops(itemsize, itemsize)
    _group_norm(ops, frames * pixels * prev)
    _causal_conv(ops, frames, pixels, prev, tc.in_out_channels, 3)
    ops.layer("vae.conv")
    calls.append(ops.call("temporal_decoder_out"))
    return calls


def _spatial_resnet(ops: _Ops, images: float, pixels: int, c_in: int, c_out: int) -> None:
    _group_norm(ops, images * pixels * c_in)
    _conv2d(ops, images, pixels, c_in, c_out, 9)
    _group_norm(ops, images * pixels * c_out)
    _conv2d(ops, images, pixels, c_out, c_out, 9)
    if c_in != c_out:
        _conv2d(ops, images, pixels, c_in, c_out, 1)
    ops.elementwise(images * pixels * c_out, 3)
    ops.layer("vae.res_block")


def spatial_decoder_calls(config: VideoAutoencoderConfig, images: int, latent_h: int, latent_w: int,
                          itemsize: int) -> list[UnitCall]:
    """One spatial-decoder call on ``images`` latent frames of latent_h x latent_w (a micro-batch, or
    one tile of it): ``spatial_decoder_in``, ``spatial_decoder_up_0`` .., ``spatial_decoder_out``
    (``vae_spatial.Decoder`` stages, the SDXL decoder)."""
    sc = config.spatial_vae
    channels = list(reversed(sc.block_out_channels))
    pixels = latent_h * latent_w
    calls = []
    ops = _Ops(itemsize, itemsize)
    ops.elementwise(images * pixels * sc.latent_channels, 2)  # / scaling factor
    if sc.use_post_quant_conv:
        _conv2d(ops, images, pixels, sc.latent_channels, sc.latent_channels, 1)
    _conv2d(ops, images, pixels, sc.latent_channels, channels[0], 9)  # conv_in
    ops.layer("vae.conv")
    _spatial_resnet(ops, images, pixels, channels[0], channels[0])
    if sc.mid_block_add_attention:
        c = channels[0]
        _group_norm(ops, images * pixels * c, silu=False)
        for _ in range(3):
            ops.linear(images * pixels, c, c)
        ops.attention(images, 1, pixels, pixels, c)
        ops.linear(images * pixels, c, c)
        ops.elementwise(images * pixels * c, 3)
        ops.layer("vae.attention")
    _spatial_resnet(ops, images, pixels, channels[0], channels[0])
    calls.append(ops.call("spatial_decoder_in"))
    prev = channels[0]
    for i, width in enumerate(channels):
        ops = _Ops(itemsize, itemsize)
        for _ in range(sc.layers_per_block + 1):
            _spatial_resnet(ops, images, pixels, prev, width)
            prev = width
        if i < len(channels) - 1:  # nearest 2x, then a 3x3 convolution at the new size
            _conv2d(ops, images, pixels, width, width, 9, out_pixels=4 * pixels)
            ops.layer("vae.conv")
            pixels *= 4
        calls.append(ops.call(f"spatial_decoder_up_{i}"))
    ops = _Ops(itemsize, itemsize)
    _group_norm(ops, images * pixels * prev)
    _conv2d(ops, images, pixels, prev, sc.out_channels, 9)
    ops.layer("vae.conv")
    calls.append(ops.call("spatial_decoder_out"))
    return calls


def tile_sizes(size: int, tile: int, overlap: int) -> list[int]:
    """The extents of the tiles along one latent axis (``AutoencoderKL.tiles``; the last ones are cut)."""
    return [min(tile, size - start) for start in range(0, size, tile - overlap)]
