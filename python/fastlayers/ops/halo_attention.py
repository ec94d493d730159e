"""fastlayers.halo_attention: HaloNet's blocked local self-attention with factorised relative positions.

validate -> backend choice -> custom op fastlayers::halo_attention (fake + autograd) -> Triton kernels, or the
reference (plain PyTorch, differentiated by autograd) on CPU / float64 / on request.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from .. import reference as _ref
from . import _common as C

OP = "halo_attention"
MAX_WIN = 32        # keep in sync with kernels.halo_attention.MAX_WIN / MAX_HEAD_DIM
MAX_HEAD_DIM = 128


def _kernels():
    from ..kernels import halo_attention as K
    return K


def _empty_5d(B, H, D, Y, X, like: Tensor, dtype=None):
    """What the kernels allocate, for the fake tensors: like's layout (channels-last if D is innermost)."""
    cl = like.stride(2) == 1 and like.stride(4) != 1
    dtype = dtype or like.dtype
    if cl:
        return like.new_empty((B, Y, X, H, D), dtype=dtype).permute(0, 3, 4, 1, 2)
    return like.new_empty((B, H, D, Y, X), dtype=dtype)


@torch.library.custom_op("fastlayers::halo_attention", mutates_args=())
def _halo_attention(q: Tensor, k: Tensor, v: Tensor, height_rel: Optional[Tensor], width_rel: Optional[Tensor],
                    block_size: int, halo_size: int, query_stride: int, scale: float, pos_scale: float,
                    mask_padding: bool, backend: str) -> tuple[Tensor, Tensor]:
    """Returns (out [B, H, Dv, Hq, Wq], lse [B, H, Hq, Wq] fp32, saved for the backward)."""
    return _kernels().halo_attention_fwd(q, k, v, height_rel, width_rel, block_size, halo_size, query_stride,
                                         scale, pos_scale, mask_padding)


@_halo_attention.register_fake
def _(q, k, v, height_rel, width_rel, block_size, halo_size, query_stride, scale, pos_scale, mask_padding, backend):
    B, H, _, Hq, Wq = q.shape
    out = _empty_5d(B, H, v.shape[2], Hq, Wq, q)
    return out, q.new_empty((B, H, Hq, Wq), dtype=torch.float32)


