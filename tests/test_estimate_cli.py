"""`python -m mlx_sora.estimate`: options checked as generate checks them, the projection as text and
JSON, and this machine's projection beside a real run of the demo model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlx_sora.estimate.__main__ import main


@pytest.fixture(autouse=True)
def _no_blas_restart(monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_SORA_BLAS_CHECKED", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.mark.parametrize("args, message", [
    (["--image-size", "0", "64"], "--image-size height must be between 16 and 2048"),
    (["--lpl-step", "30"], "leap step 30 is past the last step"),
    (["--steps", "0"], "--steps must be between 1 and 1000"),
    (["--tdtm-steps", "-1"], "--tdtm-steps must be between 0"),
    (["--cfg-scale", "nan"], "--cfg-scale must be a finite number"),
    (["--memory-budget", "lots"], "memory budget 'lots' is not a size"),
    (["--resolution", "256", "--aspect-ratio", "9:16"], "is not a 256 bucket"),
    (["--device", "iphone15pro", "--remeasure"], "--remeasure applies to --device this-machine only"),
])
def test_bad_options_fail_before_any_work(args, message, capsys, tmp_path):
    assert main(["--device", "iphone15pro", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "cache").exists()  # nothing measured


def test_unknown_device_and_model(capsys):
    with pytest.raises(SystemExit):
        main(["--device", "pixel"])
    assert "invalid choice: 'pixel'" in capsys.readouterr().err
    assert main(["--device", "iphone15pro", "--model", "/nonexistent/model"]) == 1
    assert "model folder '/nonexistent/model' does not exist" in capsys.readouterr().err


def test_budget_too_small_is_one_clear_line(capsys):
    assert main(["--device", "iphone15pro", "--model", "opensora-v1.2", "--memory-budget", "1GB"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --memory-budget 0.93 GiB is too small for text encoding") and err.count("\n") == 1


def test_iphone_projection_of_the_real_model_as_json(capsys):
    args = ["--device", "iphone15pro", "--model", "opensora-v1.2", "--image-size", "256", "256", "--num-frames", "68",
            "--steps", "30", "--lpl-step", "15", "--tdtm-steps", "15", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    for phase in ("text_encoding", "denoising", "decoding"):
        assert out["phases"][phase]["seconds"] > 0
    assert out["total_seconds"] == pytest.approx(sum(p["seconds"] for p in out["phases"].values()))
    assert out["budget_bytes"] == 3_300_000_000 and 0 < out["peak_bytes"] <= out["budget_bytes"]
    assert out["request"]["evaluations"] == 16 and out["request"]["tdtm_evaluations"] == 15
    units = out["phases"]["denoising"]["units"]
    assert units["block_00"]["runs"] == 16 and {"load_seconds", "compute_seconds", "waited_seconds"} <= set(units["block_00"])
    assert main(args[:-1]) == 0
    text = capsys.readouterr().out
    assert "projection on iphone15pro" in text and "text encoding" in text and "against budget 3.07 GiB" in text


@pytest.mark.skipif(sys.platform != "linux", reason="the fast BLAS is preloaded on Linux (elsewhere MLX's own)")
def test_this_machine_projection_beside_a_real_run_of_the_demo(tmp_path):
    """In a fresh process: the demo model generated at two sizes and projected with this machine's
    rates measured right before and right after each run (their mean: a shared machine's load is
    sampled around the run). Its timings vary with that load, so the bounds are generous (the
    benchmark, scripts/bench_estimate.py, reports the real ratios): the projection must be of the
    right size."""
    script = textwrap.dedent("""
        import json
        from mlx_sora import Pipeline
        from mlx_sora.estimate import load_device, model_spec, project
        from mlx_sora.request import GenerationRequest
        spec, defaults = model_spec("demo")
        pipe = Pipeline.from_pretrained()
        out = []
        for size, frames in (((64, 64), 17), ((96, 96), 17)):
            request = GenerationRequest.build("a red circle moving left", defaults, image_size=size, num_frames=frames)
            tokens = max(pipe.tokenizer(list(request.texts), max_length=pipe.text_length).num_tokens)
            projected = []
            for run in (True, False):  # this machine's rates measured right before and right after the run
                device = load_device("this-machine", remeasure=True)
                projected.append([p.seconds for p in project(spec, request, device, pipe.memory_budget,
                                                             caption_tokens=tokens).phases])
                if run:
                    result = pipe.generate("a red circle moving left", image_size=size, num_frames=frames, seed=0)
            out.append({"measured": [p.seconds for p in result.phases],
                        "projected": [(a + b) / 2 for a, b in zip(*projected)]})
        print(json.dumps(out))
    """)
    from mlx_sora.runtime.blas import fast_blas_env

    env = fast_blas_env()
    env.update(MLX_SORA_BLAS_CHECKED="1", XDG_CACHE_HOME=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                       env.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for case in json.loads(done.stdout.strip().splitlines()[-1]):
        measured, projected = sum(case["measured"]), sum(case["projected"])
        assert 1 / 3 <= projected / measured <= 3, case
        for m, p in zip(case["measured"], case["projected"]):
            assert 1 / 6 <= (p + 0.05) / (m + 0.05) <= 6, case  # (+50 ms: the text phase takes ~0.1 s)
