"""Text -> video: T5 text encoding, rectified-flow denoising with STDiT3, VAE decoding.

Follows Open-Sora 1.2's ``scripts/inference.py``: prompt preprocessing and score suffixes, resolution
buckets and frame presets, fps/size conditioning, classifier-free guidance with the learned null
caption. Each phase loads its model, runs, and (unless ``keep_loaded``) releases it, so the peak is
that of the largest phase; every generation reports seconds and peak memory per phase.
"""

from __future__ import annotations

import gc
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from . import aspect
from .checkpoint import CheckpointError
from .loading import load_model, parse_dtype, read_converted_config
from .models import family_for_type
from .memory import PhaseReport, measure_phase
from .models.units import run_units
from .sampling import (
    IMG_FPS,
    DynamicLeap,
    FixedLeap,
    SamplerConfig,
    SamplingReport,
    iterate_sampling,
    sampling_timesteps,
)
from .text import prepare_prompt
from .tokenizer import T5Tokenizer
from .video import to_uint8_frames

COMPONENTS = {"t5": "text_encoder", "stdit3": "stdit3", "vae": "vae"}

PRESETS: dict[str, dict[str, str]] = {
    "opensora-v1.2": {
        "text_encoder": "DeepFloyd/t5-v1_1-xxl",
        "stdit3": "hpcai-tech/OpenSora-STDiT-v3",
        "vae": "hpcai-tech/OpenSora-VAE-v1.2",
    },
}
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
TEXT_MAX_LENGTH = 300  # Open-Sora 1.2 pads/truncates every prompt to 300 T5 tokens


def default_compute_dtype() -> mx.Dtype:
    """float32 on CPU (MLX's CPU bf16 matmul is slow), bfloat16 on a GPU."""
    return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32


def find_components(root: str | Path) -> dict[str, Path]:
    """The converted sub-folders of a model folder, keyed text_encoder / stdit3 / vae."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"model folder {root} does not exist")
    found: dict[str, Path] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        config = sub / "config.json"
        if config.exists():
            values = json.loads(config.read_text())
            if values.get("model_type") in COMPONENTS and "mlx_sora" in values:
                found[COMPONENTS[values["model_type"]]] = sub
    missing = [c for c in COMPONENTS.values() if c not in found]
    if missing:
        raise CheckpointError(
            f"{root} lacks converted {', '.join(missing)} weights; a model folder holds one converted "
            "sub-folder per component (python -m mlx_sora.convert --hf-path ... --mlx-path "
            f"{root}/<component>)"
        )
    return found


def prepare_preset(name: str, weights_dir: str | Path = DEFAULT_WEIGHTS_DIR, dtype: str = "bfloat16") -> Path:
    """Convert a preset's Hugging Face checkpoints once into ``weights_dir/name`` and reuse them."""
    from .conversion import convert

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
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


def resolve_model(model: str | Path) -> dict[str, Path]:
    if str(model) in PRESETS:
        return find_components(prepare_preset(str(model)))
    return find_components(model)


@dataclass
class GenerationResult:
    videos: list[np.ndarray]
    """One [T, H, W, 3] uint8 array per prompt."""
    prompts: list[str]
    """The prompts as the text encoder saw them (cleaned, with score suffixes)."""
    seed: int
    fps: int
    phases: list[PhaseReport] = field(default_factory=list)
    sampling: SamplingReport = field(default_factory=SamplingReport)
    latent_shape: tuple[int, ...] = ()
    latent: mx.array | None = None
    """The denoised latent [B, 4, T', H', W'] the videos were decoded from."""

    def summary(self) -> str:
        lines = [p.summary() for p in self.phases]
        s = self.sampling
        leap = f", leapt at step {s.leap_step}" if s.leap_step is not None else ""
        lines.append(f"model evaluations {s.evaluations}{leap}, {s.seconds_per_step:.2f} s/step")
        return "\n".join(lines)


