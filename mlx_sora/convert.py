"""Convert a Hugging Face checkpoint (T5 v1.1 encoder, STDiT3, VAE v1.2) into an MLX weights folder.

    python -m mlx_sora.convert --hf-path DeepFloyd/t5-v1_1-xxl --mlx-path weights/t5-v1_1-xxl --dtype bfloat16

``--hf-path`` is a local snapshot folder or a Hugging Face repo id; the model kind is detected from the
checkpoint's config.json. The work is done by ``mlx_sora.conversion.convert``.
"""

from __future__ import annotations

import argparse
import sys

from .checkpoint import CheckpointError, read_config
from .conversion import convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_sora.convert",
        description="Convert a Hugging Face checkpoint (T5 v1.1 encoder, Open-Sora STDiT3, Open-Sora "
        "VAE v1.2) into an MLX weights folder.",
    )
    parser.add_argument("--hf-path", required=True, help="local checkpoint folder or Hugging Face repo id")
    parser.add_argument("--mlx-path", required=True, help="output folder")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
        help="storage dtype of the converted weights (default: float32)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    try:
        out = convert(args.hf_path, args.mlx_path, args.dtype, overwrite=args.overwrite)
    except (CheckpointError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = read_config(out)
    print(f"converted {config['model_type']} -> {out} ({config['mlx_sora']['dtype']}, "
          f"{len(config['mlx_sora']['units'])} units)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
