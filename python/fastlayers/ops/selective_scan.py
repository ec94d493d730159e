"""fastlayers.selective_scan: Mamba's selective state-space scan (mamba_ssm's selective_scan_fn semantics).

validate -> backend choice -> custom op fastlayers::selective_scan (fake + autograd) -> cuda | triton kernels,
or the reference (plain PyTorch, differentiated by autograd) on CPU / float64 / on request.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _ext, registry
from .. import reference as _ref
from . import _common as C_

OP = "selective_scan"
MAX_N = 256
CUDA_SEGMENT = 1024  # time steps per chunk of the CUDA kernels (csrc/selective_scan: threads x items)


def _n_chk(backend: str, L: int) -> int:
    """How many states the forward stores for the backward (one per segment of the sequence)."""
    if backend == "cuda":
        return max(1, (L + CUDA_SEGMENT - 1) // CUDA_SEGMENT)
    from ..kernels import selective_scan as K
    return K.checkpoint_count(L)


def _kernels(backend: str):
    """(fwd, bwd) launchers of one backend, with the signatures of kernels/selective_scan.py."""
    if backend == "cuda":
        fwd_cuda, bwd_cuda = _ext.op("selective_scan_fwd_cuda"), _ext.op("selective_scan_bwd_cuda")

        def fwd(u, delta, A, B, C, D, z, delta_bias, init, softplus):
            return fwd_cuda(u, delta, A, B, C, D, z, delta_bias, init, softplus)

        def bwd(u, delta, A, B, C, D, z, delta_bias, chk, dout, dlast, softplus):
            du, ddelta, dz, dA, dB, dC, dD, dbias, dinit = bwd_cuda(u, delta, A, B, C, D, z, delta_bias, chk,
                                                                    dout, dlast, softplus)
            return du, ddelta, (dz if z is not None else None), dA, dB, dC, dD, dbias, dinit
        return fwd, bwd
    from ..kernels import selective_scan as K
    return K.selective_scan_fwd, K.selective_scan_bwd


def _dense_inputs(u, A, D, delta_bias, initial_state):
    """Zeros for the optional fp32 inputs the kernels always read (tiny next to u)."""
    Bsz, Dm, _ = u.shape
    N = A.shape[1]
    f32 = {"dtype": torch.float32, "device": u.device}
    D = D if D is not None else torch.zeros(Dm, **f32)
    delta_bias = delta_bias if delta_bias is not None else torch.zeros(Dm, **f32)
    init = initial_state if initial_state is not None else torch.zeros(Bsz, Dm, N, **f32)
    return D, delta_bias, init


@torch.library.custom_op("fastlayers::selective_scan", mutates_args=())
def _selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                    z: Optional[Tensor], delta_bias: Optional[Tensor], initial_state: Optional[Tensor],
                    delta_softplus: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (out [B, D, L], last_state [B, D, N] fp32, stored states [B, D, n_chk, N] fp32 for backward)."""
    D, delta_bias, init = _dense_inputs(u, A, D, delta_bias, initial_state)
    fwd, _ = _kernels(backend)
    return fwd(u, delta, A, B, C, D, z, delta_bias, init, delta_softplus)


@_selective_scan.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, backend):
    Bsz, Dm, L = u.shape
    N = A.shape[1]
    return (torch.empty_like(u), u.new_empty(Bsz, Dm, N, dtype=torch.float32),
            u.new_empty(Bsz, Dm, _n_chk(backend, L), N, dtype=torch.float32))


@torch.library.custom_op("fastlayers::selective_scan_bwd", mutates_args=())
def _selective_scan_bwd(dout: Optional[Tensor], dlast: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor,
                        B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                        delta_bias: Optional[Tensor], initial_state: Optional[Tensor], chk: Tensor,
                        delta_softplus: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                     Tensor, Tensor, Tensor, Tensor]:
    """Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state); absent inputs get [0] tensors."""
    Bsz, Dm, L = u.shape
    N = A.shape[1]
    dout = dout.contiguous() if dout is not None else torch.zeros_like(u)
    dlast = dlast.float().contiguous() if dlast is not None else u.new_zeros(Bsz, Dm, N, dtype=torch.float32)
    Dd, bias_d, _ = _dense_inputs(u, A, D, delta_bias, dlast)
    _, bwd = _kernels(backend)
    du, ddelta, dz, dA, dB, dC, dD, dbias, dinit = bwd(u, delta, A, B, C, Dd, z, bias_d, chk, dout, dlast,
                                                       delta_softplus)
    def cast(g, like):  # a fresh [0] tensor per absent input: outputs may not alias each other
        return g.to(like.dtype) if like is not None else u.new_empty(0)
    return (du, ddelta, cast(dA, A), cast(dB, B), cast(dC, C), cast(dD, D), cast(dz, z), cast(dbias, delta_bias),
            cast(dinit, initial_state))


