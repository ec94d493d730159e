"""fastlayers.dilated_conv1d: depthwise dilated (causal or "same") 1-D convolution with optional SiLU.

validate -> backend choice -> custom op fastlayers::dilated_conv1d (fake + autograd) -> cuda | triton kernels,
or the reference (plain PyTorch, differentiated by autograd) on CPU / float64 / on request.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _ext, registry
from .. import reference as _ref
from . import _common as C

OP = "dilated_conv1d"
MAX_K = 32
ACTIVATIONS = (None, "silu", "swish")


def _pad(K: int, dilation: int, causal: bool) -> int:
    S = (K - 1) * dilation
    return S if causal else S // 2


def _final_state(x: Tensor, init: Optional[Tensor], S: int) -> Tensor:
    """The last S inputs of [init, x] ([B, C, S], contiguous), without copying all of x."""
    B, C, L = x.shape
    if L >= S:
        return x[:, :, L - S:].clone(memory_format=torch.contiguous_format)  # never a view of x
    prev = init[:, :, L:] if init is not None else x.new_zeros(B, C, S - L)
    return torch.cat([prev, x], dim=2).contiguous()


def _kernels(backend: str):
    """(fwd, bwd) launchers of one backend; both backends take and return the same things."""
    if backend == "cuda":
        cuda_bwd = _ext.op("dilated_conv1d_bwd_cuda")

        def bwd(x, weight, init, g, dilation, pad):
            dx, dw, db, dinit = cuda_bwd(x, weight, init, g, dilation, pad)
            return dx, dw, db, (dinit if init is not None and init.numel() > 0 else None)
        return _ext.op("dilated_conv1d_fwd_cuda"), bwd
    from ..kernels import dilated_conv1d as K
    return K.dilated_conv1d_fwd, K.dilated_conv1d_bwd


@torch.library.custom_op("fastlayers::dilated_conv1d", mutates_args=())
def _dilated_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_state: Optional[Tensor],
                    dilation: int, causal: bool, silu: bool, return_final_state: bool,
                    backend: str) -> tuple[Tensor, Tensor]:
    K = weight.shape[1]
    S = (K - 1) * dilation
    final = _final_state(x, initial_state, S) if return_final_state else x.new_empty(0)
    fwd, _ = _kernels(backend)
    y = fwd(x, weight, bias, initial_state, dilation, _pad(K, dilation, causal), silu, None)
    return y, final


@_dilated_conv1d.register_fake
def _(x, weight, bias, initial_state, dilation, causal, silu, return_final_state, backend):
    S = (weight.shape[1] - 1) * dilation
    final = x.new_empty(x.shape[0], x.shape[1], S) if return_final_state else x.new_empty(0)
    return torch.empty_like(x), final


@torch.library.custom_op("fastlayers::dilated_conv1d_bwd", mutates_args=())
def _dilated_conv1d_bwd(dy: Tensor, dfinal: Optional[Tensor], x: Tensor, weight: Tensor, bias: Optional[Tensor],
                        initial_state: Optional[Tensor], dilation: int, causal: bool, silu: bool,
                        backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dweight, dbias or [0], dinitial_state or [0])."""
    L = x.shape[2]
    K = weight.shape[1]
    S = (K - 1) * dilation
    dy = C.as_layout_1d(dy, C.is_channels_last_1d(x))
    fwd, bwd = _kernels(backend)
    pad = _pad(K, dilation, causal)
    g = fwd(x, weight, bias, initial_state, dilation, pad, True, dy) if silu else dy
    dx, dw, db, dinit = bwd(x, weight, initial_state, g, dilation, pad)
    if dfinal is not None and S > 0:
        n_x = min(S, L)  # the last n_x entries of the final state are x's last inputs
        if n_x > 0:
            dx[:, :, L - n_x:] += dfinal[:, :, S - n_x:].to(dx.dtype)
        if dinit is not None and S > n_x:
            dinit[:, :, L:] += dfinal[:, :, :S - n_x].to(dinit.dtype)
    dw = dw.to(weight.dtype)
    db = db.to(bias.dtype) if (bias is not None and db is not None) else x.new_empty(0)
    if initial_state is None:
        dinit = x.new_empty(0)
    elif dinit is None:  # S == 0, or no path from the state to the outputs
        dinit = torch.zeros_like(initial_state)
    return dx, dw, db, dinit


