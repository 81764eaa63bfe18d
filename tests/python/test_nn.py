"""binformer.nn (BinaryAttention, convert) and binformer.distill against float64 references.

The float64 module reference below recomputes the whole module (qkv projection, qk-norm, per-head
magnitude, token-weight MLP, relative-position bias, mask, softmax, P.V, output projection) from the
module's parameters cast to float64. Only the *signs* (and the STE window |x| <= 1) are taken from the
module's own fp32 q and k (captured with hooks): a float64 q can differ in sign from the fp32 q for
entries within ~1e-7 of zero, and the reference must evaluate the same binary function, not a neighbour.

Tolerances: the module runs in fp32 (eps 1.2e-7); every output / gradient entry is a short chain of
fp32 reductions over at most a few hundred terms of O(1) values, so agreement to 1e-4 relative to the
largest entry of the tensor (atol) plus 1e-4 relative (rtol) leaves >10x margin over fp32 rounding while
still failing on any wrong term (a missing factor, a wrong index, a dropped gradient path are O(1)).
"""

from __future__ import annotations

import copy
import math
import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import binformer
from binformer.distill import DistillationLoss, hard_distillation, prepare_qat, soft_distillation
from binformer.nn import BinaryAttention, TokenWeightMLP, convert, rel_pos_table_size

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _timm():
    """timm, or skip: timm needs torchvision, which has no CPU build on the development machine."""
    try:
        import timm  # noqa: F401
        from timm.layers import Attention  # noqa: F401
        import timm.models.vision_transformer  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or torchvision's operator registration failing
        pytest.skip(f"timm is not importable here: {type(e).__name__}: {e}")
    return timm


# ---------------------------------------------------------------------------------- float64 reference

def _rel_pos_index_spec(n: int, wh: int, ww: int, prefix: int) -> torch.Tensor:
    """SPEC.md section 1, written out entry by entry (independent of the library's index code)."""
    t = (2 * wh - 1) * (2 * ww - 1) + 3
    idx = torch.empty(n, n, dtype=torch.long)
    for i in range(n):
        for j in range(n):
            if i < prefix and j < prefix:
                idx[i, j] = t - 1
            elif i < prefix:
                idx[i, j] = t - 3
            elif j < prefix:
                idx[i, j] = t - 2
            else:
                yi, xi = divmod(i - prefix, ww)
                yj, xj = divmod(j - prefix, ww)
                idx[i, j] = (yi - yj + wh - 1) * (2 * ww - 1) + (xi - xj + ww - 1)
    return idx


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x < 0, -1.0, 1.0).to(torch.float64)


