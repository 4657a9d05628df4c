"""Model families known to the converter and to ``load_model``.

Each model module (t5, stdit3, vae) describes itself with one ``ModelFamily``: how to recognise its
Hugging Face checkpoint, how to turn the HF config into its own config, how HF keys map to MLX keys,
and how to build the MLX module. How the weights are split into units (one safetensors file each, so
a block loads alone) is not described here: it follows from the built model's ``units``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import mlx.core as mx
import mlx.nn as nn

if TYPE_CHECKING:
    from ..io.checkpoint import CheckpointFolder


def identity_transform(mlx_key: str, value: mx.array) -> mx.array:
    return value


@dataclass(frozen=True)
class ModelFamily:
    model_type: str
    """Name stored as ``model_type`` in a converted folder's config.json."""
    matches: Callable[[dict, "CheckpointFolder | None"], bool]
    """True when an HF config (and, if given, its checkpoint keys) belongs to this family."""
    config_from_hf: Callable[[dict, "CheckpointFolder"], dict]
    """HF config.json (+ checkpoint, for inferred sizes) -> this family's config dict."""
    rename: Callable[[str, dict], "str | None"]
    """HF key -> MLX parameter key, or None to drop the tensor. Gets the family config."""
    build: Callable[[dict], nn.Module]
    """Family config dict -> MLX module (parameters are lazy until evaluated)."""
    transform: Callable[[str, mx.array], mx.array] = identity_transform
    """Per-tensor layout change after renaming (e.g. conv weight transposes)."""
    hf_allow_patterns: tuple[str, ...] = ("*.json", "*.safetensors")
    """Files to download from a Hugging Face repo."""
    extra_files: tuple[str, ...] = ()
    """Non-weight files copied into the converted folder (e.g. the tokenizer)."""
    keep_float32: Callable[[str], bool] = field(default=lambda key: False)
    """Parameters that stay float32 whatever the storage dtype (e.g. small buffers)."""
    quantizable: Callable[[str], bool] = field(default=lambda path: False)
    """Module paths whose linear layers may be stored quantized (``--quantize``)."""


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    _FAMILIES[family.model_type] = family
    return family


def _load_all() -> None:
    # Importing a model module registers its family.
    for name in ("t5", "stdit3", "vae"):
        try:
            __import__(f"{__name__}.{name}")
        except ModuleNotFoundError as e:  # a family not implemented yet
            if e.name != f"{__name__}.{name}":
                raise


def families() -> dict[str, ModelFamily]:
    _load_all()  # every family, even when some model module was imported (and registered) first
    return dict(_FAMILIES)


def family_for_type(model_type: str) -> ModelFamily:
    known = families()
    if model_type not in known:
        raise ValueError(f"unknown model_type {model_type!r}; known: {sorted(known)}")
    return known[model_type]


def detect_family(hf_config: dict, checkpoint: "CheckpointFolder | None" = None) -> ModelFamily:
    found = [f for f in families().values() if f.matches(hf_config, checkpoint)]
    if len(found) != 1:
        described = hf_config.get("model_type") or hf_config.get("architectures") or "unknown"
        raise ValueError(
            f"cannot tell which model this checkpoint is (config says {described!r}); "
            f"supported: T5 v1.1 encoder (DeepFloyd/t5-v1_1-xxl), STDiT3 "
            f"(hpcai-tech/OpenSora-STDiT-v3), VAE v1.2 (hpcai-tech/OpenSora-VAE-v1.2)"
        )
    return found[0]
