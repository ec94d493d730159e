"""fastlayers.retention: RetNet's retention (causal, with states) and RMT's two-sided 1-D decay.

validate -> backend choice -> the custom op fastlayers::linear_attention_chunk with a decay (one Triton kernel
family with linear attention: kernels/linear_attention.py; launchers in kernels/retention.py), or the reference
(plain PyTorch, differentiated by autograd) on CPU / float64 / on request.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from .. import reference as _ref
from . import _common as C
from .linear_attention import _chunk, check_state, state_dtype, triton_support, validate_qkv

OP = "retention"


def _validate(q, k, v, gamma, causal, initial_state, return_final_state):
    validate_qkv(OP, q, k, v)
    C.check_tensor(gamma, "gamma", OP, ndim=1)
    C.check_bool(causal, "causal", OP)
    C.check_bool(return_final_state, "return_final_state", OP)
    B, H, N, DK = q.shape
    C.check_shape(gamma, "gamma", OP, (H,))
    if gamma.device != q.device:
        raise ValueError(f"{OP}: `gamma` is on {gamma.device} but `q` is on {q.device}; all tensors must be on one "
                         "device")
    if (initial_state is not None or return_final_state) and not causal:
        raise ValueError(f"{OP}: `initial_state` / `return_final_state` are only defined for causal=True "
                         "(the two-sided decay has no recurrent state)")
    if initial_state is not None:
        check_state(OP, initial_state, "initial_state", (B, H, DK, v.shape[-1]), q)


def retention(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, *, causal: bool = True,
              initial_state: Optional[Tensor] = None, return_final_state: bool = False,
              backend: Optional[str] = None):
    """Retention with a per-head decay γ (RetNet; RMT's decay along one axis).

    q, k: [B, H, N, Dk]; v: [B, H, N, Dv]; fp16/bf16/fp32 (fp64 on the reference backend); any N;
      Dk, Dv <= 256 on the Triton backend. fp32 accumulation.
    gamma: [H], the decay per head, 0 <= γ <= 1 (RetNet: γ_h = 1 - 2^(-5-h)). Treated as a constant: it gets no
      gradient (RetNet and RMT keep the decays fixed). Values are not checked (that would sync the GPU);
      γ < 0 gives NaN.
    causal=True (RetNet's parallel / chunkwise / recurrent form; chunkwise-parallel kernel):
      o_n = Σ_{m<=n} γ^(n-m) (q_n·k_m) v_m + γ^(n+1) q_n S0;
      state S [B, H, Dk, Dv]: S_N = γ^N S0 + Σ_m γ^(N-1-m) k_mᵀ v_m (the recurrence S_n = γ S_{n-1} + k_nᵀ v_n,
      o_n = q_n S_n). initial_state: S0; return_final_state=True returns (o, S_N) (fp32; fp64 for fp64 inputs).
    causal=False (RMT's two-sided decay): o_n = Σ_m γ^|n-m| (q_n·k_m) v_m; no state.
    Nothing else is inside: RetNet's scaling of k by Dk^-0.5, its rotation (xPos/θ shift), group norm and gate
      belong to the module (fastlayers.nn.MultiScaleRetention).
    Gradients flow to q, k, v and the initial state (and from the final state).
    """
    q, k, v = C.autocast_inputs("lower", q, k, v)  # as linear_attention: activations lower, state fp32
    _validate(q, k, v, gamma, causal, initial_state, return_final_state)
    be = _backend.choose(OP, q.device, backend=backend, dtype=q.dtype, triton_ok=triton_support(q, v))
    if initial_state is not None:
        initial_state = initial_state.to(state_dtype(q))
    if be == "reference":
        with torch.autocast(q.device.type, enabled=False):
            return _ref.retention(q, k, v, gamma, causal, initial_state, return_final_state)
    from ..kernels.retention import log2_gamma
    s0 = initial_state.contiguous() if initial_state is not None else None
    o, _, st, _ = _chunk(q.contiguous(), k.contiguous(), v.contiguous(), log2_gamma(gamma), s0, None, 0, False, 0.0,
                         not causal, return_final_state)
    return (o, st) if return_final_state else o


def retention_step(q_t: Tensor, k_t: Tensor, v_t: Tensor, gamma: Tensor, state: Optional[Tensor] = None):
    """One token of recurrent decoding. q_t, k_t: [B, H, Dk]; v_t: [B, H, Dv]; gamma: [H]; state: [B, H, Dk, Dv]
    or None (zeros), as returned by retention(..., return_final_state=True) or a previous step.
    Returns (o_t [B, H, Dv], new_state): S = γ S + k_tᵀ v_t, o_t = q_t S. The caller's state is not modified;
    a chain of steps equals the causal retention over the whole sequence."""
    op = "retention_step"
    C.check_tensor(q_t, "q_t", op, ndim=3)
    C.check_tensor(k_t, "k_t", op, ndim=3)
    C.check_tensor(v_t, "v_t", op, ndim=3)
    C.check_tensor(gamma, "gamma", op, ndim=1)
    C.check_shape(k_t, "k_t", op, q_t.shape)
    C.check_same(op, "q_t", q_t, k_t=k_t, v_t=v_t)
    B, H, DK = q_t.shape
    if tuple(v_t.shape[:2]) != (B, H):
        raise ValueError(f"{op}: `v_t` must have shape ({B}, {H}, Dv), got {tuple(v_t.shape)}")
    C.check_shape(gamma, "gamma", op, (H,))
    if state is not None:
        check_state(op, state, "state", (B, H, DK, v_t.shape[-1]), q_t)
    # one rank-1 update per head: launch-bound, not worth a kernel of its own
    return _ref.retention_step(q_t, k_t, v_t, gamma, state)


def check_cases(device):
    """Small cases for `fastlayers check`: the Triton kernels against the reference."""
    import functools

    from ..testing import CheckCase, check_dtypes

    out = []
    dtypes = check_dtypes(device)
    g = torch.Generator().manual_seed(0)
    B, H, N, DK, DV = 2, 3, 41, 16, 24
    gamma = (1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float32))).to(device)
    for dt in dtypes:
        def t(*shape):
            return torch.randn(*shape, generator=g).to(device=device, dtype=dt).requires_grad_()
        inputs = {"q": t(B, H, N, DK), "k": t(B, H, N, DK), "v": t(B, H, N, DV), "gamma": gamma,
                  "initial_state": t(B, H, DK, DV)}
        out.append(CheckCase(f"triton {str(dt)[6:]} causal state B={B} H={H} N={N} Dk={DK} Dv={DV}",
                             functools.partial(retention, backend="triton"), _ref.retention, inputs,
                             {"causal": True, "return_final_state": True}, ("o", "final_state")))
        inputs = {k: v for k, v in inputs.items() if k != "initial_state"}
        out.append(CheckCase(f"triton {str(dt)[6:]} two-sided B={B} H={H} N={N} Dk={DK} Dv={DV}",
                             functools.partial(retention, backend="triton"), _ref.retention, inputs,
                             {"causal": False}, ("o",)))
    return out