@_dilated_conv1d_bwd.register_fake
def _(dy, dfinal, x, weight, bias, initial_state, dilation, causal, silu, backend):
    db = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    dinit = torch.empty_like(initial_state) if initial_state is not None else x.new_empty(0)
    return torch.empty_like(x), torch.empty_like(weight), db, dinit


def _setup_context(ctx, inputs, output):
    x, weight, bias, initial_state, dilation, causal, silu, return_final_state, backend = inputs
    ctx.save_for_backward(x, weight, bias, initial_state)
    ctx.args = (dilation, causal, silu, backend)


def _backward(ctx, dy, dfinal):
    x, weight, bias, initial_state = ctx.saved_tensors
    dilation, causal, silu, backend = ctx.args
    if dfinal is not None and dfinal.numel() == 0:
        dfinal = None
    dx, dw, db, dinit = _dilated_conv1d_bwd(dy, dfinal, x, weight, bias, initial_state, dilation, causal, silu,
                                            backend)
    return (dx, dw, db if bias is not None else None, dinit if initial_state is not None else None,
            None, None, None, None, None)


_dilated_conv1d.register_autograd(_backward, setup_context=_setup_context)


def _validate(x, weight, bias, dilation, causal, activation, initial_state, return_final_state):
    C.check_tensor(x, "x", OP, ndim=3)
    C.check_tensor(weight, "weight", OP, ndim=2)
    C.check_tensor(bias, "bias", OP, ndim=1, optional=True)
    C.check_tensor(initial_state, "initial_state", OP, ndim=3, optional=True)
    C.check_int(dilation, "dilation", OP, min=1)
    C.check_bool(causal, "causal", OP)
    C.check_bool(return_final_state, "return_final_state", OP)
    C.check_choice(activation, "activation", OP, ACTIVATIONS)
    B, Cn, L = x.shape
    if weight.shape[0] != Cn:
        raise ValueError(f"{OP}: `weight` must have shape [C, K] with C = x.shape[1] = {Cn}, "
                         f"got {tuple(weight.shape)}")
    K = weight.shape[1]
    if not 1 <= K <= MAX_K:
        raise ValueError(f"{OP}: the kernel size K = weight.shape[1] must be in [1, {MAX_K}], got {K}")
    if bias is not None:
        C.check_shape(bias, "bias", OP, (Cn,))
    S = (K - 1) * dilation
    if initial_state is not None:
        if not causal:
            raise ValueError(f"{OP}: `initial_state` is only defined for causal=True")
        C.check_shape(initial_state, "initial_state", OP, (B, Cn, S))
    if return_final_state and not causal:
        raise ValueError(f"{OP}: `return_final_state` is only defined for causal=True")
    C.check_same(OP, "x", x, weight=weight, bias=bias, initial_state=initial_state)


