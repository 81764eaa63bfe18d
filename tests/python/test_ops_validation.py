"""Bad inputs: every one raises a clear exception that names the argument.

The Python wrappers raise TypeError (wrong type / dtype) or ValueError (wrong shape, device,
layout, value); the compiled ops, called directly, raise RuntimeError from TORCH_CHECK with the
argument's name too.
"""

from __future__ import annotations

import math

import pytest
import torch

import binformer
from conftest import HAS_CUDA, randn


def _base(**over):
    g = torch.Generator().manual_seed(0)
    args = dict(
        q=torch.randn(2, 2, 8, 64, generator=g),
        k=torch.randn(2, 2, 8, 64, generator=g),
        v=torch.randn(2, 2, 8, 32, generator=g),
    )
    args.update(over)
    return args


def _call(**over):
    a = _base(**{key: val for key, val in over.items() if key in ("q", "k", "v")})
    kwargs = {key: val for key, val in over.items() if key not in ("q", "k", "v")}
    return binformer.attention(a["q"], a["k"], a["v"], **kwargs)


def _bits(rows: int, words: int) -> torch.Tensor:
    return torch.zeros(2, 2, rows, words, dtype=torch.int32)


def _grid_table(H=2, wh=2, ww=3):
    return torch.randn(H, (2 * wh - 1) * (2 * ww - 1) + 3)


