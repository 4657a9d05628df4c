"""Quantized weights: affine int8 / int4 linear layers (MLX ``mx.quantize``, group size 64 by default).

A converted folder can store the linear layers of T5 and STDiT3 quantized (``python -m
mlx_sora.convert ... --quantize int8``, or ``save_model(..., quantize="int8")``). Which layers are
quantized is each family's choice (``ModelFamily.quantizable``: the linear layers of the repeated
blocks; embeddings, norms, the embedders and the final layer stay in full precision, see the README
for the measurement behind it). The config records ``mlx_sora.quantization`` = {bits, group_size,
mode}; a layer is loaded quantized exactly when its ``.scales`` are in the folder (as mlx-lm does).

Computing: on a GPU, ``mx.quantized_matmul`` (the fast path on Metal). On the CPU, MLX's quantized
matmul is ~90x slower than its float32 matmul (measured by ``scripts/bench_quantization.py``), so
``QuantizedLinear`` dequantizes the weight on the fly and multiplies in the compute dtype: the weights
stay quantized in memory and one layer at a time exists in float32.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from ..errors import UserError

QUANTIZATIONS: dict[str, int] = {"int8": 8, "int4": 4}
DEFAULT_GROUP_SIZE = 64


class QuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` that computes by dequantizing on the CPU (see the module docstring)."""

    def __call__(self, x: mx.array) -> mx.array:
        if mx.default_device() == mx.gpu:
            return super().__call__(x)
        weight = mx.dequantize(self["weight"], self["scales"], self.get("biases"), group_size=self.group_size,
                               bits=self.bits, mode=self.mode).astype(x.dtype)
        out = x @ weight.T
        if "bias" in self:
            out = out + self["bias"].astype(x.dtype)
        return out


def parse_quantization(name: str | int | None, group_size: int = DEFAULT_GROUP_SIZE) -> dict | None:
    """"int8" / "int4" (or 8 / 4) -> {"bits", "group_size", "mode"}; None stays None."""
    if name is None:
        return None
    bits = QUANTIZATIONS.get(name) if isinstance(name, str) else name
    if bits not in (4, 8):
        raise UserError(f"--quantize {name!r} is not supported; choose {' or '.join(QUANTIZATIONS)}")
    if isinstance(group_size, bool) or group_size not in (32, 64, 128):
        raise UserError(f"--group-size must be 32, 64 or 128, got {group_size!r}")
    return {"bits": bits, "group_size": group_size, "mode": "affine"}


def quantizable_linears(model: nn.Module, predicate: Callable[[str], bool], group_size: int) -> list[str]:
    """Paths of the ``nn.Linear`` modules the family wants quantized and whose input size splits into
    groups."""
    return [
        path for path, module in model.named_modules()
        if isinstance(module, nn.Linear) and predicate(path) and module.weight.shape[-1] % group_size == 0
    ]


def quantize_modules(model: nn.Module, paths: list[str], quantization: dict) -> None:
    """Replace the linear layers at ``paths`` by (lazily initialised) ``QuantizedLinear`` layers."""
    modules = dict(model.named_modules())
    replacements = []
    for path in paths:
        linear = modules[path]
        out_dims, in_dims = linear.weight.shape
        layer = QuantizedLinear(in_dims, out_dims, bias="bias" in linear, group_size=quantization["group_size"],
                                bits=quantization["bits"], mode=quantization.get("mode", "affine"))
        layer.unfreeze()
        replacements.append((path, layer))
    if replacements:
        from mlx.utils import tree_unflatten

        model.update_modules(tree_unflatten(replacements))


def quantize_weight(value: mx.array, quantization: dict, dtype: mx.Dtype) -> tuple[mx.array, mx.array, mx.array]:
    """A float weight -> (packed uint32 weight, scales, biases), the scales and biases in ``dtype``."""
    q, scales, biases = mx.quantize(value.astype(mx.float32), group_size=quantization["group_size"],
                                    bits=quantization["bits"], mode=quantization.get("mode", "affine"))
    return q, scales.astype(dtype), biases.astype(dtype)
