"""A generation with references or loops (Open-Sora 1.2's ``scripts/inference.py`` main loop):
references encoded by the VAE, then per loop: the clip of the loop before encoded and appended as a
reference (``append_generated``), the seed's noise conditioned by the mask strategies
(``apply_mask_strategy``), denoised with the frame mask, decoded; the loops' clips are joined, every
clip after the first without its first ``condition_frames`` frames (what it shares with the last).

Each step is a phase of its own with a plan, like text encoding, denoising and decoding: the VAE
encoder's units are planned and streamed within the memory budget as the decoder's are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .conditioning import apply_mask_strategy, condition_frames
from .io.video import to_uint8_frames
from .models.stdit3_layers import chunked_layers
from .planning import PlannedPhase
from .prompts.text import extract_prompts_loop
from .request import GenerationRequest
from .runtime.memory import measure_phase
from .runtime.streaming import StreamingWeights

if TYPE_CHECKING:
    from .pipeline import GenerationResult, Pipeline


def plan_conditioning(pipe: "Pipeline", request: GenerationRequest) -> dict[str, PlannedPhase]:
    """The encoding phases a conditioned request adds (raises MemoryBudgetError before heavy work):
    ``references`` (each reference alone, the longest planned) and ``clip`` (a loop's clips)."""
    spec = request.conditioning
    plans: dict[str, PlannedPhase] = {}
    if spec is None:
        return plans
    size = (request.height, request.width)
    if spec.has_references:
        longest = max(r.frames for p in spec.prompts for r in p.references)
        plans["references"] = pipe.planner.plan_encoding("reference encoding", 1, longest, *size)
    if spec.loops > 1:
        plans["clip"] = pipe.planner.plan_encoding("clip encoding", len(request.texts), request.num_frames, *size)
    return plans


def _encode(pipe: "Pipeline", phase: PlannedPhase, report, videos: list[np.ndarray]) -> list[np.ndarray]:
    """Videos [B, 3, T, H, W] in [-1, 1] -> normalised latents [B, 4, T', h, w] (float32 numpy)."""

    def work(vae: nn.Module, weights: StreamingWeights | None) -> list[np.ndarray]:
        vae.micro_batch_size = phase.micro_batch
        return [np.array(vae.encode(mx.array(v).astype(pipe.dtypes["vae"]), weights=weights).astype(mx.float32))
                for v in videos]

    return pipe._in_phase(phase, report, work)


def run_conditioned(pipe: "Pipeline", request: GenerationRequest, plans: list[PlannedPhase],
                    progress: bool) -> list["GenerationResult"]:
    from .pipeline import GenerationResult

    spec = request.conditioning
    assert spec is not None
    extra = plan_conditioning(pipe, request)
    text_phase, denoise_phase, decode_phase = plans
    texts = list(request.texts)
    results = [GenerationResult([], texts, s, request.fps, plans=[p.plan for p in plans + list(extra.values())],
                                memory_budget=pipe.memory_budget, warnings=list(request.warnings), loops=spec.loops)
               for s in request.seeds]

    def add(report) -> None:
        for result in results:
            result.phases.append(report)

    # every loop's prompts ('|0|...|2|...' prompts change with the loop), each distinct text encoded once
    loop_texts = [extract_prompts_loop(texts, i) for i in range(spec.loops)]
    unique = list(dict.fromkeys(t for per_loop in loop_texts for t in per_loop))
    with measure_phase("text encoding") as phase:
        y_all, mask_all = pipe.encode_text(unique, text_phase, phase, progress)
    add(phase)
    rows = [mx.array([unique.index(t) for t in per_loop]) for per_loop in loop_texts]

    references: list[list[np.ndarray]] = [[] for _ in spec.prompts]  # latents [C, T', h, w], per prompt
    if spec.has_references:
        with measure_phase("reference encoding") as phase:
            videos = [r.video[None] for p in spec.prompts for r in p.references]
            latents = iter(_encode(pipe, extra["references"], phase, videos))
            references = [[next(latents)[0] for _ in p.references] for p in spec.prompts]
        add(phase)

    batch = len(texts)
    generated = {r.seed: [list(refs) for refs in references] for r in results}  # + the clips of earlier loops
    clips: dict[int, list[np.ndarray]] = {r.seed: [] for r in results}
    for loop in range(spec.loops):
        suffix = f" (loop {loop})" if spec.loops > 1 else ""
        if loop > 0:  # append_generated: the last clip, encoded, becomes the newest reference
            with measure_phase("clip encoding" + suffix) as phase:
                encoded = _encode(pipe, extra["clip"], phase, [clips[r.seed][-1] for r in results])
            add(phase)
            for result, latents in zip(results, encoded):
                for i in range(batch):
                    generated[result.seed][i].append(latents[i])
        conditioned = {}
        for result in results:
            z = np.array(pipe.initial_noise(batch, request, result.seed))  # the same noise every loop, as the reference
            strategies = [spec.strategies_in_loop(i, loop, loop) for i in range(batch)]
            mask = apply_mask_strategy(z, generated[result.seed], strategies, loop, spec.align)
            noise_key = mx.random.split(mx.random.key(result.seed), spec.loops + 1)[loop + 1]  # not z's key
            conditioned[result.seed] = (mx.array(z), None if (mask == 1).all() else mx.array(mask), noise_key)
        y, text_mask = y_all[rows[loop]], mask_all[rows[loop]]

        def denoise_all(model: nn.Module, weights: StreamingWeights | None) -> None:
            for result in results:
                z, mask, key = conditioned[result.seed]
                steps = request.sampler.num_steps
                noise = lambda step, key=key, shape=z.shape: mx.random.normal(  # noqa: E731
                    shape, key=mx.random.split(key, steps)[step])
                result.latent = pipe._denoise(model, weights, result, y, text_mask, request, progress, z, mask, noise)

        with measure_phase("denoising" + suffix) as phase, chunked_layers(denoise_phase.chunk_bytes):
            pipe._in_phase(denoise_phase, phase, denoise_all, cyclic=True)
        add(phase)

        def decode_all(vae: nn.Module, weights: StreamingWeights | None) -> None:
            vae.micro_batch_size = decode_phase.micro_batch
            vae.set_tiling(decode_phase.tiling is not None, *(decode_phase.tiling or (32, 8)))
            for result in results:
                clips[result.seed].append(pipe._decode_video(vae, weights, result.latent, request.num_frames, progress))

        with measure_phase("decoding" + suffix) as phase:
            pipe._in_phase(decode_phase, phase, decode_all)
        add(phase)

    for result in results:
        joined = join_loops(clips[result.seed], spec.condition_frame_length)
        result.videos = [to_uint8_frames(video) for video in joined]
        if spec.loops > 1:
            result.loop_videos = [[to_uint8_frames(v) for v in clip] for clip in clips[result.seed]]
    return results


def join_loops(clips: list[np.ndarray], condition_frame_length: int) -> np.ndarray:
    """Loops' clips [B, 3, T, H, W] -> one video per prompt [B, 3, T', H, W]: every clip after the
    first loses the frames it shares with the one before (scripts/inference.py's save step)."""
    drop = condition_frames(condition_frame_length) if len(clips) > 1 else 0
    return np.concatenate([clips[0]] + [c[:, :, drop:] for c in clips[1:]], axis=2)