META = torch.device("meta")
BAD_ATTENTION = {
    # type / dtype
    "q_not_tensor": (dict(q=[[1.0]]), TypeError, r"^q must be a torch\.Tensor"),
    "q_float64": (dict(q=torch.randn(2, 2, 8, 64, dtype=torch.float64)), TypeError, r"^q must have dtype"),
    "k_int64": (dict(k=torch.zeros(2, 2, 8, 64, dtype=torch.int64)), TypeError, r"^k must have dtype"),
    "v_int32": (dict(v=torch.zeros(2, 2, 8, 32, dtype=torch.int32)), TypeError, r"^v must have dtype"),
    "v_bits_like": (dict(v=torch.zeros(2, 2, 8, 2, dtype=torch.int32)), TypeError, r"^v must have dtype"),
    # device
    "k_other_device": (dict(k=torch.empty(2, 2, 8, 64, device=META)), ValueError, r"^k is on meta but q is on cpu"),
    "v_other_device": (dict(v=torch.empty(2, 2, 8, 32, device=META)), ValueError, r"^v is on meta"),
    "q_scale_other_device": (dict(q_scale=torch.ones(2, 2, 1, device=META)), ValueError, r"^q_scale is on meta"),
    "bias_other_device": (dict(bias=torch.zeros(8, 8, device=META)), ValueError, r"^bias is on meta"),
    # rank / shapes
    "q_rank3": (dict(q=torch.randn(2, 8, 64)), ValueError, r"^q must be 4-D"),
    "v_rank5": (dict(v=torch.randn(1, 2, 2, 8, 32)), ValueError, r"^v must be 4-D"),
    "k_batch": (dict(k=torch.randn(3, 2, 8, 64)), ValueError, r"^k must have the \[B, H\]"),
    "k_heads": (dict(k=torch.randn(2, 1, 8, 64)), ValueError, r"^k must have the \[B, H\]"),
    "v_tokens": (dict(v=torch.randn(2, 2, 9, 32)), ValueError, r"^v must be \[B, H, Nk, Dv\]"),
    "k_head_dim_differs": (dict(k=torch.randn(2, 2, 8, 32)), ValueError, r"head_dim = 64 does not match the last dim of the float k"),
    # head dims
    "d_not_multiple_of_8": (dict(q=torch.randn(2, 2, 8, 60), k=torch.randn(2, 2, 8, 60)), ValueError, r"^head_dim .* multiple of 8"),
    "d_too_big": (dict(q=torch.randn(2, 2, 8, 264), k=torch.randn(2, 2, 8, 264)), ValueError, r"^head_dim .* got 264"),
    "d_zero": (dict(q=torch.randn(2, 2, 8, 0), k=torch.randn(2, 2, 8, 0)), ValueError, r"^head_dim .* got 0"),
    "dv_not_multiple_of_8": (dict(v=torch.randn(2, 2, 8, 12)), ValueError, r"^Dv .* got 12"),
    "dv_too_big": (dict(v=torch.randn(2, 2, 8, 264)), ValueError, r"^Dv .* got 264"),
    "head_dim_mismatch": (dict(head_dim=32), ValueError, r"^head_dim = 32 does not match the last dim of the float q"),
    "head_dim_float": (dict(head_dim=64.0), TypeError, r"^head_dim must be an int"),
    # packed bits
    "bits_without_head_dim": (dict(q=_bits(8, 2), k=_bits(8, 2)), ValueError, r"^head_dim is required"),
    "q_bits_wrong_width": (dict(q=_bits(8, 3)), ValueError, r"^q holds packed sign bits .* ceil\(head_dim / 32\) = 2"),
    "k_bits_wrong_width": (dict(q=_bits(8, 1), k=_bits(8, 1), head_dim=64), ValueError, r"^q holds packed sign bits"),
    "k_bits_wrong_width_float_q": (dict(k=_bits(8, 1)), ValueError, r"^k holds packed sign bits"),
    # layout
    "q_last_dim_strided": (dict(q=torch.randn(2, 2, 64, 8).transpose(-1, -2)), ValueError, r"^the last dim of q must be contiguous"),
    "k_last_dim_strided": (dict(k=torch.randn(2, 2, 128, 8)[:, :, ::2].transpose(-1, -2)), ValueError, r"^the last dim of k must be contiguous"),
    "v_last_dim_strided": (dict(v=torch.randn(2, 2, 64, 8)[:, :, ::2].transpose(-1, -2)), ValueError, r"^the last dim of v must be contiguous"),
    "bias_last_dim_strided": (dict(bias=torch.randn(8, 8).t()), ValueError, r"^the last dim of bias must be contiguous"),
    # scales
    "q_scale_shape": (dict(q_scale=torch.ones(2, 2, 7)), ValueError, r"^q_scale of shape \(2, 2, 7\) does not broadcast to \[B, H, Nq\]"),
    "k_scale_rank4": (dict(k_scale=torch.ones(2, 2, 8, 1)), ValueError, r"^k_scale of shape .* does not broadcast to \[B, H, Nk\]"),
    "q_scale_int": (dict(q_scale=torch.ones(2, 2, 1, dtype=torch.int32)), TypeError, r"^q_scale must be a floating-point tensor"),
    "q_scale_number": (dict(q_scale=1.5), TypeError, r"^q_scale must be a torch\.Tensor"),
    "q_scale_nan": (dict(q_scale=torch.tensor([[[math.nan]], [[1.0]]])), ValueError, r"^q_scale must be finite"),
    "k_scale_inf": (dict(k_scale=torch.full((2, 2, 8), math.inf)), ValueError, r"^k_scale must be finite"),
    # bias
    "bias_shape": (dict(bias=torch.zeros(2, 2, 8, 7)), ValueError, r"^bias of shape \(2, 2, 8, 7\) does not broadcast to \[B, H, Nq, Nk\]"),
    "bias_rank5": (dict(bias=torch.zeros(1, 2, 2, 8, 8)), ValueError, r"^bias of shape"),
    "bias_float64": (dict(bias=torch.zeros(8, 8, dtype=torch.float64)), TypeError, r"^bias must have dtype"),
    "bias_bool": (dict(bias=torch.zeros(8, 8, dtype=torch.bool)), TypeError, r"^bias must have dtype"),
    # rel-pos
    "table_without_grid": (dict(rel_pos_table=_grid_table()), ValueError, r"^rel_pos_table needs rel_pos_grid"),
    "grid_without_table": (dict(rel_pos_grid=(2, 4)), ValueError, r"^rel_pos_grid is given but rel_pos_table is None"),
    "grid_not_pair": (dict(rel_pos_table=_grid_table(), rel_pos_grid=(2, 4, 1)), TypeError, r"^rel_pos_grid must be a pair"),
    "grid_floats": (dict(rel_pos_table=_grid_table(), rel_pos_grid=(2.0, 4.0)), TypeError, r"^rel_pos_grid must be a pair of ints"),
    "grid_zero": (dict(rel_pos_table=_grid_table(), rel_pos_grid=(0, 8)), ValueError, r"^rel_pos_grid must be positive"),
    "table_shape": (dict(rel_pos_table=_grid_table(ww=3), rel_pos_grid=(2, 4)), ValueError, r"^rel_pos_table must be \[H, \(2\*Wh-1\)\*\(2\*Ww-1\)\+3\] = \[2, 24\]"),
    "table_heads": (dict(rel_pos_table=_grid_table(H=3, ww=4), rel_pos_grid=(2, 4)), ValueError, r"^rel_pos_table must be"),
    "table_grid_vs_tokens": (dict(rel_pos_table=_grid_table(), rel_pos_grid=(2, 3)), ValueError, r"^rel_pos_table needs Nq == Nk == num_prefix_tokens \+ Wh\*Ww = 6"),
    "table_grid_vs_prefix": (dict(rel_pos_table=_grid_table(ww=4), rel_pos_grid=(2, 4), num_prefix_tokens=1), ValueError, r"^rel_pos_table needs Nq == Nk == num_prefix_tokens \+ Wh\*Ww = 9"),
    "table_int": (dict(rel_pos_table=torch.zeros(2, 24, dtype=torch.int64), rel_pos_grid=(2, 4)), TypeError, r"^rel_pos_table must be a floating-point"),
    "table_nan": (dict(rel_pos_table=_grid_table(ww=4).index_fill(1, torch.tensor([5]), math.nan), rel_pos_grid=(2, 4)), ValueError, r"^rel_pos_table must be finite"),
    "prefix_2": (dict(rel_pos_table=_grid_table(ww=4), rel_pos_grid=(2, 4), num_prefix_tokens=2), ValueError, r"^num_prefix_tokens must be 0 or 1"),
    "prefix_without_table": (dict(num_prefix_tokens=1), ValueError, r"^num_prefix_tokens only applies with rel_pos_table"),
    "prefix_bool": (dict(num_prefix_tokens=True), TypeError, r"^num_prefix_tokens must be an int"),
    # scalars
    "scale_nan": (dict(scale=math.nan), ValueError, r"^scale must be finite"),
    "scale_inf": (dict(scale=-math.inf), ValueError, r"^scale must be finite"),
    "scale_tensor": (dict(scale=torch.tensor(0.1)), TypeError, r"^scale must be a Python float"),
    "is_causal_str": (dict(is_causal="yes"), TypeError, r"^is_causal must be a bool"),
    "pv_int8_int": (dict(pv_int8=1), TypeError, r"^pv_int8 must be a bool"),
    "return_lse_none": (dict(return_lse=None), TypeError, r"^return_lse must be a bool"),
    "grad_mode": (dict(grad_mode="sign"), ValueError, r"^grad_mode must be one of \('ste', 'hamming'\), got 'sign'"),
}


