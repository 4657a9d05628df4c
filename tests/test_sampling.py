"""Rectified-flow sampler, LPL and the TDTM schedule against the Open-Sora 1.2 / On-device Sora fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_sora.sampling import (
    DynamicLeap,
    FixedLeap,
    SamplerConfig,
    sample,
    sampling_timesteps,
)

FIXTURES = Path(__file__).parent / "fixtures" / "opensora12"


def _timestep_settings():
    return json.loads((FIXTURES / "rflow_timesteps.json").read_text())["settings"]


@pytest.mark.parametrize("setting", _timestep_settings(), ids=lambda s: s["key"])
def test_timesteps_match_reference(setting):
    dtype = {"float32": mx.float32, "bfloat16": mx.bfloat16}[setting["additional_args_dtype"]]
    h, w = setting["image_size_hw"]
    args = [mx.array([v], dtype=dtype) for v in (h, w, setting["num_frames"])]
    timesteps = sampling_timesteps(
        30, 1, *args, use_discrete_timesteps=setting["use_discrete_timesteps"]
    )
    got = np.array([t[0].item() for t in timesteps])
    ref = np.array(setting["timesteps"])
    assert np.abs(got - ref).max() <= 1e-3, (got - ref)
    assert all(t.dtype == mx.float32 for t in timesteps)


def test_config_validation():
    with pytest.raises(ValueError, match="leap step"):
        SamplerConfig(num_steps=30, leap=FixedLeap(30))
    with pytest.raises(ValueError, match="steps"):
        SamplerConfig(num_steps=0)
    with pytest.raises(ValueError, match="similarity"):
        DynamicLeap(similarity="cosine")
