"""Fast elementwise kernels for MLX's CPU backend, exact reformulations of the functions they replace.

Why: on Linux/x86 MLX evaluates transcendental ops (exp, tanh, sigmoid) one scalar libm call per
element on one thread (~15 ns each: a tanh-GELU on [1440, 4608] took 0.23 s, torch 0.011 s), while
additions and multiplications run vectorized, and ``mx.compile`` fuses chains of them into one
vectorized loop. So here exp and tanh are written with additions, multiplications, one division and
integer bit operations only, compiled into fused kernels:

* ``exp``: range reduction ``x = n ln2 + r`` (round-to-nearest by the 1.5 * 2^23 trick, no ``floor``
  call) and the Cephes ``expf`` polynomial; max relative error 1.2e-7 (MLX's CPU exp: ~2 ulp).
* ``tanh`` (for the tanh-GELU): the rational minimax approximation that Eigen and XLA use for float32
  (odd degree-13 / even degree-6), clamped at |x| = 7.9053 where it reaches 1; max error ~6 ulp of 1.
* ``softmax`` / ``attention``: ``exp(s - max)`` with the fast exp; ``attention`` divides by the row
  sums after the product with V (a [N, d] instead of an [N, N] division; the same function).

On a GPU these functions fall back to MLX's own fused kernels (``nn.gelu_approx``,
``mx.fast.scaled_dot_product_attention``), which are already fast there: nothing changes on
Metal/CUDA. ``fast_cpu()`` is the switch; set ``MLX_SORA_FAST_OPS=0`` to use MLX's ops on CPU too.
"""

from __future__ import annotations

import itertools
import math
import os

import mlx.core as mx
import mlx.nn as nn

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375  # ln 2 = _LN2_HI - _LN2_LO, split so that n * _LN2_HI is exact (Cephes)
_LN2_LO = 2.12194440e-4
_ROUND = 12582912.0  # 1.5 * 2**23: (t + _ROUND) - _ROUND rounds t to the nearest integer (|t| < 2**22)
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
             5.0000001201e-1)

# Eigen's ptanh_float (also XLA's): tanh(x) = x * P(x^2) / Q(x^2) on [-7.9053, 7.9053]
_TANH_CLAMP = 7.90531110763549805
_TANH_P = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
           -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16)
_TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)
_GELU_K = math.sqrt(2.0 / math.pi)


def fast_cpu() -> bool:
    """Whether the CPU kernels of this module are used (the default device is the CPU)."""
    return mx.default_device() == mx.cpu and os.environ.get("MLX_SORA_FAST_OPS", "1") != "0"


def _poly(x: mx.array, c: tuple[float, ...], x2: mx.array | None = None, x4: mx.array | None = None) -> mx.array:
    """sum c_i x^i (c lowest degree first, 4 to 7 of them) in Estrin's form: a shallow graph, because
    ``mx.compile`` fuses at most 11 levels of operations into one kernel."""
    x2 = x * x if x2 is None else x2
    low = (c[0] + c[1] * x) + x2 * (c[2] + c[3] * x)
    if len(c) == 4:
        return low
    high = c[4] + c[5] * x if len(c) > 5 else mx.full(x.shape, c[4], x.dtype)
    if len(c) == 7:
        high = high + x2 * c[6]
    return low + (x2 * x2 if x4 is None else x4) * high


# ------------------------------------------------------------------------------ exp


def _exp_exponent(x: mx.array) -> mx.array:
    """n = round(x / ln2) of the clipped x, as float32."""
    x = mx.clip(x, -88.0, 88.0)  # below -87.68: n = -127, 2^n's bits are 0, exp = 0
    return (x * _LOG2E + _ROUND) - _ROUND


# Three kernels, each with one output and a shallow graph (``mx.compile`` splits a graph whose
# intermediates feed several outputs, and any graph deeper than 11 operations, into many kernels).
@mx.compile
def _exp_scale_bits(x: mx.array) -> mx.array:
    """The float32 bit pattern of 2^n."""
    return mx.left_shift(_exp_exponent(x).astype(mx.int32) + 127, 23)


@mx.compile
def _exp_remainder(x: mx.array) -> mx.array:
    """r = x - n ln2 (|r| <= ln2 / 2), n recomputed exactly as in ``_exp_scale_bits``."""
    n = _exp_exponent(x)
    return (mx.clip(x, -88.0, 88.0) - n * _LN2_HI) + n * _LN2_LO


@mx.compile
def _exp_finish(r: mx.array, two_n: mx.array) -> mx.array:
    r2 = r * r
    return (_poly(r, _EXP_POLY[::-1], r2) * r2 + r + 1.0) * two_n


def exp(x: mx.array) -> mx.array:
    """float32 exp (fast CPU kernel; ``mx.exp`` for other dtypes or off the CPU)."""
    if x.dtype != mx.float32 or not fast_cpu():
        return mx.exp(x)
    return _exp_finish(_exp_remainder(x), mx.view(_exp_scale_bits(x), mx.float32))


