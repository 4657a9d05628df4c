"""Reference conditioning against the real Open-Sora 1.2 code (fixtures made by
scripts/make_fixtures_conditioning.py): mask-strategy and prompt-JSON parsing, the reference
preprocessing of an image and of a video, and the latent / frame mask apply_mask_strategy builds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from mlx_sora.conditioning import (
    MaskStrategy,
    apply_mask_strategy,
    check_conditioning,
    condition_frames,
    extract_prompt_json,
    find_nearest_point,
    load_reference,
    parse_mask_strategy,
)
from mlx_sora.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures" / "opensora12"
META = json.loads((FIXTURES / "conditioning_meta.json").read_text())


@pytest.fixture(scope="module")
def tensors() -> dict[str, np.ndarray]:
    return load_file(str(FIXTURES / "conditioning.safetensors"))


@pytest.mark.parametrize("case", META["parsers"]["mask_strategies"], ids=lambda c: repr(c["text"]))
def test_mask_strategy_parser_matches_reference(case):
    if "error" in case:
        with pytest.raises(UserError, match="--mask-strategy"):
            parse_mask_strategy(case["text"])
        return
    got = [list(vars(s).values()) for s in parse_mask_strategy(case["text"])]
    assert got == case["parsed"]


@pytest.mark.parametrize("text,field", [
    ("0,0,0,0,0", "length"), ("0,0,0,0,1,1.5", "edit ratio"), ("0,-1", "ids"), ("0,0,0,0,1,nan", "edit ratio"),
    ("0,0,x", "reference start"), ("0;1,a", "group 2 .1,a.: the reference id"), ("x", "loop id"),
])
def test_mask_strategy_errors_name_the_field(text, field):
    with pytest.raises(UserError, match=field):
        parse_mask_strategy(text)


@pytest.mark.parametrize("case", META["parsers"]["prompts"], ids=lambda c: c["text"][:30])
def test_prompt_json_matches_reference(case):
    if "error" in case:
        with pytest.raises(UserError):
            extract_prompt_json(case["text"])
        return
    assert extract_prompt_json(case["text"]) == (case["prompt"], case["reference_path"], case["mask_strategy"])


def test_find_nearest_point_and_dframe_match_reference():
    for c in META["parsers"]["find_nearest_point"]:
        assert find_nearest_point(c["value"], c["point"], c["max_value"]) == c["result"], c
    for n, frames in META["parsers"]["dframe_to_frame"].items():
        assert condition_frames(int(n)) == frames


@pytest.mark.parametrize("size", ["24x32", "64x48", "20x60", "37x53"])
def test_image_preprocessing_matches_reference(tensors, size):
    """Pillow's bicubic filter, reproduced in integer arithmetic: exact to the 8-bit pixel."""
    h, w = map(int, size.split("x"))
    got = load_reference(FIXTURES / "conditioning_image.png", (h, w))
    assert got.kind == "image"
    ref = tensors[f"image.{size}"]
    assert got.video.shape == ref.shape
    assert np.abs(got.video - ref).max() <= 1e-6  # /255 then normalise: float rounding only


@pytest.mark.parametrize("size", ["24x36", "36x52", "16x16"])
def test_video_preprocessing_matches_reference(tensors, size):
    h, w = map(int, size.split("x"))
    got = load_reference(FIXTURES / "conditioning_video.mp4", (h, w))
    assert got.kind == "video"
    ref = tensors[f"video.{size}"]
    assert got.video.shape == ref.shape
    assert np.abs(got.video - ref).max() <= 2e-6


def test_array_references_are_preprocessed_like_files(tensors):
    import av

    with av.open(str(FIXTURES / "conditioning_image.png")) as c:
        image = next(c.decode(video=0)).to_ndarray(format="rgb24")
    got = load_reference(image, (24, 32))
    np.testing.assert_array_equal(got.video, load_reference(FIXTURES / "conditioning_image.png", (24, 32)).video)


@pytest.mark.parametrize("case", META["apply_cases"], ids=lambda c: f"case{c['case']}")
def test_apply_mask_strategy_matches_reference(tensors, case):
    refs = [[tensors["apply.ref0_0"], tensors["apply.ref0_1"]], [tensors["apply.ref1_0"]]]
    z = tensors["apply.z"].copy()
    strategies = [parse_mask_strategy(s) for s in case["mask_strategy"]]
    mask = apply_mask_strategy(z, refs, strategies, case["loop"], case["align"])
    np.testing.assert_array_equal(z, tensors[f"apply.case{case['case']}.z"])
    np.testing.assert_array_equal(mask, tensors[f"apply.case{case['case']}.mask"])


