"""Mamba's selective state-space scan in plain PyTorch: the oracle, the benchmark baseline and the CPU path.

Notation: u, delta, z: [B, D, L]; A: [D, N]; B and C each either [D, N] (fixed), [B, N, L] (input-dependent) or
[B, G, N, L] (grouped: channel d reads group d // (D // G)); D, delta_bias: [D]; state x: [B, D, N].
The recurrence, per time step t (fp32 math; fp64 stays fp64):
    dt_t = softplus(delta_t + delta_bias) (or without softplus / bias)
    x_t  = exp(dt_t * A) * x_{t-1} + dt_t * B_t * u_t
    y_t  = sum_n C_t[n] * x_t[n] + D * u_t,   out_t = y_t * silu(z_t)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _at(M: torch.Tensor, t: int, Bsz: int, Dm: int, cdt: torch.dtype) -> torch.Tensor:
    """B or C at time t, broadcastable to [B, D, N]."""
    if M.dim() == 2:                                  # fixed [D, N]
        return M.to(cdt)
    if M.dim() == 3:                                  # [B, N, L]
        return M[:, None, :, t].to(cdt)
    G, N = M.shape[1], M.shape[2]                     # [B, G, N, L] -> each group serves D // G channels
    return M[:, :, None, :, t].to(cdt).expand(Bsz, G, Dm // G, N).reshape(Bsz, Dm, N)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None):
    """The selective scan of mamba_ssm's selective_scan_fn, as a plain sequential loop over time.

    u, delta: [B, D, L]; A: [D, N]; B, C: [D, N] | [B, N, L] | [B, G, N, L]; D, delta_bias: [D]; z: [B, D, L];
    initial_state: [B, D, N] (the state before time 0; zeros when None).
    Returns out [B, D, L] in u's dtype, and the last state [B, D, N] (fp32, fp64 for fp64 inputs) when
    return_last_state.
    """
    Bsz, Dm, L = u.shape
    N = A.shape[1]
    cdt = _compute_dtype(u.dtype)
    uc = u.to(cdt)
    dt = delta.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    Ac = A.to(cdt)
    x = initial_state.to(cdt) if initial_state is not None else uc.new_zeros(Bsz, Dm, N)
    ys = []
    for t in range(L):
        dt_t = dt[:, :, t, None]                                          # [B, D, 1]
        x = torch.exp(dt_t * Ac) * x + dt_t * _at(B, t, Bsz, Dm, cdt) * uc[:, :, t, None]
        ys.append((x * _at(C, t, Bsz, Dm, cdt)).sum(-1))
    y = torch.stack(ys, dim=2) if ys else uc.new_zeros(Bsz, Dm, 0)
    if D is not None:
        y = y + uc * D.to(cdt)[:, None]
    if z is not None:
        y = y * F.silu(z.to(cdt))
    out = y.to(u.dtype)
    return (out, x) if return_last_state else out


def selective_scan_step(state, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """One time step of the scan (decoding). state: [B, D, N]; u, delta, z: [B, D]; A: [D, N]; B, C: [D, N]
    (fixed) or [B, G, N] (input-dependent; Mamba's [B, N] is [B, 1, N]); D, delta_bias: [D].
    Returns (out [B, D] in u's dtype, new_state [B, D, N] in the compute dtype): one iteration of
    `selective_scan`."""
    Bsz, Dm = u.shape
    cdt = _compute_dtype(u.dtype)
    # B, C with a time axis of length 1, indexed as in the scan
    Bt = B if B.dim() == 2 else B[..., None]
    Ct = C if C.dim() == 2 else C[..., None]
    dt = delta.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)
    if delta_softplus:
        dt = F.softplus(dt)
    dt = dt[:, :, None]
    uc = u.to(cdt)
    x = torch.exp(dt * A.to(cdt)) * state.to(cdt) + dt * _at(Bt, 0, Bsz, Dm, cdt) * uc[:, :, None]
    y = (x * _at(Ct, 0, Bsz, Dm, cdt)).sum(-1)
    if D is not None:
        y = y + uc * D.to(cdt)
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(u.dtype), x
