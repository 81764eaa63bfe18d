"""Training-facing modules: 1-bit QK attention as a drop-in for timm's ViT ``Attention``.

``BinaryAttention`` keeps timm's parameter layout (``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``gate``,
``proj``) so a timm / DeiT checkpoint loads into it unchanged, and replaces the float ``softmax(q k^T) v``
with ``binformer.attention`` on ``sign(q)``, ``sign(k)`` (SPEC.md section 2). The module serves the two
methods of SPEC.md section 1:

* BinaryAttention (Xiao et al.): ``magnitude="per_head"`` passes ``alpha_q = mean |q|`` over each
  (batch, head) as ``q_scale`` (``k`` likewise) so the magnitudes get their gradient, ``rel_pos_grid``
  adds a learnable relative-position bias table, ``grad_mode="ste"`` (straight-through to q and k).
* BinaryFormer (Heinrich): ``token_weights=True`` predicts a per-token weight for every query and key
  with a small per-head MLP over ``concat(tanh(q), sign(q))`` and passes it as ``q_scale`` / ``k_scale``
  ``[B, H, N]``; ``grad_mode`` then defaults to ``"hamming"`` (no gradient through the signs: q and k
  learn only through the weight MLP).

``convert(model)`` swaps every timm ``Attention`` of a VisionTransformer for a ``BinaryAttention`` in place.
"""

from __future__ import annotations

import inspect
from typing import Callable, Iterable, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

import binformer as _binformer  # the op is looked up at call time: binformer/__init__ may import us

__all__ = ["BinaryAttention", "TokenWeightMLP", "convert", "rel_pos_table_size", "timm_attention_types"]

_MAGNITUDES = ("per_head", None)
_GRAD_MODES = ("ste", "hamming")