@pytest.mark.parametrize("name", list(BAD_ATTENTION))
def test_attention_bad_input(name):
    over, exc, pattern = BAD_ATTENTION[name]
    with pytest.raises(exc, match=pattern):
        _call(**over)


def test_attention_accepts_the_boundaries():
    """The limits themselves are valid: d = 8 and 256, Dv = 8 and 256, size-1 broadcasts, a bias
    constant along keys (last dim 1), bits of the right width, a 0-d bias."""
    _call(q=torch.randn(1, 1, 3, 8), k=torch.randn(1, 1, 5, 8), v=torch.randn(1, 1, 5, 256))
    _call(q=torch.randn(1, 1, 3, 256), k=torch.randn(1, 1, 5, 256), v=torch.randn(1, 1, 5, 8))
    _call(bias=torch.zeros(2, 1, 8, 1), q_scale=torch.ones(1), k_scale=torch.ones(2, 1, 1))
    _call(bias=torch.tensor(0.5))
    _call(q=_bits(8, 2), k=_bits(8, 2), head_dim=64)
    _call(q=_bits(8, 2), head_dim=64)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_attention_cpu_cuda_mix():
    q, k, v = (randn((1, 2, 8, 64), device="cuda") for _ in range(3))
    with pytest.raises(ValueError, match=r"^k is on cpu but q is on cuda"):
        binformer.attention(q, k.cpu(), v)
    with pytest.raises(ValueError, match=r"^rel_pos_table is on cpu"):
        binformer.attention(q, k, v, rel_pos_table=torch.zeros(2, 18), rel_pos_grid=(2, 4))
    with pytest.raises(ValueError, match=r"^b_bits is on cpu but a_bits is on cuda"):
        binformer.sign_matmul(binformer.pack_sign(q), binformer.pack_sign(k).cpu(), 64)
    # the compiled op (CUDA impl) checks devices too
    with pytest.raises(RuntimeError, match=r"k is on cpu but q is on cuda"):
        torch.ops.binformer.attention_fwd(q, k.cpu(), v, None, None, None, None, 0, 0, 0, 64, 0.125, False, False)
    with pytest.raises(RuntimeError, match=r"q_scale is on cpu but q is on cuda"):
        torch.ops.binformer.attention_fwd(q, k, v, torch.ones(1), None, None, None, 0, 0, 0, 64, 0.125, False, False)


