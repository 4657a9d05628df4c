"""Measuring time and memory per phase: MLX peak (``mx.get_peak_memory``) and the process's max RSS."""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx

GIB = 1024**3


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    On Linux this is VmHWM (reset by exec: ru_maxrss would carry the peak of the parent process that
    forked us); elsewhere ru_maxrss (bytes on macOS).
    """
    if sys.platform.startswith("linux"):
        try:
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


@dataclass
class PhaseReport:
    name: str
    seconds: float = 0.0
    peak_memory: int = 0
    """Peak MLX memory during the phase (bytes)."""
    max_rss: int = 0
    """Process max RSS at the end of the phase (bytes; monotonic over the process's life)."""

    def summary(self) -> str:
        return (f"{self.name:<14} {self.seconds:8.2f} s   peak MLX {self.peak_memory / GIB:6.2f} GiB   "
                f"max RSS {self.max_rss / GIB:6.2f} GiB")


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
