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
from . import generate_modes as modes
from .conversion.registry import GenerationDefaults
from .errors import UserError
from .parallel import PARALLEL_MODES
from .request import GenerationRequest
from .runtime.blas import ensure_fast_cpu_blas
from .runtime.distributed import DEFAULT_TIMEOUT
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
    coreml = p.add_argument_group("Core ML (units exported by python -m mlx_sora.export_coreml)")
    coreml.add_argument("--coreml", default=None, metavar="DIR",
                        help="run the exported units of DIR instead of an MLX model: with Core ML on macOS, replayed "
                             "op by op elsewhere (slow: for checking an export)")
    coreml.add_argument("--compute-units", default="cpu_and_gpu",
                        choices=["cpu_and_gpu", "all", "cpu_only", "cpu_and_ne"],
                        help="where Core ML runs the units (macOS; 'all' includes the Neural Engine)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="compute dtype of every model (default: float32 on CPU; on a GPU bfloat16, the text encoder "
                        "float32 as in Open-Sora 1.2). float32 on a GPU runs with TF32 off (MLX_ENABLE_TF32=0)")
    p.add_argument("--text-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="compute dtype of the T5 text encoder (overrides --dtype for it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, plan or summary")
    modes.add_mode_arguments(p)
    ranks = p.add_argument_group("several Macs, one job (started by mlx.launch; see the README)")
    ranks.add_argument("--parallel", choices=list(PARALLEL_MODES), default=None,
                       help="data: the seeds shared out, each rank writing its videos; cfg: the two halves of the "
                            "guidance batch on 2 ranks; sequence: STDiT3's tokens split over the ranks")
    ranks.add_argument("--rank-timeout", type=float, default=DEFAULT_TIMEOUT,
                       help=f"seconds a rank waits for the others before it ends the job (default {DEFAULT_TIMEOUT:.0f})")
    return p


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
        options.update(modes.mode_options(args))
        batches = modes.prompt_batches(args)
        first = batches[0][0].index
        for batch in batches:
            GenerationRequest.build([p.text for p in batch], GenerationDefaults(),
                                    prompt_names=[p.where for p in batch], **modes.batch_options(options, batch, first))
        profile = get_profile(args.device_profile) if args.device_profile else None
        budget_text = args.memory_budget or (profile.memory_budget if profile else "auto")
        budget = "auto" if budget_text == "auto" else parse_memory_size(budget_text)
        if args.save_fps is not None and not 1 <= args.save_fps <= 240:
            raise UserError(f"--save-fps must be between 1 and 240, got {args.save_fps}")
        paths = modes.video_paths(args, batches, output_paths)
        for path in paths.values():
            check_writable(path)
        if not 0 < args.rank_timeout < float("inf"):
            raise UserError(f"--rank-timeout must be a positive number of seconds, got {args.rank_timeout}")
        if args.parallel and (len(batches) > 1 or args.refine_prompt or options.get("references") or args.loop != 1
                              or args.coreml):
            raise UserError("--parallel runs one text-to-video request of the MLX model: one batch of prompts, "
                            "without references, loops, --refine-prompt or --coreml")
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.parallel:  # issue 21: ranks sharing this machine share its cores (before the BLAS starts)
        from .runtime.distributed import share_cpu_threads

        share_cpu_threads()
    ensure_fast_cpu_blas(args.quiet or (bool(args.parallel) and os.environ.get("MLX_RANK", "0") != "0"))
    if args.coreml:
        return _run_coreml(args, options, paths, batches)

    from .conversion.registry import resolve_model
    from .io.video import write_mp4
    from .pipeline import Pipeline

    try:
        ranks = None
        if args.parallel:  # issue 21: one job across the ranks mlx.launch started (parallel.py)
            from .parallel import join_job

            ranks = join_job(args.rank_timeout)
            if ranks.size == 1:
                print(f"note: --parallel {args.parallel}: this process was not started among several ranks "
                      "(mlx.launch); it runs the whole request alone", file=sys.stderr)
            args.quiet = args.quiet or ranks.rank != 0  # rank 0 speaks for the job
        bundle = resolve_model(args.model, prefer_quantized=bool(profile and profile.prefer_quantized))
        pipe = Pipeline(bundle, dtype=args.dtype, memory_budget=budget, overlap=not args.no_overlap,
                        text_dtype=args.text_dtype, group=ranks, parallel=args.parallel or "data",
                        rank_timeout=args.rank_timeout)
        if not args.quiet:
            print(f"model {bundle.name}: " + ", ".join(f"{k} {v}" for k, v in bundle.components.items()))
            print(pipe.precision)
        if pipe.parallel is not None:
            return _run_parallel(args, pipe, bundle, batches[0], modes.batch_options(options, batches[0], first), paths,
                                 ranks)
    except (UserError, OSError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    failed = 0
    for number, batch in enumerate(batches):
        try:  # a failing batch is reported and skipped: the videos already written stay
            modes.run_batch(args, pipe, bundle, batch, modes.batch_options(options, batch, first), paths, write_mp4,
                            show_plans=number == 0)
        except (UserError, OSError, FloatingPointError) as e:
            failed += 1
            names = ", ".join(p.where for p in batch) if len(batches) > 1 else ""
            print(f"error: {names + ': ' if names else ''}{e}", file=sys.stderr)
    if failed and len(batches) > 1:
        print(f"error: {failed} of {len(batches)} batches failed; the other videos were written", file=sys.stderr)
    return 1 if failed else 0


def _run_parallel(args: argparse.Namespace, pipe, bundle, batch: list, options: dict, paths: dict, ranks) -> int:
    """One request across the ranks of ``--parallel`` (issue 21): every rank's videos, or none."""
    from .parallel import write_job_videos

    request = GenerationRequest.build([p.text for p in batch], bundle.defaults, model_name=f"the {bundle.name} model",
                                      **options)
    for message in request.warnings if ranks is None or ranks.rank == 0 else ():
        print(f"note: {message}", file=sys.stderr)
    if not args.quiet:
        for message in pipe.parallel.check(pipe, request):
            print(f"note: {message}", file=sys.stderr)
        for phase in pipe.plan(request):
            print(phase.plan.summary())
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        results = pipe.run(request, progress=not args.quiet)
    by_position = {(j, seed): paths[(prompt.index, seed)] for j, prompt in enumerate(batch) for seed in args.seed}
    write_job_videos(pipe.parallel, results, by_position, request, args.quiet)
    return 0


def _run_coreml(args: argparse.Namespace, options: dict, paths: dict, batches: list) -> int:
    """The same generation from a Core ML export (``--coreml DIR``): text to video, prompts from
    --prompt or --prompt-path."""
    from .coreml.pipeline import CoreMLPipeline
    from .io.video import write_mp4

    try:
        if args.model or args.dtype or args.text_dtype:
            raise UserError("--coreml runs the exported units; --model, --dtype and --text-dtype do not apply (the "
                            "export fixed them)")
        used = [f"--{k.replace('_', '-')}" for k in ("reference_path", "mask_strategy", "refine_prompt")
                if getattr(args, k) is not None] + (["--loop"] if args.loop != 1 else [])
        embedded = [p.where for batch in batches for p in batch if p.text.rstrip().endswith("}") or "|0|" in p.text]
        if used or embedded:
            what = ", ".join(used) if used else f"references or loops in the prompt ({embedded[0]})"
            raise UserError(f"--coreml runs text to video; {what} need the VAE encoder or the LLM, which are not "
                            "exported: run them with the MLX model (--model)")
        for key in ("references", "mask_strategy", "loop", "condition_frame_length", "condition_frame_edit", "align"):
            options.pop(key, None)
        prompts = [p for batch in batches for p in batch]  # the export runs one prompt per call: batches add nothing
        if args.memory_budget not in (None, "none"):
            raise UserError("--memory-budget with --coreml: leave it out (the export's CI-DL plan) or 'none' (every "
                            "unit resident); budgets are planned at export time (export_coreml --memory-budget)")
        if args.tdtm_steps is None and not args.device_profile:
            options["tdtm_steps"] = None  # the export's setting
        pipe = CoreMLPipeline(args.coreml, compute_units=args.compute_units, overlap=not args.no_overlap,
                              memory_budget=None if args.memory_budget == "none" else "plan")
        request = pipe.request([p.text for p in prompts], **options)
        if not args.quiet:
            print(f"model {pipe.name}")
            if pipe.backend.name == "replay":
                print("note: Core ML runs only on macOS; replaying the packages op by op (slow)")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            results = pipe.run(request, progress=not args.quiet)
        modes.write_videos(args, results, prompts, paths, args.save_fps or request.fps, write_mp4)
    except (UserError, OSError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
