"""CI-DL (Concurrent Inference with Dynamic Loading): run a model unit by unit within a memory budget.

A model is a chain of units (``mlx_sora.models.units``); a converted folder holds the weights of
each unit in its own file. ``StreamingWeights`` is the weight policy ``run_units`` uses to run that
chain with the weights *materialized lazily* and *evicted* after use:

* A streamed unit's weights are read from its file and cast to the compute dtype right before it
  runs, and dropped right after (the module then holds unevaluated, file-backed arrays again, which
  own no memory; the freed buffers wait in MLX's cache, limited per phase by ``PhasePlan.cache_limit``,
  for the next unit's weights, and beyond that limit go back to the OS).
* **Concurrent loading**: while unit i computes, unit i+1's weights are read on a second MLX stream
  (``mx.async_eval``). Evaluation stays on the calling thread; MLX runs the two streams side by
  side. Before a unit runs, its weights are waited for explicitly, so the time a load was *not*
  hidden is measured (``LoadStats.waited``).
* Resident units load the same way, one ahead, on the first pass, and then stay.
* **Dynamic loading**: ``plan_phase`` decides, from the budget, the measured size of each unit (from
  its file header, in the compute dtype), how often each unit runs in the phase and the activation
  memory of the requested video size, which units stay *resident* for the whole phase (loaded once)
  and which are *streamed*. A budget below what the smallest plan needs is an error that names that
  minimum, raised before any heavy work.

The On-device Sora app does the same with one Core ML model per block, a background loading queue
one block ahead, and a resident block count derived from the memory the OS says is available.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..conversion.loading import read_weight_map
from ..errors import UserError
from ..io.checkpoint import CheckpointError
from ..models.units import Unit, held_dtype, unit_for_key
from .memory import GIB, available_memory, process_memory, release_reusable_memory, reusable_memory

MIB = 1024**2


class MemoryBudgetError(UserError):
    """The memory budget is below what the smallest possible plan needs."""


# ---------------------------------------------------------------- budgets

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_memory_size(text: str | int | float | None) -> int | None:
    """Bytes from "3.3GB", "800MB", "2GiB", "1.5g" or a number of bytes; None for "none"/None.

    GB/MB are decimal (the iPhone's 3.3 GB is 3.3e9 bytes), GiB/MiB binary."""
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = int(text)
    else:
        text = str(text)
        if text.strip().lower() in ("none", "off", "unlimited"):
            return None
        match = _SIZE.match(text)
        if match is None:
            raise UserError(f"memory budget {text!r} is not a size; write e.g. 3.3GB, 800MB, 2GiB or none")
        number, unit, binary = match.groups()
        power = "kmgt".find(unit.lower()) + 1 if unit else 0
        value = int(float(number) * (1024 if binary else 1000) ** power)
    if value <= 0:
        raise UserError(f"memory budget must be positive, got {text!r}")
    return value


def format_bytes(n: int | float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 2 else f"{n / MIB:.0f} MiB"


def default_memory_budget() -> int:
    """80 % of the memory available now (``memory.available_memory``: on a Mac the host's free,
    inactive and purgeable pages, plus what this process holds)."""
    return int(0.8 * available_memory())


# ---------------------------------------------------------------- unit sizes and the plan


@dataclass(frozen=True)
class UnitSize:
    name: str
    bytes: int
    """Weights once materialized (in the compute dtype)."""
    read_bytes: int
    """Bytes read from the file (the stored dtype): transiently held too while casting."""
    uses: int = 1
    """How often the unit runs in the phase (e.g. the denoising steps)."""


def unit_sizes(model: nn.Module, folder: str | Path, dtype: mx.Dtype, uses: dict[str, int] | None = None,
               units: Sequence[Unit] | None = None) -> list[UnitSize]:
    """Sizes of the units of a converted folder, from the weight files' headers (nothing is read)."""
    folder = Path(folder)
    weight_map = read_weight_map(folder)
    headers = {name: _tensor_headers(folder / name) for name in sorted(set(weight_map.values()))}
    sizes: dict[str, list[int]] = {u.name: [0, 0] for u in model.units}
    for key, name in weight_map.items():
        shape, stored = headers[name].get(key, (None, None))
        if shape is None:
            raise CheckpointError(f"{folder / name} lacks {key}, which its index lists; convert the model again")
        count = 1
        for n in shape:
            count *= n
        unit = unit_for_key(model.units, key).name
        sizes[unit][1] += count * stored.size
        sizes[unit][0] += count * held_dtype(model, key, stored, dtype).size
    chosen = units if units is not None else model.units
    return [UnitSize(u.name, *sizes[u.name], uses=(uses or {}).get(u.name, 1)) for u in chosen]


def _tensor_headers(path: Path) -> dict[str, tuple[tuple[int, ...], mx.Dtype]]:
    from ..io.checkpoint import SafetensorsReader

    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the converted folder is incomplete; convert again")
    reader = SafetensorsReader(path)  # validates the header: every byte range inside the file
    return {k: (reader.shape(k), reader.dtype(k)) for k in reader.keys()}


@dataclass
class PhasePlan:
    phase: str
    budget: int | None
    baseline: int
    """Process memory before the phase's weights (interpreter, MLX, inputs)."""
    activations: int
    """Estimated peak of the activations of the largest unit."""
    resident: tuple[str, ...]
    streamed: tuple[str, ...]
    overlap: bool
    resident_bytes: int = 0
    stream_buffer_bytes: int = 0
    """Streamed weights held at once: the running unit (+ the next one, loading, with overlap; or a
    resident unit as read, loading on the first pass)."""
    largest_unit: int = 0
    """The largest unit's weights as held (bytes)."""
    notes: list[str] = field(default_factory=list)

    @property
    def expected_peak(self) -> int:
        return self.baseline + self.activations + self.resident_bytes + self.stream_buffer_bytes

    def cache_limit(self) -> int:
        """MLX's buffer cache limit for the phase: what the budget leaves beyond the expected peak, but
        at least the largest unit + the activations. Why the floor: the cache is where a unit's freed
        weights and activations wait for the next unit's, which have the same shapes; with ~0 left (a
        tight plan, the iPhone profile) Metal would allocate every buffer afresh. It does not raise
        the peak: the plan already counts that memory as in use, and the next unit takes it back."""
        assert self.budget is not None
        return max(self.budget - self.expected_peak, self.largest_unit + self.activations)

    def summary(self) -> str:
        budget = "none (whole model resident)" if self.budget is None else format_bytes(self.budget)
        streamed = f"{len(self.streamed)} streamed" + (" (overlapped loading)" if self.streamed and self.overlap else "")
        lines = [
            f"{self.phase}: budget {budget}; {len(self.resident)} units resident "
            f"({format_bytes(self.resident_bytes)}), {streamed}; expected peak {format_bytes(self.expected_peak)} "
            f"(process {format_bytes(self.baseline)} + activations {format_bytes(self.activations)} + weights)",
        ]
        if self.streamed:
            lines.append(f"  streamed: {_ranges(self.streamed)}")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


def _ranges(names: Sequence[str]) -> str:
    """block_00, block_01, block_02 -> block_00..block_02 (other names as they are)."""
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            out.append(run[0] if len(run) == 1 else f"{run[0]}..{run[-1]}")
            run.clear()

    for name in names:
        prev = run[-1] if run else None
        if prev is not None and _successor(prev) == name:
            run.append(name)
        else:
            flush()
            run.append(name)
    flush()
    return ", ".join(out)


def _successor(name: str) -> str | None:
    m = re.match(r"^(.*?)(\d+)$", name)
    return f"{m.group(1)}{int(m.group(2)) + 1:0{len(m.group(2))}d}" if m else None


def plan_phase(
    phase: str,
    sizes: Sequence[UnitSize],
    budget: int | None,
    baseline: int,
    activations: int,
    overlap: bool = True,
    what: str = "",
) -> PhasePlan:
    """Choose resident and streamed units so that the expected peak stays within ``budget``.

    Streaming costs a load per use; keeping a unit resident saves ``uses - 1`` loads for its bytes,
    so units are kept resident by most loads saved per byte (units run once gain nothing and stream).
    Without a budget everything is resident. Raises MemoryBudgetError naming the minimum budget when
    even streaming every unit one at a time does not fit.
    """
    names = tuple(s.name for s in sizes)
    largest_unit = max((s.bytes for s in sizes), default=0)
    if budget is None:
        total = sum(s.bytes for s in sizes)
        return PhasePlan(phase, None, baseline, activations, names, (), False, resident_bytes=total,
                         largest_unit=largest_unit)

    def transient(s: UnitSize) -> int:
        """The unit's weights as read, held while they are cast (none when read as held)."""
        return s.read_bytes if s.read_bytes != s.bytes else 0

    def buffer(streamed: Sequence[UnitSize], resident: Sequence[UnitSize], with_overlap: bool) -> int:
        # the running unit + (the next one, materializing: its bytes as read and as cast)
        largest = max((s.bytes for s in streamed), default=0)
        loading = max((s.bytes + transient(s) for s in streamed), default=0)
        if not with_overlap:
            return largest + max(0, loading - largest)
        # with overlap, a resident unit also loads while another one computes, on the first pass:
        # its bytes as cast are counted as resident, its bytes as read are extra
        return largest + max(loading, max((transient(s) for s in resident), default=0))

    fixed = baseline + activations
    minimum = fixed + buffer(sizes, (), False)
    if minimum > budget:
        largest = max(sizes, key=lambda s: s.bytes)
        raise MemoryBudgetError(
            f"--memory-budget {format_bytes(budget)} is too small for {phase}{what}: it needs at least "
            f"{format_bytes(minimum)} (process {format_bytes(baseline)} + activations "
            f"{format_bytes(activations)} + the largest unit, {largest.name}, {format_bytes(largest.bytes)}). "
            "Raise the budget, choose a smaller resolution or fewer frames, or use quantized weights"
        )
    use_overlap = overlap and fixed + buffer(sizes, (), True) <= budget
    notes = [] if use_overlap or not overlap else ["overlapped loading off: two units do not fit the budget"]
    order = sorted(sizes, key=lambda s: (-(s.uses - 1) / max(s.bytes, 1), s.bytes))
    resident: list[UnitSize] = []
    streamed = list(sizes)
    for candidate in order:
        if candidate.uses <= 1:
            break  # no load saved by keeping it
        trial = [s for s in streamed if s is not candidate]
        need = fixed + sum(s.bytes for s in resident) + candidate.bytes + buffer(trial, [*resident, candidate],
                                                                                  use_overlap)
        if need <= budget:
            resident.append(candidate)
            streamed = trial
    return PhasePlan(
        phase, budget, baseline, activations,
        tuple(s.name for s in sizes if s in resident), tuple(s.name for s in streamed), use_overlap,
        resident_bytes=sum(s.bytes for s in resident), stream_buffer_bytes=buffer(streamed, resident, use_overlap),
        largest_unit=largest_unit, notes=notes,
    )


# ---------------------------------------------------------------- the weight policy


@dataclass
class LoadStats:
    loads: int = 0
    bytes_read: int = 0
    waited_by_unit: dict[str, float] = field(default_factory=dict)
    """Seconds each unit waited for its weights: where the load time that was not hidden went."""
    issued: float = 0.0
    """Seconds spent issuing loads (reading headers, building the lazy arrays)."""

    @property
    def waited(self) -> float:
        """Seconds the chain waited for weights (load time not hidden behind compute)."""
        return sum(self.waited_by_unit.values())


_LOADER_STREAMS: dict[mx.DeviceType, tuple[mx.ThreadLocalStream, mx.ThreadLocalStream]] = {}


def loader_streams(device: mx.Device) -> tuple[mx.ThreadLocalStream, mx.ThreadLocalStream]:
    """The streams weights are read on (CPU) and cast on (the compute device), made once per process
    (MLX never frees a stream, and each CPU stream has its own thread); thread-local, as an MLX stream
    may only be used on the thread that made it."""
    if device.type not in _LOADER_STREAMS:
        read = mx.new_thread_local_stream(mx.cpu)
        cast = read if device.type == mx.cpu else mx.new_thread_local_stream(device)
        _LOADER_STREAMS[device.type] = (read, cast)
    return _LOADER_STREAMS[device.type]


class StreamingWeights:
    """Weight policy for ``run_units``: resident units materialized once, streamed units read before
    and evicted after each use, the next streamed unit prefetched on a loader stream (``overlap``).

    ``cyclic``: the chain runs again and again (denoising steps): after its last streamed unit, the
    first one of the next pass is prefetched.
    """

    def __init__(self, model: nn.Module, folder: str | Path, plan: PhasePlan, dtype: mx.Dtype,
                 cyclic: bool = False):
        self.model = model
        self.folder = Path(folder)
        self.plan = plan
        self.dtype = dtype
        self.cyclic = cyclic
        self.stats = LoadStats()
        weight_map = read_weight_map(self.folder)
        self._keys: dict[str, list[str]] = {u.name: [] for u in model.units}
        self._files: dict[str, list[str]] = {u.name: [] for u in model.units}
        for key, name in weight_map.items():
            unit = unit_for_key(model.units, key).name
            self._keys[unit].append(key)
            if name not in self._files[unit]:
                self._files[unit].append(name)
        self._streamed = set(plan.streamed)
        self._ready: dict[str, list[mx.array]] = {}  # unit -> arrays being or already materialized
        self._order: list[str] = []  # streamed units in the order they ran (learnt on the first pass)
        self._read_stream, self._cast_stream = loader_streams(mx.default_device())

    # ------------------------------------------------------------ materializing

    def _issue(self, name: str) -> list[mx.array]:
        """Bind fresh file-backed arrays for a unit's weights and start evaluating them (async)."""
        start = time.perf_counter()
        files = self._files[name]
        try:
            with mx.stream(self._read_stream):
                raw = {}
                for file in files:
                    raw.update(_load_file(self.folder / file, self._read_stream))
            keys = self._keys[name]
            with mx.stream(self._cast_stream):
                arrays = {k: raw[k].astype(held_dtype(self.model, k, raw[k].dtype, self.dtype)) for k in keys}
        except KeyError as e:
            raise CheckpointError(f"{self.folder}: the weight file of unit {name} lacks {e}; convert again") from e
        self.model.update(tree_unflatten(list(arrays.items())))
        values = list(arrays.values())
        mx.async_eval(values)
        self.stats.loads += 1
        self.stats.bytes_read += sum(raw[k].nbytes for k in keys)
        self.stats.issued += time.perf_counter() - start
        self._ready[name] = values
        return values

    def _wait(self, name: str, values: list[mx.array]) -> None:
        start = time.perf_counter()
        try:
            mx.eval(values)
        except RuntimeError as e:
            files = ", ".join(str(self.folder / f) for f in self._files[name])
            raise CheckpointError(f"cannot read the weights of unit {name} ({files}): {e}; convert the model again") from e
        self.stats.waited_by_unit[name] = self.stats.waited_by_unit.get(name, 0.0) + time.perf_counter() - start

    def materialize(self, name: str) -> None:
        """Make one unit's weights present outside a chain (e.g. to read the null caption)."""
        values = self._ready.get(name) or self._issue(name)
        self._wait(name, values)

    # ------------------------------------------------------------ the WeightPolicy protocol

    def acquire(self, unit: Unit, upcoming: Sequence[Unit]) -> None:
        values = self._ready.get(unit.name) or self._issue(unit.name)
        self._wait(unit.name, values)
        if unit.name in self._streamed and unit.name not in self._order:
            self._order.append(unit.name)
        if self.plan.overlap:
            following = self._next_to_load(unit.name, upcoming)
            if following is not None:
                self._issue(following)

    def release(self, unit: Unit) -> None:
        if unit.name in self._streamed:
            self._evict(unit.name)

    def _next_to_load(self, name: str, upcoming: Sequence[Unit]) -> str | None:
        return next_unit_to_load(name, [u.name for u in upcoming], self._ready, self._streamed, self.cyclic,
                                 self._order)

    def _evict(self, name: str) -> None:
        """Drop a unit's materialized weights: the module gets unevaluated file-backed arrays again."""
        self._ready.pop(name, None)
        lazy = {}
        for file in self._files[name]:
            lazy.update(_load_file(self.folder / file, self._read_stream))
        self.model.update(tree_unflatten([(k, lazy[k]) for k in self._keys[name]]))
        if self._memory_tight():
            release_reusable_memory()  # the evicted weights' pages go back to the OS (the budget counts them)

    def _memory_tight(self) -> bool:
        """Whether memory the process keeps for reuse (``memory.reusable_memory``: the CPU heap's,
        ``memory.keep_freed_cpu_memory``, and MLX's buffer cache on Metal) could push it over the
        budget during the next unit. Only then is it given back: ``malloc_trim`` holds the
        allocator's lock while it returns the pages, stalling the loader, and the next unit faults
        them in again (T5-XXL text encoding, overlapped, 256x256x68: 9.9 s waiting for weights with
        a trim after every unit, 0.6 s without).

        The next unit's weights and activations first reuse the free memory the process holds (it is
        already counted in ``process_memory``); only the rest grows the process. (Counting the RSS
        and the next unit in full trimmed after every unit at 2 GB: T5-XXL at 256x256x68 waited 21.7 s for weights, each
        unit faulting its 1.1 GB in afresh, against 3.2 s reusing the heap, max RSS 1.51 vs 1.49 GiB;
        with 3.3 GB, counting the prefetched unit twice, the text phase took 26 s instead of 21 s.)"""
        if self.plan.budget is None:
            return False
        # a streamed unit prefetched while this one ran is counted in the process already
        prefetched = sum(a.nbytes for name, arrays in self._ready.items() if name in self._streamed for a in arrays)
        upcoming = self.plan.activations + max(0, self.plan.stream_buffer_bytes - prefetched)
        return process_memory() + max(0, upcoming - reusable_memory()) > self.plan.budget

    def close(self) -> None:
        """Evict everything (the model keeps only unevaluated arrays)."""
        for name in list(self._ready):
            self._evict(name)


def next_unit_to_load(name: str, upcoming: Sequence[str], ready: Collection[str], streamed: Collection[str],
                      cyclic: bool, order: Sequence[str]) -> str | None:
    """The unit to load while ``name`` computes: the next one in the chain (``upcoming``) that is not
    loaded yet (``ready``: loaded or loading), skipping resident units already loaded (resident units
    load one ahead too, on their first use, so that the phase starts computing at once instead of
    after loading all of them). None when that unit is already loading: one unit loads at a time.
    ``cyclic`` (denoising steps): after the last streamed unit of a pass (``order``: the streamed
    units in the order they ran), the first one of the next pass. The schedule ``StreamingWeights``
    follows, and ``mlx_sora.estimate`` projects."""
    for unit in upcoming:
        if unit in ready and unit not in streamed:
            continue  # resident, loaded
        return None if unit in ready else unit
    if cyclic and order and name == order[-1] and order[0] not in ready:
        return order[0]  # the first streamed unit of the next pass
    return None


def _load_file(path: Path, stream: mx.Stream) -> dict[str, mx.array]:
    try:
        return mx.load(str(path), stream=stream)
    except (RuntimeError, ValueError, OSError) as e:
        raise CheckpointError(f"cannot read {path} ({e}); the converted folder is corrupt: convert again") from e
