"""Frames to uint8 and atomic mp4 writing (H.264, yuv420p) with PyAV."""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..errors import UserError, describe_os_error
from .fsutil import apply_umask


def to_uint8_frames(video: np.ndarray) -> np.ndarray:
    """[3, T, H, W] float in [-1, 1] -> [T, H, W, 3] uint8, rounded as the reference ``save_sample``."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a [3, T, H, W] video, got shape {video.shape}")
    x = (np.clip(video.astype(np.float32), -1.0, 1.0) + 1.0) / 2.0
    x = np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)  # truncation after +0.5, like torch .to(uint8)
    return np.ascontiguousarray(x.transpose(1, 2, 3, 0))


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even sizes: an odd height/width gets one replicated edge row/column."""
    _, h, w, _ = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def check_writable(path: str | Path) -> Path:
    """Fail early (before any heavy work) when the output cannot be written; creates nothing."""
    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise UserError(f"--output {path} must end in .mp4")
    if path.is_dir():
        raise UserError(f"--output {path} is a folder; give a file name ending in .mp4")
    ancestor = path.parent if str(path.parent) else Path(".")
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"--output {path}: {ancestor} is a file, not a folder")
    try:  # a real probe: permission bits do not tell for root, read-only mounts or /proc
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as e:
        raise UserError(f"--output {path}: cannot write in {ancestor} ({e.strerror or e})") from e
    return path


def write_mp4(path: str | Path, frames: np.ndarray, fps: int, crf: int = 18) -> Path:
    """Write [T, H, W, 3] uint8 frames as H.264 mp4, atomically (temp file + rename).

    On any failure (e.g. a full disk) the temporary file is removed and nothing is left at ``path``.
    """
    path = Path(path)
    os.replace(stage_mp4(path, frames, fps, crf), path)
    return path


def stage_mp4(path: str | Path, frames: np.ndarray, fps: int, crf: int = 18) -> Path:
    """Encode the mp4 of ``path`` into a hidden temporary file beside it and return that file; the
    caller renames it to ``path`` (``os.replace``) or removes it. On any failure nothing is left."""
    import av

    path = check_writable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(describe_os_error(e, f"create the output folder {path.parent}")) from e
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected [T, H, W, 3] uint8 frames, got {frames.dtype} {frames.shape}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    frames = pad_to_even(frames)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".mp4.part", dir=path.parent)
    os.close(fd)
    try:
        apply_umask(tmp_name, directory=False)  # mkstemp makes 0600; a video is shared like any file
        with av.open(tmp_name, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return Path(tmp_name)
