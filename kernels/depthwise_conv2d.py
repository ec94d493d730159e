"""Depthwise 2-D convolution with large kernels (UniRepLKNet, RepLKNet, ConvNeXt, HorNet) in Triton.

Notation: x: [B, C, H, W]; weight: [C, Kh, Kw]; y: [B, C, OH, OW];
    y[b, c, oh, ow] = bias[c] + sum_{i, j} w[c, i, j] * x[b, c, oh*sh - ph + i*dh, ow*sw - pw + j*dw]
(ph, pw: the top/left padding; reads outside the image are zeros, which also gives the bottom/right padding).

Algorithm (the same for every kernel size): a program owns a tile of M output rows (flattened over batch and
height: any M of the B*OH rows, so small images waste nothing) times BW output columns, for BC channels. For
each kernel row i it loads the input rows those outputs read, a [BC, M, UC] slab of UC consecutive columns, once,
and multiplies it by a banded Toeplitz matrix T_i[u, n] = w[c, i, j] where column u of the slab is tap j of output
column n. So every loaded input element serves all Kw taps through one tensor-core matrix product (tl.dot), and
the kernel-row loop stays a runtime loop: K=31 costs 31 iterations of small products, nothing is unrolled 961 times.
The same kernel with TRANSPOSED=True computes dx (a transposed convolution: the flipped kernel for stride 1).
dweight: P_i = slab_i^T @ dy summed over many row tiles, then its diagonals are the taps (tl.gather).

Layouts: channels-first (stride_w == 1, BC = 1, long M) or channels-last (stride_c == 1, BC = 8: loads are
contiguous over channels; the product is a batched 3-D tl.dot). fp16/bf16 operands go to the tensor cores with
fp32 accumulation (products of 16-bit values are exact in fp32); fp32 uses input_precision="ieee".
Offsets are int32 (64-bit pointer math per element doubled the registers): the launchers split the batch so no
launch spans 2**31 elements. A non-finite input meets the band's zeros (NaN * 0), so it turns the whole output
row tile into NaN, not only the outputs whose kernel window covers it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import AotCase, TL_DTYPE, empty, signature

KWP = 32  # the largest kernel width (31) rounded up to a power of two: the dweight row held in registers


@triton.jit
def _mm(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b for [BC, M, K] x [BC, K, N] (a batched product; one channel is a plain 2-D product)."""
    BC: tl.constexpr = a.shape[0]
    if BC == 1:
        a2 = tl.reshape(a, (a.shape[1], a.shape[2]))
        b2 = tl.reshape(b, (b.shape[1], b.shape[2]))
        c2 = tl.reshape(acc, (acc.shape[1], acc.shape[2]))
        if IEEE:
            c2 = tl.dot(a2, b2, c2, input_precision="ieee")
        else:
            c2 = tl.dot(a2, b2, c2)
        return tl.reshape(c2, (1, c2.shape[0], c2.shape[1]))
    else:
        if IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)


@triton.jit
def _rows(pid_m, Ho, n_rows, M: tl.constexpr):
    """Output rows pid_m*M + [0, M) of the B*Ho rows: (valid, batch index, row index), each [M]."""
    R = pid_m * M + tl.arange(0, M)
    b = R // Ho
    return R < n_rows, b, R - b * Ho


@triton.jit
def _slab(in_ptr, offs_c, mask_c, b, r, row_ok, i, u, col0, U_total, Hi, Wi, sh, ph, dh,
          sib, sic, sih, siw, TRANSPOSED: tl.constexpr):
    """[BC, M, UC] input values seen by kernel row i: rows of output rows r, columns col0 + u (zeros outside)."""
    if TRANSPOSED:  # output row r reads input row (r + ph - i*dh) / sh when that divides exactly
        t = r + ph - i * dh
        hin = t // sh
        ok = row_ok & (t >= 0) & (t - hin * sh == 0) & (hin < Hi)
    else:
        hin = r * sh - ph + i * dh
        ok = row_ok & (hin >= 0) & (hin < Hi)
    col = col0 + u
    okc = (u < U_total) & (col >= 0) & (col < Wi)
    # int32 offsets: the launcher splits the batch so that no launch spans 2**31 elements
    ptr = in_ptr + (offs_c[:, None, None] * sic + (b * sib + hin * sih)[None, :, None] + (col * siw)[None, None, :])
    return tl.load(ptr, mask=mask_c[:, None, None] & ok[None, :, None] & okc[None, None, :], other=0.0)


