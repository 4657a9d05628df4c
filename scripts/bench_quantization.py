"""Quantized weights: quality against float32 and speed on this machine.

    python scripts/bench_quantization.py --model /work/bench/real        # folders from bench_memory.py prepare
    python scripts/bench_quantization.py --demo                          # the embedded demo model (trained)
    python scripts/bench_quantization.py --matmul                        # quantized matmul vs float32

Quality: the output of the T5 v1.1 XXL encoder (24 layers, random weights at real width, one 300-token
prompt) with int8 and int4 linear layers against float32 (the same bf16-stored weights), and one
STDiT3-XL/2 evaluation (CFG batch 2, 192x192, 17 frames) int8 against float32: cosine similarity and
max |q - f| / max |f|. With ``--demo``: the same for the trained demo model's T5 and STDiT3.
Every run streams unit by unit (``StreamingWeights``), so the float32 XXL encoder never needs 19 GB.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_sora.loading import load_model, read_converted_config
from mlx_sora.models.units import run_units
from mlx_sora.streaming import StreamingWeights, plan_phase, unit_sizes


def run_streamed(folder: Path, carry, dtype=mx.float32):
    model = load_model(folder, dtype=dtype, lazy=True)
    plan = plan_phase("bench", unit_sizes(model, folder, dtype), 10**13, 0, 0)
    weights = StreamingWeights(model, folder, plan, dtype)
    start = time.perf_counter()
    out = run_units(model.units, carry(model), weights, evaluate=True)
    seconds = time.perf_counter() - start
    weights.close()
    return np.array(out.astype(mx.float32)), seconds


def compare(name: str, reference: np.ndarray, other: np.ndarray, seconds: float, base_seconds: float) -> None:
    a, b = reference.reshape(-1).astype(np.float64), other.reshape(-1).astype(np.float64)
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    rel = float(np.abs(a - b).max() / np.abs(a).max())
    print(f"  {name:<28} cosine {cos:.6f}   max rel. error {rel:.3e}   {seconds:7.1f} s "
          f"({seconds / base_seconds:.2f}x float32)", flush=True)


def t5_inputs(vocab: int, length: int = 300, valid: int = 60):
    rng = np.random.default_rng(0)
    ids = np.zeros((1, length), dtype=np.int64)
    ids[0, :valid] = rng.integers(3, vocab, valid)
    ids[0, valid - 1] = 1
    mask = (np.arange(length)[None] < valid).astype(np.int64)
    return lambda model: model.check_inputs(ids, mask)


def stdit_inputs(config: dict, frames: int = 17, size: int = 192):
    from mlx_sora.models.vae import OpenSoraVAE, VideoAutoencoderConfig

    t, h, w = OpenSoraVAE(VideoAutoencoderConfig()).get_latent_size((frames, size, size))
    length, channels = config["model_max_length"], config["caption_channels"]
    keys = mx.random.split(mx.random.key(0), 2)
    x = mx.random.normal((2, 4, t, h, w), key=keys[0])
    y = mx.random.normal((2, 1, length, channels), key=keys[1]) * 0.1
    mask = (mx.arange(length)[None] < min(40, length)).astype(mx.int32)
    cond = dict(fps=mx.array([24.0]), height=mx.array([float(size)]), width=mx.array([float(size)]))
    return lambda model: dict(x=x, timestep=mx.array([950.0, 950.0]), y=y, mask=mask, merge=False, **cond)


def quality(t5: dict[str, Path], stdit: dict[str, Path], stdit_frames: int, stdit_size: int) -> None:
    vocab = read_converted_config(t5["float32"])["vocab_size"]
    print(f"T5 encoder ({read_converted_config(t5['float32'])['num_layers']} layers, "
          f"d_model {read_converted_config(t5['float32'])['d_model']}), float32 compute:", flush=True)
    reference, base = run_streamed(t5["float32"], t5_inputs(vocab))
    valid = reference[:, :60]
    for name, folder in t5.items():
        if name != "float32":
            out, seconds = run_streamed(folder, t5_inputs(vocab))
            compare(f"{name} (valid tokens)", valid, out[:, :60], seconds, base)
    config = read_converted_config(stdit["float32"])
    print(f"STDiT3 (depth {config['depth']}, hidden {config['hidden_size']}), one evaluation, CFG batch 2, "
          f"{stdit_size}x{stdit_size}, {stdit_frames} frames:", flush=True)
    reference, base = run_streamed(stdit["float32"], stdit_inputs(config, stdit_frames, stdit_size))
    for name, folder in stdit.items():
        if name != "float32":
            out, seconds = run_streamed(folder, stdit_inputs(config, stdit_frames, stdit_size))
            compare(name, reference[:, :4], out[:, :4], seconds, base)


def demo_folders(tmp: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """The demo model's T5 and STDiT3, re-saved int8 and int4 (group size 32: small widths)."""
    from mlx_sora import save_model
    from mlx_sora.registry import DEMO_MODEL_DIR, find_components

    components = find_components(DEMO_MODEL_DIR)
    t5, stdit = {"float32": components["text_encoder"]}, {"float32": components["stdit3"]}
    for name, target in (("text_encoder", t5), ("stdit3", stdit)):
        folder = components[name]
        config = {k: v for k, v in read_converted_config(folder).items() if k not in ("mlx_sora", "model_type")}
        model = load_model(folder, dtype="float32")
        for bits in ("int8", "int4"):
            target[bits] = save_model(model, tmp / f"{name}_{bits}", read_converted_config(folder)["model_type"],
                                      config, quantize=bits, group_size=32, source_dir=folder)
    return t5, stdit


