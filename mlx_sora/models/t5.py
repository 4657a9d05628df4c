"""T5 v1.1 encoder (DeepFloyd/t5-v1_1-xxl), the text encoder of Open-Sora 1.2.

Reproduces ``transformers.T5EncoderModel`` (``models/t5/modeling_t5.py``) at inference:

* RMSNorm (``T5LayerNorm``): no mean, no bias, variance accumulated in float32.
* Self-attention without the 1/sqrt(d) scaling; a learned bidirectional relative position bias,
  computed once from the first layer's ``relative_attention_bias`` table and shared by all layers.
* The padding mask is applied to the keys: masked keys get the compute dtype's minimum (as
  transformers' SDPA path does), so padded tokens do not influence valid ones. Padded query rows are
  computed too, exactly as the reference computes them.
* Feed-forward: ``gated-gelu`` (T5 v1.1: ``gelu_new``, the tanh approximation) or ``relu`` (original
  T5), and the other ``[gated-]{relu,gelu,gelu_new,silu}`` forms transformers accepts.
* A final RMSNorm. Dropout is the identity at inference and is left out.

The encoder is a chain of units (``mlx_sora.models.units``), so that a streamer can load and run
one block at a time: ``embed`` (token embedding and the bias every block adds: relative position bias
+ key padding mask, computed once), ``block_00`` .. ``block_NN``, ``final_norm``.
``model(input_ids, mask)`` runs exactly that chain.

Weights may be stored in float32, float16 or bfloat16; ``model.compute_dtype`` (set at load) is the
dtype activations are computed in, and the loader casts each unit's weights to it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from functools import lru_cache, partial
from typing import TYPE_CHECKING, Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..io.checkpoint import CheckpointError
from . import ModelFamily, fast_ops, register_family
from .config_checks import require_int, require_number, require_str
from .units import Unit, attach_units, run_units

if TYPE_CHECKING:
    from ..io.checkpoint import CheckpointFolder

ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {
    "relu": nn.relu,
    "gelu": nn.gelu,  # transformers' "gelu" is the exact (erf) form
    "gelu_new": fast_ops.gelu_tanh,  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    "silu": fast_ops.silu,
}


@dataclass(frozen=True)
class T5Config:
    """Encoder hyper-parameters, named as in HF ``config.json``; defaults are transformers' T5Config."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    def __post_init__(self) -> None:
        limits = {"vocab_size": 2**20, "d_model": 2**16, "d_kv": 2**12, "d_ff": 2**18, "num_layers": 256,
                  "num_heads": 1024, "relative_attention_num_buckets": 4096, "relative_attention_max_distance": 2**20}
        for name, high in limits.items():
            require_int("T5Config", name, getattr(self, name), 1, high)
        require_number("T5Config", "layer_norm_epsilon", self.layer_norm_epsilon, positive=True)
        require_str("T5Config", "feed_forward_proj", self.feed_forward_proj)
        if self.relative_attention_num_buckets < 4 or self.relative_attention_num_buckets % 2:
            raise ValueError(
                "T5Config.relative_attention_num_buckets must be even and >= 4 (half per direction, "
                f"half of those exact), got {self.relative_attention_num_buckets}"
            )
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            raise ValueError("T5Config.relative_attention_max_distance must exceed num_buckets // 4")
        self.activation  # validates feed_forward_proj

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """Activation name as transformers resolves it ("gated-gelu" means the tanh ``gelu_new``)."""
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        parts = self.feed_forward_proj.split("-")
        act = parts[-1]
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or act not in ACTIVATIONS:
            raise ValueError(
                f"unsupported T5 feed_forward_proj {self.feed_forward_proj!r}; use one of "
                f"{sorted(ACTIVATIONS)} or 'gated-' + one of them (T5 v1.1: 'gated-gelu')"
            )
        return act

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "T5Config":
        """Build from an HF or converted config.json; unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    @classmethod
    def t5_v1_1_xxl(cls) -> "T5Config":
        """DeepFloyd/t5-v1_1-xxl, the text encoder of Open-Sora 1.2."""
        return cls(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                   relative_attention_num_buckets=32, relative_attention_max_distance=128,
                   layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu")


# ---------------------------------------------------------------- relative position buckets


def relative_position_bucket(
    relative_position: np.ndarray, num_buckets: int = 32, max_distance: int = 128
) -> np.ndarray:
    """Bidirectional T5 bucketing of ``key_position - query_position`` (int array -> int32 array).

    Half the buckets per direction; small distances get one bucket each, larger ones logarithmic
    bins up to ``max_distance``. The log is taken in float32 like the reference so that bucket
    boundaries agree exactly.
    """
    num_buckets //= 2
    buckets = (relative_position > 0).astype(np.int64) * num_buckets
    distance = np.abs(relative_position)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    with np.errstate(divide="ignore"):  # log(0) happens only where is_small picks the exact bucket
        scaled = (
            np.log(distance.astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact))
            * np.float32(num_buckets - max_exact)
        )
    if_large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)
    if_large = np.minimum(if_large, num_buckets - 1)
    return (buckets + np.where(is_small, distance, if_large)).astype(np.int32)


@lru_cache(maxsize=8)
def _bucket_table(seq_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    position = np.arange(seq_len, dtype=np.int64)
    relative = position[None, :] - position[:, None]  # [query, key]: memory - context
    return relative_position_bucket(relative, num_buckets, max_distance)


# ---------------------------------------------------------------- layers


class Linear(nn.Linear):
    """Bias-free linear layer that computes in its input's dtype (weights are cast on the fly)."""

    def __call__(self, x: mx.array) -> mx.array:
        return x @ self.weight.astype(x.dtype).T


