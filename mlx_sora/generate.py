"""Text to video from the command line.

    python -m mlx_sora.generate --prompt "a red circle moving left"            # the embedded demo model
    python -m mlx_sora.generate --model opensora-v1.2 --prompt "a red panda eating bamboo" --seed 1 2

Writes one H.264 mp4 per prompt and seed, atomically, and prints the memory plan and the time and
peak memory of each phase. Every option is checked before any model is loaded.
"""

from __future__ import annotations

import argparse
import os
import string
import sys
import warnings
from pathlib import Path

from . import aspect
from .conversion.registry import GenerationDefaults
from .errors import UserError
from .prompts.files import PromptLine, check_sample_name, load_prompt_file, sample_path
from .request import GenerationRequest
from .runtime.blas import ensure_fast_cpu_blas
from .runtime.profiles import PROFILES, get_profile
from .runtime.streaming import parse_memory_size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_sora.generate",
        description="Generate a video from text with Open-Sora 1.2 on MLX (LPL, TDTM and CI-DL built in). "
        "Without --model, the small demo model shipped with the package is used (no download).",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", nargs="+", help="one or more prompts (one video each)")
    source.add_argument("--prompt-path", default=None,
                        help="a file of prompts, one per line (embedded JSON references and '|0|...' loop prompts "
                             "allowed); videos named as Open-Sora's (see --save-dir)")
    p.add_argument("--model", default=None,
                   help="'demo' (default: built in, offline), 'opensora-v1.2' (the real weights, converted "
                        "once from Hugging Face into weights/), or a folder of converted weights")
    size = p.add_argument_group("size (default: what the model was made for; Open-Sora 1.2: 240p 9:16, 51 frames)")
    size.add_argument("--resolution", default=None, choices=list(aspect.IMAGE_SIZES))
    size.add_argument("--aspect-ratio", default=None, choices=list(aspect.ASPECT_RATIOS), help="height:width")
    size.add_argument("--image-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), default=None,
                      help="an exact size instead of a bucket")
    size.add_argument("--num-frames", default=None,
                      help=f"frames, or a preset: {', '.join(k for k in aspect.NUM_FRAMES_PRESETS if k.endswith('s'))}")
    p.add_argument("--fps", type=int, default=None, help="frame rate (conditioning and mp4)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 30)")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance (Open-Sora: 7.0)")
    p.add_argument("--seed", type=int, nargs="+", default=[42], help="one video per seed (0 .. 2**64-1)")
    p.add_argument("--output", default="mlx_sora_{seed}.mp4",
                   help="mp4 path; {seed} and {index} (prompt number) are filled in")
    p.add_argument("--aes", type=float, default=None, help="aesthetic score suffix (Open-Sora: 6.5)")
    p.add_argument("--flow", type=float, default=None, help="motion score suffix")
    p.add_argument("--camera-motion", default=None, help="camera motion suffix, e.g. 'pan right'")
    leap = p.add_mutually_exclusive_group()
    leap.add_argument("--lpl-step", type=int, default=None,
                      help="LPL: N regular steps, then leap to t=0 (N+1 model evaluations)")
    leap.add_argument("--lpl", choices=["dynamic"], default=None,
                      help="LPL with On-device Sora's cosine-similarity rule")
    p.add_argument("--tdtm-steps", type=int, default=None, help="TDTM token merging in the first K steps")
    p.add_argument("--discrete-timesteps", action="store_true",
                   help="round timesteps to integers before the transform (On-device Sora's default)")
    memory = p.add_argument_group("memory (CI-DL)")
    memory.add_argument("--memory-budget", default=None,
                        help="e.g. 3.3GB, 800MB, 2GiB, or 'none' (each phase loads its whole model); default: "
                             "80%% of the memory available now. Units that do not fit stay on disk and are "
                             "streamed, the next one loading while the current one computes")
    memory.add_argument("--no-overlap", action="store_true", help="stream without loading ahead (for measuring)")
    memory.add_argument("--device-profile", default=None, choices=list(PROFILES),
                        help="a target device's settings: " + "; ".join(f"{k}: {v.description}" for k, v in PROFILES.items()))
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, plan or summary")
    _add_mode_arguments(p)
    return p


# --- Open-Sora 1.2's other inference modes (issue 19): references, loops, prompt files, refinement
def _add_mode_arguments(p: argparse.ArgumentParser) -> None:
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


def _mode_options(args: argparse.Namespace) -> dict:
    options = dict(loop=args.loop, condition_frame_length=args.condition_frame_length,
                   condition_frame_edit=args.condition_frame_edit, align=args.align)
    if args.reference_path is not None:
        options["references"] = args.reference_path[0] if len(args.reference_path) == 1 else list(args.reference_path)
    if args.mask_strategy is not None:
        options["mask_strategy"] = args.mask_strategy[0] if len(args.mask_strategy) == 1 else list(args.mask_strategy)
    return options


def _prompt_batches(args: argparse.Namespace) -> list[list[PromptLine]]:
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


def _batch_options(options: dict, batch: list[PromptLine], first: int) -> dict:
    """Per-prompt option lists cut to a batch."""
    out = dict(options)
    for key in ("references", "mask_strategy"):
        if isinstance(out.get(key), list):
            out[key] = [out[key][p.index - first] for p in batch]
    return out


