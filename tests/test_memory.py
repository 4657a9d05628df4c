"""memory.py: the CPU allocator policy (freed MLX buffers reused, given back on release) and the readers."""

from __future__ import annotations

import platform
import resource
import sys

import mlx.core as mx
import pytest

from mlx_sora import memory

glibc_only = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"), reason="glibc malloc policy"
)
PAGE = 4096


def faults_of(work) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    work()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@glibc_only
def test_kept_memory_is_reused_without_page_faults():
    assert memory.keep_freed_cpu_memory()
    assert memory.keep_freed_cpu_memory()  # idempotent
    x = mx.ones((16, 1024, 1024))  # 64 MiB: glibc would mmap/munmap it per allocation
    mx.eval(x)
    pages = x.nbytes // PAGE
    mx.eval(x + 1)  # the heap grows once
    faults = faults_of(lambda: mx.eval(x + 1))  # ... and the next output reuses it
    assert faults < pages // 10, f"{faults} page faults for a {pages}-page output"


@glibc_only
def test_release_gives_the_memory_back():
    memory.keep_freed_cpu_memory()
    memory.release_freed_cpu_memory()
    base = memory.process_rss()
    x = mx.ones((64, 1024, 1024))  # 256 MiB
    mx.eval(x)
    assert memory.process_rss() - base > 200 * 2**20
    del x
    kept = memory.process_rss()
    memory.release_freed_cpu_memory()
    assert kept - memory.process_rss() > 200 * 2**20, "malloc_trim gave the freed pages back"
    assert memory.process_rss() - base < 64 * 2**20


def test_readers_report_plausible_figures():
    assert memory.max_rss_bytes() >= memory.process_rss() > 10 * 2**20
    assert memory.available_memory() > memory.process_rss()


def test_measure_phase_records_time_and_peaks():
    with memory.measure_phase("work") as report:
        mx.eval(mx.ones((256, 1024)) * 2)
    assert report.seconds > 0 and report.peak_memory >= 1024 * 1024 and report.max_rss > 0
    assert "work" in report.summary()
