"""Train the demo model: Open-Sora 1.2's architecture at small sizes, on procedural clips, in MLX.

Everything the full-size model has, with the same model code (``mlx_sora.models``):

1. the VAE v1.2 pair as an autoencoder on the clips (``mlx_sora.demo.clips``): the spatial SDXL-style
   AutoencoderKL (8x, 4 levels) on single frames, then the temporal VAE (4x in time) on the spatial
   latents; the latent scaling factor and the per-channel shift/scale are set from the trained
   latents' statistics (normalised latents: zero mean, unit std per channel);
2. a sentencepiece unigram tokenizer on the caption vocabulary (T5 ids: pad 0, eos 1, unk 2) and a
   T5 v1.1-style encoder (gated-gelu), trained jointly with
3. an STDiT3 on the VAE latents with Open-Sora 1.2's rectified-flow objective (hpcaitech/Open-Sora
   v1.2.0, ``opensora/schedulers/rf/rectified_flow.py``): x_t = (1 - t) x0 + t noise, velocity
   target x0 - noise, MSE on the first C output channels; captions dropped to the learned null
   caption ``y_embedding`` with ``class_dropout_prob`` (so CFG works). Training t is drawn uniformly
   (the scheduler's ``sample_method="uniform"`` without the timestep transform), not logit-normal +
   transform: see ``sample_timesteps`` for why (``--set dit_timesteps='"logit-normal"'`` restores it).

Run (float32, fixed seeds; prints losses and timings; ~35 min on 2 CPU cores)::

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 python scripts/train_demo.py
    python scripts/train_demo.py --package-only      # rewrite mlx_sora/demo/model/ from the run folder
    python scripts/train_demo.py --stages dit        # retrain text encoder + STDiT3 on the saved VAE

The run folder (default /work/demo_run) keeps the raw checkpoints, the recipe, the latent statistics,
the normalised latents, the tokenizer and the log, so packaging can be redone without training.

How the VAEs learn in a few hundred steps (training choices only; the architecture is unchanged):
trained from a random start, the SDXL-style VAE at these widths spends ~1000 steps reproducing a grey
blob before hues separate. Instead (``init_*_as_pooling``) every residual branch starts at zero and
the convolutions on the main path start as pass-throughs, so the spatial VAE begins as an 8x
average-pool / nearest-upsample autoencoder (the temporal VAE as a 4-frame mean / repeat); the
decoders first learn from those pooled latents (``*_teacher_steps``) while the encoders learn to
produce them; then both train end to end, a small guide term keeping latent channels 0-2 close to the
pooled frame (image-like latents, which the diffusion model conditions easily).

Training-only replacements, made at run time here (the model files are not changed) and undone
before packaging:

* the SiLU fused into ``vae_spatial.GroupNorm`` (``_normalize_silu``) computes exp by bit
  manipulation (``mx.view``), which has no VJP in MLX ("[Primitive::vjp] Not implemented for View"),
  so the VAEs cannot be differentiated as they are; it is replaced by the same function with a
  hand-written VJP;
* the tanh GELU of STDiT3's MLPs and T5's gated-gelu (``nn.gelu_approx``, ~70% of a training step
  on CPU) by the same function (sigmoid form, |diff| < 5e-7) with a hand-written VJP, ~6x faster;
* the decoders' ``evaluate_layers`` (an ``mx.eval`` per layer) is switched off.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from mlx_sora.demo import clips
from mlx_sora.models import t5 as t5_module
from mlx_sora.models import vae_spatial
from mlx_sora.models.stdit3 import STDiT3, STDiT3Config
from mlx_sora.models.t5 import T5Config, T5Encoder
from mlx_sora.models.vae import OpenSoraVAE, VideoAutoencoderConfig
from mlx_sora.models.vae_spatial import AutoencoderKL, AutoencoderKLConfig
from mlx_sora.models.vae_temporal import VAE_Temporal, VAETemporalConfig
from mlx_sora.prompts.text import prepare_prompt
from mlx_sora.sampling import timestep_transform

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RUN_DIR = Path("/work/demo_run")
DEFAULT_PACKAGE_DIR = REPO / "mlx_sora" / "demo" / "model"


@dataclass(frozen=True)
class Recipe:
    """Every choice of the run (written to the run folder as recipe.json)."""

    seed: int = 0
    num_clips: int = 300
    size: int = clips.SIZE
    frames: int = clips.FRAMES
    fps: int = 8  # the fps conditioning value of the demo model

    spatial_vae: dict = field(default_factory=lambda: {
        "block_out_channels": [16, 32, 64, 64], "layers_per_block": 1, "norm_num_groups": 4,
        "latent_channels": 4, "sample_size": clips.SIZE,
    })
    spatial_steps: int = 500
    spatial_batch: int = 8
    spatial_lr: float = 2e-3
    foreground_weight: float = 5.0  # extra loss weight on object pixels (most pixels are background)
    kl_weight: float = 1e-4
    initial_logvar: float = -6.0
    # Pull the first 3 latent channels towards the 8x8 average-pooled frame: without it encoder and
    # decoder need hundreds of steps to agree on where the color goes (a grey blob plateau), and the
    # latents become image-like, which the diffusion model finds easy to condition.
    latent_guide: float = 0.1
    pooling_init: bool = True
    spatial_teacher_steps: int = 100  # decoder first trained on the pooled frame as its latent

    temporal_vae: dict = field(default_factory=lambda: {
        "in_out_channels": 4, "latent_embed_dim": 4, "embed_dim": 4, "filters": 16, "num_res_blocks": 1,
        "channel_multipliers": [1, 1, 2], "temporal_downsample": [True, True], "num_groups": 8,
    })
    temporal_steps: int = 400
    temporal_batch: int = 8
    temporal_lr: float = 2e-3
    temporal_teacher_steps: int = 100
    temporal_guide: float = 0.1

    tokenizer_vocab: int = 48  # a limit: every caption word becomes one piece (42 pieces)
    text_length: int = 20  # model_max_length: captions are padded to this many tokens
    t5: dict = field(default_factory=lambda: {
        "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4,
        "relative_attention_num_buckets": 16, "relative_attention_max_distance": 32,
        "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu",
    })
    stdit3: dict = field(default_factory=lambda: {
        "depth": 4, "hidden_size": 128, "num_heads": 4, "patch_size": [1, 2, 2], "in_channels": 4,
        "pred_sigma": True, "qk_norm": True, "mlp_ratio": 4.0, "class_dropout_prob": 0.1,
        "input_sq_size": 512,
    })
    dit_steps: int = 2000
    dit_batch: int = 16
    dit_lr: float = 1e-3
    dit_warmup: int = 50
    dit_timesteps: str = "uniform"  # training t: "uniform" or Open-Sora's "logit-normal" + transform (see sample_timesteps)
    # 0 = ship the final weights: with the cosine schedule ending at lr 0 they beat an EMA of 0.995,
    # which still averages in the last ~200 steps (grid motion 93.1 % vs 88.9 %)
    ema_decay: float = 0.0

    cfg_scale: float = 5.0  # the demo default (CFG as trained: class_dropout_prob above)
    sampling_steps: int = 30

    @classmethod
    def from_dict(cls, values: dict) -> "Recipe":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


# ------------------------------------------------------------------------------ utilities


class Log:
    def __init__(self, path: Path | None):
        self.path = path
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.start:7.1f}s] {message}"
        print(line, flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def save_weights(module: nn.Module, path: Path) -> None:
    mx.save_safetensors(str(path), dict(tree_flatten(module.parameters())))


def load_weights(module: nn.Module, path: Path, prefix: str = "") -> None:
    weights = mx.load(str(path))
    module.load_weights([(prefix + k, v) for k, v in weights.items()], strict=not prefix)


def param_count(module: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(module.parameters()))


def lr_schedule(peak: float, steps: int, warmup: int) -> optim.schedulers:
    warmup = max(1, min(warmup, steps // 2))
    return optim.join_schedules(
        [optim.linear_schedule(peak / warmup, peak, warmup), optim.cosine_decay(peak, steps - warmup, peak * 0.05)],
        [warmup],
    )


# --------------------------------------------------------- training-only fast ops (see docstring)

_GELU_C = math.sqrt(2 / math.pi)


@mx.compile
def _silu_forward(x):
    return x / (1.0 + vae_spatial._exp_f32(-x))


@mx.compile
def _silu_backward(x, g):
    s = 1.0 / (1.0 + vae_spatial._exp_f32(-x))
    return g * s * (1.0 + x * (1.0 - s))


@mx.custom_function
def _silu(x):
    return _silu_forward(x)


@_silu.vjp
def _silu_vjp(primals, cotangent, output):
    return _silu_backward(primals if isinstance(primals, mx.array) else primals[0], cotangent)


@mx.compile
def _gelu_forward(x):  # 0.5 x (1 + tanh(z)) = x * sigmoid(2 z)
    return x / (1.0 + vae_spatial._exp_f32(-2.0 * _GELU_C * (x + 0.044715 * x * x * x)))


@mx.compile
def _gelu_backward(x, g):
    s = 1.0 / (1.0 + vae_spatial._exp_f32(-2.0 * _GELU_C * (x + 0.044715 * x * x * x)))
    return g * (s + x * 2.0 * _GELU_C * s * (1.0 - s) * (1.0 + 3 * 0.044715 * x * x))


@mx.custom_function
def _gelu_tanh(x):
    return _gelu_forward(x)


@_gelu_tanh.vjp
def _gelu_tanh_vjp(primals, cotangent, output):
    return _gelu_backward(primals if isinstance(primals, mx.array) else primals[0], cotangent)


def _normalize_silu_differentiable(x, mean, inv_std, weight, bias):
    return _silu((x - mean) * inv_std * weight + bias)


@contextlib.contextmanager
def training_ops():
    """Swap in the differentiable / faster equivalents while training; restore them afterwards."""
    saved = (vae_spatial._normalize_silu, nn.gelu_approx, t5_module.ACTIVATIONS["gelu_new"])
    vae_spatial._normalize_silu = _normalize_silu_differentiable
    nn.gelu_approx = _gelu_tanh
    t5_module.ACTIVATIONS["gelu_new"] = _gelu_tanh
    try:
        yield
    finally:
        vae_spatial._normalize_silu, nn.gelu_approx, t5_module.ACTIVATIONS["gelu_new"] = saved


# ------------------------------------------------------------------------------ data


def make_pool(recipe: Recipe, log: Log) -> tuple[np.ndarray, list[clips.ClipSpec]]:
    """The training clips: uint8 [N, T, H, W, 3] and their specs (train combinations only)."""
    start = time.perf_counter()
    specs, videos = [], np.empty((recipe.num_clips, recipe.frames, recipe.size, recipe.size, 3), np.uint8)
    source = clips.training_specs(recipe.seed)
    for i in range(recipe.num_clips):
        spec, clip_seed = next(source)
        specs.append(spec)
        videos[i] = clips.make_clip(spec, recipe.size, recipe.frames, clip_seed)
    log(f"clips: {recipe.num_clips} x {recipe.frames} x {recipe.size}x{recipe.size} in {time.perf_counter() - start:.1f}s")
    return videos, specs


def to_float(frames: np.ndarray) -> mx.array:
    return mx.array(clips.to_model_range(frames))


# ------------------------------------------------------------------------------ VAE


def gaussian_kl(mean: mx.array, logvar: mx.array) -> mx.array:
    return 0.5 * mx.mean(mean * mean + mx.exp(logvar) - 1.0 - logvar)


def start_posterior_narrow(quant_conv: nn.Module, logvar: float) -> None:
    """Start the posterior's log-variance at ``logvar``: with unit noise at initialisation the
    decoder only learns the average blob (grey, no shape) before the encoder learns to shrink it."""
    half = quant_conv.bias.shape[0] // 2
    quant_conv.bias = mx.concatenate([quant_conv.bias[:half], mx.full((half,), logvar)])


def _pass_through(conv: nn.Module, taps: list[tuple[int, ...]], weight: float, noise: float, copies: int = 1) -> None:
    """Make a conv (2D or 3D, channels last) copy input channel c to output channel c (or to the
    ``copies`` consecutive outputs c * copies + s), averaging over ``taps`` of its kernel, plus
    ``noise`` times its default random weights; zero bias."""
    kernel = np.zeros(conv.weight.shape, np.float32)
    out_ch, in_ch = kernel.shape[0], kernel.shape[-1]
    for c in range(min(out_ch // copies, in_ch)):
        for s in range(copies):
            for tap in taps:
                kernel[(c * copies + s, *tap, c)] = weight
    conv.weight = noise * conv.weight + mx.array(kernel)
    if "bias" in conv:
        conv.bias = mx.zeros_like(conv.bias)


def init_spatial_vae_as_pooling(model: AutoencoderKL, noise: float = 0.1) -> None:
    """Start the spatial VAE as (nearly) an 8x average-pool / nearest-upsample autoencoder: every
    residual branch (resnet conv2, attention output) is zero (the Fixup/ReZero idea), conv_in /
    shortcuts / the decoder's upsampling convs pass the first channels through, the encoder's
    stride-2 convs average 2x2 pixels. The colors then reach the latent and come back from the first
    step; training only has to learn the shapes (and the two output convs, which have a GroupNorm
    and SiLU before them and stay random). Without it the SDXL-style VAE spends ~1000 steps on
    grey blobs at these widths."""
    from mlx_sora.models.vae_spatial import Attention, Downsample2D, ResnetBlock2D, Upsample2D

    center = [(1, 1)]
    for _, module in model.named_modules():
        if isinstance(module, ResnetBlock2D):
            module.conv2.weight = mx.zeros_like(module.conv2.weight)
            module.conv2.bias = mx.zeros_like(module.conv2.bias)
            if "conv_shortcut" in module:
                _pass_through(module.conv_shortcut, [(0, 0)], 1.0, noise)
        elif isinstance(module, Attention):
            module.to_out[0].weight = mx.zeros_like(module.to_out[0].weight)
            module.to_out[0].bias = mx.zeros_like(module.to_out[0].bias)
        elif isinstance(module, Downsample2D):  # pads right/bottom: taps (0..1, 0..1) = 2x2 mean
            _pass_through(module.conv, [(0, 0), (0, 1), (1, 0), (1, 1)], 0.25, noise)
        elif isinstance(module, Upsample2D):  # after nearest 2x: the centre tap = nearest upsampling
            _pass_through(module.conv, center, 1.0, noise)
    _pass_through(model.encoder.conv_in, center, 1.0, noise)
    _pass_through(model.decoder.conv_in, center, 1.0, noise)
    _pass_through(model.post_quant_conv, [(0, 0)], 1.0, noise)
    _pass_through(model.quant_conv, [(0, 0)], 1.0, noise)


def fit_encoder_output(model: AutoencoderKL, x: mx.array) -> None:
    """Data-dependent init of the encoder's last conv (after its GroupNorm + SiLU): the least-squares
    map from those features to the 8x average-pooled frame (latent channels 0-2; channel 3 and the
    log-variances start at zero), so that the initial latent is the pooled frame the pass-through
    decoder can already render."""
    enc = model.encoder
    h = enc.conv_in(x)
    for block in enc.down_blocks:
        h = block(h)
    features = enc.conv_norm_out(enc.mid_block(h), silu=True)
    n, hh, ww, c = features.shape
    f = x.shape[1] // hh
    pooled = x.reshape(n, hh, f, ww, f, x.shape[-1]).mean(axis=(2, 4))
    a = np.concatenate([np.array(features).reshape(-1, c), np.ones((n * hh * ww, 1), np.float32)], axis=1)
    solution = np.linalg.lstsq(a, np.array(pooled).reshape(-1, x.shape[-1]), rcond=None)[0]  # [c + 1, 3]
    out_ch = enc.conv_out.weight.shape[0]
    kernel = np.zeros(enc.conv_out.weight.shape, np.float32)
    kernel[: x.shape[-1], 1, 1, :] = solution[:c].T
    bias = np.zeros(out_ch, np.float32)
    bias[: x.shape[-1]] = solution[c]
    enc.conv_out.weight, enc.conv_out.bias = mx.array(kernel), mx.array(bias)


def train_spatial_vae(recipe: Recipe, pool: np.ndarray, log: Log) -> AutoencoderKL:
    mx.random.seed(recipe.seed + 1)
    rng = np.random.default_rng(recipe.seed + 1)
    model = AutoencoderKL(AutoencoderKLConfig.from_dict(recipe.spatial_vae))
    model.decoder.evaluate_layers = False  # an mx.eval per layer cannot be differentiated
    if recipe.pooling_init:
        init_spatial_vae_as_pooling(model)
        sample = pool[rng.integers(len(pool), size=64), rng.integers(pool.shape[1], size=64)]
        fit_encoder_output(model, to_float(sample))
    start_posterior_narrow(model.quant_conv, recipe.initial_logvar)
    # Start the output at the clips' mean pixel (nearly black): otherwise Adam spends hundreds of steps
    # moving the output bias to -1 before any object appears.
    model.decoder.conv_out.bias = mx.array(clips.to_model_range(pool[:, ::4]).mean(axis=(0, 1, 2, 3)))
    log(f"spatial VAE: {param_count(model):,} parameters")
    opt = optim.Adam(learning_rate=lr_schedule(recipe.spatial_lr, recipe.spatial_steps, 20), bias_correction=True)

    factor = model.config.downsample_factor

    def loss_fn(model, x, key, teacher):
        mean, logvar = model.encode_moments(x)
        n, h, w, c = x.shape
        pooled = x.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
        guide = mx.mean((mean[..., :c] - pooled) ** 2)
        if teacher:  # warm-up: the decoder learns from the pooled frame, the encoder only to give it
            free = mx.zeros(pooled.shape[:-1] + (mean.shape[-1] - c,))
            z = mx.concatenate([pooled, free], axis=-1)
        else:
            z = mean + mx.exp(0.5 * logvar) * mx.random.normal(mean.shape, key=key)
        error = (model.decode(z) - x) ** 2
        weight = 1.0 + recipe.foreground_weight * (x.max(axis=-1, keepdims=True) > -0.7)
        guide_weight = 1.0 if teacher else recipe.latent_guide
        return mx.mean(weight * error) + recipe.kl_weight * gaussian_kl(mean, logvar) + guide_weight * guide

    n, t = pool.shape[:2]

    def frames() -> mx.array:
        idx = rng.integers(n, size=recipe.spatial_batch)
        frame = rng.integers(t, size=recipe.spatial_batch)
        return to_float(pool[idx, frame])

    train_autoencoder("spatial VAE", model, loss_fn, opt, rng, frames, recipe.spatial_steps,
                      recipe.spatial_teacher_steps, log)
    return model


def train_autoencoder(name: str, model: nn.Module, loss_fn, opt: optim.Optimizer, rng: np.random.Generator,
                      batch, steps: int, teacher_steps: int, log: Log) -> None:
    """The VAEs' loop: ``loss_fn(model, x, key, teacher)`` on ``batch()``, the first ``teacher_steps``
    in teacher mode; a fresh noise key per step from ``rng``."""
    step_fn = nn.value_and_grad(model, loss_fn)
    start, running = time.perf_counter(), []
    for step in range(steps):
        x = batch()
        loss, grads = step_fn(model, x, mx.random.key(int(rng.integers(2**31))), step < teacher_steps)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        running.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"{name} step {step + 1}/{steps} loss {np.mean(running):.5f} "
                f"({(time.perf_counter() - start) / (step + 1):.2f} s/step)")
            running = []


def encode_spatial(model: AutoencoderKL, pool: np.ndarray, batch: int = 68) -> np.ndarray:
    """Posterior means of every frame: float32 [N, T, h, w, C] (unscaled)."""
    n, t = pool.shape[:2]
    frames = pool.reshape(n * t, *pool.shape[2:])
    out = []
    for i in range(0, len(frames), batch):
        mean, _ = model.encode_moments(to_float(frames[i : i + batch]))
        out.append(np.array(mean))
    latents = np.concatenate(out)
    return latents.reshape(n, t, *latents.shape[1:])


def init_temporal_vae_as_pooling(model: VAE_Temporal, noise: float = 0.1) -> None:
    """The temporal counterpart of ``init_spatial_vae_as_pooling``: residual branches zero, causal
    convs pass the current frame through, the stride-2 convs average frame pairs (so a latent frame
    starts as the mean of its 4 frames) and the decoder's depth-to-time convs repeat each frame."""
    from mlx_sora.models.vae_temporal import CausalConv3d, ResBlock

    current = [(2, 1, 1)]  # causal kernel 3: the last time tap is the current frame
    for _, module in model.named_modules():
        if isinstance(module, ResBlock):
            module.conv2.conv.weight = mx.zeros_like(module.conv2.conv.weight)
            if "conv3" in module:
                _pass_through(module.conv3.conv, [(0, 0, 0)], 1.0, noise)
    enc, dec = model.encoder, model.decoder
    _pass_through(enc.conv_in.conv, current, 1.0, noise)
    for conv in enc.conv_blocks:
        if isinstance(conv, CausalConv3d):  # stride 2, one frame of front padding: taps 1, 2 = a pair
            _pass_through(conv.conv, [(1, 1, 1), (2, 1, 1)], 0.5, noise)
    _pass_through(model.quant_conv.conv, [(0, 0, 0)], 1.0, noise)
    _pass_through(model.post_quant_conv.conv, [(0, 0, 0)], 1.0, noise)
    _pass_through(dec.conv1.conv, current, 1.0, noise)
    for conv in dec.conv_blocks:
        if isinstance(conv, CausalConv3d):  # channel c * 2 + s becomes frame 2 t + s
            _pass_through(conv.conv, current, 1.0, noise, copies=2)


