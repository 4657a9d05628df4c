"""One unit -> one ``.mlpackage``: build its functions, calibrate float16, compress, save.

* **Build**: every ``UnitFunction`` of the unit becomes a function of one coremltools program, in
  float32. The package is a multifunction ML Program (iOS 18 / macOS 15): one function per exported
  shape (and per variant, e.g. TDTM), their weights stored once (identical constants of all functions
  share one blob: ``share_weights_across_functions``).
* **Precision**: float16 where it is safe. The float32 program is replayed on calibration inputs
  (``replay.replay_function``) and every op whose largest absolute output or input, or for a sum
  (``reduce_mean``, ``reduce_sum``, ``layer_norm``'s squared deviations) the sum it accumulates,
  exceeds ``FP16_SAFE`` (float16's maximum / 8: the rest is margin for inputs other than the
  calibration's) stays float32, as do the ops a model names (``Net.fp32``); coremltools' float16 pass
  then casts the rest (``FP16ComputePrecision`` with that op selector).
* **Compression** (``COMPRESSIONS``): the weights of linear layers and convolutions only, never a
  lookup table (T5's token embedding feeds a ``gather``) and never small constants.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import UserError
from .mil import Net
from .replay import OpRecord, replay_function
from .spec import UnitFunction
from .toolkit import coremltools, faster_conversion, quiet

FP16_MAX = 65504.0
FP16_SAFE = FP16_MAX / 8
PRECISIONS = ("float16", "float32")
COMPRESSIONS = ("none", "int8", "palette8", "palette6", "int4")


def deployment_target() -> Any:
    return coremltools().target.iOS18


def build_function(fn: UnitFunction) -> tuple[Any, Net]:
    """A coremltools function (float32) from a unit function; its outputs named as the build says."""
    coremltools()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function

    net = Net()
    specs = {t.name: t.mil_spec() for t in fn.inputs}
    with Function(specs, deployment_target()) as function:
        outputs = fn.build(net, {name: function.inputs[name] for name in specs})
        named = []
        for name, var in outputs.items():
            named.append(mb.identity(x=var, name=name))
            if var.op.name in net.masks:
                net.masks.add(name)
        function.set_outputs(named)
    return function, net


# ---------------------------------------------------------------------------- calibration


def _reduced_count(op: Any) -> int:
    """How many values a reduction (or a normalisation) sums per output."""
    shape = tuple(op.x.shape)
    axes = op.axes.val if op.axes is not None and op.axes.val is not None else range(len(shape))
    return int(np.prod([shape[int(a)] for a in np.atleast_1d(axes)]))


@dataclass
class ActivationStats:
    """The largest absolute values an op sees while the float32 program replays calibration inputs: its
    outputs, its inputs (an input float16 cannot hold makes the op float32 too) and, for sums, the sum
    it accumulates (a mean of 1152 values of 10 is small, their sum is not)."""

    output: dict[str, float] = field(default_factory=dict)
    input: dict[str, float] = field(default_factory=dict)
    accumulated: dict[str, float] = field(default_factory=dict)
    function_inputs: dict[str, float] = field(default_factory=dict)
    masks: set[str] = field(default_factory=set)
    """Ops whose outputs carry the attention-mask sentinel by design (``Net.masks``): not counted."""

    def observe(self, record: OpRecord) -> None:
        op = record.op
        if op.name in self.masks:
            return
        peak = max((float(np.abs(v).max()) for v in record.outputs if np.issubdtype(v.dtype, np.floating) and v.size),
                   default=0.0)
        self.output[op.name] = max(self.output.get(op.name, 0.0), peak)
        inputs = [v for value in op.inputs.values() for v in (value if isinstance(value, (list, tuple)) else [value])]
        seen = [self.output.get(v.op.name, 0.0) if v.op is not None else self.function_inputs.get(v.name, 0.0)
                for v in inputs if v.val is None]
        entering = max(seen, default=0.0)
        self.input[op.name] = max(self.input.get(op.name, 0.0), entering)
        if op.op_type in ("reduce_mean", "reduce_sum"):
            total = peak * _reduced_count(op) if op.op_type == "reduce_mean" else peak
        elif op.op_type == "layer_norm":
            total = entering * entering * _reduced_count(op)  # its sum of squared deviations, at most
        else:
            return
        self.accumulated[op.name] = max(self.accumulated.get(op.name, 0.0), total)

    def unsafe_in_fp16(self) -> set[str]:
        """Ops whose outputs, inputs or sums would overflow (or come within a factor 8 of overflowing)
        in float16."""
        return {name for values in (self.output, self.input, self.accumulated)
                for name, peak in values.items() if peak > FP16_SAFE}

    @property
    def peak(self) -> float:
        return max(self.output.values(), default=0.0)

    def peak_op(self) -> str:
        return max(self.output, key=self.output.get) if self.output else ""


def calibrate(fn: UnitFunction, inputs: dict[str, np.ndarray], stats: ActivationStats) -> dict[str, np.ndarray]:
    """Replay the float32 build of ``fn`` on ``inputs``, recording activations; returns its outputs."""
    function, net = build_function(fn)
    stats.masks |= net.masks
    for name, value in inputs.items():
        if np.issubdtype(np.asarray(value).dtype, np.floating):
            stats.function_inputs[name] = max(stats.function_inputs.get(name, 0.0), float(np.abs(value).max()))
    return replay_function(function, inputs, observe=stats.observe)


# ---------------------------------------------------------------------------- compression


def parse_compression(text: str, components: Sequence[str]) -> dict[str, str]:
    """``--compress`` values -> {component: kind}: "int8" for every component, or "text_encoder=int8"."""
    result = {c: "none" for c in components}
    for item in text.split() if isinstance(text, str) else text:
        component, _, kind = item.rpartition("=")
        if kind not in COMPRESSIONS:
            raise UserError(f"--compress {item!r}: choose one of {', '.join(COMPRESSIONS)}, for all components or "
                            f"per component as COMPONENT=KIND ({', '.join(components)})")
        if component and component not in components:
            raise UserError(f"--compress {item!r}: unknown component {component!r}; choose {', '.join(components)}")
        for c in [component] if component else components:
            result[c] = kind
    return result


def _compression_pass(kind: str) -> tuple[str, Any] | None:
    if kind == "none":
        return None
    coremltools()
    import coremltools.optimize as cto

    if kind in ("int8", "int4"):
        op_config = cto.coreml.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype=kind,
            **({"granularity": "per_channel"} if kind == "int8" else {"granularity": "per_block", "block_size": 32}))
        name = "compression::linear_quantize_weights"
    else:
        op_config = cto.coreml.OpPalettizerConfig(mode="kmeans", nbits=int(kind.removeprefix("palette")),
                                                  granularity="per_tensor")
        name = "compression::palettize_weights"
    # only the weights of matrix products; lookup tables (gather) and everything else stay as they are
    config = cto.coreml.OptimizationConfig(global_config=None,
                                           op_type_configs={"linear": op_config, "conv": op_config})
    return name, config


@functools.cache
def _register_weight_sharing() -> str:
    coremltools()
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY, register_pass

    @register_pass(namespace="mlx_sora")
    class share_weights_across_functions(AbstractGraphPass):  # noqa: N801 - coremltools' pass naming
        """Identical constants of a multifunction program are stored once (a shared blob)."""

        def apply(self, prog: Any) -> None:
            PASS_REGISTRY["common::const_deduplication"]._deduplicate_const_across_functions(prog)

    return "mlx_sora::share_weights_across_functions"


# ---------------------------------------------------------------------------- one package


@dataclass
class BuiltPackage:
    functions: list[str]
    inputs: dict[str, list[dict]]
    outputs: dict[str, list[dict]]
    fp32_ops: list[str]


def convert_unit(functions: Sequence[UnitFunction], precision: str, compression: str,
                 keep_fp32: Iterable[str] = ()) -> tuple[Any, BuiltPackage]:
    """Build and convert a unit's functions into one multifunction ML Program (not saved)."""
    ct = coremltools()
    from coremltools.converters.mil.mil import Program

    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: choose {' or '.join(PRECISIONS)}")
    program = Program()
    forced: set[str] = set(keep_fp32)
    outputs: dict[str, list[dict]] = {}
    for fn in functions:
        function, net = build_function(fn)
        forced |= net.fp32
        program.add_function(fn.name, function)
        outputs[fn.name] = [{"name": v.name, "shape": [int(s) for s in v.shape], "dtype": "float32"}
                            for v in function.outputs]
    program.default_function_name = functions[0].name
    program.export_as_multifunction = True
    pipeline = ct.PassPipeline.DEFAULT
    compress = _compression_pass(compression)
    if compress is not None:
        pipeline.append_pass(compress[0])
        pipeline.set_options(compress[0], {"config": compress[1]})
    pipeline.append_pass(_register_weight_sharing())
    if precision == "float32":
        compute_precision = ct.precision.FLOAT32
    else:
        compute_precision = ct.transform.FP16ComputePrecision(op_selector=lambda op: op.name not in forced)
    with quiet(), faster_conversion():
        model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=deployment_target(),
                           compute_precision=compute_precision, pass_pipeline=pipeline, skip_model_load=True)
    inputs = {fn.name: [t.to_json() for t in fn.inputs] for fn in functions}
    kept = sorted(forced) if precision == "float16" else []
    return model, BuiltPackage([fn.name for fn in functions], inputs, outputs, kept)


def save_model(model: Any, path: Path) -> int:
    """Save a converted model as ``path`` (an .mlpackage); returns the bytes of its weight file(s)."""
    model.save(str(path))
    weights = path / "Data" / "com.apple.CoreML" / "weights"
    return sum(f.stat().st_size for f in weights.rglob("*") if f.is_file()) if weights.is_dir() else 0
