"""The embedded demo model: it ships with the package, loads through the same loaders as the real
model, and makes videos the judge accepts, from the Python API, the default CLI run and a plain
(non-editable) install used from another directory."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from mlx_sora import Pipeline, generate
from mlx_sora.conversion.loading import read_converted_config
from mlx_sora.conversion.registry import DEMO_MODEL_DIR, resolve_model
from mlx_sora.demo import clips
from mlx_sora.demo.judge import judge
from mlx_sora.request import GenerationRequest

REPO = Path(__file__).resolve().parent.parent

# (caption, seed): two trained combinations and one held-out combination (composition)
PROMPTS = [
    ("a red circle moving left", 0),
    ("a blue square moving up", 1),
    ("a green square moving up", 0),
]


@pytest.fixture(autouse=True)
def _no_blas_restart(monkeypatch):
    monkeypatch.setenv("MLX_SORA_BLAS_CHECKED", "1")  # in-process runs must not exec a new process


@pytest.fixture(scope="module")
def demo_pipeline() -> Pipeline:
    return Pipeline.from_pretrained(None, dtype="float32", keep_loaded=True)


def _read_video(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_demo_model_is_a_converted_model_of_the_real_architecture():
    bundle = resolve_model(None)
    assert bundle.is_demo and set(bundle.components) == {"text_encoder", "stdit3", "vae"}
    families = {name: read_converted_config(folder)["model_type"] for name, folder in bundle.components.items()}
    assert families == {"text_encoder": "t5", "stdit3": "stdit3", "vae": "vae"}
    demo = json.loads((DEMO_MODEL_DIR / "demo.json").read_text())
    assert (bundle.defaults.height, bundle.defaults.width, bundle.defaults.num_frames) == (
        demo["height"], demo["width"], demo["num_frames"])
    size = sum(f.stat().st_size for f in DEMO_MODEL_DIR.rglob("*") if f.is_file())
    assert size < 16e6, f"the demo model is {size / 1e6:.1f} MB: it must stay a few MB"


def test_demo_held_out_combinations_are_not_in_training():
    specs = itertools.islice(clips.training_specs(0, two_object_fraction=0.5), 2000)
    trained = {o.combo for spec, _ in specs for o in spec.objects}
    assert trained.isdisjoint(clips.HELD_OUT) and len(trained) == len(clips.TRAIN_COMBOS)
    assert [clips.parse_caption(p).held_out for p, _ in PROMPTS] == [False, False, True]


@pytest.mark.parametrize("caption, seed", PROMPTS)
def test_demo_generation_passes_the_judge(demo_pipeline, caption, seed):
    result = demo_pipeline.generate(caption, seed=seed)
    video = result.videos[0]
    assert video.shape == (17, 64, 64, 3) and video.dtype == np.uint8
    verdict = judge(video, caption)
    assert verdict.color and verdict.motion, verdict.summary()
    assert result.within_budget


def test_demo_judge_rejects_a_different_caption(demo_pipeline):
    video = demo_pipeline.generate("a green square moving right", seed=0).videos[0]
    assert judge(video, "a green square moving right").color
    wrong = judge(video, "a red square moving left")
    assert not wrong.color and not wrong.motion


def test_demo_untrained_size_is_reported(demo_pipeline):
    request = GenerationRequest.build("a red circle moving left", demo_pipeline.defaults, image_size=(96, 96),
                                      num_frames=9, model_name="the demo model")
    assert any("96x96" in w for w in request.warnings)
    assert any("frames" in w for w in request.warnings)


def test_cli_default_is_the_demo_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert generate.main(["--prompt", "a magenta circle moving right", "--seed", "1"]) == 0
    written = list(tmp_path.glob("*.mp4"))
    assert len(written) == 1
    video = _read_video(written[0])
    assert video.shape == (17, 64, 64, 3)
    assert judge(video, "a magenta circle moving right").color
    assert "peak MLX" in capsys.readouterr().out


def test_plain_install_runs_the_demo_from_any_directory(tmp_path):
    """`pip install .` (not editable): the demo weights travel as package data."""
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target",
         str(target), str(REPO)], capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target), MLX_SORA_BLAS_CHECKED="1")
    where = subprocess.run([sys.executable, "-c", "import mlx_sora; print(mlx_sora.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(target)
    done = subprocess.run([sys.executable, "-m", "mlx_sora.generate", "--prompt", "a cyan square moving down",
                           "--output", "out.mp4", "--quiet"], cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    video = _read_video(work / "out.mp4")
    assert video.shape == (17, 64, 64, 3)
    assert judge(video, "a cyan square moving down").color
