"""Retention (RetNet; RMT's two-sided 1-D decay): the chunk kernels of kernels/linear_attention.py with a per-head
decay (HAS_DECAY=True), identity feature map and no normaliser. No kernel code of its own: the causal linear
attention and retention are one chunkwise algorithm with decay 1 vs γ.

Notation: q, k: [B, H, N, DK]; v: [B, H, N, DV]; gamma: [H] (0 <= γ <= 1).
"""
from __future__ import annotations

import torch

from . import linear_attention as _la

# log2(γ) is clamped so that γ = 0 gives γ^0 = 1 and γ^n = 0 (0 * -inf would be NaN)
_MIN_LOG2 = -1.0e4


def log2_gamma(gamma: torch.Tensor) -> torch.Tensor:
    """[H] fp32 log2(γ) as the kernels take it."""
    return torch.log2(gamma.detach().float()).clamp(min=_MIN_LOG2).contiguous()


def retention_fwd(q, k, v, lg, s0, causal: bool, store_state: bool):
    """o [B, H, N, DV] (q's dtype) and, with store_state, the final state [B, H, DK, DV] fp32 (else empty).
    lg: log2_gamma(gamma); s0: [B, H, DK, DV] fp32 or None (causal only)."""
    o, _, st, _ = _la.chunk_fwd(q, k, v, lg, s0, None, 0, False, 0.0, not causal, store_state)
    return o, st


def retention_bwd(do, dst, q, k, v, lg, s0, o, causal: bool):
    """(dq, dk, dv, ds0 or None) of retention_fwd; dst: gradient of the final state or None."""
    dq, dk, dv, ds0, _ = _la.chunk_bwd(do, dst, None, q, k, v, lg, s0, None, o, None, 0, False, 0.0, not causal)
    return dq, dk, dv, ds0


def aot_cases():
    """Causal retention with states (RetNet), causal without, and RMT's two-sided form (two passes)."""
    cases = []
    for t, D in (("bf16", 64), ("fp16", 64), ("fp32", 64), ("bf16", 256)):
        cases += _la.chunk_cases(t, D, decay=True, fmap=0, norm=False, state=True, two_sided=False)
    cases += _la.chunk_cases("bf16", 64, decay=True, fmap=0, norm=False, state=False, two_sided=False)
    cases += _la.chunk_cases("bf16", 32, decay=True, fmap=0, norm=False, state=False, two_sided=True)
    return cases