@triton.jit
def _depthwise_conv2d_kernel(
    in_ptr, w_ptr, b_ptr, out_ptr,
    C, Hi, Wi, Ho, Wo, n_rows, Kh, Kw, U_total, n_uc,
    sh, sw, ph, pw, dh, dwd,
    sib, sic, sih, siw,  # strides of the input (x, or dy when TRANSPOSED)
    sob, soc, soh, sow,  # strides of the output (y, or dx)
    swc, swk,            # weight element (c, i*Kw + j) is at c*swc + (i*Kw + j)*swk
    TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BC: tl.constexpr, M: tl.constexpr, BW: tl.constexpr, UC: tl.constexpr,
):
    # TRANSPOSED=False: y = conv(x) + bias, input [B, C, Hi, Wi] -> output [B, C, Ho, Wo].
    # TRANSPOSED=True:  dx[r, q] = sum_{i,j} w[i, j] * dy[(r + ph - i*dh)/sh, (q + pw - j*dwd)/sw] (exact
    #                   divisions only): input dy [B, C, OH, OW] -> output dx [B, C, H, W].
    pid_m = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_c = tl.program_id(2)
    offs_c = pid_c * BC + tl.arange(0, BC)
    mask_c = offs_c < C
    row_ok, b, r = _rows(pid_m, Ho, n_rows, M)
    q0 = pid_q * BW
    n3 = tl.arange(0, BW)[None, None, :]
    if TRANSPOSED:
        # first input column any output column of the tile reads: floor((q0 + pw - (Kw-1)*dwd) / sw)
        a = q0 + pw - (Kw - 1) * dwd
        col0 = tl.where(a >= 0, a // sw, -((sw - 1 - a) // sw))
    else:
        col0 = q0 * sw - pw
    w_c = offs_c[:, None, None] * swc
    acc = tl.zeros([BC, M, BW], dtype=tl.float32)
    for uc in range(0, n_uc):
        u = uc * UC + tl.arange(0, UC)
        # the Toeplitz band: slab column u feeds output column n through tap j where jnum = j*dwd
        u3 = u[None, :, None]
        if TRANSPOSED:
            jnum = q0 + pw - (col0 + u3) * sw + n3
        else:
            jnum = u3 - n3 * sw
        j = jnum // dwd
        t_mask = mask_c[:, None, None] & (jnum >= 0) & (jnum - j * dwd == 0) & (j < Kw)
        t_ptr = w_ptr + (w_c + j * swk)
        for i in range(0, Kh):
            a_t = _slab(in_ptr, offs_c, mask_c, b, r, row_ok, i, u, col0, U_total, Hi, Wi, sh, ph, dh,
                        sib, sic, sih, siw, TRANSPOSED)
            t_t = tl.load(t_ptr + i * Kw * swk, mask=t_mask, other=0.0)  # [BC, UC, BW]
            acc = _mm(a_t, t_t, acc, IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[:, None, None]
    q = q0 + n3
    off = offs_c[:, None, None] * soc + (b * sob + r * soh)[None, :, None] + q * sow
    mask = mask_c[:, None, None] & row_ok[None, :, None] & (q < Wo)
    tl.store(out_ptr + off, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _depthwise_conv2d_dw_kernel(
    x_ptr, g_ptr, dwp_ptr, dbp_ptr,
    C, H, W, OH, OW, n_rows, tiles_per_prog, Kh, Kw, U_total, n_uc,
    sh, sw, ph, pw, dh, dwd,
    sxb, sxc, sxh, sxw,  # strides of x
    sgb, sgc, sgh, sgw,  # strides of g = dy
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BC: tl.constexpr, M: tl.constexpr, BW: tl.constexpr, UC: tl.constexpr, KWP: tl.constexpr,
):
    # Program (pid_g, pid_q, pid_c) sums over output rows [pid_g*tiles_per_prog*M, ...) and columns
    # [pid_q*BW, ...): partial dweight [P, C, Kh, Kw] and dbias [P, C] (P = pid_g * n_q + pid_q), summed on the
    # host in a fixed order, so the result is bit-reproducible (no atomics).
    pid_g = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_c = tl.program_id(2)
    part = pid_g * tl.num_programs(1) + pid_q
    offs_c = pid_c * BC + tl.arange(0, BC)
    mask_c = offs_c < C
    q0 = pid_q * BW
    n = tl.arange(0, BW)
    q3 = (q0 + n)[None, None, :]
    col0 = q0 * sw - pw
    g_cq = offs_c[:, None, None] * sgc + q3 * sgw
    m_cq = mask_c[:, None, None] & (q3 < OW)
    if HAS_BIAS:
        db = tl.zeros([BC], dtype=tl.float32)
        for t in range(0, tiles_per_prog):
            row_ok, b, r = _rows(pid_g * tiles_per_prog + t, OH, n_rows, M)
            gv = tl.load(g_ptr + g_cq + (b * sgb + r * sgh)[None, :, None], mask=m_cq & row_ok[None, :, None],
                         other=0.0).to(tl.float32)
            db += tl.sum(tl.sum(gv, axis=2), axis=1)
        tl.store(dbp_ptr + part * C + offs_c, db, mask=mask_c)
    kcol = tl.arange(0, KWP)
    uj = kcol[:, None] * dwd + n[None, :] * sw  # slab column of tap j for output column n: [KWP, BW]
    dw_ptr = dwp_ptr + (part * C + offs_c)[:, None] * (Kh * Kw) + kcol[None, :]  # row i=0 of the partial
    dw_mask = mask_c[:, None] & (kcol < Kw)[None, :]
    for i in range(0, Kh):
        dwrow = tl.zeros([BC, KWP], dtype=tl.float32)
        for uc in range(0, n_uc):
            u = uc * UC + tl.arange(0, UC)
            p = tl.zeros([BC, UC, BW], dtype=tl.float32)
            for t in range(0, tiles_per_prog):
                row_ok, b, r = _rows(pid_g * tiles_per_prog + t, OH, n_rows, M)
                a_t = _slab(x_ptr, offs_c, mask_c, b, r, row_ok, i, u, col0, U_total, H, W, sh, ph, dh,
                            sxb, sxc, sxh, sxw, False)
                gv = tl.load(g_ptr + g_cq + (b * sgb + r * sgh)[None, :, None], mask=m_cq & row_ok[None, :, None],
                             other=0.0)
                p = _mm(tl.trans(a_t, (0, 2, 1)), gv, p, IEEE)  # P[c, u, n] += sum_m x[c, m, u] g[c, m, n]
            # tap j of output column n sits at P[c, n*sw + j*dwd - uc*UC, n]: gather the band, sum over n
            loc = uj - uc * UC
            inside = (loc >= 0) & (loc < UC) & (kcol < Kw)[:, None]
            idx = tl.broadcast_to(tl.where(inside, loc, 0)[None, :, :], (BC, KWP, BW))
            diag = tl.gather(p, idx, 1)
            dwrow += tl.sum(tl.where(inside[None, :, :], diag, 0.0), axis=2)
        tl.store(dw_ptr + i * Kw, dwrow, mask=dw_mask)


# ---------------------------------------------------------------------------------------------------------------
# launch configuration

def _config(channels_last: bool, Wo: int, dtype: torch.dtype) -> dict:
    """Tile shape per layout. M: output rows; BW: output columns (>= 16 for tl.dot); UC: slab columns per
    product. Sizes chosen to compile for sm_90 without register spills (see aot_cases)."""
    if channels_last:  # 8 contiguous channels per load; one batched product over them
        # fp32 (FMA products) with 4 warps spilled a few bytes in the dweight kernel; 8 warps do not
        return {"BC": 8, "M": 16, "BW": 16, "UC": 16, "num_warps": 8 if dtype == torch.float32 else 4,
                "num_stages": 1}
    # num_stages=1: the loops are nested with tiny trip counts; pipelining only added live registers
    return {"BC": 1, "M": 64, "BW": 16 if Wo <= 16 else 32, "UC": 32, "num_warps": 4, "num_stages": 1}


# The dweight kernel's launch options on top of the tile config: left alone, ptxas capped it at 80 registers
# and spilled (bf16, stride 1, dilation 1); with a cap of 128 it takes 88 and spills nothing.
_DW_OPTS = {"maxnreg": 128}


def _u_total(BW: int, K: int, stride: int, dil: int, transposed: bool) -> int:
    """Slab columns a tile of BW output columns needs (an upper bound)."""
    if transposed:
        return ((BW - 1) + (K - 1) * dil) // stride + 2
    return (BW - 1) * stride + (K - 1) * dil + 1


def _channels_last(x: torch.Tensor) -> bool:
    return x.stride(1) == 1 and not x.is_contiguous()


def _empty_as(x: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    """A dense [B, C, h, w] tensor in x's memory layout."""
    B, C, h, w = shape
    dtype = dtype or x.dtype
    if _channels_last(x):
        return empty((B, h, w, C), dtype=dtype, device=x.device).permute(0, 3, 1, 2)
    return empty((B, C, h, w), dtype=dtype, device=x.device)


def _weight_view(weight: torch.Tensor, channels_last: bool):
    """weight [C, Kh, Kw] -> (tensor, swc, swk): channels-last kernels read it as [Kh*Kw, C] (contiguous in c)."""
    C, Kh, Kw = weight.shape
    if channels_last:
        return weight.reshape(C, Kh * Kw).t().contiguous(), 1, C
    return weight.contiguous(), Kh * Kw, 1


_INT32_LIMIT = 2**31 - 1


def _batch_chunks(B: int, *tensors) -> list[tuple[int, int]]:
    """Split the batch so that every element offset a launch computes fits in int32 (the kernels index in 32
    bits: 64-bit pointer math per element doubled their registers). tensors: [B, ...] dense views."""
    nb = B
    for t in tensors:
        extent = 1 + sum((t.shape[d] - 1) * t.stride(d) for d in range(1, t.dim()))
        if extent > _INT32_LIMIT:
            raise ValueError(f"depthwise_conv2d: one image of shape {tuple(t.shape[1:])} spans {extent} elements, "
                             "more than the Triton kernels index (2**31); use backend='reference'")
        if B > 1:
            nb = min(nb, (_INT32_LIMIT - extent) // t.stride(0) + 1)
    return [(b, min(B, b + nb)) for b in range(0, B, nb)]


def _conv(inp, weight, bias, out, pad, stride, dilation, transposed):
    """out = conv(inp) (or the transposed conv) for one launch per batch chunk."""
    B, C, Hi, Wi = inp.shape
    _, _, Ho, Wo = out.shape
    _, Kh, Kw = weight.shape
    cl = _channels_last(inp)
    cfg = _config(cl, Wo, inp.dtype)
    w, swc, swk = _weight_view(weight, cl)
    U = _u_total(cfg["BW"], Kw, stride[1], dilation[1], transposed)
    for b0, b1 in _batch_chunks(B, inp, out):
        src, dst = inp[b0:b1], out[b0:b1]
        n_rows = (b1 - b0) * Ho
        grid = (triton.cdiv(n_rows, cfg["M"]), triton.cdiv(Wo, cfg["BW"]), triton.cdiv(C, cfg["BC"]))
        _depthwise_conv2d_kernel[grid](
            src, w, bias if bias is not None else w, dst,
            C, Hi, Wi, Ho, Wo, n_rows, Kh, Kw, U, triton.cdiv(U, cfg["UC"]),
            stride[0], stride[1], pad[0], pad[1], dilation[0], dilation[1],
            *src.stride(), *dst.stride(), swc, swk,
            TRANSPOSED=transposed, HAS_BIAS=bias is not None, IEEE=inp.dtype == torch.float32,
            BC=cfg["BC"], M=cfg["M"], BW=cfg["BW"], UC=cfg["UC"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return out


def depthwise_conv2d_fwd(x, weight, bias, out_hw, pad, stride, dilation):
    """x: [B, C, H, W] channels-first or channels-last; weight: [C, Kh, Kw]; bias: [C] | None; out_hw: (OH, OW);
    pad: (top, left); stride, dilation: pairs. Returns y [B, C, OH, OW] in x's layout and dtype."""
    B, C = x.shape[:2]
    y = _empty_as(x, (B, C, *out_hw))
    if y.numel() == 0:
        return y
    return _conv(x, weight, bias, y, pad, stride, dilation, transposed=False)


# Aim for about this many programs in the dweight kernel: each sums over many row tiles, so the partial sums
# (and the diagonal extraction done once per program) stay small. A fixed number (not the GPU's SM count) keeps
# the summation order, hence the bits of dweight, the same on every GPU.
_DW_PROGRAMS = 1024


def _dweight(x, dy, Kh, Kw, pad, stride, dilation, need_bias):
    """Partial sums of dweight [P, C, Kh, Kw] and dbias [P, C] (fp32) over one batch chunk."""
    B, C, H, W = x.shape
    OH, OW = dy.shape[2:]
    cfg = _config(_channels_last(x), OW, x.dtype)
    n_rows = B * OH
    n_tiles = triton.cdiv(n_rows, cfg["M"])
    n_q, n_c = triton.cdiv(OW, cfg["BW"]), triton.cdiv(C, cfg["BC"])
    n_g = max(1, min(n_tiles, _DW_PROGRAMS // (n_q * n_c)))
    tiles = triton.cdiv(n_tiles, n_g)
    n_g = triton.cdiv(n_tiles, tiles)
    U = _u_total(cfg["BW"], Kw, stride[1], dilation[1], False)
    dwp = empty((n_g * n_q, C, Kh, Kw), dtype=torch.float32, device=x.device)
    if dwp.numel() > _INT32_LIMIT:
        raise ValueError(f"depthwise_conv2d: the dweight partial sums {tuple(dwp.shape)} exceed 2**31 elements")
    dbp = empty((n_g * n_q, C), dtype=torch.float32, device=x.device) if need_bias else dwp
    _depthwise_conv2d_dw_kernel[(n_g, n_q, n_c)](
        x, dy, dwp, dbp,
        C, H, W, OH, OW, n_rows, tiles, Kh, Kw, U, triton.cdiv(U, cfg["UC"]),
        stride[0], stride[1], pad[0], pad[1], dilation[0], dilation[1],
        *x.stride(), *dy.stride(),
        HAS_BIAS=need_bias, IEEE=x.dtype == torch.float32,
        BC=cfg["BC"], M=cfg["M"], BW=cfg["BW"], UC=cfg["UC"], KWP=KWP,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **_DW_OPTS,
    )
    return dwp, (dbp if need_bias else None)


def depthwise_conv2d_bwd(x, weight, dy, pad, stride, dilation, need_bias: bool):
    """dy: [B, C, OH, OW] in x's layout. Returns (dx [x's layout and dtype], dweight [C, Kh, Kw] fp32,
    dbias [C] fp32 or None)."""
    B, C, H, W = x.shape
    _, Kh, Kw = weight.shape
    dx = _empty_as(x, (B, C, H, W))
    dw = torch.zeros(C, Kh, Kw, dtype=torch.float32, device=x.device)
    db = torch.zeros(C, dtype=torch.float32, device=x.device) if need_bias else None
    if dy.numel() == 0:
        return dx.zero_(), dw, db
    if dx.numel():
        _conv(dy, weight, None, dx, pad, stride, dilation, transposed=True)
    # fixed-order reductions over the partial sums (programs, then batch chunks): bit-reproducible
    for b0, b1 in _batch_chunks(B, x, dy):
        dwp, dbp = _dweight(x[b0:b1], dy[b0:b1], Kh, Kw, pad, stride, dilation, need_bias)
        dw += dwp.sum(0)
        if need_bias:
            db += dbp.sum(0)
    return dx, dw, db


# ---------------------------------------------------------------------------------------------------------------
# ahead-of-time compile cases (CI compiles each for sm_90; see kernels/common.py)

def aot_cases():
    """Every configuration the launchers pick: 3 dtypes x 2 layouts (x 2 column tiles for bf16 channels-first)
    x (forward, dx, dweight), plus the bf16 kernels specialised for stride 1 and dilation 1 as Triton compiles
    them at run time for the common case (ints equal to 1 become constants)."""
    cases = []
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        t = TL_DTYPE[dt]
        for cl in (False, True):
            lay = "cl" if cl else "cf"
            for wo in ((16, 64) if dt == torch.bfloat16 and not cl else (64,)):
                cfg = _config(cl, wo, dt)
                blocks = {k: cfg[k] for k in ("BC", "M", "BW", "UC")}
                opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
                ieee = dt == torch.float32
                for unit in ([{}, {"sh": 1, "sw": 1, "dh": 1, "dwd": 1}] if dt == torch.bfloat16 else [{}]):
                    tag = f"{t},{lay},BW={cfg['BW']}" + (",s1d1" if unit else "")
                    # the contiguous stride is 1: specialise it as the launcher's runtime specialisation does
                    unit_io = dict(unit, **({"sic": 1, "soc": 1, "swc": 1} if cl else {"siw": 1, "sow": 1, "swk": 1}))
                    for transposed in (False, True):
                        c = dict(TRANSPOSED=transposed, HAS_BIAS=not transposed, IEEE=ieee, **blocks, **unit_io)
                        ptrs = {"in_ptr": t, "w_ptr": t, "b_ptr": t, "out_ptr": t}
                        cases.append(AotCase(f"depthwise_conv2d[{tag},{'dx' if transposed else 'fwd'}]",
                                             _depthwise_conv2d_kernel,
                                             signature(_depthwise_conv2d_kernel, ptrs, c), c, opts))
                    unit_dw = dict(unit, **({"sxc": 1, "sgc": 1} if cl else {"sxw": 1, "sgw": 1}))
                    c = dict(HAS_BIAS=True, IEEE=ieee, KWP=KWP, **blocks, **unit_dw)
                    ptrs = {"x_ptr": t, "g_ptr": t, "dwp_ptr": "fp32", "dbp_ptr": "fp32"}
                    cases.append(AotCase(f"depthwise_conv2d_dw[{tag}]", _depthwise_conv2d_dw_kernel,
                                         signature(_depthwise_conv2d_dw_kernel, ptrs, c), c,
                                         dict(opts, **_DW_OPTS)))
    return cases
