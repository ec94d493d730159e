"""Halo attention (HaloNet's blocked local self-attention) in plain PyTorch: the oracle, the benchmark baseline
and the CPU path. Semantics are timm's HaloAttn / PosEmbedRel, written with explicit window indices.

Notation: q: [B, H, Dqk, Hq, Wq]; k: [B, H, Dqk, Hf, Wf]; v: [B, H, Dv, Hf, Wf]; b = block_size, h = halo_size,
s = query_stride, bq = b // s (query block side), win = b + 2h (key window side), Hq = Hf // s, Wq = Wf // s.
Query block (i, j) holds the queries [i*bq, (i+1)*bq) x [j*bq, (j+1)*bq) of the query map; it attends to the
keys of image rows [i*b - h, i*b + b + h) and columns [j*b - h, j*b + b + h). With s = 2 the queries are the
even image positions of the block (timm takes q from a stride-2 1x1 conv).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32 math for fp16/bf16/fp32, fp64 stays fp64


def _windows(t: torch.Tensor, b: int, h: int) -> torch.Tensor:
    """t: [B, H, D, Hf, Wf] -> [B, H, nby, nbx, win*win, D]: the zero-padded key window of every block."""
    win = b + 2 * h
    tp = F.pad(t, (h, h, h, h))
    w = tp.unfold(3, win, b).unfold(4, win, b)  # [B, H, D, nby, nbx, win, win]
    B, H, D, nby, nbx = w.shape[:5]
    return w.permute(0, 1, 3, 4, 5, 6, 2).reshape(B, H, nby, nbx, win * win, D)


def rel_logits(qb: torch.Tensor, height_rel: torch.Tensor, width_rel: torch.Tensor, bq: int, win: int):
    """HaloNet's factorised relative-position logits (timm PosEmbedRel, without its scale).

    qb: [..., bq*bq, D] queries of a block (row-major in the block); height_rel, width_rel: [2*win-1, D].
    Query (a, c) and window key (y, x) get qb·height_rel[y - a + win - 1] + qb·width_rel[x - c + win - 1].
    Returns [..., bq*bq, win*win].
    """
    pos = torch.arange(bq, device=qb.device)
    key = torch.arange(win, device=qb.device)
    idx = key[None, :] - pos[:, None] + win - 1                        # [bq, win]
    # per query row a: logits against every window row y, and per query column c against every window column x
    lh = torch.einsum("...aci,ayi->...acy", qb.unflatten(-2, (bq, bq)), height_rel[idx])
    lw = torch.einsum("...aci,cxi->...acx", qb.unflatten(-2, (bq, bq)), width_rel[idx])
    rel = lh[..., :, None] + lw[..., None, :]                          # [..., bq, bq, win, win]
    return rel.flatten(-4, -3).flatten(-2, -1)


def halo_attention(q, k, v, block_size, halo_size, rel_pos=None, scale=None, query_stride=1, mask_padding=False,
                   scale_pos_embed=False):
    """Blocked local attention: every bq x bq query block attends to its (b+2h) x (b+2h) key window.

    q: [B, H, Dqk, Hq, Wq], k: [B, H, Dqk, Hf, Wf], v: [B, H, Dv, Hf, Wf] (see the module docstring).
    logits = scale * q·k + ps * rel, ps = scale if scale_pos_embed else 1, rel from rel_pos = (height_rel,
    width_rel), each [2*win-1, Dqk] (see rel_logits). scale defaults to Dqk ** -0.5.
    Keys outside the image are zeros that take part in the softmax (timm); mask_padding=True excludes them.
    Returns [B, H, Dv, Hq, Wq] in q's dtype.
    """
    B, H, Dqk, Hq, Wq = q.shape
    Dv, Hf, Wf = v.shape[2:]
    b, h, s = block_size, halo_size, query_stride
    bq, win = b // s, b + 2 * h
    nby, nbx = Hf // b, Wf // b
    scale = Dqk ** -0.5 if scale is None else scale
    cdt = _compute_dtype(q.dtype)
    qb = q.to(cdt).reshape(B, H, Dqk, nby, bq, nbx, bq).permute(0, 1, 3, 5, 4, 6, 2).reshape(
        B, H, nby, nbx, bq * bq, Dqk)
    kw, vw = _windows(k.to(cdt), b, h), _windows(v.to(cdt), b, h)
    logits = (qb @ kw.transpose(-1, -2)) * scale                    # [B, H, nby, nbx, bq*bq, win*win]
    if rel_pos is not None:
        rel = rel_logits(qb, rel_pos[0].to(cdt), rel_pos[1].to(cdt), bq, win)
        logits = logits + rel * (scale if scale_pos_embed else 1.0)
    if mask_padding:
        inside = _windows(torch.ones(1, 1, 1, Hf, Wf, device=q.device), b, h)[0, 0, :, :, None, :, 0] > 0
        logits = logits.masked_fill(~inside, float("-inf"))
    out = logits.softmax(dim=-1) @ vw                               # [B, H, nby, nbx, bq*bq, Dv]
    out = out.reshape(B, H, nby, nbx, bq, bq, Dv).permute(0, 1, 6, 2, 4, 3, 5).reshape(B, H, Dv, Hq, Wq)
    return out.to(q.dtype)
