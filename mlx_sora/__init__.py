"""mlx-sora: Open-Sora 1.2 text-to-video in pure MLX, with LPL, TDTM and CI-DL."""

from .convert import convert
from .loading import load_model

__all__ = ["convert", "load_model"]
__version__ = "0.1.0"
