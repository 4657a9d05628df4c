"""The projected CI-DL timeline: the clock worked out by hand for small schedules, and the load
order against what ``StreamingWeights`` really issues when it runs a model."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

import mlx_sora
from mlx_sora.estimate.timeline import Compute, Materialize, Run, simulate
from mlx_sora.models import family_for_type
from mlx_sora.models.units import run_units
from mlx_sora.runtime.streaming import PhasePlan, StreamingWeights, plan_phase, unit_sizes


def _plan(streamed: tuple[str, ...], resident: tuple[str, ...] = (), overlap: bool = True) -> PhasePlan:
    return PhasePlan("test", 10**12, 0, 0, resident, streamed, overlap)


def test_sequential_streaming_adds_every_load_to_the_clock():
    run = Run((("a", 2.0), ("b", 3.0), ("c", 1.0)))
    timeline = simulate(_plan(("a", "b", "c"), overlap=False), [run, run], {"a": 1.0, "b": 4.0, "c": 0.5})
    assert timeline.seconds == pytest.approx(2 * (1 + 2 + 4 + 3 + 0.5 + 1))
    assert timeline.waited == pytest.approx(2 * 5.5) and timeline.loads == 6


def test_overlap_hides_a_load_behind_the_computation_before_it():
    # a loads (1, waited), then b loads during a's 2 s (4 s: 2 s waited), c during b's 3 s (hidden)
    run = Run((("a", 2.0), ("b", 3.0), ("c", 1.0)))
    timeline = simulate(_plan(("a", "b", "c")), [run], {"a": 1.0, "b": 4.0, "c": 0.5})
    assert timeline.seconds == pytest.approx(1 + 2 + 2 + 3 + 1)
    assert {n: u.waited for n, u in timeline.units.items()} == pytest.approx({"a": 1.0, "b": 2.0, "c": 0.0})
    # a second run of the chain starts with a wait: a is not prefetched outside the denoising loop
    assert simulate(_plan(("a", "b", "c")), [run, run], {"a": 1.0, "b": 4.0, "c": 0.5}).units["a"].waited == 2.0


def test_computation_beside_a_load_is_slowed_by_the_devices_factor():
    # b loads (4 s) during a's compute: a's 2 s of work at half speed take 4 s, b then waits 0;
    # c loads (1 s) during b: b's first second runs at half speed (0.5 s of work), its 2.5 s rest alone
    run = Run((("a", 2.0), ("b", 3.0), ("c", 1.0)))
    timeline = simulate(_plan(("a", "b", "c")), [run], {"a": 1.0, "b": 4.0, "c": 1.0}, overlap_slowdown=2.0)
    assert {n: u.compute_seconds for n, u in timeline.units.items()} == pytest.approx({"a": 4.0, "b": 3.5, "c": 1.0})
    assert timeline.seconds == pytest.approx(1 + 4 + 3.5 + 1) and timeline.waited == pytest.approx(1.0)


def test_denoising_prefetches_the_next_step_and_resident_units_load_once():
    # e resident, a and b streamed; cyclic: b's turn prefetches a for the next step
    run = Run((("e", 1.0), ("a", 2.0), ("b", 2.0)))
    steps = [Materialize("e"), run, Compute(0.5), run]
    timeline = simulate(_plan(("a", "b"), ("e",)), steps, {"e": 3.0, "a": 1.0, "b": 1.0}, cyclic=True)
    # e: 3 s waited; a loads during e (1 s, hidden); b during a; a again during b; b during a; and, as
    # the runtime does, a once more during the last b (for a step that does not come)
    assert timeline.issued == ["e", "a", "b", "a", "b", "a"]
    assert timeline.units["e"].loads == 1 and timeline.units["a"].loads == 3
    assert timeline.waited == pytest.approx(3.0)
    assert timeline.seconds == pytest.approx(3 + 2 * (1 + 2 + 2) + 0.5)


def test_no_budget_loads_the_whole_model_first():
    run = Run((("a", 2.0), ("b", 3.0)))
    timeline = simulate(PhasePlan("t", None, 0, 0, ("a", "b"), (), False), [run, run], {"a": 1.0, "b": 4.0, "x": 2.0},
                        up_front=["a", "b", "x"])
    assert timeline.seconds == pytest.approx(7 + 2 * 5) and timeline.waited == pytest.approx(7)


@pytest.fixture(scope="module")
def stdit_folder(tmp_path_factory) -> Path:
    config = {"depth": 4, "hidden_size": 32, "num_heads": 2, "caption_channels": 16, "model_max_length": 6}
    mx.random.seed(3)
    model = family_for_type("stdit3").build(config)
    return mlx_sora.save_model(model, tmp_path_factory.mktemp("stdit") / "stdit3", "stdit3", config)


@pytest.mark.parametrize("budget_blocks, overlap", [(2.2, True), (3.5, True), (5.0, True), (2.0, False)])
def test_load_order_is_the_runtimes(stdit_folder, monkeypatch, budget_blocks, overlap):
    """Two denoising steps of a streamed STDiT3 (the null caption's embedders first, as the pipeline
    does): the units the runtime loads, in order, are the ones the timeline loads."""
    model = mlx_sora.load_model(stdit_folder, dtype="float32", lazy=True)
    sizes = unit_sizes(model, stdit_folder, mx.float32, {u.name: 2 for u in model.units})
    block = max(s.bytes for s in sizes)
    plan = plan_phase("denoising", sizes, int(budget_blocks * block), 0, 0, overlap)
    assert plan.resident and plan.streamed and plan.overlap == overlap
    weights = StreamingWeights(model, stdit_folder, plan, mx.float32, cyclic=True)
    issued = []
    original = StreamingWeights._issue
    monkeypatch.setattr(StreamingWeights, "_issue", lambda self, name: issued.append(name) or original(self, name))
    weights.materialize("embedders")
    inputs = dict(x=mx.zeros((2, 4, 2, 4, 4)), timestep=mx.array([500.0, 500.0]), y=mx.zeros((2, 1, 6, 16)),
                  mask=mx.ones((1, 6)), fps=mx.array([24.0]), height=mx.array([32.0]), width=mx.array([32.0]))
    for _ in range(2):
        run_units(model.units, inputs, weights, evaluate=True)
    weights.close()
    run = Run(tuple((u.name, 1.0) for u in model.units))
    timeline = simulate(plan, [Materialize("embedders"), run, run], {s.name: 0.5 for s in sizes}, cyclic=True)
    assert timeline.issued == issued
