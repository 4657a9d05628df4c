"""Replay: run an ML Program op by op, on any machine, with coremltools' own op semantics.

Core ML itself (compiling a package and ``predict``) exists only on macOS. To check an export
anywhere, the replay reads the saved package back into a coremltools program (``milproto`` loader,
weights from the package's weight file) and evaluates its operations in order with numpy: each op
through the ``value_inference`` that coremltools defines for it (the same code coremltools uses to
fold constants), compressed weights through their ``materialized_val_inference`` (int8 scales, k-means
palettes). Ops without a value inference in coremltools get a kernel of ours (``KERNELS``: convolution,
nearest upsampling, SiLU, instance and batch norm), tested against MLX; palettized weights are
expanded by a kernel of ours too (coremltools' own expansion needs the palette once per element),
tested against coremltools'.

One deliberate choice: float16 matrix products (``matmul``, ``linear``, ``conv``) are
computed in float32 and rounded once to float16, what a float16 product with a wide accumulator gives
(numpy has no fast float16 product; a device's own accumulation order may differ). Everything else
runs in the dtype the program says, as coremltools computes it.

The replay is slow (numpy, one op at a time); it exists to check an export, and the test suite uses
it. numpy's own BLAS runs single-threaded inside it: the products are small, and on a 2-core machine
its threads made a [160, 128] x [128, 512] product take 30 ms instead of 0.5 ms. It also runs programs that were only built, not saved (``replay_function``): the exporter
calibrates float16 with it.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import UserError
from .toolkit import coremltools

# ---------------------------------------------------------------------------- kernels of ours


def _pads(op: Any, spatial: tuple[int, ...], kernel: tuple[int, ...], strides: tuple[int, ...],
          dilations: tuple[int, ...]) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial axis from a conv's ``pad_type`` / ``pad``."""
    pad_type = op.pad_type.val if op.pad_type is not None else "valid"
    if pad_type == "valid":
        return [(0, 0)] * len(spatial)
    if pad_type == "custom":
        pad = [int(p) for p in op.pad.val]
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(len(spatial))]
    if pad_type in ("same", "same_lower"):
        out = []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            out.append((small, large) if pad_type == "same" else (large, small))
        return out
    raise NotImplementedError(f"replay: conv pad_type {pad_type!r}")


