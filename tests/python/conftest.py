"""Fixtures, input builders and the error model shared by the binformer op tests.

Every check compares a kernel result with the float64 reference (binformer.reference) of the
same binary math, element by element, against a tolerance derived below from how the kernels
compute (the "error model"). Nothing is compared against another kernel.

Error model of attention (per query row i, output channel c):

* The sign dot product is exact (an integer). Everything after it runs in fp32, unit roundoff
  u32 = 2^-24: the score ``s = scale*a_i*b_j*dot + bias + relpos`` and the shift ``s - m`` take
  a few roundings each, an absolute error <= ~8 u32 (1 + max_j |S_ij|) in the exponent, i.e. a
  relative error of that size in every ``exp(s - m)``; the fp32 exp itself (polynomial on CPU,
  ex2.approx with the log2(e) product on CUDA) adds <= ~8 u32. Hence the per-row term
  ``16 u32 (1 + max|S_i.|) + 16 u32``.
* The row sum l and the accumulator ``sum_j p_ij v_jc`` add N terms in fp32. The worst case is
  N u32, but rounding errors of such sums behave like independent zero-mean variables, and
  |error| <= lambda sqrt(N) u (Higham & Mary, SIAM J. Sci. Comput. 2019) holds with probability
  >= 1 - 2 exp(-lambda^2 / 2); lambda = 8 per sum (two sums) gives ``16 sqrt(N) u32``
  (failure probability ~1e-14 per element).
* Both are relative to the magnitude ``M_ic = sum_j P_ij |v_jc|`` (what the sum adds up), not to
  |out|, because out can cancel to ~0.
* If P is rounded to v's dtype for the P.V product (tensor cores; CPU BF16 dot products), each
  term gains a relative error u_v: ``+ u_v M_ic``. CUDA with fp32 V runs P.V as 3xTF32 (about
  2^-22 relative per product): ``+ 2^-20 M_ic``. On CPU fp32 V keeps fp32 P.
* The result is rounded once to out's dtype: ``+ u_out |out_ic|`` (plus half the subnormal
  spacing of that dtype, for results below its normal range; the same for gradients).
* pv_int8 (both quantizers, see attention_tolerances): each quantized probability differs from
  exp(s - m) by at most ``min(0.5/255, e_j)`` in units of the final row max, whichever running
  max the kernel used, and the reference quantizes with the final max: the two differ by at
  most ``min(1/255, 2 e_j)`` per element, i.e. ``Q_ic = sum_j min(1/255, 2 e_j) |dq_c V_q,jc| / l``.
  V's int8 values are bit-identical (the reference repeats the binding's fp32 quantizer).
* lse: ``|d lse| <= eps_row + u32 |lse|`` (m exact up to the score error, log l relative).

The backward adds nothing new: the same eps applied to the magnitudes of each term of the
gradient formulas (see grad_tolerances), plus out's rounding in ``D_i = dO_i . O_i``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from collections.abc import Sequence

import pytest
import torch

import binformer
from binformer import reference as ref

F64 = torch.float64
U32 = 2.0**-24
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}
# Rounding to a dtype errs by <= u |x| for normal numbers and by <= half the subnormal spacing
# below them (fp16 matters: its subnormals start at 6.1e-5, where small gradients live).
SUBNORMAL_HALF_SPACING = {torch.float32: 2.0**-150, torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134, torch.float64: 0.0}


def rounding_error(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bound of |round_to(dtype)(x) - x| for float64 values x."""
    return UNIT_ROUNDOFF[dtype] * x.abs() + SUBNORMAL_HALF_SPACING[dtype]
HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "bwd: needs the attention_bwd kernel of the device under test")
    config.addinivalue_line("markers", "slow: large problems (seconds each on 2 CPU cores)")


# ------------------------------------------------------------------------------- devices / ISAs
def _device_params(cuda: bool = True):
    params = [pytest.param(("cpu", "scalar"), id="cpu-scalar"), pytest.param(("cpu", "auto"), id="cpu-auto")]
    if cuda and HAS_CUDA:
        params.append(pytest.param(("cuda", None), id="cuda"))
    return params


@pytest.fixture(params=_device_params())
def device(request, monkeypatch):
    """"cpu" under each CPU ISA (BINFORMER_CPU_ISA=scalar|auto, read by the kernels at every
    call), and "cuda" when a GPU is present."""
    dev, isa = request.param
    if isa is not None:
        monkeypatch.setenv("BINFORMER_CPU_ISA", isa)
    return dev


