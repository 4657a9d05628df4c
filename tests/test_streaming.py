"""CI-DL: budgets, plans, streamed == resident (bit for bit), eviction, overlap, and failures mid-stream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_sora
from mlx_sora import Pipeline
from mlx_sora.errors import UserError
from mlx_sora.io.checkpoint import CheckpointError
from mlx_sora.models import family_for_type
from mlx_sora.models.units import arrays_of, run_units
from mlx_sora.runtime.streaming import (
    MemoryBudgetError,
    StreamingWeights,
    UnitSize,
    parse_memory_size,
    plan_phase,
    unit_sizes,
)

FIXTURES = Path(__file__).parent / "fixtures" / "opensora12"
MIB = 2**20


def streamed(folder: Path, budget: int = 10**12, uses: dict[str, int] | None = None, overlap: bool = True,
             cyclic: bool = False, units=None):
    """The model of a converted folder with a streaming policy (by default every unit streamed)."""
    model = mlx_sora.load_model(folder, dtype="float32", lazy=True)
    sizes = unit_sizes(model, folder, mx.float32, uses, units)
    plan = plan_phase("test", sizes, budget, baseline=0, activations=0, overlap=overlap)
    return model, StreamingWeights(model, folder, plan, mx.float32, cyclic=cyclic)


# ---------------------------------------------------------------- budgets and plans


@pytest.mark.parametrize("text, expected", [
    ("3.3GB", 3_300_000_000), ("800MB", 800_000_000), ("2GiB", 2 * 2**30), ("1.5g", 1_500_000_000),
    ("512MiB", 512 * MIB), ("none", None), (None, None), (123456, 123456),
])
def test_parse_memory_size(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "3.3 parsecs", "-1GB", "0", ""])
def test_parse_memory_size_rejects(text):
    with pytest.raises(UserError, match="memory budget"):
        parse_memory_size(text)


def test_plan_keeps_most_used_units_resident_within_the_budget():
    sizes = [UnitSize("embedders", 10 * MIB, 5 * MIB, uses=30)]
    sizes += [UnitSize(f"block_{i:02d}", 100 * MIB, 50 * MIB, uses=30) for i in range(6)]
    sizes += [UnitSize("final_layer", 1 * MIB, 1 * MIB, uses=30)]
    # 100 + 50 process/activations, 2 streamed blocks in flight (100 + 100 + 50 as read), 3 resident
    budget = 150 * MIB + 11 * MIB + 3 * 100 * MIB + 250 * MIB
    plan = plan_phase("denoising", sizes, budget, baseline=100 * MIB, activations=50 * MIB)
    assert plan.resident == ("embedders", "block_00", "block_01", "block_02", "final_layer")
    assert plan.streamed == ("block_03", "block_04", "block_05") and plan.overlap
    assert plan.expected_peak <= budget
    assert "block_03..block_05" in plan.summary()
    # all resident: on the first pass a unit still loads while another runs, its bytes as read extra
    roomy = plan_phase("denoising", sizes, 10**12, baseline=0, activations=0)
    assert roomy.streamed == () and roomy.stream_buffer_bytes == 50 * MIB
    assert not plan_phase("denoising", sizes, 10**12, 0, 0, overlap=False).stream_buffer_bytes
    # units used once gain nothing from staying resident
    once = plan_phase("text", [UnitSize(s.name, s.bytes, s.read_bytes) for s in sizes], 10**12, 0, 0)
    assert once.resident == () and len(once.streamed) == len(sizes)
    # no budget: everything resident
    assert plan_phase("x", sizes, None, 0, 0).streamed == ()


def test_plan_turns_overlap_off_then_refuses_naming_the_minimum():
    sizes = [UnitSize(f"block_{i}", 100 * MIB, 100 * MIB) for i in range(3)]
    plan = plan_phase("denoising", sizes, 260 * MIB, baseline=100 * MIB, activations=50 * MIB)
    assert not plan.overlap and plan.streamed and "overlapped loading off" in plan.summary()
    with pytest.raises(MemoryBudgetError) as info:
        plan_phase("denoising", sizes, 200 * MIB, baseline=100 * MIB, activations=50 * MIB, what=" at 64x64")
    message = str(info.value)
    assert "at least 250 MiB" in message and "denoising at 64x64" in message and "block_0" in message


def test_cache_limit_keeps_a_floor_of_the_largest_unit_and_the_activations():
    """MLX's buffer cache limit for a phase: what the budget leaves beyond the expected peak, but never
    less than the largest unit + the activations (with ~0, Metal would allocate every buffer afresh)."""
    sizes = [UnitSize(f"block_{i}", 100 * MIB, 50 * MIB, uses=30) for i in range(6)]
    tight = plan_phase("denoising", sizes, 700 * MIB, baseline=100 * MIB, activations=50 * MIB)
    assert tight.largest_unit == 100 * MIB and 0 <= tight.budget - tight.expected_peak < 150 * MIB
    assert tight.cache_limit() == 150 * MIB
    roomy = plan_phase("denoising", sizes, 4000 * MIB, baseline=100 * MIB, activations=50 * MIB)
    assert roomy.cache_limit() == roomy.budget - roomy.expected_peak > 150 * MIB


# ---------------------------------------------------------------- streamed == resident, bit for bit


@pytest.fixture(scope="module")
def stdit_folder(tmp_path_factory) -> Path:
    return mlx_sora.convert(FIXTURES / "stdit3_checkpoint", tmp_path_factory.mktemp("stream") / "stdit3")


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory) -> Path:
    return mlx_sora.convert(FIXTURES / "vae_v12_checkpoint", tmp_path_factory.mktemp("stream") / "vae")


@pytest.fixture(scope="module")
def t5_folder(tiny_model_folder) -> Path:
    return tiny_model_folder / "text_encoder"


def _stdit_inputs(merge: bool) -> dict:
    io = mx.load(str(FIXTURES / "stdit3_io.safetensors"))
    return dict(x=io["plain.x"], timestep=io["plain.timestep"], y=io["plain.y"], mask=io["plain.mask"],
                fps=io["plain.fps"], height=io["plain.height"], width=io["plain.width"], merge=merge)


@pytest.mark.gpu
@pytest.mark.parametrize("merge", [False, True], ids=["plain", "tdtm"])
@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlap"])
def test_streamed_stdit3_equals_resident(stdit_folder, merge, overlap):
    resident = mlx_sora.load_model(stdit_folder)
    expected = np.array(run_units(resident.units, _stdit_inputs(merge), evaluate=True))
    model, weights = streamed(stdit_folder, overlap=overlap, cyclic=True)
    for _ in range(2):  # a second pass reloads every streamed unit (cyclic prefetch included)
        out = run_units(model.units, _stdit_inputs(merge), weights, evaluate=True)
        np.testing.assert_array_equal(np.array(out), expected)
    assert weights.stats.loads == 2 * len(model.units) + overlap  # + the next pass's first unit, prefetched


@pytest.mark.gpu
def test_resident_units_load_one_ahead_on_the_first_pass(stdit_folder):
    """Resident units are not all loaded before the phase computes: each loads while the one before
    it runs (the first pass), then stays; the numbers are the resident ones."""
    resident = mlx_sora.load_model(stdit_folder)
    expected = np.array(run_units(resident.units, _stdit_inputs(False), evaluate=True))
    model = mlx_sora.load_model(stdit_folder, dtype="float32", lazy=True)
    sizes = unit_sizes(model, stdit_folder, mx.float32, uses={u.name: 30 for u in model.units})
    plan = plan_phase("test", sizes, 10**12, baseline=0, activations=0)
    assert plan.overlap and not plan.streamed and plan.resident == tuple(u.name for u in model.units)
    weights = StreamingWeights(model, stdit_folder, plan, mx.float32, cyclic=True)
    weights.acquire(model.units[0], model.units[1:])
    assert weights.stats.loads == 2  # the first unit, and the second loading while the first runs
    for _ in range(2):
        out = run_units(model.units, _stdit_inputs(False), weights, evaluate=True)
        np.testing.assert_array_equal(np.array(out), expected)
    assert weights.stats.loads == len(model.units)  # each once
    assert set(weights.stats.waited_by_unit) == set(plan.resident)


@pytest.mark.gpu
def test_streamed_t5_equals_resident(t5_folder):
    ids = np.array([[5, 6, 7, 1, 0, 0], [8, 9, 1, 0, 0, 0]])
    mask = (ids > 0).astype(np.int64)
    mask[:, :3] = 1
    expected = np.array(mlx_sora.load_model(t5_folder, dtype="float32")(ids, mask))
    model, weights = streamed(t5_folder)
    out = run_units(model.units, model.check_inputs(ids, mask), weights, evaluate=True)
    np.testing.assert_array_equal(np.array(out), expected)


@pytest.mark.gpu
def test_bfloat16_embedding_table_is_held_as_stored_and_gives_the_same_numbers(t5_folder, tmp_path):
    """A bfloat16 T5 computed in float32 keeps its token embedding bfloat16 (the looked-up rows are
    cast): half the bytes to load, the same output as casting the whole table first."""
    config = json.loads((t5_folder / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("model_type", "mlx_sora")}
    bf16_folder = mlx_sora.save_model(mlx_sora.load_model(t5_folder), tmp_path / "t5_bf16", "t5", config,
                                      dtype="bfloat16", source_dir=t5_folder)
    ids = np.array([[5, 6, 7, 1, 0, 0], [8, 9, 1, 0, 0, 0]])
    mask = (ids > 0).astype(np.int64)
    resident = mlx_sora.load_model(bf16_folder, dtype="float32")
    assert resident.embed_tokens.weight.dtype == mx.bfloat16
    assert resident.blocks[0].ff.wo.weight.dtype == mx.float32
    out = np.array(resident(ids, mask))
    resident.embed_tokens.weight = resident.embed_tokens.weight.astype(mx.float32)  # cast first
    np.testing.assert_array_equal(np.array(resident(ids, mask)), out)
    model, weights = streamed(bf16_folder)
    np.testing.assert_array_equal(np.array(run_units(model.units, model.check_inputs(ids, mask), weights,
                                                     evaluate=True)), out)
    embed = {s.name: s for s in unit_sizes(model, bf16_folder, mx.float32)}["embed"]
    assert embed.bytes == embed.read_bytes  # what the plan counts is what is held


@pytest.mark.gpu
def test_streamed_vae_decode_equals_resident(vae_folder):
    z = mx.random.normal((1, 4, 5, 6, 8), key=mx.random.key(3))
    resident = mlx_sora.load_model(vae_folder)
    expected = np.array(resident.decode(z, num_frames=17))
    model, weights = streamed(vae_folder, units=None)
    model.micro_batch_size = 2
    resident.micro_batch_size = 2
    out = mx.concatenate(list(model.decode_chunks(z, num_frames=17, weights=weights)), axis=2)
    np.testing.assert_array_equal(np.array(out), np.array(mx.concatenate(list(resident.decode_chunks(z, 17)), axis=2)))
    np.testing.assert_array_equal(np.array(out), expected)


@pytest.mark.gpu
def test_pipeline_with_tight_budget_equals_no_budget(tiny_model_folder, monkeypatch):
    kw = dict(resolution="144p", aspect_ratio="1:1", num_frames=17, steps=3, seed=1, tdtm_steps=2)
    free = Pipeline.from_pretrained(tiny_model_folder, dtype="float32", memory_budget=None).generate("a cat", **kw)
    tight = Pipeline.from_pretrained(tiny_model_folder, dtype="float32", memory_budget="64GB")
    limits = []
    set_cache_limit = mx.set_cache_limit
    monkeypatch.setattr(mx, "set_cache_limit", lambda limit: limits.append(limit) or set_cache_limit(limit))
    result = tight.generate("a cat", **kw)
    assert [p.cache_limit() for p in result.plans] == limits[2:5]  # (after the run's own save and restore)
    np.testing.assert_array_equal(np.array(result.latent), np.array(free.latent))
    np.testing.assert_array_equal(result.videos[0], free.videos[0])
    assert result.within_budget and result.phases[0].loads > 0
    assert all(p.budget is not None for p in result.plans)
    for report, plan in zip(result.phases, result.plans):  # where the waiting went, unit by unit
        assert set(report.load_wait_by_unit) == set(plan.resident + plan.streamed)
        assert sum(report.load_wait_by_unit.values()) == pytest.approx(report.load_wait)


# ---------------------------------------------------------------- memory really returns


@pytest.fixture(scope="module")
def medium_stdit(tmp_path_factory) -> Path:
    """A random STDiT3 whose units (~4 MiB each) dominate its activations."""
    from mlx_sora.models.stdit3 import STDiT3Config

    config = STDiT3Config(depth=6, hidden_size=256, num_heads=4, caption_channels=64, model_max_length=8).to_dict()
    model = family_for_type("stdit3").build(config)
    mx.eval(model.parameters())
    return mlx_sora.save_model(model, tmp_path_factory.mktemp("medium") / "stdit3", "stdit3", config)


def _medium_inputs() -> dict:
    k = mx.random.split(mx.random.key(0), 2)
    return dict(x=mx.random.normal((2, 4, 3, 8, 8), key=k[0]), timestep=mx.array([900.0, 900.0]),
                y=mx.random.normal((2, 1, 8, 64), key=k[1]), mask=mx.ones((1, 8)), fps=mx.array([24.0]),
                height=mx.array([64.0]), width=mx.array([64.0]))


@pytest.mark.gpu
def test_eviction_returns_active_memory_to_its_baseline(medium_stdit):
    model, weights = streamed(medium_stdit, overlap=False)
    inputs = _medium_inputs()
    mx.eval(inputs)
    mx.clear_cache()
    unit_bytes = {s.name: s.bytes for s in unit_sizes(model, medium_stdit, mx.float32)}
    carry_bytes = []
    base = mx.get_active_memory()

    def after(unit) -> None:
        mx.synchronize()
        carry_bytes.append(mx.get_active_memory() - base)

    run_units(model.units, inputs, weights, evaluate=True, on_unit=after)
    largest = max(unit_bytes.values())
    assert largest > 3 * MIB
    # after each unit only its output (tokens + state, < 1 MiB here) is left: never a unit's weights
    assert max(carry_bytes) < largest / 2, (carry_bytes, largest)


def test_freed_memory_is_given_back_only_when_reusing_it_would_not_do(stdit_folder, monkeypatch):
    """After a streamed unit, the freed memory the process holds (heap, MLX's cache) is given back to
    the OS only when the next unit's weights and activations, after reusing it, would still push the
    process's memory (RSS / footprint) over the budget."""
    import mlx_sora.runtime.streaming as streaming

    model = mlx_sora.load_model(stdit_folder, lazy=True)
    sizes = unit_sizes(model, stdit_folder, mx.float32)
    budget = 1000 * MIB
    plan = plan_phase("test", sizes, budget, baseline=0, activations=100 * MIB, overlap=False)
    weights = StreamingWeights(model, stdit_folder, plan, mx.float32)
    upcoming = plan.activations + plan.stream_buffer_bytes
    monkeypatch.setattr(streaming, "process_memory", lambda: budget - upcoming // 2)
    monkeypatch.setattr(streaming, "reusable_memory", lambda: upcoming)  # all of it reusable
    assert not weights._memory_tight()
    monkeypatch.setattr(streaming, "reusable_memory", lambda: upcoming // 4)  # reuse is not enough
    assert weights._memory_tight()
    monkeypatch.setattr(streaming, "process_memory", lambda: budget - upcoming)
    monkeypatch.setattr(streaming, "reusable_memory", lambda: 0)
    assert not weights._memory_tight()  # room for all of it anyway
    # a streamed unit prefetched while the last one ran is counted in the process already: not again
    prefetched = sum(a.nbytes for a in weights._issue(plan.streamed[0]))
    monkeypatch.setattr(streaming, "process_memory", lambda: budget - upcoming + prefetched)
    assert not weights._memory_tight()
    weights.close()
    assert weights._memory_tight()


@pytest.mark.gpu
@pytest.mark.parametrize("overlap", [False, True])
def test_peak_stays_within_the_plan(medium_stdit, overlap):
    model = mlx_sora.load_model(medium_stdit, lazy=True)
    sizes = unit_sizes(model, medium_stdit, mx.float32, uses={u.name: 30 for u in model.units})
    block = max(s.bytes for s in sizes)
    activations = model.activation_bytes(2, (3, 8, 8), 8)
    budget = activations + 5 * block  # room for a few resident blocks + the streamed ones in flight
    plan = plan_phase("denoising", sizes, budget, baseline=0, activations=activations, overlap=overlap)
    assert 0 < len(plan.resident) < len(sizes) and plan.streamed
    weights = StreamingWeights(model, medium_stdit, plan, mx.float32, cyclic=True)
    inputs = _medium_inputs()
    mx.eval(inputs)
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    for _ in range(2):  # the first pass also loads the resident units, one ahead
        run_units(model.units, inputs, weights, evaluate=True)
    peak = mx.get_peak_memory() - base
    # documented margin: 10 % (MLX's own temporaries) + 1 MiB
    assert peak <= 1.1 * plan.expected_peak + MIB, (peak, plan.expected_peak)


def test_denoising_layers_are_chunked_only_when_the_budget_needs_it(tiny_model_folder, monkeypatch):
    """A plan that fits with STDiT3's layers built whole keeps them whole (faster); one that only fits
    with them built a chunk at a time gets chunks, and says so."""
    from mlx_sora.models import stdit3_layers

    def estimate(batch, latent, caption_len, chunk_bytes=None):
        return 2 * 2**30 if chunk_bytes is None else 10 * MIB  # as at full size: chunks need far less

    options = dict(image_size=(64, 64), num_frames=1, steps=1, seed=0)
    for budget, chunked in (("100GB", False), ("1.5GB", True)):
        pipe = Pipeline.from_pretrained(tiny_model_folder, dtype="float32", memory_budget=budget)
        monkeypatch.setattr(pipe.planner.skeletons["stdit3"], "activation_bytes", estimate)
        request = mlx_sora.request.GenerationRequest.build("a cat", pipe.defaults, model_name="tiny", **options)
        denoising = pipe.plan(request)[1]
        assert denoising.chunk_bytes == (stdit3_layers.CHUNK_BYTES if chunked else None)
        assert any("at a time to fit the budget" in n for n in denoising.plan.notes) == chunked
    pipe = Pipeline.from_pretrained(tiny_model_folder, dtype="float32", memory_budget="1MB")
    monkeypatch.setattr(pipe.planner.skeletons["stdit3"], "activation_bytes", lambda *a, **k: 4 * 2**30)
    with pytest.raises(MemoryBudgetError):  # chunks that would not help: the whole-layer minimum is named
        pipe.plan(mlx_sora.request.GenerationRequest.build("a cat", pipe.defaults, model_name="tiny", **options))


# ---------------------------------------------------------------- errors


def test_too_small_budget_fails_before_any_work(tiny_model_folder):
    pipe = Pipeline.from_pretrained(tiny_model_folder, dtype="float32", memory_budget="1MB")
    with pytest.raises(MemoryBudgetError, match="too small for text encoding.*needs at least"):
        pipe.generate("a cat", resolution="144p", aspect_ratio="1:1", num_frames=1, steps=1)


def test_cli_too_small_budget_is_one_clear_line(tiny_model_folder, tmp_path):
    env = dict(os.environ, MLX_SORA_BLAS_CHECKED="1")
    done = subprocess.run(
        [sys.executable, "-m", "mlx_sora.generate", "--prompt", "a cat", "--model", str(tiny_model_folder),
         "--memory-budget", "1MB", "--num-frames", "1", "--steps", "1", "--output", str(tmp_path / "x.mp4")],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: --memory-budget") and "needs at least" in done.stderr
    assert not list(tmp_path.glob("*.mp4*"))
    bad = subprocess.run([sys.executable, "-m", "mlx_sora.generate", "--prompt", "a cat", "--memory-budget", "lots"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: memory budget 'lots' is not a size; write e.g. 3.3GB, 800MB, 2GiB or none")


def _threads() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    except OSError:
        return None


def _new_stream_index() -> int:
    return int(repr(mx.new_stream(mx.cpu)).rsplit(",", 1)[1].rstrip(") "))  # "Stream(Device(cpu, 0), 7)"


def test_fifty_streamers_add_no_streams_or_threads(stdit_folder):
    """The loader's streams are made once per process (MLX never frees a stream, and each CPU stream
    has a thread of its own): 50 more streamers, each loading a unit, add none."""
    def one_streamer() -> None:
        model, weights = streamed(stdit_folder)
        weights.materialize(model.units[0].name)
        weights.close()

    one_streamer()
    probe = _new_stream_index()
    threads = _threads()
    for _ in range(50):
        one_streamer()
    assert _new_stream_index() == probe + 1  # only the second probe was made
    if threads is not None:
        assert _threads() == threads


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupt_unit_file_mid_stream_is_a_clear_error(stdit_folder, tmp_path, damage):
    import shutil

    folder = Path(shutil.copytree(stdit_folder, tmp_path / "copy"))
    model, weights = streamed(folder, overlap=True)
    carry = _stdit_inputs(False)
    carry = run_units(model.units[:1], carry, weights, evaluate=True)  # planned and running
    victim = folder / "block_01.safetensors"
    if damage == "truncate":
        os.truncate(victim, victim.stat().st_size // 2)
    else:
        victim.unlink()
    with pytest.raises(CheckpointError, match="block_01"):
        run_units(model.units[1:], carry, weights, evaluate=True)
    weights.close()  # nothing hangs; the policy can still be closed
    assert arrays_of(carry)
