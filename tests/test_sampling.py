"""Rectified-flow sampler, LPL and the TDTM schedule against the Open-Sora 1.2 / On-device Sora fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tolerances import f32

from mlx_sora.sampling import (
    DynamicLeap,
    FixedLeap,
    SamplerConfig,
    sample,
    sampling_timesteps,
)

FIXTURES = Path(__file__).parent / "fixtures" / "opensora12"


def _timestep_settings():
    return json.loads((FIXTURES / "rflow_timesteps.json").read_text())["settings"]


@pytest.mark.parametrize("setting", _timestep_settings(), ids=lambda s: s["key"])
def test_timesteps_match_reference(setting):
    dtype = {"float32": mx.float32, "bfloat16": mx.bfloat16}[setting["additional_args_dtype"]]
    h, w = setting["image_size_hw"]
    args = [mx.array([v], dtype=dtype) for v in (h, w, setting["num_frames"])]
    timesteps = sampling_timesteps(
        30, 1, *args, use_discrete_timesteps=setting["use_discrete_timesteps"]
    )
    got = np.array([t[0].item() for t in timesteps])
    ref = np.array(setting["timesteps"])
    assert np.abs(got - ref).max() <= 1e-3, (got - ref)
    assert all(t.dtype == mx.float32 for t in timesteps)


def test_config_validation():
    with pytest.raises(ValueError, match="leap step"):
        SamplerConfig(num_steps=30, leap=FixedLeap(30))
    with pytest.raises(ValueError, match="steps"):
        SamplerConfig(num_steps=0)
    with pytest.raises(ValueError, match="similarity"):
        DynamicLeap(similarity="cosine")


# ---------------------------------------------------------------- full runs with the tiny STDiT3


def _load(name: str) -> dict[str, mx.array]:
    return mx.load(str(FIXTURES / name))


@pytest.fixture(scope="module")
def tiny_stdit(tmp_path_factory):
    from mlx_sora import convert, load_model

    folder = convert(FIXTURES / "stdit3_checkpoint", tmp_path_factory.mktemp("stdit3") / "m")
    return load_model(folder)


def _run(model, data: dict, batch: slice, config: SamplerConfig, dtype=mx.float32, prefix: str = ""):
    z0 = data["z0"][batch]
    b = z0.shape[0]
    y = mx.concatenate([data["y"][batch], model.null_caption(b)], axis=0).astype(dtype)
    cond = {k: data[k][batch].astype(dtype) for k in ("fps", "height", "width")}
    frames = data["num_frames"][batch].astype(dtype)
    text_mask = data["text_mask"][batch]
    timesteps = sampling_timesteps(
        config.num_steps, b, cond["height"], cond["width"], frames,
        use_discrete_timesteps=config.use_discrete_timesteps,
    )

    def denoise(z_in, t_in, merge):
        return model(z_in.astype(dtype), t_in, y, mask=text_mask, merge=merge, **cond)

    return sample(denoise, z0, timesteps, config)


def _close(got: mx.array, ref: mx.array, rel: float = 1e-3) -> float:
    """max abs error relative to max(1, max|ref|), the fixtures' tolerance for sampled latents (float32;
    10x on a GPU, tests/tolerances.py)."""
    err = mx.abs(got.astype(mx.float32) - ref).max().item() / max(1.0, mx.abs(ref).max().item())
    assert err <= f32(rel), err
    return err


@pytest.mark.gpu
@pytest.mark.sampling
def test_full_30_step_sample_matches_reference(tiny_stdit):
    data = _load("rflow_sample.safetensors")
    z, report = _run(tiny_stdit, data, slice(None), SamplerConfig())
    assert report.evaluations == 30 and report.leap_step is None
    _close(z, data["z_final"])


@pytest.mark.gpu
@pytest.mark.sampling
def test_intermediate_states_match_reference(tiny_stdit):
    data = _load("rflow_sample.safetensors")
    states = {}
    from mlx_sora.sampling import iterate_sampling

    b = 2
    y = mx.concatenate([data["y"], tiny_stdit.null_caption(b)], axis=0)
    cond = {k: data[k] for k in ("fps", "height", "width")}
    timesteps = sampling_timesteps(30, b, data["height"], data["width"], data["num_frames"])
    np.testing.assert_allclose(np.array([t[0].item() for t in timesteps]), np.array(data["timesteps"]), atol=1e-3)
    captured = {}

    def denoise(z_in, t_in, merge):
        out = tiny_stdit(z_in, t_in, y, mask=data["text_mask"], **cond)
        pred = out[:, :4]
        cond_v, uncond_v = mx.split(pred, 2, axis=0)
        captured[len(captured)] = uncond_v + 7.0 * (cond_v - uncond_v)
        return out

    for z, info in iterate_sampling(denoise, data["z0"], timesteps, SamplerConfig()):
        states[info.index + 1] = z
    rel = lambda a, r: mx.abs(a - r).max().item() / mx.abs(r).max().item()  # noqa: E731
    assert rel(captured[0], data["v_pred_step0"]) <= f32(1e-5)
    assert rel(states[1], data["z_step1"]) <= f32(1e-5)
    _close(states[15], data["z_step15"])
    _close(captured[15], data["v_pred_step15"])


@pytest.mark.gpu
@pytest.mark.sampling
def test_bf16_sample_within_documented_tolerance(tmp_path):
    from mlx_sora import convert, load_model

    model = load_model(convert(FIXTURES / "stdit3_checkpoint", tmp_path / "m"), dtype=mx.bfloat16)
    data = _load("rflow_sample.safetensors")
    z, _ = _run(model, data, slice(None), SamplerConfig(), dtype=mx.bfloat16)
    # the reference's own bf16 run differs from fp32 by 0.576 (z max 11.5); allow 1.5x that
    assert mx.abs(z - data["z_final"]).max().item() <= 1.5 * 0.576


LPL_RUNS = {
    "noleap_continuous": SamplerConfig(),
    "noleap_discrete": SamplerConfig(use_discrete_timesteps=True),
    "fixed15_continuous": SamplerConfig(leap=FixedLeap(15)),
    "fixed15_discrete": SamplerConfig(leap=FixedLeap(15), use_discrete_timesteps=True),
    "dynamic_continuous": SamplerConfig(leap=DynamicLeap()),
    "dynamic_discrete": SamplerConfig(leap=DynamicLeap(), use_discrete_timesteps=True),
    "fixed15_discrete_tdtm10": SamplerConfig(leap=FixedLeap(15), use_discrete_timesteps=True, tdtm_steps=10),
}


@pytest.mark.gpu
@pytest.mark.sampling
@pytest.mark.parametrize("run", list(LPL_RUNS))
def test_lpl_matches_on_device_sora(tiny_stdit, run):
    data = _load("rflow_sample.safetensors")
    lpl = _load("rflow_lpl.safetensors")
    meta = json.loads((FIXTURES / "rflow_lpl_meta.json").read_text())["runs"][run]
    z, report = _run(tiny_stdit, data, slice(0, 1), LPL_RUNS[run])
    assert report.evaluations == meta["n_model_evals"]
    assert report.leap_step == meta["leap_at_step"]
    np.testing.assert_allclose([s.timestep for s in report.steps], meta["timesteps_used"], atol=1e-3)
    if meta["cos_log"]:
        for info, logged in zip(report.steps, meta["cos_log"]):
            if logged["cos_mean"] is None:
                assert info.cosine is None
            else:
                assert abs(info.cosine - logged["cos_mean"]) <= f32(1e-4)
    _close(z, lpl[f"{run}.z"])


@pytest.mark.gpu
@pytest.mark.sampling
def test_fixed_leap_runs_batches(tiny_stdit):
    """The reference LPL sampler only runs batch 1; ours leaps a whole batch (fixture: the formula
    z_step15 + v15 * t15 / 1000 on the batch-2 reference trajectory)."""
    data = _load("rflow_sample.safetensors")
    z, report = _run(tiny_stdit, data, slice(None), SamplerConfig(leap=FixedLeap(15)))
    assert report.evaluations == 16 and report.leap_step == 15
    _close(z, data["z_fixed_leap15_formula"])


@pytest.mark.gpu
@pytest.mark.sampling
def test_dynamic_leap_runs_batches(tiny_stdit):
    """Batch 2 with the reference rule (decided on sample 0) leaps where the batch-1 run does, and
    sample 0 equals the batch-1 result."""
    data = _load("rflow_sample.safetensors")
    lpl = _load("rflow_lpl.safetensors")
    z, report = _run(tiny_stdit, data, slice(None), SamplerConfig(leap=DynamicLeap()))
    assert report.evaluations == 18 and report.leap_step == 17
    _close(z[:1], lpl["dynamic_continuous.z"])


def test_short_clips_get_finite_timesteps():
    """Deliberate deviation: the reference's transform is 0/0 for 2..16 frames; we use ratio_time 1."""
    args = [mx.array([v], dtype=mx.float32) for v in (144, 256)]
    short = sampling_timesteps(30, 1, *args, mx.array([9.0]))
    image = sampling_timesteps(30, 1, *args, mx.array([1.0]))
    assert all(mx.isfinite(t).all().item() for t in short)
    np.testing.assert_array_equal(np.array(short), np.array(image))


