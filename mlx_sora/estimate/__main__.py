"""``python -m mlx_sora.estimate``: projected seconds and peak memory of a generation on a device.

    python -m mlx_sora.estimate --device iphone15pro --model opensora-v1.2 --image-size 256 256 \\
        --num-frames 68 --steps 30 --lpl-step 15 --tdtm-steps 15
    python -m mlx_sora.estimate --device this-machine --json          # the demo model, measured rates

The options mean what they mean for ``python -m mlx_sora.generate``, and are checked the same way,
before any work. ``--no-ci-dl`` projects without CI-DL: every unit read right before it runs and
released after, nothing resident, no overlap.
"""

from __future__ import annotations

import argparse
import sys

from .. import aspect
from ..conversion.registry import GenerationDefaults
from ..errors import UserError
from ..request import GenerationRequest
from ..runtime.streaming import parse_memory_size
from .devices import THIS_MACHINE, device_names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_sora.estimate",
        description="Project the time and peak memory of a generation on a device, per phase, without running it.",
    )
    p.add_argument("--device", default=THIS_MACHINE, choices=device_names(),
                   help=f"the target device (default {THIS_MACHINE}: this machine's rates, measured once and cached)")
    p.add_argument("--model", default=None,
                   help="'demo' (default), 'opensora-v1.2' (its architecture ships with the package: no weights "
                        "needed) or a folder of converted weights")
    p.add_argument("--prompt", nargs="+", default=None,
                   help="prompts (one video each): their length sets the caption tokens cross-attention reads "
                        "(default: one prompt, the whole padded caption)")
    size = p.add_argument_group("size (default: what the model was made for)")
    size.add_argument("--resolution", default=None, choices=list(aspect.IMAGE_SIZES))
    size.add_argument("--aspect-ratio", default=None, choices=list(aspect.ASPECT_RATIOS), help="height:width")
    size.add_argument("--image-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), default=None)
    size.add_argument("--num-frames", default=None)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 30)")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale")
    leap = p.add_mutually_exclusive_group()
    leap.add_argument("--lpl-step", type=int, default=None, help="LPL: leap at step N (N+1 model evaluations)")
    leap.add_argument("--lpl", choices=["dynamic"], default=None, help="LPL with On-device Sora's rule")
    p.add_argument("--tdtm-steps", type=int, default=0, help="TDTM token merging in the first K steps")
    p.add_argument("--seed", type=int, nargs="+", default=[42], help="one video per seed (as generate)")
    memory = p.add_argument_group("memory (CI-DL)")
    memory.add_argument("--memory-budget", default=None,
                        help="e.g. 3.3GB, 2GiB, or 'none' (each phase loads its whole model); default: the device's")
    memory.add_argument("--no-overlap", action="store_true", help="stream without loading ahead")
    memory.add_argument("--no-ci-dl", action="store_true",
                        help="no CI-DL: every unit read right before it runs and released after, nothing resident")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="compute dtype (default: the device's)")
    p.add_argument("--remeasure", action="store_true", help=f"measure {THIS_MACHINE} again (not the cached rates)")
    p.add_argument("--json", action="store_true", help="print the projection as one JSON object")
    p.add_argument("--units", action="store_true", help="list every unit's loads, compute and waits (text output)")
    return p


def request_options(args: argparse.Namespace) -> dict:
    return dict(
        resolution=args.resolution, aspect_ratio=args.aspect_ratio,
        image_size=tuple(args.image_size) if args.image_size else None, num_frames=args.num_frames,
        steps=args.steps, cfg_scale=args.cfg_scale, seed=list(args.seed),
        lpl="dynamic" if args.lpl == "dynamic" else args.lpl_step, tdtm_steps=args.tdtm_steps,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompts = args.prompt or ["a video"]
    try:  # every check that needs no model, before any work
        options = request_options(args)
        GenerationRequest.build(prompts, GenerationDefaults(), **options)
        budget = "device" if args.memory_budget is None else parse_memory_size(args.memory_budget)
        if args.remeasure and args.device != THIS_MACHINE:
            raise UserError(f"--remeasure applies to --device {THIS_MACHINE} only (the {args.device} table is data)")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.device == THIS_MACHINE:
        from ..runtime.blas import ensure_fast_cpu_blas

        ensure_fast_cpu_blas(quiet=True)  # the rates of the BLAS generate runs with

    from ..runtime.memory import process_memory
    from ..runtime.profiles import PROFILES
    from .devices import load_device
    from .projection import model_spec, project

    rss = process_memory()  # the process generate would plan from (before any benchmark allocates)

    try:
        prefer_quantized = bool(args.device in PROFILES and PROFILES[args.device].prefer_quantized)
        spec, defaults = model_spec(args.model, prefer_quantized)
        request = GenerationRequest.build(prompts, defaults, model_name=f"the {spec.name} model", **options)
        tokens = None
        if args.prompt and spec.tokenizer_folder is not None:
            from ..prompts.tokenizer import T5Tokenizer

            tokenizer = T5Tokenizer.from_folder(spec.tokenizer_folder)
            from .projection import build_model

            length = build_model(spec.folders["stdit3"]).config.model_max_length
            tokens = max(tokenizer(list(request.texts), max_length=length).num_tokens)
        device = load_device(args.device, remeasure=args.remeasure)
        projection = project(spec, request, device, budget, overlap=not args.no_overlap, ci_dl=not args.no_ci_dl,
                             dtype=args.dtype, caption_tokens=tokens,
                             baseline=None if device.process_bytes is not None else (lambda: rss))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(projection.to_json() if args.json else projection.summary(every_unit=args.units))
    return 0


if __name__ == "__main__":
    sys.exit(main())
