"""Frames to uint8 (as the reference save_sample) and atomic mp4 writing."""

from __future__ import annotations

import os

import av
import numpy as np
import pytest
import torch

from mlx_sora.io.video import pad_to_even, to_uint8_frames, write_mp4


def test_uint8_conversion_matches_reference_save_sample():
    rng = np.random.default_rng(0)
    video = rng.uniform(-1.3, 1.3, size=(3, 4, 6, 5)).astype(np.float32)
    x = torch.from_numpy(video.copy())  # opensora/datasets/utils.py: save_sample, normalize=True
    x.clamp_(min=-1, max=1)
    x.sub_(-1).div_(max(1 - -1, 1e-5))
    ref = x.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 3, 0).to("cpu", torch.uint8).numpy()
    np.testing.assert_array_equal(to_uint8_frames(video), ref)


def test_pad_to_even():
    frames = np.arange(2 * 3 * 5 * 3, dtype=np.uint8).reshape(2, 3, 5, 3)
    padded = pad_to_even(frames)
    assert padded.shape == (2, 4, 6, 3)
    np.testing.assert_array_equal(padded[:, :3, :5], frames)
    np.testing.assert_array_equal(padded[:, 3], padded[:, 2])


def test_write_mp4_roundtrip(tmp_path):
    frames = np.zeros((5, 30, 41, 3), dtype=np.uint8)
    frames[:, :, :, 0] = np.linspace(0, 255, 41).astype(np.uint8)
    path = write_mp4(tmp_path / "v.mp4", frames, fps=12)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert stream.average_rate == 12 and stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
    assert len(decoded) == 5 and decoded[0].shape == (30, 42, 3)
    assert np.abs(decoded[2][:, :41].astype(int) - frames[2].astype(int)).mean() < 3
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    frames = np.zeros((6, 16, 16, 3), dtype=np.uint8)
    calls = {"n": 0}
    original = av.VideoFrame.from_ndarray

    def failing(*args, **kwargs):  # e.g. the disk fills up in the middle of the video
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(28, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", failing)
    with pytest.raises(OSError, match="No space"):
        write_mp4(tmp_path / "v.mp4", frames, fps=24)
    assert list(tmp_path.iterdir()) == []


def test_existing_file_is_replaced_only_on_success(tmp_path, monkeypatch):
    target = tmp_path / "v.mp4"
    target.write_bytes(b"previous video")
    monkeypatch.setattr(av.VideoFrame, "from_ndarray", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        write_mp4(target, np.zeros((2, 8, 8, 3), dtype=np.uint8), fps=24)
    assert target.read_bytes() == b"previous video"


@pytest.mark.parametrize("name, message", [("v.avi", "must end in .mp4"), ("sub", "is a folder")])
def test_bad_output_paths(tmp_path, name, message):
    (tmp_path / "sub.mp4").mkdir()
    target = tmp_path / (name if name != "sub" else "sub.mp4")
    with pytest.raises(ValueError, match=message):
        write_mp4(target, np.zeros((1, 8, 8, 3), dtype=np.uint8), fps=24)


@pytest.mark.parametrize("umask, mode", [(0o002, 0o664), (0o077, 0o600)])
def test_mp4_mode_follows_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)  # mkstemp alone would give 0o600 whatever the umask
    try:
        path = write_mp4(tmp_path / "v.mp4", np.zeros((1, 8, 8, 3), dtype=np.uint8), fps=24)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == mode
