"""HaloAttention: timm's HaloAttn (HaloNet) over the fused fastlayers.halo_attention, same parameters."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import patch
from ..ops.halo_attention import halo_attention


def _make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Round v to a multiple of divisor, not more than 10% below v (timm's make_divisible)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < round_limit * v else new_v


class RelPosEmbed(nn.Module):
    """HaloNet's factorised relative position table, named as timm's PosEmbedRel: `height_rel`, `width_rel`,
    each [2*win_size - 1, dim_head]. The logits are computed inside the attention kernel."""

    def __init__(self, block_size: int, win_size: int, dim_head: int, scale: float, device=None, dtype=None):
        super().__init__()
        self.block_size, self.dim_head, self.scale = block_size, dim_head, scale
        f = {"device": device, "dtype": dtype}
        self.height_rel = nn.Parameter(torch.empty(win_size * 2 - 1, dim_head, **f))
        self.width_rel = nn.Parameter(torch.empty(win_size * 2 - 1, dim_head, **f))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.height_rel, std=self.scale)
        nn.init.normal_(self.width_rel, std=self.scale)


class HaloAttention(nn.Module):
    """Halo attention (HaloNet): 1x1 conv projections, blocked local attention with a halo, factorised relative
    positions. Constructor arguments, attributes and parameters (`q`, `kv`, `pos_embed.height_rel`,
    `pos_embed.width_rel`) are timm.layers.HaloAttn's, so a timm checkpoint loads unchanged.

    x: [B, dim, H, W] with H, W multiples of block_size -> [B, dim_out, H/stride, W/stride]. stride=2 takes the
    queries at the even positions of each block (timm), or, with avg_down (or a block size not divisible by 2),
    attends at full resolution and average-pools. mask_padding (keyword, not in timm): exclude the zero keys
    outside the image from the softmax instead of attending to them as timm does.
    A channels-last input (x.to(memory_format=torch.channels_last)) gives the kernel its coalesced layout; an
    NCHW input is read in place too. The output keeps the input's memory format.
    """

    def __init__(self, dim: int, dim_out: Optional[int] = None, feat_size: Optional[Tuple[int, int]] = None,
                 stride: int = 1, num_heads: int = 8, dim_head: Optional[int] = None, block_size: int = 8,
                 halo_size: int = 3, qk_ratio: float = 1.0, qkv_bias: bool = False, avg_down: bool = False,
                 scale_pos_embed: bool = False, device=None, dtype=None, *, mask_padding: bool = False):
        super().__init__()
        dim_out = dim_out or dim
        if dim_out % num_heads:
            raise ValueError(f"HaloAttention: dim_out = {dim_out} must be divisible by num_heads = {num_heads}")
        if stride not in (1, 2):
            raise ValueError(f"HaloAttention: stride must be 1 or 2, got {stride}")
        f = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.dim_head_qk = dim_head or _make_divisible(dim_out * qk_ratio, divisor=8) // num_heads
        self.dim_head_v = dim_out // num_heads
        self.dim_out_qk = num_heads * self.dim_head_qk
        self.dim_out_v = num_heads * self.dim_head_v
        self.scale = self.dim_head_qk ** -0.5
        self.scale_pos_embed = scale_pos_embed
        self.block_size = self.block_size_ds = block_size
        self.halo_size = halo_size
        self.win_size = block_size + halo_size * 2
        self.block_stride = 1
        self.mask_padding = mask_padding
        use_avg_pool = False
        if stride > 1:
            use_avg_pool = avg_down or block_size % stride != 0
            self.block_stride = 1 if use_avg_pool else stride
            self.block_size_ds = block_size // self.block_stride
        self.q = nn.Conv2d(dim, self.dim_out_qk, 1, stride=self.block_stride, bias=qkv_bias, **f)
        self.kv = nn.Conv2d(dim, self.dim_out_qk + self.dim_out_v, 1, bias=qkv_bias, **f)
        self.pos_embed = RelPosEmbed(self.block_size_ds, self.win_size, self.dim_head_qk, self.scale, **f)
        self.pool = nn.AvgPool2d(2, 2) if use_avg_pool else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.q.weight.shape[1] ** -0.5  # fan-in, as timm
        nn.init.trunc_normal_(self.q.weight, std=std)
        nn.init.trunc_normal_(self.kv.weight, std=std)
        nn.init.trunc_normal_(self.pos_embed.height_rel, std=self.scale)
        nn.init.trunc_normal_(self.pos_embed.width_rel, std=self.scale)

    def forward(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        if H % self.block_size or W % self.block_size:
            raise ValueError(f"HaloAttention: the feature size {(H, W)} must be a multiple of block_size = "
                             f"{self.block_size}")
        nh, dqk, dv = self.num_heads, self.dim_head_qk, self.dim_head_v
        q = self.q(x).unflatten(1, (nh, dqk))                                  # [B, nh, dqk, H/s, W/s], a view
        k, v = self.kv(x).unflatten(1, (nh, dqk + dv)).split([dqk, dv], dim=2)  # views of one kv tensor
        rel = (self.pos_embed.height_rel.to(q.dtype), self.pos_embed.width_rel.to(q.dtype))
        out = halo_attention(q, k, v, block_size=self.block_size, halo_size=self.halo_size, rel_pos=rel,
                             scale=self.scale, query_stride=self.block_stride, mask_padding=self.mask_padding,
                             scale_pos_embed=self.scale_pos_embed)
        return self.pool(out.flatten(1, 2))

    @classmethod
    def from_timm(cls, m: nn.Module, mask_padding: bool = False) -> "HaloAttention":
        """A HaloAttention sharing the parameters (not copies) of a timm HaloAttn."""
        new = cls(m.q.in_channels, m.dim_out_v, None, 1, m.num_heads, m.dim_head_qk, m.block_size, m.halo_size,
                  qkv_bias=m.q.bias is not None, scale_pos_embed=m.scale_pos_embed, device="meta",
                  mask_padding=mask_padding)
        # the stride settings follow the timm module's (its constructor argument is not kept)
        new.block_stride, new.block_size_ds = m.block_stride, m.block_size_ds
        new.q, new.kv, new.pool = m.q, m.kv, m.pool
        new.pos_embed.block_size = m.block_size_ds
        new.pos_embed.height_rel, new.pos_embed.width_rel = m.pos_embed.height_rel, m.pos_embed.width_rel
        new.scale = m.scale
        return new

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, dim_head_qk={self.dim_head_qk}, dim_head_v={self.dim_head_v}, "
                f"block_size={self.block_size}, halo_size={self.halo_size}, block_stride={self.block_stride}, "
                f"scale_pos_embed={self.scale_pos_embed}, mask_padding={self.mask_padding}")


def _convert_timm(m: nn.Module):
    needed = ("q", "kv", "pos_embed", "pool", "num_heads", "dim_head_qk", "dim_head_v", "block_size",
              "block_size_ds", "block_stride", "halo_size", "scale", "scale_pos_embed")
    missing = [a for a in needed if not hasattr(m, a)]
    if missing:
        return f"unknown HaloAttn version (no {', '.join(missing)})"
    return HaloAttention.from_timm(m)


patch.register("timm.HaloAttn", patch.class_is("timm.layers.halo_attn.HaloAttn"), _convert_timm)


def examples(device):
    """Tiny (label, module, args) examples for generic compile / checkpoint / DDP tests."""
    g = torch.Generator().manual_seed(0)

    def x(*shape):
        return torch.randn(*shape, generator=g).to(device)
    return [
        ("HaloAttention b4 h1", HaloAttention(16, num_heads=2, block_size=4, halo_size=1).to(device),
         (x(2, 16, 8, 8),)),
        ("HaloAttention stride 2, dim_head", HaloAttention(8, 16, stride=2, num_heads=2, dim_head=8, block_size=4,
                                                           halo_size=2, scale_pos_embed=True).to(device),
         (x(1, 8, 8, 12),)),
    ]
