"""fastlayers.depthwise_conv2d: depthwise 2-D convolution (kernels up to 31x31, dilation, stride), as
F.conv2d(groups=C).

validate -> backend choice -> custom op fastlayers::depthwise_conv2d (fake + autograd) -> Triton kernels,
or the reference (plain PyTorch, differentiated by autograd) on CPU / float64 / on request.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .. import _backend
from .. import reference as _ref
from . import _common as C

OP = "depthwise_conv2d"
MAX_K = 31

Pair = Union[int, tuple[int, int]]


def _is_channels_last(x: Tensor) -> bool:
    """x: [B, C, H, W] stored as a contiguous [B, H, W, C] (and not also plainly contiguous)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _as_layout(t: Tensor, channels_last: bool) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()


def _out_size(size: int, k: int, pad: int, dil: int, stride: int) -> int:
    return (size + pad - dil * (k - 1) - 1) // stride + 1


def _empty_like_layout(x: Tensor, shape) -> Tensor:
    B, Cn, h, w = shape
    if _is_channels_last(x):
        return x.new_empty((B, h, w, Cn)).permute(0, 3, 1, 2)
    return x.new_empty((B, Cn, h, w))


@torch.library.custom_op("fastlayers::depthwise_conv2d", mutates_args=())
def _depthwise_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], sh: int, sw: int, pt: int, pb: int,
                      pl: int, pr: int, dh: int, dw: int, backend: str) -> Tensor:
    from ..kernels import depthwise_conv2d as K
    Kh, Kw = weight.shape[2:]
    oh = _out_size(x.shape[2], Kh, pt + pb, dh, sh)
    ow = _out_size(x.shape[3], Kw, pl + pr, dw, sw)
    return K.depthwise_conv2d_fwd(x, weight[:, 0], bias, (oh, ow), (pt, pl), (sh, sw), (dh, dw))


@_depthwise_conv2d.register_fake
def _(x, weight, bias, sh, sw, pt, pb, pl, pr, dh, dw, backend):
    Kh, Kw = weight.shape[2:]
    oh = _out_size(x.shape[2], Kh, pt + pb, dh, sh)
    ow = _out_size(x.shape[3], Kw, pl + pr, dw, sw)
    return _empty_like_layout(x, (x.shape[0], x.shape[1], oh, ow))


