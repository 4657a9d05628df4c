"""The architecture configs the preset ships: what the converter writes for the released checkpoints."""

from __future__ import annotations

import json
from dataclasses import asdict

from conftest import FIXTURES

from mlx_sora.conversion.presets import build_preset_configs, preset_config_folders
from mlx_sora.models import stdit3, vae
from mlx_sora.models.t5 import T5Config

# DeepFloyd/t5-v1_1-xxl's config.json (the architecture fields; transformers' T5Config)
T5_XXL_HF = {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": 32128, "d_model": 4096, "d_kv": 64,
             "d_ff": 10240, "num_layers": 24, "num_heads": 64, "relative_attention_num_buckets": 32,
             "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu"}


def _shipped() -> dict[str, dict]:
    return {c: json.loads((f / "config.json").read_text()) for c, f in preset_config_folders("opensora-v1.2").items()}


def test_shipped_configs_are_the_ones_built_from_the_dataclasses():
    assert _shipped() == json.loads(json.dumps(build_preset_configs("opensora-v1.2")))


def test_shipped_configs_are_what_conversion_makes_of_the_released_configs():
    shipped = _shipped()
    def strip(config):
        return {k: v for k, v in config.items() if k not in ("model_type", "mlx_sora")}
    assert strip(shipped["text_encoder"]) == asdict(T5Config.from_dict(T5_XXL_HF))
    assert strip(shipped["stdit3"]) == stdit3._config_from_hf({"model_type": "STDiT3"}, {})  # the XL/2 defaults
    # hpcai-tech/OpenSora-VAE-v1.2's config.json as recorded beside the test fixture
    fixture = json.loads((FIXTURES / "vae_v12_checkpoint" / "config.json").read_text())
    release = {k: v for k, v in fixture.items() if not k.startswith(("vae_2d", "real_release"))}
    release.update(vae_2d=fixture["real_release_vae_2d"], vae_temporal=fixture["real_release_vae_temporal"])
    assert strip(shipped["vae"]) == json.loads(json.dumps(vae._config_from_hf(release, None)))
    for component, source in (("text_encoder", "DeepFloyd/t5-v1_1-xxl"), ("stdit3", "hpcai-tech/OpenSora-STDiT-v3"),
                              ("vae", "hpcai-tech/OpenSora-VAE-v1.2")):
        assert shipped[component]["mlx_sora"]["dtype"] == "bfloat16"
        assert shipped[component]["mlx_sora"]["source"] == source
    assert shipped["stdit3"]["mlx_sora"]["units"] == ["embedders", *(f"block_{i:02d}" for i in range(28)), "final_layer"]
    assert shipped["text_encoder"]["mlx_sora"]["units"][-1] == "final_norm"
