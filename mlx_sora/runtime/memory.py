"""A process's memory as its OS counts it, time and memory per phase, and the CPU allocator policy.

What counts is what the OS holds against the process:

* Linux: the resident set (``VmRSS``; its peak ``VmHWM``, which exec resets) and, available,
  ``MemAvailable`` (``/proc``).
* macOS (and iOS): the *physical footprint* (``proc_pid_rusage``: ``ri_phys_footprint``, its peak
  ``ri_lifetime_max_phys_footprint``): the dirty memory the kernel charges to the process, Metal
  buffers included, which RSS leaves out. It is Activity Monitor's "Memory", and what iOS's jetsam
  limit is enforced on (the On-device Sora app reads ``phys_footprint`` from ``task_info``).
  Available: the host's free, inactive and purgeable pages (``host_statistics64``).

Planning uses the *current* figure (``process_memory``); reports give the peak
(``peak_process_memory``) under the name of its measure (``ProcessMemory.peak_name``: "max RSS" /
"peak footprint"). The readers of each OS are chosen in one place, ``os_memory``;
``memory_for(platform, ...)`` builds them with the OS calls substituted (tests). Also: the CPU
allocator policy (``keep_freed_cpu_memory`` / ``release_freed_cpu_memory``) and the memory a
process holds for reuse (``reusable_memory`` / ``release_reusable_memory``).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import mlx.core as mx

from ..errors import UserError

GIB = 1024**3


@dataclass(frozen=True)
class ProcessMemory:
    """How this OS counts a process's memory (bytes)."""

    measure: str
    """What is counted: "RSS" (Linux) or "footprint" (macOS)."""
    peak_name: str
    """The peak's name in reports: "max RSS" or "peak footprint"."""
    current: Callable[[], int]
    peak: Callable[[], int]
    """The peak over the process's life so far."""
    available: Callable[[], int]
    """Memory this process could use now: what the OS can give it + what it holds."""


# ---------------------------------------------------------------- Linux: /proc


