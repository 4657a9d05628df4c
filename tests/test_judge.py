"""The rule-based judge: 100% on clean generator clips, and it catches every wrong attribute."""

import itertools

import numpy as np
import pytest

from mlx_sora.demo import clips
from mlx_sora.demo.clips import ClipSpec, ObjectSpec, caption, make_clip
from mlx_sora.demo.judge import judge, judge_grid


def box_blur(video: np.ndarray, passes: int = 2) -> np.ndarray:
    """A soft, slightly noisy and dimmed copy (what a small VAE does to a clip)."""
    x = video.astype(np.float32)
    for _ in range(passes):
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        x = sum(padded[:, i : i + x.shape[1], j : j + x.shape[2]] for i in range(3) for j in range(3)) / 9
    noise = np.random.default_rng(0).normal(0, 6, x.shape)
    return np.clip(0.85 * x + 12 + noise, 0, 255).astype(np.uint8)


def test_clean_clips_of_every_combination_are_judged_right():
    results = []
    for i, combo in enumerate(clips.ALL_COMBOS):
        spec = ClipSpec.single(*combo)
        result = judge(make_clip(spec, seed=100 + i), caption(spec))
        assert result.adherent and result.consistent, result.summary()
        results.append(result)
    scores = judge_grid(results)
    assert scores["all"].count == len(clips.ALL_COMBOS)
    assert scores["held_out"].count == len(clips.HELD_OUT)
    for score in scores.values():
        assert score.color == score.motion == score.shape == score.adherence == score.consistent == 1.0
        assert score.consistency > 0.85


def test_blurred_noisy_clips_are_still_judged_right():
    for i, combo in enumerate(clips.ALL_COMBOS[::5]):
        spec = ClipSpec.single(*combo)
        result = judge(box_blur(make_clip(spec, seed=7 + i)), spec)
        assert result.adherent and result.consistent, result.summary()


def test_two_object_clips_are_judged_right():
    for spec, seed in itertools.islice(clips.training_specs(5, two_object_fraction=1.0), 15):
        result = judge(make_clip(spec, seed=seed), caption(spec))
        assert len(result.objects) == 2
        assert result.adherent and result.consistent, result.summary()


def _other(options, value, k=1):
    return [o for o in options if o != value][k % (len(options) - 1)]


@pytest.mark.parametrize("index", range(0, 72, 9))
def test_wrong_captions_are_rejected_attribute_by_attribute(index):
    color, shape, direction = clips.ALL_COMBOS[index]
    video = make_clip(ClipSpec.single(color, shape, direction), seed=index)
    for k in range(2):
        wrong_color = judge(video, caption(ClipSpec.single(_other(list(clips.COLORS), color, k), shape, direction)))
        assert not wrong_color.color and wrong_color.motion and wrong_color.shape and not wrong_color.adherent
        wrong_shape = judge(video, caption(ClipSpec.single(color, _other(clips.SHAPES, shape, k), direction)))
        assert wrong_shape.color and wrong_shape.motion and not wrong_shape.shape and not wrong_shape.adherent
        wrong_motion = judge(video, caption(ClipSpec.single(color, shape, _other(list(clips.DIRECTIONS), direction, k))))
        assert wrong_motion.color and not wrong_motion.motion and wrong_motion.shape and not wrong_motion.adherent


def test_two_object_caption_with_one_wrong_object_is_rejected():
    spec = ClipSpec((ObjectSpec("red", "circle", "left"), ObjectSpec("blue", "square", "up")))
    video = make_clip(spec, seed=2)
    assert judge(video, spec).adherent
    swapped = judge(video, "a red circle moving left and a blue square moving down")
    assert swapped.color and swapped.shape and not swapped.motion
    missing = judge(video, "a red circle moving left and a green square moving up")
    assert not missing.color


def test_a_still_object_has_no_direction():
    video = make_clip(ClipSpec.single("yellow", "circle", "right"), seed=0)
    still = np.repeat(video[:1], len(video), axis=0)
    result = judge(still, "a yellow circle moving right")
    assert result.objects[0].direction is None and not result.motion and result.color and result.shape


def test_an_empty_video_fails_everything():
    result = judge(np.zeros((17, 64, 64, 3), np.uint8), "a red circle moving left")
    assert not (result.color or result.motion or result.shape or result.consistent)


def test_flicker_is_not_temporally_consistent():
    video = make_clip(ClipSpec.single("cyan", "square", "left"), seed=1)
    video[1::2] = 0  # the object vanishes every other frame
    assert not judge(video, "a cyan square moving left").consistent


def test_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        judge(np.zeros((17, 64, 64, 3), np.float32), "a red circle moving left")
    with pytest.raises(ValueError, match="cannot parse"):
        judge(np.zeros((17, 64, 64, 3), np.uint8), "a dog running")
