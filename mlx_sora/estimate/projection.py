"""A generation projected on a device: seconds and peak memory per phase, without running it.

``project`` plans the request with the runtime's own ``planning.GenerationPlanner`` (the resident
set, the chunked STDiT3 layers, the VAE's micro-batch and tiling) from the models' skeletons and
unit sizes, counts every unit call's FLOPs and bytes (``cost.py``), turns them into seconds with the
device model (``devices.py``) and lays them out on the CI-DL timeline (``timeline.py``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.nn as nn

from ..conversion.loading import build_model, parse_dtype
from ..planning import GenerationPlanner, PlannedPhase, UnitSizer, config_unit_sizes, decoder_chain, folder_unit_sizes
from ..request import GenerationRequest
from ..runtime.memory import process_memory
from ..runtime.streaming import PhasePlan, UnitSize, default_memory_budget, format_bytes
from ..sampling import DynamicLeap, FixedLeap, SamplerConfig
from .cost import (
    KINDS,
    Op,
    UnitCall,
    _Ops,
    spatial_decoder_calls,
    stdit3_calls,
    t5_calls,
    temporal_decoder_calls,
    tile_sizes,
)
from .devices import DeviceModel
from .timeline import Compute, Materialize, PhaseTimeline, Run, Step, simulate

PHASES = (("text_encoder", "text encoding", "text_encoding"), ("stdit3", "denoising", "denoising"),
          ("vae", "decoding", "decoding"))


@dataclass
class PhaseProjection:
    name: str
    key: str
    component: str
    plan: PhasePlan
    timeline: PhaseTimeline
    flops: dict[str, float]
    bytes: float
    read_bytes: float
    setup_seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.setup_seconds + self.timeline.seconds

    @property
    def peak_bytes(self) -> int:
        return self.plan.expected_peak

    def to_dict(self) -> dict[str, Any]:
        t = self.timeline
        return {
            "seconds": self.seconds, "setup_seconds": self.setup_seconds, "compute_seconds": t.compute_seconds,
            "load_seconds": t.load_seconds,
            "waited_seconds": t.waited, "loads": t.loads, "read_bytes": self.read_bytes,
            "flops": self.flops, "bytes": self.bytes, "peak_bytes": self.peak_bytes,
            "resident": list(self.plan.resident), "streamed": list(self.plan.streamed),
            "overlap": self.plan.overlap, "units": {
                name: {"runs": u.runs, "loads": u.loads, "load_seconds": u.load_seconds,
                       "compute_seconds": u.compute_seconds, "waited_seconds": u.waited}
                for name, u in t.units.items()},
            "notes": self.notes,
        }


@dataclass
class Projection:
    device: DeviceModel
    model: str
    request: GenerationRequest
    evaluations: int
    merged_evaluations: int
    compute_dtype: str
    budget_bytes: int | None
    ci_dl: bool
    overlap: bool
    phases: list[PhaseProjection]
    assumptions: list[str] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        return sum(p.seconds for p in self.phases)

    @property
    def peak_bytes(self) -> int:
        return max(p.peak_bytes for p in self.phases)

    @property
    def flops(self) -> float:
        return sum(sum(p.flops.values()) for p in self.phases)

    def phase(self, key: str) -> PhaseProjection:
        return next(p for p in self.phases if p.key == key)

    def to_dict(self) -> dict[str, Any]:
        r = self.request
        return {
            "device": self.device.name, "model": self.model,
            "request": {"height": r.height, "width": r.width, "num_frames": r.num_frames,
                        "steps": r.sampler.num_steps, "evaluations": self.evaluations,
                        "tdtm_evaluations": self.merged_evaluations, "cfg_scale": r.sampler.cfg_scale,
                        "batch": len(r.texts), "compute_dtype": self.compute_dtype},
            "ci_dl": self.ci_dl, "overlap": self.overlap,
            "phases": {p.key: p.to_dict() for p in self.phases},
            "total_seconds": self.total_seconds, "flops": self.flops,
            "peak_bytes": self.peak_bytes, "budget_bytes": self.budget_bytes,
            "within_budget": None if self.budget_bytes is None else self.peak_bytes <= self.budget_bytes,
            "assumptions": self.assumptions,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def summary(self, every_unit: bool = False) -> str:
        """The projection as text: per phase its seconds, FLOPs, loads and waits, peak memory, and the
        units that took longest (``every_unit``: all of them, in the order they run)."""
        r = self.request
        leap = f", {self.evaluations} of {r.sampler.num_steps} steps evaluated (LPL)" \
            if self.evaluations != r.sampler.num_steps else f", {r.sampler.num_steps} steps"
        tdtm = f", TDTM in {self.merged_evaluations}" if self.merged_evaluations else ""
        schedule = "no CI-DL (every unit read before it runs)" if not self.ci_dl else (
            "CI-DL" + ("" if self.overlap else " without overlap"))
        budget = "none" if self.budget_bytes is None else format_bytes(self.budget_bytes)
        lines = [
            f"projection on {self.device.name} ({self.device.description}): {self.model}, {r.height}x{r.width}, "
            f"{r.num_frames} frames{leap}{tdtm}, batch {len(r.texts)}, {self.compute_dtype}, {schedule}, "
            f"budget {budget}",
        ]
        for p in self.phases:
            t = p.timeline
            flops = sum(p.flops.values())
            lines.append(
                f"{p.name:<14} {p.seconds:9.1f} s   {flops / 1e12:8.2f} TFLOP   compute {t.compute_seconds:8.1f} s   "
                f"loads {t.loads:4d} ({format_bytes(p.read_bytes)} read, {t.load_seconds:.1f} s)   "
                f"waited {t.waited:6.1f} s   peak {format_bytes(p.peak_bytes)}")
            resident = set(p.plan.resident)
            units = list(t.units.items()) if every_unit else sorted(
                t.units.items(), key=lambda item: -(item[1].compute_seconds + item[1].waited))[:3]
            for name, u in units:
                lines.append(f"  {name:<24} {'resident' if name in resident else 'streamed'}  {u.runs:4d} runs "
                             f"{u.loads:4d} loads  load {u.load_seconds:7.2f} s  compute {u.compute_seconds:8.2f} s  "
                             f"waited {u.waited:6.2f} s")
            if not every_unit and len(t.units) > 3:
                lines.append(f"  ... {len(t.units) - 3} more units (--units lists them all)")
            lines += [f"  {note}" for note in p.notes]
        verdict = "" if self.budget_bytes is None else (
            "  (within the budget)" if self.peak_bytes <= self.budget_bytes else "  (OVER the budget)")
        lines.append(f"{'total':<14} {self.total_seconds:9.1f} s   peak {format_bytes(self.peak_bytes)} against "
                     f"budget {budget}{verdict}")
        lines += [f"assumption: {a}" for a in self.assumptions]
        return "\n".join(lines)


# ---------------------------------------------------------------- the model to project


@dataclass
class ModelSpec:
    """A model as a projection needs it: skeleton configs (converted folders or shipped configs) and
    where the unit sizes come from."""

    name: str
    folders: dict[str, Path]
    from_configs: bool
    tokenizer_folder: Path | None = None
    stored_dtype: str = "bfloat16"
    """From configs: the dtype the weight files would be stored in (the converter's default)."""

    def sizer(self, dtype: mx.Dtype) -> UnitSizer:
        if self.from_configs:
            return config_unit_sizes(dtype, parse_dtype(self.stored_dtype))
        return folder_unit_sizes(self.folders, dtype)


def model_spec(spec: str | Path | None, prefer_quantized: bool = False) -> tuple[ModelSpec, Any]:
    """(the model, its generation defaults): ``demo``, a preset (its shipped architecture configs: no
    weights, no download) or a folder of converted weights."""
    from ..conversion.presets import preset_config_folders
    from ..conversion.registry import PRESETS, GenerationDefaults, resolve_model

    if spec is not None and str(spec) in PRESETS:
        return ModelSpec(str(spec), preset_config_folders(str(spec)), from_configs=True), GenerationDefaults()
    bundle = resolve_model(spec, prefer_quantized)
    return ModelSpec(bundle.name, dict(bundle.components), False, bundle.components["text_encoder"]), bundle.defaults


# ---------------------------------------------------------------- the projection


def evaluations(sampler: SamplerConfig) -> tuple[int, str | None]:
    """Model evaluations of a sampling run, and the assumption behind them (dynamic LPL)."""
    if isinstance(sampler.leap, FixedLeap):
        return min(sampler.leap.step + 1, sampler.num_steps), None
    if isinstance(sampler.leap, DynamicLeap):
        rule = sampler.leap
        earliest = rule.min_step + rule.patience  # the rule's first comparison sets the best, then patience misses
        if earliest < sampler.num_steps - 1:
            return earliest + 1, (
                f"dynamic LPL leaps at step {earliest}, the earliest its rule allows (min step {rule.min_step} + "
                f"patience {rule.patience}): {earliest + 1} evaluations (the demo grid averaged 18.2 of 30)")
        return sampler.num_steps, f"dynamic LPL cannot leap before step {earliest}: all {sampler.num_steps} steps"
    return sampler.num_steps, None


class _Clock:
    """Seconds of counted ops on a device, for one component."""

    def __init__(self, device: DeviceModel, component: str):
        self.device, self.component = device, component

    def op_seconds(self, op: Op) -> float:
        d, kind, bytes_ = self.device, op.kind, op.bytes
        if kind == "elementwise":
            rate = d.elementwise_rate(self.component, op.array_bytes or math.inf)
            seconds = bytes_ / rate if rate else 0.0  # None: within the calibrated compute rates
        elif kind == "conv":
            seconds = op.flops / d.conv_rate(self.component, op.kernel, op.width)
        else:
            seconds = op.flops / d.rate(self.component, kind)
        if kind != "elementwise":
            if d.memory_bandwidth:
                seconds = max(seconds, bytes_ / d.memory_bandwidth)
        return seconds

    def call_seconds(self, call: UnitCall) -> float:
        fixed = self.device.fixed_s
        return (sum(self.op_seconds(op)
                    + op.items * fixed.get(f"{op.kind}.item", 0.0) for op in call.ops)
                + sum(count * fixed.get(layer, 0.0) for layer, count in call.layers)
                + (fixed.get("unit", 0.0) if call.unit != "sampler" else 0.0))


def _load_seconds(device: DeviceModel, size: UnitSize) -> float:
    seconds = device.load_overhead_s + size.read_bytes / device.storage_read_rate
    if device.cast_rate and size.bytes != size.read_bytes:
        seconds += size.bytes / device.cast_rate
    return seconds


def _sequential(plan: PhasePlan, sizes: Sequence[UnitSize]) -> PhasePlan:
    """No CI-DL: every unit streamed, read right before it runs, released after, nothing ahead."""
    largest = max(s.bytes for s in sizes)
    loading = max(s.bytes + (s.read_bytes if s.read_bytes != s.bytes else 0) for s in sizes)
    return PhasePlan(plan.phase, plan.budget, plan.baseline, plan.activations, (), tuple(s.name for s in sizes),
                     False, resident_bytes=0, stream_buffer_bytes=largest + max(0, loading - largest),
                     notes=["no CI-DL: every unit read right before it runs and released after"])


def _tally(calls: Sequence[UnitCall], flops: dict[str, float]) -> float:
    total_bytes = 0.0
    for call in calls:
        for op in call.ops:
            flops[op.kind] += op.flops
            total_bytes += op.bytes
    return total_bytes


def project(
    model: ModelSpec,
    request: GenerationRequest,
    device: DeviceModel,
    memory_budget: int | None | str = "device",
    overlap: bool = True,
    ci_dl: bool = True,
    dtype: str | None = None,
    caption_tokens: int | None = None,
    baseline: Callable[[], int] | None = None,
) -> Projection:
    """Project ``request`` on ``device``. ``memory_budget``: "device" (the device's default budget),
    a number of bytes, or None (each phase loads its whole model). ``caption_tokens``: the prompt's
    tokens (None: the whole padded caption, an upper bound for cross-attention)."""
    compute = parse_dtype(dtype or device.compute_dtype)
    skeletons: dict[str, nn.Module] = {c: build_model(folder) for c, folder in model.folders.items()}
    for skeleton in skeletons.values():
        skeleton.compute_dtype = compute
    skeletons["vae"].cpu_fast_path = device.engine == "cpu"
    if memory_budget == "device":
        memory_budget = device.memory_budget_bytes or default_memory_budget()
    if baseline is None:
        baseline = (lambda: device.process_bytes) if device.process_bytes is not None else process_memory
    sizer = model.sizer(compute)
    planner = GenerationPlanner(skeletons, sizer, memory_budget, overlap and ci_dl, baseline)
    planned = planner.plan(request)

    t5, stdit, vae = skeletons["text_encoder"], skeletons["stdit3"], skeletons["vae"]
    itemsize = compute.size
    batch = len(request.texts)
    text_length = stdit.config.model_max_length
    keys = min(caption_tokens or text_length, text_length)
    latent = planner.latent_size(request.num_frames, request.height, request.width)
    count, leap_note = evaluations(request.sampler)
    merged = min(count, request.sampler.tdtm_steps)
    assumptions = [] if caption_tokens else [
        f"cross-attention reads all {text_length} caption tokens (an upper bound: a prompt of n tokens reads n)"]
    if leap_note:
        assumptions.append(leap_note)
    assumptions.append("every evaluation runs the CFG batch 2B, as the pipeline does (whatever --cfg-scale)")

    phases = []
    for (component, name, key), phase in zip(PHASES, planned):
        skeleton = skeletons[component]
        clock = _Clock(device, component)
        chain = decoder_chain(skeleton) if component == "vae" else skeleton.units
        uses = {u.name: 1 for u in skeleton.units}
        whole = sizer(component, skeleton, skeleton.units, uses)
        by_name = {s.name: s for s in whole}
        plan = phase.plan if ci_dl else _sequential(phase.plan, [by_name[u.name] for u in chain])
        flops = {kind: 0.0 for kind in KINDS}
        steps: list[Step] = []
        notes = list(plan.notes)
        cyclic = False
        distinct: list[UnitCall] = []  # the unit calls of different shapes (each traced and compiled once)
        if component == "text_encoder":
            calls = t5_calls(t5.config, batch, text_length, itemsize)
            total_bytes = _tally(calls, flops)
            steps.append(Run(tuple((c.unit, clock.call_seconds(c)) for c in calls)))
            distinct += calls
        elif component == "stdit3":
            cyclic = True
            total_bytes = 0.0
            steps.append(Materialize("embedders"))  # the null caption is one of its weights
            sampler_call = _sampler_call(batch, latent, stdit.config.in_channels, itemsize)
            runs = {}
            for merge in (False, True):
                calls = stdit3_calls(stdit.config, 2 * batch, latent, keys, merge, itemsize)
                runs[merge] = (calls, Run(tuple((c.unit, clock.call_seconds(c)) for c in calls)))
            for _seed in request.seeds:  # each seed's sampling in turn, the weights kept across them
                for i in range(count):
                    calls, run = runs[i < merged]
                    total_bytes += _tally(calls, flops)
                    steps += [run, Compute(clock.call_seconds(sampler_call))]
            distinct += runs[False][0] * (count > merged) + runs[True][0] * (merged > 0)
            if phase.chunk_bytes:
                notes.append("layers built a chunk at a time: 5-10 % more per block on the CPU measured here "
                             "(not in the projection)")
        else:
            total_bytes = 0.0
            for _seed in request.seeds:
                seed_bytes, decode_steps, distinct = _decode_steps(vae, phase, request, batch, latent, clock,
                                                                   itemsize, flops)
                total_bytes += seed_bytes
                steps += decode_steps
        load = {s.name: _load_seconds(device, s) for s in whole}
        up_front = [u.name for u in skeleton.units] if (plan.budget is None and ci_dl) else None
        timeline = simulate(plan, steps, load, cyclic=cyclic, up_front=up_front,
                            overlap_slowdown=device.overlap_slowdown)
        read = sum(by_name[n].read_bytes * u.loads for n, u in timeline.units.items())
        # the phase's model built, every unit file opened once (load_model), released at the end; and,
        # in a fresh process, each kind of layer traced and compiled for each new shape on its first run
        setup = device.fixed_s.get("phase", 0.0) + device.load_overhead_s * len(skeleton.units)
        first = _first_runs(device, distinct)
        phases.append(PhaseProjection(name, key, component, plan, timeline, flops, total_bytes, read, setup + first,
                                      notes))
    return Projection(device, model.name, request, count, merged, str(compute).split(".")[-1], memory_budget,
                      ci_dl, overlap and ci_dl, phases, assumptions)


def _first_runs(device: DeviceModel, calls: Sequence[UnitCall]) -> float:
    """Seconds the first run of each differently shaped unit call adds (``fixed_s["<layer>.first"]``:
    tracing and compiling the layer's kernels for new shapes, once per process and shape)."""
    shapes = {(call.ops, call.layers) for call in calls}
    return sum(device.fixed_s.get(f"{layer}.first", 0.0) for _, layers in shapes for layer, _count in layers)


def _sampler_call(batch: int, latent: tuple[int, int, int], channels: int, itemsize: int) -> UnitCall:
    """The sampler's work around one evaluation (``sampling.iterate_sampling``): the CFG batch built,
    the guided velocity, the Euler update, on float32 latents."""
    ops = _Ops(4, itemsize)
    elements = batch * channels * math.prod(latent)
    ops.elementwise(elements, 3 + 2 * 4 + 3)  # [z, z]; output split, guidance; z + v dt
    ops.layer("sampler.step")
    return ops.call("sampler")


def _decode_steps(vae: nn.Module, phase: PlannedPhase, request: GenerationRequest, batch: int,
                  latent: tuple[int, int, int], clock: _Clock, itemsize: int, flops: dict[str, float]
                  ) -> tuple[float, list[Step], list[UnitCall]]:
    """The decoding runs in the order ``OpenSoraVAE.decode_chunks`` makes them: per temporal chunk,
    the temporal decoder's chain, then the spatial decoder's chain per micro-batch (per tile)."""
    config = vae.config
    micro_batch, tiling = phase.micro_batch, phase.tiling
    _, h, w = latent
    steps: list[Step] = []
    total_bytes = 0.0
    cache: dict[tuple, tuple[list[UnitCall], Run]] = {}

    def run(kind: str, *args: int) -> Run:
        nonlocal total_bytes
        if (kind, *args) not in cache:
            calls = (temporal_decoder_calls(config, *args, itemsize) if kind == "temporal"
                     else spatial_decoder_calls(config, *args, itemsize))
            cache[(kind, *args)] = (calls, Run(tuple((c.unit, clock.call_seconds(c)) for c in calls)))
        calls, chain_run = cache[(kind, *args)]
        total_bytes += _tally(calls, flops)
        return chain_run

    per_call = max(1, (micro_batch or 10**9) // batch)
    pixels = vae.spatial_factor**2  # image pixels per latent pixel
    for start, end, frames in vae.temporal_chunks(latent[0], request.num_frames):
        steps.append(run("temporal", batch, end - start, h * w))
        for f0 in range(0, frames, per_call):
            images = batch * min(per_call, frames - f0)
            step = micro_batch or images
            for i in range(0, images, step):
                n = min(step, images - i)
                if tiling is not None and max(h, w) > tiling[0]:
                    blend = _Ops(itemsize, itemsize)
                    for th in tile_sizes(h, *tiling):
                        for tw in tile_sizes(w, *tiling):
                            steps.append(run("spatial", n, th, tw))
                            blend.elementwise(n * pixels * th * tw * 3, 4)
                    steps.append(Compute(sum(clock.op_seconds(o) for o in blend.ops)))
                else:
                    steps.append(run("spatial", n, h, w))
            # the piece copied out to the host (float32 frames)
            frames_bytes = images * pixels * h * w * 3 * 4
            steps.append(Compute(clock.op_seconds(Op("elementwise", 0.0, 2 * frames_bytes, array_bytes=frames_bytes))))
    return total_bytes, steps, [call for calls, _ in cache.values() for call in calls]