@pytest.fixture(params=_device_params(cuda=False))
def cpu_device(request, monkeypatch):
    """"cpu" under each CPU ISA."""
    monkeypatch.setenv("BINFORMER_CPU_ISA", request.param[1])
    return "cpu"


@pytest.fixture(params=[pytest.param("cuda", id="cuda")])
def cuda_device(request):
    if not HAS_CUDA:
        pytest.skip("no CUDA device")
    return "cuda"


_BWD_STATUS: dict[tuple[str, str | None], str | None] = {}


def attention_bwd_status(device: str) -> str | None:
    """None when the attention_bwd kernel runs on this device (and CPU ISA), else the error."""
    key = (device, os.environ.get("BINFORMER_CPU_ISA"))
    if key not in _BWD_STATUS:
        try:
            # The most common configuration (d = Dv = 64), so that the probe fails only when
            # the backward is missing as a whole; per-configuration failures show in the tests.
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, 1, 16, 64, generator=g).to(device) for _ in range(3))
            out, lse = torch.ops.binformer.attention_fwd(q, k, v, None, None, None, None, 0, 0, 0, 64, 0.125, False, False)
            grads = torch.ops.binformer.attention_bwd(
                torch.ones_like(out), binformer.pack_sign(q), binformer.pack_sign(k), v, out, lse,
                None, None, None, None, 0, 0, 0, 64, 0.125, False, [True] * 6 + [False],
            )
            if device == "cuda":
                torch.cuda.synchronize()
            _BWD_STATUS[key] = None if all(g.numel() > 0 for g in grads[:6]) else "empty gradients"
        except Exception as e:  # noqa: BLE001 -- reported verbatim below
            _BWD_STATUS[key] = f"{type(e).__name__}: {e}"
    return _BWD_STATUS[key]


@pytest.fixture
def bwd_device(device):
    """`device`, after checking that its attention_bwd kernel exists and runs; otherwise the
    test errors with one clear line instead of a confusing failure deep in autograd."""
    err = attention_bwd_status(device)
    if err is not None:
        pytest.fail(f"attention_bwd kernel missing or failing on {device}: {err.splitlines()[0]}", pytrace=False)
    return device


# ------------------------------------------------------------------------------------- inputs
@dataclasses.dataclass(frozen=True)
class Case:
    """One attention problem. Optional inputs are named by their broadcast pattern:

    q_scale / k_scale: None, "head" [B,H,1] (BinaryAttention alpha), "token" [B,H,N]
        (BinaryFormer weights, either sign), "batch" [B,1,1], "shared" [1] (one number),
        "head_only" [H,1] (broadcast over the batch);
    bias: None, "full" [B,H,Nq,Nk], "heads" [H,Nq,Nk], "keys" [B,1,1,Nk] (a key-padding mask
        with -inf entries), "rows" [B,H,Nq,1] (constant along keys), "scalar" [] ;
    bias_dtype: None = the case's dtype;
    rel_pos: None or (Wh, Ww, num_prefix_tokens), which fixes Nq = Nk = prefix + Wh*Ww;
    q_bits / k_bits: pass the packed sign bits instead of the float tensor;
    strided: q, k, v are non-contiguous views of a fused [B, N, 3, H, d] projection.
    """

    B: int = 1
    H: int = 2
    Nq: int = 37
    Nk: int | None = None  # None: = Nq
    d: int = 64
    Dv: int | None = None  # None: = d
    dtype: torch.dtype = torch.float32
    q_bits: bool = False
    k_bits: bool = False
    q_scale: str | None = None
    k_scale: str | None = None
    bias: str | None = None
    bias_dtype: torch.dtype | None = None
    rel_pos: tuple[int, int, int] | None = None
    causal: bool = False
    pv_int8: bool = False
    scale: float | None = None
    strided: bool = False

    @property
    def nq(self) -> int:
        return self.rel_pos[2] + self.rel_pos[0] * self.rel_pos[1] if self.rel_pos else self.Nq

    @property
    def nk(self) -> int:
        return self.nq if self.rel_pos else (self.Nk if self.Nk is not None else self.Nq)

    @property
    def dv(self) -> int:
        return self.Dv if self.Dv is not None else self.d

    def __str__(self) -> str:
        parts = [f"B{self.B}H{self.H}Nq{self.nq}Nk{self.nk}d{self.d}Dv{self.dv}", str(self.dtype).split(".")[-1]]
        for f in dataclasses.fields(self):
            if f.name in ("B", "H", "Nq", "Nk", "d", "Dv", "dtype"):
                continue
            val = getattr(self, f.name)
            if val not in (None, False):
                parts.append(f.name if val is True else f"{f.name}={val}")
        return "-".join(str(p).replace(" ", "") for p in parts)


