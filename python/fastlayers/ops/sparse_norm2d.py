"""fastlayers.sparse_batch_norm2d / sparse_layer_norm2d: SparK's normalisations over the active pixels only.

validate -> backend choice -> custom ops fastlayers::sparse_batch_norm2d / sparse_layer_norm2d (fake + autograd)
-> Triton kernels, or the reference (gather, normalise, scatter; autograd by torch).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from .. import reference as _ref
from . import _common as C
from .sparse_conv2d import MaskLike, as_sparse_mask, check_mask_for

OP_BN = "sparse_batch_norm2d"
OP_LN = "sparse_layer_norm2d"


def _kernels():
    from ..kernels import sparse_norm2d as K
    return K


def _ones(t: Optional[Tensor], C_: int, device) -> Tensor:
    return t.float() if t is not None else torch.ones(C_, dtype=torch.float32, device=device)


# ---------------------------------------------------------------------------------------------------------------
# BatchNorm

@torch.library.custom_op("fastlayers::sparse_batch_norm2d", mutates_args=())
def _sparse_bn(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
               running_var: Optional[Tensor], rows: Tensor, count: Tensor, batch_stats: bool, eps: float,
               backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, mean, rstd, var): the statistics used ([C] fp32; var is the biased batch variance, or the
    running variance when batch_stats is False)."""
    from ..kernels.common import empty_like
    K = _kernels()
    Cn = x.shape[1]
    if batch_stats:
        mean, var = K.norm_stats(x, rows, count)
    else:
        mean, var = running_mean.float().clone(), running_var.float().clone()
    rstd = torch.rsqrt(var + eps)
    scale = _ones(weight, Cn, x.device) * rstd
    shift = (bias.float() if bias is not None else torch.zeros_like(scale)) - mean * scale
    y = K.norm_apply(x, scale, shift, rows, count, empty_like(x))
    return y, mean, rstd, var


@_sparse_bn.register_fake
def _(x, weight, bias, running_mean, running_var, rows, count, batch_stats, eps, backend):
    st = x.new_empty(x.shape[1], dtype=torch.float32)
    return torch.empty_like(x), st, torch.empty_like(st), torch.empty_like(st)