class _Capture:
    """Forward hooks on q_norm / k_norm: the exact q and k the op receives."""

    def __init__(self, mod: BinaryAttention) -> None:
        self.q = self.k = None
        self._handles = [mod.q_norm.register_forward_hook(lambda m, i, o: setattr(self, "q", o.detach())),
                         mod.k_norm.register_forward_hook(lambda m, i, o: setattr(self, "k", o.detach()))]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def reference_forward(mod: BinaryAttention, x: torch.Tensor, q_seen: torch.Tensor, k_seen: torch.Tensor,
                      attn_mask=None, is_causal=False):
    """Float64 forward of ``mod`` on ``x``; returns (out, x64, params64) for gradient checks."""
    params = {n: p.detach().double().requires_grad_() for n, p in mod.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    b, n, _ = x.shape
    h, d = mod.num_heads, mod.head_dim
    qkv = F.linear(x64, params["qkv.weight"], params.get("qkv.bias"))
    q, k, v = qkv.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    if isinstance(mod.q_norm, nn.LayerNorm):
        q = F.layer_norm(q, (d,), params["q_norm.weight"], params["q_norm.bias"], mod.q_norm.eps)
        k = F.layer_norm(k, (d,), params["k_norm.weight"], params["k_norm.bias"], mod.k_norm.eps)
    q_seen, k_seen = q_seen.double(), k_seen.double()

    def binarize(x, seen):
        if mod.grad_mode == "hamming":
            return _sign(seen)
        window = (seen.abs() <= 1).double()  # STE: d sign(x)/dx := 1 on |x| <= 1
        return _sign(seen) + (x - x.detach()) * window

    sq, sk = binarize(q, q_seen), binarize(k, k_seen)
    a = torch.ones(b, h, n, dtype=torch.float64)
    c = torch.ones(b, h, n, dtype=torch.float64)
    if mod.magnitude == "per_head":
        a = a * q.abs().mean(dim=(-2, -1), keepdim=True)[..., 0]
        c = c * k.abs().mean(dim=(-2, -1), keepdim=True)[..., 0]
    if mod.q_weight is not None:
        def token_weight(prefix, x, seen):
            w1, b1 = params[f"{prefix}.fc1_weight"], params[f"{prefix}.fc1_bias"]
            w2, b2 = params[f"{prefix}.fc2_weight"], params[f"{prefix}.fc2_bias"]
            feats = torch.cat((torch.tanh(x), _sign(seen)), dim=-1)  # [b, h, n, 2d]
            hidden = F.gelu(torch.einsum("bhnc,hcj->bhnj", feats, w1) + b1[:, None, :])
            return torch.einsum("bhnj,hj->bhn", hidden, w2) + b2[:, None]
        a = a * token_weight("q_weight", q, q_seen)
        c = c * token_weight("k_weight", k, k_seen)
    s = mod.scale * a[..., :, None] * c[..., None, :] * (sq @ sk.transpose(-1, -2))
    if mod.rel_pos_table is not None:
        wh, ww = mod.rel_pos_grid
        s = s + params["rel_pos_table"][:, _rel_pos_index_spec(n, wh, ww, mod.num_prefix_tokens)]
    if attn_mask is not None:
        s = s + torch.zeros(attn_mask.shape, dtype=torch.float64).masked_fill(~attn_mask.cpu(), -math.inf)
    if is_causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    out = torch.softmax(s, dim=-1) @ v
    out = out.transpose(1, 2).reshape(b, n, h * d)
    out = F.linear(out, params["proj.weight"], params.get("proj.bias"))
    return out, x64, params


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rel: float = 1e-4) -> None:
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * max(scale, 1e-30), msg=lambda m: f"{what}: {m}")


def _randomize(mod: nn.Module, generator: torch.Generator) -> None:
    """Fresh, O(1)-scale values for every parameter, so that no gradient path is trivially zero (the
    rel-pos table and token-weight MLP start at constants) and |q| straddles the STE window."""
    with torch.no_grad():
        for name, p in mod.named_parameters():
            std = 0.3 if "weight" in name and p.ndim >= 2 else 0.5
            p.copy_(torch.randn(p.shape, generator=generator) * std + (1.0 if name.endswith("norm.weight") else 0.0))


CONFIGS = {
    # BinaryAttention: per-head magnitude, rel-pos bias with a cls token, STE.
    "binary_attention": dict(magnitude="per_head", rel_pos_grid=(3, 4), num_prefix_tokens=1),
    # BinaryFormer: token weights, hamming (the default with token weights), any token count.
    "binaryformer": dict(magnitude=None, token_weights=True),
    # Both scale kinds at once, STE, qk-norm and qkv bias, a non-square grid without cls.
    "combined": dict(magnitude="per_head", token_weights=True, grad_mode="ste", rel_pos_grid=(2, 5),
                     num_prefix_tokens=0, qkv_bias=True, qk_norm=True),
    # Plain sign attention.
    "plain_sign": dict(magnitude=None),
}


def _tokens(cfg) -> int:
    if cfg.get("rel_pos_grid"):
        wh, ww = cfg["rel_pos_grid"]
        return cfg.get("num_prefix_tokens", 1) + wh * ww
    return 11


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_and_gradients_match_float64_reference(name, device):
    cfg = dict(CONFIGS[name])
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    dim, heads = 48, 3  # head_dim 16
    mod = BinaryAttention(dim, heads, **cfg)
    _randomize(mod, g)
    n = _tokens(cfg)
    x = torch.randn(2, n, dim, generator=g)
    weight = torch.randn(2, n, dim, generator=g)  # loss = <out, weight>: every output entry matters

    mod = mod.to(device)
    cap = _Capture(mod)
    xd = x.clone().to(device).requires_grad_()
    out = mod(xd)
    (out * weight.to(device)).sum().backward()
    cap.remove()

    ref, x64, params = reference_forward(mod.cpu(), x, cap.q.cpu(), cap.k.cpu())
    (ref * weight.double()).sum().backward()
    _assert_close(out, ref, f"{name}: output")
    _assert_close(xd.grad, x64.grad, f"{name}: d x")
    for pname, p in mod.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        _assert_close(p.grad, params[pname].grad, f"{name}: d {pname}")


