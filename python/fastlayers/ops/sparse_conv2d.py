"""fastlayers.sparse_conv2d: SparK's sparse masked convolution, computed on the active pixels only.

A SparseMask holds one mask and, per feature-map resolution, the table of its active pixels (built on the
device without a host sync, once, then reused by every layer at that resolution).
validate -> backend choice -> custom op fastlayers::sparse_conv2d (fake + autograd) -> Triton kernels, or the
reference (plain PyTorch, differentiated by autograd) on CPU / float64 / on request.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import _backend
from .. import reference as _ref
from . import _common as C

OP = "sparse_conv2d"
MAX_K = 31


class Table(NamedTuple):
    """The active pixels of one resolution. rows: [B*H*W] int32 flat pixel indices, active ones first (sorted by
    stride parity when built for a strided dx), then inactive; count: [1] int32, how many are active;
    active: [B*H*W] int8, 1 at active pixels (raster order)."""
    rows: Tensor
    count: Tensor
    active: Tensor


class SparseMask:
    """A SparK mask [B, 1, h, w] (bool, True = visible) and its per-resolution tables, cached.

    Build one per forward (SparK sets its mask once per forward too) and pass it to every sparse op or set it as
    the modules' context (fastlayers.nn.sparse_mask): each resolution's table is then built once and reused.
    """

    def __init__(self, mask: Tensor):
        C.check_tensor(mask, "mask", "SparseMask", ndim=4, dtypes=(torch.bool,))
        if mask.shape[1] != 1:
            raise ValueError(f"SparseMask: `mask` must have shape [B, 1, h, w], got {tuple(mask.shape)}")
        self.mask = mask
        self._cache: dict = {}

    @property
    def shape(self):
        return self.mask.shape

    @property
    def device(self):
        return self.mask.device

    def check(self, H: int, W: int, name: str, op: str) -> None:
        h, w = self.mask.shape[2:]
        if h == 0 or w == 0 or H % h or W % w:
            raise ValueError(f"{op}: the spatial size of `{name}` ({H}x{W}) must be a whole multiple of the mask's "
                             f"({h}x{w}): SparK repeats each mask cell over a block of pixels")

    def dense(self, H: int, W: int) -> Tensor:
        """[B, 1, H, W] bool: the mask repeated block-wise to this resolution (cached)."""
        key = ("dense", H, W)
        if key not in self._cache:
            self._cache[key] = _ref.upsample_mask(self.mask, H, W)
        return self._cache[key]

    def table(self, H: int, W: int, stride: Sequence[int] = (1, 1)) -> Table:
        """The table of active pixels at H x W (cached). stride > 1: active pixels sorted by (h % sh, w % sw) so
        the tiles of a strided convolution's dx meet few taps."""
        sh, sw = int(stride[0]), int(stride[1])
        key = ("table", H, W, sh, sw)
        if key not in self._cache:
            m = self.dense(H, W).reshape(-1)
            n_buckets = sh * sw
            if n_buckets == 1:
                bucket = (~m).to(torch.int8)
            else:
                hh = torch.arange(H, device=m.device).remainder(sh).view(H, 1)
                ww = torch.arange(W, device=m.device).remainder(sw).view(1, W)
                parity = (hh * sw + ww).to(torch.int32).expand(self.mask.shape[0], H, W).reshape(-1)
                bucket = torch.where(m, parity, n_buckets)
            rows = torch.argsort(bucket, stable=True).to(torch.int32)
            self._cache[key] = Table(rows, m.sum(dtype=torch.int32).reshape(1), m.to(torch.int8))
        return self._cache[key]

    def count(self, H: int, W: int) -> int:
        """Number of active pixels at H x W (a host sync; cached)."""
        key = ("count", H, W)
        if key not in self._cache:
            self._cache[key] = int(self.table(H, W).count.item())
        return self._cache[key]

    def __repr__(self) -> str:
        return f"SparseMask(shape={tuple(self.mask.shape)}, device={self.mask.device})"


