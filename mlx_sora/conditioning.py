"""Reference conditioning, as Open-Sora 1.2 does it: image-to-video, video-to-video, connecting and
editing clips, and long videos made by extension (loops).

Reproduces ``opensora/utils/inference_utils.py`` (parse_mask_strategy, extract_json_from_prompts,
find_nearest_point, apply_mask_strategy, append_generated) and ``opensora/datasets/utils.py``
(read_from_path with the ``resize_crop`` transform) at hpcaitech/Open-Sora 8d132d7; the sampler's
side (which frames are re-noised and frozen at which step) lives in ``sampling.py``.

A mask strategy is ``loop,reference,reference_start,target_start,length,edit_ratio`` (trailing fields
may be left out: defaults ``0,0,0,0,1,0``), several joined by ``;``. In loop ``loop`` it copies
``length`` latent frames of reference ``reference`` from ``reference_start`` into the initial latent at
``target_start`` (negative starts count from the end) and marks them with ``edit_ratio``: 0 keeps them
as given, 1 regenerates them freely, in between they are re-noised once t falls to ``edit_ratio``.

References are images or videos read with PyAV, resized to cover the video size and centre-cropped
exactly as the reference: images with Pillow's bicubic filter on 8-bit pixels (reproduced here in
integer arithmetic), videos with PyTorch's bilinear ``interpolate`` on [0, 1] floats (reproduced in
float32, including its crop offset quirk), then mapped to [-1, 1] for the VAE encoder.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from .errors import UserError

# torchvision.datasets.folder.IMG_EXTENSIONS and opensora/datasets/utils.py VID_EXTENSIONS
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")
MASK_FIELDS = ("loop id", "reference id", "reference start", "target start", "length", "edit ratio")
MASK_DEFAULT = ("0", "0", "0", "0", "1", "0")
PROMPT_JSON_KEYS = ("reference_path", "mask_strategy")
LATENT_FRAMES_PER_CHUNK = 5  # condition-frame lengths are whole VAE chunks: 5 latent frames = 17 frames
FRAMES_PER_CHUNK = 17
MAX_REFERENCE_FRAMES = 4096
MAX_REFERENCE_BYTES = 2 * 2**30  # decoded RGB frames of one reference

# A reference: a file path, or frames already in memory (uint8 [H, W, 3] image, [T, H, W, 3] video)
ReferenceSource = Union[str, Path, np.ndarray]


# ---------------------------------------------------------------- mask strategies


@dataclass(frozen=True)
class MaskStrategy:
    """One ``loop,reference,reference_start,target_start,length,edit_ratio`` group."""

    loop: int = 0
    reference: int = 0
    reference_start: int = 0
    target_start: int = 0
    length: int = 1
    edit_ratio: float = 0.0

    def text(self) -> str:
        return (f"{self.loop},{self.reference},{self.reference_start},{self.target_start},{self.length},"
                f"{self.edit_ratio}")


def parse_mask_strategy(text: str | None, where: str = "--mask-strategy") -> tuple[MaskStrategy, ...]:
    """Parse ``'0,0,0,0,1,0;1,0,-5,0,5,0.3'`` as the reference's ``parse_mask_strategy``: groups split
    on ';', fields on ',', missing trailing fields take the defaults ``0,0,0,0,1,0``; the first five
    are integers (Python ``int``), the edit ratio a float. Stricter than the reference where it would
    do nothing or fail later: a length below 1, an edit ratio outside [0, 1] and negative ids are
    errors."""
    if text is None or text == "":
        return ()
    if not isinstance(text, str):
        raise UserError(f"{where}: a mask strategy is a string like '0,0,0,0,1,0', got {text!r}")
    strategies = []
    for number, group in enumerate(text.split(";"), start=1):
        fields = group.split(",")
        if len(fields) > len(MASK_FIELDS):
            raise UserError(f"{where} {text!r}: group {number} {group!r} has {len(fields)} fields; a group is at "
                            f"most {len(MASK_FIELDS)}: {','.join(f.replace(' ', '_') for f in MASK_FIELDS)}")
        fields = fields + list(MASK_DEFAULT[len(fields):])
        values: list[int | float] = []
        for name, value in zip(MASK_FIELDS, fields):
            try:
                values.append(float(value) if name == "edit ratio" else int(value))
            except ValueError:
                kind = "a number from 0 to 1" if name == "edit ratio" else "an integer"
                raise UserError(f"{where} {text!r}: group {number} {group!r}: the {name} {value!r} is not {kind} "
                                "(a group is loop,reference,reference_start,target_start,length,edit_ratio)") from None
        strategy = MaskStrategy(*values)
        if strategy.loop < 0 or strategy.reference < 0:
            raise UserError(f"{where} {text!r}: group {number} {group!r}: loop and reference ids are >= 0")
        if strategy.length < 1:
            raise UserError(f"{where} {text!r}: group {number} {group!r}: the length (latent frames) must be >= 1")
        if not (math.isfinite(strategy.edit_ratio) and 0.0 <= strategy.edit_ratio <= 1.0):
            raise UserError(f"{where} {text!r}: group {number} {group!r}: the edit ratio must be from 0 (keep) "
                            "to 1 (regenerate)")
        strategies.append(strategy)
    return tuple(strategies)


def extract_prompt_json(prompt: str, where: str = "--prompt") -> tuple[str, str | None, str | None]:
    """``'a cat.{"reference_path": "cat.png", "mask_strategy": "0"}'`` -> (text, reference_path,
    mask_strategy), as the reference's ``extract_json_from_prompts`` (the JSON starts at the first
    '{'; None where the prompt carries no such key)."""
    parts = re.split(r"(?=[{])", prompt)
    if len(parts) > 2:
        raise UserError(f"{where} {prompt!r}: a prompt carries at most one JSON object "
                        '(e.g. a cat.{"reference_path": "cat.png", "mask_strategy": "0"})')
    if len(parts) == 1:
        return prompt, None, None
    try:
        extra = json.loads(parts[1])
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: the JSON after the prompt text does not parse ({e.msg} at column "
                        f"{len(parts[0]) + e.colno}): {parts[1]!r}") from None
    if not isinstance(extra, dict):
        raise UserError(f"{where}: the JSON after the prompt text must be an object, got {parts[1]!r}")
    for key, value in extra.items():
        if key not in PROMPT_JSON_KEYS:
            raise UserError(f"{where}: unknown key {key!r} in the prompt's JSON; allowed: "
                            f"{', '.join(PROMPT_JSON_KEYS)}")
        if not isinstance(value, str):
            raise UserError(f"{where}: {key} in the prompt's JSON must be a string, got {value!r}")
    return parts[0], extra.get("reference_path"), extra.get("mask_strategy")


def find_nearest_point(value: int, point: int, max_value: int) -> int:
    """The reference's ``find_nearest_point`` (the ``align`` option): round down to a multiple of
    ``point``, up when past half of it and not into the last ``point`` frames."""
    t = value // point
    if value % point > point / 2 and t < max_value // point - 1:
        t += 1
    return t * point


# ---------------------------------------------------------------- reading references


def reference_kind(path: str | Path) -> str:
    """'image' or 'video' by extension, as the reference's read_from_path decides."""
    ext = Path(path).suffix.lower()
    if ext in VIDEO_EXTENSIONS:
        return "video"
    if ext in IMAGE_EXTENSIONS:
        return "image"
    raise UserError(f"reference {path}: unsupported file type {ext or '(none)'!r}; images: "
                    f"{' '.join(IMAGE_EXTENSIONS)}; videos: {' '.join(VIDEO_EXTENSIONS)}")


