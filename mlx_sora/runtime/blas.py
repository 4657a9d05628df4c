"""A fast CPU BLAS for MLX on Linux, chosen by measurement.

MLX's Linux CPU wheel computes matrix products with a slow reference BLAS (~3-5 GFLOP/s fp32). A fast
BLAS library preloaded (``LD_PRELOAD``) interposes the BLAS symbols MLX calls (``cblas_sgemm`` ...).
The candidates are the libraries found here: a system OpenBLAS (``apt-get install
libopenblas0-pthread``), the ``mkl`` wheel's ``libmkl_rt`` (a Linux x86-64 dependency of this package,
so a plain ``pip install`` has it; run with ``MKL_THREADING_LAYER=GNU``) and a system BLIS. Which is
fastest depends on the CPU: on a 2-core AMD EPYC OpenBLAS ran an fp32 GEMM at ~137 GFLOP/s and MKL at
~126, on a 2-core Intel Xeon MKL at 260 and OpenBLAS at 216. So where there are several, a short
GEMM probe of MLX with each (``probe_gemm``: a few products of an STDiT3-sized GEMM, in a child
process per library) picks the fastest, once per machine: the choice is cached under
``~/.cache/mlx-sora/blas.json`` (``$XDG_CACHE_HOME``), keyed by the CPU model, the cores this process
may use, the MLX version and each library's file. ``MLX_SORA_BLAS`` overrides it: ``openblas``,
``mkl``, ``blis``, a library path, or ``none`` (MLX's bundled BLAS).

The command-line entry points call ``ensure_fast_cpu_blas`` before any heavy work: it restarts the
running command (whatever entry point it is) with the library preloaded and says which and why.
Benchmarks that start MLX in a child process use ``fast_blas_env``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
BLIS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/blis-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/blis-pthread/libblas.so.3",
)
MKL_DISTRIBUTION = "mkl"
_REEXEC_FLAG = "MLX_SORA_BLAS_CHECKED"
CHOICE_ENV = "MLX_SORA_BLAS"
PROBE_SHAPE = (2048, 1152, 2304)
"""(M, K, N) of the probe's float32 GEMM: STDiT3-XL/2's width and its MLP's (C -> 2C of a 2048-token chunk)."""

# The probe: MLX's float32 GEMM with whatever BLAS the child process was started with, best of 4 after
# a warm-up (thread start-up); prints GFLOP/s. About 0.3 s of products at 150 GFLOP/s.
_PROBE_CODE = """
import sys, time
import mlx.core as mx
m, k, n = (int(v) for v in sys.argv[1:4])
a, b = mx.random.normal((m, k)), mx.random.normal((k, n))
mx.eval(a, b)
mx.eval(a @ b)
best = float("inf")
for _ in range(4):
    start = time.perf_counter()
    mx.eval(a @ b)
    best = min(best, time.perf_counter() - start)
print(2 * m * k * n / best / 1e9)
"""


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


def blas_candidates() -> list[tuple[str, str]]:
    """(kind, path) of every fast BLAS found here: a system OpenBLAS, the mkl wheel's, a system BLIS."""
    found = []
    openblas = next((p for p in OPENBLAS_CANDIDATES if Path(p).exists()), None)
    if openblas:
        found.append(("OpenBLAS", openblas))
    mkl = mkl_wheel_library()
    if mkl:
        found.append(("MKL", mkl))
    blis = next((p for p in BLIS_CANDIDATES if Path(p).exists()), None)
    if blis:
        found.append(("BLIS", blis))
    return found


@dataclass(frozen=True)
class BlasChoice:
    kind: str
    path: str
    reason: str
    """Why this one: the override, the only one found, or the probe's rates."""


def _library_env(kind: str, path: str, env: dict[str, str]) -> dict[str, str]:
    env = dict(env)
    if path not in env.get("LD_PRELOAD", "").split(":"):
        env["LD_PRELOAD"] = ":".join(filter(None, [path, env.get("LD_PRELOAD")]))
    if kind == "MKL":
        env.setdefault("MKL_THREADING_LAYER", "GNU")  # MLX does not link Intel's OpenMP runtime
    return env


def probe_gemm(kind: str, path: str, timeout: float = 60.0) -> float | None:
    """GFLOP/s of MLX's float32 GEMM (``PROBE_SHAPE``) with ``path`` preloaded, in a child process; None
    when the library cannot run it."""
    env = _library_env(kind, path, {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"})
    env[_REEXEC_FLAG] = "1"
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE_CODE, *map(str, PROBE_SHAPE)], env=env,
                              capture_output=True, text=True, timeout=timeout)
        return float(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
    except (subprocess.TimeoutExpired, OSError, ValueError, IndexError):
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "mlx-sora" / "blas.json"


def _cache_key(candidates: list[tuple[str, str]]) -> dict:
    import mlx.core as mx

    files = []
    for kind, path in candidates:
        try:
            stat = os.stat(path)
            files.append([kind, path, stat.st_size, stat.st_mtime_ns])
        except OSError:
            files.append([kind, path, None, None])
    return {"cpu": cpu_model(), "cores": _usable_cores(), "mlx": mx.__version__, "libraries": files}


def _read_cache(key: dict) -> dict | None:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("rates"), dict):
        return None
    return data