def _latent_frames(frames: int) -> int:
    return 5 * (frames // 17) + -(-(frames % 17) // 4)


def test_check_conditioning_reads_and_checks_before_any_model(tmp_path):
    image = FIXTURES / "conditioning_image.png"
    spec = check_conditioning([[image], []], [parse_mask_strategy("0"), ()], (24, 32), 5, _latent_frames)
    assert spec.active and spec.has_references and spec.prompts[0].references[0].frames == 1
    with pytest.raises(UserError, match="missing.png: no such file"):
        check_conditioning([[tmp_path / "missing.png"]], [parse_mask_strategy("0")], (24, 32), 5, _latent_frames)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(UserError, match="broken.png: cannot be read"):
        check_conditioning([[broken]], [parse_mask_strategy("0")], (24, 32), 5, _latent_frames)
    with pytest.raises(UserError, match="unsupported file type '.txt'"):
        check_conditioning([[tmp_path / "x.txt"]], [parse_mask_strategy("0")], (24, 32), 5, _latent_frames)
    with pytest.raises(UserError, match="reference id 1 points past the references"):
        check_conditioning([[image]], [parse_mask_strategy("0,1")], (24, 32), 5, _latent_frames)
    with pytest.raises(UserError, match="reference start 1 points past the reference"):
        check_conditioning([[image]], [parse_mask_strategy("0,0,1")], (24, 32), 5, _latent_frames)
    with pytest.raises(UserError, match="target start -6 points past the video"):
        check_conditioning([[image]], [parse_mask_strategy("0,0,0,-6")], (24, 32), 5, _latent_frames)
    with pytest.raises(UserError, match="there is no reference to use; give one with --reference-path"):
        check_conditioning([[]], [parse_mask_strategy("0")], (24, 32), 5, _latent_frames)
    with pytest.raises(UserError, match="loop id 1 never runs"):
        check_conditioning([[image]], [parse_mask_strategy("1")], (24, 32), 5, _latent_frames)
    with pytest.raises(UserError, match="condition-frame-length 3"):
        check_conditioning([[]], [()], (24, 32), 10, _latent_frames, loops=2, condition_frame_length=3)
    with pytest.raises(UserError, match="longer than the clip"):
        check_conditioning([[]], [()], (24, 32), 5, _latent_frames, loops=2, condition_frame_length=10)
    # a video reference's latent length comes from its frames (9 frames -> 3 latent frames)
    video = tmp_path / "clip.mp4"
    shutil.copy(FIXTURES / "conditioning_video.mp4", video)
    check_conditioning([[video]], [parse_mask_strategy("0,0,-3,0,3")], (24, 32), 5, _latent_frames)
    with pytest.raises(UserError, match="reference start 3 points past"):
        check_conditioning([[video]], [parse_mask_strategy("0,0,3")], (24, 32), 5, _latent_frames)


def test_loop_strategies_follow_append_generated():
    """Loop i >= 1 adds 'i,<last reference>,-L,0,L,edit' (the reference's append_generated), after the
    prompt's own strategies of that loop."""
    spec = check_conditioning([[FIXTURES / "conditioning_image.png"], []],
                              [parse_mask_strategy("0;1,0,0,2,1"), ()], (24, 32), 10, _latent_frames,
                              loops=3, condition_frame_length=5, condition_frame_edit=0.25)
    assert spec.strategies_in_loop(0, 0, 0) == [MaskStrategy()]
    assert spec.strategies_in_loop(0, 1, 1) == [MaskStrategy(1, 0, 0, 2, 1), MaskStrategy(1, 1, -5, 0, 5, 0.25)]
    assert spec.strategies_in_loop(1, 2, 2) == [MaskStrategy(2, 1, -5, 0, 5, 0.25)]
    assert META["loop"]["final_mask_strategy"] == ["0;1,1,-5,0,5,0.0", "1,0,-5,0,5,0.0"]


def test_notes_for_unused_references_and_whole_clip_loops():
    spec = check_conditioning([[FIXTURES / "conditioning_image.png"]], [()], (24, 32), 5, _latent_frames, loops=2)
    assert any("no mask strategy uses it" in n for n in spec.notes)
    assert any("conditions on the whole previous clip" in n for n in spec.notes)
