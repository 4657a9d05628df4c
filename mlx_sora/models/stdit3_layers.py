"""Layers of STDiT3 (Open-Sora 1.2), and TDTM, the On-device Sora token merging they can run with.

Mirrors ``opensora/models/layers/blocks.py`` and ``STDiT3Block`` of
``opensora/models/stdit/stdit3.py`` (hpcaitech/Open-Sora @ 8d132d7); parameter names equal the
reference's state-dict names. Activations travel as ``[B, T, S, C]`` (latent frames x patches per
frame x channels), which is the reference's ``[B, (T S), C]`` token order.

TDTM (Temporal Dimension Token Merging, On-device Sora, ``Modded_Open_Sora/.../stdit/merge.py``):
before each self-attention and cross-attention, consecutive latent-frame pairs (0,1), (2,3), ... are
averaged, attention runs on T//2 frames and its result is repeated for both frames of each pair.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import fast_ops

LAYER_NORM_EPS = 1e-6
QK_NORM_EPS = 1e-6
ROPE_THETA = 10000.0
CHUNK_BYTES = 16 * 2**20
"""Chunk size of ``chunked_layers``: the most the temporaries of one chunk of a chunked layer
(attention, cross-attention, MLP) may take."""

_chunk_limit: contextvars.ContextVar[int | None] = contextvars.ContextVar("stdit3_chunk_limit", default=None)


@contextlib.contextmanager
def chunked_layers(chunk_bytes: int | None = CHUNK_BYTES) -> Iterator[None]:
    """Within it, STDiT3's attention scores, q/k/v and MLP hidden layer are built a chunk of
    sequences or tokens at a time (None: all at once, the default). A spatial + temporal block of
    STDiT3-XL/2 at 256x256x68, float32, then peaks at 8.6x its token tensor instead of 30.1x (11.4x
    with 32 MiB chunks, 7.1x with 8 MiB), for 5-10 % more time per block on this CPU, so the
    pipeline turns it on only when a memory budget needs it. The items of a chunked layer are
    independent: chunked == unchunked, bit for bit."""
    token = _chunk_limit.set(chunk_bytes)
    try:
        yield
    finally:
        _chunk_limit.reset(token)


def attention_item_bytes(seq_len: int, dim: int, num_heads: int, itemsize: int) -> int:
    """Temporaries of self-attention over one sequence: q/k/v and their transposed, normed and
    rotated copies; the scores and their softmax (float32)."""
    return 10 * seq_len * dim * itemsize + 3 * num_heads * seq_len**2 * 4


def by_chunks(fn, x: mx.array, item_bytes: int, axis: int = 0) -> mx.array:
    """``fn(x)``; within ``chunked_layers``, computed on slices of ``x`` along ``axis`` of at most
    ``chunk_bytes // item_bytes`` items each, concatenated. For an ``fn`` that treats the items
    independently."""
    limit = _chunk_limit.get()
    if limit is None:
        return fn(x)
    n = x.shape[axis]
    chunks = -(-n // max(1, limit // max(item_bytes, 1)))
    if chunks <= 1:
        return fn(x)
    size = -(-n // chunks)
    lead = (slice(None),) * axis
    return mx.concatenate([fn(x[lead + (slice(i, i + size),)]) for i in range(0, n, size)], axis=axis)


@mx.compile
def t2i_modulate(x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    return x * (1 + scale) + shift


@mx.compile
def gated_residual(x: mx.array, gate: mx.array, branch: mx.array) -> mx.array:
    return x + gate * branch


# ------------------------------------------------------------------------------ embedders


@lru_cache(maxsize=8)
def _timestep_freqs(half: int, max_period: float) -> np.ndarray:
    # The reference's float32 exponent, then a correctly rounded exp: this matches torch's float32
    # exp in all but 3 of 128 entries (mx.exp differs in ~90), which matters because t ~ 1000
    # multiplies any 1-ulp difference (-> ~2e-5 in the embedding instead of 5e-6).
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


def timestep_embedding(t: mx.array, dim: int = 256, max_period: float = 10000.0) -> mx.array:
    """GLIDE sinusoid of (fractional) timesteps ``t`` [N] -> float32 [N, dim], cos half first."""
    args = t.astype(mx.float32)[:, None] * mx.array(_timestep_freqs(dim // 2, max_period))[None]
    embedding = mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)
    if dim % 2:
        embedding = mx.concatenate([embedding, mx.zeros_like(embedding[:, :1])], axis=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """``TimestepEmbedder`` / ``SizeEmbedder``: 256-dim sinusoid -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        # a list, not nn.Sequential, so that the keys are mlp.0 / mlp.2 as in the reference
        self.mlp = [
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        ]

    def __call__(self, t: mx.array, dtype: mx.Dtype) -> mx.array:
        h = timestep_embedding(t, self.frequency_embedding_size).astype(dtype)
        for layer in self.mlp:
            h = layer(h)
        return h


