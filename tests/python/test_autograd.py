"""Autograd of binformer.attention against the float64 reference's autograd.

The kernels compute in fp32, so a finite-difference gradcheck of the op itself would measure
fp32 noise; instead each gradient is compared element by element with the gradient of the
float64 reference (same straight-through / detached signs), within the error model of
conftest.grad_tolerances. The reference itself is gradchecked in test_reference.py.

Every test here needs the attention_bwd kernel (marker "bwd"; the bwd_device fixture errors
with one clear line when the device has no working backward kernel).
"""

from __future__ import annotations

import zlib

import pytest
import torch

import binformer
from binformer import reference as ref
from conftest import Case, assert_grads_match, grad_tolerances, make_inputs, random_case, randn

pytestmark = pytest.mark.bwd

OPTIONAL = ("q_scale", "k_scale", "bias", "rel_pos_table")


def _grads(case: Case, device: str, grad_mode: str, wrt: tuple[str, ...], seed: int | None = None, transform=None):
    """Gradients of <dout, out> from binformer and from the reference, and the tolerances."""
    seed = zlib.crc32(f"{case}{grad_mode}{wrt}".encode()) if seed is None else seed
    q, k, v, kwargs = make_inputs(case, device, seed=seed)
    tensors = {"q": q, "k": k, "v": v, **{n: kwargs[n] for n in OPTIONAL if n in kwargs}}
    wrt = tuple(n for n in wrt if n in tensors and tensors[n].is_floating_point())

    def run(fn, as_leaf):
        leaves = {n: as_leaf(tensors[n]) for n in wrt}
        x = {**tensors, **leaves}
        kw = {**kwargs, **{n: x[n] for n in OPTIONAL if n in kwargs}}
        out = fn(x["q"], x["k"], x["v"], **kw, grad_mode=grad_mode)
        return out, leaves

    out, leaves = run(binformer.attention, lambda t: t.detach().clone().requires_grad_())
    dout = randn(out.shape, out.dtype, device, seed=seed + 1)
    grads = torch.autograd.grad(out, list(leaves.values()), dout, allow_unused=True)
    ref_out, ref_leaves = run(ref.attention_reference, lambda t: t.detach().to(torch.float64).requires_grad_())
    ref_grads = torch.autograd.grad(ref_out, list(ref_leaves.values()), dout.to(torch.float64), allow_unused=True)
    tols = grad_tolerances(q, k, v, kwargs, dout, device)
    return dict(zip(wrt, grads)), dict(zip(wrt, ref_grads)), tols


ALL = ("q", "k", "v", *OPTIONAL)
GRAD_CASES = [
    Case(Nq=21, Nk=21, d=64),
    Case(B=2, H=2, Nq=17, Nk=40, d=32, Dv=16, q_scale="head", k_scale="head"),  # BinaryAttention scales
    Case(B=2, H=2, Nq=33, Nk=29, d=72, Dv=24, q_scale="token", k_scale="token", dtype=torch.float16),  # BinaryFormer
    Case(B=2, H=3, Nq=19, q_scale="batch", k_scale="shared", dtype=torch.bfloat16),
    Case(B=2, H=3, Nq=19, q_scale="head_only", k_scale="token"),
    Case(B=2, H=2, Nq=23, Nk=45, bias="full"),
    Case(B=2, H=2, Nq=23, Nk=45, bias="heads", dtype=torch.float16),
    Case(B=2, H=2, Nq=23, Nk=45, bias="keys", q_scale="head"),
    Case(B=2, H=2, Nq=23, Nk=45, bias="rows"),
    Case(B=2, H=2, Nq=23, Nk=45, bias="scalar"),
    Case(B=2, H=3, rel_pos=(4, 5, 0)),
    Case(B=2, H=3, rel_pos=(3, 4, 1), q_scale="head", k_scale="head", bias="heads", dtype=torch.bfloat16),
    Case(Nq=45, causal=True, q_scale="token", k_scale="head"),
    Case(Nq=40, Nk=13, causal=True, d=128, Dv=8),
    Case(Nq=13, Nk=40, causal=True, d=256, Dv=64, dtype=torch.float16),
    Case(B=2, Nq=31, Nk=47, pv_int8=True, q_scale="head", k_scale="head"),
    Case(H=3, rel_pos=(4, 4, 1), pv_int8=True, dtype=torch.float16),
    Case(Nq=33, Nk=47, q_bits=True, d=72, k_scale="token"),  # only k, v, scales get gradients
    Case(Nq=33, Nk=47, q_bits=True, k_bits=True, d=64, q_scale="token", bias="full"),
    Case(B=2, H=3, Nq=31, Nk=45, strided=True, q_scale="head", k_scale="head"),
    Case(Nq=130, Nk=257, d=64, Dv=40, q_scale="token", k_scale="token", bias="keys", causal=True),
]


