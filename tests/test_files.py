"""Prompt files and the reference's sample naming (opensora/utils/inference_utils.py load_prompts,
get_save_path_name at 8d132d7)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlx_sora.errors import UserError
from mlx_sora.prompts.files import check_sample_name, load_prompt_file, sample_path


def _reference_load_prompts(path, start, end):  # the reference's function, as written there
    with open(path) as f:
        prompts = [line.strip() for line in f.readlines()]
    return prompts[start:end]


def test_prompt_file_selects_lines_like_the_reference(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a red circle\n  a blue square moving up  \n|0|a sunny day|1|a rainy day\n"
                 'a cat.{"reference_path": "cat.png", "mask_strategy": "0"}\n')
    for start, end in ((None, None), (1, None), (1, 3), (2, 10)):
        got = load_prompt_file(f, start, end)
        assert [p.text for p in got] == _reference_load_prompts(f, start or 0, end)
    got = load_prompt_file(f, 1, 3)
    assert [(p.index, p.line) for p in got] == [(1, 2), (2, 3)] and got[0].where == f"{f} line 2"


def test_bad_prompt_files_name_the_file_and_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red circle\n\na blue square\n")
    with pytest.raises(UserError, match=r"p.txt line 2: the line is empty"):
        load_prompt_file(f)
    assert [p.text for p in load_prompt_file(f, 2)] == ["a blue square"]
    with pytest.raises(UserError, match="no such file"):
        load_prompt_file(tmp_path / "missing.txt")
    f.write_bytes(b"a red circle\n\xff\xfe bad\n")
    with pytest.raises(UserError, match="line 2: not UTF-8"):
        load_prompt_file(f)
    f.write_text("a\n")
    with pytest.raises(UserError, match="no prompt in lines 5"):
        load_prompt_file(f, 4)
    with pytest.raises(UserError, match="--start-index"):
        load_prompt_file(f, -1)


def test_sample_names_follow_the_reference():
    assert sample_path("out", 3) == Path("out/sample_0003.mp4")
    assert sample_path("out", 12, "cat") == Path("out/cat_0012.mp4")
    assert sample_path("out", 0, None, seeds=2, k=1) == Path("out/sample_0000-1.mp4")
    with pytest.raises(UserError):
        check_sample_name("a/b")
