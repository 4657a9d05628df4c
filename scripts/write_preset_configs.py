"""Write the architecture configs the presets ship with (mlx_sora/conversion/preset_configs/): the
config.json that `python -m mlx_sora.convert` writes into each converted folder (bfloat16 storage),
built from the models' own config dataclasses. tests/test_presets.py checks the shipped files
against them.

    python scripts/write_preset_configs.py [--preset opensora-v1.2]
"""

from __future__ import annotations

import argparse

from mlx_sora.conversion.presets import write_preset_configs
from mlx_sora.conversion.registry import PRESETS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="opensora-v1.2", choices=list(PRESETS))
    args = parser.parse_args()
    for path in write_preset_configs(args.preset):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
