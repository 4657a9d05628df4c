"""Export a converted model to Core ML: one ML Program package per unit, and ``manifest.json``.

Walks the same units as the runtime (``models/units.py``: T5 ``embed``, ``block_00..``,
``final_norm``; STDiT3 ``embedders``, ``block_00..``, ``final_layer``; the VAE's decoder stages),
reading each unit's weights from its own safetensors file of the converted folder, building its
functions for every requested size (``t5.py``, ``stdit3.py``, ``vae.py``), calibrating float16 on
the way (``package.py``), then converting, compressing and saving it, before the next unit is read:
the export holds one unit's weights at a time.

Calibration inputs follow the chain: a real prompt through T5, its embedding into STDiT3 (at a small
latent of the smallest size, at the first and a middle timestep, plain and with TDTM), a normal
latent chunk into the VAE decoders. Everything goes into a temporary folder renamed into place at
the end (``io.fsutil``): an interrupted export leaves nothing behind, and ``--overwrite`` replaces
only a previous export.
"""

from __future__ import annotations

import gc
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx
import numpy as np

from ..conversion.loading import load_weight_files, read_converted_config, read_weight_map
from ..conversion.registry import ModelBundle
from ..errors import UserError
from ..io.fsutil import atomic_output_folder, check_output_folder
from ..models.units import Unit, unit_for_key
from ..planning import GenerationPlanner, PlannedPhase
from ..prompts.tokenizer import T5Tokenizer
from ..request import GenerationRequest
from ..runtime.memory import peak_process_memory
from ..runtime.streaming import MemoryBudgetError, UnitSize, format_bytes
from ..sampling import DynamicLeap, FixedLeap, SamplerConfig, sampling_timesteps
from . import stdit3 as coreml_stdit3
from . import t5 as coreml_t5
from . import vae as coreml_vae
from .manifest import carry_name, is_export_folder, write_manifest
from .package import ActivationStats, calibrate, convert_unit, deployment_target, save_model
from .spec import UnitFunction
from .toolkit import coremltools

COMPONENTS = ("text_encoder", "stdit3", "vae")
PHASE_OF = {"text_encoder": "text_encoding", "stdit3": "denoising", "vae": "decoding"}
CALIBRATION_PROMPT = "a red panda eating bamboo in a misty forest, the camera slowly pans right"
CALIBRATION_LATENT = (4, 8, 8)
"""Largest latent (T, H, W) STDiT3 is calibrated at (the replay is numpy: full sizes take hours)."""


@dataclass(frozen=True)
class VideoSize:
    height: int
    width: int
    num_frames: int

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}x{self.num_frames}"

    @classmethod
    def parse(cls, text: str) -> "VideoSize":
        parts = text.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise UserError(f"--sizes {text!r}: write HEIGHTxWIDTHxFRAMES, e.g. 256x256x68")
        return cls(*(int(p) for p in parts))


@dataclass
class UnitReport:
    component: str
    unit: str
    functions: list[str]
    weight_bytes: int
    seconds: float
    peak_activation: float
    peak_op: str
    fp32_ops: int
    stages: dict[str, float] = field(default_factory=dict)
    """Seconds per stage: reading the weights, calibrating, converting, saving."""

    def line(self) -> str:
        stages = ", ".join(f"{name} {seconds:.1f}" for name, seconds in self.stages.items())
        return (f"{self.component}/{self.unit}: {len(self.functions)} function(s), {format_bytes(self.weight_bytes)}, "
                f"max |activation| {self.peak_activation:.4g} ({self.peak_op or '-'}) of float16's 65504, "
                f"{self.fp32_ops} op(s) kept float32, {self.seconds:.1f} s ({stages})")


@dataclass
class ExportResult:
    folder: Path
    units: list[UnitReport] = field(default_factory=list)
    seconds: float = 0.0
    process_peak: int = 0

    def bytes_per_component(self) -> dict[str, int]:
        out = {c: 0 for c in COMPONENTS}
        for report in self.units:
            out[report.component] += report.weight_bytes
        return out


# ---------------------------------------------------------------------------- unit weights


