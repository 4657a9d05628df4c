"""The memory plan of a generation: which units of each phase stay resident, which are streamed, and
how the VAE decodes, decided from the request and the memory budget before any heavy work.

``GenerationPlanner`` plans the three phases (text encoding, denoising, decoding) of a request with
``runtime.streaming.plan_phase``. It needs the models' skeletons (configs, units and activation
estimates; no weights) and the size of every unit; where the sizes come from is the caller's: the
converted folders' file headers for the MLX pipeline (``folder_unit_sizes``), the exported packages
for Core ML, the configs alone for a projection. One planner for every backend, so they plan alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .models import family_for_type
from .models.stdit3_layers import CHUNK_BYTES
from .models.stdit3_parallel import sequence_tokens
from .models.units import Unit, held_dtype, unit_for_key
from .request import GenerationRequest
from .runtime.memory import process_memory
from .runtime.streaming import MemoryBudgetError, PhasePlan, UnitSize, format_bytes, plan_phase, unit_sizes

# VAE decoding settings tried in order (fastest first) until the plan fits the budget:
# (images per spatial-decoder call, tiling (tile size, overlap) in latent pixels or None).
VAE_SETTINGS: tuple[tuple[int | None, tuple[int, int] | None], ...] = (
    (4, None), (2, None), (1, None), (1, (32, 8)), (1, (16, 4)),
)

# Process memory a run adds beyond MLX's own allocations and what the process holds at planning
# time: worker-thread stacks and malloc arenas, compiled kernels, Python objects (measured on Linux
# with scripts/bench_memory.py: max RSS minus MLX peak minus the planning-time RSS).
RUNTIME_OVERHEAD = 160 * 2**20

# (component, its model skeleton, the chain of units planned, how often each unit runs) -> sizes
UnitSizer = Callable[[str, nn.Module, Sequence[Unit], dict[str, int]], list[UnitSize]]


@dataclass(frozen=True)
class RankShare:
    """The part of a request one rank of a job across several machines runs (``parallel.py``);
    the default is all of it, as one process does."""

    encodes_text: bool = True
    cfg_rows: int | None = None
    """Rows of the CFG batch its STDiT3 blocks evaluate (None: all 2 x prompts)."""
    sequence_ranks: int = 1
    """Ranks sharing the tokens of every block (``stdit3_parallel.sequence_units``)."""
    denoises: bool = True
    decodes: bool = True


@dataclass
class PlannedPhase:
    """A planned phase: the component, its plan, and (VAE) the decoding settings."""

    component: str
    plan: PhasePlan
    micro_batch: int | None = None
    tiling: tuple[int, int] | None = None
    chunk_bytes: int | None = None
    """STDiT3: its layers a chunk at a time (``stdit3_layers.chunked_layers``), None: whole."""


def folder_unit_sizes(components: dict[str, Path], dtype: mx.Dtype | dict[str, mx.Dtype]) -> UnitSizer:
    """Unit sizes from the weight files' headers of converted folders, held in ``dtype``: one for
    every component, or each component's own (``{"text_encoder": mx.float32, ...}``)."""

    def sizes(component: str, model: nn.Module, chain: Sequence[Unit], uses: dict[str, int]) -> list[UnitSize]:
        held = dtype[component] if isinstance(dtype, dict) else dtype
        return unit_sizes(model, components[component], held, uses, chain)

    return sizes


# component -> the model family whose converter wrote it (``conversion.registry.COMPONENTS``, inverted)
_COMPONENT_FAMILIES = {"text_encoder": "t5", "stdit3": "stdit3", "vae": "vae"}


def config_unit_sizes(dtype: mx.Dtype, stored_dtype: mx.Dtype = mx.bfloat16) -> UnitSizer:
    """Unit sizes from the models' configs alone (no weight files): each parameter's shape in the
    skeleton, stored as the converter stores it (``stored_dtype``, the family's float32 keys in
    float32), held in ``dtype`` (``units.held_dtype``): what ``folder_unit_sizes`` reads from the
    headers of an unquantized converted folder, for a projection without weights."""

    def sizes(component: str, model: nn.Module, chain: Sequence[Unit], uses: dict[str, int]) -> list[UnitSize]:
        family = family_for_type(_COMPONENT_FAMILIES[component])
        totals = {u.name: [0, 0] for u in model.units}
        for key, value in tree_flatten(model.parameters()):  # shapes only: nothing is allocated
            stored = mx.float32 if family.keep_float32(key) else stored_dtype
            unit = unit_for_key(model.units, key).name
            totals[unit][0] += value.size * held_dtype(model, key, stored, dtype).size
            totals[unit][1] += value.size * stored.size
        return [UnitSize(u.name, *totals[u.name], uses=uses.get(u.name, 1)) for u in chain]

    return sizes


