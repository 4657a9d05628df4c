"""Building ML Program functions with coremltools' MIL builder: named ops and the layers all three
models share.

Every op gets a name that says what it is (``block.sa.qkv``), the same in every function built from
the same unit (sizes, TDTM variant), so that what the exporter learns about an op by name (its
largest activation on calibration inputs: ``export.py``) holds for all of them. Graphs are built in
float32 from float32 weights; the float16 cast comes later, per op, from those measurements.
``Net.fp32`` names the ops that must stay float32 whatever they measure (e.g. the sinusoid of a
timestep near 1000, where float16's spacing is 0.5).

Layouts follow Core ML: convolutions take channels first. Tensors keep rank <= 5 (Core ML's limit),
so patch (un)shuffles and depth-to-time moves are written as rank-5 reshapes.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Iterator, Sequence

import numpy as np

MASK_SENTINEL = -4096.0
"""Additive attention-mask value for keys a query must not see: finite (Core ML float16 has no
safe -inf, and the float32 minimum overflows when added), exactly representable in float16, and far
enough below any score that exp() gives 0 in float16 and float32 alike (the same softmax as the
reference's -inf / dtype-minimum masks)."""


def mb() -> Any:
    from coremltools.converters.mil import Builder

    return Builder


def f32(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


class Net:
    """Adds named ops to the function being built (call inside a ``Builder.function``)."""

    def __init__(self) -> None:
        self._scopes: list[str] = []
        self._used: Counter[str] = Counter()
        self.fp32: set[str] = set()
        """Names of ops that stay float32 in a float16 export."""
        self.masks: set[str] = set()
        """Names of ops whose outputs hold ``MASK_SENTINEL`` by design (attention masks and masked scores):
        their large values are not activations that could overflow."""

    # ------------------------------------------------------------------ names

    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        self._scopes.append(name)
        try:
            yield
        finally:
            self._scopes.pop()

    def name(self, label: str) -> str:
        base = ".".join([*self._scopes, label])
        self._used[base] += 1
        count = self._used[base]
        return base if count == 1 else f"{base}_{count}"

    def keep_fp32(self, var: Any) -> Any:
        self.fp32.add(var.op.name)
        return var

    def mask(self, var: Any) -> Any:
        self.masks.add(var.op.name)
        return var

    # ------------------------------------------------------------------ thin wrappers

    def const(self, value: np.ndarray, label: str) -> Any:
        return mb().const(val=value, name=self.name(label))

    def linear(self, x: Any, weight: np.ndarray, bias: np.ndarray | None, label: str) -> Any:
        return mb().linear(x=x, weight=f32(weight), bias=None if bias is None else f32(bias), name=self.name(label))

    def matmul(self, x: Any, y: Any, label: str, transpose_y: bool = False) -> Any:
        return mb().matmul(x=x, y=y, transpose_y=transpose_y, name=self.name(label))

    def add(self, x: Any, y: Any, label: str) -> Any:
        return mb().add(x=x, y=y, name=self.name(label))

    def sub(self, x: Any, y: Any, label: str) -> Any:
        return mb().sub(x=x, y=y, name=self.name(label))

    def mul(self, x: Any, y: Any, label: str) -> Any:
        return mb().mul(x=x, y=y, name=self.name(label))

    def div(self, x: Any, y: Any, label: str) -> Any:
        return mb().real_div(x=x, y=y, name=self.name(label))

    def reshape(self, x: Any, shape: Sequence[int], label: str = "reshape") -> Any:
        return mb().reshape(x=x, shape=[int(s) for s in shape], name=self.name(label))

    def transpose(self, x: Any, perm: Sequence[int], label: str = "transpose") -> Any:
        return mb().transpose(x=x, perm=[int(p) for p in perm], name=self.name(label))

    def concat(self, values: Sequence[Any], axis: int, label: str = "concat") -> Any:
        return mb().concat(values=list(values), axis=axis, name=self.name(label))

    def slice(self, x: Any, begin: Sequence[int], end: Sequence[int], label: str = "slice") -> Any:
        return mb().slice_by_index(x=x, begin=[int(b) for b in begin], end=[int(e) for e in end],
                                   name=self.name(label))

    def split(self, x: Any, parts: int, axis: int, label: str = "split") -> list[Any]:
        return list(mb().split(x=x, num_splits=parts, axis=axis, name=self.name(label)))

    def silu(self, x: Any, label: str = "silu") -> Any:
        return self.mul(x, mb().sigmoid(x=x, name=self.name(label + ".sigmoid")), label)

    def gelu_tanh(self, x: Any, label: str = "gelu") -> Any:
        return mb().gelu(x=x, mode="TANH_APPROXIMATION", name=self.name(label))

    def softmax(self, x: Any, label: str = "softmax") -> Any:
        return mb().softmax(x=x, axis=-1, name=self.name(label))

    def pad(self, x: Any, pads: Sequence[int], label: str = "pad") -> Any:
        """Zero padding; ``pads`` is (before, after) for every axis, outermost first."""
        return mb().pad(x=x, pad=[int(p) for p in pads], mode="constant", constant_val=0.0, name=self.name(label))

    # ------------------------------------------------------------------ layers

    def rms_norm(self, x: Any, weight: np.ndarray | None, eps: float, label: str) -> Any:
        """x * rsqrt(mean(x^2) + eps) * weight over the last axis (T5LayerNorm, LlamaRMSNorm)."""
        with self.scope(label):
            square = mb().mul(x=x, y=x, name=self.name("square"))
            mean = mb().reduce_mean(x=square, axes=[-1], keep_dims=True, name=self.name("mean"))
            inv = mb().rsqrt(x=mean, epsilon=float(eps), name=self.name("rsqrt"))
            out = self.mul(x, inv, "normed")
            return out if weight is None else self.mul(out, f32(weight), "scale")

    def layer_norm(self, x: Any, eps: float, label: str) -> Any:
        """LayerNorm over the last axis without affine parameters."""
        return mb().layer_norm(x=x, axes=[-1], epsilon=float(eps), name=self.name(label))

    def group_norm(self, x: Any, groups: int, weight: np.ndarray, bias: np.ndarray, eps: float, label: str,
                   silu: bool = False) -> Any:
        """torch GroupNorm on channels-first x [N, C, ...] (statistics over a group's channels and
        positions, two-pass), optionally followed by SiLU."""
        shape = tuple(x.shape)
        n, c = shape[0], shape[1]
        with self.scope(label):
            grouped = self.reshape(x, (n, groups, -1), "group")
            mean = mb().reduce_mean(x=grouped, axes=[2], keep_dims=True, name=self.name("mean"))
            centered = self.sub(grouped, mean, "center")
            square = mb().mul(x=centered, y=centered, name=self.name("square"))
            var = mb().reduce_mean(x=square, axes=[2], keep_dims=True, name=self.name("var"))
            inv = mb().rsqrt(x=var, epsilon=float(eps), name=self.name("rsqrt"))
            normed = self.reshape(self.mul(centered, inv, "normed"), shape, "ungroup")
            channel_shape = (1, c) + (1,) * (len(shape) - 2)
            out = self.add(self.mul(normed, f32(weight).reshape(channel_shape), "gamma"),
                           f32(bias).reshape(channel_shape), "beta")
            return self.silu(out) if silu else out

    def attention(self, q: Any, k: Any, v: Any, scale: float | None, bias: Any | None, label: str) -> Any:
        """softmax(q k^T * scale + bias) v on [..., N, d] tensors (scale None: no scaling, as T5)."""
        with self.scope(label):
            if scale is not None:
                q = self.mul(q, f32(scale), "q_scaled")
            scores = self.matmul(q, k, "scores", transpose_y=True)
            if bias is not None:
                scores = self.mask(self.add(scores, bias, "masked"))
            return self.matmul(self.softmax(scores), v, "context")

    def conv(self, x: Any, weight: np.ndarray, bias: np.ndarray | None, padding: Sequence[int], label: str,
             strides: Sequence[int] | None = None) -> Any:
        """Convolution of channels-first x with weight [O, I, *kernel]; ``padding`` (before, after) per
        spatial axis."""
        rank = weight.ndim - 2
        return mb().conv(x=x, weight=f32(weight), bias=None if bias is None else f32(bias),
                         strides=[1] * rank if strides is None else list(strides), pad_type="custom",
                         pad=[int(p) for p in padding], dilations=[1] * rank, groups=1, name=self.name(label))

    def upsample2x(self, x: Any, label: str = "upsample") -> Any:
        return mb().upsample_nearest_neighbor(x=x, scale_factor_height=2, scale_factor_width=2, name=self.name(label))
