"""The planner's unit sizes from configs alone equal what the converted folders' headers say."""

from __future__ import annotations

import shutil

import mlx.core as mx
import pytest
from conftest import FIXTURES, TINY_T5, tiny_stdit3_config, train_spiece

import mlx_sora
from mlx_sora.conversion.loading import build_model
from mlx_sora.planning import config_unit_sizes, folder_unit_sizes


@pytest.fixture(scope="module")
def bfloat16_folders(tmp_path_factory):
    """The three families written through the converter with bfloat16 storage (the presets')."""
    from mlx_sora.models import family_for_type

    root = tmp_path_factory.mktemp("bf16")
    spiece = root / "spiece"
    spiece.mkdir()
    train_spiece(spiece)
    mx.random.seed(1)
    t5 = family_for_type("t5").build(TINY_T5)
    stdit = family_for_type("stdit3").build(tiny_stdit3_config())
    folders = {
        "text_encoder": mlx_sora.save_model(t5, root / "t5", "t5", TINY_T5, dtype="bfloat16", source_dir=spiece),
        "stdit3": mlx_sora.save_model(stdit, root / "stdit3", "stdit3", tiny_stdit3_config(), dtype="bfloat16"),
        "vae": mlx_sora.convert(FIXTURES / "vae_v12_checkpoint", root / "vae", dtype="bfloat16"),
    }
    shutil.rmtree(spiece)
    return folders


@pytest.mark.parametrize("compute", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("component", ["text_encoder", "stdit3", "vae"])
def test_config_sizes_equal_the_headers(bfloat16_folders, component, compute):
    model = build_model(bfloat16_folders[component])
    uses = {u.name: 3 for u in model.units}
    from_configs = config_unit_sizes(compute)(component, model, model.units, uses)
    from_headers = folder_unit_sizes(bfloat16_folders, compute)(component, model, model.units, uses)
    assert from_configs == from_headers
    if component == "vae" and compute == mx.float32:  # the latent statistics stay float32 when stored
        stats = next(s for s in from_configs if s.name == "latent_stats")
        assert stats.read_bytes == stats.bytes == 8 * 4
    if component == "text_encoder" and compute == mx.float32:  # the token table is held as stored
        embed = next(s for s in from_configs if s.name == "embed")
        assert embed.bytes == embed.read_bytes
