"""Type and range checks for model configs, so that a hostile or broken config.json fails with a clear
message before anything large is built (a depth of 10**9 would otherwise build 10**9 blocks)."""

from __future__ import annotations

import math
from typing import Any, Iterable


def require_int(owner: str, name: str, value: Any, low: int = 1, high: int = 2**16) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}.{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{owner}.{name} must be between {low} and {high}, got {value}")


def require_number(owner: str, name: str, value: Any, low: float | None = None, high: float | None = None,
                   positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}.{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{owner}.{name} must be positive, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{owner}.{name} must be between {low} and {high}, got {value}")


def require_ints(owner: str, name: str, values: Iterable[Any], low: int = 1, high: int = 2**16,
                 max_len: int = 16) -> None:
    values = list(values)
    if not 1 <= len(values) <= max_len:
        raise ValueError(f"{owner}.{name} must list 1 to {max_len} values, got {len(values)}")
    for value in values:
        require_int(owner, name, value, low, high)


def require_str(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{owner}.{name} must be a string, got {value!r}")
