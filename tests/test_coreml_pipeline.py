"""The demo model's video from its exported units (replayed) against the MLX pipeline's video: same
prompt, seed and settings. float32 export: PSNR >= 45 dB; float16: >= 30 dB and the judge's verdicts
unchanged. Plus the CI-DL loader of the Core ML pipeline, and its request checks."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("coremltools")

from mlx_sora import Pipeline  # noqa: E402
from mlx_sora.coreml.manifest import read_manifest  # noqa: E402
from mlx_sora.coreml.pipeline import CoreMLPipeline, ReplayBackend, UnitLoader, run_chain  # noqa: E402
from mlx_sora.coreml.toolkit import can_predict  # noqa: E402
from mlx_sora.demo.judge import judge  # noqa: E402
from mlx_sora.errors import UserError  # noqa: E402

PROMPTS = ("a red circle moving left", "a yellow triangle moving down")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


@pytest.fixture(scope="module")
def mlx_pipeline():
    return Pipeline.from_pretrained(dtype="float32", memory_budget=None)


def test_float32_export_makes_the_mlx_video(demo_export_fp32, mlx_pipeline):
    options = dict(seed=3, lpl=15, tdtm_steps=15)  # the On-device Sora setting: leap and TDTM functions too
    ours = Pipeline.from_coreml(demo_export_fp32, backend="replay").generate(PROMPTS[0], **options)
    want = mlx_pipeline.generate(PROMPTS[0], **options)
    assert ours.sampling.evaluations == want.sampling.evaluations == 16
    latent = np.array(want.latent)
    assert np.abs(np.array(ours.latent) - latent).max() <= 1e-4 * np.abs(latent).max()
    assert psnr(ours.videos[0], want.videos[0]) >= 45.0
    assert [p.name for p in ours.phases] == ["text encoding", "denoising", "decoding"]
    assert all(p.seconds > 0 and p.process_peak > 0 for p in ours.phases)


def test_float16_export_keeps_the_video_and_the_judges_verdicts(demo_export_fp16, mlx_pipeline):
    pipe = Pipeline.from_coreml(demo_export_fp16, backend="replay")
    for prompt in PROMPTS:
        ours, want = pipe.generate(prompt, seed=0, lpl=15), mlx_pipeline.generate(prompt, seed=0, lpl=15)
        assert psnr(ours.videos[0], want.videos[0]) >= 30.0, prompt
        verdict, expected = judge(ours.videos[0], prompt), judge(want.videos[0], prompt)
        for attribute in ("color", "motion", "shape", "consistent"):
            assert getattr(verdict, attribute) == getattr(expected, attribute), (prompt, attribute)


def test_streamed_units_give_the_resident_numbers(demo_export_fp32):
    """Every unit read before it runs and released after, the next one loading ahead on the loader's
    thread: the same text embedding as with every unit resident, one load per run."""
    manifest = read_manifest(demo_export_fp32)
    backend = ReplayBackend()
    chain = [("text_encoding", u["name"], "main") for u in manifest.units("text_encoding")]
    ids = np.zeros((1, 20), np.int32)
    ids[0, :4] = [5, 9, 12, 1]
    mask = (ids > 0).astype(np.int32)
    results = {}
    for name, resident in (("streamed", set()), ("resident", {u[1] for u in chain})):
        loader = UnitLoader(backend, manifest, resident)
        try:
            for _ in range(2):
                out = run_chain(chain, {"input_ids": ids, "attention_mask": mask}, backend, loader, chain)
        finally:
            loader.close()
        results[name] = (out["text_embedding"], loader.stats.loads)
    np.testing.assert_array_equal(results["streamed"][0], results["resident"][0])
    assert results["resident"][1] == len(chain)
    assert results["streamed"][1] >= 2 * len(chain)


def test_requests_are_checked_against_the_export(demo_export_fp32):
    pipe = CoreMLPipeline(demo_export_fp32, backend="replay")
    with pytest.raises(UserError, match="exported for 64x64x17"):
        pipe.request("a red circle moving left", image_size=(128, 128))
    with pytest.raises(UserError, match="--steps"):
        pipe.request("a red circle moving left", steps=0)
    with pytest.raises(UserError, match="'plan'"):
        CoreMLPipeline(demo_export_fp32, backend="replay", memory_budget="3GB")
    if not can_predict():
        with pytest.raises(UserError, match="only on macOS"):
            CoreMLPipeline(demo_export_fp32, backend="coreml")


@pytest.mark.skipif(not can_predict(), reason="Core ML predict runs only on macOS")
def test_predict_equals_the_replay_on_macos(demo_export_fp32):  # pragma: no cover - macOS only, unrun in CI
    manifest = read_manifest(demo_export_fp32)
    units = manifest.units("denoising")
    replay = CoreMLPipeline(demo_export_fp32, backend="replay")
    coreml = CoreMLPipeline(demo_export_fp32, backend="coreml", compute_units="cpu_only")
    rng = np.random.default_rng(0)
    for unit in units:
        for function, spec in unit["functions"].items():
            inputs = {i["name"]: (rng.integers(0, 2, i["shape"]) if i["dtype"] == "int32" else
                                  rng.standard_normal(i["shape"])).astype(i["dtype"]) for i in spec["inputs"]}
            want = replay.backend.run(replay.backend.load(manifest.package(unit), function), function, inputs)
            got = coreml.backend.run(coreml.backend.load(manifest.package(unit), function), function, inputs)
            for name, value in want.items():
                assert np.abs(got[name] - value).max() <= 1e-4 * max(np.abs(value).max(), 1.0), (unit["name"], name)
