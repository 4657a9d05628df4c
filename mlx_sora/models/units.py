"""Units: the granule of block-by-block execution and of weight files (the basis of CI-DL).

Every model describes itself as an ordered tuple of units. A unit has a name (its weight file in a
converted folder is ``<name>.safetensors``), the parameter prefixes it owns in the model tree, and a
``run`` function that takes the value the previous unit produced (the *carry*) and returns the next
one. Chaining a model's units is its forward pass::

    T5:      (input_ids, mask) -> "embed" -> "block_00" ... "block_23" -> "final_norm" -> y
    STDiT3:  STDiT3Inputs -> "embedders" -> "block_00" ... "block_27" -> "final_layer" -> velocity
    VAE:     chains for the temporal and the spatial decoder (and one unit per encoder)

Which weights go into which file follows from the same units (``unit_for_key``), so the files and the
run order cannot disagree. ``run_units`` is the one loop that runs a chain; ``mlx_sora.runtime.streaming``
runs the same loop with weights materialized and evicted unit by unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten


@dataclass(frozen=True, eq=False)
class Unit:
    name: str
    """Weight-file stem in a converted folder, e.g. ``block_03``."""
    paths: tuple[str, ...]
    """Parameter prefixes the unit owns, e.g. ``("spatial_blocks.3", "temporal_blocks.3")``."""
    run: Callable[[Any], Any]
    """carry -> carry."""

    def owns(self, key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in self.paths)

    def __call__(self, carry: Any) -> Any:
        return self.run(carry)


class UnitModel(Protocol):
    """What the streaming executor and the converter need from a model."""

    units: tuple[Unit, ...]
    compute_dtype: mx.Dtype


def unit_for_key(units: Iterable[Unit], key: str) -> Unit:
    """The unit that owns a parameter key (the longest matching prefix wins)."""
    best: tuple[int, Unit] | None = None
    for unit in units:
        for p in unit.paths:
            if (key == p or key.startswith(p + ".")) and (best is None or len(p) > best[0]):
                best = (len(p), unit)
    if best is None:
        raise KeyError(f"parameter {key!r} belongs to no unit")
    return best[1]


def held_dtype(model: nn.Module, key: str, stored: mx.Dtype, compute: mx.Dtype) -> mx.Dtype:
    """The dtype a stored weight is held in while the model runs: the compute dtype for floating
    weights, except the lookup tables a model names in ``lookup_tables``. Those are read row by row
    and the rows cast after the lookup (the same numbers as casting the table first), so a table
    stored narrower than the compute dtype stays as stored: T5-XXL's 32128x4096 token embedding is
    held as 263 MB of bfloat16 instead of being cast to 526 MB of float32 before every text encoding."""
    if not mx.issubdtype(stored, mx.floating):
        return stored
    if key in getattr(model, "lookup_tables", ()) and stored.size < compute.size:
        return stored
    return compute


def unit_parameter_keys(model: nn.Module, unit: Unit) -> list[str]:
    """The parameter keys a unit owns, in the model's order (allocates nothing)."""
    return [k for k, _ in tree_flatten(model.parameters()) if unit_for_key(model.units, k) is unit]


def arrays_of(carry: Any) -> list[mx.array]:
    """The arrays held by a carry (arrays, tuples/lists/dicts of them, objects with ``arrays()``)."""
    if isinstance(carry, mx.array):
        return [carry]
    if isinstance(carry, (tuple, list)):
        return [a for item in carry for a in arrays_of(item)]
    if isinstance(carry, dict):
        return [a for item in carry.values() for a in arrays_of(item)]
    if hasattr(carry, "arrays"):
        return list(carry.arrays())
    return []


class WeightPolicy(Protocol):
    """How a unit's weights are present while it runs (see ``mlx_sora.runtime.streaming``)."""

    def acquire(self, unit: Unit, upcoming: Sequence[Unit]) -> None:
        """Make ``unit``'s weights present; ``upcoming`` (the rest of the chain) may be prefetched."""


    def release(self, unit: Unit) -> None: ...


def run_units(
    units: Sequence[Unit],
    carry: Any,
    weights: WeightPolicy | None = None,
    evaluate: bool = False,
    on_unit: Callable[[Unit], None] | None = None,
) -> Any:
    """Run a chain of units: the one loop behind every forward pass.

    ``evaluate`` evaluates the carry after each unit (small graphs; on Metal, command buffers short
    enough for the GPU watchdog). ``weights`` materializes a unit's weights before it runs and may
    evict them after; without it the weights are whatever the model holds. Differentiable and
    traceable when ``evaluate`` is False and ``weights`` is None.
    """
    for i, unit in enumerate(units):
        if weights is not None:
            weights.acquire(unit, units[i + 1 :])
        carry = unit.run(carry)
        if evaluate:
            mx.eval(arrays_of(carry))
        if weights is not None:
            weights.release(unit)
        if on_unit is not None:
            on_unit(unit)
    return carry


def attach_units(model: nn.Module, units: Sequence[Unit], **chains: Sequence[str]) -> None:
    """Set ``model.units`` (and, per keyword, a named chain of units: ``name=[unit names]``) outside
    the module tree (a tuple attribute would join MLX's tree)."""
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        raise ValueError(f"unit names must be unique, got {names}")
    object.__setattr__(model, "units", tuple(units))
    by_name = {u.name: u for u in units}
    for chain, members in chains.items():
        object.__setattr__(model, chain, tuple(by_name[m] for m in members))


def unit_named(model: UnitModel, name: str) -> Unit:
    for unit in model.units:
        if unit.name == name:
            return unit
    raise KeyError(f"{type(model).__name__} has no unit {name!r}")
