"""STDiT3 units as ML Program functions (mirrors ``models/stdit3.py`` and ``stdit3_layers.py``).

For one prompt and its classifier-free-guidance pair: ``embedders`` builds the batch of 2 (the prompt,
then the learned null caption) from one latent and one timestep, ``final_layer`` returns both
predictions; the sampler guides them (``sampling.iterate_sampling``: v = uncond + cfg * (cond - uncond)
on the first C channels, then the Euler or leap update)::

    embedders    latent [1, C, T, H, W], timestep [1], text_embedding [1, L, C_text], text_mask [1, L]
                 int32, fps [1]  ->  tokens [2, T', S, D], t [2, D], t_mlp [2, 6D], y [2, L, D],
                 caption_bias [2, 1, 1, L]        (rows: conditional, then the learned null caption)
    block_NN     tokens, y, t_mlp, caption_bias -> tokens_out       (spatial block, then temporal block)
                 function ``<shape>`` and ``<shape>_tdtm`` (TDTM: frame pairs merged before attention)
    final_layer  tokens, t -> prediction [2, C, T, H, W]   (rows: conditional, unconditional; the
                 velocity channels only: the C sigma channels of a pred_sigma model are not read)

The caption mask is additive (``MASK_SENTINEL`` on padded tokens) where the MLX model leaves those
tokens out (``CaptionKeys``): the same attention. Functions depend on the latent size (and the
embedders on the pixel size, which scales the position embedding).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..models.stdit3 import STDiT3Config
from ..models.stdit3_layers import LAYER_NORM_EPS, QK_NORM_EPS, ROPE_THETA, _position_embedding_2d_np, _timestep_freqs
from .mil import MASK_SENTINEL, Net, f32, mb
from .spec import TensorSpec, UnitFunction, function_key

CFG_BATCH = 2


def grid(config: STDiT3Config, latent: tuple[int, int, int]) -> tuple[int, int, int]:
    """Token grid (T', H', W') of a latent (T, H, W) after padding to the patch size."""
    return tuple(-(-n // p) for n, p in zip(latent, config.patch_size))


def _check_config(config: STDiT3Config) -> None:
    if config.patch_size[0] != 1:
        raise ValueError(f"Core ML export supports STDiT3 with temporal patch size 1 (Open-Sora 1.2), got "
                         f"{config.patch_size}")


# ---------------------------------------------------------------------------- embedders


def _sinusoid_mlp(net: Net, t: Any, weights: dict[str, np.ndarray], prefix: str) -> Any:
    """TimestepEmbedder / SizeEmbedder: 256-dim sinusoid (float32: t ~ 1000) -> Linear -> SiLU -> Linear."""
    half = weights[f"{prefix}.mlp.0.weight"].shape[1] // 2
    with net.scope(prefix):
        args = net.keep_fp32(net.mul(net.reshape(t, (-1, 1), "t"), f32(_timestep_freqs(half, 10000.0))[None], "args"))
        sinusoid = net.concat([net.keep_fp32(mb().cos(x=args, name=net.name("cos"))),
                               net.keep_fp32(mb().sin(x=args, name=net.name("sin")))], axis=-1, label="sinusoid")
        h = net.linear(sinusoid, weights[f"{prefix}.mlp.0.weight"], weights[f"{prefix}.mlp.0.bias"], "fc1")
        h = net.silu(h)
        return net.linear(h, weights[f"{prefix}.mlp.2.weight"], weights[f"{prefix}.mlp.2.bias"], "fc2")


def _embedders(config: STDiT3Config, weights: dict[str, np.ndarray], latent: tuple[int, int, int],
               pixels: tuple[int, int]) -> UnitFunction:
    c = config
    t_lat, h_lat, w_lat = latent
    n_t, n_h, n_w = grid(c, latent)
    _, ph, pw = c.patch_size
    s, d, length = n_h * n_w, c.hidden_size, c.model_max_length
    pad_h, pad_w = n_h * ph - h_lat, n_w * pw - w_lat
    scale = math.sqrt(float(np.float32(pixels[0])) * float(np.float32(pixels[1]))) / c.input_sq_size
    pos_emb = _position_embedding_2d_np(d, n_h, n_w, scale, round(s**0.5))
    patch_weight = f32(weights["x_embedder.proj.weight"]).reshape(d, -1)  # (O, kt, kh, kw, I) -> (O, kt*kh*kw*I)
    null_caption = f32(weights["y_embedder.y_embedding"])[None]

    def build(net: Net, inputs: dict[str, Any]) -> dict[str, Any]:
        x = net.concat([inputs["latent"]] * CFG_BATCH, axis=0, label="cfg_latent")  # [2, C, T, H, W]
        with net.scope("patches"):
            x = net.transpose(x, (0, 2, 3, 4, 1))  # channels last
            if pad_h or pad_w:
                x = net.pad(x, (0, 0, 0, 0, 0, pad_h, 0, pad_w, 0, 0))
            x = net.reshape(x, (CFG_BATCH * n_t * n_h, ph, n_w, pw, c.in_channels))
            x = net.transpose(x, (0, 2, 1, 3, 4))  # [., W', kh, kw, C]: the kernel's (kh, kw, I) order
            x = net.reshape(x, (CFG_BATCH * n_t * s, ph * pw * c.in_channels))
            tokens = net.linear(x, patch_weight, weights["x_embedder.proj.bias"], "proj")
            tokens = net.add(net.reshape(tokens, (CFG_BATCH, n_t, s, d)), f32(pos_emb), "pos_emb")
        timestep = net.concat([inputs["timestep"]] * CFG_BATCH, axis=0, label="cfg_timestep")
        fps = net.concat([inputs["fps"]] * CFG_BATCH, axis=0, label="cfg_fps")
        t = net.add(_sinusoid_mlp(net, timestep, weights, "t_embedder"),
                    _sinusoid_mlp(net, fps, weights, "fps_embedder"), "t")
        t_mlp = net.linear(net.silu(t, "t_block.silu"), weights["t_block.1.weight"], weights["t_block.1.bias"], "t_mlp")
        with net.scope("caption"):
            y = net.concat([inputs["text_embedding"], net.const(null_caption, "null_caption")], axis=0, label="cfg")
            y = net.linear(y, weights["y_embedder.y_proj.fc1.weight"], weights["y_embedder.y_proj.fc1.bias"], "fc1")
            y = net.linear(net.gelu_tanh(y), weights["y_embedder.y_proj.fc2.weight"],
                           weights["y_embedder.y_proj.fc2.bias"], "fc2")
            valid = mb().cast(x=inputs["text_mask"], dtype="fp32", name=net.name("mask"))
            bias = net.mask(net.mul(net.sub(f32(1.0), valid, "masked"), f32(MASK_SENTINEL), "bias"))
            bias = net.mask(net.concat([bias] * CFG_BATCH, axis=0, label="cfg_mask"))
            bias = net.mask(net.reshape(bias, (CFG_BATCH, 1, 1, length)))
        return {"tokens": tokens, "t": t, "t_mlp": t_mlp, "y": y, "caption_bias": bias}

    inputs = (TensorSpec("latent", (1, c.in_channels, t_lat, h_lat, w_lat)), TensorSpec("timestep", (1,)),
              TensorSpec("text_embedding", (1, length, c.caption_channels)),
              TensorSpec("text_mask", (1, length), "int32"), TensorSpec("fps", (1,)))
    name = function_key(latent=f"{t_lat}x{h_lat}x{w_lat}", pixels=f"{pixels[0]}x{pixels[1]}")
    return UnitFunction(name, inputs, build)


# ---------------------------------------------------------------------------- blocks


def _merge_frames(net: Net, x: Any) -> Any:
    """TDTM merge [B, T, S, D] -> [B, T//2, S, D]: frame pairs averaged, an odd last frame left out."""
    b, t, s, d = x.shape
    with net.scope("merge"):
        if t % 2:
            x = net.slice(x, (0, 0, 0, 0), (b, t - 1, s, d), "even")
        pairs = net.reshape(x, (b, t // 2, 2, s, d), "pairs")
        first = net.slice(pairs, (0, 0, 0, 0, 0), (b, t // 2, 1, s, d), "first")
        second = net.slice(pairs, (0, 0, 1, 0, 0), (b, t // 2, 2, s, d), "second")
        return net.reshape(net.div(net.add(first, second, "sum"), f32(2.0), "mean"), (b, t // 2, s, d))


def _unmerge_frames(net: Net, x: Any, frames: int) -> Any:
    """TDTM unmerge [B, T//2, S, D] -> [B, frames, S, D]: each result serves both frames of its pair; an
    odd last frame reuses the last one (``stdit3_layers.unmerge_frames``)."""
    b, half, s, d = x.shape
    with net.scope("unmerge"):
        doubled = net.reshape(mb().tile(x=mb().expand_dims(x=x, axes=[2], name=net.name("expand")),
                                        reps=[1, 1, 2, 1, 1], name=net.name("tile")), (b, 2 * half, s, d))
        if frames % 2:
            last = net.slice(x, (0, half - 1, 0, 0), (b, half, s, d), "last")
            doubled = net.concat([doubled, last], axis=1, label="odd")
        return doubled


def _rope(net: Net, x: Any, positions: int, head_dim: int, label: str) -> Any:
    """Interleaved rotary embedding over the sequence axis of x [M, H, N, hd] (rotary_embedding_torch,
    ``mx.fast.rope(traditional=True)``): pairs (2i, 2i+1) rotated by position * theta^(-2i/hd)."""
    inv_freq = 1.0 / (ROPE_THETA ** (np.arange(0, head_dim, 2) / head_dim))
    angles = np.arange(positions, dtype=np.float64)[:, None] * inv_freq[None]  # [N, hd/2]
    cos, sin = f32(np.cos(angles))[:, :, None], f32(np.sin(angles))[:, :, None]
    m, h, n, _ = x.shape
    with net.scope(label):
        pairs = net.reshape(x, (m * h, n, head_dim // 2, 2), "pairs")
        even = net.slice(pairs, (0, 0, 0, 0), (m * h, n, head_dim // 2, 1), "even")
        odd = net.slice(pairs, (0, 0, 0, 1), (m * h, n, head_dim // 2, 2), "odd")
        rotated_even = net.sub(net.mul(even, cos, "even_cos"), net.mul(odd, sin, "odd_sin"), "rot_even")
        rotated_odd = net.add(net.mul(odd, cos, "odd_cos"), net.mul(even, sin, "even_sin"), "rot_odd")
        return net.reshape(net.concat([rotated_even, rotated_odd], axis=-1), (m, h, n, head_dim))


def _self_attention(net: Net, x: Any, weights: dict[str, np.ndarray], p: str, config: STDiT3Config, rope: bool) -> Any:
    """Attention within each sequence of x [M, N, D] (qkv, LlamaRMSNorm q/k norm, RoPE when temporal)."""
    m, n, d = x.shape
    heads, hd = config.num_heads, config.head_dim
    with net.scope("attn"):
        qkv = net.linear(x, weights[f"{p}.attn.qkv.weight"], weights[f"{p}.attn.qkv.bias"], "qkv")
        q, k, v = (net.transpose(net.reshape(part, (m, n, heads, hd), f"{name}.split"), (0, 2, 1, 3), f"{name}.heads")
                   for name, part in zip("qkv", net.split(qkv, 3, axis=-1)))
        if config.qk_norm:
            q = net.rms_norm(q, weights[f"{p}.attn.q_norm.weight"], QK_NORM_EPS, "q_norm")
            k = net.rms_norm(k, weights[f"{p}.attn.k_norm.weight"], QK_NORM_EPS, "k_norm")
        if rope:
            q, k = _rope(net, q, n, hd, "q_rope"), _rope(net, k, n, hd, "k_rope")
        out = net.attention(q, k, v, hd**-0.5, None, "sdpa")
        out = net.reshape(net.transpose(out, (0, 2, 1, 3), "merge"), (m, n, d), "merge")
        return net.linear(out, weights[f"{p}.attn.proj.weight"], weights[f"{p}.attn.proj.bias"], "proj")


def _cross_attention(net: Net, x: Any, y: Any, bias: Any, weights: dict[str, np.ndarray], p: str,
                     config: STDiT3Config) -> Any:
    """Video tokens x [B, N, D] attend to the caption tokens y [B, L, D] of the same sample."""
    b, n, d = x.shape
    length = y.shape[1]
    heads, hd = config.num_heads, config.head_dim
    with net.scope("cross"):
        q = net.linear(x, weights[f"{p}.cross_attn.q_linear.weight"], weights[f"{p}.cross_attn.q_linear.bias"], "q")
        kv = net.linear(y, weights[f"{p}.cross_attn.kv_linear.weight"], weights[f"{p}.cross_attn.kv_linear.bias"], "kv")
        k, v = net.split(kv, 2, axis=-1)
        q = net.transpose(net.reshape(q, (b, n, heads, hd), "q.split"), (0, 2, 1, 3), "q.heads")
        k = net.transpose(net.reshape(k, (b, length, heads, hd), "k.split"), (0, 2, 1, 3), "k.heads")
        v = net.transpose(net.reshape(v, (b, length, heads, hd), "v.split"), (0, 2, 1, 3), "v.heads")
        out = net.attention(q, k, v, hd**-0.5, bias, "sdpa")
        out = net.reshape(net.transpose(out, (0, 2, 1, 3), "merge"), (b, n, d), "merge")
        return net.linear(out, weights[f"{p}.cross_attn.proj.weight"], weights[f"{p}.cross_attn.proj.bias"], "proj")


def _block(net: Net, x: Any, y: Any, t_mlp: Any, bias: Any, weights: dict[str, np.ndarray], p: str,
           config: STDiT3Config, temporal: bool, merge: bool) -> Any:
    """One STDiT3Block on x [B, T, S, D] (adaLN-single modulation, gated residuals)."""
    b, t, s, d = x.shape
    merge = merge and t >= 2
    table = f32(weights[f"{p}.scale_shift_table"])[None]  # [1, 6, D]
    modulation = net.add(net.reshape(t_mlp, (b, 6, d), "t_mlp"), table, "modulation")
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        net.reshape(part, (b, 1, 1, d), "mod") for part in net.split(modulation, 6, axis=1))

    def modulate(h: Any, shift: Any, scale: Any, label: str) -> Any:
        normed = net.layer_norm(h, LAYER_NORM_EPS, label + ".norm")
        return net.add(net.mul(normed, net.add(scale, f32(1.0), label + ".scale1"), label + ".scale"), shift, label)

    x_m = modulate(x, shift_msa, scale_msa, "msa")
    if merge:
        x_m = _merge_frames(net, x_m)
    tm = x_m.shape[1]
    if temporal:  # sequences of frames at every spatial position
        seq = net.reshape(net.transpose(x_m, (0, 2, 1, 3), "to_time"), (b * s, tm, d), "seqs")
        out = net.transpose(net.reshape(_self_attention(net, seq, weights, p, config, rope=True), (b, s, tm, d)),
                            (0, 2, 1, 3), "from_time")
    else:  # sequences of patches within every frame
        out = net.reshape(_self_attention(net, net.reshape(x_m, (b * tm, s, d), "seqs"), weights, p, config,
                                          rope=False), (b, tm, s, d), "frames")
    if merge:
        out = _unmerge_frames(net, out, t)
    x = net.add(x, net.mul(gate_msa, out, "gate_msa"), "residual_msa")
    cross_in = _merge_frames(net, x) if merge else x  # the reference merges the residual stream itself
    cross = _cross_attention(net, net.reshape(cross_in, (b, tm * s, d), "cross_tokens"), y, bias, weights, p, config)
    cross = net.reshape(cross, (b, tm, s, d), "cross_frames")
    if merge:
        cross = _unmerge_frames(net, cross, t)
    x = net.add(x, cross, "residual_cross")
    x_m = modulate(x, shift_mlp, scale_mlp, "mlp_in")
    with net.scope("mlp"):
        hidden = net.gelu_tanh(net.linear(x_m, weights[f"{p}.mlp.fc1.weight"], weights[f"{p}.mlp.fc1.bias"], "fc1"))
        mlp = net.linear(hidden, weights[f"{p}.mlp.fc2.weight"], weights[f"{p}.mlp.fc2.bias"], "fc2")
    return net.add(x, net.mul(gate_mlp, mlp, "gate_mlp"), "residual_mlp")


def _block_pair(config: STDiT3Config, weights: dict[str, np.ndarray], index: int, latent: tuple[int, int, int],
                merge: bool) -> UnitFunction:
    n_t, n_h, n_w = grid(config, latent)
    d, length = config.hidden_size, config.model_max_length

    def build(net: Net, inputs: dict[str, Any]) -> dict[str, Any]:
        x = inputs["tokens"]
        for kind, temporal in (("spatial", False), ("temporal", True)):
            with net.scope(kind):
                x = _block(net, x, inputs["y"], inputs["t_mlp"], inputs["caption_bias"], weights,
                           f"{kind}_blocks.{index}", config, temporal, merge)
        return {"tokens_out": x}

    inputs = (TensorSpec("tokens", (CFG_BATCH, n_t, n_h * n_w, d)), TensorSpec("y", (CFG_BATCH, length, d)),
              TensorSpec("t_mlp", (CFG_BATCH, 6 * d)), TensorSpec("caption_bias", (CFG_BATCH, 1, 1, length)))
    name = function_key(latent="x".join(map(str, latent))) + ("_tdtm" if merge else "")
    return UnitFunction(name, inputs, build)


# ---------------------------------------------------------------------------- final layer


def _final_layer(config: STDiT3Config, weights: dict[str, np.ndarray], latent: tuple[int, int, int]) -> UnitFunction:
    c = config
    n_t, n_h, n_w = grid(c, latent)
    _, ph, pw = c.patch_size
    d, oc = c.hidden_size, c.out_channels

    def build(net: Net, inputs: dict[str, Any]) -> dict[str, Any]:
        x, t = inputs["tokens"], inputs["t"]
        table = f32(weights["final_layer.scale_shift_table"])[None]  # [1, 2, D]
        shift, scale = net.split(net.add(table, net.reshape(t, (CFG_BATCH, 1, d)), "modulation"), 2, axis=1)
        shift, scale = (net.reshape(v, (CFG_BATCH, 1, 1, d), "mod") for v in (shift, scale))
        normed = net.layer_norm(x, LAYER_NORM_EPS, "norm_final")
        x = net.add(net.mul(normed, net.add(scale, f32(1.0), "scale1"), "scale"), shift, "modulate")
        x = net.linear(x, weights["final_layer.linear.weight"], weights["final_layer.linear.bias"], "linear")
        with net.scope("unpatchify"):  # [B, T, (h w), (ph pw oc)] -> [B, oc, T, h*ph, w*pw], rank <= 5
            x = net.reshape(x, (CFG_BATCH * n_t * n_h, n_w, ph, pw, oc))
            x = net.transpose(x, (0, 2, 1, 3, 4))
            x = net.reshape(x, (CFG_BATCH, n_t, n_h * ph, n_w * pw, oc))
            x = net.transpose(x, (0, 4, 1, 2, 3))
            t_lat, h_lat, w_lat = latent
            x = net.slice(x, (0, 0, 0, 0, 0), (CFG_BATCH, c.in_channels, t_lat, h_lat, w_lat), "crop")
        return {"prediction": x}

    inputs = (TensorSpec("tokens", (CFG_BATCH, n_t, n_h * n_w, d)), TensorSpec("t", (CFG_BATCH, d)))
    return UnitFunction(function_key(latent="x".join(map(str, latent))), inputs, build)


# ---------------------------------------------------------------------------- units


def unit_functions(config: STDiT3Config, unit: str, weights: dict[str, np.ndarray],
                   sizes: list[tuple[tuple[int, int, int], tuple[int, int]]], tdtm: bool = True) -> list[UnitFunction]:
    """The functions of one STDiT3 unit for ``sizes`` [(latent (T, H, W), pixels (H, W))]: one per
    distinct shape (blocks: and its TDTM variant)."""
    _check_config(config)
    functions: dict[str, UnitFunction] = {}
    for latent, pixels in sizes:
        if unit == "embedders":
            made = [_embedders(config, weights, latent, pixels)]
        elif unit.startswith("block_"):
            index = int(unit.removeprefix("block_"))
            made = [_block_pair(config, weights, index, latent, merge=False)]
            if tdtm and latent[0] >= 2:
                made.append(_block_pair(config, weights, index, latent, merge=True))
        elif unit == "final_layer":
            made = [_final_layer(config, weights, latent)]
        else:
            raise ValueError(f"STDiT3 has no unit {unit!r}")
        for fn in made:
            functions.setdefault(fn.name, fn)
    return list(functions.values())