def _scale_tensor(pattern: str, B: int, H: int, N: int, g: torch.Generator) -> torch.Tensor:
    shape = {"head": (B, H, 1), "token": (B, H, N), "batch": (B, 1, 1), "shared": (1,), "head_only": (H, 1)}[pattern]
    if pattern == "token":  # BinaryFormer's per-token weights can have either sign
        return torch.rand(shape, generator=g) * 3 - 1.5
    return torch.rand(shape, generator=g) * 1.25 + 0.25  # magnitudes like mean|q|


def make_inputs(case: Case, device: str, seed: int = 0):
    """(q, k, v, kwargs) for binformer.attention / attention_reference, generated on the CPU
    from `seed` (the same values on every device) and moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    B, H, Nq, Nk, d, Dv = case.B, case.H, case.nq, case.nk, case.d, case.dv
    if case.strided:
        # Views of fused projections, as a ViT block produces them: strides (N*3*H*d, d, 3*H*d, 1).
        qkv = torch.randn(B, max(Nq, Nk), 3, H, d, generator=g).to(case.dtype)
        q = qkv[:, :Nq, 0].permute(0, 2, 1, 3)
        k = qkv[:, :Nk, 1].permute(0, 2, 1, 3)
        vsrc = torch.randn(B, Nk, 2, H, Dv, generator=g).to(case.dtype)
        v = vsrc[:, :, 1].permute(0, 2, 1, 3)
    else:
        q = torch.randn(B, H, Nq, d, generator=g).to(case.dtype)
        k = torch.randn(B, H, Nk, d, generator=g).to(case.dtype)
        v = torch.randn(B, H, Nk, Dv, generator=g).to(case.dtype)
    kwargs: dict = {}
    if case.q_bits:
        q = ref.pack_sign_reference(q)
    if case.k_bits:
        k = ref.pack_sign_reference(k)
    if case.q_bits and case.k_bits:
        kwargs["head_dim"] = d
    if case.q_scale:
        kwargs["q_scale"] = _scale_tensor(case.q_scale, B, H, Nq, g)
    if case.k_scale:
        kwargs["k_scale"] = _scale_tensor(case.k_scale, B, H, Nk, g)
    if case.bias:
        bdt = case.bias_dtype or case.dtype
        if case.bias == "keys":
            mask = torch.rand(B, 1, 1, Nk, generator=g) < 0.25
            mask[..., 0] = False  # keep one key per row
            bias = torch.zeros(B, 1, 1, Nk).masked_fill(mask, -math.inf)
        else:
            shape = {"full": (B, H, Nq, Nk), "heads": (H, Nq, Nk), "rows": (B, H, Nq, 1), "scalar": ()}[case.bias]
            bias = torch.randn(shape, generator=g)
        kwargs["bias"] = bias.to(bdt)
    if case.rel_pos:
        wh, ww, prefix = case.rel_pos
        kwargs["rel_pos_table"] = torch.randn(H, (2 * wh - 1) * (2 * ww - 1) + 3, generator=g) * 0.5
        kwargs["rel_pos_grid"] = (wh, ww)
        kwargs["num_prefix_tokens"] = prefix
    if case.causal:
        kwargs["is_causal"] = True
    if case.pv_int8:
        kwargs["pv_int8"] = True
    if case.scale is not None:
        kwargs["scale"] = case.scale
    to = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return to(q), to(k), to(v), {key: to(val) for key, val in kwargs.items()}


def random_case(seed: int) -> Case:
    """A random attention problem (sizes incl. odd ones, every optional input), reproducible."""
    r = random.Random(seed)
    dtype = r.choice([torch.float32, torch.float16, torch.bfloat16])
    d = r.choice([8, 16, 32, 64, 72, 96, 128, 256])
    dv = r.choice([d, d, 8, 24, 64, 136])
    if r.random() < 0.25:
        wh, ww = r.randint(1, 9), r.randint(1, 9)
        return Case(
            B=r.randint(1, 2), H=r.randint(1, 3), d=d, Dv=dv, dtype=dtype, rel_pos=(wh, ww, r.randint(0, 1)),
            q_scale=r.choice([None, "head", "token"]), k_scale=r.choice([None, "head", "token"]),
            bias=r.choice([None, None, "heads", "keys"]), causal=r.random() < 0.2, pv_int8=r.random() < 0.2,
            q_bits=r.random() < 0.15, k_bits=r.random() < 0.15,
        )
    nq = r.choice([1, 2, 7, 16, 33, 64, 97, 128, 200, 255, 383])
    nk = nq if r.random() < 0.4 else r.choice([1, 3, 31, 64, 65, 129, 256, 300, 511])
    return Case(
        B=r.randint(1, 2), H=r.randint(1, 3), Nq=nq, Nk=nk, d=d, Dv=dv, dtype=dtype,
        q_scale=r.choice([None, None, "head", "token", "batch"]), k_scale=r.choice([None, None, "head", "token"]),
        bias=r.choice([None, None, "full", "heads", "keys", "rows"]), causal=r.random() < 0.3,
        pv_int8=r.random() < 0.2, q_bits=r.random() < 0.15, k_bits=r.random() < 0.15, strided=r.random() < 0.2,
        scale=r.choice([None, None, None, 0.1, 0.5]),
    )


# -------------------------------------------------------------------------------- comparisons
def assert_within(actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor, name: str) -> None:
    """|actual - expected| <= tol elementwise (float64). Non-finite expected values must be
    matched exactly (NaN by NaN, +-inf by the same inf)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a = actual.detach().to(F64)
    e = expected.detach().to(F64)
    tol = torch.broadcast_to(tol.to(F64), e.shape)
    finite = torch.isfinite(e)
    same_nonfinite = (a == e) | (torch.isnan(a) & torch.isnan(e))
    err = (a - e).abs()
    ok = torch.where(finite, err <= tol, same_nonfinite)
    if bool(ok.all()):
        return
    bad = (~ok).nonzero()
    ratio = torch.where(finite & torch.isfinite(a), err / tol.clamp_min(1e-300), torch.full_like(err, math.inf))
    worst = tuple(int(i) for i in torch.unravel_index(ratio.argmax(), ratio.shape)) if ratio.numel() else ()
    first = tuple(int(i) for i in bad[0])
    raise AssertionError(
        f"{name}: {bad.shape[0]} of {e.numel()} elements outside the tolerance; first at {first}: got "
        f"{a[first].item():.9g}, expected {e[first].item():.9g}, tol {tol[first].item():.3g}; worst err/tol "
        f"{ratio[worst].item():.3g} at {worst}"
    )