def _parse_leap(lpl: int | str | None) -> FixedLeap | DynamicLeap | None:
    if lpl is None or lpl is False:
        return None
    if isinstance(lpl, (FixedLeap, DynamicLeap)):
        return lpl
    if isinstance(lpl, str):
        if lpl == "dynamic":
            return DynamicLeap()
        if not lpl.isdigit():
            raise ValueError(f"lpl must be a step number or 'dynamic', got {lpl!r}")
    return FixedLeap(int(lpl))  # SamplerConfig checks it against the number of steps


class Pipeline:
    """Open-Sora 1.2 text-to-video on MLX.

    >>> pipe = Pipeline.from_pretrained("weights/opensora-v1.2")
    >>> result = pipe.generate("a red panda eating bamboo", num_frames=51, seed=1)
    >>> result.videos[0].shape   # (51, 240, 426, 3)
    """

    def __init__(self, components: dict[str, Path], dtype: str | mx.Dtype | None = None, keep_loaded: bool = False):
        self.components = components
        self.dtype = parse_dtype(dtype) or default_compute_dtype()
        self.keep_loaded = keep_loaded
        self.tokenizer = T5Tokenizer.from_folder(components["text_encoder"])
        self._loaded: dict[str, nn.Module] = {}
        self._latent_sizer: nn.Module | None = None

    @classmethod
    def from_pretrained(cls, model: str | Path, dtype: str | mx.Dtype | None = None, keep_loaded: bool = False) -> "Pipeline":
        """A model folder (converted sub-folders text_encoder/stdit3/vae) or a preset name."""
        return cls(resolve_model(model), dtype=dtype, keep_loaded=keep_loaded)

    # ------------------------------------------------------------ models, loaded per phase

    def _model(self, component: str) -> nn.Module:
        if component not in self._loaded:
            self._loaded[component] = load_model(self.components[component], dtype=self.dtype)
        return self._loaded[component]

    def _release(self, component: str) -> None:
        if not self.keep_loaded and component in self._loaded:
            del self._loaded[component]
            gc.collect()
            mx.clear_cache()

    # ------------------------------------------------------------ phases

    def encode_text(self, prompts: Sequence[str], progress: bool = False) -> tuple[mx.array, mx.array]:
        """Prompts (already preprocessed) -> (y [B, 1, 300, C], mask [B, 300])."""
        tokens = self.tokenizer(list(prompts), max_length=TEXT_MAX_LENGTH)
        for prompt, count in zip(prompts, tokens.num_tokens):
            if count > TEXT_MAX_LENGTH:
                warnings.warn(
                    f"prompt is {count} tokens long; T5 sees only the first {TEXT_MAX_LENGTH} "
                    f"(truncated like the reference): {prompt[:60]!r}...", stacklevel=3
                )
        encoder = self._model("text_encoder")
        inputs = encoder.check_inputs(tokens.input_ids, tokens.attention_mask)
        with tqdm(total=len(encoder.units), desc="text encoding", disable=not progress, leave=False) as bar:
            y = run_units(encoder.units, inputs, evaluate=True, on_unit=lambda _: bar.update())
        return y[:, None], inputs[1]

    def generate(
        self,
        prompt: str | Sequence[str],
        resolution: str = "240p",
        aspect_ratio: str = "9:16",
        num_frames: str | int = "2s",
        fps: int = 24,
        steps: int = 30,
        cfg_scale: float = 7.0,
        seed: int | Sequence[int] = 42,
        aes: float | None = 6.5,
        flow: float | None = None,
        camera_motion: str | None = None,
        lpl: int | str | FixedLeap | DynamicLeap | None = None,
        tdtm_steps: int = 0,
        discrete_timesteps: bool = False,
        progress: bool = False,
    ) -> GenerationResult | list[GenerationResult]:
        """Generate one video per prompt (a list of results when ``seed`` is a list)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        seeds = [seed] if isinstance(seed, int) else list(seed)
        if not prompts or any(not p or not p.strip() for p in prompts):
            raise ValueError("the prompt is empty: describe the video to generate")
        if not seeds:
            raise ValueError("give at least one seed")
        height, width = aspect.image_size(resolution, aspect_ratio)
        frames = aspect.num_frames(num_frames)
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        config = SamplerConfig(
            num_steps=steps, cfg_scale=cfg_scale, use_discrete_timesteps=discrete_timesteps,
            leap=_parse_leap(lpl), tdtm_steps=tdtm_steps,
        )
        texts = [prepare_prompt(p, aes=aes, flow=flow, camera_motion=camera_motion) for p in prompts]

        phases: list[PhaseReport] = []
        with measure_phase("text encoding") as phase:
            y, text_mask = self.encode_text(texts, progress=progress)
            self._release("text_encoder")
        phases.append(phase)

        # each model is loaded once for all seeds: denoise every seed, then decode every latent
        results = [GenerationResult([], texts, s, fps, list(phases)) for s in seeds]
        for result in results:
            with measure_phase("denoising") as phase:
                latent = self._denoise(result, y, text_mask, height, width, frames, fps, config, progress)
            result.phases.append(phase)
            result.latent = latent
        self._release("stdit3")
        for result in results:
            with measure_phase("decoding") as phase:
                result.videos = self._decode(result.latent, frames, progress)
            result.phases.append(phase)
        self._release("vae")
        return results[0] if isinstance(seed, int) else results

    def _denoise(
        self, result: GenerationResult, y: mx.array, text_mask: mx.array, height: int, width: int,
        frames: int, fps: int, config: SamplerConfig, progress: bool,
    ) -> mx.array:
        batch = y.shape[0]
        latent_t, latent_h, latent_w = self.latent_size(frames, height, width)
        z = mx.random.normal((batch, 4, latent_t, latent_h, latent_w), key=mx.random.key(result.seed))
        result.latent_shape = tuple(z.shape)
        model = self._model("stdit3")
        cond = [mx.array([v] * batch, dtype=self.dtype) for v in (height, width, frames)]
        fps_cond = mx.array([fps if frames > 1 else IMG_FPS] * batch, dtype=self.dtype)
        y_in = mx.concatenate([y.astype(self.dtype), model.null_caption(batch).astype(self.dtype)], axis=0)
        timesteps = sampling_timesteps(config.num_steps, batch, *cond,
                                       use_discrete_timesteps=config.use_discrete_timesteps)

        def denoise(z_in: mx.array, t_in: mx.array, merge: bool) -> mx.array:
            inputs = dict(x=z_in.astype(self.dtype), timestep=t_in, y=y_in, mask=text_mask, fps=fps_cond,
                          height=cond[0], width=cond[1], merge=merge)
            return run_units(model.units, inputs, evaluate=True)

        bar = tqdm(total=config.num_steps, desc=f"denoising (seed {result.seed})", disable=not progress, leave=False)
        for z, info in iterate_sampling(denoise, z, timesteps, config, result.sampling):
            bar.update(config.num_steps - bar.n if info.leapt else 1)
        bar.close()
        if not mx.isfinite(z).all().item():
            raise FloatingPointError(
                "sampling produced non-finite latents (NaN/inf); with float16 compute try "
                "--dtype bfloat16 or float32"
            )
        return z

    def _decode(self, z: mx.array, frames: int, progress: bool) -> list[np.ndarray]:
        vae = self._model("vae")
        chunks = []
        for chunk in tqdm(vae.decode_chunks(z.astype(self.dtype), num_frames=frames), desc="decoding",
                          disable=not progress, leave=False):
            chunks.append(np.array(chunk.astype(mx.float32)))
        video = np.concatenate(chunks, axis=2)  # [B, 3, T, H, W]
        return [to_uint8_frames(v) for v in video]

    def latent_size(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Latent (T, H, W) of a video size, from the VAE's config (building it allocates nothing)."""
        if self._latent_sizer is None:
            config = read_converted_config(self.components["vae"])
            self._latent_sizer = family_for_type("vae").build(config)
        return tuple(self._latent_sizer.get_latent_size((frames, height, width)))
