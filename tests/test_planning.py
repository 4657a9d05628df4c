"""The memory plan of a rank of a job across several machines (planning.RankShare): STDiT3-XL/2's
activations at 256x256x68 shared by the ranks of a sequence split, or halved by the CFG split."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlx_sora.conversion.loading import build_model
from mlx_sora.conversion.registry import resolve_model
from mlx_sora.models.stdit3 import STDiT3, STDiT3Config
from mlx_sora.models.units import unit_for_key
from mlx_sora.planning import GenerationPlanner, RankShare
from mlx_sora.request import GenerationRequest
from mlx_sora.runtime.streaming import MemoryBudgetError, UnitSize


def float32_sizes(component, model, chain, uses):
    """Unit sizes from the parameters' shapes (float32; nothing allocated: the skeletons are lazy)."""
    sizes = {u.name: 0 for u in model.units}
    for key, value in tree_flatten(model.parameters()):
        sizes[unit_for_key(model.units, key).name] += value.size * 4
    return [UnitSize(u.name, sizes[u.name], sizes[u.name], uses=uses.get(u.name, 1)) for u in chain]


@pytest.fixture(scope="module")
def skeletons() -> dict:
    demo = resolve_model("demo").components
    stdit = STDiT3(STDiT3Config())  # XL/2, lazy random parameters: never evaluated here
    stdit.compute_dtype = mx.float32
    return {"text_encoder": build_model(demo["text_encoder"]), "stdit3": stdit, "vae": build_model(demo["vae"])}


REQUEST = GenerationRequest.build("a red panda", image_size=(256, 256), num_frames=68)
DENOISING_ONLY = dict(encodes_text=False, decodes=False)


def denoising_plan(skeletons, budget, share):
    (phase,) = GenerationPlanner(skeletons, float32_sizes, budget, baseline=lambda: 0).plan(REQUEST, share)
    assert phase.component == "stdit3"
    return phase


def smallest_budget(skeletons, share) -> int:
    low, high = 1, 64 * 2**30
    while high - low > 2**20:
        middle = (low + high) // 2
        try:
            denoising_plan(skeletons, middle, share)
            high = middle
        except MemoryBudgetError:
            low = middle
    return high


def test_a_rank_plans_only_the_phases_it_runs(skeletons):
    planner = GenerationPlanner(skeletons, float32_sizes, None, baseline=lambda: 0)
    assert [p.component for p in planner.plan(REQUEST)] == ["text_encoder", "stdit3", "vae"]
    assert [p.component for p in planner.plan(REQUEST, RankShare(encodes_text=False))] == ["stdit3", "vae"]
    assert [p.component for p in planner.plan(REQUEST, RankShare(denoises=False, decodes=False))] == ["text_encoder"]


def test_sequence_ranks_hold_a_share_of_the_activations(skeletons):
    one = denoising_plan(skeletons, None, RankShare(**DENOISING_ONLY)).plan.activations
    two = denoising_plan(skeletons, None, RankShare(sequence_ranks=2, **DENOISING_ONLY)).plan.activations
    four = denoising_plan(skeletons, None, RankShare(sequence_ranks=4, **DENOISING_ONLY)).plan.activations
    cfg = denoising_plan(skeletons, None, RankShare(cfg_rows=1, **DENOISING_ONLY)).plan.activations
    # whole layers: 32x the token tensor [2, 20, 256, 1152] float32 (47 MB), 1/R of it per rank + 3x for the exchange
    hidden = 2 * 20 * 256 * 1152 * 4
    assert one == 32 * hidden
    assert two == 32 * hidden // 2 + 3 * hidden // 2
    assert four == 32 * hidden // 4 + 3 * hidden // 4
    assert cfg == 32 * hidden // 2


def test_a_video_too_large_for_one_budget_fits_two_ranks(skeletons):
    """The smallest budget the denoising phase of one process can be planned in (layers chunked,
    every block streamed) does not fit it, and a rank of two sharing the tokens fits in less."""
    alone = smallest_budget(skeletons, RankShare(**DENOISING_ONLY))
    shared = RankShare(sequence_ranks=2, **DENOISING_ONLY)
    per_rank = smallest_budget(skeletons, shared)
    assert per_rank < alone - 100 * 2**20
    budget = (alone + per_rank) // 2
    with pytest.raises(MemoryBudgetError, match="too small for denoising"):
        denoising_plan(skeletons, budget, RankShare(**DENOISING_ONLY))
    assert denoising_plan(skeletons, budget, shared).plan.expected_peak <= budget
