"""Generation across ranks: 1 rank against 2 on this machine, per mode, and the projection for N Macs.

Each configuration runs in fresh processes started the way mlx.launch starts ranks (the ring backend
over localhost; ``runtime.distributed.spawn_local_ranks``), every rank pinned to a core of its own
and running one BLAS thread (1 rank: core 0; 2 ranks: cores 0 and 1), so that two ranks stand for two
machines of one core each. Memory budget none (each phase loads its whole model), float32.

    python scripts/bench_distributed.py                                   # the demo model, 64x64x17
    python scripts/bench_distributed.py --sizes 64x64x17 256x256x68 --steps 6 --json dist.json

Per mode and rank count it prints: seconds per denoising step (the median over the steps after the
first, of every rank), the denoising phase's seconds (all seeds), bytes each rank sends per step
(measured, and as counted from the split: they must agree), MLX peak and max RSS of each rank. The
modes run one prompt; ``data`` runs 2 seeds (one process makes both, two ranks one each),
``cfg`` and ``sequence`` one seed.

Then the projection for N Macs: the bytes a rank sends per denoising step for STDiT3-XL/2 in
bfloat16 (how a Mac's GPU runs it) at the paper's 256x256x68 and at 720p 4 s, and the seconds they
take at Thunderbolt's line rates (Thunderbolt 4: 40 Gb/s, Thunderbolt 5: 80 Gb/s, each direction;
Intel's Thunderbolt 4 and Thunderbolt 5 specifications). TCP over a Thunderbolt bridge reaches less
than the line rate, so these are lower bounds on the time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

MODES = ("data", "cfg", "sequence")
LINKS = {"Thunderbolt 4 (40 Gb/s)": 40e9 / 8, "Thunderbolt 5 (80 Gb/s)": 80e9 / 8}
PROJECTED = {"256x256x68": (256, 256, 68), "720p 4 s (720x1280x102)": (720, 1280, 102)}

WORKER = r'''
import json, sys
from mlx_sora.pipeline import Pipeline
from mlx_sora.runtime.distributed import init_group
mode, model, ranks = sys.argv[1], sys.argv[2], int(sys.argv[3])
height, width, frames, steps = (int(v) for v in sys.argv[4:8])
seeds = [0, 1] if mode == "data" else [0]
group = init_group(timeout=1800) if ranks > 1 else None
pipe = Pipeline.from_pretrained(model, memory_budget=None, group=group, parallel=mode, rank_timeout=1800)
results = pipe.generate("a red circle moving left", seed=seeds, steps=steps, image_size=(height, width),
                        num_frames=frames)
steps_seconds = [s.seconds for r in results for s in r.sampling.steps[1:]]
rank = 0 if group is None else group.rank
if results and results[0].job is not None:
    job = results[0].job.ranks[rank]
    phases = {p["name"]: p for p in job.phases}
    evaluations = job.evaluations
else:
    phases = {p.name: dict(seconds=p.seconds, peak_memory=p.peak_memory, max_rss=p.process_peak, bytes_sent=0)
              for p in results[0].phases}
    evaluations = sum(r.sampling.evaluations for r in results)
print("RESULT " + json.dumps(dict(rank=rank, steps=steps_seconds, phases=phases, evaluations=evaluations,
                                  latent=list(results[0].latent_shape))))
'''


def parse_size(text: str) -> tuple[int, int, int]:
    height, width, frames = (int(v) for v in text.lower().split("x"))
    return height, width, frames


def run(mode: str, ranks: int, model: str, size: tuple[int, int, int], steps: int, pin: bool, folder: Path) -> list[dict]:
    from mlx_sora.runtime.blas import fast_blas_env
    from mlx_sora.runtime.distributed import spawn_local_ranks

    script = folder / "worker.py"
    script.write_text(WORKER)
    env = fast_blas_env(dict(os.environ, MLX_SORA_BLAS_CHECKED="1", MKL_NUM_THREADS="1", OMP_NUM_THREADS="1",
                             OPENBLAS_NUM_THREADS="1"))
    argv = [sys.executable, str(script), mode, model, str(ranks), *map(str, size), str(steps)]
    cpus = [[rank % os.cpu_count()] for rank in range(ranks)] if pin else None
    kwargs = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if ranks == 1:
        processes = [subprocess.Popen(argv, env=env, preexec_fn=(lambda: os.sched_setaffinity(0, {0})) if pin else None,
                                      **kwargs)]
    else:
        processes = spawn_local_ranks(argv, ranks, folder, env=env, cpus=cpus, **kwargs)
    reports = []
    for p in processes:
        out, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{mode} with {ranks} rank(s) failed:\n{err[-3000:]}")
        reports.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    return sorted(reports, key=lambda r: r["rank"])


# ---------------------------------------------------------------- bytes per step, counted from the split


def stdit_config(model: str):
    from mlx_sora.conversion.loading import read_converted_config
    from mlx_sora.conversion.registry import resolve_model
    from mlx_sora.models.stdit3 import STDiT3Config

    return STDiT3Config.from_dict(read_converted_config(resolve_model(model).components["stdit3"]))


def counted_bytes_per_step(config, mode: str, latent: tuple[int, int, int], prompts: int, ranks: int,
                           itemsize: int) -> int:
    """The most bytes a rank sends per model evaluation, from the split (what the code sends)."""
    from mlx_sora.models.stdit3_parallel import sequence_split_for
    from mlx_sora.runtime.distributed import all_to_all_sent

    t, h, w = latent
    velocity = prompts * config.in_channels * t * h * w * itemsize
    if mode == "data" or ranks == 1:
        return 0
    if mode == "cfg":
        return velocity  # all_gather of one half: (2 - 1) x its bytes
    split = sequence_split_for(SimpleNamespace(config=config), latent, ranks, merge=False)
    batch, hidden = 2 * prompts, config.hidden_size * itemsize

    def frames(r):
        return split.frame_count(r)

    def positions(r):
        return split.position_count(r)

    to_positions = all_to_all_sent(ranks, lambda o, d: batch * frames(o) * positions(d) * hidden)
    to_frames = all_to_all_sent(ranks, lambda o, d: batch * frames(d) * positions(o) * hidden)
    longest = max(frames(r) for r in range(ranks)) * config.patch_size[0]
    gather = (ranks - 1) * longest * batch * config.in_channels * h * w * itemsize
    return max(config.depth * (to_positions[r] + to_frames[r]) + gather for r in range(ranks))


def projection() -> list[str]:
    from mlx_sora.conversion.loading import build_model
    from mlx_sora.conversion.registry import resolve_model
    from mlx_sora.models.stdit3 import STDiT3Config

    config = STDiT3Config()  # XL/2
    vae = build_model(resolve_model("demo").components["vae"])  # VAE v1.2's latent sizes (17 frames -> 5)
    lines = ["", "Projection: STDiT3-XL/2, bfloat16, CFG batch 2 (one prompt), bytes a rank sends per denoising step "
             "and their seconds at the line rate"]
    header = "| size | mode | Macs | bytes / step / rank | " + " | ".join(f"s / step, {name}" for name in LINKS) + " |"
    lines += [header, "|" + "---|" * (4 + len(LINKS))]
    for name, (height, width, frames) in PROJECTED.items():
        latent = tuple(vae.get_latent_size((frames, height, width)))
        for mode, counts in (("cfg", (2,)), ("sequence", (2, 4, 8))):
            for macs in counts:
                sent = counted_bytes_per_step(config, mode, latent, 1, macs, 2)
                times = " | ".join(f"{sent / rate:.3f}" for rate in LINKS.values())
                lines.append(f"| {name} | {mode} | {macs} | {sent / 2**20:.1f} MiB | {times} |")
    lines.append("data: nothing per step (the caption embeddings once, 2.4 MB per prompt in bfloat16, and the reports)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--sizes", nargs="+", default=["64x64x17"], help="HEIGHTxWIDTHxFRAMES")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--no-pin", action="store_true", help="do not pin each rank to a core")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not args.no_pin and (not hasattr(os, "sched_setaffinity") or os.cpu_count() < 2):
        raise SystemExit("pinning needs Linux and 2 cores; pass --no-pin")

    config = stdit_config(args.model)
    rows, records = [], []
    print(f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    for text in args.sizes:
        size = parse_size(text)
        for mode in args.modes:
            for ranks in (1, 2):
                with tempfile.TemporaryDirectory() as folder:
                    start = time.perf_counter()
                    reports = run(mode, ranks, args.model, size, args.steps, not args.no_pin, Path(folder))
                    wall = time.perf_counter() - start
                load = os.getloadavg()[0]
                latent = tuple(reports[0]["latent"][2:])
                step = statistics.median(s for r in reports for s in r["steps"])
                denoise = max(r["phases"]["denoising"]["seconds"] for r in reports)
                evaluations = max(r["evaluations"] for r in reports)
                sent = [r["phases"]["denoising"]["bytes_sent"] / max(1, r["evaluations"]) for r in reports]
                counted = counted_bytes_per_step(config, mode, latent, 1, ranks, 4)
                peak = [r["phases"]["denoising"]["peak_memory"] for r in reports]
                rss = [max(p["max_rss"] for p in r["phases"].values()) for r in reports]
                record = dict(size=text, mode=mode, ranks=ranks, seconds_per_step=step, denoising_seconds=denoise,
                              evaluations=evaluations, bytes_per_step=sent, counted_bytes_per_step=counted,
                              peak_memory=peak, max_rss=rss, wall=wall, load_average=load)
                records.append(record)
                rows.append(f"| {text} | {mode} | {ranks} | {step:.3f} | {denoise:.2f} ({evaluations} evaluations) | "
                             f"{' / '.join(f'{b / 1024:.1f}' for b in sent)} KiB (counted {counted / 1024:.1f}) | "
                             f"{' / '.join(f'{p / 2**20:.0f}' for p in peak)} MiB | "
                             f"{' / '.join(f'{p / 2**20:.0f}' for p in rss)} MiB | {load:.1f} |")
                print(rows[-1], flush=True)
    print("\n| size | mode | ranks | s / step (median) | denoising s | sent / step / rank | MLX peak / rank "
          "(denoising) | max RSS / rank | load after |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n".join(projection()))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
