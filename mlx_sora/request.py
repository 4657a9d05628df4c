"""One validated generation request: every option checked once, before any model is loaded.

The CLI and ``Pipeline.generate`` both build a ``GenerationRequest``; a bad option raises
``UserError`` naming it. Options left as None take the model's defaults (``GenerationDefaults``:
Open-Sora 1.2's for the real model, the trained size for the demo model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from . import aspect
from .conditioning import ConditioningSpec, build_conditioning, release_latent_frames
from .conversion.registry import GenerationDefaults
from .errors import UserError
from .prompts.text import prepare_prompt, split_prompt, text_preprocessing
from .sampling import DynamicLeap, FixedLeap, SamplerConfig

MAX_SIDE = 2048  # pixels; Open-Sora 1.2's largest bucket is 720p 16:9 = 1280 wide
MAX_FRAMES = 1024  # the longest preset is 32s = 816 frames
MAX_STEPS = 1000
SEED_LIMIT = 2**64  # mx.random.key takes an unsigned 64-bit seed


@dataclass(frozen=True)
class GenerationRequest:
    prompts: tuple[str, ...]
    """As given."""
    texts: tuple[str, ...]
    """As the text encoder sees them: cleaned, with the score suffixes."""
    height: int
    width: int
    num_frames: int
    fps: int
    seeds: tuple[int, ...]
    sampler: SamplerConfig
    warnings: tuple[str, ...] = ()
    """Things the user should know (e.g. a size the demo model was not trained for)."""
    conditioning: ConditioningSpec | None = None
    """References, mask strategies and loops (None: text-to-video)."""

    @classmethod
    def build(
        cls,
        prompt: str | Sequence[str],
        defaults: GenerationDefaults = GenerationDefaults(),
        resolution: str | None = None,
        aspect_ratio: str | None = None,
        image_size: tuple[int, int] | None = None,
        num_frames: str | int | None = None,
        fps: int | None = None,
        steps: int | None = None,
        cfg_scale: float | None = None,
        seed: int | Sequence[int] = 42,
        aes: float | None | str = "default",
        flow: float | None | str = "default",
        camera_motion: str | None = None,
        lpl: int | str | FixedLeap | DynamicLeap | None = None,
        tdtm_steps: int = 0,
        discrete_timesteps: bool = False,
        model_name: str = "this model",
        references=None,
        mask_strategy: str | Sequence[str] | None = None,
        loop: int = 1,
        condition_frame_length: int = 5,
        condition_frame_edit: float = 0.0,
        align: int | None = None,
        latent_frames: Callable[[int], int] = release_latent_frames,
        prompt_names: Sequence[str] | None = None,
    ) -> "GenerationRequest":
        prompts = (prompt,) if isinstance(prompt, str) else tuple(prompt)
        if not prompts:
            raise UserError("no prompt given: describe the video to generate (--prompt)")
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise UserError("--prompt is empty: describe the video to generate")
        height, width = _size(resolution, aspect_ratio, image_size, defaults)
        frames = _frames(num_frames, defaults)
        # --- reference conditioning (issue 19): embedded JSON leaves the prompts; references are read here
        given = prompts
        prompts, conditioning = build_conditioning(
            prompts, (height, width), frames, references, mask_strategy, loop, condition_frame_length,
            condition_frame_edit, align, latent_frames, prompt_names)
        prompts = tuple(prompts)
        fps = defaults.fps if fps is None else fps
        _int_in("--fps", fps, 1, 240)
        steps = defaults.steps if steps is None else steps
        _int_in("--steps", steps, 1, MAX_STEPS)
        cfg_scale = defaults.cfg_scale if cfg_scale is None else cfg_scale
        _finite("--cfg-scale", cfg_scale)
        aes = defaults.aes if aes == "default" else aes
        flow = defaults.flow if flow == "default" else flow
        for name, value in (("--aes", aes), ("--flow", flow)):
            if value is not None:
                _finite(name, value)
        seeds = (seed,) if isinstance(seed, int) and not isinstance(seed, bool) else tuple(seed)
        if not seeds:
            raise UserError("--seed: give at least one seed")
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < SEED_LIMIT:
                raise UserError(f"--seed {s!r} is out of range: seeds are integers from 0 to 2**64 - 1")
        if len(set(seeds)) != len(seeds):
            raise UserError("--seed lists the same seed twice")
        _int_in("--tdtm-steps", tdtm_steps, 0, MAX_STEPS)
        try:
            sampler = SamplerConfig(num_steps=steps, cfg_scale=float(cfg_scale), leap=parse_leap(lpl),
                                    tdtm_steps=tdtm_steps, use_discrete_timesteps=discrete_timesteps)
        except ValueError as e:
            raise UserError(f"--lpl-step / --steps: {e}") from e
        texts = []
        for p in prompts:
            try:
                segments, _ = split_prompt(p)
            except ValueError as e:
                raise UserError(f"--prompt: {e}") from e
            if any(not text_preprocessing(segment).strip() for segment in segments):
                raise UserError(
                    f"--prompt {p!r} is empty after Open-Sora's caption cleaning (which removes markup, "
                    "punctuation runs, URLs, ...): describe the video in words"
                )
            texts.append(prepare_prompt(p, aes=aes, flow=flow, camera_motion=camera_motion))
        warnings = []
        if defaults.trained_sizes and (height, width) not in defaults.trained_sizes:
            trained = ", ".join(f"{h}x{w}" for h, w in defaults.trained_sizes)
            warnings.append(f"{model_name} was trained at {trained} (height x width), not {height}x{width}: "
                            "expect poor videos")
        if defaults.trained_frames and frames not in defaults.trained_frames:
            trained = ", ".join(str(n) for n in defaults.trained_frames)
            warnings.append(f"{model_name} was trained on {trained} frames, not {frames}: expect poor videos")
        warnings.extend(conditioning.notes if conditioning is not None else ())
        return cls(given, tuple(texts), height, width, frames, fps, seeds, sampler, tuple(warnings), conditioning)


def parse_leap(lpl: int | str | FixedLeap | DynamicLeap | None) -> FixedLeap | DynamicLeap | None:
    if lpl is None or lpl is False:
        return None
    if isinstance(lpl, (FixedLeap, DynamicLeap)):
        return lpl
    if isinstance(lpl, str):
        if lpl == "dynamic":
            return DynamicLeap()
        if not lpl.isdigit():
            raise UserError(f"--lpl must be a step number or 'dynamic', got {lpl!r}")
    if isinstance(lpl, bool) or not isinstance(lpl, (int, str)):
        raise UserError(f"lpl must be a step number or 'dynamic', got {lpl!r}")
    return FixedLeap(int(lpl))  # SamplerConfig checks it against the number of steps


def _size(resolution: str | None, aspect_ratio: str | None, image_size: tuple[int, int] | None,
          defaults: GenerationDefaults) -> tuple[int, int]:
    if image_size is not None:
        if resolution is not None or aspect_ratio is not None:
            raise UserError("give either --image-size or --resolution/--aspect-ratio, not both")
        if len(image_size) != 2:
            raise UserError(f"--image-size takes HEIGHT WIDTH, got {image_size!r}")
        height, width = image_size
    elif resolution is None and aspect_ratio is None:
        height, width = defaults.height, defaults.width
    else:
        resolution = resolution or "240p"
        if resolution not in aspect.IMAGE_SIZES:
            raise UserError(f"--resolution {resolution!r} is unknown; choose one of {', '.join(aspect.IMAGE_SIZES)}")
        buckets = aspect.IMAGE_SIZES[resolution]
        if aspect_ratio is None:
            aspect_ratio = "9:16" if "9:16" in buckets else next(iter(buckets))
        try:
            height, width = aspect.image_size(resolution, aspect_ratio)
        except ValueError as e:
            raise UserError(f"--aspect-ratio: {e}") from e
    _int_in("--image-size height", height, 16, MAX_SIDE)
    _int_in("--image-size width", width, 16, MAX_SIDE)
    return height, width


def _frames(num_frames: str | int | None, defaults: GenerationDefaults) -> int:
    if num_frames is None:
        return defaults.num_frames
    try:
        frames = aspect.num_frames(num_frames)
    except ValueError as e:
        raise UserError(f"--num-frames: {e}") from e
    _int_in("--num-frames", frames, 1, MAX_FRAMES)
    return frames


def _int_in(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise UserError(f"{name} must be between {low} and {high}, got {value}")


def _finite(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value!r}")
