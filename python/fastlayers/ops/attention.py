"""fastlayers.attention: fused softmax attention with additive (learnable) bias, relative-position and decay biases,
causal / chunked / key-padding masks; the scores are never materialised.

validate -> backend choice -> custom op fastlayers::attention (fake + autograd) -> Triton kernels, or the
reference (plain PyTorch, differentiated by autograd) on CPU / float64 / on request.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from .. import reference as _ref
from . import _common as C

OP = "attention"
MAX_D = 256  # the Triton kernels' largest head dim (D is padded to a power of two)
FP32_MAX_D = 128  # fp32 (tf32x3 dots) needs small tiles; larger head dims would spill registers


def _bnhd(B: int, H: int, N: int, D: int, like: Tensor) -> Tensor:
    return like.new_empty(B, N, H, D).transpose(1, 2)  # the kernels' output layout


@torch.library.custom_op("fastlayers::attention", mutates_args=())
def _attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], table: Optional[Tensor],
               index: Optional[Tensor], gamma: Optional[Tensor], key_padding_mask: Optional[Tensor], scale: float,
               causal: bool, chunk: int, grid_w: int, backend: str) -> tuple[Tensor, Tensor]:
    """Returns (out [B, H, N, D], lse [B, H, N] fp32, log2 units, saved for the backward)."""
    from ..kernels import attention as K
    return K.attention_fwd(q, k, v, bias, table, index, gamma, key_padding_mask, scale, causal, chunk, grid_w)


@_attention.register_fake
def _(q, k, v, bias, table, index, gamma, key_padding_mask, scale, causal, chunk, grid_w, backend):
    B, H, N, D = q.shape
    return _bnhd(B, H, N, D, q), q.new_empty(B, H, N, dtype=torch.float32)


@torch.library.custom_op("fastlayers::attention_bwd", mutates_args=())
def _attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, bias: Optional[Tensor],
                   table: Optional[Tensor], index: Optional[Tensor], gamma: Optional[Tensor],
                   key_padding_mask: Optional[Tensor], scale: float, causal: bool, chunk: int, grid_w: int,
                   bias_grad: bool, table_grad: bool, backend: str
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dbias or [0], dtable or [0])."""
    from ..kernels import attention as K
    do = do if do.stride(-1) == 1 else do.contiguous()
    dq, dk, dv, dbias, dtable = K.attention_bwd(do, q, k, v, o, lse, bias, table, index, gamma, key_padding_mask,
                                                scale, causal, chunk, grid_w, bias_grad, table_grad)
    dbias = dbias.to(bias.dtype) if dbias is not None else q.new_empty(0)
    dtable = dtable.to(table.dtype) if dtable is not None else q.new_empty(0)
    return dq, dk, dv, dbias, dtable


@_attention_bwd.register_fake
def _(do, q, k, v, o, lse, bias, table, index, gamma, key_padding_mask, scale, causal, chunk, grid_w, bias_grad,
      table_grad, backend):
    B, H, N, D = q.shape
    M = k.shape[2]
    dbias = torch.empty_like(bias, memory_format=torch.contiguous_format) if (bias_grad and bias is not None) \
        else q.new_empty(0)
    dtable = torch.empty_like(table, memory_format=torch.contiguous_format) if (table_grad and table is not None) \
        else q.new_empty(0)
    return _bnhd(B, H, N, D, q), _bnhd(B, H, M, D, q), _bnhd(B, H, M, D, q), dbias, dtable


def _setup_context(ctx, inputs, output):
    q, k, v, bias, table, index, gamma, kpm, scale, causal, chunk, grid_w, backend = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, bias, table, index, gamma, kpm)
    ctx.args = (scale, causal, chunk, grid_w, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, dlse):
    q, k, v, o, lse, bias, table, index, gamma, kpm = ctx.saved_tensors
    scale, causal, chunk, grid_w, backend = ctx.args
    bias_grad = bias is not None and ctx.needs_input_grad[3]
    table_grad = table is not None and ctx.needs_input_grad[4]
    dq, dk, dv, dbias, dtable = _attention_bwd(do, q, k, v, o, lse, bias, table, index, gamma, kpm, scale, causal,
                                               chunk, grid_w, bias_grad, table_grad, backend)
    return (dq, dk, dv, dbias if bias_grad else None, dtable if table_grad else None,
            None, None, None, None, None, None, None, None)


_attention.register_autograd(_backward, setup_context=_setup_context)


# rel_pos index tensors already checked to lie in [0, T) (an index is usually a fixed buffer): id -> (ref, version, T)
_checked_index: dict = {}


