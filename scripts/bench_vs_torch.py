"""mlx-sora against the real Open-Sora 1.2 PyTorch code, side by side on one machine.

Times, at real model sizes with random weights (the same weights on both sides: every tensor is drawn
from a generator seeded by its name):

* one STDiT3-XL/2 forward pass (a sampling step: CFG batch 2, 192x192, 17 frames = latent T 5 and
  68 frames = T 20, x_mask of ones and a 40-token prompt padded to 300, as ``RFLOW.sample`` calls it),
  MLX without and with TDTM;
* a 17-frame VAE v1.2 decode at 192x192 (micro-batch 4, the release setting);
* the T5 v1.1 XXL encoder at full width, ``--t5-layers`` of its 24 blocks, 300 tokens
  (transformers' ``T5EncoderModel`` is the reference, as Open-Sora uses it);
* per operation, one STDiT3 block pair at T = 5 (``--parts ops``).

Each side runs in its own process, one after the other, as its users would run it: torch with its
own BLAS and ``--threads`` threads, no preload; MLX with the fast BLAS ``mlx_sora.runtime.blas`` finds
(OpenBLAS or the ``mkl`` wheel) preloaded. Outputs of both sides are compared (max relative
difference) so that the two computed the same thing. Prints a table with medians and ratios
(MLX / torch), the machine and its load average.

The reference is the Open-Sora source at commit 8d132d7 (``--opensora-src`` or $OPENSORA_SRC)::

    curl -L https://github.com/hpcaitech/Open-Sora/archive/8d132d7.tar.gz | tar -xz
    pip install einops rotary-embedding-torch      # its pure-Python imports (not project deps)
    python scripts/bench_vs_torch.py --opensora-src Open-Sora-8d132d7*

What is imported from it: ``opensora/models/stdit/stdit3.py``, ``models/layers/blocks.py``,
``models/vae/{vae,vae_temporal,utils}.py`` and ``acceleration/*.py``, unchanged. What is replaced
(in ``sys.modules``, before the import), because it is GPU-only or needs the network:
``xformers.ops.memory_efficient_attention`` with a ``BlockDiagonalMask`` (the cross-attention, CUDA
only) by ``F.scaled_dot_product_attention`` over each sample's packed caption tokens (what the
block-diagonal mask computes); ``opensora.registry`` (mmengine) by a minimal registry;
``opensora.utils.ckpt_utils`` (colossalai) by a stub (nothing is loaded from disk); timm's ``Mlp``
and ``DropPath`` by copies when timm is not installed (it needs torchvision); the package
``__init__`` files are skipped (they import every model); the SDXL VAE that ``VideoAutoencoderKL``
downloads is built from its config with random weights.

    python scripts/bench_vs_torch.py --parts stdit vae t5 ops        # everything (about an hour)
    python scripts/bench_vs_torch.py --parts stdit --frames 17 --repeats 4
    python scripts/bench_vs_torch.py --quick                          # 2 blocks, small sizes: a smoke run

``--device gpu`` compares the GPUs: on a Mac MLX on Metal against torch on MPS, elsewhere MLX's CUDA
backend against torch on CUDA (``gpu_backend``); float32 runs there with TF32 off on both sides
(MLX_ENABLE_TF32=0; torch's CUDA TF32 flags; MPS has none). The Mac path is written and unrun: no
Mac has run it yet (``scripts/check_mac.sh`` runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

SCRIPTS = Path(__file__).resolve().parent
OPENSORA_COMMIT = "8d132d7"
HOW_TO_GET_OPENSORA = f"""\
The real Open-Sora 1.2 source is needed (hpcaitech/Open-Sora at commit {OPENSORA_COMMIT}):
    curl -L https://github.com/hpcaitech/Open-Sora/archive/{OPENSORA_COMMIT}.tar.gz | tar -xz
  or
    git clone https://github.com/hpcaitech/Open-Sora && git -C Open-Sora checkout {OPENSORA_COMMIT}
then pass the folder that holds opensora/ with --opensora-src PATH (or set OPENSORA_SRC), and install
its pure-Python imports: pip install einops rotary-embedding-torch"""

SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)
VALID_TOKENS = 40  # prompt length in the STDiT3 benchmark (of 300)


# ====================================================================================== weights


def random_tensor(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The benchmark's weight for a parameter (reference layout), the same on both sides."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    x = rng.standard_normal(shape, dtype=np.float32)
    if len(shape) >= 2:
        return x * np.float32(np.prod(shape[1:]) ** -0.5)  # fan-in scaled: activations stay O(1)
    if "norm" in name:
        return 1 + np.float32(0.1) * x
    return np.float32(0.02) * x


def torch_layout(shape: tuple[int, ...]) -> tuple[int, ...]:
    """MLX channels-last conv kernel shape -> PyTorch's (O, I, k...)."""
    return (shape[0], shape[-1], *shape[1:-1]) if len(shape) >= 4 else shape


