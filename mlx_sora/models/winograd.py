"""3x3 convolutions by Winograd's minimal filtering F(2x2, 3x3), for MLX on the CPU.

Why: the VAE decoders spend most of their time in 3x3 convolutions (stride 1, zero padding 1). Done
as matrix products (``conv.conv_by_taps``, or MLX's im2col), each output pixel costs 9 * C_in
multiply-adds per output channel. Winograd's algorithm computes a 2x2 output tile from a 4x4 input
tile with 16 products instead of 36: the input tiles and the filters are transformed, 16 matrix
products [tiles, C_in] x [C_in, C_out] replace the 9 taps (2.25x fewer multiply-adds), and the
results are transformed back. cuDNN, oneDNN and MLX's Metal backend use the same algorithm for these
convolutions.

It computes the same function with the sums grouped differently; the transforms only add, subtract
and halve (F(2x2, 3x3) is the variant with no amplification of rounding errors to speak of; the
larger F(4x4, 3x3) would save more and lose more precision). Against float64, its float32 error
is lower than the tap-by-tap product's (fewer rounded accumulations; tests/test_winograd.py), and the
VAE reaches the Open-Sora fixtures more closely with it.

With the standard matrices (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016)::

    B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]     input tile d:  B^T d B
    G   = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]        filter g:      G g G^T
    A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]                                   output:        A^T m A

A leading time axis with its own (causal) taps is supported: the temporal VAE's 3x3x3 convolutions
transform every frame once and sum the time taps in the matrix products.
"""

from __future__ import annotations

import math

import mlx.core as mx

from . import fast_ops

MIN_CHANNELS = 32  # below this on either side the transforms cost more than the products save

# B^T row a combines input rows first + sign * second
_IN_ROWS = ((0, 2, -1.0), (1, 2, 1.0), (2, 1, -1.0), (1, 3, -1.0))


@mx.compile
def _in_plus_plus(a: mx.array, b: mx.array, c: mx.array, d: mx.array) -> mx.array:
    return (a + b) + (c + d)


@mx.compile
def _in_plus_minus(a: mx.array, b: mx.array, c: mx.array, d: mx.array) -> mx.array:
    return (a + b) - (c + d)


@mx.compile
def _in_minus_plus(a: mx.array, b: mx.array, c: mx.array, d: mx.array) -> mx.array:
    return (a - b) + (c - d)


@mx.compile
def _in_minus_minus(a: mx.array, b: mx.array, c: mx.array, d: mx.array) -> mx.array:
    return (a - b) - (c - d)


_INPUT_KERNELS = {
    (1.0, 1.0): _in_plus_plus,
    (1.0, -1.0): _in_minus_plus,
    (-1.0, 1.0): _in_plus_minus,
    (-1.0, -1.0): _in_minus_minus,
}


def _input_tile(tiles: list[list[mx.array]], a: int, b: int) -> mx.array:
    """(B^T d B)[a, b] = d[r1][c1] + cs d[r1][c2] + rs (d[r2][c1] + cs d[r2][c2]), from the 16
    strided views d[r][c] of the padded input."""
    r1, r2, row_sign = _IN_ROWS[a]
    c1, c2, col_sign = _IN_ROWS[b]
    kernel = _INPUT_KERNELS[(row_sign, col_sign)]
    return kernel(tiles[r1][c1], tiles[r1][c2], tiles[r2][c1], tiles[r2][c2])


@mx.compile
def _out_first(m0: mx.array, m1: mx.array, m2: mx.array) -> mx.array:
    return (m0 + m1) + m2


@mx.compile
def _out_second(m1: mx.array, m2: mx.array, m3: mx.array) -> mx.array:
    return (m1 - m2) - m3


@mx.compile
def _out_first_bias(m0: mx.array, m1: mx.array, m2: mx.array, bias: mx.array) -> mx.array:
    return ((m0 + m1) + m2) + bias


@mx.compile
def _out_second_bias(m1: mx.array, m2: mx.array, m3: mx.array, bias: mx.array) -> mx.array:
    return ((m1 - m2) - m3) + bias


@mx.compile
def _half_sum(g0: mx.array, g1: mx.array, g2: mx.array) -> mx.array:
    return ((g0 + g1) + g2) * 0.5


@mx.compile
def _half_alternating(g0: mx.array, g1: mx.array, g2: mx.array) -> mx.array:
    return ((g0 - g1) + g2) * 0.5


