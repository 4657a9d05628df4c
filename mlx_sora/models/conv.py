"""Convolutions as matrix products for MLX on the CPU (float32, stride 1).

* ``conv_by_taps``: one matrix product per kernel tap on the flattened padded input, instead of MLX's
  single-threaded im2col copy; any kernel size, 2D or 3D, optionally folding leading kernel axes
  into the channels.
* ``upsample2x_conv3x3``: nearest 2x upsampling followed by a 3x3 convolution, computed on the small
  grid as four 2x2 convolutions (0.44x the arithmetic, no upsampled copy).

3x3 convolutions with enough channels use Winograd's algorithm instead (``winograd.py``). The work
is split over ``fast_ops``' parallel CPU streams when a ``cpu_parallel`` block asks for it.
"""

from __future__ import annotations

import itertools
import math

import mlx.core as mx

from . import fast_ops


def conv_by_taps(
    x: mx.array, weight: mx.array, bias: mx.array | None, padding: list[tuple[int, int]], fold: int = 0
) -> mx.array:
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
    if all(k == 1 for k in kernel) and not any(any(p) for p in padding):  # 1x1: one product
        w = weight.reshape(o, ci).T
        flat = x.reshape(-1, ci)
        return (flat @ w if bias is None else mx.addmm(bias.astype(x.dtype), flat, w)).reshape(
            *x.shape[:-1], o
        )
    padded = mx.pad(x, [(0, 1), *padding, (0, 0)])
    out_size = [p - k + 1 for p, k in zip(padded.shape[1:-1], kernel)]
    if fold:
        pieces = [
            padded[(slice(None), *(slice(s, s + m) for s, m in zip(shift, out_size)))]
            for shift in itertools.product(*(range(k) for k in kernel[:fold]))
        ]
        padded = mx.concatenate(pieces, axis=-1)
        order = (0, *range(fold + 1, len(kernel) + 1), *range(1, fold + 1), len(kernel) + 1)
        weight = weight.transpose(order)
    grid = padded.shape[1:-1]
    row_strides = [math.prod(grid[d + 1 :]) for d in range(len(grid))]
    rows = n * math.prod(grid)
    flat = padded.reshape(-1, padded.shape[-1])
    taps = weight.reshape(o, math.prod(kernel[fold:]), -1).transpose(1, 2, 0)  # [taps, K, O]
    b = mx.zeros((o,), x.dtype) if bias is None else bias.astype(x.dtype)
    offsets = [0]
    for size, stride in zip(kernel[fold:], row_strides[fold:]):
        offsets = [off + k * stride for off in offsets for k in range(size)]
    ranges = _row_ranges(rows, fast_ops.row_parts())  # parts of the output rows, one per stream
    outs = []
    for (start, end), stream in zip(ranges, fast_ops.on_streams(len(ranges))):
        with stream:
            out = b
            for index, offset in enumerate(offsets):
                out = mx.addmm(out, flat[offset + start : offset + end], taps[index])
        outs.append(out)
    out = (outs[0] if len(outs) == 1 else mx.concatenate(outs)).reshape(n, *grid, o)
    return out[(slice(None), *(slice(0, m) for m in out_size))]


def upsample2x_conv3x3(x: mx.array, weight: mx.array, bias: mx.array | None) -> mx.array:
    """``conv3x3(nearest_upsample_2x(x))`` with padding 1, computed on the low-resolution input.

    Output pixel (2i + py, 2j + px) sees input rows {i-1, i} (py = 0, weights {W0, W1 + W2}) or
    {i, i+1} (py = 1, weights {W0 + W1, W2}), and likewise columns: each of the 4 output phases is a
    2x2 convolution of x with summed weights, 16 products on the small grid instead of 9 on the 4x
    larger one (0.44x the arithmetic), and no upsampled copy. Same function, sums grouped differently.
    """
    n, h, w, ci = x.shape
    o = weight.shape[0]
    merge = ([[0], [1, 2]], [[0, 1], [2]])  # kernel rows (or columns) that land on each source offset
    padded = mx.pad(x, [(0, 1), (1, 1), (1, 1), (0, 0)])  # + a zero sample: every tap slice in range
    grid_w = w + 2
    rows = n * (h + 2) * grid_w
    flat = padded.reshape(-1, ci)
    b = mx.zeros((o,), x.dtype) if bias is None else bias.astype(x.dtype)
    phases = []
    streams = fast_ops.on_streams(min(4, fast_ops.row_parts()))  # the phases are independent: spread over streams
    for phase, (py, px) in enumerate(itertools.product((0, 1), (0, 1))):
        with streams[phase % len(streams)]:
            out = b
            for a, kernel_rows in enumerate(merge[py]):
                for c, kernel_cols in enumerate(merge[px]):
                    tap = sum(weight[:, r, col] for r in kernel_rows for col in kernel_cols)  # [O, C_in]
                    offset = (py + a) * grid_w + (px + c)
                    out = mx.addmm(out, flat[offset : offset + rows], tap.T)
        phases.append(out.reshape(n, h + 2, grid_w, o)[:, :h, :w])
    out = mx.stack(phases, axis=3).reshape(n, h, w, 2, 2, o)  # [n, i, j, py, px, o]
    return out.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, o)


def _row_ranges(rows: int, parts: int) -> list[tuple[int, int]]:
    bounds = [rows * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
