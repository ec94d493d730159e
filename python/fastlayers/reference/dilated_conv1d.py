"""Depthwise dilated 1-D convolution in plain PyTorch: the oracle, the benchmark baseline and the CPU path."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32 math for fp16/bf16/fp32, fp64 stays fp64


def dilated_conv1d(x, weight, bias=None, dilation=1, causal=True, activation=None, initial_state=None,
                   return_final_state=False):
    """y = act(conv1d(x, weight, dilation) + bias), one filter per channel.

    x: [B, C, L]; weight: [C, K]; bias: [C]; initial_state: [B, C, S] with S = (K-1)*dilation, the inputs that
    precede x (zeros when None; causal only). causal=True pads S on the left (output t sees inputs <= t);
    causal=False pads "same" (left S//2, right S - S//2, as F.conv1d(padding="same")).
    activation: None or "silu". Returns y [B, C, L] (x.dtype), and final_state [B, C, S] (the last S inputs of
    [initial_state, x]) when return_final_state.
    """
    B, C, L = x.shape
    K = weight.shape[-1]
    S = (K - 1) * dilation
    cdt = _compute_dtype(x.dtype)
    xc = x.to(cdt)
    w = weight.reshape(C, 1, K).to(cdt)
    b = bias.to(cdt) if bias is not None else None
    if causal:
        prev = initial_state.to(cdt) if initial_state is not None else xc.new_zeros(B, C, S)
        seq = torch.cat([prev, xc], dim=2)
        y = F.conv1d(seq, w, b, dilation=dilation, groups=C)
    else:
        seq = None
        y = F.conv1d(F.pad(xc, (S // 2, S - S // 2)), w, b, dilation=dilation, groups=C)
    if activation in ("silu", "swish"):
        y = F.silu(y)
    y = y.to(x.dtype)
    if not return_final_state:
        return y
    final = seq[:, :, seq.shape[2] - S:].to(x.dtype)
    return y, final


def dilated_conv1d_step(x_t, state, weight, bias=None, dilation=1, activation=None):
    """One decoding step. x_t: [B, C]; state: [B, C, S] (the last S inputs). Returns (y_t [B, C], new_state)."""
    B, C = x_t.shape
    K = weight.shape[-1]
    cdt = _compute_dtype(x_t.dtype)
    seq = torch.cat([state.to(cdt), x_t.to(cdt)[:, :, None]], dim=2)  # [B, C, S + 1]
    taps = seq[:, :, ::dilation] if dilation > 1 else seq               # the K inputs the filter sees
    y = (taps * weight.reshape(1, C, K).to(cdt)).sum(-1)
    if bias is not None:
        y = y + bias.to(cdt)
    if activation in ("silu", "swish"):
        y = F.silu(y)
    new_state = seq[:, :, 1:].to(state.dtype)
    return y.to(x_t.dtype), new_state
