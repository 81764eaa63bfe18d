"""Float64 pure-PyTorch reference of every binformer op: the oracle of the tests.

Written for clarity, not speed: it materializes the [B, H, Nq, Nk] score matrix in float64.
Each function follows docs/CONTRACT.md literally:

* signs: ``sign(x) = +1`` unless ``x < 0`` (so +0, -0 and NaN give +1); packed bits: element
  ``c`` -> bit ``c % 32`` of int32 word ``c // 32``, pad bits 0;
* ``S = scale * a_i * b_j * <sign q_i, sign k_j> + bias + relpos`` (the dot product is exact),
  causal masking top-left (key j masked for query i when j > i), softmax over keys;
* a row with every key masked gives ``out = 0`` and ``lse = -inf``;
* ``pv_int8``: V quantized per (b, h, channel) exactly as the binding does it (see
  :func:`quantize_v_int8`), P per element ``round(exp(s - m) * 255)`` with ``m`` the *final*
  row max (the kernels use the running max; the tests bound the difference), row sum from the
  unquantized exponentials.

Gradients: :func:`attention_reference` is differentiable. ``grad_mode="ste"`` uses a
straight-through sign (the gradient passes where ``|x| <= 1``), ``"hamming"`` treats the signs
as constants; ``pv_int8`` is straight-through over both quantizers (gradients of the exact
``P V``), which is what the backward kernels compute.

Also here: BinaryAttention's fake-quantization helpers :func:`fake_quant_p` and
:func:`fake_quant_v` (SPEC.md section 1) for quantization-aware training code.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "pack_sign_reference",
    "unpack_sign_reference",
    "sign_matmul_reference",
    "rel_pos_index",
    "quantize_v_int8",
    "attention_scores_reference",
    "attention_reference",
    "sign_ste",
    "fake_quant_p",
    "fake_quant_v",
]

_F64 = torch.float64


# --------------------------------------------------------------------------------- sign / bits
class _SignSTE(torch.autograd.Function):
    """sign(x) in {-1, +1} (x >= 0 and NaN -> +1) with the straight-through gradient 1{|x| <= 1}."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x < 0, -1.0, 1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` in {-1, +1} (``x >= 0`` and NaN give +1) with BinaryAttention's
    straight-through gradient: ``d sign(x) / dx = 1 if |x| <= 1 else 0``."""
    return _SignSTE.apply(x)


def _sign_constant(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.detach() < 0, -1.0, 1.0).to(_F64)


def pack_sign_reference(x: torch.Tensor) -> torch.Tensor:
    """int32 ``[..., ceil(d/32)]`` packed signs of ``x [..., d]`` (bit = 1 unless x < 0)."""
    d = x.shape[-1]
    words = (d + 31) // 32
    bits = (~(x < 0)).to(torch.int64)  # NaN < 0 is False: NaN -> 1
    bits = torch.nn.functional.pad(bits, (0, words * 32 - d))  # pad bits are 0
    bits = bits.reshape(*x.shape[:-1], words, 32)
    shifts = torch.arange(32, device=x.device, dtype=torch.int64)
    word = (bits << shifts).sum(-1)  # in [0, 2^32)
    word = torch.where(word >= 2**31, word - 2**32, word)  # reinterpret as int32
    return word.to(torch.int32)


def unpack_sign_reference(bits: torch.Tensor, d: int) -> torch.Tensor:
    """float64 ``[..., d]`` of +-1 from packed int32 bits ``[..., ceil(d/32)]``."""
    shifts = torch.arange(32, device=bits.device, dtype=torch.int64)
    words = bits.to(torch.int64) & 0xFFFFFFFF
    b = (words.unsqueeze(-1) >> shifts) & 1
    b = b.reshape(*bits.shape[:-1], bits.shape[-1] * 32)[..., :d]
    return b.to(_F64) * 2 - 1


def sign_matmul_reference(a_bits: torch.Tensor, b_bits: torch.Tensor, d: int) -> torch.Tensor:
    """int32 ``[..., M, N]`` = <sign a_m, sign b_n> over the first d bits (leading dims broadcast)."""
    a = unpack_sign_reference(a_bits, d)
    b = unpack_sign_reference(b_bits, d)
    return torch.matmul(a, b.transpose(-1, -2)).round().to(torch.int32)  # exact: |values| <= d


# ----------------------------------------------------------------------------------- rel-pos
def rel_pos_index(wh: int, ww: int, num_prefix_tokens: int = 0, device=None) -> torch.Tensor:
    """int64 ``[N, N]`` table index of every (query, key) pair, ``N = num_prefix_tokens + wh*ww``.

    Patches are numbered row-major after the cls token; for two patches at grid cells
    (y_i, x_i), (y_j, x_j): ``(y_i - y_j + wh - 1) * (2ww - 1) + (x_i - x_j + ww - 1)``; with a
    cls token, ``T-3`` for cls -> patch, ``T-2`` for patch -> cls, ``T-1`` for cls -> cls, where
    ``T = (2wh-1)(2ww-1)+3`` is the table size (SPEC.md section 1).
    """
    table_size = (2 * wh - 1) * (2 * ww - 1) + 3
    n = num_prefix_tokens + wh * ww
    tok = torch.arange(n, device=device)
    patch = (tok - num_prefix_tokens).clamp(min=0)
    y, x = patch // ww, patch % ww
    idx = (y[:, None] - y[None, :] + wh - 1) * (2 * ww - 1) + (x[:, None] - x[None, :] + ww - 1)
    is_cls = tok < num_prefix_tokens
    idx = torch.where(is_cls[:, None] & ~is_cls[None, :], table_size - 3, idx)
    idx = torch.where(~is_cls[:, None] & is_cls[None, :], table_size - 2, idx)
    idx = torch.where(is_cls[:, None] & is_cls[None, :], table_size - 1, idx)
    return idx


# ------------------------------------------------------------------------------------- pv_int8
def quantize_v_int8(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """V's int8 quantization for ``pv_int8``, step for step what the binding does.

    Per (b, h, channel) over the tokens, in fp32 torch ops: ``dq = amax_n |V| / 127``,
    ``V_q = round(V / dq)`` (half to even) in int8; an all-zero channel has ``dq = 0`` and
    ``V_q = 0``. Done in the same fp32 arithmetic as the binding so the int8 values are
    bit-identical (a float64 division could round a few ties the other way).

    Returns:
        ``(v_q, dq)``: int8 ``[B, H, N, Dv]`` and fp32 ``[B, H, Dv]``.
    """
    v32 = v.detach().to(torch.float32)
    dq = v32.abs().amax(dim=2).div(127.0)
    v_q = torch.nan_to_num(torch.round(v32.div(dq.unsqueeze(2))), 0.0, 127.0, -127.0).clamp(-127, 127)
    return v_q.to(torch.int8), dq


# ----------------------------------------------------------------------------------- attention
def _signs(x: torch.Tensor, d: int, grad_mode: str) -> torch.Tensor:
    if x.dtype == torch.int32:
        return unpack_sign_reference(x, d)  # prepacked bits: constants
    if grad_mode == "ste":
        return sign_ste(x.to(_F64))
    return _sign_constant(x)


def attention_scores_reference(
    q: torch.Tensor,
    k: torch.Tensor,
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
    grad_mode: str = "ste",
) -> torch.Tensor:
    """Float64 scores ``S [B, H, Nq, Nk]`` of :func:`attention_reference`, masked entries -inf."""
    if grad_mode not in ("ste", "hamming"):
        raise ValueError(f"grad_mode must be 'ste' or 'hamming', got {grad_mode!r}")
    B, H, Nq = q.shape[:3]
    Nk = k.shape[2]
    d = head_dim
    if d is None:
        d = q.shape[-1] if q.dtype != torch.int32 else k.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(d)

    dot = _signs(q, d, grad_mode) @ _signs(k, d, grad_mode).transpose(-1, -2)  # exact integers
    s = dot * scale
    if q_scale is not None:
        s = s * torch.broadcast_to(q_scale.to(_F64), (B, H, Nq)).unsqueeze(-1)
    if k_scale is not None:
        s = s * torch.broadcast_to(k_scale.to(_F64), (B, H, Nk)).unsqueeze(-2)
    if bias is not None:
        s = s + bias.to(_F64)
    if rel_pos_table is not None:
        wh, ww = rel_pos_grid
        idx = rel_pos_index(wh, ww, num_prefix_tokens, device=q.device)
        s = s + rel_pos_table.to(_F64)[:, idx]  # [H, N, N]
    if is_causal:
        future = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).triu(1)
        s = s.masked_fill(future, -math.inf)
    return s


def attention_reference(
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
    """Float64 reference of :func:`binformer.attention` (same arguments, no validation).

    Returns float64 ``out [B, H, Nq, Dv]`` (and float64 ``lse [B, H, Nq]`` with
    ``return_lse``), differentiable w.r.t. every floating input: q / k through the
    straight-through sign in ``"ste"`` mode (none in ``"hamming"`` mode), and v, q_scale,
    k_scale, bias, rel_pos_table exactly. lse is differentiable here too.
    """
    s = attention_scores_reference(
        q, k, q_scale=q_scale, k_scale=k_scale, bias=bias, rel_pos_table=rel_pos_table,
        rel_pos_grid=rel_pos_grid, num_prefix_tokens=num_prefix_tokens, head_dim=head_dim, scale=scale,
        is_causal=is_causal, grad_mode=grad_mode,
    )
    # Softmax with the fully-masked-row rule. The shift m is a constant for the gradient
    # (softmax does not depend on it); rows whose max is -inf use 0 so exp gives exact zeros.
    # A NaN score makes its row's max NaN, which then reaches out and lse (IEEE propagation).
    m = s.detach().amax(dim=-1, keepdim=True)
    fully_masked = m == -math.inf
    m = torch.where(fully_masked, 0.0, m)
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    l_safe = torch.where(fully_masked, 1.0, l)
    out = (e @ v.to(_F64)) / l_safe
    if pv_int8:
        v_q, dq = quantize_v_int8(v)
        p_q = torch.round(e.detach() * 255)  # uint8 steps of the final row max
        out_q = (p_q @ v_q.to(_F64)) * dq.to(_F64).unsqueeze(-2) / (255 * l_safe.detach())
        out = out + (out_q - out.detach())  # value of out_q, gradient of the exact P V
    if not return_lse:
        return out
    lse = torch.where(fully_masked, -math.inf, m + torch.log(l_safe)).squeeze(-1)
    return out, lse


# ------------------------------------------------------------- BinaryAttention fake quantization
def fake_quant_p(p: torch.Tensor) -> torch.Tensor:
    """BinaryAttention's 8-bit attention probabilities: ``clamp(round(P * 255), 0, 255) / 255``.

    Straight-through gradient (identity), as in quantization-aware training.
    """
    p_q = torch.clamp(torch.round(p * 255), 0, 255) / 255
    return p + (p_q - p).detach()


def fake_quant_v(v: torch.Tensor, token_dim: int = -2) -> torch.Tensor:
    """BinaryAttention's symmetric int8 V per (batch, head, channel): ``s = 127 / max_n |V|``,
    ``V_q = round(V * s) / s`` with the max over ``token_dim`` (the tokens of ``[B, H, N, Dv]``).

    An all-zero channel stays zero. Straight-through gradient (identity).
    """
    amax = v.detach().abs().amax(dim=token_dim, keepdim=True)
    s = 127 / torch.where(amax > 0, amax, torch.ones_like(amax))
    v_q = torch.where(amax > 0, torch.round(v.detach() * s) / s, torch.zeros_like(v))
    return v + (v_q - v.detach())