@pytest.mark.parametrize("device", DEVICES)
def test_attention_mask_and_causal_match_reference(device):
    g = torch.Generator().manual_seed(7)
    mod = BinaryAttention(32, 2, magnitude="per_head")
    _randomize(mod, g)
    n = 9
    x = torch.randn(3, n, 32, generator=g)
    mask = torch.rand(3, 1, n, n, generator=g) > 0.3
    mask[..., 0] = True  # keep every row attendable
    for kwargs in (dict(attn_mask=mask), dict(is_causal=True)):
        mod.zero_grad()
        m = mod.to(device)
        cap = _Capture(m)
        xd = x.clone().to(device).requires_grad_()
        dev_kwargs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kwargs.items()}
        out = m(xd, **dev_kwargs)
        out.square().sum().backward()
        cap.remove()
        ref, x64, _ = reference_forward(m.cpu(), x, cap.q.cpu(), cap.k.cpu(), **kwargs)
        ref.square().sum().backward()
        _assert_close(out, ref, f"{kwargs.keys()}: output")
        _assert_close(xd.grad, x64.grad, f"{kwargs.keys()}: d x")


# ---------------------------------------------------------------------------------- gradient paths

def _qkv_grad_rows(mod: BinaryAttention):
    gw = mod.qkv.weight.grad
    a = mod.attn_dim
    return gw[:a], gw[a:2 * a], gw[2 * a:]