def read_reference_frames(path: str | Path) -> np.ndarray:
    """The frames of an image ([1, H, W, 3]) or a video ([T, H, W, 3]) file, uint8 RGB, via PyAV."""
    import av

    path = Path(path)
    if re.match(r"^[a-z][a-z0-9+.-]*://", str(path), re.IGNORECASE):
        raise UserError(f"reference {path}: only local files are read (download it first)")
    kind = reference_kind(path)
    if not path.is_file():
        raise UserError(f"reference {path}: no such file" if not path.exists() else f"reference {path}: not a file")
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UserError(f"reference {path}: the file holds no image or video stream")
            size = 0
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))  # torchvision's read_video: frame.to_rgb()
                size += frames[-1].nbytes
                if size > MAX_REFERENCE_BYTES:
                    raise UserError(f"reference {path}: more than {MAX_REFERENCE_BYTES >> 30} GiB of decoded frames "
                                    f"({len(frames)} frames of {frame.width}x{frame.height}); cut or scale the "
                                    "clip first")
                if kind == "image" or len(frames) > MAX_REFERENCE_FRAMES:
                    break
    except UserError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        what = "an image" if kind == "image" else "a video"
        raise UserError(f"reference {path}: cannot be read as {what} ({e})") from None
    if not frames:
        raise UserError(f"reference {path}: no frame could be decoded")
    if len(frames) > MAX_REFERENCE_FRAMES:
        raise UserError(f"reference {path}: more than {MAX_REFERENCE_FRAMES} frames; cut the clip first")
    return np.stack(frames)


