"""Sparse masked 2-D convolution (SparK's encoder) in Triton: work only on the active pixels.

Notation: x: [B, C_in, H, W]; weight: [C_out, C_in/G, KH, KW]; y: [B, C_out, Ho, Wo]; any strides (NCHW,
channels-last or other), read through explicit strides (a unit stride is specialised by Triton).
A resolution's *table* (built once per mask and resolution by fastlayers.ops.sparse_conv2d.SparseMask):
  rows   [N] int32, N = B*H*W: the flat pixel indices (b*H + h)*W + w, active pixels first, then inactive ones
  count  [1] int32 on the device: how many are active (no host sync anywhere: grids are sized for N)
  active [N] int8 in raster order: 1 where the pixel is active
Every launch covers tiles of BLOCK_M consecutive entries of `rows`: tiles inside the active part compute, the
others write zeros, so one kernel writes the whole output and inactive work is skipped, not masked.

The convolution is one gather-GEMM for the forward and for dx (dx is a convolution of dy with the transposed
filter: TRANSPOSED=True maps a destination pixel to the source pixels that reach it, stride included):
  dst[p, g*N_G + n] = sum_{tap, r < R_G} src[pos(p, tap), g*R_G + r] * Wg[g, tap, r, n]   (+ bias)
fwd: src = x, R_G = C_in/G, N_G = C_out/G;  dx: src = dy, R_G = C_out/G, N_G = C_in/G.
Source pixels that are outside the map or inactive read as zero (masked loads: their bytes are never fetched).
Depthwise and small-group convolutions (R_G or N_G < 16) use a direct kernel with the same mapping.
dweight (and dbias) reduce over the active output pixels in fixed chunks (one partial per chunk, summed on
the host in a fixed order): deterministic, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import AotCase, TL_DTYPE, empty, signature


@triton.jit
def _decode(rows_ptr, pos, valid, HW, W):
    """Pixel (b, h, w) of the table entries at positions pos (valid: pos inside the segment)."""
    r = tl.load(rows_ptr + pos, mask=valid, other=0)
    b = r // HW
    rem = r - b * HW
    h = rem // W
    return b, h, rem - h * W


@triton.jit
def _src_pos(h, w, kh, kw, H_SRC, W_SRC, S_H, S_W, P_H, P_W, D_H, D_W, TRANSPOSED: tl.constexpr):
    """Source pixel (ih, iw) that tap (kh, kw) reads for destination (h, w), and whether it exists."""
    if TRANSPOSED:  # dx: the output pixel o with o*S - P + k*D = (h, w)
        th = h + P_H - kh * D_H
        tw = w + P_W - kw * D_W
        ih = th // S_H
        iw = tw // S_W
        ok = (th >= 0) & (tw >= 0) & (th - ih * S_H == 0) & (tw - iw * S_W == 0) & (ih < H_SRC) & (iw < W_SRC)
    else:
        ih = h * S_H - P_H + kh * D_H
        iw = w * S_W - P_W + kw * D_W
        ok = (ih >= 0) & (ih < H_SRC) & (iw >= 0) & (iw < W_SRC)
    return ih, iw, ok


@triton.jit
def _gather_a(src_ptr, act_ptr, b, h, w, valid, it, n_cb, g, R_G, KW, TAPS, H_SRC, W_SRC,
              S_H, S_W, P_H, P_W, D_H, D_W, ssb, ssc, ssh, ssw,
              TRANSPOSED: tl.constexpr, FLAT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """A tile [BLOCK_M, BLOCK_K] of the gather-GEMM for K block `it`, the rows kk of the arranged weight
    [G, TAPS*R_G, N_G] it multiplies, their mask, and how many rows of the tile read anything.
    FLAT_K: K runs over (tap, r) jointly (few channels per group, e.g. the RGB stem); else one tap per block."""
    if FLAT_K:
        kk = it * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = kk < TAPS * R_G
        tap = kk // R_G
        ch = g * R_G + (kk - tap * R_G)
        kh = tap // KW
        ih, iw, ok = _src_pos(h[:, None], w[:, None], kh[None, :], (tap - kh * KW)[None, :], H_SRC, W_SRC,
                              S_H, S_W, P_H, P_W, D_H, D_W, TRANSPOSED)
        ok = ok & valid[:, None] & mask_k[None, :]
        act = tl.load(act_ptr + (b[:, None] * H_SRC + ih) * W_SRC + iw, mask=ok, other=0)
        ok = ok & (act != 0)
        off = (b.to(tl.int64) * ssb)[:, None] + ih.to(tl.int64) * ssh + iw.to(tl.int64) * ssw \
            + (ch.to(tl.int64) * ssc)[None, :]
        a = tl.load(src_ptr + off, mask=ok, other=0.0)
        n_ok = tl.sum(tl.sum(ok.to(tl.int32), axis=1), axis=0)
    else:
        tap = it // n_cb
        rr = (it - tap * n_cb) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = rr < R_G
        kk = tap * R_G + rr
        kh = tap // KW
        ih, iw, ok = _src_pos(h, w, kh, tap - kh * KW, H_SRC, W_SRC, S_H, S_W, P_H, P_W, D_H, D_W, TRANSPOSED)
        ok = ok & valid
        act = tl.load(act_ptr + (b * H_SRC + ih) * W_SRC + iw, mask=ok, other=0)
        ok = ok & (act != 0)
        off = (b.to(tl.int64) * ssb + ih.to(tl.int64) * ssh + iw.to(tl.int64) * ssw)[:, None] \
            + ((g * R_G + rr).to(tl.int64) * ssc)[None, :]
        a = tl.load(src_ptr + off, mask=ok[:, None] & mask_k[None, :], other=0.0)
        n_ok = tl.sum(ok.to(tl.int32), axis=0)
    return a, kk, mask_k, n_ok


@triton.jit
def _mma_step(acc, a, w_ptr, kk, mask_k, g, TAPS, R_G, N_G, offs_n, mask_n, DOT_PREC: tl.constexpr):
    wt = tl.load(w_ptr + ((g * TAPS * R_G + kk) * N_G)[:, None] + offs_n[None, :],
                 mask=mask_k[:, None] & mask_n[None, :], other=0.0)
    return tl.dot(a, wt, acc, input_precision=DOT_PREC)


@triton.jit
def _sparse_conv2d_gemm_kernel(
    src_ptr, w_ptr, bias_ptr, rows_ptr, count_ptr, act_ptr, dst_ptr,
    N_DST, H_DST, W_DST, H_SRC, W_SRC, R_G, N_G, KH, KW,
    S_H, S_W, P_H, P_W, D_H, D_W,
    ssb, ssc, ssh, ssw, sdb, sdc, sdh, sdw,
    TRANSPOSED: tl.constexpr, FLAT_K: tl.constexpr, SKIP_EMPTY: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid: (cdiv(N_DST, BLOCK_M) + 1, G * cdiv(N_G, BLOCK_N)); w: arranged [G, KH*KW*R_G, N_G]
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    nb = tl.cdiv(N_G, BLOCK_N)
    g = pid_n // nb
    offs_n = (pid_n - g * nb) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_G
    col = (g * N_G + offs_n).to(tl.int64) * sdc
    count = tl.load(count_ptr)
    n_act = tl.cdiv(count, BLOCK_M)
    HW = H_DST * W_DST
    if pid_m < n_act:
        pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = pos < count
        b, h, w = _decode(rows_ptr, pos, valid, HW, W_DST)
        TAPS = KH * KW
        n_cb = tl.cdiv(R_G, BLOCK_K)
        if FLAT_K:
            n_k = tl.cdiv(TAPS * R_G, BLOCK_K)
        else:
            n_k = TAPS * n_cb
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for it in range(0, n_k):
            a, kk, mask_k, n_ok = _gather_a(src_ptr, act_ptr, b, h, w, valid, it, n_cb, g, R_G, KW, TAPS,
                                            H_SRC, W_SRC, S_H, S_W, P_H, P_W, D_H, D_W, ssb, ssc, ssh, ssw,
                                            TRANSPOSED, FLAT_K, BLOCK_K)
            if SKIP_EMPTY:  # strided dx: most taps reach no row of a (parity-sorted) tile
                if n_ok > 0:
                    acc = _mma_step(acc, a, w_ptr, kk, mask_k, g, TAPS, R_G, N_G, offs_n, mask_n, DOT_PREC)
            else:
                acc = _mma_step(acc, a, w_ptr, kk, mask_k, g, TAPS, R_G, N_G, offs_n, mask_n, DOT_PREC)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + g * N_G + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out = acc.to(dst_ptr.dtype.element_ty)
    else:  # a tile of the inactive segment: zeros
        pos = count + (pid_m - n_act) * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = pos < N_DST
        b, h, w = _decode(rows_ptr, pos, valid, HW, W_DST)
        out = tl.zeros((BLOCK_M, BLOCK_N), dtype=dst_ptr.dtype.element_ty)
    row = b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + w.to(tl.int64) * sdw
    tl.store(dst_ptr + row[:, None] + col[None, :], out, mask=valid[:, None] & mask_n[None, :])


@triton.jit
def _sparse_conv2d_gemm_dw_kernel(
    x_ptr, dy_ptr, rows_ptr, count_ptr, act_ptr, dw_ptr, db_ptr,
    G, H_OUT, W_OUT, H_IN, W_IN, R_G, N_G, KH, KW, N_SPLIT,
    S_H, S_W, P_H, P_W, D_H, D_W,
    sxb, sxc, sxh, sxw, syb, syc, syh, syw,
    FLAT_K: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid: (N_SPLIT, G * cdiv(N_G, BLOCK_N), K blocks). Program (s, n, k) sums x_gathered^T @ dy over its chunk
    # of active output tiles: dw partial [N_SPLIT, G, KH*KW*R_G, N_G] (fp32), db partial [N_SPLIT, G*N_G].
    pid_s = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    nb = tl.cdiv(N_G, BLOCK_N)
    g = pid_n // nb
    offs_n = (pid_n - g * nb) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_G
    col = (g * N_G + offs_n).to(tl.int64) * syc
    count = tl.load(count_ptr)
    n_tiles = tl.cdiv(count, BLOCK_M)
    per = tl.cdiv(n_tiles, N_SPLIT)
    t0 = pid_s * per
    t1 = tl.minimum(t0 + per, n_tiles)
    TAPS = KH * KW
    n_cb = tl.cdiv(R_G, BLOCK_K)
    HW = H_OUT * W_OUT
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    dbacc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t in range(t0, t1):
        pos = t * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = pos < count
        b, h, w = _decode(rows_ptr, pos, valid, HW, W_OUT)
        a, kk, mask_k, n_ok = _gather_a(x_ptr, act_ptr, b, h, w, valid, pid_k, n_cb, g, R_G, KW, TAPS,
                                        H_IN, W_IN, S_H, S_W, P_H, P_W, D_H, D_W, sxb, sxc, sxh, sxw,
                                        False, FLAT_K, BLOCK_K)
        row = b.to(tl.int64) * syb + h.to(tl.int64) * syh + w.to(tl.int64) * syw
        dy = tl.load(dy_ptr + row[:, None] + col[None, :], mask=valid[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), dy, acc, input_precision=DOT_PREC)
        if HAS_BIAS:
            dbacc += tl.sum(dy.to(tl.float32), axis=0)
    if FLAT_K:
        kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = kk < TAPS * R_G
    else:
        tap = pid_k // n_cb
        rr = (pid_k - tap * n_cb) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = rr < R_G
        kk = tap * R_G + rr
    base = (pid_s * G + g).to(tl.int64) * TAPS * R_G
    tl.store(dw_ptr + ((base + kk) * N_G)[:, None] + offs_n[None, :], acc, mask=mask_k[:, None] & mask_n[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(db_ptr + pid_s * G * N_G + g * N_G + offs_n, dbacc, mask=mask_n)


@triton.jit
def _direct_step(acc, src_ptr, w_ptr, row, ok, g, nl, mask_c, tap, TAPS, R_G, N_G, ssc):
    for r in range(0, R_G):
        v = tl.load(src_ptr + row[:, None] + ((g * R_G + r).to(tl.int64) * ssc)[None, :],
                    mask=ok[:, None] & mask_c[None, :], other=0.0)
        wv = tl.load(w_ptr + ((g * TAPS + tap) * R_G + r) * N_G + nl, mask=mask_c, other=0.0)
        acc += v.to(tl.float32) * wv.to(tl.float32)[None, :]
    return acc


@triton.jit
def _sparse_conv2d_direct_kernel(
    src_ptr, w_ptr, bias_ptr, rows_ptr, count_ptr, act_ptr, dst_ptr,
    N_DST, H_DST, W_DST, H_SRC, W_SRC, C_DST, R_G, N_G, KH, KW,
    S_H, S_W, P_H, P_W, D_H, D_W,
    ssb, ssc, ssh, ssw, sdb, sdc, sdh, sdw,
    TRANSPOSED: tl.constexpr, SKIP_EMPTY: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Depthwise / small groups, on CUDA cores. grid: (cdiv(N_DST, BLOCK_M) + 1, cdiv(C_DST, BLOCK_C));
    # destination channel c belongs to group c // N_G; w arranged [G, KH*KW, R_G, N_G].
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    oc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = oc < C_DST
    g = oc // N_G
    nl = oc - g * N_G
    count = tl.load(count_ptr)
    n_act = tl.cdiv(count, BLOCK_M)
    HW = H_DST * W_DST
    if pid_m < n_act:
        pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = pos < count
        b, h, w = _decode(rows_ptr, pos, valid, HW, W_DST)
        TAPS = KH * KW
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for tap in range(0, TAPS):
            kh = tap // KW
            ih, iw, ok = _src_pos(h, w, kh, tap - kh * KW, H_SRC, W_SRC, S_H, S_W, P_H, P_W, D_H, D_W, TRANSPOSED)
            ok = ok & valid
            act = tl.load(act_ptr + (b * H_SRC + ih) * W_SRC + iw, mask=ok, other=0)
            ok = ok & (act != 0)
            row = b.to(tl.int64) * ssb + ih.to(tl.int64) * ssh + iw.to(tl.int64) * ssw
            if SKIP_EMPTY:
                if tl.sum(ok.to(tl.int32), axis=0) > 0:
                    acc = _direct_step(acc, src_ptr, w_ptr, row, ok, g, nl, mask_c, tap, TAPS, R_G, N_G, ssc)
            else:
                acc = _direct_step(acc, src_ptr, w_ptr, row, ok, g, nl, mask_c, tap, TAPS, R_G, N_G, ssc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + oc, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        out = acc.to(dst_ptr.dtype.element_ty)
    else:
        pos = count + (pid_m - n_act) * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = pos < N_DST
        b, h, w = _decode(rows_ptr, pos, valid, HW, W_DST)
        out = tl.zeros((BLOCK_M, BLOCK_C), dtype=dst_ptr.dtype.element_ty)
    row = b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + w.to(tl.int64) * sdw
    tl.store(dst_ptr + row[:, None] + (oc.to(tl.int64) * sdc)[None, :], out, mask=valid[:, None] & mask_c[None, :])


@triton.jit
def _sparse_conv2d_direct_dw_kernel(
    x_ptr, dy_ptr, rows_ptr, count_ptr, act_ptr, dw_ptr, db_ptr,
    H_OUT, W_OUT, H_IN, W_IN, C_OUT, R_G, N_G, KH, KW, N_SPLIT,
    S_H, S_W, P_H, P_W, D_H, D_W,
    sxb, sxc, sxh, sxw, syb, syc, syh, syw,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grid: (N_SPLIT, cdiv(C_OUT, BLOCK_C), KH*KW*R_G). Program (s, c, (tap, r)) sums x[pos(p, tap), g*R_G + r] *
    # dy[p, c] over its chunk of active output pixels: dw partial [N_SPLIT, KH*KW*R_G, C_OUT], db [N_SPLIT, C_OUT].
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_k = tl.program_id(2)
    tap = pid_k // R_G
    r = pid_k - tap * R_G
    kh = tap // KW
    kw = tap - kh * KW
    oc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = oc < C_OUT
    ch = ((oc // N_G) * R_G + r).to(tl.int64) * sxc
    count = tl.load(count_ptr)
    n_tiles = tl.cdiv(count, BLOCK_M)
    per = tl.cdiv(n_tiles, N_SPLIT)
    t0 = pid_s * per
    t1 = tl.minimum(t0 + per, n_tiles)
    HW = H_OUT * W_OUT
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    dbacc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for t in range(t0, t1):
        pos = t * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = pos < count
        b, h, w = _decode(rows_ptr, pos, valid, HW, W_OUT)
        ih, iw, ok = _src_pos(h, w, kh, kw, H_IN, W_IN, S_H, S_W, P_H, P_W, D_H, D_W, False)
        ok = ok & valid
        act = tl.load(act_ptr + (b * H_IN + ih) * W_IN + iw, mask=ok, other=0)
        ok = ok & (act != 0)
        xrow = b.to(tl.int64) * sxb + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        xv = tl.load(x_ptr + xrow[:, None] + ch[None, :], mask=ok[:, None] & mask_c[None, :], other=0.0)
        yrow = b.to(tl.int64) * syb + h.to(tl.int64) * syh + w.to(tl.int64) * syw
        dy = tl.load(dy_ptr + yrow[:, None] + (oc.to(tl.int64) * syc)[None, :],
                     mask=valid[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        acc += xv.to(tl.float32) * dy
        if HAS_BIAS:
            dbacc += dy
    tl.store(dw_ptr + (pid_s * KH * KW * R_G + pid_k).to(tl.int64) * C_OUT + oc, tl.sum(acc, axis=0), mask=mask_c)
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(db_ptr + pid_s * C_OUT + oc, tl.sum(dbacc, axis=0), mask=mask_c)


# ---------------------------------------------------------------------------------------------------------------
# launch configuration

GEMM_MIN_CHANNELS = 16   # below this many channels per group on either side, the direct kernel is used
# dweight: split the pixel reduction until about this many programs run (4 per H100 SM); the CPU interpreter
# runs programs one by one, so there a few chunks (still more than one) are enough.
_TARGET_PROGRAMS = {"cuda": 528, "cpu": 8}


def use_gemm(c_in: int, c_out: int, groups: int) -> bool:
    return groups == 1 or (c_in // groups >= GEMM_MIN_CHANNELS and c_out // groups >= GEMM_MIN_CHANNELS)


def _dot_prec(dtype: torch.dtype) -> str:
    # fp32 stays exact fp32 (no TF32): the oracle's accuracy; fp16/bf16 use the tensor cores either way
    return "ieee" if dtype == torch.float32 else "tf32"


def _small_tiles(dtype: torch.dtype, device: torch.device) -> bool:
    # fp32 ("ieee" dot on CUDA cores) needs smaller tiles to fit sm_90's registers; the CPU interpreter has no
    # such limit and runs programs one by one, so it uses the 16-bit tiles (same code, fewer programs).
    return dtype == torch.float32 and device.type != "cpu"


def _gemm_config(R_G: int, N_G: int, dtype: torch.dtype, device: torch.device = torch.device("cuda"),
                 n_programs_128: int = 1 << 30) -> dict:
    # Sized to compile without register spills on sm_90 (see aot_cases): the gathered tiles carry one 64-bit
    # pointer per element, so BLOCK_N stays 64 (wider layers use more N blocks; their A tiles hit L2).
    # n_programs_128: the grid size with BLOCK_M=128; small maps (deep stages) take BLOCK_M=64 to fill the GPU.
    if _small_tiles(dtype, device):
        bm, bn, bk, warps, stages = 32, 64, 32, 4, 1
    elif n_programs_128 >= _TARGET_PROGRAMS["cuda"]:
        bm, bn, bk, warps, stages = 128, 64, 32, 4, 2
    else:  # (64 rows with 4 warps spilled on sm_90; 8 warps do not)
        bm, bn, bk, warps, stages = 64, 64, 32, 8, 2
    flat = R_G < bk
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 16 if flat else bk, "FLAT_K": flat,
            "num_warps": warps, "num_stages": stages}


def _gemm_dw_config(R_G: int, N_G: int, dtype: torch.dtype, device: torch.device = torch.device("cuda")) -> dict:
    if _small_tiles(dtype, device):
        bm, bn, bk, warps = 32, 64, 32, 4
    else:
        bm, bn, bk, warps = 64, (64 if N_G <= 64 else 128), 64, 8
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "FLAT_K": R_G < bk, "num_warps": warps, "num_stages": 1}


def _direct_config() -> dict:
    return {"BLOCK_M": 64, "BLOCK_C": 32, "num_warps": 8, "num_stages": 1}


def _direct_dw_config() -> dict:
    return {"BLOCK_M": 64, "BLOCK_C": 32, "num_warps": 4, "num_stages": 1}


def _split(n_rows: int, block_m: int, other_programs: int, device: torch.device) -> int:
    """Chunks of the pixel reduction for dweight: enough programs, never more chunks than tiles."""
    tiles = max(1, triton.cdiv(n_rows, block_m))
    target = _TARGET_PROGRAMS.get(device.type, _TARGET_PROGRAMS["cuda"])
    return max(1, min(tiles, triton.cdiv(target, max(1, other_programs))))


def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _arrange(weight: torch.Tensor, groups: int, transposed: bool) -> torch.Tensor:
    """weight [C_out, C_in/G, KH, KW] -> [G, KH*KW*R_G, N_G] contiguous (fwd: R=C_in/G, N=C_out/G; dx: swapped)."""
    C_out, Cg, KH, KW = weight.shape
    w = weight.reshape(groups, C_out // groups, Cg, KH, KW)
    w = w.permute(0, 3, 4, 1, 2) if transposed else w.permute(0, 3, 4, 2, 1)
    return w.contiguous()


def _launch_conv(src, weight, bias, rows, count, act_src, dst, groups, stride, padding, dilation, transposed):
    """dst [B, C_dst, H_dst, W_dst] (allocated by the caller) = the gather-convolution of src (see module doc)."""
    B, C_src, H_src, W_src = src.shape
    _, C_dst, H_dst, W_dst = dst.shape
    C_out, Cg, KH, KW = weight.shape
    R_G, N_G = C_src // groups, C_dst // groups
    skip = transposed and (stride[0] > 1 or stride[1] > 1)
    N = B * H_dst * W_dst
    geo = (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    if use_gemm(weight.shape[1] * groups, C_out, groups):
        cfg = _gemm_config(R_G, N_G, src.dtype, src.device, triton.cdiv(N, 128) * groups * triton.cdiv(N_G, 64))
        grid = (triton.cdiv(N, cfg["BLOCK_M"]) + 1, groups * triton.cdiv(N_G, cfg["BLOCK_N"]))
        _sparse_conv2d_gemm_kernel[grid](
            src, _arrange(weight, groups, transposed), bias if bias is not None else src, rows, count, act_src, dst,
            N, H_dst, W_dst, H_src, W_src, R_G, N_G, KH, KW, *geo, *_strides(src), *_strides(dst),
            TRANSPOSED=transposed, FLAT_K=cfg["FLAT_K"], SKIP_EMPTY=skip, HAS_BIAS=bias is not None,
            DOT_PREC=_dot_prec(src.dtype), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    else:
        cfg = _direct_config()
        grid = (triton.cdiv(N, cfg["BLOCK_M"]) + 1, triton.cdiv(C_dst, cfg["BLOCK_C"]))
        _sparse_conv2d_direct_kernel[grid](
            src, _arrange(weight, groups, transposed), bias if bias is not None else src, rows, count, act_src, dst,
            N, H_dst, W_dst, H_src, W_src, C_dst, R_G, N_G, KH, KW, *geo, *_strides(src), *_strides(dst),
            TRANSPOSED=transposed, SKIP_EMPTY=skip, HAS_BIAS=bias is not None,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dst


def sparse_conv2d_fwd(x, weight, bias, rows_out, count_out, act_in, out, stride, padding, dilation, groups):
    """x: [B, C_in, H, W]; out: [B, C_out, Ho, Wo] preallocated (any layout). Writes conv(x masked at the input
    resolution) + bias at the active output pixels of the table (rows_out, count_out), zeros elsewhere."""
    if out.numel() == 0:
        return out
    return _launch_conv(x, weight, bias, rows_out, count_out, act_in, out, groups, stride, padding, dilation, False)


def sparse_conv2d_bwd(dy, x, weight, rows_out, count_out, act_out, act_in, rows_in, count_in, dx,
                      stride, padding, dilation, groups, need_db: bool):
    """dy: [B, C_out, Ho, Wo] (read at active output pixels only). Writes dx (if given: [B, C_in, H, W],
    zeros at inactive input pixels; rows_in may be sorted by stride parity). Returns (dx, dweight fp32, dbias fp32
    or None)."""
    B, C_in, H, W = x.shape
    _, C_out, Ho, Wo = dy.shape
    _, Cg, KH, KW = weight.shape
    if dx is not None and dx.numel() > 0:
        _launch_conv(dy, weight, None, rows_in, count_in, act_out, dx, groups, stride, padding, dilation, True)
    N_out = B * Ho * Wo
    if N_out == 0 or weight.numel() == 0:
        return dx, torch.zeros(weight.shape, dtype=torch.float32, device=x.device), \
            (torch.zeros(C_out, dtype=torch.float32, device=x.device) if need_db else None)
    geo = (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    R_G, N_G = C_in // groups, C_out // groups
    if use_gemm(C_in, C_out, groups):
        cfg = _gemm_dw_config(R_G, N_G, x.dtype, x.device)
        k_blocks = triton.cdiv(KH * KW * R_G, cfg["BLOCK_K"]) if cfg["FLAT_K"] else \
            KH * KW * triton.cdiv(R_G, cfg["BLOCK_K"])
        n_blocks = groups * triton.cdiv(N_G, cfg["BLOCK_N"])
        n_split = _split(N_out, cfg["BLOCK_M"], n_blocks * k_blocks, x.device)
        dw = empty((n_split, groups, KH * KW * R_G, N_G), dtype=torch.float32, device=x.device)
        db = empty((n_split, C_out), dtype=torch.float32, device=x.device) if need_db else dw
        _sparse_conv2d_gemm_dw_kernel[(n_split, n_blocks, k_blocks)](
            x, dy, rows_out, count_out, act_in, dw, db,
            groups, Ho, Wo, H, W, R_G, N_G, KH, KW, n_split, *geo, *_strides(x), *_strides(dy),
            FLAT_K=cfg["FLAT_K"], HAS_BIAS=need_db, DOT_PREC=_dot_prec(x.dtype),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        # fixed-order sum over the chunks, then [G, KH, KW, R_G, N_G] -> [C_out, C_in/G, KH, KW]
        dweight = dw.sum(0).reshape(groups, KH, KW, R_G, N_G).permute(0, 4, 3, 1, 2).reshape(C_out, R_G, KH, KW)
    else:
        cfg = _direct_dw_config()
        c_blocks = triton.cdiv(C_out, cfg["BLOCK_C"])
        n_split = _split(N_out, cfg["BLOCK_M"], c_blocks * KH * KW * R_G, x.device)
        dw = empty((n_split, KH * KW * R_G, C_out), dtype=torch.float32, device=x.device)
        db = empty((n_split, C_out), dtype=torch.float32, device=x.device) if need_db else dw
        _sparse_conv2d_direct_dw_kernel[(n_split, c_blocks, KH * KW * R_G)](
            x, dy, rows_out, count_out, act_in, dw, db,
            Ho, Wo, H, W, C_out, R_G, N_G, KH, KW, n_split, *geo, *_strides(x), *_strides(dy),
            HAS_BIAS=need_db, BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        dweight = dw.sum(0).reshape(KH, KW, R_G, C_out).permute(3, 2, 0, 1)
    dbias = db.sum(0) if need_db else None
    return dx, dweight.contiguous(), dbias


# ---------------------------------------------------------------------------------------------------------------
# ahead-of-time compile cases (CI compiles each for sm_90; see kernels/common.py)

def _options(cfg):
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def aot_cases():
    """Representative configurations: every tile configuration the launchers pick (bf16 and fp32 differ; fp16
    compiles the same code as bf16), TAP and FLAT K, fwd and strided dx, NCHW and channels-last."""
    cases = []
    ptrs_conv = {"src_ptr": None, "w_ptr": None, "bias_ptr": None, "rows_ptr": "i32", "count_ptr": "i32",
                 "act_ptr": "i8", "dst_ptr": None}
    ptrs_dw = {"x_ptr": None, "dy_ptr": None, "rows_ptr": "i32", "count_ptr": "i32", "act_ptr": "i8",
               "dw_ptr": "fp32", "db_ptr": "fp32"}

    def typed(ptrs, t):
        return {k: (v or t) for k, v in ptrs.items()}

    # (R_G, N_G, transposed, layout, grid size at BLOCK_M=128): both BLOCK_M the launcher picks
    gemm = {torch.bfloat16: ((64, 64, False, "cl", 1 << 20), (256, 512, False, "cf", 1 << 20),
                             (3, 64, False, "cf", 1 << 20), (512, 256, True, "cl", 1 << 20),
                             (64, 3, True, "cf", 1 << 20), (512, 512, False, "cl", 1), (512, 512, True, "cl", 1)),
            torch.float32: ((256, 512, False, "cf", 1), (3, 64, False, "cl", 1), (512, 256, True, "cf", 1))}
    dws = {torch.bfloat16: ((64, 64), (3, 64), (512, 512)), torch.float32: ((64, 64),)}
    for dt in (torch.bfloat16, torch.float32):
        t = TL_DTYPE[dt]
        for R_G, N_G, transposed, lay, n128 in gemm[dt]:
            cfg = _gemm_config(R_G, N_G, dt, n_programs_128=n128)
            c = dict(TRANSPOSED=transposed, FLAT_K=cfg["FLAT_K"], SKIP_EMPTY=transposed, HAS_BIAS=not transposed,
                     DOT_PREC=_dot_prec(dt), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                     **({"ssc": 1, "sdc": 1} if lay == "cl" else {"ssw": 1, "sdw": 1}))
            cases.append(AotCase(f"sparse_conv2d_gemm[{t},{lay},R={R_G},N={N_G},{'dx' if transposed else 'fwd'},"
                                 f"BM={cfg['BLOCK_M']}]",
                                 _sparse_conv2d_gemm_kernel,
                                 signature(_sparse_conv2d_gemm_kernel, typed(ptrs_conv, t), c), c, _options(cfg)))
        for R_G, N_G in dws[dt]:
            cfg = _gemm_dw_config(R_G, N_G, dt)
            c = dict(FLAT_K=cfg["FLAT_K"], HAS_BIAS=True, DOT_PREC=_dot_prec(dt), BLOCK_M=cfg["BLOCK_M"],
                     BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], sxw=1, syw=1)
            cases.append(AotCase(f"sparse_conv2d_gemm_dw[{t},R={R_G},N={N_G}]", _sparse_conv2d_gemm_dw_kernel,
                                 signature(_sparse_conv2d_gemm_dw_kernel, typed(ptrs_dw, t), c), c, _options(cfg)))
        cfg = _direct_config()
        for transposed in ((False, True) if dt == torch.bfloat16 else (True,)):
            c = dict(TRANSPOSED=transposed, SKIP_EMPTY=transposed, HAS_BIAS=not transposed,
                     BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"], ssw=1, sdw=1)
            cases.append(AotCase(f"sparse_conv2d_direct[{t},{'dx' if transposed else 'fwd'}]",
                                 _sparse_conv2d_direct_kernel,
                                 signature(_sparse_conv2d_direct_kernel, typed(ptrs_conv, t), c), c, _options(cfg)))
        if dt == torch.bfloat16:
            cfg = _direct_dw_config()
            c = dict(HAS_BIAS=True, BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"], sxw=1, syw=1)
            cases.append(AotCase(f"sparse_conv2d_direct_dw[{t}]", _sparse_conv2d_direct_dw_kernel,
                                 signature(_sparse_conv2d_direct_dw_kernel, typed(ptrs_dw, t), c), c, _options(cfg)))
    return cases
