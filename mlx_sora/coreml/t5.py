"""T5 v1.1 encoder units as ML Program functions (mirrors ``models/t5.py`` unit by unit).

    embed       input_ids [B, L] int32, attention_mask [B, L] int32 -> hidden [B, L, d], bias [B, H, L, L]
    block_NN    hidden, bias -> hidden_out (the next unit's hidden)
    final_norm  hidden -> text_embedding [B, L, d]

The position bias of the fixed prompt length L is a constant of ``embed`` (the table's rows for
every query/key bucket, as ``T5Encoder.attention_bias`` looks them up); the padding mask is added as
``MASK_SENTINEL`` on masked keys. One function per unit: the prompt length and batch are fixed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..models.t5 import T5Config, _bucket_table
from .mil import MASK_SENTINEL, Net, f32, mb
from .spec import TensorSpec, UnitFunction

FUNCTION = "main"


def _feed_forward(net: Net, x: Any, weights: dict[str, np.ndarray], prefix: str, config: T5Config) -> Any:
    act = {"gelu_new": net.gelu_tanh, "relu": lambda h: mb().relu(x=h, name=net.name("relu")),
           "gelu": lambda h: mb().gelu(x=h, mode="EXACT", name=net.name("gelu")), "silu": net.silu}[config.activation]
    if config.is_gated:
        hidden = net.mul(act(net.linear(x, weights[f"{prefix}.wi_0.weight"], None, "wi_0")),
                         net.linear(x, weights[f"{prefix}.wi_1.weight"], None, "wi_1"), "gate")
    else:
        hidden = act(net.linear(x, weights[f"{prefix}.wi.weight"], None, "wi"))
    return net.linear(hidden, weights[f"{prefix}.wo.weight"], None, "wo")


def _block(net: Net, x: Any, bias: Any, weights: dict[str, np.ndarray], index: int, config: T5Config) -> Any:
    b, length = x.shape[0], x.shape[1]
    heads, d_kv = config.num_heads, config.d_kv
    p = f"blocks.{index}"
    with net.scope("attn"):
        normed = net.rms_norm(x, weights[f"{p}.attention_norm.weight"], config.layer_norm_epsilon, "norm")

        def heads_of(t: Any, label: str) -> Any:
            return net.transpose(net.reshape(t, (b, length, heads, d_kv), label + ".split"), (0, 2, 1, 3), label + ".heads")

        q, k, v = (heads_of(net.linear(normed, weights[f"{p}.attention.{n}.weight"], None, n), n) for n in "qkv")
        context = net.attention(q, k, v, None, bias, "sdpa")  # T5 does not scale q.k
        merged = net.reshape(net.transpose(context, (0, 2, 1, 3), "merge"), (b, length, heads * d_kv), "merge")
        x = net.add(x, net.linear(merged, weights[f"{p}.attention.o.weight"], None, "o"), "residual")
    with net.scope("ff"):
        normed = net.rms_norm(x, weights[f"{p}.ff_norm.weight"], config.layer_norm_epsilon, "norm")
        return net.add(x, _feed_forward(net, normed, weights, f"{p}.ff", config), "residual")


def unit_functions(config: T5Config, unit: str, weights: dict[str, np.ndarray], text_length: int,
                   batch: int = 1) -> list[UnitFunction]:
    """The functions of one T5 unit (one: the prompt length and batch are fixed)."""
    d, heads, length = config.d_model, config.num_heads, text_length
    hidden = TensorSpec("hidden", (batch, length, d))
    bias_spec = TensorSpec("bias", (batch, heads, length, length))
    if unit == "embed":
        table = f32(weights["embed_tokens.weight"])
        buckets = _bucket_table(length, config.relative_attention_num_buckets, config.relative_attention_max_distance)
        position_bias = f32(weights["relative_attention_bias.weight"])[buckets].transpose(2, 0, 1)[None]

        def build(net: Net, inputs: dict[str, Any]) -> dict[str, Any]:
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            embedded = mb().gather(x=net.const(table, "embed_tokens"), indices=ids, axis=0, name=net.name("embed"))
            masked = net.mask(net.mul(net.sub(f32(1.0), mb().cast(x=mask, dtype="fp32", name=net.name("mask")), "masked"),
                                      f32(MASK_SENTINEL), "mask_bias"))
            key_bias = net.mask(net.reshape(masked, (batch, 1, 1, length), "key_bias"))
            bias = net.mask(net.add(net.const(position_bias, "position_bias"), key_bias, "bias"))
            return {"hidden": embedded, "bias": bias}

        inputs = (TensorSpec("input_ids", (batch, length), "int32"), TensorSpec("attention_mask", (batch, length), "int32"))
        return [UnitFunction(FUNCTION, inputs, build)]
    if unit.startswith("block_"):
        index = int(unit.removeprefix("block_"))

        def build(net: Net, inputs: dict[str, Any]) -> dict[str, Any]:
            return {"hidden_out": _block(net, inputs["hidden"], inputs["bias"], weights, index, config)}

        return [UnitFunction(FUNCTION, (hidden, bias_spec), build)]
    if unit == "final_norm":
        def build(net: Net, inputs: dict[str, Any]) -> dict[str, Any]:
            return {"text_embedding": net.rms_norm(inputs["hidden"], weights["final_norm.weight"],
                                                   config.layer_norm_epsilon, "final_norm")}

        return [UnitFunction(FUNCTION, (hidden,), build)]
    raise ValueError(f"T5 has no unit {unit!r}")