def pv_operand_unit(device: str, v_dtype: torch.dtype) -> float:
    """Relative rounding of the P.V operands (see the module docstring)."""
    if v_dtype != torch.float32:
        return UNIT_ROUNDOFF[v_dtype]
    # CUDA runs fp32 P.V as 3xTF32 (P and V split into tf32 big + small parts, the small*small
    # product dropped): ~2^-22 relative per product; 2^-20 leaves a factor 4 for the splits'
    # own roundings. The CPU keeps fp32 P and V.
    return 2.0**-20 if device.startswith("cuda") else 0.0


def _fp32_row_eps(s: torch.Tensor, n_sum: int) -> torch.Tensor:
    """Per-row relative error of the fp32 softmax pipeline: [..., rows, 1]."""
    s_abs = torch.where(torch.isfinite(s), s.abs(), torch.zeros_like(s)).amax(dim=-1, keepdim=True)
    return U32 * (16 * (1 + s_abs) + 16 + 16 * math.sqrt(max(n_sum, 1)))


def _score_kwargs(kwargs: dict) -> dict:
    return {key: val for key, val in kwargs.items() if key not in ("pv_int8", "return_lse")}


def softmax_parts(q, k, kwargs):
    """Float64 (S, e = exp(S - m), l) of the reference, with the fully-masked-row rule."""
    s = ref.attention_scores_reference(q, k, **_score_kwargs(kwargs))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(m == -math.inf, torch.zeros_like(m), m)
    e = torch.exp(s - m)
    return s, e, e.sum(dim=-1, keepdim=True)


