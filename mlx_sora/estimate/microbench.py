"""``this-machine``: the device model of the machine we run on, measured by short microbenchmarks
(a few seconds) and cached per machine.

Each rate is measured on ops of the shapes the models run, through the code paths the pipeline
uses (``fast_ops``' kernels, the VAE's parallel CPU stages), and counted with the conventions of
``cost.py`` (FLOPs by definition, elementwise bytes as passes over the arrays), so a counted op
divided by its rate is its time here. The cache file (``~/.cache/mlx-sora/devices/``, or under
``$XDG_CACHE_HOME``) is keyed by the CPU model, the core count, the MLX version, the BLAS library and
the default device, and written atomically; ``--remeasure`` measures again. Timings on a shared
machine vary with its load: the load average at measuring time is recorded with the rates.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx

from ..runtime.blas import fast_blas_loaded
from .devices import THIS_MACHINE, DeviceModel

SCHEMA = 6  # bump when the measurements change meaning: older cache files are measured again


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlx-sora" / "devices"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_key() -> dict[str, str | int]:
    blas = fast_blas_loaded() if platform.system() == "Linux" else "system"
    return {"cpu": cpu_model(), "cores": os.cpu_count() or 1, "mlx": mx.__version__,
            "blas": blas or "MLX reference BLAS", "device": str(mx.default_device()), "schema": SCHEMA}


def cache_path(key: dict, folder: Path | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return (folder or cache_dir()) / f"{THIS_MACHINE}-{digest}.json"


def this_machine(remeasure: bool = False, cache_dir: Path | None = None) -> DeviceModel:
    """This machine's device model: from the cache when it holds one for this key, else measured now
    (and cached)."""
    key = cache_key()
    path = cache_path(key, cache_dir)
    if not remeasure and path.is_file():
        try:
            values = json.loads(path.read_text())
            if values.get("measured", {}).get("key") == key:
                return DeviceModel.from_dict(values, str(path))
        except (OSError, ValueError):
            pass  # unreadable or stale: measure again
    device = measure(key)
    _write_atomically(path, json.dumps(device.to_dict(), indent=1) + "\n")
    return device


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- the microbenchmarks


def _seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median wall time of ``fn`` (which evaluates its work) after one warm-up run."""
    return _first_and_seconds(fn, repeats)[1]


