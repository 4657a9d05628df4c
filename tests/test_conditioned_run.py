"""A whole loop of 2 with an image reference, through the pipeline, against scripts/inference.py's
main loop run with the real Open-Sora 1.2 code (conditioning fixture, tiny STDiT3 and VAE)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_sora import convert
from mlx_sora.conditioned_run import join_loops

FIXTURES = Path(__file__).parent / "fixtures" / "opensora12"


@pytest.fixture(scope="module")
def fixture_pipeline(tmp_path_factory, tiny_model_folder):
    from mlx_sora.pipeline import Pipeline

    root = tmp_path_factory.mktemp("cond")
    stdit = convert(FIXTURES / "stdit3_checkpoint", root / "stdit3")
    components = {"text_encoder": tiny_model_folder / "text_encoder", "stdit3": stdit,
                  "vae": tiny_model_folder / "vae"}
    return Pipeline(components, dtype="float32", memory_budget=None)


def test_loop_of_two_matches_reference(fixture_pipeline, monkeypatch):
    data = mx.load(str(FIXTURES / "conditioning.safetensors"))
    meta = json.loads((FIXTURES / "conditioning_meta.json").read_text())["loop"]
    pipe = fixture_pipeline
    y, text_mask = data["sampler.y"], data["sampler.text_mask"].astype(mx.int32)
    monkeypatch.setattr(pipe, "encode_text", lambda texts, phase, report, progress=False: (y, text_mask))
    monkeypatch.setattr(pipe, "initial_noise", lambda batch, request, seed: data["loop.0.z_noise"])
    latents, masks = [], []
    run_units_denoise = pipe._denoise

    def recording_denoise(model, weights, result, y_, mask_, request, progress, z=None, mask=None, noise=None):
        masks.append(mask)
        out = run_units_denoise(model, weights, result, y_, mask_, request, progress, z, mask, noise)
        latents.append((z, out))
        return out

    monkeypatch.setattr(pipe, "_denoise", recording_denoise)
    h, w = meta["image_size"]
    result = pipe.generate(meta["prompts"], references=[str(FIXTURES / meta["reference_path"][0]), ""],
                           mask_strategy=meta["mask_strategy"], loop=meta["loop"],
                           condition_frame_length=meta["condition_frame_length"],
                           condition_frame_edit=meta["condition_frame_edit"], image_size=(h, w),
                           num_frames=meta["num_frames"], fps=meta["fps"], steps=meta["steps"],
                           cfg_scale=meta["cfg_scale"], seed=1024, aes=None)
    assert [p.name for p in result.phases] == ["text encoding", "reference encoding", "denoising (loop 0)",
                                                "decoding (loop 0)", "clip encoding (loop 1)", "denoising (loop 1)",
                                                "decoding (loop 1)"]
    for loop in range(2):
        np.testing.assert_array_equal(np.array(masks[loop]), np.array(data[f"loop.{loop}.mask"]))
        z_cond, latent = latents[loop]
        ref_z, ref_latent = data[f"loop.{loop}.z_conditioned"], data[f"loop.{loop}.latent"]
        scale = max(1.0, mx.abs(ref_z).max().item())
        assert mx.abs(z_cond - ref_z).max().item() <= 1e-4 * scale, loop  # reference latents written in
        err = mx.abs(latent - ref_latent).max().item() / max(1.0, mx.abs(ref_latent).max().item())
        assert err <= 1e-3, (loop, err)
    assert result.loops == 2
    for i in range(2):
        video = result.videos[i]
        assert video.shape == (51, h, w, 3)
        ref = np.array(data[f"loop.saved{i}"])
        expected = ((np.clip(ref, -1, 1) + 1) / 2 * 255 + 0.5).clip(0, 255).astype(np.uint8).transpose(1, 2, 3, 0)
        assert np.abs(video.astype(int) - expected).max() <= 1, i  # uint8 rounding of float differences


def test_join_loops_drops_the_condition_frames():
    clips = [np.zeros((1, 3, 34, 2, 2)), np.ones((1, 3, 34, 2, 2)), 2 * np.ones((1, 3, 34, 2, 2))]
    joined = join_loops(clips, 5)
    assert joined.shape[2] == 34 + 17 + 17
    assert (joined[:, :, 34:51] == 1).all() and (joined[:, :, 51:] == 2).all()


def test_streamed_encoder_is_bit_identical_to_resident(tiny_model_folder):
    """The VAE encoder units run with the CI-DL weight policy (planned phases 'reference encoding',
    'clip encoding'): streamed within a budget, the result equals the resident run bit for bit."""
    from mlx_sora.pipeline import Pipeline

    image = str(FIXTURES / "conditioning_image.png")
    runs = {}
    for budget in (None, "2GB"):
        pipe = Pipeline.from_pretrained(tiny_model_folder, dtype="float32", memory_budget=budget)
        runs[budget] = pipe.generate("a red panda eating bamboo", references=[image], mask_strategy="0", loop=2,
                                     condition_frame_length=5, image_size=(24, 32), num_frames=34, steps=2, seed=3)
    resident, streamed = runs[None], runs["2GB"]
    np.testing.assert_array_equal(resident.videos[0], streamed.videos[0])
    phases = {p.name: p for p in streamed.phases}
    assert phases["reference encoding"].loads == 2 and phases["clip encoding (loop 1)"].loads == 2
    plans = {p.phase: p for p in streamed.plans}
    assert set(plans["reference encoding"].streamed) | set(plans["reference encoding"].resident) == {
        "spatial_encoder", "temporal_encoder"}
    assert "clip encoding" in plans and resident.phases[1].loads == 0
