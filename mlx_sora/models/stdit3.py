"""STDiT3 (Open-Sora 1.2 diffusion transformer, ``hpcai-tech/OpenSora-STDiT-v3``) in MLX.

Reproduces ``opensora/models/stdit/stdit3.py`` (hpcaitech/Open-Sora @ 8d132d7) weight for weight;
the layers live in ``stdit3_layers.py``. The model is a chain of units (``mlx_sora.models.units``) so
that a streamer can load and run one unit at a time::

    "embedders"    inputs (the keyword arguments of ``prepare``) -> (tokens, state)
    "block_00" ..  (tokens, state) -> (tokens, state): spatial_blocks[i] then temporal_blocks[i]
    "final_layer"  (tokens, state) -> velocity (+ sigma) [B, out_channels, T, H, W]

``model(...)`` runs exactly that chain. ``merge=True`` turns on TDTM (On-device Sora) in every block.

Deviations from the reference (all documented where they happen): the output stays in the compute
dtype (the reference casts it to float32); RoPE angles are float32 even for bf16 weights; fps,
height and width are cast to the compute dtype inside (the reference's inference script does that
before the call); a text mask with a sample of zero valid tokens is rejected.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..io.checkpoint import CheckpointError
from . import ModelFamily, register_family
from .config_checks import require_int, require_ints, require_number
from .stdit3_layers import (
    CaptionEmbedder,
    CaptionKeys,
    PatchEmbed3D,
    STDiT3Block,
    T2IFinalLayer,
    TimestepEmbedder,
    attention_item_bytes,
    position_embedding_2d,
    rope_inv_freq,
)
from .units import Unit, attach_units, run_units

if TYPE_CHECKING:
    from ..io.checkpoint import CheckpointFolder


@dataclass(frozen=True)
class STDiT3Config:
    """The fields of the reference ``STDiT3Config``; defaults are STDiT3-XL/2 as released.

    ``class_dropout_prob``, ``drop_path``, the ``enable_*`` kernel/parallelism switches,
    ``only_train_temporal`` and ``freeze_y_embedder`` only matter for training or for how the
    reference runs on GPUs; they are kept so that a config round-trips, and do not change the output.
    """

    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 4
    pred_sigma: bool = True
    caption_channels: int = 4096
    model_max_length: int = 300
    qk_norm: bool = True
    input_sq_size: int = 512
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    drop_path: float = 0.0
    input_size: tuple = (None, None, None)
    enable_flash_attn: bool = False
    enable_layernorm_kernel: bool = False
    enable_sequence_parallelism: bool = False
    only_train_temporal: bool = False
    freeze_y_embedder: bool = False
    skip_y_embedder: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.patch_size, (list, tuple)) or len(self.patch_size) != 3:
            raise ValueError(f"STDiT3Config.patch_size must be three positive ints (t, h, w), got {self.patch_size!r}")
        require_ints("STDiT3Config", "patch_size", self.patch_size, 1, 64)
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        object.__setattr__(self, "input_size", tuple(self.input_size) if isinstance(self.input_size, (list, tuple))
                           else (None, None, None))
        limits = {"depth": 256, "hidden_size": 2**15, "num_heads": 1024, "in_channels": 1024,
                  "caption_channels": 2**16, "model_max_length": 2**14, "input_sq_size": 2**16}
        for name, high in limits.items():
            require_int("STDiT3Config", name, getattr(self, name), 1, high)
        require_number("STDiT3Config", "mlp_ratio", self.mlp_ratio, high=64, positive=True)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for the temporal RoPE")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by 4 (2D sin-cos position embedding)")
        if self.skip_y_embedder:
            raise ValueError("skip_y_embedder=True (captions given already projected) is not supported; "
                             "the released checkpoints use skip_y_embedder=False")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.pred_sigma else self.in_channels

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "STDiT3Config":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class STDiT3State:
    """What ``prepare`` computes once per call and every unit reads (besides the tokens)."""

    t: mx.array  # [B, C]: timestep + fps embedding (modulates the final layer)
    t_mlp: mx.array  # [B, 6C]: adaLN-single modulation of the blocks
    y: mx.array  # [B, L, C]: projected caption
    key_mask: CaptionKeys | None  # the caption tokens each sample attends to (None: all of them)
    x_mask: mx.array | None = None  # [B, T] bool: False frames use the t=0 modulation
    t0: mx.array | None = None
    t0_mlp: mx.array | None = None
    grid: tuple[int, int, int] = (0, 0, 0)  # token grid (T, H, W) after padding
    input_size: tuple[int, int, int] = (0, 0, 0)  # latent (T, H, W) before padding
    merge: bool = False  # TDTM

    def arrays(self) -> list[mx.array]:
        keys = self.key_mask.arrays() if self.key_mask is not None else []
        return [a for a in (self.t, self.t_mlp, self.y, *keys, self.x_mask, self.t0, self.t0_mlp) if a is not None]


_EMBEDDERS = ("x_embedder", "t_embedder", "fps_embedder", "t_block", "y_embedder")


def _as_array(value: Any, name: str) -> mx.array:
    if value is None:
        raise ValueError(f"{name} is required")
    arr = value if isinstance(value, mx.array) else mx.array(np.asarray(value))
    return arr.reshape(-1) if arr.ndim == 0 else arr


def _repeat_rows(arr: mx.array, batch: int, name: str) -> mx.array:
    """The reference's ``.repeat(B // B', 1)`` for per-sample inputs given for half the CFG batch."""
    if arr.shape[0] == batch:
        return arr
    if arr.shape[0] == 0 or batch % arr.shape[0]:
        raise ValueError(f"{name} has {arr.shape[0]} rows; expected the batch size {batch} or a divisor of it")
    return mx.tile(arr, (batch // arr.shape[0],) + (1,) * (arr.ndim - 1))


class STDiT3(nn.Module):
    def __init__(self, config: STDiT3Config, compute_dtype: mx.Dtype = mx.float32):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype
        c = config
        self.x_embedder = PatchEmbed3D(c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        self.fps_embedder = TimestepEmbedder(c.hidden_size)  # SizeEmbedder: same layers
        self.t_block = [nn.SiLU(), nn.Linear(c.hidden_size, 6 * c.hidden_size)]
        self.y_embedder = CaptionEmbedder(c.caption_channels, c.hidden_size, c.model_max_length)
        block_args = (c.hidden_size, c.num_heads, c.mlp_ratio, c.qk_norm)
        self.spatial_blocks = [STDiT3Block(*block_args, temporal=False) for _ in range(c.depth)]
        self.temporal_blocks = [STDiT3Block(*block_args, temporal=True) for _ in range(c.depth)]
        self.final_layer = T2IFinalLayer(c.hidden_size, math.prod(c.patch_size), c.out_channels)
        attach_units(self, [
            Unit("embedders", _EMBEDDERS, lambda inputs: self.prepare(**inputs)),
            *(Unit(f"block_{i:02d}", (f"spatial_blocks.{i}", f"temporal_blocks.{i}"), partial(self._run_block, i))
              for i in range(c.depth)),
            Unit("final_layer", ("final_layer",), lambda carry: self.finalize(*carry)),
        ])

    def _run_block(self, index: int, carry: tuple[mx.array, STDiT3State]) -> tuple[mx.array, STDiT3State]:
        """Unit ``block_{index}``: ``spatial_blocks[index]`` then ``temporal_blocks[index]``."""
        x, state = carry
        for block in (self.spatial_blocks[index], self.temporal_blocks[index]):
            x = block(x, state.y, state.t_mlp, state.key_mask, state.x_mask, state.t0_mlp, state.merge)
        return x, state

    def activation_bytes(self, batch: int, latent_size: tuple[int, int, int], caption_len: int,
                         chunk_bytes: int | None = None, tokens_per_sample: int | None = None) -> int:
        """Estimated peak memory of the activations of one block unit for latents [batch, C, T, H, W],
        with its layers built whole (``chunk_bytes`` None) or a chunk at a time
        (``stdit3_layers.chunked_layers(chunk_bytes)``).

        Measured (float32, XL/2, batch 2, one unit alone), as multiples of the token tensor
        [B, T, S, C]: whole, 23-31x (256x256x68: 28.5-30.1x alone, 30.9x within a streamed run), or
        the cross-attention scores when the caption is long; in 16 MiB chunks, 8.6x at 256x256x68
        (8.3x with TDTM) and 107 MiB at 192x192x17, where the estimate says 440 and 130 MiB. A chunk
        is one sequence where a single one is larger (spatial attention at high resolution).
        ``tokens_per_sample``: the tokens of a sample this process holds when ranks share them
        (``stdit3_parallel.sequence_units``; default all of them)."""
        c, itemsize = self.config, self.compute_dtype.size
        t, h, w = (-(-n // p) for n, p in zip(latent_size, c.patch_size))
        tokens = batch * (t * h * w if tokens_per_sample is None else tokens_per_sample)
        hidden = tokens * c.hidden_size * itemsize
        if chunk_bytes is None:
            return max(32 * hidden, 8 * hidden + 2 * tokens * c.num_heads * caption_len * itemsize)
        item = max(attention_item_bytes(n, c.hidden_size, c.num_heads, itemsize) for n in (h * w, t))
        return 8 * hidden + 5 * max(chunk_bytes, item)

    def null_caption(self, batch: int) -> mx.array:
        """The classifier-free-guidance null caption [batch, 1, L, C_caption] (``y_embedding``)."""
        emb = self.y_embedder.y_embedding
        return mx.broadcast_to(emb[None, None], (batch, 1) + tuple(emb.shape))

    def _t_mlp(self, t: mx.array) -> mx.array:
        for layer in self.t_block:
            t = layer(t)
        return t

    def prepare(
        self,
        x: mx.array,
        timestep: mx.array,
        y: mx.array,
        mask: mx.array | None = None,
        x_mask: mx.array | None = None,
        fps: Any = None,
        height: Any = None,
        width: Any = None,
        merge: bool = False,
    ) -> tuple[mx.array, STDiT3State]:
        """The "embedders" unit: tokens [B, T, S, C] (pos-embedded) and the state every unit reads."""
        c = self.config
        dtype = self.compute_dtype
        if x.ndim != 5 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must be [B, {c.in_channels}, T, H, W] latents, got shape {tuple(x.shape)}")
        batch, _, tx, hx, wx = x.shape
        timestep = _as_array(timestep, "timestep")
        if timestep.shape != (batch,):
            timestep = _repeat_rows(timestep.reshape(-1), batch, "timestep")
        if y.ndim == 4:
            if y.shape[1] != 1:
                raise ValueError(f"y must be [B, 1, L, C] or [B, L, C], got shape {tuple(y.shape)}")
            y = y[:, 0]
        if y.ndim != 3 or y.shape[0] != batch or y.shape[2] != c.caption_channels:
            raise ValueError(f"y must be [{batch}, 1, L, {c.caption_channels}] caption embeddings, got shape {tuple(y.shape)}")
        if fps is None or height is None or width is None:
            raise ValueError("fps, height and width are required (height/width in pixels set the position-embedding scale)")

        x = x.astype(dtype)
        timestep = timestep.astype(dtype)  # bf16 weights: 417.5 -> 418, as in the reference
        y = y.astype(dtype)
        pt, ph, pw = c.patch_size
        grid = (-(-tx // pt), -(-hx // ph), -(-wx // pw))
        n_t, n_h, n_w = grid
        s = n_h * n_w

        # === position embedding (scale from the first sample's pixel size, like the reference)
        h0 = float(_as_array(height, "height").astype(dtype).astype(mx.float32)[0].item())
        w0 = float(_as_array(width, "width").astype(dtype).astype(mx.float32)[0].item())
        scale = math.sqrt(h0 * w0) / c.input_sq_size
        pos_emb = position_embedding_2d(c.hidden_size, n_h, n_w, scale=scale, base_size=round(s**0.5)).astype(dtype)

        # === timestep + fps embedding, adaLN-single
        fps = _repeat_rows(_as_array(fps, "fps").reshape(-1).astype(dtype), batch, "fps")
        fps_emb = self.fps_embedder(fps, dtype)
        t = self.t_embedder(timestep, dtype) + fps_emb
        t_mlp = self._t_mlp(t)
        t0 = t0_mlp = None
        if x_mask is not None:
            x_mask = _as_array(x_mask, "x_mask")
            if x_mask.shape != (batch, tx):
                raise ValueError(f"x_mask must be [{batch}, {tx}] (one flag per latent frame), got {tuple(x_mask.shape)}")
            x_mask = x_mask.astype(mx.bool_)
            if n_t != tx:  # the token grid is padded in time only if patch_size[0] > 1
                x_mask = mx.pad(x_mask, [(0, 0), (0, n_t - tx)], constant_values=True)
            t0 = self.t_embedder(mx.zeros_like(timestep), dtype) + fps_emb
            t0_mlp = self._t_mlp(t0)

        # === caption
        y = self.y_embedder(y)
        key_mask = None
        if mask is not None:
            mask = _as_array(mask, "mask")
            if mask.ndim != 2 or mask.shape[1] != y.shape[1]:
                raise ValueError(f"mask must be [B, {y.shape[1]}] (1 = valid caption token), got {tuple(mask.shape)}")
            mask = np.array(_repeat_rows(mask != 0, batch, "mask"))
            if not mask.any(axis=1).all():
                raise ValueError("every sample needs at least one valid caption token (a mask row is all zero)")
            key_mask = CaptionKeys.from_mask(mask)  # cross-attention reads only tokens some sample attends to

        # === patches
        tokens = self.x_embedder(x.transpose(0, 2, 3, 4, 1)).reshape(batch, n_t, s, c.hidden_size)
        tokens = tokens + pos_emb
        state = STDiT3State(t=t, t_mlp=t_mlp, y=y, key_mask=key_mask, x_mask=x_mask, t0=t0, t0_mlp=t0_mlp,
                            grid=grid, input_size=(tx, hx, wx), merge=bool(merge))
        return tokens, state

    def finalize(self, x: mx.array, state: STDiT3State) -> mx.array:
        """The "final_layer" unit: tokens [B, T, S, C] -> [B, out_channels, T, H, W] (cropped)."""
        c = self.config
        x = self.final_layer(x, state.t, state.x_mask, state.t0)
        b = x.shape[0]
        n_t, n_h, n_w = state.grid
        pt, ph, pw = c.patch_size
        x = x.reshape(b, n_t, n_h, n_w, pt, ph, pw, c.out_channels)
        x = x.transpose(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, c.out_channels, n_t * pt, n_h * ph, n_w * pw)
        tx, hx, wx = state.input_size
        return x[:, :, :tx, :hx, :wx]

    def __call__(
        self,
        x: mx.array,
        timestep: mx.array,
        y: mx.array,
        mask: mx.array | None = None,
        x_mask: mx.array | None = None,
        fps: Any = None,
        height: Any = None,
        width: Any = None,
        merge: bool = False,
    ) -> mx.array:
        """Velocity (+ sigma) prediction [B, out_channels, T, H, W] in the compute dtype.

        x [B, C_in, T, H, W]; timestep [B]; y [B, 1, L, C_caption] or [B, L, C_caption]; mask [B', L]
        with B' = B or B/2 (repeated, so a CFG null half uses the conditional lengths); x_mask
        [B, T] bool; fps/height/width [B'] (height[0], width[0] set the position-embedding scale).
        """
        inputs = dict(x=x, timestep=timestep, y=y, mask=mask, x_mask=x_mask, fps=fps, height=height,
                      width=width, merge=merge)
        return run_units(self.units, inputs)


# ------------------------------------------------------------------------------ conversion

def _matches(hf_config: dict, checkpoint: "CheckpointFolder | None") -> bool:
    return hf_config.get("model_type") == "STDiT3" or "STDiT3" in (hf_config.get("architectures") or [])


def _config_from_hf(hf_config: dict, checkpoint: "CheckpointFolder") -> dict:
    config = STDiT3Config.from_dict(hf_config)
    if "rope.freqs" in checkpoint:  # dropped at conversion: make sure it is what the MLX RoPE uses
        stored = np.array(checkpoint.load("rope.freqs").astype(mx.float32))
        expected = rope_inv_freq(config.head_dim)
        if stored.shape != expected.shape or not np.allclose(stored, expected, rtol=1e-6, atol=0):
            raise CheckpointError(
                f"rope.freqs {stored.shape} differs from 1/10000^(2i/{config.head_dim}) that this "
                "implementation uses; the checkpoint is not a standard STDiT3"
            )
    return config.to_dict()


def _rename(hf_key: str, config: dict) -> str | None:
    if hf_key == "rope.freqs":  # recomputed from head_dim (checked in _config_from_hf)
        return None
    return hf_key


def _transform(mlx_key: str, value: mx.array) -> mx.array:
    if mlx_key == "x_embedder.proj.weight" and value.ndim == 5:
        return value.transpose(0, 2, 3, 4, 1)  # Conv3d (O, I, kt, kh, kw) -> (O, kt, kh, kw, I)
    return value


def _build(config: dict) -> STDiT3:
    return STDiT3(STDiT3Config.from_dict(config))


FAMILY = register_family(
    ModelFamily(
        model_type="stdit3",
        matches=_matches,
        config_from_hf=_config_from_hf,
        rename=_rename,
        build=_build,
        transform=_transform,
        hf_allow_patterns=("config.json", "*.safetensors"),
        # the blocks' linear layers; the embedders and the final layer stay in full precision
        quantizable=lambda path: path.startswith(("spatial_blocks.", "temporal_blocks.")),
    )
)
