"""``manifest.json``: everything an app needs to run an export, beside the packages.

Written by the exporter, read (and checked like any untrusted file) by the Core ML pipeline. It holds
the chain of units per phase (package file, functions, their inputs and outputs, weight bytes), the
tokenizer, the sampler settings with every exported size's timesteps, the functions each size uses,
and the CI-DL plan for the memory budget (which units stay resident). The carry rule: a unit's output
named ``X_out`` replaces the carried tensor ``X``; every other output joins the carry by its name; a
unit takes its inputs from the carry by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

FORMAT = "mlx_sora.coreml"
VERSION = 1
NAME = "manifest.json"
PHASES = ("text_encoding", "denoising", "decoding")
MAX_BYTES = 64 << 20


def is_export_folder(folder: str | Path) -> bool:
    """True when ``folder`` holds a manifest written by this exporter: the only kind of folder that
    ``export_coreml --overwrite`` replaces."""
    path = Path(folder) / NAME
    try:
        if not path.is_file() or path.stat().st_size > MAX_BYTES:
            return False
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def carry_name(output: str) -> str:
    return output[: -len("_out")] if output.endswith("_out") else output


def _require(condition: bool, path: Path, what: str) -> None:
    if not condition:
        raise UserError(f"{path}: {what}; export again with python -m mlx_sora.export_coreml")


def _plain_name(name: Any) -> bool:
    return isinstance(name, str) and bool(name) and all(ch.isalnum() or ch in "_-." for ch in name) \
        and not name.startswith(".")


@dataclass
class Manifest:
    folder: Path
    data: dict[str, Any]

    @property
    def sizes(self) -> list[dict[str, Any]]:
        return self.data["sizes"]

    def size(self, height: int, width: int, num_frames: int) -> dict[str, Any]:
        for size in self.sizes:
            if (size["height"], size["width"], size["num_frames"]) == (height, width, num_frames):
                return size
        exported = ", ".join(s["name"] for s in self.sizes)
        raise UserError(f"{self.folder} has no functions for {height}x{width}x{num_frames} (height x width x frames); "
                        f"it was exported for {exported}. Pick one of those sizes, or export this size too: "
                        f"python -m mlx_sora.export_coreml ... --sizes {height}x{width}x{num_frames}")

    def units(self, phase: str, chain: str | None = None) -> list[dict[str, Any]]:
        entry = self.data["phases"][phase]
        return entry[chain] if chain else entry["units"]

    def package(self, unit: dict[str, Any]) -> Path:
        return self.folder / unit["file"]

    @property
    def tokenizer(self) -> Path:
        return self.folder / self.data["tokenizer"]["file"]


def write_manifest(folder: Path, data: dict[str, Any]) -> Path:
    data = {"format": FORMAT, "version": VERSION, **data}
    path = folder / NAME
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def read_manifest(folder: str | Path) -> Manifest:
    """The manifest of an export folder, its structure and every file it names checked."""
    folder = Path(folder).expanduser()
    path = folder / NAME
    if not folder.is_dir():
        raise UserError(f"Core ML export folder {folder} does not exist; export one with "
                        "python -m mlx_sora.export_coreml --model demo --out DIR")
    _require(path.is_file(), path, "is missing: this is not a folder written by mlx_sora.export_coreml")
    _require(path.stat().st_size <= MAX_BYTES, path, "is too large to be a manifest")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({type(e).__name__}: {e}); export again") from e
    _require(isinstance(data, dict) and data.get("format") == FORMAT, path, f"is not an {FORMAT} manifest")
    _require(data.get("version") == VERSION, path, f"has version {data.get('version')!r}, this mlx-sora reads {VERSION}")
    phases = data.get("phases")
    _require(isinstance(phases, dict) and all(p in phases for p in PHASES), path, f"must list the phases {PHASES}")
    units = [*phases["text_encoding"].get("units", []), *phases["denoising"].get("units", []),
             *phases["decoding"].get("temporal", []), *phases["decoding"].get("spatial", [])]
    for unit in units:
        _require(isinstance(unit, dict) and _plain_name(unit.get("name")) and isinstance(unit.get("file"), str),
                 path, "has a unit without a plain name and file")
        file = Path(unit["file"])
        _require(not file.is_absolute() and ".." not in file.parts and file.suffix == ".mlpackage", path,
                 f"unit {unit['name']}: file {unit['file']!r} must be an .mlpackage inside the folder")
        _require((folder / file / "Manifest.json").is_file(), path, f"unit {unit['name']}: {folder / file} is missing")
        functions = unit.get("functions")
        _require(isinstance(functions, dict) and functions and all(_plain_name(f) for f in functions), path,
                 f"unit {unit['name']}: functions must be named")
    tokenizer = data.get("tokenizer")
    _require(isinstance(tokenizer, dict) and isinstance(tokenizer.get("file"), str), path, "names no tokenizer file")
    token_file = Path(tokenizer["file"])
    _require(not token_file.is_absolute() and ".." not in token_file.parts and (folder / token_file).is_file(), path,
             f"tokenizer file {tokenizer['file']!r} is missing")
    sizes = data.get("sizes")
    _require(isinstance(sizes, list) and sizes, path, "lists no exported sizes")
    for size in sizes:
        _require(isinstance(size, dict) and all(isinstance(size.get(k), int) and size[k] > 0
                                                for k in ("height", "width", "num_frames")), path,
                 "has a size without positive height, width and num_frames")
    _require(isinstance(data.get("sampler"), dict), path, "has no sampler settings")
    return Manifest(folder, data)