def _check_index_range(index: Tensor, T: int) -> None:
    """Every index entry in [0, T): a device sync, so done once per index buffer (and skipped while compiling)."""
    if torch.compiler.is_compiling() or index.numel() == 0:
        return
    hit = _checked_index.get(id(index))
    if hit is not None and hit[0]() is index and hit[1] == (index._version, T):
        return
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or hi >= T:
        raise ValueError(f"{OP}: `rel_pos` index entries must lie in [0, T) with T = table.shape[0] = {T}, "
                         f"got values in [{lo}, {hi}]")
    if len(_checked_index) > 256:
        _checked_index.clear()
    _checked_index[id(index)] = (weakref.ref(index), (index._version, T))


def _check_device(q: Tensor, name: str, t: Tensor) -> None:
    if t.device != q.device:
        raise ValueError(f"{OP}: `{name}` is on {t.device} but `q` is on {q.device}; all tensors must be on one device")


def _validate(q, k, v, bias, causal, scale, rel_pos, decay, chunk_size, key_padding_mask):
    C.check_tensor(q, "q", OP, ndim=4)
    C.check_tensor(k, "k", OP, ndim=4)
    C.check_tensor(v, "v", OP, ndim=4)
    C.check_same(OP, "q", q, k=k, v=v)
    B, H, N, D = q.shape
    M = k.shape[2]
    if tuple(k.shape) != (B, H, M, D) or tuple(v.shape) != (B, H, M, D):
        raise ValueError(f"{OP}: `k` and `v` must have shape [B, H, M, D] = [{B}, {H}, M, {D}] (q: [B, H, N, D]), "
                         f"got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if D == 0:
        raise ValueError(f"{OP}: the head dim D = q.shape[3] must be >= 1, got 0")
    C.check_bool(causal, "causal", OP)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"{OP}: `scale` must be a float or None, got {type(scale).__name__}")
    low = (q.dtype, torch.float32) if q.dtype != torch.float64 else (torch.float64,)
    if bias is not None:
        C.check_tensor(bias, "bias", OP, ndim=(1, 2, 3, 4), dtypes=low)
        bs = (1,) * (4 - bias.dim()) + tuple(bias.shape)
        if any(s not in (1, t) for s, t in zip(bs, (B, H, N, M))):
            raise ValueError(f"{OP}: `bias` must be broadcastable to [B, H, N, M] = {[B, H, N, M]}, "
                             f"got shape {tuple(bias.shape)}")
        _check_device(q, "bias", bias)
    if rel_pos is not None:
        if not isinstance(rel_pos, (tuple, list)) or len(rel_pos) != 2:
            raise TypeError(f"{OP}: `rel_pos` must be a pair (table [T, H], index [N, M]), "
                            f"got {type(rel_pos).__name__}")
        table, index = rel_pos
        C.check_tensor(table, "rel_pos table", OP, ndim=2, dtypes=low)
        C.check_tensor(index, "rel_pos index", OP, ndim=2, dtypes=(torch.int32, torch.int64))
        if table.shape[1] != H:
            raise ValueError(f"{OP}: `rel_pos` table must have shape [T, H] with H = {H}, got {tuple(table.shape)}")
        C.check_shape(index, "rel_pos index", OP, (N, M))
        _check_device(q, "rel_pos table", table)
        _check_device(q, "rel_pos index", index)
        _check_index_range(index, table.shape[0])
    if decay is not None:
        if not isinstance(decay, (tuple, list)) or len(decay) != 2:
            raise TypeError(f"{OP}: `decay` must be a pair (gamma [H], (h, w)), got {type(decay).__name__}")
        gamma, grid = decay
        C.check_tensor(gamma, "decay gamma", OP, ndim=1)
        C.check_shape(gamma, "decay gamma", OP, (H,))
        _check_device(q, "decay gamma", gamma)
        if not isinstance(grid, (tuple, list)) or len(grid) != 2:
            raise TypeError(f"{OP}: the `decay` grid must be a pair of ints (h, w), got {grid!r}")
        gh = C.check_int(grid[0], "decay grid h", OP, min=1)
        gw = C.check_int(grid[1], "decay grid w", OP, min=1)
        if not N == M == gh * gw:
            raise ValueError(f"{OP}: `decay` needs N == M == h*w (every token on the grid; no cls token: pass its "
                             f"bias explicitly instead), got N={N}, M={M}, h*w={gh * gw}")
    if chunk_size is not None:
        C.check_int(chunk_size, "chunk_size", OP, min=1)
    if key_padding_mask is not None:
        C.check_tensor(key_padding_mask, "key_padding_mask", OP, ndim=2, dtypes=(torch.bool,))
        C.check_shape(key_padding_mask, "key_padding_mask", OP, (B, M))
        _check_device(q, "key_padding_mask", key_padding_mask)


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, *, causal: bool = False,
              scale: Optional[float] = None, rel_pos=None, decay=None, chunk_size: Optional[int] = None,
              key_padding_mask: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """softmax(scale * q k^T + biases, masked) v, fused: the [N, M] scores are never materialised.

    q: [B, H, N, D]; k, v: [B, H, M, D] (N != M allowed); fp16, bf16, fp32 (fp64 on the reference backend);
      1 <= D <= 256 on the Triton backend (fp32: D <= 128; D is padded to a power of two). Any strides with a
      unit stride on D are read as they are (the q/k/v views of a fused qkv projection need no copy).
    scale: default D ** -0.5.
    bias: additive, broadcastable to [B, H, N, M] (q's dtype or fp32). When it requires grad, its gradient is
      computed in the fused backward and reduced over the broadcast dims deterministically (no atomics).
    rel_pos = (table [T, H], index [N, M] int32/int64): adds table[index[n, m], h] (Swin/BEiT relative position
      bias), gathered in the kernel; the table gets its gradient, deterministically.
    decay = (gamma [H], (h, w)): RMT's Manhattan decay, adds (|row_n - row_m| + |col_n - col_m|) * log(gamma_h)
      for tokens in row-major order on an h x w grid; needs N == M == h*w (no cls token); no gradient to gamma.
    causal: key m is seen by query n iff m <= n (top-left aligned, as SDPA's is_causal, also when N != M).
    chunk_size: block-diagonal attention, n // chunk_size == m // chunk_size (with causal: causal within a chunk).
    key_padding_mask: [B, M] bool, True marks a padded key that is ignored (nn.MultiheadAttention's convention;
      the opposite of SDPA's boolean attn_mask).
    A query whose keys are all masked gets output 0 (not NaN) and zero gradients.
    Returns out [B, H, N, D] in q's dtype (laid out as [B, N, H, D], so out.transpose(1, 2).reshape(B, N, H*D)
    is free).
    backend: None/"auto", "triton" or "reference" (see fastlayers.use_backend).
    """
    # under torch.autocast attention runs in the autocast dtype, as SDPA does with its float attn_mask too
    q, k, v, bias = C.autocast_inputs("lower", q, k, v, bias)
    if rel_pos is not None and isinstance(rel_pos, (tuple, list)) and len(rel_pos) == 2:
        rel_pos = (C.autocast_inputs("lower", rel_pos[0])[0], rel_pos[1])
    _validate(q, k, v, bias, causal, scale, rel_pos, decay, chunk_size, key_padding_mask)
    D = q.shape[-1]
    scale = float(D ** -0.5 if scale is None else scale)
    triton_ok = True
    if D > MAX_D:
        triton_ok = f"head dim D = {D} > {MAX_D}"
    elif q.dtype == torch.float32 and D > FP32_MAX_D:
        triton_ok = f"float32 with head dim D = {D} > {FP32_MAX_D}; use bf16/fp16"
    be = _backend.choose(OP, q.device, backend=backend, dtype=q.dtype, triton_ok=triton_ok)
    if be == "reference":
        with torch.autocast(q.device.type, enabled=False):
            return _ref.attention(q, k, v, bias, causal=causal, scale=scale, rel_pos=rel_pos, decay=decay,
                                  chunk_size=chunk_size, key_padding_mask=key_padding_mask)
    table, index = rel_pos if rel_pos is not None else (None, None)
    gamma, grid = decay if decay is not None else (None, (0, 0))
    o, _ = _attention(_unit_last(q), _unit_last(k), _unit_last(v), bias, table, index,
                      gamma.detach() if gamma is not None else None, key_padding_mask, scale, causal,
                      chunk_size or 0, int(grid[1]), be)
    return o


