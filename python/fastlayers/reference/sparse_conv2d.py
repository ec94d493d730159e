"""Sparse masked 2-D convolution as SparK defines it, in plain PyTorch: the oracle, the baseline and the CPU path.

mask: [B, 1, h, w] bool at the coarsest resolution (True = visible patch). At a feature map [.., H, W] it is
repeated block-wise (SparK's repeat_interleave by H // h and W // w); a pixel is active iff its patch is visible.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32 math for fp16/bf16/fp32, fp64 stays fp64


def _mask_tensor(mask) -> torch.Tensor:
    return getattr(mask, "mask", mask)  # a fastlayers SparseMask or the bool tensor itself


def upsample_mask(mask, H: int, W: int) -> torch.Tensor:
    """mask [B, 1, h, w] bool -> [B, 1, H, W] bool by nearest block repeat (H % h == 0 and W % w == 0)."""
    m = _mask_tensor(mask)
    h, w = m.shape[-2:]
    if H % h or W % w:
        raise ValueError(f"a feature map of {H}x{W} is not a whole number of {h}x{w} mask patches")
    return m.repeat_interleave(H // h, dim=2).repeat_interleave(W // w, dim=3)


def sparse_conv2d(x, mask, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """y = conv2d(x * m_in, weight, bias) * m_out, with m_in / m_out the mask at the input / output resolution.

    x: [B, C_in, H, W]; weight: [C_out, C_in/groups, KH, KW]; bias: [C_out] or None; mask: [B, 1, h, w] bool.
    Inactive inputs contribute nothing (even NaN: they are selected away, not multiplied by 0) and inactive
    outputs are exactly 0. Returns [B, C_out, Ho, Wo] in x.dtype.
    """
    cdt = _compute_dtype(x.dtype)
    m_in = upsample_mask(mask, x.shape[2], x.shape[3])
    xm = torch.where(m_in, x.to(cdt), 0.0)
    y = F.conv2d(xm, weight.to(cdt), bias.to(cdt) if bias is not None else None, stride, padding, dilation, groups)
    m_out = upsample_mask(mask, y.shape[2], y.shape[3])
    return torch.where(m_out, y, 0.0).to(x.dtype)


def masked(x, mask) -> torch.Tensor:
    """x [B, C, H, W] with its inactive pixels set to exactly 0 (SparK's `x *= active`)."""
    return torch.where(upsample_mask(mask, x.shape[2], x.shape[3]), x, 0.0)