def decoder_chain(vae: nn.Module) -> tuple[Unit, ...]:
    """The units of VAE decoding, in the order they run: temporal decoder, then spatial decoder."""
    return vae.temporal_decoder_units + vae.spatial_decoder_units


class GenerationPlanner:
    """Plans requests for one model (its skeletons: ``text_encoder``, ``stdit3``, ``vae``, each with
    its ``compute_dtype`` set: the activation estimates follow it).

    ``baseline``: what the process holds now (``memory.process_memory``: the current RSS or
    footprint, never a peak, so that a second request in one process plans as the first did)."""

    def __init__(self, skeletons: dict[str, nn.Module], sizes: UnitSizer, memory_budget: int | None,
                 overlap: bool = True, baseline: Callable[[], int] = process_memory,
                 vae_settings: Sequence[tuple[int | None, tuple[int, int] | None]] = VAE_SETTINGS):
        self.skeletons = skeletons
        self.sizes = sizes
        self.memory_budget = memory_budget
        self.overlap = overlap
        self.baseline = baseline
        self.vae_settings = tuple(vae_settings)
        """VAE decoding settings tried in order under a budget (a backend with fixed calls: just its own)."""
        self.text_length = skeletons["stdit3"].config.model_max_length

    def latent_size(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Latent (T, H, W) of a video size, from the VAE's config."""
        return tuple(self.skeletons["vae"].get_latent_size((frames, height, width)))

    def _unit_sizes(self, component: str, uses: int | dict[str, int] = 1) -> list[UnitSize]:
        model = self.skeletons[component]
        chain = decoder_chain(model) if component == "vae" else model.units
        per_unit = uses if isinstance(uses, dict) else {u.name: uses for u in chain}
        return self.sizes(component, model, chain, per_unit)

    def plan(self, request: GenerationRequest, share: RankShare = RankShare()) -> list[PlannedPhase]:
        """Plan the phases for a request (raises MemoryBudgetError before any heavy work): text
        encoding, denoising, decoding, or those of them a rank runs (``share``)."""
        batch = len(request.texts)
        baseline = self.baseline() + RUNTIME_OVERHEAD
        budget = self.memory_budget
        what = f" at {request.height}x{request.width}, {request.num_frames} frames"
        t5, vae = self.skeletons["text_encoder"], self.skeletons["vae"]
        latent = self.latent_size(request.num_frames, request.height, request.width)
        phases = []
        if share.encodes_text:
            phases.append(PlannedPhase("text_encoder", plan_phase(
                "text encoding", self._unit_sizes("text_encoder"), budget, baseline,
                t5.activation_bytes(batch, self.text_length), self.overlap, what)))
        if share.denoises:
            phases.append(self._plan_denoising(request, latent, baseline, what, share))
        if not share.decodes:
            return phases
        chunks = len(vae.temporal_chunks(latent[0], request.num_frames))
        failure: MemoryBudgetError | None = None
        settings = self.vae_settings if budget is not None or self.vae_settings != VAE_SETTINGS else (
            (vae.micro_batch_size, None),)
        for micro_batch, tiling in settings:
            vae.micro_batch_size = micro_batch
            vae.set_tiling(tiling is not None, *(tiling or (vae.tile_size, vae.tile_overlap)))
            images = batch * (vae.micro_frame_size or request.num_frames)
            spatial_calls = chunks * -(-images // (micro_batch or images))
            if tiling is not None:
                spatial_calls *= len(vae.spatial_vae.tiles(latent[1], *tiling)) * len(
                    vae.spatial_vae.tiles(latent[2], *tiling))
            uses = {u.name: chunks for u in vae.temporal_decoder_units}
            uses.update({u.name: spatial_calls for u in vae.spatial_decoder_units})
            try:
                plan = plan_phase("decoding", self._unit_sizes("vae", uses), budget, baseline,
                                  vae.decode_activation_bytes(batch, latent[1], latent[2]), self.overlap, what)
            except MemoryBudgetError as e:
                failure = e
                continue
            if tiling is not None or micro_batch != self.vae_settings[0][0]:
                tiles = f", tiles {tiling[0]}/{tiling[1]} latent px" if tiling else ""
                plan.notes.append(f"VAE: {micro_batch} image(s) per spatial-decoder call{tiles} to fit the budget")
            phases.append(PlannedPhase("vae", plan, micro_batch, tiling))
            break
        else:
            assert failure is not None
            raise failure
        return phases

    # --- reference conditioning (issue 19): the VAE encoder's units, planned like the decoder's
    def plan_encoding(self, label: str, batch: int, frames: int, height: int, width: int) -> PlannedPhase:
        """Plan a VAE encoding of ``batch`` videos of ``frames`` frames (references, or a loop's clip):
        the encoder units resident or streamed, the spatial encoder's micro-batch (images per call)
        the largest that fits (raises MemoryBudgetError before any heavy work)."""
        vae = self.skeletons["vae"]
        budget = self.memory_budget
        baseline = self.baseline() + RUNTIME_OVERHEAD
        what = f" at {height}x{width}, {frames} frames"
        chunks = -(-frames // (vae.micro_frame_size or frames))
        failure: MemoryBudgetError | None = None
        for micro_batch in (4, 2, 1) if budget is not None else (vae.micro_batch_size,):
            vae.micro_batch_size = micro_batch
            calls = -(-(batch * frames) // (micro_batch or batch * frames))
            uses = {"spatial_encoder": calls, "temporal_encoder": chunks}
            sizes = self.sizes("vae", vae, vae.encoder_units, uses)
            try:
                plan = plan_phase(label, sizes, budget, baseline, vae.encode_activation_bytes(batch, height, width),
                                  self.overlap, what)
            except MemoryBudgetError as e:
                failure = e
                continue
            return PlannedPhase("vae", plan, micro_batch)
        assert failure is not None
        raise failure

    def _plan_denoising(self, request: GenerationRequest, latent: tuple[int, int, int], baseline: int,
                        what: str, share: RankShare = RankShare()) -> PlannedPhase:
        """STDiT3's layers are built whole when the plan fits; a chunk at a time (slower by 5-10 %,
        a third of the activation memory at 256x256x68) only when the budget needs it. A rank of a
        sequence split holds 1/R of the tokens, plus the blocks it exchanges (3x its tokens)."""
        stdit = self.skeletons["stdit3"]
        sizes = self._unit_sizes("stdit3", uses=request.sampler.num_steps)
        rows = share.cfg_rows or 2 * len(request.texts)
        per_sample, exchange = None, 0
        if share.sequence_ranks > 1:
            merges = (False, True) if request.sampler.tdtm_steps else (False,)
            per_sample = max(sequence_tokens(stdit, latent, share.sequence_ranks, m) for m in merges)
            exchange = 3 * rows * per_sample * stdit.config.hidden_size * stdit.compute_dtype.size

        def activations(chunk_bytes: int | None) -> int:
            if per_sample is None:
                return stdit.activation_bytes(rows, latent, self.text_length, chunk_bytes)
            return stdit.activation_bytes(rows, latent, self.text_length, chunk_bytes,
                                          tokens_per_sample=per_sample) + exchange

        def plan(chunk_bytes: int | None) -> PhasePlan:
            return plan_phase("denoising", sizes, self.memory_budget, baseline, activations(chunk_bytes),
                              self.overlap, what)

        try:
            return PlannedPhase("stdit3", plan(None))
        except MemoryBudgetError:
            if activations(CHUNK_BYTES) >= activations(None):
                raise  # small latents: chunks would not lower the peak
            chunked = plan(CHUNK_BYTES)
            chunked.notes.append(f"STDiT3: attention and MLP built {format_bytes(CHUNK_BYTES)} at a time to fit the budget")
            return PlannedPhase("stdit3", chunked, chunk_bytes=CHUNK_BYTES)