def test_hamming_gives_no_gradient_to_q_and_k():
    """Without magnitudes or token weights, the q / k projection rows get exactly zero gradient in
    "hamming" mode (the signs are constants) but a non-zero one in "ste" mode."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 10, 32, generator=g)
    grads = {}
    for mode in ("hamming", "ste"):
        mod = BinaryAttention(32, 2, magnitude=None, grad_mode=mode)
        _randomize(mod, torch.Generator().manual_seed(2))
        mod(x).square().sum().backward()
        grads[mode] = _qkv_grad_rows(mod)
    dq, dk, dv = grads["hamming"]
    assert torch.count_nonzero(dq) == 0 and torch.count_nonzero(dk) == 0
    assert dv.abs().sum() > 0
    dq, dk, _ = grads["ste"]
    assert dq.abs().sum() > 0 and dk.abs().sum() > 0


def test_per_head_magnitude_is_the_only_qk_gradient_in_hamming_mode():
    """With grad_mode="hamming" and magnitude="per_head", q and k learn only through
    alpha = mean|x|: their gradient is non-zero and equals the float64 reference, which has no
    other path from the loss to q and k."""
    g = torch.Generator().manual_seed(3)
    mod = BinaryAttention(32, 2, magnitude="per_head", grad_mode="hamming")
    _randomize(mod, g)
    x = torch.randn(2, 10, 32, generator=g)
    cap = _Capture(mod)
    mod(x).square().sum().backward()
    cap.remove()
    ref, _, params = reference_forward(mod, x, cap.q, cap.k)
    ref.square().sum().backward()
    dq, dk, _ = _qkv_grad_rows(mod)
    assert dq.abs().sum() > 0 and dk.abs().sum() > 0
    _assert_close(mod.qkv.weight.grad, params["qkv.weight"].grad, "d qkv.weight")


def test_per_head_magnitude_gradient_reaches_q_scale(monkeypatch):
    """The magnitude is handed to the op as q_scale / k_scale [B, H, 1] inside the autograd graph."""
    seen = {}
    real = binformer.attention

    def spy(q, k, v, **kw):
        seen.update(kw)
        for key in ("q_scale", "k_scale"):
            kw[key].retain_grad()
        return real(q, k, v, **kw)

    monkeypatch.setattr(binformer, "attention", spy)
    mod = BinaryAttention(32, 2)
    mod(torch.randn(2, 5, 32)).sum().backward()
    for key in ("q_scale", "k_scale"):
        assert seen[key].shape == (2, 2, 1)
        assert seen[key].requires_grad and seen[key].grad is not None
        assert seen[key].grad.abs().sum() > 0
    assert seen["grad_mode"] == "ste"


@pytest.mark.parametrize("options, expected", [
    (dict(), dict(pv_int8=False, grad_mode="ste", rel_pos_table=None, num_prefix_tokens=0, scale=0.25)),
    (dict(pv_int8=True, token_weights=True), dict(pv_int8=True, grad_mode="hamming")),
    (dict(rel_pos_grid=(2, 2), num_prefix_tokens=1), dict(rel_pos_grid=(2, 2), num_prefix_tokens=1)),
])
def test_options_reach_the_op(monkeypatch, options, expected):
    seen = {}
    real = binformer.attention

    def spy(q, k, v, **kw):
        seen.update(kw)
        return real(q, k, v, **kw)

    monkeypatch.setattr(binformer, "attention", spy)
    BinaryAttention(32, 2, **options)(torch.randn(1, 5, 32))
    for key, value in expected.items():
        assert seen[key] == value if value is not None else seen[key] is None, (key, seen[key])


def test_rel_pos_table_starts_at_zero_and_learns():
    mod = BinaryAttention(32, 2, rel_pos_grid=(4, 4), num_prefix_tokens=1)
    assert mod.rel_pos_table.shape == (2, rel_pos_table_size((4, 4))) == (2, 52)
    assert torch.count_nonzero(mod.rel_pos_table) == 0
    x = torch.randn(2, 17, 32)
    mod(x).square().sum().backward()
    grad = mod.rel_pos_table.grad
    assert grad is not None and grad.shape == (2, 52)
    # Every entry is used by some (i, j) pair of a 4x4 grid with a cls token, so all get gradient.
    assert torch.count_nonzero(grad) == grad.numel()


def test_token_weights_start_near_one_and_default_to_hamming():
    mod = BinaryAttention(64, 4, token_weights=True, magnitude=None)
    assert mod.grad_mode == "hamming"
    assert BinaryAttention(64, 4).grad_mode == "ste"
    assert BinaryAttention(64, 4, token_weights=True, grad_mode="ste").grad_mode == "ste"
    q = torch.randn(3, 4, 20, 16)
    w = mod.q_weight(q)
    assert w.shape == (3, 4, 20) and w.dtype == torch.float32
    # fc2 ~ N(0, 0.02) over hidden features of O(0.1): weights 1 +- a few 1e-2.
    assert (w - 1).abs().max() < 0.1


# ---------------------------------------------------------------------------------- shapes and errors

@pytest.mark.parametrize("n", [1, 7, 33, 197])
def test_any_token_count_without_rel_pos(n):
    mod = BinaryAttention(64, 4, token_weights=True)
    x = torch.randn(2, n, 64, requires_grad=True)
    out = mod(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_rel_pos_grid_mismatch_is_a_clear_error():
    mod = BinaryAttention(32, 2, rel_pos_grid=(4, 4), num_prefix_tokens=1)
    with pytest.raises(ValueError, match=r"4x4 patch grid with 1 prefix token\(s\), i.e. 17 tokens, but got 16"):
        mod(torch.randn(1, 16, 32))


def test_invalid_options_are_rejected():
    with pytest.raises(ValueError, match="attn_drop"):
        BinaryAttention(32, 2, attn_drop=0.1)
    with pytest.raises(ValueError, match="magnitude"):
        BinaryAttention(32, 2, magnitude="per_token")
    with pytest.raises(ValueError, match="grad_mode"):
        BinaryAttention(32, 2, grad_mode="sign")
    with pytest.raises(ValueError, match="prefix"):
        BinaryAttention(32, 2, rel_pos_grid=(2, 2), num_prefix_tokens=2)
    with pytest.raises(ValueError, match="divisible"):
        BinaryAttention(30, 4)


def test_output_dim_head_dim_gate_and_scale_norm():
    mod = BinaryAttention(40, 2, attn_head_dim=16, dim_out=24, gated=True, scale_norm=True, proj_bias=False)
    assert mod.attn_dim == 32 and mod.qkv.out_features == 96 and mod.proj.bias is None
    out = mod(torch.randn(2, 6, 40))
    assert out.shape == (2, 6, 24)


# ---------------------------------------------------------------------------------- checkpoints

TIMM_KEYS = {"qkv.weight", "qkv.bias", "q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias",
             "proj.weight", "proj.bias"}


def test_float_checkpoint_loads_strictly_and_new_parameters_keep_their_init():
    """A state_dict with only timm's keys (here: a BinaryAttention without the binary-only
    parameters) loads with strict=True; the rel-pos table stays zero, the token weights stay ~1."""
    plain = BinaryAttention(32, 2, qkv_bias=True, qk_norm=True, magnitude=None)
    _randomize(plain, torch.Generator().manual_seed(5))
    sd = plain.state_dict()
    assert set(sd) == TIMM_KEYS

    full = BinaryAttention(32, 2, qkv_bias=True, qk_norm=True, rel_pos_grid=(2, 2), num_prefix_tokens=1,
                           token_weights=True)
    init = {k: v.clone() for k, v in full.state_dict().items()}
    full.load_state_dict(sd, strict=True)
    after = full.state_dict()
    for key in TIMM_KEYS:
        assert torch.equal(after[key], sd[key]), key
    for key in set(after) - TIMM_KEYS:
        assert torch.equal(after[key], init[key]), key
    assert torch.count_nonzero(full.rel_pos_table) == 0

    # A full binary checkpoint round-trips; one with only part of the binary parameters is refused.
    _randomize(full, torch.Generator().manual_seed(6))
    sd_full = full.state_dict()
    clone = BinaryAttention(32, 2, qkv_bias=True, qk_norm=True, rel_pos_grid=(2, 2), num_prefix_tokens=1,
                            token_weights=True)
    clone.load_state_dict(sd_full, strict=True)
    for key, value in clone.state_dict().items():
        assert torch.equal(value, sd_full[key]), key
    partial = {k: v for k, v in sd_full.items() if k != "rel_pos_table"}
    with pytest.raises(RuntimeError, match="rel_pos_table"):
        clone.load_state_dict(partial, strict=True)


def test_timm_attention_state_dict_loads_unchanged():
    _timm()
    from timm.layers import Attention

    ref = Attention(64, num_heads=4, qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm)
    sd = ref.state_dict()
    mod = BinaryAttention(64, 4, qkv_bias=True, qk_norm=True, rel_pos_grid=(4, 4), token_weights=True)
    mod.load_state_dict(sd, strict=True)
    for key, value in sd.items():
        assert torch.equal(mod.state_dict()[key], value), key
    # Attributes timm code reads.
    for attr in ("num_heads", "head_dim", "scale", "fused_attn"):
        assert hasattr(mod, attr)
    assert mod.scale == ref.scale and mod.head_dim == ref.head_dim


def test_binary_attention_as_timm_block_attn_layer():
    _timm()
    from timm.models.vision_transformer import Block

    layer = BinaryAttention.with_options(rel_pos_grid=(2, 2), num_prefix_tokens=1)
    block = Block(64, 4, qkv_bias=True, attn_layer=layer)
    assert isinstance(block.attn, BinaryAttention)
    x = torch.randn(2, 5, 64, requires_grad=True)
    block(x).sum().backward()
    assert block.attn.rel_pos_table.grad is not None


# ---------------------------------------------------------------------------------- convert

class TimmLayoutAttention(nn.Module):
    """A float attention with timm's layout, to test convert without timm."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x):
        raise AssertionError("replaced by convert")


