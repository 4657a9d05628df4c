"""Make the reference-conditioning fixtures by running the real Open-Sora 1.2 code (tiny models, CPU).

Writes into tests/fixtures/opensora12/ (``--out`` to change):

* ``conditioning_image.png`` (37x53 RGB) and ``conditioning_video.mp4`` (9 frames, 30x40, H.264): the
  reference files, made here from a fixed pattern;
* ``conditioning.safetensors`` + ``conditioning_meta.json``: what the reference code makes of them and
  of mask strategies (details in tests/fixtures/opensora12/README.md, section *conditioning*).

What runs is Open-Sora's own code at 8d132d7, imported from ``--opensora-src`` as
``scripts/bench_vs_torch.py`` imports it (the same shims: xformers, mmengine's registry, colossalai's
checkpoint loader): ``opensora/utils/inference_utils.py`` (parse_mask_strategy,
extract_json_from_prompts, find_nearest_point, apply_mask_strategy, collect_references_batch,
append_generated, extract_prompts_loop, dframe_to_frame), ``opensora/datasets/utils.py`` and
``video_transforms.py`` (read_from_path, resize_crop), ``opensora/schedulers/rf`` (RFLOW.sample),
STDiT3 and the VAE pipeline. Shimmed besides: the parts of torchvision those files import (it is not
installed here; each shim is written to torchvision's documented behaviour: ``pil_loader`` =
``Image.open(f).convert("RGB")``, ``ToTensor``, ``Normalize``, ``Compose``, ``Lambda``, and
``io.read_video`` with its PyAV backend = every frame of the first video stream as ``frame.to_rgb()``),
``pandas`` (imported, unused) and the ``opensora.datasets`` package ``__init__`` (it imports the
training datasets; only ``IMG_FPS`` = 120 is taken from it). The posterior samples of both VAE
encoders are replaced by their means (as for ``vae_v12_encode``), so the encoding is deterministic.

The loop fixture follows scripts/inference.py's main loop line by line (that script itself needs
colossalai and a config system), with its own functions; text encoding is replaced by fixed caption
embeddings (``text_encoder.encode``/``null`` as RFLOW.sample calls them).

    pip install einops rotary-embedding-torch
    python scripts/make_fixtures_conditioning.py --opensora-src /path/to/Open-Sora-8d132d7
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import types
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
FIXTURES = ROOT / "tests" / "fixtures" / "opensora12"
sys.path.insert(0, str(SCRIPTS))

MASK_CASES = [
    "", "0", "0,0,0,0,1", "0,0,0,0,1,0", "0,0,0,-5,5,0.5", "0,0,0,0,1,0;0,1,-1,-1,1,0.2", "1,0,-5,0,5,0",
    " 0, 1 ,2", "0,0,0,0,1,0,0", "0;", "a", "0,0,0,0,1,x", "0,0,1.5",
]
PROMPT_CASES = [
    "a cat sitting on a mat.",
    'a cat.{"reference_path": "cat.png", "mask_strategy": "0"}',
    'two clips.{"reference_path": "a.mp4;b.png", "mask_strategy": "0,0,0,0,5;0,1,0,-1,1,0.3"}',
    'only a reference.{"reference_path": "x.png"}',
    'bad key.{"reference": "x.png"}',
    'two objects.{"mask_strategy": "0"}{"mask_strategy": "1"}',
]
NEAREST_CASES = [(v, p, m) for v in range(0, 13) for p in (1, 2, 3, 5) for m in (5, 10, 12)]
IMAGE_SIZES = [(24, 32), (64, 48), (20, 60), (37, 53)]
VIDEO_SIZES = [(24, 36), (36, 52), (16, 16)]
# (per prompt strategies, loop, align): apply_mask_strategy on z [2, 4, 6, 3, 4]
APPLY_CASES = [
    (["0", ""], 0, None),
    (["0,1,-3,2,5,0.4;0,0,0,0,1,0", "0,0,1,-2,4,1"], 0, None),
    (["0,1,3,3,2,0.5", "0,0,2,1,2,0.25"], 0, 2),
    (["1,1,0,0,2,0;0,0,0,0,1", "1,0,0,3,1,0.7"], 1, None),
    (["0,1,4,0,6,0.1;0,1,0,1,2,0.9", "0,0,0,5,3,0"], 0, 3),
]
SAMPLER_STEPS = 10
SAMPLER_STRATEGIES = ["0,0,0,0,1,0;0,1,0,3,2,0.5", "0,0,0,1,1,0.8;0,0,0,4,1,0"]


def shim_imports() -> None:
    """torchvision / pandas / opensora.datasets, as described in the docstring."""
    import torch
    from PIL import Image

    def module(name: str, **attrs: Any) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    class Compose:
        def __init__(self, transforms: list) -> None:
            self.transforms = transforms

        def __call__(self, x: Any) -> Any:
            for t in self.transforms:
                x = t(x)
            return x

    class Lambda:
        def __init__(self, fn: Any) -> None:
            self.fn = fn

        def __call__(self, x: Any) -> Any:
            return self.fn(x)

    class ToTensor:  # PIL image -> float [C, H, W] / 255
        def __call__(self, pic: Any) -> Any:
            arr = np.array(pic, copy=True)
            return torch.from_numpy(arr).view(pic.size[1], pic.size[0], len(pic.getbands())).permute(
                (2, 0, 1)).contiguous().to(dtype=torch.get_default_dtype()).div(255)

    class Normalize:
        def __init__(self, mean: list, std: list, inplace: bool = False) -> None:
            self.mean, self.std, self.inplace = mean, std, inplace

        def __call__(self, t: Any) -> Any:
            t = t if self.inplace else t.clone()
            mean = torch.as_tensor(self.mean, dtype=t.dtype).view(-1, 1, 1)
            std = torch.as_tensor(self.std, dtype=t.dtype).view(-1, 1, 1)
            return t.sub_(mean).div_(std)

    def pil_loader(path: str) -> Any:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")

    def read_video(filename: str, pts_unit: str = "sec", output_format: str = "THWC") -> Any:
        import av

        with av.open(filename) as container:
            frames = [f.to_rgb().to_ndarray() for f in container.decode(video=0)]
        v = torch.from_numpy(np.stack(frames))
        if output_format == "TCHW":
            v = v.permute(0, 3, 1, 2)
        return v, torch.empty(1, 0), {}

    tv = module("torchvision")
    tv.transforms = module("torchvision.transforms", Compose=Compose, Lambda=Lambda, ToTensor=ToTensor,
                           Normalize=Normalize)
    tv.datasets = module("torchvision.datasets")
    tv.datasets.folder = module("torchvision.datasets.folder", pil_loader=pil_loader, IMG_EXTENSIONS=(
        ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"))
    tv.io = module("torchvision.io", read_video=read_video, write_video=None)
    tv.utils = module("torchvision.utils", save_image=None)
    module("pandas")


def import_all(src: str) -> types.SimpleNamespace:
    from bench_vs_torch import import_reference

    ref = import_reference(src)
    shim_imports()
    root = Path(src)
    datasets_init = (root / "opensora" / "datasets" / "datasets.py").read_text()
    assert "IMG_FPS = 120" in datasets_init
    for pkg in ("opensora/datasets", "opensora/schedulers", "opensora/schedulers/iddpm"):
        m = types.ModuleType(pkg.replace("/", "."))
        m.__path__ = [str(root / pkg)]
        sys.modules[m.__name__] = m
    sys.modules["opensora.datasets"].IMG_FPS = 120
    registry = sys.modules["opensora.registry"]
    registry.SCHEDULERS = type(registry.MODELS)()
    ref.utils = importlib.import_module("opensora.datasets.utils")
    ref.inference = importlib.import_module("opensora.utils.inference_utils")
    ref.rf = importlib.import_module("opensora.schedulers.rf")
    return ref


def deterministic_posteriors() -> None:
    """Both VAE posteriors give their mean (the reference samples them)."""
    from diffusers.models.autoencoders import vae as diffusers_vae

    vae_utils = importlib.import_module("opensora.models.vae.utils")
    diffusers_vae.DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mean
    vae_utils.DiagonalGaussianDistribution.sample = lambda self: self.mean


def build_stdit3(ref: Any) -> Any:
    import torch
    from safetensors.torch import load_file

    config = json.loads((FIXTURES / "stdit3_checkpoint" / "config.json").read_text())
    kwargs = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype",
                                                            "transformers_version")}
    model = ref.stdit3.STDiT3(ref.stdit3.STDiT3Config(**kwargs)).eval()
    state = load_file(str(FIXTURES / "stdit3_checkpoint" / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "rope.freqs" for k in missing), (missing, unexpected)
    torch.set_grad_enabled(False)
    return model


def build_vae(ref: Any) -> Any:
    from diffusers.models import AutoencoderKL
    from safetensors.torch import load_file

    config = json.loads((FIXTURES / "vae_v12_checkpoint" / "config.json").read_text())

    class TinyAutoencoderKL:  # the checkpoint's spatial VAE, instead of a download
        @staticmethod
        def from_pretrained(*args: Any, **kwargs: Any) -> Any:
            return AutoencoderKL(**config["vae_2d_config"])

    ref.vae.AutoencoderKL = TinyAutoencoderKL
    pipeline_config = ref.vae.VideoAutoencoderPipelineConfig(
        vae_2d=dict(type="VideoAutoencoderKL", from_pretrained="tiny", subfolder="vae", micro_batch_size=4),
        vae_temporal=dict(config["vae_temporal"]), micro_frame_size=17, shift=config["shift"], scale=config["scale"])
    model = ref.vae.VideoAutoencoderPipeline(pipeline_config).eval()
    state = load_file(str(FIXTURES / "vae_v12_checkpoint" / "model.safetensors"))
    model.load_state_dict(state, strict=True)
    return model


class FixedTextEncoder:
    """``text_encoder.encode`` / ``null`` as RFLOW.sample calls them, with fixed caption embeddings."""

    def __init__(self, y: Any, mask: Any, model: Any) -> None:
        self.y, self.mask, self.model = y, mask, model

    def encode(self, prompts: list[str]) -> dict:
        return dict(y=self.y[: len(prompts)], mask=self.mask[: len(prompts)])

    def null(self, n: int) -> Any:
        return self.model.y_embedder.y_embedding[None].repeat(n, 1, 1)[:, None]


class Recorder:
    """Wraps the model: records the inputs of every call (z, timestep, x_mask) and the noise draws."""

    def __init__(self, model: Any) -> None:
        self.model, self.calls, self.noise = model, [], []

    def __call__(self, x: Any, timestep: Any, **kwargs: Any) -> Any:
        self.calls.append(dict(z=x[: x.shape[0] // 2].clone(), t=timestep[: x.shape[0] // 2].clone(),
                               x_mask=kwargs["x_mask"][: x.shape[0] // 2].clone()))
        return self.model(x, timestep, **kwargs)


def pattern_image(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth colour pattern with edges and noise: every resampling tap matters."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 127 + 120 * np.sin(xx / 3.1 + yy / 7.3)
    g = 127 + 120 * np.cos(yy / 2.3 - xx / 11.0)
    b = np.where((xx // 6 + yy // 5) % 2 == 0, 230.0, 25.0)
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, 12, (height, width, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def write_reference_files(out: Path) -> tuple[Path, Path]:
    import av
    from PIL import Image

    image_path, video_path = out / "conditioning_image.png", out / "conditioning_video.mp4"
    Image.fromarray(pattern_image(37, 53, 0)).save(image_path)
    with av.open(str(video_path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(8))
        stream.width, stream.height, stream.pix_fmt = 40, 30, "yuv420p"
        stream.options = {"crf": "10"}
        for i in range(9):
            frame = np.roll(pattern_image(30, 40, 1), 2 * i, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return image_path, video_path


def parser_cases(ref: Any) -> dict:
    iu = ref.inference
    masks = []
    for text in MASK_CASES:
        try:
            masks.append(dict(text=text, parsed=[list(g) for g in iu.parse_mask_strategy(text)]))
        except (AssertionError, ValueError) as e:
            masks.append(dict(text=text, error=type(e).__name__))
    prompts = []
    for text in PROMPT_CASES:
        try:
            got, refs, ms = iu.extract_json_from_prompts([text], [None], [None])
            prompts.append(dict(text=text, prompt=got[0], reference_path=refs[0], mask_strategy=ms[0]))
        except (AssertionError, ValueError) as e:
            prompts.append(dict(text=text, error=type(e).__name__))
    nearest = [dict(value=v, point=p, max_value=m, result=iu.find_nearest_point(v, p, m)) for v, p, m in NEAREST_CASES]
    return dict(mask_strategies=masks, prompts=prompts, find_nearest_point=nearest,
                dframe_to_frame={str(n): iu.dframe_to_frame(n) for n in (5, 10, 15)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--opensora-src", required=True)
    p.add_argument("--out", type=Path, default=FIXTURES)
    args = p.parse_args()

    ref = import_all(args.opensora_src)
    import torch
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)
    deterministic_posteriors()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Any] = {}
    meta: dict[str, Any] = dict(source="hpcaitech/Open-Sora 8d132d7", torch=torch.__version__)

    # == parsers
    meta["parsers"] = parser_cases(ref)

    # == reference preprocessing: read_from_path(..., transform_name="resize_crop")
    image_path, video_path = write_reference_files(out)
    for h, w in IMAGE_SIZES:
        tensors[f"image.{h}x{w}"] = ref.utils.read_from_path(str(image_path), (h, w), transform_name="resize_crop")
    for h, w in VIDEO_SIZES:
        tensors[f"video.{h}x{w}"] = ref.utils.read_from_path(str(video_path), (h, w), transform_name="resize_crop")

    # == apply_mask_strategy: references [C, T, H, W] of two prompts, z [2, 4, 6, 3, 4]
    gen = torch.Generator().manual_seed(7)
    refs = [[torch.randn(4, 1, 3, 4, generator=gen), torch.randn(4, 10, 3, 4, generator=gen)],
            [torch.randn(4, 5, 3, 4, generator=gen)]]
    z0 = torch.randn(2, 4, 6, 3, 4, generator=gen)
    tensors.update({"apply.z": z0, "apply.ref0_0": refs[0][0], "apply.ref0_1": refs[0][1], "apply.ref1_0": refs[1][0]})
    meta["apply_cases"] = []
    for n, (strategies, loop_i, align) in enumerate(APPLY_CASES):
        z = z0.clone()
        mask = ref.inference.apply_mask_strategy(z, refs, list(strategies), loop_i, align=align)
        tensors[f"apply.case{n}.z"], tensors[f"apply.case{n}.mask"] = z, mask
        meta["apply_cases"].append(dict(case=n, mask_strategy=strategies, loop=loop_i, align=align))

    # == RFLOW.sample with a reference: z, timestep and x_mask entering the model at every step
    rflow = load_file(str(FIXTURES / "rflow_sample.safetensors"))
    y, text_mask = rflow["y"], rflow["text_mask"]
    model = build_stdit3(ref)
    latent = (2, 4, 5, 6, 8)
    sampler_refs = [[torch.randn(4, 1, 6, 8, generator=gen), torch.randn(4, 5, 6, 8, generator=gen)],
                    [torch.randn(4, 2, 6, 8, generator=gen)]]
    z = torch.randn(*latent, generator=gen)
    tensors["sampler.z_noise"] = z.clone()
    masks = ref.inference.apply_mask_strategy(z, sampler_refs, list(SAMPLER_STRATEGIES), 0)
    info = ref.inference.prepare_multi_resolution_info("OpenSora", 2, (48, 64), 17, 24, "cpu", torch.float32)
    scheduler = ref.rf.RFLOW(num_sampling_steps=SAMPLER_STEPS, cfg_scale=7.0, use_timestep_transform=True)
    recorder = Recorder(model)
    draws: list = []
    randn_like = torch.randn_like

    def recording_randn_like(x: Any, *a: Any, **k: Any) -> Any:
        noise = randn_like(x, *a, **k)
        draws.append(noise.clone())
        return noise

    torch.manual_seed(1234)
    torch.randn_like = recording_randn_like
    try:
        final = scheduler.sample(recorder, FixedTextEncoder(y, text_mask, model), z=z.clone(), prompts=["a", "b"],
                                 device="cpu", additional_args=info, mask=masks, progress=False)
    finally:
        torch.randn_like = randn_like
    tensors.update({"sampler.z_conditioned": z, "sampler.mask": masks, "sampler.y": y, "sampler.text_mask": text_mask,
                    "sampler.z_final": final, "sampler.noise": torch.stack(draws),
                    "sampler.z_in": torch.stack([c["z"] for c in recorder.calls]),
                    "sampler.t": torch.stack([c["t"] for c in recorder.calls]),
                    "sampler.x_mask": torch.stack([c["x_mask"] for c in recorder.calls])})
    for i, r in enumerate(sampler_refs[0]):
        tensors[f"sampler.ref0_{i}"] = r
    tensors["sampler.ref1_0"] = sampler_refs[1][0]
    meta["sampler"] = dict(steps=SAMPLER_STEPS, cfg_scale=7.0, mask_strategy=SAMPLER_STRATEGIES, image_size=[48, 64],
                           num_frames=17, fps=24, noise="sampler.noise[i] is torch.randn_like(z) drawn at step i")

    # == a whole loop of 2 (scripts/inference.py's main loop), tiny VAE + STDiT3, 34 frames at 16x24
    vae = build_vae(ref)
    iu = ref.inference
    image_size, num_frames, loop, cfl, cfe = (16, 24), 34, 2, 5, 0.0
    latent_size = vae.get_latent_size((num_frames, *image_size))
    scheduler = ref.rf.RFLOW(num_sampling_steps=SAMPLER_STEPS, cfg_scale=7.0, use_timestep_transform=True)
    batch_prompts = ["a cat", "a dog"]
    reference_path = [str(image_path), ""]
    ms = ["0", ""]
    refs_x = iu.collect_references_batch(reference_path, vae, image_size)
    tensors["loop.ref0_0"] = refs_x[0][0]
    model_args = iu.prepare_multi_resolution_info("OpenSora", 2, image_size, num_frames, 24, "cpu", torch.float32)
    text_encoder = FixedTextEncoder(y, text_mask, model)
    video_clips = []
    for loop_i in range(loop):
        batch_prompts_loop = iu.extract_prompts_loop(batch_prompts, loop_i)
        if loop_i > 0:
            refs_x, ms = iu.append_generated(vae, video_clips[-1], refs_x, ms, loop_i, cfl, cfe)
            tensors[f"loop.{loop_i}.appended0"], tensors[f"loop.{loop_i}.appended1"] = refs_x[0][-1], refs_x[1][-1]
        torch.manual_seed(1024)
        z = torch.randn(len(batch_prompts), vae.out_channels, *latent_size)
        tensors[f"loop.{loop_i}.z_noise"] = z.clone()
        masks = iu.apply_mask_strategy(z, refs_x, ms, loop_i)
        tensors[f"loop.{loop_i}.z_conditioned"], tensors[f"loop.{loop_i}.mask"] = z.clone(), masks
        samples = scheduler.sample(model, text_encoder, z=z, prompts=batch_prompts_loop, device="cpu",
                                   additional_args=model_args, progress=False, mask=masks)
        tensors[f"loop.{loop_i}.latent"] = samples
        samples = vae.decode(samples, num_frames=num_frames)
        video_clips.append(samples)
    for idx in range(len(batch_prompts)):
        video = [video_clips[i][idx] for i in range(loop)]
        for i in range(1, loop):
            video[i] = video[i][:, iu.dframe_to_frame(cfl):]
        tensors[f"loop.saved{idx}"] = torch.cat(video, dim=1)
    meta["loop"] = dict(prompts=batch_prompts, reference_path=["conditioning_image.png", ""], mask_strategy=["0", ""],
                        final_mask_strategy=ms, loop=loop, condition_frame_length=cfl, condition_frame_edit=cfe,
                        image_size=list(image_size), num_frames=num_frames, fps=24, steps=SAMPLER_STEPS, cfg_scale=7.0,
                        seed="torch.manual_seed(1024) before each loop's noise, as scripts/inference.py")

    save_file({k: v.detach().contiguous().float() if v.dtype != torch.bool else v.contiguous()
               for k, v in tensors.items()}, str(out / "conditioning.safetensors"))
    (out / "conditioning_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {len(tensors)} tensors to {out / 'conditioning.safetensors'}")


if __name__ == "__main__":
    main()
