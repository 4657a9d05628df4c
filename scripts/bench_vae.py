"""Benchmark OpenSoraVAE_V1_2 decoding at the real model size (random weights): seconds and peak memory.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python scripts/bench_vae.py --frames 68 --height 192 --width 192
    ... --frames 51 --height 240 --width 426              # 240p 9:16 bucket (latent 15 x 30 x 53)
    ... --tiling --tile-size 16 --tile-overlap 4          # spatial tiling (latent pixels)
    ... --max-chunks 1                                    # only the first temporal chunk(s), extrapolated

The architecture is the released one (SDXL AutoencoderKL + VAE_Temporal_SD, 393M parameters); only
the decoder weights are materialised. Peak memory: ``mx.get_peak_memory()`` (MLX allocations, reset
after the weights are loaded, so "decode peak" includes the weights) and the process's peak as its OS
counts it (max RSS on Linux, peak footprint on macOS).
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_sora.models.vae import OpenSoraVAE, VideoAutoencoderConfig
from mlx_sora.runtime.memory import keep_freed_cpu_memory, os_memory, peak_process_memory

GIB = 1024**3


def decoder_parameters(vae: OpenSoraVAE) -> list[mx.array]:
    return [
        v
        for k, v in tree_flatten(vae.parameters())
        if k in ("scale", "shift") or k.split(".")[1] in ("decoder", "post_quant_conv")
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=68)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--tiling", action="store_true")
    parser.add_argument("--tile-size", type=int, default=32, help="tile size in latent pixels")
    parser.add_argument("--tile-overlap", type=int, default=8, help="overlap in latent pixels")
    parser.add_argument("--max-chunks", type=int, default=None, help="decode only this many temporal chunks")
    parser.add_argument(
        "--spatial-frames", type=int, default=None, help="spatially decode only this many frames per chunk"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()

    keep_freed_cpu_memory()  # as load_model / Pipeline do
    dtype = getattr(mx, args.dtype)
    mx.random.seed(0)
    vae = OpenSoraVAE(VideoAutoencoderConfig(), compute_dtype=dtype)  # released architecture, random init (lazy)
    vae.set_dtype(dtype)
    weights = decoder_parameters(vae)
    mx.eval(weights)
    weight_bytes = sum(w.nbytes for w in weights)
    vae.micro_batch_size = args.micro_batch_size
    vae.set_tiling(args.tiling, args.tile_size, args.tile_overlap)

    t_lat, h, w = vae.get_latent_size((args.frames, args.height, args.width))
    z = mx.random.normal((1, vae.latent_channels, t_lat, h, w)).astype(dtype)
    chunks = vae.temporal_chunks(t_lat, args.frames)
    if args.max_chunks is not None:
        chunks = chunks[: args.max_chunks]
    frames_run = sum(c[2] for c in chunks)
    print(
        f"decode {args.frames} frames {args.height}x{args.width} -> latent {t_lat}x{h}x{w}, output "
        f"{8 * h}x{8 * w}; {len(chunks)} temporal chunk(s) = {frames_run} frames run; dtype {args.dtype}, "
        f"micro batch {args.micro_batch_size}, tiling "
        + (f"on (tile {args.tile_size}, overlap {args.tile_overlap} latent px)" if args.tiling else "off")
    )
    print(f"decoder weights: {weight_bytes / GIB:.2f} GiB")

    if args.max_chunks is not None:  # decode only the first chunks: their latents and frames
        z = z[:, :, : chunks[-1][1]]
    mx.reset_peak_memory()
    temporal_s = spatial_s = 0.0
    temporal_peak = spatial_peak = 0
    spatial_frames = 0
    start = time.perf_counter()
    temporal = vae.decode_temporal(z, num_frames=frames_run)
    for index in range(len(chunks)):
        t0 = time.perf_counter()
        x_z = next(temporal)
        t1 = time.perf_counter()
        temporal_peak = max(temporal_peak, mx.get_peak_memory())
        mx.reset_peak_memory()
        frames = x_z.shape[1] if args.spatial_frames is None else min(args.spatial_frames, x_z.shape[1])
        spatial_frames += frames
        for f0 in range(0, frames, args.micro_batch_size):  # as decode_chunks, frames kept as uint8 only
            video = vae.decode_spatial(x_z[0, f0 : min(f0 + args.micro_batch_size, frames)])
            mx.eval(((mx.clip(video, -1, 1) + 1) * 127.5).astype(mx.uint8))
        t2 = time.perf_counter()
        spatial_peak = max(spatial_peak, mx.get_peak_memory())
        mx.reset_peak_memory()
        temporal_s += t1 - t0
        spatial_s += t2 - t1
        print(
            f"chunk {index}: {frames} frames; temporal decoder {t1 - t0:.1f} s, spatial decoder {t2 - t1:.1f} s "
            f"({(t2 - t1) / frames:.2f} s/frame); MLX peak: temporal stage {temporal_peak / GIB:.2f} GiB, "
            f"spatial stage {spatial_peak / GIB:.2f} GiB",
            flush=True,
        )
        del x_z, video
    elapsed = time.perf_counter() - start
    peak = max(temporal_peak, spatial_peak)
    process_peak = peak_process_memory()
    print("---")
    print(
        f"ran: temporal decoder on {len(chunks)} chunk(s) ({frames_run} frames) {temporal_s:.1f} s; spatial decoder "
        f"on {spatial_frames} frames {spatial_s:.1f} s ({spatial_s / spatial_frames:.2f} s/frame); wall {elapsed:.1f} s"
    )
    all_chunks = vae.temporal_chunks(t_lat, args.frames)
    if spatial_frames < args.frames:
        # temporal cost per chunk and spatial cost per frame are constant (a short last chunk costs less)
        estimate = temporal_s / len(chunks) * len(all_chunks) + spatial_s / spatial_frames * args.frames
        print(
            f"EXTRAPOLATED (not measured) to all {args.frames} frames, {len(all_chunks)} chunks: ~{estimate:.0f} s "
            f"= {temporal_s / len(chunks):.1f} s/chunk temporal + {spatial_s / spatial_frames:.2f} s/frame spatial"
        )
    print(
        f"MLX peak memory (incl. {weight_bytes / GIB:.2f} GiB decoder weights): {peak / GIB:.2f} GiB "
        f"(temporal stage {temporal_peak / GIB:.2f}, spatial stage {spatial_peak / GIB:.2f})"
    )
    print(f"{os_memory().peak_name}: {process_peak / GIB:.2f} GiB")


if __name__ == "__main__":
    main()
