"""blas.py's Linux-only preload, with the OS substituted: elsewhere (macOS: Accelerate) it does nothing."""

from __future__ import annotations

import os
import sys

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
