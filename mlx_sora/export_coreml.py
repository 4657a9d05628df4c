"""Export a model to Core ML, one ML Program package per unit, with the manifest an app runs it by.

    python -m mlx_sora.export_coreml --model demo --out exports/demo
    python -m mlx_sora.export_coreml --model opensora-v1.2 --out exports/iphone --device-profile iphone15pro

Needs coremltools (``pip install ".[coreml]"``), which builds and saves packages on Linux and macOS;
compiling and running them is Core ML's, on Apple platforms (``python -m mlx_sora.generate --coreml
DIR`` runs them there, and replays them op by op elsewhere). Every option is checked before any
weights are read; the output folder appears only when the export is complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UserError, describe_os_error
from .runtime.profiles import PROFILES, get_profile

DEFAULT_COMPRESSION = {"iphone15pro": "text_encoder=int8"}


def build_parser() -> argparse.ArgumentParser:
    from .coreml.package import COMPRESSIONS, PRECISIONS

    p = argparse.ArgumentParser(prog="python -m mlx_sora.export_coreml",
                                description="Export a model's units to Core ML ML Programs (.mlpackage) and a "
                                            "manifest.json an app runs them by.")
    p.add_argument("--model", default=None,
                   help="'demo' (default, built in), 'opensora-v1.2' (converted into weights/ once) or a folder "
                        "of converted weights")
    p.add_argument("--out", required=True, help="the export folder to create (refused if it exists, unless "
                                                "--overwrite and it holds a previous export)")
    p.add_argument("--device-profile", default=None, choices=list(PROFILES),
                   help="a target device's settings: its size, LPL/TDTM, memory budget for the CI-DL plan and, "
                        "unless --compress says otherwise, its compression (iphone15pro: text_encoder=int8)")
    p.add_argument("--sizes", nargs="+", default=None, metavar="HxWxN",
                   help="video sizes (height x width x frames) to export; every unit gets the shapes they need. "
                        "Default: the device profile's, else the model's")
    p.add_argument("--precision", default="float16", choices=PRECISIONS,
                   help="float16 (default; ops that overflow it on calibration inputs stay float32) or float32")
    p.add_argument("--compress", nargs="+", default=None, metavar="[COMPONENT=]KIND",
                   help=f"weight compression of linear layers and convolutions, {'/'.join(COMPRESSIONS)}, for all "
                        "components or per component, e.g. text_encoder=int8 (components: text_encoder, stdit3, vae)")
    p.add_argument("--memory-budget", default=None, help="budget of the CI-DL plan in the manifest (default: the "
                                                          "device profile's, else none)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps recorded in the manifest")
    p.add_argument("--cfg-scale", type=float, default=None)
    leap = p.add_mutually_exclusive_group()
    leap.add_argument("--lpl-step", type=int, default=None)
    leap.add_argument("--lpl", choices=["dynamic"], default=None)
    p.add_argument("--tdtm-steps", type=int, default=None)
    p.add_argument("--fps", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it holds a previous export")
    p.add_argument("--quiet", action="store_true", help="only errors")
    return p


def _sizes(args: argparse.Namespace, profile, defaults) -> list:
    from .coreml.export import VideoSize

    if args.sizes:
        sizes = [VideoSize.parse(text) for text in args.sizes]
    elif profile is not None:
        from .request import GenerationRequest

        request = GenerationRequest.build("a", resolution=profile.resolution, aspect_ratio=profile.aspect_ratio,
                                          num_frames=profile.num_frames)
        sizes = [VideoSize(request.height, request.width, request.num_frames)]
    else:
        factor = 8
        sizes = [VideoSize(defaults.height // factor * factor, defaults.width // factor * factor, defaults.num_frames)]
    if len({s.name for s in sizes}) != len(sizes):
        raise UserError("--sizes lists a size twice")
    return sizes


def plan_export(args: argparse.Namespace):
    """Every check that needs no weights: model, sizes, options, output folder."""
    from .conversion.loading import build_model
    from .conversion.registry import resolve_model
    from .coreml.export import COMPONENTS, ExportPlan, check_size
    from .coreml.package import parse_compression
    from .coreml.toolkit import coremltools
    from .request import GenerationRequest
    from .runtime.streaming import parse_memory_size

    coremltools()
    profile = get_profile(args.device_profile) if args.device_profile else None
    compress = args.compress or ([DEFAULT_COMPRESSION.get(profile.name, "none")] if profile else ["none"])
    compression = parse_compression(compress, COMPONENTS)
    bundle = resolve_model(args.model)
    skeletons = {c: build_model(p) for c, p in bundle.components.items()}
    sizes = _sizes(args, profile, bundle.defaults)
    for size in sizes:
        check_size(size, skeletons["vae"])
    options = dict(steps=args.steps, cfg_scale=args.cfg_scale, fps=args.fps,
                   lpl="dynamic" if args.lpl else args.lpl_step, tdtm_steps=args.tdtm_steps)
    if profile is not None:
        options["lpl"] = options["lpl"] if options["lpl"] is not None else profile.lpl
        options["tdtm_steps"] = options["tdtm_steps"] if options["tdtm_steps"] is not None else profile.tdtm_steps
    options["tdtm_steps"] = options["tdtm_steps"] or 0
    from .coreml.export import CALIBRATION_PROMPT

    request = GenerationRequest.build(_calibration_prompt(bundle, CALIBRATION_PROMPT), bundle.defaults,
                                      image_size=(sizes[0].height, sizes[0].width), num_frames=sizes[0].num_frames,
                                      **options)
    budget_text = args.memory_budget or (profile.memory_budget if profile else None)
    budget = parse_memory_size(budget_text) if budget_text else None
    check_export_target(args.out, bundle, args.overwrite)
    return ExportPlan(bundle, skeletons, sizes, request, args.precision, compression, budget,
                      profile.name if profile else None)


def check_export_target(out: str, bundle, overwrite: bool) -> None:
    """--out may not be, hold or lie in a model folder, nor replace anything but a previous export."""
    from .coreml.manifest import is_export_folder
    from .io.fsutil import check_output_folder

    try:
        check_output_folder(out, [Path(p) for p in bundle.components.values()], overwrite=overwrite,
                            is_ours=is_export_folder)
    except UserError as e:
        raise UserError(f"--out {e}") from e


def _calibration_prompt(bundle, default: str) -> str:
    """The demo model's own kind of caption (its tokenizer knows only its vocabulary), else a real one."""
    if bundle.is_demo:
        from .demo.clips import ClipSpec, ObjectSpec, caption

        return caption(ClipSpec((ObjectSpec("red", "circle", "left"),)))
    return default


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = plan_export(args)
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    from .coreml.export import export
    from .runtime.blas import ensure_fast_cpu_blas
    from .runtime.memory import os_memory
    from .runtime.streaming import format_bytes

    ensure_fast_cpu_blas(args.quiet)
    log = (lambda line: None) if args.quiet else (lambda line: print(line, flush=True))
    if not args.quiet:
        sizes = ", ".join(s.name for s in plan.sizes)
        compress = ", ".join(f"{c} {k}" for c, k in plan.compression.items())
        print(f"exporting {plan.bundle.name} to {args.out}: sizes {sizes}; {plan.precision}; compression: {compress}")
    try:
        result = export(plan, Path(args.out), overwrite=args.overwrite, log=log)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 1
    if not args.quiet:
        per = ", ".join(f"{c} {format_bytes(b)}" for c, b in result.bytes_per_component().items())
        print(f"wrote {result.folder}: {len(result.units)} packages ({per}) in {result.seconds:.1f} s, "
              f"process {os_memory().peak_name} {format_bytes(result.process_peak)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
