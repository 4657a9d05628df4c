"""mlx-sora: Open-Sora 1.2 text-to-video in pure MLX, with LPL, TDTM and CI-DL."""

# The command-line modules (mlx_sora.convert, mlx_sora.generate) are not imported here, so that
# `python -m` runs them once; the function `convert` comes from mlx_sora.conversion.hf.
from .conversion.hf import convert
from .conversion.loading import load_model, save_model
from .pipeline import Pipeline

__all__ = ["Pipeline", "convert", "load_model", "save_model"]
__version__ = "0.1.0"