@pytest.mark.parametrize("grad_mode", ["ste", "hamming"])
@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
def test_gradients_match_reference(bwd_device, case, grad_mode):
    grads, ref_grads, tols = _grads(case, bwd_device, grad_mode, ALL)
    if grad_mode == "hamming":
        assert grads.get("q") is None and grads.get("k") is None, "hamming mode must give q and k no gradient"
    assert_grads_match(grads, ref_grads, tols)


@pytest.mark.parametrize("seed", range(24))
def test_gradients_random(bwd_device, seed):
    case = random_case(1000 + seed)
    grad_mode = "ste" if seed % 3 else "hamming"
    grads, ref_grads, tols = _grads(case, bwd_device, grad_mode, ALL, seed=seed)
    try:
        assert_grads_match(grads, ref_grads, tols)
    except AssertionError as e:
        raise AssertionError(f"{case} {grad_mode}: {e}") from None


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        Case(B=1, H=1, Nq=1024, Nk=2047, d=64, dtype=torch.float16, q_scale="token", k_scale="token", causal=True),
        Case(B=1, H=2, rel_pos=(14, 14, 1), q_scale="head", k_scale="head", dtype=torch.bfloat16),
    ],
    ids=str,
)
def test_gradients_large(bwd_device, case):
    grads, ref_grads, tols = _grads(case, bwd_device, "ste", ALL)
    assert_grads_match(grads, ref_grads, tols)


@pytest.mark.parametrize("wrt", [("v",), ("q",), ("k_scale",), ("bias",), ("rel_pos_table",), ("q_scale", "k")])
def test_gradients_of_single_inputs(bwd_device, wrt):
    """Each input alone (the binding asks attention_bwd for that output only)."""
    case = Case(B=2, H=2, rel_pos=(3, 3, 1), q_scale="head", k_scale="token", bias="heads")
    grads, ref_grads, tols = _grads(case, bwd_device, "ste", ("v", *wrt) if wrt != ("v",) else wrt)
    assert_grads_match(grads, ref_grads, tols)


def test_backward_requests_only_needed_outputs(bwd_device, monkeypatch):
    """attention_bwd is called with output_mask = exactly the inputs that need a gradient."""
    masks = []
    real = torch.ops.binformer.attention_bwd

    def spy(*args):
        masks.append(list(args[16]))
        return real(*args)

    monkeypatch.setattr(torch.ops.binformer, "attention_bwd", spy)
    q, k, v, kw = make_inputs(Case(rel_pos=(2, 3, 1), q_scale="head", k_scale="head", bias="full"), bwd_device)
    v.requires_grad_()
    binformer.attention(q, k, v, **kw).sum().backward()
    kw["rel_pos_table"].requires_grad_()
    q.requires_grad_()
    binformer.attention(q, k, v, **kw).sum().backward()
    binformer.attention(q, k, v, **kw, grad_mode="hamming").sum().backward()
    kw["q_scale"].requires_grad_()
    binformer.attention(q, k.requires_grad_(), v.detach(), **kw).sum().backward()
    assert masks == [
        [True, False, False, False, False, False, False],
        [True, False, False, True, False, False, True],
        [True, False, False, False, False, False, True],
        [False, True, False, True, True, False, True],
    ]