# SparseMasks built for plain mask tensors, keyed by the tensor's identity (checked through a weak reference, so a
# new tensor at a recycled id never hits) and version (an in-place change rebuilds). Small: each entry keeps its
# mask and tables alive (a few MB per resolution at B=64) until evicted; pass a SparseMask to control lifetime.
_MASK_CACHE: dict = {}
_MASK_CACHE_SIZE = 2

MaskLike = Union[Tensor, SparseMask]


def as_sparse_mask(mask: MaskLike, op: str = OP) -> SparseMask:
    if isinstance(mask, SparseMask):
        return mask
    C.check_tensor(mask, "mask", op, ndim=4, dtypes=(torch.bool,))
    if torch.compiler.is_compiling():  # traced: the tables become graph ops
        return SparseMask(mask)
    key = id(mask)
    hit = _MASK_CACHE.get(key)
    if hit is not None and hit[0]() is mask and hit[1] == mask._version:
        return hit[2]
    sm = SparseMask(mask)
    for k in [k for k, v in _MASK_CACHE.items() if v[0]() is None]:
        del _MASK_CACHE[k]
    while len(_MASK_CACHE) >= _MASK_CACHE_SIZE:
        del _MASK_CACHE[next(iter(_MASK_CACHE))]
    _MASK_CACHE[key] = (weakref.ref(mask), mask._version, sm)
    return sm


def check_mask_for(sm: SparseMask, x: Tensor, op: str, spatial=(2, 3)) -> None:
    if sm.mask.device != x.device:
        raise ValueError(f"{op}: `mask` is on {sm.mask.device} but `x` is on {x.device}; all tensors must be on "
                         "one device")
    if sm.mask.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: `mask` must have shape [B, 1, h, w] with B = x.shape[0] = {x.shape[0]}, got "
                         f"{tuple(sm.mask.shape)}")
    sm.check(x.shape[spatial[0]], x.shape[spatial[1]], "x", op)
    if x.shape[0] * x.shape[spatial[0]] * x.shape[spatial[1]] >= 2**31:
        raise ValueError(f"{op}: B*H*W must be < 2**31 (pixel indices are int32), got shape {tuple(x.shape)}")


# ---------------------------------------------------------------------------------------------------------------
# custom op

def _out_format(x: Tensor):
    cl = (not x.is_contiguous()) and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if cl else torch.contiguous_format


def _out_size(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _kernels():
    from ..kernels import sparse_conv2d as K
    return K


def _alloc(shape, like: Tensor, fmt) -> Tensor:
    from ..kernels.common import empty_format
    return empty_format(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


@torch.library.custom_op("fastlayers::sparse_conv2d", mutates_args=())
def _sparse_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], rows_out: Tensor, count_out: Tensor,
                   act_out: Tensor, act_in: Tensor, rows_in: Optional[Tensor], count_in: Optional[Tensor],
                   stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                   backend: str) -> Tensor:
    B, _, H, W = x.shape
    C_out, _, KH, KW = weight.shape
    Ho = _out_size(H, KH, stride[0], padding[0], dilation[0])
    Wo = _out_size(W, KW, stride[1], padding[1], dilation[1])
    y = _alloc((B, C_out, Ho, Wo), x, _out_format(x))
    return _kernels().sparse_conv2d_fwd(x, weight, bias, rows_out, count_out, act_in, y, stride, padding, dilation,
                                        groups)


@_sparse_conv2d.register_fake
def _(x, weight, bias, rows_out, count_out, act_out, act_in, rows_in, count_in, stride, padding, dilation, groups,
      backend):
    B, _, H, W = x.shape
    C_out, _, KH, KW = weight.shape
    Ho = _out_size(H, KH, stride[0], padding[0], dilation[0])
    Wo = _out_size(W, KW, stride[1], padding[1], dilation[1])
    return x.new_empty((B, C_out, Ho, Wo)).contiguous(memory_format=_out_format(x))


