"""Modules over fastlayers.attention: Attention (timm's ViT attention) and WindowAttention (Swin), with the same
constructor arguments, parameter and buffer names as timm's, so state_dicts load unchanged; accelerate rules swap
timm's modules for them in place (parameters shared)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import patch
from ..ops.attention import attention


def _pair(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def _mask_to_bias(attn_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """SDPA's attn_mask (bool, True = attend; or additive float) as an additive bias."""
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(~attn_mask, float("-inf"))
    return attn_mask


class Attention(nn.Module):
    """Multi-head self-attention of timm's VisionTransformer (timm.layers.Attention) on the fused kernel.

    Same constructor arguments and submodules as timm's (qkv, q_norm, k_norm, norm, gate, proj): a timm
    checkpoint loads unchanged. forward(x [B, N, dim], attn_mask=None, is_causal=False) -> [B, N, dim_out];
    attn_mask as SDPA's (bool True = attend, or additive float; broadcastable to [B, H, N, N]); is_causal
    takes precedence over attn_mask, as in timm. Attention dropout (attn_drop > 0 in training) runs torch's
    SDPA instead of the fused kernel, which has no dropout.
    """

    def __init__(self, dim: int, num_heads: int = 8, attn_head_dim: Optional[int] = None,
                 dim_out: Optional[int] = None, qkv_bias: bool = False, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, gated: bool = False, attn_drop: float = 0.,
                 proj_drop: float = 0., norm_layer=None, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        dim_out = dim_out or dim
        head_dim = attn_head_dim
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"Attention: dim = {dim} must be divisible by num_heads = {num_heads}")
            head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("Attention: norm_layer must be given when qk_norm or scale_norm is True")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, N, hd] views of qkv: the kernel reads them without a copy
        q, k = self.q_norm(q), self.k_norm(k)  # under autocast the op casts q, k, v to one dtype, as SDPA does
        if self.training and self.attn_drop.p > 0:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=None if is_causal else attn_mask,
                                               dropout_p=self.attn_drop.p, is_causal=is_causal, scale=self.scale)
        else:
            bias = _mask_to_bias(attn_mask, q.dtype) if (attn_mask is not None and not is_causal) else None
            x = attention(q, k, v, bias, causal=is_causal, scale=self.scale)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)  # free: the kernel writes [B, N, H, hd]
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    @classmethod
    def from_timm(cls, m: nn.Module) -> "Attention":
        """An Attention sharing the submodules (weights) of a timm Attention."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads, new.head_dim = m.num_heads, m.head_dim
        new.attn_dim = getattr(m, "attn_dim", m.num_heads * m.head_dim)
        new.scale = m.scale
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop"):
            setattr(new, name, getattr(m, name))
        new.norm = getattr(m, "norm", None) or nn.Identity()
        new.gate = getattr(m, "gate", None)
        return new.train(m.training)


def relative_position_index(win_h: int, win_w: int, device=None) -> Tensor:
    """Swin's [win_h*win_w, win_h*win_w] index into the (2*win_h-1)*(2*win_w-1) relative-position table."""
    coords = torch.stack(torch.meshgrid(torch.arange(win_h, device=device), torch.arange(win_w, device=device),
                                        indexing="ij")).flatten(1)  # [2, Wh*Ww]
    rel = coords[:, :, None] - coords[:, None, :]  # [2, Wh*Ww, Wh*Ww]
    return (rel[0] + win_h - 1) * (2 * win_w - 1) + (rel[1] + win_w - 1)


