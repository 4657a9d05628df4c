"""Peak memory of converting a large sharded PyTorch ``.bin`` T5 checkpoint, against its size.

The real DeepFloyd/t5-v1_1-xxl checkpoint is 19 GB of ``.bin`` shards; the converter must stream it.
This writes a checkpoint with the real XXL widths (d_model 4096, d_ff 10240, 64 heads, vocab 32128)
and ``--layers`` encoder blocks, as ``torch.save`` shards in the Hugging Face layout, then converts it
in a fresh process and prints that process's peak memory (max RSS on Linux, peak footprint on macOS)
next to the checkpoint size.

    python scripts/bench_convert.py --layers 6            # ~5 GB checkpoint
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# peak memory of the converting process alone (memory.peak_process_memory: on Linux VmHWM, which exec resets)
CONVERT_AND_MEASURE = """
import sys, time
from mlx_sora import convert
from mlx_sora.runtime.memory import os_memory, peak_process_memory
start = time.perf_counter()
convert(sys.argv[1], sys.argv[2], sys.argv[3])
print(time.perf_counter() - start, peak_process_memory(), os_memory().peak_name.replace(' ', '_'))
"""


def write_checkpoint(folder: Path, layers: int, shard_bytes: int) -> int:
    import torch

    d_model, d_ff, d_kv, heads, vocab = 4096, 10240, 64, 64, 32128
    config = {"model_type": "t5", "architectures": ["T5EncoderModel"], "d_model": d_model, "d_ff": d_ff,
              "d_kv": d_kv, "num_heads": heads, "num_layers": layers, "vocab_size": vocab,
              "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
              "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu"}
    (folder / "config.json").write_text(json.dumps(config))
    shapes = {"shared.weight": (vocab, d_model),
              "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, heads)}
    for i in range(layers):
        p = f"encoder.block.{i}.layer."
        for name in ("q", "k", "v", "o"):
            shapes[f"{p}0.SelfAttention.{name}.weight"] = (heads * d_kv, d_model)
        shapes[f"{p}0.layer_norm.weight"] = (d_model,)
        shapes[f"{p}1.DenseReluDense.wi_0.weight"] = (d_ff, d_model)
        shapes[f"{p}1.DenseReluDense.wi_1.weight"] = (d_ff, d_model)
        shapes[f"{p}1.DenseReluDense.wo.weight"] = (d_model, d_ff)
        shapes[f"{p}1.layer_norm.weight"] = (d_model,)
    shapes["encoder.final_layer_norm.weight"] = (d_model,)
    shards, current, size, total = [], {}, 0, 0
    for key, shape in shapes.items():
        tensor = torch.randn(shape) * 0.02
        current[key] = tensor
        size += tensor.numel() * 4
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, folder / name)
        total += (folder / name).stat().st_size
        weight_map.update({k: name for k in shard})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import train_spiece

    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent / "weights") as tmp:
        src = Path(tmp) / "hf"
        src.mkdir()
        start = time.perf_counter()
        size = write_checkpoint(src, args.layers, int(args.shard_gb * 2**30))
        train_spiece(src)
        print(f"wrote a {args.layers}-layer XXL-width T5 checkpoint: {size / 2**30:.2f} GiB of .bin shards "
              f"({time.perf_counter() - start:.0f} s)")
        done = subprocess.run([sys.executable, "-c", CONVERT_AND_MEASURE, str(src), str(Path(tmp) / "mlx"),
                               args.dtype], capture_output=True, text=True, check=True)
        seconds, rss, measure = done.stdout.split()[-3:]
        out = sum(p.stat().st_size for p in (Path(tmp) / "mlx").iterdir())
        print(f"converted to {args.dtype} in {float(seconds):.0f} s: output {out / 2**30:.2f} GiB, "
              f"converter {measure.replace('_', ' ')} {int(rss) / 2**30:.2f} GiB = {int(rss) / size:.0%} of the "
              "checkpoint")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