class _TinyViT(nn.Module):
    num_prefix_tokens = 1

    def __init__(self, dim=32, heads=2, depth=2):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.grid_size = (3, 3)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(dim), "attn": TimmLayoutAttention(dim, heads)}) for _ in range(depth))

    def forward(self, x):
        for blk in self.blocks:
            x = x + blk["attn"](blk["norm"](x))
        return x


def test_convert_custom_timm_layout_model():
    model = _TinyViT()
    old = [blk["attn"] for blk in model.blocks]
    assert convert(model, attention_types=(TimmLayoutAttention,)) is model
    for blk, prev in zip(model.blocks, old):
        attn = blk["attn"]
        assert isinstance(attn, BinaryAttention)
        assert attn.qkv is prev.qkv and attn.proj is prev.proj  # weights reused, not re-initialised
        assert attn.rel_pos_grid == (3, 3) and attn.num_prefix_tokens == 1 and attn.grad_mode == "ste"
    x = torch.randn(2, 10, 32)
    model(x).sum().backward()
    assert all(blk["attn"].rel_pos_table.grad is not None for blk in model.blocks)

    bf = convert(_TinyViT(), rel_pos=False, magnitude=None, token_weights=True,
                 attention_types=(TimmLayoutAttention,))
    attn = bf.blocks[0]["attn"]
    assert attn.rel_pos_table is None and attn.q_weight is not None and attn.grad_mode == "hamming"
    assert bf(torch.randn(1, 23, 32)).shape == (1, 23, 32)  # no grid: any token count

    with pytest.raises(ValueError, match="no module of type"):
        convert(nn.Sequential(nn.Linear(2, 2)), attention_types=(TimmLayoutAttention,))
    no_grid = nn.Sequential(TimmLayoutAttention(32, 2))
    with pytest.raises(ValueError, match="grid"):
        convert(no_grid, attention_types=(TimmLayoutAttention,))
    convert(no_grid, rel_pos=False, attention_types=(TimmLayoutAttention,))
    assert isinstance(no_grid[0], BinaryAttention)