@torch.library.custom_op("fastlayers::sparse_batch_norm2d_bwd", mutates_args=())
def _sparse_bn_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor, rows: Tensor,
                   count: Tensor, batch_stats: bool, has_bias: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, dweight or [0], dbias or [0])."""
    from ..kernels.common import empty_like
    K = _kernels()
    s_dy, s_dyx = K.norm_grad_sums(x, dy, mean, rstd, rows, count, False)
    a = _ones(weight, x.shape[1], x.device) * rstd
    dx = empty_like(x)
    if batch_stats:  # the statistics depend on x too
        n = count.float().clamp_min(1)
        K.norm_apply(dy, a, -a * s_dy / n, rows, count, dx, v=x, b=-a * rstd * s_dyx / n, d=mean)
    else:
        K.norm_apply(dy, a, torch.zeros_like(a), rows, count, dx)
    dw = s_dyx.to(weight.dtype) if weight is not None else x.new_empty(0)
    db = s_dy.to(weight.dtype if weight is not None else x.dtype) if has_bias else x.new_empty(0)
    return dx, dw, db


@_sparse_bn_bwd.register_fake
def _(dy, x, weight, mean, rstd, rows, count, batch_stats, has_bias, backend):
    dw = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    db = x.new_empty(x.shape[1], dtype=weight.dtype if weight is not None else x.dtype) if has_bias \
        else x.new_empty(0)
    return torch.empty_like(x), dw, db


def _bn_setup(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, rows, count, batch_stats, eps, backend = inputs
    _, mean, rstd, _ = output
    ctx.save_for_backward(x, weight, mean, rstd, rows, count)
    ctx.args = (batch_stats, bias is not None, backend)
    ctx.mark_non_differentiable(mean, rstd, output[3])


def _bn_backward(ctx, dy, dmean, drstd, dvar):
    x, weight, mean, rstd, rows, count = ctx.saved_tensors
    batch_stats, has_bias, backend = ctx.args
    dx, dw, db = _sparse_bn_bwd(dy, x, weight, mean, rstd, rows, count, batch_stats, has_bias, backend)
    return (dx, dw if weight is not None else None, db if has_bias else None) + (None,) * 7


_sparse_bn.register_autograd(_bn_backward, setup_context=_bn_setup)


def sparse_batch_norm2d(x: Tensor, mask: MaskLike, running_mean: Optional[Tensor] = None,
                        running_var: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                        bias: Optional[Tensor] = None, training: bool = False, momentum: float = 0.1,
                        eps: float = 1e-5, *, backend: Optional[str] = None) -> Tensor:
    """BatchNorm over the active pixels (SparK's SparseBatchNorm2d: BatchNorm1d on the gathered active pixels).

    x: [B, C, H, W] (NCHW or channels-last; y has x's layout), mask: [B, 1, h, w] bool or a SparseMask. Arguments
    after mask as F.batch_norm: batch statistics when `training` or without running stats, else the running
    ones; in training running_mean/var ([C]) are updated in place with factor `momentum` and the unbiased
    variance of the active pixels (unchanged when none is active). Output 0 at inactive pixels; gradients for
    x, weight and bias. (PyTorch raises for a single active pixel in training; the Triton path does not check,
    which would need a host sync, and uses n/(n-1) with n-1 clamped to 1.)
    """
    C.check_tensor(x, "x", OP_BN, ndim=4)
    if torch.is_autocast_enabled(x.device.type):
        # as F.batch_norm under autocast: x keeps its dtype and fp32 affine parameters are accepted
        weight, bias = (t.to(x.dtype) if isinstance(t, Tensor) and t.is_floating_point() else t
                        for t in (weight, bias))
    Cn = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        C.check_tensor(t, name, OP_BN, ndim=1, optional=True)
        if t is not None:
            C.check_shape(t, name, OP_BN, (Cn,))
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{OP_BN}: give both `running_mean` and `running_var` or neither")
    C.check_bool(training, "training", OP_BN)
    C.check_same(OP_BN, "x", x, weight=weight, bias=bias)
    if running_mean is not None and running_mean.device != x.device:
        raise ValueError(f"{OP_BN}: `running_mean` is on {running_mean.device} but `x` is on {x.device}")
    sm = as_sparse_mask(mask, OP_BN)
    check_mask_for(sm, x, OP_BN)
    be = _backend.choose(OP_BN, x.device, backend=backend, dtype=x.dtype)
    if be == "reference":
        with torch.autocast(x.device.type, enabled=False):
            return _ref.sparse_batch_norm2d(x, sm.mask, running_mean, running_var, weight, bias, training,
                                            momentum, eps)
    batch_stats = training or running_mean is None
    t = sm.table(x.shape[2], x.shape[3])
    y, mean, _, var = _sparse_bn(x, weight, bias, running_mean, running_var, t.rows, t.count, batch_stats,
                                 float(eps), be)
    if training and running_mean is not None:
        with torch.no_grad():
            n = t.count.float()
            unbiased = var * n / (n - 1).clamp_min(1)
            upd = n > 0
            running_mean.copy_(torch.where(upd, torch.lerp(running_mean.float(), mean, momentum),
                                           running_mean.float()))
            running_var.copy_(torch.where(upd, torch.lerp(running_var.float(), unbiased, momentum),
                                          running_var.float()))
    return y


# ---------------------------------------------------------------------------------------------------------------
# LayerNorm

def _logical(t: Tensor, channels_last: bool) -> Tensor:
    """[B, H, W, C] -> its [B, C, H, W] view (the kernels' order); channels-first tensors pass through."""
    return t.permute(0, 3, 1, 2) if channels_last else t


def _ln_out(x: Tensor, channels_last: bool) -> Tensor:
    from ..kernels.common import empty, empty_like
    # channels-last input [B, H, W, C]: a contiguous output, as F.layer_norm gives; else x's layout
    return empty(x.shape, dtype=x.dtype, device=x.device) if channels_last else empty_like(x)


@torch.library.custom_op("fastlayers::sparse_layer_norm2d", mutates_args=())
def _sparse_ln(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], rows: Tensor, count: Tensor, eps: float,
               channels_last: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (y, mean [B*H*W], rstd [B*H*W]) (fp32, per table entry)."""
    y = _ln_out(x, channels_last)
    _, mean, rstd = _kernels().layer_norm_fwd(_logical(x, channels_last), weight, bias, rows, count, eps,
                                              _logical(y, channels_last))
    return y, mean, rstd


@_sparse_ln.register_fake
def _(x, weight, bias, rows, count, eps, channels_last, backend):
    y = x.new_empty(x.shape) if channels_last else torch.empty_like(x)
    st = x.new_empty(rows.shape[0], dtype=torch.float32)
    return y, st, torch.empty_like(st)


@torch.library.custom_op("fastlayers::sparse_layer_norm2d_bwd", mutates_args=())
def _sparse_ln_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor, rows: Tensor,
                   count: Tensor, channels_last: bool, has_bias: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels.common import empty_like
    K = _kernels()
    xl, dyl = _logical(x, channels_last), _logical(dy, channels_last)
    dx = empty_like(x)
    K.layer_norm_bwd(xl, weight, dyl, mean, rstd, rows, count, _logical(dx, channels_last))
    s_dy, s_dyx = K.norm_grad_sums(xl, dyl, mean, rstd, rows, count, True)
    dw = s_dyx.to(weight.dtype) if weight is not None else x.new_empty(0)
    db = s_dy.to(weight.dtype if weight is not None else x.dtype) if has_bias else x.new_empty(0)
    return dx, dw, db


@_sparse_ln_bwd.register_fake
def _(dy, x, weight, mean, rstd, rows, count, channels_last, has_bias, backend):
    Cn = x.shape[3] if channels_last else x.shape[1]
    dw = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    db = x.new_empty(Cn, dtype=weight.dtype if weight is not None else x.dtype) if has_bias else x.new_empty(0)
    return torch.empty_like(x), dw, db


def _ln_setup(ctx, inputs, output):
    x, weight, bias, rows, count, eps, channels_last, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd, rows, count)
    ctx.args = (channels_last, bias is not None, backend)
    ctx.mark_non_differentiable(mean, rstd)


def _ln_backward(ctx, dy, dmean, drstd):
    x, weight, mean, rstd, rows, count = ctx.saved_tensors
    channels_last, has_bias, backend = ctx.args
    dx, dw, db = _sparse_ln_bwd(dy, x, weight, mean, rstd, rows, count, channels_last, has_bias, backend)
    return (dx, dw if weight is not None else None, db if has_bias else None) + (None,) * 5


_sparse_ln.register_autograd(_ln_backward, setup_context=_ln_setup)


def sparse_layer_norm2d(x: Tensor, mask: MaskLike, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                        eps: float = 1e-6, channels_last: bool = False, *, backend: Optional[str] = None) -> Tensor:
    """LayerNorm over the channels of each active pixel (SparK's SparseConvNeXtLayerNorm), 0 at inactive pixels.

    channels_last=False: x [B, C, H, W] (timm LayerNorm2d; y has x's layout); True: x [B, H, W, C] (timm
    LayerNorm after a ConvNeXt block's permute; any strides are read as they are, y is contiguous).
    weight, bias: [C] or None. mask: [B, 1, h, w] bool or a SparseMask. Gradients for x, weight and bias.
    """
    x, weight, bias = C.autocast_inputs("fp32", x, weight, bias)  # layer_norm runs in fp32 under autocast
    C.check_tensor(x, "x", OP_LN, ndim=4)
    C.check_bool(channels_last, "channels_last", OP_LN)
    Cn = x.shape[3] if channels_last else x.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        C.check_tensor(t, name, OP_LN, ndim=1, optional=True)
        if t is not None:
            C.check_shape(t, name, OP_LN, (Cn,))
    C.check_same(OP_LN, "x", x, weight=weight, bias=bias)
    sm = as_sparse_mask(mask, OP_LN)
    check_mask_for(sm, x, OP_LN, spatial=(1, 2) if channels_last else (2, 3))
    be = _backend.choose(OP_LN, x.device, backend=backend, dtype=x.dtype)
    if be == "reference":
        with torch.autocast(x.device.type, enabled=False):
            return _ref.sparse_layer_norm2d(x, sm.mask, weight, bias, eps, channels_last)
    H, W = (x.shape[1], x.shape[2]) if channels_last else (x.shape[2], x.shape[3])
    t = sm.table(H, W)
    y, _, _ = _sparse_ln(x, weight, bias, t.rows, t.count, float(eps), channels_last, be)
    return y


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
        mask = (torch.rand(2, 1, 3, 3, generator=g) < 0.5).to(device)
        rm = torch.zeros(24, device=device)
        rv = torch.ones(24, device=device)
        out.append(CheckCase(f"triton {str(dt)[6:]} batch_norm eval C=24 9x9",
                             functools.partial(sparse_batch_norm2d, backend="triton"), _ref.sparse_batch_norm2d,
                             {"x": t(2, 24, 9, 9), "weight": t(24), "bias": t(24)},
                             {"mask": mask, "running_mean": rm, "running_var": rv, "training": False}, ("y",)))
        for cl in (False, True):
            shape = (2, 9, 9, 40) if cl else (2, 40, 9, 9)
            out.append(CheckCase(f"triton {str(dt)[6:]} layer_norm C=40 {'channels-last' if cl else ''}".strip(),
                                 functools.partial(sparse_layer_norm2d, backend="triton"), _ref.sparse_layer_norm2d,
                                 {"x": t(*shape), "weight": t(40), "bias": t(40)},
                                 {"mask": mask, "channels_last": cl}, ("y",)))
    return out