def test_scale_computed_from_q_gets_both_paths(bwd_device):
    """BinaryAttention training: alpha = mean|q| per head is itself a function of q, so dq is the
    straight-through term plus the term through alpha (torch autograd composes them)."""
    case = Case(B=2, H=3, Nq=29, Nk=29, d=64, dtype=torch.float32)
    q, k, v, _ = make_inputs(case, bwd_device, seed=3)
    dout = randn(v.shape[:3] + (v.shape[3],), device=bwd_device, seed=4)

    def forward(fn, q, k, v):
        a = q.abs().mean(dim=(-2, -1)).unsqueeze(-1)  # [B, H, 1]
        b = k.abs().mean(dim=(-2, -1)).unsqueeze(-1)
        return fn(q, k, v, q_scale=a, k_scale=b)

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    grads = torch.autograd.grad(forward(binformer.attention, *leaves), leaves, dout)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(forward(ref.attention_reference, *ref_leaves), ref_leaves, dout.double())
    # The mean|q| term spreads d(alpha) over all N*d entries; its error is bounded by the
    # q_scale tolerance divided by N*d, far below the straight-through term's tolerance.
    kw = dict(q_scale=ref_leaves[0].detach().abs().mean(dim=(-2, -1)).unsqueeze(-1).float(),
              k_scale=ref_leaves[1].detach().abs().mean(dim=(-2, -1)).unsqueeze(-1).float())
    tols = grad_tolerances(q, k, v, kw, dout, bwd_device)
    n_d = q.shape[2] * q.shape[3]
    assert_grads_match(
        {"q": grads[0], "k": grads[1], "v": grads[2]},
        {"q": ref_grads[0], "k": ref_grads[1], "v": ref_grads[2]},
        {"q": tols["q"] + tols["q_scale"].unsqueeze(-1) / n_d, "k": tols["k"] + tols["k_scale"].unsqueeze(-1) / n_d,
         "v": tols["v"]},
    )


def test_lse_is_not_differentiable(bwd_device):
    q, k, v, _ = make_inputs(Case(Nq=9), bwd_device)
    v.requires_grad_()
    out, lse = binformer.attention(q, k, v, return_lse=True)
    assert out.requires_grad and not lse.requires_grad


@pytest.mark.parametrize("grad_mode,q_requires_grad,kept", [("hamming", True, False), ("ste", False, False), ("ste", True, True)])
def test_float_q_is_saved_only_when_needed(bwd_device, grad_mode, q_requires_grad, kept):
    """The backward keeps the float q only for the straight-through mask; otherwise it saves the
    packed bits, so q can be freed after the forward (16x less activation memory in fp16)."""
    import weakref

    q_leaf, k, v, _ = make_inputs(Case(Nq=9, Nk=12, dtype=torch.float16), bwd_device)
    q = q_leaf.requires_grad_(q_requires_grad).clone()  # an intermediate, like a projection's output
    v.requires_grad_()
    q_ref = weakref.ref(q)
    out = binformer.attention(q, k, v, grad_mode=grad_mode)
    del q
    assert (q_ref() is not None) == kept
    out.sum().backward()
    assert v.grad is not None


def test_prepacked_bits_get_no_gradient(bwd_device):
    q, k, v, _ = make_inputs(Case(Nq=9, Nk=12, q_bits=True), bwd_device)
    k.requires_grad_()
    v.requires_grad_()
    out = binformer.attention(q, k, v)
    out.sum().backward()
    assert q.grad is None and k.grad is not None and v.grad is not None


def test_backward_is_deterministic(bwd_device):
    case = Case(B=2, H=2, Nq=100, Nk=300, q_scale="token", k_scale="head", bias="heads", causal=True)
    first = _grads(case, bwd_device, "ste", ALL, seed=9)[0]
    second = _grads(case, bwd_device, "ste", ALL, seed=9)[0]
    for name, g in first.items():
        assert torch.equal(g, second[name]), f"d{name} differs between two identical backward calls"