@torch.library.custom_op("fastlayers::halo_attention_bwd", mutates_args=())
def _halo_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, height_rel: Optional[Tensor],
                        width_rel: Optional[Tensor], out: Tensor, lse: Tensor, block_size: int, halo_size: int,
                        query_stride: int, scale: float, pos_scale: float, mask_padding: bool,
                        backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, d height_rel or [0], d width_rel or [0])."""
    dq, dk, dv, dh, dw = _kernels().halo_attention_bwd(dout, q, k, v, height_rel, width_rel, out, lse, block_size,
                                                       halo_size, query_stride, scale, pos_scale, mask_padding)
    if height_rel is None:
        return dq, dk, dv, q.new_empty(0), q.new_empty(0)
    return dq, dk, dv, dh.to(height_rel.dtype), dw.to(width_rel.dtype)


@_halo_attention_bwd.register_fake
def _(dout, q, k, v, height_rel, width_rel, out, lse, block_size, halo_size, query_stride, scale, pos_scale,
      mask_padding, backend):
    dq = _empty_5d(*q.shape, q)
    dk = _empty_5d(*k.shape, k)
    dv = _empty_5d(*v.shape, v)
    if height_rel is None:
        return dq, dk, dv, q.new_empty(0), q.new_empty(0)
    return dq, dk, dv, torch.empty_like(height_rel), torch.empty_like(width_rel)


def _setup_context(ctx, inputs, output):
    q, k, v, height_rel, width_rel, block_size, halo_size, query_stride, scale, pos_scale, mask_padding, backend = \
        inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, height_rel, width_rel, out, lse)
    ctx.args = (block_size, halo_size, query_stride, scale, pos_scale, mask_padding, backend)


def _backward(ctx, dout, dlse):
    q, k, v, height_rel, width_rel, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dh, dw = _halo_attention_bwd(dout, q, k, v, height_rel, width_rel, out, lse, *ctx.args)
    has_rel = height_rel is not None
    return (dq, dk, dv, dh if has_rel else None, dw if has_rel else None) + (None,) * 7


_halo_attention.register_autograd(_backward, setup_context=_setup_context)


def _validate(q, k, v, block_size, halo_size, rel_pos, scale, query_stride, mask_padding, scale_pos_embed):
    C.check_tensor(q, "q", OP, ndim=5)
    C.check_tensor(k, "k", OP, ndim=5)
    C.check_tensor(v, "v", OP, ndim=5)
    C.check_int(block_size, "block_size", OP, min=1)
    C.check_int(halo_size, "halo_size", OP, min=0)
    C.check_int(query_stride, "query_stride", OP, min=1, max=2)
    C.check_bool(mask_padding, "mask_padding", OP)
    C.check_bool(scale_pos_embed, "scale_pos_embed", OP)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"{OP}: `scale` must be a float or None, got {type(scale).__name__}")
    B, H, Dqk, Hq, Wq = q.shape
    Hf, Wf = k.shape[3:]
    if k.shape[:3] != (B, H, Dqk):
        raise ValueError(f"{OP}: `k` must have shape [B, H, Dqk, Hf, Wf] with B, H, Dqk = {(B, H, Dqk)} from `q`, "
                         f"got {tuple(k.shape)}")
    if v.shape[:2] != (B, H) or v.shape[3:] != (Hf, Wf):
        raise ValueError(f"{OP}: `v` must have shape [B, H, Dv, Hf, Wf] = [{B}, {H}, Dv, {Hf}, {Wf}], "
                         f"got {tuple(v.shape)}")
    if Hf % block_size or Wf % block_size:
        raise ValueError(f"{OP}: the feature size (Hf, Wf) = {(Hf, Wf)} must be a multiple of "
                         f"`block_size` = {block_size}")
    if block_size % query_stride:
        raise ValueError(f"{OP}: `block_size` = {block_size} must be a multiple of `query_stride` = "
                         f"{query_stride} (timm pools after the attention instead: avg_down)")
    if (Hq, Wq) != (Hf // query_stride, Wf // query_stride):
        raise ValueError(f"{OP}: `q` must cover the feature map at `query_stride` = {query_stride}: (Hq, Wq) "
                         f"must be {(Hf // query_stride, Wf // query_stride)}, got {(Hq, Wq)}")
    others = {"k": k, "v": v}
    if rel_pos is not None:
        if not isinstance(rel_pos, (tuple, list)) or len(rel_pos) != 2:
            raise TypeError(f"{OP}: `rel_pos` must be a pair (height_rel, width_rel) or None, got "
                            f"{type(rel_pos).__name__}")
        n_rel = 2 * (block_size + 2 * halo_size) - 1
        for name, t in zip(("rel_pos[0] (height_rel)", "rel_pos[1] (width_rel)"), rel_pos):
            C.check_tensor(t, name, OP, ndim=2)
            C.check_shape(t, name, OP, (n_rel, Dqk))
        others.update(height_rel=rel_pos[0], width_rel=rel_pos[1])
    C.check_same(OP, "q", q, **others)


def _triton_ok(block_size, halo_size, Dqk, Dv):
    win = block_size + 2 * halo_size
    if win > MAX_WIN:
        return f"window side block_size + 2*halo_size = {win} > {MAX_WIN}"
    if max(Dqk, Dv) > MAX_HEAD_DIM:
        return f"head dims (Dqk, Dv) = {(Dqk, Dv)} above {MAX_HEAD_DIM}"
    return True


def halo_attention(q: Tensor, k: Tensor, v: Tensor, *, block_size: int, halo_size: int,
                   rel_pos: Optional[tuple] = None, scale: Optional[float] = None, query_stride: int = 1,
                   mask_padding: bool = False, scale_pos_embed: bool = False, backend: Optional[str] = None
                   ) -> Tensor:
    """HaloNet attention: each bq x bq query block attends to the (b+2h) x (b+2h) window of keys around its
    b x b image block (timm's HaloAttn without its 1x1 convolutions and pooling).

    q: [B, H, Dqk, Hf/s, Wf/s]; k: [B, H, Dqk, Hf, Wf]; v: [B, H, Dv, Hf, Wf]; fp16/bf16/fp32 (fp64 on the
      reference backend). Hf, Wf multiples of block_size; s = query_stride (1, or 2: the queries of a block are
      its even positions, as timm's stride-2 q projection gives). Any strides: the views of 1x1-conv outputs
      (`q.unflatten(1, (H, Dqk))`, `kv.unflatten(1, (H, Dqk + Dv)).split([Dqk, Dv], 2)`) are read in place,
      channels-first (NCHW) or channels-last (NHWC memory); the output follows q's layout.
    rel_pos: (height_rel, width_rel), each [2*(b+2h)-1, Dqk]: timm PosEmbedRel's factorised relative logits.
    scale: of q·k, default Dqk ** -0.5; scale_pos_embed: scale the relative logits too (timm's flag).
    mask_padding: False (timm): keys outside the image are zeros that take part in the softmax; True: excluded.
    backend: None/"auto", "triton" or "reference". Gradients flow to q, k, v and rel_pos; the backward is
      deterministic. Returns [B, H, Dv, Hf/s, Wf/s] in q's dtype.
    """
    _validate(q, k, v, block_size, halo_size, rel_pos, scale, query_stride, mask_padding, scale_pos_embed)
    # under torch.autocast attention runs in the autocast dtype, as SDPA does
    q, k, v, *rp = C.autocast_inputs("lower", q, k, v, *(rel_pos or ()))
    rel_pos = tuple(rp) if rel_pos is not None else None
    Dqk, Dv = q.shape[2], v.shape[2]
    scale = float(Dqk ** -0.5 if scale is None else scale)
    be = _backend.choose(OP, q.device, backend=backend, dtype=q.dtype,
                         triton_ok=_triton_ok(block_size, halo_size, Dqk, Dv))
    if be == "reference":
        with torch.autocast(q.device.type, enabled=False):
            return _ref.halo_attention(q, k, v, block_size, halo_size, rel_pos, scale, query_stride, mask_padding,
                                       scale_pos_embed)
    hrel, wrel = (None, None) if rel_pos is None else (rel_pos[0].contiguous(), rel_pos[1].contiguous())
    pos_scale = scale if scale_pos_embed else 1.0
    out, _ = _halo_attention(q, k, v, hrel, wrel, block_size, halo_size, query_stride, scale, pos_scale,
                             mask_padding, be)
    return out


def check_cases(device):
    """Small cases for `fastlayers check`: the Triton kernels against the reference."""
    import functools

    from ..testing import CheckCase, check_dtypes

    out = []
    dtypes = check_dtypes(device)
    g = torch.Generator().manual_seed(0)
    for dt in dtypes:
        for (B, H, Dqk, Dv, Hf, Wf, b, h, s, mask) in ((2, 2, 24, 40, 16, 8, 8, 3, 1, False),
                                                       (1, 3, 16, 8, 8, 12, 4, 2, 2, True)):
            def t(*shape, sc=1.0):
                return (torch.randn(*shape, generator=g) * sc).to(device=device, dtype=dt).requires_grad_()
            n_rel = 2 * (b + 2 * h) - 1
            inputs = {"q": t(B, H, Dqk, Hf // s, Wf // s), "k": t(B, H, Dqk, Hf, Wf), "v": t(B, H, Dv, Hf, Wf),
                      "rel_pos": (t(n_rel, Dqk, sc=Dqk ** -0.5), t(n_rel, Dqk, sc=Dqk ** -0.5))}
            kw = {"block_size": b, "halo_size": h, "query_stride": s, "mask_padding": mask}
            out.append(CheckCase(f"triton {str(dt)[6:]} B={B} H={H} D={Dqk}/{Dv} {Hf}x{Wf} b={b} h={h} s={s}"
                                 + (" mask_padding" if mask else ""),
                                 functools.partial(_with_rel, backend="triton"), _with_rel_ref, _split_rel(inputs),
                                 kw, ("out",)))
    return out


def _split_rel(inputs: dict) -> dict:
    """testing.compare wants flat tensors: rel_pos travels as height_rel / width_rel."""
    d = dict(inputs)
    d["height_rel"], d["width_rel"] = d.pop("rel_pos")
    return d


def _with_rel(q, k, v, height_rel, width_rel, backend=None, **kw):
    return halo_attention(q, k, v, rel_pos=(height_rel, width_rel), backend=backend, **kw)


def _with_rel_ref(q, k, v, height_rel, width_rel, **kw):
    return _ref.halo_attention(q, k, v, kw.pop("block_size"), kw.pop("halo_size"), (height_rel, width_rel), **kw)
