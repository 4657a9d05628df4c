"""Measuring time and memory per phase: MLX peak (``mx.get_peak_memory``) and the process's max RSS."""

from __future__ import annotations

import os
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
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

    def summary(self) -> str:
        line = (f"{self.name:<14} {self.seconds:8.2f} s   peak MLX {self.peak_memory / GIB:6.2f} GiB   "
                f"max RSS {self.max_rss / GIB:6.2f} GiB")
        if self.loads:
            line += (f"   {self.loads} unit loads ({self.read_bytes / GIB:.2f} GiB read), "
                     f"{self.load_wait:.2f} s waiting for weights")
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