@torch.library.custom_op("fastlayers::depthwise_conv2d_bwd", mutates_args=())
def _depthwise_conv2d_bwd(dy: Tensor, x: Tensor, weight: Tensor, has_bias: bool, sh: int, sw: int, pt: int,
                          pl: int, dh: int, dw: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, dweight, dbias or an empty tensor)."""
    from ..kernels import depthwise_conv2d as K
    dy = _as_layout(dy, _is_channels_last(x))
    dx, dwt, db = K.depthwise_conv2d_bwd(x, weight[:, 0], dy, (pt, pl), (sh, sw), (dh, dw), has_bias)
    dwt = dwt.to(weight.dtype).reshape(weight.shape)
    db = db.to(weight.dtype) if has_bias else x.new_empty(0)
    return dx, dwt, db


@_depthwise_conv2d_bwd.register_fake
def _(dy, x, weight, has_bias, sh, sw, pt, pl, dh, dw, backend):
    db = weight.new_empty(weight.shape[0]) if has_bias else x.new_empty(0)
    return _empty_like_layout(x, x.shape), torch.empty_like(weight, memory_format=torch.contiguous_format), db


def _setup_context(ctx, inputs, output):
    x, weight, bias, sh, sw, pt, pb, pl, pr, dh, dw, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.args = (sh, sw, pt, pl, dh, dw, backend)


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dwt, db = _depthwise_conv2d_bwd(dy, x, weight, ctx.has_bias, *ctx.args)
    return (dx, dwt, db if ctx.has_bias else None) + (None,) * 9


_depthwise_conv2d.register_autograd(_backward, setup_context=_setup_context)


def _pair(v, name: str, lo: int) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{OP}: `{name}` must be an int or a pair of ints, got {v!r}")
        return (C.check_int(v[0], name, OP, min=lo), C.check_int(v[1], name, OP, min=lo))
    v = C.check_int(v, name, OP, min=lo)
    return (v, v)


def resolve_padding(padding, kernel_size, dilation, stride) -> tuple[int, int, int, int]:
    """padding "same" | "valid" | int | (ph, pw) -> (top, bottom, left, right), as F.conv2d applies it."""
    if isinstance(padding, str):
        C.check_choice(padding, "padding", OP, ("same", "valid"))
        if padding == "valid":
            return (0, 0, 0, 0)
        if stride != (1, 1):
            raise ValueError(f"{OP}: padding='same' is not supported for strided convolutions (as in F.conv2d), "
                             f"got stride={stride}; pass an int or (ph, pw) padding")
        out = []
        for k, d in zip(kernel_size, dilation):  # torch puts an odd remainder at the bottom/right
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)
    ph, pw = _pair(padding, "padding", 0)
    return (ph, ph, pw, pw)


def _validate(x, weight, bias, padding, dilation, stride):
    C.check_tensor(x, "x", OP, ndim=4)
    C.check_tensor(weight, "weight", OP, ndim=4)
    C.check_tensor(bias, "bias", OP, ndim=1, optional=True)
    B, Cn, H, W = x.shape
    if weight.shape[0] != Cn or weight.shape[1] != 1:
        raise ValueError(f"{OP}: `weight` must have shape [C, 1, Kh, Kw] with C = x.shape[1] = {Cn} (one filter "
                         f"per channel), got {tuple(weight.shape)}")
    Kh, Kw = weight.shape[2:]
    if not (1 <= Kh <= MAX_K and 1 <= Kw <= MAX_K):
        raise ValueError(f"{OP}: the kernel size (Kh, Kw) = weight.shape[2:] must be in [1, {MAX_K}] each, "
                         f"got {(Kh, Kw)}")
    if bias is not None:
        C.check_shape(bias, "bias", OP, (Cn,))
    C.check_same(OP, "x", x, weight=weight, bias=bias)
    stride = _pair(stride, "stride", 1)
    dilation = _pair(dilation, "dilation", 1)
    pads = resolve_padding(padding, (Kh, Kw), dilation, stride)
    for size, k, p, d, axis in ((H, Kh, pads[0] + pads[1], dilation[0], "height"),
                                (W, Kw, pads[2] + pads[3], dilation[1], "width")):
        if size + p < d * (k - 1) + 1:
            raise ValueError(f"{OP}: the padded input {axis} {size} + {p} is smaller than the dilated kernel "
                             f"{d * (k - 1) + 1}")
    return pads, dilation, stride


def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                     padding: Union[str, Pair] = "same", dilation: Pair = 1, stride: Pair = 1,
                     backend: Optional[str] = None) -> Tensor:
    """Depthwise 2-D convolution, one filter per channel: F.conv2d(x, weight, bias, stride, padding, dilation,
    groups=C), with the same output.

    x: [B, C, H, W], fp16/bf16/fp32 (fp64 on the reference backend). Layout: channels-first (contiguous) or
      channels-last (x.contiguous(memory_format=torch.channels_last)) is read as is and y comes back in the
      same layout; other strides are copied first.
    weight: [C, 1, Kh, Kw] (an nn.Conv2d(C, C, K, groups=C) weight), 1 <= Kh, Kw <= 31, odd or even, not
      necessarily square; bias: [C] or None.
    padding: "same" (default; an odd total pads one more at the bottom/right, as torch; stride 1 only),
      "valid", an int or (ph, pw) (zeros on both sides). dilation, stride: int or (h, w) pair, >= 1.
    backend: None/"auto", "triton" or "reference" (see fastlayers.use_backend). fp32 accumulation.
    Gradients flow to x, weight and bias; dweight and dbias are summed in a fixed order (bit-reproducible).
    """
    pads, dilation, stride = _validate(x, weight, bias, padding, dilation, stride)
    # under torch.autocast a conv runs in the autocast dtype, as nn.Conv2d does
    x, weight, bias = C.autocast_inputs("lower", x, weight, bias)
    be = _backend.choose(OP, x.device, backend=backend, dtype=x.dtype, cuda_op=None)
    if be == "reference":  # plain PyTorch: autograd, torch.compile and CPU need nothing more
        with torch.autocast(x.device.type, enabled=False):
            return _ref.depthwise_conv2d(x, weight, bias, padding=padding, dilation=dilation, stride=stride)
    x = _as_layout(x, _is_channels_last(x))
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    return _depthwise_conv2d(x, weight, bias, *stride, *pads, *dilation, be)


def check_cases(device):
    """Small cases for `fastlayers check`: the Triton kernels against the reference."""
    import functools

    from ..testing import CheckCase, check_dtypes

    out = []
    dtypes = check_dtypes(device)
    g = torch.Generator().manual_seed(0)
    for dt in dtypes:
        for (B, Cn, H, W, K, pad, d, s, cl) in ((2, 5, 11, 13, 7, "same", 1, 1, False),
                                                (1, 9, 9, 10, 13, "same", 1, 1, True),
                                                (2, 3, 12, 9, 3, 2, 2, 2, False)):
            def t(*shape, scale=1.0):
                return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt).requires_grad_()
            x = t(B, Cn, H, W)
            if cl:
                x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
            inputs = {"x": x, "weight": t(Cn, 1, K, K, scale=1 / K), "bias": t(Cn)}
            kw = {"padding": pad, "dilation": d, "stride": s}
            out.append(CheckCase(f"triton {str(dt)[6:]} B={B} C={Cn} {H}x{W} K={K} pad={pad} d={d} s={s}"
                                 + (" channels-last" if cl else ""),
                                 functools.partial(depthwise_conv2d, backend="triton"), _ref.depthwise_conv2d,
                                 inputs, kw, ("y",)))
    return out