@_selective_scan_bwd.register_fake
def _(dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, chk, delta_softplus, backend):
    def like(t):
        return torch.empty_like(t) if t is not None else u.new_empty(0)
    return (torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), like(D), like(z), like(delta_bias), like(initial_state))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, output[2])
    ctx.args = (delta_softplus, backend)


def _backward(ctx, dout, dlast, _dchk):
    u, delta, A, B, C, D, z, delta_bias, initial_state, chk = ctx.saved_tensors
    softplus, backend = ctx.args
    du, ddelta, dA, dB, dC, dD, dz, dbias, dinit = _selective_scan_bwd(
        dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, chk, softplus, backend)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
            dbias if delta_bias is not None else None, dinit if initial_state is not None else None, None, None)


_selective_scan.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# validation

def _check_bc(M, name: str, op: str, Bsz: int, Dm: int, N: int, L: int, dtype: torch.dtype) -> int:
    """B or C: [D, N] | [B, N, L] | [B, G, N, L]; returns the number of groups (0 for fixed)."""
    C_.check_tensor(M, name, op, ndim=(2, 3, 4))
    if M.dim() == 2:
        C_.check_shape(M, name, op, (Dm, N))
        return 0
    if M.dim() == 3:
        C_.check_shape(M, name, op, (Bsz, N, L))
        G = 1
    else:
        G = M.shape[1]
        if G < 1 or Dm % G:
            raise ValueError(f"{op}: the number of groups G = {name}.shape[1] must divide D = {Dm}, got "
                             f"{tuple(M.shape)}")
        C_.check_shape(M, name, op, (Bsz, G, N, L))
    if M.dtype != dtype:
        raise TypeError(f"{op}: an input-dependent `{name}` must have u's dtype {dtype}, got {M.dtype}")
    return G


def _validate(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state):
    op = OP
    C_.check_tensor(u, "u", op, ndim=3)
    C_.check_tensor(delta, "delta", op, ndim=3)
    C_.check_tensor(A, "A", op, ndim=2)
    C_.check_tensor(z, "z", op, ndim=3, optional=True)
    C_.check_tensor(D, "D", op, ndim=1, optional=True)
    C_.check_tensor(delta_bias, "delta_bias", op, ndim=1, optional=True)
    C_.check_tensor(initial_state, "initial_state", op, ndim=3, optional=True)
    C_.check_bool(delta_softplus, "delta_softplus", op)
    C_.check_bool(return_last_state, "return_last_state", op)
    Bsz, Dm, L = u.shape
    C_.check_shape(delta, "delta", op, (Bsz, Dm, L))
    if A.shape[0] != Dm:
        raise ValueError(f"{op}: `A` must have shape [D, N] with D = u.shape[1] = {Dm}, got {tuple(A.shape)}")
    N = A.shape[1]
    if not 1 <= N <= MAX_N:
        raise ValueError(f"{op}: the state size N = A.shape[1] must be in [1, {MAX_N}], got {N}")
    _check_bc(B, "B", op, Bsz, Dm, N, L, u.dtype)
    _check_bc(C, "C", op, Bsz, Dm, N, L, u.dtype)
    if z is not None:
        C_.check_shape(z, "z", op, (Bsz, Dm, L))
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            C_.check_shape(t, name, op, (Dm,))
    if initial_state is not None:
        C_.check_shape(initial_state, "initial_state", op, (Bsz, Dm, N))
    C_.check_same(op, "u", u, delta=delta, z=z)
    for name, t in (("A", A), ("B", B), ("C", C), ("D", D), ("delta_bias", delta_bias),
                    ("initial_state", initial_state)):
        if t is not None and t.device != u.device:
            raise ValueError(f"{op}: `{name}` is on {t.device} but `u` is on {u.device}; "
                             "all tensors must be on one device")


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.float().contiguous() if t is not None else None


