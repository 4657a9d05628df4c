"""Derive the device tables of mlx_sora/estimate/devices/ and write them (the tables are the data the
projection reads; this script is how their numbers follow from their sources).

iphone15pro is calibrated from the On-device Sora paper's own iPhone 15 Pro measurements and nothing
else: unmodified Open-Sora at 256x256, 68 frames (T5 110.505 s; STDiT 1768.320 s for 50 iterations,
35.366 s each; VAE 135.047 s) and its CI-DL figures (STDiT about 29 s -> 23 s per step, T5 164 s ->
137 s), with the A17 Pro GPU's 2.15 TFLOPS (fp32) that the paper states, and the app's resident rule
(170 MB per STDiT3 block pair: float32 weights). The schedule each figure was measured with is the
On-device Sora app's (eai-lab/On-device-Sora, On-device/On-device-Sora/*.swift): without CI-DL every
block is loaded before it runs and unloaded after; with it the next block loads while one computes
(STDiT3's first and last parts are loaded and unloaded each step, not ahead); the VAE decodes 4
temporal chunks and 17 spatial calls of 4 frames, each part loaded per call.

1. Storage: CI-DL hides the blocks' loads behind compute (a block computes longer than it loads), so
   the two CI-DL differences are load time: 6 s per step for 28 STDiT3 block pairs, 27 s for 24 T5
   blocks. One read rate S for both, least squares (no per-load overhead: a positive one fits worse).
2. Compute: per model, each figure less its loads (at S) is its compute time; the geometric mean of
   a model's figures is its compute time, its FLOPs (counted by mlx_sora.estimate.cost at the paper's
   setting) over that time its rate. The app runs T5 as float32 Core ML models, STDiT3 on CPU+GPU
   and the VAE mostly on the CPU (VAEDecoder.swift: .cpuOnly), so the rates are per model.

The Macs' tables take their peak FLOPS, memory bandwidth and RAM from the public figures cited in
them, and the STDiT3 efficiency (rate / peak) and the storage rate of the iPhone calibration (the only
Apple GPU measurement available): uncalibrated projections, marked so.

    python scripts/write_device_tables.py          # prints the derivation, writes the tables
"""

from __future__ import annotations

import json
import math

from mlx_sora.estimate.cost import spatial_decoder_calls, stdit3_calls, t5_calls, temporal_decoder_calls
from mlx_sora.estimate.devices import DEVICE_DIR
from mlx_sora.models.stdit3 import STDiT3Config
from mlx_sora.models.t5 import T5Config
from mlx_sora.models.vae import VideoAutoencoderConfig

PAPER = "On-device Sora (Kim et al., arXiv 2502.04363)"
A17_PRO_FLOPS = 2.15e12
FIGURES = {  # seconds
    "T5, unmodified (table)": 110.505,
    "STDiT3 per step, unmodified (table: 1768.320 s / 50)": 1768.320 / 50,
    "VAE, unmodified (table)": 135.047,
    "STDiT3 per step without CI-DL": 29.0,
    "STDiT3 per step with CI-DL": 23.0,
    "T5 without CI-DL": 164.0,
    "T5 with CI-DL": 137.0,
}
FP32 = 4


def _param_bytes(counts: dict[str, int], *names: str) -> float:
    return float(sum(counts[n] for n in names)) * FP32


def unit_parameters() -> dict[str, dict[str, int]]:
    """component -> unit -> parameter count, from the skeletons."""
    from mlx.utils import tree_flatten

    from mlx_sora.conversion.presets import architecture_configs
    from mlx_sora.models import family_for_type
    from mlx_sora.models.units import unit_for_key

    counts = {}
    for component, family in (("text_encoder", "t5"), ("stdit3", "stdit3"), ("vae", "vae")):
        model = family_for_type(family).build(architecture_configs("opensora-v1.2")[component])
        per_unit = {u.name: 0 for u in model.units}
        for key, value in tree_flatten(model.parameters()):
            per_unit[unit_for_key(model.units, key).name] += value.size
        counts[component] = per_unit
    return counts