@torch.library.custom_op("fastlayers::sparse_conv2d_bwd", mutates_args=())
def _sparse_conv2d_bwd(dy: Tensor, x: Tensor, weight: Tensor, rows_out: Tensor, count_out: Tensor, act_out: Tensor,
                       act_in: Tensor, rows_in: Optional[Tensor], count_in: Optional[Tensor], stride: Sequence[int],
                       padding: Sequence[int], dilation: Sequence[int], groups: int, need_dx: bool, has_bias: bool,
                       backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx or [0], dweight, dbias or [0])."""
    from ..kernels.common import empty_like
    dx = empty_like(x) if need_dx else None
    dx, dw, db = _kernels().sparse_conv2d_bwd(dy, x, weight, rows_out, count_out, act_out, act_in, rows_in, count_in,
                                              dx, stride, padding, dilation, groups, has_bias)
    return (dx if need_dx else x.new_empty(0), dw.to(weight.dtype),
            db.to(weight.dtype) if has_bias else x.new_empty(0))


@_sparse_conv2d_bwd.register_fake
def _(dy, x, weight, rows_out, count_out, act_out, act_in, rows_in, count_in, stride, padding, dilation, groups,
      need_dx, has_bias, backend):
    return (torch.empty_like(x) if need_dx else x.new_empty(0), torch.empty_like(weight),
            weight.new_empty(weight.shape[0]) if has_bias else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, rows_out, count_out, act_out, act_in, rows_in, count_in, stride, padding, dilation, groups, \
        backend = inputs
    ctx.save_for_backward(x, weight, rows_out, count_out, act_out, act_in, rows_in, count_in)
    ctx.args = (stride, padding, dilation, groups, bias is not None, backend)


def _backward(ctx, dy):
    x, weight, rows_out, count_out, act_out, act_in, rows_in, count_in = ctx.saved_tensors
    stride, padding, dilation, groups, has_bias, backend = ctx.args
    need_dx = ctx.needs_input_grad[0] and rows_in is not None
    dx, dw, db = _sparse_conv2d_bwd(dy, x, weight, rows_out, count_out, act_out, act_in, rows_in, count_in, stride,
                                    padding, dilation, groups, need_dx, has_bias, backend)
    return (dx if need_dx else None, dw, db if has_bias else None) + (None,) * 11


_sparse_conv2d.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# public function

def _pair(v, name: str, op: str, min_value: int) -> tuple[int, int]:
    vals = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if len(vals) != 2:
        raise ValueError(f"{op}: `{name}` must be an int or a pair of ints, got {v!r}")
    for e in vals:
        C.check_int(e, name, op, min=min_value)
    return vals


def _padding(padding, KH: int, KW: int, dilation, stride, op: str) -> tuple[int, int]:
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"{op}: padding='same' needs stride 1 (as in F.conv2d), got stride={stride}")
            tot = ((KH - 1) * dilation[0], (KW - 1) * dilation[1])
            if tot[0] % 2 or tot[1] % 2:
                raise ValueError(f"{op}: padding='same' with an even (dilated) kernel pads asymmetrically, which is "
                                 f"not supported; pad explicitly")
            return tot[0] // 2, tot[1] // 2
        raise ValueError(f"{op}: `padding` must be an int, a pair, 'same' or 'valid', got {padding!r}")
    return _pair(padding, "padding", op, 0)


def _validate(x, weight, bias, groups):
    C.check_tensor(x, "x", OP, ndim=4)
    C.check_tensor(weight, "weight", OP, ndim=4)
    C.check_tensor(bias, "bias", OP, ndim=1, optional=True)
    C.check_int(groups, "groups", OP, min=1)
    B, Cin, H, W = x.shape
    Cout, Cg, KH, KW = weight.shape
    if Cin % groups or Cout % groups:
        raise ValueError(f"{OP}: C_in = {Cin} and C_out = {Cout} must both be divisible by groups = {groups}")
    if Cg != Cin // groups:
        raise ValueError(f"{OP}: `weight` must have shape [C_out, C_in/groups = {Cin // groups}, KH, KW], got "
                         f"{tuple(weight.shape)}")
    if not (1 <= KH <= MAX_K and 1 <= KW <= MAX_K):
        raise ValueError(f"{OP}: kernel sizes KH, KW must be in [1, {MAX_K}], got {KH}x{KW}")
    if bias is not None:
        C.check_shape(bias, "bias", OP, (Cout,))
    C.check_same(OP, "x", x, weight=weight, bias=bias)


def sparse_conv2d(x: Tensor, mask: MaskLike, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
                  dilation=1, groups: int = 1, *, backend: Optional[str] = None) -> Tensor:
    """Sparse masked convolution (SparK): conv2d(x * m_in, weight, bias, ...) * m_out.

    x: [B, C_in, H, W], fp16/bf16/fp32 (fp64 on the reference backend), NCHW or channels-last (any strides are
      read as they are; y is channels-last when x is). mask: [B, 1, h, w] bool at the coarsest resolution, or a
      SparseMask (reuses its cached tables; a plain tensor is cached by identity too); m_in / m_out are the mask
      block-repeated to the input / output resolution, which must be whole multiples of h x w.
    weight: [C_out, C_in/groups, KH, KW], 1 <= KH, KW <= 31; bias: [C_out] or None. stride, padding ('same',
      'valid', int or pair), dilation as F.conv2d. Dense, grouped and depthwise (groups = C_in).
    Inactive inputs contribute nothing and inactive outputs are exactly 0; the kernels compute only the active
    output pixels. Gradients: dx (exactly 0 at inactive pixels), dweight and dbias (sums over active output
    pixels only), deterministic. backend: None/"auto", "triton" or "reference".
    """
    x, weight, bias = C.autocast_inputs("lower", x, weight, bias)  # a conv under autocast, as nn.Conv2d
    _validate(x, weight, bias, groups)
    sm = as_sparse_mask(mask)
    check_mask_for(sm, x, OP)
    KH, KW = weight.shape[2:]
    stride = _pair(stride, "stride", OP, 1)
    dilation = _pair(dilation, "dilation", OP, 1)
    padding = _padding(padding, KH, KW, dilation, stride, OP)
    B, _, H, W = x.shape
    Ho = _out_size(H, KH, stride[0], padding[0], dilation[0])
    Wo = _out_size(W, KW, stride[1], padding[1], dilation[1])
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"{OP}: the output would be empty ({Ho}x{Wo}) for input {H}x{W}, kernel {KH}x{KW}, "
                         f"stride {stride}, padding {padding}, dilation {dilation}")
    sm.check(Ho, Wo, "the output", OP)
    be = _backend.choose(OP, x.device, backend=backend, dtype=x.dtype)
    if be == "reference":
        with torch.autocast(x.device.type, enabled=False):
            return _ref.sparse_conv2d(x, sm.mask, weight, bias, stride, padding, dilation, groups)
    t_out = sm.table(Ho, Wo)
    act_in = sm.table(H, W).active
    rows_in = count_in = None
    if x.requires_grad and torch.is_grad_enabled():
        t_in = sm.table(H, W, stride)
        rows_in, count_in = t_in.rows, t_in.count
    return _sparse_conv2d(x, weight, bias, t_out.rows, t_out.count, t_out.active, act_in, rows_in, count_in,
                          list(stride), list(padding), list(dilation), groups, be)


def check_cases(device):
    """Small cases for `fastlayers check`: the Triton kernels against the reference."""
    import functools

    from ..testing import CheckCase, check_dtypes

    out = []
    dtypes = check_dtypes(device)
    g = torch.Generator().manual_seed(0)
    for dt in dtypes:
        for (B, Cin, Cout, H, k, s, groups) in ((2, 24, 40, 12, 3, 1, 1), (1, 16, 16, 12, 7, 1, 16),
                                                 (2, 3, 16, 8, 3, 2, 1)):
            def t(*shape, grad=True):
                v = torch.randn(*shape, generator=g).to(device=device, dtype=dt)
                return v.requires_grad_(grad)
            mask = (torch.rand(B, 1, 4, 4, generator=g) < 0.5).to(device)
            inputs = {"x": t(B, Cin, H, H), "weight": t(Cout, Cin // groups, k, k), "bias": t(Cout)}
            kw = {"mask": mask, "stride": s, "padding": k // 2, "groups": groups}
            out.append(CheckCase(f"triton {str(dt)[6:]} B={B} {Cin}->{Cout} {H}x{H} k={k} s={s} g={groups}",
                                 functools.partial(sparse_conv2d, backend="triton"), _ref.sparse_conv2d,
                                 inputs, kw, ("y",)))
    return out
