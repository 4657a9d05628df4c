"""Device profiles: the settings of a target device in one name (``--device-profile``).

``iphone15pro`` is the On-device Sora setting: 256x256, 68 frames (4 temporal-VAE chunks of 17), the
3.3 GB an iPhone 15 Pro app may use, the int8 text encoder where the model folder has one, and LPL
and TDTM as the On-device Sora app runs them (leap at step 15, TDTM merging in the first 15 of 30
steps: the app's defaults, ``ContentView.swift`` numLpltarget / mergeStep).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    resolution: str
    aspect_ratio: str
    num_frames: int
    memory_budget: str
    lpl: int | str | None
    tdtm_steps: int
    prefer_quantized: bool

    def request_options(self) -> dict:
        """Generation options the profile sets (explicit options take precedence)."""
        return {"resolution": self.resolution, "aspect_ratio": self.aspect_ratio,
                "num_frames": self.num_frames, "lpl": self.lpl, "tdtm_steps": self.tdtm_steps}


PROFILES: dict[str, DeviceProfile] = {
    "iphone15pro": DeviceProfile(
        name="iphone15pro",
        description="iPhone 15 Pro as in On-device Sora: 256x256, 68 frames, 3.3 GB, int8 T5, LPL 15, TDTM 15",
        resolution="256", aspect_ratio="1:1", num_frames=68, memory_budget="3.3GB",
        lpl=15, tdtm_steps=15, prefer_quantized=True,
    ),
}


def get_profile(name: str) -> DeviceProfile:
    if name not in PROFILES:
        raise UserError(f"--device-profile {name!r} is unknown; choose one of {', '.join(PROFILES)}")
    return PROFILES[name]