def matmul_speed() -> None:
    print("matmul x @ W.T, float32 activations (seconds per call, median of 3):", flush=True)
    for rows, n_in, n_out in ((300, 4096, 10240), (2880, 1152, 4608), (2880, 4608, 1152)):
        x = mx.random.normal((rows, n_in))
        w = mx.random.normal((n_out, n_in)) * n_in**-0.5
        mx.eval(x, w)

        def timed(f):
            mx.eval(f())
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                mx.eval(f())
                runs.append(time.perf_counter() - start)
            return sorted(runs)[1]

        base = timed(lambda: x @ w.T)
        line = f"  [{rows}x{n_in}] @ [{n_in}x{n_out}]: float32 {base:.3f} s"
        for bits in (8, 4):
            q, s, b = mx.quantize(w, group_size=64, bits=bits)
            mx.eval(q, s, b)
            qmm = timed(lambda: mx.quantized_matmul(x, q, s, b, transpose=True, group_size=64, bits=bits))
            deq = timed(lambda: x @ mx.dequantize(q, s, b, group_size=64, bits=bits).T)
            line += f" | int{bits}: quantized_matmul {qmm:.3f} s ({qmm / base:.1f}x), dequantize+matmul {deq:.3f} s ({deq / base:.2f}x)"
        print(line, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="folder written by scripts/bench_memory.py prepare")
    parser.add_argument("--demo", action="store_true", help="the embedded demo model (trained weights)")
    parser.add_argument("--matmul", action="store_true", help="quantized matmul speed vs float32")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=192)
    args = parser.parse_args()
    print(f"device {mx.default_device()}, {os.cpu_count()} cpus, LD_PRELOAD={os.environ.get('LD_PRELOAD', '-')}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    if args.matmul:
        matmul_speed()
    if args.model:
        t5 = {"float32": args.model / "text_encoder", "int8": args.model / "text_encoder_int8",
              "int4": args.model / "quantized" / "text_encoder_int4"}
        stdit = {"float32": args.model / "stdit3", "int8": args.model / "quantized" / "stdit3_int8"}
        quality(t5, stdit, args.frames, args.size)
    if args.demo:
        from mlx_sora.registry import DEMO_MODEL_DIR, GenerationDefaults

        defaults = GenerationDefaults.from_file(DEMO_MODEL_DIR / "demo.json")
        with tempfile.TemporaryDirectory() as tmp:
            t5, stdit = demo_folders(Path(tmp))
            quality(t5, stdit, defaults.num_frames, defaults.height)
    if not (args.model or args.demo or args.matmul):
        parser.error("choose --model, --demo and/or --matmul")
    return 0


if __name__ == "__main__":
    sys.exit(main())
