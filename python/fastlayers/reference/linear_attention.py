"""Linear attention in plain PyTorch: the oracle, the benchmark baseline and the CPU path.

Notation: q, k: [B, H, N, Dk]; v: [B, H, N, Dv]; φ the feature map ("relu", "elu1" = elu + 1, or None).
Non-causal: O = φ(Q) (φ(K)ᵀ V) / (φ(Q)·Σ_m φ(K_m) + eps)  (the division only with normalize).
Causal, the quadratic masked form:
    num_n = Σ_{m<=n} (φq_n·φk_m) v_m + φq_n S0,   den_n = Σ_{m<=n} φq_n·φk_m + φq_n·z0,
    o_n = num_n / (den_n + eps) with normalize, else num_n.
The state after the sequence: S = S0 + Σ_m φk_mᵀ v_m [B, H, Dk, Dv] and z = z0 + Σ_m φk_m [B, H, Dk] (fp32).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32 math for fp16/bf16/fp32, fp64 stays fp64


def phi(x: torch.Tensor, name) -> torch.Tensor:
    if name == "relu":
        return F.relu(x)
    if name == "elu1":
        return F.elu(x) + 1.0
    return x


def _split_state(state, normalize: bool):
    if state is None:
        return None, None
    if normalize:
        return state
    return state, None


def linear_attention(q, k, v, causal=False, feature_map="relu", normalize=True, eps=1e-6,
                     initial_state=None, return_final_state=False):
    """Returns o [B, H, N, Dv] (q.dtype), and with return_final_state (causal only) the final state: S, or
    (S, z) when normalize. initial_state: S [B, H, Dk, Dv], or (S, z [B, H, Dk]) when normalize."""
    cdt = _compute_dtype(q.dtype)
    Q = phi(q.to(cdt), feature_map)
    K = phi(k.to(cdt), feature_map)
    V = v.to(cdt)
    S0, z0 = _split_state(initial_state, normalize)
    if not causal:
        S = torch.einsum("bhnk,bhnv->bhkv", K, V)
        num = Q @ S
        den = Q @ K.sum(2).unsqueeze(-1)
    else:
        N = q.shape[2]
        mask = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
        A = (Q @ K.transpose(-1, -2)).masked_fill(~mask, 0.0)
        num = A @ V
        den = A.sum(-1, keepdim=True)
        if S0 is not None:
            num = num + Q @ S0.to(cdt)
            if normalize:
                den = den + Q @ z0.to(cdt).unsqueeze(-1)
    o = num / (den + eps) if normalize else num
    o = o.to(q.dtype)
    if not return_final_state:
        return o
    S = torch.einsum("bhnk,bhnv->bhkv", K, V)
    if S0 is not None:
        S = S + S0.to(cdt)
    if not normalize:
        return o, S
    z = K.sum(2)
    if z0 is not None:
        z = z + z0.to(cdt)
    return o, (S, z)


def linear_attention_step(q_t, k_t, v_t, state, feature_map="relu", normalize=True, eps=1e-6):
    """One token of causal decoding. q_t, k_t: [B, H, Dk]; v_t: [B, H, Dv]; state: S [B, H, Dk, Dv] (or (S, z)
    when normalize). Returns (o_t [B, H, Dv], new_state)."""
    cdt = _compute_dtype(q_t.dtype)
    Q = phi(q_t.to(cdt), feature_map)
    K = phi(k_t.to(cdt), feature_map)
    S0, z0 = _split_state(state, normalize)
    S = S0.to(cdt) + K.unsqueeze(-1) * v_t.to(cdt).unsqueeze(-2)
    o = (Q.unsqueeze(-2) @ S).squeeze(-2)
    if not normalize:
        return o.to(q_t.dtype), S
    z = z0.to(cdt) + K
    o = o / ((Q * z).sum(-1, keepdim=True) + eps)
    return o.to(q_t.dtype), (S, z)