class Mlp(nn.Module):
    """timm ``Mlp`` with the tanh-approximated GELU (``approx_gelu`` of the reference)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def __call__(self, x: mx.array) -> mx.array:
        """x [..., C], a chunk of tokens at a time (``by_chunks``)."""
        *lead, c = x.shape
        hidden = self.fc1.weight.shape[0]
        item = 3 * hidden * max(x.dtype.size, 4)  # the hidden layer and the GELU's temporaries, per token
        out = by_chunks(lambda t: self.fc2(fast_ops.gelu_tanh(self.fc1(t))), x.reshape(-1, c), item)
        return out.reshape(*lead, out.shape[-1])


class CaptionEmbedder(nn.Module):
    """Projects T5 embeddings to the hidden size; ``y_embedding`` is the learned null caption (CFG)."""

    def __init__(self, in_channels: int, hidden_size: int, token_num: int):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        self.y_embedding = mx.random.normal((token_num, in_channels)) / in_channels**0.5

    def __call__(self, caption: mx.array) -> mx.array:
        return self.y_proj(caption)


class PatchEmbed3D(nn.Module):
    """Conv3d with kernel = stride = patch; zero-pads the end of odd-sized T/H/W first."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, embed_dim: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def __call__(self, x: mx.array) -> mx.array:
        """x [B, T, H, W, C_in] (channels last) -> [B, T', H', W', hidden]."""
        pads = [(0, 0)] + [(0, (-n) % p) for n, p in zip(x.shape[1:4], self.patch_size)] + [(0, 0)]
        if any(after for _, after in pads):
            x = mx.pad(x, pads)
        return self.proj(x)


@lru_cache(maxsize=64)
def _position_embedding_2d_np(dim: int, h: int, w: int, scale: float, base_size: int | None) -> np.ndarray:
    # float32 arithmetic in the reference's order (PositionEmbedding2D._get_cached_emb)
    half_dim = dim // 2
    exponent = np.arange(0, half_dim, 2, dtype=np.float32) / np.float32(half_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(10000), exponent)).astype(np.float32)
    grid_h = np.arange(h, dtype=np.float32) / np.float32(scale)
    grid_w = np.arange(w, dtype=np.float32) / np.float32(scale)
    if base_size is not None:
        grid_h = grid_h * np.float32(base_size / h)
        grid_w = grid_w * np.float32(base_size / w)
    # Reference quirk: after its meshgrid the variable named grid_h holds the *column* (w)
    # coordinate, so the first half of the channels encodes w and the second half h.
    coord_w = np.broadcast_to(grid_w[None, :], (h, w)).reshape(-1)
    coord_h = np.broadcast_to(grid_h[:, None], (h, w)).reshape(-1)

    def sin_cos(coord: np.ndarray) -> np.ndarray:
        out = (coord[:, None] * inv_freq[None]).astype(np.float32)
        return np.concatenate([np.sin(out), np.cos(out)], axis=-1)

    return np.concatenate([sin_cos(coord_w), sin_cos(coord_h)], axis=-1).astype(np.float32)


