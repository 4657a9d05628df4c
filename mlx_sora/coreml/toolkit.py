"""coremltools, imported quietly and on demand (it is an optional dependency: ``pip install ".[coreml]"``).

Off macOS, importing coremltools logs that its native Core ML proxies are missing (it cannot compile
or run models there) and, with a newer torch than it was tested with, a version notice; its passes
draw progress bars. Neither tells our user anything, so they are kept out of the output: the
``coremltools`` loggers only show errors, and ``quiet()`` turns the progress bars off while a
program is converted or compressed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import sys
import warnings
from types import ModuleType
from typing import Iterator

from ..errors import UserError

INSTALL_HINT = ('install the Core ML extra: pip install "mlx-sora[coreml]" (or, in a checkout, '
                'pip install -e ".[coreml]"); coremltools 9 builds and saves ML Programs on Linux too')

# modules of coremltools that draw tqdm progress bars while converting or compressing
_PROGRESS_MODULES = (
    "coremltools.converters.mil.mil.passes.pass_pipeline",
    "coremltools.optimize.coreml._quantization_passes",
)


@functools.cache
def coremltools() -> ModuleType:
    """The coremltools module, or a UserError saying how to install it."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    try:
        import coremltools as ct
    except ImportError as e:
        raise UserError(f"Core ML export needs coremltools, which is not installed ({e}); {INSTALL_HINT}") from e
    major = int(ct.__version__.split(".")[0])
    if major < 8:
        raise UserError(f"coremltools {ct.__version__} is too old for multifunction ML Programs (iOS 18); "
                        f"{INSTALL_HINT}")
    return ct


def can_predict() -> bool:
    """Whether Core ML itself can run a model here (macOS with coremltools' native proxy)."""
    if sys.platform != "darwin":
        return False
    ct = coremltools()
    from coremltools.models import model as ct_model

    return getattr(ct_model, "_MLModelProxy", None) is not None and ct is not None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Inside the block, coremltools' passes draw no progress bars and warn about nothing (their
    numpy range checks warn on float16 casts of finite values)."""
    from tqdm import tqdm

    coremltools()
    patched = []
    for name in _PROGRESS_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "tqdm", None) is tqdm:
            patched.append(module)
            module.tqdm = functools.partial(tqdm, disable=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    finally:
        for module in patched:
            module.tqdm = tqdm


@contextlib.contextmanager
def faster_conversion() -> Iterator[None]:
    """Two costs of coremltools' conversion that grow with the model but change nothing in its result:

    * it validates the whole program after each of its ~100 passes (a third of the time a block's
      conversion takes); here it validates where it also checks the program's essential scopes: after
      dead-code elimination and before the program is written;
    * its float16 pass asks, for every op and every float32 constant feeding it, whether a finite value
      exceeds float16's range, by collecting the indices of all values below 1e38 (``np.where``): 13 s
      and 670 MB of indices for one 4096 x 10240 T5 weight; here the same test is one vectorised
      comparison (0.3 s), with the same answer (NaN and values of 1e38 and above never count).
    """
    import numpy as np
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision
    from coremltools.converters.mil.mil.program import Program

    validate, overflow = Program.validate, FP16ComputePrecision.__dict__["fp16_overflow"]  # a staticmethod

    def essential_only(self, check_essential_scope: bool = False) -> None:
        if check_essential_scope:
            validate(self, check_essential_scope=True)

    def fp16_overflow(op) -> bool:
        for inputs in op.inputs.values():
            for var in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
                if var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32"):
                    magnitude = np.abs(np.asarray(var.op.val.val))
                    if ((magnitude > 65504) & (magnitude < 1e38)).any():
                        return True
        return False

    Program.validate, FP16ComputePrecision.fp16_overflow = essential_only, staticmethod(fp16_overflow)
    try:
        yield
    finally:
        Program.validate, FP16ComputePrecision.fp16_overflow = validate, overflow
