"""The float64 reference checked against independent formulations of the same math.

The reference is the oracle of every other test, so each of its pieces is compared here with a
second, differently written implementation: bit loops in plain Python integers, the SPEC's
index rule written per element, torch's own softmax attention (SDPA) on +-1 matrices, and
autograd's finite differences (gradcheck).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from binformer import reference as ref

F64 = torch.float64


def _python_pack(row: list[float]) -> list[int]:
    """Bits of one row, the way SPEC.md section 2 states it, in Python ints."""
    words = [0] * ((len(row) + 31) // 32)
    for c, x in enumerate(row):
        if not (x < 0):  # NaN and -0.0 are not < 0
            words[c // 32] |= 1 << (c % 32)
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


@pytest.mark.parametrize("d", [1, 5, 31, 32, 33, 64, 72, 100, 256])
def test_pack_sign_reference_matches_python_bit_loop(d):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(7, d, generator=g, dtype=F64)
    specials = torch.tensor([0.0, -0.0, math.nan, math.inf, -math.inf, -1e-300, 1e-300], dtype=F64)
    x.view(-1)[: min(7, x.numel())] = specials[: min(7, x.numel())]
    expected = torch.tensor([_python_pack(r) for r in x.tolist()], dtype=torch.int32)
    assert torch.equal(ref.pack_sign_reference(x), expected)


def test_unpack_inverts_pack():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 200, generator=g)
    x[0, 0, :3] = torch.tensor([-0.0, math.nan, -math.inf])
    signs = torch.where(x < 0, -1.0, 1.0).to(F64)
    assert torch.equal(ref.unpack_sign_reference(ref.pack_sign_reference(x), 200), signs)


@pytest.mark.parametrize("d", [1, 8, 37, 64, 200])
def test_sign_matmul_reference_matches_xor_popcount(d):
    g = torch.Generator().manual_seed(d)
    a = ref.pack_sign_reference(torch.randn(2, 5, d, generator=g))
    b = ref.pack_sign_reference(torch.randn(2, 6, d, generator=g))
    got = ref.sign_matmul_reference(a, b, d)
    for bi in range(2):
        for m in range(5):
            for n in range(6):
                xor = sum(bin((x ^ y) & 0xFFFFFFFF).count("1") for x, y in zip(a[bi, m].tolist(), b[bi, n].tolist()))
                assert got[bi, m, n].item() == d - 2 * xor


@pytest.mark.parametrize("wh,ww,prefix", [(1, 1, 0), (2, 3, 0), (3, 2, 1), (4, 4, 1), (14, 14, 1)])
def test_rel_pos_index_matches_spec_rule(wh, ww, prefix):
    table = (2 * wh - 1) * (2 * ww - 1) + 3
    n = prefix + wh * ww
    idx = ref.rel_pos_index(wh, ww, prefix)
    assert idx.shape == (n, n)
    for i in range(n):
        for j in range(n):
            if i < prefix and j < prefix:
                want = table - 1
            elif i < prefix:
                want = table - 3
            elif j < prefix:
                want = table - 2
            else:
                yi, xi = divmod(i - prefix, ww)
                yj, xj = divmod(j - prefix, ww)
                want = (yi - yj + wh - 1) * (2 * ww - 1) + (xi - xj + ww - 1)
            assert idx[i, j].item() == want, (i, j)
    # Every patch-pair entry is used; the three cls entries only with a cls token.
    assert idx.min() >= 0 and idx.max() < table
    patch_entries = (2 * wh - 1) * (2 * ww - 1)
    assert set(idx[prefix:, prefix:].flatten().tolist()) == set(range(patch_entries))


def _sdpa_oracle(q, k, v, *, q_scale=None, k_scale=None, bias=None, rel=None, scale, causal):
    """Independent: torch SDPA on float64 +-1 matrices with the factors folded into q and k."""
    sq = torch.where(q < 0, -1.0, 1.0).to(F64)
    sk = torch.where(k < 0, -1.0, 1.0).to(F64)
    if q_scale is not None:
        sq = sq * q_scale.to(F64).unsqueeze(-1)
    if k_scale is not None:
        sk = sk * k_scale.to(F64).unsqueeze(-1)
    mask = torch.zeros(q.shape[2], k.shape[2], dtype=F64)
    if bias is not None:
        mask = mask + bias.to(F64)
    if rel is not None:
        table, wh, ww, prefix = rel
        mask = mask + table.to(F64)[:, ref.rel_pos_index(wh, ww, prefix)]
    if causal:
        mask = mask.masked_fill(torch.ones_like(mask, dtype=torch.bool).triu(1), -math.inf)
    return F.scaled_dot_product_attention(sq, sk, v.to(F64), attn_mask=mask, scale=scale)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk", [(17, 17), (9, 23), (23, 9)])
def test_attention_reference_matches_sdpa(nq, nk, causal):
    g = torch.Generator().manual_seed(nq * 100 + nk)
    B, H, d, dv = 2, 3, 40, 24
    q, k, v = torch.randn(B, H, nq, d, generator=g), torch.randn(B, H, nk, d, generator=g), torch.randn(B, H, nk, dv, generator=g)
    qs, ks = torch.rand(B, H, nq, generator=g) + 0.5, torch.rand(B, H, 1, generator=g) + 0.5
    bias = torch.randn(H, nq, nk, generator=g)
    out = ref.attention_reference(q, k, v, q_scale=qs, k_scale=ks, bias=bias, scale=0.3, is_causal=causal)
    expected = _sdpa_oracle(q, k, v, q_scale=qs, k_scale=ks, bias=bias, scale=0.3, causal=causal)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prefix", [0, 1])
def test_attention_reference_rel_pos_matches_sdpa(prefix):
    g = torch.Generator().manual_seed(prefix)
    wh, ww, H = 3, 4, 2
    n = prefix + wh * ww
    q, k, v = (torch.randn(1, H, n, 16, generator=g) for _ in range(3))
    table = torch.randn(H, (2 * wh - 1) * (2 * ww - 1) + 3, generator=g)
    out = ref.attention_reference(q, k, v, rel_pos_table=table, rel_pos_grid=(wh, ww), num_prefix_tokens=prefix)
    expected = _sdpa_oracle(q, k, v, rel=(table, wh, ww, prefix), scale=16**-0.5, causal=False)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_attention_reference_lse_and_masked_rows():
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 1, 4, 8, generator=g), torch.randn(1, 1, 5, 8, generator=g), torch.randn(1, 1, 5, 8, generator=g)
    bias = torch.zeros(1, 1, 4, 5)
    bias[0, 0, 2] = -math.inf  # row 2: every key masked
    v.requires_grad_()
    out, lse = ref.attention_reference(q, k, v, bias=bias, return_lse=True)
    s = ref.attention_scores_reference(q, k, bias=bias)
    assert torch.equal(out[0, 0, 2], torch.zeros(8, dtype=F64))
    assert lse[0, 0, 2].item() == -math.inf
    rows = [0, 1, 3]
    torch.testing.assert_close(lse[0, 0, rows], torch.logsumexp(s[0, 0, rows], dim=-1), rtol=1e-14, atol=1e-14)
    out.sum().backward()  # the masked row must not poison the gradient with NaN
    assert torch.isfinite(v.grad).all()


def test_attention_reference_prepacked_bits_equal_float():
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(2, 2, 9, 72, generator=g), torch.randn(2, 2, 11, 72, generator=g), torch.randn(2, 2, 11, 8, generator=g)
    expected = ref.attention_reference(q, k, v)
    qb, kb = ref.pack_sign_reference(q), ref.pack_sign_reference(k)
    assert torch.equal(ref.attention_reference(qb, kb, v, head_dim=72), expected)
    assert torch.equal(ref.attention_reference(q, kb, v), expected)


def test_quantize_v_int8():
    g = torch.Generator().manual_seed(5)
    v = torch.randn(2, 3, 50, 16, generator=g)
    v[0, 1, :, 4] = 0  # an all-zero channel
    v_q, dq = ref.quantize_v_int8(v)
    assert v_q.dtype == torch.int8 and dq.shape == (2, 3, 16)
    assert dq[0, 1, 4] == 0 and (v_q[0, 1, :, 4] == 0).all()
    assert v_q.abs().amax(dim=2).flatten().tolist().count(127) == 2 * 3 * 16 - 1  # the max maps to +-127
    err = (v_q.to(F64) * dq.to(F64).unsqueeze(2) - v.to(F64)).abs()
    assert (err <= dq.to(F64).unsqueeze(2) * (0.5 + 1e-6)).all()


def test_pv_int8_reference_matches_explicit_formula():
    g = torch.Generator().manual_seed(6)
    q, k, v = torch.randn(1, 2, 6, 16, generator=g), torch.randn(1, 2, 7, 16, generator=g), torch.randn(1, 2, 7, 8, generator=g)
    out = ref.attention_reference(q, k, v, pv_int8=True, is_causal=True)
    s = ref.attention_scores_reference(q, k, is_causal=True)
    v_q, dq = ref.quantize_v_int8(v)
    for h in range(2):
        for i in range(6):
            row = s[0, h, i]
            m = row.max()
            e = torch.exp(row - m)
            p_q = torch.round(e * 255)
            want = dq[0, h].to(F64) * (p_q @ v_q[0, h].to(F64)) / (255 * e.sum())
            torch.testing.assert_close(out[0, h, i], want, rtol=1e-13, atol=1e-13)
    # and it stays within the quantization bound of the exact attention
    exact = ref.attention_reference(q, k, v, is_causal=True)
    bound = 0.5 / 255 * v.abs().amax(dim=2, keepdim=True).to(F64) * 7 + dq.to(F64).unsqueeze(2)
    assert ((out - exact).abs() <= bound).all()


def test_sign_ste_gradient():
    x = torch.tensor([-2.0, -1.0, -0.5, -0.0, 0.0, 0.5, 1.0, 1.5, math.nan], dtype=F64, requires_grad=True)
    y = ref.sign_ste(x)
    assert y.tolist() == [-1, -1, -1, 1, 1, 1, 1, 1, 1]
    y.backward(torch.arange(1.0, 10.0, dtype=F64))
    assert x.grad.tolist() == [0, 2, 3, 4, 5, 6, 7, 0, 0]


def test_attention_reference_ste_gradient_is_sign_gradient_masked():
    """d out / d q equals the gradient w.r.t. an explicit +-1 leaf, times 1{|q| <= 1}."""
    g = torch.Generator().manual_seed(7)
    q = (torch.randn(1, 2, 5, 16, generator=g, dtype=F64) * 1.5).requires_grad_()
    k, v = torch.randn(1, 2, 6, 16, generator=g, dtype=F64), torch.randn(1, 2, 6, 8, generator=g, dtype=F64)
    dout = torch.randn(1, 2, 5, 8, generator=g, dtype=F64)
    (dq,) = torch.autograd.grad(ref.attention_reference(q, k, v), q, dout)
    sq = torch.where(q.detach() < 0, -1.0, 1.0).to(F64).requires_grad_()
    sk = torch.where(k < 0, -1.0, 1.0).to(F64)
    out = torch.softmax(sq @ sk.transpose(-1, -2) / 4, dim=-1) @ v
    (dsq,) = torch.autograd.grad(out, sq, dout)
    torch.testing.assert_close(dq, dsq * (q.detach().abs() <= 1), rtol=1e-13, atol=1e-13)
    # hamming: the signs are constants
    out_h = ref.attention_reference(q, k, v, grad_mode="hamming")
    assert not out_h.requires_grad


@pytest.mark.parametrize("grad_mode", ["ste", "hamming"])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_gradcheck(grad_mode, causal):
    """Finite differences of the reference w.r.t. every smooth input (signs are piecewise constant,
    so q / k are held fixed)."""
    g = torch.Generator().manual_seed(8)
    wh, ww, prefix, H = 2, 3, 1, 2
    n = prefix + wh * ww
    q, k = torch.randn(2, H, n, 8, generator=g, dtype=F64), torch.randn(2, H, n, 8, generator=g, dtype=F64)
    leaves = dict(
        v=torch.randn(2, H, n, 8, generator=g, dtype=F64),
        q_scale=torch.rand(2, H, 1, generator=g, dtype=F64) + 0.5,
        k_scale=torch.rand(2, H, n, generator=g, dtype=F64) - 0.5,
        bias=torch.randn(H, n, n, generator=g, dtype=F64),
        rel_pos_table=torch.randn(H, (2 * wh - 1) * (2 * ww - 1) + 3, generator=g, dtype=F64),
    )
    names = list(leaves)

    def fn(*tensors):
        kw = dict(zip(names, tensors))
        out, lse = ref.attention_reference(
            q, k, kw.pop("v"), **kw, rel_pos_grid=(wh, ww), num_prefix_tokens=prefix, is_causal=causal,
            grad_mode=grad_mode, return_lse=True,
        )
        return out, lse

    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in leaves.values()))


def test_fake_quant_helpers():
    g = torch.Generator().manual_seed(9)
    p = torch.softmax(torch.randn(2, 3, 5, 7, generator=g), dim=-1).requires_grad_()
    pq = ref.fake_quant_p(p)
    assert torch.equal(pq.detach(), torch.clamp(torch.round(p.detach() * 255), 0, 255) / 255)
    pq.sum().backward()
    assert torch.equal(p.grad, torch.ones_like(p))  # straight-through

    v = torch.randn(2, 3, 5, 4, generator=g)
    v[1, 2, :, 3] = 0
    v.requires_grad_()
    vq = ref.fake_quant_v(v)
    s = 127 / v.detach().abs().amax(dim=-2, keepdim=True)
    expected = torch.round(v.detach() * s) / s
    expected[1, 2, :, 3] = 0
    assert torch.equal(vq.detach(), expected)
    vq.sum().backward()
    assert torch.equal(v.grad, torch.ones_like(v))