def _filter_rows(g: list[mx.array]) -> list[mx.array]:
    """G applied to three kernel rows (or columns): [g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2]."""
    return [g[0], _half_sum(*g), _half_alternating(*g), g[2]]


def filter_transform(weight: mx.array) -> list[mx.array]:
    """G g G^T of every filter: weight [O, (kt,) 3, 3, C_in] -> 16 arrays [kt, O, C_in] (index 4a + b),
    each frame tap a contiguous [O, C_in] matrix (the products use its transpose)."""
    w = weight.astype(mx.float32)
    if w.ndim == 4:
        w = w[:, None]
    w = w.transpose(1, 2, 3, 0, 4)  # [kt, 3, 3, O, C] (a view)
    by_row = [_filter_rows([w[:, i, j] for i in range(3)]) for j in range(3)]  # [j][a]
    out = []
    for a in range(4):
        for u in _filter_rows([by_row[j][a] for j in range(3)]):
            out.append(mx.contiguous(u))
    return out


def conv3x3(
    x: mx.array,
    weight: mx.array,
    bias: mx.array | None,
    time_padding: tuple[int, int] = (0, 0),
) -> mx.array:
    """Stride-1 convolution of channels-last ``x`` ([N, H, W, C] or [N, T, H, W, C]) with ``weight``
    ([O, 3, 3, C] or [O, kt, 3, 3, C]), zero padding 1 in H and W and ``time_padding`` frames
    (before, after) in T. float32. The work is spread over ``fast_ops``' parallel CPU parts."""
    video = x.ndim == 5
    if not video:
        x = x[:, None]
    n, frames, h, w, c = x.shape
    u = filter_transform(weight)  # 16 x [kt, O, C]; ~8 ms for 512 x 512 channels, so not cached
    kt, o = u[0].shape[0], u[0].shape[1]
    th, tw = -(-h // 2), -(-w // 2)
    padded = mx.pad(x, [(0, 0), time_padding, (1, 1 + 2 * th - h), (1, 1 + 2 * tw - w), (0, 0)])
    out_frames = padded.shape[1] - kt + 1
    tiles = [[padded[:, :, r : r + 2 * th : 2, col : col + 2 * tw : 2] for col in range(4)] for r in range(4)]
    per_frame = th * tw
    streams = fast_ops.on_streams(fast_ops.row_parts())
    firsts, seconds = [], []  # (A^T m)[0 / 1, b] for each column b
    for b in range(4):
        with streams[b % len(streams)]:
            products = []
            for a in range(4):
                v = _input_tile(tiles, a, b).reshape(n, -1, c)  # [N, frames_padded * th * tw, C]
                m = None
                for k in range(kt):  # the time taps: a frame offset in v's rows
                    rows = v[:, k * per_frame : (k + out_frames) * per_frame]
                    tap = u[4 * a + b][k].T
                    m = rows @ tap if m is None else mx.addmm(m, rows, tap)
                products.append(m)
            firsts.append(_out_first(*products[:3]))
            seconds.append(_out_second(*products[1:]))
    half = [firsts, seconds]
    outputs = []
    bias_f32 = mx.zeros((o,), mx.float32) if bias is None else bias.astype(mx.float32)
    for p in range(2):  # output row parity
        s = half[p]
        y0 = _out_first_bias(s[0], s[1], s[2], bias_f32)  # column parity 0
        y1 = _out_second_bias(s[1], s[2], s[3], bias_f32)  # column parity 1
        row = mx.stack([y0, y1], axis=-2)  # [N, out_frames * th * tw, 2, O]
        outputs.append(row.reshape(n, out_frames, th, 2 * tw, o))
    out = mx.stack(outputs, axis=3).reshape(n, out_frames, 2 * th, 2 * tw, o)
    if 2 * th != h or 2 * tw != w:
        out = out[:, :, :h, :w]
    return out if video else out[:, 0]


def applies(x: mx.array, weight: mx.array, spatial_padding: tuple[int, int]) -> bool:
    """Whether ``conv3x3`` is the faster way for this stride-1 convolution on the CPU: float32, a 3x3
    spatial kernel (``weight`` [O, (kt,) kh, kw, C_in]) with padding 1, and enough channels on both
    sides that the 16 products dominate the transforms."""
    return (
        fast_ops.fast_cpu()
        and x.dtype == mx.float32
        and tuple(weight.shape[-3:-1]) == (3, 3)
        and tuple(spatial_padding) == (1, 1)
        and min(weight.shape[0], weight.shape[-1]) >= MIN_CHANNELS
        and math.prod(x.shape[-3:-1]) >= 4
    )
