"""binformer's ops against the float64 / exact-integer reference.

pack_sign and sign_matmul are exact (bit-identical to the reference). attention is compared
element by element within the error model of conftest.py. Every test runs on the CPU under both
ISAs (BINFORMER_CPU_ISA=scalar and auto) and on CUDA when a GPU is present.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import binformer
from binformer import reference as ref
from conftest import HAS_CUDA, Case, check_attention, make_inputs, random_case, randn, words_for

FLOATS = [torch.float32, torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------------- pack_sign
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", [(1, 8), (3, 31), (2, 5, 32), (7, 33), (4, 64), (2, 3, 72), (5, 100), (3, 256), (2, 1000), (0, 64), (4, 0, 3, 40)])
def test_pack_sign(device, shape, dtype):
    x = randn(shape, dtype, device, seed=sum(shape))
    out = binformer.pack_sign(x)
    assert out.dtype == torch.int32 and out.device == x.device
    assert out.shape == (*shape[:-1], words_for(shape[-1]))
    assert torch.equal(out.cpu(), ref.pack_sign_reference(x.cpu()))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_pack_sign_special_values(device, dtype):
    """+0, -0, NaN -> bit 1; -inf, negative subnormal-ish -> 0; +inf -> 1."""
    specials = [0.0, -0.0, math.nan, -math.nan, math.inf, -math.inf, -1e-30, 1e-30, -1.0, 1.0]
    x = randn((3, 40), dtype, device, seed=1)
    x[0, : len(specials)] = torch.tensor(specials, dtype=dtype)
    x[1, 30:40] = torch.tensor(specials, dtype=dtype)  # across the word boundary
    assert torch.equal(binformer.pack_sign(x).cpu(), ref.pack_sign_reference(x.cpu()))


def test_pack_sign_strided_input(device):
    base = randn((6, 4, 80), torch.float32, device, seed=2)
    x = base.transpose(0, 1)[:, ::2, :70]  # non-contiguous in every dim but the last
    assert torch.equal(binformer.pack_sign(x).cpu(), ref.pack_sign_reference(x.cpu()))
    y = base.transpose(-1, -2)  # non-contiguous last dim: packed correctly too (copied first)
    assert torch.equal(binformer.pack_sign(y).cpu(), ref.pack_sign_reference(y.cpu()))


# --------------------------------------------------------------------------------- sign_matmul
@pytest.mark.parametrize(
    "a_rows,b_rows,d",  # shapes without the packed dim: [..., M], [..., N]
    [
        ((5,), (7,), 8),
        ((1,), (1,), 1),
        ((3, 17), (3, 13), 33),
        ((2, 4, 64), (2, 4, 40), 64),
        ((2, 1, 9), (1, 3, 11), 72),  # batch dims broadcast both ways
        ((4, 33), (50,), 128),  # b broadcast over a's batch
        ((130,), (2, 3, 129), 256),
        ((2, 0), (2, 5), 64),
        ((1, 200), (1, 300), 20),
    ],
)
def test_sign_matmul(device, a_rows, b_rows, d):
    g = torch.Generator().manual_seed(d)
    a = ref.pack_sign_reference(torch.randn(*a_rows, d, generator=g)).to(device)
    b = ref.pack_sign_reference(torch.randn(*b_rows, d, generator=g)).to(device)
    out = binformer.sign_matmul(a, b, d)
    expected = ref.sign_matmul_reference(a.cpu(), b.cpu(), d)
    assert out.dtype == torch.int32 and out.shape == expected.shape
    assert torch.equal(out.cpu(), expected)


def test_sign_matmul_extremes(device):
    """All-equal and all-opposite rows give +-d exactly; pack_sign output round-trips."""
    d = 200
    x = torch.ones(2, 3, d, device=device)
    bits_pos, bits_neg = binformer.pack_sign(x), binformer.pack_sign(-x)
    assert (binformer.sign_matmul(bits_pos, bits_pos, d) == d).all()
    assert (binformer.sign_matmul(bits_pos, bits_neg, d) == -d).all()


def test_sign_matmul_strided_bits(device):
    d = 96
    g = torch.Generator().manual_seed(3)
    a = ref.pack_sign_reference(torch.randn(4, 2, 30, d, generator=g)).to(device).transpose(0, 1)
    b = ref.pack_sign_reference(torch.randn(2, 4, 20, d, generator=g)).to(device)[:, :, ::2]
    assert torch.equal(binformer.sign_matmul(a, b, d).cpu(), ref.sign_matmul_reference(a.cpu(), b.cpu(), d))


# ------------------------------------------------------------------------------ attention: features
FEATURE_CASES = [
    Case(),
    Case(Nq=1, Nk=1, d=8, Dv=8),
    Case(B=2, H=3, Nq=33, Nk=65, d=32, Dv=16),
    Case(Nq=65, Nk=7, d=72, Dv=40),
    Case(Nq=130, d=128, Dv=256, H=1),
    Case(Nq=50, Nk=70, d=256, Dv=24),
    Case(Nq=40, d=8, Dv=64, dtype=torch.float16),
    Case(Nq=41, Nk=77, d=72, Dv=72, dtype=torch.bfloat16),
    Case(B=2, Nq=29, Nk=31, q_scale="head", k_scale="head"),
    Case(B=2, Nq=29, Nk=31, q_scale="token", k_scale="token", dtype=torch.float16),
    Case(B=2, Nq=19, q_scale="batch", k_scale="shared"),
    Case(B=2, H=3, Nq=19, q_scale="head_only", k_scale="token"),
    Case(B=2, H=2, Nq=23, Nk=45, bias="full"),
    Case(B=2, H=2, Nq=23, Nk=45, bias="heads", dtype=torch.bfloat16),
    Case(B=2, H=2, Nq=23, Nk=45, bias="keys"),
    Case(B=2, H=2, Nq=23, Nk=45, bias="rows"),
    Case(B=2, H=2, Nq=23, Nk=45, bias="scalar", dtype=torch.float16),
    Case(B=2, H=2, Nq=23, Nk=45, bias="full", bias_dtype=torch.float32, dtype=torch.float16),
    Case(H=3, rel_pos=(4, 5, 0)),
    Case(B=2, H=3, rel_pos=(5, 4, 1), q_scale="head", k_scale="head", dtype=torch.bfloat16),
    Case(H=2, rel_pos=(7, 7, 1), bias="heads", d=64),
    Case(Nq=45, causal=True),
    Case(Nq=45, Nk=20, causal=True),  # more queries than keys: top-left alignment
    Case(Nq=20, Nk=77, causal=True, dtype=torch.float16),
    Case(Nq=67, causal=True, q_scale="token", k_scale="head", bias="full"),
    Case(Nq=37, Nk=51, pv_int8=True),
    Case(B=2, Nq=70, pv_int8=True, causal=True, dtype=torch.float16, q_scale="head", k_scale="head"),
    Case(H=3, rel_pos=(4, 4, 1), pv_int8=True, dtype=torch.bfloat16),
    Case(Nq=33, Nk=47, q_bits=True, k_bits=True, d=72),
    Case(Nq=33, Nk=47, k_bits=True, d=40, Dv=16),  # float q, prepacked k
    Case(Nq=33, Nk=47, q_bits=True, d=256, dtype=torch.bfloat16),
    Case(B=2, H=3, Nq=31, Nk=45, strided=True),
    Case(B=2, H=3, Nq=31, Nk=45, strided=True, dtype=torch.float16, causal=True, bias="keys"),
    # fp16/bf16 views of fused projections on the bounded kernels: on sm_90 the key tiles come through
    # V's tensor map with these strides (Dv 64, with and without rel-pos; 128 and 72 once launch.h
    # takes their TMA tiles), or the per-thread copies where the TMA cannot address V
    Case(B=2, H=3, Nq=70, Nk=300, strided=True, dtype=torch.float16, q_scale="head", k_scale="head"),
    Case(B=2, H=2, Nq=40, Nk=150, d=128, Dv=128, strided=True, dtype=torch.bfloat16, causal=True),
    Case(H=2, Nq=40, Nk=140, d=72, Dv=72, strided=True, dtype=torch.float16),
    Case(H=2, rel_pos=(9, 9, 1), strided=True, dtype=torch.float16, q_scale="head", k_scale="head"),
    Case(Nq=25, scale=0.05),
    Case(Nq=25, scale=1.0, q_scale="head", k_scale="head"),  # very peaked softmax
    Case(Nq=25, scale=0.0),  # uniform attention
    Case(Nq=25, scale=-0.5),
]


@pytest.mark.parametrize("case", FEATURE_CASES, ids=str)
def test_attention_features(device, case):
    q, k, v, kwargs = make_inputs(case, device, seed=zlib.crc32(str(case).encode()))
    check_attention(q, k, v, kwargs, device)


def test_attention_default_returns_out_only(device):
    q, k, v, _ = make_inputs(Case(Nq=9), device)
    out = binformer.attention(q, k, v)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 2, 9, 64)


def test_attention_is_deterministic(device):
    q, k, v, kwargs = make_inputs(Case(B=2, Nq=150, Nk=300, bias="full", q_scale="token", causal=True), device, seed=5)
    a = binformer.attention(q, k, v, **kwargs, return_lse=True)
    b = binformer.attention(q, k, v, **kwargs, return_lse=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------- attention: random
@pytest.mark.parametrize("seed", range(60))
def test_attention_random(device, seed):
    case = random_case(seed)
    q, k, v, kwargs = make_inputs(case, device, seed=seed)
    try:
        check_attention(q, k, v, kwargs, device)
    except AssertionError as e:
        raise AssertionError(f"{case}: {e}") from None


# ------------------------------------------------------------------------------ attention: large
LARGE_CASES = [
    Case(B=1, H=1, Nq=1024, Nk=1024, d=64, dtype=torch.float16, bias="keys"),
    Case(B=1, H=1, Nq=1000, Nk=1999, d=72, Dv=72, dtype=torch.bfloat16, causal=True, q_scale="token", k_scale="token"),
    Case(B=1, H=1, Nq=4096, Nk=4096, d=64, dtype=torch.float32, q_scale="head", k_scale="head"),
    Case(B=1, H=1, Nq=777, Nk=4095, d=128, Dv=64, dtype=torch.float16, pv_int8=True),
    Case(B=1, H=2, rel_pos=(24, 24, 1), dtype=torch.float16, q_scale="head", k_scale="head"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", LARGE_CASES, ids=str)
def test_attention_large(device, case):
    q, k, v, kwargs = make_inputs(case, device, seed=11)
    check_attention(q, k, v, kwargs, device)


# The vision shapes of SPEC.md section 3 (B, H, N, d): ViT-B/16 224, ViT-L/16 384, DiT-XL/2 512,
# 3-D medical. CUDA only (the float64 reference of the big ones is too slow on 2 CPU cores).
VISION_SHAPES = [(128, 12, 197, 64), (32, 16, 577, 64), (16, 16, 1024, 72), (16, 6, 1680, 64)]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", VISION_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", ["plain", "binaryattention", "binaryformer_causal"])
def test_attention_vision_shapes(cuda_device, shape, dtype, variant):
    B, H, N, d = shape
    if variant == "binaryattention" and N - 1 in (196, 576):  # cls + 14x14 / 24x24 patches, with rel-pos
        side = int(math.isqrt(N - 1))
        case = Case(B=B, H=H, d=d, dtype=dtype, rel_pos=(side, side, 1), q_scale="head", k_scale="head", pv_int8=True)
    elif variant == "binaryattention":
        case = Case(B=B, H=H, Nq=N, d=d, dtype=dtype, q_scale="head", k_scale="head", bias="heads")
    elif variant == "binaryformer_causal":
        case = Case(B=B, H=H, Nq=N, d=d, dtype=dtype, q_scale="token", k_scale="token", causal=True)
    else:
        case = Case(B=B, H=H, Nq=N, d=d, dtype=dtype)
    q, k, v, kwargs = make_inputs(case, cuda_device, seed=N)
    check_attention(q, k, v, kwargs, cuda_device)


# ------------------------------------------------------------------------------ attention: edges
def test_attention_empty_problems(device):
    """B*H*Nq == 0: empty out / lse of the right shapes. Nk == 0: out = 0, lse = -inf."""
    for B, H, Nq, Nk in [(0, 2, 5, 5), (2, 0, 5, 5), (2, 2, 0, 5), (0, 0, 0, 0), (2, 2, 0, 0)]:
        q, k, v = randn((B, H, Nq, 64), device=device), randn((B, H, Nk, 64), device=device), randn((B, H, Nk, 32), device=device)
        out, lse = binformer.attention(q, k, v, return_lse=True)
        assert out.shape == (B, H, Nq, 32) and lse.shape == (B, H, Nq)
        assert out.dtype == torch.float32 and lse.dtype == torch.float32
    q, v = randn((2, 3, 4, 64), device=device), randn((2, 3, 0, 16), torch.float16, device)
    out, lse = binformer.attention(q, randn((2, 3, 0, 64), device=device), v, return_lse=True, bias=randn((3, 4, 0), device=device))
    assert out.shape == (2, 3, 4, 16) and out.dtype == torch.float16
    assert (out == 0).all() and (lse == -math.inf).all()


def test_attention_fully_masked_rows(device):
    """Rows whose keys are all masked (bias -inf) give out = 0 and lse = -inf, never NaN; the
    other rows are unaffected."""
    case = Case(B=2, H=2, Nq=13, Nk=40, bias="full", dtype=torch.float16)
    q, k, v, kwargs = make_inputs(case, device, seed=3)
    bias = kwargs["bias"].clone()
    bias[0, 1, 4] = -math.inf
    bias[1, 0, 0] = -math.inf
    bias[1, 1, 12, ::2] = -math.inf  # partly masked
    kwargs["bias"] = bias
    out, lse = check_attention(q, k, v, kwargs, device)
    assert (out[0, 1, 4] == 0).all() and lse[0, 1, 4].item() == -math.inf
    assert not out.isnan().any()
    # the same with pv_int8
    out8, lse8 = check_attention(q, k, v, {**kwargs, "pv_int8": True}, device)
    assert (out8[1, 0, 0] == 0).all() and lse8[1, 0, 0].item() == -math.inf


def test_attention_causal_rows_beyond_keys(device):
    """Top-left causal with Nq > Nk: row i sees keys 0..min(i, Nk-1); nothing is fully masked."""
    q, k, v, kwargs = make_inputs(Case(Nq=30, Nk=5, causal=True), device, seed=4)
    check_attention(q, k, v, kwargs, device)
    # what the reference (and so the kernel, within tolerance) means by top-left alignment:
    # rows >= Nk - 1 see every key, row i < Nk - 1 sees keys 0..i
    causal = ref.attention_reference(q, k, v, is_causal=True)
    torch.testing.assert_close(causal[:, :, 4:], ref.attention_reference(q[:, :, 4:], k, v), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(causal[:, :, 2:3], ref.attention_reference(q[:, :, 2:3], k[:, :, :3], v[:, :, :3]), rtol=1e-14, atol=1e-14)


# ------------------------------------------------------------------------------ non-finite inputs
def test_attention_nonfinite_q_k_are_signs(device):
    """q / k enter only through their signs: NaN counts as +1, +-inf as +-1 (the layout rule)."""
    q, k, v, kwargs = make_inputs(Case(Nq=20, Nk=30, dtype=torch.float16), device, seed=5)
    q, k = q.clone(), k.clone()
    q[0, 0, 3, :10] = math.nan
    q[0, 1, 5, 7] = -math.inf
    k[0, 0, 2, 40:] = math.inf
    k[0, 1, 9, 0] = -math.nan
    out = binformer.attention(q, k, v)
    assert torch.isfinite(out).all()
    as_signs = lambda x: torch.where(x < 0, -1.0, 1.0).to(x.dtype)  # noqa: E731
    assert torch.equal(out, binformer.attention(as_signs(q), as_signs(k), v))
    check_attention(q, k, v, kwargs, device)


def test_attention_nonfinite_v_propagates(device):
    """A NaN in v[j, c] reaches channel c of every row that attends to key j (non-causal: all);
    an inf does too, as inf (CPU) or as inf/NaN (CUDA with fp32 v, see docs/CONTRACT.md)."""
    q, k, v, kwargs = make_inputs(Case(B=1, H=2, Nq=12, Nk=20, Dv=16), device, seed=6)
    v = v.clone()
    v[0, 1, 7, 3] = math.nan
    v[0, 0, 2, 5] = math.inf
    out = binformer.attention(q, k, v)
    assert out[0, 1, :, 3].isnan().all()
    assert not out[0, 1, :, :3].isnan().any() and not out[0, 1, :, 4:].isnan().any()
    assert torch.isfinite(out[0, 0, :, :5]).all()
    if device == "cpu":
        assert (out[0, 0, :, 5] == math.inf).all()
        check_attention(q, k, v, kwargs, device)
    else:  # CUDA fp32 V runs 3xTF32 (V = big + small, small = inf - inf = NaN): inf becomes NaN
        assert (~torch.isfinite(out[0, 0, :, 5])).all()
        # Everything else still matches the reference: compare with channel 5 of head 0 masked.
        out, lse = binformer.attention(q, k, v, **kwargs, return_lse=True)
        out = out.clone()
        out[0, 0, :, 5] = math.inf
        check_attention(q, k, v, kwargs, device, out=out, lse=lse)


def test_attention_nonfinite_bias(device):
    """bias NaN: the row it is in becomes NaN (other rows untouched); -inf: that key is masked,
    exactly as if it were absent."""
    q, k, v, kwargs = make_inputs(Case(B=1, H=2, Nq=10, Nk=24, bias="full"), device, seed=7)
    bias = kwargs["bias"].clone()
    bias[0, 0, 3, 5] = math.nan
    out = binformer.attention(q, k, v, bias=bias)
    assert out[0, 0, 3].isnan().all()
    rows = torch.ones(2, 10, dtype=torch.bool, device=out.device)
    rows[0, 3] = False
    assert torch.isfinite(out[0][rows]).all()
    check_attention(q, k, v, {"bias": bias}, device)

    bias = kwargs["bias"].clone()
    bias[..., 6] = -math.inf
    keep = [j for j in range(24) if j != 6]
    # In the reference, key 6 masked or removed agree to float64 rounding (exp(-inf) = 0), so
    # the kernel within its tolerance of the one is within it of the other.
    masked = ref.attention_reference(q, k, v, bias=bias, return_lse=True)
    removed = ref.attention_reference(q, k[:, :, keep], v[:, :, keep], bias=bias[..., keep], return_lse=True)
    torch.testing.assert_close(masked, removed, rtol=1e-14, atol=1e-14)
    check_attention(q, k, v, {"bias": bias}, device)


# -------------------------------------------------------------------------------------- opcheck
def _opcheck(op, args, **kw):
    torch.library.opcheck(op, args, **kw)


def test_opcheck_pack_sign(device):
    for dtype in FLOATS:
        _opcheck(torch.ops.binformer.pack_sign.default, (randn((3, 5, 72), dtype, device),))


def test_opcheck_sign_matmul(device):
    a = binformer.pack_sign(randn((2, 1, 9, 64), device=device))
    b = binformer.pack_sign(randn((3, 11, 64), device=device, seed=1))
    _opcheck(torch.ops.binformer.sign_matmul.default, (a, b, 64))


def _fwd_args(q, k, v, kwargs, d, grad_mode="ste"):
    wh, ww = kwargs.get("rel_pos_grid", (0, 0))
    return (
        q, k, v, kwargs.get("q_scale"), kwargs.get("k_scale"), kwargs.get("bias"), kwargs.get("rel_pos_table"),
        wh, ww, kwargs.get("num_prefix_tokens", 0), d, kwargs.get("scale", d**-0.5), kwargs.get("is_causal", False),
        kwargs.get("pv_int8", False), grad_mode,
    )


OPCHECK_CASES = [
    Case(Nq=9, Nk=11, d=32, Dv=16),
    Case(B=2, Nq=9, Nk=11, d=72, Dv=8, dtype=torch.float16, q_scale="head", k_scale="token", bias="heads", causal=True),
    Case(H=2, rel_pos=(2, 3, 1), q_scale="token", dtype=torch.bfloat16, pv_int8=True),
    Case(Nq=9, Nk=11, d=64, q_bits=True, k_bits=True),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck_attention_fwd(device, case):
    """Schema, fake kernel and dispatch of attention_fwd (no gradients involved)."""
    q, k, v, kwargs = make_inputs(case, device, seed=1)
    _opcheck(torch.ops.binformer.attention_fwd.default, _fwd_args(q, k, v, kwargs, case.d))


# ----------------------------------------------------------------------------------- compile
def test_compile_fullgraph_cpu(monkeypatch):
    """torch.compile(fullgraph=True) (inductor) traces binformer.attention, validation included,
    without a graph break and gives the eager result bit for bit (the same kernel runs)."""
    torch._dynamo.reset()
    q, k, v, kwargs = make_inputs(Case(B=2, Nq=17, Nk=23, d=64, q_scale="head", k_scale="head", bias="heads"), "cpu", seed=2)

    def block(q, k, v, q_scale, k_scale, bias):
        out, lse = binformer.attention(q, k, v, q_scale=q_scale, k_scale=k_scale, bias=bias, return_lse=True)
        return out * 2, lse

    compiled = torch.compile(block, fullgraph=True)  # inductor: ~30 s to compile on 2 cores
    got = compiled(q, k, v, kwargs["q_scale"], kwargs["k_scale"], kwargs["bias"])
    want = block(q, k, v, kwargs["q_scale"], kwargs["k_scale"], kwargs["bias"])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_cuda_graph_capture():
    """The wrapper skips its data-dependent finiteness checks while a CUDA graph is captured."""
    q, k, v, kwargs = make_inputs(Case(B=2, Nq=64, d=64, q_scale="head", k_scale="head", dtype=torch.float16), "cuda", seed=3)
    eager = binformer.attention(q, k, v, **kwargs)
    static_out = None
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        binformer.attention(q, k, v, **kwargs)  # warm up (allocations) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = binformer.attention(q, k, v, **kwargs)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_cuda_side_stream():
    """The kernels run on the current stream (here a side stream), ordered after its inputs."""
    q, k, v, kwargs = make_inputs(Case(B=2, Nq=300, d=64, bias="heads", dtype=torch.float16), "cuda", seed=5)
    expected = binformer.attention(q, k, v, **kwargs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        v2 = v * 1  # produced on the side stream: the kernel must be ordered after it
        out = binformer.attention(q, k, v2, **kwargs)
    side.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_second_device():
    """Inputs on cuda:1 while cuda:0 is current: the device guard runs the kernels on cuda:1."""
    q, k, v, kwargs = make_inputs(Case(B=2, Nq=50, q_scale="head", k_scale="head", dtype=torch.bfloat16), "cuda:1", seed=6)
    with torch.cuda.device(0):
        out, lse = binformer.attention(q, k, v, **kwargs, return_lse=True)
        bits = binformer.pack_sign(q)
    assert out.device == torch.device("cuda:1") and bits.device == torch.device("cuda:1")
    check_attention(q, k, v, kwargs, "cuda", out=out, lse=lse)