def _write_cache(key: dict, rates: dict[str, float | None]) -> None:
    """Atomically (a temporary file renamed); a cache that cannot be written is only not written."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".blas-", suffix=".json", delete=False) as f:
            json.dump({"key": key, "rates": rates}, f)
        os.replace(f.name, path)
    except OSError:
        pass


def _override(value: str, candidates: list[tuple[str, str]]) -> BlasChoice | None:
    """``MLX_SORA_BLAS``: a kind found here, a library path, or "none"."""
    if value.lower() == "none":
        return None
    for kind, path in candidates:
        if value.lower() == kind.lower():
            return BlasChoice(kind, path, f"{CHOICE_ENV}={value}")
    if Path(value).is_file():
        kind = "MKL" if "mkl" in Path(value).name else "OpenBLAS" if "openblas" in value else "BLAS"
        return BlasChoice(kind, str(Path(value).resolve()), f"{CHOICE_ENV}={value}")
    known = ", ".join(k.lower() for k, _ in candidates) or "none found here"
    raise ValueError(f"{CHOICE_ENV}={value!r} is neither a BLAS found here ({known}), a library file, nor 'none'")


def choose_blas(probe=None) -> BlasChoice | None:
    """The BLAS to preload: the override, else the only one found, else the fastest by ``probe`` (each
    library's rate measured once per machine and cached)."""
    candidates = blas_candidates()
    if os.environ.get(CHOICE_ENV):
        return _override(os.environ[CHOICE_ENV], candidates)
    if not candidates:
        return None
    if len(candidates) == 1:
        kind, path = candidates[0]
        return BlasChoice(kind, path, "the only fast BLAS found")
    probe = probe or probe_gemm
    key = _cache_key(candidates)
    cached = _read_cache(key)
    rates = cached["rates"] if cached else {path: probe(kind, path) for kind, path in candidates}
    if cached is None:
        _write_cache(key, rates)
    measured = [(rates.get(path), kind, path) for kind, path in candidates if rates.get(path)]
    if not measured:
        kind, path = candidates[0]
        return BlasChoice(kind, path, "the GEMM probe failed for every library; the first one found")
    rate, kind, path = max(measured)
    others = ", ".join(f"{k} {rates[p]:.0f}" if rates.get(p) else f"{k} failed" for k, p in candidates if p != path)
    when = "measured earlier" if cached else "measured now"
    return BlasChoice(kind, path, f"fastest float32 GEMM on this CPU: {rate:.0f} GFLOP/s against {others} "
                                  f"({when}; cached in {cache_path()})")


def fast_blas_library() -> tuple[str, str] | None:
    """(kind, path) of the fast BLAS to preload (``choose_blas``), None for MLX's bundled one."""
    choice = choose_blas()
    return None if choice is None else (choice.kind, choice.path)


def fast_blas_loaded() -> str | None:
    """The path of the fast BLAS mapped into this process, None if there is none. numpy's bundled
    OpenBLAS does not count: its symbols are prefixed and MLX never calls them."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    candidates = [path for _, path in blas_candidates()]
    preloaded = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p]
    return next((p for p in [*preloaded, *candidates] if p in maps or os.path.realpath(p) in maps), None)


def fast_blas_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default: this process's) that preloads the fast BLAS, when there is one."""
    env = dict(os.environ if env is None else env)
    if sys.platform != "linux":
        return env
    found = fast_blas_library()
    return env if found is None else _library_env(*found, env)


def ensure_fast_cpu_blas(quiet: bool = False) -> None:
    """On Linux CPU, restart the running command with the fast BLAS ``choose_blas`` picks preloaded
    (~15-30x faster matmul than MLX's bundled one), saying which and why, or say how to get one. Set
    MLX_SORA_BLAS_CHECKED=1 to skip; a bad MLX_SORA_BLAS ends the command with one message."""
    import mlx.core as mx

    if sys.platform != "linux" or os.environ.get(_REEXEC_FLAG) or mx.default_device() == mx.gpu:
        return
    if fast_blas_loaded():
        return
    try:
        choice = choose_blas()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if choice is None:
        if not os.environ.get(CHOICE_ENV) and not quiet:
            print("note: MLX on this Linux CPU uses a slow reference BLAS; `apt-get install libopenblas0-pthread` "
                  "(or `pip install mkl`) makes generation ~15x faster (used automatically).", file=sys.stderr)
        elif not quiet:
            print(f"note: BLAS: MLX's bundled one ({CHOICE_ENV}=none)", file=sys.stderr)
        return
    env = _library_env(choice.kind, choice.path, dict(os.environ))
    env[_REEXEC_FLAG] = "1"
    if not quiet:
        print(f"note: BLAS: {choice.kind} ({choice.path}): {choice.reason}; restarting with it preloaded "
              f"({CHOICE_ENV}=openblas|mkl|blis|PATH|none chooses)", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # the command as started (`python -m mlx_sora.generate ...`, a console script, a script path)
    argv = list(getattr(sys, "orig_argv", []))[1:] or [sys.argv[0], *sys.argv[1:]]
    os.execve(sys.executable, [sys.executable, *argv], env)
