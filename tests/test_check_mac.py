"""scripts/check_mac.sh and bench_vs_torch.py's Mac path, as far as a Linux machine can run them: the
script's syntax, options and the commands it would run (each of which is checked to exist here),
and the benchmark's choice of torch device (MPS on macOS, CUDA elsewhere). Nothing here ran on a Mac."""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "check_mac.sh"


def check_mac(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_help_and_bad_options():
    done = check_mac("--help")
    assert done.returncode == 0 and "--dry-run" in done.stdout and "No Mac has run this script yet" in done.stdout
    bad = check_mac("--bogus")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: unknown option --bogus (see --help)"
    missing = check_mac("--python")
    assert missing.returncode == 2 and "--python needs a path" in missing.stderr


@pytest.mark.skipif(platform.system() == "Darwin", reason="on a Mac the script runs for real")
def test_it_refuses_to_report_on_another_os():
    done = check_mac()
    assert done.returncode == 2 and "not macOS" in done.stderr and "--dry-run" in done.stderr


def test_dry_run_lists_every_part_and_each_can_run_here(tmp_path):
    done = check_mac("--dry-run", "--quick", "--python", sys.executable, "--opensora-src", str(tmp_path),
                     "--out", str(tmp_path / "report.md"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    would = [line for line in lines if line.startswith("would run:")]
    python = sys.executable
    assert f"would run: {python} -m pytest -q -p no:cacheprovider" in would
    assert f"would run: {python} -m pytest -q -m gpu -p no:cacheprovider" in would
    assert any(line.startswith(f"would run: {python} -m mlx_sora.generate --prompt a\\ red\\ circle") for line in would)
    for dtype in ("bfloat16", "float32"):
        assert (f"would run: {python} scripts/bench_vs_torch.py --device gpu --dtype {dtype} --opensora-src "
                f"{tmp_path} --repeats 3 --quick") in would
    assert lines[-1] == "(dry run: nothing was run)" and not (tmp_path / "report.md").exists()
    # what it would run exists here: the gpu marker selects the parity tests, the benchmark has its options
    collected = subprocess.run([python, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                "tests/test_vae_temporal.py"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert collected.returncode == 0, collected.stdout[-2000:]
    selected = [line for line in collected.stdout.splitlines() if "::" in line]
    assert len(selected) == 7 and all("_matches_reference" in t or "crops" in t for t in selected), selected
    bench = subprocess.run([python, "scripts/bench_vs_torch.py", "--help"], capture_output=True, text=True, cwd=REPO)
    assert bench.returncode == 0 and "Metal / MPS" in bench.stdout


def test_parts_can_be_left_out():
    done = check_mac("--dry-run", "--no-tests", "--no-demo", "--no-bench")
    assert done.returncode == 0
    for part in ("test suite: not run: --no-tests", "demo: not run: --no-demo", "benchmark: not run: --no-bench"):
        assert part in done.stdout
    would = [line for line in done.stdout.splitlines() if line.startswith("would run:")]
    assert not [line for line in would if "pytest" in line or "bench_vs_torch" in line or "generate" in line]


def test_a_report_on_a_substituted_mac(tmp_path):
    """The report's real path (not the dry run) with macOS's commands substituted by shims."""
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, body in (("uname", 'if [ "$1" = "-s" ]; then echo Darwin; else /bin/uname "$@"; fi'),
                       ("sw_vers", "echo 15.1"),
                       ("sysctl", 'for k in "$@"; do case "$k" in machdep.cpu.brand_string) echo "Apple M4 (shim)";; '
                                  "hw.memsize) echo 25769803776;; esac; done")):
        (shims / name).write_text(f"#!/bin/sh\n{body}\n")
        (shims / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    report = tmp_path / "report.md"
    done = subprocess.run(["bash", str(SCRIPT), "--python", sys.executable, "--out", str(report), "--no-tests",
                           "--no-demo", "--no-bench"], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    text = report.read_text()
    assert "- macOS 15.1" in text and "- chip: Apple M4 (shim), memory: 24 GiB" in text
    assert "- MLX: " in text and "Metal available: " in text and "memory as mlx-sora measures it: " in text
    assert "- test suite: not run: --no-tests" in text and text.rstrip().endswith("Every part that ran passed.")


def _bench_vs_torch():
    spec = importlib.util.spec_from_file_location("bench_vs_torch", REPO / "scripts" / "bench_vs_torch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_vs_torch_compares_with_mps_on_a_mac_and_cuda_elsewhere(monkeypatch):
    bench = _bench_vs_torch()
    assert bench.gpu_backend("Darwin") == "mps" and bench.gpu_backend("Linux") == "cuda"
    place = bench.TorchPlace("cpu", "float32")
    import numpy as np

    assert place.tensor(np.ones(3)).dtype == place.torch.float32  # float64 cast before moving (MPS has none)
    monkeypatch.setattr(bench.platform, "system", lambda: "Darwin")
    import torch

    if not torch.backends.mps.is_available():  # this torch (CPU build): a clear message, no traceback
        with pytest.raises(SystemExit, match="torch has no MPS backend"):
            bench.TorchPlace("gpu", "float32")
