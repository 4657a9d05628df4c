"""Fast CPU kernels for MLX: exact reformulations of the functions and layers they replace.

Why: on Linux/x86 MLX evaluates transcendental ops (exp, tanh, sigmoid) with one scalar libm call
per element on one thread (a tanh-GELU on [1440, 4608] took 0.23 s, torch 0.011 s), while additions
and multiplications run vectorized, and ``mx.compile`` fuses chains of them into one vectorized
loop (at most 11 levels deep, one output, no ``maximum``/``minimum``: those branch on NaN). So exp
and tanh are written here with multiplications, additions, one division, selects and integer bit
operations only, in compiled kernels of that shape:

* ``exp``: range reduction ``x = n ln2 + r`` (rounding by the 1.5 * 2^23 trick, no ``floor`` call)
  and the Cephes ``expf`` polynomial; max relative error 1.2e-7 (MLX's CPU exp: ~2.4e-7).
* ``gelu_tanh``: tanh by the rational minimax approximation that Eigen and XLA use for float32 (odd
  degree 13 / even degree 6), clamped at |x| = 7.9053 where it reaches 1; within ~6 ulp of 1.
* ``silu``: x / (1 + exp(-x)) with the fast exp; max relative error 1.4e-7.
* ``softmax`` / ``attention``: ``exp(s - max)`` with the fast exp; ``attention`` divides by the row
  sums after the product with V (an [N, d] instead of an [N, N] division; the same function).
* convolutions as matrix products: ``conv.py`` and ``winograd.py``.
* ``cpu_parallel``: MLX runs each CPU stream on one thread, and its elementwise kernels on one
  core. The VAE decoders split their work into one part per core (the images of a batch, or the
  work of each convolution: output rows, Winograd's products), each part on its own stream with a
  single-threaded BLAS, so all of the work, not only the matrix products, runs on every core
  (spatial decoder -22 % time per frame at 192x192 on 2 cores). ``CpuParallel.run`` evaluates the
  parts of a layer with ``steps`` in lockstep (see there why).

Off the CPU these functions use MLX's own kernels (``nn.gelu_approx``, ``nn.silu``,
``mx.fast.scaled_dot_product_attention``, ``nn.Conv*``), which are fused and fast on Metal/CUDA:
nothing changes there. ``fast_cpu()`` is the switch; ``MLX_SORA_FAST_OPS=0`` turns these kernels
off on the CPU too.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import math
import os
from typing import Callable, Iterator, TypeVar

import mlx.core as mx
import mlx.nn as nn

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375  # ln 2 = _LN2_HI - _LN2_LO, split so that n * _LN2_HI is exact (Cephes)
_LN2_LO = 2.12194440e-4
_ROUND = 12582912.0  # 1.5 * 2**23: (t + _ROUND) - _ROUND rounds t to the nearest integer (|t| < 2**22)
_EXP_POLY = (
    1.9875691500e-4,
    1.3981999507e-3,
    8.3334519073e-3,
    4.1665795894e-2,
    1.6666665459e-1,
    5.0000001201e-1,
)

# Eigen's ptanh_float (also XLA's): tanh(x) = x * P(x^2) / Q(x^2) on [-7.9053, 7.9053]
_TANH_CLAMP = 7.90531110763549805
_TANH_P = (
    4.89352455891786e-03,
    6.37261928875436e-04,
    1.48572235717979e-05,
    5.12229709037114e-08,
    -8.60467152213735e-11,
    2.00018790482477e-13,
    -2.76076847742355e-16,
)
_TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)
_GELU_K = math.sqrt(2.0 / math.pi)


def fast_cpu() -> bool:
    """Whether the CPU kernels of this module are used (the default device is the CPU)."""
    return mx.default_device() == mx.cpu and os.environ.get("MLX_SORA_FAST_OPS", "1") != "0"


def _clamp(x: mx.array, low: float, high: float) -> mx.array:
    """``mx.clip`` as two selects: MLX's maximum/minimum branch on NaN, which keeps the compiler from
    vectorizing a fused kernel (NaN stays NaN here too)."""
    x = mx.where(x < low, low, x)
    return mx.where(x > high, high, x)


def _poly(
    x: mx.array, c: tuple[float, ...], x2: mx.array | None = None, x4: mx.array | None = None
) -> mx.array:
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
    x = _clamp(x, -88.0, 88.0)  # below -87.68: n = -127, 2^n's bits are 0, exp = 0
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
    return (_clamp(x, -88.0, 88.0) - n * _LN2_HI) + n * _LN2_LO


@mx.compile
def _exp_finish(r: mx.array, two_n: mx.array) -> mx.array:
    r2 = r * r
    return (_poly(r, _EXP_POLY[::-1], r2) * r2 + r + 1.0) * two_n


# The bit pattern of 2^n goes through ``mx.view``, which has no VJP in MLX: the kernels get theirs.
@mx.custom_function
def _fast_exp(x: mx.array) -> mx.array:
    return _exp_finish(_exp_remainder(x), mx.view(_exp_scale_bits(x), mx.float32))


@_fast_exp.vjp
def _fast_exp_vjp(x: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
    return cotangent * output


def exp(x: mx.array) -> mx.array:
    """float32 exp (fast CPU kernel; ``mx.exp`` for other dtypes or off the CPU). Differentiable."""
    if x.dtype != mx.float32 or not fast_cpu():
        return mx.exp(x)
    return _fast_exp(x)


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
    e = exp(scores - mx.stop_gradient(scores.max(axis=-1, keepdims=True)))
    out = e.astype(dtype) @ v
    return (out / e.sum(axis=-1, keepdims=True).astype(dtype)).astype(dtype)


# ------------------------------------------------------------------------------ GELU


@mx.compile
def _gelu_argument(x: mx.array) -> mx.array:
    u = _GELU_K * (x + 0.044715 * (x * x * x))
    return _clamp(u, -_TANH_CLAMP, _TANH_CLAMP)


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


# ------------------------------------------------------------------------------ SiLU


# exp(-x) inside each kernel (no separate pass for the negation)
_neg_exp_scale_bits = mx.compile(lambda x: _exp_scale_bits(-x))
_neg_exp_remainder = mx.compile(lambda x: _exp_remainder(-x))


@mx.compile
def _silu_finish(x: mx.array, r: mx.array, two_n: mx.array) -> mx.array:
    """x / (1 + exp(-x)) from exp(-x)'s remainder r and scale 2^n (``_exp_finish`` inlined)."""
    r2 = r * r
    return x / ((_poly(r, _EXP_POLY[::-1], r2) * r2 + r + 1.0) * two_n + 1.0)