def check_cases(device):
    """Small cases for `fastlayers check`: the Triton kernels against the reference."""
    import functools

    from ..testing import CheckCase, check_dtypes

    out = []
    dtypes = check_dtypes(device)
    g = torch.Generator().manual_seed(0)

    def t(*shape, dt, grad=True):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt).requires_grad_(grad)

    fn = functools.partial(attention, backend="triton")
    for dt in dtypes:
        B, H, N, M, D = 2, 3, 37, 37, 40
        out.append(CheckCase(f"triton {str(dt)[6:]} B={B} H={H} N={N} D={D} bias[1,H,N,N]", fn, _ref.attention,
                             {"q": t(B, H, N, D, dt=dt), "k": t(B, H, M, D, dt=dt), "v": t(B, H, M, D, dt=dt),
                              "bias": t(1, H, N, M, dt=dt)}, {}, ("out",)))
        index = torch.randint(0, 11, (7, 9), generator=g).to(device)
        out.append(CheckCase(f"triton {str(dt)[6:]} N=7 M=9 D=16 rel_pos causal", fn, _ref.attention,
                             {"q": t(1, 2, 7, 16, dt=dt), "k": t(1, 2, 9, 16, dt=dt), "v": t(1, 2, 9, 16, dt=dt)},
                             {"rel_pos": (t(11, 2, dt=dt, grad=False), index), "causal": True}, ("out",)))
    return out