def proc_field(text: str, name: str) -> int:
    """The "<name>: <n> kB" line of a /proc file's text, in bytes."""
    for line in text.splitlines():
        if line.startswith(name + ":"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise ValueError(f"/proc field {name} is in {unit!r}, not kB")
            return int(value) * 1024
    raise ValueError(f"/proc has no {name} line")


def linux_memory(status: str | Path = "/proc/self/status", meminfo: str | Path = "/proc/meminfo") -> ProcessMemory:
    """RSS from /proc/self/status (VmHWM, not ``ru_maxrss``: exec resets it, whereas ru_maxrss would
    carry the peak of the parent that forked us), available memory from /proc/meminfo."""

    def read(path: str | Path, name: str) -> int:
        return proc_field(Path(path).read_text(), name)

    def current() -> int:
        return read(status, "VmRSS")

    return ProcessMemory("RSS", "max RSS", current, lambda: read(status, "VmHWM"),
                         lambda: read(meminfo, "MemAvailable") + current())


# ---------------------------------------------------------------- macOS: libproc and the Mach host


class RusageInfoV4(ctypes.Structure):
    """``struct rusage_info_v4`` of <sys/resource.h> (``proc_pid_rusage`` with ``RUSAGE_INFO_V4``)."""

    _fields_ = [("ri_uuid", ctypes.c_uint8 * 16)] + [(name, ctypes.c_uint64) for name in (
        # rusage_info_v0
        "ri_user_time", "ri_system_time", "ri_pkg_idle_wkups", "ri_interrupt_wkups", "ri_pageins",
        "ri_wired_size", "ri_resident_size", "ri_phys_footprint", "ri_proc_start_abstime",
        "ri_proc_exit_abstime",
        # v1
        "ri_child_user_time", "ri_child_system_time", "ri_child_pkg_idle_wkups", "ri_child_interrupt_wkups",
        "ri_child_pageins", "ri_child_elapsed_abstime",
        # v2
        "ri_diskio_bytesread", "ri_diskio_byteswritten",
        # v3
        "ri_cpu_time_qos_default", "ri_cpu_time_qos_maintenance", "ri_cpu_time_qos_background",
        "ri_cpu_time_qos_utility", "ri_cpu_time_qos_legacy", "ri_cpu_time_qos_user_initiated",
        "ri_cpu_time_qos_user_interactive", "ri_billed_system_time", "ri_serviced_system_time",
        # v4
        "ri_logical_writes", "ri_lifetime_max_phys_footprint", "ri_instructions", "ri_cycles",
        "ri_billed_energy", "ri_serviced_energy", "ri_interval_max_phys_footprint", "ri_runnable_time",
    )]


class VMStatistics64(ctypes.Structure):
    """``struct vm_statistics64`` of <mach/vm_statistics.h> (``host_statistics64``, ``HOST_VM_INFO64``),
    the fields up to ``HOST_VM_INFO64_COUNT``: counts of pages of ``host_page_size`` bytes."""

    _fields_ = [
        ("free_count", ctypes.c_uint32), ("active_count", ctypes.c_uint32), ("inactive_count", ctypes.c_uint32),
        ("wire_count", ctypes.c_uint32), ("zero_fill_count", ctypes.c_uint64), ("reactivations", ctypes.c_uint64),
        ("pageins", ctypes.c_uint64), ("pageouts", ctypes.c_uint64), ("faults", ctypes.c_uint64),
        ("cow_faults", ctypes.c_uint64), ("lookups", ctypes.c_uint64), ("hits", ctypes.c_uint64),
        ("purges", ctypes.c_uint64), ("purgeable_count", ctypes.c_uint32), ("speculative_count", ctypes.c_uint32),
        ("decompressions", ctypes.c_uint64), ("compressions", ctypes.c_uint64), ("swapins", ctypes.c_uint64),
        ("swapouts", ctypes.c_uint64), ("compressor_page_count", ctypes.c_uint32),
        ("throttled_count", ctypes.c_uint32), ("external_page_count", ctypes.c_uint32),
        ("internal_page_count", ctypes.c_uint32), ("total_uncompressed_pages_in_compressor", ctypes.c_uint64),
    ]


RUSAGE_INFO_V4 = 4
HOST_VM_INFO64 = 4
HOST_VM_INFO64_COUNT = ctypes.sizeof(VMStatistics64) // ctypes.sizeof(ctypes.c_int32)  # 38, as <mach/host_info.h>


def reclaimable_bytes(stats: VMStatistics64, page_size: int) -> int:
    """What the host can hand out now without swapping: free pages (the speculative ones included),
    inactive pages (reclaimed without paging out anything in use) and purgeable pages (volatile
    caches the kernel may drop)."""
    return (stats.free_count + stats.inactive_count + stats.purgeable_count) * page_size


def _libsystem() -> Any:
    libc = ctypes.CDLL("/usr/lib/libSystem.B.dylib", use_errno=True)
    libc.proc_pid_rusage.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(RusageInfoV4)]
    libc.mach_host_self.restype, libc.mach_host_self.argtypes = ctypes.c_uint32, []
    libc.host_statistics64.argtypes = [ctypes.c_uint32, ctypes.c_int, ctypes.POINTER(VMStatistics64),
                                       ctypes.POINTER(ctypes.c_uint32)]
    libc.host_page_size.argtypes = [ctypes.c_uint32, ctypes.POINTER(ctypes.c_size_t)]
    return libc


def darwin_memory(libc: Any = None) -> ProcessMemory:
    """The physical footprint from ``proc_pid_rusage``, available memory from the host's VM
    statistics. ``libc``: libSystem, or an object with the same four functions (tests)."""
    libc = _libsystem() if libc is None else libc
    host = libc.mach_host_self()  # a send right to the host port, taken once

    def rusage() -> RusageInfoV4:
        info = RusageInfoV4()
        if libc.proc_pid_rusage(os.getpid(), RUSAGE_INFO_V4, ctypes.pointer(info)) != 0:
            raise OSError(ctypes.get_errno(), "proc_pid_rusage(RUSAGE_INFO_V4) failed")
        return info

    def current() -> int:
        return int(rusage().ri_phys_footprint)

    def available() -> int:
        stats, count, page = VMStatistics64(), ctypes.c_uint32(HOST_VM_INFO64_COUNT), ctypes.c_size_t(0)
        if libc.host_statistics64(host, HOST_VM_INFO64, ctypes.pointer(stats), ctypes.pointer(count)) != 0:
            raise OSError("host_statistics64(HOST_VM_INFO64) failed")
        if libc.host_page_size(host, ctypes.pointer(page)) != 0:
            raise OSError("host_page_size failed")
        return reclaimable_bytes(stats, page.value) + current()

    return ProcessMemory("footprint", "peak footprint", current,
                         lambda: int(rusage().ri_lifetime_max_phys_footprint), available)


