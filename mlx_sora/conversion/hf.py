"""Converting Hugging Face checkpoints (T5 v1.1 encoder, STDiT3, VAE v1.2) into MLX weights folders.

The command line is ``python -m mlx_sora.convert`` (convert.py); this module does the work.
``--hf-path`` is a local snapshot folder or a Hugging Face repo id. The model kind is detected from
the checkpoint's config.json (and keys). Conversion streams tensor by tensor and unit by unit, so its
peak memory is about one unit, and the output folder appears only when complete.

The output folder is checked before anything is downloaded or read (``fsutil.check_output_folder``):
it may not be, contain or lie inside the source, be or contain the current or home folder, or be a
file; ``overwrite`` replaces only a previous converted folder, never other content.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from ..errors import UserError
from ..io.checkpoint import CheckpointError, CheckpointFolder, read_config
from ..io.fsutil import check_output_folder, is_converted_folder
from ..models import detect_family
from .loading import check_keys, expected_parameters, parse_dtype, write_converted_folder
from .quantization import DEFAULT_GROUP_SIZE, parse_quantization


def resolve_hf_path(hf_path: str, allow_patterns: tuple[str, ...] | None = None) -> Path:
    """A local folder as is; otherwise a repo id downloaded with huggingface_hub."""
    local = Path(hf_path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise CheckpointError(f"--hf-path {hf_path} is a file; give the checkpoint folder or a repo id")
    if hf_path.count("/") != 1 or hf_path.startswith((".", "/", "~")):
        raise CheckpointError(f"{hf_path} is neither a local folder nor a Hugging Face repo id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        config_dir = Path(snapshot_download(hf_path, allow_patterns=["config.json"]))
        if allow_patterns is None:
            hf_config = read_config(config_dir)
            allow_patterns = detect_family(hf_config).hf_allow_patterns
        return Path(snapshot_download(hf_path, allow_patterns=list(allow_patterns)))
    except CheckpointError:
        raise
    except Exception as e:  # network, authentication, missing repo
        raise CheckpointError(
            f"could not download {hf_path} from Hugging Face ({type(e).__name__}: {e}). Download it "
            f"elsewhere with `huggingface-cli download {hf_path} --local-dir DIR` and pass --hf-path DIR"
        ) from e


def convert(
    hf_path: str | Path,
    mlx_path: str | Path,
    dtype: str | mx.Dtype = "float32",
    overwrite: bool = False,
    quantize: str | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> Path:
    """Convert one checkpoint; returns the output folder (resolved). ``quantize`` ("int8" / "int4")
    stores the family's quantizable linear layers quantized (affine, ``group_size`` per group).

    Raises ``UserError`` (``CheckpointError`` for the checkpoint itself) for a bad target, source or
    checkpoint, before any heavy work where it can be known then.
    """
    quantization = parse_quantization(quantize, group_size)
    try:
        storage_dtype = parse_dtype(dtype)
    except UserError:
        raise
    except ValueError as e:
        raise UserError(f"--dtype: {e}") from e
    local = Path(hf_path).expanduser()
    _check_target(mlx_path, [local] if local.exists() else [], overwrite)  # before any download
    source_dir = resolve_hf_path(str(hf_path))
    target = _check_target(mlx_path, [source_dir], overwrite)
    hf_config = read_config(source_dir)
    checkpoint = CheckpointFolder(source_dir)
    try:
        family = detect_family(hf_config, checkpoint)
        config = family.config_from_hf(hf_config, checkpoint)
    except UserError:
        raise
    except ValueError as e:  # the models' config checks raise ValueError for what the config says
        raise CheckpointError(f"{source_dir / 'config.json'}: {e}") from e

    renamed: dict[str, str] = {}
    for hf_key in checkpoint.keys():
        mlx_key = family.rename(hf_key, config)
        if mlx_key is not None:
            renamed[mlx_key] = hf_key

    model = family.build(config)  # lazy parameters: nothing is allocated
    expected = expected_parameters(model)
    have = {}
    for mlx_key, hf_key in renamed.items():
        # transform() on a lazy placeholder gives the MLX shape without reading or allocating
        have[mlx_key] = tuple(family.transform(mlx_key, mx.zeros(checkpoint.shape(hf_key))).shape)
    check_keys(have, expected, f"checkpoint {source_dir}")

    def loader(mlx_key: str, hf_key: str):
        return lambda: family.transform(mlx_key, checkpoint.load(hf_key))

    ordered = [k for k in expected if k in renamed]  # the model's own order groups units together
    return write_converted_folder(
        target,
        family,
        config,
        model,
        ((k, loader(k, renamed[k])) for k in ordered),
        storage_dtype,
        source_dir=source_dir,
        source=str(hf_path),
        overwrite=overwrite,
        quantization=quantization,
    )


def _check_target(mlx_path: str | Path, sources: list[Path], overwrite: bool) -> Path:
    try:
        return check_output_folder(mlx_path, sources, overwrite=overwrite, is_ours=is_converted_folder)
    except UserError as e:
        raise UserError(f"--mlx-path {e}") from e