def attention_tolerances(q, k, v, kwargs, device: str):
    """(ref_out, ref_lse, tol_out, tol_lse): the float64 reference and the error model above."""
    with torch.no_grad():
        ref_out, ref_lse = ref.attention_reference(q, k, v, **kwargs, return_lse=True)
        s, e, l = softmax_parts(q, k, kwargs)
        l_safe = torch.where(l > 0, l, torch.ones_like(l))
        p = e / l_safe
        magnitude = p @ v.to(F64).abs()
        eps = _fp32_row_eps(s, k.shape[2])
        tol_out = rounding_error(ref_out, v.dtype) + (eps + pv_operand_unit(device, v.dtype)) * magnitude
        if kwargs.get("pv_int8"):
            v_q, dq = ref.quantize_v_int8(v)
            v_hat = (v_q.to(F64) * dq.to(F64).unsqueeze(2)).abs()
            quant = (torch.clamp(2 * e, max=1 / 255) @ v_hat) / l_safe
            tol_out = tol_out + quant * (1 + eps) + eps * (p @ v_hat)
        tol_lse = eps.squeeze(-1) + U32 * ref_lse.abs().nan_to_num(posinf=0.0, neginf=0.0)
    return ref_out, ref_lse, tol_out, tol_lse


# Float64 elements of one [b, H, Nq, Nk] score tensor per reference chunk: the reference keeps
# several of them alive, so this bounds its memory to a few GB even for the vision shapes (and
# several pytest-xdist workers may share one GPU).
REFERENCE_CHUNK_ELEMENTS = 2**25


def _batch_slice(t, b0: int, b1: int, batch: int, rank: int):
    """Rows b0:b1 of the batch dim of `t` if it has one (a full-rank tensor with a batch dim of
    size `batch` > 1), else `t` itself (it broadcasts over the batch)."""
    if isinstance(t, torch.Tensor) and t.dim() == rank and t.shape[0] == batch and batch > 1:
        return t[b0:b1]
    return t


