"""Projected time and memory of a generation on a target device, without running it.

``python -m mlx_sora.estimate --device iphone15pro --model opensora-v1.2 --image-size 256 256
--num-frames 68 --steps 30 --lpl-step 15 --tdtm-steps 15`` prints, per phase and in total, the
projected seconds, the CI-DL timeline (per unit: loads, compute, waits) and the peak memory against
the device's budget. It works from configs alone: the preset ships its architecture configs.

* ``cost.py``: FLOPs and bytes of every unit call, counted from the configs and the request;
* ``devices.py`` + ``devices/*.json``: device models as data (rates per op kind, storage, sources);
* ``microbench.py``: ``this-machine``, measured and cached;
* ``timeline.py``: the CI-DL schedule on a virtual clock (``runtime.streaming``'s own rule);
* ``projection.py``: the runtime's planner + the above, per phase.
"""

from __future__ import annotations

from .devices import DeviceModel, device_names, load_device
from .projection import ModelSpec, Projection, model_spec, project

__all__ = ["DeviceModel", "ModelSpec", "Projection", "device_names", "load_device", "model_spec", "project",
           "projection_beside"]


def projection_beside(pipe, request, device_name: str, measured) -> str:
    """``generate --device-profile X``: the projection on device X of the request just run, beside
    what this machine measured (``measured``: a ``GenerationResult``)."""
    from ..errors import UserError
    from ..runtime.streaming import format_bytes

    try:
        device = load_device(device_name)
        spec = ModelSpec(pipe.bundle.name, dict(pipe.components), False, pipe.components["text_encoder"])
        tokens = max(pipe.tokenizer(list(request.texts), max_length=pipe.text_length).num_tokens)
        projection = project(spec, request, device, pipe.memory_budget, overlap=pipe.overlap, caption_tokens=tokens)
    except UserError as e:
        return f"projection on {device_name} unavailable: {e}"
    peak_name = measured.phases[0].process_peak_name if measured.phases else "peak"
    lines = [f"{'phase':<14} {'measured here':>14} {peak_name:>13}   {'projected on ' + device_name:>24} {'peak':>9}"]
    projected = {phase.name: phase for phase in projection.phases}
    for report in measured.phases:  # phases the projection does not model (prompt refinement) show no projection
        phase = projected.get(report.name)
        beside = f"{phase.seconds:22.1f} s {format_bytes(phase.peak_bytes):>9}" if phase else f"{'-':>24} {'':>9}"
        lines.append(f"{report.name:<14} {report.seconds:12.1f} s {format_bytes(report.process_peak):>13}   {beside}")
    lines.append(f"{'total':<14} {sum(p.seconds for p in measured.phases):12.1f} s {'':>13}   "
                 f"{projection.total_seconds:22.1f} s {format_bytes(projection.peak_bytes):>9}")
    return "\n".join(lines)