def position_embedding_2d(
    dim: int, h: int, w: int, scale: float = 1.0, base_size: int | None = None
) -> mx.array:
    """``PositionEmbedding2D(dim)(x, h, w, scale, base_size)``: sin-cos table [h*w, dim] (float32)."""
    if dim % 4:
        raise ValueError(f"the 2D position embedding needs a hidden size divisible by 4, got {dim}")
    return mx.array(_position_embedding_2d_np(dim, h, w, float(scale), base_size))


def rope_inv_freq(head_dim: int, theta: float = ROPE_THETA) -> np.ndarray:
    """rotary_embedding_torch's ``freqs`` (= the checkpoint's ``rope.freqs``): 1/theta^(2i/head_dim)."""
    return (1.0 / theta ** (np.arange(0, head_dim, 2)[: head_dim // 2] / head_dim)).astype(np.float32)


# ------------------------------------------------------------------------------ attention


class Attention(nn.Module):
    """Self-attention with LlamaRMSNorm q/k norm (before RoPE); RoPE only when ``rope`` is set.

    RoPE follows rotary_embedding_torch ``rotate_queries_or_keys``: interleaved pairs
    (``traditional=True``), positions 0..N-1 along the sequence, frequencies ``rope_inv_freq``.
    Deviation: the angles are computed in float32 even for bf16 weights (the reference's
    ``model.to(bf16)`` also rounds ``rope.freqs`` and the angles to bf16).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, rope: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        if qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=QK_NORM_EPS)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=QK_NORM_EPS)
        self.qk_norm = qk_norm
        self.proj = nn.Linear(dim, dim)
        self.rope = rope
        # MLX's `freqs` are periods (it uses their reciprocals); computed in float64 from the formula
        periods = ROPE_THETA ** (np.arange(0, self.head_dim, 2) / self.head_dim)
        self._rope_periods = mx.array(periods.astype(np.float32))

    def __call__(self, x: mx.array) -> mx.array:
        """x [..., N, C]: attention over N within each leading index (a chunk of them at a time)."""
        *lead, n, c = x.shape
        item = attention_item_bytes(n, c, self.num_heads, x.dtype.size)
        return by_chunks(self._attend, x.reshape(-1, n, c), item).reshape(*lead, n, c)

    def _attend(self, x: mx.array) -> mx.array:
        """x [M, N, C] -> [M, N, C]."""
        m, n, c = x.shape
        qkv = self.qkv(x).reshape(m, n, 3, self.num_heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [batch, heads, N, head_dim]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            rope = dict(traditional=True, base=None, scale=1.0, offset=0, freqs=self._rope_periods)
            q, k = mx.fast.rope(q, self.head_dim, **rope), mx.fast.rope(k, self.head_dim, **rope)
        out = fast_ops.attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(0, 2, 1, 3).reshape(m, n, c))


@dataclass(frozen=True)
class CaptionKeys:
    """The caption tokens cross-attention reads, and which sample reads which.

    ``index`` [L'] holds the positions (in the padded caption of L tokens) that at least one sample
    attends to, None for all L; ``mask`` [B, 1, 1, L'] bool says which of them each sample attends
    to, None when every sample attends to all of them. The reference packs each sample's valid
    tokens and uses an xformers block-diagonal mask; leaving out keys that no sample attends to
    (exp(-inf) = 0 weights) computes the same attention, with L' instead of L keys (a 300-token
    padded prompt usually has a few dozen valid ones).
    """

    index: mx.array | None
    mask: mx.array | None

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> "CaptionKeys":
        """From the valid-token mask [B, L] (True = valid), already checked on the host."""
        mask = np.asarray(mask, dtype=bool)
        used = np.flatnonzero(mask.any(axis=0))
        index = None if used.size == mask.shape[1] else mx.array(used.astype(np.int32))
        packed = mask[:, used]
        return cls(index=index, mask=None if packed.all() else mx.array(packed)[:, None, None, :])

    def select(self, y: mx.array) -> mx.array:
        """The attended tokens of the projected caption y [B, L, C] -> [B, L', C]."""
        return y if self.index is None else mx.take(y, self.index, axis=1)

    def arrays(self) -> list[mx.array]:
        return [a for a in (self.index, self.mask) if a is not None]


class MultiHeadCrossAttention(nn.Module):
    """Cross-attention of the video tokens to the caption tokens of the same sample.

    The reference packs the valid caption tokens of all samples and uses an xformers block-diagonal
    mask; attending to each sample's own tokens with a boolean key mask computes the same thing.
    """

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.q_linear = nn.Linear(d_model, d_model)
        self.kv_linear = nn.Linear(d_model, d_model * 2)
        self.proj = nn.Linear(d_model, d_model)

    def __call__(self, x: mx.array, cond: mx.array, key_mask: "mx.array | CaptionKeys | None") -> mx.array:
        """x [B, N, C], cond [B, L, C]; key_mask [B, 1, 1, L] bool (True = valid), a ``CaptionKeys``
        (only its tokens are projected and attended to) or None (all tokens valid)."""
        if isinstance(key_mask, CaptionKeys):
            cond, key_mask = key_mask.select(cond), key_mask.mask
        b, _, c = x.shape
        kv = self.kv_linear(cond).reshape(b, -1, 2, self.num_heads, self.head_dim).transpose(2, 0, 3, 1, 4)

        def attend(x: mx.array) -> mx.array:  # a chunk of query tokens [B, n, C]
            n = x.shape[1]
            q = self.q_linear(x).reshape(b, n, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
            out = fast_ops.attention(q, kv[0], kv[1], scale=self.head_dim**-0.5, mask=key_mask)
            return self.proj(out.transpose(0, 2, 1, 3).reshape(b, n, c))

        # per query token of every sample: q and its copies, the scores and softmax (fp32)
        item = b * (4 * c * x.dtype.size + 3 * self.num_heads * kv.shape[3] * 4)
        return by_chunks(attend, x, item, axis=1)


# ------------------------------------------------------------------------------ TDTM


def merge_frames(x: mx.array) -> mx.array:
    """TDTM merge of x [B, T, S, C] (T >= 2): frame pairs (0,1), (2,3), ... averaged -> [B, T//2, S, C].

    With odd T the last frame takes no part (merge.py ``merge``: ``x[:, :-1]`` then pair means).
    """
    b, t, s, c = x.shape
    pairs = x[:, : 2 * (t // 2)].reshape(b, t // 2, 2, s, c)
    return (pairs[:, :, 0] + pairs[:, :, 1]) / 2


def unmerge_frames(x: mx.array, num_frames: int) -> mx.array:
    """TDTM unmerge of x [B, T//2, S, C] back to [B, num_frames, S, C]: each result serves both frames
    of its pair; with odd ``num_frames`` the last frame reuses the last merged frame's result.

    merge.py ``unmerge`` appends that extra copy when T//2 is odd (and not 15) instead, which only
    gives back T frames for T % 4 in {0, 3} and T == 30; there both rules agree, and this one also
    works for every other T.
    """
    b, half, s, c = x.shape
    out = mx.broadcast_to(x[:, :, None], (b, half, 2, s, c)).reshape(b, 2 * half, s, c)
    if num_frames % 2:
        out = mx.concatenate([out, x[:, -1:]], axis=1)
    return out


# ------------------------------------------------------------------------------ blocks


class STDiT3Block(nn.Module):
    """One spatial (attention within a frame) or temporal (attention across frames) block.

    adaLN-single: ``t_mlp`` [B, 6C] + the block's ``scale_shift_table`` gives shift/scale/gate for the
    attention and MLP branches; frames whose ``x_mask`` is False use ``t0_mlp`` (timestep 0) instead.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS, affine=False)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, rope=temporal)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS, affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = mx.random.normal((6, hidden_size)) / hidden_size**0.5

    def modulation(self, t_mlp: mx.array, x_mask: mx.array | None, t0_mlp: mx.array | None) -> list[mx.array]:
        """Six [B, T or 1, 1, C] tensors: shift/scale/gate (attention), shift/scale/gate (MLP)."""
        b = t_mlp.shape[0]
        mod = self.scale_shift_table[None] + t_mlp.reshape(b, 6, -1)  # [B, 6, C]
        if x_mask is None:
            mod = mod[:, None]  # [B, 1, 6, C]
        else:  # per-frame choice; elementwise identical to the reference's t_mask_select
            mod0 = self.scale_shift_table[None] + t0_mlp.reshape(b, 6, -1)
            mod = mx.where(x_mask[:, :, None, None], mod[:, None], mod0[:, None])  # [B, T, 6, C]
        return [mod[:, :, i : i + 1] for i in range(6)]

    def self_attention(self, x: mx.array, merge: bool) -> mx.array:
        b, t, s, c = x.shape
        if merge:
            x = merge_frames(x)
        tm = x.shape[1]
        if self.temporal:  # sequences of frames at each spatial position
            out = self.attn(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
        else:  # sequences of patches within each frame
            out = self.attn(x)
        return unmerge_frames(out, t) if merge else out.reshape(b, tm, s, c)

    def cross_attention(
        self, x: mx.array, y: mx.array, key_mask: "mx.array | CaptionKeys | None", merge: bool
    ) -> mx.array:
        b, t, s, c = x.shape
        if merge:  # the reference merges the residual stream itself (no norm on this branch)
            x = merge_frames(x)
        tm = x.shape[1]
        out = self.cross_attn(x.reshape(b, tm * s, c), y, key_mask).reshape(b, tm, s, c)
        return unmerge_frames(out, t) if merge else out

    def __call__(
        self,
        x: mx.array,
        y: mx.array,
        t_mlp: mx.array,
        key_mask: "mx.array | CaptionKeys | None" = None,
        x_mask: mx.array | None = None,
        t0_mlp: mx.array | None = None,
        merge: bool = False,
    ) -> mx.array:
        """x [B, T, S, C]; y [B, L, C] projected caption; key_mask as ``MultiHeadCrossAttention``;
        ``merge`` turns TDTM on (needs T >= 2)."""
        merge = merge and x.shape[1] >= 2  # a single frame has no pair to merge
        modulation = self.modulation(t_mlp, x_mask, t0_mlp)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        x_m = t2i_modulate(self.norm1(x), shift_msa, scale_msa)
        x = gated_residual(x, gate_msa, self.self_attention(x_m, merge))
        x = x + self.cross_attention(x, y, key_mask, merge)
        x_m = t2i_modulate(self.norm2(x), shift_mlp, scale_mlp)
        return gated_residual(x, gate_mlp, self.mlp(x_m))


class T2IFinalLayer(nn.Module):
    """PixArt final layer: LayerNorm, modulation by ``t`` (not t_mlp) + ``scale_shift_table``, Linear."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS, affine=False)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.scale_shift_table = mx.random.normal((2, hidden_size)) / hidden_size**0.5

    def __call__(
        self, x: mx.array, t: mx.array, x_mask: mx.array | None = None, t0: mx.array | None = None
    ) -> mx.array:
        """x [B, T, S, C], t [B, C] -> [B, T, S, num_patch * out_channels]."""
        shift, scale = mx.split(self.scale_shift_table[None] + t[:, None], 2, axis=1)  # [B, 1, C] each
        x = t2i_modulate(self.norm_final(x), shift[:, None], scale[:, None])
        if x_mask is not None:
            # Reference quirk (T2IFinalLayer.forward): the t0 branch normalises the already
            # modulated x again, x_zero = modulate(norm(modulate(norm(x), t)), t0).
            shift0, scale0 = mx.split(self.scale_shift_table[None] + t0[:, None], 2, axis=1)
            x_zero = t2i_modulate(self.norm_final(x), shift0[:, None], scale0[:, None])
            x = mx.where(x_mask[:, :, None, None], x, x_zero)
        return self.linear(x)
