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


@pytest.mark.gpu
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
    assert all(p.seconds > 0 and p.peak_memory > 0 and p.process_peak > 0 for p in result.phases)
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


def _plan_signature(plans) -> list[tuple]:
    """What a plan decides: the units resident and streamed, the VAE settings, the layer chunks."""
    return [(p.component, p.plan.resident, p.plan.streamed, p.plan.overlap, p.micro_batch, p.tiling, p.chunk_bytes)
            for p in plans]


@pytest.mark.gpu
def test_a_second_generate_plans_as_the_first(tiny_model_folder):
    """Planning starts from what the process holds now, not from its peak (on macOS the old code
    planned from ru_maxrss, the previous run's peak): after a run, and after 512 MiB were held and
    freed, the same units are resident and streamed, and each expected peak moves only by what the
    process itself now holds more (compiled kernels, Python objects: a few MiB)."""
    import mlx.core as mx

    from mlx_sora.request import GenerationRequest
    from mlx_sora.runtime import memory

    pipe = Pipeline.from_pretrained(tiny_model_folder, dtype="float32", memory_budget="8GB")
    request = GenerationRequest.build("a cat", pipe.defaults, resolution="144p", aspect_ratio="1:1",
                                      num_frames=17, steps=2, seed=1)
    first = pipe.plan(request)
    pipe.run(request)
    x = mx.ones((128, 1024, 1024))  # 512 MiB: the peak rises far above what the process holds after
    mx.eval(x)
    del x
    memory.release_reusable_memory()  # (the heap's on Linux, MLX's buffer cache on Metal)
    assert memory.peak_process_memory() - memory.process_memory() > 400 * 2**20
    second = pipe.plan(request)
    assert _plan_signature(second) == _plan_signature(first)
    for a, b in zip(first, second):
        assert b.plan.expected_peak - b.plan.baseline == a.plan.expected_peak - a.plan.baseline
        assert abs(b.plan.baseline - a.plan.baseline) < 32 * 2**20, (a.plan.baseline, b.plan.baseline)


def test_a_second_generate_plans_exactly_as_the_first_with_the_macos_measure(tiny_model_folder, monkeypatch):
    """The same with macOS's readers (the OS calls substituted, tests/test_memory.py): the footprint
    held between runs is the same, the lifetime peak has risen to 7.9 GB of an 8 GB budget; the
    second plan is the first, expected peaks included (planning from the peak would refuse it)."""
    from test_memory import FakeLibSystem

    from mlx_sora.request import GenerationRequest
    from mlx_sora.runtime import memory
    from mlx_sora.runtime.streaming import MemoryBudgetError

    libc = FakeLibSystem(footprint=300 * 2**20, lifetime_max=300 * 2**20, pages={"free_count": 10**6})
    monkeypatch.setattr(memory, "os_memory", lambda: memory.memory_for("darwin", libc=libc))
    pipe = Pipeline.from_pretrained(tiny_model_folder, dtype="float32", memory_budget="8GB")
    request = GenerationRequest.build("a cat", pipe.defaults, resolution="144p", aspect_ratio="1:1",
                                      num_frames=17, steps=2, seed=1)
    first = pipe.plan(request)
    result = pipe.run(request)[0]
    assert result.process_peak_name == "peak footprint" and "process peak footprint" in result.summary()
    libc.lifetime_max = 7_900_000_000
    second = pipe.plan(request)
    assert _plan_signature(second) == _plan_signature(first)
    assert [p.plan.expected_peak for p in second] == [p.plan.expected_peak for p in first]
    pipe.planner.baseline = memory.peak_process_memory  # what the old code did on macOS
    with pytest.raises(MemoryBudgetError):
        pipe.plan(request)
