"""The model-family registry knows every family whatever was imported first."""

from __future__ import annotations

import subprocess
import sys


def test_every_family_is_known_after_importing_one_model_module():
    code = ("import mlx_sora.models.vae\n"
            "from mlx_sora.models import families\n"
            "print(sorted(families()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['stdit3', 't5', 'vae']"
