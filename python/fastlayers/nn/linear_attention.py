"""SLAB's simplified linear attention (SLA) over fastlayers.linear_attention, a drop-in for Swin window attention.

Parameters are named as in SLAB's `SimplifiedLinearAttention` (classification/models/slab_swin.py), so its
checkpoints load unchanged: qkv, proj, dwc (depthwise conv on V over the window grid, one filter bank shared by the
heads), positional_encoding [1, Wh*Ww, dim] (added to k before the ReLU kernel).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .. import patch
from ..ops.linear_attention import linear_attention


def _pair(x) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, int) else (int(x[0]), int(x[1]))


class SimplifiedLinearAttention(nn.Module):
    """SLA (SLAB, Guo et al. 2024): o = ReLU(q) (ReLU(k)ᵀ v) / (ReLU(q)·Σ ReLU(k) + 1e-6) + DWC(v), then proj.

    Same constructor and parameters as SLAB's module: dim, window_size (Wh, Ww), num_heads, qkv_bias, qk_scale
    (unused by SLA, kept for the signature), attn_drop (unused by SLA, as in SLAB), proj_drop, focusing_factor
    (stored, unused by SLA), kernel_size of the depthwise conv.
    forward(x [B_, N, C], mask=None) with N = Wh*Ww (a window of tokens, row-major over the window grid). `mask`,
    Swin's shifted-window mask, is accepted and ignored, as SLAB's SLA does. The attention runs in fp32
    accumulation whatever the input dtype (SLAB disables autocast for it); the output has the input's dtype.
    """

    def __init__(self, dim: int, window_size, num_heads: int, qkv_bias: bool = True, qk_scale=None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, focusing_factor: float = 3, kernel_size: int = 5,
                 device=None, dtype=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"SimplifiedLinearAttention: dim={dim} must be divisible by num_heads={num_heads}")
        f = {"device": device, "dtype": dtype}
        self.dim = dim
        self.window_size = _pair(window_size)
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.focusing_factor = focusing_factor
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **f)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **f)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(head_dim, head_dim, kernel_size, groups=head_dim, padding=kernel_size // 2, **f)
        self.positional_encoding = nn.Parameter(
            torch.zeros(1, self.window_size[0] * self.window_size[1], dim, **f))

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        B, N, C = x.shape
        Wh, Ww = self.window_size
        if N != Wh * Ww or C != self.dim:
            raise ValueError(f"SimplifiedLinearAttention: x must be [B, Wh*Ww={Wh * Ww}, dim={self.dim}], "
                             f"got {tuple(x.shape)}")
        H, d = self.num_heads, C // self.num_heads
        q, k, v = self.qkv(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, d]
        k = k + self.positional_encoding.reshape(1, N, H, d).transpose(1, 2).to(k.dtype)
        o = linear_attention(q, k, v, feature_map="relu", normalize=True, eps=1e-6)  # [B, H, N, d]
        # depthwise conv of v over the window grid, the same filters for every head
        grid = v.reshape(B * H, N, d).transpose(1, 2).reshape(B * H, d, Wh, Ww)
        o = o + self.dwc(grid).reshape(B, H, d, N).transpose(2, 3).to(o.dtype)
        o = o.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(o))

    @classmethod
    def from_module(cls, m: nn.Module) -> "SimplifiedLinearAttention":
        """A SimplifiedLinearAttention sharing the parameters of SLAB's module (or any with the same names)."""
        Wh, Ww = _pair(m.window_size)
        new = cls(m.dim, (Wh, Ww), m.num_heads, qkv_bias=m.qkv.bias is not None,
                  proj_drop=getattr(m.proj_drop, "p", 0.0), focusing_factor=getattr(m, "focusing_factor", 3),
                  kernel_size=m.dwc.kernel_size[0], device="meta")
        new.qkv, new.proj, new.dwc = m.qkv, m.proj, m.dwc
        new.positional_encoding = m.positional_encoding
        new.attn_drop, new.proj_drop = m.attn_drop, m.proj_drop
        return new

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}"


def _is_slab_sla(m: nn.Module) -> bool:
    """SLAB's own SimplifiedLinearAttention (matched by name and parameters; SLAB need not be importable)."""
    return (type(m).__name__ == "SimplifiedLinearAttention" and not isinstance(m, SimplifiedLinearAttention)
            and all(hasattr(m, a) for a in ("qkv", "proj", "dwc", "positional_encoding", "window_size")))


def _convert_sla(m: nn.Module):
    if not isinstance(m.dwc, nn.Conv2d) or m.dwc.groups != m.dwc.in_channels:
        return "dwc is not a single depthwise Conv2d"
    return SimplifiedLinearAttention.from_module(m)


patch.register("slab.SimplifiedLinearAttention", _is_slab_sla, _convert_sla)


def examples(device) -> Sequence[tuple]:
    """Tiny (label, module, args) examples for the generic compile / checkpoint / DDP tests."""
    m = SimplifiedLinearAttention(16, 4, 2, kernel_size=3).to(device)
    return [("SimplifiedLinearAttention window 4x4", m, (torch.randn(3, 16, 16, device=device),))]