class WindowAttention(nn.Module):
    """Swin's window attention (timm.models.swin_transformer.WindowAttention) on the fused kernel, with its
    learnable relative-position table gathered inside the kernel and its gradient reduced deterministically.

    Same constructor arguments, parameters (relative_position_bias_table, qkv, proj) and non-persistent buffer
    (relative_position_index) as timm's. forward(x [nW*B, N, dim], mask=None) with mask [nW, N, N] the additive
    shifted-window mask (window w of image b is row b*nW + w of x, as timm's window_partition orders them).
    With a mask, the windows are folded into the head axis ([B, nW*H, N, hd]) so the mask becomes a bias shared
    by the batch. Attention dropout in training runs torch's SDPA.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: Optional[int] = None, window_size=7,
                 qkv_bias: bool = True, attn_drop: float = 0., proj_drop: float = 0., device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.dim = dim
        self.window_size = _pair(window_size)
        win_h, win_w = self.window_size
        self.window_area = win_h * win_w
        self.num_heads = num_heads
        head_dim = head_dim or dim // num_heads
        attn_dim = head_dim * num_heads
        self.scale = head_dim ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * win_h - 1) * (2 * win_w - 1), num_heads,
                                                                     **dd))
        self.register_buffer("relative_position_index", relative_position_index(win_h, win_w, device=device),
                             persistent=False)
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(attn_dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=.02)

    def _rel_bias(self) -> Tensor:
        """[1, H, N, N] (for the dropout fallback only)."""
        t = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return t.reshape(self.window_area, self.window_area, -1).permute(2, 0, 1)[None]

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        B_, N, _ = x.shape
        H = self.num_heads
        qkv = self.qkv(x)
        hd = qkv.shape[-1] // (3 * H)
        table, index = self.relative_position_bias_table, self.relative_position_index
        if self.training and self.attn_drop.p > 0:
            q, k, v = qkv.reshape(B_, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
            bias = self._rel_bias().to(q.dtype)
            if mask is not None:
                nW = mask.shape[0]
                bias = (bias[:, None] + mask.to(q.dtype)[None, :, None]).expand(B_ // nW, -1, -1, -1, -1)
                bias = bias.reshape(B_, H, N, N)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p,
                                               scale=self.scale)
            x = o.transpose(1, 2).reshape(B_, N, H * hd)
        elif mask is None:
            q, k, v = qkv.reshape(B_, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)  # views, no copy
            o = attention(q, k, v, rel_pos=(table, index), scale=self.scale)
            x = o.transpose(1, 2).reshape(B_, N, H * hd)
        else:
            nW = mask.shape[0]
            B = B_ // nW
            # windows into heads: head w*H + h of image b; the mask [nW, N, N] becomes a [1, nW*H, N, N] bias
            q, k, v = qkv.reshape(B, nW, N, 3, H, hd).permute(3, 0, 1, 4, 2, 5).reshape(3, B, nW * H, N, hd).unbind(0)
            bias = mask.to(q.dtype)[:, None].expand(nW, H, N, N).reshape(1, nW * H, N, N)
            o = attention(q, k, v, bias, rel_pos=(table.repeat(1, nW), index), scale=self.scale)
            x = o.reshape(B, nW, H, N, hd).permute(0, 1, 3, 2, 4).reshape(B_, N, H * hd)
        return self.proj_drop(self.proj(x))

    @classmethod
    def from_timm(cls, m: nn.Module) -> "WindowAttention":
        """A WindowAttention sharing the parameters and buffers of a timm Swin WindowAttention."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.dim = getattr(m, "dim", m.qkv.in_features)
        new.window_size = tuple(m.window_size)
        new.window_area = new.window_size[0] * new.window_size[1]
        new.num_heads, new.scale = m.num_heads, m.scale
        new.relative_position_bias_table = m.relative_position_bias_table
        new.register_buffer("relative_position_index", m.relative_position_index, persistent=False)
        for name in ("qkv", "attn_drop", "proj", "proj_drop"):
            setattr(new, name, getattr(m, name))
        return new.train(m.training)


# ---------------------------------------------------------------------------------------------------------------
# accelerate rules: exact classes only (a subclass may change forward)

def _exact(*qualnames: str):
    def match(m: nn.Module) -> bool:
        return f"{type(m).__module__}.{type(m).__qualname__}" in qualnames
    return match


def _convert_timm_attention(m: nn.Module):
    if getattr(m, "head_dim", 0) > 256:
        return f"head_dim {m.head_dim} > 256"
    return Attention.from_timm(m)


def _convert_timm_window_attention(m: nn.Module):
    idx = getattr(m, "relative_position_index", None)
    if idx is None or tuple(idx.shape) != (m.window_size[0] * m.window_size[1],) * 2:
        return "no relative_position_index buffer of the window's size"
    return WindowAttention.from_timm(m)


patch.register("timm.Attention", _exact("timm.layers.attention.Attention", "timm.models.vision_transformer.Attention"),
               _convert_timm_attention)
patch.register("timm.swin.WindowAttention", _exact("timm.models.swin_transformer.WindowAttention"),
               _convert_timm_window_attention)


def examples(device) -> list:
    """Tiny (label, module, args) examples for generic compile/checkpoint/DDP tests."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 17, 48, generator=g).to(device)
    win = torch.randn(8, 16, 32, generator=g).to(device)  # 2 images x 4 windows of 4x4 tokens
    mask = torch.zeros(4, 16, 16)
    mask[1:, :8, 8:] = -100.0
    mask[1:, 8:, :8] = -100.0
    return [
        ("Attention", Attention(48, num_heads=3, qkv_bias=True).to(device), (x,)),
        ("Attention qk_norm", Attention(48, num_heads=2, qk_norm=True, norm_layer=nn.LayerNorm).to(device), (x,)),
        ("WindowAttention", WindowAttention(32, num_heads=2, window_size=4).to(device), (win,)),
        ("WindowAttention shifted", WindowAttention(32, num_heads=2, window_size=4).to(device),
         (win, mask.to(device))),
    ]