def calibrate() -> dict:
    counts = unit_parameters()
    t5, st, vae = counts["text_encoder"], counts["stdit3"], counts["vae"]
    pair = _param_bytes(st, "block_00")
    t5_blocks = [f"block_{i:02d}" for i in range(24)]
    st_blocks = [f"block_{i:02d}" for i in range(28)]
    # 1. storage: the CI-DL differences are the blocks' loads
    hidden = {"stdit3": (_param_bytes(st, *st_blocks), 29.0 - 23.0),
              "text_encoder": (_param_bytes(t5, *t5_blocks, "final_norm"), 164.0 - 137.0)}
    seconds_per_byte = sum(b * d for b, d in hidden.values()) / sum(b * b for b, _ in hidden.values())
    rate = 1 / seconds_per_byte
    # 2. compute: FLOPs at the paper's setting, figures less their loads
    flops = {
        "text_encoder": sum(c.flops() for c in t5_calls(T5Config.t5_v1_1_xxl(), 1, 300, FP32)),
        "stdit3": sum(c.flops() for c in stdit3_calls(STDiT3Config(), 2, (20, 32, 32), 300, False, FP32)),
        "vae": 4 * sum(c.flops() for c in temporal_decoder_calls(VideoAutoencoderConfig(), 1, 5, 32 * 32, FP32))
        + 17 * sum(c.flops() for c in spatial_decoder_calls(VideoAutoencoderConfig(), 4, 32, 32, FP32)),
    }
    temporal = [u for u in vae if u.startswith(("latent_stats", "temporal_decoder"))]
    spatial = [u for u in vae if u.startswith("spatial_decoder")]
    loads = {  # seconds of the loads each figure's schedule waits for
        "T5 sequential": _param_bytes(t5, *t5) * seconds_per_byte,
        "T5 CI-DL": _param_bytes(t5, "embed") * seconds_per_byte,
        "STDiT3 sequential": _param_bytes(st, *st) * seconds_per_byte,
        "STDiT3 CI-DL": _param_bytes(st, "embedders", "final_layer") * seconds_per_byte,
        "VAE sequential": (4 * _param_bytes(vae, *temporal) + 17 * _param_bytes(vae, *spatial)) * seconds_per_byte,
    }
    implied = {
        "text_encoder": [110.505 - loads["T5 sequential"], 164.0 - loads["T5 sequential"], 137.0 - loads["T5 CI-DL"]],
        "stdit3": [1768.320 / 50 - loads["STDiT3 sequential"], 29.0 - loads["STDiT3 sequential"],
                   23.0 - loads["STDiT3 CI-DL"]],
        "vae": [135.047 - loads["VAE sequential"]],
    }
    compute = {c: math.exp(sum(math.log(t) for t in ts) / len(ts)) for c, ts in implied.items()}
    rates = {c: flops[c] / compute[c] for c in compute}
    projected = {
        "T5, unmodified (table)": compute["text_encoder"] + loads["T5 sequential"],
        "STDiT3 per step, unmodified (table: 1768.320 s / 50)": compute["stdit3"] + loads["STDiT3 sequential"],
        "VAE, unmodified (table)": compute["vae"] + loads["VAE sequential"],
        "STDiT3 per step without CI-DL": compute["stdit3"] + loads["STDiT3 sequential"],
        "STDiT3 per step with CI-DL": compute["stdit3"] + loads["STDiT3 CI-DL"],
        "T5 without CI-DL": compute["text_encoder"] + loads["T5 sequential"],
        "T5 with CI-DL": compute["text_encoder"] + loads["T5 CI-DL"],
    }
    return dict(pair=pair, rate=rate, hidden=hidden, flops=flops, loads=loads, implied=implied, compute=compute,
                rates=rates, projected=projected)