def mlx_weights(model: Any, torch_name: Callable[[str], str | None]) -> list[tuple[str, Any]]:
    """Every MLX parameter from ``random_tensor`` of its reference name, moved to MLX's layout."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    out = []
    for key, value in tree_flatten(model.parameters()):
        ref_name = torch_name(key)
        if ref_name is None:
            continue
        w = random_tensor(ref_name, torch_layout(tuple(value.shape)))
        if w.ndim >= 4:
            w = np.moveaxis(w, 1, -1)
        out.append((key, mx.array(np.ascontiguousarray(w))))
    return out


def torch_load_random(model: Any, skip: Callable[[str], bool]) -> None:
    import torch

    state = {}
    for key, value in model.state_dict().items():
        state[key] = value if skip(key) else torch.from_numpy(random_tensor(key, tuple(value.shape)))
    model.load_state_dict(state, strict=True)


def vae_mlx_to_torch_name(key: str) -> str | None:
    if key in ("scale", "shift"):
        return None  # the release statistics on both sides
    if key.startswith("spatial_vae."):
        return "spatial_vae.module." + key[len("spatial_vae.") :]
    return key


# ====================================================================================== the reference


def import_reference(src: str | None) -> types.SimpleNamespace:
    """The Open-Sora modules this benchmark runs, imported from ``src`` with the shims of the docstring."""
    root = Path(src or "").expanduser()
    if not src or not (root / "opensora" / "models" / "stdit" / "stdit3.py").is_file():
        print(f"error: Open-Sora source not found at {src!r}.\n{HOW_TO_GET_OPENSORA}", file=sys.stderr)
        sys.exit(2)
    try:
        import einops  # noqa: F401
        import rotary_embedding_torch  # noqa: F401
    except ImportError as e:
        print(f"error: {e}.\n{HOW_TO_GET_OPENSORA}", file=sys.stderr)
        sys.exit(2)
    import importlib

    import diffusers.models  # noqa: F401  (before the shims: diffusers probes for xformers and timm)
    import torch
    import torch.nn.functional as F
    from torch import nn

    def package(name: str, path: Path | None = None) -> types.ModuleType:
        module = types.ModuleType(name)
        module.__path__ = [str(path)] if path else []
        sys.modules[name] = module
        return module

    for pkg in (
        "opensora",
        "opensora/models",
        "opensora/models/stdit",
        "opensora/models/layers",
        "opensora/models/vae",
        "opensora/acceleration",
        "opensora/utils",
    ):
        package(pkg.replace("/", "."), root / pkg)

    class Registry:  # mmengine's Registry, as far as Open-Sora uses it
        def __init__(self) -> None:
            self.items: dict[str, Any] = {}

        def register_module(self, name: str | None = None, force: bool = False) -> Callable:
            def register(obj: Any) -> Any:
                self.items[name or obj.__name__] = obj
                return obj

            return register

    models = Registry()

    def build_module(cfg: Any, builder: Registry, **kwargs: Any) -> Any:
        if cfg is None or isinstance(cfg, nn.Module):
            return cfg
        cfg = dict(cfg, **kwargs)
        return builder.items[cfg.pop("type")](**cfg)

    registry = types.ModuleType("opensora.registry")
    registry.MODELS, registry.build_module = models, build_module
    sys.modules["opensora.registry"] = registry
    ckpt = types.ModuleType("opensora.utils.ckpt_utils")

    def load_checkpoint(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the benchmark loads no checkpoints")

    ckpt.load_checkpoint = load_checkpoint
    sys.modules["opensora.utils.ckpt_utils"] = ckpt

    class BlockDiagonalMask:  # xformers.ops.fmha.BlockDiagonalMask.from_seqlens
        def __init__(self, q_seqlens: list[int], kv_seqlens: list[int]) -> None:
            self.q_seqlens, self.kv_seqlens = list(q_seqlens), list(kv_seqlens)

        @classmethod
        def from_seqlens(cls, q_seqlen: list[int], kv_seqlen: list[int]) -> "BlockDiagonalMask":
            return cls(q_seqlen, kv_seqlen)

    def memory_efficient_attention(q: Any, k: Any, v: Any, p: float = 0.0, attn_bias: Any = None) -> Any:
        """[1, M, H, D] inputs; each query block attends to its own key block (xformers semantics)."""
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [1, H, M, D]
        if attn_bias is None:
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).contiguous()
        outs = [
            F.scaled_dot_product_attention(qi, ki, vi)
            for qi, ki, vi in zip(
                q.split(attn_bias.q_seqlens, dim=2),
                k.split(attn_bias.kv_seqlens, dim=2),
                v.split(attn_bias.kv_seqlens, dim=2),
            )
        ]
        return torch.cat(outs, dim=2).transpose(1, 2).contiguous()  # [1, M, H, D] as xformers

    xformers, ops, fmha = (types.ModuleType(n) for n in ("xformers", "xformers.ops", "xformers.ops.fmha"))
    fmha.BlockDiagonalMask = BlockDiagonalMask
    ops.fmha, ops.memory_efficient_attention, xformers.ops = fmha, memory_efficient_attention, ops
    sys.modules.update({"xformers": xformers, "xformers.ops": ops, "xformers.ops.fmha": fmha})
    try:
        import timm  # noqa: F401
    except ImportError:
        _shim_timm(nn)

    blocks = importlib.import_module("opensora.models.layers.blocks")
    stdit3 = importlib.import_module("opensora.models.stdit.stdit3")
    vae_temporal = importlib.import_module("opensora.models.vae.vae_temporal")
    vae = importlib.import_module("opensora.models.vae.vae")
    return types.SimpleNamespace(blocks=blocks, stdit3=stdit3, vae=vae, vae_temporal=vae_temporal, root=root)


def _shim_timm(nn: Any) -> None:
    """timm's ``Mlp`` and ``DropPath`` (timm 0.9, the parts Open-Sora uses), for when timm is absent."""

    class Mlp(nn.Module):
        def __init__(
            self,
            in_features: int,
            hidden_features: int | None = None,
            out_features: int | None = None,
            act_layer: Any = nn.GELU,
            norm_layer: Any = None,
            bias: bool = True,
            drop: float = 0.0,
            use_conv: bool = False,
        ) -> None:
            super().__init__()
            out_features = out_features or in_features
            hidden_features = hidden_features or in_features
            self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
            self.act = act_layer()
            self.drop1 = nn.Dropout(drop)
            self.norm = norm_layer(hidden_features) if norm_layer is not None else nn.Identity()
            self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
            self.drop2 = nn.Dropout(drop)

        def forward(self, x: Any) -> Any:
            return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))

    class DropPath(nn.Module):
        def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x: Any) -> Any:
            return x  # inference

    import importlib.machinery

    modules = {
        n: types.ModuleType(n)
        for n in ("timm", "timm.models", "timm.models.layers", "timm.models.vision_transformer")
    }
    for name, module in modules.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    modules["timm.models.layers"].DropPath = DropPath
    modules["timm.models.vision_transformer"].Mlp = Mlp
    sys.modules.update(modules)


