"""The converted MLX weights folder: writing it unit by unit, and loading models from it.

Layout of a converted folder::

    config.json                    the family config + "model_type" + "mlx_sora" (format, dtype, units)
    model.safetensors.index.json   {"metadata": {...}, "weight_map": {parameter key: unit file}}
    <unit>.safetensors             one file per unit (embedding, each block, final layer, ...)
    (extra files, e.g. spiece.model for T5)

Units (``mlx_sora.models.units``) are the granule of dynamic loading: which weights go into which
file follows from the model's own units, so a unit's weights load alone. Reading goes through the
index's weight map, so a folder written by an older layout still loads.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..io.checkpoint import CheckpointError, validate_safetensors
from ..io.fsutil import atomic_output_folder, check_output_folder, is_converted_folder
from ..io.untrusted import read_json_object
from ..models import ModelFamily, family_for_type
from ..models.units import held_dtype, unit_for_key
from ..runtime.memory import keep_freed_cpu_memory
from .quantization import (
    DEFAULT_GROUP_SIZE,
    parse_quantization,
    quantizable_linears,
    quantize_modules,
    quantize_weight,
)

FORMAT_VERSION = 2  # 2: VAE decoders split into stages (format 1 folders still load)
INDEX_NAME = "model.safetensors.index.json"

DTYPES: dict[str, mx.Dtype] = {
    "float32": mx.float32,
    "float16": mx.float16,
    "bfloat16": mx.bfloat16,
}


def parse_dtype(name: str | mx.Dtype | None) -> mx.Dtype | None:
    if name is None or isinstance(name, mx.Dtype):
        return name
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "f32": "float32"}
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: mx.Dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def unit_file(unit: str) -> str:
    return f"{unit}.safetensors"


def expected_parameters(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter key -> shape, without evaluating (allocating) any weight."""
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def check_keys(
    have: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str
) -> None:
    """Raise one error naming every missing/unexpected key and shape mismatch."""
    missing = sorted(set(expected) - set(have))
    unexpected = sorted(set(have) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {have[k]} vs model {expected[k]}"
        for k in set(have) & set(expected)
        if tuple(have[k]) != tuple(expected[k])
    )
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} weights: {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} weights: {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
    if mismatched:
        problems.append(f"shape mismatches: {'; '.join(mismatched[:20])}")
    if problems:
        raise CheckpointError(f"{where} does not match the model: " + " | ".join(problems))


def write_converted_folder(
    out_dir: str | Path,
    family: ModelFamily,
    config: dict,
    model: nn.Module,
    weights: Iterable[tuple[str, Callable[[], mx.array]]],
    dtype: mx.Dtype,
    source_dir: Path | None = None,
    source: str = "",
    overwrite: bool = False,
    quantization: dict | None = None,
) -> Path:
    """Write a converted folder atomically, one unit at a time.

    ``model`` (built from ``config``; its parameters may be lazy) defines the units; ``weights`` yields
    (mlx key, loader) where ``loader()`` returns the tensor in MLX layout; loaders are called unit by
    unit so that only one unit is in memory. The folder is built under a temporary name next to
    ``out_dir`` and renamed into place at the end.
    """
    sources = [source_dir] if source_dir is not None else []
    out_dir = check_output_folder(out_dir, sources, overwrite=overwrite, is_ours=is_converted_folder)

    by_unit: dict[str, list[tuple[str, Callable[[], mx.array]]]] = {u.name: [] for u in model.units}
    for key, loader in weights:
        by_unit[unit_for_key(model.units, key).name].append((key, loader))
    by_unit = {name: entries for name, entries in by_unit.items() if entries}

    quantized = set()
    if quantization is not None:
        quantized = {f"{path}.weight" for path in
                     quantizable_linears(model, family.quantizable, quantization["group_size"])}

    with atomic_output_folder(out_dir, is_ours=is_converted_folder) as tmp_dir:
        weight_map: dict[str, str] = {}
        for unit, entries in by_unit.items():
            arrays = {}
            for key, loader in entries:
                value = loader()
                if key in quantized:
                    module = key[: -len(".weight")]
                    arrays[key], arrays[f"{module}.scales"], arrays[f"{module}.biases"] = quantize_weight(
                        value, quantization, dtype)
                elif mx.issubdtype(value.dtype, mx.floating):
                    arrays[key] = value.astype(mx.float32 if family.keep_float32(key) else dtype)
                else:
                    arrays[key] = value
            weight_map.update({k: unit_file(unit) for k in arrays})
            mx.eval(arrays)
            mx.save_safetensors(str(tmp_dir / unit_file(unit)), arrays, metadata={"format": "mlx"})
            del arrays
            mx.clear_cache()  # freed buffers would otherwise stay in MLX's cache: one unit at a time
        full_config = dict(config)
        full_config["model_type"] = family.model_type
        full_config["mlx_sora"] = {
            "format": FORMAT_VERSION,
            "dtype": dtype_name(dtype),
            "units": list(by_unit),
            "source": source,
        }
        if quantization is not None:
            full_config["mlx_sora"]["quantization"] = {**quantization, "layers": len(quantized)}
        (tmp_dir / "config.json").write_text(json.dumps(full_config, indent=2) + "\n")
        index = {"metadata": {"format": "mlx_sora", "units": list(by_unit)}, "weight_map": weight_map}
        (tmp_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        for name in family.extra_files:
            if source_dir is None or not (source_dir / name).exists():
                raise CheckpointError(f"{source_dir} lacks {name}, which the {family.model_type} model needs")
            shutil.copy2(source_dir / name, tmp_dir / name)
    return out_dir


# ---------------------------------------------------------------- reading a converted folder


def read_converted_config(folder: str | Path) -> dict:
    """The config.json of a converted folder, its structure checked (the model config's own
    dataclass checks types and ranges when the model is built)."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{folder} is not a converted mlx-sora folder (no config.json); "
            "create one with `python -m mlx_sora.convert --hf-path ... --mlx-path ...`"
        )
    config = read_json_object(path, "convert the model again")
    if "mlx_sora" not in config or "model_type" not in config:
        raise CheckpointError(
            f"{folder} holds a Hugging Face checkpoint, not converted MLX weights; convert it first: "
            f"python -m mlx_sora.convert --hf-path {folder} --mlx-path weights/<name>"
        )
    info = config["mlx_sora"]
    if not isinstance(info, dict) or not isinstance(info.get("units"), list) or not all(
            isinstance(u, str) and re.fullmatch(r"[A-Za-z0-9_]+", u) for u in info["units"]):
        raise CheckpointError(f"{path}: 'mlx_sora' must hold 'units', a list of plain unit names; convert again")
    if not isinstance(info.get("dtype", "float32"), str) or info.get("dtype", "float32") not in DTYPES:
        raise CheckpointError(f"{path}: 'mlx_sora.dtype' must be one of {sorted(DTYPES)}")
    if not isinstance(config["model_type"], str):
        raise CheckpointError(f"{path}: 'model_type' must be a string")
    quantization = info.get("quantization")
    if quantization is not None and not (
            isinstance(quantization, dict) and quantization.get("bits") in (4, 8)
            and quantization.get("group_size") in (32, 64, 128) and quantization.get("mode", "affine") == "affine"):
        raise CheckpointError(f"{path}: 'mlx_sora.quantization' must be {{bits: 4 or 8, group_size: 32, 64 or 128, "
                              "mode: affine}}; convert again")
    return config


def build_model(folder: str | Path, config: dict | None = None) -> nn.Module:
    """The (lazy, unallocated) model a converted folder's config describes; config errors name the file."""
    folder = Path(folder)
    config = read_converted_config(folder) if config is None else config
    try:
        family = family_for_type(config["model_type"])
        return family.build(config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from e


def read_weight_map(folder: str | Path) -> dict[str, str]:
    """Parameter key -> weight file name (a plain name inside ``folder``)."""
    path = Path(folder) / INDEX_NAME
    if not path.exists():
        raise CheckpointError(f"{folder} lacks {INDEX_NAME}: the conversion did not finish; convert again")
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {e}); convert the model again") from e
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: weight_map must be an object; convert the model again")
    for key, name in weight_map.items():
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors") \
                or name.startswith("."):
            raise CheckpointError(
                f"{path}: weight file {name!r} of {key!r} is not a plain file name inside the folder"
            )
    return weight_map


def load_weight_files(folder: str | Path, files: Iterable[str]) -> dict[str, mx.array]:
    """The tensors of some weight files of a converted folder, as lazy arrays (read from disk when
    evaluated)."""
    weights: dict[str, mx.array] = {}
    for name in files:
        path = Path(folder) / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the converted folder is incomplete; convert again")
        validate_safetensors(path)  # every byte range inside the file, no overlaps, before MLX reads it
        try:
            weights.update(mx.load(str(path)))
        except Exception as e:  # mlx raises RuntimeError/ValueError on corrupt files
            raise CheckpointError(f"{path} is corrupt ({e}); convert the model again") from e
    return weights


def load_model(folder: str | Path, dtype: str | mx.Dtype | None = None, lazy: bool = False) -> nn.Module:
    """Build the model a converted folder holds and load its weights.

    ``dtype`` is the compute dtype (``model.compute_dtype``; default: the stored dtype); the weights
    are cast to it. With ``lazy`` the weights stay unevaluated (read from disk when first used).
    """
    folder = Path(folder)
    config = read_converted_config(folder)
    keep_freed_cpu_memory()  # the CPU allocator policy the models run fastest with (see memory.py)
    model = build_model(folder, config)
    dtype = parse_dtype(dtype) or parse_dtype(config["mlx_sora"].get("dtype", "float32"))
    weight_map = read_weight_map(folder)
    quantization = config["mlx_sora"].get("quantization")
    if quantization is not None:  # the layers whose scales are stored are quantized (as mlx-lm)
        paths = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and f"{p}.scales" in weight_map]
        quantize_modules(model, paths, quantization)
    weights = load_weight_files(folder, sorted(set(weight_map.values())))
    weights = {k: v.astype(held_dtype(model, k, v.dtype, dtype)) for k, v in weights.items()}
    check_keys({k: tuple(v.shape) for k, v in weights.items()}, expected_parameters(model), str(folder))
    model.load_weights(list(weights.items()), strict=True)
    model.compute_dtype = dtype
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model


def save_model(
    model: nn.Module,
    folder: str | Path,
    model_type: str,
    config: dict,
    dtype: str | mx.Dtype = mx.float32,
    source_dir: Path | None = None,
    overwrite: bool = False,
    quantize: str | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> Path:
    """Write an in-memory model (e.g. trained or randomly initialised) as a converted folder.

    ``config`` is the family config the model was built from; ``source_dir`` holds the family's extra
    files (e.g. ``spiece.model`` for T5); ``quantize``: "int8" / "int4" stores the family's
    quantizable linear layers quantized.
    """
    family = family_for_type(model_type)
    params = dict(tree_flatten(model.parameters()))
    return write_converted_folder(
        folder, family, config, model, ((k, (lambda v=v: v)) for k, v in params.items()),
        parse_dtype(dtype), source_dir=source_dir, source="mlx_sora.save_model", overwrite=overwrite,
        quantization=parse_quantization(quantize, group_size),
    )
