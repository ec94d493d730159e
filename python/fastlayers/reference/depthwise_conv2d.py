"""Depthwise 2-D convolution in plain PyTorch: the oracle, the benchmark baseline and the CPU path."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def depthwise_conv2d(x, weight, bias=None, *, padding="same", dilation=1, stride=1):
    """y = F.conv2d(x, weight, bias, stride, padding, dilation, groups=C), one filter per channel.

    x: [B, C, H, W]; weight: [C, 1, Kh, Kw]; bias: [C] | None; padding: "same" | "valid" | int | (ph, pw)
    (torch's rules: "same" puts an odd remainder at the bottom/right); dilation, stride: int | (h, w).
    Returns y [B, C, OH, OW] in x.dtype and x's memory format. fp32 math (fp64 stays fp64).
    """
    cdt = torch.promote_types(x.dtype, torch.float32)
    b = bias.to(cdt) if bias is not None else None
    y = F.conv2d(x.to(cdt), weight.to(cdt), b, stride=stride, padding=padding, dilation=dilation,
                 groups=x.shape[1]).to(x.dtype)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return y.contiguous(memory_format=torch.channels_last) if channels_last else y.contiguous()
