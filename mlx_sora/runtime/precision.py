"""Compute dtypes per component, and float32 that is float32 on GPUs (TF32 off).

**Dtypes.** ``compute_dtypes`` gives each component (``text_encoder``, ``stdit3``, ``vae``) its own
compute dtype. On the CPU all are float32 (MLX's CPU bfloat16 matmul is slow). On a GPU T5 computes
in float32, as Open-Sora 1.2 runs it (``opensora/models/text_encoder/t5.py``: ``T5Encoder(dtype=
torch.float)``, and its inference configs give no other), and STDiT3 and the VAE in bfloat16 (the
reference's inference dtype). ``--dtype`` sets every component, ``--text-dtype`` T5's.

**TF32.** MLX may run float32 matmul-family operations (matmul, quantized matmul, attention, CUDA
convolutions) at reduced precision on GPUs with matrix units: Apple GPUs with neural accelerators
(M5 class; MLX's "NAX" kernels) and NVIDIA GPUs (TF32). It decides by ``MLX_ENABLE_TF32`` (default
1), read with ``getenv`` once, the first time such an operation is dispatched on the GPU, and kept
for the life of the process (``mlx/utils.h`` ``env::enable_tf32``, a function-local static, called
from ``backend/metal/matmul.cpp``, ``quantized.cpp``, ``scaled_dot_product_attention.cpp`` and
``backend/cuda/gemms``, ``conv.cpp``; MLX 0.32). It is not read when MLX is imported, so setting it
in ``os.environ`` before the process's first float32 GPU matmul is enough. ``full_float32_matmuls``
does that (unless the user set it), then checks one float32 matmul against float64 and says what
it found; ``Pipeline`` calls it when a component computes in float32 on a GPU, before any model
runs, and the test suite sets the variable in ``tests/conftest.py``.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import mlx.core as mx
import numpy as np

from ..conversion.loading import parse_dtype

COMPONENTS = ("text_encoder", "stdit3", "vae")
TF32_VARIABLE = "MLX_ENABLE_TF32"
# matmul_relative_error's product: float32 5.7e-7 (this CPU); inputs rounded to TF32's 10-bit
# mantissa 2.9e-4, truncated 7.9e-4 (tests/test_precision.py)
REDUCED_PRECISION_ERROR = 2e-5


def on_gpu() -> bool:
    return mx.default_device() == mx.gpu


def default_compute_dtypes() -> dict[str, mx.Dtype]:
    """float32 on the CPU; on a GPU T5 float32 (as the reference), STDiT3 and the VAE bfloat16."""
    if not on_gpu():
        return {c: mx.float32 for c in COMPONENTS}
    return {"text_encoder": mx.float32, "stdit3": mx.bfloat16, "vae": mx.bfloat16}


def compute_dtypes(dtype: str | mx.Dtype | None = None, text_dtype: str | mx.Dtype | None = None
                   ) -> dict[str, mx.Dtype]:
    """Each component's compute dtype: ``dtype`` for all (default: ``default_compute_dtypes``), then
    ``text_dtype`` for T5."""
    chosen = parse_dtype(dtype)
    dtypes = {c: chosen for c in COMPONENTS} if chosen is not None else default_compute_dtypes()
    text = parse_dtype(text_dtype)
    if text is not None:
        dtypes["text_encoder"] = text
    return dtypes


def describe_dtypes(dtypes: dict[str, mx.Dtype]) -> str:
    names = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}
    return ", ".join(f"{c} {names.get(d, str(d))}" for c, d in dtypes.items())


def matmul_relative_error(matmul: Callable[[mx.array, mx.array], mx.array] = mx.matmul) -> float:
    """max |a @ b - exact| / max |exact| of one [128, 256] x [256, 128] float32 product (exact: float64)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((128, 256)).astype(np.float32), rng.standard_normal((256, 128)).astype(np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    got = np.array(matmul(mx.array(a), mx.array(b)), dtype=np.float64)
    return float(np.abs(got - exact).max() / np.abs(exact).max())


@functools.cache
def full_float32_matmuls() -> str:
    """Make float32 matmuls on the GPU full float32 (``MLX_ENABLE_TF32=0``, unless the user set the
    variable) and say what one product shows. A sentence for the run's report."""
    if not on_gpu():
        return "float32 matmuls in full precision (CPU)"
    if TF32_VARIABLE not in os.environ:
        os.environ[TF32_VARIABLE] = "0"
    setting = f"{TF32_VARIABLE}={os.environ[TF32_VARIABLE]}"
    error = matmul_relative_error()
    if error <= REDUCED_PRECISION_ERROR:
        return f"float32 matmuls in full precision ({setting}; one product checked against float64: {error:.1e})"
    return (f"float32 matmuls at REDUCED precision ({setting}: MLX read it before, or it asks for TF32; one product "
            f"is {error:.1e} from float64): these are not the reference's float32 numbers. Start the process "
            f"with {TF32_VARIABLE}=0")
