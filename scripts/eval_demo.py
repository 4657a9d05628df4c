"""Prompt adherence of the embedded demo model, and what LPL, TDTM and quantization cost.

    python scripts/eval_demo.py                       # every configuration below (~minutes on 2 cores)
    python scripts/eval_demo.py --configs baseline "LPL 15" --sheet /tmp/grid.png

Generates the fixed prompt x seed grid (``clips.EVAL_GRID``: every color x shape x direction
combination, held-out ones included, with fixed seeds) through ``mlx_sora.Pipeline`` (the demo's own
size, frames, steps and CFG scale) and scores every video with ``mlx_sora.demo.judge``: accuracy per
attribute (color, motion, shape, temporal consistency) and overall adherence, for all entries, the
combinations seen in training and the held-out ones, plus the wall time of generating the grid
relative to the baseline. Prompts are generated as one batch per seed; the dynamic LPL rule decides
on the first sample of a batch (as On-device Sora's batch-1 code), so it runs one prompt at a time,
and compares with "baseline, one prompt at a time" (the same noise per video, the same batching).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_sora import Pipeline, load_model, save_model
from mlx_sora.conversion.loading import read_converted_config
from mlx_sora.conversion.registry import DEFAULTS_FILES, DEMO_MODEL_DIR, find_components
from mlx_sora.demo import clips
from mlx_sora.demo.judge import judge, judge_grid

CONFIGS: dict[str, dict] = {
    "baseline": {},
    "LPL 15": {"lpl": 15},
    "baseline, one prompt at a time": {"one_at_a_time": True},
    "LPL dynamic": {"lpl": "dynamic", "one_at_a_time": True},
    "TDTM 15": {"tdtm_steps": 15},
    "TDTM all": {"tdtm_steps": 30},
    "LPL 15 + TDTM 15": {"lpl": 15, "tdtm_steps": 15},
    "int8": {"quantize": "int8"},
    "int4": {"quantize": "int4"},
}


def quantized_copy(source: Path, bits: str, root: Path) -> Path:
    """The model with its T5 and STDiT3 blocks re-saved quantized (the VAE as it is)."""
    target = root / f"demo_{bits}"
    components = find_components(source)
    for name, folder in components.items():
        config = read_converted_config(folder)
        if name == "vae":
            shutil.copytree(folder, target / name)
            continue
        family_config = {k: v for k, v in config.items() if k not in ("mlx_sora", "model_type")}
        save_model(load_model(folder, dtype="float32"), target / name, config["model_type"], family_config,
                   quantize=bits, group_size=32, source_dir=folder)
    for name in DEFAULTS_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, target / name)
    return target


def run_grid(pipe: Pipeline, options: dict, batch_prompts: bool, limit: int | None):
    grid = list(clips.EVAL_GRID)[:limit] if limit else list(clips.EVAL_GRID)
    by_seed: dict[int, list[str]] = {}
    for prompt, seed in grid:
        by_seed.setdefault(seed, []).append(prompt)
    judgements, videos, evaluations = [], [], []
    start = time.perf_counter()
    for seed, prompts in by_seed.items():
        groups = [prompts] if batch_prompts else [[p] for p in prompts]
        for group in groups:
            result = pipe.generate(group, seed=seed, **options)
            evaluations += [result.sampling.evaluations] * len(group)
            for prompt, video in zip(group, result.videos):
                judgements.append(judge(video, prompt))
                videos.append(video)
    return judgements, videos, float(np.mean(evaluations)), time.perf_counter() - start


def contact_sheet(videos: list[np.ndarray], path: Path, every: int = 4) -> None:
    from PIL import Image

    rows = [np.concatenate(list(v[::every]), axis=1) for v in videos]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


STRIP_PROMPTS = ("a red circle moving right", "a blue square moving up", "a yellow triangle moving left")


def frame_strip(model: Path, path: Path, seed: int = 0, every: int = 2, scale: int = 2) -> None:
    """A PNG of the demo's default run for a few prompts: every ``every``-th frame side by side, one
    row per prompt, each frame upscaled ``scale``x (nearest) with a 2-pixel gap."""
    from PIL import Image

    pipe = Pipeline.from_pretrained(model, dtype="float32", memory_budget=None)
    rows = []
    for prompt in STRIP_PROMPTS:
        video = pipe.generate(prompt, seed=seed).videos[0][::every]
        frames = [np.pad(f.repeat(scale, 0).repeat(scale, 1), ((2, 2), (2, 2), (0, 0)), constant_values=255)
                  for f in video]
        rows.append(np.concatenate(frames, axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    print(f"frame strip of {', '.join(STRIP_PROMPTS)} (seed {seed}, one frame in {every}): {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR, help="default: the embedded demo model")
    parser.add_argument("--limit", type=int, default=None, help="only the first N grid entries")
    parser.add_argument("--sheet", type=Path, default=None, help="a PNG contact sheet of the baseline grid")
    parser.add_argument("--strip", type=Path, default=None, help="also write a frame strip PNG of a few prompts")
    args = parser.parse_args()
    if args.strip:
        frame_strip(args.model, args.strip)
    print(f"device {mx.default_device()}, {os.cpu_count()} cpus, LD_PRELOAD={os.environ.get('LD_PRELOAD', '-')}, "
          f"load average {os.getloadavg()[0]:.1f}; grid of {len(clips.EVAL_GRID)} (prompt, seed) entries, "
          f"{sum(clips.parse_caption(p).held_out for p, _ in clips.EVAL_GRID)} of them held-out combinations",
          flush=True)
    base_seconds: dict[bool, float] = {}  # baseline wall time per batching (batched / one prompt at a time)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            options = dict(CONFIGS[name])
            quantize = options.pop("quantize", None)
            one_at_a_time = options.pop("one_at_a_time", False)
            model = quantized_copy(args.model, quantize, Path(tmp)) if quantize else args.model
            pipe = Pipeline.from_pretrained(model, dtype="float32", memory_budget=None, keep_loaded=True)
            pipe.generate("a red circle moving left", seed=0, **options)  # warm-up (loads the models)
            judgements, videos, evaluations, seconds = run_grid(pipe, options, not one_at_a_time, args.limit)
            if name.startswith("baseline"):
                base_seconds[one_at_a_time] = seconds
                if args.sheet and not one_at_a_time:
                    contact_sheet(videos, args.sheet)
            scores = judge_grid(judgements)
            base = base_seconds.get(one_at_a_time)
            relative = f"{base / seconds:.2f}x" if base else "-"
            rows.append((name, scores, evaluations, seconds, relative))
            print(f"{name:<18} {seconds:7.1f} s  speed-up {relative:>6}  model evaluations {evaluations:.1f} per video")
            for part in ("all", "in_distribution", "held_out"):
                print(f"    {part:>16}: {scores[part].row()}", flush=True)
    print("\n| configuration | color | motion | shape | consistent | adherence | held-out adherence "
          "| model evaluations | wall time | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, scores, evaluations, seconds, relative in rows:
        s, h = scores["all"], scores["held_out"]
        print(f"| {name} | {s.color:.1%} | {s.motion:.1%} | {s.shape:.1%} | {s.consistent:.1%} | {s.adherence:.1%} "
              f"| {h.adherence:.1%} | {evaluations:.1f} | {seconds:.1f} s | {relative} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
