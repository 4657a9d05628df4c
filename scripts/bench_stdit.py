"""Benchmark one STDiT3-XL/2 forward pass (CFG batch 2), with and without TDTM.

Random weights (the model is built and its lazy random parameters evaluated; nothing is written to
disk). Each pass runs unit by unit (embedders, 28 spatial+temporal pairs, final layer) with an
``mx.eval`` after every unit, so the graph stays one unit deep -- the way the sampler and the CI-DL
streamer run it. Prints seconds per step (wall, and CPU time of all threads, which is less sensitive to
other processes on a shared machine), MLX peak memory (weights included), the process's peak (max RSS on Linux, peak footprint on macOS)
and the TDTM speed-up.

    # on Linux CPU, with OpenBLAS (MLX's bundled CPU BLAS was ~9x slower here)
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python scripts/bench_stdit.py                    # 68 and 17 frames at 192x192
    python scripts/bench_stdit.py --depth 2 --frames 17  # quick smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_sora.models.stdit3 import STDiT3, STDiT3Config
from mlx_sora.models.units import run_units
from mlx_sora.models.vae import OpenSoraVAE, VideoAutoencoderConfig
from mlx_sora.runtime.memory import keep_freed_cpu_memory, os_memory, peak_process_memory

VAE_SPATIAL = 8  # pixels per latent pixel


def latent_frames(num_frames: int) -> int:
    """Latent frames of the released Open-Sora 1.2 VAE (its own rule; building it allocates nothing)."""
    return OpenSoraVAE(VideoAutoencoderConfig()).latent_frames(num_frames)


def forward_unit_by_unit(model: STDiT3, inputs: dict, merge: bool) -> tuple[mx.array, float, float]:
    """One forward pass; returns (output, wall seconds, CPU seconds of all threads)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    out = run_units(model.units, dict(inputs, merge=merge), evaluate=True)
    return out, time.perf_counter() - start, time.process_time() - cpu_start


def make_inputs(model: STDiT3, frames: int, height: int, width: int, batch: int, dtype: mx.Dtype) -> dict:
    config = model.config
    t = latent_frames(frames)
    h, w = height // VAE_SPATIAL, width // VAE_SPATIAL
    key = mx.random.key(0)
    kx, ky = mx.random.split(key)
    n_cond = batch // 2 if batch % 2 == 0 else batch
    caption_len = config.model_max_length
    y = mx.random.normal((n_cond, 1, caption_len, config.caption_channels), key=ky) * 0.1
    null = model.null_caption(batch - n_cond)
    mask = (mx.arange(caption_len)[None] < 40).astype(mx.int32)  # a 40-token prompt; CFG: B/2 rows
    inputs = dict(
        x=mx.random.normal((batch, config.in_channels, t, h, w), key=kx).astype(dtype),
        timestep=mx.full((batch,), 950.0),
        y=mx.concatenate([y, null], axis=0).astype(dtype) if batch > n_cond else y.astype(dtype),
        mask=mx.tile(mask, (n_cond, 1)),
        x_mask=mx.ones((batch, t), dtype=mx.bool_),
        fps=mx.full((n_cond,), 24.0),
        height=mx.full((n_cond,), float(height)),
        width=mx.full((n_cond,), float(width)),
    )
    mx.eval(inputs)
    return inputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[68, 17], help="video frames (68 -> 20 latent frames)")
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--batch", type=int, default=2, help="2 = one CFG step (conditional + null caption)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--depth", type=int, default=28, help="fewer blocks for a quick run (28 = XL/2)")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes per setting (the minimum is reported)")
    args = parser.parse_args(argv)

    keep_freed_cpu_memory()  # as load_model / Pipeline do
    dtype = getattr(mx, args.dtype)
    config = STDiT3Config(depth=args.depth)
    model = STDiT3(config, compute_dtype=dtype)
    model.set_dtype(dtype)
    model.eval()
    t0 = time.perf_counter()
    mx.eval(model.parameters())
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"STDiT3 depth {config.depth}, hidden {config.hidden_size}: {n_params / 1e6:.1f} M parameters, {args.dtype}, "
          f"weights {mx.get_active_memory() / 2**30:.2f} GiB (built in {time.perf_counter() - t0:.1f} s)")
    print(f"device {mx.default_device()}, LD_PRELOAD={os.environ.get('LD_PRELOAD', '-')}, "
          f"load average {os.getloadavg()[0]:.2f}, cpus {os.cpu_count()}")

    for frames in args.frames:
        inputs = make_inputs(model, frames, args.height, args.width, args.batch, dtype)
        b, _, t, h, w = inputs["x"].shape
        seconds, cpu_seconds = {}, {}
        for merge in (False, True):
            mx.reset_peak_memory()
            runs = [forward_unit_by_unit(model, inputs, merge) for _ in range(args.repeats)]
            out = runs[-1][0]
            seconds[merge] = min(r[1] for r in runs)
            cpu_seconds[merge] = min(r[2] for r in runs)
            finite = bool(mx.all(mx.isfinite(out.astype(mx.float32))).item())
            print(f"{frames} frames {args.height}x{args.width} (latent {t}x{h}x{w}, {t * (h // 2) * (w // 2)} tokens), "
                  f"batch {b}, TDTM {'on ' if merge else 'off'}: {seconds[merge]:.2f} s/step "
                  f"({cpu_seconds[merge]:.1f} CPU s, load average {os.getloadavg()[0]:.2f}), "
                  f"peak MLX memory {mx.get_peak_memory() / 2**30:.2f} GiB, {os_memory().peak_name} {peak_process_memory() / 2**30:.2f} GiB, "
                  f"output finite: {finite}", flush=True)
        print(f"{frames} frames: TDTM speed-up {seconds[False] / seconds[True]:.2f}x wall, "
              f"{cpu_seconds[False] / cpu_seconds[True]:.2f}x CPU time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