def check_attention(q, k, v, kwargs, device: str, out=None, lse=None):
    """Run binformer.attention (unless out / lse are given) and compare with the reference,
    in chunks of the batch for big problems."""
    if out is None:
        out, lse = binformer.attention(q, k, v, **kwargs, return_lse=True)
    assert out.dtype == v.dtype and out.device == v.device
    assert lse.dtype == torch.float32 and lse.device == v.device
    B, H, Nq = q.shape[:3]
    assert out.shape == (B, H, Nq, v.shape[3]) and lse.shape == (B, H, Nq)
    step = max(1, REFERENCE_CHUNK_ELEMENTS // max(1, H * Nq * k.shape[2]))
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        kw = dict(kwargs)
        for name, rank in (("q_scale", 3), ("k_scale", 3), ("bias", 4)):
            if name in kw:
                kw[name] = _batch_slice(kw[name], b0, b1, B, rank)
        ref_out, ref_lse, tol_out, tol_lse = attention_tolerances(q[b0:b1], k[b0:b1], v[b0:b1], kw, device)
        where = f" (batch {b0}:{b1})" if step < B else ""
        assert_within(out[b0:b1], ref_out, tol_out, "out" + where)
        assert_within(lse[b0:b1], ref_lse, tol_lse, "lse" + where)
    return out, lse


def grad_tolerances(q, k, v, kwargs, dout, device: str) -> dict[str, torch.Tensor]:
    """Tolerances of the gradient of <dout, out> w.r.t. each floating input (float64 tensors of
    the inputs' shapes): the error model's eps applied to the magnitude of every term of

        dV = P^T dO,  dS = P (dP - D),  dP = dO V^T,  D_i = dO_i . O_i,
        d(a_i) = sum_j dS_ij scale b_j dot_ij,  d(b_j) = sum_i dS_ij scale a_i dot_ij,
        d(sign q_i) = sum_j dS_ij scale a_i b_j sign(k_j),  dbias = dS,  dtable[idx(i,j)] += dS_ij.

    D in the kernel comes from the stored out (rounded to v's dtype; quantized with pv_int8, while
    the reference's pv_int8 gradient is that of the exact P V), which adds |dO_i| . |O_i - O_i,exact|
    to every dS_ij / P_ij.
    """
    with torch.no_grad():
        B, H, Nq = q.shape[:3]
        Nk = k.shape[2]
        s, e, l = softmax_parts(q, k, kwargs)
        l_safe = torch.where(l > 0, l, torch.ones_like(l))
        p = e / l_safe
        v64, do = v.to(F64), dout.to(F64)
        out_exact = p @ v64
        eps = float(_fp32_row_eps(s, max(Nq, Nk)).max()) + pv_operand_unit(device, v.dtype) + UNIT_ROUNDOFF[v.dtype]
        d_abs = (do.abs() * out_exact.abs()).sum(-1, keepdim=True)
        ds_tol = eps * p * (do.abs() @ v64.abs().transpose(-1, -2) + d_abs)
        if kwargs.get("pv_int8"):
            # The kernel's D uses its quantized out; the reference differentiates the exact P V:
            # |out - O_exact| <= |out - O_q,ref| + |O_q,ref - O_exact| (kernel error + quantization).
            ref_out_q, _, tol_out, _ = attention_tolerances(q, k, v, kwargs, device)
            out_err = tol_out + (ref_out_q - out_exact).abs()
            ds_tol = ds_tol + p * (do.abs() * out_err).sum(-1, keepdim=True)

        d = kwargs.get("head_dim") or (q.shape[-1] if q.dtype != torch.int32 else k.shape[-1])
        scale = kwargs.get("scale") or 1 / math.sqrt(d)
        signs = lambda x: ref.unpack_sign_reference(x, d) if x.dtype == torch.int32 else torch.where(x < 0, -1.0, 1.0).to(F64)  # noqa: E731
        dot_abs = (signs(q) @ signs(k).transpose(-1, -2)).abs()
        a = torch.broadcast_to(kwargs["q_scale"].to(F64), (B, H, Nq)) if "q_scale" in kwargs else torch.ones(B, H, Nq, dtype=F64, device=q.device)
        b = torch.broadcast_to(kwargs["k_scale"].to(F64), (B, H, Nk)) if "k_scale" in kwargs else torch.ones(B, H, Nk, dtype=F64, device=q.device)
        a_abs, b_abs = a.abs().unsqueeze(-1), b.abs().unsqueeze(-2)

        # The tensor-core backward rounds P (for dV) and dS * column scalar (for the sign gradients)
        # to v's dtype, as FlashAttention does: below fp16's normal range (6.1e-5) that rounding is
        # absolute, half a subnormal spacing per term, which the relative eps above does not cover
        # (it decides dV of keys that no query attends to much).
        sub = SUBNORMAL_HALF_SPACING[v.dtype] if v.dtype != torch.float32 else 0.0
        tol = {"v": eps * (p.transpose(-1, -2) @ do.abs()) + sub * do.abs().sum(-2, keepdim=True)}
        if "q_scale" in kwargs:
            tol["q_scale"] = (ds_tol * scale * b_abs * dot_abs).sum(-1).sum_to_size(kwargs["q_scale"].shape)
        if "k_scale" in kwargs:
            tol["k_scale"] = (ds_tol * scale * a_abs * dot_abs).sum(-2).sum_to_size(kwargs["k_scale"].shape)
        w = ds_tol * scale * a_abs * b_abs
        tol["q"] = (w.sum(-1, keepdim=True) + sub * Nk * scale * a_abs).expand(B, H, Nq, d)
        tol["k"] = (w.sum(-2).unsqueeze(-1) + sub * Nq * scale * b_abs.transpose(-1, -2)).expand(B, H, Nk, d)
        if "bias" in kwargs:
            tol["bias"] = ds_tol.sum_to_size(kwargs["bias"].shape)
        if "rel_pos_table" in kwargs:
            wh, ww = kwargs["rel_pos_grid"]
            idx = ref.rel_pos_index(wh, ww, kwargs.get("num_prefix_tokens", 0), device=q.device)
            table = torch.zeros_like(kwargs["rel_pos_table"], dtype=F64)
            tol["rel_pos_table"] = table.index_add(1, idx.flatten(), ds_tol.sum(0).reshape(H, -1))
    return tol


def assert_grads_match(grads: dict, ref_grads: dict, tols: dict) -> None:
    """Compare kernel gradients with the reference's; None must match None."""
    for name, g in grads.items():
        r = ref_grads[name]
        if r is None or g is None:
            assert g is None and r is None, f"d{name}: got {'None' if g is None else 'a tensor'}, reference " \
                                            f"{'None' if r is None else 'a tensor'}"
            continue
        tol = tols[name] + rounding_error(r.detach(), g.dtype)
        assert_within(g, r, tol, f"d{name}")


def words_for(d: int) -> int:
    return (d + 31) // 32


def randn(shape: Sequence[int], dtype=torch.float32, device="cpu", seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=g).to(dtype).to(device)
