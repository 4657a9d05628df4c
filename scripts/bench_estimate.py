"""Projected against measured: `python -m mlx_sora.estimate --device this-machine` beside real runs.

For each case, each step in a fresh process with the fast BLAS: this machine's rates measured and
the request projected (``--remeasure``), the generation run, the rates measured and the request
projected again; the projection compared is the mean of the two, so that a shared machine's load is
sampled around the run. It prints per phase the projected and measured seconds and their ratio (the
issue's target: within +-30 %) and the machine's load average during each run.

    python scripts/bench_estimate.py                                   # the demo model at two sizes
    python scripts/bench_estimate.py --real /work/bench/real           # + the full-size random folder
    python scripts/bench_estimate.py --real /work/bench/real --cases real:192x192x17 --json out.json
    python scripts/bench_estimate.py --paper iphone15pro              # the README's table: projection only

Cases: ``demo:HxWxF`` (the demo model, 30 steps, default budget), ``real:HxWxF`` (the folder given
by ``--real``, written by ``scripts/bench_memory.py prepare``: one denoising evaluation of the
30-step schedule, ``--memory-budget 3.3GB``, float32, as bench_memory's budget-3.3GB row).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "a red panda eating bamboo in a misty forest"
DEMO_PROMPT = "a red circle moving left"
PHASES = (("text encoding", "text_encoding"), ("denoising", "denoising"), ("decoding", "decoding"))
TOLERANCE = 0.30


def case_options(case: str, real: Path | None) -> tuple[str, list[str], dict]:
    """(model, estimate options, Pipeline.generate options) of a case."""
    kind, size = case.split(":")
    height, width, frames = (int(v) for v in size.split("x"))
    common = ["--image-size", str(height), str(width), "--num-frames", str(frames)]
    if kind == "demo":
        return "demo", [*common, "--prompt", DEMO_PROMPT], dict(
            prompt=DEMO_PROMPT, image_size=(height, width), num_frames=frames, seed=0)
    if real is None:
        raise SystemExit(f"{case}: give --real FOLDER (scripts/bench_memory.py prepare)")
    return str(real), [*common, "--prompt", PROMPT, "--steps", "30", "--lpl-step", "0", "--memory-budget", "3.3GB"], \
        dict(prompt=PROMPT, image_size=(height, width), num_frames=frames, steps=30, lpl=0, seed=0)


PAPER_SETTING = ["--model", "opensora-v1.2", "--image-size", "256", "256", "--num-frames", "68", "--steps", "30"]
TECHNIQUES = (  # (name, options): each On-device Sora technique alone and all together, as the app sets them
    ("none (every block read before it runs)", ["--no-ci-dl"]),
    ("LPL (leap at step 15)", ["--no-ci-dl", "--lpl-step", "15"]),
    ("TDTM (first 15 steps)", ["--no-ci-dl", "--tdtm-steps", "15"]),
    ("CI-DL (3.3 GB)", []),
    ("LPL + TDTM + CI-DL", ["--lpl-step", "15", "--tdtm-steps", "15"]),
)


def paper_table(device: str) -> None:
    """The projection for the paper's setting (256x256, 68 frames, 30 steps) with each technique."""
    from mlx_sora.estimate.__main__ import main as estimate

    print(f"| {device}: 256x256x68, 30 steps | text encoding s | denoising s | decoding s | total s | peak |")
    print("|---|---|---|---|---|---|")
    for name, options in TECHNIQUES:
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            estimate(["--device", device, *PAPER_SETTING, *options, "--json"])
        p = json.loads(out.getvalue())
        phases = [p["phases"][k]["seconds"] for _, k in PHASES]
        print(f"| {name} | {phases[0]:.0f} | {phases[1]:.0f} | {phases[2]:.0f} | {p['total_seconds']:.0f} | "
              f"{p['peak_bytes'] / 2**30:.2f} GiB |")


