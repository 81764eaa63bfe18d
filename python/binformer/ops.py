"""binformer's public ops: 1-bit QK attention and its building blocks.

The compiled ops live in ``torch.ops.binformer`` (schemas in ``cpp/torch/ops.cpp``, semantics in
``docs/CONTRACT.md``). This module adds, for each of them:

* a Python wrapper that validates its arguments and raises ``TypeError`` (wrong type or dtype) or
  ``ValueError`` (wrong shape, device, layout or value) naming the argument;
* a fake (meta) kernel, so the ops trace under ``torch.compile`` and ``torch.export``;
* for ``attention_fwd``, the autograd formula (``grad_mode="ste"`` or ``"hamming"``), which calls
  the ``attention_bwd`` op with only the gradients that are needed.

The math (SPEC.md section 2): with ``sign(x) = +1 if x >= 0 else -1`` (NaN counts as +1),

    S_ij = scale * a_i * b_j * <sign q_i, sign k_j> + bias_ij + relpos_ij   (causal: j > i masked)
    out  = softmax_j(S) @ v,       lse_i = log sum_j exp(S_ij)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

try:
    from . import _C  # noqa: F401  (loads the compiled library, which registers torch.ops.binformer)
except ImportError as e:
    raise ImportError(
        "binformer's compiled ops (binformer._C) could not be loaded; build and install them with "
        "`pip install --no-build-isolation .` from the repository root (against the installed torch)"
    ) from e
from ._validation import (
    BITS_DTYPE,
    FLOAT_DTYPES,
    check_broadcastable,
    check_device,
    check_dtype,
    check_finite,
    check_floating,
    check_head_dim,
    check_last_dim_contiguous,
    check_packed_width,
    check_rank,
    check_tensor,
    words_for,
)

__all__ = ["pack_sign", "sign_matmul", "attention", "GRAD_MODES"]

GRAD_MODES = ("ste", "hamming")

# Order of attention_bwd's outputs and of its output_mask.
_BWD_OUTPUTS = ("dv", "dq_scale", "dk_scale", "dq_sign", "dk_sign", "dbias", "drel_pos_table")


# ----------------------------------------------------------------------------------- pack_sign
def pack_sign(x: torch.Tensor) -> torch.Tensor:
    """Pack the signs of the last dim of ``x`` into 32-bit words.

    Args:
        x: fp32, fp16 or bf16 tensor ``[..., d]`` (any strides; ``d >= 1``).

    Returns:
        int32 tensor ``[..., ceil(d / 32)]``. Element ``c`` of a row becomes bit ``c % 32`` of word
        ``c // 32``; the bit is 1 for ``x >= 0`` (so +0, -0 and NaN give 1) and 0 for ``x < 0``.
        Pad bits past ``d`` are 0. These are the bits that :func:`sign_matmul` and
        :func:`attention` accept in place of float q / k.
    """
    check_tensor(x, "x")
    check_dtype(x, "x", FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least one dim (the one packed), got a 0-d tensor")
    if x.shape[-1] == 0:
        raise ValueError(f"the last dim of x must be >= 1, got shape {tuple(x.shape)}")
    return torch.ops.binformer.pack_sign(x)


# --------------------------------------------------------------------------------- sign_matmul
def sign_matmul(a_bits: torch.Tensor, b_bits: torch.Tensor, d: int) -> torch.Tensor:
    """Inner products of sign vectors from their packed bits: ``sign(a) @ sign(b)^T``.

    Args:
        a_bits: int32 ``[..., M, W]`` from :func:`pack_sign`, ``W = ceil(d / 32)``.
        b_bits: int32 ``[..., N, W]`` on the same device; the leading dims broadcast against
            those of ``a_bits``.
        d: number of sign bits per row (the unpacked length). Pad bits must be 0, as
            :func:`pack_sign` writes them.

    Returns:
        int32 ``[..., M, N]`` with ``out[..., m, n] = d - 2 * popcount(a[m] XOR b[n])``, the exact
        value of ``<sign a_m, sign b_n>`` (in ``[-d, d]``).
    """
    check_tensor(a_bits, "a_bits")
    check_tensor(b_bits, "b_bits")
    check_dtype(a_bits, "a_bits", (BITS_DTYPE,), "packed sign bits from pack_sign")
    check_dtype(b_bits, "b_bits", (BITS_DTYPE,), "packed sign bits from pack_sign")
    check_device(b_bits, "b_bits", a_bits, "a_bits")
    if isinstance(d, bool) or not isinstance(d, int):
        raise TypeError(f"d must be an int, got {type(d).__name__}")
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    for t, name, rows in ((a_bits, "a_bits", "M"), (b_bits, "b_bits", "N")):
        if t.dim() < 2:
            raise ValueError(f"{name} must be [..., {rows}, W] (at least 2-D), got shape {tuple(t.shape)}")
        check_packed_width(t, name, d)
    try:
        torch.broadcast_shapes(a_bits.shape[:-2], b_bits.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"the leading (batch) dims of a_bits {tuple(a_bits.shape[:-2])} and b_bits "
            f"{tuple(b_bits.shape[:-2])} do not broadcast"
        ) from None
    return torch.ops.binformer.sign_matmul(a_bits, b_bits, d)


# ----------------------------------------------------------------------------------- attention
def _validate_attention(
    q, k, v, q_scale, k_scale, bias, rel_pos_table, rel_pos_grid, num_prefix_tokens, head_dim, scale,
    is_causal, pv_int8, return_lse, grad_mode,
) -> tuple[int, int, int]:
    """Checks every argument of :func:`attention`; returns (head_dim, Wh, Ww)."""
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        check_tensor(t, name)
    check_dtype(q, "q", FLOAT_DTYPES + (BITS_DTYPE,), "or int32 packed sign bits")
    check_dtype(k, "k", FLOAT_DTYPES + (BITS_DTYPE,), "or int32 packed sign bits")
    check_dtype(v, "v", FLOAT_DTYPES)
    check_device(k, "k", q, "q")
    check_device(v, "v", q, "q")
    check_rank(q, "q", 4, "[B, H, Nq, d] (or [B, H, Nq, ceil(d/32)] int32 bits)")
    check_rank(k, "k", 4, "[B, H, Nk, d] (or [B, H, Nk, ceil(d/32)] int32 bits)")
    check_rank(v, "v", 4, "[B, H, Nk, Dv]")
    B, H, Nq = q.shape[:3]
    Nk, Dv = k.shape[2], v.shape[3]
    if tuple(k.shape[:2]) != (B, H):
        raise ValueError(f"k must have the [B, H] = {[B, H]} of q, got shape {tuple(k.shape)}")
    if tuple(v.shape[:3]) != (B, H, Nk):
        raise ValueError(
            f"v must be [B, H, Nk, Dv] with [B, H, Nk] = {[B, H, Nk]} from q and k, got shape {tuple(v.shape)}"
        )

    if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int)):
        raise TypeError(f"head_dim must be an int or None, got {type(head_dim).__name__}")
    d = head_dim
    for t, name in ((q, "q"), (k, "k")):
        if t.dtype != BITS_DTYPE:
            if d is not None and d != t.shape[-1]:
                raise ValueError(f"head_dim = {d} does not match the last dim of the float {name}, {t.shape[-1]}")
            d = t.shape[-1]
    if d is None:
        raise ValueError("head_dim is required when q and k are both int32 packed sign bits")
    check_head_dim(d, "head_dim (the last dim of q and k)")
    check_head_dim(Dv, "Dv (the last dim of v)")
    for t, name in ((q, "q"), (k, "k")):
        if t.dtype == BITS_DTYPE:
            check_packed_width(t, name, d)
        check_last_dim_contiguous(t, name)
    check_last_dim_contiguous(v, "v")

    for s, name, n, shape_name in ((q_scale, "q_scale", Nq, "[B, H, Nq]"), (k_scale, "k_scale", Nk, "[B, H, Nk]")):
        if s is None:
            continue
        check_tensor(s, name)
        check_floating(s, name)
        check_device(s, name, q, "q")
        check_broadcastable(s, name, (B, H, n), shape_name)
        check_finite(s, name)

    if bias is not None:
        check_tensor(bias, "bias")
        check_dtype(bias, "bias", FLOAT_DTYPES)
        check_device(bias, "bias", q, "q")
        check_broadcastable(bias, "bias", (B, H, Nq, Nk), "[B, H, Nq, Nk]")
        check_last_dim_contiguous(bias, "bias")

    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int):
        raise TypeError(f"num_prefix_tokens must be an int, got {type(num_prefix_tokens).__name__}")
    if num_prefix_tokens not in (0, 1):
        raise ValueError(f"num_prefix_tokens must be 0 or 1 (a cls token before the patches), got {num_prefix_tokens}")
    wh = ww = 0
    if rel_pos_table is None:
        if rel_pos_grid is not None:
            raise ValueError("rel_pos_grid is given but rel_pos_table is None; pass both or neither")
        if num_prefix_tokens != 0:
            raise ValueError("num_prefix_tokens only applies with rel_pos_table, which is None")
    else:
        check_tensor(rel_pos_table, "rel_pos_table")
        check_floating(rel_pos_table, "rel_pos_table")
        check_device(rel_pos_table, "rel_pos_table", q, "q")
        if rel_pos_grid is None:
            raise ValueError("rel_pos_table needs rel_pos_grid = (Wh, Ww), the patch grid it is indexed by")
        if (
            not isinstance(rel_pos_grid, Sequence)
            or len(rel_pos_grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) for g in rel_pos_grid)
        ):
            raise TypeError(f"rel_pos_grid must be a pair of ints (Wh, Ww), got {rel_pos_grid!r}")
        wh, ww = rel_pos_grid
        if wh < 1 or ww < 1:
            raise ValueError(f"rel_pos_grid must be positive, got {tuple(rel_pos_grid)}")
        table_size = (2 * wh - 1) * (2 * ww - 1) + 3
        if tuple(rel_pos_table.shape) != (H, table_size):
            raise ValueError(
                f"rel_pos_table must be [H, (2*Wh-1)*(2*Ww-1)+3] = {[H, table_size]} for the {wh} x {ww} grid, "
                f"got shape {tuple(rel_pos_table.shape)}"
            )
        tokens = num_prefix_tokens + wh * ww
        if Nq != tokens or Nk != tokens:
            raise ValueError(
                f"rel_pos_table needs Nq == Nk == num_prefix_tokens + Wh*Ww = {tokens}, got Nq = {Nq}, Nk = {Nk}"
            )
        check_finite(rel_pos_table, "rel_pos_table")

    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    for flag, name in ((is_causal, "is_causal"), (pv_int8, "pv_int8"), (return_lse, "return_lse")):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    return d, wh, ww


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_scale: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    rel_pos_table: torch.Tensor | None = None,
    rel_pos_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 0,
    head_dim: int | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    pv_int8: bool = False,
    return_lse: bool = False,
    grad_mode: str = "ste",
):
    """Attention with 1-bit (sign) queries and keys.

    Computes, per batch b and head h (SPEC.md section 2)::

        S_ij = scale * a_i * b_j * <sign q_i, sign k_j> + bias_ij + relpos_ij
        out_i = sum_j softmax_j(S_i)_j * v_j,      lse_i = log sum_j exp(S_ij)

    where ``sign(x) = +1 for x >= 0`` (also for -0 and NaN) and ``-1 for x < 0``. The dot product
    of the signs is exact (an integer in [-d, d]); everything after it is computed in fp32.
    BinaryAttention passes per-(batch, head) magnitudes ``q_scale = mean|q|`` (shape
    ``[B, H, 1]``) and a relative-position table; BinaryFormer passes per-token weights
    (``[B, H, N]``) and ``grad_mode="hamming"``.

    Args:
        q: ``[B, H, Nq, d]`` fp32/fp16/bf16, or ``[B, H, Nq, ceil(d/32)]`` int32 bits from
            :func:`pack_sign` (then ``head_dim`` is needed unless k is float). Only the signs
            are used. ``d`` must be a multiple of 8 in [8, 256]. Any strides with a contiguous
            last dim (views of a fused qkv projection work without copies).
        k: ``[B, H, Nk, d]`` or its packed bits, like q.
        v: ``[B, H, Nk, Dv]`` fp32/fp16/bf16, ``Dv`` a multiple of 8 in [8, 256]; contiguous
            last dim. ``out`` has v's dtype.
        q_scale: per-query factor ``a``, any floating tensor broadcastable to ``[B, H, Nq]``
            (e.g. ``[B, H, 1]`` per head or ``[B, H, Nq]`` per token); used in fp32. Must be
            finite (checked, except while compiling or capturing a CUDA graph).
        k_scale: per-key factor ``b``, broadcastable to ``[B, H, Nk]``, like q_scale.
        bias: additive score bias, fp32/fp16/bf16 broadcastable to ``[B, H, Nq, Nk]`` (broadcast
            dims are read with stride 0, never copied; the last dim must be contiguous or of
            size 1). ``-inf`` masks a key; NaN / +inf propagate to the rows they touch.
        rel_pos_table: BinaryAttention / BEiT relative-position bias, ``[H, (2Wh-1)(2Ww-1)+3]``
            floating (used in fp32); gathered inside the kernel, never materialized as
            ``[H, N, N]``. Requires ``Nq == Nk == num_prefix_tokens + Wh * Ww``. Must be finite.
        rel_pos_grid: ``(Wh, Ww)``, the patch grid of the table (required with it).
        num_prefix_tokens: 0, or 1 for a cls token before the ``Wh x Ww`` patches (row-major);
            it uses the table's last three entries (cls->patch, patch->cls, cls->cls).
        head_dim: d; required only when q and k are both packed bits.
        scale: multiplies the integer dot product; default ``1 / sqrt(d)``.
        is_causal: mask key j for query i when ``j > i`` (top-left aligned, also for Nq != Nk).
        pv_int8: quantize P.V to 8 bits (BinaryAttention's "pv-quant"): V symmetric int8 per
            (batch, head, channel), ``dq = max_n |V| / 127``; P per element
            ``round(exp(s - m) * 255)`` in uint8 with m the running row max; the gradient is
            straight-through over both quantizers.
        return_lse: also return ``lse`` (fp32 ``[B, H, Nq]``, natural log). lse carries no
            gradient (like FlashAttention's softmax_lse); a loss on it does not reach the inputs.
        grad_mode: ``"ste"`` (BinaryAttention): q and k get the straight-through gradient of
            sign, i.e. the gradient w.r.t. ``sign(q)`` where ``|q| <= 1`` and 0 elsewhere;
            ``"hamming"`` (BinaryFormer): the signs are constants, q and k get no gradient.
            In both modes v, q_scale, k_scale, bias and rel_pos_table get exact gradients
            (q_scale / k_scale / bias reduced to their own broadcast shapes). Packed-bit q / k
            never get a gradient.

    Returns:
        ``out`` ``[B, H, Nq, Dv]`` (v's dtype), or ``(out, lse)`` with ``return_lse=True``.
        A row with every key masked gives ``out = 0`` and ``lse = -inf`` (never NaN).
        Empty problems are answered without error: ``B*H*Nq == 0`` gives empty ``out`` / ``lse``
        of the shapes above; ``Nk == 0`` gives ``out = 0``, ``lse = -inf`` (every row masked).

    Non-finite inputs: NaN in q / k counts as +1 and +-inf by its sign (only signs are read); NaN
    in v or bias reaches the outputs it contributes to (IEEE; an inf in fp32 v on CUDA arrives as
    NaN, from the 3xTF32 split of V); non-finite q_scale, k_scale or rel_pos_table raise
    ValueError (unless value checks are off: :func:`binformer.set_value_checks`).

    Raises:
        TypeError: an argument of the wrong type or dtype.
        ValueError: wrong rank, shape, device, head dim, packed width, layout or value; the
            message names the argument.
    """
    d, wh, ww = _validate_attention(
        q, k, v, q_scale, k_scale, bias, rel_pos_table, rel_pos_grid, num_prefix_tokens, head_dim, scale,
        is_causal, pv_int8, return_lse, grad_mode,
    )
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    out, lse = torch.ops.binformer.attention_fwd(
        q, k, v, q_scale, k_scale, bias, rel_pos_table, wh, ww, num_prefix_tokens, d, float(scale),
        is_causal, pv_int8, grad_mode,
    )
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------------------- fake kernels
@torch.library.register_fake("binformer::pack_sign")
def _pack_sign_fake(x):
    torch._check(x.dtype in FLOAT_DTYPES, lambda: f"pack_sign: x must be fp32/fp16/bf16, got {x.dtype}")
    torch._check(x.dim() >= 1, lambda: "pack_sign: x must have at least one dim")
    return x.new_empty((*x.shape[:-1], words_for(x.shape[-1])), dtype=torch.int32)


@torch.library.register_fake("binformer::sign_matmul")
def _sign_matmul_fake(a_bits, b_bits, d):
    torch._check(a_bits.dtype == BITS_DTYPE and b_bits.dtype == BITS_DTYPE, lambda: "sign_matmul: bits must be int32")
    torch._check(a_bits.shape[-1] == words_for(d), lambda: "sign_matmul: a_bits width != ceil(d/32)")
    torch._check(b_bits.shape[-1] == words_for(d), lambda: "sign_matmul: b_bits width != ceil(d/32)")
    batch = torch.broadcast_shapes(a_bits.shape[:-2], b_bits.shape[:-2])
    return a_bits.new_empty((*batch, a_bits.shape[-2], b_bits.shape[-2]), dtype=torch.int32)


@torch.library.register_fake("binformer::attention_fwd")
def _attention_fwd_fake(
    q, k, v, q_scale, k_scale, bias, rel_pos_table, rel_pos_wh, rel_pos_ww, num_prefix_tokens, head_dim, scale,
    is_causal, pv_int8, grad_mode="ste",
):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "attention_fwd: q, k, v must be 4-D")
    torch._check(v.dtype in FLOAT_DTYPES, lambda: f"attention_fwd: v must be fp32/fp16/bf16, got {v.dtype}")
    B, H, Nq = q.shape[:3]
    out = v.new_empty((B, H, Nq, v.shape[3]))
    lse = v.new_empty((B, H, Nq), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("binformer::attention_bwd")
def _attention_bwd_fake(
    dout, q_bits, k_bits, v, out, lse, q_scale, k_scale, bias, rel_pos_table, rel_pos_wh, rel_pos_ww,
    num_prefix_tokens, head_dim, scale, is_causal, output_mask,
):
    torch._check(q_bits.dtype == BITS_DTYPE and k_bits.dtype == BITS_DTYPE, lambda: "attention_bwd: bits must be int32")
    torch._check(
        not output_mask[6] or rel_pos_table is not None,
        lambda: "attention_bwd: output_mask asks for drel_pos_table but rel_pos_table is absent",
    )
    B, H, Nq = q_bits.shape[:3]
    Nk, Dv = k_bits.shape[2], v.shape[3]
    table_size = rel_pos_table.shape[1] if rel_pos_table is not None else 0
    shapes = (
        (B, H, Nk, Dv),
        (B, H, Nq),
        (B, H, Nk),
        (B, H, Nq, head_dim),
        (B, H, Nk, head_dim),
        (B, H, Nq, Nk),
        (H, table_size),
    )
    return tuple(
        v.new_empty(shape if wanted else (0,), dtype=torch.float32) for shape, wanted in zip(shapes, output_mask)
    )


# ----------------------------------------------------------------------------------- autograd
# attention_fwd's inputs, in schema order (setup_context receives them as a tuple).
_FWD_INPUTS = (
    "q", "k", "v", "q_scale", "k_scale", "bias", "rel_pos_table", "rel_pos_wh", "rel_pos_ww",
    "num_prefix_tokens", "head_dim", "scale", "is_causal", "pv_int8", "grad_mode",
)
_IN = {name: i for i, name in enumerate(_FWD_INPUTS)}


def _attention_setup_context(ctx, inputs, output):
    q, k, v, q_scale, k_scale, bias, rel_pos_table = inputs[:7]
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ste = inputs[_IN["grad_mode"]] == "ste"
    # The backward needs only the signs of q / k, plus the float values for the straight-through
    # mask |x| <= 1 when x itself gets a gradient. Otherwise keep the packed bits (d/8 bytes
    # per row instead of 2d or 4d), so the float q / k can be freed after the forward.
    def saved(x, name):
        if x.dtype == BITS_DTYPE or (ste and ctx.needs_input_grad[_IN[name]]):
            return x
        return torch.ops.binformer.pack_sign(x)

    ctx.save_for_backward(saved(q, "q"), saved(k, "k"), v, out, lse, q_scale, k_scale, bias, rel_pos_table)
    ctx.rel_pos_wh = inputs[_IN["rel_pos_wh"]]
    ctx.rel_pos_ww = inputs[_IN["rel_pos_ww"]]
    ctx.num_prefix_tokens = inputs[_IN["num_prefix_tokens"]]
    ctx.head_dim = inputs[_IN["head_dim"]]
    ctx.scale = inputs[_IN["scale"]]
    ctx.is_causal = inputs[_IN["is_causal"]]
    ctx.grad_mode = inputs[_IN["grad_mode"]]
    ctx.float_head_dim = q.shape[-1] if q.dtype != BITS_DTYPE else k.shape[-1]


def _attention_backward(ctx, grad_out, grad_lse):
    # grad_lse is ignored: lse is marked non-differentiable (it comes back as zeros or None).
    q, k, v, out, lse, q_scale, k_scale, bias, rel_pos_table = ctx.saved_tensors
    needs = ctx.needs_input_grad
    ste = ctx.grad_mode == "ste"
    # Packed-bit q / k carry no gradient; in "hamming" mode the signs are constants.
    want_dq = ste and needs[_IN["q"]] and q.dtype != BITS_DTYPE
    want_dk = ste and needs[_IN["k"]] and k.dtype != BITS_DTYPE
    output_mask = [
        needs[_IN["v"]],
        needs[_IN["q_scale"]],
        needs[_IN["k_scale"]],
        want_dq,
        want_dk,
        needs[_IN["bias"]],
        needs[_IN["rel_pos_table"]],
    ]
    grads = [None] * len(_FWD_INPUTS)
    if not any(output_mask) or grad_out is None:
        return tuple(grads)

    head_dim = ctx.head_dim
    if head_dim <= 0:  # a direct op call with a float q or k may leave head_dim = 0
        head_dim = ctx.float_head_dim
    q_bits = q if q.dtype == BITS_DTYPE else torch.ops.binformer.pack_sign(q)
    k_bits = k if k.dtype == BITS_DTYPE else torch.ops.binformer.pack_sign(k)
    dout = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    dv, dq_scale, dk_scale, dq_sign, dk_sign, dbias, drel = torch.ops.binformer.attention_bwd(
        dout, q_bits, k_bits, v, out, lse, q_scale, k_scale, bias, rel_pos_table, ctx.rel_pos_wh, ctx.rel_pos_ww,
        ctx.num_prefix_tokens, head_dim, ctx.scale, ctx.is_causal, output_mask,
    )
    if output_mask[0]:
        grads[_IN["v"]] = dv.to(v.dtype)
    if output_mask[1]:
        grads[_IN["q_scale"]] = dq_scale.sum_to_size(q_scale.shape).to(q_scale.dtype)
    if output_mask[2]:
        grads[_IN["k_scale"]] = dk_scale.sum_to_size(k_scale.shape).to(k_scale.dtype)
    if want_dq:  # straight-through estimator of sign: pass the gradient where |q| <= 1
        grads[_IN["q"]] = (dq_sign * (q.abs() <= 1)).to(q.dtype)
    if want_dk:
        grads[_IN["k"]] = (dk_sign * (k.abs() <= 1)).to(k.dtype)
    if output_mask[5]:
        grads[_IN["bias"]] = dbias.sum_to_size(bias.shape).to(bias.dtype)
    if output_mask[6]:
        grads[_IN["rel_pos_table"]] = drel.to(rel_pos_table.dtype)
    return tuple(grads)


torch.library.register_autograd(
    "binformer::attention_fwd", _attention_backward, setup_context=_attention_setup_context
)
