"""The CI-DL timeline of a phase on a virtual clock: the schedule ``runtime.streaming.StreamingWeights``
follows, with each unit's projected load and compute seconds.

A phase is a sequence of steps: runs of a chain of units (``run_units``: acquire, compute, release
each unit in turn), lone loads (``materialize``, e.g. STDiT3's null caption before the first step)
and work outside the units (the sampler's update between evaluations). Loads go one at a time on
the loader (the runtime's read stream), concurrently with the computation:

* a unit not loaded when it is needed is loaded then, and waited for (the first load of a phase is
  never hidden);
* with overlap, while a unit computes the next one the runtime would load is loading
  (``streaming.next_unit_to_load``: the next unit of the chain not loaded yet, resident units on
  their first pass too; in the denoising loop, after the last streamed unit, the first streamed
  unit of the next step);
* streamed units are released after they run, resident ones stay;
* without a budget (``--memory-budget none``) the whole model is loaded before anything computes.

Sequential streaming (``--no-overlap``) and no CI-DL at all (``--no-ci-dl``: every unit streamed,
read right before it runs, no overlap) are plans the same simulation runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

from ..runtime.streaming import PhasePlan, next_unit_to_load


@dataclass(frozen=True)
class Run:
    """One ``run_units`` call: (unit, compute seconds) in chain order."""

    units: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Materialize:
    """A unit's weights made present outside a chain (``StreamingWeights.materialize``)."""

    unit: str


@dataclass(frozen=True)
class Compute:
    """Work outside the units (seconds)."""

    seconds: float


Step = Union[Run, Materialize, Compute]


@dataclass
class UnitTimeline:
    runs: int = 0
    loads: int = 0
    load_seconds: float = 0.0
    compute_seconds: float = 0.0
    waited: float = 0.0


@dataclass
class PhaseTimeline:
    seconds: float
    units: dict[str, UnitTimeline] = field(default_factory=dict)
    other_compute: float = 0.0
    issued: list[str] = field(default_factory=list)
    """The units in the order their loads were issued."""

    @property
    def waited(self) -> float:
        return sum(u.waited for u in self.units.values())

    @property
    def loads(self) -> int:
        return sum(u.loads for u in self.units.values())

    @property
    def load_seconds(self) -> float:
        return sum(u.load_seconds for u in self.units.values())

    @property
    def compute_seconds(self) -> float:
        return sum(u.compute_seconds for u in self.units.values()) + self.other_compute


def simulate(plan: PhasePlan, steps: Sequence[Step], load_seconds: dict[str, float], cyclic: bool = False,
             up_front: Sequence[str] | None = None, overlap_slowdown: float = 1.0) -> PhaseTimeline:
    """Run the phase's steps on a virtual clock. ``up_front``: the units loaded whole before any
    compute (a phase without a budget loads its whole model, encoders included); otherwise ``plan``
    says which units stream and whether loads overlap compute. ``overlap_slowdown``: computation
    runs that much slower while a load runs beside it (cores and memory bandwidth shared)."""
    timeline = PhaseTimeline(0.0)
    units = timeline.units

    def unit(name: str) -> UnitTimeline:
        return units.setdefault(name, UnitTimeline())

    now = 0.0
    if up_front is not None:
        for name in up_front:
            timeline.issued.append(name)
            unit(name).loads += 1
            unit(name).load_seconds += load_seconds[name]
            unit(name).waited += load_seconds[name]
            now += load_seconds[name]
        for step in steps:
            if isinstance(step, Run):
                for name, seconds in step.units:
                    unit(name).runs += 1
                    unit(name).compute_seconds += seconds
                    now += seconds
            elif isinstance(step, Compute):
                timeline.other_compute += step.seconds
                now += step.seconds
        timeline.seconds = now
        return timeline

    streamed = set(plan.streamed)
    ready: dict[str, float] = {}  # unit -> when its load is done (loaded or loading)
    order: list[str] = []  # streamed units in the order they ran
    loader_free = 0.0

    def issue(name: str) -> None:
        nonlocal loader_free
        start = max(now, loader_free)
        loader_free = start + load_seconds[name]
        ready[name] = loader_free
        timeline.issued.append(name)
        unit(name).loads += 1
        unit(name).load_seconds += load_seconds[name]

    def wait(name: str) -> None:
        nonlocal now
        if name not in ready:
            issue(name)
        waited = max(0.0, ready[name] - now)
        unit(name).waited += waited
        now += waited

    for step in steps:
        if isinstance(step, Materialize):
            wait(step.unit)
        elif isinstance(step, Compute):
            timeline.other_compute += step.seconds
            now += step.seconds
        else:
            names = [name for name, _ in step.units]
            for i, (name, seconds) in enumerate(step.units):
                wait(name)
                if name in streamed and name not in order:
                    order.append(name)
                if plan.overlap:
                    following = next_unit_to_load(name, names[i + 1:], ready, streamed, cyclic, order)
                    if following is not None:
                        issue(following)
                busy = max(0.0, loader_free - now)  # a load running beside this computation
                if busy and overlap_slowdown > 1:
                    slowed = seconds * overlap_slowdown
                    seconds = slowed if slowed <= busy else busy + seconds - busy / overlap_slowdown
                unit(name).runs += 1
                unit(name).compute_seconds += seconds
                now += seconds
                if name in streamed:
                    ready.pop(name, None)
    timeline.seconds = now
    return timeline
