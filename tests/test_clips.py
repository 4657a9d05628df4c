"""The procedural clip generator: determinism, captions, the held-out split and the evaluation grid."""

import itertools

import numpy as np
import pytest

from mlx_sora.demo import clips
from mlx_sora.demo.clips import ClipSpec, ObjectSpec, caption, make_clip, parse_caption


def test_make_clip_is_deterministic_and_seed_dependent():
    spec = ClipSpec.single("red", "circle", "left")
    a = make_clip(spec, seed=3)
    assert a.dtype == np.uint8 and a.shape == (clips.FRAMES, clips.SIZE, clips.SIZE, 3)
    np.testing.assert_array_equal(a, make_clip(spec, seed=3))
    assert not np.array_equal(a, make_clip(spec, seed=4))


def test_clip_shows_the_object_on_the_background():
    video = make_clip(ClipSpec.single("blue", "square", "down"), size=64, frames=17, seed=0)
    background = np.all(video == clips.BACKGROUND, axis=-1)
    assert 0.03 < 1 - background.mean() < 0.3  # an object of ~20 px on a 64 px frame
    inside = video[~background]
    assert np.all(inside[:, 2] >= inside[:, 0]) and np.all(inside[:, 2] >= inside[:, 1])  # blue dominates


def test_other_sizes_and_frame_counts():
    video = make_clip(ClipSpec.single("green", "triangle", "up"), size=96, frames=34, seed=1)
    assert video.shape == (34, 96, 96, 3)


@pytest.mark.parametrize("combo", clips.ALL_COMBOS[::7])
def test_caption_round_trip(combo):
    spec = ClipSpec.single(*combo)
    text = caption(spec)
    assert text == f"a {combo[0]} {combo[1]} moving {combo[2]}"
    assert parse_caption(text) == spec
    assert parse_caption("  A " + text[2:].upper() + ". ") == spec


def test_two_object_caption_round_trip_and_no_overlap():
    spec = ClipSpec((ObjectSpec("red", "circle", "left"), ObjectSpec("blue", "square", "up")))
    assert caption(spec) == "a red circle moving left and a blue square moving up"
    assert parse_caption(caption(spec)) == spec
    colors = np.array([clips.COLORS["red"], clips.COLORS["blue"]], dtype=np.float64)
    for seed in range(5):  # every lit pixel is one object's color times a coverage: no overlap
        pixels = make_clip(spec, seed=seed).reshape(-1, 3).astype(np.float64)
        pixels = pixels[pixels.max(axis=1) > 0]
        coverage = pixels @ colors.T / (colors * colors).sum(axis=1)  # best scale per color
        residual = np.linalg.norm(pixels[:, None] - coverage[..., None] * colors[None], axis=-1).min(axis=1)
        assert residual.max() < 2.0


@pytest.mark.parametrize("text", ["a red blob moving left", "a purple circle moving up", "red circle left", ""])
def test_parse_caption_rejects_unknown_words(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_specs_validate():
    with pytest.raises(ValueError):
        ObjectSpec("red", "hexagon", "left")
    with pytest.raises(ValueError):
        ClipSpec((ObjectSpec("red", "circle", "left"), ObjectSpec("red", "square", "up")))


def test_held_out_split():
    assert len(clips.ALL_COMBOS) == len(clips.COLORS) * len(clips.SHAPES) * len(clips.DIRECTIONS)
    assert set(clips.HELD_OUT) <= set(clips.ALL_COMBOS)
    assert not set(clips.HELD_OUT) & set(clips.TRAIN_COMBOS)
    assert set(clips.HELD_OUT) | set(clips.TRAIN_COMBOS) == set(clips.ALL_COMBOS)
    # composition: every color, shape and direction of a held-out combination is trained on
    for color, shape, direction in clips.HELD_OUT:
        assert any(c == color for c, _, _ in clips.TRAIN_COMBOS)
        assert any(s == shape for _, s, _ in clips.TRAIN_COMBOS)
        assert any(d == direction for _, _, d in clips.TRAIN_COMBOS)
    assert ClipSpec.single(*clips.HELD_OUT[0]).held_out
    assert not ClipSpec.single(*clips.TRAIN_COMBOS[0]).held_out


def test_training_specs_are_reproducible_and_never_held_out():
    first = list(itertools.islice(clips.training_specs(7, two_object_fraction=0.3), 300))
    assert first == list(itertools.islice(clips.training_specs(7, two_object_fraction=0.3), 300))
    assert first != list(itertools.islice(clips.training_specs(8, two_object_fraction=0.3), 300))
    assert not any(spec.held_out for spec, _ in first)
    assert any(len(spec.objects) == 2 for spec, _ in first)
    single = [spec for spec, _ in itertools.islice(clips.training_specs(7), 2000)]
    assert {s.objects[0].combo for s in single} == set(clips.TRAIN_COMBOS)


def test_eval_grid_covers_every_combination_and_seed():
    assert len(clips.EVAL_GRID) == len(clips.ALL_COMBOS) * len(clips.EVAL_SEEDS)
    assert {parse_caption(c).objects[0].combo for c, _ in clips.EVAL_GRID} == set(clips.ALL_COMBOS)
    assert {s for _, s in clips.EVAL_GRID} == set(clips.EVAL_SEEDS)