def _conv(op: Any) -> np.ndarray:
    """N-d convolution (channels first), one matrix product per kernel tap, float32 accumulation."""
    x, weight = op.x.val, op.weight.val
    out_dtype = x.dtype
    x32, w32 = x.astype(np.float32), weight.astype(np.float32)
    rank = x.ndim - 2
    strides = tuple(int(s) for s in op.strides.val) if op.strides is not None else (1,) * rank
    dilations = tuple(int(d) for d in op.dilations.val) if op.dilations is not None else (1,) * rank
    groups = int(op.groups.val) if op.groups is not None else 1
    kernel = weight.shape[2:]
    pads = _pads(op, x.shape[2:], kernel, strides, dilations)
    x32 = np.pad(x32, [(0, 0), (0, 0), *pads])
    out_size = [(p - (k - 1) * d - 1) // s + 1 for p, k, d, s in zip(x32.shape[2:], kernel, dilations, strides)]
    n, c_in = x.shape[:2]
    c_out = weight.shape[0]
    per_group_in, per_group_out = c_in // groups, c_out // groups
    out = np.zeros((n, c_out, *out_size), np.float32)
    for g in range(groups):
        xs = x32[:, g * per_group_in:(g + 1) * per_group_in]
        ws = w32[g * per_group_out:(g + 1) * per_group_out]
        acc = out[:, g * per_group_out:(g + 1) * per_group_out]
        for tap in np.ndindex(*kernel):
            window = tuple(slice(t * d, t * d + (m - 1) * s + 1, s)
                           for t, d, m, s in zip(tap, dilations, out_size, strides))
            piece = xs[(slice(None), slice(None), *window)]  # [N, C, *out]
            acc += np.moveaxis(np.tensordot(ws[(slice(None), slice(None), *tap)], piece, axes=([1], [1])), 0, 1)
    if op.bias is not None:
        out += op.bias.val.astype(np.float32).reshape(1, -1, *([1] * rank))
    return out.astype(out_dtype)


def _upsample_nearest(op: Any) -> np.ndarray:
    x = op.x.val
    sh, sw = float(op.scale_factor_height.val), float(op.scale_factor_width.val)
    if sh != int(sh) or sw != int(sw):
        raise NotImplementedError("replay: upsample_nearest_neighbor with a fractional scale")
    return np.repeat(np.repeat(x, int(sh), axis=-2), int(sw), axis=-1)


def _silu(op: Any) -> np.ndarray:
    x = op.x.val
    x32 = x.astype(np.float32)
    return (x32 / (1 + np.exp(-x32))).astype(x.dtype)


def _instance_norm(op: Any) -> np.ndarray:
    x = op.x.val
    x32 = x.astype(np.float32)
    axes = tuple(range(2, x.ndim))
    mean = x32.mean(axis=axes, keepdims=True)
    var = np.square(x32 - mean).mean(axis=axes, keepdims=True)
    out = (x32 - mean) / np.sqrt(var + float(op.epsilon.val))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if op.gamma is not None:
        out = out * op.gamma.val.astype(np.float32).reshape(shape)
    if op.beta is not None:
        out = out + op.beta.val.astype(np.float32).reshape(shape)
    return out.astype(x.dtype)


def _batch_norm(op: Any) -> np.ndarray:
    x = op.x.val
    shape = (1, -1) + (1,) * (x.ndim - 2)

    def channel(v: Any, default: float) -> np.ndarray:
        return np.full(shape, default, np.float32) if v is None else v.val.astype(np.float32).reshape(shape)

    out = (x.astype(np.float32) - channel(op.mean, 0.0)) / np.sqrt(channel(op.variance, 1.0) + float(op.epsilon.val))
    return (out * channel(op.gamma, 1.0) + channel(op.beta, 0.0)).astype(x.dtype)


def _lut_to_dense(op: Any) -> np.ndarray:
    """A palettized weight: every index replaced by its group's palette entry. coremltools' own
    decompression repeats the palette to every element first (a 4096 x 10240 T5 weight with a 256-entry
    palette: 21 GB); this looks each element up in its group's palette. Scalar palettes (the exporter's);
    vector palettes go to coremltools."""
    lut = op.lut.val  # [*groups per axis, entries, vector size]
    if lut.shape[-1] != 1:
        return op.materialized_val_inference()
    indices = np.asarray(op.indices.val).astype(np.intp)
    shape, rank = indices.shape, indices.ndim
    groups = lut.shape[:rank]
    palettes = lut.reshape(-1, lut.shape[-2])  # [every group, entries], the groups in C order
    group = np.zeros((1,) * rank, np.intp)
    for axis, count in enumerate(groups):
        if count > 1:
            coordinate = np.arange(shape[axis]) // (shape[axis] // count)
            group = group * count + coordinate.reshape([-1 if a == axis else 1 for a in range(rank)])
    return palettes[group, indices]


KERNELS: dict[str, Callable[[Any], Any]] = {
    "constexpr_lut_to_dense": _lut_to_dense,
    "conv": _conv,
    "upsample_nearest_neighbor": _upsample_nearest,
    "silu": _silu,
    "instance_norm": _instance_norm,
    "batch_norm": _batch_norm,
}
"""Ops coremltools has no value inference for, evaluated by our own kernels."""



def _matmul_wide(op: Any) -> np.ndarray:
    x, y = op.x.val.astype(np.float32), op.y.val.astype(np.float32)
    if op.transpose_x.val:
        x = np.swapaxes(x, -1, -2)
    if op.transpose_y.val:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y).astype(np.float16)


