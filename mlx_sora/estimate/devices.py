"""Device models: what a device computes per second, per op kind, and how fast it loads weights.

A device model is data: one JSON table per device in ``estimate/devices/`` (``iphone15pro``, Apple
Silicon Macs from their public figures), each field with its source or its calibration, or, for
``this-machine``, rates measured by short microbenchmarks (``microbench.py``) and cached per
machine under ``~/.cache/mlx-sora/devices/``. Fields (rates per second):

* ``throughput``: ``matmul``, ``attention``, ``conv`` in FLOP/s; ``elementwise`` in bytes/s (norms,
  activations, copies move bytes; null where the compute rates were calibrated on whole models and
  so include them); ``components`` overrides any of them per model (``text_encoder``, ``stdit3``,
  ``vae``) where a device runs the models differently;
* ``memory_bandwidth`` (bytes/s, or null): the roofline of the compute ops (an op takes
  max(FLOPs / rate, bytes / bandwidth));
* ``storage_read_rate`` (bytes/s of weight files read), ``cast_rate`` (bytes/s of weights written
  when the stored dtype is cast to the compute dtype; null: included in the read rate),
  ``load_overhead_s`` (per unit load), ``overlap_slowdown`` (computation while a load runs beside it);
* ``fixed_s``: fixed seconds per run of a layer, a unit, a sampling step, a phase (dispatching and
  evaluating ops, building the phase's model): what dominates a tiny model;
* ``engine``: ``cpu`` (the CPU fast path: attention scores through memory) or ``gpu`` (fused attention);
* ``compute_dtype``, ``memory_bytes``, ``memory_budget_bytes`` (the default budget; null: 80 % of the
  memory available, generate's own default), ``process_bytes`` (the process before any weights;
  null: this process), ``peak_flops``; ``sources`` and ``calibration``: where each number comes from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io.untrusted import read_json_object

DEVICE_DIR = Path(__file__).resolve().parent / "devices"
THIS_MACHINE = "this-machine"
CONV_KERNELS_BY_TAPS = {9: "3x3", 27: "3x3x3"}
CONV_KERNELS = tuple(CONV_KERNELS_BY_TAPS.values())


def _interpolate(table: list[list[float]], x: float) -> float:
    """The rate of ``[[x, rate], ...]`` (ascending x) at ``x``: log-linear between points, held at the ends."""
    if x <= table[0][0]:
        return table[0][1]
    for (x0, rate0), (x1, rate1) in zip(table, table[1:]):
        if x <= x1:
            f = math.log(x / x0) / math.log(x1 / x0)
            return rate0 * (rate1 / rate0) ** f
    return table[-1][1]
COMPUTE_KINDS = ("matmul", "attention", "conv")
COMPONENTS = ("text_encoder", "stdit3", "vae")


@dataclass(frozen=True)
class DeviceModel:
    name: str
    description: str
    engine: str
    compute_dtype: str
    throughput: dict[str, float]
    storage_read_rate: float
    memory_bandwidth: float | None = None
    components: dict[str, dict[str, float]] = field(default_factory=dict)
    elementwise_by_size: list[list[float]] = field(default_factory=list)
    """[[array bytes, bytes/s], ...] ascending: the elementwise rate by the size of the arrays (caches),
    interpolated in log size; ``throughput.elementwise`` where empty."""
    conv_by_width: dict[str, list[list[float]]] = field(default_factory=dict)
    """{"3x3": [[input channels, FLOP/s], ...], "3x3x3": ...} ascending: a convolution's rate by its
    kernel and width, interpolated in log width and held at the ends; ``throughput.conv`` (or the
    component's) for other kernels and where empty."""
    cast_rate: float | None = None
    load_overhead_s: float = 0.0
    overlap_slowdown: float = 1.0
    """How much longer computation takes while a load runs beside it (a CPU's loader shares its cores
    and memory bandwidth; 1: loads are free to overlap)."""
    fixed_s: dict[str, float] = field(default_factory=dict)
    """Fixed seconds per run of a layer (``cost.UnitCall.layers``: "t5.block", "stdit3.block",
    "vae.res_block", ...), per unit run ("unit"), per sampling step ("sampler.step"), per phase
    ("phase") and per sequence and head of an attention ("attention.item"): what work costs beside
    its arithmetic (dispatching and evaluating ops, many small products)."""
    memory_bytes: int | None = None
    memory_budget_bytes: int | None = None
    process_bytes: int | None = None
    peak_flops: float | None = None
    sources: dict[str, str] = field(default_factory=dict)
    calibration: dict[str, str] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)
    """this-machine: when and where the rates were measured (the cache key, the date)."""

    def __post_init__(self) -> None:
        where = f"device table {self.name!r}"
        if self.engine not in ("cpu", "gpu"):
            raise UserError(f"{where}: engine must be 'cpu' or 'gpu', got {self.engine!r}")
        if self.compute_dtype not in ("float32", "float16", "bfloat16"):
            raise UserError(f"{where}: compute_dtype must be float32, float16 or bfloat16")
        for kind in COMPUTE_KINDS:
            _positive(where, f"throughput.{kind}", self.throughput.get(kind))
        if "elementwise" not in self.throughput:
            raise UserError(f"{where}: throughput.elementwise is missing (bytes/s, or null: within the compute rates)")
        if self.throughput["elementwise"] is not None:
            _positive(where, "throughput.elementwise", self.throughput["elementwise"])
        for component, rates in self.components.items():
            if component not in COMPONENTS:
                raise UserError(f"{where}: components has {component!r}; known: {', '.join(COMPONENTS)}")
            for kind, rate in rates.items():
                if kind not in (*COMPUTE_KINDS, "elementwise"):
                    raise UserError(f"{where}: components.{component} has {kind!r}; known: matmul, attention, "
                                    "conv, elementwise")
                _positive(where, f"components.{component}.{kind}", rate)
        sizes = [pair[0] for pair in self.elementwise_by_size if isinstance(pair, (list, tuple)) and len(pair) == 2]
        if len(sizes) != len(self.elementwise_by_size) or sizes != sorted(sizes):
            raise UserError(f"{where}: elementwise_by_size must be [[array bytes, bytes/s], ...] by ascending size")
        for size, rate in self.elementwise_by_size:
            _positive(where, "elementwise_by_size", size)
            _positive(where, "elementwise_by_size", rate)
        for kernel, table in self.conv_by_width.items():
            if kernel not in CONV_KERNELS:
                raise UserError(f"{where}: conv_by_width has {kernel!r}; known: {', '.join(CONV_KERNELS)}")
            widths = [pair[0] for pair in table if isinstance(pair, (list, tuple)) and len(pair) == 2]
            if not widths or len(widths) != len(table) or widths != sorted(widths):
                raise UserError(f"{where}: conv_by_width.{kernel} must be [[channels, FLOP/s], ...] by ascending "
                                "channels")
            for width, rate in table:
                _positive(where, f"conv_by_width.{kernel}", width)
                _positive(where, f"conv_by_width.{kernel}", rate)
        _positive(where, "storage_read_rate", self.storage_read_rate)
        if not (isinstance(self.overlap_slowdown, (int, float)) and 1 <= self.overlap_slowdown < math.inf):
            raise UserError(f"{where}: overlap_slowdown must be a number >= 1")
        for name in ("memory_bandwidth", "cast_rate", "memory_bytes", "memory_budget_bytes", "peak_flops"):
            if getattr(self, name) is not None:
                _positive(where, name, getattr(self, name))
        for name, value in (("load_overhead_s", self.load_overhead_s),
                            *((f"fixed_s.{k}", v) for k, v in self.fixed_s.items())):
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 <= value < math.inf):
                raise UserError(f"{where}: {name} must be a number >= 0")

    def rate(self, component: str, kind: str) -> float | None:
        """FLOP/s (compute kinds) or bytes/s (``elementwise``; None: folded into the compute rates) of a
        kind of op in a component."""
        return self.components.get(component, {}).get(kind, self.throughput[kind])

    def conv_rate(self, component: str, kernel: int, width: int) -> float:
        """FLOP/s of a convolution with a kernel of ``kernel`` taps over ``width`` input channels."""
        table = self.conv_by_width.get(CONV_KERNELS_BY_TAPS.get(kernel, ""))
        if not table or width <= 0:
            return self.rate(component, "conv")
        return _interpolate(table, width)

    def elementwise_rate(self, component: str, array_bytes: float) -> float | None:
        """Bytes/s of elementwise work in a component on arrays of ``array_bytes``."""
        if "elementwise" in self.components.get(component, {}) or not self.elementwise_by_size:
            return self.rate(component, "elementwise")
        return _interpolate(self.elementwise_by_size, array_bytes)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "device table") -> "DeviceModel":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"{where}: unknown fields {', '.join(unknown)}")
        try:
            return cls(**values)
        except TypeError as e:
            raise UserError(f"{where}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def _positive(where: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise UserError(f"{where}: {name} must be a positive number, got {value!r}")


def table_names() -> list[str]:
    return sorted(p.stem for p in DEVICE_DIR.glob("*.json"))


def device_names() -> list[str]:
    return [*table_names(), THIS_MACHINE]


def load_table(name: str) -> DeviceModel:
    """A device's table from ``estimate/devices/<name>.json``."""
    path = DEVICE_DIR / f"{name}.json"
    if not path.is_file():
        raise UserError(f"--device {name!r} is unknown; choose one of {', '.join(device_names())}")
    return DeviceModel.from_dict(read_json_object(path, "reinstall mlx-sora", UserError), str(path))


def load_device(name: str, remeasure: bool = False, cache_dir: Path | None = None) -> DeviceModel:
    """The device model called ``name``: a shipped table, or this machine's measured rates (cached;
    ``remeasure`` measures again)."""
    if name == THIS_MACHINE:
        from .microbench import this_machine

        return this_machine(remeasure=remeasure, cache_dir=cache_dir)
    if remeasure:
        raise UserError(f"--remeasure applies to --device {THIS_MACHINE} only (the {name} table is data)")
    return load_table(name)
