"""CI-DL memory benchmark: the whole pipeline at real Open-Sora 1.2 sizes within a memory budget.

Real sizes (T5 v1.1 XXL encoder, STDiT3-XL/2, VAE v1.2) with random weights, written through the
converter's own code path (``write_converted_folder``, bfloat16 storage like the converted release;
an int8 copy of the text encoder), then one generation per configuration, each in a fresh process so
that its peak memory (max RSS on Linux, peak footprint on macOS) is its own: CFG batch 2, one
denoising evaluation (30-step schedule, leap at step 0, so that the plan is the 30-step one), float32
compute.

    python scripts/bench_memory.py prepare --out weights/bench-real          # ~13 GB on disk, once
    python scripts/bench_memory.py all --model weights/bench-real --sizes 192x192x17 256x256x68

Configurations:
    resident          --memory-budget none: each phase loads its whole model
    stream-sequential every unit streamed (one evaluation: nothing gains from staying resident),
                      no loading ahead
    stream-overlap    the same, with the next unit loading while the current one computes
    budget-3.3GB      --memory-budget 3.3GB (the iPhone 15 Pro app's limit)
    budget-2GB        --memory-budget 2GB
    int8-t5           --memory-budget 3.3GB with the int8 text encoder

Per phase it prints seconds, MLX peak, the process's peak (max RSS / peak footprint), unit loads,
seconds waiting for weights, and, for stream-overlap, the share of the load time hidden behind compute: 1 - wait(stream-overlap) /
wait(stream-sequential), the same plan with and without loading ahead (budgeted runs have no
sequential twin: their wait is printed, no share). The JSON has the wait of every unit, and the
header the rate at which the machine hands out fresh memory (``page_fault_rates``). Before
each run the weight files it uses are read once, so every run starts from a warm page cache (a fully
resident run would otherwise evict the next run's files); ``--cold`` drops them from the page cache
instead (the disk's read speed then counts; Linux: ``posix_fadvise``, which macOS lacks: there run
``sudo purge`` before each run instead).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

CONFIGS = {
    "resident": dict(memory_budget=None, steps=1),
    "stream-sequential": dict(memory_budget="100GB", steps=1, overlap=False),
    "stream-overlap": dict(memory_budget="100GB", steps=1, overlap=True),
    "budget-3.3GB": dict(memory_budget="3.3GB", steps=30, lpl=0),
    "budget-2GB": dict(memory_budget="2GB", steps=30, lpl=0),
    "int8-t5": dict(memory_budget="3.3GB", steps=30, lpl=0, prefer_quantized=True),
}
PHASES = ("text encoding", "denoising", "decoding")
GIB = 2**30


# ---------------------------------------------------------------- random real-size folders


def prepare(out: Path, t5_layers: int) -> None:
    from mlx.utils import tree_flatten

    from mlx_sora.conversion.loading import parse_dtype, write_converted_folder
    from mlx_sora.conversion.quantization import parse_quantization
    from mlx_sora.models import family_for_type
    from mlx_sora.models.stdit3 import STDiT3Config
    from mlx_sora.models.t5 import T5Config
    from mlx_sora.models.vae import VideoAutoencoderConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import train_spiece  # a small sentencepiece model: the prompt only needs some ids

    spiece_dir = out / "_spiece"
    spiece_dir.mkdir(parents=True, exist_ok=True)
    train_spiece(spiece_dir)
    t5 = {**T5Config.t5_v1_1_xxl().__dict__, "num_layers": t5_layers}
    configs = {
        "text_encoder": ("t5", t5, None),
        "text_encoder_int8": ("t5", t5, "int8"),
        "stdit3": ("stdit3", STDiT3Config().to_dict(), None),
        # for scripts/bench_quantization.py (kept outside this folder's model: names sort after)
        "quantized/text_encoder_int4": ("t5", t5, "int4"),
        "quantized/stdit3_int8": ("stdit3", STDiT3Config().to_dict(), "int8"),
        "vae": ("vae", VideoAutoencoderConfig().to_dict(), None),
    }
    for name, (model_type, config, quantize) in configs.items():
        target = out / name
        if (target / "config.json").exists():
            print(f"{target} exists")
            continue
        family = family_for_type(model_type)
        model = family.build(config)  # lazy: only shapes are used
        shapes = {k: v.shape for k, v in tree_flatten(model.parameters())}

        def loader(key: str, shape: tuple[int, ...]):
            # deterministic per key (the int8 copy gets the same weights), different for every key (a seed
            # from the key's last bytes gave every block the same weights, which a Core ML export stores
            # once); fan-in scaled, norms at 1
            seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % 2**63
            if key.endswith(("norm.weight", "norm_final.weight")) or key in ("scale",):
                return lambda: mx.ones(shape)
            if key == "shift":
                return lambda: mx.zeros(shape)
            fan_in = shape[-1] if len(shape) > 1 else 1
            return lambda: mx.random.normal(shape, key=mx.random.key(seed)) * fan_in**-0.5
        start = time.perf_counter()
        write_converted_folder(target, family, config, model, ((k, loader(k, s)) for k, s in shapes.items()),
                               parse_dtype("bfloat16"), source_dir=spiece_dir, source="random (bench_memory.py)",
                               quantization=parse_quantization(quantize))
        size = sum(f.stat().st_size for f in target.iterdir())
        print(f"wrote {target}: {size / GIB:.2f} GiB in {time.perf_counter() - start:.0f} s", flush=True)


# ---------------------------------------------------------------- one configuration


def drop_page_cache(folder: Path) -> None:
    if not hasattr(os, "posix_fadvise"):  # macOS: no per-file way to drop cached pages without root
        raise SystemExit("error: --cold needs posix_fadvise (Linux); on macOS drop the page cache with "
                         "`sudo purge` before a run instead, and leave --cold out")
    for path in folder.rglob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_page_cache(folders) -> None:
    for folder in folders:
        for path in Path(folder).glob("*.safetensors"):
            with open(path, "rb", buffering=0) as f:
                while f.read(64 << 20):
                    pass


def page_fault_rates(size: int = 512 << 20) -> tuple[float, float]:
    """GiB/s at which this machine hands a process fresh memory (one write per page of an anonymous
    mapping): as found, and again right after it was given back. On a virtual machine
    that returns freed memory to its host (Linux free page reporting, virtio-balloon) the first
    figure can be several times lower: every load that needs memory the process has not used yet
    pays it (the text phase's first two T5 units)."""
    import mmap

    import numpy as np

    rates = []
    for _ in range(2):
        region = mmap.mmap(-1, size)
        start = time.perf_counter()
        np.frombuffer(region, dtype=np.uint8)[::mmap.PAGESIZE] = 1
        rates.append(size / GIB / (time.perf_counter() - start))
        region.close()
    return rates[0], rates[1]


def run_one(model: Path, config_name: str, size: str, cold: bool) -> dict:
    from mlx_sora import Pipeline

    height, width, frames = (int(v) for v in size.split("x"))
    options = dict(CONFIGS[config_name])
    steps, lpl = options.pop("steps"), options.pop("lpl", None)
    pipe = Pipeline.from_pretrained(model, dtype="float32", **options)
    if cold:
        drop_page_cache(model)
    else:
        warm_page_cache(pipe.components.values())
    start = time.perf_counter()
    result = pipe.generate("a red panda eating bamboo in a misty forest", image_size=(height, width),
                           num_frames=frames, steps=steps, lpl=lpl, seed=0)
    total = time.perf_counter() - start
    streamed = {plan.phase: len(plan.streamed) for plan in result.plans}
    return {
        "config": config_name, "size": size, "cold": cold, "seconds": total, "process_peak": result.process_peak,
        "process_peak_name": result.process_peak_name,
        "budget": pipe.memory_budget, "within_budget": result.within_budget,
        "evaluations": result.sampling.evaluations,
        "plans": [p.summary() for p in result.plans],
        "phases": {p.name: {"seconds": p.seconds, "peak_memory": p.peak_memory, "process_peak": p.process_peak,
                            "loads": p.loads, "load_wait": p.load_wait, "read_bytes": p.read_bytes,
                            "load_wait_by_unit": p.load_wait_by_unit,
                            "streamed": streamed.get(p.name, 0)}
                   for p in result.phases},
        "finite": bool(all(v.size for v in result.videos)),
        "load_average": os.getloadavg()[0],
    }


def print_table(runs: list[dict]) -> None:
    measure = runs[0]["process_peak_name"] if runs else "max RSS"
    print(f"\n{'size':<11} {'config':<18} {'phase':<14} {'seconds':>8} {'MLX peak':>9} {measure:>14} "
          f"{'loads':>6} {'wait s':>7} {'hidden':>7}")
    by_key = {(r["size"], r["config"]): r for r in runs}
    for r in runs:
        for phase in PHASES:
            p = r["phases"][phase]
            hidden = ""
            sequential = by_key.get((r["size"], "stream-sequential"))
            if r["config"] == "stream-overlap" and p["streamed"] and sequential:
                base = sequential["phases"][phase]["load_wait"]
                if base > 0:
                    hidden = f"{100 * (1 - p['load_wait'] / base):.0f} %"
            print(f"{r['size']:<11} {r['config']:<18} {phase:<14} {p['seconds']:8.1f} "
                  f"{p['peak_memory'] / GIB:8.2f}G {p['process_peak'] / GIB:13.2f}G {p['loads']:6d} "
                  f"{p['load_wait']:7.1f} {hidden:>7}")
        verdict = "" if r["within_budget"] is None else f", within budget: {r['within_budget']}"
        print(f"{'':<11} {r['config']:<18} {'whole run':<14} {r['seconds']:8.1f} {'':>9} "
              f"{'':>5} {r['process_peak'] / GIB:8.2f}G{verdict} (load average {r['load_average']:.1f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write the random real-size folders")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--t5-layers", type=int, default=24)
    r = sub.add_parser("run", help="one configuration (prints JSON)")
    r.add_argument("--model", type=Path, required=True)
    r.add_argument("--config", choices=list(CONFIGS), required=True)
    r.add_argument("--size", default="192x192x17", help="HEIGHTxWIDTHxFRAMES")
    r.add_argument("--cold", action="store_true", help="drop the weight files from the page cache first")
    a = sub.add_parser("all", help="every configuration, each in a fresh process, and the table")
    a.add_argument("--model", type=Path, required=True)
    a.add_argument("--sizes", nargs="+", default=["192x192x17", "256x256x68"])
    a.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    a.add_argument("--cold", action="store_true")
    a.add_argument("--json", type=Path, default=None, help="also write the runs here")
    args = parser.parse_args()

    if args.command == "prepare":
        prepare(args.out, args.t5_layers)
        return 0
    if args.command == "run":
        print(json.dumps(run_one(args.model, args.config, args.size, args.cold)))
        return 0
    print(f"device {mx.default_device()}, {os.cpu_count()} cpus, LD_PRELOAD={os.environ.get('LD_PRELOAD', '-')}, "
          f"{'cold' if args.cold else 'warm'} page cache", flush=True)
    found, reused = page_fault_rates()
    print(f"fresh memory: {found:.2f} GiB/s as found, {reused:.2f} GiB/s reused at once", flush=True)
    runs = []
    for size in args.sizes:
        for config in args.configs:
            command = [sys.executable, __file__, "run", "--model", str(args.model), "--config", config,
                       "--size", size] + (["--cold"] if args.cold else [])
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{size} {config}: failed\n{done.stderr[-2000:]}", flush=True)
                continue
            run = json.loads(done.stdout.strip().splitlines()[-1])
            runs.append(run)
            print(f"{size} {config}: {run['seconds']:.1f} s, {run['process_peak_name']} "
                  f"{run['process_peak'] / GIB:.2f} GiB", flush=True)
            for plan in run["plans"]:
                print("  " + plan.replace("\n", "\n  "))
            if args.json:
                args.json.write_text(json.dumps(runs, indent=1))
    print_table(runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
