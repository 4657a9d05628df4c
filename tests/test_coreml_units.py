"""Every unit kind of the demo model's Core ML export, replayed, against the MLX unit on the same
inputs (``coreml.check``): T5 embed / block / final norm, STDiT3 embedders / block pair (plain and
TDTM) / final layer, every VAE decoder stage. float32 export: <= 1e-5 relative (max |difference| /
max |reference|); float16: the tolerance below (measured: <= 1.5e-3; README "Export to Core ML")."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("coremltools")

from mlx_sora.conversion.loading import load_model  # noqa: E402
from mlx_sora.conversion.registry import DEMO_MODEL_DIR  # noqa: E402
from mlx_sora.coreml.check import relative_error, stdit3_cases, t5_cases, vae_cases  # noqa: E402
from mlx_sora.coreml.manifest import read_manifest  # noqa: E402
from mlx_sora.coreml.replay import PackageReplay  # noqa: E402
from mlx_sora.prompts.tokenizer import T5Tokenizer  # noqa: E402

FLOAT32_TOLERANCE = 1e-5
FLOAT16_TOLERANCE = 5e-3
PROMPT = "a blue square moving up"


@pytest.fixture(scope="module")
def cases():
    models = {c: load_model(DEMO_MODEL_DIR / c, dtype="float32") for c in ("text_encoder", "stdit3", "vae")}
    tokens = T5Tokenizer.from_folder(DEMO_MODEL_DIR / "text_encoder")([PROMPT], max_length=20)
    t5, text = t5_cases(models["text_encoder"], tokens.input_ids, tokens.attention_mask)
    stdit = stdit3_cases(models["stdit3"], text, tokens.attention_mask, (5, 8, 8), (64, 64), fps=8.0)
    return t5 + stdit + vae_cases(models["vae"], (5, 8, 8), 17)


def check_export(folder: Path, cases, tolerance: float) -> dict[str, float]:
    manifest = read_manifest(folder)
    decoding = manifest.data["phases"]["decoding"]
    units = {"text_encoder": manifest.units("text_encoding"), "stdit3": manifest.units("denoising"),
             "vae": [*decoding["temporal"], *decoding["spatial"]]}
    errors = {}
    for case in cases:
        package = manifest.package(next(u for u in units[case.component] if u["name"] == case.unit))
        value = PackageReplay(package)(case.inputs, case.function)[case.output]
        errors[f"{case.component}/{case.unit}/{case.function}"] = error = relative_error(value, case.reference)
        assert error <= tolerance, f"{case.component}/{case.unit} {case.function}: {error:.2e}"
    return errors


def test_float32_export_equals_every_mlx_unit(demo_export_fp32, cases):
    errors = check_export(demo_export_fp32, cases, FLOAT32_TOLERANCE)
    assert len(errors) == 3 + 4 + 12  # T5 embed/block/final; STDiT3 embedders, block, block TDTM, final; VAE stages


def test_float16_export_stays_within_its_tolerance(demo_export_fp16, cases):
    errors = check_export(demo_export_fp16, cases, FLOAT16_TOLERANCE)
    assert max(errors.values()) > 1e-5  # float16 is really computed: not the float32 numbers