def test_backward_empty_and_masked(bwd_device):
    """Empty problems give zero gradients of the right shapes; fully masked rows give zeros too."""
    for Nq, Nk in [(0, 5), (5, 0)]:
        q, k, v = (randn((2, 2, n, 64), device=bwd_device, seed=n).requires_grad_() for n in (Nq, Nk, Nk))
        qs = torch.ones(2, 2, 1, device=bwd_device, requires_grad=True)
        out = binformer.attention(q, k, v, q_scale=qs)
        gq, gk, gv, gs = torch.autograd.grad(out, (q, k, v, qs), torch.ones_like(out), allow_unused=True)
        for g, t in ((gq, q), (gk, k), (gv, v), (gs, qs)):
            assert g is not None and g.shape == t.shape and (g == 0).all()

    case = Case(B=1, H=2, Nq=7, Nk=9, bias="full")
    q, k, v, kw = make_inputs(case, bwd_device, seed=2)
    kw["bias"][0, 1, 3] = float("-inf")
    leaves = [t.requires_grad_() for t in (q, k, v, kw["bias"])]
    out = binformer.attention(q, k, v, **kw)
    grads = torch.autograd.grad(out, leaves, randn(out.shape, device=bwd_device, seed=3))
    assert all(torch.isfinite(g).all() for g in grads[:3])
    assert (grads[0][0, 1, 3] == 0).all() and (grads[3][0, 1, 3] == 0).all()


# ------------------------------------------------------------------------------ opcheck / compile
OPCHECK_GRAD_CASES = [
    Case(Nq=9, Nk=11, d=32, Dv=16),
    Case(B=2, Nq=9, Nk=11, d=72, Dv=8, q_scale="head", k_scale="token", bias="heads", causal=True),
    Case(H=2, rel_pos=(2, 3, 1), q_scale="token", dtype=torch.float16, pv_int8=True),
]


@pytest.mark.parametrize("grad_mode", ["ste", "hamming"])
@pytest.mark.parametrize("case", OPCHECK_GRAD_CASES, ids=str)
def test_opcheck_attention_autograd(bwd_device, case, grad_mode):
    """opcheck with inputs that require grad: the autograd registration and the backward under
    AOTAutograd (fake attention_bwd / pack_sign kernels included)."""
    q, k, v, kwargs = make_inputs(case, bwd_device, seed=1)
    for t in (q, k, v, *(kwargs[n] for n in OPTIONAL if n in kwargs)):
        t.requires_grad_()
    wh, ww = kwargs.get("rel_pos_grid", (0, 0))
    args = (
        q, k, v, kwargs.get("q_scale"), kwargs.get("k_scale"), kwargs.get("bias"), kwargs.get("rel_pos_table"), wh, ww,
        kwargs.get("num_prefix_tokens", 0), case.d, case.d**-0.5, case.causal, case.pv_int8, grad_mode,
    )
    torch.library.opcheck(torch.ops.binformer.attention_fwd.default, args)


def test_opcheck_attention_bwd(bwd_device):
    q, k, v, kwargs = make_inputs(Case(H=2, rel_pos=(2, 3, 1), q_scale="head", bias="heads"), bwd_device, seed=2)
    out, lse = binformer.attention(q, k, v, **kwargs, return_lse=True)
    args = (
        randn(out.shape, device=bwd_device, seed=3), binformer.pack_sign(q), binformer.pack_sign(k), v, out, lse,
        kwargs["q_scale"], None, kwargs["bias"], kwargs["rel_pos_table"], 2, 3, 1, 64, 0.125, False, [True] * 7,
    )
    torch.library.opcheck(torch.ops.binformer.attention_bwd.default, args)


def test_compile_backward_cpu(monkeypatch):
    """Forward and backward of binformer.attention through torch.compile(fullgraph=True) give the
    eager gradients bit for bit (the same kernels run)."""
    from conftest import attention_bwd_status

    err = attention_bwd_status("cpu")
    if err is not None:
        pytest.fail(f"attention_bwd kernel missing or failing on cpu: {err}", pytrace=False)
    torch._dynamo.reset()
    q, k, v, kw = make_inputs(Case(B=2, Nq=17, Nk=23, q_scale="head", k_scale="head", bias="heads"), "cpu", seed=4)

    def loss(q, k, v, qs, ks, bias):
        return (binformer.attention(q, k, v, q_scale=qs, k_scale=ks, bias=bias) ** 2).sum()

    inputs = [q, k, v, kw["q_scale"], kw["k_scale"], kw["bias"]]
    eager_in = [t.detach().clone().requires_grad_() for t in inputs]
    comp_in = [t.detach().clone().requires_grad_() for t in inputs]
    eager = torch.autograd.grad(loss(*eager_in), eager_in)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*comp_in), comp_in)
    for name, a, b in zip(("q", "k", "v", "q_scale", "k_scale", "bias"), got, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, name=name: f"d{name}: {m}")
