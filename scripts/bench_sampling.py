"""Benchmark the sampler's shortcuts: model evaluations and seconds for 30 steps, LPL leap at 15,
dynamic LPL, TDTM on the first 15 steps, and LPL + TDTM together.

Two models:

* ``tiny``: the Open-Sora 1.2 fixture STDiT3 (tests/fixtures) on the fixture's inputs (51 frames at
  96x128, latent 15x12x16, batch 1): every configuration runs completely, so evaluations, the dynamic
  leap step and seconds are all measured.
* ``xl``: STDiT3-XL/2 with random weights at 192x192 x 68 frames (latent 20x24x24), CFG batch 2. A full
  30-step run takes too long on a CPU, so ``--xl-steps`` (default 2) evaluations are timed per mode
  (merged and unmerged); the whole-run seconds are then *projected* as (evaluations in each mode x
  measured seconds per evaluation) and printed as such. Random weights make the dynamic rule's leap
  step meaningless at XL size, so it is reported from the tiny run only.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 python scripts/bench_sampling.py
    python scripts/bench_sampling.py --models tiny
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from mlx_sora import convert, load_model
from mlx_sora.runtime.memory import keep_freed_cpu_memory, os_memory, peak_process_memory
from mlx_sora.sampling import (
    DynamicLeap,
    FixedLeap,
    SamplerConfig,
    num_evaluations,
    sample,
    sampling_timesteps,
)

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "opensora12"

CONFIGS = {
    "30 steps": SamplerConfig(),
    "LPL leap at 15": SamplerConfig(leap=FixedLeap(15)),
    "LPL dynamic": SamplerConfig(leap=DynamicLeap()),
    "TDTM first 15 steps": SamplerConfig(tdtm_steps=15),
    "LPL 15 + TDTM 15": SamplerConfig(leap=FixedLeap(15), tdtm_steps=15),
}


def run_tiny() -> None:
    data = mx.load(str(FIXTURES / "rflow_sample.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(convert(FIXTURES / "stdit3_checkpoint", Path(tmp) / "stdit3"))
    b = slice(0, 1)
    y = mx.concatenate([data["y"][b], model.null_caption(1)], axis=0)
    cond = {k: data[k][b] for k in ("fps", "height", "width")}

    def denoise(z_in, t_in, merge):
        return model(z_in, t_in, y, mask=data["text_mask"][b], merge=merge, **cond)

    timesteps = sampling_timesteps(30, 1, cond["height"], cond["width"], data["num_frames"][b])
    print(f"tiny fixture STDiT3, latent {tuple(data['z0'][b].shape)}, CFG batch 2, float32")
    base = None
    for name, config in CONFIGS.items():
        start = time.perf_counter()
        _, report = sample(denoise, data["z0"][b], timesteps, config)
        seconds = time.perf_counter() - start
        base = base or seconds
        leap = f"leap at {report.leap_step}" if report.leap_step is not None else "no leap"
        print(f"  {name:<22} {report.evaluations:2d} evaluations ({leap:<11}) {seconds:7.2f} s   "
              f"speed-up {base / seconds:4.2f}x")


def run_xl(steps: int, frames: int, height: int, width: int) -> None:
    from mlx_sora.models.stdit3 import STDiT3, STDiT3Config

    keep_freed_cpu_memory()  # as load_model / Pipeline do
    model = STDiT3(STDiT3Config())
    model.eval()
    mx.eval(model.parameters())
    from mlx_sora.models.vae import OpenSoraVAE, VideoAutoencoderConfig

    # the released VAE's own size rule (building it allocates nothing)
    t_lat, h, w = OpenSoraVAE(VideoAutoencoderConfig()).get_latent_size((frames, height, width))
    key_z, key_y = mx.random.split(mx.random.key(0))
    z = mx.random.normal((1, 4, t_lat, h, w), key=key_z)
    y = mx.concatenate([mx.random.normal((1, 1, 300, 4096), key=key_y) * 0.1, model.null_caption(1)], axis=0)
    mask = (mx.arange(300)[None] < 40).astype(mx.int32)
    cond = {k: mx.array([v], dtype=mx.float32) for k, v in (("fps", 24.0), ("height", height), ("width", width))}
    timesteps = sampling_timesteps(30, 1, cond["height"], cond["width"], mx.array([float(frames)]))

    def denoise(z_in, t_in, merge):
        return model(z_in, t_in, y, mask=mask, merge=merge, **cond)

    print(f"STDiT3-XL/2 random weights, {frames} frames {height}x{width} (latent {t_lat}x{h}x{w}), CFG batch 2, "
          f"float32; load average {os.getloadavg()[0]:.2f}")
    per_eval = {}
    for merge in (False, True):
        mx.reset_peak_memory()
        config = SamplerConfig(num_steps=30, tdtm_steps=30 if merge else 0)
        start = time.perf_counter()
        _, report = sample(denoise, z, timesteps[:steps], config)
        per_eval[merge] = (time.perf_counter() - start) / report.evaluations
        print(f"  measured: TDTM {'on ' if merge else 'off'} {per_eval[merge]:7.2f} s/evaluation over {steps}, "
              f"peak MLX {mx.get_peak_memory() / 2**30:.2f} GiB, {os_memory().peak_name} {peak_process_memory() / 2**30:.2f} GiB")
    print(f"  TDTM speed-up per evaluation: {per_eval[False] / per_eval[True]:.2f}x")
    full = 30 * per_eval[False]
    for name, config in CONFIGS.items():
        if isinstance(config.leap, DynamicLeap):
            continue
        evaluations = num_evaluations(config)
        merged = min(config.tdtm_steps, evaluations)
        seconds = merged * per_eval[True] + (evaluations - merged) * per_eval[False]
        print(f"  projected {name:<22} {evaluations:2d} evaluations ({merged:2d} merged) {seconds:8.0f} s   "
              f"speed-up {full / seconds:4.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "xl"], choices=["tiny", "xl"])
    parser.add_argument("--xl-steps", type=int, default=2, help="evaluations timed per mode at XL size")
    parser.add_argument("--frames", type=int, default=68)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--width", type=int, default=192)
    args = parser.parse_args()
    print(f"device {mx.default_device()}, LD_PRELOAD={os.environ.get('LD_PRELOAD', '-')}")
    if "tiny" in args.models:
        run_tiny()
    if "xl" in args.models:
        run_xl(args.xl_steps, args.frames, args.height, args.width)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