def _bc_kernel(B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """The kernels' layout: fixed [D, N] fp32, or variable [B, G, N, L] contiguous with one G for both. Group
    counts that differ (e.g. grouped B with [B, N, L] C) are repeated to their least common multiple, which
    keeps channel d on its group in each (d // (D // G) of the finer grouping maps to the coarser one)."""
    gs = [M.shape[1] if M.dim() == 4 else 1 for M in (B, C) if M.dim() > 2]
    G = math.lcm(*gs) if gs else 1

    def one(M):
        if M.dim() == 2:
            return _f32(M)
        M = M.unsqueeze(1) if M.dim() == 3 else M
        return (M.repeat_interleave(G // M.shape[1], dim=1) if M.shape[1] != G else M).contiguous()
    return one(B), one(C)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False, initial_state: Optional[Tensor] = None, *,
                   backend: Optional[str] = None):
    """Mamba's selective scan (mamba_ssm.ops.selective_scan_interface.selective_scan_fn semantics):

        dt_t = softplus(delta_t + delta_bias) (softplus and bias optional)
        x_t  = exp(dt_t * A) * x_{t-1} + dt_t * B_t * u_t          (x: the state [B, D, N], fp32)
        out_t = (C_t . x_t + D * u_t) * silu(z_t)                   (D and z optional)

    u, delta: [B, D, L], fp16/bf16/fp32 (fp64 on the reference backend); z: [B, D, L] like u.
    A: [D, N] real, 1 <= N <= 256 (Mamba uses A = -exp(A_log)).
    B, C: [D, N] (fixed, any float dtype), [B, N, L] or [B, G, N, L] (input-dependent, u's dtype; channel d
      uses group d // (D // G); B and C may have different group counts).
    D, delta_bias: [D] (fp32 in Mamba). initial_state: [B, D, N], the state before time 0 (zeros if None).
    Returns out [B, D, L] in u's dtype, and the last state [B, D, N] (fp32) when return_last_state. Scanning a
    sequence in pieces, each starting from the previous piece's last state, equals scanning it whole.
    Gradients flow to every tensor argument, initial_state included, and from the last state.
    backend: None/"auto", "cuda", "triton" or "reference" (see fastlayers.use_backend).
    """
    # under torch.autocast the activations (u, delta, z, input-dependent B and C) run in the autocast dtype, as
    # in Mamba's block after its projections; A, D, delta_bias and the state stay fp32
    u, delta, z = C_.autocast_inputs("lower", u, delta, z)
    if isinstance(B, Tensor) and B.dim() >= 3:
        B = C_.autocast_inputs("lower", B)[0]
    if isinstance(C, Tensor) and C.dim() >= 3:
        C = C_.autocast_inputs("lower", C)[0]
    _validate(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state)
    be = _backend.choose(OP, u.device, backend=backend, dtype=u.dtype, cuda_op="selective_scan_fwd_cuda",
                         prefer=registry.OPS[OP].prefer)
    if be == "reference":  # plain PyTorch: autograd, torch.compile and CPU need nothing more
        with torch.autocast(u.device.type, enabled=False):
            return _ref.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                       initial_state)
    Bk, Ck = _bc_kernel(B, C)
    zc = z.contiguous() if z is not None else None
    out, last, _ = _selective_scan(u.contiguous(), delta.contiguous(), _f32(A), Bk, Ck, _f32(D), zc,
                                   _f32(delta_bias), _f32(initial_state), delta_softplus, be)
    return (out, last) if return_last_state else out


def selective_scan_step(state: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                        D: Optional[Tensor] = None, z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                        delta_softplus: bool = False):
    """One token of decoding with a carried state: exactly one time step of `selective_scan`.

    state: [B, D, N] (initial zeros, or the last state of selective_scan(..., return_last_state=True));
    u, delta, z: [B, D]; A: [D, N]; B, C: [D, N] (fixed) or [B, N] / [B, G, N] (input-dependent);
    D, delta_bias: [D]. Returns (out [B, D] in u's dtype, new_state [B, D, N] fp32); `state` is not modified.
    A 2-D B or C of shape [B, N] is read as input-dependent (Mamba's decoding step), also when B == D.
    """
    op = "selective_scan_step"
    C_.check_tensor(state, "state", op, ndim=3)
    C_.check_tensor(u, "u", op, ndim=2)
    C_.check_tensor(delta, "delta", op, ndim=2)
    C_.check_tensor(A, "A", op, ndim=2)
    C_.check_tensor(z, "z", op, ndim=2, optional=True)
    C_.check_tensor(D, "D", op, ndim=1, optional=True)
    C_.check_tensor(delta_bias, "delta_bias", op, ndim=1, optional=True)
    C_.check_bool(delta_softplus, "delta_softplus", op)
    Bsz, Dm = u.shape
    if A.shape[0] != Dm or not 1 <= A.shape[1] <= MAX_N:
        raise ValueError(f"{op}: `A` must have shape [D={Dm}, N<={MAX_N}], got {tuple(A.shape)}")
    N = A.shape[1]
    C_.check_shape(delta, "delta", op, (Bsz, Dm))
    C_.check_shape(state, "state", op, (Bsz, Dm, N))
    for name, M in (("B", B), ("C", C)):
        C_.check_tensor(M, name, op, ndim=(2, 3))
        if M.dim() == 2 and tuple(M.shape) != (Dm, N) and tuple(M.shape) != (Bsz, N):
            raise ValueError(f"{op}: `{name}` must have shape [D, N] = {(Dm, N)} or [B, N] = {(Bsz, N)}, got "
                             f"{tuple(M.shape)}")
        if M.dim() == 3 and (M.shape[0] != Bsz or M.shape[2] != N or Dm % M.shape[1]):
            raise ValueError(f"{op}: `{name}` must have shape [B, G, N] with G dividing D = {Dm}, got "
                             f"{tuple(M.shape)}")
    if z is not None:
        C_.check_shape(z, "z", op, (Bsz, Dm))
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            C_.check_shape(t, name, op, (Dm,))
    C_.check_same(op, "u", u, delta=delta, z=z)
    # [B, N] is ambiguous with [D, N] when B == D: input-dependent wins, as in a decoding step
    Bs = B[:, None] if B.dim() == 2 and tuple(B.shape) == (Bsz, N) else B
    Cs = C[:, None] if C.dim() == 2 and tuple(C.shape) == (Bsz, N) else C
    # a few hundred bytes per channel: the PyTorch step is launch-bound, not worth a kernel of its own
    return _ref.selective_scan_step(state, u, delta, A, Bs, Cs, D, z, delta_bias, delta_softplus)


def check_cases(device):
    """Small cases for `fastlayers check`: the Triton (and, when built, CUDA) kernels against the reference."""
    import functools

    from ..testing import CheckCase, check_dtypes

    out = []
    backends = ["triton"] + (["cuda"] if device.type == "cuda" and _ext.has_op("selective_scan_fwd_cuda") else [])
    dtypes = check_dtypes(device)
    g = torch.Generator().manual_seed(0)
    for be in backends:
        for dt in dtypes:
            for (Bsz, Dm, L, N, G) in ((2, 6, 37, 5, 1), (1, 4, 20, 16, 2)):
                def t(*shape, scale=1.0):
                    x = torch.randn(*shape, generator=g) * scale
                    return x.to(device=device, dtype=dt).requires_grad_()
                inputs = {"u": t(Bsz, Dm, L), "delta": t(Bsz, Dm, L, scale=0.5),
                          "A": (-torch.rand(Dm, N, generator=g) - 0.5).to(device=device, dtype=dt).requires_grad_(),
                          "B": t(Bsz, G, N, L), "C": t(Bsz, G, N, L), "D": t(Dm), "z": t(Bsz, Dm, L),
                          "delta_bias": t(Dm, scale=0.5), "initial_state": t(Bsz, Dm, N)}
                kw = {"delta_softplus": True, "return_last_state": True}
                out.append(CheckCase(f"{be} {str(dt)[6:]} B={Bsz} D={Dm} L={L} N={N} G={G}",
                                     functools.partial(selective_scan, backend=be), _ref.selective_scan,
                                     inputs, kw, ("out", "last_state")))
    return out
