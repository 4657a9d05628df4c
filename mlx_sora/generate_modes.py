"""The command line's inference modes beyond one batch of prompts (Open-Sora 1.2's scripts/inference.py
options): references and loops, prompt files in batches with the reference's sample naming, local
prompt refinement. ``generate.py`` adds these options and runs each batch through ``run_batch``."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import UserError
from .prompts.files import PromptLine, check_sample_name, load_prompt_file, sample_path
from .request import GenerationRequest

if TYPE_CHECKING:
    from .conversion.registry import ModelBundle
    from .pipeline import Pipeline


def add_mode_arguments(p: argparse.ArgumentParser) -> None:
    cond = p.add_argument_group("references and loops (Open-Sora 1.2's image-to-video, video extension, editing)")
    cond.add_argument("--reference-path", nargs="+", default=None,
                      help="images or videos to condition on: one value for every prompt or one per prompt; "
                           "several references of a prompt joined by ';'")
    cond.add_argument("--mask-strategy", nargs="+", default=None,
                      help="loop,reference,reference_start,target_start,length,edit_ratio (latent frames; defaults "
                           "0,0,0,0,1,0; several joined by ';'); one for every prompt or one per prompt")
    cond.add_argument("--loop", type=int, default=1, help="clips made one after the other, each extending the last")
    cond.add_argument("--condition-frame-length", type=int, default=5,
                      help="latent frames of the last clip each loop conditions on (a multiple of 5: 5 = 17 frames)")
    cond.add_argument("--condition-frame-edit", type=float, default=0.0,
                      help="edit ratio of those frames (0 keeps them, 1 regenerates them)")
    cond.add_argument("--align", type=int, default=None, help="round mask-strategy starts to multiples of this")
    files = p.add_argument_group("prompt files and batches")
    files.add_argument("--start-index", type=int, default=None, help="first line of --prompt-path (0-based)")
    files.add_argument("--end-index", type=int, default=None, help="line after the last of --prompt-path")
    files.add_argument("--batch-size", type=int, default=None,
                       help="prompts per forward (default: every --prompt at once; 1 for --prompt-path)")
    files.add_argument("--save-dir", default=None,
                       help="write <save-dir>/<sample-name>_<index:04d>.mp4 (Open-Sora's naming) instead of --output")
    files.add_argument("--sample-name", default=None, help="file-name prefix with --save-dir (default: sample)")
    files.add_argument("--save-fps", type=int, default=None, help="frame rate of the written mp4 (default: --fps)")
    p.add_argument("--refine-prompt", nargs="?", const="default", default=None, metavar="MODEL",
                   help="rewrite each prompt with a local instruction-tuned LLM (mlx-lm) before encoding it; "
                        "MODEL: an mlx-lm folder or hub id (default mlx-community/Qwen2.5-1.5B-Instruct-4bit)")


def mode_options(args: argparse.Namespace) -> dict:
    options = dict(loop=args.loop, condition_frame_length=args.condition_frame_length,
                   condition_frame_edit=args.condition_frame_edit, align=args.align)
    if args.reference_path is not None:
        options["references"] = args.reference_path[0] if len(args.reference_path) == 1 else list(args.reference_path)
    if args.mask_strategy is not None:
        options["mask_strategy"] = args.mask_strategy[0] if len(args.mask_strategy) == 1 else list(args.mask_strategy)
    return options


def prompt_batches(args: argparse.Namespace) -> list[list[PromptLine]]:
    """The prompts (from --prompt or --prompt-path) in batches of --batch-size."""
    if args.prompt_path is not None:
        prompts = load_prompt_file(args.prompt_path, args.start_index, args.end_index)
    else:
        if args.start_index is not None or args.end_index is not None:
            raise UserError("--start-index / --end-index select lines of --prompt-path")
        prompts = [PromptLine(i, i + 1, text, f"--prompt {i}") for i, text in enumerate(args.prompt)]
    size = args.batch_size if args.batch_size is not None else (1 if args.prompt_path else len(prompts))
    if size < 1:
        raise UserError(f"--batch-size must be >= 1, got {size}")
    for name in ("reference_path", "mask_strategy"):
        values = getattr(args, name)
        if values is not None and len(values) not in (1, len(prompts)):
            raise UserError(f"--{name.replace('_', '-')}: give one value for every prompt or one per prompt "
                            f"({len(prompts)}), got {len(values)}")
    return [prompts[i : i + size] for i in range(0, len(prompts), size)]


def batch_options(options: dict, batch: list[PromptLine], first: int) -> dict:
    """Per-prompt option lists cut to a batch."""
    out = dict(options)
    for key in ("references", "mask_strategy"):
        if isinstance(out.get(key), list):
            out[key] = [out[key][p.index - first] for p in batch]
    return out


def video_paths(args: argparse.Namespace, batches: list[list[PromptLine]],
                output_paths: Callable[[str, int, list[int]], dict[tuple[int, int], Path]],
                ) -> dict[tuple[int, int], Path]:
    """(prompt index, seed) -> path: Open-Sora's naming in --save-dir, else the --output template."""
    seeds = list(args.seed)
    indices = [p.index for batch in batches for p in batch]
    if args.save_dir is None:
        if args.sample_name is not None:
            raise UserError("--sample-name names files in --save-dir; give --save-dir too")
        template = output_paths(args.output, max(indices) + 1 if args.prompt_path else len(indices), seeds)
        return {key: path for key, path in template.items() if key[0] in indices}
    check_sample_name(args.sample_name)
    return {(i, s): sample_path(args.save_dir, i, args.sample_name, len(seeds), k)
            for i in indices for k, s in enumerate(seeds)}


