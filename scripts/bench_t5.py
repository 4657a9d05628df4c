"""Time the T5 v1.1 XXL encoder on a 300-token prompt: MLX vs transformers, same CPU, same weights.

The full XXL model is 4.76 B parameters (19 GB in float32), too much to hold twice on a 24 GB
machine, so this runs the full-width XXL stack (d_model 4096, 64 heads, d_ff 10240, vocab 32128)
with ``--layers`` blocks (default 4) in both frameworks, with the same random weights, checks that
the outputs agree, and prints the measured seconds plus a clearly labelled linear extrapolation to
the real 24 layers (embedding, bias and final norm are a negligible part of the time).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python scripts/bench_t5.py --layers 4

(on Linux, MLX's bundled CPU BLAS is ~15x slower than OpenBLAS for float32 matmuls).

Both frameworks run in this one process, so torch also gets the preloaded OpenBLAS (which slows it
down); ``scripts/bench_vs_torch.py --parts t5`` runs each side in its own process, as its users
would.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np

from mlx_sora.models.t5 import T5Config, T5Encoder
from mlx_sora.runtime.memory import keep_freed_cpu_memory

XXL_LAYERS = 24


def random_weights(config: T5Config, seed: int) -> dict[str, np.ndarray]:
    """HF-named float32 weights with T5-like scales (so that activations stay realistic)."""
    rng = np.random.default_rng(seed)
    inner = config.num_heads * config.d_kv

    def normal(shape, std):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std))

    w = {"shared.weight": normal((config.vocab_size, config.d_model), 1.0),
         "encoder.final_layer_norm.weight": 1 + normal((config.d_model,), 0.1),
         "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
             normal((config.relative_attention_num_buckets, config.num_heads), 1.0)}
    for i in range(config.num_layers):
        p = f"encoder.block.{i}.layer."
        w[p + "0.layer_norm.weight"] = 1 + normal((config.d_model,), 0.1)
        w[p + "0.SelfAttention.q.weight"] = normal((inner, config.d_model), config.d_model**-0.5 * config.d_kv**-0.5)
        for name in ("k", "v"):
            w[p + f"0.SelfAttention.{name}.weight"] = normal((inner, config.d_model), config.d_model**-0.5)
        w[p + "0.SelfAttention.o.weight"] = normal((config.d_model, inner), inner**-0.5)
        w[p + "1.layer_norm.weight"] = 1 + normal((config.d_model,), 0.1)
        w[p + "1.DenseReluDense.wi_0.weight"] = normal((config.d_ff, config.d_model), config.d_model**-0.5)
        w[p + "1.DenseReluDense.wi_1.weight"] = normal((config.d_ff, config.d_model), config.d_model**-0.5)
        w[p + "1.DenseReluDense.wo.weight"] = normal((config.d_model, config.d_ff), config.d_ff**-0.5)
    return w


def build_mlx(config: T5Config, weights: dict[str, np.ndarray], weights_dtype: mx.Dtype,
              compute_dtype: mx.Dtype) -> T5Encoder:
    from mlx_sora.models.t5 import FAMILY

    cfg = {**vars(config), "hf_embedding_key": "shared.weight"}
    keep_freed_cpu_memory()  # as load_model / Pipeline do
    model = T5Encoder(config, compute_dtype=compute_dtype)
    arrays = [(FAMILY.rename(k, cfg), mx.array(v).astype(weights_dtype)) for k, v in weights.items()]
    model.load_weights(arrays, strict=True)
    mx.eval(model.parameters())
    return model


def build_torch(config: T5Config, weights: dict[str, np.ndarray], dtype_name: str, bf16_weights: bool):
    import torch
    import transformers

    hf_config = transformers.T5Config(**vars(config), dropout_rate=0.0)
    with torch.device("meta"):
        model = transformers.T5EncoderModel(hf_config)
    state = {}
    for k, v in weights.items():
        t = torch.from_numpy(v)  # shares memory with numpy
        if bf16_weights:
            t = t.to(torch.bfloat16)
        state[k] = t.to(getattr(torch, dtype_name))
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.encoder.embed_tokens = model.shared  # keep the tie
    return model.eval()


def timed(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="XXL blocks to run (default 4; the model has 24)")
    parser.add_argument("--seq-len", type=int, default=300, help="tokens (Open-Sora pads every prompt to 300)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype of both frameworks (default float32, the fast path on CPU)")
    parser.add_argument("--weights-dtype", default=None, choices=["float32", "bfloat16"],
                        help="MLX storage dtype (default: --dtype); bfloat16 weights are rounded for torch too")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs after one warm-up (default 3)")
    parser.add_argument("--skip-torch", action="store_true", help="time MLX only")
    args = parser.parse_args()
    if not 1 <= args.layers <= XXL_LAYERS:
        parser.error(f"--layers must be in [1, {XXL_LAYERS}]")

    config = T5Config(**{**vars(T5Config.t5_v1_1_xxl()), "num_layers": args.layers})
    weights_dtype = args.weights_dtype or args.dtype
    print(f"T5 v1.1 XXL width, {args.layers}/{XXL_LAYERS} layers, batch {args.batch} x {args.seq_len} tokens, "
          f"compute {args.dtype}, MLX weights {weights_dtype}, mlx {mx.__version__} on {mx.default_device()}")
    weights = random_weights(config, seed=0)
    rng = np.random.default_rng(1)
    ids = rng.integers(3, config.vocab_size, size=(args.batch, args.seq_len))
    ids[:, -1] = 1
    mask = np.ones_like(ids)

    model = build_mlx(config, weights, getattr(mx, weights_dtype), getattr(mx, args.dtype))
    run_mlx = lambda: mx.eval(model(ids, mask))  # noqa: E731
    mx.reset_peak_memory()
    run_mlx()  # warm-up
    peak = mx.get_peak_memory() / 2**30
    runs: dict[str, tuple] = {"mlx": (run_mlx, [])}
    if not args.skip_torch:
        import torch

        torch_model = build_torch(config, weights, args.dtype, weights_dtype == "bfloat16")
        t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)

        def run_torch():
            with torch.inference_mode():
                return torch_model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state

        run_torch()  # warm-up
        runs["transformers"] = (run_torch, [])
    for _ in range(args.repeat):  # interleaved, so that both see the same machine load
        for fn, times in runs.values():
            times.extend(timed(fn, 1))

    best = {}
    for name, (_, times) in runs.items():
        best[name] = min(times)
        scale = XXL_LAYERS / args.layers
        print(f"{name:13s} {args.layers} layers: best {best[name]:7.3f} s  median {statistics.median(times):7.3f} s"
              f"  -> 24 layers (extrapolated x{scale:g}): {best[name] * scale:7.2f} s")
    print(f"mlx peak memory while encoding (its weights included): {peak:.2f} GiB")
    if args.skip_torch:
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"attention {torch_model.config._attn_implementation}")
    print(f"speed ratio transformers / mlx (best times): {best['transformers'] / best['mlx']:.2f}x")
    out = np.array(model(ids, mask).astype(mx.float32))
    ref = run_torch().float().numpy()
    print(f"outputs agree: max|mlx - torch| / max|torch| = {np.abs(out - ref).max() / np.abs(ref).max():.2e}")


if __name__ == "__main__":
    main()
