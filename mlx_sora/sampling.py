"""Open-Sora 1.2 rectified-flow sampling with classifier-free guidance, plus On-device Sora's
Linear Proportional Leap (LPL) and the TDTM merge schedule.

Reference: ``opensora/schedulers/rf/__init__.py`` (RFLOW.sample) and ``rectified_flow.py``
(timestep_transform) at hpcaitech/Open-Sora 8d132d7; LPL: ``Modded_Open_Sora/opensora/schedulers/rf/
__init__.py`` at eai-lab/On-device-Sora 47a90a5.

One step i (0-based) evaluates the model on the CFG batch [z, z] at t_i with captions [y, y_null],
guides the first 4 output channels, ``v = v_uncond + cfg * (v_cond - v_uncond)``, and takes an Euler
step ``z += v * (t_i - t_{i+1}) / 1000`` (the last step goes to t = 0). A leap at step i instead
applies ``z += v * t_i / 1000`` and stops: i + 1 model evaluations in all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import mlx.core as mx

IMG_FPS = 120  # fps conditioning the reference uses for single images (opensora/datasets/utils.py)


# ---------------------------------------------------------------- timesteps


def timestep_transform(
    t: mx.array,
    height: mx.array,
    width: mx.array,
    num_frames: mx.array,
    base_resolution: float = 512 * 512,
    base_num_frames: float = 1.0,
    scale: float = 1.0,
    num_timesteps: int = 1000,
) -> mx.array:
    """Resolution- and length-dependent shift of the timesteps (reference ``timestep_transform``).

    Computed in the dtype of ``height``/``width``/``num_frames`` as the reference does (float16 is
    promoted to float32 there; bfloat16 is not).
    """
    if height.dtype == mx.float16:
        height, width, num_frames = (a.astype(mx.float32) for a in (height, width, num_frames))
    t = t / num_timesteps
    ratio_space = mx.sqrt((height * width) / base_resolution)
    if num_frames[0].item() == 1:
        frames = mx.ones_like(num_frames)
    else:
        frames = mx.floor(num_frames / 17) * 5  # latent frames; 17 -> 5 is the VAE's reduction
        # Deliberate deviation: for 2..16 frames the reference gets ratio 0 and NaN timesteps
        # (0 / 0 at t = 1); such short clips are treated like an image (ratio_time 1) instead.
        frames = mx.maximum(frames, 1)
    ratio_time = mx.sqrt(frames / base_num_frames)
    ratio = ratio_space * ratio_time * scale
    new_t = ratio * t / (1 + (ratio - 1) * t)
    return new_t * num_timesteps


def sampling_timesteps(
    num_steps: int,
    batch: int,
    height: mx.array,
    width: mx.array,
    num_frames: mx.array,
    num_timesteps: int = 1000,
    use_timestep_transform: bool = True,
    use_discrete_timesteps: bool = False,
) -> list[mx.array]:
    """The per-step timesteps fed to the model, each a [batch] float32 array (as RFLOW.sample)."""
    if num_steps < 1:
        raise ValueError(f"steps must be at least 1, got {num_steps}")
    raw = [(1.0 - i / num_steps) * num_timesteps for i in range(num_steps)]
    if use_discrete_timesteps:
        raw = [float(int(round(t))) for t in raw]
    timesteps = [mx.full((batch,), t, dtype=mx.float32) for t in raw]
    if use_timestep_transform:
        timesteps = [
            timestep_transform(t, height, width, num_frames, num_timesteps=num_timesteps)
            for t in timesteps
        ]
    return timesteps


# ---------------------------------------------------------------- leap rules


@dataclass(frozen=True)
class FixedLeap:
    """Leap at step ``step`` (0-based): ``step`` regular Euler steps, then one leaping evaluation."""

    step: int

    def __post_init__(self) -> None:
        if self.step < 0:
            raise ValueError(f"leap step must be >= 0, got {self.step}")


@dataclass(frozen=True)
class DynamicLeap:
    """On-device Sora's cosine-similarity rule, as committed.

    From ``min_step`` on, c_i = mean over rows of cos(v_i[0,0,0], v_{i-1}[0,0,0]) (sample 0, channel 0,
    latent frame 0; rows of the HxW latent). c_i > best + tolerance sets best and resets the patience,
    otherwise the patience drops by one; the leap fires when it reaches 0. ``similarity="whole"``
    compares the whole guided velocity of every sample instead (flattened per sample, batch mean).
    """

    min_step: int = 14
    tolerance: float = 1e-3
    patience: int = 3
    similarity: str = "reference"

    def __post_init__(self) -> None:
        if self.similarity not in ("reference", "whole"):
            raise ValueError(f"similarity must be 'reference' or 'whole', got {self.similarity!r}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")


def velocity_similarity(v: mx.array, prev: mx.array, mode: str) -> float:
    if mode == "reference":
        a, b = v[0, 0, 0].astype(mx.float32), prev[0, 0, 0].astype(mx.float32)  # [H, W]
        cos = (a * b).sum(axis=1) / mx.maximum(
            mx.sqrt((a * a).sum(axis=1)) * mx.sqrt((b * b).sum(axis=1)), 1e-8
        )
    else:
        a = v.reshape(v.shape[0], -1).astype(mx.float32)
        b = prev.reshape(prev.shape[0], -1).astype(mx.float32)
        cos = (a * b).sum(axis=1) / mx.maximum(mx.linalg.norm(a, axis=1) * mx.linalg.norm(b, axis=1), 1e-8)
    return cos.mean().item()


class _DynamicLeapState:
    def __init__(self, rule: DynamicLeap):
        self.rule = rule
        self.prev: mx.array | None = None
        self.best = 0.0
        self.patience = rule.patience

    def update(self, step: int, v: mx.array) -> tuple[bool, float | None]:
        fire, cos = False, None
        if self.prev is not None:
            if step >= self.rule.min_step:
                cos = velocity_similarity(v, self.prev, self.rule.similarity)
                if cos > self.best + self.rule.tolerance:
                    self.best = cos
                    self.patience = self.rule.patience
                else:
                    self.patience -= 1
            if self.patience == 0:
                fire = True
        self.prev = v
        return fire, cos


# ---------------------------------------------------------------- the sampler


@dataclass(frozen=True)
class SamplerConfig:
    num_steps: int = 30
    cfg_scale: float = 7.0
    num_timesteps: int = 1000
    use_timestep_transform: bool = True
    use_discrete_timesteps: bool = False
    leap: FixedLeap | DynamicLeap | None = None
    tdtm_steps: int = 0
    """TDTM: merge consecutive latent frames in steps i < tdtm_steps (0 = off)."""

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.num_steps}")
        if self.tdtm_steps < 0:
            raise ValueError(f"tdtm_steps must be >= 0, got {self.tdtm_steps}")
        if isinstance(self.leap, FixedLeap) and self.leap.step >= self.num_steps:
            raise ValueError(
                f"leap step {self.leap.step} is past the last step; with {self.num_steps} steps "
                f"choose a step in 0..{self.num_steps - 1}"
            )


@dataclass
class StepInfo:
    index: int
    timestep: float
    seconds: float
    merged: bool
    leapt: bool
    cosine: float | None = None


@dataclass
class SamplingReport:
    evaluations: int = 0
    leap_step: int | None = None
    steps: list[StepInfo] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.steps)

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(1, len(self.steps))


# model(z_in [2B,C,T,H,W], t_in [2B], merge: bool) -> output [2B, 2C, T, H, W]; with a frame mask it
# is also given x_mask= [2B, T] bool (False: a reference frame, modulated with t = 0)
DenoiseFn = Callable[..., mx.array]
# step index -> standard normal noise [B, C, T, H, W] (the reference's torch.randn_like(z) at that step)
NoiseFn = Callable[[int], mx.array]


class _MaskedFrames:
    """The RF sampler's mask handling (``RFLOW.sample`` in opensora/schedulers/rf/__init__.py): at
    step i, frames with ``mask * 1000 >= t_i`` are generated (x_mask True), the others keep their
    reference value; a frame crossing that threshold for the first time (0 < edit ratio < 1) is
    re-noised to t_i from its current value, ``(1 - t/1000) * z + t/1000 * noise``. Frames with mask 1
    start generated; after the Euler update the frames not generated get their value back."""

    def __init__(self, mask: mx.array, num_timesteps: int, noise: NoiseFn | None):
        self.mask_t = mask.astype(mx.float32) * num_timesteps
        self.num_timesteps = num_timesteps
        self.noise_added = mask == 1
        self.noise = noise
        self.x0: mx.array | None = None
        self.upper: mx.array | None = None

    def before_step(self, i: int, z: mx.array, t: mx.array) -> tuple[mx.array, mx.array]:
        self.x0 = z
        self.upper = self.mask_t >= t[:, None]
        add_noise = self.upper & ~self.noise_added
        if add_noise.any().item():  # the reference draws noise every step; only these frames use it
            if self.noise is None:
                raise ValueError("frames with an edit ratio between 0 and 1 need a noise source")
            timepoints = (1 - t.astype(mx.float32) / self.num_timesteps)[:, None, None, None, None]
            noised = timepoints * z + (1 - timepoints) * self.noise(i)
            z = mx.where(add_noise[:, None, :, None, None], noised, z)
        self.noise_added = self.upper
        return z, self.upper

    def after_step(self, z: mx.array) -> mx.array:
        return mx.where(self.upper[:, None, :, None, None], z, self.x0)


def iterate_sampling(
    denoise: DenoiseFn,
    z: mx.array,
    timesteps: list[mx.array],
    config: SamplerConfig,
    report: SamplingReport | None = None,
    mask: mx.array | None = None,
    noise: NoiseFn | None = None,
) -> Iterator[tuple[mx.array, StepInfo]]:
    """Yield (z after the step, step info) for every model evaluation; the last z is the sample.

    ``z`` is the initial noise [B, C, T, H, W]; it is kept in float32 whatever the model's dtype
    (the reference's z is promoted to float32 by the first Euler update).

    ``mask`` [B, T] (reference conditioning, ``conditioning.apply_mask_strategy``): per latent frame
    1 = generate, else the edit ratio of a reference frame written into ``z``; the model is then called
    with ``x_mask=`` and ``noise(i)`` gives the noise re-noising frames at step i (see ``_MaskedFrames``).
    """
    report = report if report is not None else SamplingReport()
    z = z.astype(mx.float32)
    channels = z.shape[1]
    dynamic = _DynamicLeapState(config.leap) if isinstance(config.leap, DynamicLeap) else None
    masked = None if mask is None else _MaskedFrames(mask, config.num_timesteps, noise)
    for i, t in enumerate(timesteps):
        start = time.perf_counter()
        merge = i < config.tdtm_steps
        # --- reference conditioning (issue 19): none of this runs without a mask
        if masked is not None:
            z, x_mask = masked.before_step(i, z, t)
            out = denoise(mx.concatenate([z, z], axis=0), mx.concatenate([t, t], axis=0), merge,
                          x_mask=mx.concatenate([x_mask, x_mask], axis=0))
        else:
            out = denoise(mx.concatenate([z, z], axis=0), mx.concatenate([t, t], axis=0), merge)
        pred = out[:, :channels].astype(mx.float32)
        cond, uncond = mx.split(pred, 2, axis=0)
        v = uncond + config.cfg_scale * (cond - uncond)
        cosine = None
        if dynamic is not None:
            mx.eval(v)
            leap, cosine = dynamic.update(i, v)
        else:
            leap = isinstance(config.leap, FixedLeap) and i == config.leap.step
        last = i == len(timesteps) - 1
        dt = t if (leap or last) else t - timesteps[i + 1]
        z = z + v * (dt.astype(mx.float32) / config.num_timesteps)[:, None, None, None, None]
        if masked is not None:
            z = masked.after_step(z)
        mx.eval(z)
        info = StepInfo(i, t[0].item(), time.perf_counter() - start, merge, leap and not last, cosine)
        report.evaluations += 1
        report.steps.append(info)
        if info.leapt:
            report.leap_step = i
        yield z, info
        if leap:
            return


def sample(
    denoise: DenoiseFn,
    z: mx.array,
    timesteps: list[mx.array],
    config: SamplerConfig,
    mask: mx.array | None = None,
    noise: NoiseFn | None = None,
) -> tuple[mx.array, SamplingReport]:
    """Run the whole sampling loop; returns the final latent and the report."""
    report = SamplingReport()
    for z, _ in iterate_sampling(denoise, z, timesteps, config, report, mask, noise):
        pass
    return z, report


def num_evaluations(config: SamplerConfig) -> int | None:
    """Model evaluations a configuration needs (None for the dynamic rule: decided at run time)."""
    if isinstance(config.leap, DynamicLeap):
        return None
    if isinstance(config.leap, FixedLeap):
        return min(config.leap.step + 1, config.num_steps)
    return config.num_steps


__all__ = [
    "DynamicLeap", "FixedLeap", "IMG_FPS", "NoiseFn", "SamplerConfig", "SamplingReport", "StepInfo",
    "iterate_sampling", "num_evaluations", "sample", "sampling_timesteps", "timestep_transform",
]
