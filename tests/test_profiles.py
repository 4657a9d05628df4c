"""Device profiles: --device-profile iphone15pro sets the On-device Sora setting and reports the budget."""

from __future__ import annotations

import pytest

from mlx_sora import generate
from mlx_sora.runtime.profiles import PROFILES, get_profile


@pytest.fixture(autouse=True)
def _no_blas_restart(monkeypatch):
    monkeypatch.setenv("MLX_SORA_BLAS_CHECKED", "1")


def test_profile_options_and_explicit_options_win():
    args = generate.build_parser().parse_args(["--prompt", "a cat", "--device-profile", "iphone15pro"])
    options = generate._request_options(args)
    assert (options["resolution"], options["aspect_ratio"], options["num_frames"]) == ("256", "1:1", 68)
    assert options["lpl"] == 15 and options["tdtm_steps"] == 15
    args = generate.build_parser().parse_args(["--prompt", "a cat", "--device-profile", "iphone15pro",
                                               "--num-frames", "17", "--tdtm-steps", "0"])
    options = generate._request_options(args)
    assert options["num_frames"] == "17" and options["tdtm_steps"] == 0
    assert get_profile("iphone15pro").memory_budget == "3.3GB" and get_profile("iphone15pro").prefer_quantized


def test_unknown_profile():
    with pytest.raises(ValueError, match="--device-profile 'pixel' is unknown; choose one of iphone15pro"):
        get_profile("pixel")
    assert list(PROFILES) == ["iphone15pro"]


def test_profile_run_reports_the_budget(tiny_model_folder, tmp_path, capsys):
    code = generate.main([
        "--model", str(tiny_model_folder), "--prompt", "a red panda", "--device-profile", "iphone15pro",
        "--num-frames", "17", "--output", str(tmp_path / "p.mp4"),
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "budget 3.07 GiB" in out  # 3.3 GB
    assert "model evaluations 16, leapt at step 15" in out
    assert "within the memory budget 3.07 GiB" in out
    # the iPhone 15 Pro projection of the same request, beside what was measured
    lines = out[out.index("projected on iphone15pro"):].splitlines()
    assert [line.split()[0] for line in lines[1:5]] == ["text", "denoising", "decoding", "total"]
    assert (tmp_path / "p.mp4").exists()