def temporal_teacher(model: VAE_Temporal, x: mx.array) -> mx.array:
    """Mean of each latent frame's input frames (after the encoder's zero front padding)."""
    factor = model.config.time_downsample_factor
    pad = model.time_padding(x.shape[1])
    x = mx.pad(x, [(0, 0), (pad, 0), (0, 0), (0, 0), (0, 0)])
    b, t, h, w, c = x.shape
    return x.reshape(b, t // factor, factor, h, w, c).mean(axis=2)


def train_temporal_vae(recipe: Recipe, spatial_latents: np.ndarray, log: Log) -> VAE_Temporal:
    mx.random.seed(recipe.seed + 2)
    rng = np.random.default_rng(recipe.seed + 2)
    model = VAE_Temporal(VAETemporalConfig.from_dict(recipe.temporal_vae))
    model.decoder.evaluate_layers = False  # an mx.eval per layer cannot be differentiated
    if recipe.pooling_init:
        init_temporal_vae_as_pooling(model)
    start_posterior_narrow(model.quant_conv.conv, recipe.initial_logvar)
    log(f"temporal VAE: {param_count(model):,} parameters")
    opt = optim.Adam(learning_rate=lr_schedule(recipe.temporal_lr, recipe.temporal_steps, 20), bias_correction=True)
    frames = spatial_latents.shape[1]

    def loss_fn(model, x, key, teacher):
        mean, logvar = model.encode_moments(x)
        target = temporal_teacher(model, x)
        guide = mx.mean((mean - target) ** 2)
        if teacher:  # warm-up: the decoder learns from the 4-frame means, the encoder to give them
            z = target
        else:
            z = mean + mx.exp(0.5 * logvar) * mx.random.normal(mean.shape, key=key)
        error = (model.decode(z, num_frames=frames) - x) ** 2
        guide_weight = 1.0 if teacher else recipe.temporal_guide
        return mx.mean(error) + recipe.kl_weight * gaussian_kl(mean, logvar) + guide_weight * guide

    def latents() -> mx.array:
        return mx.array(spatial_latents[rng.integers(len(spatial_latents), size=recipe.temporal_batch)])

    train_autoencoder("temporal VAE", model, loss_fn, opt, rng, latents, recipe.temporal_steps,
                      recipe.temporal_teacher_steps, log)
    return model


def encode_temporal(model: VAE_Temporal, spatial_latents: np.ndarray, batch: int = 64) -> np.ndarray:
    out = []
    for i in range(0, len(spatial_latents), batch):
        mean, _ = model.encode_moments(mx.array(spatial_latents[i : i + batch]))
        out.append(np.array(mean))
    return np.concatenate(out)  # [N, T_lat, h, w, C]


def stage_vae(recipe: Recipe, run: Path, pool: np.ndarray, log: Log) -> None:
    start = time.perf_counter()
    spatial = train_spatial_vae(recipe, pool, log)
    save_weights(spatial, run / "spatial_vae.safetensors")
    t0 = time.perf_counter()
    raw = encode_spatial(spatial, pool)
    scaling = float(1.0 / raw.std())
    spatial_latents = (raw * scaling).astype(np.float32)
    log(f"spatial latents {spatial_latents.shape} in {time.perf_counter() - t0:.1f}s; scaling factor {scaling:.4f}")
    temporal = train_temporal_vae(recipe, spatial_latents, log)
    save_weights(temporal, run / "temporal_vae.safetensors")
    z = encode_temporal(temporal, spatial_latents)
    shift = z.mean(axis=(0, 1, 2, 3))
    scale = z.std(axis=(0, 1, 2, 3))
    stats = {"spatial_scaling_factor": scaling, "shift": shift.tolist(), "scale": scale.tolist()}
    (run / "latent_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    normalised = ((z - shift) / scale).transpose(0, 4, 1, 2, 3).astype(np.float32)  # [N, C, T_lat, h, w]
    np.save(run / "latents.npy", normalised)
    log(f"latents {normalised.shape}: shift {np.round(shift, 3).tolist()} scale {np.round(scale, 3).tolist()}")
    check_vae(recipe, run, log)
    log(f"VAE stage done in {time.perf_counter() - start:.1f}s")


def check_vae(recipe: Recipe, run: Path, log: Log, every: int = 3) -> None:
    """Judge VAE reconstructions (encode -> decode through OpenSoraVAE) of fresh clips of every
    combination: the ceiling of what the diffusion model can reach."""
    from mlx_sora.demo.judge import judge, judge_grid
    from mlx_sora.io.video import to_uint8_frames

    start = time.perf_counter()
    vae = load_trained_vae(recipe, run)
    vae.spatial_vae.decoder.evaluate_layers = False
    specs = [clips.ClipSpec.single(*c) for c in clips.ALL_COMBOS[::every]]
    videos = np.stack([clips.make_clip(s, recipe.size, recipe.frames, 10_000 + i) for i, s in enumerate(specs)])
    results = []
    for i in range(0, len(videos), 8):
        x = to_float(videos[i : i + 8]).transpose(0, 4, 1, 2, 3)
        decoded = np.array(vae.decode(vae.encode(x), num_frames=recipe.frames))
        results += [judge(to_uint8_frames(v), s) for v, s in zip(decoded, specs[i : i + 8])]
    score = judge_grid(results)["all"]
    log(f"VAE reconstructions judged ({time.perf_counter() - start:.1f}s): {score.row()}")


def build_vae(recipe: Recipe, stats: dict) -> tuple[OpenSoraVAE, VideoAutoencoderConfig]:
    config = VideoAutoencoderConfig(
        spatial_vae=AutoencoderKLConfig.from_dict(recipe.spatial_vae),
        temporal_vae=VAETemporalConfig.from_dict(recipe.temporal_vae),
        shift=tuple(stats["shift"]),
        scale=tuple(stats["scale"]),
        micro_frame_size=recipe.frames,
        micro_batch_size=recipe.frames,
        spatial_scaling_factor=stats["spatial_scaling_factor"],
    )
    return OpenSoraVAE(config), config


def load_trained_vae(recipe: Recipe, run: Path) -> OpenSoraVAE:
    stats = json.loads((run / "latent_stats.json").read_text())
    vae, _ = build_vae(recipe, stats)
    load_weights(vae.spatial_vae, run / "spatial_vae.safetensors")
    load_weights(vae.temporal_vae, run / "temporal_vae.safetensors")
    return vae


# ------------------------------------------------------------------------------ text


def train_tokenizer(recipe: Recipe, folder: Path) -> Path:
    """Sentencepiece unigram model on the caption vocabulary (T5 special ids: pad 0, eos 1, unk 2)."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    captions = [prepare_prompt(clips.caption(clips.ClipSpec.single(*c)), aes=None) for c in clips.ALL_COMBOS]
    # The captions alone are too repetitive for sentencepiece's seed-piece search (it finds ~14
    # candidates and keeps mostly characters); the same words in random orders make every word a
    # candidate, so each caption word becomes one piece.
    words = sorted({w for c in captions for w in c.split()} | {"and"})
    rng = np.random.default_rng(recipe.seed)
    shuffled = [" ".join(rng.choice(words, size=int(rng.integers(2, 9)))) for _ in range(2000)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions * 4 + shuffled), model_prefix=str(folder / "spiece"),
        vocab_size=recipe.tokenizer_vocab,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
        unk_piece="<unk>", character_coverage=1.0, num_threads=1, minloglevel=2, hard_vocab_limit=False,
    )
    return folder / "spiece.model"


def tokenize(spiece: Path, captions: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """The pipeline's text path: prepare_prompt(aes=None) then the T5 tokenizer padded to ``length``."""
    from mlx_sora.prompts.tokenizer import T5Tokenizer

    tokenizer = T5Tokenizer(spiece)
    tokens = tokenizer([prepare_prompt(c, aes=None) for c in captions], max_length=length)
    if tokens.truncated.any():
        raise ValueError(f"captions longer than {length} tokens: raise text_length")
    return tokens.input_ids, tokens.attention_mask


def t5_config(recipe: Recipe, spiece: Path) -> T5Config:
    from mlx_sora.prompts.tokenizer import T5Tokenizer

    return T5Config(vocab_size=T5Tokenizer(spiece).vocab_size, **recipe.t5)


def init_t5(model: T5Encoder) -> None:
    """transformers' T5PreTrainedModel._init_weights (initializer_factor 1)."""
    c = model.config
    model.embed_tokens.weight = mx.random.normal(model.embed_tokens.weight.shape)
    model.relative_attention_bias.weight = mx.random.normal(model.relative_attention_bias.weight.shape) * c.d_model**-0.5
    for block in model.blocks:
        a, f = block.attention, block.ff
        a.q.weight = mx.random.normal(a.q.weight.shape) * (c.d_model * c.d_kv) ** -0.5
        a.k.weight = mx.random.normal(a.k.weight.shape) * c.d_model**-0.5
        a.v.weight = mx.random.normal(a.v.weight.shape) * c.d_model**-0.5
        a.o.weight = mx.random.normal(a.o.weight.shape) * (c.num_heads * c.d_kv) ** -0.5
        for name in ("wi_0", "wi_1", "wi"):
            if name in f:
                f[name].weight = mx.random.normal(f[name].weight.shape) * c.d_model**-0.5
        f.wo.weight = mx.random.normal(f.wo.weight.shape) * c.d_ff**-0.5


# ------------------------------------------------------------------------------ STDiT3


def stdit3_config(recipe: Recipe, caption_channels: int) -> STDiT3Config:
    return STDiT3Config.from_dict({**recipe.stdit3, "caption_channels": caption_channels,
                                   "model_max_length": recipe.text_length})


def init_stdit3(model: STDiT3) -> None:
    """STDiT3.initialize_weights of the reference: xavier-uniform Linear weights and zero biases; the
    fps embedder's first layer N(0, 0.02), its last layer zero; the temporal blocks' attention,
    cross-attention and MLP output projections zero."""
    glorot = nn.init.glorot_uniform()
    for _, module in model.named_modules():
        if isinstance(module, nn.Linear):
            module.weight = glorot(module.weight)
            if "bias" in module:
                module.bias = mx.zeros_like(module.bias)
    fps = model.fps_embedder.mlp
    fps[0].weight = mx.random.normal(fps[0].weight.shape) * 0.02
    fps[2].weight = mx.zeros_like(fps[2].weight)
    for block in model.temporal_blocks:
        for layer in (block.attn.proj, block.cross_attn.proj, block.mlp.fc2):
            layer.weight = mx.zeros_like(layer.weight)


class TextToVideo(nn.Module):
    """The two jointly trained models (one parameter tree for the optimizer)."""

    def __init__(self, text_encoder: T5Encoder, stdit3: STDiT3):
        super().__init__()
        self.text_encoder = text_encoder
        self.stdit3 = stdit3


def rectified_flow_loss(model: TextToVideo, x0, noise, t, input_ids, mask, drop, cond):
    """Open-Sora 1.2 RFlowScheduler.training_losses with the STDiT3's caption dropout."""
    x_t = add_noise(x0, noise, t)
    y = model.text_encoder(input_ids, mask)  # [B, L, C]
    null = model.stdit3.y_embedder.y_embedding[None]  # CaptionEmbedder.token_drop
    y = mx.where(drop[:, None, None], null, y)
    out = model.stdit3(x_t, t, y[:, None], mask=mask, fps=cond["fps"], height=cond["height"], width=cond["width"])
    velocity = out[:, : x0.shape[1]]  # model_output.chunk(2, dim=1)[0] with pred_sigma
    return mx.mean((velocity - (x0 - noise)) ** 2)


def add_noise(x0: mx.array, noise: mx.array, t: mx.array, num_timesteps: int = 1000) -> mx.array:
    """x_t = (1 - t/T) x0 + (t/T) noise (RFlowScheduler.add_noise)."""
    keep = (1.0 - t / num_timesteps)[:, None, None, None, None]
    return keep * x0 + (1.0 - keep) * noise


def sample_timesteps(rng: np.random.Generator, batch: int, cond: dict, method: str = "uniform",
                     num_timesteps: int = 1000) -> mx.array:
    """Training timesteps in (0, T), as Open-Sora 1.2's ``RFlowScheduler`` draws them.

    ``"logit-normal"``: logit-normal(0, 1), then the resolution/frames timestep transform (its
    ``sample_method="logit-normal", use_timestep_transform=True``). At 64x64x17 the transform's ratio
    is 0.28, which moves almost every t to low noise (t > 0.8 for 0.4 % of samples), so the model
    never learns the high-noise steps where the sampler decides layout and motion: its videos follow
    the caption's color but move in a direction set by the noise. ``"uniform"`` (``sample_method=
    "uniform", use_timestep_transform=False``) trains every noise level alike; the sampler still uses
    the transformed schedule.
    """
    if method == "uniform":
        return mx.array((rng.random(batch) * num_timesteps).astype(np.float32))
    if method != "logit-normal":
        raise ValueError(f"unknown timestep sampling {method!r}: use 'uniform' or 'logit-normal'")
    t = 1.0 / (1.0 + np.exp(-rng.standard_normal(batch)))
    t = mx.array((t * num_timesteps).astype(np.float32))
    return timestep_transform(t, cond["height"], cond["width"], cond["num_frames"], num_timesteps=num_timesteps)


def stage_dit(recipe: Recipe, run: Path, pool: np.ndarray, specs: list[clips.ClipSpec], log: Log) -> None:
    start = time.perf_counter()
    latents = np.load(run / "latents.npy")
    if len(latents) != len(specs):
        raise ValueError(f"{run / 'latents.npy'} holds {len(latents)} clips, not {len(specs)}: rerun the vae stage")
    log(f"normalised latents {latents.shape}: mean {latents.mean():+.3f} std {latents.std():.3f}")

    spiece = train_tokenizer(recipe, run / "tokenizer")
    captions = [clips.caption(s) for s in specs]
    input_ids, mask = tokenize(spiece, captions, recipe.text_length)
    log(f"tokenizer: {spiece} ({t5_config(recipe, spiece).vocab_size} ids with the 100 sentinels); "
        f"{prepare_prompt(captions[0], aes=None)!r} -> {input_ids[0][: int(mask[0].sum())].tolist()}")

    mx.random.seed(recipe.seed + 3)
    rng = np.random.default_rng(recipe.seed + 3)
    text_encoder = T5Encoder(t5_config(recipe, spiece))
    init_t5(text_encoder)
    dit = STDiT3(stdit3_config(recipe, text_encoder.config.d_model))
    init_stdit3(dit)
    model = TextToVideo(text_encoder, dit)
    mx.eval(model.parameters())
    log(f"T5: {param_count(text_encoder):,} parameters; STDiT3: {param_count(dit):,} parameters")

    b = recipe.dit_batch
    cond = {
        "height": mx.full((b,), float(recipe.size)), "width": mx.full((b,), float(recipe.size)),
        "num_frames": mx.full((b,), float(recipe.frames)), "fps": mx.full((b,), float(recipe.fps)),
    }
    opt = optim.AdamW(learning_rate=lr_schedule(recipe.dit_lr, recipe.dit_steps, recipe.dit_warmup), weight_decay=0.0,
                      bias_correction=True)
    step_fn = nn.value_and_grad(model, rectified_flow_loss)
    ema = tree_map(lambda p: p, model.parameters()) if recipe.ema_decay > 0 else None
    dropout = recipe.stdit3["class_dropout_prob"]
    t0, running = time.perf_counter(), []
    for step in range(recipe.dit_steps):
        idx = rng.integers(len(latents), size=b)
        x0 = mx.array(latents[idx])
        noise = mx.array(rng.standard_normal(x0.shape).astype(np.float32))
        t = sample_timesteps(rng, b, cond, recipe.dit_timesteps)
        drop = mx.array(rng.random(b) < dropout)
        loss, grads = step_fn(model, x0, noise, t, mx.array(input_ids[idx]), mx.array(mask[idx]), drop, cond)
        opt.update(model, grads)
        if ema is not None:
            d = recipe.ema_decay
            ema = tree_map(lambda e, p: d * e + (1 - d) * p, ema, model.parameters())
        mx.eval(model.parameters(), opt.state, ema if ema is not None else [], loss)
        running.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == recipe.dit_steps:
            log(f"STDiT3 step {step + 1}/{recipe.dit_steps} loss {np.mean(running):.4f} "
                f"({(time.perf_counter() - t0) / (step + 1):.2f} s/step)")
            running = []
    save_weights(model, run / "text_to_video_last.safetensors")
    if ema is not None:
        model.update(ema)
    save_weights(model.text_encoder, run / "t5.safetensors")
    save_weights(model.stdit3, run / "stdit3.safetensors")
    kept = f"EMA {recipe.ema_decay}" if ema is not None else "final weights"
    log(f"text encoder + STDiT3 stage done in {time.perf_counter() - start:.1f}s ({kept} saved)")


# ------------------------------------------------------------------------------ packaging


def package(run: Path, out: Path, dtype: str, log: Log) -> None:
    """Write the converted folders text_encoder/, stdit3/, vae/ and demo.json from a run folder."""
    from mlx_sora import save_model

    recipe = Recipe.from_dict(json.loads((run / "recipe.json").read_text()))
    stats = json.loads((run / "latent_stats.json").read_text())
    spiece = run / "tokenizer" / "spiece.model"
    out.mkdir(parents=True, exist_ok=True)

    vae, vae_cfg = build_vae(recipe, stats)
    load_weights(vae.spatial_vae, run / "spatial_vae.safetensors")
    load_weights(vae.temporal_vae, run / "temporal_vae.safetensors")
    save_model(vae, out / "vae", "vae", vae_cfg.to_dict(), dtype=dtype, overwrite=True)

    t5_cfg = t5_config(recipe, spiece)
    text_encoder = T5Encoder(t5_cfg)
    load_weights(text_encoder, run / "t5.safetensors")
    save_model(text_encoder, out / "text_encoder", "t5", asdict(t5_cfg), dtype=dtype, source_dir=spiece.parent,
               overwrite=True)

    dit_cfg = stdit3_config(recipe, t5_cfg.d_model)
    dit = STDiT3(dit_cfg)
    load_weights(dit, run / "stdit3.safetensors")
    save_model(dit, out / "stdit3", "stdit3", dit_cfg.to_dict(), dtype=dtype, overwrite=True)

    demo = {
        "height": recipe.size, "width": recipe.size, "num_frames": recipe.frames, "fps": recipe.fps,
        "steps": recipe.sampling_steps, "cfg_scale": recipe.cfg_scale, "aes": None, "flow": None,
        "camera_motion": None, "text_max_length": recipe.text_length,
        "prompt": clips.caption(clips.ClipSpec.single("red", "circle", "left")),
        "vocabulary": {"colors": clips.COLORS, "shapes": list(clips.SHAPES), "directions": list(clips.DIRECTIONS),
                       "background": list(clips.BACKGROUND)},
        "held_out": [list(c) for c in clips.HELD_OUT],
        "eval_seeds": list(clips.EVAL_SEEDS),
        "trained_with": {"seed": recipe.seed, "script": "scripts/train_demo.py", "clips": recipe.num_clips,
                         "caption_dropout": recipe.stdit3["class_dropout_prob"],
                         "objective": f"Open-Sora 1.2 rectified flow (training t: {recipe.dit_timesteps})"},
    }
    (out / "demo.json").write_text(json.dumps(demo, indent=2) + "\n")
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in out.iterdir() if p.is_dir()}
    log(f"packaged {out} ({dtype}): " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sorted(sizes.items()))
        + f"; total {sum(sizes.values()) / 1e6:.2f} MB")


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, help="raw checkpoints, log, tokenizer")
    parser.add_argument("--package-dir", type=Path, default=DEFAULT_PACKAGE_DIR)
    parser.add_argument("--stages", default="vae,dit", help="comma list of vae, dit (default: both)")
    parser.add_argument("--package-only", action="store_true", help="only rewrite --package-dir from --run-dir")
    parser.add_argument("--no-package", action="store_true")
    parser.add_argument("--dtype", default="float16", help="storage dtype of the packaged weights")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="override recipe fields")
    args = parser.parse_args(argv)

    run: Path = args.run_dir
    run.mkdir(parents=True, exist_ok=True)
    log = Log(run / "train.log")
    if args.package_only:
        package(run, args.package_dir, args.dtype, log)
        return

    recipe_path = run / "recipe.json"
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if "vae" not in stages and recipe_path.exists():  # keep the VAE the saved stats belong to
        recipe = Recipe.from_dict(json.loads(recipe_path.read_text()))
    else:
        recipe = Recipe()
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    if args.seed is not None:
        overrides["seed"] = args.seed
    recipe = dataclasses.replace(recipe, **overrides)
    recipe_path.write_text(json.dumps(asdict(recipe), indent=2) + "\n")
    log(f"run {run}: stages {stages}; recipe {json.dumps(asdict(recipe))}")
    log(f"python {sys.version.split()[0]}, mlx {mx.__version__}, device {mx.default_device()}")

    start = time.perf_counter()
    pool, specs = make_pool(recipe, log)
    with training_ops():
        if "vae" in stages:
            stage_vae(recipe, run, pool, log)
        if "dit" in stages:
            stage_dit(recipe, run, pool, specs, log)
    log(f"training done in {time.perf_counter() - start:.1f}s")
    if not args.no_package:
        package(run, args.package_dir, args.dtype, log)


if __name__ == "__main__":
    main()