def _cover_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int, bool]:
    """The size that covers ``target`` keeping the aspect ratio, and whether the height is fitted."""
    th, tw = target
    rh, rw = th / height, tw / width
    if rh > rw:
        return th, round(width * rh), True
    return round(height * rw), tw, False


def _pillow_bicubic_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` (libImaging/Resample.c) for the
    bicubic filter (a = -0.5, support 2): per output pixel the first input index and 22-bit
    fixed-point weights (zero past the window)."""
    precision_bits = 22
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    ksize = int(math.ceil(support)) * 2 + 1
    starts = np.zeros(out_size, dtype=np.int64)
    weights = np.zeros((out_size, ksize), dtype=np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        ws = []
        for x in range(xmax):
            d = abs((x + xmin - center + 0.5) / filter_scale)
            if d < 1.0:
                w = ((-0.5 + 2.0) * d - (-0.5 + 3.0)) * d * d + 1
            elif d < 2.0:
                w = (((d - 5) * d + 8) * d - 4) * -0.5
            else:
                w = 0.0
            ws.append(w)
        total = sum(ws)  # Pillow adds them in this order
        for x, w in enumerate(ws):
            w = w / total if total != 0.0 else w
            weights[xx, x] = int(-0.5 + w * (1 << precision_bits)) if w < 0 else int(0.5 + w * (1 << precision_bits))
        starts[xx] = xmin
    return starts, weights


def _pillow_resample_axis(pixels: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One pass of Pillow's 8-bit resampling along ``axis`` (rounded, clipped to uint8 as it does)."""
    in_size = pixels.shape[axis]
    if in_size == out_size:
        return pixels
    starts, weights = _pillow_bicubic_coefficients(in_size, out_size)
    moved = np.moveaxis(pixels.astype(np.int64), axis, 0)
    acc = np.full((out_size,) + moved.shape[1:], 1 << 21, dtype=np.int64)
    for k in range(weights.shape[1]):
        index = np.minimum(starts + k, in_size - 1)  # weights are 0 past the window
        w = weights[:, k].reshape((-1,) + (1,) * (moved.ndim - 1))
        acc += moved[index] * w
    out = np.clip(acc >> 22, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def resize_crop_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [h, w, 3]: the reference's ``resize_crop_to_fill`` for images (Pillow
    bicubic to cover the size, horizontal pass first, then a centred crop rounded half to even)."""
    height, width = image.shape[:2]
    sh, sw, fit_height = _cover_size(height, width, size)
    if (sh, sw) != (height, width):
        image = _pillow_resample_axis(_pillow_resample_axis(image, sw, axis=1), sh, axis=0)
    th, tw = size
    i, j = (0, int(round((sw - tw) / 2.0))) if fit_height else (int(round((sh - th) / 2.0)), 0)
    return image[i : i + th, j : j + tw]


def _bilinear_axis(x: np.ndarray, out_size: int, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's ``upsample_bilinear2d`` source indices and weights (align_corners=False, float32)."""
    in_size = x.shape[axis]
    if in_size == out_size:
        index = np.arange(out_size)
        return index, index, np.ones(out_size, np.float32), np.zeros(out_size, np.float32)
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.maximum(scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5),
                     np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lambda1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    i1 = i0 + (i0 < in_size - 1)
    return i0, i1, (np.float32(1) - lambda1).astype(np.float32), lambda1


def resize_crop_video(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [T, H, W, 3] -> float32 [T, h, w, 3] in [0, 1]: the reference's video ``ResizeCrop``
    (``video_transforms.resize_crop_to_fill``: bilinear, align_corners=False, no antialiasing, on
    frames divided by 255; crop offset ``int(round(s - t) / 2.0)``, i.e. rounded down)."""
    x = frames.astype(np.float32) / np.float32(255.0)
    height, width = x.shape[1:3]
    sh, sw, fit_height = _cover_size(height, width, size)
    h0, h1, hw0, hw1 = _bilinear_axis(x, sh, 1)
    w0, w1, ww0, ww1 = _bilinear_axis(x, sw, 2)
    wv0, wv1 = ww0[None, None, :, None], ww1[None, None, :, None]
    # the order PyTorch's CPU kernel sums in: rows of the two columns first, then the two rows
    top = x[:, h0][:, :, w0] * wv0 + x[:, h0][:, :, w1] * wv1
    bottom = x[:, h1][:, :, w0] * wv0 + x[:, h1][:, :, w1] * wv1
    resized = top * hw0[None, :, None, None] + bottom * hw1[None, :, None, None]
    th, tw = size
    i, j = (0, int((sw - tw) / 2.0)) if fit_height else (int((sh - th) / 2.0), 0)
    return resized[:, i : i + th, j : j + tw].astype(np.float32)


def preprocess_reference(frames: np.ndarray, size: tuple[int, int], kind: str) -> np.ndarray:
    """uint8 frames [T, H, W, 3] -> float32 [3, T, h, w] in [-1, 1] as the reference's ``resize_crop``
    transform (images: Pillow bicubic on 8-bit pixels; videos: bilinear on floats)."""
    if kind == "image":
        image = resize_crop_image(frames[0], size).astype(np.float32) / np.float32(255.0)
        x = image[None]
    else:
        x = resize_crop_video(frames, size)
    x = (x - np.float32(0.5)) / np.float32(0.5)
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2))


@dataclass(frozen=True, eq=False)
class Reference:
    """One reference, read and preprocessed: ``video`` [3, T, H, W] float32 in [-1, 1]."""

    name: str
    kind: str
    video: np.ndarray

    @property
    def frames(self) -> int:
        return self.video.shape[1]


def load_reference(source: ReferenceSource, size: tuple[int, int]) -> Reference:
    """Read (a path) or take (uint8 frames: [H, W, 3] an image, [T, H, W, 3] a video) a reference and
    preprocess it for a video of ``size`` (height, width)."""
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (3, 4) or source.shape[-1] != 3:
            raise UserError(f"a reference array must be uint8 [H, W, 3] (image) or [T, H, W, 3] (video), got "
                            f"{source.dtype} {source.shape}")
        kind = "image" if source.ndim == 3 else "video"
        frames = source[None] if source.ndim == 3 else source
        name = f"<{kind} array {'x'.join(map(str, source.shape))}>"
    else:
        kind, frames, name = reference_kind(source), read_reference_frames(source), str(source)
    return Reference(name, kind, preprocess_reference(frames, size, kind))


def split_reference_paths(text: str) -> list[str]:
    """``'a.png;b.mp4'`` -> ['a.png', 'b.mp4'] (the reference's separator)."""
    return [p for p in text.split(";")] if text else []


# ---------------------------------------------------------------- the conditioning of a request


@dataclass(frozen=True)
class PromptConditioning:
    """What conditions one prompt: its references and mask strategies."""

    references: tuple[Reference, ...] = ()
    strategies: tuple[MaskStrategy, ...] = ()


@dataclass(frozen=True)
class ConditioningSpec:
    """The conditioning of a request, checked: per prompt, and the loop settings."""

    prompts: tuple[PromptConditioning, ...]
    loops: int = 1
    condition_frame_length: int = 5
    condition_frame_edit: float = 0.0
    align: int | None = None
    notes: tuple[str, ...] = ()
    """Things the user should know (a reference nothing uses, loops that repeat whole clips)."""

    @property
    def active(self) -> bool:
        return self.loops > 1 or any(p.strategies for p in self.prompts)

    @property
    def has_references(self) -> bool:
        return any(p.references for p in self.prompts)

    def strategies_in_loop(self, prompt: int, loop: int, generated: int) -> list[MaskStrategy]:
        """The strategies of a prompt applied in ``loop``: its own, and (loop > 0) the one that the
        reference's ``append_generated`` adds for the previous clip (the reference index after the
        given ones and the clips before)."""
        own = [s for s in self.prompts[prompt].strategies if s.loop == loop]
        if loop == 0:
            return own
        appended = MaskStrategy(loop, len(self.prompts[prompt].references) + generated - 1,
                                -self.condition_frame_length, 0, self.condition_frame_length, self.condition_frame_edit)
        return own + [appended]


def check_conditioning(
    references: Sequence[Sequence[ReferenceSource]],
    strategies: Sequence[tuple[MaskStrategy, ...]],
    size: tuple[int, int],
    latent_frames: int,
    reference_latent_frames,
    loops: int = 1,
    condition_frame_length: int = 5,
    condition_frame_edit: float = 0.0,
    align: int | None = None,
    where: Sequence[str] = (),
) -> ConditioningSpec:
    """Read every reference and check every strategy against it, before any model runs.

    ``reference_latent_frames(frames)``: the latent frames of a clip of ``frames`` frames (the VAE's).
    ``where[i]``: how to name prompt i's source in messages (e.g. 'prompts.txt line 3')."""
    if isinstance(loops, bool) or not isinstance(loops, int) or not 1 <= loops <= 64:
        raise UserError(f"--loop must be an integer from 1 to 64, got {loops!r}")
    if loops > 1:
        length = condition_frame_length
        if (isinstance(length, bool) or not isinstance(length, int) or length < LATENT_FRAMES_PER_CHUNK
                or length % LATENT_FRAMES_PER_CHUNK):
            raise UserError(f"--condition-frame-length {condition_frame_length!r}: latent frames, a positive multiple "
                            f"of {LATENT_FRAMES_PER_CHUNK} (5 latent frames are {FRAMES_PER_CHUNK} video frames)")
        if condition_frame_length > latent_frames:
            raise UserError(f"--condition-frame-length {condition_frame_length} is longer than the clip "
                            f"({latent_frames} latent frames); use more --num-frames or a shorter condition")
        if not (isinstance(condition_frame_edit, (int, float)) and 0.0 <= condition_frame_edit <= 1.0):
            raise UserError(f"--condition-frame-edit must be from 0 (keep) to 1 (regenerate), got "
                            f"{condition_frame_edit!r}")
    if align is not None and (isinstance(align, bool) or not isinstance(align, int) or align < 1):
        raise UserError(f"--align must be a positive number of latent frames, got {align!r}")
    prompts, notes = [], []
    if loops > 1 and condition_frame_length == latent_frames:
        notes.append(f"--condition-frame-length {condition_frame_length} is the whole clip ({latent_frames} latent "
                     "frames): every loop conditions on the whole previous clip; use more --num-frames")
    for index, (sources, own) in enumerate(zip(references, strategies)):
        name = where[index] if index < len(where) else f"prompt {index}"
        loaded = []
        for source in sources:
            try:
                loaded.append(load_reference(source, size))
            except UserError as e:
                raise UserError(f"{name}: {e}") from None
        lengths = [reference_latent_frames(r.frames) for r in loaded]
        for s in own:
            _check_strategy(s, name, lengths, latent_frames, loops, align)
        if loaded and not own:
            notes.append(f"{name}: a reference is given but no mask strategy uses it (Open-Sora's default is none); "
                         "for image-to-video give --mask-strategy 0")
        prompts.append(PromptConditioning(tuple(loaded), tuple(own)))
    return ConditioningSpec(tuple(prompts), loops, condition_frame_length, float(condition_frame_edit), align,
                            tuple(notes))


def _check_strategy(s: MaskStrategy, name: str, lengths: list[int], latent_frames: int, loops: int,
                    align: int | None) -> None:
    text = f"{name}: mask strategy {s.text()!r}"
    if s.loop >= loops:
        raise UserError(f"{text}: loop id {s.loop} never runs (--loop {loops}: loops 0..{loops - 1})")
    available = len(lengths) + s.loop  # loop i also sees the clips of loops 0..i-1
    if not available:
        raise UserError(f"{text}: there is no reference to use; give one with --reference-path (or in the prompt's "
                        'JSON: {"reference_path": "..."})')
    if s.reference >= available:
        have = f"{len(lengths)} reference(s)" + (f" and {s.loop} generated clip(s)" if s.loop else "")
        raise UserError(f"{text}: reference id {s.reference} points past the references (there are {have}, "
                        f"ids 0..{available - 1})")
    ref_frames = lengths[s.reference] if s.reference < len(lengths) else latent_frames
    ref_start = s.reference_start + ref_frames if s.reference_start < 0 else s.reference_start
    target = s.target_start + latent_frames if s.target_start < 0 else s.target_start
    if align is not None:
        ref_start = find_nearest_point(ref_start, align, ref_frames)
        target = find_nearest_point(target, align, latent_frames)
    if not 0 <= ref_start < ref_frames:
        raise UserError(f"{text}: reference start {s.reference_start} points past the reference ({ref_frames} latent "
                        f"frame(s): starts {-ref_frames}..{ref_frames - 1})")
    if not 0 <= target < latent_frames:
        raise UserError(f"{text}: target start {s.target_start} points past the video ({latent_frames} latent "
                        f"frame(s): starts {-latent_frames}..{latent_frames - 1})")


def apply_mask_strategy(
    z: np.ndarray,
    references: Sequence[Sequence[np.ndarray]],
    strategies: Sequence[Sequence[MaskStrategy]],
    loop: int,
    align: int | None = None,
) -> np.ndarray:
    """The reference's ``apply_mask_strategy``: writes reference latents into ``z`` [B, C, T, H, W]
    (in place) and returns the frame mask [B, T] float32 (1 = generate, else the edit ratio).

    ``references[i][j]``: latent [C, T_j, H, W] of prompt i's reference j; ``strategies[i]``: prompt
    i's strategies (those of other loops are skipped)."""
    masks = []
    frames = z.shape[2]
    for i, own in enumerate(strategies):
        mask = np.ones(frames, dtype=np.float32)
        for s in own:
            if s.loop != loop:
                continue
            ref = references[i][s.reference]
            ref_start = ref.shape[1] + s.reference_start if s.reference_start < 0 else s.reference_start
            target = frames + s.target_start if s.target_start < 0 else s.target_start
            if align is not None:
                ref_start = find_nearest_point(ref_start, align, ref.shape[1])
                target = find_nearest_point(target, align, frames)
            length = min(s.length, frames - target, ref.shape[1] - ref_start)
            z[i, :, target : target + length] = ref[:, ref_start : ref_start + length]
            mask[target : target + length] = np.float32(s.edit_ratio)
        masks.append(mask)
    return np.stack(masks)


def condition_frames(condition_frame_length: int) -> int:
    """Video frames of ``condition_frame_length`` latent frames (the reference's ``dframe_to_frame``):
    what loops after the first drop from their clip before it is appended."""
    if condition_frame_length % LATENT_FRAMES_PER_CHUNK:
        raise ValueError(f"condition_frame_length must be a multiple of {LATENT_FRAMES_PER_CHUNK}, "
                         f"got {condition_frame_length}")
    return condition_frame_length // LATENT_FRAMES_PER_CHUNK * FRAMES_PER_CHUNK


__all__ = [
    "ConditioningSpec", "MaskStrategy", "PromptConditioning", "Reference", "apply_mask_strategy",
    "check_conditioning", "condition_frames", "extract_prompt_json", "find_nearest_point", "load_reference",
    "parse_mask_strategy", "preprocess_reference", "read_reference_frames", "resize_crop_image",
    "resize_crop_video", "split_reference_paths",
]


# ---------------------------------------------------------------- from options to a spec


def release_latent_frames(frames: int) -> int:
    """Latent frames of a clip with Open-Sora 1.2's VAE (17-frame chunks of 5, 4x in time)."""
    full, rest = divmod(frames, FRAMES_PER_CHUNK)
    return full * LATENT_FRAMES_PER_CHUNK + -(-rest // 4)


def _per_prompt(value, count: int, name: str) -> list:
    """An option given once for every prompt, or once per prompt."""
    if value is None or isinstance(value, (str, Path, np.ndarray)):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise UserError(f"{name}: give one value for every prompt or one per prompt ({count}), got {len(values)}")
    return values


def _sources(value) -> list[ReferenceSource]:
    if value is None or (isinstance(value, str) and value == ""):
        return []
    if isinstance(value, str):
        return split_reference_paths(value)
    if isinstance(value, (Path, np.ndarray)):
        return [value]
    return [s for item in value for s in _sources(item)]


def build_conditioning(
    prompts: Sequence[str],
    size: tuple[int, int],
    num_frames: int,
    references=None,
    mask_strategy=None,
    loop: int = 1,
    condition_frame_length: int = 5,
    condition_frame_edit: float = 0.0,
    align: int | None = None,
    latent_frames=release_latent_frames,
    where: Sequence[str] | None = None,
) -> tuple[list[str], ConditioningSpec | None]:
    """The prompts without their embedded JSON, and the checked conditioning (None: plain text-to-video).

    ``references``: for every prompt, or one entry per prompt; an entry is a path (several joined by
    ';' as in the reference), uint8 frames, or a list of those. With a single prompt a list is that
    prompt's references. ``mask_strategy``: a string for every prompt, or one per prompt. A prompt's
    embedded ``{"reference_path": ..., "mask_strategy": ...}`` replaces the option for that prompt,
    as in the reference."""
    where = list(where) if where is not None else [f"prompt {i}" for i in range(len(prompts))]
    if len(prompts) == 1 and references is not None and not isinstance(references, (str, Path, np.ndarray)):
        references = [references]
    refs = _per_prompt(references, len(prompts), "references (--reference-path)")
    strategies = _per_prompt(mask_strategy, len(prompts), "mask_strategy (--mask-strategy)")
    texts, sources, parsed = [], [], []
    for i, prompt in enumerate(prompts):
        text, ref_json, ms_json = extract_prompt_json(prompt, where[i])
        texts.append(text)
        sources.append(_sources(ref_json if ref_json is not None else refs[i]))
        parsed.append(parse_mask_strategy(ms_json if ms_json is not None else strategies[i], where[i] + " mask strategy"
                                          if ms_json is not None else "--mask-strategy"))
    if loop == 1 and not any(sources) and not any(parsed):
        return texts, None
    spec = check_conditioning(sources, parsed, size, latent_frames(num_frames), latent_frames, loop,
                              condition_frame_length, condition_frame_edit, align, where)
    return texts, spec
