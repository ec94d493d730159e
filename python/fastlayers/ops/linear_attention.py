"""fastlayers.linear_attention: non-causal (SLAB) and causal chunkwise linear attention.

validate -> backend choice -> custom ops fastlayers::linear_attention_global / linear_attention_chunk (fake +
autograd) -> Triton kernels (kernels/linear_attention.py), or the reference (plain PyTorch, differentiated by
autograd) on CPU / float64 / on request. fastlayers.retention uses the same chunk op with a decay.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from .. import reference as _ref
from . import _common as C

OP = "linear_attention"
FEATURE_MAPS = ("relu", "elu1", None)
MAX_D = 256


def _kernels():
    from ..kernels import linear_attention as K
    return K


def _empty(x: Tensor) -> Tensor:
    return x.new_empty(0, dtype=torch.float32)


def _opt(t: Tensor) -> Optional[Tensor]:
    """A zero-size placeholder output/gradient means 'none'."""
    return None if t is None or t.numel() == 0 else t


# ---------------------------------------------------------------------------------------------------------------
# non-causal: o, den (φq·z), S, z; den, S and z are saved for the backward

@torch.library.custom_op("fastlayers::linear_attention_global", mutates_args=())
def _global(q: Tensor, k: Tensor, v: Tensor, fmap: int, normalize: bool, eps: float
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _kernels().global_fwd(q, k, v, fmap, normalize, eps)


@_global.register_fake
def _(q, k, v, fmap, normalize, eps):
    B, H, N, DK = q.shape
    DV = v.shape[-1]
    f32 = dict(dtype=torch.float32, device=q.device)
    return (q.new_empty(B, H, N, DV), torch.empty(B, H, N, **f32), torch.empty(B, H, DK, DV, **f32),
            torch.empty(B, H, DK, **f32))


@torch.library.custom_op("fastlayers::linear_attention_global_bwd", mutates_args=())
def _global_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, den: Tensor, S: Tensor, z: Tensor,
                fmap: int, normalize: bool, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().global_bwd(do.contiguous(), q, k, v, o, den, S, z, fmap, normalize, eps)


@_global_bwd.register_fake
def _(do, q, k, v, o, den, S, z, fmap, normalize, eps):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _global_setup(ctx, inputs, output):
    q, k, v, fmap, normalize, eps = inputs
    o, den, S, z = output
    ctx.save_for_backward(q, k, v, o, den, S, z)
    ctx.args = (fmap, normalize, eps)


def _global_backward(ctx, do, dden, dS, dz):
    q, k, v, o, den, S, z = ctx.saved_tensors
    dq, dk, dv = _global_bwd(do, q, k, v, o, den, S, z, *ctx.args)
    return dq, dk, dv, None, None, None


_global.register_autograd(_global_backward, setup_context=_global_setup)


# ---------------------------------------------------------------------------------------------------------------
# causal chunkwise (also retention, with log2_gamma; two_sided: RMT's γ^|n-m|): o, den, S_N, z_N

@torch.library.custom_op("fastlayers::linear_attention_chunk", mutates_args=())
def _chunk(q: Tensor, k: Tensor, v: Tensor, log2_gamma: Optional[Tensor], s0: Optional[Tensor],
           z0: Optional[Tensor], fmap: int, normalize: bool, eps: float, two_sided: bool, return_state: bool
           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _kernels().chunk_fwd(q, k, v, log2_gamma, s0, z0, fmap, normalize, eps, two_sided, return_state)


@_chunk.register_fake
def _(q, k, v, log2_gamma, s0, z0, fmap, normalize, eps, two_sided, return_state):
    B, H, N, DK = q.shape
    DV = v.shape[-1]
    f32 = dict(dtype=torch.float32, device=q.device)
    den = torch.empty(B, H, N, **f32) if normalize else torch.empty(0, **f32)
    st = torch.empty(B, H, DK, DV, **f32) if return_state else torch.empty(0, **f32)
    zt = torch.empty(B, H, DK, **f32) if return_state and normalize else torch.empty(0, **f32)
    return q.new_empty(B, H, N, DV), den, st, zt


@torch.library.custom_op("fastlayers::linear_attention_chunk_bwd", mutates_args=())
def _chunk_bwd(do: Tensor, dst: Optional[Tensor], dzt: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
               log2_gamma: Optional[Tensor], s0: Optional[Tensor], z0: Optional[Tensor], o: Tensor, den: Tensor,
               fmap: int, normalize: bool, eps: float, two_sided: bool
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, ds0 or [0], dz0 or [0])."""
    dst = dst.contiguous() if dst is not None else None
    dzt = dzt.contiguous() if dzt is not None else None
    dq, dk, dv, ds0, dz0 = _kernels().chunk_bwd(do.contiguous(), dst, dzt, q, k, v, log2_gamma, s0, z0, o, den,
                                                fmap, normalize, eps, two_sided)
    return dq, dk, dv, ds0 if ds0 is not None else _empty(q), dz0 if dz0 is not None else _empty(q)


