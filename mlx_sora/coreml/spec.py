"""What an exported unit looks like from outside: its functions, and their named inputs and outputs.

A model module of this package (``t5.py``, ``stdit3.py``, ``vae.py``) turns one unit of a converted
folder into ``UnitFunction``s: a function name (one per shape the unit is exported at, and per
variant such as TDTM), the inputs it takes, and a ``build`` that adds the unit's ops with the
MIL builder and returns its outputs by name. The exporter builds them into one package per unit, the
manifest records them, and the Core ML pipeline calls them by these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

DTYPES = {"float32": np.float32, "int32": np.int32, "float16": np.float16}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"tensor {self.name}: dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    @property
    def numpy_dtype(self) -> Any:
        return DTYPES[self.dtype]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    def mil_spec(self) -> Any:
        from coremltools.converters.mil import Builder as mb
        from coremltools.converters.mil.mil import types

        dtype = {"float32": types.fp32, "int32": types.int32, "float16": types.fp16}[self.dtype]
        return mb.TensorSpec(shape=self.shape, dtype=dtype)


@dataclass
class UnitFunction:
    """One function of a unit's package."""

    name: str
    inputs: tuple[TensorSpec, ...]
    build: Callable[[Any, dict[str, Any]], dict[str, Any]]
    """(net, input vars by name) -> output vars by name (``mil.Net`` adds the ops)."""
    fp32: frozenset[str] = frozenset()
    """Filled by the exporter when built: ops that must stay float32 whatever they measure."""


def function_key(**dims: int | str) -> str:
    """A function name from what its graph depends on, e.g. ``latent20x32x32``."""
    return "_".join(f"{k}{v}" for k, v in dims.items())
