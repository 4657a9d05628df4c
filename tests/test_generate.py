"""The `python -m mlx_sora.generate` command end to end on a tiny random model."""

from __future__ import annotations

import os
import subprocess
import sys

import av
import pytest

from mlx_sora import generate
from mlx_sora.runtime import blas


@pytest.fixture(autouse=True)
def _no_blas_restart(monkeypatch):
    monkeypatch.setenv("MLX_SORA_BLAS_CHECKED", "1")  # in-process runs must not exec a new process


def _probe(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        return len(frames), frames[0].shape, stream.average_rate


def test_cli_writes_mp4_per_seed(tiny_model_folder, tmp_path, capsys):
    out = tmp_path / "videos" / "panda_{seed}.mp4"
    code = generate.main([
        "--model", str(tiny_model_folder), "--prompt", "a red panda eating bamboo", "--resolution", "144p",
        "--aspect-ratio", "9:16", "--num-frames", "17", "--fps", "8", "--steps", "3", "--seed", "1", "2",
        "--output", str(out), "--lpl-step", "1", "--tdtm-steps", "1",
    ])
    assert code == 0
    for seed in (1, 2):
        count, shape, rate = _probe(tmp_path / "videos" / f"panda_{seed}.mp4")
        assert count == 17 and shape == (144, 256, 3) and rate == 8
    printed = capsys.readouterr().out
    assert "text encoding" in printed and "decoding" in printed and "model evaluations 2" in printed
    assert "leapt at step 1" in printed
    assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == ["panda_1.mp4", "panda_2.mp4"]


def test_cli_failure_leaves_no_file(tiny_model_folder, tmp_path, monkeypatch):
    original = av.VideoFrame.from_ndarray
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", failing)
    code = generate.main([
        "--model", str(tiny_model_folder), "--prompt", "a cat", "--resolution", "144p", "--aspect-ratio",
        "1:1", "--num-frames", "9", "--steps", "1", "--output", str(tmp_path / "cat.mp4"), "--quiet",
    ])
    assert code == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "  "], "prompt is empty"),
        (["--prompt", "a cat", "--num-frames", "0"], "at least 1"),
        (["--prompt", "a cat", "--output", "/proc/nope/x.mp4"], "output"),
        (["--prompt", "a cat", "--output", "x.gif"], "must end in .mp4"),
        (["--prompt", "a cat", "--lpl-step", "30"], "leap step"),
        (["--prompt", "a cat", "--seed", "1", "1"], "same seed"),
    ],
)
def test_cli_bad_input(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert generate.main(args) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_model_folder(tmp_path, capsys):
    code = generate.main(["--model", str(tmp_path / "nope"), "--prompt", "a cat",
                          "--output", str(tmp_path / "x.mp4")])
    assert code == 1
    assert "does not exist" in capsys.readouterr().err


def test_module_entry_point_help():
    env = dict(os.environ, MLX_SORA_BLAS_CHECKED="1")
    done = subprocess.run([sys.executable, "-m", "mlx_sora.generate", "--help"], capture_output=True,
                          text=True, env=env, check=True)
    assert "--lpl-step" in done.stdout and "--tdtm-steps" in done.stdout
    assert "RuntimeWarning" not in done.stderr


def test_cli_uses_a_fast_blas_when_installed_or_says_how(tmp_path):
    """On Linux CPU the CLI restarts itself with the fast BLAS it found (OpenBLAS or MKL), naming it, or
    prints one line on how to install one (the model error afterwards is expected: the folder does not
    exist)."""
    if sys.platform != "linux":
        pytest.skip("the reference-BLAS check is Linux-only")
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLX_SORA_BLAS_CHECKED", "LD_PRELOAD", blas.CHOICE_ENV)}
    done = subprocess.run(
        [sys.executable, "-m", "mlx_sora.generate", "--prompt", "a cat", "--model", str(tmp_path / "none"),
         "--output", str(tmp_path / "x.mp4")], capture_output=True, text=True, env=env,
    )
    assert done.returncode == 1 and "does not exist" in done.stderr
    found = blas.blas_candidates()
    if found:
        assert "restarting with it preloaded" in done.stderr
        assert any(f"BLAS: {kind} ({path})" in done.stderr for kind, path in found)
    else:
        assert "apt-get install libopenblas0-pthread" in done.stderr


def test_cli_text_dtype_and_the_precision_line(tiny_model_folder, tmp_path, capsys):
    code = generate.main([
        "--model", str(tiny_model_folder), "--prompt", "a cat", "--resolution", "144p", "--aspect-ratio", "1:1",
        "--num-frames", "1", "--steps", "1", "--output", str(tmp_path / "cat.mp4"), "--dtype", "float32",
        "--text-dtype", "bfloat16",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "compute: text_encoder bfloat16, stdit3 float32, vae float32; float32 matmuls in full precision" in printed