class RMSNorm(nn.Module):
    """T5LayerNorm: x * rsqrt(mean(x^2) + eps) * weight, the mean accumulated in float32.

    For half inputs transformers rounds the normalised x to the weight dtype before the product;
    ``mx.fast.rms_norm`` rounds once at the end (a difference of at most one half-precision ulp).
    """

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight.astype(x.dtype), self.eps)


class T5Attention(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.num_heads = config.num_heads
        self.d_kv = config.d_kv
        inner = config.num_heads * config.d_kv
        self.q = Linear(config.d_model, inner, bias=False)
        self.k = Linear(config.d_model, inner, bias=False)
        self.v = Linear(config.d_model, inner, bias=False)
        self.o = Linear(inner, config.d_model, bias=False)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        B, L, _ = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(B, L, self.num_heads, self.d_kv).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        # T5 does not scale q.k: the 1/sqrt(d_kv) is folded into the initialisation of q
        out = fast_ops.attention(q, k, v, scale=1.0, mask=bias.astype(x.dtype))
        return self.o(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class T5FeedForward(nn.Module):
    """``T5DenseGatedActDense`` (wi_0, wi_1, wo) or ``T5DenseActDense`` (wi, wo)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.is_gated = config.is_gated
        self.activation = ACTIVATIONS[config.activation]
        if self.is_gated:
            self.wi_0 = Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = Linear(config.d_model, config.d_ff, bias=False)
        self.wo = Linear(config.d_ff, config.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        if self.is_gated:
            hidden = self.activation(self.wi_0(x)) * self.wi_1(x)
        else:
            hidden = self.activation(self.wi(x))
        return self.wo(hidden)


def _clamp_float16(x: mx.array) -> mx.array:
    # T5Block keeps float16 hidden states finite (transformers' modeling_t5.py, T5Block.forward)
    if x.dtype != mx.float16:
        return x
    big = mx.finfo(mx.float16).max
    limit = mx.where(mx.isinf(x).any(), big - 1000, big).astype(mx.float16)
    return mx.clip(x, -limit, limit)


class T5Block(nn.Module):
    """One encoder layer: pre-norm self-attention then pre-norm feed-forward, both residual."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.attention_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.attention = T5Attention(config)
        self.ff_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.ff = T5FeedForward(config)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        x = _clamp_float16(x + self.attention(self.attention_norm(x), bias))
        return _clamp_float16(x + self.ff(self.ff_norm(x)))


class T5Encoder(nn.Module):
    """``transformers.T5EncoderModel`` at inference: ``(input_ids, attention_mask) -> [B, L, d_model]``.

    Units: ``embed`` (token embedding + position-bias table: ``(input_ids, mask) -> (x, bias)``),
    ``block_00`` .. (``(x, bias) -> (x, bias)``), ``final_norm`` (``(x, bias) -> y``).
    """

    lookup_tables = ("embed_tokens.weight", "relative_attention_bias.weight")
    """Held in their stored dtype when narrower (``units.held_dtype``): the rows looked up are cast."""

    def __init__(self, config: T5Config, compute_dtype: mx.Dtype = mx.float32):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        # only the first layer of the reference owns this table; its bias is shared by all layers
        self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
        self.blocks = [T5Block(config) for _ in range(config.num_layers)]
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        attach_units(self, [
            Unit("embed", ("embed_tokens", "relative_attention_bias"), self._run_embed),
            *(Unit(f"block_{i:02d}", (f"blocks.{i}",), partial(self._run_block, i)) for i in range(config.num_layers)),
            Unit("final_norm", ("final_norm",), self._run_final_norm),
        ])

    def embed(self, input_ids: mx.array) -> mx.array:
        """Token ids [B, L] -> embeddings [B, L, d_model] in the compute dtype (no scaling in T5)."""
        return self.embed_tokens(input_ids).astype(self.compute_dtype)

    def attention_bias(self, seq_len: int, attention_mask: mx.array | np.ndarray | None = None) -> mx.array:
        """Position bias + key padding mask, the additive attention mask every block uses.

        Returns [1, heads, L, L] without a mask, else [B, heads, L, L] where keys with mask 0 hold the
        compute dtype's minimum.
        """
        cfg, dtype = self.config, self.compute_dtype
        buckets = mx.array(_bucket_table(seq_len, cfg.relative_attention_num_buckets,
                                         cfg.relative_attention_max_distance))
        bias = self.relative_attention_bias(buckets).transpose(2, 0, 1)[None].astype(dtype)
        if attention_mask is None:
            return bias
        if attention_mask.ndim != 2 or attention_mask.shape[1] != seq_len:
            raise ValueError(f"attention_mask must be [batch, {seq_len}], got {tuple(attention_mask.shape)}")
        keep = mx.array(attention_mask).astype(mx.bool_)[:, None, None, :]
        return mx.where(keep, bias, mx.array(mx.finfo(dtype).min, dtype))

    def activation_bytes(self, batch: int, seq_len: int) -> int:
        """Estimated peak memory of the activations of one unit (measured: ~26x the hidden state at
        XXL width, 300 tokens, float32), plus the [B, heads, L, L] bias."""
        itemsize = self.compute_dtype.size
        hidden = batch * seq_len * self.config.d_model * itemsize
        return 30 * hidden + 2 * batch * self.config.num_heads * seq_len**2 * itemsize

    def _run_embed(self, inputs: tuple[mx.array, mx.array | None]) -> tuple[mx.array, mx.array]:
        input_ids, attention_mask = inputs
        return self.embed(input_ids), self.attention_bias(input_ids.shape[1], attention_mask)

    def _run_block(self, index: int, carry: tuple[mx.array, mx.array]) -> tuple[mx.array, mx.array]:
        x, bias = carry
        return self.blocks[index](x, bias), bias

    def _run_final_norm(self, carry: tuple[mx.array, mx.array]) -> mx.array:
        return self.final_norm(carry[0])

    def __call__(self, input_ids: mx.array | np.ndarray,
                 attention_mask: mx.array | np.ndarray | None = None) -> mx.array:
        return run_units(self.units, self.check_inputs(input_ids, attention_mask))

    def check_inputs(self, input_ids, attention_mask) -> tuple[mx.array, mx.array | None]:
        """Validated ``(input_ids, attention_mask)``: the carry the ``embed`` unit takes."""
        input_ids = mx.array(input_ids)
        if input_ids.ndim != 2 or not mx.issubdtype(input_ids.dtype, mx.integer):
            raise ValueError(f"input_ids must be an integer array [batch, length], got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        if input_ids.size and (input_ids.min().item() < 0 or input_ids.max().item() >= self.config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}); is the tokenizer the "
                             "one shipped with these weights?")
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                                 f"{tuple(input_ids.shape)}")
            attention_mask = mx.array(attention_mask)
        return input_ids, attention_mask


# ---------------------------------------------------------------- conversion from Hugging Face

_HF_BLOCK_PARTS = {
    "layer.0.layer_norm.weight": "attention_norm.weight",
    "layer.0.SelfAttention.q.weight": "attention.q.weight",
    "layer.0.SelfAttention.k.weight": "attention.k.weight",
    "layer.0.SelfAttention.v.weight": "attention.v.weight",
    "layer.0.SelfAttention.o.weight": "attention.o.weight",
    "layer.1.layer_norm.weight": "ff_norm.weight",
    "layer.1.DenseReluDense.wi.weight": "ff.wi.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ff.wi_0.weight",
    "layer.1.DenseReluDense.wi_1.weight": "ff.wi_1.weight",
    "layer.1.DenseReluDense.wo.weight": "ff.wo.weight",
}
_HF_ARCHITECTURES = {"T5ForConditionalGeneration", "T5EncoderModel", "T5Model"}
_EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight")


def _matches(hf_config: dict, checkpoint: "CheckpointFolder | None") -> bool:
    if hf_config.get("model_type") != "t5" or "mlx_sora" in hf_config:
        return False
    architectures = hf_config.get("architectures") or []
    if architectures and not set(architectures) & _HF_ARCHITECTURES:
        return False
    return checkpoint is None or "encoder.block.0.layer.0.SelfAttention.q.weight" in checkpoint


def _config_from_hf(hf_config: dict, checkpoint: "CheckpointFolder") -> dict:
    config = asdict(T5Config.from_dict(hf_config))
    # the encoder's embedding is tied to shared.weight; read whichever copy the checkpoint holds
    source = next((k for k in _EMBEDDING_KEYS if k in checkpoint), None)
    if source is None:
        raise CheckpointError(f"{checkpoint.folder} has no token embedding ({' or '.join(_EMBEDDING_KEYS)})")
    config["hf_embedding_key"] = source
    return config


def _rename(hf_key: str, config: dict) -> str | None:
    if hf_key in _EMBEDDING_KEYS:
        return "embed_tokens.weight" if hf_key == config.get("hf_embedding_key", "shared.weight") else None
    if hf_key.startswith(("decoder.", "lm_head.")):
        return None
    if hf_key == "encoder.final_layer_norm.weight":
        return "final_norm.weight"
    if hf_key == "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
        return "relative_attention_bias.weight"
    parts = hf_key.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["encoder", "block"] and parts[2].isdigit() and parts[3] in _HF_BLOCK_PARTS:
        return f"blocks.{parts[2]}.{_HF_BLOCK_PARTS[parts[3]]}"
    return f"<unknown T5 weight {hf_key}>"  # reported as unexpected by the key check


def _build(config: dict) -> T5Encoder:
    return T5Encoder(T5Config.from_dict(config))


FAMILY = register_family(
    ModelFamily(
        model_type="t5",
        matches=_matches,
        config_from_hf=_config_from_hf,
        rename=_rename,
        build=_build,
        hf_allow_patterns=(
            "config.json",
            "pytorch_model*.bin",
            "pytorch_model.bin.index.json",
            "model*.safetensors",
            "model.safetensors.index.json",
            "spiece.model",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "tokenizer.json",
        ),
        extra_files=("spiece.model",),
        # the blocks' linear layers (99.9 % of the weights after the embedding); embedding, position
        # bias and norms stay in full precision
        quantizable=lambda path: path.startswith("blocks."),
    )
)
