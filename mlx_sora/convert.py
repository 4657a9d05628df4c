"""Convert a Hugging Face checkpoint (T5 v1.1 encoder, STDiT3, VAE v1.2) into an MLX weights folder.

    python -m mlx_sora.convert --hf-path DeepFloyd/t5-v1_1-xxl --mlx-path weights/t5-v1_1-xxl --dtype bfloat16

``--hf-path`` is a local snapshot folder or a Hugging Face repo id; the model kind is detected from the
checkpoint's config.json. The work is done by ``mlx_sora.conversion.hf.convert``.

A user or file error (bad option, bad target folder, corrupt or hostile checkpoint, unwritable disk)
prints one ``error: ...`` line and exits with status 2; Ctrl-C exits with 130 and leaves nothing
half-written; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from .conversion.hf import convert
from .errors import UserError, describe_os_error
from .io.checkpoint import read_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_sora.convert",
        description="Convert a Hugging Face checkpoint (T5 v1.1 encoder, Open-Sora STDiT3, Open-Sora "
        "VAE v1.2) into an MLX weights folder.",
    )
    parser.add_argument("--hf-path", required=True, help="local checkpoint folder or Hugging Face repo id")
    parser.add_argument("--mlx-path", required=True,
                        help="output folder (created; must be separate from the source)")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
        help="storage dtype of the converted weights (default: float32)",
    )
    parser.add_argument("--quantize", default=None, choices=["int8", "int4"],
                        help="store the linear layers of the T5 / STDiT3 blocks quantized (affine; embeddings, "
                             "norms, embedders and the final layer stay in --dtype)")
    parser.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128],
                        help="quantization group size (default 64)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier converted folder at --mlx-path (never other content)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.hf_path, args.mlx_path, args.dtype, overwrite=args.overwrite,
                      quantize=args.quantize, group_size=args.group_size)
        config = read_config(out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None and not isinstance(e, FileExistsError):
            raise  # not about a path the user gave: a bug, keep the traceback
        print(f"error: {describe_os_error(e) if e.filename is not None else e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output folder was written", file=sys.stderr)
        return 130
    quantized = config["mlx_sora"].get("quantization")
    how = f", {quantized['layers']} linear layers int{quantized['bits']}" if quantized else ""
    print(f"converted {config['model_type']} -> {out} ({config['mlx_sora']['dtype']}{how}, "
          f"{len(config['mlx_sora']['units'])} units)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