# ---------------------------------------------------------------- the one place an OS is chosen

_READERS: dict[str, Callable[..., ProcessMemory]] = {"linux": linux_memory, "darwin": darwin_memory}


def memory_for(platform_name: str, **os_calls: Any) -> ProcessMemory:
    """The readers of an OS (``sys.platform``); ``os_calls`` substitute its files or library."""
    key = "linux" if platform_name.startswith("linux") else platform_name
    if key not in _READERS:
        raise UserError(f"mlx-sora measures memory on Linux and macOS; this is {platform_name}")
    return _READERS[key](**os_calls)


@functools.cache
def os_memory() -> ProcessMemory:
    """The readers of the OS this process runs on."""
    return memory_for(sys.platform)


def process_memory() -> int:
    """What the OS counts against this process now (RSS on Linux, physical footprint on macOS):
    the baseline of a memory plan."""
    return os_memory().current()


def peak_process_memory() -> int:
    """The peak of ``process_memory`` over the process's life so far."""
    return os_memory().peak()


def available_memory() -> int:
    """Memory this process could use now, what it already holds included."""
    return os_memory().available()


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
    unit when memory is tight: ``release_reusable_memory``).
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


def reusable_memory() -> int:
    """Freed memory the process holds for its next allocations, counted in ``process_memory``:
    the CPU heap's (``kept_free_cpu_memory``) and MLX's buffer cache (Metal; empty on the CPU)."""
    return kept_free_cpu_memory() + mx.get_cache_memory()


def release_reusable_memory() -> None:
    """Give ``reusable_memory`` back to the OS."""
    mx.clear_cache()
    release_freed_cpu_memory()


@dataclass
class PhaseReport:
    name: str
    seconds: float = 0.0
    peak_memory: int = 0
    """Peak MLX memory during the phase (bytes)."""
    process_peak: int = 0
    """The process's peak memory as its OS counts it (``peak_process_memory``) at the end of the
    phase (bytes; the peak over the process's life)."""
    process_peak_name: str = "max RSS"
    """Its name: "max RSS" (Linux) or "peak footprint" (macOS)."""
    loads: int = 0
    """Unit weight loads (streaming; 0 when the whole model was loaded up front)."""
    load_wait: float = 0.0
    """Seconds spent waiting for weights (loading not hidden behind compute)."""
    read_bytes: int = 0
    load_wait_by_unit: dict[str, float] = field(default_factory=dict)
    """Seconds waiting for weights per unit (streaming)."""

    def summary(self) -> str:
        line = (f"{self.name:<14} {self.seconds:8.2f} s   peak MLX {self.peak_memory / GIB:6.2f} GiB   "
                f"{self.process_peak_name} {self.process_peak / GIB:6.2f} GiB")
        if self.loads:
            line += (f"   {self.loads} unit loads ({self.read_bytes / GIB:.2f} GiB read), "
                     f"{self.load_wait:.2f} s waiting for weights")
            longest = sorted(self.load_wait_by_unit.items(), key=lambda item: -item[1])[:2]
            if longest and self.load_wait >= 0.5:
                line += " (most: " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in longest) + ")"
        return line


@contextmanager
def measure_phase(name: str) -> Iterator[PhaseReport]:
    """Time a phase and record its MLX peak memory (the peak counter is reset at the start) and the
    process's peak as its OS counts it."""
    report = PhaseReport(name, process_peak_name=os_memory().peak_name)
    mx.synchronize()
    mx.reset_peak_memory()
    start = time.perf_counter()
    try:
        yield report
    finally:
        mx.synchronize()
        report.seconds = time.perf_counter() - start
        report.peak_memory = mx.get_peak_memory()
        report.process_peak = peak_process_memory()