def unit_weights(folder: Path, model: Any, unit: Unit) -> dict[str, np.ndarray]:
    """One unit's weights as float32 numpy arrays, read from its own file(s) of a converted folder;
    int8/int4 layers of a quantized folder dequantized (Core ML compresses them its own way)."""
    weight_map = read_weight_map(folder)
    keys = [k for k in weight_map if unit_for_key(model.units, k) is unit]
    arrays = load_weight_files(folder, sorted({weight_map[k] for k in keys}))
    quantization = read_converted_config(folder)["mlx_sora"].get("quantization")
    weights = {}
    for key in keys:
        module = key.rsplit(".", 1)[0]
        if key.endswith((".scales", ".biases")) and f"{module}.scales" in arrays:
            continue
        value = arrays[key]
        if key.endswith(".weight") and f"{module}.scales" in arrays and quantization is not None:
            value = mx.dequantize(value, arrays[f"{module}.scales"], arrays.get(f"{module}.biases"),
                                  group_size=quantization["group_size"], bits=quantization["bits"])
        weights[key] = np.array(value.astype(mx.float32))
    return weights


# ---------------------------------------------------------------------------- the plan of an export


@dataclass
class ExportPlan:
    """Everything decided before any unit is read: sizes, shapes, sampler, calibration inputs."""

    bundle: ModelBundle
    skeletons: dict[str, Any]
    sizes: list[VideoSize]
    request: GenerationRequest
    """The sampler settings and score suffixes (for the first size)."""
    precision: str
    compression: dict[str, str]
    budget: int | None
    profile: str | None

    @property
    def text_length(self) -> int:
        return self.skeletons["stdit3"].config.model_max_length

    def latent(self, size: VideoSize) -> tuple[int, int, int]:
        return tuple(self.skeletons["vae"].get_latent_size((size.num_frames, size.height, size.width)))

    def chunks(self, size: VideoSize) -> list[tuple[int, int, int]]:
        return self.skeletons["vae"].temporal_chunks(self.latent(size)[0], size.num_frames)


def check_size(size: VideoSize, vae: Any) -> None:
    factor = vae.spatial_factor
    if size.height % factor or size.width % factor:
        raise UserError(f"--sizes {size.name}: height and width must be multiples of {factor} (the VAE decodes "
                        f"{factor} pixels per latent pixel); e.g. {size.height // factor * factor or factor}x"
                        f"{size.width // factor * factor or factor}x{size.num_frames}")
    if not 1 <= size.num_frames <= 1024 or not 16 <= size.height <= 2048 or not 16 <= size.width <= 2048:
        raise UserError(f"--sizes {size.name}: frames must be 1-1024, height and width 16-2048 pixels")


# ---------------------------------------------------------------------------- calibration carries