def _pair(grid: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(grid, int):
        return grid, grid
    grid = tuple(int(g) for g in grid)
    if len(grid) != 2:
        raise ValueError(f"rel_pos_grid must be an int or a (height, width) pair, got {grid}")
    return grid  # type: ignore[return-value]


def rel_pos_table_size(grid: Union[int, Sequence[int]]) -> int:
    """Entries per head of the relative-position table of a ``Wh x Ww`` grid: ``(2Wh-1)(2Ww-1) + 3``
    (the last three are cls->patch, patch->cls and cls->cls; SPEC.md section 1)."""
    wh, ww = _pair(grid)
    return (2 * wh - 1) * (2 * ww - 1) + 3


class TokenWeightMLP(nn.Module):
    """BinaryFormer's learned per-token weights: one small MLP per head (a grouped MLP).

    For head ``h`` and token ``n`` the input is ``concat(tanh(x[n]), sign(x[n]))`` (``2 * head_dim``
    features, the softened value and its binarisation), the output one scalar. The sign half is a
    constant (no gradient); the ``tanh`` half is how q and k receive their gradient in "hamming" mode.

    Initialisation: the first layer is ``trunc_normal(std=0.02)``, the second ``trunc_normal(std=0.02)``
    with bias 1, so every weight starts at ~1 (the module starts as plain sign attention) while every
    parameter receives a gradient from the first step.
    """

    def __init__(self, num_heads: int, head_dim: int, hidden: int, *, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_heads, self.head_dim, self.hidden = num_heads, head_dim, hidden
        self.fc1_weight = nn.Parameter(torch.empty(num_heads, 2 * head_dim, hidden, **dd))
        self.fc1_bias = nn.Parameter(torch.empty(num_heads, hidden, **dd))
        self.fc2_weight = nn.Parameter(torch.empty(num_heads, hidden, **dd))
        self.fc2_bias = nn.Parameter(torch.empty(num_heads, **dd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.fc1_weight, std=0.02)
        nn.init.zeros_(self.fc1_bias)
        nn.init.trunc_normal_(self.fc2_weight, std=0.02)
        nn.init.ones_(self.fc2_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, H, N, head_dim]`` -> weights ``[B, H, N]`` (fp32)."""
        if x.shape[1] != self.num_heads or x.shape[-1] != self.head_dim:
            raise ValueError(f"TokenWeightMLP expects [B, {self.num_heads}, N, {self.head_dim}], "
                             f"got {list(x.shape)}")
        x = x.float()
        sign = torch.where(x < 0, -1.0, 1.0).to(x.dtype)  # the kernel's rule: zero -> +1
        features = torch.cat((torch.tanh(x), sign), dim=-1)  # [B, H, N, 2d]
        w1, b1 = self.fc1_weight.float(), self.fc1_bias.float()
        hidden = F.gelu(torch.einsum("bhnc,hcj->bhnj", features, w1) + b1[:, None, :])
        return torch.einsum("bhnj,hj->bhn", hidden, self.fc2_weight.float()) + self.fc2_bias.float()[:, None]

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, hidden={self.hidden}"


class BinaryAttention(nn.Module):
    """Multi-head self-attention with 1-bit queries and keys; a drop-in for timm's ``Attention``.

    The first arguments and the submodule names match ``timm.layers.Attention`` (``qkv``, ``q_norm``,
    ``k_norm``, ``norm``, ``gate``, ``proj``), and so does ``forward(x, attn_mask=None, is_causal=False)``,
    so the module can be passed as ``attn_layer`` to timm's ``Block`` / ``VisionTransformer``
    (``BinaryAttention.with_options(...)`` binds the binary options) and a timm state_dict loads into it with ``strict=True``: parameters timm does not
    have (the relative-position table, the token-weight MLP) keep their initial values when the
    checkpoint lacks all of them (table zeros: no bias; token weights ~1).

    Binary options (keyword only):
      rel_pos_grid: ``(Wh, Ww)`` patch grid for a learnable relative-position bias table
        ``[num_heads, (2Wh-1)(2Ww-1)+3]`` (zeros at start). The token count must then be
        ``num_prefix_tokens + Wh*Ww``; ``None`` (default): no table, any token count.
      num_prefix_tokens: cls tokens before the patches (0 or 1) for the relative-position index.
      magnitude: ``"per_head"``: ``alpha = mean |x|`` per (batch, head) scales sign(q) and sign(k)
        (BinaryAttention); ``None``: no magnitude.
      token_weights: learn BinaryFormer's per-token weights (``TokenWeightMLP``); they multiply the
        per-head magnitude when both are on.
      token_weight_hidden: hidden width per head of the token-weight MLP (default ``max(8, head_dim//2)``).
      pv_int8: 8-bit P.V in the kernel (SPEC.md section 1; differentiated straight through).
      grad_mode: ``"ste"`` (straight-through to q, k where ``|x| <= 1``) or ``"hamming"`` (none through
        the signs). Default: ``"hamming"`` with token weights, ``"ste"`` otherwise.

    Attention-probability dropout has no place in the fused kernel: ``attn_drop`` must be 0.
    """

    fused_attn: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            *,
            attn_head_dim: Optional[int] = None,
            dim_out: Optional[int] = None,
            scale_norm: bool = False,
            proj_bias: bool = True,
            gated: bool = False,
            norm_layer: Optional[Callable[..., nn.Module]] = None,
            rel_pos_grid: Optional[Union[int, Sequence[int]]] = None,
            num_prefix_tokens: int = 1,
            magnitude: Optional[str] = "per_head",
            token_weights: bool = False,
            token_weight_hidden: Optional[int] = None,
            pv_int8: bool = False,
            grad_mode: Optional[str] = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        head_dim = attn_head_dim
        if head_dim is None:
            if dim % num_heads != 0:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
            head_dim = dim // num_heads
        if attn_drop != 0.:
            raise ValueError("BinaryAttention: attention-probability dropout (attn_drop="
                             f"{attn_drop}) is not supported by the fused binary kernel; use attn_drop=0")
        if magnitude not in _MAGNITUDES:
            raise ValueError(f"magnitude must be one of {_MAGNITUDES}, got {magnitude!r}")
        if grad_mode is None:
            grad_mode = "hamming" if token_weights else "ste"
        if grad_mode not in _GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {_GRAD_MODES}, got {grad_mode!r}")
        if (qk_norm or scale_norm) and norm_layer is None:
            norm_layer = nn.LayerNorm  # timm < 1.0 default

        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim ** -0.5
        self.fused_attn = True  # always the fused binary kernel (timm code reads this attribute)

        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(0.)  # kept for attribute compatibility; never active
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

        self.magnitude = magnitude
        self.grad_mode = grad_mode
        self.pv_int8 = bool(pv_int8)
        self.num_prefix_tokens = int(num_prefix_tokens)
        if rel_pos_grid is not None:
            self.rel_pos_grid: Optional[Tuple[int, int]] = _pair(rel_pos_grid)
            if self.num_prefix_tokens not in (0, 1):
                raise ValueError("the relative-position bias supports 0 or 1 prefix (cls) tokens, got "
                                 f"num_prefix_tokens={num_prefix_tokens}")
            table_param = torch.zeros(num_heads, rel_pos_table_size(self.rel_pos_grid),
                                      device=device, dtype=torch.float32)
            self.rel_pos_table = nn.Parameter(table_param)
        else:
            self.rel_pos_grid = None
            self.register_parameter("rel_pos_table", None)
        if token_weights:
            hidden = token_weight_hidden or max(8, head_dim // 2)
            self.q_weight = TokenWeightMLP(num_heads, head_dim, hidden, device=device)
            self.k_weight = TokenWeightMLP(num_heads, head_dim, hidden, device=device)
        else:
            self.q_weight = None
            self.k_weight = None

    @classmethod
    def with_options(cls, **options) -> Type["BinaryAttention"]:
        """A subclass whose constructor defaults to ``options``: for timm's ``attn_layer``, which must be
        a class (``functools.partial`` is refused by timm's ``issubclass`` check), e.g.
        ``VisionTransformer(..., attn_layer=BinaryAttention.with_options(rel_pos_grid=(14, 14)))``."""
        accepted = inspect.signature(cls.__init__).parameters
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise TypeError(f"{cls.__name__}.with_options: unknown option(s) {unknown}")
        base_init = cls.__init__

        def __init__(self, *args, **kwargs):
            base_init(self, *args, **{**options, **kwargs})

        return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                           "__qualname__": cls.__qualname__, "default_options": dict(options)})

    # ------------------------------------------------------------------ construction from float

    @classmethod
    def from_float(cls, attn: nn.Module, **binary_options) -> "BinaryAttention":
        """A ``BinaryAttention`` that takes over ``attn``'s submodules (shared, not copied: ``qkv``,
        ``q_norm``, ``k_norm``, ``norm``, ``gate``, ``proj``, ``proj_drop``), for any module with timm's
        ``Attention`` layout. New parameters are created on ``attn``'s device."""
        for name in ("qkv", "proj", "num_heads", "head_dim"):
            if not hasattr(attn, name):
                raise TypeError(f"{type(attn).__name__} lacks '{name}': not a timm-style Attention")
        attn_drop = getattr(attn, "attn_drop", None)
        if isinstance(attn_drop, nn.Dropout) and attn_drop.p != 0.:
            raise ValueError(f"{type(attn).__name__} uses attention dropout p={attn_drop.p}, which the "
                             "fused binary kernel does not support; set it to 0 before converting")
        qkv: nn.Linear = attn.qkv
        dim = qkv.in_features
        num_heads, head_dim = int(attn.num_heads), int(attn.head_dim)
        if qkv.out_features != 3 * num_heads * head_dim:
            raise ValueError(f"{type(attn).__name__}.qkv has {qkv.out_features} outputs, expected "
                             f"3 * {num_heads} heads * {head_dim}")
        if float(getattr(attn, "scale", head_dim ** -0.5)) != head_dim ** -0.5:
            raise ValueError(f"{type(attn).__name__} uses a non-default softmax scale; not supported")
        new = cls(dim, num_heads, qkv_bias=False, attn_head_dim=head_dim, proj_bias=False,
                  device=qkv.weight.device, **binary_options)
        def submodule(name: str, default: Optional[nn.Module]) -> Optional[nn.Module]:
            m = getattr(attn, name, None)  # older timm versions lack norm / gate
            return default if m is None else m

        new.qkv = qkv
        new.q_norm = submodule("q_norm", nn.Identity())
        new.k_norm = submodule("k_norm", nn.Identity())
        new.norm = submodule("norm", nn.Identity())
        new.gate = submodule("gate", None)
        new.proj = attn.proj
        new.proj_drop = submodule("proj_drop", nn.Dropout(0.))
        return new.train(attn.training)

    # ------------------------------------------------------------------ checkpoint compatibility

    def _binary_only_parameters(self) -> Iterable[Tuple[str, torch.Tensor]]:
        """(state_dict name relative to this module, tensor) of every parameter timm lacks."""
        if self.rel_pos_table is not None:
            yield "rel_pos_table", self.rel_pos_table
        for mlp_name in ("q_weight", "k_weight"):
            mlp = getattr(self, mlp_name)
            if mlp is not None:
                for name, p in mlp.named_parameters():
                    yield f"{mlp_name}.{name}", p

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A float checkpoint (timm / DeiT) has none of the binary-only parameters: keep their initial
        # values by supplying them. A checkpoint with only some of them is corrupt and still reported.
        # (Children are loaded from this same dict after this call, so the MLP entries reach them.)
        own = list(self._binary_only_parameters())
        if own and not any(prefix + name in state_dict for name, _ in own):
            for name, tensor in own:
                state_dict[prefix + name] = tensor.detach()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # ------------------------------------------------------------------ forward

    def _check_tokens(self, n: int) -> None:
        if self.rel_pos_grid is None:
            return
        wh, ww = self.rel_pos_grid
        expected = self.num_prefix_tokens + wh * ww
        if n != expected:
            raise ValueError(
                f"BinaryAttention has a relative-position table for a {wh}x{ww} patch grid with "
                f"{self.num_prefix_tokens} prefix token(s), i.e. {expected} tokens, but got {n} tokens "
                "(another image size, dynamic image size, or extra register tokens?). Build the module "
                "with the matching rel_pos_grid, or rel_pos_grid=None for any token count.")

    def _scales(self, q: torch.Tensor, k: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """q_scale, k_scale for the op (fp32, broadcastable to [B, H, N]), differentiable."""
        q_scale = k_scale = None
        if self.magnitude == "per_head":
            # alpha = mean |x| over the head's N x d entries: [B, H, 1]; its gradient reaches q, k.
            q_scale = q.float().abs().mean(dim=(-2, -1)).unsqueeze(-1)
            k_scale = k.float().abs().mean(dim=(-2, -1)).unsqueeze(-1)
        if self.q_weight is not None:
            q_w, k_w = self.q_weight(q), self.k_weight(k)  # [B, H, N]
            q_scale = q_w if q_scale is None else q_scale * q_w
            k_scale = k_w if k_scale is None else k_scale * k_w
        return q_scale, k_scale

    @staticmethod
    def _mask_to_bias(attn_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if attn_mask is None:
            return None
        if attn_mask.dtype == torch.bool:  # SDPA convention: True = attend
            return torch.zeros(attn_mask.shape, dtype=torch.float32, device=attn_mask.device) \
                .masked_fill_(~attn_mask, float("-inf"))
        return attn_mask

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        self._check_tokens(N)
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q_scale, k_scale = self._scales(q, k)
        table = self.rel_pos_table.float() if self.rel_pos_table is not None else None
        x = _binformer.attention(
            q, k, v,
            q_scale=q_scale, k_scale=k_scale,
            bias=self._mask_to_bias(attn_mask),
            rel_pos_table=table,
            rel_pos_grid=self.rel_pos_grid if table is not None else None,
            num_prefix_tokens=self.num_prefix_tokens if table is not None else 0,
            scale=self.scale,
            is_causal=is_causal,
            pv_int8=self.pv_int8,
            grad_mode=self.grad_mode,
        )
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        return self.proj_drop(x)

    def extra_repr(self) -> str:
        parts = [f"num_heads={self.num_heads}", f"head_dim={self.head_dim}",
                 f"magnitude={self.magnitude!r}", f"grad_mode={self.grad_mode!r}"]
        if self.rel_pos_grid is not None:
            parts.append(f"rel_pos_grid={self.rel_pos_grid}, num_prefix_tokens={self.num_prefix_tokens}")
        if self.q_weight is not None:
            parts.append("token_weights=True")
        if self.pv_int8:
            parts.append("pv_int8=True")
        return ", ".join(parts)


# ---------------------------------------------------------------------------------------- convert

def timm_attention_types() -> Tuple[Type[nn.Module], ...]:
    """timm's plain ViT ``Attention`` class(es), or ``()`` when timm cannot be imported."""
    try:
        from timm.layers import Attention  # timm >= 0.9
    except Exception:  # noqa: BLE001 - timm missing or broken (e.g. no torchvision): nothing to convert
        try:
            from timm.models.vision_transformer import Attention  # type: ignore[no-redef]
        except Exception:  # noqa: BLE001
            return ()
    return (Attention,)


def _infer_grid(model: nn.Module) -> Optional[Tuple[int, int]]:
    patch_embed = getattr(model, "patch_embed", None)
    grid = getattr(patch_embed, "grid_size", None)
    if grid is None:
        return None
    if getattr(patch_embed, "dynamic_img_size", False) or getattr(model, "dynamic_img_size", False):
        raise ValueError("convert(rel_pos=True): the model uses dynamic_img_size, so the patch grid is "
                         "not fixed; pass rel_pos=False")
    return _pair(grid)


def convert(
        model: nn.Module,
        *,
        rel_pos: bool = True,
        magnitude: Optional[str] = "per_head",
        token_weights: bool = False,
        token_weight_hidden: Optional[int] = None,
        pv_int8: bool = False,
        grad_mode: Optional[str] = None,
        grid_size: Optional[Union[int, Sequence[int]]] = None,
        num_prefix_tokens: Optional[int] = None,
        attention_types: Optional[Sequence[Type[nn.Module]]] = None,
) -> nn.Module:
    """Replace, in place, every timm ``Attention`` of ``model`` by a ``BinaryAttention`` that reuses
    its weights (the same ``qkv`` / ``proj`` / norm modules). Returns ``model``.

    rel_pos: add a relative-position bias table per layer (zeros); the grid comes from
      ``model.patch_embed.grid_size`` and the prefix count from ``model.num_prefix_tokens`` unless
      ``grid_size`` / ``num_prefix_tokens`` are given.
    magnitude, token_weights, token_weight_hidden, pv_int8, grad_mode: as in ``BinaryAttention``.
    attention_types: the module classes to replace (exact type match; default timm's ``Attention``);
      any class with timm's layout (``qkv``, ``proj``, ``num_heads``, ``head_dim``) works.
    """
    types = tuple(attention_types) if attention_types is not None else timm_attention_types()
    if not types:
        raise RuntimeError("convert: timm cannot be imported, so there is no timm Attention to replace; "
                           "pass attention_types=(YourAttention,) for a timm-style model of your own")
    targets = [(name, m) for name, m in model.named_modules() if type(m) in types]
    if not targets:
        raise ValueError(f"convert: no module of type {[t.__name__ for t in types]} in the model")
    options = dict(magnitude=magnitude, token_weights=token_weights,
                   token_weight_hidden=token_weight_hidden, pv_int8=pv_int8, grad_mode=grad_mode)
    if rel_pos:
        grid = _pair(grid_size) if grid_size is not None else _infer_grid(model)
        if grid is None:
            raise ValueError("convert(rel_pos=True): cannot infer the patch grid (no "
                             "model.patch_embed.grid_size); pass grid_size=(Wh, Ww) or rel_pos=False")
        prefix = num_prefix_tokens if num_prefix_tokens is not None else \
            int(getattr(model, "num_prefix_tokens", 1))
        if prefix not in (0, 1):
            raise ValueError(f"convert(rel_pos=True): the model has {prefix} prefix tokens (cls + register "
                             "tokens?); the relative-position bias supports 0 or 1; pass rel_pos=False")
        options.update(rel_pos_grid=grid, num_prefix_tokens=prefix)
    for name, attn in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not child_name:
            raise ValueError("convert: the model itself is an Attention; use BinaryAttention.from_float")
        setattr(parent, child_name, BinaryAttention.from_float(attn, **options))
    return model
