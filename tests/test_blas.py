"""blas.py's Linux-only preload, with the OS substituted: elsewhere (macOS: Accelerate) it does nothing."""

from __future__ import annotations

import os
import sys

import pytest

from mlx_sora.runtime import blas


def test_off_linux_nothing_is_preloaded_or_restarted(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.delenv(blas._REEXEC_FLAG, raising=False)
    monkeypatch.setattr(blas, "fast_blas_library", lambda: ("OpenBLAS", "/usr/lib/libopenblas.so.0"))
    monkeypatch.setattr(os, "execve", lambda *a: (_ for _ in ()).throw(AssertionError("no restart off Linux")))
    env = {"PATH": "/usr/bin"}
    assert blas.fast_blas_env(env) == env
    blas.ensure_fast_cpu_blas(quiet=True)  # returns: no exec, no note


def test_on_linux_the_found_library_is_preloaded(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(blas, "fast_blas_library", lambda: ("MKL", "/opt/mkl/libmkl_rt.so.2"))
    env = blas.fast_blas_env({"LD_PRELOAD": "/lib/other.so"})
    assert env["LD_PRELOAD"] == "/opt/mkl/libmkl_rt.so.2:/lib/other.so" and env["MKL_THREADING_LAYER"] == "GNU"
    assert blas.fast_blas_env(env)["LD_PRELOAD"] == env["LD_PRELOAD"]  # not twice


# ---------------------------------------------------------------- the choice by measurement


def fake_libraries(tmp_path, monkeypatch, names=("OpenBLAS", "MKL")):
    paths = {}
    for name in names:
        path = tmp_path / f"lib{name.lower()}.so"
        path.write_bytes(b"\x7fELF")
        paths[name] = str(path)
    monkeypatch.setattr(blas, "blas_candidates", lambda: list(paths.items()))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(blas.CHOICE_ENV, raising=False)
    return paths


def test_the_faster_library_is_chosen_and_the_choice_cached(tmp_path, monkeypatch):
    paths = fake_libraries(tmp_path, monkeypatch)
    calls = []

    def probe(kind, path):
        calls.append(kind)
        return {"OpenBLAS": 216.0, "MKL": 260.0}[kind]  # the Intel Xeon of issue 20

    choice = blas.choose_blas(probe)
    assert (choice.kind, choice.path) == ("MKL", paths["MKL"])
    assert "260 GFLOP/s against OpenBLAS 216" in choice.reason and "measured now" in choice.reason
    assert sorted(calls) == ["MKL", "OpenBLAS"]
    again = blas.choose_blas(lambda kind, path: calls.append("again") or 1.0)
    assert again.kind == "MKL" and "measured earlier" in again.reason and "again" not in calls
    # a different library file (another version) is measured afresh
    (tmp_path / "libopenblas.so").write_bytes(b"\x7fELF and more")
    assert blas.choose_blas(lambda kind, path: {"OpenBLAS": 300.0, "MKL": 260.0}[kind]).kind == "OpenBLAS"


def test_an_unwritable_cache_only_means_measuring_again(tmp_path, monkeypatch):
    fake_libraries(tmp_path, monkeypatch)
    (tmp_path / "cache").write_text("a file where the cache folder would be")
    assert blas.choose_blas(lambda kind, path: {"OpenBLAS": 2.0, "MKL": 1.0}[kind]).kind == "OpenBLAS"


def test_a_library_whose_probe_fails_is_not_chosen(tmp_path, monkeypatch):
    fake_libraries(tmp_path, monkeypatch)
    assert blas.choose_blas(lambda kind, path: None if kind == "OpenBLAS" else 5.0).kind == "MKL"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache2"))
    choice = blas.choose_blas(lambda kind, path: None)
    assert choice.kind == "OpenBLAS" and "failed for every library" in choice.reason


def test_one_library_needs_no_probe(tmp_path, monkeypatch):
    fake_libraries(tmp_path, monkeypatch, names=("MKL",))
    choice = blas.choose_blas(lambda kind, path: (_ for _ in ()).throw(AssertionError("no probe")))
    assert choice.kind == "MKL" and choice.reason == "the only fast BLAS found"


def test_the_environment_overrides_the_measurement(tmp_path, monkeypatch):
    paths = fake_libraries(tmp_path, monkeypatch)
    never = lambda kind, path: (_ for _ in ()).throw(AssertionError("no probe"))  # noqa: E731
    monkeypatch.setenv(blas.CHOICE_ENV, "openblas")
    assert blas.choose_blas(never).path == paths["OpenBLAS"]
    monkeypatch.setenv(blas.CHOICE_ENV, paths["MKL"])
    assert blas.choose_blas(never).path == paths["MKL"]
    monkeypatch.setenv(blas.CHOICE_ENV, "none")
    assert blas.choose_blas(never) is None
    monkeypatch.setenv(blas.CHOICE_ENV, "accelerate")
    with pytest.raises(ValueError, match="MLX_SORA_BLAS='accelerate' is neither"):
        blas.choose_blas(never)


def test_the_run_says_which_and_why_then_restarts_with_it(tmp_path, monkeypatch, capsys):
    paths = fake_libraries(tmp_path, monkeypatch)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv(blas._REEXEC_FLAG, raising=False)
    monkeypatch.setattr(blas, "fast_blas_loaded", lambda: None)
    monkeypatch.setattr(blas, "probe_gemm", lambda kind, path: {"OpenBLAS": 137.0, "MKL": 126.0}[kind])
    started = {}
    monkeypatch.setattr(os, "execve", lambda exe, argv, env: started.update(env=env))
    blas.ensure_fast_cpu_blas()
    note = capsys.readouterr().err
    assert note.startswith("note: BLAS: OpenBLAS") and "137 GFLOP/s against MKL 126" in note
    assert started["env"]["LD_PRELOAD"].split(":")[0] == paths["OpenBLAS"]
    assert started["env"][blas._REEXEC_FLAG] == "1"


def test_a_bad_override_ends_the_command_with_one_message(tmp_path, monkeypatch, capsys):
    fake_libraries(tmp_path, monkeypatch)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv(blas._REEXEC_FLAG, raising=False)
    monkeypatch.setattr(blas, "fast_blas_loaded", lambda: None)
    monkeypatch.setenv(blas.CHOICE_ENV, "/nowhere/libblas.so")
    with pytest.raises(SystemExit) as exit_:
        blas.ensure_fast_cpu_blas()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: MLX_SORA_BLAS='/nowhere/libblas.so'")


@pytest.mark.skipif(not sys.platform.startswith("linux") or not blas.blas_candidates(), reason="no fast BLAS here")
def test_the_probe_measures_mlx_with_the_library():
    kind, path = blas.blas_candidates()[0]
    rate = blas.probe_gemm(kind, path)
    assert rate is not None and rate > 5.0  # MLX's bundled reference BLAS runs ~3-5 GFLOP/s