@mx.custom_function
def _fast_silu(x: mx.array) -> mx.array:
    return _silu_finish(x, _neg_exp_remainder(x), mx.view(_neg_exp_scale_bits(x), mx.float32))


@_fast_silu.vjp
def _fast_silu_vjp(x: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
    sigmoid = 1.0 / (1.0 + _fast_exp(-x))
    return cotangent * (sigmoid + output * (1.0 - sigmoid))  # d/dx x s(x) = s + x s (1 - s)


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x) = x / (1 + exp(-x)) with the fast exp (float32 on the CPU; ``nn.silu`` otherwise).
    Differentiable."""
    if x.dtype != mx.float32 or not fast_cpu():
        return nn.silu(x)
    return _fast_silu(x)


# ------------------------------------------------------------------------------ parallel CPU work

# How many parts the convolutions of ``conv.py`` / ``winograd.py`` split their work
# into (set by ``cpu_parallel``; 1 = all on the current stream).
_ROW_PARTS: contextvars.ContextVar[int] = contextvars.ContextVar("mlx_sora_row_parts", default=1)
_EXTRA_STREAMS: list = []  # mx.ThreadLocalStream: a stream (and its thread) per Python thread
_Part = TypeVar("_Part")
_Result = TypeVar("_Result")


def row_parts() -> int:
    """How many streams the convolution being built may spread its work over (see ``cpu_parallel``)."""
    return _ROW_PARTS.get()


def cpu_parts() -> int:
    """How many parallel parts CPU work is split into: one per core this process may use (at most
    8); ``MLX_SORA_CPU_PARTS`` overrides it (1 turns the splitting off)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    return max(1, min(8, int(os.environ.get("MLX_SORA_CPU_PARTS", cores))))


def cpu_streams(count: int) -> list:
    """``count`` CPU streams: the default one, then streams of this module (each runs on its own
    thread; thread-local, as MLX streams may only be used on the thread that made them)."""
    while len(_EXTRA_STREAMS) < count - 1:
        _EXTRA_STREAMS.append(mx.new_thread_local_stream(mx.cpu))
    return [mx.default_stream(mx.cpu), *_EXTRA_STREAMS[: count - 1]]


def _blas_thread_functions() -> tuple[Callable, Callable] | None:
    """(get, set) of the number of threads of the BLAS that MLX calls (a preloaded OpenBLAS or MKL:
    their symbols are global), or None (a single-threaded or unknown BLAS)."""
    try:
        process = ctypes.CDLL(None)
    except OSError:
        return None
    for getter, setter in (("openblas_get_num_threads", "openblas_set_num_threads"),
                           ("MKL_Get_Max_Threads", "MKL_Set_Num_Threads")):
        try:
            get, set_ = getattr(process, getter), getattr(process, setter)
        except AttributeError:
            continue
        get.restype, set_.restype, set_.argtypes = ctypes.c_int, None, [ctypes.c_int]
        return get, set_
    return None


