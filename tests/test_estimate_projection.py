"""Projections: consistent with the request (more work never projects less time), LPL and TDTM as
their definitions say (against the FLOPs of the real model counted while it runs), the planner's
memory, and the real model's projection from its shipped configs alone."""

from __future__ import annotations

from collections import Counter

import mlx.core as mx
import pytest

from mlx_sora.conversion import registry
from mlx_sora.conversion.loading import build_model
from mlx_sora.conversion.registry import GenerationDefaults
from mlx_sora.errors import UserError
from mlx_sora.estimate import load_device, model_spec, project
from mlx_sora.estimate.devices import DeviceModel
from mlx_sora.request import GenerationRequest

# a device for tests: round numbers, every kind of cost present
DEVICE = DeviceModel(
    name="test", description="test", engine="cpu", compute_dtype="float32",
    throughput={"matmul": 1e11, "attention": 2e10, "conv": 5e10, "elementwise": 5e9},
    components={"vae": {"elementwise": 1e10}}, storage_read_rate=1e9, cast_rate=2e9, load_overhead_s=1e-3,
    fixed_s={"unit": 1e-4, "t5.block": 1e-3, "stdit3.block": 2e-3, "stdit3.block_tdtm": 3e-3,
             "vae.res_block": 1e-3, "vae.conv": 1e-3, "phase": 0.05, "sampler.step": 1e-3},
    memory_bytes=16 * 2**30, memory_budget_bytes=8 * 2**30, process_bytes=100 * 2**20)


def _request(defaults=GenerationDefaults(), **options):
    return GenerationRequest.build("a red circle moving left", defaults, **options)


@pytest.fixture(scope="module")
def demo():
    return model_spec("demo")


def test_more_steps_frames_or_pixels_never_project_less_time(demo):
    spec, defaults = demo
    for device in (DEVICE, load_device("iphone15pro")):
        previous = None
        for steps, frames, side in ((10, 17, 64), (20, 17, 64), (30, 17, 64), (30, 34, 64), (30, 51, 64),
                                    (30, 51, 96), (30, 51, 128)):
            projection = project(spec, _request(defaults, steps=steps, num_frames=frames, image_size=(side, side)),
                                 device)
            seconds = [p.seconds for p in projection.phases]
            if previous is not None:
                assert projection.total_seconds >= previous[0]
                assert all(now >= before for now, before in zip(seconds, previous[1]))
            previous = projection.total_seconds, seconds


