"""binformer: 1-bit QK attention (BinaryAttention / BinaryFormer) for PyTorch.

Ops (fused CPU and CUDA kernels, autograd, torch.compile support):

* :func:`attention` -- softmax attention with sign(q) . sign(k) scores;
* :func:`pack_sign` -- pack the signs of a tensor's last dim into int32 words;
* :func:`sign_matmul` -- exact inner products of packed sign vectors.

:mod:`binformer.reference` holds the float64 pure-PyTorch reference of every op (the test
oracle) and BinaryAttention's fake-quantization helpers; ``binformer.nn`` (modules and training
helpers) is imported on first access.
"""

from __future__ import annotations

import importlib

import torch

from . import reference
from ._validation import set_value_checks
from .ops import attention, pack_sign, sign_matmul

__all__ = ["attention", "pack_sign", "sign_matmul", "reference", "nn", "convert", "distill",
           "cpu_isa", "has_cuda", "set_value_checks"]


def cpu_isa() -> str:
    """The instruction set the CPU kernels use now: "avx512" or "scalar" (BINFORMER_CPU_ISA=scalar forces it)."""
    from . import _C
    return _C.cpu_isa()


def has_cuda() -> bool:
    """True when this build has the CUDA kernels (torch with CUDA and nvcc at build time)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("binformer::attention_fwd", "CUDA")


def convert(model, **kwargs):
    """Swaps the attention of a timm VisionTransformer for binformer's (see binformer.nn.convert)."""
    from .nn import convert as _convert
    return _convert(model, **kwargs)


__version__ = "0.1.0"


def __getattr__(name: str):
    # binformer.nn pulls in more (modules, training helpers); load it only when asked for.
    if name in ("nn", "distill"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise  # nn exists but one of its own imports failed: show that error
            raise AttributeError(f"module {__name__!r} has no attribute {name!r} (binformer/{name}.py is absent)") from None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