def test_convert_timm_vision_transformer():
    timm = _timm()
    from timm.layers import Attention
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10,
                            qkv_bias=True)
    float_sd = copy.deepcopy(vit.state_dict())
    convert(vit)
    assert not any(type(m) is Attention for m in vit.modules())
    attns = [blk.attn for blk in vit.blocks]
    assert all(isinstance(a, BinaryAttention) for a in attns)
    assert all(a.rel_pos_grid == (4, 4) and a.num_prefix_tokens == 1 for a in attns)
    sd = vit.state_dict()
    for key, value in float_sd.items():  # every float weight is still there, unchanged
        assert torch.equal(sd[key], value), key
    assert set(sd) - set(float_sd) == {f"blocks.{i}.attn.rel_pos_table" for i in range(2)}

    # The converted model equals a fresh binary-attention ViT loaded from the float checkpoint.
    fresh = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10,
                              qkv_bias=True, attn_layer=BinaryAttention.with_options(rel_pos_grid=(4, 4)))
    fresh.load_state_dict(float_sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    vit.eval(), fresh.eval()
    torch.testing.assert_close(vit(x), fresh(x), rtol=0, atol=0)

    vit.train()
    vit(x).logsumexp(-1).sum().backward()
    assert all(a.rel_pos_table.grad is not None and a.rel_pos_table.grad.abs().sum() > 0 for a in attns)

    # Register tokens (more than one prefix token) cannot use the cls-only relative-position layout.
    reg = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4, reg_tokens=2)
    with pytest.raises(ValueError, match="prefix tokens"):
        convert(reg)
    convert(reg, rel_pos=False)
    assert reg(x).shape == (2, 1000)
    assert timm is not None


# ---------------------------------------------------------------------------------- distillation

