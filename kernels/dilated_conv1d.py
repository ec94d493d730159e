"""Depthwise dilated 1-D convolution (TCNCA's temporal conv, Mamba's short causal conv) in Triton.

Notation: x: [B, C, L]; weight: [C, K]; output time t reads input times t + k*DIL - PAD, k = 0..K-1, where
PAD = (K-1)*DIL for causal conv and ((K-1)*DIL)//2 for "same". Negative times read `init` ([B, C, S],
S = (K-1)*DIL, the previous chunk's last inputs) when given, else zeros; times >= L read zeros.
x, y, dy, dx share one memory layout: channels-first (stride_l == 1) or channels-last (stride_c == 1); Triton
specialises a stride equal to 1, so the contiguous axis is known at compile time and loads vectorise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import AotCase, TL_DTYPE, empty, empty_like, next_pow2, signature


@triton.jit
def _load_seq(x_ptr, init_ptr, x_base, init_base, offs_c, mask_c, t, C, L, S, sxc, sxl, HAS_INIT: tl.constexpr):
    """Tile [BLOCK_C, BLOCK_L] of the sequence [init, x] at times t (fp32, zeros outside)."""
    inside = (t >= 0) & (t < L)
    ptr = x_ptr + x_base + offs_c.to(tl.int64)[:, None] * sxc + t.to(tl.int64)[None, :] * sxl
    v = tl.load(ptr, mask=mask_c[:, None] & inside[None, :], other=0.0).to(tl.float32)
    if HAS_INIT:
        before = (t < 0) & (t >= -S)
        iptr = init_ptr + init_base + offs_c.to(tl.int64)[:, None] * S + (t + S)[None, :]
        v += tl.load(iptr, mask=mask_c[:, None] & before[None, :], other=0.0).to(tl.float32)
    return v


@triton.jit
def _dilated_conv1d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, init_ptr, dy_ptr, y_ptr,
    C, L, S, DIL, PAD,
    sxb, sxc, sxl,  # strides of x, dy and y (one layout)
    K: tl.constexpr, UNROLL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, ACT: tl.constexpr,
    GRAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # GRAD=False: y = act(conv(x) + bias).  GRAD=True (ACT only): y = dy * act'(conv(x) + bias), in fp32.
    pid_l = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_c = offs_c < C
    mask = mask_c[:, None] & (offs_l < L)[None, :]
    x_base = pid_b.to(tl.int64) * sxb
    init_base = pid_b.to(tl.int64) * C * S

    acc = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[:, None]
    for k in tl.range(0, K, loop_unroll_factor=UNROLL):
        w = tl.load(w_ptr + offs_c * K + k, mask=mask_c, other=0.0).to(tl.float32)
        xv = _load_seq(x_ptr, init_ptr, x_base, init_base, offs_c, mask_c, offs_l + (k * DIL - PAD),
                       C, L, S, sxc, sxl, HAS_INIT)
        acc += w[:, None] * xv

    out_off = x_base + offs_c.to(tl.int64)[:, None] * sxc + offs_l.to(tl.int64)[None, :] * sxl
    if ACT:
        sig = tl.sigmoid(acc)
        if GRAD:
            dy = tl.load(dy_ptr + out_off, mask=mask, other=0.0).to(tl.float32)
            acc = dy * (sig + acc * sig * (1.0 - sig))  # d silu(z)/dz = s + z s (1 - s)
        else:
            acc = acc * sig
    tl.store(y_ptr + out_off, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dx_tile(g_ptr, w_ptr, g_base, offs_c, mask_c, s, L, DIL, PAD, sxc, sxl,
             K: tl.constexpr, UNROLL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """d(sequence)[s] = sum_k w[k] * g[s - k*DIL + PAD] for a tile of times s (fp32)."""
    acc = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
    for k in tl.range(0, K, loop_unroll_factor=UNROLL):
        w = tl.load(w_ptr + offs_c * K + k, mask=mask_c, other=0.0).to(tl.float32)
        t = s - k * DIL + PAD
        m = mask_c[:, None] & ((t >= 0) & (t < L))[None, :]
        gv = tl.load(g_ptr + g_base + offs_c.to(tl.int64)[:, None] * sxc + t.to(tl.int64)[None, :] * sxl,
                     mask=m, other=0.0).to(tl.float32)
        acc += w[:, None] * gv
    return acc


@triton.jit
def _dilated_conv1d_bwd_kernel(
    x_ptr, w_ptr, init_ptr, g_ptr, dx_ptr, dinit_ptr, dw_ptr, db_ptr,
    B, C, L, S, DIL, PAD, N_LPROG, ITERS,
    sxb, sxc, sxl,  # strides of x, g and dx (one layout)
    K: tl.constexpr, KP: tl.constexpr, UNROLL: tl.constexpr, HAS_INIT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # g = dL/d(pre-activation) [B, C, L].  Programs pid_l < N_LPROG each cover ITERS*BLOCK_L times: they write dx
    # there and their partial sums of dw [N_LPROG, B, C, K] and db [N_LPROG, B, C] (reduced on the host, in a
    # fixed order: deterministic). Programs pid_l >= N_LPROG write d(init) for the S times before the sequence.
    pid_l = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    x_base = pid_b.to(tl.int64) * sxb
    init_base = pid_b.to(tl.int64) * C * S
    if pid_l < N_LPROG:
        kcol = tl.arange(0, KP)
        dw_acc = tl.zeros([BLOCK_C, KP], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for it in range(0, ITERS):
            offs_l = (pid_l * ITERS + it) * BLOCK_L + tl.arange(0, BLOCK_L)
            mask = mask_c[:, None] & (offs_l < L)[None, :]
            off = x_base + offs_c.to(tl.int64)[:, None] * sxc + offs_l.to(tl.int64)[None, :] * sxl
            # dx at times offs_l
            dx = _dx_tile(g_ptr, w_ptr, x_base, offs_c, mask_c, offs_l, L, DIL, PAD, sxc, sxl, K, UNROLL, BLOCK_C, BLOCK_L)
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            # dw, db from outputs at times offs_l
            g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
            db_acc += tl.sum(g, axis=1)
            for k in tl.range(0, K, loop_unroll_factor=UNROLL):
                xv = _load_seq(x_ptr, init_ptr, x_base, init_base, offs_c, mask_c, offs_l + (k * DIL - PAD),
                               C, L, S, sxc, sxl, HAS_INIT)
                part = tl.sum(g * xv, axis=1)
                dw_acc += tl.where(kcol[None, :] == k, part[:, None], 0.0)
        row = (pid_l * B + pid_b).to(tl.int64) * C + offs_c
        tl.store(dw_ptr + row[:, None] * K + kcol[None, :], dw_acc, mask=mask_c[:, None] & (kcol < K)[None, :])
        tl.store(db_ptr + row, db_acc, mask=mask_c)
    else:
        if HAS_INIT:
            j = (pid_l - N_LPROG) * BLOCK_L + tl.arange(0, BLOCK_L)  # index into init, time j - S
            d = _dx_tile(g_ptr, w_ptr, x_base, offs_c, mask_c, j - S, L, DIL, PAD, sxc, sxl, K, UNROLL, BLOCK_C, BLOCK_L)
            iptr = dinit_ptr + init_base + offs_c.to(tl.int64)[:, None] * S + j[None, :]
            tl.store(iptr, d.to(dinit_ptr.dtype.element_ty), mask=mask_c[:, None] & (j < S)[None, :])


# ---------------------------------------------------------------------------------------------------------------
# launch configuration

def _config(C: int, L: int, channels_last: bool) -> dict:
    """Tile shape per layout: the contiguous axis gets the long side of the tile."""
    if channels_last:
        block_c, block_l = min(64, next_pow2(C)), 32
    else:
        block_c, block_l = 4, 512
    block_l = min(block_l, max(16, next_pow2(L)))
    # num_stages=1: the K taps already overlap in cache; software pipelining only multiplied live tiles
    return {"BLOCK_C": block_c, "BLOCK_L": block_l, "num_warps": 8 if channels_last else 4, "num_stages": 1}


def _unroll(K: int) -> int:
    # Unroll short filters fully (independent loads in flight); long ones stay a loop so the tiles of all K taps
    # are not live at once (fully unrolled K=32 spilled ~19 KB of registers on sm_90).
    return K if K <= 8 else 2


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _channels_last(x: torch.Tensor) -> bool:
    return x.stride(2) != 1


def dilated_conv1d_fwd(x, weight, bias, initial_state, dilation: int, pad: int, silu: bool, dy=None):
    """x: [B, C, L] channels-first or channels-last; weight: [C, K]; bias: [C] | None; initial_state:
    [B, C, (K-1)*dilation] contiguous | None. Returns y = act(conv + bias) in x's layout and dtype, or, when dy
    ([B, C, L], x's layout) is given, dy * act'(conv + bias) in fp32 (the gradient of the pre-activation)."""
    B, C, L = x.shape
    K = weight.shape[1]
    S = (K - 1) * dilation
    grad = dy is not None
    y = empty_like(x, dtype=torch.float32 if grad else x.dtype)
    if y.numel() == 0:
        return y
    cfg = _config(C, L, _channels_last(x))
    grid = (triton.cdiv(L, cfg["BLOCK_L"]), triton.cdiv(C, cfg["BLOCK_C"]), B)
    has_init = initial_state is not None and S > 0
    _dilated_conv1d_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, initial_state if has_init else x,
        dy if grad else x, y,
        C, L, S, dilation, pad, *_strides(x),
        K=K, UNROLL=_unroll(K), HAS_BIAS=bias is not None, HAS_INIT=has_init, ACT=silu, GRAD=grad,
        BLOCK_C=cfg["BLOCK_C"], BLOCK_L=cfg["BLOCK_L"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y


# Aim for about this many programs along L in the backward, so dw partial sums stay small.
_BWD_L_PROGRAMS = 64


def dilated_conv1d_bwd(x, weight, initial_state, g, dilation: int, pad: int):
    """g: dL/d(pre-activation) [B, C, L] in x's layout. Returns (dx [x's layout/dtype], dweight [C, K] fp32,
    dbias [C] fp32, dinit [B, C, S] in x's dtype or None)."""
    B, C, L = x.shape
    K = weight.shape[1]
    S = (K - 1) * dilation
    has_init = initial_state is not None and S > 0
    dx = empty_like(x)
    dinit = empty((B, C, S), dtype=x.dtype, device=x.device) if has_init else None
    if B * C == 0 or (L == 0 and not has_init):
        if dinit is not None:
            dinit.zero_()
        return (dx, torch.zeros(C, K, dtype=torch.float32, device=x.device),
                torch.zeros(C, dtype=torch.float32, device=x.device), dinit)
    cfg = _config(C, L, _channels_last(x))
    n_tiles = triton.cdiv(L, cfg["BLOCK_L"])
    iters = max(1, triton.cdiv(n_tiles, _BWD_L_PROGRAMS))
    n_lprog = triton.cdiv(n_tiles, iters)
    n_init = triton.cdiv(S, cfg["BLOCK_L"]) if has_init else 0
    dw = empty((n_lprog, B, C, K), dtype=torch.float32, device=x.device)
    db = empty((n_lprog, B, C), dtype=torch.float32, device=x.device)
    grid = (n_lprog + n_init, triton.cdiv(C, cfg["BLOCK_C"]), B)
    _dilated_conv1d_bwd_kernel[grid](
        x, weight, initial_state if has_init else x, g, dx, dinit if has_init else dx, dw, db,
        B, C, L, S, dilation, pad, n_lprog, iters, *_strides(x),
        K=K, KP=next_pow2(K), UNROLL=_unroll(K), HAS_INIT=has_init,
        BLOCK_C=cfg["BLOCK_C"], BLOCK_L=cfg["BLOCK_L"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    # fixed-order reductions over (program, batch): bit-reproducible
    return dx, dw.sum(dim=(0, 1)), db.sum(dim=(0, 1)), dinit


# ---------------------------------------------------------------------------------------------------------------
# ahead-of-time compile cases (CI compiles each for sm_90; see kernels/common.py)

def _aligned(ptrs: dict, dilation_aligned: bool) -> tuple:
    """What the JIT specialises as 16-divisible for typical sizes: pointers, L and the outer strides; with a
    dilation (and so a padding) that is a multiple of 16 (TCNCA's d=64), the shifted taps vectorise too."""
    return tuple(ptrs) + ("L", "sxb") + (("DIL", "PAD") if dilation_aligned else ())


def aot_cases():
    cases = []
    for dt in (torch.bfloat16, torch.float32):
        t = TL_DTYPE[dt]
        for channels_last in (False, True):
            cfg = _config(256, 1 << 20, channels_last)
            blocks = {"BLOCK_C": cfg["BLOCK_C"], "BLOCK_L": cfg["BLOCK_L"]}
            # one of the strides is 1: specialise it as the launcher's runtime specialisation does
            unit = {"sxc": 1} if channels_last else {"sxl": 1}
            lay = "cl" if channels_last else "cf"
            for K, flags in ((4, False), (32, True)):
                for grad in (False, True):
                    fwd_c = dict(K=K, UNROLL=_unroll(K), HAS_BIAS=flags, HAS_INIT=flags, ACT=flags or grad, GRAD=grad, **blocks, **unit)
                    ptrs = {"x_ptr": t, "w_ptr": t, "b_ptr": t, "init_ptr": t, "dy_ptr": t,
                            "y_ptr": "fp32" if grad else t}
                    cases.append(AotCase(f"dilated_conv1d_fwd[{t},{lay},K={K},grad={grad}]",
                                         _dilated_conv1d_fwd_kernel,
                                         signature(_dilated_conv1d_fwd_kernel, ptrs, fwd_c), fwd_c,
                                         {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]},
                                         aligned=_aligned(ptrs, K == 32)))
                bwd_c = dict(K=K, KP=next_pow2(K), UNROLL=_unroll(K), HAS_INIT=flags, **blocks, **unit)
                ptrs = {"x_ptr": t, "w_ptr": t, "init_ptr": t, "g_ptr": "fp32" if flags else t, "dx_ptr": t,
                        "dinit_ptr": t, "dw_ptr": "fp32", "db_ptr": "fp32"}
                cases.append(AotCase(f"dilated_conv1d_bwd[{t},{lay},K={K}]", _dilated_conv1d_bwd_kernel,
                                     signature(_dilated_conv1d_bwd_kernel, ptrs, bwd_c), bwd_c,
                                     {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]},
                                     aligned=_aligned(ptrs, K == 32)))
    return cases
