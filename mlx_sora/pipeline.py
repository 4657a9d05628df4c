"""Text -> video: T5 text encoding, rectified-flow denoising with STDiT3, VAE decoding.

Follows Open-Sora 1.2's ``scripts/inference.py``: prompt preprocessing and score suffixes, fps/size
conditioning, classifier-free guidance with the learned null caption. This module orchestrates; what
a model name means lives in ``conversion/registry.py``, option checks in ``request.py``, the memory
plan of the phases in ``planning.py``, and the unit-by-unit execution within a memory budget (CI-DL)
in ``runtime/streaming.py``.

Each phase runs one model, unit by unit, and releases it, so the peak is that of the largest phase.
With a memory budget (the default: 80 % of the available memory), each phase is planned before any
heavy work: which units stay resident and which are streamed (read before use, evicted after, the
next one read while the current one computes), and for decoding the VAE's micro-batch and tiling.
Every generation reports seconds, MLX peak memory and the process's peak per phase, as its OS
counts it (max RSS on Linux, peak physical footprint on macOS).
"""

from __future__ import annotations

import gc
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from .conversion.loading import build_model, load_model
from .conversion.registry import GenerationDefaults, ModelBundle, resolve_model
from .io.video import to_uint8_frames
from .models.stdit3_layers import chunked_layers
from .models.units import Unit, run_units
from .parallel import JobReport, ParallelGeneration
from .planning import GenerationPlanner, PlannedPhase, folder_unit_sizes
from .prompts.tokenizer import T5Tokenizer
from .request import GenerationRequest
from .runtime.distributed import DEFAULT_TIMEOUT, RankGroup
from .runtime.memory import PhaseReport, measure_phase, os_memory, release_freed_cpu_memory
from .runtime.precision import compute_dtypes, describe_dtypes, full_float32_matmuls
from .runtime.streaming import (
    PhasePlan,
    StreamingWeights,
    default_memory_budget,
    format_bytes,
    parse_memory_size,
)
from .sampling import IMG_FPS, SamplingReport, iterate_sampling, sampling_timesteps

if TYPE_CHECKING:
    from .prompts.refine import RefinerSettings


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
    plans: list[PhasePlan] = field(default_factory=list)
    memory_budget: int | None = None
    warnings: list[str] = field(default_factory=list)
    refined_prompts: list[str] = field(default_factory=list)
    """--refine-prompt: the prompts as the LLM rewrote them (before cleaning and score suffixes)."""
    loops: int = 1
    """Reference conditioning: clips made one after the other, each extending the previous one."""
    loop_videos: list[list[np.ndarray]] = field(default_factory=list)
    """With loops: every loop's whole clip per prompt ([loop][prompt] uint8 [T, H, W, 3]), overlap included."""
    job: JobReport | None = None
    """Across ranks (``group=``): what every rank did (``parallel.py``)."""
    precision: str = ""
    """The compute dtypes and what float32 means here (TF32 off or not)."""

    @property
    def process_peak(self) -> int:
        """The process's peak memory as its OS counts it (max RSS / peak footprint)."""
        return max((p.process_peak for p in self.phases), default=0)

    @property
    def process_peak_name(self) -> str:
        return self.phases[0].process_peak_name if self.phases else os_memory().peak_name

    @property
    def within_budget(self) -> bool | None:
        """Whether the process's peak stayed within the memory budget (None without a budget)."""
        return None if self.memory_budget is None else self.process_peak <= self.memory_budget

    def summary(self) -> str:
        lines = [p.summary() for p in self.phases]
        s = self.sampling
        leap = f", leapt at step {s.leap_step}" if s.leap_step is not None else ""
        lines.append(f"model evaluations {s.evaluations}{leap}, {s.seconds_per_step:.2f} s/step")
        if self.precision:
            lines.append(self.precision)
        if self.memory_budget is not None:
            verdict = "within" if self.within_budget else "OVER"
            lines.append(f"process {self.process_peak_name} {format_bytes(self.process_peak)}: {verdict} the memory "
                         f"budget {format_bytes(self.memory_budget)}")
        if self.job is not None:
            lines.append(self.job.summary())
        return "\n".join(lines)