# ------------------------------------------------------------------------------ softmax, attention


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """Softmax along ``axis``, float32 arithmetic (as ``mx.softmax(..., precise=True)``)."""
    if not fast_cpu():
        return mx.softmax(x, axis=axis, precise=True)
    dtype = x.dtype
    x = x.astype(mx.float32)
    e = exp(x - mx.stop_gradient(x.max(axis=axis, keepdims=True)))
    return (e / e.sum(axis=axis, keepdims=True)).astype(dtype)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None) -> mx.array:
    """``mx.fast.scaled_dot_product_attention`` (q, k, v [..., heads, N, d]; mask boolean or additive).

    CPU: softmax(q k^T * scale) V with the fast exp, the normalisation applied after the product with
    V; scores and softmax in float32 (as the reference STDiT3 attention).
    """
    if not fast_cpu():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    dtype = q.dtype
    if scale != 1.0:
        q = q * mx.array(scale, dtype=q.dtype)
    scores = (q @ k.swapaxes(-1, -2)).astype(mx.float32)
    if mask is not None:
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.array(-mx.inf, mx.float32))
        else:
            scores = scores + mask.astype(mx.float32)
    e = exp(scores - scores.max(axis=-1, keepdims=True))
    out = e.astype(dtype) @ v
    return (out / e.sum(axis=-1, keepdims=True).astype(dtype)).astype(dtype)


# ------------------------------------------------------------------------------ GELU


@mx.compile
def _gelu_argument(x: mx.array) -> mx.array:
    u = _GELU_K * (x + 0.044715 * (x * x * x))
    return mx.clip(u, -_TANH_CLAMP, _TANH_CLAMP)


@mx.compile
def _gelu_finish(x: mx.array, u: mx.array) -> mx.array:
    u2 = u * u
    u4 = u2 * u2
    tanh_u = u * _poly(u2, _TANH_P, u4, u4 * u4) / _poly(u2, _TANH_Q, u4)
    half_x = 0.5 * x
    return half_x + half_x * tanh_u


def _gelu_tanh_f32(x: mx.array) -> mx.array:
    return _gelu_finish(x, _gelu_argument(x))


def gelu_tanh(x: mx.array) -> mx.array:
    """The tanh-approximated GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (torch
    ``gelu(approximate="tanh")``, transformers ``gelu_new``); ``nn.gelu_approx`` off the CPU."""
    if not fast_cpu():
        return nn.gelu_approx(x)
    if x.dtype == mx.float32:
        return _gelu_tanh_f32(x)
    return _gelu_tanh_f32(x.astype(mx.float32)).astype(x.dtype)


# ------------------------------------------------------------------------------ convolution


def conv_by_taps(x: mx.array, weight: mx.array, bias: mx.array | None, padding: list[tuple[int, int]],
                 fold: int = 0) -> mx.array:
    """Stride-1 convolution of channels-last ``x`` [N, *spatial, C_in] with ``weight`` [O, *kernel, C_in]
    and zero ``padding`` (before, after) per spatial axis, as one matrix product per kernel tap.

    MLX's CPU convolution copies the input once per tap into an im2col matrix (on one thread) before
    its matrix product. Here the padded input is flattened to rows [N * prod(grid), C]; the input
    row of output position p for tap t is row p + offset(t), so each tap multiplies a contiguous
    slice of the same matrix (no copy) and accumulates into the output (``addmm``). Outputs are
    computed on the padded grid and cropped (a view); a zero sample appended to the batch keeps the
    last taps' slices in range. The first ``fold`` kernel axes are folded into the channels instead
    (shifted copies side by side: fewer, larger products and no padding waste along those axes).
    Same sums, in a different order.
    """
    n, ci = x.shape[0], x.shape[-1]
    o, kernel = weight.shape[0], weight.shape[1:-1]
    padded = mx.pad(x, [(0, 1), *padding, (0, 0)])
    out_size = [p - k + 1 for p, k in zip(padded.shape[1:-1], kernel)]
    if fold:
        pieces = [padded[(slice(None), *(slice(s, s + m) for s, m in zip(shift, out_size)))]
                  for shift in itertools.product(*(range(k) for k in kernel[:fold]))]
        padded = mx.concatenate(pieces, axis=-1)
        order = (0, *range(fold + 1, len(kernel) + 1), *range(1, fold + 1), len(kernel) + 1)
        weight = weight.transpose(order)
    grid = padded.shape[1:-1]
    row_strides = [math.prod(grid[d + 1:]) for d in range(len(grid))]
    rows = n * math.prod(grid)
    flat = padded.reshape(-1, padded.shape[-1])
    taps = weight.reshape(o, math.prod(kernel[fold:]), -1).transpose(1, 2, 0)  # [taps, K, O]
    out = mx.zeros((o,), x.dtype) if bias is None else bias.astype(x.dtype)
    offsets = [0]
    for size, stride in zip(kernel[fold:], row_strides[fold:]):
        offsets = [off + k * stride for off in offsets for k in range(size)]
    for index, offset in enumerate(offsets):
        out = mx.addmm(out, flat[offset: offset + rows], taps[index])
    out = out.reshape(n, *grid, o)
    return out[(slice(None), *(slice(0, m) for m in out_size))]
