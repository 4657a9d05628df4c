"""The architecture of each preset, shipped in the package: the ``config.json`` that
``python -m mlx_sora.convert`` writes into each converted folder of the preset (bfloat16 storage),
without the weights. With them a preset's skeletons, units and unit sizes are known on a fresh
install, with no download: what ``mlx_sora.estimate`` projects the real model from.

The files under ``preset_configs/<preset>/<component>/`` are built from the models' own config
dataclasses (``build_preset_configs``; ``scripts/write_preset_configs.py`` writes them). They hold
what the converter writes except ``hf_embedding_key`` (which copy of T5's tied token embedding the
checkpoint's files hold: a detail of reading the checkpoint, not of the model). They carry no
tokenizer: a projection needs none.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlx.utils import tree_flatten

from ..io.checkpoint import CheckpointError
from ..models import family_for_type
from .loading import FORMAT_VERSION, dtype_name, parse_dtype
from .registry import COMPONENTS, PRESETS

PRESET_CONFIG_DIR = Path(__file__).resolve().parent / "preset_configs"
STORAGE_DTYPE = "bfloat16"  # the converter's storage for the presets (registry.prepare_preset)


def architecture_configs(name: str) -> dict[str, dict]:
    """component -> the family config of a preset, from the models' config dataclasses."""
    from ..models.stdit3 import STDiT3Config
    from ..models.t5 import T5Config
    from ..models.vae import VideoAutoencoderConfig

    if name != "opensora-v1.2":
        raise CheckpointError(f"no architecture is known for preset {name!r}; known: opensora-v1.2")
    return {
        "text_encoder": dict(T5Config.t5_v1_1_xxl().__dict__),
        "stdit3": STDiT3Config().to_dict(),
        "vae": VideoAutoencoderConfig().to_dict(),
    }


def build_preset_configs(name: str, dtype: str = STORAGE_DTYPE) -> dict[str, dict]:
    """component -> the converted folder's config.json of a preset, as ``write_converted_folder``
    writes it: the family config, ``model_type`` and the ``mlx_sora`` block (format, storage dtype,
    the units that hold weights in the model's order, the source repository)."""
    families = {component: model_type for model_type, component in COMPONENTS.items()}
    configs = {}
    for component, config in architecture_configs(name).items():
        family = family_for_type(families[component])
        model = family.build(config)  # lazy: only the units and parameter keys are read
        keys = [k for k, _ in tree_flatten(model.parameters())]
        units = [u.name for u in model.units if any(u.owns(k) for k in keys)]
        configs[component] = {**config, "model_type": family.model_type, "mlx_sora": {
            "format": FORMAT_VERSION, "dtype": dtype_name(parse_dtype(dtype)), "units": units,
            "source": PRESETS[name][component],
        }}
    return configs


def preset_config_folders(name: str) -> dict[str, Path]:
    """component -> the shipped folder holding a preset's config.json (no weights)."""
    root = PRESET_CONFIG_DIR / name
    folders = {component: root / component for component in COMPONENTS.values()}
    missing = [str(f / "config.json") for f in folders.values() if not (f / "config.json").is_file()]
    if name not in PRESETS or missing:
        raise CheckpointError(
            f"the architecture configs of preset {name!r} are missing ({', '.join(missing) or 'unknown preset'}); "
            "reinstall mlx-sora"
        )
    return folders


def write_preset_configs(name: str, root: Path = PRESET_CONFIG_DIR) -> list[Path]:
    """Write a preset's config.json files (``scripts/write_preset_configs.py``)."""
    written = []
    for component, config in build_preset_configs(name).items():
        folder = root / name / component
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "config.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        tmp.replace(path)
        written.append(path)
    return written
