"""memory.py: the CPU allocator policy (freed MLX buffers reused, given back on release) and the readers."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import mlx.core as mx
import pytest

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
base = memory.process_rss()
x = mx.ones((64, 1024, 1024))  # 256 MiB
mx.eval(x)
held = memory.process_rss()
del x
kept = memory.process_rss()
kept_free = memory.kept_free_cpu_memory()
memory.release_freed_cpu_memory()
print(base, held, kept, memory.process_rss())
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
    assert memory.max_rss_bytes() >= memory.process_rss() > 10 * 2**20
    assert memory.available_memory() > memory.process_rss()


def test_measure_phase_records_time_and_peaks():
    with memory.measure_phase("work") as report:
        mx.eval(mx.ones((256, 1024)) * 2)
    assert report.seconds > 0 and report.peak_memory >= 1024 * 1024 and report.max_rss > 0
    assert "work" in report.summary()


def test_phase_summary_names_the_units_that_waited_longest():
    report = memory.PhaseReport("text encoding", seconds=30.0, loads=26, load_wait=3.2, read_bytes=9 * 2**30,
                                load_wait_by_unit={"embed": 0.3, "block_00": 2.25, "block_01": 0.65})
    assert "3.20 s waiting for weights (most: block_00 2.25 s, block_01 0.65 s)" in report.summary()
    report.load_wait, report.load_wait_by_unit = 0.2, {"block_00": 0.2}
    assert "most:" not in report.summary()  # nothing worth pointing at
