"""Open-Sora 1.2's video autoencoder (``OpenSoraVAE_V1_2`` = ``VideoAutoencoderPipeline``) in MLX.

Reproduces opensora/models/vae/vae.py (commit 8d132d7): a per-frame SDXL VAE (``vae_spatial.py``, 8x
spatial compression, latents scaled by 0.18215) followed by a temporal VAE (``vae_temporal.py``, 4x
temporal compression), with the per-channel latent normalisation ``z = (z_t - shift) / scale``.

Boundary layout: videos ``[B, 3, T, H, W]`` in [-1, 1] and latents ``[B, 4, T_lat, H/8, W/8]``, as the
reference; inside everything is channels-last.

Bounded memory: decoding runs the temporal decoder on independent chunks of 5 latent frames (17
video frames: the reference's micro_frame_size), then the spatial decoder on micro-batches of frames,
evaluating each piece before the next, so the peak holds one chunk's activations, not the clip's.
``decode_chunks`` yields the frames piece by piece; optional spatial tiling (diffusers' tiled_decode
algorithm) bounds the per-frame activations at 480p/720p.

The converter knows the released checkpoint hpcai-tech/OpenSora-VAE-v1.2, whose config.json names
its parts only by reference (spatial: PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers, temporal:
VAE_Temporal_SD); checkpoints that record explicit sub-configs (``vae_2d_config``, ``vae_temporal``
kwargs) are read as written.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

import mlx.core as mx
import mlx.nn as nn

from . import ModelFamily, fast_ops, register_family
from .config_checks import require_int, require_number
from .units import Unit, WeightPolicy, attach_units, run_units
from .vae_spatial import KNOWN_SPATIAL_VAES, AutoencoderKL, AutoencoderKLConfig
from .vae_temporal import VAE_TEMPORAL_SD_CONFIG, VAE_Temporal, VAETemporalConfig

SPATIAL_SCALING_FACTOR = 0.18215  # VideoAutoencoderKL's default; NOT the SDXL config's 0.13025
RELEASE_SHIFT = (-0.10, 0.34, 0.27, 0.98)  # OpenSoraVAE_V1_2()
RELEASE_SCALE = (3.85, 2.32, 2.33, 3.06)


@dataclass(frozen=True)
class VideoAutoencoderConfig:
    spatial_vae: AutoencoderKLConfig = AutoencoderKLConfig()
    temporal_vae: VAETemporalConfig = VAETemporalConfig()
    shift: tuple[float, ...] = RELEASE_SHIFT
    scale: tuple[float, ...] = RELEASE_SCALE
    micro_frame_size: int | None = 17
    micro_batch_size: int | None = 4
    spatial_scaling_factor: float = SPATIAL_SCALING_FACTOR

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "VideoAutoencoderConfig":
        values: dict[str, Any] = {}
        if "spatial_vae" in config:
            values["spatial_vae"] = AutoencoderKLConfig.from_dict(config["spatial_vae"])
        if "temporal_vae" in config:
            values["temporal_vae"] = VAETemporalConfig.from_dict(config["temporal_vae"])
        for key in ("shift", "scale"):
            if key in config:
                values[key] = _floats(config[key])
        for key in ("micro_frame_size", "micro_batch_size", "spatial_scaling_factor"):
            if key in config:
                values[key] = config[key]
        return cls(**values)

    def __post_init__(self) -> None:
        latent = self.temporal_vae.embed_dim
        if self.spatial_vae.latent_channels != self.temporal_vae.in_out_channels:
            raise ValueError(
                f"VAE config: spatial latent_channels {self.spatial_vae.latent_channels} != temporal "
                f"in_out_channels {self.temporal_vae.in_out_channels}"
            )
        for name in ("shift", "scale"):
            n = len(getattr(self, name))
            if n not in (1, latent):
                raise ValueError(f"VAE config: {name} has {n} values; need 1 or {latent} (one per latent channel)")
        for name in ("micro_frame_size", "micro_batch_size"):
            if getattr(self, name) is not None:
                require_int("VAE config", name, getattr(self, name), 1, 4096)
        require_number("VAE config", "spatial_scaling_factor", self.spatial_scaling_factor, positive=True)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spatial_vae": dict(self.spatial_vae.__dict__),
            "temporal_vae": dict(self.temporal_vae.__dict__),
            "shift": list(self.shift),
            "scale": list(self.scale),
            "micro_frame_size": self.micro_frame_size,
            "micro_batch_size": self.micro_batch_size,
            "spatial_scaling_factor": self.spatial_scaling_factor,
        }


class OpenSoraVAE(nn.Module):
    """``VideoAutoencoderPipeline``: spatial AutoencoderKL + temporal VAE + latent normalisation.

    Options (plain attributes): ``micro_batch_size`` (images per spatial-decoder call; None = a whole
    temporal chunk; the peak memory of the spatial stage is about proportional to it) and spatial
    tiling, ``set_tiling(True, tile_size, overlap)`` in latent pixels (``overlap / tile_size`` is
    diffusers' tile_overlap_factor).
    """

    def __init__(self, config: VideoAutoencoderConfig | dict[str, Any], compute_dtype: mx.Dtype = mx.float32):
        super().__init__()
        if isinstance(config, dict):
            config = VideoAutoencoderConfig.from_dict(config)
        self.config = config
        self.spatial_vae = AutoencoderKL(config.spatial_vae)
        self.temporal_vae = VAE_Temporal(config.temporal_vae)
        self.scale = mx.array(config.scale, dtype=mx.float32)
        self.shift = mx.array(config.shift, dtype=mx.float32)
        self.micro_frame_size = config.micro_frame_size
        self.micro_batch_size = config.micro_batch_size
        self.tiling = False
        self.tile_size = 32
        self.tile_overlap = 8
        self.compute_dtype = compute_dtype
        # whether memory estimates assume the CPU fast path; None: this machine's (projections set it)
        self.cpu_fast_path: bool | None = None
        self._attach_units()

    def _attach_units(self) -> None:
        """Units: the decoders in stages (each stage's weights + activations stay bounded) and one
        unit per encoder. Chains: ``temporal_decoder_units`` ((z_chunk, num_frames) -> spatial
        latents) and ``spatial_decoder_units`` (spatial latents / scaling factor -> frames)."""
        temporal, spatial = self.temporal_vae, self.spatial_vae
        t_dec, s_dec = temporal.decoder, spatial.decoder
        t_levels = list(reversed(range(len(t_dec.block_res_blocks))))
        s_levels = list(range(len(s_dec.up_blocks)))
        units = [
            Unit("latent_stats", ("scale", "shift"), self._denormalize),
            Unit("temporal_decoder_in",
                 ("temporal_vae.post_quant_conv", "temporal_vae.decoder.conv1", "temporal_vae.decoder.res_blocks"),
                 lambda c: (t_dec.stage_in(temporal.post_quant_conv(c[0])), c[1])),
            *(Unit(f"temporal_decoder_up_{level}",
                   (f"temporal_vae.decoder.block_res_blocks.{level}",)
                   + ((f"temporal_vae.decoder.conv_blocks.{level - 1}",) if level > 0 else ()),
                   partial(lambda level, c: (t_dec.stage_up(level, c[0]), c[1]), level))
              for level in t_levels),
            Unit("temporal_decoder_out", ("temporal_vae.decoder.norm1", "temporal_vae.decoder.conv_out"),
                 lambda c: t_dec.stage_out(c[0])[:, temporal.time_padding(c[1]) :]),
            Unit("spatial_decoder_in",
                 ("spatial_vae.post_quant_conv", "spatial_vae.decoder.conv_in", "spatial_vae.decoder.mid_block"),
                 lambda z: s_dec.stage_in(spatial.post_quant_conv(z) if "post_quant_conv" in spatial else z)),
            *(Unit(f"spatial_decoder_up_{i}", (f"spatial_vae.decoder.up_blocks.{i}",), partial(s_dec.stage_up, i))
              for i in s_levels),
            Unit("spatial_decoder_out", ("spatial_vae.decoder.conv_norm_out", "spatial_vae.decoder.conv_out"),
                 s_dec.stage_out),
            Unit("spatial_encoder", ("spatial_vae.encoder", "spatial_vae.quant_conv"), spatial.encode),
            Unit("temporal_encoder", ("temporal_vae.encoder", "temporal_vae.quant_conv"), temporal.encode),
        ]
        attach_units(
            self, units,
            temporal_decoder_units=["latent_stats", "temporal_decoder_in",
                                    *(f"temporal_decoder_up_{level}" for level in t_levels), "temporal_decoder_out"],
            spatial_decoder_units=["spatial_decoder_in", *(f"spatial_decoder_up_{i}" for i in s_levels),
                                   "spatial_decoder_out"],
            encoder_units=["spatial_encoder", "temporal_encoder"],
        )

    def _denormalize(self, carry: tuple[mx.array, int]) -> tuple[mx.array, int]:
        """Unit ``latent_stats``: normalised latent chunk -> temporal-VAE latent (``z * scale + shift``)."""
        z, num_frames = carry
        dtype = self.compute_dtype
        return z * self.scale.astype(dtype) + self.shift.astype(dtype), num_frames

    def set_tiling(self, enabled: bool = True, tile_size: int = 32, overlap: int = 8) -> None:
        """Spatial tiling of the decoder: tiles of ``tile_size`` latent pixels (8x that in the image),
        consecutive tiles overlapping by ``overlap`` latent pixels, blended linearly (diffusers'
        tiled_decode). Frames no larger than one tile are decoded whole."""
        if tile_size < 1 or not 0 <= overlap < tile_size:
            raise ValueError(f"tiling needs tile_size >= 1 and 0 <= overlap < tile_size, got {tile_size}, {overlap}")
        self.tiling, self.tile_size, self.tile_overlap = enabled, tile_size, overlap

    # ------------------------------------------------------------------ sizes

    @property
    def latent_channels(self) -> int:
        return self.config.temporal_vae.embed_dim

    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_vae.downsample_factor

    @property
    def micro_z_frame_size(self) -> int | None:
        if self.micro_frame_size is None:
            return None
        return self.temporal_vae.get_latent_size((self.micro_frame_size, None, None))[0]

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames of a clip: 5 * (n // 17) + ceil((n % 17) / 4) with the release settings."""
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        temporal = self.temporal_vae
        if self.micro_frame_size is None:
            return temporal.get_latent_size((num_frames, None, None))[0]
        full, rest = divmod(num_frames, self.micro_frame_size)
        size = full * self.micro_z_frame_size
        return size + (temporal.get_latent_size((rest, None, None))[0] if rest else 0)

    def get_latent_size(self, input_size: tuple[int | None, int | None, int | None]) -> list[int | None]:
        """(T, H, W) -> (T_lat, H // 8, W // 8), as VideoAutoencoderPipeline.get_latent_size."""
        t, h, w = input_size
        f = self.spatial_factor
        return [
            None if t is None else self.latent_frames(t),
            None if h is None else h // f,
            None if w is None else w // f,
        ]

    def max_frames(self, latent_frames: int) -> int:
        """The longest clip whose latent has ``latent_frames`` frames."""
        factor = self.config.temporal_vae.time_downsample_factor
        if self.micro_frame_size is None:
            return latent_frames * factor
        full, rest = divmod(latent_frames, self.micro_z_frame_size)
        return full * self.micro_frame_size + rest * factor

    # ------------------------------------------------------------------ memory

    # Peak activation memory per pixel, measured at float32 on the released architecture: the
    # temporal decoder per latent pixel of one 5-frame chunk, the spatial decoder per output pixel of
    # one frame. With MLX's own convolutions (im2col buffers of the 3x3 convs at full resolution
    # dominate; what runs off the CPU fast path) ...
    TEMPORAL_BYTES_PER_LATENT_PIXEL = 1.6e6
    SPATIAL_BYTES_PER_PIXEL = 3.2e4
    # ... and on the CPU fast path (Winograd / tap-by-tap products, no im2col): measured 2.8e5 and
    # 8.7e3 at 256x256, micro-batch 1 (scripts/bench_vae.py: stage peak minus the 0.80 GiB of decoder
    # weights), with a 1.6x / 1.5x margin.
    CPU_TEMPORAL_BYTES_PER_LATENT_PIXEL = 4.5e5
    CPU_SPATIAL_BYTES_PER_PIXEL = 1.3e4

    def decode_activation_bytes(self, batch: int, latent_h: int, latent_w: int) -> int:
        """Estimated peak of the decoding activations with the current micro-batch and tiling."""
        config, itemsize_ratio = self.config, self.compute_dtype.size / 4
        cpu = (fast_ops.fast_cpu() if self.cpu_fast_path is None else self.cpu_fast_path) and \
            self.compute_dtype == mx.float32
        per_latent_pixel = self.CPU_TEMPORAL_BYTES_PER_LATENT_PIXEL if cpu else self.TEMPORAL_BYTES_PER_LATENT_PIXEL
        per_pixel = self.CPU_SPATIAL_BYTES_PER_PIXEL if cpu else self.SPATIAL_BYTES_PER_PIXEL
        temporal_width = config.temporal_vae.filters * max(config.temporal_vae.channel_multipliers) / 512
        temporal = per_latent_pixel * temporal_width * batch * latent_h * latent_w
        f = self.spatial_factor
        if self.tiling and max(latent_h, latent_w) > self.tile_size:
            tile_h, tile_w = min(self.tile_size, latent_h), min(self.tile_size, latent_w)
        else:
            tile_h, tile_w = latent_h, latent_w
        images = self.micro_batch_size or batch * (self.micro_frame_size or 17)
        spatial_width = max(config.spatial_vae.block_out_channels) / 512
        spatial = per_pixel * spatial_width * images * (f * tile_h) * (f * tile_w)
        return int(itemsize_ratio * max(temporal, spatial))

    # ------------------------------------------------------------------ decoding

    def _check_latent(self, z: mx.array) -> None:
        if z.ndim != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(
                f"OpenSoraVAE.decode expects latents [B, {self.latent_channels}, T_lat, H/8, W/8] "
                f"(the reference layout), got shape {tuple(z.shape)}"
            )

    def temporal_chunks(self, latent_frames: int, num_frames: int) -> list[tuple[int, int, int]]:
        """(first latent frame, end latent frame, video frames) of each independent temporal chunk,
        exactly as VideoAutoencoderPipeline.decode splits them."""
        if self.micro_frame_size is None:
            return [(0, latent_frames, num_frames)]
        step = self.micro_z_frame_size
        chunks, remaining = [], num_frames
        for start in range(0, latent_frames, step):
            chunks.append((start, min(start + step, latent_frames), min(self.micro_frame_size, remaining)))
            remaining -= self.micro_frame_size
        return chunks

    def decode_spatial(self, x_z: mx.array, weights: WeightPolicy | None = None) -> mx.array:
        """Spatial latents ``[N, h, w, 4]`` (scaled by 0.18215) -> frames ``[N, 8h, 8w, 3]``, in
        micro-batches of ``micro_batch_size`` frames, each evaluated; tiled when enabled."""
        self.spatial_vae._check(x_z, self.config.spatial_vae.latent_channels, "decode")

        def decode(latents: mx.array) -> mx.array:
            return run_units(self.spatial_decoder_units, latents, weights, evaluate=True)

        n = x_z.shape[0]
        step = self.micro_batch_size or n
        outputs = []
        for i in range(0, n, step):
            latents = x_z[i : i + step] / self.config.spatial_scaling_factor
            if self.tiling:
                frames = self.spatial_vae.tiled_decode(latents, self.tile_size, self.tile_overlap, decode)
            else:
                frames = decode(latents)
            mx.eval(frames)
            outputs.append(frames)
        return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=0)

    def decode_temporal(
        self, z: mx.array, num_frames: int | None = None, weights: WeightPolicy | None = None
    ) -> Iterator[mx.array]:
        """Stage 1 of decoding: yields the temporal decoder's output chunk by chunk (evaluated),
        spatial latents ``[B, t, h, w, 4]`` channels-last, t <= micro_frame_size. Bad input raises
        here, before the first chunk."""
        num_frames = self._checked_num_frames(z, num_frames)
        return self._decode_temporal(z, num_frames, weights)

    def _checked_num_frames(self, z: mx.array, num_frames: int | None) -> int:
        self._check_latent(z)
        latent_frames = z.shape[2]
        if num_frames is None:
            return self.max_frames(latent_frames)
        if num_frames < 1 or self.latent_frames(num_frames) != latent_frames:
            have = self.latent_frames(num_frames) if num_frames >= 1 else 0
            raise ValueError(
                f"OpenSoraVAE.decode: num_frames={num_frames} gives {have} latent frames but z has "
                f"{latent_frames}; pass the frame count the latent was made for"
            )
        return num_frames

    def _decode_temporal(self, z: mx.array, num_frames: int, weights: WeightPolicy | None) -> Iterator[mx.array]:
        latent_frames = z.shape[2]
        z = z.astype(self.compute_dtype).transpose(0, 2, 3, 4, 1)  # [B, T_lat, h, w, C]
        for start, end, frames in self.temporal_chunks(latent_frames, num_frames):
            chunk = z[:, start:end]
            self.temporal_vae.check_decode_input(chunk, frames)
            x_z = run_units(self.temporal_decoder_units, (chunk, frames), weights, evaluate=True)
            mx.eval(x_z)
            yield x_z

    def decode_chunks(
        self, z: mx.array, num_frames: int | None = None, channels_last: bool = False,
        weights: WeightPolicy | None = None,
    ) -> Iterator[mx.array]:
        """Decode piece by piece: yields evaluated frame chunks in order, ``[B, 3, t, H, W]`` (or
        ``[B, t, H, W, 3]`` with ``channels_last``), t <= micro_batch_size frames. Concatenating them
        along time gives ``decode(z, num_frames)``.

        ``num_frames`` must map to z's latent frame count (``latent_frames``); None takes the longest
        such clip (17 per full chunk, 4 per latent frame of a partial one).
        """
        temporal = self.decode_temporal(z, num_frames, weights)  # validates now
        return self._decode_spatial_pieces(temporal, z.shape[0], channels_last, weights)

    def _decode_spatial_pieces(
        self, temporal: Iterator[mx.array], batch: int, channels_last: bool, weights: WeightPolicy | None
    ) -> Iterator[mx.array]:
        per_call = max(1, (self.micro_batch_size or 10**9) // batch)
        for x_z in temporal:
            for f0 in range(0, x_z.shape[1], per_call):
                part = x_z[:, f0 : f0 + per_call]
                b, t, h, w, c = part.shape
                video = self.decode_spatial(part.reshape(b * t, h, w, c), weights)
                video = video.reshape(b, t, *video.shape[1:])
                yield video if channels_last else video.transpose(0, 4, 1, 2, 3)

    def decode(
        self,
        z: mx.array,
        num_frames: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> mx.array:
        """``[B, 4, T_lat, h, w]`` -> video ``[B, 3, num_frames, 8h, 8w]`` (unclamped, ~[-1, 1]).
        ``progress(frames_done, num_frames)`` is called after every decoded piece."""
        total = self._checked_num_frames(z, num_frames)
        pieces, done = [], 0
        for piece in self.decode_chunks(z, num_frames):
            pieces.append(piece)
            done += piece.shape[2]
            if progress is not None:
                progress(done, total)
        return mx.concatenate(pieces, axis=2)

    # ------------------------------------------------------------------ encoding

    def encode_activation_bytes(self, batch: int, height: int, width: int) -> int:
        """Estimated peak of the encoding activations (frames of ``height`` x ``width``). The encoders
        mirror the decoders (same widths per level, one resnet fewer), so the decoders' measured
        per-pixel peaks with the current micro-batch are used as the bound."""
        f = self.spatial_factor
        tiling = self.tiling
        self.tiling = False  # the encoder runs whole frames
        try:
            return self.decode_activation_bytes(batch, -(-height // f), -(-width // f))
        finally:
            self.tiling = tiling

    def encode(self, x: mx.array, key: mx.array | None = None, weights: WeightPolicy | None = None) -> mx.array:
        """Video ``[B, 3, T, H, W]`` in [-1, 1] -> normalised latent ``[B, 4, T_lat, H/8, W/8]``.

        Deterministic by default: both posteriors give their mean (``.mode()``); with ``key`` they are
        sampled (the reference samples; its fixtures replace sampling by the mean). ``weights``: the
        encoder units' weight policy (CI-DL streaming; the deterministic path only)."""
        if weights is not None and key is not None:
            raise ValueError("OpenSoraVAE.encode: a sampled posterior (key) runs the encoders directly, without weights")
        spatial_unit, temporal_unit = self.encoder_units
        channels = self.config.spatial_vae.in_channels
        if x.ndim != 5 or x.shape[1] != channels:
            raise ValueError(
                f"OpenSoraVAE.encode expects video [B, {channels}, T, H, W] (the reference layout), got "
                f"shape {tuple(x.shape)}"
            )
        keys = [None, None] if key is None else list(mx.random.split(key, 2))
        batch, _, frames, height, width = x.shape
        images = x.astype(self.compute_dtype).transpose(0, 2, 3, 4, 1).reshape(batch * frames, height, width, channels)
        step = self.micro_batch_size or images.shape[0]
        latents = []
        for i in range(0, images.shape[0], step):
            if keys[0] is None:
                part = run_units((spatial_unit,), images[i : i + step], weights, evaluate=True)
            else:
                part = self.spatial_vae.encode(images[i : i + step], key=mx.random.fold_in(keys[0], i))
            part = part * self.config.spatial_scaling_factor
            mx.eval(part)
            latents.append(part)
        x_z = mx.concatenate(latents, axis=0)
        x_z = x_z.reshape(batch, frames, *x_z.shape[1:])
        chunk = self.micro_frame_size or frames
        zs = []
        for i in range(0, frames, chunk):
            if keys[1] is None:
                part = run_units((temporal_unit,), x_z[:, i : i + chunk], weights, evaluate=True)
            else:
                part = self.temporal_vae.encode(x_z[:, i : i + chunk], key=mx.random.fold_in(keys[1], i))
            mx.eval(part)
            zs.append(part)
        z = mx.concatenate(zs, axis=1)
        z = (z - self.shift.astype(z.dtype)) / self.scale.astype(z.dtype)
        return z.transpose(0, 4, 1, 2, 3)


# ---------------------------------------------------------------------------- converter family

_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _matches(hf_config: dict, checkpoint) -> bool:
    if hf_config.get("model_type") == "VideoAutoencoderPipeline":
        return True
    return "VideoAutoencoderPipeline" in (hf_config.get("architectures") or [])


def _spatial_config(hf_config: dict) -> dict[str, Any]:
    if "vae_2d_config" in hf_config:
        return dict(hf_config["vae_2d_config"])
    vae_2d = hf_config.get("vae_2d") or {}
    name = vae_2d.get("from_pretrained")
    if vae_2d.get("type", "VideoAutoencoderKL") != "VideoAutoencoderKL" or name not in KNOWN_SPATIAL_VAES:
        raise ValueError(
            f"VAE checkpoint: unknown spatial VAE {vae_2d!r}; known: type VideoAutoencoderKL from "
            f"{sorted(KNOWN_SPATIAL_VAES)}, or record the diffusers AutoencoderKL config as 'vae_2d_config'"
        )
    return dict(KNOWN_SPATIAL_VAES[name])


def _temporal_config(hf_config: dict) -> dict[str, Any]:
    spec = dict(hf_config.get("vae_temporal") or {})
    kind = spec.pop("type", None)
    spec.pop("from_pretrained", None)
    if kind == "VAE_Temporal_SD":
        return {**spec, **VAE_TEMPORAL_SD_CONFIG}  # the factory fixes these, extra kwargs pass through
    if kind == "VAE_Temporal":
        return spec
    raise ValueError(
        f"VAE checkpoint: unknown temporal VAE type {kind!r}; known: VAE_Temporal_SD, VAE_Temporal (with kwargs)"
    )


def _floats(value: Any) -> tuple[float, ...]:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    for v in values:
        require_number("VAE config", "shift/scale", v)
    return tuple(float(v) for v in values)


def _config_from_hf(hf_config: dict, checkpoint) -> dict:
    spatial = AutoencoderKLConfig.from_dict(_spatial_config(hf_config))
    temporal = VAETemporalConfig.from_dict(_temporal_config(hf_config))
    vae_2d = hf_config.get("vae_2d") or {}
    config = VideoAutoencoderConfig(
        spatial_vae=spatial,
        temporal_vae=temporal,
        shift=_floats(hf_config.get("shift", 0.0)),
        scale=_floats(hf_config.get("scale", 1.0)),
        micro_frame_size=hf_config.get("micro_frame_size"),
        micro_batch_size=vae_2d.get("micro_batch_size"),
        spatial_scaling_factor=float(vae_2d.get("scaling_factor", SPATIAL_SCALING_FACTOR)),
    )
    return config.to_dict()


def _rename(hf_key: str, config: dict) -> str | None:
    if hf_key.startswith("spatial_vae.module."):
        key = "spatial_vae." + hf_key[len("spatial_vae.module.") :]
        parts = key.split(".")
        if "attentions" in parts and len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION_NAMES:
            parts[-2] = _LEGACY_ATTENTION_NAMES[parts[-2]]  # pre-0.14 diffusers attention names
        return ".".join(parts)
    return hf_key  # temporal_vae.*, scale, shift: same names; anything else is reported as unexpected


def _transform(mlx_key: str, value: mx.array) -> mx.array:
    if mlx_key in ("scale", "shift"):
        return value.reshape(-1)
    if mlx_key.endswith(".weight") and ".attentions." in mlx_key:
        return value.reshape(value.shape[0], value.shape[1]) if value.ndim == 4 else value
    if value.ndim == 4:
        return value.transpose(0, 2, 3, 1)
    if value.ndim == 5:
        return value.transpose(0, 2, 3, 4, 1)
    return value


FAMILY = register_family(
    ModelFamily(
        model_type="vae",
        matches=_matches,
        config_from_hf=_config_from_hf,
        rename=_rename,
        build=lambda config: OpenSoraVAE(VideoAutoencoderConfig.from_dict(config)),
        transform=_transform,
        keep_float32=lambda key: key in ("scale", "shift"),
    )
)