def _evaluation_flops(folder, frames: int, merge: bool, monkeypatch) -> float:
    """The FLOPs of one STDiT3 evaluation of the demo model at 64x64, counted while it runs."""
    import mlx.nn as nn

    from mlx_sora.conversion.loading import load_model
    from mlx_sora.models import fast_ops
    from mlx_sora.models.units import run_units

    monkeypatch.setenv("MLX_SORA_FAST_OPS", "0")
    flops: Counter = Counter()
    linear, conv3d, attention = nn.Linear.__call__, nn.Conv3d.__call__, fast_ops.attention

    def count_linear(self, x):
        flops["flops"] += 2 * x.size * self.weight.shape[0]
        return linear(self, x)

    def count_conv(self, x):
        out = conv3d(self, x)
        flops["flops"] += 2 * out.size * (self.weight.size // self.weight.shape[0])
        return out

    def count_attention(q, k, v, scale, mask=None):
        flops["flops"] += 4 * q.size * k.shape[-2]
        return attention(q, k, v, scale, mask)

    with monkeypatch.context() as m:
        m.setattr(nn.Linear, "__call__", count_linear)
        m.setattr(nn.Conv3d, "__call__", count_conv)
        m.setattr(fast_ops, "attention", count_attention)
        model = load_model(folder, dtype="float32")
        length = model.config.model_max_length
        inputs = dict(x=mx.zeros((2, 4, frames, 8, 8)), timestep=mx.array([900.0, 900.0]),
                      y=mx.zeros((2, 1, length, model.config.caption_channels)), mask=mx.ones((1, length)),
                      fps=mx.array([8.0]), height=mx.array([64.0]), width=mx.array([64.0]), merge=merge)
        run_units(model.units, inputs)
    return flops["flops"]


@pytest.mark.parametrize("lpl, tdtm", [(None, 0), (14, 0), (None, 10), (14, 10), (5, 30), ("dynamic", 0)])
def test_lpl_and_tdtm_project_the_flops_their_definitions_say(demo, monkeypatch, lpl, tdtm):
    """LPL at step n: n + 1 evaluations; TDTM in the first k steps: those evaluations merged. Against
    the FLOPs of one evaluation of the real model, merged or not, counted while it runs."""
    spec, defaults = demo
    plain = _evaluation_flops(spec.folders["stdit3"], 5, False, monkeypatch)
    merged = _evaluation_flops(spec.folders["stdit3"], 5, True, monkeypatch)
    assert merged < plain
    projection = project(spec, _request(defaults, lpl=lpl, tdtm_steps=tdtm), DEVICE)
    evaluations = {None: 30, 14: 15, 5: 6, "dynamic": 18}[lpl]  # dynamic: the earliest leap (stated)
    merged_evaluations = min(tdtm, evaluations)
    assert projection.evaluations == evaluations and projection.merged_evaluations == merged_evaluations
    denoising = projection.phase("denoising").flops
    assert denoising["matmul"] + denoising["attention"] + denoising["conv"] == pytest.approx(
        merged_evaluations * merged + (evaluations - merged_evaluations) * plain, rel=1e-12)
    if lpl == "dynamic":
        assert any("dynamic LPL leaps at step 17" in a for a in projection.assumptions)


def test_ci_dl_schedules(demo):
    spec, defaults = demo
    request = _request(defaults, num_frames=34)
    ci_dl = project(spec, request, DEVICE)
    sequential = project(spec, request, DEVICE, overlap=False)
    none = project(spec, request, DEVICE, ci_dl=False)
    resident = project(spec, request, DEVICE, memory_budget=None)
    for p in (ci_dl, sequential, none, resident):
        assert [x.key for x in p.phases] == ["text_encoding", "denoising", "decoding"]
    # no CI-DL: every unit loaded for every run, nothing resident, all the load time waited for
    denoise = none.phase("denoising")
    assert denoise.plan.resident == () and not denoise.plan.overlap
    assert all(u.loads == u.runs for u in denoise.timeline.units.values())
    assert denoise.timeline.waited == pytest.approx(denoise.timeline.load_seconds)
    assert none.total_seconds >= sequential.total_seconds >= ci_dl.total_seconds - 1e-9
    # without a budget the whole model loads first (and its peak is the largest)
    assert resident.phase("denoising").timeline.loads == len(build_model(spec.folders["stdit3"]).units)
    assert resident.peak_bytes >= ci_dl.peak_bytes
    # the compute is the same work whatever the schedule
    for key in ("text_encoding", "denoising", "decoding"):
        assert none.phase(key).timeline.compute_seconds == pytest.approx(ci_dl.phase(key).timeline.compute_seconds)


def test_peak_against_the_budget_and_a_budget_too_small(demo):
    spec, defaults = demo
    projection = project(spec, _request(defaults), DEVICE, memory_budget=400 * 2**20)
    assert projection.budget_bytes == 400 * 2**20 and projection.peak_bytes <= projection.budget_bytes
    assert projection.to_dict()["within_budget"] is True
    with pytest.raises(UserError, match="--memory-budget .* is too small"):
        project(spec, _request(defaults), DEVICE, memory_budget=120 * 2**20)


def test_real_model_from_its_shipped_configs_alone(monkeypatch):
    monkeypatch.setattr(registry, "prepare_preset", lambda *a, **k: pytest.fail("the projection downloaded"))
    spec, defaults = model_spec("opensora-v1.2")
    assert spec.from_configs and defaults == GenerationDefaults()
    request = GenerationRequest.build("a red panda", defaults, image_size=(256, 256), num_frames=68, lpl=15,
                                      tdtm_steps=15)
    projection = project(spec, request, load_device("iphone15pro"))
    summary = projection.to_dict()
    assert summary["budget_bytes"] == 3_300_000_000 and summary["peak_bytes"] <= 3_300_000_000
    assert set(summary["phases"]) == {"text_encoding", "denoising", "decoding"}
    assert summary["total_seconds"] == pytest.approx(sum(p["seconds"] for p in summary["phases"].values()))
    # T5-XXL from its configs: 4.76 B parameters, bfloat16 on disk
    text = projection.phase("text_encoding")
    assert text.read_bytes == pytest.approx(2 * 4.76e9, rel=0.01)
    assert "projection on iphone15pro" in projection.summary()