def test_finiteness_checks_are_skipped_while_compiling():
    """Under torch.compile the data-dependent finiteness checks are skipped (no graph break);
    a non-finite q_scale then propagates (IEEE) instead of raising."""
    torch._dynamo.reset()
    a = _base()
    f = torch.compile(lambda q, k, v, s: binformer.attention(q, k, v, q_scale=s), fullgraph=True, backend="aot_eager")
    out = f(a["q"], a["k"], a["v"], torch.tensor([[[math.nan]], [[1.0]]]))
    assert out[0].isnan().all() and torch.isfinite(out[1]).all()


# -------------------------------------------------------------------------- pack_sign / sign_matmul
@pytest.mark.parametrize(
    "x,exc,pattern",
    [
        ([1.0, -1.0], TypeError, r"^x must be a torch\.Tensor"),
        (torch.zeros(4, 8, dtype=torch.int32), TypeError, r"^x must have dtype float32, float16, bfloat16"),
        (torch.zeros(4, 8, dtype=torch.float64), TypeError, r"^x must have dtype"),
        (torch.tensor(1.0), ValueError, r"^x must have at least one dim"),
        (torch.zeros(4, 0), ValueError, r"^the last dim of x must be >= 1"),
    ],
)
def test_pack_sign_bad_input(x, exc, pattern):
    with pytest.raises(exc, match=pattern):
        binformer.pack_sign(x)


_A = torch.zeros(3, 5, 2, dtype=torch.int32)
_B = torch.zeros(3, 4, 2, dtype=torch.int32)


@pytest.mark.parametrize(
    "a,b,d,exc,pattern",
    [
        (torch.zeros(3, 5, 2), _B, 64, TypeError, r"^a_bits must have dtype int32"),
        (_A, _B.to(torch.int64), 64, TypeError, r"^b_bits must have dtype int32"),
        (_A, _B, 65, ValueError, r"^a_bits holds packed sign bits .* = 3 for head_dim = 65"),
        (_A, torch.zeros(3, 4, 1, dtype=torch.int32), 64, ValueError, r"^b_bits holds packed sign bits"),
        (_A, _B, 0, ValueError, r"^d must be >= 1"),
        (_A, _B, 64.0, TypeError, r"^d must be an int"),
        (torch.zeros(2, dtype=torch.int32), _B, 64, ValueError, r"^a_bits must be \[\.\.\., M, W\]"),
        (_A, torch.zeros(2, 4, 2, dtype=torch.int32), 64, ValueError, r"^the leading \(batch\) dims of a_bits \(3,\) and b_bits \(2,\) do not broadcast"),
        (_A, _B.to(META), 64, ValueError, r"^b_bits is on meta but a_bits is on cpu"),
    ],
)
def test_sign_matmul_bad_input(a, b, d, exc, pattern):
    with pytest.raises(exc, match=pattern):
        binformer.sign_matmul(a, b, d)


# -------------------------------------------------------------------- the compiled ops, directly
def _fwd(**over):
    a = dict(_base(), q_scale=None, k_scale=None, bias=None, rel_pos_table=None, wh=0, ww=0, prefix=0, head_dim=64,
             scale=0.125, causal=False, pv_int8=False, grad_mode="ste")
    a.update(over)
    return torch.ops.binformer.attention_fwd(
        a["q"], a["k"], a["v"], a["q_scale"], a["k_scale"], a["bias"], a["rel_pos_table"], a["wh"], a["ww"], a["prefix"],
        a["head_dim"], a["scale"], a["causal"], a["pv_int8"], a["grad_mode"],
    )


