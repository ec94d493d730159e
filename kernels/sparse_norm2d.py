"""SparK's sparse normalisations in Triton: BatchNorm and LayerNorm over the active pixels only.

Notation: x: [B, C, H, W] *logical* (a channels-last [B, H, W, C] tensor is passed as its permuted view; any
strides are read as they are). Tables (rows, count) as in kernels/sparse_conv2d.py: entries [0, count) are the
active pixels; launches over the whole table write zeros at the inactive ones.
BatchNorm: a reduction over the active pixels per channel (fixed chunks, one partial per chunk, combined on the
host in a fixed order: deterministic), then one elementwise pass y = a[c]*x + c[c]. Its backward is the same
pair: sums of dy and dy*xhat, then dx = a[c]*dy + b[c]*(x - d[c]) + c[c].
LayerNorm: one program per tile of active pixels normalises each pixel over C (a single read when C fits one
block, else a second read of the tile for the normalisation); dweight/dbias use the same reduction as BN.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import AotCase, TL_DTYPE, empty, next_pow2, signature
from .sparse_conv2d import _decode, _split


@triton.jit
def _sparse_norm_reduce_kernel(
    x_ptr, dy_ptr, mean_ptr, rstd_ptr, rows_ptr, count_ptr, out_ptr,
    H, W, C, N_SPLIT,
    sxb, sxc, sxh, sxw, syb, syc, syh, syw,
    GRAD: tl.constexpr, PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grid: (N_SPLIT, cdiv(C, BLOCK_C)). Program s covers a fixed chunk of the active tiles.
    # GRAD=False: out [3, N_SPLIT, C] = (pixel count, mean, sum of squared deviations) of x (Chan's merge).
    # GRAD=True:  out [2, N_SPLIT, C] = (sum dy, sum dy * xhat), xhat = (x - mean) * rstd with mean/rstd per
    #             channel ([C]) or, PER_ROW, per table entry ([N], LayerNorm).
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    count = tl.load(count_ptr)
    n_tiles = tl.cdiv(count, BLOCK_M)
    per = tl.cdiv(n_tiles, N_SPLIT)
    t0 = pid_s * per
    t1 = tl.minimum(t0 + per, n_tiles)
    HW = H * W
    s1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if GRAD:
        if not PER_ROW:
            mu_c = tl.load(mean_ptr + cols, mask=mask_c, other=0.0)
            rs_c = tl.load(rstd_ptr + cols, mask=mask_c, other=0.0)
    for t in range(t0, t1):
        pos = t * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = pos < count
        b, h, w = _decode(rows_ptr, pos, valid, HW, W)
        m2 = valid[:, None] & mask_c[None, :]
        xrow = b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
        xv = tl.load(x_ptr + xrow[:, None] + (cols.to(tl.int64) * sxc)[None, :], mask=m2, other=0.0).to(tl.float32)
        if GRAD:
            yrow = b.to(tl.int64) * syb + h.to(tl.int64) * syh + w.to(tl.int64) * syw
            dy = tl.load(dy_ptr + yrow[:, None] + (cols.to(tl.int64) * syc)[None, :], mask=m2,
                         other=0.0).to(tl.float32)
            if PER_ROW:
                mu = tl.load(mean_ptr + pos, mask=valid, other=0.0)
                rs = tl.load(rstd_ptr + pos, mask=valid, other=0.0)
                xhat = (xv - mu[:, None]) * rs[:, None]
            else:
                xhat = (xv - mu_c[None, :]) * rs_c[None, :]
            s1 += tl.sum(dy, axis=0)
            s2 += tl.sum(tl.where(m2, dy * xhat, 0.0), axis=0)
        else:
            nt = tl.minimum(count - t * BLOCK_M, BLOCK_M) * 1.0
            tmean = tl.sum(xv, axis=0) / nt
            d = tl.where(m2, xv - tmean[None, :], 0.0)
            nb = ((t - t0) * BLOCK_M) * 1.0
            ntot = nb + nt
            delta = tmean - s1  # s1: running mean, s2: running sum of squared deviations
            s1 = s1 + delta * (nt / ntot)
            s2 = s2 + tl.sum(d * d, axis=0) + delta * delta * (nb * nt / ntot)
    plane = N_SPLIT * C
    base = pid_s * C + cols
    if GRAD:
        tl.store(out_ptr + base, s1, mask=mask_c)
        tl.store(out_ptr + plane + base, s2, mask=mask_c)
    else:
        n = tl.maximum(tl.minimum(count, t1 * BLOCK_M) - t0 * BLOCK_M, 0) * 1.0
        tl.store(out_ptr + base, tl.zeros((BLOCK_C,), dtype=tl.float32) + n, mask=mask_c)
        tl.store(out_ptr + plane + base, s1, mask=mask_c)
        tl.store(out_ptr + 2 * plane + base, s2, mask=mask_c)


@triton.jit
def _sparse_norm_apply_kernel(
    u_ptr, v_ptr, a_ptr, b_ptr, c_ptr, d_ptr, rows_ptr, count_ptr, out_ptr,
    N, H, W, C,
    sub, suc, suh, suw, svb, svc, svh, svw, sob, soc, soh, sow,
    HAS_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grid: (cdiv(N, BLOCK_M) + 1, cdiv(C, BLOCK_C)). out = a*u + c (+ b*(v - d)) at active pixels, 0 elsewhere;
    # a, b, c, d: [C] fp32.
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    col64 = cols.to(tl.int64)
    count = tl.load(count_ptr)
    n_act = tl.cdiv(count, BLOCK_M)
    HW = H * W
    if pid_m < n_act:
        pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = pos < count
        b, h, w = _decode(rows_ptr, pos, valid, HW, W)
        m2 = valid[:, None] & mask_c[None, :]
        urow = b.to(tl.int64) * sub + h.to(tl.int64) * suh + w.to(tl.int64) * suw
        u = tl.load(u_ptr + urow[:, None] + (col64 * suc)[None, :], mask=m2, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + cols, mask=mask_c, other=0.0)
        c = tl.load(c_ptr + cols, mask=mask_c, other=0.0)
        out = u * a[None, :] + c[None, :]
        if HAS_V:
            vrow = b.to(tl.int64) * svb + h.to(tl.int64) * svh + w.to(tl.int64) * svw
            v = tl.load(v_ptr + vrow[:, None] + (col64 * svc)[None, :], mask=m2, other=0.0).to(tl.float32)
            bb = tl.load(b_ptr + cols, mask=mask_c, other=0.0)
            d = tl.load(d_ptr + cols, mask=mask_c, other=0.0)
            out += (v - d[None, :]) * bb[None, :]
        out = out.to(out_ptr.dtype.element_ty)
    else:
        pos = count + (pid_m - n_act) * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = pos < N
        b, h, w = _decode(rows_ptr, pos, valid, HW, W)
        out = tl.zeros((BLOCK_M, BLOCK_C), dtype=out_ptr.dtype.element_ty)
    orow = b.to(tl.int64) * sob + h.to(tl.int64) * soh + w.to(tl.int64) * sow
    tl.store(out_ptr + orow[:, None] + (col64 * soc)[None, :], out, mask=valid[:, None] & mask_c[None, :])


@triton.jit
def _sparse_layer_norm_fwd_kernel(
    x_ptr, w_ptr, b_ptr, rows_ptr, count_ptr, y_ptr, mean_ptr, rstd_ptr,
    N, H, W, C, eps,
    sxb, sxc, sxh, sxw, syb, syc, syh, syw,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ONE_PASS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grid: (cdiv(N, BLOCK_M) + 1,). Each active pixel: y = (x - mean) * rstd * w + b over its C channels;
    # mean/rstd [N] fp32 per table entry (0 for inactive entries). ONE_PASS: C <= BLOCK_C (one read of x).
    pid = tl.program_id(0)
    count = tl.load(count_ptr)
    n_act = tl.cdiv(count, BLOCK_M)
    HW = H * W
    if pid < n_act:
        pos = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = pos < count
        b, h, w = _decode(rows_ptr, pos, valid, HW, W)
        xrow = b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
        yrow = b.to(tl.int64) * syb + h.to(tl.int64) * syh + w.to(tl.int64) * syw
        if ONE_PASS:
            cols = tl.arange(0, BLOCK_C)
            m2 = valid[:, None] & (cols < C)[None, :]
            xv = tl.load(x_ptr + xrow[:, None] + (cols.to(tl.int64) * sxc)[None, :], mask=m2,
                         other=0.0).to(tl.float32)
            mean = tl.sum(xv, axis=1) / C
            d = tl.where(m2, xv - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
            yv = d * rstd[:, None]
            if HAS_W:
                yv = yv * tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
            if HAS_B:
                yv = yv + tl.load(b_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + yrow[:, None] + (cols.to(tl.int64) * syc)[None, :], yv.to(y_ptr.dtype.element_ty),
                     mask=m2)
        else:
            mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
            ssd = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):  # per-row Welford over channel chunks (Chan's merge)
                cols = c0 + tl.arange(0, BLOCK_C)
                m2 = valid[:, None] & (cols < C)[None, :]
                xv = tl.load(x_ptr + xrow[:, None] + (cols.to(tl.int64) * sxc)[None, :], mask=m2,
                             other=0.0).to(tl.float32)
                nc = tl.minimum(C - c0, BLOCK_C) * 1.0
                cm = tl.sum(xv, axis=1) / nc
                d = tl.where(m2, xv - cm[:, None], 0.0)
                nb = c0 * 1.0
                delta = cm - mean
                mean = mean + delta * (nc / (nb + nc))
                ssd = ssd + tl.sum(d * d, axis=1) + delta * delta * (nb * nc / (nb + nc))
            rstd = 1.0 / tl.sqrt(ssd / C + eps)
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                m2 = valid[:, None] & (cols < C)[None, :]
                xv = tl.load(x_ptr + xrow[:, None] + (cols.to(tl.int64) * sxc)[None, :], mask=m2,
                             other=0.0).to(tl.float32)
                yv = (xv - mean[:, None]) * rstd[:, None]
                if HAS_W:
                    yv = yv * tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
                if HAS_B:
                    yv = yv + tl.load(b_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
                tl.store(y_ptr + yrow[:, None] + (cols.to(tl.int64) * syc)[None, :], yv.to(y_ptr.dtype.element_ty),
                         mask=m2)
    else:
        pos = count + (pid - n_act) * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = pos < N
        b, h, w = _decode(rows_ptr, pos, valid, HW, W)
        yrow = b.to(tl.int64) * syb + h.to(tl.int64) * syh + w.to(tl.int64) * syw
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            tl.store(y_ptr + yrow[:, None] + (cols.to(tl.int64) * syc)[None, :],
                     tl.zeros((BLOCK_M, BLOCK_C), dtype=y_ptr.dtype.element_ty),
                     mask=valid[:, None] & (cols < C)[None, :])
        mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
        rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    tl.store(mean_ptr + pos, mean, mask=valid)
    tl.store(rstd_ptr + pos, rstd, mask=valid)


@triton.jit
def _ln_grad_tile(x_ptr, w_ptr, dy_ptr, xrow, yrow, cols, valid, mu, rs, C, sxc, syc, HAS_W: tl.constexpr):
    """(xhat, g = dy * w) of one channel chunk, zeros outside."""
    m2 = valid[:, None] & (cols < C)[None, :]
    xv = tl.load(x_ptr + xrow[:, None] + (cols.to(tl.int64) * sxc)[None, :], mask=m2, other=0.0).to(tl.float32)
    g = tl.load(dy_ptr + yrow[:, None] + (cols.to(tl.int64) * syc)[None, :], mask=m2, other=0.0).to(tl.float32)
    if HAS_W:
        g = g * tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    xhat = tl.where(m2, (xv - mu[:, None]) * rs[:, None], 0.0)
    return xhat, g, m2


@triton.jit
def _sparse_layer_norm_bwd_kernel(
    x_ptr, w_ptr, dy_ptr, mean_ptr, rstd_ptr, rows_ptr, count_ptr, dx_ptr,
    N, H, W, C,
    sxb, sxc, sxh, sxw, syb, syc, syh, syw, sdb, sdc, sdh, sdw,
    HAS_W: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grid: (cdiv(N, BLOCK_M) + 1,). dx = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)), g = dy * w, at
    # active pixels; 0 at inactive ones.
    pid = tl.program_id(0)
    count = tl.load(count_ptr)
    n_act = tl.cdiv(count, BLOCK_M)
    HW = H * W
    if pid < n_act:
        pos = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = pos < count
        b, h, w = _decode(rows_ptr, pos, valid, HW, W)
        xrow = b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
        yrow = b.to(tl.int64) * syb + h.to(tl.int64) * syh + w.to(tl.int64) * syw
        drow = b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + w.to(tl.int64) * sdw
        mu = tl.load(mean_ptr + pos, mask=valid, other=0.0)
        rs = tl.load(rstd_ptr + pos, mask=valid, other=0.0)
        if ONE_PASS:
            cols = tl.arange(0, BLOCK_C)
            xhat, g, m2 = _ln_grad_tile(x_ptr, w_ptr, dy_ptr, xrow, yrow, cols, valid, mu, rs, C, sxc, syc, HAS_W)
            s1 = tl.sum(g, axis=1) / C
            s2 = tl.sum(g * xhat, axis=1) / C
            dx = (g - s1[:, None] - xhat * s2[:, None]) * rs[:, None]
            tl.store(dx_ptr + drow[:, None] + (cols.to(tl.int64) * sdc)[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=m2)
        else:
            s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
            s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                xhat, g, m2 = _ln_grad_tile(x_ptr, w_ptr, dy_ptr, xrow, yrow, c0 + tl.arange(0, BLOCK_C), valid, mu,
                                            rs, C, sxc, syc, HAS_W)
                s1 += tl.sum(g, axis=1)
                s2 += tl.sum(g * xhat, axis=1)
            s1 = s1 / C
            s2 = s2 / C
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                xhat, g, m2 = _ln_grad_tile(x_ptr, w_ptr, dy_ptr, xrow, yrow, cols, valid, mu, rs, C, sxc, syc, HAS_W)
                dx = (g - s1[:, None] - xhat * s2[:, None]) * rs[:, None]
                tl.store(dx_ptr + drow[:, None] + (cols.to(tl.int64) * sdc)[None, :],
                         dx.to(dx_ptr.dtype.element_ty), mask=m2)
    else:
        pos = count + (pid - n_act) * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = pos < N
        b, h, w = _decode(rows_ptr, pos, valid, HW, W)
        drow = b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + w.to(tl.int64) * sdw
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            tl.store(dx_ptr + drow[:, None] + (cols.to(tl.int64) * sdc)[None, :],
                     tl.zeros((BLOCK_M, BLOCK_C), dtype=dx_ptr.dtype.element_ty),
                     mask=valid[:, None] & (cols < C)[None, :])


# ---------------------------------------------------------------------------------------------------------------
# launchers (x etc. are logical [B, C, H, W] views; see the module doc)

_RED = {"BLOCK_M": 64, "BLOCK_C": 32, "num_warps": 4, "num_stages": 1}
_APPLY = {"BLOCK_M": 64, "BLOCK_C": 32, "num_warps": 4, "num_stages": 1}


def _ln_config(C: int) -> dict:
    block_c = min(max(16, next_pow2(C)), 256)
    return {"BLOCK_M": 4096 // block_c, "BLOCK_C": block_c, "ONE_PASS": C <= block_c, "num_warps": 8,
            "num_stages": 1}


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _reduce(x, dy, mean, rstd, rows, count, grad: bool, per_row: bool):
    B, C, H, W = x.shape
    cfg = _RED
    c_blocks = triton.cdiv(C, cfg["BLOCK_C"])
    n_split = _split(B * H * W, cfg["BLOCK_M"], c_blocks, x.device)
    out = empty((2 if grad else 3, n_split, C), dtype=torch.float32, device=x.device)
    _sparse_norm_reduce_kernel[(n_split, c_blocks)](
        x, dy if grad else x, mean if grad else out, rstd if grad else out, rows, count, out,
        H, W, C, n_split, *_strides(x), *_strides(dy if grad else x),
        GRAD=grad, PER_ROW=per_row, BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def norm_stats(x, rows, count):
    """Mean and biased variance ([C] fp32) of x over the active pixels (0 and 0 when there are none)."""
    if x.numel() == 0:
        C = x.shape[1]
        z = torch.zeros(C, dtype=torch.float32, device=x.device)
        return z, z.clone()
    n_s, mean_s, ssd_s = _reduce(x, None, None, None, rows, count, False, False).unbind(0)
    n = n_s.sum(0)
    mean = (n_s * mean_s).sum(0) / n.clamp_min(1)
    ssd = (ssd_s + n_s * (mean_s - mean) ** 2).sum(0)
    return mean, ssd / n.clamp_min(1)


def norm_grad_sums(x, dy, mean, rstd, rows, count, per_row: bool):
    """(sum dy, sum dy * xhat) over the active pixels, [C] fp32 each."""
    if x.numel() == 0:
        z = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
        return z, z.clone()
    s = _reduce(x, dy, mean, rstd, rows, count, True, per_row).sum(1)
    return s[0].clone(), s[1].clone()  # separate storage: custom-op outputs must not alias each other


def norm_apply(u, a, c, rows, count, out, v=None, b=None, d=None):
    """out = a*u + c (+ b*(v - d)) at active pixels and 0 at inactive ones; a, b, c, d: [C] fp32."""
    B, C, H, W = u.shape
    if out.numel() == 0:
        return out
    cfg = _APPLY
    grid = (triton.cdiv(B * H * W, cfg["BLOCK_M"]) + 1, triton.cdiv(C, cfg["BLOCK_C"]))
    has_v = v is not None
    _sparse_norm_apply_kernel[grid](
        u, v if has_v else u, a, b if has_v else a, c, d if has_v else a, rows, count, out,
        B * H * W, H, W, C, *_strides(u), *_strides(v if has_v else u), *_strides(out),
        HAS_V=has_v, BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def layer_norm_fwd(x, weight, bias, rows, count, eps: float, y):
    """y (preallocated, logical [B, C, H, W]) = LayerNorm over C at active pixels, 0 elsewhere.
    Returns (y, mean [N], rstd [N]) with N = B*H*W, per table entry."""
    B, C, H, W = x.shape
    N = B * H * W
    mean = empty((N,), dtype=torch.float32, device=x.device)
    rstd = empty((N,), dtype=torch.float32, device=x.device)
    if N == 0 or C == 0:
        return y, mean.zero_(), rstd.zero_()
    cfg = _ln_config(C)
    _sparse_layer_norm_fwd_kernel[(triton.cdiv(N, cfg["BLOCK_M"]) + 1,)](
        x, weight if weight is not None else x, bias if bias is not None else x, rows, count, y, mean, rstd,
        N, H, W, C, eps, *_strides(x), *_strides(y),
        HAS_W=weight is not None, HAS_B=bias is not None, ONE_PASS=cfg["ONE_PASS"],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y, mean, rstd


def layer_norm_bwd(x, weight, dy, mean, rstd, rows, count, dx):
    B, C, H, W = x.shape
    N = B * H * W
    if N == 0 or C == 0:
        return dx
    cfg = _ln_config(C)
    _sparse_layer_norm_bwd_kernel[(triton.cdiv(N, cfg["BLOCK_M"]) + 1,)](
        x, weight if weight is not None else x, dy, mean, rstd, rows, count, dx,
        N, H, W, C, *_strides(x), *_strides(dy), *_strides(dx),
        HAS_W=weight is not None, ONE_PASS=cfg["ONE_PASS"], BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dx


# ---------------------------------------------------------------------------------------------------------------
# ahead-of-time compile cases

def aot_cases():
    """The configurations are dtype-independent: all of them in bf16, the two LayerNorm paths also in fp32."""
    cases = []
    opt = {"num_warps": _RED["num_warps"], "num_stages": _RED["num_stages"]}
    for dt in (torch.bfloat16, torch.float32):
        t = TL_DTYPE[dt]
        if dt == torch.bfloat16:
            for grad, per_row in ((False, False), (True, False), (True, True)):
                c = dict(GRAD=grad, PER_ROW=per_row, BLOCK_M=_RED["BLOCK_M"], BLOCK_C=_RED["BLOCK_C"], sxw=1, syw=1)
                ptrs = {"x_ptr": t, "dy_ptr": t, "mean_ptr": "fp32", "rstd_ptr": "fp32", "rows_ptr": "i32",
                        "count_ptr": "i32", "out_ptr": "fp32"}
                cases.append(AotCase(f"sparse_norm_reduce[{t},grad={grad},per_row={per_row}]",
                                     _sparse_norm_reduce_kernel, signature(_sparse_norm_reduce_kernel, ptrs, c), c, opt))
            for has_v in (False, True):
                c = dict(HAS_V=has_v, BLOCK_M=_APPLY["BLOCK_M"], BLOCK_C=_APPLY["BLOCK_C"], suw=1, svw=1, sow=1)
                ptrs = {"u_ptr": t, "v_ptr": t, "a_ptr": "fp32", "b_ptr": "fp32", "c_ptr": "fp32", "d_ptr": "fp32",
                        "rows_ptr": "i32", "count_ptr": "i32", "out_ptr": t}
                cases.append(AotCase(f"sparse_norm_apply[{t},v={has_v}]", _sparse_norm_apply_kernel,
                                     signature(_sparse_norm_apply_kernel, ptrs, c), c, opt))
        for C in (96, 768):
            cfg = _ln_config(C)
            lopt = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
            c = dict(HAS_W=True, HAS_B=True, ONE_PASS=cfg["ONE_PASS"], BLOCK_M=cfg["BLOCK_M"],
                     BLOCK_C=cfg["BLOCK_C"], sxw=1, syc=1)
            ptrs = {"x_ptr": t, "w_ptr": t, "b_ptr": t, "rows_ptr": "i32", "count_ptr": "i32", "y_ptr": t,
                    "mean_ptr": "fp32", "rstd_ptr": "fp32"}
            cases.append(AotCase(f"sparse_layer_norm_fwd[{t},C={C}]", _sparse_layer_norm_fwd_kernel,
                                 signature(_sparse_layer_norm_fwd_kernel, ptrs, c, {"eps": "fp32"}), c, lopt))
            c = dict(HAS_W=True, ONE_PASS=cfg["ONE_PASS"], BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"],
                     sxw=1, syc=1, sdw=1)
            ptrs = {"x_ptr": t, "w_ptr": t, "dy_ptr": t, "mean_ptr": "fp32", "rstd_ptr": "fp32", "rows_ptr": "i32",
                    "count_ptr": "i32", "dx_ptr": t}
            cases.append(AotCase(f"sparse_layer_norm_bwd[{t},C={C}]", _sparse_layer_norm_bwd_kernel,
                                 signature(_sparse_layer_norm_bwd_kernel, ptrs, c), c, lopt))
    return cases
