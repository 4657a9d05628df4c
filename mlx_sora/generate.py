"""Text to video from the command line.

    python -m mlx_sora.generate --prompt "a red panda eating bamboo in the forest" --seed 1 2

Writes one H.264 mp4 per prompt and seed, atomically, and prints time and peak memory per phase.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import aspect
from .blas import ensure_fast_cpu_blas
from .sampling import DynamicLeap, FixedLeap, SamplerConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_sora.generate",
        description="Generate a video from text with Open-Sora 1.2 on MLX (LPL, TDTM built in).",
    )
    p.add_argument("--prompt", nargs="+", required=True, help="one or more prompts (one video each)")
    p.add_argument("--model", default=None,
                   help="converted model folder (sub-folders text_encoder/stdit3/vae) or preset "
                        "'opensora-v1.2' (converted once from Hugging Face into weights/)")
    p.add_argument("--resolution", default="240p", choices=list(aspect.IMAGE_SIZES))
    p.add_argument("--aspect-ratio", default="9:16", choices=list(aspect.ASPECT_RATIOS),
                   help="height:width (default 9:16)")
    p.add_argument("--num-frames", default="2s",
                   help=f"frames, or a preset: {', '.join(k for k in aspect.NUM_FRAMES_PRESETS if k.endswith('s'))} "
                        "(default 2s = 51)")
    p.add_argument("--fps", type=int, default=24, help="frame rate (conditioning and mp4)")
    p.add_argument("--steps", type=int, default=30, help="sampling steps (default 30)")
    p.add_argument("--cfg-scale", type=float, default=7.0, help="classifier-free guidance (default 7.0)")
    p.add_argument("--seed", type=int, nargs="+", default=[42], help="one video per seed")
    p.add_argument("--output", default="mlx_sora_{seed}.mp4",
                   help="mp4 path; {seed} and {index} (prompt number) are filled in")
    p.add_argument("--aes", type=float, default=6.5, help="aesthetic score suffix (default 6.5)")
    p.add_argument("--flow", type=float, default=None, help="motion score suffix")
    p.add_argument("--camera-motion", default=None, help="camera motion suffix, e.g. 'pan right'")
    leap = p.add_mutually_exclusive_group()
    leap.add_argument("--lpl-step", type=int, default=None,
                      help="LPL: N regular steps, then leap to t=0 (N+1 model evaluations)")
    leap.add_argument("--lpl", choices=["dynamic"], default=None,
                      help="LPL with On-device Sora's cosine-similarity rule")
    p.add_argument("--tdtm-steps", type=int, default=0, help="TDTM token merging in the first K steps")
    p.add_argument("--discrete-timesteps", action="store_true",
                   help="round timesteps to integers before the transform (On-device Sora's default)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    return p


def output_paths(template: str, prompts: int, seeds: list[int]) -> dict[tuple[int, int], Path]:
    """(prompt index, seed) -> path; placeholders are added when several videos would collide."""
    if prompts > 1 and "{index}" not in template:
        stem, suffix = os.path.splitext(template)
        template = f"{stem}_{{index}}{suffix}"
    if len(seeds) > 1 and "{seed}" not in template:
        stem, suffix = os.path.splitext(template)
        template = f"{stem}_{{seed}}{suffix}"
    if len(set(seeds)) != len(seeds):
        raise ValueError("--seed lists the same seed twice")
    return {(i, s): Path(template.format(seed=s, index=i)) for i in range(prompts) for s in seeds}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .video import check_writable

    try:
        # every check that needs no model runs before any heavy work
        aspect.num_frames(args.num_frames)
        if any(not p.strip() for p in args.prompt):
            raise ValueError("the prompt is empty: describe the video to generate")
        if args.fps <= 0:
            raise ValueError(f"--fps must be positive, got {args.fps}")
        leap = DynamicLeap() if args.lpl == "dynamic" else (
            FixedLeap(args.lpl_step) if args.lpl_step is not None else None)
        SamplerConfig(num_steps=args.steps, cfg_scale=args.cfg_scale, leap=leap, tdtm_steps=args.tdtm_steps)
        paths = output_paths(args.output, len(args.prompt), args.seed)
        for path in paths.values():
            check_writable(path)
        if args.model is None:
            raise ValueError(
                "no model given. Choose one:\n"
                "  --model opensora-v1.2   the real Open-Sora 1.2 weights, converted once from Hugging Face "
                "into weights/opensora-v1.2 (about 30 GB to download)\n"
                "  --model PATH            a folder of converted weights (sub-folders text_encoder/, stdit3/, "
                "vae/ made with python -m mlx_sora.convert)"
            )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    ensure_fast_cpu_blas(args.quiet)

    from .checkpoint import CheckpointError
    from .pipeline import Pipeline
    from .video import write_mp4

    try:
        pipe = Pipeline.from_pretrained(args.model, dtype=args.dtype)
        results = pipe.generate(
            args.prompt, resolution=args.resolution, aspect_ratio=args.aspect_ratio,
            num_frames=args.num_frames, fps=args.fps, steps=args.steps, cfg_scale=args.cfg_scale,
            seed=list(args.seed), aes=args.aes, flow=args.flow, camera_motion=args.camera_motion,
            lpl=leap, tdtm_steps=args.tdtm_steps, discrete_timesteps=args.discrete_timesteps,
            progress=not args.quiet,
        )
        for result in results:
            for index, frames in enumerate(result.videos):
                path = write_mp4(paths[(index, result.seed)], frames, fps=args.fps)
                if not args.quiet:
                    print(f"wrote {path} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}, "
                          f"{args.fps} fps, seed {result.seed})")
            if not args.quiet:
                print(result.summary())
    except (CheckpointError, ValueError, OSError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
