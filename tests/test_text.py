"""Open-Sora prompt preprocessing == the reference strings in fixtures/opensora12/text_preprocessing.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlx_sora.prompts.text import (
    append_score_to_prompts,
    clean_caption,
    extract_prompts_loop,
    merge_prompt,
    prepare_prompt,
    split_prompt,
    text_preprocessing,
)

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "opensora12" / "text_preprocessing.json").read_text())
CASES = FIXTURE["cases"]

# every field of the fixture, computed by our functions
FIELDS = {
    "text_preprocessing": text_preprocessing,
    "append_score_aes6.5": lambda p: append_score_to_prompts([p], aes=6.5)[0],
    "append_score_aes6.5_flow4.0_camera_pan_right":
        lambda p: append_score_to_prompts([p], aes=6.5, flow=4.0, camera_motion="pan right")[0],
    "pipeline_aes6.5": lambda p: prepare_prompt(p, aes=6.5),
    "pipeline_aes6.5_flow4.0_camera_pan_right":
        lambda p: prepare_prompt(p, aes=6.5, flow=4.0, camera_motion="pan right"),
    "pipeline_no_score": lambda p: prepare_prompt(p, aes=None),
}


def test_fixture_fields_are_all_covered():
    assert len(CASES) >= 17
    for case in CASES:
        assert set(case) == {"prompt", *FIELDS}


@pytest.mark.parametrize("case", CASES, ids=[c["prompt"][:30] for c in CASES])
def test_equal_to_reference(case):
    for field, fn in FIELDS.items():
        assert fn(case["prompt"]) == case[field], field


def test_default_is_open_sora_sample_setting():
    case = CASES[0]
    assert prepare_prompt(case["prompt"]) == case["pipeline_aes6.5"]


def test_loop_prompts_split_merge_and_extract():
    prompt = "|0| a beautiful day |2|a rainy day"
    texts, loops = split_prompt(prompt)
    assert (texts, loops) == (["a beautiful day", "a rainy day"], [0, 2])
    assert split_prompt("plain") == (["plain"], None)
    assert merge_prompt(texts, loops) == "|0|a beautiful day|2|a rainy day"
    assert merge_prompt(["plain"]) == "plain"
    merged = merge_prompt(texts, loops)
    assert [extract_prompts_loop([merged, "plain"], i) for i in range(4)] == [
        ["a beautiful day", "plain"], ["a beautiful day", "plain"], ["a rainy day", "plain"], ["a rainy day", "plain"]]
    with pytest.raises(ValueError, match="loop index"):
        split_prompt("|0|a|x|b")
    with pytest.raises(ValueError, match="pairs"):
        split_prompt("|0|a|2")


def test_clean_caption_single_pass_and_bad_markup():
    # one pass already lowercases and strips html; the second pass is idempotent here
    assert clean_caption("<b>Hello</b>   World") == "hello world"
    assert text_preprocessing("  MiXeD  ", use_text_preprocessing=False) == "mixed"
    with pytest.raises(ValueError, match="HTML parser rejects"):
        text_preprocessing("a <![> b")
    with pytest.raises(TypeError):
        prepare_prompt(None)
