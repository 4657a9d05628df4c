"""Time the text-encoding phase alone through the streaming executor: seconds, seconds waiting for
weights, loads, the process's peak memory (the load-hiding figure of README's CI-DL section).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python scripts/bench_text_phase.py --model /tmp/real            # overlapped loading
    ... --no-overlap                                                    # load, then compute

``--model``: a folder made by ``scripts/bench_memory.py prepare`` (or any converted Open-Sora 1.2).
"""

from __future__ import annotations

import argparse

from mlx_sora import Pipeline
from mlx_sora.request import GenerationRequest
from mlx_sora.runtime.memory import measure_phase


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--memory-budget", default="100GB")
    parser.add_argument("--no-overlap", action="store_true")
    parser.add_argument("--size", default="256x256x68", help="HxWxFRAMES of the request (plans only)")
    args = parser.parse_args()
    height, width, frames = (int(v) for v in args.size.split("x"))
    pipe = Pipeline.from_pretrained(args.model, dtype="float32", memory_budget=args.memory_budget,
                                    overlap=not args.no_overlap)
    request = GenerationRequest.build("a red panda eating bamboo in a misty forest", pipe.defaults,
                                      model_name="the model", image_size=(height, width), num_frames=frames,
                                      steps=30, lpl=0, seed=0)
    text_phase = pipe.plan(request)[0]
    print(text_phase.plan.summary())
    with measure_phase("text encoding") as report:
        pipe.encode_text(list(request.texts), text_phase, report)
    print(f"text encoding {report.seconds:.1f} s, waited {report.load_wait:.2f} s for weights, "
          f"{report.loads} loads, {report.process_peak_name} {report.process_peak / 2**30:.2f} GiB")
    print("waited per unit: " + " ".join(f"{name} {s:.2f}" for name, s in report.load_wait_by_unit.items()))


if __name__ == "__main__":
    main()
