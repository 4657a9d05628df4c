"""The text-to-video pipeline on a tiny random model: shapes, phases, reports, seeds, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_sora import Pipeline
from mlx_sora.conversion.registry import find_components
from mlx_sora.io.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def pipe(tiny_model_folder):
    return Pipeline.from_pretrained(tiny_model_folder, dtype="float32")


def test_generate_video_and_report(pipe):
    result = pipe.generate("a red panda eating bamboo", resolution="144p", aspect_ratio="4:3",
                           num_frames=17, steps=3, seed=1)
    assert len(result.videos) == 1
    video = result.videos[0]
    # as the reference: the decoded size is 8 x the latent size (221 x 165 -> 27 x 20 latents)
    assert video.dtype == np.uint8 and video.shape == (17, 216, 160, 3)
    assert result.latent_shape == (1, 4, 5, 27, 20)
    assert result.prompts == ["a red panda eating bamboo aesthetic score: 6.5."]
    assert [p.name for p in result.phases] == ["text encoding", "denoising", "decoding"]
    assert all(p.seconds > 0 and p.peak_memory > 0 and p.max_rss > 0 for p in result.phases)
    assert result.sampling.evaluations == 3
    assert "denoising" in result.summary()


def test_seeds_lpl_and_batches(pipe):
    results = pipe.generate(["a cat", "waves at sunset"], resolution="144p", aspect_ratio="1:1",
                            num_frames=1, steps=4, seed=[3, 4], lpl=1, tdtm_steps=2)
    assert [r.seed for r in results] == [3, 4]
    for r in results:
        assert len(r.videos) == 2 and r.videos[0].shape == (1, 192, 192, 3)
        assert r.sampling.evaluations == 2 and r.sampling.leap_step == 1
    assert not np.array_equal(results[0].videos[0], results[1].videos[0])
    again = pipe.generate(["a cat", "waves at sunset"], resolution="144p", aspect_ratio="1:1",
                          num_frames=1, steps=4, seed=3, lpl=1, tdtm_steps=2)
    np.testing.assert_array_equal(again.videos[1], results[0].videos[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"resolution": "999p"}, "is unknown"),
        ({"aspect_ratio": "2:1"}, "is not a 240p bucket"),
        ({"num_frames": 0}, "at least 1"),
        ({"num_frames": "3 seconds"}, "preset"),
        ({"steps": 0}, "steps"),
        ({"lpl": 40}, "leap step"),
        ({"lpl": "sometimes"}, "lpl"),
        ({"fps": 0}, "fps"),
    ],
)
def test_bad_input_is_rejected_before_work(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.generate("a cat", **kwargs)


def test_empty_prompt(pipe):
    with pytest.raises(ValueError, match="empty"):
        pipe.generate("   ")


def test_long_prompt_warns_and_truncates(pipe):
    with pytest.warns(UserWarning, match="truncated"):
        result = pipe.generate("a cat " * 400, resolution="144p", aspect_ratio="1:1", num_frames=1, steps=1)
    assert result.videos[0].shape == (1, 192, 192, 3)


def test_incomplete_model_folder(tmp_path, tiny_model_folder):
    with pytest.raises(CheckpointError, match="does not exist"):
        find_components(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="lacks converted text_encoder, stdit3, vae"):
        find_components(tmp_path)


def test_preset_download_failure_names_the_command(tmp_path, monkeypatch):
    from mlx_sora.conversion.registry import prepare_preset

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here: the download fails at once
    with pytest.raises(CheckpointError) as info:
        prepare_preset("opensora-v1.2", weights_dir=tmp_path)
    message = str(info.value)
    assert "DeepFloyd/t5-v1_1-xxl" in message
    assert "python -m mlx_sora.convert --hf-path DeepFloyd/t5-v1_1-xxl" in message
    assert not (tmp_path / "opensora-v1.2" / "text_encoder").exists()


def test_unknown_preset_or_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Pipeline.from_pretrained(tmp_path / "opensora-v9")
