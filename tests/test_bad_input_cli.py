"""Bad input to `python -m mlx_sora.generate` and hostile converted folders: one clear message naming
the option or file, before any model is loaded, no traceback, nothing written. Runs under an
address-space cap (conftest ``memory_cap``) so an unbounded allocation fails the test, not the machine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import mlx_sora
from mlx_sora import generate
from mlx_sora.io.checkpoint import CheckpointError

pytestmark = pytest.mark.usefixtures("memory_cap")


@pytest.fixture(autouse=True)
def _no_blas_restart(monkeypatch):
    monkeypatch.setenv("MLX_SORA_BLAS_CHECKED", "1")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seed", "-1"], "--seed -1 is out of range"),
        (["--seed", str(2**64)], "is out of range: seeds are integers from 0 to 2**64 - 1"),
        (["--output", "x_{foo}.mp4"], "only the fields {seed} and {index}"),
        (["--output", "x_{0}.mp4"], "only the fields {seed} and {index}"),
        (["--output", "x_{seed!r}.mp4"], "only the fields {seed} and {index}"),
        (["--num-frames", "1000000000"], "--num-frames must be between 1 and 1024"),
        (["--num-frames", "100000"], "--num-frames must be between 1 and 1024"),
        (["--cfg-scale", "nan"], "--cfg-scale must be a finite number"),
        (["--cfg-scale", "inf"], "--cfg-scale must be a finite number"),
        (["--aes", "nan"], "--aes must be a finite number"),
        (["--steps", "100000"], "--steps must be between 1 and 1000"),
        (["--fps", "0"], "--fps must be between 1 and 240"),
        (["--image-size", "0", "64"], "--image-size height must be between 16 and 2048"),
        (["--image-size", "64", "99999"], "--image-size width must be between 16 and 2048"),
        (["--resolution", "256", "--aspect-ratio", "9:16"], "is not a 256 bucket; choose 1:1"),
        (["--resolution", "240p", "--image-size", "64", "64"], "either --image-size or --resolution"),
        (["--memory-budget", "lots"], "memory budget 'lots' is not a size"),
        (["--memory-budget=-2GB"], "memory budget"),
        (["--tdtm-steps", "-1"], "--tdtm-steps must be between 0"),
        (["--lpl-step", "30"], "leap step 30 is past the last step"),
        (["--parallel", "cfg", "--rank-timeout", "0"], "--rank-timeout must be a positive number of seconds"),
        (["--rank-timeout", "inf"], "--rank-timeout must be a positive number of seconds"),
    ],
)
def test_generate_rejects_bad_options_before_loading(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert generate.main(["--prompt", "a red circle moving left", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert err.count("\n") == 1  # one line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("prompt", ["### @@@ ***", "<p></p>", "|0|a cat|2|<b></b>"])
def test_prompt_that_cleans_to_nothing(prompt, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert generate.main(["--prompt", prompt]) == 2
    assert "is empty after Open-Sora's caption cleaning" in capsys.readouterr().err


def test_output_parent_is_a_file(capsys, tmp_path):
    (tmp_path / "file").write_text("keep me")
    assert generate.main(["--prompt", "a cat", "--output", str(tmp_path / "file" / "x.mp4")]) == 2
    assert "error: " in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "keep me"


# ---------------------------------------------------------------- hostile converted folders


@pytest.fixture(scope="module")
def converted_t5(tiny_model_folder) -> Path:
    return tiny_model_folder / "text_encoder"


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def _edit(path: Path, change) -> None:
    values = json.loads(path.read_text())
    change(values)
    path.write_text(json.dumps(values))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(num_layers=10**9), "T5Config.num_layers must be between 1 and 256"),
        (lambda c: c.update(num_layers="2"), "T5Config.num_layers must be an integer"),
        (lambda c: c.update(d_model=32.0), "T5Config.d_model must be an integer"),
        (lambda c: c.update(num_heads=True), "T5Config.num_heads must be an integer"),
        (lambda c: c.update(layer_norm_epsilon="tiny"), "layer_norm_epsilon must be a finite number"),
        (lambda c: c["mlx_sora"].pop("units"), "'mlx_sora' must hold 'units'"),
        (lambda c: c["mlx_sora"].update(units=["../outside"]), "'mlx_sora' must hold 'units'"),
        (lambda c: c["mlx_sora"].update(quantization={"bits": 3}), "'mlx_sora.quantization' must be"),
        (lambda c: c.update(model_type=["t5"]), "'model_type' must be a string"),
    ],
)
def test_hostile_config_is_refused_naming_the_file(converted_t5, tmp_path, change, message):
    folder = _copy(converted_t5, tmp_path)
    _edit(folder / "config.json", change)
    with pytest.raises(CheckpointError, match="config.json") as info:
        mlx_sora.load_model(folder)
    assert message in str(info.value)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "7", "[" * 100_000 + "]" * 100_000])
def test_config_that_is_not_an_object(converted_t5, tmp_path, text):
    folder = _copy(converted_t5, tmp_path)
    (folder / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match="config.json"):
        mlx_sora.load_model(folder)


@pytest.mark.parametrize("name", ["/etc/passwd.safetensors", "../other/block_00.safetensors",
                                  "sub/block_00.safetensors", ".hidden.safetensors", "block_00.bin"])
def test_weight_map_entries_are_confined_to_the_folder(converted_t5, tmp_path, name):
    folder = _copy(converted_t5, tmp_path)
    _edit(folder / "model.safetensors.index.json", lambda i: i["weight_map"].update({"final_norm.weight": name}))
    with pytest.raises(CheckpointError, match="not a plain file name inside the folder"):
        mlx_sora.load_model(folder)


def test_weight_file_with_overlapping_tensors_is_refused(converted_t5, tmp_path):
    import struct

    folder = _copy(converted_t5, tmp_path)
    path = folder / "final_norm.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header["final_norm.copy"] = dict(header[key])  # a second tensor over the same bytes
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + n :])
    with pytest.raises(CheckpointError, match="final_norm.safetensors"):
        mlx_sora.load_model(folder)