@_chunk_bwd.register_fake
def _(do, dst, dzt, q, k, v, log2_gamma, s0, z0, o, den, fmap, normalize, eps, two_sided):
    ds0 = torch.empty_like(s0) if s0 is not None else _empty(q)
    dz0 = torch.empty_like(z0) if (s0 is not None and z0 is not None and normalize) else _empty(q)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), ds0, dz0


def _chunk_setup(ctx, inputs, output):
    q, k, v, log2_gamma, s0, z0, fmap, normalize, eps, two_sided, return_state = inputs
    o, den, _, _ = output
    ctx.save_for_backward(q, k, v, log2_gamma, s0, z0, o, den)
    ctx.args = (fmap, normalize, eps, two_sided)


def _chunk_backward(ctx, do, dden, dst, dzt):
    q, k, v, log2_gamma, s0, z0, o, den = ctx.saved_tensors
    fmap, normalize, eps, two_sided = ctx.args
    dq, dk, dv, ds0, dz0 = _chunk_bwd(do, _opt(dst), _opt(dzt), q, k, v, log2_gamma, s0, z0, o, den, fmap,
                                      normalize, eps, two_sided)
    return (dq, dk, dv, None, ds0 if s0 is not None else None,
            dz0 if (s0 is not None and z0 is not None) else None, None, None, None, None, None)


_chunk.register_autograd(_chunk_backward, setup_context=_chunk_setup)


# ---------------------------------------------------------------------------------------------------------------
# validation shared with retention

def validate_qkv(op: str, q, k, v) -> None:
    C.check_tensor(q, "q", op, ndim=4)
    C.check_tensor(k, "k", op, ndim=4)
    C.check_tensor(v, "v", op, ndim=4)
    B, H, N, DK = q.shape
    C.check_shape(k, "k", op, (B, H, N, DK))
    if tuple(v.shape[:3]) != (B, H, N):
        raise ValueError(f"{op}: `v` must have shape [B, H, N, Dv] = ({B}, {H}, {N}, Dv) like q, "
                         f"got {tuple(v.shape)}")
    C.check_same(op, "q", q, k=k, v=v)


def triton_support(q, v) -> bool | str:
    N, DK, DV = q.shape[2], q.shape[-1], v.shape[-1]
    if DK > MAX_D or DV > MAX_D:
        return f"head dims Dk={DK}, Dv={DV}: the Triton kernels take at most {MAX_D}"
    if N * max(DK, DV) >= 2**31:
        return f"N * max(Dk, Dv) = {N * max(DK, DV)} >= 2**31 elements in one head (int32 offsets)"
    return True


def state_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def check_state(op: str, t, name: str, shape, x: Tensor) -> None:
    C.check_tensor(t, name, op, ndim=len(shape))
    C.check_shape(t, name, op, shape)
    if t.device != x.device:
        raise ValueError(f"{op}: `{name}` is on {t.device} but `q` is on {x.device}; all tensors must be on one "
                         "device")


