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

from . import reference
from .ops import attention, pack_sign, sign_matmul

__all__ = ["attention", "pack_sign", "sign_matmul", "reference", "nn"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # binformer.nn pulls in more (modules, training helpers); load it only when asked for.
    if name == "nn":
        try:
            return importlib.import_module(f"{__name__}.nn")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.nn":
                raise  # nn exists but one of its own imports failed: show that error
            raise AttributeError(f"module {__name__!r} has no attribute 'nn' (binformer/nn.py is absent)") from None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