class Pipeline:
    """Open-Sora 1.2 text-to-video on MLX.

    >>> pipe = Pipeline.from_pretrained()                        # the embedded demo model
    >>> result = pipe.generate("a red circle moving left", seed=1)
    >>> pipe = Pipeline.from_pretrained("weights/opensora-v1.2", memory_budget="3.3GB")
    >>> result = pipe.generate("a red panda eating bamboo", num_frames=51, seed=1)
    >>> result.videos[0].shape   # (51, 240, 424, 3)
    """

    def __init__(
        self,
        model: ModelBundle | dict[str, Path],
        dtype: str | mx.Dtype | None = None,
        memory_budget: str | int | None = "auto",
        overlap: bool = True,
        keep_loaded: bool = False,
        text_dtype: str | mx.Dtype | None = None,
        group: mx.distributed.Group | RankGroup | None = None,
        parallel: str = "data",
        rank_timeout: float = DEFAULT_TIMEOUT,
    ):
        """``group`` (``mx.distributed.init()``, on every rank of a job started by mlx.launch): run each
        request across the ranks, ``parallel`` being "data", "cfg" or "sequence" (``parallel.py``);
        a rank waits at most ``rank_timeout`` seconds for the others."""
        self.parallel = ParallelGeneration.create(group, parallel, rank_timeout)
        self.bundle = model if isinstance(model, ModelBundle) else ModelBundle("custom", dict(model))
        self.components = self.bundle.components
        self.defaults: GenerationDefaults = self.bundle.defaults
        # each component's compute dtype (runtime/precision.py); float32 on a GPU with TF32 off
        self.dtypes = compute_dtypes(dtype, text_dtype)
        self.precision = f"compute: {describe_dtypes(self.dtypes)}"
        if mx.float32 in self.dtypes.values():
            self.precision += f"; {full_float32_matmuls()}"
        self.memory_budget = default_memory_budget() if memory_budget == "auto" else parse_memory_size(memory_budget)
        self.overlap = overlap
        self.keep_loaded = keep_loaded
        self.tokenizer = T5Tokenizer.from_folder(self.components["text_encoder"])
        # skeletons (lazy parameters, nothing allocated) for sizes, units and memory estimates
        self._skeletons = {c: build_model(p) for c, p in self.components.items()}
        for component, model_ in self._skeletons.items():
            model_.compute_dtype = self.dtypes[component]
        self.text_length = self._skeletons["stdit3"].config.model_max_length
        self.planner = GenerationPlanner(self._skeletons, folder_unit_sizes(self.components, self.dtypes),
                                         self.memory_budget, overlap)
        self._loaded: dict[str, nn.Module] = {}

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path | None = None,
        dtype: str | mx.Dtype | None = None,
        memory_budget: str | int | None = "auto",
        overlap: bool = True,
        keep_loaded: bool = False,
        prefer_quantized: bool = False,
        text_dtype: str | mx.Dtype | None = None,
        group: mx.distributed.Group | RankGroup | None = None,
        parallel: str = "data",
        rank_timeout: float = DEFAULT_TIMEOUT,
    ) -> "Pipeline":
        """``model``: None / "demo" (embedded), a preset ("opensora-v1.2") or a folder of converted
        weights. ``dtype``: every component's compute dtype (default: float32 on the CPU; on a GPU
        bfloat16, T5 float32), ``text_dtype``: T5's. ``memory_budget``: "auto" (80 % of the
        available memory), a size ("3.3GB", "800MB", bytes) or None (each phase loads its whole
        model). ``prefer_quantized``: use a quantized text encoder where the folder has one.
        ``group`` / ``parallel`` / ``rank_timeout``: across ranks (see ``__init__``)."""
        return cls(resolve_model(model, prefer_quantized), dtype=dtype, memory_budget=memory_budget,
                   overlap=overlap, keep_loaded=keep_loaded, text_dtype=text_dtype, group=group, parallel=parallel,
                   rank_timeout=rank_timeout)

    @staticmethod
    def from_coreml(folder: str | Path, backend: str = "auto", compute_units: str = "cpu_and_gpu",
                    memory_budget: str | None = "plan", overlap: bool = True):
        """The Core ML units exported into ``folder`` (``python -m mlx_sora.export_coreml``), run by Core ML
        on macOS (``compute_units``: cpu_and_gpu, all, cpu_only) and replayed op by op elsewhere; the same
        ``generate`` (``coreml.pipeline.CoreMLPipeline``). ``memory_budget``: "plan" (the export's CI-DL
        plan) or None (every unit resident)."""
        from .coreml.pipeline import CoreMLPipeline

        return CoreMLPipeline(folder, backend=backend, compute_units=compute_units, memory_budget=memory_budget,
                              overlap=overlap)

    # ------------------------------------------------------------ sizes and plans

    def latent_size(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Latent (T, H, W) of a video size, from the VAE's config."""
        return self.planner.latent_size(frames, height, width)

    def plan(self, request: GenerationRequest) -> list[PlannedPhase]:
        """Plan the three phases for a request (raises MemoryBudgetError before any heavy work);
        across ranks, the phases this rank runs, for its share of the work."""
        if self.parallel is not None:
            return self.parallel.plan(self, request)
        return self.planner.plan(request)

    # ------------------------------------------------------------ models, per phase

    def _in_phase(self, phase: PlannedPhase, report: PhaseReport, work, cyclic: bool = False):
        """Open the phase's model (resident, or lazily with a streaming weight policy), run
        ``work(model, weights)``, then release everything the phase held."""
        folder, dtype = self.components[phase.component], self.dtypes[phase.component]
        weights = None
        if phase.plan.budget is None:
            if phase.component not in self._loaded:
                start = time.perf_counter()
                self._loaded[phase.component] = load_model(folder, dtype=dtype)
                report.load_wait = time.perf_counter() - start  # the whole model, before any compute
            model = self._loaded[phase.component]
        else:
            model = load_model(folder, dtype=dtype, lazy=True)
            weights = StreamingWeights(model, folder, phase.plan, dtype, cyclic=cyclic)
            # MLX keeps freed buffers for reuse: what the budget leaves, at least a unit's worth
            mx.set_cache_limit(phase.plan.cache_limit())
        try:
            return work(model, weights)
        finally:
            del model
            if weights is not None:
                weights.close()
                report.loads, report.load_wait = weights.stats.loads, weights.stats.waited
                report.read_bytes = weights.stats.bytes_read
                report.load_wait_by_unit = dict(weights.stats.waited_by_unit)
            if not self.keep_loaded:
                self._loaded.pop(phase.component, None)
            gc.collect()
            mx.clear_cache()
            release_freed_cpu_memory()

    # ------------------------------------------------------------ phases

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        tokens = self.tokenizer(list(texts), max_length=self.text_length)
        for text, count in zip(texts, tokens.num_tokens):
            if count > self.text_length:
                warnings.warn(
                    f"prompt is {count} tokens long; T5 sees only the first {self.text_length} "
                    f"(truncated like the reference): {text[:60]!r}...", stacklevel=4
                )
        return tokens.input_ids, tokens.attention_mask

    def encode_text(self, texts: Sequence[str], phase: PlannedPhase, report: PhaseReport,
                    progress: bool = False) -> tuple[mx.array, mx.array]:
        """Prompts (already preprocessed) -> (y [B, 1, L, C], mask [B, L])."""
        input_ids, attention_mask = self.tokenize(texts)

        def work(encoder: nn.Module, weights: StreamingWeights | None) -> tuple[mx.array, mx.array]:
            inputs = encoder.check_inputs(input_ids, attention_mask)
            with tqdm(total=len(encoder.units), desc="text encoding", disable=not progress, leave=False) as bar:
                y = run_units(encoder.units, inputs, weights, evaluate=True, on_unit=lambda _: bar.update())
            return y[:, None], inputs[1]

        return self._in_phase(phase, report, work)

    def generate(self, prompt: str | Sequence[str], progress: bool = False, **options) -> (
            GenerationResult | list[GenerationResult] | None):
        """Generate one video per prompt (a list of results when ``seed`` is a list).

        Options (None = the model's default): ``resolution``/``aspect_ratio`` (Open-Sora buckets) or
        ``image_size=(height, width)``, ``num_frames`` (int or "2s"...), ``fps``, ``steps``,
        ``cfg_scale``, ``seed`` (int or list), ``aes``, ``flow``, ``camera_motion``, ``lpl`` (step or
        "dynamic"), ``tdtm_steps``, ``discrete_timesteps``, ``refine_prompt`` (True or an mlx-lm model:
        rewrite the prompts with a local LLM first).

        Reference conditioning (Open-Sora 1.2's modes): ``references`` (paths, ';'-joined paths or
        uint8 frames; one entry per prompt, or a list for a single prompt), ``mask_strategy``
        ("loop,reference,reference_start,target_start,length,edit_ratio;..."), ``loop`` with
        ``condition_frame_length`` (latent frames, a multiple of 5) and ``condition_frame_edit``,
        ``align``. See ``conditioning.py``.
        """
        seed = options.get("seed", 42)
        options.setdefault("latent_frames", self._skeletons["vae"].latent_frames)  # reference conditioning
        refine = options.pop("refine_prompt", None)
        request = GenerationRequest.build(prompt, self.defaults, model_name=f"the {self.bundle.name} model",
                                          **options)
        refinement = None
        if refine:  # a phase of its own before text encoding; the request is rebuilt from its prompts
            refinement = self.refine_prompts(list(request.prompts), seed if isinstance(seed, int) else seed[0], refine)
            request = GenerationRequest.build(refinement[0], self.defaults,
                                              model_name=f"the {self.bundle.name} model", **options)
        for message in request.warnings:
            warnings.warn(message, stacklevel=2)
        results = self.run(request, progress)
        if refinement is not None:
            for result in results:
                result.phases.insert(0, refinement[1])
                result.plans.insert(0, refinement[2])
                result.refined_prompts = list(refinement[0])
        if isinstance(seed, int):  # across ranks (data), a rank without the seed gets None
            return results[0] if results else None
        return results

    def refine_prompts(self, prompts: Sequence[str], seed: int, refine: "str | bool | RefinerSettings" = True,
                       on_refined=None, on_plan=None) -> tuple[list[str], PhaseReport, PhasePlan]:
        """--refine-prompt: rewrite prompts with a local mlx-lm model (``prompts/refine.py``), planned
        within the memory budget and released before text encoding; (prompts, report, plan)."""
        from .prompts.refine import DEFAULT_REFINER, RefinerSettings, refine_prompts

        settings = refine if isinstance(refine, RefinerSettings) else RefinerSettings(
            model=refine if isinstance(refine, str) else DEFAULT_REFINER)
        return refine_prompts(prompts, seed, self.memory_budget, settings, on_refined, on_plan)

    def run(self, request: GenerationRequest, progress: bool = False) -> list[GenerationResult]:
        """Run a validated request: plan every phase first, then text encoding, denoising of every
        seed (each model loaded once for all seeds), decoding of every latent. Across ranks, this
        rank's part (``ParallelGeneration.run``)."""
        if self.parallel is not None:
            return self.parallel.run(self, request, progress)
        plans = self.plan(request)
        previous_cache_limit = mx.set_cache_limit(2**62)  # (reads the current limit)
        mx.set_cache_limit(previous_cache_limit)
        try:
            return self._run(request, plans, progress)
        finally:
            mx.set_cache_limit(previous_cache_limit)

    def _run(self, request: GenerationRequest, plans: list[PlannedPhase], progress: bool) -> list[GenerationResult]:
        if request.conditioning is not None and request.conditioning.active:  # references / loops (issue 19)
            from .conditioned_run import run_conditioned

            return run_conditioned(self, request, plans, progress)
        text_phase, denoise_phase, decode_phase = plans
        texts = list(request.texts)
        results = self._results(request, plans, request.seeds)
        with measure_phase("text encoding") as phase:
            y, text_mask = self.encode_text(texts, text_phase, phase, progress)
        for result in results:
            result.phases.append(phase)

        def denoise_all(model: nn.Module, weights: StreamingWeights | None) -> None:
            for result in results:
                result.latent = self._denoise(model, weights, result, y, text_mask, request, progress)

        with measure_phase("denoising") as phase, chunked_layers(denoise_phase.chunk_bytes):
            self._in_phase(denoise_phase, phase, denoise_all, cyclic=True)
        for result in results:
            result.phases.append(phase)

        def decode_all(vae: nn.Module, weights: StreamingWeights | None) -> None:
            vae.micro_batch_size = decode_phase.micro_batch
            vae.set_tiling(decode_phase.tiling is not None, *(decode_phase.tiling or (32, 8)))
            for result in results:
                result.videos = self._decode(vae, weights, result.latent, request.num_frames, progress)

        with measure_phase("decoding") as phase:
            self._in_phase(decode_phase, phase, decode_all)
        for result in results:
            result.phases.append(phase)
        return results

    def _results(self, request: GenerationRequest, plans: list[PlannedPhase],
                 seeds: Sequence[int]) -> list[GenerationResult]:
        """Empty results, one per seed, that the phases fill in."""
        return [GenerationResult([], list(request.texts), s, request.fps, plans=[p.plan for p in plans],
                                 memory_budget=self.memory_budget, warnings=list(request.warnings),
                                 precision=self.precision) for s in seeds]

    def initial_noise(self, batch: int, request: GenerationRequest, seed: int) -> mx.array:
        latent_t, latent_h, latent_w = self.latent_size(request.num_frames, request.height, request.width)
        return mx.random.normal((batch, 4, latent_t, latent_h, latent_w), key=mx.random.key(seed))

    def _denoise(self, model: nn.Module, weights: StreamingWeights | None, result: GenerationResult,
                 y: mx.array, text_mask: mx.array, request: GenerationRequest, progress: bool,
                 z: mx.array | None = None, mask: mx.array | None = None, noise=None,
                 units: Sequence[Unit] | None = None) -> mx.array:
        """``z``/``mask``/``noise``: a conditioned initial latent, its frame mask and re-noising noise
        (``conditioned_run``); by default the seed's noise, unconditioned. ``units``: the chain that
        evaluates the model (default its own; across ranks, the chain of this rank's share,
        ``models/stdit3_parallel.py``)."""
        batch = y.shape[0]
        z = self.initial_noise(batch, request, result.seed) if z is None else z
        result.latent_shape = tuple(z.shape)
        dtype = self.dtypes["stdit3"]
        cond = [mx.array([v] * batch, dtype=dtype) for v in (request.height, request.width, request.num_frames)]
        fps_cond = mx.array([request.fps if request.num_frames > 1 else IMG_FPS] * batch, dtype=dtype)
        if weights is not None:
            weights.materialize("embedders")  # the null caption (y_embedding) is one of its weights
        y_in = mx.concatenate([y.astype(dtype), model.null_caption(batch).astype(dtype)], axis=0)
        config = request.sampler
        timesteps = sampling_timesteps(config.num_steps, batch, *cond,
                                       use_discrete_timesteps=config.use_discrete_timesteps)

        def denoise(z_in: mx.array, t_in: mx.array, merge: bool, x_mask: mx.array | None = None) -> mx.array:
            inputs = dict(x=z_in.astype(dtype), timestep=t_in, y=y_in, mask=text_mask, fps=fps_cond,
                          height=cond[0], width=cond[1], merge=merge)
            if x_mask is not None:
                inputs["x_mask"] = x_mask
            return run_units(units or model.units, inputs, weights, evaluate=True)

        bar = tqdm(total=config.num_steps, desc=f"denoising (seed {result.seed})", disable=not progress, leave=False)
        for z, info in iterate_sampling(denoise, z, timesteps, config, result.sampling, mask, noise):
            bar.update(config.num_steps - bar.n if info.leapt else 1)
        bar.close()
        if not mx.isfinite(z).all().item():
            hint = ("float16 overflows easily: try --dtype bfloat16 or float32" if dtype == mx.float16 else
                    "the weights may be corrupt (convert them again) or --cfg-scale extreme")
            raise FloatingPointError(f"sampling produced non-finite latents (NaN/inf) with {dtype} compute; {hint}")
        return z

    def _decode(self, vae: nn.Module, weights: StreamingWeights | None, z: mx.array, frames: int,
                progress: bool) -> list[np.ndarray]:
        return [to_uint8_frames(v) for v in self._decode_video(vae, weights, z, frames, progress)]

    def _decode_video(self, vae: nn.Module, weights: StreamingWeights | None, z: mx.array, frames: int,
                      progress: bool) -> np.ndarray:
        """Latents -> float32 videos [B, 3, T, H, W] as the VAE gives them (unclamped)."""
        chunks = []
        pieces = vae.decode_chunks(z.astype(self.dtypes["vae"]), num_frames=frames, weights=weights)
        for chunk in tqdm(pieces, desc="decoding", disable=not progress, leave=False):
            chunks.append(np.array(chunk.astype(mx.float32)))
        return np.concatenate(chunks, axis=2)


__all__ = ["GenerationResult", "Pipeline"]
