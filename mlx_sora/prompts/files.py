"""Prompt files and the reference's sample naming (``--prompt-path``, ``--save-dir``, ``--sample-name``).

A prompt file has one prompt per line, as Open-Sora 1.2's ``load_prompts`` reads it (each line
stripped; ``--start-index`` / ``--end-index`` select lines as a Python slice); a line may carry its
own reference and mask strategy as JSON (``a cat.{"reference_path": "cat.png", "mask_strategy": "0"}``)
and loop segments (``|0|a sunny day|2|a rainy day``). Videos are named as the reference's
``get_save_path_name``: ``<save-dir>/<sample-name or "sample">_<index:04d>.mp4``, with ``-<k>`` for the
k-th of several seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, describe_os_error

MAX_PROMPT_FILE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class PromptLine:
    index: int
    """The prompt's index in the file (0-based; names its video)."""
    line: int
    """Its line number (1-based; names it in messages)."""
    text: str
    where: str
    """How messages name it: '<file> line <n>'."""


def load_prompt_file(path: str | Path, start: int | None = None, end: int | None = None) -> list[PromptLine]:
    """The prompts of ``path`` from ``start`` to ``end`` (a slice of its lines, as the reference)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_PROMPT_FILE_BYTES:
            raise UserError(f"--prompt-path {path}: larger than {MAX_PROMPT_FILE_BYTES >> 20} MiB; "
                            "is it a prompt file?")
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"--prompt-path: {describe_os_error(e, 'read')}") from None
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"--prompt-path {path} line {line}: not UTF-8 text (byte {e.start}); "
                        "save the file as UTF-8") from None
    for name, value in (("--start-index", start), ("--end-index", end)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise UserError(f"{name} must be an integer >= 0, got {value!r}")
    first = start or 0
    chosen = [PromptLine(i, i + 1, line.strip(), f"{path} line {i + 1}") for i, line in enumerate(lines)][first:end]
    if not chosen:
        last = end if end is not None else len(lines)
        raise UserError(f"--prompt-path {path}: no prompt in lines {first + 1}..{last} "
                        f"(the file has {len(lines)} lines)")
    for p in chosen:
        if not p.text:
            raise UserError(f"{p.where}: the line is empty; write a prompt on it or remove it")
    return chosen


def sample_path(save_dir: str | Path, index: int, sample_name: str | None = None, seeds: int = 1, k: int = 0) -> Path:
    """The reference's ``get_save_path_name`` (without prompt_as_path), with the .mp4 suffix."""
    name = f"{sample_name if sample_name is not None else 'sample'}_{index:04d}"
    if seeds != 1:
        name = f"{name}-{k}"
    return Path(save_dir) / f"{name}.mp4"


def check_sample_name(sample_name: str | None) -> None:
    if sample_name is not None and (not sample_name or "/" in sample_name or "\0" in sample_name
                                    or sample_name in (".", "..")):
        raise UserError(f"--sample-name {sample_name!r}: a file-name prefix without '/' (e.g. 'cat')")