def iphone_table(c: dict) -> dict:
    rates, flops, compute = c["rates"], c["flops"], c["compute"]

    def eff(component: str) -> str:
        return f"{rates[component] / A17_PRO_FLOPS:.1%} of 2.15 TFLOPS"

    def derivation(component: str, figures: str) -> str:
        implied = ", ".join(f"{t:.1f}" for t in c["implied"][component])
        return (f"{flops[component] / 1e12:.2f} TFLOP (mlx_sora.estimate.cost at 256x256x68, float32) over "
                f"{compute[component]:.1f} s, the geometric mean of the compute times {figures} imply once their "
                f"loads are taken off ({implied} s): {eff(component)}")

    residuals = "; ".join(f"{name}: paper {FIGURES[name]:.1f} s, table {c['projected'][name]:.1f} s "
                          f"({c['projected'][name] / FIGURES[name] - 1:+.0%})" for name in FIGURES)
    per_model = {"matmul", "attention", "conv"}
    return {
        "name": "iphone15pro",
        "description": "iPhone 15 Pro (A17 Pro), calibrated on On-device Sora's measurements of the app",
        "engine": "gpu",
        "compute_dtype": "float32",
        "throughput": {**{k: rates["stdit3"] for k in per_model}, "elementwise": None},
        "components": {comp: {k: rates[comp] for k in per_model} for comp in ("text_encoder", "vae")},
        "storage_read_rate": c["rate"],
        "memory_bandwidth": None,
        "cast_rate": None,
        "load_overhead_s": 0.0,
        "memory_bytes": 8_000_000_000,
        "memory_budget_bytes": 3_300_000_000,
        "process_bytes": 0,
        "peak_flops": A17_PRO_FLOPS,
        "sources": {
            "peak_flops": f"{PAPER}: the A17 Pro GPU's 2.15 TFLOPS (fp32)",
            "memory_bytes": f"{PAPER}: 8 GB of RAM",
            "memory_budget_bytes": f"{PAPER}: 3.3 GB available to one app",
            "compute_dtype": f"{PAPER}: 170 MB per STDiT3 block pair in the app's resident rule; a pair holds "
                             f"{c['pair'] / 1e6:.1f} MB of parameters in float32 (the app's Core ML models are "
                             "float32: t5export.py compute_precision FLOAT32)",
            "memory_bandwidth": "no public figure found: elementwise work and memory traffic are within the "
                                "calibrated compute rates",
            "process_bytes": "not known for the phone: only the planner's runtime overhead (160 MiB, measured "
                             "for this runtime on Linux) is counted",
        },
        "calibration": {
            "figures": f"{PAPER}, iPhone 15 Pro, 256x256, 68 frames: T5 110.505 s, STDiT 1768.320 s for 50 "
                       "iterations, VAE 135.047 s (unmodified Open-Sora); STDiT about 29 s -> 23 s per step and T5 "
                       "164 s -> 137 s with CI-DL; nothing else from the paper's iPhone timings",
            "storage_read_rate": (
                f"{c['rate'] / 1e9:.3f} GB/s of float32 weight files: CI-DL hides the blocks' loads, so 29 - 23 = 6 s "
                f"per step is 28 STDiT3 block pairs ({c['hidden']['stdit3'][0] / 1e9:.2f} GB) and 164 - 137 = 27 s "
                f"is 24 T5 blocks ({c['hidden']['text_encoder'][0] / 1e9:.2f} GB); least squares over both "
                f"(they alone give {c['hidden']['stdit3'][0] / 6e9:.2f} and "
                f"{c['hidden']['text_encoder'][0] / 27e9:.2f} GB/s)"),
            "load_overhead_s": "0: a positive per-load overhead would widen the gap between the two rates above "
                               "(the 770 MB T5 blocks load slower per byte than the 170 MB pairs)",
            "throughput": "STDiT3 (the GPU): " + derivation("stdit3", "35.366 s, 29 s (without CI-DL) and 23 s "
                                                             "(with CI-DL) per step"),
            "components.text_encoder": "T5: " + derivation("text_encoder", "110.505 s, 164 s (without CI-DL) and "
                                                                         "137 s (with CI-DL)"),
            "components.vae": "VAE (the app runs it mostly on the CPU): " + derivation(
                "vae", "135.047 s, 4 temporal chunks and 17 spatial calls of 4 frames each loading their parts,"),
            "residuals": "the table against the figures (the paper's two runs without CI-DL disagree by 22 % for "
                         "STDiT3 and 48 % for T5, so no rate fits both): " + residuals,
            "elementwise": "null: within the per-model rates, which were calibrated on whole models",
        },
    }