def _first_and_seconds(fn: Callable[[], object], repeats: int = 3) -> tuple[float, float]:
    """(how much longer the first run took: tracing and compiling for new shapes; the median of the
    following runs)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return max(0.0, first - statistics.median(times)), statistics.median(times)


def _rate(work: list[tuple[float, Callable[[], object]]]) -> float:
    """Counted work per second over several benchmarks: sum of work / sum of median times."""
    return sum(amount for amount, _ in work) / sum(_seconds(fn) for _, fn in work)


def _matmul_rate() -> float:
    work = []
    for m, k, n in ((512, 1152, 4608), (300, 4096, 2048)):  # STDiT3's MLP, T5-XXL's widths
        a, w = mx.random.normal((m, k)), mx.random.normal((n, k))  # as a linear layer holds its weight
        mx.eval(a, w)
        work.append((2.0 * m * k * n, lambda a=a, w=w: mx.eval(a @ w.T)))
    return _rate(work)


def _attention(shape: tuple[int, int, int, int]) -> tuple[float, Callable[[], object]]:
    from ..models import fast_ops

    seqs, heads, n, d = shape
    q, k, v = (mx.random.normal(shape) for _ in range(3))
    mx.eval(q, k, v)
    return 4.0 * seqs * heads * n * n * d, lambda: mx.eval(fast_ops.attention(q, k, v, scale=d**-0.5))


def _attention_rates() -> tuple[float, float]:
    """FLOP/s of attention over long sequences (STDiT3's spatial, T5-XXL's), and the fixed seconds per
    sequence and head of a batch of short ones (STDiT3's temporal attention: many products of a few
    frames each)."""
    rate = _rate([_attention((2, 16, 256, 72)), _attention((1, 64, 300, 64))])
    flops, short = _attention((256, 16, 8, 72))
    return rate, max(0.0, _seconds(short) - flops / rate) / (256 * 16)


# (kernel, input channels, input shape): the VAE decoders' 3x3 convolutions from the demo's widths to
# the real model's (whose widths run at lower resolutions: 128 channels at full size, 512 at the
# latent's), in micro-batches of 2 images, and the temporal decoder's 3x3x3 ones over a 5-frame chunk
CONV_SHAPES = (("3x3", 32, (2, 128, 128, 32)), ("3x3", 64, (2, 128, 128, 64)), ("3x3", 128, (2, 128, 128, 128)),
               ("3x3", 256, (2, 64, 64, 256)), ("3x3", 512, (2, 32, 32, 512)),
               ("3x3x3", 128, (1, 5, 32, 32, 128)), ("3x3x3", 256, (1, 5, 32, 32, 256)),
               ("3x3x3", 512, (1, 5, 16, 16, 512)))


def _conv_rates() -> tuple[float, dict[str, list[list[float]]]]:
    """FLOP/s of the VAE decoders' convolutions, counted by definition, run as the decoders run them
    (``fast_ops.run_layers``: Winograd in parallel parts on the CPU): over all the shapes, and by kernel
    and width (a CPU's rate grows with the channels: measured 22 GFLOP/s at 32, 140 at 512)."""
    from ..models import fast_ops
    from ..models.vae_spatial import Conv2d
    from ..models.vae_temporal import CausalConv3d

    by_width: dict[str, list[list[float]]] = {}
    flops_total = seconds_total = 0.0
    for kernel, width, shape in CONV_SHAPES:
        # three in a row, as a stage runs its layers (one split into parallel parts for all of them)
        convs = [Conv2d(width, width, 3, padding=1) if kernel == "3x3" else CausalConv3d(width, width, 3)
                 for _ in range(3)]
        x = mx.random.normal(shape)
        mx.eval([conv.parameters() for conv in convs], x)
        flops = 3 * 2.0 * x.size * width * (9 if kernel == "3x3" else 27)
        seconds = _seconds(lambda convs=convs, x=x: mx.eval(fast_ops.run_layers(convs, x)))
        by_width.setdefault(kernel, []).append([float(width), flops / seconds])
        flops_total, seconds_total = flops_total + flops, seconds_total + seconds
    return flops_total / seconds_total, by_width


ELEMENTWISE_SIZES = (2**18, 2**21, 2**25)  # bytes per array: in the caches .. far beyond them


def _elementwise_rates() -> tuple[list[list[float]], float]:
    """Bytes/s of plain elementwise ops (as STDiT3 and T5 run them) by array size, and of the VAE's
    (GroupNorm + SiLU and residuals in its parallel CPU stages), counted as ``cost.py`` counts them."""
    from ..models import fast_ops
    from ..models.vae_spatial import GroupNorm

    itemsize = 4
    by_size = []
    for size in ELEMENTWISE_SIZES:
        x, y = mx.random.normal((size // itemsize // 128, 128)), mx.random.normal((size // itemsize // 128, 128))
        mx.eval(x, y)
        repeats = max(1, 2**24 // size)  # small arrays: several per timing, so that it lasts

        def timed(fn, x=x, repeats=repeats):
            return lambda: [mx.eval(fn(x)) for _ in range(repeats)]

        by_size.append([float(size), _rate([
            (repeats * 3 * size, timed(lambda x, y=y: x + y)),
            (repeats * 2 * size, timed(lambda x: mx.fast.layer_norm(x, None, None, 1e-6))),
            (repeats * 4 * size, timed(fast_ops.gelu_tanh)),
        ])])
    norm = GroupNorm(32, 256)
    images = mx.random.normal((2, 64, 64, 256))
    mx.eval(norm.parameters(), images)
    vae = _rate([
        (8 * images.size * itemsize, lambda: mx.eval(fast_ops.run_layers([lambda h: norm(h, silu=True)], images))),
        (3 * images.size * itemsize, lambda: mx.eval(fast_ops.run_layers([lambda h: h + images], images))),
    ])
    return by_size, vae


def _fixed_costs() -> dict[str, float]:
    """Seconds per run of each kind of layer at a tiny size, where its arithmetic is negligible: what
    dispatching and evaluating its ops costs (``cost.UnitCall.layers``). The layers run as the
    pipeline runs them: a unit of a tiny model evaluated, a VAE layer in ``fast_ops.run_layers``."""
    import gc

    from ..conversion.loading import load_model, save_model
    from ..models import fast_ops
    from ..models.stdit3 import STDiT3, STDiT3Config
    from ..models.t5 import T5Config, T5Encoder
    from ..models.vae_spatial import Attention, Conv2d, ResnetBlock2D
    from ..models.vae_temporal import CausalConv3d, ResBlock
    from ..runtime.memory import release_freed_cpu_memory
    from ..runtime.streaming import PhasePlan, StreamingWeights
    from ..sampling import SamplerConfig, iterate_sampling

    costs: dict[str, float] = {}

    def record(key: str, fn: Callable[[], object]) -> None:
        first, seconds = _first_and_seconds(fn, repeats=5)
        costs[key], costs[f"{key}.first"] = seconds, first

    def unit_seconds(key: str, unit, carry) -> None:
        record(key, lambda: mx.eval(_arrays(unit.run(carry))))

    tiny = mx.ones((16,))
    mx.eval(tiny)
    costs["unit"] = _seconds(lambda: [mx.eval(tiny + 1) for _ in range(50)], repeats=3) / 50

    t5 = T5Encoder(T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                            relative_attention_num_buckets=8, relative_attention_max_distance=16,
                            feed_forward_proj="gated-gelu"))
    mx.eval(t5.parameters())
    carry = (mx.zeros((1, 20), dtype=mx.int32), mx.ones((1, 20)))
    for unit, key in zip(t5.units, ("t5.embed", "t5.block", "t5.final_norm")):  # in order: first runs are fresh
        unit_seconds(key, unit, carry)
        carry = unit.run(carry)

    stdit = STDiT3(STDiT3Config(depth=1, hidden_size=32, num_heads=2, caption_channels=32, model_max_length=8))
    mx.eval(stdit.parameters())
    for merge in (False, True):
        carry = dict(x=mx.zeros((2, 4, 4, 4, 4)), timestep=mx.array([500.0, 500.0]), y=mx.zeros((2, 1, 8, 32)),
                     mask=mx.ones((1, 8)), fps=mx.array([24.0]), height=mx.array([32.0]), width=mx.array([32.0]),
                     merge=merge)
        keys = ("stdit3.embedders", "stdit3.block_tdtm" if merge else "stdit3.block", "stdit3.final_layer")
        for unit, key in zip(stdit.units, keys):
            if merge and unit is not stdit.units[1]:
                carry = unit.run(carry)
                continue
            unit_seconds(key, unit, carry)
            carry = unit.run(carry)
            mx.eval(_arrays(carry))

    modules = [ResnetBlock2D(32, 32, 8), ResBlock(32, 32, 8, "swish"), Conv2d(32, 32, 3, padding=1),
               CausalConv3d(32, 32, 3), Attention(32, 8)]
    mx.eval([m.parameters() for m in modules])
    image, clip = mx.zeros((1, 4, 4, 32)), mx.zeros((1, 2, 4, 4, 32))
    for key, layers in (("vae.res_block", ((modules[0], image), (modules[1], clip))),
                        ("vae.conv", ((modules[2], image), (modules[3], clip))), ("vae.attention", ((modules[4], image),))):
        measured = []
        for layer, x in layers:  # the spatial and the temporal layer of a kind: their mean
            record(key, lambda layer=layer, x=x: mx.eval(fast_ops.run_layers([layer], x)))
            measured.append((costs[key], costs[f"{key}.first"]))
        costs[key] = sum(m[0] for m in measured) / len(measured)
        costs[f"{key}.first"] = sum(m[1] for m in measured) / len(measured)

    def sampling() -> None:
        for _ in iterate_sampling(lambda z, t, merge: mx.concatenate([z, z], axis=1), mx.zeros((1, 4, 2, 4, 4)),
                                  [mx.array([1000.0 - 100 * i]) for i in range(10)], SamplerConfig(num_steps=10)):
            pass

    costs["sampler.step"] = _seconds(sampling) / 10

    with tempfile.TemporaryDirectory(prefix="mlx-sora-bench-") as folder:
        config = STDiT3Config(depth=1, hidden_size=32, num_heads=2, caption_channels=32, model_max_length=8)
        path = save_model(stdit, Path(folder) / "stdit3", "stdit3", config.to_dict())

        def phase() -> None:  # what a streamed phase does around its units (pipeline._in_phase)
            model = load_model(path, dtype=mx.float32, lazy=True)
            names = tuple(u.name for u in model.units)
            weights = StreamingWeights(model, path, PhasePlan("p", 2**40, 0, 0, (), names, True), mx.float32)
            weights.close()
            del model
            gc.collect()
            mx.clear_cache()
            release_freed_cpu_memory()

        costs["phase"] = _seconds(phase)
    return costs


def _arrays(carry) -> list:
    from ..models.units import arrays_of

    return arrays_of(carry)


def _storage_rates() -> tuple[float, float, float]:
    """(file bytes read per second, bytes cast per second, seconds per load) for weight files in the
    page cache, loaded as ``StreamingWeights`` loads them (``mx.load``; the cast of bfloat16 weights
    to float32 measured on its own)."""
    with tempfile.TemporaryDirectory(prefix="mlx-sora-bench-") as folder:
        rows = 8 * 2**20 // 1152  # 32 MiB of float32
        weights = mx.random.normal((rows, 1152))
        stored = weights.astype(mx.bfloat16)
        mx.eval(stored)
        paths = {name: str(Path(folder) / f"{name}.safetensors") for name in ("f32", "tiny")}
        mx.save_safetensors(paths["f32"], {"w": weights})
        mx.save_safetensors(paths["tiny"], {"w": mx.ones((16,))})
        for path in paths.values():
            Path(path).read_bytes()  # into the page cache, as a converted folder read before

        def load(path: str) -> None:
            mx.eval(mx.load(path)["w"])

        read = _seconds(lambda: load(paths["f32"]))
        overhead = _seconds(lambda: load(paths["tiny"]), repeats=5)
        cast = _seconds(lambda: mx.eval(stored.astype(mx.float32)))
    size = weights.size
    return 4 * size / max(read - overhead, 1e-9), 4 * size / max(cast, 1e-9), overhead


def _overlap_slowdown() -> float:
    """How much longer matrix products take while weights load beside them, as ``StreamingWeights``
    loads them (``mx.load`` and the cast on a second CPU stream): the loader shares the cores."""
    with tempfile.TemporaryDirectory(prefix="mlx-sora-bench-") as folder:
        path = str(Path(folder) / "w.safetensors")
        mx.save_safetensors(path, {"w": mx.random.normal((8 * 2**20 // 1152, 1152)).astype(mx.bfloat16)})
        Path(path).read_bytes()
        a, w = mx.random.normal((512, 1152)), mx.random.normal((4608, 1152))
        mx.eval(a, w)

        def products() -> float:
            start = time.perf_counter()
            mx.eval([a @ w.T for _ in range(4)])
            return time.perf_counter() - start

        loader = mx.new_stream(mx.cpu)

        def beside_loads() -> float:
            with mx.stream(loader):  # more loading than the products last
                loads = [mx.load(path, stream=loader)["w"].astype(mx.float32) for _ in range(40)]
            mx.async_eval(loads)
            seconds = products()
            mx.eval(loads)
            return seconds

        alone = _seconds(products)
        products()
        beside = statistics.median(beside_loads() for _ in range(3))
    return max(1.0, beside / alone)


def _give_back_memory() -> None:
    """Return what the benchmarks allocated: the projection plans from this process's memory."""
    import gc

    from ..runtime.memory import release_freed_cpu_memory

    gc.collect()
    mx.clear_cache()
    release_freed_cpu_memory()


def measure(key: dict | None = None) -> DeviceModel:
    """Measure this machine (a few seconds)."""
    from ..runtime.memory import keep_freed_cpu_memory
    from ..runtime.streaming import format_bytes

    # the CPU allocator policy the models run with (load_model sets it): without it every large
    # buffer is faulted in afresh, and the VAE's 128-channel convolutions measured 55 GFLOP/s, not 85
    keep_freed_cpu_memory()
    key = key or cache_key()
    start = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    matmul, (attention, attention_item), (conv, conv_by_width) = _matmul_rate(), _attention_rates(), _conv_rates()
    by_size, vae = _elementwise_rates()
    plain = by_size[-1][1]
    fixed = {**_fixed_costs(), "attention.item": attention_item}
    read_rate, cast_rate, load_overhead = _storage_rates()
    slowdown = _overlap_slowdown()
    _give_back_memory()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # the physical memory (Linux, macOS)
    cpu = mx.default_device() == mx.cpu
    how = "measured by mlx_sora.estimate.microbench on this machine"
    return DeviceModel(
        name=THIS_MACHINE,
        description=f"{key['cpu']}, {key['cores']} cores, {format_bytes(memory)} RAM, MLX {key['mlx']}, "
                    f"BLAS {Path(str(key['blas'])).name}",
        engine="cpu" if cpu else "gpu",
        compute_dtype="float32" if cpu else "bfloat16",
        throughput={"matmul": matmul, "attention": attention, "conv": conv, "elementwise": plain},
        components={"vae": {"elementwise": vae}},
        elementwise_by_size=by_size,
        conv_by_width=conv_by_width,
        storage_read_rate=read_rate,
        cast_rate=cast_rate,
        load_overhead_s=load_overhead,
        overlap_slowdown=slowdown,
        fixed_s=fixed,
        memory_bytes=int(memory),
        sources={
            "throughput.matmul": f"{how}: float32 products 512x1152x4608 and 300x4096x2048",
            "throughput.attention": f"{how}: fast_ops.attention on 2x16 sequences of 256 (width 72) and "
                                    "64 of 300 (width 64), softmax included; fixed_s.attention.item: 256x16 "
                                    "sequences of 8",
            "throughput.conv": f"{how}: all of conv_by_width's shapes together",
            "conv_by_width": f"{how}: three 3x3 Conv2d in a row of 32, 64, 128 channels at 2x128x128, 256 at "
                             "2x64x64, 512 at 2x32x32; three 3x3x3 CausalConv3d of 128, 256 channels at 5x32x32, "
                             "512 at 5x16x16; in the VAE's parallel CPU stages; FLOPs by definition",
            "throughput.elementwise": f"{how}: add, layer norm, tanh-GELU on 32 MiB arrays (bytes as passes); "
                                      "elementwise_by_size: the same on 256 KiB, 2 MiB and 32 MiB arrays",
            "components.vae.elementwise": f"{how}: GroupNorm + SiLU and a residual add in the parallel stages",
            "storage_read_rate": f"{how}: mx.load of a 32 MiB float32 safetensors file in the page cache",
            "cast_rate": f"{how}: 32 MiB of bfloat16 weights cast to float32 (bytes written)",
            "overlap_slowdown": f"{how}: 512x1152x4608 products while bfloat16 files load and cast on a second "
                                "stream, against alone",
            "fixed_s": f"{how}: each kind of layer run at a tiny size (a tiny T5, STDiT3 and VAE layers, as the "
                       "pipeline runs them), a sampling loop of 10 steps, a streamed phase's setup of a tiny model",
            "memory_bytes": "/proc/meminfo MemTotal (or the physical pages)",
            "memory_budget_bytes": "none: 80 % of the memory available when projecting (generate's default)",
            "process_bytes": "none: this process's resident memory when projecting",
        },
        measured={"key": key, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                  "seconds": round(time.perf_counter() - start, 2), "load_average": load_before},
    )