def _validate(q, k, v, causal, feature_map, normalize, eps, initial_state, return_final_state):
    validate_qkv(OP, q, k, v)
    C.check_bool(causal, "causal", OP)
    C.check_bool(normalize, "normalize", OP)
    C.check_bool(return_final_state, "return_final_state", OP)
    C.check_choice(feature_map, "feature_map", OP, FEATURE_MAPS)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"{OP}: `eps` must be a number >= 0, got {eps!r}")
    B, H, N, DK = q.shape
    DV = v.shape[-1]
    if (initial_state is not None or return_final_state) and not causal:
        raise ValueError(f"{OP}: `initial_state` / `return_final_state` are only defined for causal=True")
    if initial_state is not None:
        if normalize:
            if not (isinstance(initial_state, (tuple, list)) and len(initial_state) == 2):
                raise TypeError(f"{OP}: with normalize=True `initial_state` must be a tuple (S [B, H, Dk, Dv], "
                                f"z [B, H, Dk]), got {type(initial_state).__name__}")
            check_state(OP, initial_state[0], "initial_state[0] (S)", (B, H, DK, DV), q)
            check_state(OP, initial_state[1], "initial_state[1] (z)", (B, H, DK), q)
        else:
            check_state(OP, initial_state, "initial_state", (B, H, DK, DV), q)


def linear_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, feature_map: Optional[str] = "relu",
                     normalize: bool = True, eps: float = 1e-6, initial_state=None, return_final_state: bool = False,
                     backend: Optional[str] = None):
    """Linear attention O = φ(Q) φ(K)ᵀ V, normalised by φ(Q)·Σφ(K) (SLAB's simplified linear attention).

    q, k: [B, H, N, Dk]; v: [B, H, N, Dv]; fp16/bf16/fp32 (fp64 on the reference backend); any N;
      Dk, Dv <= 256 on the Triton backend. fp32 accumulation whatever the input dtype.
    feature_map: "relu" (SLAB), "elu1" (elu(x) + 1, Katharopoulos et al.) or None (identity), applied to q and k.
    causal=False: o_n = φq_n S / (φq_n·z + eps) with S = Σ_m φk_mᵀ v_m, z = Σ_m φk_m (all positions).
    causal=True: the sums run over m <= n (chunkwise-parallel kernel, equal to the quadratic masked form):
      o_n = (φq_n S_n) / (φq_n·z_n + eps), S_n = S0 + Σ_{m<=n} φk_mᵀ v_m, z_n = z0 + Σ_{m<=n} φk_m
      (the running normaliser up to and including position n).
    normalize=False: o = the numerator alone (no z, no eps).
    State (causal only): S [B, H, Dk, Dv] and, with normalize, z [B, H, Dk]. initial_state is S, or the tuple
      (S, z) when normalize; return_final_state=True returns (o, S_N) or (o, (S_N, z_N)), fp32 (fp64 for fp64
      inputs), so a long sequence can be processed in pieces exactly as a whole.
    Gradients flow to q, k, v and the initial state (and from the final state).
    backend: None/"auto", "triton" or "reference" (see fastlayers.use_backend).
    """
    # under torch.autocast q, k, v take the autocast dtype, as the matmuls of the PyTorch formulation would;
    # the state and the accumulation stay fp32
    q, k, v = C.autocast_inputs("lower", q, k, v)
    _validate(q, k, v, causal, feature_map, normalize, eps, initial_state, return_final_state)
    be = _backend.choose(OP, q.device, backend=backend, dtype=q.dtype, triton_ok=triton_support(q, v))
    sdt = state_dtype(q)
    if initial_state is not None:
        initial_state = tuple(t.to(sdt) for t in initial_state) if normalize else initial_state.to(sdt)
    if be == "reference":
        with torch.autocast(q.device.type, enabled=False):
            return _ref.linear_attention(q, k, v, causal, feature_map, normalize, eps, initial_state,
                                         return_final_state)
    from ..kernels.linear_attention import FMAPS
    fmap = FMAPS[feature_map]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if not causal:
        return _global(q, k, v, fmap, normalize, float(eps))[0]
    s0, z0 = (initial_state if normalize else (initial_state, None)) if initial_state is not None else (None, None)
    s0 = s0.contiguous() if s0 is not None else None
    z0 = z0.contiguous() if z0 is not None else None
    o, _, st, zt = _chunk(q, k, v, None, s0, z0, fmap, normalize, float(eps), False, return_final_state)
    if not return_final_state:
        return o
    return o, ((st, zt) if normalize else st)