MACS = {  # public figures: (description, fp32 GPU FLOPS, memory bandwidth, RAM, sources)
    "m1": ("Apple M1 (8-core GPU), e.g. MacBook Air 2020", 2.6e12, 68.2e9, 16e9, {
        "peak_flops": "Apple's rating of the M1 GPU, 2.6 TFLOPS (GSMArena, Apple M1 launch, Nov 2020; "
                      "nanoreview.info/en/gpu/apple-m1-gpu: 2.6 TFLOPS)",
        "memory_bandwidth": "nanoreview.info/en/gpu/apple-m1-gpu: 68.2 GB/s (LPDDR4X-4266, 128-bit)",
        "memory_bytes": "askgeek.io/en/cpus/Apple/M1-8-core-GPU: maximum memory size 16 GB"}),
    "m1-pro": ("Apple M1 Pro (16-core GPU), e.g. MacBook Pro 14/16 2021", 5.2e12, 200e9, 32e9, {
        "peak_flops": "Apple M1 Pro announcement, Oct 2021: 16-core GPU, 5.2 teraflops (techzone.top / "
                      "Tecnoblog report of the event; 9breakingnews.com)",
        "memory_bandwidth": "Apple, Oct 2021 (Xinhua via trend.az): M1 Pro up to 200GB/s",
        "memory_bytes": "Apple, Oct 2021 (trend.az): up to 32GB of unified memory"}),
    "m1-max": ("Apple M1 Max (32-core GPU), e.g. MacBook Pro 14/16 2021, Mac Studio", 10.4e12, 400e9, 64e9, {
        "peak_flops": "Apple M1 Max announcement, Oct 2021: 32-core GPU, 10.4 teraflops (techzone.top / "
                      "Tecnoblog report of the event)",
        "memory_bandwidth": "Apple, Oct 2021 (trend.az): M1 Max up to 400GB/s",
        "memory_bytes": "Apple, Oct 2021 (trend.az): up to 64GB of unified memory"}),
    "m2": ("Apple M2 (10-core GPU), e.g. MacBook Air 2022", 3.578e12, 100e9, 24e9, {
        "peak_flops": "askgeek.io/en/cpus/Apple/M2-10-core-GPU: peak single precision (FP32) 3.578 TFLOPS",
        "memory_bandwidth": "Apple, WWDC June 2022 (macrumors.com): 100GB/s of unified memory bandwidth",
        "memory_bytes": "Apple, WWDC June 2022 (macrumors.com): up to 24GB of LPDDR5 unified memory"}),
}


def mac_table(name: str, c: dict) -> dict:
    description, flops, bandwidth, memory, sources = MACS[name]
    efficiency = c["rates"]["stdit3"] / A17_PRO_FLOPS
    rate = flops * efficiency
    return {
        "name": name,
        "description": f"{description}; uncalibrated: public peak figures, the iPhone calibration's efficiency",
        "engine": "gpu",
        "compute_dtype": "bfloat16",
        "throughput": {"matmul": rate, "attention": rate, "conv": rate, "elementwise": bandwidth},
        "storage_read_rate": c["rate"],
        "memory_bandwidth": bandwidth,
        "memory_bytes": int(memory),
        "memory_budget_bytes": int(0.8 * memory),
        "process_bytes": 0,
        "peak_flops": flops,
        "sources": {**sources,
                    "memory_budget_bytes": "generate's default rule, 80 % of the memory available, applied to the RAM",
                    "process_bytes": "not known: only the planner's runtime overhead is counted"},
        "calibration": {
            "throughput": f"the peak times the STDiT3 efficiency of the iphone15pro calibration ({efficiency:.1%}): "
                          "no measurement on this Mac (uncalibrated)",
            "elementwise": "at the memory bandwidth (a GPU streams elementwise work at about its bandwidth)",
            "storage_read_rate": "the iphone15pro calibration's rate (no public figure for this Mac's storage)",
        },
    }


def main() -> int:
    c = calibrate()
    print(f"STDiT3 block pair, float32: {c['pair'] / 1e6:.1f} MB (the paper's rule: 170 MB)")
    print(f"storage: {c['rate'] / 1e9:.3f} GB/s")
    for component in ("text_encoder", "stdit3", "vae"):
        print(f"{component}: {c['flops'][component] / 1e12:.2f} TFLOP in {c['compute'][component]:.1f} s -> "
              f"{c['rates'][component] / 1e9:.1f} GFLOP/s ({c['rates'][component] / A17_PRO_FLOPS:.1%} of 2.15 TFLOPS)")
    for name, value in FIGURES.items():
        print(f"  {name:<55} paper {value:8.2f} s   table {c['projected'][name]:8.2f} s   "
              f"{c['projected'][name] / value - 1:+.1%}")
    tables = {"iphone15pro": iphone_table(c), **{name: mac_table(name, c) for name in MACS}}
    for name, table in tables.items():
        path = DEVICE_DIR / f"{name}.json"
        path.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
