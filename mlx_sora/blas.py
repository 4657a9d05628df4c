"""A fast CPU BLAS for MLX on Linux.

MLX's Linux CPU wheel computes matrix products with a slow reference BLAS (~3-5 GFLOP/s fp32). A
system OpenBLAS, preloaded, interposes the BLAS symbols MLX calls (~15x faster). The command-line
entry points call ``ensure_fast_cpu_blas`` before any heavy work.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
_REEXEC_FLAG = "MLX_SORA_BLAS_CHECKED"


def _openblas_loaded(candidates: tuple[str, ...] = OPENBLAS_CANDIDATES) -> bool:
    """Whether a system OpenBLAS (which interposes the BLAS symbols MLX calls) is mapped. numpy's own
    bundled OpenBLAS does not count: its symbols are prefixed and MLX never calls them."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return any(p in maps or os.path.realpath(p) in maps for p in candidates if Path(p).exists())


def ensure_fast_cpu_blas(quiet: bool = False) -> None:
    """On Linux CPU, MLX's wheel computes with a reference BLAS (~5 GFLOP/s fp32). If an OpenBLAS is
    installed, restart this command with it preloaded (~15x faster); otherwise say how to get one.
    Set MLX_SORA_BLAS_CHECKED=1 to skip."""
    import mlx.core as mx

    if sys.platform != "linux" or os.environ.get(_REEXEC_FLAG) or mx.default_device() == mx.gpu:
        return
    if _openblas_loaded():
        return
    found = next((p for p in OPENBLAS_CANDIDATES if Path(p).exists()), None)
    if found is None:
        print("note: MLX on this Linux CPU uses a slow reference BLAS; `apt-get install "
              "libopenblas0-pthread` makes generation ~15x faster (used automatically).", file=sys.stderr)
        return
    env = dict(os.environ, LD_PRELOAD=":".join(filter(None, [found, os.environ.get("LD_PRELOAD")])))
    env[_REEXEC_FLAG] = "1"
    if not quiet:
        print(f"note: restarting with OpenBLAS ({found}) for fast CPU matmul", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "mlx_sora.generate", *sys.argv[1:]], env)