def test_whole_latent_similarity_variant(tiny_stdit):
    """The optional whole-latent rule follows the same patience logic on the full guided velocity."""
    data = _load("rflow_sample.safetensors")
    z, report = _run(tiny_stdit, data, slice(None), SamplerConfig(leap=DynamicLeap(similarity="whole")))
    cosines = [s.cosine for s in report.steps]
    assert all(c is None for c in cosines[:14]) and all(-1 <= c <= 1 for c in cosines[14:])
    assert report.leap_step is not None and report.evaluations == report.leap_step + 1
    # replay the rule on the logged similarities: the leap fires exactly when the patience runs out
    best, patience = 0.0, 3
    for step, cos in enumerate(cosines[14:], start=14):
        if cos > best + 1e-3:
            best, patience = cos, 3
        else:
            patience -= 1
        assert (patience == 0) == (step == report.leap_step)
        if patience == 0:
            break
    assert mx.isfinite(z).all().item()


# ---------------------------------------------------------------- reference conditioning (frame mask)


def test_sampling_with_a_reference_matches_reference_at_every_step(tiny_stdit):
    """RFLOW.sample with a frame mask (conditioning fixture, 10 steps): z and x_mask entering the
    model at every step, frames re-noised once t falls to their edit ratio, the final latent."""
    from mlx_sora.sampling import iterate_sampling

    data = _load("conditioning.safetensors")
    meta = json.loads((FIXTURES / "conditioning_meta.json").read_text())["sampler"]
    b = 2
    y = mx.concatenate([data["sampler.y"], tiny_stdit.null_caption(b)], axis=0)
    text_mask = data["sampler.text_mask"].astype(mx.int32)
    h, w = meta["image_size"]
    cond = dict(fps=mx.array([meta["fps"]] * b, dtype=mx.float32), height=mx.array([h] * b, dtype=mx.float32),
                width=mx.array([w] * b, dtype=mx.float32))
    timesteps = sampling_timesteps(meta["steps"], b, cond["height"], cond["width"],
                                   mx.array([meta["num_frames"]] * b, dtype=mx.float32))
    seen = []

    def denoise(z_in, t_in, merge, x_mask=None):
        seen.append((z_in[:b], t_in[:b], x_mask[:b]))
        return tiny_stdit(z_in, t_in, y, mask=text_mask, x_mask=x_mask, **cond)

    config = SamplerConfig(num_steps=meta["steps"], cfg_scale=meta["cfg_scale"])
    for z, _ in iterate_sampling(denoise, data["sampler.z_conditioned"], timesteps, config,
                                 mask=data["sampler.mask"], noise=lambda i: data["sampler.noise"][i]):
        pass
    assert len(seen) == meta["steps"]
    for i, (z_in, t_in, x_mask) in enumerate(seen):
        np.testing.assert_array_equal(np.array(x_mask), np.array(data["sampler.x_mask"][i]), err_msg=f"step {i}")
        assert mx.abs(t_in - data["sampler.t"][i]).max().item() <= 1e-3
        _close(z_in, data["sampler.z_in"][i])
    assert not np.array(data["sampler.x_mask"]).all(axis=(1, 2)).any()  # reference frames at every step
    assert len({tuple(np.array(m).ravel()) for m in data["sampler.x_mask"]}) > 1  # frames join as t falls
    _close(z, data["sampler.z_final"])
    # reference frames with edit ratio 0 are never touched
    mask = np.array(data["sampler.mask"])
    kept = np.moveaxis(np.array(z), 2, 1)[mask == 0]
    np.testing.assert_array_equal(kept, np.moveaxis(np.array(data["sampler.z_conditioned"]), 2, 1)[mask == 0])


def test_an_all_ones_mask_is_the_plain_sampler(tiny_stdit):
    """The reference always passes a mask; all ones (no strategy) must give the unconditioned sample."""
    data = _load("rflow_sample.safetensors")
    config = SamplerConfig(num_steps=4)
    plain, _ = _run(tiny_stdit, data, slice(None), config)
    b = 2
    y = mx.concatenate([data["y"], tiny_stdit.null_caption(b)], axis=0)
    cond = {k: data[k] for k in ("fps", "height", "width")}
    timesteps = sampling_timesteps(4, b, cond["height"], cond["width"], data["num_frames"])

    def denoise(z_in, t_in, merge, x_mask=None):
        return tiny_stdit(z_in, t_in, y, mask=data["text_mask"], x_mask=x_mask, merge=merge, **cond)

    masked, _ = sample(denoise, data["z0"], timesteps, config, mask=mx.ones((b, data["z0"].shape[2])))
    np.testing.assert_array_equal(np.array(masked), np.array(plain))