def _apply_outputs(carry: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
    for name, value in outputs.items():
        carry[carry_name(name)] = value


def _calibration_carries(plan: ExportPlan, component: str, text: dict[str, np.ndarray]) -> dict[str, dict]:
    """The calibration inputs of a component's first unit, per calibration run."""
    if component == "text_encoder":
        tokenizer = T5Tokenizer.from_folder(plan.bundle.components["text_encoder"])
        tokens = tokenizer([plan.request.texts[0]], max_length=plan.text_length)
        return {"prompt": {"input_ids": tokens.input_ids.astype(np.int32),
                           "attention_mask": tokens.attention_mask.astype(np.int32)}}
    rng = np.random.default_rng(0)
    if component == "stdit3":
        latent = _calibration_latent(plan)
        smallest = min(plan.sizes, key=lambda s: s.height * s.width * s.num_frames)
        timesteps = sampling_timesteps(plan.request.sampler.num_steps, 1, *(
            mx.array([v], dtype=mx.float32) for v in (smallest.height, smallest.width, smallest.num_frames)))
        noise = rng.standard_normal((1, 4, *latent)).astype(np.float32)
        carries = {}
        for step in sorted({0, len(timesteps) // 2}):
            for variant in ("plain", "tdtm") if latent[0] >= 2 else ("plain",):
                carries[f"{variant}_t{step}"] = {
                    "latent": noise, "timestep": np.array(timesteps[step]).astype(np.float32),
                    "text_embedding": text["text_embedding"], "text_mask": text["attention_mask"],
                    "fps": np.array([plan.request.fps], np.float32)}
        return carries
    chunk_frames, h, w, frames = _vae_calibration_chunk(plan)
    return {"temporal": {"latent": rng.standard_normal((1, 4, chunk_frames, h, w)).astype(np.float32)}}


def _calibration_latent(plan: ExportPlan) -> tuple[int, int, int]:
    t, h, w = (min(plan.latent(s)[i] for s in plan.sizes) for i in range(3))
    return tuple(min(a, b) for a, b in zip((t, h, w), CALIBRATION_LATENT))


def _vae_calibration_chunk(plan: ExportPlan) -> tuple[int, int, int, int]:
    size = min(plan.sizes, key=lambda s: s.height * s.width * s.num_frames)
    start, end, frames = plan.chunks(size)[0]
    _, h, w = plan.latent(size)
    return end - start, min(h, CALIBRATION_LATENT[1]), min(w, CALIBRATION_LATENT[2]), frames


def _calibration_functions(plan: ExportPlan, component: str, unit: str,
                           weights: dict[str, np.ndarray]) -> list[UnitFunction]:
    config = plan.skeletons[component].config
    if component == "text_encoder":
        return coreml_t5.unit_functions(config, unit, weights, plan.text_length)
    if component == "stdit3":
        latent = _calibration_latent(plan)
        return coreml_stdit3.unit_functions(config, unit, weights, [(latent, (8 * latent[1], 8 * latent[2]))])
    chunk_frames, h, w, frames = _vae_calibration_chunk(plan)
    return coreml_vae.unit_functions(config, unit, weights, [(chunk_frames, h, w, frames)], [(h, w)])


def _pick(functions: list[UnitFunction], carry_key: str) -> UnitFunction:
    if carry_key.startswith("tdtm"):
        for fn in functions:
            if fn.name.endswith("_tdtm"):
                return fn
    return next(fn for fn in functions if not fn.name.endswith("_tdtm"))


# ---------------------------------------------------------------------------- the export


def _export_functions(plan: ExportPlan, component: str, unit: str, weights: dict[str, np.ndarray]) -> list[UnitFunction]:
    config = plan.skeletons[component].config
    if component == "text_encoder":
        return coreml_t5.unit_functions(config, unit, weights, plan.text_length)
    if component == "stdit3":
        sizes = [(plan.latent(s), (s.height, s.width)) for s in plan.sizes]
        return coreml_stdit3.unit_functions(config, unit, weights, sizes)
    chunks, spatial = [], []
    for s in plan.sizes:
        _, h, w = plan.latent(s)
        chunks += [(end - start, h, w, frames) for start, end, frames in plan.chunks(s)]
        spatial.append((h, w))
    return coreml_vae.unit_functions(config, unit, weights, chunks, spatial)


def component_chain(plan: ExportPlan, component: str) -> list[Unit]:
    model = plan.skeletons[component]
    if component == "vae":
        return [*model.temporal_decoder_units, *model.spatial_decoder_units]
    return list(model.units)


def export(plan: ExportPlan, out: Path, overwrite: bool = False,
           log: Callable[[str], None] = print) -> ExportResult:
    """Export every unit of ``plan`` into ``out`` (a new folder, or a previous export with ``overwrite``)."""
    ct = coremltools()
    sources = [Path(p) for p in plan.bundle.components.values()]
    target = check_output_folder(out, sources, overwrite=overwrite, is_ours=is_export_folder)
    start = time.perf_counter()
    result = ExportResult(target)
    records: dict[str, list[dict]] = {c: [] for c in COMPONENTS}
    with atomic_output_folder(target, is_ours=is_export_folder) as tmp:
        (tmp / "tokenizer").mkdir()
        shutil.copy2(Path(plan.bundle.components["text_encoder"]) / "spiece.model", tmp / "tokenizer" / "spiece.model")
        text_outputs: dict[str, np.ndarray] = {}
        for component in COMPONENTS:
            folder = Path(plan.bundle.components[component])
            (tmp / component).mkdir()
            carries = _calibration_carries(plan, component, text_outputs)
            for unit in component_chain(plan, component):
                unit_start = time.perf_counter()
                stages = {}
                weights = unit_weights(folder, plan.skeletons[component], unit)
                stages["read"] = time.perf_counter() - unit_start
                stats = ActivationStats()
                if component == "vae" and unit.name == "spatial_decoder_in":
                    carries["spatial"] = {"spatial_latent": carries.pop("temporal")["spatial_latents"][:, :, 0]}
                calibration = _calibration_functions(plan, component, unit.name, weights)
                for key, carry in carries.items():
                    fn = _pick(calibration, key)
                    _apply_outputs(carry, calibrate(fn, {i.name: carry[i.name] for i in fn.inputs}, stats))
                del calibration
                stages["calibrate"] = time.perf_counter() - unit_start - sum(stages.values())
                functions = _export_functions(plan, component, unit.name, weights)
                del weights
                model, built = convert_unit(functions, plan.precision, plan.compression[component],
                                            stats.unsafe_in_fp16())
                del functions
                stages["convert"] = time.perf_counter() - unit_start - sum(stages.values())
                file = Path(component) / f"{unit.name}.mlpackage"
                weight_bytes = save_model(model, tmp / file)
                del model
                gc.collect()
                stages["save"] = time.perf_counter() - unit_start - sum(stages.values())
                report = UnitReport(component, unit.name, built.functions, weight_bytes,
                                    time.perf_counter() - unit_start, stats.peak, stats.peak_op(), len(built.fp32_ops),
                                    stages)
                result.units.append(report)
                log(report.line())
                records[component].append({
                    "name": unit.name, "file": file.as_posix(), "weight_bytes": weight_bytes,
                    "functions": {name: {"inputs": built.inputs[name], "outputs": built.outputs[name]}
                                  for name in built.functions},
                    "float32_ops": built.fp32_ops, "max_abs_activation": stats.peak,
                })
            if component == "text_encoder":
                text_outputs = {**next(iter(carries.values()))}
        write_manifest(tmp, _manifest_data(plan, records, ct.__version__))
    result.seconds = time.perf_counter() - start
    result.process_peak = peak_process_memory()
    return result


# ---------------------------------------------------------------------------- the manifest


def _leap(sampler: SamplerConfig) -> int | str | None:
    if isinstance(sampler.leap, FixedLeap):
        return sampler.leap.step
    if isinstance(sampler.leap, DynamicLeap):
        return "dynamic"
    return None


def _size_entry(plan: ExportPlan, size: VideoSize, records: dict[str, list[dict]],
                planned: list[PlannedPhase] | str) -> dict[str, Any]:
    latent = plan.latent(size)
    t_lat, h, w = latent
    key = "x".join(map(str, latent))
    stdit = {"embedders": f"latent{key}_pixels{size.height}x{size.width}", "blocks": f"latent{key}",
             "final_layer": f"latent{key}"}
    if t_lat >= 2:
        stdit["blocks_tdtm"] = f"latent{key}_tdtm"
    chunks = []
    for start, end, frames in plan.chunks(size):
        name = f"latent{end - start}x{h}x{w}"
        chunks.append({"latent_frames": [start, end], "frames": frames, "function": name,
                       "out_function": f"{name}_frames{frames}"})
    timesteps = sampling_timesteps(plan.request.sampler.num_steps, 1, *(
        mx.array([v], dtype=mx.float32) for v in (size.height, size.width, size.num_frames)),
        use_discrete_timesteps=plan.request.sampler.use_discrete_timesteps)
    entry: dict[str, Any] = {
        "name": size.name, "height": size.height, "width": size.width, "num_frames": size.num_frames,
        "latent": list(latent), "functions": {"text_encoder": coreml_t5.FUNCTION, "stdit3": stdit,
                                              "vae": {"temporal_chunks": chunks, "spatial": f"latent{h}x{w}"}},
        "timesteps": [float(np.array(t)[0]) for t in timesteps],
    }
    if isinstance(planned, str):
        entry["ci_dl"] = {"budget_bytes": plan.budget, "fits": False, "error": planned}
    else:
        entry["ci_dl"] = {"budget_bytes": plan.budget, "fits": True, "phases": {
            PHASE_OF[p.component]: {"resident": list(p.plan.resident), "streamed": list(p.plan.streamed),
                                    "overlap": p.plan.overlap, "expected_peak_bytes": p.plan.expected_peak}
            for p in planned}}
    return entry


def _plan_units(plan: ExportPlan, records: dict[str, list[dict]], size: VideoSize) -> list[PlannedPhase] | str:
    """The CI-DL plan of one size for the export's budget, from the packages' weight bytes."""
    sizes = {c: {r["name"]: r["weight_bytes"] for r in records[c]} for c in COMPONENTS}

    def sizer(component: str, model: Any, chain: Sequence[Unit], uses: dict[str, int]) -> list[UnitSize]:
        return [UnitSize(u.name, sizes[component][u.name], sizes[component][u.name], uses.get(u.name, 1)) for u in chain]

    dtype = mx.float16 if plan.precision == "float16" else mx.float32
    for model in plan.skeletons.values():
        model.compute_dtype = dtype
    planner = GenerationPlanner(plan.skeletons, sizer, plan.budget, overlap=True, baseline=lambda: 0,
                                vae_settings=((1, None),))
    request = GenerationRequest.build(plan.request.prompts[0], steps=plan.request.sampler.num_steps,
                                      image_size=(size.height, size.width), num_frames=size.num_frames)
    try:
        return planner.plan(request)
    except MemoryBudgetError as e:
        return str(e)


def _manifest_data(plan: ExportPlan, records: dict[str, list[dict]], coremltools_version: str) -> dict[str, Any]:
    from .. import __version__

    sampler = plan.request.sampler
    sizes = []
    for size in plan.sizes:
        sizes.append(_size_entry(plan, size, records, _plan_units(plan, records, size)))
    return {
        "created_by": f"mlx-sora {__version__}, coremltools {coremltools_version}",
        "model": {"name": plan.bundle.name,
                  "components": {c: str(Path(p).resolve()) for c, p in plan.bundle.components.items()}},
        "minimum_deployment_target": str(deployment_target()).rsplit(".", 1)[-1],
        "precision": plan.precision,
        "compression": plan.compression,
        "device_profile": plan.profile,
        "tokenizer": {"file": "tokenizer/spiece.model", "max_length": plan.text_length,
                      "preprocessing": "Open-Sora 1.2: score suffixes (sampler.aes, sampler.flow) appended, "
                                       "then the caption cleaning (mlx_sora.prompts.text.prepare_prompt)"},
        "text_length": plan.text_length,
        "carry": "a unit takes its inputs from the carry by name; its output X_out replaces X, other outputs "
                 "join the carry by name",
        "phases": {
            "text_encoding": {"component": "text_encoder", "units": records["text_encoder"]},
            "denoising": {"component": "stdit3", "units": records["stdit3"],
                          "note": "per step: embedders, every block (the _tdtm function while TDTM merges), "
                                  "final_layer; rows of the prediction: conditional, unconditional"},
            "decoding": {"component": "vae",
                         "temporal": [r for r in records["vae"] if r["name"].startswith(("latent", "temporal"))],
                         "spatial": [r for r in records["vae"] if r["name"].startswith("spatial")],
                         "note": "per temporal chunk of the latent: the temporal chain gives spatial_latents "
                                 "[1, 4, frames, h, w]; each of its frames then goes through the spatial chain "
                                 "as spatial_latent [1, 4, h, w] and gives image [1, 3, 8h, 8w] in [-1, 1]"},
        },
        "sampler": {
            "num_steps": sampler.num_steps, "cfg_scale": sampler.cfg_scale, "lpl_step": _leap(sampler),
            "tdtm_steps": sampler.tdtm_steps, "num_timesteps": sampler.num_timesteps,
            "use_timestep_transform": sampler.use_timestep_transform,
            "use_discrete_timesteps": sampler.use_discrete_timesteps, "fps": plan.request.fps,
            "aes": plan.bundle.defaults.aes, "flow": plan.bundle.defaults.flow,
            "rule": "v = uncond + cfg_scale * (cond - uncond) (rows 0 and 1 of the prediction); "
                    "z += v * (t_i - t_{i+1}) / num_timesteps (the last step and a leap: z += v * t_i / num_timesteps)",
        },
        "sizes": sizes,
    }
