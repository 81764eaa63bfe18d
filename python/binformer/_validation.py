"""Argument checks of the public ops, raising TypeError / ValueError that name the argument.

The compiled ops check the same things with TORCH_CHECK (RuntimeError); these checks run
first so that Python callers get the conventional exception types and messages that say which
argument is wrong and what was expected. Only metadata is inspected (dtype, device, shape,
strides), except for the finiteness of the small per-row / per-head tensors, which is skipped
while torch.compile traces or a CUDA graph is being captured (a data-dependent check would
break the graph or synchronize).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BITS_DTYPE = torch.int32
MAX_HEAD_DIM = 256


def words_for(d: int) -> int:
    """Number of int32 words holding d packed sign bits."""
    return (d + 31) // 32


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(dt).replace("torch.", "") for dt in dtypes)


def check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_dtype(x: torch.Tensor, name: str, allowed: Sequence[torch.dtype], what: str = "") -> None:
    if x.dtype not in allowed:
        extra = f" ({what})" if what else ""
        raise TypeError(f"{name} must have dtype {_dtype_names(allowed)}{extra}, got {x.dtype}")


def check_floating(x: torch.Tensor, name: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_device(x: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if x.device != ref.device:
        raise ValueError(
            f"{name} is on {x.device} but {ref_name} is on {ref.device}; all tensors must be on one device"
        )


def check_rank(x: torch.Tensor, name: str, rank: int, layout: str) -> None:
    if x.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(x.shape)}")


def check_last_dim_contiguous(x: torch.Tensor, name: str) -> None:
    if x.dim() > 0 and x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(
            f"the last dim of {name} must be contiguous (stride 1), got strides {x.stride()} for shape "
            f"{tuple(x.shape)}; call .contiguous() first"
        )


def check_head_dim(d: int, name: str) -> None:
    if not (8 <= d <= MAX_HEAD_DIM and d % 8 == 0):
        raise ValueError(f"{name} must be a multiple of 8 in [8, {MAX_HEAD_DIM}], got {d}")


def check_packed_width(x: torch.Tensor, name: str, d: int) -> None:
    if x.shape[-1] != words_for(d):
        raise ValueError(
            f"{name} holds packed sign bits (int32), so its last dim must be ceil(head_dim / 32) = "
            f"{words_for(d)} for head_dim = {d}, got {x.shape[-1]}"
        )


def check_broadcastable(x: torch.Tensor, name: str, shape: Sequence[int], shape_name: str) -> None:
    ok = x.dim() <= len(shape) and all(
        have == 1 or have == want for have, want in zip(reversed(x.shape), reversed(tuple(shape)))
    )
    if not ok:
        raise ValueError(
            f"{name} of shape {tuple(x.shape)} does not broadcast to {shape_name} = {tuple(shape)}"
        )


_value_checks = True


def set_value_checks(enabled: bool) -> None:
    """Turns the value (finiteness) checks of small inputs on or off (default: on).

    They read q_scale, k_scale and rel_pos_table; on a GPU that is one device synchronisation per
    call, which matters for small problems. Shape, dtype and device checks always run.
    """
    global _value_checks
    _value_checks = bool(enabled)


def data_checks_allowed(x: torch.Tensor) -> bool:
    """False while torch.compile traces or a CUDA graph captures (no data-dependent checks then),
    or when value checks are turned off with set_value_checks(False)."""
    if not _value_checks or torch.compiler.is_compiling():
        return False
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def check_finite(x: torch.Tensor, name: str) -> None:
    if data_checks_allowed(x) and x.numel() > 0 and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite (it contains NaN or inf)")
