"""Helpers for reading untrusted files: bounded reprs for error messages, strict integer checks,
regular-file sizes, numpy -> MLX conversion. Shared by the safetensors and ``.bin`` readers."""

from __future__ import annotations

import json
import os
import reprlib
import stat
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import CheckpointError, UserError, describe_os_error

MAX_DIM = 2**31 - 1
"""MLX shapes are 32-bit: a larger dimension cannot be loaded, so it is refused with a clear message."""
MAX_NDIM = 32

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother = 2, 40, 40
_repr.maxtuple, _repr.maxlist, _repr.maxdict = 6, 6, 4


def short_repr(value: object) -> str:
    """A bounded repr of an untrusted value (no deep recursion, no megabyte strings)."""
    try:
        return _repr.repr(value)
    except Exception:  # a hostile object whose repr fails: its type is enough
        return f"<{type(value).__name__}>"


def json_kind(value: object) -> str:
    return {dict: "object", list: "list", str: "string", int: "number", float: "number",
            bool: "boolean", type(None): "null"}.get(type(value), type(value).__name__)


def clip_text(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def is_int(value: object) -> bool:
    return type(value) is int  # bool (an int subclass) and floats are refused


def to_mx(array: np.ndarray, dtype: mx.Dtype) -> mx.array:
    if dtype == mx.bfloat16:  # numpy has no bfloat16: the raw 16-bit words are reinterpreted
        return mx.array(np.asarray(array, order="C")).view(mx.bfloat16)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    return mx.array(np.asarray(array, order="C"))


def regular_file_size(path: Path) -> int:
    """Size of ``path``; refuses folders, FIFOs and devices (opening a FIFO would block forever)."""
    try:
        info = os.stat(path)
    except OSError as e:
        raise CheckpointError(describe_os_error(e, "read")) from e
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path} is not a regular file")
    return info.st_size


# safetensors dtype name -> (numpy dtype used to read the bytes, mlx dtype of the result); the .bin
# reader maps torch storage types onto the same entries
SAFETENSORS_DTYPES: dict[str, tuple[np.dtype, mx.Dtype]] = {
    "F64": (np.dtype("<f8"), mx.float32),
    "F32": (np.dtype("<f4"), mx.float32),
    "F16": (np.dtype("<f2"), mx.float16),
    "BF16": (np.dtype("<u2"), mx.bfloat16),
    "I64": (np.dtype("<i8"), mx.int64),
    "I32": (np.dtype("<i4"), mx.int32),
    "I16": (np.dtype("<i2"), mx.int16),
    "I8": (np.dtype("i1"), mx.int8),
    "U8": (np.dtype("u1"), mx.uint8),
    "U32": (np.dtype("<u4"), mx.uint32),  # packed quantized weights (mx.quantize)
    "BOOL": (np.dtype("?"), mx.bool_),
}


def read_json_object(path: Path, fix: str, error: type[UserError] = CheckpointError) -> dict:
    """The object a JSON file holds. Whatever is wrong with it (unreadable, not UTF-8, nested too
    deeply, not JSON, not an object) is one ``error`` naming the file and ``fix`` (how to get a good
    one), never a traceback."""
    try:
        value = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as e:
        raise error(f"{path} is not valid JSON ({type(e).__name__}: {e}); {fix}") from e
    if not isinstance(value, dict):
        raise error(f"{path} must hold a JSON object; {fix}")
    return value
