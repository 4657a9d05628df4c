"""Which model a name means: the embedded demo model, a preset, or a folder of converted weights.

``resolve_model(spec)`` returns a ``ModelBundle``: the converted folder of each component
(``text_encoder``, ``stdit3``, ``vae``) and the generation defaults the model was made for.

* ``None`` or ``"demo"``: the small Open-Sora-1.2-architecture model shipped inside the package
  (``mlx_sora/demo/model``, trained by ``scripts/train_demo.py``); it needs no download.
* ``"opensora-v1.2"``: the real weights, converted once from Hugging Face (DeepFloyd/t5-v1_1-xxl,
  hpcai-tech/OpenSora-STDiT-v3, hpcai-tech/OpenSora-VAE-v1.2) into ``weights/opensora-v1.2/``.
* a folder holding one converted sub-folder per component (any names; recognised by their
  ``model_type``). Several text encoders (e.g. bfloat16 and int8) may sit side by side; the
  quantized one is chosen when asked for (``prefer_quantized``).

A model folder may hold ``demo.json`` / ``generation.json``: the generation defaults (size, frames,
fps, steps, CFG scale, score suffixes) and what the model was trained for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io.checkpoint import CheckpointError
from ..io.untrusted import read_json_object

COMPONENTS = {"t5": "text_encoder", "stdit3": "stdit3", "vae": "vae"}
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo" / "model"
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent.parent.parent / "weights"
DEFAULTS_FILES = ("generation.json", "demo.json")

PRESETS: dict[str, dict[str, str]] = {
    "opensora-v1.2": {
        "text_encoder": "DeepFloyd/t5-v1_1-xxl",
        "stdit3": "hpcai-tech/OpenSora-STDiT-v3",
        "vae": "hpcai-tech/OpenSora-VAE-v1.2",
    },
}


@dataclass(frozen=True)
class GenerationDefaults:
    """What generation uses when an option is not given (Open-Sora 1.2's inference defaults)."""

    height: int = 240
    width: int = 426
    num_frames: int = 51
    fps: int = 24
    steps: int = 30
    cfg_scale: float = 7.0
    aes: float | None = 6.5
    flow: float | None = None
    trained_sizes: tuple[tuple[int, int], ...] = ()
    """(height, width) the model was trained at; empty = any (the real model's buckets)."""
    trained_frames: tuple[int, ...] = ()
    """Frame counts the model was trained on; empty = any."""

    @classmethod
    def from_file(cls, path: Path) -> "GenerationDefaults":
        values = read_json_object(path, "restore it from the package")
        kwargs: dict[str, Any] = {}
        try:
            for name, kind in (("height", int), ("width", int), ("num_frames", int), ("fps", int),
                               ("steps", int)):
                if name in values:
                    kwargs[name] = _strict(values[name], kind, name)
            if "cfg_scale" in values:
                kwargs["cfg_scale"] = float(_strict(values["cfg_scale"], (int, float), "cfg_scale"))
            for name in ("aes", "flow"):
                if name in values:
                    value = values[name]
                    kwargs[name] = None if value is None else float(_strict(value, (int, float), name))
            sizes = values.get("trained_sizes") or (
                [[values["height"], values["width"]]] if "height" in values and "width" in values else [])
            kwargs["trained_sizes"] = tuple((_strict(h, int, "trained_sizes"), _strict(w, int, "trained_sizes"))
                                            for h, w in sizes)
            frames = values.get("trained_frames") or ([values["num_frames"]] if "num_frames" in values else [])
            kwargs["trained_frames"] = tuple(_strict(n, int, "trained_frames") for n in frames)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: {e}") from e
        return cls(**kwargs)


def _strict(value: Any, kind: type | tuple[type, ...], name: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} has a value of the wrong type: {value!r}")
    return value


@dataclass(frozen=True)
class ModelBundle:
    name: str
    components: dict[str, Path]
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    is_demo: bool = False


def _component_folders(root: Path) -> list[tuple[str, Path, dict]]:
    """(component, folder, config) of each converted sub-folder."""
    found = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        config_path = sub / "config.json"
        if not config_path.is_file():
            continue
        try:
            values = json.loads(config_path.read_text())
        except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{config_path} is not valid JSON ({e}); convert that component again") from e
        if isinstance(values, dict) and values.get("model_type") in COMPONENTS and "mlx_sora" in values:
            found.append((COMPONENTS[values["model_type"]], sub, values))
    return found


def is_quantized(config: dict) -> bool:
    info = config.get("mlx_sora")
    return isinstance(info, dict) and isinstance(info.get("quantization"), dict)


def find_components(root: str | Path, prefer_quantized: bool = False) -> dict[str, Path]:
    """The converted sub-folders of a model folder, keyed text_encoder / stdit3 / vae.

    Where a component has several folders (e.g. a bfloat16 and an int8 text encoder), the
    full-precision one is used unless ``prefer_quantized``."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"model folder {root} does not exist")
    candidates: dict[str, list[tuple[Path, dict]]] = {}
    for component, folder, config in _component_folders(root):
        candidates.setdefault(component, []).append((folder, config))
    missing = [c for c in COMPONENTS.values() if c not in candidates]
    if missing:
        raise CheckpointError(
            f"{root} lacks converted {', '.join(missing)} weights; a model folder holds one converted "
            "sub-folder per component (python -m mlx_sora.convert --hf-path ... --mlx-path "
            f"{root}/<component>)"
        )
    return {
        component: sorted(options, key=lambda o: (is_quantized(o[1]) != prefer_quantized, o[0].name))[0][0]
        for component, options in candidates.items()
    }


def prepare_preset(name: str, weights_dir: str | Path = DEFAULT_WEIGHTS_DIR, dtype: str = "bfloat16") -> Path:
    """Convert a preset's Hugging Face checkpoints once into ``weights_dir/name`` and reuse them."""
    from .hf import convert

    if name not in PRESETS:
        raise CheckpointError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    root = Path(weights_dir) / name
    for component, repo in PRESETS[name].items():
        target = root / component
        if (target / "config.json").exists():
            continue
        print(f"converting {repo} -> {target} ({dtype}); this happens once")
        try:
            convert(repo, target, dtype)
        except CheckpointError as e:
            raise CheckpointError(
                f"{e}\nTo prepare it by hand: python -m mlx_sora.convert --hf-path {repo} "
                f"--mlx-path {target} --dtype {dtype}"
            ) from e
    return root


def _defaults_of(root: Path) -> GenerationDefaults:
    for name in DEFAULTS_FILES:
        if (root / name).is_file():
            return GenerationDefaults.from_file(root / name)
    return GenerationDefaults()


def resolve_model(spec: str | Path | None = None, prefer_quantized: bool = False) -> ModelBundle:
    """A model spec (None/"demo", a preset name, or a folder) -> its component folders and defaults."""
    if spec is None or str(spec) == "demo":
        if not (DEMO_MODEL_DIR / "stdit3" / "config.json").is_file():
            raise CheckpointError(
                f"the embedded demo model is missing from {DEMO_MODEL_DIR}; reinstall mlx-sora or rebuild "
                "it with `python scripts/train_demo.py`"
            )
        return ModelBundle("demo", find_components(DEMO_MODEL_DIR, prefer_quantized),
                           _defaults_of(DEMO_MODEL_DIR), is_demo=True)
    if str(spec) in PRESETS:
        root = prepare_preset(str(spec))
        return ModelBundle(str(spec), find_components(root, prefer_quantized), _defaults_of(root))
    root = Path(spec).expanduser()
    if not root.exists():
        raise CheckpointError(
            f"model folder {str(spec)!r} does not exist, and it is not a known model name; use 'demo' (built in), "
            f"{', '.join(repr(p) for p in PRESETS)} (converted once from Hugging Face) or a folder of "
            "converted weights (sub-folders made with python -m mlx_sora.convert)"
        )
    return ModelBundle(root.name, find_components(root, prefer_quantized), _defaults_of(root))
