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
    p.add_argument("--prompt", nargs="+", required=True, help="one or more prompts (one video each)")
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
        # every check that needs no model runs before any heavy work
        options = _request_options(args)
        GenerationRequest.build(args.prompt, GenerationDefaults(), **options)
        profile = get_profile(args.device_profile) if args.device_profile else None
        budget_text = args.memory_budget or (profile.memory_budget if profile else "auto")
        budget = "auto" if budget_text == "auto" else parse_memory_size(budget_text)
        paths = output_paths(args.output, len(args.prompt), list(args.seed))
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
        request = GenerationRequest.build(args.prompt, bundle.defaults, model_name=f"the {bundle.name} model",
                                          **options)
        for message in request.warnings:
            print(f"note: {message}", file=sys.stderr)
        if not args.quiet:
            print(f"model {bundle.name}: " + ", ".join(f"{k} {v}" for k, v in bundle.components.items()))
            for phase in pipe.plan(request):
                print(phase.plan.summary())
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            results = pipe.run(request, progress=not args.quiet)
        for result in results:
            for index, frames in enumerate(result.videos):
                path = write_mp4(paths[(index, result.seed)], frames, fps=request.fps)
                if not args.quiet:
                    print(f"wrote {path} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}, "
                          f"{request.fps} fps, seed {result.seed})")
            if not args.quiet:
                print(result.summary())
        if profile is not None and not args.quiet:  # the target device's projection beside the run
            from .estimate import projection_beside

            print(projection_beside(pipe, request, profile.name, results[0]))
    except (UserError, OSError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