def run_batch(args: argparse.Namespace, pipe: "Pipeline", bundle: "ModelBundle", batch: list[PromptLine],
              options: dict, paths: dict[tuple[int, int], Path], write_mp4: Callable[..., Path],
              show_plans: bool = True) -> None:
    """One batch: refinement (--refine-prompt), the request, its plans (``show_plans``), the run, the videos."""
    texts = [p.text for p in batch]
    names = [p.where for p in batch]
    latent_frames = pipe._skeletons["vae"].latent_frames
    refinement = None
    if args.refine_prompt:
        model = None if args.refine_prompt == "default" else args.refine_prompt

        def show(before: str, after: str) -> None:
            print(f"refined prompt: {before!r}\n             -> {after!r}")

        def show_plan(plan) -> None:
            if not args.quiet:
                print(plan.summary())

        refinement = pipe.refine_prompts(texts, args.seed[0], model or True, show, show_plan)
        texts = refinement[0]
    request = GenerationRequest.build(texts, bundle.defaults, model_name=f"the {bundle.name} model",
                                      latent_frames=latent_frames, prompt_names=names, **options)
    for message in request.warnings:
        print(f"note: {message}", file=sys.stderr)
    if not args.quiet and show_plans:
        from .conditioned_run import plan_conditioning

        for phase in [*pipe.plan(request), *plan_conditioning(pipe, request).values()]:
            print(phase.plan.summary())
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        results = pipe.run(request, progress=not args.quiet)
    for result in results:
        if refinement is not None:
            result.phases.insert(0, refinement[1])
            result.refined_prompts = list(refinement[0])
    write_videos(args, results, batch, paths, args.save_fps or request.fps, write_mp4)
    if args.device_profile and not args.quiet:  # the target device's projection beside the run (issue 18)
        from .estimate import projection_beside

        print(projection_beside(pipe, request, args.device_profile, results[0]))


def write_videos(args: argparse.Namespace, results: list, prompts: list[PromptLine], paths: dict[tuple[int, int], Path],
                 fps: int, write_mp4: Callable[..., Path]) -> None:
    """Each result's videos to its prompts' paths, saying what was written and each result's summary."""
    for result in results:
        for prompt, frames in zip(prompts, result.videos):
            path = write_mp4(paths[(prompt.index, result.seed)], frames, fps=fps)
            if not args.quiet:
                print(f"wrote {path} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}, "
                      f"{fps} fps, seed {result.seed})")
        if not args.quiet:
            print(result.summary())