@pytest.mark.parametrize(
    "over,pattern",
    [
        (dict(q=torch.randn(2, 2, 8, 64, dtype=torch.float64)), r"q must be fp32, fp16, bf16 or int32"),
        (dict(v=torch.randn(2, 2, 8, 30)), r"the last dim of v \(Dv\) must be a multiple of 8"),
        (dict(q=_bits(8, 3), k=_bits(8, 3)), r"q holds packed sign bits, so its last dim must be ceil\(head_dim / 32\) = 2"),
        (dict(q=_bits(8, 2), k=_bits(8, 2), head_dim=0), r"head_dim is required"),
        (dict(head_dim=32), r"head_dim = 32 does not match the last dim of the float q"),
        (dict(q_scale=torch.ones(3, 1, 1)), r"q_scale of shape \[3, 1, 1\] does not broadcast to \[B, H, Nq\]"),
        (dict(bias=torch.zeros(2, 2, 8, 8, dtype=torch.float64)), r"bias must be fp32, fp16 or bf16"),
        (dict(bias=torch.zeros(5, 8)), r"bias of shape \[5, 8\] does not broadcast"),
        (dict(rel_pos_table=torch.zeros(2, 18), wh=2, ww=4), r"rel_pos_table must be \[H, \(2\*Wh-1\)\*\(2\*Ww-1\)\+3\] = \[2, 24\]"),
        (dict(rel_pos_table=torch.zeros(2, 18), wh=2, ww=3), r"rel_pos_table needs Nq == Nk == num_prefix_tokens \+ Wh\*Ww = 6"),
        (dict(rel_pos_table=torch.zeros(2, 18), wh=0, ww=3), r"rel_pos_wh and rel_pos_ww .* must be positive"),
        (dict(prefix=1), r"num_prefix_tokens only applies to rel_pos_table"),
        (dict(scale=math.inf), r"scale must be finite"),
        (dict(grad_mode="exact"), r"grad_mode must be \"ste\" or \"hamming\""),
        (dict(v=torch.randn(2, 2, 64, 8).transpose(-1, -2)), r"the last dim of v must be contiguous"),
    ],
)
def test_compiled_attention_fwd_checks(over, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        _fwd(**over)


def test_compiled_attention_bwd_checks():
    a = _base()
    out, lse = _fwd()
    qb, kb = binformer.pack_sign(a["q"]), binformer.pack_sign(a["k"])

    def bwd(**over):
        x = dict(dout=torch.ones_like(out), q_bits=qb, k_bits=kb, v=a["v"], out=out, lse=lse, table=None, head_dim=64,
                 mask=[True] * 6 + [False])
        x.update(over)
        return torch.ops.binformer.attention_bwd(
            x["dout"], x["q_bits"], x["k_bits"], x["v"], x["out"], x["lse"], None, None, None, x["table"], 0, 0, 0,
            x["head_dim"], 0.125, False, x["mask"],
        )

    with pytest.raises(RuntimeError, match=r"q_bits must be int32 packed sign bits"):
        bwd(q_bits=a["q"])
    with pytest.raises(RuntimeError, match=r"dout must have v's dtype"):
        bwd(dout=torch.ones_like(out, dtype=torch.float16))
    with pytest.raises(RuntimeError, match=r"lse must be fp32"):
        bwd(lse=lse.double())
    with pytest.raises(RuntimeError, match=r"lse must be \[B, H, Nq\]"):
        bwd(lse=lse[:, :, :4])
    with pytest.raises(RuntimeError, match=r"head_dim is required"):
        bwd(head_dim=0)
    with pytest.raises(RuntimeError, match=r"q_bits holds packed sign bits"):
        bwd(head_dim=32)
    with pytest.raises(RuntimeError, match=r"k_bits holds packed sign bits"):
        bwd(k_bits=kb[..., :1].contiguous())
    with pytest.raises(RuntimeError, match=r"output_mask asks for drel_pos_table but rel_pos_table is absent"):
        bwd(mask=[False] * 6 + [True])
    with pytest.raises(RuntimeError, match=r"out must be \[B, H, Nq, Dv\]"):
        bwd(out=out[:, :, :5])