def dilated_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, dilation: int = 1,
                   causal: bool = True, activation: Optional[str] = None, initial_state: Optional[Tensor] = None,
                   return_final_state: bool = False, *, backend: Optional[str] = None):
    """Depthwise dilated 1-D convolution, one filter per channel: y = act(conv1d(x, weight) + bias).

    x: [B, C, L], fp16/bf16/fp32 (fp64 on the reference backend). Layout: a contiguous tensor is read
      channels-first; a channels-last sequence `h.transpose(1, 2)` of a contiguous h: [B, L, C] is read as is
      (no copy) and y comes back in the same layout. Other strides are copied first.
    weight: [C, K], 1 <= K <= 32 (a depthwise nn.Conv1d weight [C, 1, K] squeezed); bias: [C] or None.
    dilation >= 1. causal=True: y[t] sees x[<= t] (left padding (K-1)*dilation, as Mamba's conv);
      causal=False: "same" padding, as F.conv1d(padding="same").
    activation: None or "silu" (fused). fp32 accumulation.
    initial_state: [B, C, (K-1)*dilation], the inputs before x (a previous chunk's final state; zeros if None).
    return_final_state: also return the last (K-1)*dilation inputs of [initial_state, x], to continue a
      sequence in chunks exactly as if it were processed whole.
    backend: None/"auto", "cuda", "triton" or "reference" (see fastlayers.use_backend).
    Gradients flow to x, weight, bias and initial_state (and from the final state).
    """
    _validate(x, weight, bias, dilation, causal, activation, initial_state, return_final_state)
    # under torch.autocast a conv runs in the autocast dtype, as nn.Conv1d does
    x, weight, bias, initial_state = C.autocast_inputs("lower", x, weight, bias, initial_state)
    channels_last = C.is_channels_last_1d(x)
    x = C.as_layout_1d(x, channels_last)
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    initial_state = initial_state.contiguous() if initial_state is not None else None
    S = (weight.shape[1] - 1) * dilation
    cuda_ok = ("channels-last input" if channels_last else
               "L too long for its grid" if -(-x.shape[2] // 1024) + -(-S // 1024) > 65535 else True)
    be = _backend.choose(OP, x.device, backend=backend, dtype=x.dtype, cuda_op="dilated_conv1d_fwd_cuda",
                         cuda_ok=cuda_ok, prefer=registry.OPS[OP].prefer)
    act = "silu" if activation in ("silu", "swish") else None
    if be == "reference":  # plain PyTorch: autograd, torch.compile and CPU need nothing more
        with torch.autocast(x.device.type, enabled=False):
            return _ref.dilated_conv1d(x, weight, bias, dilation, causal, act, initial_state, return_final_state)
    y, final = _dilated_conv1d(x, weight, bias, initial_state, dilation, causal, act is not None,
                               return_final_state, be)
    return (y, final) if return_final_state else y


def dilated_conv1d_step(x_t: Tensor, state: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                        dilation: int = 1, activation: Optional[str] = None):
    """One token of causal decoding. x_t: [B, C]; state: [B, C, (K-1)*dilation] (the last inputs, as returned
    by dilated_conv1d(..., return_final_state=True) or a previous step). Returns (y_t [B, C], new_state); the
    caller's state is not modified. A chain of steps equals dilated_conv1d over the whole sequence."""
    C.check_tensor(x_t, "x_t", "dilated_conv1d_step", ndim=2)
    C.check_tensor(state, "state", "dilated_conv1d_step", ndim=3)
    C.check_tensor(weight, "weight", "dilated_conv1d_step", ndim=2)
    C.check_tensor(bias, "bias", "dilated_conv1d_step", ndim=1, optional=True)
    C.check_int(dilation, "dilation", "dilated_conv1d_step", min=1)
    C.check_choice(activation, "activation", "dilated_conv1d_step", ACTIVATIONS)
    B, Cn = x_t.shape
    if weight.shape[0] != Cn or not 1 <= weight.shape[1] <= MAX_K:
        raise ValueError(f"dilated_conv1d_step: `weight` must have shape [C={Cn}, K<={MAX_K}], "
                         f"got {tuple(weight.shape)}")
    C.check_shape(state, "state", "dilated_conv1d_step", (B, Cn, (weight.shape[1] - 1) * dilation))
    if bias is not None:
        C.check_shape(bias, "bias", "dilated_conv1d_step", (Cn,))
    C.check_same("dilated_conv1d_step", "x_t", x_t, state=state, weight=weight, bias=bias)
    # a few hundred bytes per channel: the PyTorch step is launch-bound, not worth a kernel of its own
    return _ref.dilated_conv1d_step(x_t, state, weight, bias, dilation, activation)


def check_cases(device):
    """Small cases for `fastlayers check`: the Triton (and, when built, CUDA) kernels against the reference."""
    import functools

    from ..testing import CheckCase, check_dtypes

    out = []
    backends = ["triton"] + (["cuda"] if device.type == "cuda" and _ext.has_op("dilated_conv1d_fwd_cuda") else [])
    dtypes = check_dtypes(device)
    g = torch.Generator().manual_seed(0)
    for be in backends:
        for dt in dtypes:
            for (B, Cn, L, K, d, act) in ((2, 7, 63, 4, 1, "silu"), (1, 5, 97, 3, 8, None)):
                def t(*shape):
                    return torch.randn(*shape, generator=g).to(device=device, dtype=dt).requires_grad_()
                S = (K - 1) * d
                inputs = {"x": t(B, Cn, L), "weight": t(Cn, K), "bias": t(Cn), "initial_state": t(B, Cn, S)}
                kw = {"dilation": d, "causal": True, "activation": act, "return_final_state": True}
                out.append(CheckCase(f"{be} {str(dt)[6:]} B={B} C={Cn} L={L} K={K} d={d} {act or ''}".strip(),
                                     functools.partial(dilated_conv1d, backend=be), _ref.dilated_conv1d,
                                     inputs, kw, ("y", "final_state")))
    return out
