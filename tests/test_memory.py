"""memory.py: the readers of each OS (with the OS calls substituted: their layouts, parsing and
arithmetic; the real macOS calls on macOS only), the phase reports, and the CPU allocator policy
(freed MLX buffers reused, given back on release)."""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import subprocess
import sys

import mlx.core as mx
import pytest

from mlx_sora.errors import UserError
from mlx_sora.runtime import memory

glibc_only = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"), reason="glibc malloc policy"
)
PAGE = 4096


FAULTS_PER_OP = """
import resource, sys
import mlx.core as mx
from mlx_sora.runtime import memory
print(memory.keep_freed_cpu_memory(), memory.keep_freed_cpu_memory())  # (idempotent)
x = mx.ones((16, 1024, 1024))  # 64 MiB: glibc mmaps and unmaps such a block per allocation
mx.eval(x)
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    mx.eval(x + 1)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_per_op(keep: str) -> tuple[str, list[int]]:
    """In a fresh process (the heap's history decides what a free returns to the OS): the policy's
    answer and the page faults of three consecutive 64 MiB outputs."""
    env = {**os.environ, "MLX_SORA_KEEP_FREED_MEMORY": keep}
    lines = subprocess.run([sys.executable, "-c", FAULTS_PER_OP], env=env, capture_output=True, text=True,
                           check=True).stdout.split("\n")
    return lines[0], [int(v) for v in lines[1:4]]


@glibc_only
def test_kept_memory_is_reused_without_page_faults():
    pages = 64 * 2**20 // PAGE
    policy, faults = faults_per_op("1")
    assert policy == "True True"
    assert faults[0] > pages // 2  # the heap grows once...
    assert max(faults[1:]) < pages // 10, faults  # ... and the next outputs reuse it
    policy, faults = faults_per_op("0")  # off: every output is faulted in again
    assert policy == "False False"
    assert min(faults) > pages // 2, faults


RSS_AFTER_RELEASE = """
import mlx.core as mx
from mlx_sora.runtime import memory
memory.keep_freed_cpu_memory()
base = memory.process_memory()
x = mx.ones((64, 1024, 1024))  # 256 MiB
mx.eval(x)
held = memory.process_memory()
del x
kept = memory.process_memory()
kept_free = memory.kept_free_cpu_memory()
memory.release_freed_cpu_memory()
print(base, held, kept, memory.process_memory())
print(kept_free, memory.kept_free_cpu_memory())
"""


@glibc_only
def test_release_gives_the_memory_back():
    out = subprocess.run([sys.executable, "-c", RSS_AFTER_RELEASE], capture_output=True, text=True, check=True)
    lines = out.stdout.split("\n")
    base, held, kept, released = (int(v) for v in lines[0].split())
    kept_free, after_release = (int(v) for v in lines[1].split())
    mib = 2**20
    assert held - base > 200 * mib
    assert kept - base > 200 * mib, "freed memory stays in the process for reuse"
    assert kept - released > 200 * mib and released - base < 64 * mib, "malloc_trim gives it back"
    # the heap reports what it holds for reuse (streaming counts it as room already in the RSS)
    assert 200 * mib < kept_free <= 300 * mib, kept_free
    assert after_release < 64 * mib, after_release


def test_readers_report_plausible_figures():
    assert memory.peak_process_memory() >= memory.process_memory() > 10 * 2**20
    assert memory.available_memory() > memory.process_memory()
    # this OS's measure, chosen in one place
    expected = {"linux": ("RSS", "max RSS"), "darwin": ("footprint", "peak footprint")}
    key = "linux" if sys.platform.startswith("linux") else sys.platform
    assert (memory.os_memory().measure, memory.os_memory().peak_name) == expected[key]


def test_measure_phase_records_time_and_peaks():
    with memory.measure_phase("work") as report:
        mx.eval(mx.ones((256, 1024)) * 2)
    assert report.seconds > 0 and report.peak_memory >= 1024 * 1024 and report.process_peak > 0
    assert "work" in report.summary() and memory.os_memory().peak_name in report.summary()


def test_phase_summary_names_the_units_that_waited_longest():
    report = memory.PhaseReport("text encoding", seconds=30.0, loads=26, load_wait=3.2, read_bytes=9 * 2**30,
                                load_wait_by_unit={"embed": 0.3, "block_00": 2.25, "block_01": 0.65})
    assert "3.20 s waiting for weights (most: block_00 2.25 s, block_01 0.65 s)" in report.summary()
    report.load_wait, report.load_wait_by_unit = 0.2, {"block_00": 0.2}
    assert "most:" not in report.summary()  # nothing worth pointing at


# ---------------------------------------------------------------- Linux: /proc, substituted

STATUS = """Name:\tpython
VmPeak:\t 3000000 kB
VmSize:\t 2900000 kB
VmHWM:\t  812345 kB
VmRSS:\t  400000 kB
Threads:\t9
"""
MEMINFO = """MemTotal:       24575104 kB
MemFree:         1000000 kB
MemAvailable:   20000000 kB
Buffers:            1234 kB
"""


def test_proc_fields_are_read_in_bytes():
    assert memory.proc_field(STATUS, "VmRSS") == 400000 * 1024
    assert memory.proc_field(STATUS, "VmHWM") == 812345 * 1024
    assert memory.proc_field(MEMINFO, "MemAvailable") == 20000000 * 1024
    with pytest.raises(ValueError, match="no VmSwap"):
        memory.proc_field(STATUS, "VmSwap")
    with pytest.raises(ValueError, match="not kB"):
        memory.proc_field("VmRSS:\t 12 MB\n", "VmRSS")


def test_linux_readers_from_substituted_proc_files(tmp_path):
    (tmp_path / "status").write_text(STATUS)
    (tmp_path / "meminfo").write_text(MEMINFO)
    linux = memory.memory_for("linux", status=tmp_path / "status", meminfo=tmp_path / "meminfo")
    assert (linux.measure, linux.peak_name) == ("RSS", "max RSS")
    assert linux.current() == 400000 * 1024  # planning: what the process holds now ...
    assert linux.peak() == 812345 * 1024  # ... not its peak
    assert linux.available() == (20000000 + 400000) * 1024  # what it could use: MemAvailable + its own


# ---------------------------------------------------------------- macOS: libproc and Mach, substituted

# <sys/resource.h>: struct rusage_info_v4 is a 16-byte uuid followed by these uint64_t fields
RUSAGE_V4_HEADER = (
    "ri_user_time ri_system_time ri_pkg_idle_wkups ri_interrupt_wkups ri_pageins ri_wired_size ri_resident_size "
    "ri_phys_footprint ri_proc_start_abstime ri_proc_exit_abstime ri_child_user_time ri_child_system_time "
    "ri_child_pkg_idle_wkups ri_child_interrupt_wkups ri_child_pageins ri_child_elapsed_abstime "
    "ri_diskio_bytesread ri_diskio_byteswritten ri_cpu_time_qos_default ri_cpu_time_qos_maintenance "
    "ri_cpu_time_qos_background ri_cpu_time_qos_utility ri_cpu_time_qos_legacy ri_cpu_time_qos_user_initiated "
    "ri_cpu_time_qos_user_interactive ri_billed_system_time ri_serviced_system_time ri_logical_writes "
    "ri_lifetime_max_phys_footprint ri_instructions ri_cycles ri_billed_energy ri_serviced_energy "
    "ri_interval_max_phys_footprint ri_runnable_time"
).split()
# <mach/vm_statistics.h>: struct vm_statistics64 as far as HOST_VM_INFO64_COUNT (natural_t = uint32_t)
VM_STATISTICS64_HEADER = [
    ("free_count", "I"), ("active_count", "I"), ("inactive_count", "I"), ("wire_count", "I"),
    ("zero_fill_count", "Q"), ("reactivations", "Q"), ("pageins", "Q"), ("pageouts", "Q"), ("faults", "Q"),
    ("cow_faults", "Q"), ("lookups", "Q"), ("hits", "Q"), ("purges", "Q"), ("purgeable_count", "I"),
    ("speculative_count", "I"), ("decompressions", "Q"), ("compressions", "Q"), ("swapins", "Q"),
    ("swapouts", "Q"), ("compressor_page_count", "I"), ("throttled_count", "I"), ("external_page_count", "I"),
    ("internal_page_count", "I"), ("total_uncompressed_pages_in_compressor", "Q"),
]


class FakeLibSystem:
    """libSystem's four calls, answering from given figures laid out as the C headers say (bytes
    written at the headers' offsets, not through memory.py's structures)."""

    HOST = 0x1234

    def __init__(self, footprint: int, lifetime_max: int, pages: dict[str, int], page_size: int = 16384):
        self.footprint, self.lifetime_max, self.pages, self.page_size = footprint, lifetime_max, pages, page_size
        self.rusage_result = 0
        self.calls: list[tuple] = []

    def mach_host_self(self) -> int:
        return self.HOST

    def proc_pid_rusage(self, pid, flavor, buffer) -> int:
        self.calls.append(("proc_pid_rusage", pid, flavor))
        raw = bytearray(16 + 8 * len(RUSAGE_V4_HEADER))
        raw[:16] = bytes(range(16))  # the uuid
        for name, value in (("ri_phys_footprint", self.footprint), ("ri_lifetime_max_phys_footprint",
                                                                    self.lifetime_max), ("ri_resident_size", 1)):
            struct.pack_into("<Q", raw, 16 + 8 * RUSAGE_V4_HEADER.index(name), value)
        ctypes.memmove(buffer, bytes(raw), len(raw))
        return self.rusage_result

    def host_statistics64(self, host, flavor, info, count) -> int:
        self.calls.append(("host_statistics64", host, flavor, count.contents.value))
        layout = "<" + "".join(kind for _, kind in VM_STATISTICS64_HEADER)
        values = [self.pages.get(name, 7) for name, _ in VM_STATISTICS64_HEADER]
        raw = struct.pack(layout, *values)  # no padding needed: every uint64 lands 8-aligned
        ctypes.memmove(info, raw, len(raw))
        return 0

    def host_page_size(self, host, size) -> int:
        size.contents.value = self.page_size
        return 0


def test_structures_have_the_headers_layout():
    assert ctypes.sizeof(memory.RusageInfoV4) == 16 + 8 * len(RUSAGE_V4_HEADER) == 296
    assert memory.RusageInfoV4.ri_phys_footprint.offset == 16 + 8 * 7
    assert memory.RusageInfoV4.ri_lifetime_max_phys_footprint.offset == 16 + 8 * 28
    assert ctypes.sizeof(memory.VMStatistics64) == struct.calcsize("<" + "".join(k for _, k in VM_STATISTICS64_HEADER))
    assert memory.HOST_VM_INFO64_COUNT == 38  # <mach/host_info.h>


def test_darwin_footprint_from_a_substituted_proc_pid_rusage():
    libc = FakeLibSystem(footprint=1_500_000_000, lifetime_max=3_200_000_000, pages={})
    darwin = memory.memory_for("darwin", libc=libc)
    assert (darwin.measure, darwin.peak_name) == ("footprint", "peak footprint")
    assert darwin.current() == 1_500_000_000  # planning: the footprint now ...
    assert darwin.peak() == 3_200_000_000  # ... not the lifetime peak
    assert libc.calls[0] == ("proc_pid_rusage", os.getpid(), memory.RUSAGE_INFO_V4)
    libc.rusage_result = -1
    with pytest.raises(OSError, match="proc_pid_rusage"):
        darwin.current()


def test_darwin_available_memory_from_substituted_vm_statistics():
    pages = {"free_count": 100_000, "inactive_count": 50_000, "purgeable_count": 2_000, "active_count": 900_000,
             "wire_count": 300_000, "speculative_count": 3_000}
    libc = FakeLibSystem(footprint=1 << 30, lifetime_max=2 << 30, pages=pages)
    darwin = memory.memory_for("darwin", libc=libc)
    # free + inactive + purgeable pages of 16 KiB, plus what the process holds
    assert darwin.available() == (100_000 + 50_000 + 2_000) * 16384 + (1 << 30)
    assert ("host_statistics64", FakeLibSystem.HOST, memory.HOST_VM_INFO64, 38) in libc.calls


def test_an_os_without_readers_is_named():
    with pytest.raises(UserError, match="Linux and macOS; this is win32"):
        memory.memory_for("win32")


def test_reports_name_the_measure_of_the_os(monkeypatch):
    libc = FakeLibSystem(footprint=1 << 30, lifetime_max=3 << 30, pages={})
    monkeypatch.setattr(memory, "os_memory", lambda: memory.memory_for("darwin", libc=libc))
    with memory.measure_phase("decoding") as report:
        pass
    assert report.process_peak == 3 << 30 and report.process_peak_name == "peak footprint"
    assert "peak footprint   3.00 GiB" in report.summary()
    assert memory.process_memory() == 1 << 30 and memory.peak_process_memory() == 3 << 30


def test_allocator_policy_is_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(memory, "_glibc", lambda: None)  # as on macOS or musl
    assert memory.keep_freed_cpu_memory.__wrapped__() is False
    assert memory.kept_free_cpu_memory() == 0
    memory.release_freed_cpu_memory()  # nothing to do, no error
    assert memory.reusable_memory() == mx.get_cache_memory()


# ---------------------------------------------------------------- the real macOS calls

macos_only = pytest.mark.skipif(
    sys.platform != "darwin",
    reason="the real proc_pid_rusage / host_statistics64 calls exist on macOS only (their logic is tested above)")


@pytest.mark.macos
@macos_only
def test_real_footprint_counts_mlx_buffers():
    before = memory.process_memory()
    x = mx.ones((64, 1024, 1024))  # 256 MiB on the default device (Metal: counted in the footprint, not in RSS)
    mx.eval(x)
    held = memory.process_memory()
    assert held - before > 200 * 2**20, (before, held)
    assert memory.peak_process_memory() >= held
    del x
    mx.clear_cache()
    assert memory.process_memory() < held - 200 * 2**20


@pytest.mark.macos
@macos_only
def test_real_available_memory_is_plausible():
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert memory.process_memory() < memory.available_memory() <= total + memory.process_memory()