class _Const(nn.Module):
    """A 'teacher' returning fixed logits (and recording its mode)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.lin = nn.Linear(1, 1)  # a parameter, to check freezing
        self.calls = []

    def forward(self, x):
        self.calls.append(self.training)
        return self.logits


def _hand_soft(s, t, tau):
    total = 0.0
    for srow, trow in zip(s, t):
        zs = [v / tau for v in srow]
        zt = [v / tau for v in trow]
        ls = math.log(sum(math.exp(v) for v in zs))
        lt = math.log(sum(math.exp(v) for v in zt))
        total += sum(math.exp(b - lt) * ((b - lt) - (a - ls)) for a, b in zip(zs, zt))
    return total / len(s) * tau * tau


def _hand_ce(s, labels):
    total = 0.0
    for row, y in zip(s, labels):
        total += math.log(sum(math.exp(v) for v in row)) - row[y]
    return total / len(s)


def test_distillation_losses_match_hand_computed_values():
    s = [[1.0, -0.5, 2.0, 0.25], [0.0, 3.0, -1.0, 1.5], [-2.0, 0.5, 0.5, 1.0]]
    t = [[0.5, 0.0, 2.5, -1.0], [1.0, 1.0, 0.0, 2.0], [0.0, -1.0, 3.0, 0.0]]
    labels = [2, 1, 3]
    st, tt, yt = torch.tensor(s), torch.tensor(t), torch.tensor(labels)
    teacher_argmax = [max(range(4), key=lambda j: row[j]) for row in t]  # [2, 3, 2]

    for tau in (1.0, 2.0, 4.0):
        assert soft_distillation(st, tt, tau).item() == pytest.approx(_hand_soft(s, t, tau), rel=1e-6)
    assert hard_distillation(st, tt).item() == pytest.approx(_hand_ce(s, teacher_argmax), rel=1e-6)

    teacher = _Const(tt)
    inputs = torch.zeros(3, 1)
    for kind, alpha, tau in (("soft", 0.5, 2.0), ("soft", 0.3, 1.0), ("hard", 0.5, 1.0), ("hard", 1.0, 1.0)):
        loss_fn = DistillationLoss(teacher, kind=kind, tau=tau, alpha=alpha)
        kd = _hand_soft(s, t, tau) if kind == "soft" else _hand_ce(s, teacher_argmax)
        expected = (1 - alpha) * _hand_ce(s, labels) + alpha * kd
        assert loss_fn(inputs, st, yt).item() == pytest.approx(expected, rel=1e-6), (kind, alpha, tau)
    # DeiT's distillation-token outputs: base loss on the first, distillation on the second.
    loss_fn = DistillationLoss(teacher, kind="hard", alpha=0.5)
    s2 = [[0.0, 0.0, 1.0, 0.0]] * 3
    expected = 0.5 * _hand_ce(s, labels) + 0.5 * _hand_ce(s2, teacher_argmax)
    assert loss_fn(inputs, (st, torch.tensor(s2)), yt).item() == pytest.approx(expected, rel=1e-6)


def test_distillation_teacher_is_frozen_and_in_eval_mode():
    teacher = _Const(torch.randn(4, 5)).train()
    loss_fn = DistillationLoss(teacher, kind="soft", tau=2.0, alpha=0.7).train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    student_logits = torch.randn(4, 5, requires_grad=True)
    loss = loss_fn(torch.zeros(4, 1), student_logits, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert teacher.calls == [False]
    assert student_logits.grad is not None and teacher.lin.weight.grad is None
    # Gradient of the soft term: alpha * tau * (softmax(s/tau) - softmax(t/tau)) / B (plus the CE part).
    s, t = student_logits.detach(), teacher.logits
    expected = 0.3 * (torch.softmax(s, -1) - F.one_hot(torch.arange(4), 5)) / 4 \
        + 0.7 * 2.0 * (torch.softmax(s / 2, -1) - torch.softmax(t / 2, -1)) / 4
    torch.testing.assert_close(student_logits.grad, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        DistillationLoss(teacher, kind="medium")
    with pytest.raises(ValueError):
        DistillationLoss(teacher, alpha=1.5)


def test_prepare_qat_converts_in_place_and_keeps_a_frozen_float_teacher():
    model = _TinyViT()
    float_sd = copy.deepcopy(model.state_dict())
    student, criterion = prepare_qat(model, kind="hard", alpha=0.5, attention_types=(TimmLayoutAttention,))
    assert student is model and isinstance(model.blocks[0]["attn"], BinaryAttention)
    teacher = criterion.teacher
    assert isinstance(teacher.blocks[0]["attn"], TimmLayoutAttention)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, float_sd[key])
    student_params = {id(p) for p in student.parameters()}
    assert not any(id(p) in student_params for p in teacher.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