def linear_attention_step(q_t: Tensor, k_t: Tensor, v_t: Tensor, state, *, feature_map: Optional[str] = "relu",
                          normalize: bool = True, eps: float = 1e-6):
    """One token of causal decoding. q_t, k_t: [B, H, Dk]; v_t: [B, H, Dv]; state: S [B, H, Dk, Dv], or (S, z)
    when normalize (as returned by linear_attention(..., causal=True, return_final_state=True) or a previous
    step). Returns (o_t [B, H, Dv], new_state); the caller's state is not modified. A chain of steps equals the
    causal linear_attention over the whole sequence."""
    op = "linear_attention_step"
    C.check_tensor(q_t, "q_t", op, ndim=3)
    C.check_tensor(k_t, "k_t", op, ndim=3)
    C.check_tensor(v_t, "v_t", op, ndim=3)
    C.check_shape(k_t, "k_t", op, q_t.shape)
    C.check_same(op, "q_t", q_t, k_t=k_t, v_t=v_t)
    C.check_choice(feature_map, "feature_map", op, FEATURE_MAPS)
    B, H, DK = q_t.shape
    DV = v_t.shape[-1]
    if tuple(v_t.shape[:2]) != (B, H):
        raise ValueError(f"{op}: `v_t` must have shape ({B}, {H}, Dv), got {tuple(v_t.shape)}")
    if normalize:
        if not (isinstance(state, (tuple, list)) and len(state) == 2):
            raise TypeError(f"{op}: with normalize=True `state` must be a tuple (S, z)")
        check_state(op, state[0], "state[0] (S)", (B, H, DK, DV), q_t)
        check_state(op, state[1], "state[1] (z)", (B, H, DK), q_t)
    else:
        check_state(op, state, "state", (B, H, DK, DV), q_t)
    # a few KB per head: launch-bound, not worth a kernel of its own
    return _ref.linear_attention_step(q_t, k_t, v_t, state, feature_map, normalize, eps)


def check_cases(device):
    """Small cases for `fastlayers check`: the Triton kernels against the reference."""
    import functools

    from ..testing import CheckCase, check_dtypes

    out = []
    dtypes = check_dtypes(device)
    g = torch.Generator().manual_seed(0)
    for dt in dtypes:
        def t(*shape):
            return torch.randn(*shape, generator=g).to(device=device, dtype=dt).requires_grad_()
        B, H, N, DK, DV = 2, 2, 37, 16, 24
        inputs = {"q": t(B, H, N, DK), "k": t(B, H, N, DK), "v": t(B, H, N, DV)}
        out.append(CheckCase(f"triton {str(dt)[6:]} non-causal relu B={B} H={H} N={N} Dk={DK} Dv={DV}",
                             functools.partial(linear_attention, backend="triton"), _ref.linear_attention,
                             inputs, {"causal": False}, ("o",)))
        inputs = dict(inputs, initial_state=t(B, H, DK, DV))
        out.append(CheckCase(f"triton {str(dt)[6:]} causal state B={B} H={H} N={N} Dk={DK} Dv={DV}",
                             functools.partial(linear_attention, backend="triton"), _ref.linear_attention,
                             inputs, {"causal": True, "feature_map": None, "normalize": False,
                                      "return_final_state": True}, ("o", "final_state")))
    return out