def _linear_wide(op: Any) -> np.ndarray:
    out = np.matmul(op.x.val.astype(np.float32), op.weight.val.astype(np.float32).T)
    if op.bias is not None:
        out += op.bias.val.astype(np.float32)
    return out.astype(np.float16)


WIDE_PRODUCTS: dict[str, Callable[[Any], Any]] = {"matmul": _matmul_wide, "linear": _linear_wide}
"""float16 matrix products, accumulated in float32 (the same function as coremltools' value inference)."""


# ---------------------------------------------------------------------------- the interpreter


def _nptype(var: Any) -> Any:
    from coremltools.converters.mil.mil import types

    return types.nptype_from_builtin(var.dtype)


def _flat_inputs(op: Any) -> list[Any]:
    out = []
    for value in op.inputs.values():
        out.extend(value if isinstance(value, (list, tuple)) else [value])
    return out


def _builtin(var: Any, value: np.ndarray) -> Any:
    holder = var.sym_type()
    holder.val = value
    return holder


@dataclass
class OpRecord:
    """What ``observe`` gets for every op evaluated: the op and its output values."""

    op: Any
    outputs: tuple[np.ndarray, ...]


@dataclass
class _Step:
    """One op of a compiled function, with everything about it that does not change between runs."""

    op: Any
    evaluate: Callable[[Any], tuple]
    holders: list[tuple[Any, Any]]
    """(var, value holder) for the inputs computed at run time."""
    flags: list[tuple[Any, Any, Any]]
    """(var, its value, a Python-bool holder): a loaded program holds boolean attributes as numpy
    bools, which numpy >= 2.4 refuses as arguments (keepdims=...), so value inference gets bools."""
    outputs: list[tuple[Any, Any, tuple[int, ...]]]
    """(var, numpy dtype, shape) per output."""
    frees: list[int]
    """Vars whose last use is this op (their values are dropped after it)."""


def _evaluator(op: Any) -> Callable[[Any], tuple]:
    if op.op_type in KERNELS:
        kernel = KERNELS[op.op_type]
        return lambda o: (kernel(o),)
    if op.op_type in WIDE_PRODUCTS and any(_is_fp16(v) for v in _flat_inputs(op)):
        kernel = WIDE_PRODUCTS[op.op_type]
        return lambda o: (kernel(o),)
    if op.op_type.startswith("constexpr_"):
        return lambda o: _as_tuple(o.materialized_val_inference())
    return lambda o: _as_tuple(o.value_inference())


def _is_fp16(var: Any) -> bool:
    try:
        return _nptype(var) == np.float16
    except Exception:  # a non-tensor input (a string attribute, a list)
        return False


def _as_tuple(result: Any) -> tuple:
    return result if isinstance(result, tuple) else (result,)