class CpuParallel:
    """The work of one decoder stage split into ``parts`` (see ``cpu_parallel``)."""

    def __init__(self, parts: int):
        self.parts = parts
        self.streams = cpu_streams(parts) if parts > 1 else []

    def split(self, x: mx.array) -> list[mx.array]:
        """x split along the batch into one part per stream when the batch divides evenly (views);
        otherwise [x] (its convolutions then split their output rows instead)."""
        n = x.shape[0]
        if self.parts == 1 or n % self.parts:
            return [x]
        step = n // self.parts
        return [x[i : i + step] for i in range(0, n, step)]

    def map(self, fn: Callable[[_Part], _Result], parts: list[_Part]) -> list[_Result]:
        """fn on every part, each on its own stream (lazily: evaluate the results together)."""
        if len(parts) == 1:
            return [fn(parts[0])]
        token = _ROW_PARTS.set(1)  # the batch is split: no further splitting inside
        try:
            out = []
            for part, stream in zip(parts, self.streams):
                with mx.stream(stream):
                    out.append(fn(part))
            return out
        finally:
            _ROW_PARTS.reset(token)

    def run(self, layer: Callable[[mx.array], mx.array], parts: list[mx.array]) -> list[mx.array]:
        """``layer`` on every part, evaluated. With several streams, a layer with ``steps(x)`` (a
        generator of its intermediate results, the last one its output) is evaluated step by step,
        all parts' step k together: MLX enqueues one evaluation's graph depth first and caps the tasks
        in flight, so a whole layer per part would run the parts mostly one after the other (a VAE
        resnet at 4 x 192 x 192: 1.03-1.18 s as one graph, 0.67 s step by step). With one stream (a
        GPU, the fast path off, one core) there is nothing to interleave: the whole layer is one
        evaluation (on Metal one command buffer instead of a sync per step; the same operations, so
        the same numbers)."""
        steps = getattr(layer, "steps", None) if self.parts > 1 else None
        if steps is None:
            out = self.map(layer, parts)
            mx.eval(out)
            return out
        generators = [steps(part) for part in parts]  # (nothing runs until the first ``next``)
        current = parts
        while True:
            try:
                current = self.map(next, generators)  # each part's next step on its own stream
            except StopIteration:
                return current
            mx.eval(current)

    @staticmethod
    def join(parts: list[mx.array]) -> mx.array:
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)


@contextlib.contextmanager
def cpu_parallel() -> Iterator[CpuParallel]:
    """Run a block of evaluated work in ``cpu_parts()`` parallel parts on the CPU.

    Inside: the BLAS runs single-threaded (each stream is one thread; a multi-threaded BLAS called
    from several streams would oversubscribe the cores, and its barriers stall when a core is busy
    elsewhere), and convolutions split their output rows over the streams unless the caller splits
    the batch (``CpuParallel.split``/``map``). Everything is restored on exit, after every stream has
    finished, so evaluate the results inside the block. The buffer cache is left as the caller set it
    (the memory budget's). Off the fast CPU path this does nothing (one part).
    """
    if not fast_cpu():
        yield CpuParallel(1)
        return
    parts = cpu_parts()
    work = CpuParallel(parts)
    blas = _blas_thread_functions() if parts > 1 else None
    blas_threads = blas[0]() if blas else None
    if blas:
        blas[1](1)
    token = _ROW_PARTS.set(parts)
    try:
        yield work
    finally:
        _ROW_PARTS.reset(token)
        for stream in work.streams:  # no BLAS call may be in flight when its thread count changes
            mx.synchronize(stream)
        if blas:
            blas[1](blas_threads)


def on_streams(count: int) -> list:
    """Contexts that put ops on ``count`` different CPU streams (one: the current stream)."""
    if count <= 1:
        return [contextlib.nullcontext()]
    return [mx.stream(s) for s in cpu_streams(count)]


def run_layers(layers: list[Callable[[mx.array], mx.array]], x: mx.array, evaluate: bool = True) -> mx.array:
    """The layers one after the other (a decoder stage). With ``evaluate``, each layer's output is
    evaluated before the next layer runs, and on the CPU the work runs in ``cpu_parallel``: the
    batch split over the cores when it divides evenly, else each convolution's output rows."""
    if not evaluate:
        for layer in layers:
            x = layer(x)
        return x
    with cpu_parallel() as work:
        parts = work.split(x)
        for layer in layers:
            parts = work.run(layer, parts)
        x = work.join(parts)
        mx.eval(x)
    return x