def _video_paths(args: argparse.Namespace, batches: list[list[PromptLine]]) -> dict[tuple[int, int], Path]:
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


def output_paths(template: str, prompts: int, seeds: list[int]) -> dict[tuple[int, int], Path]:
    """(prompt index, seed) -> path; placeholders are added when several videos would collide."""
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is not None and (name not in ("seed", "index") or spec or conversion):
            raise UserError(f"--output {template!r}: only the fields {{seed}} and {{index}} can be filled in")
    if prompts > 1 and "{index}" not in template:
        stem, suffix = os.path.splitext(template)
        template = f"{stem}_{{index}}{suffix}"
    if len(seeds) > 1 and "{seed}" not in template:
        stem, suffix = os.path.splitext(template)
        template = f"{stem}_{{seed}}{suffix}"
    paths = {(i, s): Path(template.format(seed=s, index=i)) for i in range(prompts) for s in seeds}
    if len(set(paths.values())) != len(paths):
        raise UserError(f"--output {template!r} gives several videos the same name; use {{seed}} / {{index}}")
    return paths


def _request_options(args: argparse.Namespace) -> dict:
    options = dict(
        resolution=args.resolution, aspect_ratio=args.aspect_ratio,
        image_size=tuple(args.image_size) if args.image_size else None, num_frames=args.num_frames,
        fps=args.fps, steps=args.steps, cfg_scale=args.cfg_scale, seed=list(args.seed),
        aes=args.aes if args.aes is not None else "default", flow=args.flow if args.flow is not None else "default",
        camera_motion=args.camera_motion, discrete_timesteps=args.discrete_timesteps,
        lpl="dynamic" if args.lpl == "dynamic" else args.lpl_step, tdtm_steps=args.tdtm_steps,
    )
    if args.device_profile:
        for key, value in get_profile(args.device_profile).request_options().items():
            if key in ("resolution", "aspect_ratio") and args.image_size:
                continue
            if options.get(key) is None:
                options[key] = value
    if options["tdtm_steps"] is None:
        options["tdtm_steps"] = 0
    return options


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .io.video import check_writable

    try:
        # every check that needs no model runs before any heavy work (references are read here)
        options = _request_options(args)
        options.update(_mode_options(args))
        batches = _prompt_batches(args)
        first = batches[0][0].index
        for batch in batches:
            GenerationRequest.build([p.text for p in batch], GenerationDefaults(), prompt_names=[p.where for p in batch],
                                    **_batch_options(options, batch, first))
        profile = get_profile(args.device_profile) if args.device_profile else None
        budget_text = args.memory_budget or (profile.memory_budget if profile else "auto")
        budget = "auto" if budget_text == "auto" else parse_memory_size(budget_text)
        if args.save_fps is not None and not 1 <= args.save_fps <= 240:
            raise UserError(f"--save-fps must be between 1 and 240, got {args.save_fps}")
        paths = _video_paths(args, batches)
        for path in paths.values():
            check_writable(path)
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    ensure_fast_cpu_blas(args.quiet)

    from .conversion.registry import resolve_model
    from .io.video import write_mp4
    from .pipeline import Pipeline

    try:
        bundle = resolve_model(args.model, prefer_quantized=bool(profile and profile.prefer_quantized))
        pipe = Pipeline(bundle, dtype=args.dtype, memory_budget=budget, overlap=not args.no_overlap)
        if not args.quiet:
            print(f"model {bundle.name}: " + ", ".join(f"{k} {v}" for k, v in bundle.components.items()))
    except (UserError, OSError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    failed = 0
    for number, batch in enumerate(batches):
        try:  # a failing batch is reported and skipped: the videos already written stay
            _run_batch(args, pipe, bundle, batch, _batch_options(options, batch, first), paths, write_mp4, number == 0)
        except (UserError, OSError, FloatingPointError) as e:
            failed += 1
            names = ", ".join(p.where for p in batch) if len(batches) > 1 else ""
            print(f"error: {names + ': ' if names else ''}{e}", file=sys.stderr)
    if failed and len(batches) > 1:
        print(f"error: {failed} of {len(batches)} batches failed; the other videos were written", file=sys.stderr)
    return 1 if failed else 0


def _run_batch(args: argparse.Namespace, pipe, bundle, batch: list[PromptLine], options: dict,
               paths: dict[tuple[int, int], Path], write_mp4, first: bool) -> None:
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
    if not args.quiet and first:
        from .conditioned_run import plan_conditioning

        for phase in [*pipe.plan(request), *plan_conditioning(pipe, request).values()]:
            print(phase.plan.summary())
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        results = pipe.run(request, progress=not args.quiet)
    fps = args.save_fps or request.fps
    for result in results:
        if refinement is not None:
            result.phases.insert(0, refinement[1])
            result.refined_prompts = list(refinement[0])
        for prompt, frames in zip(batch, result.videos):
            path = write_mp4(paths[(prompt.index, result.seed)], frames, fps=fps)
            if not args.quiet:
                print(f"wrote {path} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}, "
                      f"{fps} fps, seed {result.seed})")
        if not args.quiet:
            print(result.summary())


if __name__ == "__main__":
    sys.exit(main())
