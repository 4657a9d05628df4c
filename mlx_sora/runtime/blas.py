"""A fast CPU BLAS for MLX on Linux.

MLX's Linux CPU wheel computes matrix products with a slow reference BLAS (~3-5 GFLOP/s fp32). A fast
BLAS library preloaded (``LD_PRELOAD``) interposes the BLAS symbols MLX calls (``cblas_sgemm`` ...):

1. a system OpenBLAS (``apt-get install libopenblas0-pthread``): ~137 GFLOP/s fp32 on a 2-core EPYC;
2. else the ``mkl`` wheel's ``libmkl_rt`` (a Linux x86-64 dependency of this package, so a plain
   ``pip install`` has it), with ``MKL_THREADING_LAYER=GNU``: ~126 GFLOP/s on the same machine.

The command-line entry points call ``ensure_fast_cpu_blas`` before any heavy work: it restarts the
running command (whatever entry point it is) with the library preloaded. Benchmarks that start MLX
in a child process use ``fast_blas_env``.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
MKL_DISTRIBUTION = "mkl"
_REEXEC_FLAG = "MLX_SORA_BLAS_CHECKED"


def mkl_wheel_library() -> str | None:
    """The ``libmkl_rt.so.N`` the ``mkl`` wheel installed (under the environment's ``lib/``), if any."""
    try:
        files = metadata.files(MKL_DISTRIBUTION) or []
        dist = metadata.distribution(MKL_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    found = sorted(str(dist.locate_file(f)) for f in files if Path(str(f)).name.startswith("libmkl_rt.so"))
    found = [p for p in found if Path(p).exists()]
    return os.path.realpath(found[-1]) if found else None


def fast_blas_library() -> tuple[str, str] | None:
    """(kind, path) of the fast BLAS to preload: a system OpenBLAS first, else the mkl wheel's."""
    openblas = next((p for p in OPENBLAS_CANDIDATES if Path(p).exists()), None)
    if openblas:
        return "OpenBLAS", openblas
    mkl = mkl_wheel_library()
    return ("MKL", mkl) if mkl else None


def fast_blas_loaded() -> str | None:
    """The path of the fast BLAS mapped into this process, None if there is none. numpy's bundled
    OpenBLAS does not count: its symbols are prefixed and MLX never calls them."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    candidates = [p for p in OPENBLAS_CANDIDATES if Path(p).exists()]
    mkl = mkl_wheel_library()
    candidates += [mkl] if mkl else []
    return next((p for p in candidates if p in maps or os.path.realpath(p) in maps), None)


def fast_blas_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default: this process's) that preloads the fast BLAS, when there is one."""
    env = dict(os.environ if env is None else env)
    found = fast_blas_library()
    if sys.platform != "linux" or found is None:
        return env
    kind, path = found
    if path not in env.get("LD_PRELOAD", "").split(":"):
        env["LD_PRELOAD"] = ":".join(filter(None, [path, env.get("LD_PRELOAD")]))
    if kind == "MKL":
        env.setdefault("MKL_THREADING_LAYER", "GNU")  # MLX does not link Intel's OpenMP runtime
    return env


def ensure_fast_cpu_blas(quiet: bool = False) -> None:
    """On Linux CPU, restart the running command with a fast BLAS preloaded (~15-30x faster matmul),
    or say how to get one. Set MLX_SORA_BLAS_CHECKED=1 to skip."""
    import mlx.core as mx

    if sys.platform != "linux" or os.environ.get(_REEXEC_FLAG) or mx.default_device() == mx.gpu:
        return
    if fast_blas_loaded():
        return
    found = fast_blas_library()
    if found is None:
        print(
            "note: MLX on this Linux CPU uses a slow reference BLAS; `apt-get install "
            "libopenblas0-pthread` (or `pip install mkl`) makes generation ~15x faster (used automatically).",
            file=sys.stderr,
        )
        return
    kind, path = found
    env = fast_blas_env()
    env[_REEXEC_FLAG] = "1"
    if not quiet:
        hint = (
            ""
            if kind == "OpenBLAS"
            else " (`apt-get install libopenblas0-pthread` is ~10% faster, used first)"
        )
        print(f"note: restarting with {kind} ({path}) for fast CPU matmul{hint}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # the command as started (`python -m mlx_sora.generate ...`, a console script, a script path)
    argv = list(getattr(sys, "orig_argv", []))[1:] or [sys.argv[0], *sys.argv[1:]]
    os.execve(sys.executable, [sys.executable, *argv], env)
