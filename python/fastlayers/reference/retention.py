"""Retention (RetNet; RMT's 1-D decay) in plain PyTorch: the oracle, the benchmark baseline and the CPU path.

Notation: q, k: [B, H, N, Dk]; v: [B, H, N, Dv]; gamma: [H], 0 < γ <= 1 (RetNet: γ_h = 1 - 2^(-5-h)).
causal=True (RetNet's parallel form, equal to its recurrent and chunkwise forms):
    o_n = Σ_{m<=n} γ^(n-m) (q_n·k_m) v_m + γ^(n+1) q_n S0
  final state S = γ^N S0 + Σ_m γ^(N-1-m) k_mᵀ v_m [B, H, Dk, Dv] (fp32), i.e. the recurrence
  S_n = γ S_{n-1} + k_nᵀ v_n, o_n = q_n S_n started from S_{-1} = S0.
causal=False (RMT's decay along one axis): o_n = Σ_m γ^|n-m| (q_n·k_m) v_m; no state.
No scaling or normalisation inside: RetNet scales k by Dk^-0.5 and applies the group norm in the module.
gamma is a constant here (detached: no gradient), as in RetNet where the decays are fixed buffers.
"""
from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _log(gamma: torch.Tensor, dtype) -> torch.Tensor:
    """log γ, clamped so that γ = 0 gives γ^0 = 1 (0 * -inf would be NaN) and γ^n = 0."""
    return torch.log(gamma.detach().to(dtype)).clamp(min=-1.0e4)


def decay_matrix(gamma: torch.Tensor, N: int, causal: bool, dtype=torch.float32) -> torch.Tensor:
    """[H, N, N]: γ^(n-m) for m <= n (0 above the diagonal) when causal, γ^|n-m| otherwise."""
    idx = torch.arange(N, device=gamma.device, dtype=dtype)
    diff = idx[:, None] - idx[None, :]
    lg = _log(gamma, dtype)[:, None, None]
    if causal:
        return torch.where(diff >= 0, torch.exp(diff.clamp(min=0) * lg), torch.zeros((), dtype=dtype,
                                                                                       device=gamma.device))
    return torch.exp(diff.abs() * lg)


def retention(q, k, v, gamma, causal=True, initial_state=None, return_final_state=False):
    """Returns o [B, H, N, Dv] (q.dtype), and the final state [B, H, Dk, Dv] when return_final_state."""
    cdt = _compute_dtype(q.dtype)
    N = q.shape[2]
    Q, K, V = q.to(cdt), k.to(cdt), v.to(cdt)
    D = decay_matrix(gamma, N, causal, cdt)
    scores = Q @ K.transpose(-1, -2)
    if causal:  # masked, not multiplied by 0: a NaN in a later key stays out of earlier outputs
        scores = scores.masked_fill(~torch.ones(N, N, dtype=torch.bool, device=q.device).tril(), 0.0)
    o = (scores * D) @ V
    lg = _log(gamma, cdt)[:, None]  # [H, 1]
    if initial_state is not None:
        qdecay = torch.exp((torch.arange(N, device=q.device, dtype=cdt) + 1) * lg)  # γ^(n+1) [H, N]
        o = o + (Q * qdecay[..., None]) @ initial_state.to(cdt)
    o = o.to(q.dtype)
    if not return_final_state:
        return o
    kdecay = torch.exp((N - 1 - torch.arange(N, device=q.device, dtype=cdt)) * lg)  # γ^(N-1-m) [H, N]
    S = torch.einsum("bhnk,bhnv->bhkv", K * kdecay[..., None], V)
    if initial_state is not None:
        S = S + torch.exp(N * lg)[..., None] * initial_state.to(cdt)
    return o, S


def retention_step(q_t, k_t, v_t, gamma, state):
    """One decoding step. q_t, k_t: [B, H, Dk]; v_t: [B, H, Dv]; state: [B, H, Dk, Dv] (None = zeros).
    Returns (o_t [B, H, Dv], new_state): S = γ S + k_tᵀ v_t, o_t = q_t S."""
    cdt = _compute_dtype(q_t.dtype)
    g = gamma.detach().to(cdt)[:, None, None]
    S = k_t.to(cdt).unsqueeze(-1) * v_t.to(cdt).unsqueeze(-2)
    if state is not None:
        S = S + g * state.to(cdt)
    o = (q_t.to(cdt).unsqueeze(-2) @ S).squeeze(-2)
    return o.to(q_t.dtype), S
