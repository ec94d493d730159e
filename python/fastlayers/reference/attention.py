"""Softmax attention with additive biases and masks in plain PyTorch: the oracle, the benchmark baseline and the
CPU path. It materialises the [B, H, N, M] scores on purpose: obviously right, not fast."""
from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32 math for fp16/bf16/fp32, fp64 stays fp64


def decay_bias(gamma: torch.Tensor, grid, dtype=torch.float32) -> torch.Tensor:
    """RMT's Manhattan decay [H, n, n] (n = h*w tokens, row-major on the h x w grid):
    bias[h, i, j] = (|row_i - row_j| + |col_i - col_j|) * log(gamma[h]). No gradient flows to gamma."""
    gh, gw = grid
    pos = torch.arange(gh * gw, device=gamma.device)
    row, col = pos // gw, pos % gw
    dist = (row[:, None] - row[None, :]).abs() + (col[:, None] - col[None, :]).abs()
    return dist.to(dtype)[None] * gamma.detach().to(dtype).log()[:, None, None]


def keep_mask(N: int, M: int, device, causal=False, chunk_size=None, key_padding_mask=None) -> torch.Tensor:
    """Which (query n, key m) pairs take part: [B or 1, 1, N, M] bool.
    causal: m <= n (top-left aligned, as SDPA's is_causal); chunk_size c: n // c == m // c;
    key_padding_mask [B, M]: True marks a padded key, which is ignored (nn.MultiheadAttention's convention)."""
    n = torch.arange(N, device=device)[:, None]
    m = torch.arange(M, device=device)[None, :]
    keep = torch.ones(N, M, dtype=torch.bool, device=device)
    if causal:
        keep = keep & (m <= n)
    if chunk_size is not None:
        keep = keep & (n // chunk_size == m // chunk_size)
    keep = keep[None, None]
    if key_padding_mask is not None:
        keep = keep & ~key_padding_mask[:, None, None, :]
    return keep


def attention(q, k, v, bias=None, *, causal=False, scale=None, rel_pos=None, decay=None, chunk_size=None,
              key_padding_mask=None):
    """out = softmax(scale * q k^T + bias + table[index] + decay, masked) v.

    q: [B, H, N, D]; k, v: [B, H, M, D]; bias: broadcastable to [B, H, N, M];
    rel_pos = (table [T, H], index [N, M] int): bias[h, n, m] = table[index[n, m], h];
    decay = (gamma [H], (gh, gw)) with N == M == gh*gw: see decay_bias;
    masks: see keep_mask. A query whose every key is masked (or has bias -inf) gets a zero output and zero
    gradients. Returns out [B, H, N, D] in q's dtype.
    """
    B, H, N, D = q.shape
    M = k.shape[2]
    cdt = _compute_dtype(q.dtype)
    scale = D ** -0.5 if scale is None else scale
    s = torch.matmul(q.to(cdt), k.to(cdt).transpose(-1, -2)) * scale  # [B, H, N, M]
    if bias is not None:
        s = s + bias.to(cdt)
    if rel_pos is not None:
        table, index = rel_pos
        s = s + table.to(cdt)[index.long()].permute(2, 0, 1)  # [T, H][N, M] -> [N, M, H] -> [H, N, M]
    if decay is not None:
        s = s + decay_bias(decay[0], decay[1], cdt)
    if causal or chunk_size is not None or key_padding_mask is not None:
        s = s.masked_fill(~keep_mask(N, M, q.device, causal, chunk_size, key_padding_mask), float("-inf"))
    dead = (s == float("-inf")).all(-1, keepdim=True)  # rows with no key: output 0, not NaN
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return torch.matmul(p, v.to(cdt)).to(q.dtype)
