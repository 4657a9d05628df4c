"""Open-Sora 1.2's other inference modes on the embedded demo model: image-to-video and a 2-loop
extension, measured (and, with ``--strip-dir``, drawn as frame strips for the README).

* image-to-video: a frame of a generated clip (``--frame`` of "a red circle moving right", seed 0) is
  the reference of a new video (mask strategy ``0``: latent frame 0 fixed, edit ratio 0); prints the
  PSNR of the new video's first frame against the reference (what the VAE's round trip keeps), the
  same for a fresh clip of the prompt (no reference; how far an unconditioned first frame is), and
  the judge's verdict (color, motion) on the new video;
* loop: ``--loop 2`` with 34-frame clips and ``--condition-frame-length 5`` (17 frames): prints the
  PSNR of the frames the second clip shares with the first (its first 17 frames against the first
  clip's last 17) and the mean absolute change between consecutive frames at the seam of the joined
  video against the mean within the clips.

    python scripts/eval_modes.py [--steps 30] [--strip-dir docs]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from mlx_sora import Pipeline
from mlx_sora.demo.judge import judge

PROMPT = "a red circle moving right"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def strip(rows: list[list[np.ndarray]], path: Path, scale: int = 2) -> None:
    from PIL import Image

    def cell(f: np.ndarray) -> np.ndarray:
        return np.pad(f.repeat(scale, 0).repeat(scale, 1), ((2, 2), (2, 2), (0, 0)), constant_values=255)

    width = max(len(r) for r in rows)
    blank = np.full_like(rows[0][0], 255)
    lines = [np.concatenate([cell(f) for f in r + [blank] * (width - len(r))], axis=1) for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(lines, axis=0)).save(path)
    print(f"wrote {path}")


def vae_round_trip(pipe: Pipeline, frame: np.ndarray) -> np.ndarray:
    """The frame through the VAE alone: preprocessed as a reference, encoded, decoded as one frame."""
    import mlx.core as mx

    from mlx_sora import load_model
    from mlx_sora.conditioning import load_reference
    from mlx_sora.io.video import to_uint8_frames

    vae = load_model(pipe.components["vae"])
    x = load_reference(frame, frame.shape[:2]).video[None]
    return to_uint8_frames(np.array(vae.decode(vae.encode(mx.array(x)), num_frames=1))[0])[0]


def image_to_video(pipe: Pipeline, steps: int, frame: int, strip_dir: Path | None) -> dict:
    start = time.perf_counter()
    source = pipe.generate(PROMPT, seed=0, steps=steps).videos[0]
    reference = source[frame]
    result = pipe.generate(PROMPT, seed=1, steps=steps, references=[reference], mask_strategy="0")
    plain = pipe.generate(PROMPT, seed=1, steps=steps).videos[0]
    video = result.videos[0]
    verdict = judge(video, PROMPT)
    out = dict(first_frame_psnr=psnr(video[0], reference), unconditioned_first_frame_psnr=psnr(plain[0], reference),
               vae_round_trip_psnr=psnr(vae_round_trip(pipe, reference), reference),
               color=verdict.color, motion=verdict.motion, seconds=time.perf_counter() - start)
    print(f"image-to-video (frame {frame} of '{PROMPT}' seed 0 -> seed 1, {steps} steps): first frame PSNR "
          f"{out['first_frame_psnr']:.2f} dB against the reference (unconditioned seed 1: "
          f"{out['unconditioned_first_frame_psnr']:.2f} dB; the VAE's round trip of the frame alone: "
          f"{out['vae_round_trip_psnr']:.2f} dB); judge: color {verdict.color}, motion {verdict.motion} "
          f"({verdict.summary()})")
    if strip_dir is not None:
        strip([[reference] + list(source[::2]), [reference] + list(video[::2]), [reference] + list(plain[::2])],
              strip_dir / "image_to_video.png")
    return out


def loop_extension(pipe: Pipeline, steps: int, strip_dir: Path | None) -> dict:
    start = time.perf_counter()
    result = pipe.generate(PROMPT, seed=0, steps=steps, num_frames=34, loop=2, condition_frame_length=5)
    first, second = (clip[0] for clip in result.loop_videos)
    video = result.videos[0]
    overlap = psnr(second[:17], first[17:])
    diffs = np.abs(np.diff(video.astype(np.float64), axis=0)).mean(axis=(1, 2, 3))
    seam, chunk = 33, 16  # 33 -> 34: the first clip's last frame, then the second clip's 18th; 16 -> 17: the
    # first clip's own boundary between its two 17-frame VAE chunks (decoded independently, as the reference)
    others = np.delete(diffs, [seam, chunk])
    out = dict(overlap_psnr=overlap, seam_change=float(diffs[seam]), chunk_change=float(diffs[chunk]),
               mean_change=float(others.mean()), frames=video.shape[0], seconds=time.perf_counter() - start,
               color=judge(video, PROMPT).color)
    print(f"loop 2 x 34 frames ({steps} steps) -> {out['frames']} frames: overlap PSNR {overlap:.2f} dB (the second "
          f"clip's first 17 frames against the first clip's last 17); mean change at the seam {out['seam_change']:.2f} "
          f"gray levels, at the first clip's own VAE-chunk boundary {out['chunk_change']:.2f}, elsewhere "
          f"{out['mean_change']:.2f}; judge color {out['color']}")
    if strip_dir is not None:
        strip([list(first[::3]), [np.full_like(first[0], 255)] * 6 + list(second[1::3]), list(video[::3])],
              strip_dir / "loop.png")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--frame", type=int, default=8, help="the frame of the source clip used as the reference")
    p.add_argument("--strip-dir", type=Path, default=None)
    args = p.parse_args()
    pipe = Pipeline.from_pretrained(dtype="float32", memory_budget=None)
    image_to_video(pipe, args.steps, args.frame, args.strip_dir)
    loop_extension(pipe, args.steps, args.strip_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
