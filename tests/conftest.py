"""Shared test helpers: a tiny random Open-Sora model folder for end-to-end runs."""

from __future__ import annotations

import json
import os
import resource
import shutil
from pathlib import Path

# The suite checks float32 against the references: float32 matmuls must be float32 on GPUs with
# matrix units too. MLX reads this once, at the process's first float32 GPU matmul (precision.py).
os.environ["MLX_ENABLE_TF32"] = "0"

import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "opensora12"

TINY_T5 = {
    "model_type": "t5", "vocab_size": 160, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2,
    "num_heads": 4, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 20,
    "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu",
}


def tiny_stdit3_config() -> dict:
    config = json.loads((FIXTURES / "stdit3_checkpoint" / "config.json").read_text())
    config["model_max_length"] = 300  # the pipeline's prompt length
    return config


def train_spiece(folder: Path, vocab_size: int = 60) -> Path:
    import sentencepiece as spm

    corpus = [
        "a red panda eating bamboo in a misty forest", "a cat playing piano in a jazz club",
        "waves crashing on a rocky shore at sunset", "aesthetic score: 6.5. motion score: 4.0.",
        "camera motion: pan right. a drone shot of a city at night with neon lights",
    ] * 4
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(folder / "spiece"), vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
        eos_piece="</s>", unk_piece="<unk>", character_coverage=1.0, minloglevel=2,
    )
    return folder / "spiece.model"


def build_tiny_model_folder(root: Path) -> Path:
    """text_encoder/ (random tiny T5), stdit3/ (random tiny STDiT3 with 300 text tokens) and vae/
    (the fixture's tiny VAE v1.2, through the converter): a complete model for the pipeline."""
    from mlx_sora import convert, save_model
    from mlx_sora.models import family_for_type

    mx.random.seed(0)
    spiece_dir = root / "spiece"
    spiece_dir.mkdir(parents=True)
    train_spiece(spiece_dir)
    t5 = family_for_type("t5").build(TINY_T5)
    save_model(t5, root / "model" / "text_encoder", "t5", TINY_T5, source_dir=spiece_dir)
    config = tiny_stdit3_config()
    stdit = family_for_type("stdit3").build(config)
    save_model(stdit, root / "model" / "stdit3", "stdit3", config)
    convert(FIXTURES / "vae_v12_checkpoint", root / "model" / "vae")
    shutil.rmtree(spiece_dir)
    return root / "model"


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory) -> Path:
    return build_tiny_model_folder(tmp_path_factory.mktemp("tiny_opensora"))


HEADROOM = 1 << 30  # what a capped test may allocate beyond the process's current address space


def address_space() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@pytest.fixture
def memory_cap():
    """Cap the address space at its current size + 1 GiB for the test (Linux; elsewhere no cap), so
    that an unbounded allocation fails the test instead of the machine."""
    current = address_space()
    if current is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = current + HEADROOM
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture
def cpu_fast_path(monkeypatch):
    """For tests of the CPU kernels (fast_ops, conv, winograd, the CPU quantized path): run them on the
    CPU device with the fast path on, whatever the default device (a Mac's GPU) or MLX_SORA_FAST_OPS
    say; elsewhere those kernels do not run and their bounds (e.g. 2e-7 against float64) do not hold."""
    monkeypatch.setenv("MLX_SORA_FAST_OPS", "1")
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        yield
    finally:
        mx.set_default_device(device)


# ---------------------------------------------------------------- Core ML exports of the demo model


def export_demo(folder: Path, *extra: str) -> Path:
    """``python -m mlx_sora.export_coreml --model demo --out folder ...`` in this process."""
    from mlx_sora.coreml.export import export
    from mlx_sora.export_coreml import build_parser, plan_export

    plan = plan_export(build_parser().parse_args(["--model", "demo", "--out", str(folder), *extra]))
    export(plan, folder, log=lambda line: None)
    return folder


@pytest.fixture(scope="session")
def demo_export_fp32(tmp_path_factory) -> Path:
    pytest.importorskip("coremltools")
    return export_demo(tmp_path_factory.mktemp("coreml") / "demo_fp32", "--precision", "float32")


@pytest.fixture(scope="session")
def demo_export_fp16(tmp_path_factory) -> Path:
    pytest.importorskip("coremltools")
    return export_demo(tmp_path_factory.mktemp("coreml") / "demo_fp16")
