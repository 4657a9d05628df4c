"""Measuring time and memory per phase: MLX peak (``mx.get_peak_memory``) and the process's max RSS;
the CPU allocator policy (``keep_freed_cpu_memory`` / ``release_freed_cpu_memory``)."""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import mlx.core as mx

GIB = 1024**3


def _proc_kib(path: str, field: str) -> int | None:
    """A "<field>: <n> kB" line of a Linux /proc file, in bytes (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _ru_maxrss() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    On Linux this is VmHWM (reset by exec: ru_maxrss would carry the peak of the parent process that
    forked us); elsewhere ru_maxrss.
    """
    peak = _proc_kib("/proc/self/status", "VmHWM")
    return peak if peak is not None else _ru_maxrss()


def process_rss() -> int:
    """Current resident set size of this process (macOS, without psutil: the peak, the closest figure)."""
    rss = _proc_kib("/proc/self/status", "VmRSS")
    return rss if rss is not None else _ru_maxrss()


def available_memory() -> int:
    """Memory this process could use now: Linux MemAvailable (+ what the process holds); macOS: the
    GPU's recommended working set (unified memory) or the physical memory."""
    available = _proc_kib("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available + process_rss()
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    for key in ("max_recommended_working_set_size", "memory_size"):
        if info.get(key):
            return int(info[key])
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
        if hasattr(libc, "mallinfo2"):  # glibc >= 2.33
            libc.mallinfo2.restype, libc.mallinfo2.argtypes = _MallInfo2, []
    except (OSError, AttributeError):
        return None
    return libc


@functools.cache
def keep_freed_cpu_memory() -> bool:
    """Let the process reuse the memory MLX frees on the CPU instead of handing it back to the OS at
    once (Linux with glibc; elsewhere nothing changes). Returns whether the policy is on.

    Why: MLX's CPU allocator is ``malloc``, which serves every block over 32 MiB with ``mmap`` and
    unmaps it on ``free``; the next array of that size is faulted in again page by page. On a
    [2, 36864, 128] float32 array ``x + 1`` took 20-23 ms, 9,217 page faults, against 3.3 ms with
    the memory kept: most of the time of MLX's elementwise ops, and of every matrix product's output,
    went to page faults. With ``mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB - 1)`` freed blocks stay
    in the heap for the next allocation: the CPU counterpart of MLX's buffer cache on Metal.
    ``release_freed_cpu_memory`` gives the free pages back (after each phase, and after a streamed
    unit when memory is tight).
    Idempotent; ``MLX_SORA_KEEP_FREED_MEMORY=0`` turns it off.
    """
    libc = _glibc()
    if libc is None or os.environ.get("MLX_SORA_KEEP_FREED_MEMORY", "1") == "0":
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def kept_free_cpu_memory() -> int:
    """Bytes of freed memory the process's heap holds for reuse (glibc ``mallinfo2().fordblks``, all
    arenas; 0 elsewhere). Those pages count in the RSS, and the next allocations reuse them before
    the heap grows."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return 0
    return int(libc.mallinfo2().fordblks)


def release_freed_cpu_memory() -> None:
    """Give the pages of freed heap memory back to the OS (``malloc_trim(0)``; glibc only): the CPU
    counterpart of ``mx.clear_cache()``, which does the same for MLX's buffer cache on Metal/CUDA."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@dataclass
class PhaseReport:
    name: str
    seconds: float = 0.0
    peak_memory: int = 0
    """Peak MLX memory during the phase (bytes)."""
    max_rss: int = 0
    """Process max RSS at the end of the phase (bytes; monotonic over the process's life)."""
    loads: int = 0
    """Unit weight loads (streaming; 0 when the whole model was loaded up front)."""
    load_wait: float = 0.0
    """Seconds spent waiting for weights (loading not hidden behind compute)."""
    read_bytes: int = 0
    load_wait_by_unit: dict[str, float] = field(default_factory=dict)
    """Seconds waiting for weights per unit (streaming)."""

    def summary(self) -> str:
        line = (f"{self.name:<14} {self.seconds:8.2f} s   peak MLX {self.peak_memory / GIB:6.2f} GiB   "
                f"max RSS {self.max_rss / GIB:6.2f} GiB")
        if self.loads:
            line += (f"   {self.loads} unit loads ({self.read_bytes / GIB:.2f} GiB read), "
                     f"{self.load_wait:.2f} s waiting for weights")
            longest = sorted(self.load_wait_by_unit.items(), key=lambda item: -item[1])[:2]
            if longest and self.load_wait >= 0.5:
                line += " (most: " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in longest) + ")"
        return line


@contextmanager
def measure_phase(name: str) -> Iterator[PhaseReport]:
    """Time a phase and record its MLX peak memory (the peak counter is reset at the start)."""
    report = PhaseReport(name)
    mx.synchronize()
    mx.reset_peak_memory()
    start = time.perf_counter()
    try:
        yield report
    finally:
        mx.synchronize()
        report.seconds = time.perf_counter() - start
        report.peak_memory = mx.get_peak_memory()
        report.max_rss = max_rss_bytes()
