"""An export against the MLX model, unit by unit: the same inputs through a replayed package function
and through the MLX unit.

``unit_cases`` runs the MLX models (float32) on a prompt and a latent of one video size and records,
for every unit kind, the Core ML function's inputs and the MLX unit's output: T5 ``embed``,
``block_00`` and ``final_norm``; STDiT3 ``embedders``, ``block_00`` (plain and TDTM) and
``final_layer``; every VAE decoder stage, chained through a temporal chunk and one frame. Inputs that
differ by convention are translated (channels first, the mask sentinel for the key mask, the null
caption concatenated inside ``embedders``, only the velocity channels of the prediction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from .mil import MASK_SENTINEL


@dataclass
class UnitCase:
    component: str
    unit: str
    function: str
    inputs: dict[str, np.ndarray]
    output: str
    reference: np.ndarray


def relative_error(value: np.ndarray, reference: np.ndarray) -> float:
    """max |value - reference| / max |reference|."""
    difference = np.abs(np.asarray(value, np.float64) - np.asarray(reference, np.float64)).max()
    return float(difference / max(float(np.abs(reference).max()), 1e-30))


def _key_mask_bias(bias: np.ndarray) -> np.ndarray:
    return np.where(bias < -1e30, MASK_SENTINEL, bias).astype(np.float32)  # the dtype minimum -> the sentinel


def t5_cases(t5: Any, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[list[UnitCase], np.ndarray]:
    """Cases of T5's unit kinds, and the text embedding after ``block_00`` and ``final_norm`` (a valid
    input of STDiT3, not the whole encoder's output)."""
    ids, mask = input_ids.astype(np.int32), attention_mask.astype(np.int32)
    x, bias = t5.units[0].run(t5.check_inputs(ids, mask))
    block = next(u for u in t5.units if u.name == "block_00")
    out, _ = block.run((x, bias))
    final = t5.units[-1].run((out, bias))
    cases = [
        UnitCase("text_encoder", "embed", "main", {"input_ids": ids, "attention_mask": mask}, "hidden", np.array(x)),
        UnitCase("text_encoder", "block_00", "main", {"hidden": np.array(x), "bias": _key_mask_bias(np.array(bias))},
                 "hidden_out", np.array(out)),
        UnitCase("text_encoder", "final_norm", "main", {"hidden": np.array(out)}, "text_embedding", np.array(final)),
    ]
    return cases, np.array(final)


def stdit3_cases(stdit: Any, text: np.ndarray, attention_mask: np.ndarray, latent: tuple[int, int, int],
                 pixels: tuple[int, int], timestep: float = 812.5, fps: float = 24.0, seed: int = 1) -> list[UnitCase]:
    rng = np.random.default_rng(seed)
    mask = attention_mask.astype(np.int32)
    z = rng.standard_normal((1, stdit.config.in_channels, *latent)).astype(np.float32)
    y = mx.concatenate([mx.array(text)[:, None], stdit.null_caption(1)], axis=0)
    tokens, state = stdit.prepare(x=mx.array(np.concatenate([z, z])), timestep=mx.array([timestep, timestep]), y=y,
                                  mask=mx.array(mask), fps=mx.array([fps]), height=mx.array([pixels[0]]),
                                  width=mx.array([pixels[1]]))
    key = "x".join(map(str, latent))
    inputs = {"latent": z, "timestep": np.array([timestep], np.float32), "text_embedding": text.astype(np.float32),
              "text_mask": mask, "fps": np.array([fps], np.float32)}
    cases = [UnitCase("stdit3", "embedders", f"latent{key}_pixels{pixels[0]}x{pixels[1]}", inputs, "tokens",
                      np.array(tokens))]
    caption_bias = np.where(mask.astype(bool), 0.0, MASK_SENTINEL).astype(np.float32)
    block_inputs = {"tokens": np.array(tokens), "y": np.array(state.y), "t_mlp": np.array(state.t_mlp),
                    "caption_bias": np.repeat(caption_bias, 2, axis=0)[:, None, None, :]}
    block = next(u for u in stdit.units if u.name == "block_00")
    out, _ = block.run((tokens, state))
    cases.append(UnitCase("stdit3", "block_00", f"latent{key}", block_inputs, "tokens_out", np.array(out)))
    if latent[0] >= 2:  # TDTM merges frame pairs
        state.merge = True
        merged, _ = block.run((tokens, state))
        state.merge = False
        cases.append(UnitCase("stdit3", "block_00", f"latent{key}_tdtm", block_inputs, "tokens_out", np.array(merged)))
    prediction = np.array(stdit.units[-1].run((out, state)))[:, : stdit.config.in_channels]  # velocity channels
    cases.append(UnitCase("stdit3", "final_layer", f"latent{key}", {"tokens": np.array(out), "t": np.array(state.t)},
                          "prediction", prediction))
    return cases


def vae_cases(vae: Any, latent: tuple[int, int, int], frames: int, seed: int = 2) -> list[UnitCase]:
    """Every decoder stage on one temporal chunk of ``latent`` (T latent frames, decoding to ``frames``)
    and on one of its frames."""
    rng = np.random.default_rng(seed)
    t, h, w = latent
    z = rng.standard_normal((1, vae.latent_channels, t, h, w)).astype(np.float32)
    first = {"latent_stats": "latent", "spatial_decoder_in": "spatial_latent"}
    outputs = {"latent_stats": "x", "temporal_decoder_out": "spatial_latents", "spatial_decoder_in": "x",
               "spatial_decoder_out": "image"}
    cases = []
    carry = (mx.array(z.transpose(0, 2, 3, 4, 1)), frames)
    for unit in vae.temporal_decoder_units:
        before = np.array(carry[0]).transpose(0, 4, 1, 2, 3)
        carry = unit.run(carry)
        out = carry[0] if isinstance(carry, tuple) else carry
        function = f"latent{t}x{h}x{w}" + (f"_frames{frames}" if unit.name == "temporal_decoder_out" else "")
        cases.append(UnitCase("vae", unit.name, function, {first.get(unit.name, "x"): before},
                              outputs.get(unit.name, "x_out"), np.array(out).transpose(0, 4, 1, 2, 3)))
    frame = np.array(carry)[:, min(3, frames - 1)]  # [1, h, w, C]
    x, before = mx.array(frame) / vae.config.spatial_scaling_factor, frame.transpose(0, 3, 1, 2)
    for unit in vae.spatial_decoder_units:
        out = unit.run(x)
        after = np.array(out).transpose(0, 3, 1, 2)
        cases.append(UnitCase("vae", unit.name, f"latent{h}x{w}", {first.get(unit.name, "x"): before},
                              outputs.get(unit.name, "x_out"), after))
        x, before = out, after
    return cases
