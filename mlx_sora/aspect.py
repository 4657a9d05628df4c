"""Open-Sora 1.2 output sizes: resolution buckets, aspect ratios and frame-count presets.

Sizes are (height, width) in pixels from the reference tables (``opensora/datasets/aspect.py``:
``get_image_size``); aspect ratios are written height:width as there ("9:16" at 240p is 240 x 426).
"""

from __future__ import annotations

ASPECT_RATIOS = ("9:16", "16:9", "3:4", "4:3", "1:1")

IMAGE_SIZES: dict[str, dict[str, tuple[int, int]]] = {
    "144p": {"9:16": (144, 256), "16:9": (256, 144), "3:4": (166, 221), "4:3": (221, 165), "1:1": (192, 192)},
    "240p": {"9:16": (240, 426), "16:9": (426, 240), "3:4": (276, 368), "4:3": (370, 278), "1:1": (320, 320)},
    "360p": {"9:16": (360, 640), "16:9": (640, 360), "3:4": (416, 554), "4:3": (554, 416), "1:1": (480, 480)},
    "480p": {"9:16": (480, 854), "16:9": (854, 480), "3:4": (554, 738), "4:3": (740, 555), "1:1": (640, 640)},
    "720p": {"9:16": (720, 1280), "16:9": (1280, 720), "3:4": (832, 1110), "4:3": (1108, 832), "1:1": (960, 960)},
    # The PixArt-style "256" and "512" families (ASPECT_RATIO_256 / _512 at 8d132d7) hold no entry
    # for 9:16, 16:9, 3:4 or 4:3 (the reference asserts); 1:1 is the On-device Sora setting.
    "256": {"1:1": (256, 256)},
    "512": {"1:1": (512, 512)},
}

# Reference NUM_FRAMES_MAP (the "Nx" aliases included).
NUM_FRAMES_PRESETS: dict[str, int] = {
    "1x": 51, "2x": 102, "4x": 204, "8x": 408, "16x": 816,
    "2s": 51, "4s": 102, "8s": 204, "16s": 408, "32s": 816,
}


def image_size(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """(height, width) of a resolution bucket, or a clear error listing the valid choices."""
    if resolution not in IMAGE_SIZES:
        raise ValueError(f"unknown resolution {resolution!r}; choose one of {', '.join(IMAGE_SIZES)}")
    sizes = IMAGE_SIZES[resolution]
    if aspect_ratio not in sizes:
        choices = ", ".join(sizes)
        raise ValueError(f"aspect ratio {aspect_ratio!r} (height:width) is not a {resolution} bucket; choose {choices}")
    return sizes[aspect_ratio]


def num_frames(value: str | int) -> int:
    """Frame count from a preset ("2s" = 51, "4s" = 102, ...) or an integer."""
    if isinstance(value, str) and value in NUM_FRAMES_PRESETS:
        return NUM_FRAMES_PRESETS[value]
    try:
        frames = int(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"num_frames {value!r} is neither an integer nor a preset ({', '.join(NUM_FRAMES_PRESETS)})"
        ) from None
    if frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {frames}")
    return frames
