"""Quantized weights: quality against float32 and speed on this machine.

    python scripts/bench_quantization.py --model /work/bench/real        # folders from bench_memory.py prepare
    python scripts/bench_quantization.py --demo                          # the embedded demo model (trained)
    python scripts/bench_quantization.py --matmul                        # quantized matmul vs float32

Quality: the T5 v1.1 XXL encoder (24 layers, random weights at real width, one 300-token prompt) with
int8 and int4 linear layers against float32 (the same random weights), and one STDiT3-XL/2 evaluation
(CFG batch 2, 192x192, 17 frames) int8 against float32: cosine similarity and max |q - f| / max |f|,
per block (the quantized block fed the float32 block's input, so the error is the block's own) and
for the whole model (errors compound; random deep weights amplify them far more than trained ones:
the random T5's unscaled attention logits are huge, so its attention is nearly one-hot). With
``--demo``: the same for the trained demo model. Both models stream unit by unit in lockstep
(``StreamingWeights``), so the float32 XXL encoder never needs 19 GB.
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

from mlx_sora.conversion.loading import load_model, read_converted_config
from mlx_sora.models.units import arrays_of
from mlx_sora.runtime.streaming import StreamingWeights, plan_phase, unit_sizes


def streamed_model(folder: Path, dtype=mx.float32):
    model = load_model(folder, dtype=dtype, lazy=True)
    plan = plan_phase("bench", unit_sizes(model, folder, dtype), 10**13, 0, 0)
    return model, StreamingWeights(model, folder, plan, dtype)


def similarity(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    a, b = reference.reshape(-1).astype(np.float64), other.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), float(np.abs(a - b).max() / np.abs(a).max())


def lockstep(reference: Path, quantized: Path, carry, view) -> tuple[list[tuple[float, float]], tuple[float, float], float, float]:
    """Run both models unit by unit. Per unit: the quantized unit gets the *reference* input, so its
    error is its own (no compounding); end to end: the quantized chain on its own outputs.
    ``view(carry)`` picks the array to compare. Returns per-unit (cos, rel), end-to-end (cos, rel),
    and the seconds of each chain."""
    ref_model, ref_weights = streamed_model(reference)
    q_model, q_weights = streamed_model(quantized)
    ref_carry, q_carry = carry(ref_model), carry(q_model)
    per_unit, seconds = [], [0.0, 0.0]
    for ref_unit, q_unit in zip(ref_model.units, q_model.units):
        ref_weights.acquire(ref_unit, [])
        q_weights.acquire(q_unit, [])
        start = time.perf_counter()
        ref_out = ref_unit(ref_carry)
        mx.eval(arrays_of(ref_out))
        seconds[0] += time.perf_counter() - start
        own = q_unit(ref_carry)  # the same input as the reference unit
        start = time.perf_counter()
        q_carry = q_unit(q_carry)
        mx.eval(arrays_of(q_carry))
        seconds[1] += time.perf_counter() - start
        mx.eval(arrays_of(own))
        if ref_unit.name.startswith("block"):
            per_unit.append(similarity(np.array(view(ref_out)), np.array(view(own))))
        ref_weights.release(ref_unit)
        q_weights.release(q_unit)
        ref_carry = ref_out
    end = similarity(np.array(view(ref_carry)), np.array(view(q_carry)))
    return per_unit, end, seconds[0], seconds[1]


def report(name: str, per_unit: list[tuple[float, float]], end: tuple[float, float], base: float, seconds: float) -> None:
    cos = [c for c, _ in per_unit]
    rel = [r for _, r in per_unit]
    print(f"  {name:<6} one block (same input): cosine min {min(cos):.6f} mean {np.mean(cos):.6f}, max rel. error "
          f"max {max(rel):.2e} mean {np.mean(rel):.2e} | whole model: cosine {end[0]:.6f}, max rel. error "
          f"{end[1]:.2e} | {seconds:.1f} s vs {base:.1f} s float32 ({seconds / base:.2f}x)", flush=True)


def t5_inputs(vocab: int, length: int = 300, valid: int = 60):
    rng = np.random.default_rng(0)
    ids = np.zeros((1, length), dtype=np.int64)
    ids[0, :valid] = rng.integers(3, max(4, vocab - 100), valid)  # not the sentinel ids
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


def quality(t5: dict[str, Path], stdit: dict[str, Path], stdit_frames: int, stdit_size: int,
            valid_tokens: int = 60) -> None:
    config = read_converted_config(t5["float32"])
    print(f"T5 encoder ({config['num_layers']} layers, d_model {config['d_model']}), float32 compute, "
          f"{valid_tokens} valid tokens compared:", flush=True)
    for name, folder in t5.items():
        if name != "float32":
            per_unit, end, base, seconds = lockstep(t5["float32"], folder, t5_inputs(config["vocab_size"], valid=valid_tokens),
                                                    lambda c: (c if isinstance(c, mx.array) else c[0])[:, :valid_tokens])
            report(name, per_unit, end, base, seconds)
    config = read_converted_config(stdit["float32"])
    print(f"STDiT3 (depth {config['depth']}, hidden {config['hidden_size']}), one evaluation, CFG batch 2, "
          f"{stdit_size}x{stdit_size}, {stdit_frames} frames (velocity channels compared):", flush=True)
    for name, folder in stdit.items():
        if name != "float32":
            per_unit, end, base, seconds = lockstep(stdit["float32"], folder, stdit_inputs(config, stdit_frames, stdit_size),
                                                    lambda c: c[:, :4] if isinstance(c, mx.array) else c[0])
            report(name, per_unit, end, base, seconds)


def demo_folders(tmp: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """The demo model's T5 and STDiT3, re-saved int8 and int4 (group size 32: small widths)."""
    from mlx_sora import save_model
    from mlx_sora.conversion.registry import DEMO_MODEL_DIR, find_components

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
        from mlx_sora.conversion.registry import DEMO_MODEL_DIR, GenerationDefaults

        defaults = GenerationDefaults.from_file(DEMO_MODEL_DIR / "demo.json")
        with tempfile.TemporaryDirectory() as tmp:
            t5, stdit = demo_folders(Path(tmp))
            quality(t5, stdit, defaults.num_frames, defaults.height)
    if not (args.model or args.demo or args.matmul):
        parser.error("choose --model, --demo and/or --matmul")
    return 0


if __name__ == "__main__":
    sys.exit(main())