# ====================================================================================== inputs


def stdit_inputs(frames: int, height: int, width: int, caption_channels: int, caption_len: int) -> dict:
    """numpy inputs of one CFG step (conditional half + null caption half, the mask given for half)."""
    from mlx_sora.models.vae import OpenSoraVAE, VideoAutoencoderConfig

    latent_t = OpenSoraVAE(VideoAutoencoderConfig()).latent_frames(frames)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, latent_t, height // 8, width // 8), dtype=np.float32)
    mask = np.zeros((1, caption_len), dtype=np.int64)
    mask[:, : min(VALID_TOKENS, caption_len)] = 1
    return dict(
        x=np.concatenate([x, x]),
        timestep=np.full((2,), 950.0, np.float32),
        y_cond=rng.standard_normal((1, 1, caption_len, caption_channels), dtype=np.float32) * np.float32(0.1),
        mask=mask,
        x_mask=np.ones((2, latent_t), bool),
        fps=np.full((1,), 24.0, np.float32),
        height=np.full((1,), float(height), np.float32),
        width=np.full((1,), float(width), np.float32),
    )


def timed(run: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    return times, out


def median_time(run: Callable[[], Any], repeats: int) -> float:
    run()
    return statistics.median(timed(run, repeats)[0])


# ====================================================================================== torch side


def gpu_backend(system: str | None = None) -> str:
    """The torch device a "gpu" run compares with: MPS on macOS (MLX runs on Metal there), CUDA elsewhere."""
    return "mps" if (system or platform.system()) == "Darwin" else "cuda"


def machine_name() -> str:
    """The CPU's (or Apple chip's) marketing name."""
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    if platform.system() == "Darwin":
        done = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        if done.returncode == 0:
            return done.stdout.strip()
    return platform.processor()


class TorchPlace:
    """Where and in which dtype the torch side runs; moves numpy inputs there and waits for the GPU."""

    def __init__(self, device: str, dtype: str) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(gpu_backend() if device == "gpu" else "cpu")
        self.dtype = getattr(torch, dtype)
        if self.device.type == "cuda" and dtype == "float32":  # true fp32, as MLX with MLX_ENABLE_TF32=0
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        if self.device.type == "mps" and not torch.backends.mps.is_available():
            raise SystemExit("error: torch has no MPS backend here (torch.backends.mps.is_available() is False)")

    def tensor(self, a: np.ndarray) -> Any:
        t = self.torch.from_numpy(a)
        t = t.to(self.dtype) if t.is_floating_point() else t  # (MPS has no float64: cast before moving)
        return t.to(self.device)

    def model(self, m: Any) -> Any:
        return m.to(self.device, self.dtype).eval()

    def synced(self, run: Callable[[], Any]) -> Callable[[], Any]:
        def wrapped() -> Any:
            out = run()
            if self.device.type == "cuda":
                self.torch.cuda.synchronize()
            elif self.device.type == "mps":
                self.torch.mps.synchronize()
            return out

        return wrapped

    @staticmethod
    def numpy(t: Any) -> np.ndarray:
        return t.float().cpu().numpy()


def torch_worker(args: argparse.Namespace, out_dir: Path) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    ref = import_reference(args.opensora_src)
    place = TorchPlace(args.device, args.dtype)
    results: dict[str, Any] = {
        "side": "torch",
        "version": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": ("cpu" if args.device == "cpu" else
                   torch.cuda.get_device_name() if place.device.type == "cuda" else f"mps ({machine_name()})"),
    }
    with torch.inference_mode():
        if args.part == "stdit":
            results.update(torch_stdit(ref, args, out_dir, place))
        elif args.part == "vae":
            results.update(torch_vae(ref, args, out_dir, place))
        elif args.part == "t5":
            results.update(torch_t5(args, out_dir, place))
        elif args.part == "ops":
            results.update(torch_ops(ref, args, place))
    return results