class CompiledFunction:
    """A function's ops in order, prepared once, to be evaluated on many inputs."""

    def __init__(self, function: Any):
        self.function = function
        self.inputs = [(name, var, _nptype(var), tuple(var.shape)) for name, var in function.inputs.items()]
        operations = [op for op in function.operations if op.op_type != "const"]
        for op in operations:
            if op.blocks:
                raise NotImplementedError(f"replay: op {op.op_type} with nested blocks is not supported")
        last_use: dict[int, int] = {}
        for index, op in enumerate(operations):
            for var in _flat_inputs(op):
                last_use[id(var)] = index
        keep = {id(v) for v in function.outputs}
        self.steps: list[_Step] = []
        for index, op in enumerate(operations):
            seen: set[int] = set()
            holders, flags = [], []
            for var in _flat_inputs(op):
                if id(var) in seen:
                    continue
                seen.add(id(var))
                if var.val is None:
                    holders.append((var, var.sym_type()))
                elif isinstance(var.val, np.bool_):
                    flags.append((var, var._sym_val, _builtin(var, bool(var.val))))
            outputs = [(var, _nptype(var), tuple(var.shape)) for var in op.outputs]
            frees = [id(v) for v, _ in holders if last_use.get(id(v)) == index and id(v) not in keep]
            self.steps.append(_Step(op, _evaluator(op), holders, flags, outputs, frees))

    def __call__(self, inputs: dict[str, np.ndarray],
                 observe: Callable[[OpRecord], None] | None = None) -> dict[str, np.ndarray]:
        with _single_threaded_numpy_blas():
            return self._run(inputs, observe)

    def _run(self, inputs: dict[str, np.ndarray],
             observe: Callable[[OpRecord], None] | None) -> dict[str, np.ndarray]:
        values: dict[int, np.ndarray] = {}
        for name, var, dtype, shape in self.inputs:
            if name not in inputs:
                raise UserError(f"replay: input {name!r} is missing; the function takes {[i[0] for i in self.inputs]}")
            value = np.asarray(inputs[name])
            if tuple(value.shape) != shape:
                raise UserError(f"replay: input {name!r} has shape {tuple(value.shape)}; the function takes {shape}")
            values[id(var)] = value.astype(dtype, copy=False)
        for step in self.steps:
            for var, holder in step.holders:
                holder.val = values[id(var)]
                var._sym_val = holder
            for var, _, flag in step.flags:
                var._sym_val = flag
            try:
                results = step.evaluate(step.op)
            finally:
                for var, _ in step.holders:
                    var._sym_val = None
                for var, value, _ in step.flags:
                    var._sym_val = value
            outs = []
            for (var, dtype, shape), result in zip(step.outputs, results):
                value = np.asarray(result).astype(dtype, copy=False)
                if value.shape != shape:
                    value = value.reshape(shape)
                values[id(var)] = value
                outs.append(value)
            if observe is not None:
                observe(OpRecord(step.op, tuple(outs)))
            for key in step.frees:
                values.pop(key, None)
        return {var.name: var.val if var.val is not None else values[id(var)] for var in self.function.outputs}


@functools.cache
def _numpy_blas() -> Any:
    """threadpoolctl's handle on numpy's bundled OpenBLAS (None without threadpoolctl or that library;
    MLX's BLAS is left alone)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    selected = ThreadpoolController().select(prefix="libscipy_openblas")
    return selected if selected.lib_controllers else None


def _single_threaded_numpy_blas() -> Any:
    blas = _numpy_blas()
    return contextlib.nullcontext() if blas is None else blas.limit(limits=1)


def replay_function(function: Any, inputs: dict[str, np.ndarray],
                    observe: Callable[[OpRecord], None] | None = None) -> dict[str, np.ndarray]:
    """Evaluate a coremltools function (of a built or a loaded program) on numpy inputs; returns its
    outputs by name. ``observe`` sees every op's outputs as they are computed (calibration)."""
    return CompiledFunction(function)(inputs, observe)


# ---------------------------------------------------------------------------- saved packages


def weights_dir(package: Path) -> Path:
    return Path(package) / "Data" / "com.apple.CoreML" / "weights"


def load_program(package: str | Path) -> Any:
    """The coremltools program a saved ``.mlpackage`` holds (every function, weights read)."""
    ct = coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load

    package = Path(package)
    if not (package / "Manifest.json").is_file():
        raise UserError(f"{package} is not an .mlpackage (no Manifest.json); export it again")
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    return load(spec, spec.specificationVersion, str(weights_dir(package)))


class PackageReplay:
    """A saved package, ready to replay any of its functions."""

    def __init__(self, package: str | Path):
        self.package = Path(package)
        self.program = load_program(self.package)
        self._compiled: dict[str, CompiledFunction] = {}

    @property
    def functions(self) -> list[str]:
        return list(self.program.functions)

    def __call__(self, inputs: dict[str, np.ndarray], function: str | None = None,
                 observe: Callable[[OpRecord], None] | None = None) -> dict[str, np.ndarray]:
        name = function or self.program.default_function_name
        if name not in self.program.functions:
            raise UserError(f"{self.package} has no function {name!r}; it has {self.functions}")
        if name not in self._compiled:
            self._compiled[name] = CompiledFunction(self.program.functions[name])
        return self._compiled[name](inputs, observe)