def measure(model: str, options: dict) -> dict:
    """One generation in this (fresh) process; its phases' seconds."""
    from mlx_sora import Pipeline

    real = model != "demo"
    pipe = Pipeline.from_pretrained(model, dtype="float32" if real else None,
                                    memory_budget="3.3GB" if real else "auto")
    if real:  # as bench_memory: the weight files in the page cache
        for folder in pipe.components.values():
            for path in Path(folder).glob("*.safetensors"):
                with open(path, "rb", buffering=0) as f:
                    while f.read(64 << 20):
                        pass
    prompt = options.pop("prompt")
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    result = pipe.generate(prompt, **options)
    return {"seconds": time.perf_counter() - start, "load_average": (load_before + os.getloadavg()[0]) / 2,
            "phases": {p.name: {"seconds": p.seconds, "waited": p.load_wait, "process_peak": p.process_peak}
                       for p in result.phases}}


def _mean_projection(before: dict, after: dict) -> dict:
    """Phase seconds and total as the mean of two projections of the same request."""
    phases = {key: {"seconds": (before["phases"][key]["seconds"] + after["phases"][key]["seconds"]) / 2}
              for _, key in PHASES}
    return {"device": before["device"], "phases": phases, "total_seconds": sum(p["seconds"] for p in phases.values())}


def _child(args: list[str]) -> dict:
    from mlx_sora.runtime.blas import fast_blas_env

    env = fast_blas_env()
    env["MLX_SORA_BLAS_CHECKED"] = "1"
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout[done.stdout.index("{"):])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=None,
                        help="demo:HxWxF or real:HxWxF (default: demo:64x64x17 demo:128x128x34, and with --real "
                             "real:192x192x17 real:256x256x68)")
    parser.add_argument("--real", type=Path, default=None, help="the full-size random-weight folder")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--paper", metavar="DEVICE", default=None,
                        help="instead: the projection on DEVICE (e.g. iphone15pro) for the paper's setting with each "
                             "technique alone and together (no measurement)")
    parser.add_argument("--measure", nargs=2, metavar=("MODEL", "OPTIONS_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.paper:
        paper_table(args.paper)
        return 0
    if args.measure:  # the child process of one measured run
        print(json.dumps(measure(args.measure[0], json.loads(args.measure[1]))))
        return 0
    cases = args.cases or ["demo:64x64x17", "demo:128x128x34"] + (
        ["real:192x192x17", "real:256x256x68"] if args.real else [])
    estimate = ["-m", "mlx_sora.estimate", "--device", "this-machine", "--json"]
    print(f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    results = []
    for case in cases:
        # the rates measured right before and right after each run, so that a shared machine's load
        # is sampled around it; the projection compared is the mean of the two
        model, estimate_options, generate_options = case_options(case, args.real)
        before = _child([*estimate, "--model", model, *estimate_options, "--remeasure"])
        measured = _child([__file__, "--measure", model, json.dumps(generate_options)])
        after = _child([*estimate, "--model", model, *estimate_options, "--remeasure"])
        projection = _mean_projection(before, after)
        results.append({"case": case, "projected": projection, "before": before, "after": after,
                        "measured": measured})
        print(f"{case}: measured {measured['seconds']:.1f} s (load average {measured['load_average']:.1f}), "
              f"projected {projection['total_seconds']:.1f} s (rates before the run: {before['total_seconds']:.1f} s, "
              f"after: {after['total_seconds']:.1f} s)", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    print(f"\n{'case':<18} {'phase':<14} {'projected s':>11} {'measured s':>10} {'ratio':>6}  within +-30 %")
    worst = 0.0
    for r in results:
        for name, key in PHASES:
            projected = r["projected"]["phases"][key]["seconds"]
            measured = r["measured"]["phases"][name]["seconds"]
            ratio = projected / measured
            worst = max(worst, abs(ratio - 1))
            print(f"{r['case']:<18} {name:<14} {projected:11.2f} {measured:10.2f} {ratio:6.2f}  "
                  f"{'yes' if abs(ratio - 1) <= TOLERANCE else 'NO'}")
        total_m = sum(r["measured"]["phases"][n]["seconds"] for n, _ in PHASES)
        print(f"{r['case']:<18} {'total':<14} {r['projected']['total_seconds']:11.2f} {total_m:10.2f} "
              f"{r['projected']['total_seconds'] / total_m:6.2f}")
    device = results[0]["projected"]["device"] if results else "-"
    print(f"\nworst phase error {worst:.0%} (device {device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