def torch_stdit(ref: Any, args: argparse.Namespace, out_dir: Path, place: TorchPlace) -> dict:
    import torch

    config = ref.stdit3.STDiT3Config(
        depth=args.depth,
        hidden_size=args.hidden,
        num_heads=args.heads,
        caption_channels=args.caption_channels,
        model_max_length=args.caption_len,
    )
    model = ref.stdit3.STDiT3(config).eval()
    torch_load_random(model, skip=lambda k: k == "rope.freqs")
    model = place.model(model)
    res = {}
    for i, frames in enumerate(args.frames):
        a = {
            k: place.tensor(v)
            for k, v in stdit_inputs(
                frames, args.size, args.size, args.caption_channels, args.caption_len
            ).items()
        }
        y = torch.cat([a["y_cond"], model.y_embedder.y_embedding[None, None]])

        a["timestep"] = a["timestep"].float()  # as RFLOW.sample passes it

        @place.synced
        def run() -> Any:
            return model(
                a["x"],
                a["timestep"],
                y,
                mask=a["mask"],
                x_mask=a["x_mask"],
                fps=a["fps"],
                height=a["height"],
                width=a["width"],
            )

        if i < args.warmup:
            run()
        times, out = timed(run, args.repeats)
        np.save(out_dir / f"stdit_{frames}.npy", place.numpy(out))
        res[f"stdit_{frames}"] = times
    return res


def build_reference_vae(ref: Any, micro_batch_size: int) -> Any:
    from diffusers.models import AutoencoderKL

    class RandomSDXLVAE:  # stands in for AutoencoderKL.from_pretrained (a download)
        @staticmethod
        def from_pretrained(*args: Any, **kwargs: Any) -> Any:
            return AutoencoderKL(**SDXL_VAE)

    ref.vae.AutoencoderKL = RandomSDXLVAE
    model = ref.vae.OpenSoraVAE_V1_2(micro_batch_size=micro_batch_size, micro_frame_size=17).eval()
    torch_load_random(model, skip=lambda k: k in ("scale", "shift"))
    return model


def torch_vae(ref: Any, args: argparse.Namespace, out_dir: Path, place: TorchPlace) -> dict:
    model = place.model(build_reference_vae(ref, args.micro_batch))
    res = {}
    for frames in args.vae_frames:
        z = place.tensor(vae_latent(frames, args.size))
        run = place.synced(lambda: model.decode(z, num_frames=frames))
        if args.warmup:
            run()
        times, out = timed(run, args.repeats)
        np.save(out_dir / f"vae_{frames}.npy", place.numpy(out[:, :, :2]))
        res[f"vae_{frames}"] = times
    return res


