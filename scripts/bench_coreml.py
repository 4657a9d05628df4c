"""Core ML export benchmark: the full-size export, and every unit kind at full width against MLX.

    python scripts/bench_coreml.py export --model weights/bench-real --out /tmp/coreml-iphone
    python scripts/bench_coreml.py units --model weights/bench-real
    python scripts/bench_coreml.py compression --model weights/bench-real

``export`` runs ``python -m mlx_sora.export_coreml --device-profile iphone15pro --compress
text_encoder=int8`` (256x256x68, float16) in a child process and prints its wall time, the child's max
RSS and the package bytes per component beside On-device Sora's (T5 int8 4.64 GB, STDiT 4.5 GB
float32, VAE 0.82 GB). The model folder is ``scripts/bench_memory.py prepare``'s random real-size one
(T5 v1.1 XXL, STDiT3-XL/2, VAE v1.2 in bfloat16).

``units`` builds each unit kind of that model alone (T5 embed, block_00, final_norm; STDiT3 embedders,
block_00 plain and TDTM, final_layer at a small latent; every VAE decoder stage on a small chunk),
exports it in float32 and in float16 (calibrated as the exporter does), replays the packages and
prints the largest relative difference from the MLX unit (float32, CPU) on the same inputs.
``compression`` does the same for T5 block_00 and STDiT3 block_00 with each compression.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30
PAPER_BYTES = {"text_encoder": 4.64e9, "stdit3": 4.5e9, "vae": 0.82e9}  # On-device Sora's packages


def bench_export(model: Path, out: Path, extra: list[str]) -> None:
    command = [sys.executable, "-m", "mlx_sora.export_coreml", "--model", str(model), "--out", str(out),
               "--device-profile", "iphone15pro", "--compress", "text_encoder=int8", "--overwrite", *extra]
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    done = subprocess.run(command)
    seconds = time.perf_counter() - start
    max_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    if done.returncode != 0:
        raise SystemExit(f"export failed ({done.returncode})")
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"\nexport: {seconds:.0f} s wall, child max RSS {max_rss / GIB:.2f} GiB (load average "
          f"{os.getloadavg()[0]:.1f} at the end)")
    units = [*manifest["phases"]["text_encoding"]["units"], *manifest["phases"]["denoising"]["units"],
             *manifest["phases"]["decoding"]["temporal"], *manifest["phases"]["decoding"]["spatial"]]
    per = {"text_encoder": 0, "stdit3": 0, "vae": 0}
    for unit in units:
        per[unit["file"].split("/")[0]] += unit["weight_bytes"]
    print(f"{'component':<14} {'packages':>10} {'On-device Sora':>15}  compression")
    for component, size in per.items():
        print(f"{component:<14} {size / 1e9:9.2f}G {PAPER_BYTES[component] / 1e9:14.2f}G  "
              f"{manifest['compression'][component]}")
    for size in manifest["sizes"]:
        plan = size["ci_dl"]
        if plan.get("fits"):
            for phase, entry in plan["phases"].items():
                print(f"{size['name']} {phase}: {len(entry['resident'])} resident, {len(entry['streamed'])} streamed, "
                      f"expected peak {entry['expected_peak_bytes'] / GIB:.2f} GiB of {plan['budget_bytes'] / 1e9:.1f} GB")
        else:
            print(f"{size['name']}: the CI-DL plan does not fit: {plan.get('error')}")


def _models(model: Path):
    from mlx_sora.conversion.loading import load_model
    from mlx_sora.conversion.registry import find_components

    components = find_components(model)
    return components, {c: load_model(p, dtype="float32", lazy=True) for c, p in components.items()}


def _cases(model: Path, latent: tuple[int, int, int], chunk: tuple[int, int, int, int]):
    from mlx_sora.coreml.check import stdit3_cases, t5_cases, vae_cases
    from mlx_sora.prompts.tokenizer import T5Tokenizer

    components, models = _models(model)
    length = models["stdit3"].config.model_max_length
    tokens = T5Tokenizer.from_folder(components["text_encoder"])(["a red panda eating bamboo in a misty forest"],
                                                                 max_length=length)
    t5, text = t5_cases(models["text_encoder"], tokens.input_ids, tokens.attention_mask)
    stdit = stdit3_cases(models["stdit3"], text, tokens.attention_mask, latent, (8 * latent[1], 8 * latent[2]))
    vae = vae_cases(models["vae"], chunk[:3], chunk[3])
    return components, models, t5 + stdit + vae


def _functions(models, components, case, latent, chunk):
    from mlx_sora.coreml import stdit3 as coreml_stdit3
    from mlx_sora.coreml import t5 as coreml_t5
    from mlx_sora.coreml import vae as coreml_vae
    from mlx_sora.coreml.export import unit_weights

    model = models[case.component]
    unit = next(u for u in model.units if u.name == case.unit)
    weights = unit_weights(Path(components[case.component]), model, unit)
    if case.component == "text_encoder":
        functions = coreml_t5.unit_functions(model.config, case.unit, weights, models["stdit3"].config.model_max_length)
    elif case.component == "stdit3":
        functions = coreml_stdit3.unit_functions(model.config, case.unit, weights,
                                                 [(latent, (8 * latent[1], 8 * latent[2]))])
    else:
        functions = coreml_vae.unit_functions(model.config, case.unit, weights, [chunk], [chunk[1:3]])
    return [fn for fn in functions if fn.name == case.function]


def _replay_error(fn, case, precision: str, compression: str, folder: Path) -> tuple[float, float]:
    from mlx_sora.coreml.check import relative_error
    from mlx_sora.coreml.package import ActivationStats, calibrate, convert_unit, save_model
    from mlx_sora.coreml.replay import PackageReplay

    stats = ActivationStats()
    if precision == "float16":
        calibrate(fn, case.inputs, stats)
    model, _ = convert_unit([fn], precision, compression, stats.unsafe_in_fp16())
    path = folder / f"{case.component}_{case.unit}_{fn.name}_{precision}_{compression}.mlpackage"
    save_model(model, path)
    start = time.perf_counter()
    value = PackageReplay(path)(case.inputs, fn.name)[case.output]
    seconds = time.perf_counter() - start
    shutil.rmtree(path)
    return relative_error(value, case.reference), seconds


def bench_units(model: Path, latent, chunk, compressions: list[str] | None) -> None:
    components, models, cases = _cases(model, latent, chunk)
    print(f"latent {latent} (STDiT3), temporal chunk {chunk[:3]} -> {chunk[3]} frames (VAE); "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if compressions is None:
            print(f"{'unit':<42} {'float32':>9} {'float16':>9}  replay s (fp32)")
            for case in cases:
                (fn,) = _functions(models, components, case, latent, chunk)
                e32, s32 = _replay_error(fn, case, "float32", "none", Path(tmp))
                e16, _ = _replay_error(fn, case, "float16", "none", Path(tmp))
                print(f"{case.component + '/' + case.unit + ' ' + case.function:<42} {e32:9.2e} {e16:9.2e}  {s32:.1f}",
                      flush=True)
        else:
            print(f"{'unit':<42} " + " ".join(f"{c:>9}" for c in compressions))
            for case in cases:
                if case.unit != "block_00" or case.function.endswith("_tdtm"):
                    continue
                (fn,) = _functions(models, components, case, latent, chunk)
                errors = [_replay_error(fn, case, "float16", c, Path(tmp))[0] for c in compressions]
                print(f"{case.component + '/' + case.unit + ' ' + case.function:<42} "
                      + " ".join(f"{e:9.2e}" for e in errors), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="the full-size export with the iPhone 15 Pro profile")
    e.add_argument("--model", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("extra", nargs="*", help="more export_coreml options (after --)")
    for name in ("units", "compression"):
        u = sub.add_parser(name, help="unit kinds at full width against MLX")
        u.add_argument("--model", type=Path, required=True)
        u.add_argument("--latent", default="4x8x8", help="STDiT3 latent TxHxW")
        u.add_argument("--chunk", default="5x8x8x17", help="VAE chunk: latent TxHxW x video frames")
    args = parser.parse_args()
    from mlx_sora.runtime.blas import ensure_fast_cpu_blas

    ensure_fast_cpu_blas(quiet=True)
    if args.command == "export":
        bench_export(args.model, args.out, args.extra)
        return 0
    latent = tuple(int(v) for v in args.latent.split("x"))
    chunk = tuple(int(v) for v in args.chunk.split("x"))
    bench_units(args.model, latent, chunk, ["int8", "palette8", "palette6", "int4"] if args.command == "compression"
                else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
