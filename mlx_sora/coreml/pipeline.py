"""Text -> video with the exported units: the MLX pipeline's request checks, sampler (LPL, TDTM) and
phase reports, every unit run through Core ML.

* **Backends.** On macOS Core ML runs each package's function (``coremltools.models.MLModel(...,
  function_name=...).predict``) on the compute units asked for (``cpu_and_gpu``, ``all``: with the
  Neural Engine, ``cpu_only``). Elsewhere the packages are replayed op by op (``replay.py``): slow,
  but the same program, which is how an export is checked on any machine. ``backend="auto"`` picks
  Core ML where it can run.
* **CI-DL.** Units load right before they run and are released after, except the ones the
  manifest's plan keeps resident; the next unit loads on a background thread while the current one
  runs (Core ML and the replay loader are both safe to call from another thread; nothing of MLX runs
  there). Waits for weights are measured per unit, like the MLX pipeline's streaming.
* **Sampler.** ``sampling.iterate_sampling``, unchanged: the exported STDiT3 returns the predictions
  of the prompt and of the null caption, the sampler guides and steps.

The macOS backend has not run in this project's CI (no Mac); the replay runs in its tests.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from ..conversion.registry import GenerationDefaults
from ..errors import UserError
from ..io.video import to_uint8_frames
from ..pipeline import GenerationResult
from ..prompts.tokenizer import T5Tokenizer
from ..request import GenerationRequest
from ..runtime.memory import PhaseReport, measure_phase
from ..sampling import IMG_FPS, iterate_sampling, sampling_timesteps
from .manifest import Manifest, carry_name, read_manifest
from .replay import PackageReplay
from .toolkit import can_predict, coremltools

COMPUTE_UNITS = ("cpu_and_gpu", "all", "cpu_only", "cpu_and_ne")
BACKENDS = ("auto", "coreml", "replay")


# ---------------------------------------------------------------------------- backends


class ReplayBackend:
    """Runs functions by replaying the package's program (any machine)."""

    name = "replay"

    def load(self, package: Path, function: str) -> PackageReplay:
        return PackageReplay(package)

    def run(self, handle: PackageReplay, function: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return handle(inputs, function)


class CoreMLBackend:
    """Runs functions with Core ML (macOS): one compiled ``MLModel`` per (package, function)."""

    name = "coreml"

    def __init__(self, compute_units: str = "cpu_and_gpu"):
        if compute_units not in COMPUTE_UNITS:
            raise UserError(f"--compute-units {compute_units!r}: choose one of {', '.join(COMPUTE_UNITS)}")
        ct = coremltools()
        self.compute_units = getattr(ct.ComputeUnit, compute_units.upper())

    def load(self, package: Path, function: str) -> Any:
        ct = coremltools()
        return ct.models.MLModel(str(package), compute_units=self.compute_units, function_name=function)

    def run(self, handle: Any, function: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in handle.predict(inputs).items()}


def make_backend(backend: str = "auto", compute_units: str = "cpu_and_gpu") -> ReplayBackend | CoreMLBackend:
    if backend not in BACKENDS:
        raise UserError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "coreml" or (backend == "auto" and can_predict()):
        if not can_predict():
            raise UserError("Core ML itself runs only on macOS (with coremltools' native module); use the replay "
                            "backend here (backend='replay', or leave it 'auto')")
        return CoreMLBackend(compute_units)
    return ReplayBackend()


# ---------------------------------------------------------------------------- CI-DL for packages


Key = tuple[str, str, str]  # (phase, unit, function)


@dataclass
class LoaderStats:
    loads: int = 0
    bytes_read: int = 0
    waited_by_unit: dict[str, float] = field(default_factory=dict)

    @property
    def waited(self) -> float:
        return sum(self.waited_by_unit.values())


class UnitLoader:
    """Loads each (unit, function) before it runs, the next one ahead on a background thread, and
    releases it after, unless its unit is resident."""

    def __init__(self, backend: Any, manifest: Manifest, resident: set[str], overlap: bool = True):
        self.backend = backend
        self.manifest = manifest
        self.resident = resident
        self.overlap = overlap
        self.stats = LoaderStats()
        self._units = {(phase, u["name"]): u for phase, units in _phase_units(manifest).items() for u in units}
        self._loaded: dict[Key, Any] = {}
        self._pending: dict[Key, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx-sora-coreml-loader")

    def unit(self, key: Key) -> dict[str, Any]:
        return self._units[(key[0], key[1])]

    def _load(self, key: Key) -> Any:
        return self.backend.load(self.manifest.package(self.unit(key)), key[2])

    def _issue(self, key: Key) -> None:
        if key not in self._loaded and key not in self._pending:
            self._pending[key] = self._pool.submit(self._load, key)
            self.stats.loads += 1
            self.stats.bytes_read += int(self.unit(key).get("weight_bytes", 0))

    def acquire(self, key: Key, upcoming: Sequence[Key]) -> Any:
        start = time.perf_counter()
        if key not in self._loaded:
            self._issue(key)
            self._loaded[key] = self._pending.pop(key).result()
        waited = time.perf_counter() - start
        self.stats.waited_by_unit[key[1]] = self.stats.waited_by_unit.get(key[1], 0.0) + waited
        if self.overlap:
            following = next((k for k in upcoming if k not in self._loaded), None)
            if following is not None:
                self._issue(following)
        return self._loaded[key]

    def release(self, key: Key) -> None:
        if key[1] not in self.resident:
            self._loaded.pop(key, None)

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pool.shutdown(wait=True)
        self._pending.clear()
        self._loaded.clear()


def _phase_units(manifest: Manifest) -> dict[str, list[dict]]:
    decoding = manifest.data["phases"]["decoding"]
    return {"text_encoding": manifest.units("text_encoding"), "denoising": manifest.units("denoising"),
            "decoding": [*decoding["temporal"], *decoding["spatial"]]}


def run_chain(chain: Sequence[Key], carry: dict[str, np.ndarray], backend: Any, loader: UnitLoader,
              upcoming_after: Sequence[Key] = ()) -> dict[str, np.ndarray]:
    """Run units in order on a carry of named tensors (the manifest's carry rule)."""
    for index, key in enumerate(chain):
        handle = loader.acquire(key, [*chain[index + 1:], *upcoming_after])
        spec = loader.unit(key)["functions"][key[2]]
        inputs = {i["name"]: np.ascontiguousarray(carry[i["name"]], dtype=np.int32 if i["dtype"] == "int32"
                                                  else np.float32) for i in spec["inputs"]}
        for name, value in backend.run(handle, key[2], inputs).items():
            carry[carry_name(name)] = np.asarray(value, dtype=np.float32)
        loader.release(key)
    return carry


# ---------------------------------------------------------------------------- the pipeline


class CoreMLPipeline:
    """Open-Sora 1.2 from a Core ML export.

    >>> pipe = CoreMLPipeline("exports/demo")            # or mlx_sora.Pipeline.from_coreml(...)
    >>> result = pipe.generate("a red circle moving left", seed=1)
    """

    def __init__(self, folder: str | Path, backend: str = "auto", compute_units: str = "cpu_and_gpu",
                 memory_budget: str | None = "plan", overlap: bool = True):
        self.manifest = read_manifest(folder)
        coremltools()  # imported now, not on the first unit load (which would time the import as loading)
        if memory_budget not in ("plan", None, "none"):
            raise UserError("--memory-budget with --coreml: 'plan' (the manifest's CI-DL plan, the default) or "
                            "'none' (every unit resident); other budgets are planned at export time")
        self.backend = make_backend(backend, compute_units)
        self.memory_budget = memory_budget if memory_budget == "plan" else None
        self.overlap = overlap
        tokenizer = self.manifest.data["tokenizer"]
        self.text_length = int(tokenizer["max_length"])
        self.tokenizer = T5Tokenizer(self.manifest.tokenizer, max_length=self.text_length)
        sampler = self.manifest.data["sampler"]
        first = self.manifest.sizes[0]
        self.defaults = GenerationDefaults(
            height=first["height"], width=first["width"], num_frames=first["num_frames"], fps=sampler["fps"],
            steps=sampler["num_steps"], cfg_scale=sampler["cfg_scale"], aes=sampler.get("aes"),
            flow=sampler.get("flow"))

    @property
    def name(self) -> str:
        return f"Core ML export {self.manifest.folder} ({self.backend.name})"

    def request(self, prompt: str | Sequence[str], **options: Any) -> GenerationRequest:
        sampler = self.manifest.data["sampler"]  # options not given take the export's settings
        if options.get("lpl") is None:
            options["lpl"] = sampler.get("lpl_step")
        if options.get("tdtm_steps") is None:
            options["tdtm_steps"] = sampler.get("tdtm_steps", 0)
        options["discrete_timesteps"] = bool(options.get("discrete_timesteps") or sampler.get("use_discrete_timesteps"))
        request = GenerationRequest.build(prompt, self.defaults, model_name="this export", **options)
        self.manifest.size(request.height, request.width, request.num_frames)  # exported? (else a UserError)
        return request

    def generate(self, prompt: str | Sequence[str], progress: bool = False, **options: Any) -> (
            GenerationResult | list[GenerationResult]):
        """As ``Pipeline.generate``; the size must be one the folder was exported for."""
        seed = options.get("seed", 42)
        results = self.run(self.request(prompt, **options), progress)
        return results if not isinstance(seed, int) else results[0]

    def resident(self, size: dict[str, Any], phase: str) -> set[str]:
        """The units of a phase that stay loaded: all of them without a budget, else the manifest's plan
        (every unit streamed where the plan did not fit the budget)."""
        if self.memory_budget is None:
            return {u["name"] for u in _phase_units(self.manifest)[phase]}
        plan = size.get("ci_dl", {})
        return set(plan["phases"][phase]["resident"]) if plan.get("fits") else set()

    def _loader(self, size: dict[str, Any], phase: str) -> UnitLoader:
        return UnitLoader(self.backend, self.manifest, self.resident(size, phase), self.overlap)

    def run(self, request: GenerationRequest, progress: bool = False) -> list[GenerationResult]:
        size = self.manifest.size(request.height, request.width, request.num_frames)
        texts = list(request.texts)
        results = [GenerationResult([], texts, s, request.fps) for s in request.seeds]
        with measure_phase("text encoding") as phase:
            text = self._encode_text(texts, size, phase, progress)
        for result in results:
            result.phases.append(phase)

        def denoise(result: GenerationResult, loader: UnitLoader) -> None:
            result.latent = self._denoise(text, request, size, result, loader, progress)

        def decode(result: GenerationResult, loader: UnitLoader) -> None:
            result.videos = self._decode(result.latent, size, loader, progress)

        self._per_result("denoising", size, results, denoise)
        self._per_result("decoding", size, results, decode)
        return results

    def _per_result(self, phase: str, size: dict[str, Any], results: list[GenerationResult], work) -> None:
        """A phase that does ``work(result, loader)`` for every result, its units loaded by one loader."""
        with measure_phase(phase) as report:
            loader = self._loader(size, phase)
            try:
                for result in results:
                    work(result, loader)
            finally:
                _report(report, loader)
        for result in results:
            result.phases.append(report)

    # ------------------------------------------------------------------ phases

    def _encode_text(self, texts: list[str], size: dict[str, Any], report: PhaseReport,
                     progress: bool) -> list[dict[str, np.ndarray]]:
        tokens = self.tokenizer(texts, max_length=self.text_length)
        loader = self._loader(size, "text_encoding")
        chain = [("text_encoding", u["name"], size["functions"]["text_encoder"]) for u in self.manifest.units("text_encoding")]
        out = []
        try:
            for i in tqdm(range(len(texts)), desc="text encoding", disable=not progress, leave=False):
                carry = {"input_ids": tokens.input_ids[i:i + 1].astype(np.int32),
                         "attention_mask": tokens.attention_mask[i:i + 1].astype(np.int32)}
                upcoming = chain if i + 1 < len(texts) else []
                out.append(run_chain(chain, carry, self.backend, loader, upcoming))
        finally:
            _report(report, loader)
        return out

    def _denoise(self, text: list[dict[str, np.ndarray]], request: GenerationRequest, size: dict[str, Any],
                 result: GenerationResult, loader: UnitLoader, progress: bool) -> mx.array:
        batch = len(request.texts)
        latent_t, latent_h, latent_w = size["latent"]
        noise = mx.random.normal((batch, 4, latent_t, latent_h, latent_w), key=mx.random.key(result.seed))
        result.latent_shape = tuple(noise.shape)
        functions = size["functions"]["stdit3"]
        units = [u["name"] for u in self.manifest.units("denoising")]

        def chain(merge: bool) -> list[Key]:
            blocks = functions["blocks_tdtm"] if merge and "blocks_tdtm" in functions else functions["blocks"]
            return [("denoising", u, functions["embedders"] if u == "embedders" else
                     functions["final_layer"] if u == "final_layer" else blocks) for u in units]

        fps = float(request.fps if request.num_frames > 1 else IMG_FPS)
        cond = [mx.array([v], dtype=mx.float32) for v in (request.height, request.width, request.num_frames)]
        config = request.sampler
        timesteps = sampling_timesteps(config.num_steps, 1, *cond, use_discrete_timesteps=config.use_discrete_timesteps)
        latents = []
        for i in range(batch):
            def denoise(z_in: mx.array, t_in: mx.array, merge: bool) -> mx.array:
                carry = {"latent": np.array(z_in[:1]).astype(np.float32), "timestep": np.array(t_in[:1]),
                         "text_embedding": text[i]["text_embedding"], "text_mask": text[i]["attention_mask"],
                         "fps": np.array([fps], np.float32)}
                steps = chain(merge)
                carry = run_chain(steps, carry, self.backend, loader, upcoming_after=steps)
                return mx.array(carry["prediction"])

            bar = tqdm(total=config.num_steps, desc=f"denoising (seed {result.seed})", disable=not progress, leave=False)
            for z, info in iterate_sampling(denoise, noise[i:i + 1], timesteps, config, result.sampling):
                bar.update(config.num_steps - bar.n if info.leapt else 1)
            bar.close()
            if not mx.isfinite(z).all().item():
                raise FloatingPointError("sampling produced non-finite latents (NaN/inf) with the exported units; "
                                         "export with --precision float32 to see whether float16 overflows")
            latents.append(z)
        return mx.concatenate(latents, axis=0)

    def _decode(self, latent: mx.array, size: dict[str, Any], loader: UnitLoader, progress: bool) -> list[np.ndarray]:
        functions = size["functions"]["vae"]
        decoding = self.manifest.data["phases"]["decoding"]
        temporal = [u["name"] for u in decoding["temporal"]]
        spatial = [("decoding", u["name"], functions["spatial"]) for u in decoding["spatial"]]
        z = np.array(latent.astype(mx.float32))
        videos = []
        for sample in z:
            frames = []
            for chunk in tqdm(functions["temporal_chunks"], desc="decoding", disable=not progress, leave=False):
                start, end = chunk["latent_frames"]
                chain = [("decoding", u, chunk["out_function"] if u == "temporal_decoder_out" else chunk["function"])
                         for u in temporal]
                carry = run_chain(chain, {"latent": sample[None, :, start:end]}, self.backend, loader, spatial)
                spatial_latents = carry["spatial_latents"]
                for f in range(spatial_latents.shape[2]):
                    image = run_chain(spatial, {"spatial_latent": spatial_latents[:, :, f]}, self.backend, loader,
                                      spatial if f + 1 < spatial_latents.shape[2] else [])
                    frames.append(image["image"][0])
            video = np.stack(frames, axis=1)  # [3, T, H, W]
            videos.append(to_uint8_frames(video))
        return videos


def _report(report: PhaseReport, loader: UnitLoader) -> None:
    loader.close()
    report.loads, report.load_wait = loader.stats.loads, loader.stats.waited
    report.read_bytes = loader.stats.bytes_read
    report.load_wait_by_unit = dict(loader.stats.waited_by_unit)