def vae_latent(frames: int, size: int) -> np.ndarray:
    latent_t = 5 * (frames // 17) + -(-(frames % 17) // 4)
    return np.random.default_rng(1).standard_normal((1, 4, latent_t, size // 8, size // 8), dtype=np.float32)


def torch_t5(args: argparse.Namespace, out_dir: Path, place: TorchPlace) -> dict:
    sys.path.insert(0, str(SCRIPTS))
    from bench_t5 import build_torch, random_weights

    config, ids, mask = t5_setup(args)
    model = place.model(
        build_torch(config, random_weights(config, seed=0), args.dtype, args.dtype == "bfloat16")
    )
    t_ids, t_mask = place.tensor(ids), place.tensor(mask)
    run = place.synced(lambda: model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state)
    run()
    times, out = timed(run, args.repeats)
    np.save(out_dir / "t5.npy", place.numpy(out))
    return {"t5": times}


def t5_setup(args: argparse.Namespace) -> tuple[Any, np.ndarray, np.ndarray]:
    from mlx_sora.models.t5 import T5Config

    xxl = T5Config.t5_v1_1_xxl()
    config = T5Config(
        **{
            **vars(xxl),
            "num_layers": args.t5_layers,
            "d_model": args.t5_width,
            "d_ff": args.t5_width * 10240 // 4096,
            "num_heads": args.t5_width // 64,
        }
    )
    rng = np.random.default_rng(1)
    ids = rng.integers(3, config.vocab_size, size=(1, args.caption_len))
    ids[:, -1] = 1
    return config, ids, np.ones_like(ids)


def torch_ops(ref: Any, args: argparse.Namespace, place: TorchPlace) -> dict:
    """The per-operation table of one block pair (T = 5 latent frames, CFG batch 2) in the reference."""
    import torch

    b, t, s, c, heads = 2, args.ops_frames, (args.size // 16) ** 2, args.hidden, args.heads
    n, d, r = b * t * s, c // heads, args.repeats
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(place.device, place.dtype)  # noqa: E731
    x, hidden = rand(b, t * s, c), rand(n, 4 * c)
    q, k, v = rand(b * t, heads, s, d), rand(b * t, heads, s, d), rand(b * t, heads, s, d)
    gelu = torch.nn.GELU(approximate="tanh")
    norm = torch.nn.LayerNorm(c, 1e-6, elementwise_affine=False)
    shift, scale = rand(b, 1, c), rand(b, 1, c)
    linear = place.model(torch.nn.Linear(c, 4 * c))
    blocks = []
    for temporal in (False, True):
        rope = ref.stdit3.RotaryEmbedding(dim=d).to(place.device).rotate_queries_or_keys if temporal else None
        blk = ref.stdit3.STDiT3Block(c, heads, 4.0, qk_norm=True, temporal=temporal, rope=rope)
        torch_load_random(blk, skip=lambda key: False)
        blocks.append(place.model(blk))
    y, t_mlp, lens = rand(1, b * VALID_TOKENS, c), rand(b, 6 * c) * 0.1, [VALID_TOKENS] * b
    spatial, temporal = blocks

    def attention_core() -> Any:
        attn = (q * d**-0.5) @ k.transpose(-2, -1)
        return attn.float().softmax(dim=-1).to(q.dtype) @ v

    ops = {
        "linear 1152->4608": lambda: linear(x.reshape(n, c)),
        "tanh-GELU": lambda: gelu(hidden),
        "spatial scores": lambda: q @ k.transpose(-2, -1),
        "spatial scores + softmax": lambda: (q @ k.transpose(-2, -1)).softmax(dim=-1),
        "spatial attention core": attention_core,
        "cross-attention": lambda: spatial.cross_attn(x, y, lens),
        "layer norm + modulation": lambda: norm(x) * (1 + scale) + shift,
        "spatial block": lambda: spatial(x, y, t_mlp, lens, None, None, t, s),
        "temporal block": lambda: temporal(x, y, t_mlp, lens, None, None, t, s),
        "block pair": lambda: temporal(
            spatial(x, y, t_mlp, lens, None, None, t, s), y, t_mlp, lens, None, None, t, s
        ),
    }
    return {"ops": {name: median_time(place.synced(op), r) for name, op in ops.items()}}


# ====================================================================================== MLX side


def mlx_worker(args: argparse.Namespace, out_dir: Path) -> dict:
    import mlx.core as mx

    from mlx_sora.runtime.blas import fast_blas_loaded
    from mlx_sora.runtime.memory import keep_freed_cpu_memory

    keep_freed_cpu_memory()  # as load_model / Pipeline do for their users
    if args.device == "gpu":
        mx.set_default_device(mx.gpu)  # Metal on a Mac, CUDA with mlx[cuda]
    blas = fast_blas_loaded() or "bundled" if args.device == "cpu" else "-"
    results: dict[str, Any] = {
        "side": "mlx",
        "version": mx.__version__,
        "blas": blas,
        "device": str(mx.default_device()),
        "tf32": os.environ.get("MLX_ENABLE_TF32", "default"),
    }
    if args.part == "stdit":
        results.update(mlx_stdit(args, out_dir))
    elif args.part == "vae":
        results.update(mlx_vae(args, out_dir))
    elif args.part == "t5":
        results.update(mlx_t5(args, out_dir))
    elif args.part == "ops":
        results.update(mlx_ops(args))
    return results


def mlx_stdit(args: argparse.Namespace, out_dir: Path) -> dict:
    import mlx.core as mx

    from mlx_sora.models.stdit3 import STDiT3, STDiT3Config
    from mlx_sora.models.units import run_units

    config = STDiT3Config(
        depth=args.depth,
        hidden_size=args.hidden,
        num_heads=args.heads,
        caption_channels=args.caption_channels,
        model_max_length=args.caption_len,
    )
    dtype = getattr(mx, args.dtype)
    model = STDiT3(config, compute_dtype=dtype)
    model.load_weights(mlx_weights(model, lambda k: k), strict=True)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    res = {}
    for i, frames in enumerate(args.frames):
        a = {
            k: mx.array(v)
            for k, v in stdit_inputs(
                frames, args.size, args.size, args.caption_channels, args.caption_len
            ).items()
        }
        y = mx.concatenate([a.pop("y_cond"), model.null_caption(1)])
        inputs = dict(a, y=y)
        for merge in (False, True):

            def run() -> Any:
                return run_units(model.units, dict(inputs, merge=merge), evaluate=True)

            if i < args.warmup:
                run()
            times, out = timed(run, args.repeats if not merge else args.tdtm_repeats)
            if not merge:
                np.save(out_dir / f"stdit_{frames}.npy", np.array(out.astype(mx.float32)))
            res[f"stdit_{frames}" + ("_tdtm" if merge else "")] = times
    return res


def mlx_vae(args: argparse.Namespace, out_dir: Path) -> dict:
    import mlx.core as mx

    from mlx_sora.models.vae import OpenSoraVAE, VideoAutoencoderConfig

    dtype = getattr(mx, args.dtype)
    vae = OpenSoraVAE(VideoAutoencoderConfig(), compute_dtype=dtype)
    vae.load_weights(mlx_weights(vae, vae_mlx_to_torch_name), strict=False)
    vae.set_dtype(dtype)
    vae.update(dict(scale=vae.scale.astype(mx.float32), shift=vae.shift.astype(mx.float32)))
    mx.eval(vae.parameters())
    vae.micro_batch_size = args.micro_batch
    res = {}
    for frames in args.vae_frames:
        z = mx.array(vae_latent(frames, args.size))
        run = lambda: mx.eval(out := vae.decode(z, num_frames=frames)) or out  # noqa: E731
        if args.warmup:
            run()
        times, out = timed(run, args.repeats)
        np.save(out_dir / f"vae_{frames}.npy", np.array(out[:, :, :2].astype(mx.float32)))
        res[f"vae_{frames}"] = times
    return res


def mlx_t5(args: argparse.Namespace, out_dir: Path) -> dict:
    import mlx.core as mx

    sys.path.insert(0, str(SCRIPTS))
    from bench_t5 import build_mlx, random_weights

    config, ids, mask = t5_setup(args)
    dtype = getattr(mx, args.dtype)
    model = build_mlx(config, random_weights(config, seed=0), dtype, dtype)
    run = lambda: mx.eval(out := model(ids, mask)) or out  # noqa: E731
    run()
    times, out = timed(run, args.repeats)
    np.save(out_dir / "t5.npy", np.array(out.astype(mx.float32)))
    return {"t5": times}


def mlx_ops(args: argparse.Namespace) -> dict:
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_sora.models import fast_ops
    from mlx_sora.models.stdit3_layers import CaptionKeys, STDiT3Block, t2i_modulate

    b, t, s, c, heads = 2, args.ops_frames, (args.size // 16) ** 2, args.hidden, args.heads
    n, d, r = b * t * s, c // heads, args.repeats
    dtype = getattr(mx, args.dtype)
    mx.random.seed(0)
    rand = lambda *shape: mx.random.normal(shape).astype(dtype)  # noqa: E731
    x, hidden = rand(b, t, s, c), rand(n, 4 * c)
    q, k, v = rand(b * t, heads, s, d), rand(b * t, heads, s, d), rand(b * t, heads, s, d)
    shift, scale = rand(b, 1, 1, c), rand(b, 1, 1, c)
    linear = nn.Linear(c, 4 * c)
    blocks = [STDiT3Block(c, heads, 4.0, True, temporal=temporal) for temporal in (False, True)]
    for blk in blocks:
        blk.load_weights(mlx_weights(blk, lambda key: key), strict=True)
    for module in (linear, *blocks):
        module.set_dtype(dtype)
    y, t_mlp = rand(b, VALID_TOKENS, c), rand(b, 6 * c) * 0.1
    keys = CaptionKeys.from_mask(np.ones((b, VALID_TOKENS), bool))
    mx.eval(
        x, hidden, q, k, v, shift, scale, linear.parameters(), [blk.parameters() for blk in blocks], y, t_mlp
    )
    spatial, temporal = blocks
    scores = lambda: q @ k.swapaxes(-1, -2)  # noqa: E731
    ops = {
        "linear 1152->4608": lambda: linear(x.reshape(n, c)),
        "tanh-GELU": lambda: fast_ops.gelu_tanh(hidden),
        "spatial scores": scores,
        "spatial scores + softmax": lambda: fast_ops.softmax(scores()),
        "spatial attention core": lambda: fast_ops.attention(q, k, v, d**-0.5),
        "cross-attention": lambda: spatial.cross_attn(x.reshape(b, t * s, c), y, keys),
        "layer norm + modulation": lambda: t2i_modulate(spatial.norm1(x), shift, scale),
        "spatial block": lambda: spatial(x, y, t_mlp, keys),
        "temporal block": lambda: temporal(x, y, t_mlp, keys),
        "block pair": lambda: temporal(spatial(x, y, t_mlp, keys), y, t_mlp, keys),
    }
    return {"ops": {name: median_time(lambda op=op: mx.eval(op()), r) for name, op in ops.items()}}


# ====================================================================================== orchestration


def run_side(side: str, part: str, args: argparse.Namespace, out_dir: Path) -> dict:
    """One worker process: torch without any preload, MLX with the fast BLAS preloaded."""
    from mlx_sora.runtime.blas import fast_blas_env

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if side == "torch":
        env.pop("LD_PRELOAD", None)
    elif args.device == "cpu":
        env = fast_blas_env(env)
    elif args.dtype == "float32":
        env.setdefault("MLX_ENABLE_TF32", "0")  # float32 as float32 on GPUs with matrix units (precision.py)
    result = out_dir / f"{side}_{part}.json"
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        side,
        "--part",
        part,
        "--out-dir",
        str(out_dir),
        *worker_flags(args),
    ]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env)
    if done.returncode:
        raise SystemExit(f"{side} worker for {part} failed (exit {done.returncode})")
    data = json.loads(result.read_text())
    data["process_s"] = time.perf_counter() - start
    print(
        f"  {side:5s} {part}: done in {data['process_s']:.0f} s (load average {os.getloadavg()[0]:.2f})",
        flush=True,
    )
    return data


def worker_flags(args: argparse.Namespace) -> list[str]:
    flags = [
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
        "--warmup",
        str(args.warmup),
        "--tdtm-repeats",
        str(args.tdtm_repeats),
        "--depth",
        str(args.depth),
        "--hidden",
        str(args.hidden),
        "--heads",
        str(args.heads),
        "--size",
        str(args.size),
        "--caption-len",
        str(args.caption_len),
        "--caption-channels",
        str(args.caption_channels),
        "--t5-layers",
        str(args.t5_layers),
        "--t5-width",
        str(args.t5_width),
        "--micro-batch",
        str(args.micro_batch),
        "--ops-frames",
        str(args.ops_frames),
        "--frames",
        *map(str, args.frames),
        "--vae-frames",
        *map(str, args.vae_frames),
    ]
    return flags + (["--opensora-src", args.opensora_src] if args.opensora_src else [])


def fmt(times: list[float]) -> str:
    if len(times) == 1:
        return f"{times[0]:.2f} s"
    return f"{statistics.median(times):.2f} s ({min(times):.2f}-{max(times):.2f}, n={len(times)})"


def agreement(out_dir: Path, name: str) -> str:
    a, b = out_dir / f"torch_{name}.npy", out_dir / f"mlx_{name}.npy"
    if not (a.exists() and b.exists()):
        return ""
    ref, got = np.load(a), np.load(b)
    return f"max rel. diff {np.abs(got - ref).max() / np.abs(ref).max():.1e}"


def torch_gemm_rate(threads: int) -> float:
    """GFLOP/s of torch's float32 GEMM of the probe's shape (``runtime.blas.PROBE_SHAPE``), in a child process
    with ``threads`` threads and no preload (as the torch worker runs)."""
    from mlx_sora.runtime.blas import PROBE_SHAPE

    code = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
m, k, n = (int(v) for v in sys.argv[1:4])
a, b = torch.randn(m, k), torch.randn(k, n)
a @ b
best = float("inf")
for _ in range(4):
    start = time.perf_counter()
    a @ b
    best = min(best, time.perf_counter() - start)
print(2 * m * k * n / best / 1e9)
"""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    done = subprocess.run([sys.executable, "-c", code, *map(str, PROBE_SHAPE), str(threads)], env=env,
                          capture_output=True, text=True, timeout=300)
    return float(done.stdout.split()[-1]) if done.returncode == 0 else float("nan")


def print_gemm_rates(threads: int) -> None:
    """The machine's float32 GEMM rate for torch and for MLX with every BLAS found (and the one the CLIs
    choose), so that the tables below explain themselves."""
    from mlx_sora.runtime.blas import PROBE_SHAPE, blas_candidates, choose_blas, probe_gemm

    m, k, n = PROBE_SHAPE
    rates = [f"torch {torch_gemm_rate(threads):.0f} ({threads} threads)"]
    for kind, path in blas_candidates():
        rate = probe_gemm(kind, path)
        rates.append(f"MLX + {kind} {rate:.0f}" if rate else f"MLX + {kind} failed")
    choice = choose_blas()
    print(f"float32 GEMM {m}x{k} @ {k}x{n}, GFLOP/s: {', '.join(rates)}; the CLIs use "
          f"{choice.kind if choice else 'MLX bundled'} ({choice.reason if choice else 'none found'})", flush=True)


def print_tables(args: argparse.Namespace, results: dict[str, dict[str, dict]], out_dir: Path) -> None:
    cpu = machine_name()
    print(
        f"\nmachine: {platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} CPUs; "
        f"load average now {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"device {args.device}, dtype {args.dtype}")
    for part, sides in results.items():
        t, m = sides.get("torch", {}), sides.get("mlx", {})
        if m:
            print(
                f"{part}: torch {t.get('version')} on {t.get('device')} ({t.get('threads')} threads), "
                f"mlx {m.get('version')} on {m.get('device')} (BLAS: {m.get('blas')}, "
                f"MLX_ENABLE_TF32: {m.get('tf32')})"
            )
    print("\n| work | Open-Sora 1.2 PyTorch | mlx-sora | ratio mlx/torch (median) | outputs |")
    print("|---|---|---|---|---|")
    labels = {
        "stdit": "STDiT3 forward, CFG batch 2, {s}x{s}, {f} frames",
        "vae": "VAE v1.2 decode, {f} frames, {s}x{s}, micro-batch {mb}",
        "t5": "T5 v1.1 encoder, width {w}, {l} layers, {n} tokens",
    }
    for part, sides in results.items():
        if part == "ops":
            continue
        t, m = sides.get("torch", {}), sides.get("mlx", {})
        for key in [k for k in m if k.startswith(part) and not k.endswith("_tdtm")]:
            frames = key.split("_")[1] if "_" in key else ""
            label = labels[part].format(
                s=args.size, f=frames, mb=args.micro_batch, w=args.t5_width, l=args.t5_layers,
                n=args.caption_len,
            )
            ratio = statistics.median(m[key]) / statistics.median(t[key]) if key in t else float("nan")
            print(
                f"| {label} | {fmt(t[key]) if key in t else '-'} | {fmt(m[key])} | {ratio:.2f}x | "
                f"{agreement(out_dir, key)} |"
            )
            if key + "_tdtm" in m:
                print(
                    f"| same with TDTM merge | - | {fmt(m[key + '_tdtm'])} | "
                    f"{statistics.median(m[key + '_tdtm']) / statistics.median(t[key]):.2f}x | |"
                )
    if "ops" in results:
        t, m = results["ops"].get("torch", {}).get("ops", {}), results["ops"]["mlx"]["ops"]
        print(
            f"\nOne block pair, T = {args.ops_frames} latent frames, CFG batch 2 "
            f"(median of {args.repeats}):\n"
        )
        print("| operation | torch | mlx | ratio mlx/torch |")
        print("|---|---|---|---|")
        for op, sec in m.items():
            ref = t.get(op)
            print(
                f"| {op} | {ref * 1e3:.1f} ms | {sec * 1e3:.1f} ms | {sec / ref:.2f}x |"
                if ref
                else f"| {op} | - | {sec * 1e3:.1f} ms | |"
            )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--opensora-src",
        default=os.environ.get("OPENSORA_SRC"),
        help="folder holding opensora/ at commit 8d132d7 (default: $OPENSORA_SRC)",
    )
    p.add_argument(
        "--parts", nargs="+", default=["stdit", "vae", "t5", "ops"], choices=["stdit", "vae", "t5", "ops"]
    )
    p.add_argument("--sides", nargs="+", default=["torch", "mlx"], choices=["torch", "mlx"])
    p.add_argument("--frames", type=int, nargs="+", default=[17, 68], help="STDiT3 video frames (17 -> T 5)")
    p.add_argument("--vae-frames", type=int, nargs="+", default=[17])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median reported)")
    p.add_argument("--tdtm-repeats", type=int, default=1)
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed runs first (STDiT3: at the first frame count)"
    )
    p.add_argument(
        "--device", choices=["cpu", "gpu"], default="cpu",
        help="gpu: MLX's GPU backend against torch on the same GPU (a Mac: Metal / MPS; elsewhere CUDA)"
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, default=2, help="torch threads (and OMP/MKL threads on both sides)")
    p.add_argument("--size", type=int, default=192, help="video height = width in pixels")
    p.add_argument("--depth", type=int, default=28)
    p.add_argument("--hidden", type=int, default=1152)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--caption-len", type=int, default=300)
    p.add_argument("--caption-channels", type=int, default=4096)
    p.add_argument("--t5-layers", type=int, default=2)
    p.add_argument("--t5-width", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--ops-frames", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 blocks, 64x64, small T5, 1 repeat")
    p.add_argument("--keep", default=None, help="folder for the workers' outputs (default: a temporary one)")
    p.add_argument("--worker", choices=["torch", "mlx"], help=argparse.SUPPRESS)
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick and not args.worker:
        args.depth, args.size, args.frames, args.vae_frames = 2, 64, [17], [17]
        args.t5_layers, args.t5_width, args.repeats, args.warmup, args.caption_len = 1, 512, 1, 1, 300
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        out_dir = Path(args.out_dir)
        fn = torch_worker if args.worker == "torch" else mlx_worker
        data = fn(args, out_dir)
        for name in [
            k for k in os.listdir(out_dir) if k.endswith(".npy") and not k.startswith(("torch_", "mlx_"))
        ]:
            os.replace(out_dir / name, out_dir / f"{args.worker}_{name}")
        (out_dir / f"{args.worker}_{args.part}.json").write_text(json.dumps(data))
        return 0
    if "torch" in args.sides:
        import_reference(args.opensora_src)  # fail early, with instructions, if the reference is missing
    out_dir = Path(args.keep or tempfile.mkdtemp(prefix="bench_vs_torch_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"outputs in {out_dir}; load average {os.getloadavg()[0]:.2f}", flush=True)
    if args.device == "cpu":
        print_gemm_rates(args.threads)
    results: dict[str, dict[str, dict]] = {}
    for part in args.parts:
        results[part] = {side: run_side(side, part, args, out_dir) for side in args.sides}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print_tables(args, results, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
