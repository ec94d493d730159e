"""Linear attention and retention in Triton: one kernel family for non-causal linear attention (SLAB), causal
chunkwise linear attention, and RetNet/RMT retention (decay γ per head; HAS_DECAY=True).

Notation: q, k: [BH, N, DK]; v, o: [BH, N, DV] (contiguous, BH = B*H flattened); φ the feature map
(FMAP: 0 identity, 1 relu, 2 elu+1) applied to q and k inside the kernels; lg = log2(γ) per head ([H], fp32).
All math is fp32 (tl.dot with TF32 for 16-bit inputs, IEEE fp32 for fp32 inputs).

Non-causal (`_global_*`): S = Σ_n φ(k_n)ᵀ v_n  [DK, DV],  z = Σ_n φ(k_n)  [DK],
    o_n = φ(q_n) S / (φ(q_n)·z + eps)   (the division only when NORMALIZE).
  S is reduced over N in NSPLIT partial sums (one program each), then summed in a fixed order on the host.

Causal (`_chunk_*`), one program per (bh, DV block) walking the chunks of C positions in order, state in registers:
    o_n = Σ_{m<=n} w(n,m) (φq_n·φk_m) v_m + γ^(n+1) φq_n S0,     w(n,m) = γ^(n-m)  (1 without decay)
    S_N = γ^N S0 + Σ_m γ^(N-1-m) φk_mᵀ v_m       (the recurrent S_n = γ S_{n-1} + φk_nᵀ v_n)
    with NORMALIZE the same for the normaliser z (v_m replaced by 1) and o_n = num_n / (den_n + eps).
  REVERSE=True runs the same recurrence on the reversed sequence, DIAG=False drops the m == n term, ACCUMULATE adds
  an fp32 buffer to the output: RMT's two-sided decay γ^|n-m| is the causal pass plus a strict reverse pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import AotCase, TL_DTYPE, empty, next_pow2, signature

FMAPS = {None: 0, "identity": 0, "relu": 1, "elu1": 2}


@triton.jit
def _phi(x, FMAP: tl.constexpr):
    """Feature map; NaN propagates (as torch.relu / F.elu do)."""
    if FMAP == 1:
        x = tl.where(x < 0, 0.0, x)
    elif FMAP == 2:
        x = tl.where(x > 0, x + 1.0, tl.exp(x))
    return x


@triton.jit
def _dphi(x, FMAP: tl.constexpr):
    """dφ/dx (relu' = 0 at 0 and at NaN, as torch's)."""
    if FMAP == 1:
        d = tl.where(x > 0, 1.0, 0.0)
    elif FMAP == 2:
        d = tl.where(x > 0, 1.0, tl.exp(x))
    else:
        d = tl.full(x.shape, 1.0, tl.float32)
    return d


@triton.jit
def _tile(ptr, base, rows, mrow, cols, mcol, D):
    """fp32 tile [len(rows), len(cols)] of a row-major [*, D] matrix, zeros outside."""
    p = ptr + base + rows.to(tl.int64)[:, None] * D + cols[None, :]
    return tl.load(p, mask=mrow[:, None] & mcol[None, :], other=0.0).to(tl.float32)


@triton.jit
def _phi_tile(ptr, base, rows, mrow, cols, mcol, D, FMAP: tl.constexpr):
    """(raw, φ(raw)) tiles; φ is zero outside the matrix (elu+1 of a padded 0 would be 1)."""
    x = _tile(ptr, base, rows, mrow, cols, mcol, D)
    return x, tl.where(mrow[:, None] & mcol[None, :], _phi(x, FMAP), 0.0)


# ---------------------------------------------------------------------------------------------------------------
# non-causal: global state, then outputs


@triton.jit
def _global_state_kernel(
    a_ptr, b_ptr, den_ptr, delta_ptr, s_ptr, z_ptr,
    BH, N, DK, DV, ROWS, eps,
    FMAP: tl.constexpr, GRAD: tl.constexpr, NORMALIZE: tl.constexpr, PREC: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    # Partial sums over rows [split*ROWS, (split+1)*ROWS): S = Σ φ(a)ᵀ b' [DK, DV] -> s_ptr[split, bh],
    # z = Σ φ(a) w [DK] -> z_ptr[split, bh].  Forward: a = k, b' = v, w = 1.
    # GRAD: a = q, b' = dN = do/(den+eps), w = dD = -delta/(den+eps) (delta = rowsum(do*o)): dS and dz.
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_v = tl.program_id(2)
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mk = offs_k < DK
    mv = offs_v < DV
    a_base = pid_bh.to(tl.int64) * N * DK
    b_base = pid_bh.to(tl.int64) * N * DV
    S = tl.zeros([BK, BV], dtype=tl.float32)
    z = tl.zeros([BK], dtype=tl.float32)
    start = pid_s * ROWS
    for n0 in range(start, tl.minimum(start + ROWS, N), BN):
        rows = n0 + tl.arange(0, BN)
        mr = rows < N
        _, a = _phi_tile(a_ptr, a_base, rows, mr, offs_k, mk, DK, FMAP)
        b = _tile(b_ptr, b_base, rows, mr, offs_v, mv, DV)
        w = tl.where(mr, 1.0, 0.0)
        if GRAD:
            if NORMALIZE:
                inv = 1.0 / (tl.load(den_ptr + pid_bh.to(tl.int64) * N + rows, mask=mr, other=1.0) + eps)
                b = b * inv[:, None]
                w = -tl.load(delta_ptr + pid_bh.to(tl.int64) * N + rows, mask=mr, other=0.0) * inv
        S += tl.dot(tl.trans(a), b, input_precision=PREC)
        if NORMALIZE:
            z += tl.sum(a * w[:, None], axis=0)
    part = (pid_s * BH + pid_bh).to(tl.int64)
    tl.store(s_ptr + part * DK * DV + offs_k[:, None] * DV + offs_v[None, :], S, mask=mk[:, None] & mv[None, :])
    if NORMALIZE:
        tl.store(z_ptr + part * DK + offs_k, z, mask=mk & (pid_v == 0))


@triton.jit
def _global_out_kernel(
    q_ptr, s_ptr, z_ptr, o_ptr, den_ptr,
    N, DK, DV, eps,
    FMAP: tl.constexpr, NORMALIZE: tl.constexpr, PREC: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    # o = φ(q) S [/ (φ(q)·z + eps)] for BN rows and one DV block; den = φ(q)·z (fp32, saved for the backward).
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_v = tl.program_id(2)
    rows = pid_n * BN + tl.arange(0, BN)
    mr = rows < N
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mk = offs_k < DK
    mv = offs_v < DV
    bh = pid_bh.to(tl.int64)
    _, q = _phi_tile(q_ptr, bh * N * DK, rows, mr, offs_k, mk, DK, FMAP)
    S = tl.load(s_ptr + bh * DK * DV + offs_k[:, None] * DV + offs_v[None, :], mask=mk[:, None] & mv[None, :],
                other=0.0)
    o = tl.dot(q, S, input_precision=PREC)
    if NORMALIZE:
        z = tl.load(z_ptr + bh * DK + offs_k, mask=mk, other=0.0)
        den = tl.sum(q * z[None, :], axis=1)
        o = o / (den + eps)[:, None]
        tl.store(den_ptr + bh * N + rows, den, mask=mr & (pid_v == 0))
    optr = o_ptr + bh * N * DV + rows.to(tl.int64)[:, None] * DV + offs_v[None, :]
    tl.store(optr, o.to(o_ptr.dtype.element_ty), mask=mr[:, None] & mv[None, :])


@triton.jit
def _global_bwd_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, den_ptr, delta_ptr, s_ptr, z_ptr, ds_ptr, dz_ptr,
    dq_ptr, dk_ptr, dv_ptr,
    N, DK, DV, eps,
    FMAP: tl.constexpr, NORMALIZE: tl.constexpr, PREC: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    # For BN rows: dq = (dN Sᵀ + dD zᵀ) φ'(q),  dk = (v dSᵀ + dz) φ'(k),  dv = φ(k) dS,
    # with dN = do/(den+eps), dD = -delta/(den+eps) (NORMALIZE) else dN = do.  Loops over the DV blocks.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    mr = rows < N
    offs_k = tl.arange(0, BK)
    mk = offs_k < DK
    bh = pid_bh.to(tl.int64)
    qk_base = bh * N * DK
    v_base = bh * N * DV
    q_raw = _tile(q_ptr, qk_base, rows, mr, offs_k, mk, DK)
    k_raw, k = _phi_tile(k_ptr, qk_base, rows, mr, offs_k, mk, DK, FMAP)
    dq = tl.zeros([BN, BK], dtype=tl.float32)
    dk = tl.zeros([BN, BK], dtype=tl.float32)
    if NORMALIZE:
        inv = 1.0 / (tl.load(den_ptr + bh * N + rows, mask=mr, other=1.0) + eps)
        dd = -tl.load(delta_ptr + bh * N + rows, mask=mr, other=0.0) * inv
        z = tl.load(z_ptr + bh * DK + offs_k, mask=mk, other=0.0)
        dz = tl.load(dz_ptr + bh * DK + offs_k, mask=mk, other=0.0)
        dq += dd[:, None] * z[None, :]
        dk += tl.where(mr, 1.0, 0.0)[:, None] * dz[None, :]
    for v0 in range(0, DV, BV):
        offs_v = v0 + tl.arange(0, BV)
        mv = offs_v < DV
        dn = _tile(do_ptr, v_base, rows, mr, offs_v, mv, DV)
        if NORMALIZE:
            dn = dn * inv[:, None]
        v = _tile(v_ptr, v_base, rows, mr, offs_v, mv, DV)
        sm = mk[:, None] & mv[None, :]
        soff = bh * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
        S = tl.load(s_ptr + soff, mask=sm, other=0.0)
        dS = tl.load(ds_ptr + soff, mask=sm, other=0.0)
        dq += tl.dot(dn, tl.trans(S), input_precision=PREC)
        dk += tl.dot(v, tl.trans(dS), input_precision=PREC)
        dv = tl.dot(k, dS, input_precision=PREC)
        tl.store(dv_ptr + v_base + rows.to(tl.int64)[:, None] * DV + offs_v[None, :],
                 dv.to(dv_ptr.dtype.element_ty), mask=mr[:, None] & mv[None, :])
    dq = dq * _dphi(q_raw, FMAP)
    dk = dk * _dphi(k_raw, FMAP)
    off = qk_base + rows.to(tl.int64)[:, None] * DK + offs_k[None, :]
    m2 = mr[:, None] & mk[None, :]
    tl.store(dq_ptr + off, dq.to(dq_ptr.dtype.element_ty), mask=m2)
    tl.store(dk_ptr + off, dk.to(dk_ptr.dtype.element_ty), mask=m2)


# ---------------------------------------------------------------------------------------------------------------
# causal: chunkwise parallel, state carried across chunks


@triton.jit
def _chunk_decays(lg, t0, N, C: tl.constexpr, HAS_DECAY: tl.constexpr, DIAG: tl.constexpr):
    """For the chunk of positions [t0, t0+C): intra-chunk weights w [C, C] (causal mask times γ^(i-j)),
    query decay γ^(i+1) [C], key decay γ^(L-1-j) [C] (zero past the end), chunk decay γ^L, L = valid length."""
    i = tl.arange(0, C)
    L = tl.minimum(N - t0, C)
    diff = i[:, None] - i[None, :]
    causal = (diff >= 0) if DIAG else (diff > 0)
    if HAS_DECAY:
        w = tl.where(causal, tl.exp2(tl.where(causal, diff, 0).to(tl.float32) * lg), 0.0)
        dq = tl.exp2((i + 1).to(tl.float32) * lg)
        dk = tl.where(i < L, tl.exp2(tl.where(i < L, L - 1 - i, 0).to(tl.float32) * lg), 0.0)
        dc = tl.exp2(L.to(tl.float32) * lg)
    else:
        w = tl.where(causal, 1.0, 0.0)
        dq = tl.full([C], 1.0, tl.float32)
        dk = tl.where(i < L, 1.0, 0.0)
        dc = 1.0
    return w, dq, dk, dc


@triton.jit
def _chunk_fwd_kernel(
    q_ptr, k_ptr, v_ptr, lg_ptr, s0_ptr, z0_ptr, acc_ptr,
    o_ptr, den_ptr, st_ptr, zt_ptr,
    H, N, DK, DV, NC, eps,
    FMAP: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_S0: tl.constexpr, NORMALIZE: tl.constexpr,
    STORE_STATE: tl.constexpr, REVERSE: tl.constexpr, DIAG: tl.constexpr, ACCUMULATE: tl.constexpr,
    PREC: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_v = tl.program_id(1)
    bh = pid_bh.to(tl.int64)
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mk = offs_k < DK
    mv = offs_v < DV
    qk_base = bh * N * DK
    v_base = bh * N * DV
    lg = 0.0
    if HAS_DECAY:
        lg = tl.load(lg_ptr + pid_bh % H)
    soff = bh * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
    sm = mk[:, None] & mv[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    z = tl.zeros([BK], dtype=tl.float32)
    if HAS_S0:
        S += tl.load(s0_ptr + soff, mask=sm, other=0.0)
        if NORMALIZE:
            z += tl.load(z0_ptr + bh * DK + offs_k, mask=mk, other=0.0)
    for c in range(0, NC):
        t0 = c * C
        t = t0 + tl.arange(0, C)
        mt = t < N
        rows = t  # memory row of kernel time t
        if REVERSE:
            rows = N - 1 - t
        _, q = _phi_tile(q_ptr, qk_base, rows, mt, offs_k, mk, DK, FMAP)
        _, k = _phi_tile(k_ptr, qk_base, rows, mt, offs_k, mk, DK, FMAP)
        v = _tile(v_ptr, v_base, rows, mt, offs_v, mv, DV)
        w, dq, dk, dc = _chunk_decays(lg, t0, N, C, HAS_DECAY, DIAG)
        A = tl.dot(q, tl.trans(k), input_precision=PREC) * w
        qd = q * dq[:, None]
        o = tl.dot(A, v, input_precision=PREC) + tl.dot(qd, S, input_precision=PREC)
        optr = v_base + rows.to(tl.int64)[:, None] * DV + offs_v[None, :]
        om = mt[:, None] & mv[None, :]
        if NORMALIZE:
            den = tl.sum(A, axis=1) + tl.sum(qd * z[None, :], axis=1)
            o = o / (den + eps)[:, None]
            tl.store(den_ptr + bh * N + rows, den, mask=mt & (pid_v == 0))
        if ACCUMULATE:
            o += tl.load(acc_ptr + optr, mask=om, other=0.0)
        tl.store(o_ptr + optr, o.to(o_ptr.dtype.element_ty), mask=om)
        kd = k * dk[:, None]
        S = S * dc + tl.dot(tl.trans(kd), v, input_precision=PREC)
        if NORMALIZE:
            z = z * dc + tl.sum(kd, axis=0)
    if STORE_STATE:
        tl.store(st_ptr + soff, S, mask=sm)
        if NORMALIZE:
            tl.store(zt_ptr + bh * DK + offs_k, z, mask=mk & (pid_v == 0))


@triton.jit
def _chunk_bwd_kernel(
    q_ptr, k_ptr, v_ptr, lg_ptr, s0_ptr, z0_ptr, do_ptr, den_ptr, delta_ptr, dst_ptr, dzt_ptr, acc_ptr,
    dq_ptr, dk_ptr, dv_ptr, ds0_ptr, dz0_ptr,
    BH, H, N, DK, DV, NC, eps,
    FMAP: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_S0: tl.constexpr, NORMALIZE: tl.constexpr,
    HAS_DST: tl.constexpr, REVERSE: tl.constexpr, DIAG: tl.constexpr, ACCUMULATE: tl.constexpr,
    PREC: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    # dq, dk: this DV block's partial sums -> dq_ptr[pid_v], dk_ptr[pid_v] ([NV, BH, N, DK], summed on the host);
    # dv [BH, N, DV] (plus acc when ACCUMULATE); ds0 [BH, DK, DV]; dz0 [BH, DK].
    # dN = do/(den+eps) and dD = -rowsum(do*o)/(den+eps) when NORMALIZE; dD enters once, in the pid_v == 0 program.
    pid_bh = tl.program_id(0)
    pid_v = tl.program_id(1)
    bh = pid_bh.to(tl.int64)
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mk = offs_k < DK
    mv = offs_v < DV
    qk_base = bh * N * DK
    v_base = bh * N * DV
    part_base = (pid_v * BH).to(tl.int64) * N * DK + qk_base
    lg = 0.0
    if HAS_DECAY:
        lg = tl.load(lg_ptr + pid_bh % H)
    soff = bh * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
    sm = mk[:, None] & mv[None, :]
    first_v = (pid_v == 0).to(tl.float32)

    # forward sweep: dq needs the state before each chunk
    S = tl.zeros([BK, BV], dtype=tl.float32)
    z = tl.zeros([BK], dtype=tl.float32)
    if HAS_S0:
        S += tl.load(s0_ptr + soff, mask=sm, other=0.0)
        if NORMALIZE:
            z += tl.load(z0_ptr + bh * DK + offs_k, mask=mk, other=0.0)
    for c in range(0, NC):
        t0 = c * C
        t = t0 + tl.arange(0, C)
        mt = t < N
        rows = t
        if REVERSE:
            rows = N - 1 - t
        k_raw, k = _phi_tile(k_ptr, qk_base, rows, mt, offs_k, mk, DK, FMAP)
        v = _tile(v_ptr, v_base, rows, mt, offs_v, mv, DV)
        dn = _tile(do_ptr, v_base, rows, mt, offs_v, mv, DV)
        w, dqd, dkd, dc = _chunk_decays(lg, t0, N, C, HAS_DECAY, DIAG)
        G = tl.dot(dn, tl.trans(v), input_precision=PREC)
        if NORMALIZE:
            inv = 1.0 / (tl.load(den_ptr + bh * N + rows, mask=mt, other=1.0) + eps)
            dd = -tl.load(delta_ptr + bh * N + rows, mask=mt, other=0.0) * inv * first_v
            G = (G * inv[:, None] + dd[:, None]) * w
            dn = dn * inv[:, None]
        else:
            G = G * w
        dq = tl.dot(G, k, input_precision=PREC) + tl.dot(dn, tl.trans(S), input_precision=PREC) * dqd[:, None]
        if NORMALIZE:
            dq += (dd * dqd)[:, None] * z[None, :]
        q_raw = _tile(q_ptr, qk_base, rows, mt, offs_k, mk, DK)
        dq = dq * _dphi(q_raw, FMAP)
        tl.store(dq_ptr + part_base + rows.to(tl.int64)[:, None] * DK + offs_k[None, :],
                 dq.to(dq_ptr.dtype.element_ty), mask=mt[:, None] & mk[None, :])
        kd = k * dkd[:, None]
        S = S * dc + tl.dot(tl.trans(kd), v, input_precision=PREC)
        if NORMALIZE:
            z = z * dc + tl.sum(kd, axis=0)

    # reverse sweep: dS, dz = gradient of the state after the current chunk
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    dz = tl.zeros([BK], dtype=tl.float32)
    if HAS_DST:
        dS += tl.load(dst_ptr + soff, mask=sm, other=0.0)
        if NORMALIZE:
            dz += tl.load(dzt_ptr + bh * DK + offs_k, mask=mk, other=0.0) * first_v
    for cc in range(0, NC):
        t0 = (NC - 1 - cc) * C
        t = t0 + tl.arange(0, C)
        mt = t < N
        rows = t
        if REVERSE:
            rows = N - 1 - t
        _, q = _phi_tile(q_ptr, qk_base, rows, mt, offs_k, mk, DK, FMAP)
        k_raw, k = _phi_tile(k_ptr, qk_base, rows, mt, offs_k, mk, DK, FMAP)
        v = _tile(v_ptr, v_base, rows, mt, offs_v, mv, DV)
        dn = _tile(do_ptr, v_base, rows, mt, offs_v, mv, DV)
        w, dqd, dkd, dc = _chunk_decays(lg, t0, N, C, HAS_DECAY, DIAG)
        G = tl.dot(dn, tl.trans(v), input_precision=PREC)
        if NORMALIZE:
            inv = 1.0 / (tl.load(den_ptr + bh * N + rows, mask=mt, other=1.0) + eps)
            dd = -tl.load(delta_ptr + bh * N + rows, mask=mt, other=0.0) * inv * first_v
            G = (G * inv[:, None] + dd[:, None]) * w
            dn = dn * inv[:, None]
        else:
            G = G * w
        A = tl.dot(q, tl.trans(k), input_precision=PREC) * w
        kd = k * dkd[:, None]
        dk = tl.dot(tl.trans(G), q, input_precision=PREC) + tl.dot(v, tl.trans(dS), input_precision=PREC) * dkd[:, None]
        dv = tl.dot(tl.trans(A), dn, input_precision=PREC) + tl.dot(kd, dS, input_precision=PREC)
        if NORMALIZE:
            dk += dkd[:, None] * dz[None, :]
        dk = dk * _dphi(k_raw, FMAP)
        tl.store(dk_ptr + part_base + rows.to(tl.int64)[:, None] * DK + offs_k[None, :],
                 dk.to(dk_ptr.dtype.element_ty), mask=mt[:, None] & mk[None, :])
        voff = v_base + rows.to(tl.int64)[:, None] * DV + offs_v[None, :]
        vm = mt[:, None] & mv[None, :]
        if ACCUMULATE:
            dv += tl.load(acc_ptr + voff, mask=vm, other=0.0)
        tl.store(dv_ptr + voff, dv.to(dv_ptr.dtype.element_ty), mask=vm)
        qd = q * dqd[:, None]
        dS = dS * dc + tl.dot(tl.trans(qd), dn, input_precision=PREC)
        if NORMALIZE:
            dz = dz * dc + tl.sum(qd * dd[:, None], axis=0)
    if HAS_S0:
        tl.store(ds0_ptr + soff, dS, mask=sm)
        if NORMALIZE:
            tl.store(dz0_ptr + bh * DK + offs_k, dz, mask=mk & (pid_v == 0))


# ---------------------------------------------------------------------------------------------------------------
# launch configuration

MAX_D = 256
NUM_WARPS = 8          # chunk kernels: several [C, 64] fp32 tiles live at once
_TARGET_PROGRAMS = 512  # non-causal state pass: split N until about this many programs (fixed: deterministic)


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _bk(DK: int) -> int:
    return max(16, next_pow2(DK))


def _bv(BK: int, DV: int) -> int:
    """DV block: the [BK, BV] fp32 state stays at most 64x64 elements in registers."""
    return max(16, min(next_pow2(DV), 4096 // BK))


def _chunk(BK: int) -> int:
    return 64 if BK <= 64 else 32


def _bn(BK: int) -> int:
    return 64 if BK <= 64 else 32


def chunk_config(DK: int, DV: int) -> dict:
    BK = _bk(DK)
    return {"C": _chunk(BK), "BK": BK, "BV": _bv(BK, DV), "num_warps": NUM_WARPS, "num_stages": 1}


def global_config(DK: int, DV: int) -> dict:
    BK = _bk(DK)
    return {"BN": _bn(BK), "BK": BK, "BV": _bv(BK, DV), "num_warps": 4, "num_stages": 2}


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def global_fwd(q, k, v, fmap: int, normalize: bool, eps: float):
    """Non-causal. q, k: [B, H, N, DK]; v: [B, H, N, DV] (contiguous). Returns o [B, H, N, DV] (q's dtype),
    den [B, H, N] fp32 (φq·z; zeros if not normalize), S [B, H, DK, DV] fp32, z [B, H, DK] fp32."""
    B, H, N, DK = q.shape
    DV = v.shape[-1]
    BH = B * H
    dev = q.device
    o = empty((B, H, N, DV), dtype=q.dtype, device=dev)
    den = empty((B, H, N), dtype=torch.float32, device=dev) if normalize else torch.zeros(B, H, N, device=dev)
    cfg = global_config(DK, DV)
    BN, BK, BV = cfg["BN"], cfg["BK"], cfg["BV"]
    NV = triton.cdiv(DV, BV)
    n_blocks = triton.cdiv(N, BN)
    nsplit = max(1, min(n_blocks, _TARGET_PROGRAMS // max(1, BH * NV)))
    rows = triton.cdiv(n_blocks, nsplit) * BN
    nsplit = triton.cdiv(N, rows) if N else 1
    s_part = empty((nsplit, B, H, DK, DV), dtype=torch.float32, device=dev)
    z_part = empty((nsplit, B, H, DK), dtype=torch.float32, device=dev) if normalize else s_part
    if BH * DK * DV == 0 or N == 0:
        S = torch.zeros(B, H, DK, DV, device=dev)
        z = torch.zeros(B, H, DK, device=dev)
        return o.zero_(), den.zero_(), S, z
    kw = dict(FMAP=fmap, NORMALIZE=normalize, PREC=_prec(q.dtype), BN=BN, BK=BK, BV=BV,
              num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _global_state_kernel[(nsplit, BH, NV)](k, v, k, k, s_part, z_part, BH, N, DK, DV, rows, eps, GRAD=False, **kw)
    S = s_part.sum(0)  # fixed-order reduction: deterministic
    z = z_part.sum(0) if normalize else torch.zeros(B, H, DK, device=dev)
    _global_out_kernel[(n_blocks, BH, NV)](q, S, z, o, den, N, DK, DV, eps, **kw)
    return o, den, S, z


def global_bwd(do, q, k, v, o, den, S, z, fmap: int, normalize: bool, eps: float):
    """Gradients of global_fwd: (dq, dk, dv) in the inputs' dtype."""
    B, H, N, DK = q.shape
    DV = v.shape[-1]
    BH = B * H
    dev = q.device
    dq, dk, dv = empty(q.shape, dtype=q.dtype, device=dev), empty(k.shape, dtype=k.dtype, device=dev), \
        empty(v.shape, dtype=v.dtype, device=dev)
    if BH * N == 0:
        return dq, dk, dv
    if DK * DV == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    cfg = global_config(DK, DV)
    BN, BK, BV = cfg["BN"], cfg["BK"], cfg["BV"]
    NV = triton.cdiv(DV, BV)
    n_blocks = triton.cdiv(N, BN)
    nsplit = max(1, min(n_blocks, _TARGET_PROGRAMS // max(1, BH * NV)))
    rows = triton.cdiv(n_blocks, nsplit) * BN
    nsplit = triton.cdiv(N, rows)
    delta = (do.float() * o.float()).sum(-1) if normalize else den  # rowsum(do * o) [B, H, N]
    ds_part = empty((nsplit, B, H, DK, DV), dtype=torch.float32, device=dev)
    dz_part = empty((nsplit, B, H, DK), dtype=torch.float32, device=dev) if normalize else ds_part
    kw = dict(FMAP=fmap, NORMALIZE=normalize, PREC=_prec(q.dtype), BN=BN, BK=BK, BV=BV,
              num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _global_state_kernel[(nsplit, BH, NV)](q, do, den, delta, ds_part, dz_part, BH, N, DK, DV, rows, eps,
                                           GRAD=True, **kw)
    dS = ds_part.sum(0)
    dz = dz_part.sum(0) if normalize else dS
    _global_bwd_kernel[(n_blocks, BH)](q, k, v, do, den, delta, S, z, dS, dz, dq, dk, dv, N, DK, DV, eps, **kw)
    return dq, dk, dv


def _chunk_launch_args(q, v, lg, normalize):
    B, H, N, DK = q.shape
    DV = v.shape[-1]
    cfg = chunk_config(DK, DV)
    NV = triton.cdiv(DV, cfg["BV"])
    NC = triton.cdiv(N, cfg["C"])
    return B, H, N, DK, DV, cfg, NV, NC


def chunk_fwd(q, k, v, lg, s0, z0, fmap: int, normalize: bool, eps: float, two_sided: bool, store_state: bool):
    """Causal (or, with two_sided, RMT's γ^|n-m|) chunkwise linear attention / retention.

    q, k: [B, H, N, DK]; v: [B, H, N, DV]; lg: [H] fp32 log2(γ) or None (no decay); s0: [B, H, DK, DV] fp32 or
    None; z0: [B, H, DK] fp32 or None (normalize only). Returns o [B, H, N, DV] (q's dtype), den [B, H, N] fp32,
    S_N [B, H, DK, DV] fp32 and z_N [B, H, DK] fp32 (empty unless store_state)."""
    B, H, N, DK, DV, cfg, NV, NC = _chunk_launch_args(q, v, lg, normalize)
    dev = q.device
    o = empty((B, H, N, DV), dtype=q.dtype, device=dev)
    den = empty((B, H, N), dtype=torch.float32, device=dev) if normalize else q.new_zeros(0, dtype=torch.float32)
    st = empty((B, H, DK, DV), dtype=torch.float32, device=dev) if store_state else q.new_zeros(0, dtype=torch.float32)
    zt = empty((B, H, DK), dtype=torch.float32, device=dev) if store_state and normalize \
        else q.new_zeros(0, dtype=torch.float32)
    if B * H == 0:
        return o, den, st, zt
    if N == 0 or DK * DV == 0:
        o.zero_()
        if normalize:
            den.zero_()
        if store_state:
            st.copy_(s0 if s0 is not None else torch.zeros_like(st))
            if normalize:
                zt.copy_(z0 if z0 is not None else torch.zeros_like(zt))
        return o, den, st, zt
    has_s0 = s0 is not None
    dummy = o
    kw = dict(FMAP=fmap, HAS_DECAY=lg is not None, NORMALIZE=normalize, PREC=_prec(q.dtype),
              C=cfg["C"], BK=cfg["BK"], BV=cfg["BV"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    grid = (B * H, NV)
    first = empty((B, H, N, DV), dtype=torch.float32, device=dev) if two_sided else o
    _chunk_fwd_kernel[grid](q, k, v, lg if lg is not None else dummy, s0 if has_s0 else dummy,
                            z0 if (has_s0 and normalize) else dummy, dummy, first, den, st, zt,
                            H, N, DK, DV, NC, eps, HAS_S0=has_s0, STORE_STATE=store_state, REVERSE=False,
                            DIAG=True, ACCUMULATE=False, **kw)
    if two_sided:  # + the strictly later positions, decayed by γ^(m-n): the same recurrence on the reversed sequence
        _chunk_fwd_kernel[grid](q, k, v, lg if lg is not None else dummy, dummy, dummy, first, o, den, st, zt,
                                H, N, DK, DV, NC, eps, HAS_S0=False, STORE_STATE=False, REVERSE=True,
                                DIAG=False, ACCUMULATE=True, **kw)
    return o, den, st, zt


def chunk_bwd(do, dst, dzt, q, k, v, lg, s0, z0, o, den, fmap: int, normalize: bool, eps: float, two_sided: bool):
    """Gradients of chunk_fwd. do: [B, H, N, DV]; dst: [B, H, DK, DV] fp32 or None (gradient of the final state);
    dzt: [B, H, DK] fp32 or None. Returns dq, dk, dv (inputs' dtype), ds0 [B, H, DK, DV] fp32 or None,
    dz0 [B, H, DK] fp32 or None."""
    B, H, N, DK, DV, cfg, NV, NC = _chunk_launch_args(q, v, lg, normalize)
    dev = q.device
    has_s0 = s0 is not None
    n_dir = 2 if two_sided else 1
    part_dtype = q.dtype if NV * n_dir == 1 else torch.float32
    dq_part = empty((n_dir * NV, B, H, N, DK), dtype=part_dtype, device=dev)
    dk_part = empty((n_dir * NV, B, H, N, DK), dtype=part_dtype, device=dev)
    dv = empty(v.shape, dtype=v.dtype, device=dev)
    ds0 = empty((B, H, DK, DV), dtype=torch.float32, device=dev) if has_s0 else None
    dz0 = empty((B, H, DK), dtype=torch.float32, device=dev) if has_s0 and normalize else None
    if B * H * N * DK * DV == 0:
        for t in (dv, ds0, dz0):
            if t is not None:
                t.zero_()
        if ds0 is not None and dst is not None:  # N == 0: the final state is the initial state
            ds0.copy_(dst)
            if dz0 is not None and dzt is not None:
                dz0.copy_(dzt)
        z = torch.zeros(q.shape, dtype=q.dtype, device=dev)
        return z, z.clone(), dv, ds0, dz0
    delta = (do.float() * o.float()).sum(-1) if normalize else None
    dummy = dv
    kw = dict(FMAP=fmap, HAS_DECAY=lg is not None, NORMALIZE=normalize, PREC=_prec(q.dtype),
              C=cfg["C"], BK=cfg["BK"], BV=cfg["BV"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    grid = (B * H, NV)
    lg_ = lg if lg is not None else dummy
    first_dv = empty(v.shape, dtype=torch.float32, device=dev) if two_sided else dv
    _chunk_bwd_kernel[grid](q, k, v, lg_, s0 if has_s0 else dummy, z0 if has_s0 and normalize else dummy, do,
                            den if normalize else dummy, delta if normalize else dummy,
                            dst if dst is not None else dummy, dzt if (dzt is not None and normalize) else dummy,
                            dummy, dq_part, dk_part, first_dv, ds0 if has_s0 else dummy,
                            dz0 if dz0 is not None else dummy,
                            B * H, H, N, DK, DV, NC, eps, HAS_S0=has_s0, HAS_DST=dst is not None, REVERSE=False,
                            DIAG=True, ACCUMULATE=False, **kw)
    if two_sided:
        _chunk_bwd_kernel[grid](q, k, v, lg_, dummy, dummy, do, dummy, dummy, dummy, dummy, first_dv,
                                dq_part[NV:], dk_part[NV:], dv, dummy, dummy,
                                B * H, H, N, DK, DV, NC, eps, HAS_S0=False, HAS_DST=False, REVERSE=True,
                                DIAG=False, ACCUMULATE=True, **kw)
    # partial sums over DV blocks (and directions), in a fixed order: deterministic
    dq = dq_part[0] if dq_part.shape[0] == 1 else dq_part.sum(0).to(q.dtype)
    dk = dk_part[0] if dk_part.shape[0] == 1 else dk_part.sum(0).to(k.dtype)
    return dq, dk, dv, ds0, dz0


# ---------------------------------------------------------------------------------------------------------------
# ahead-of-time compile cases (CI compiles each for sm_90; see kernels/common.py)

_TORCH = {v: k for k, v in TL_DTYPE.items()}


def _opts(cfg):
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def _chunk_cases(t: str, D: int, decay: bool, flags: list[dict]) -> list[AotCase]:
    cfg = chunk_config(D, D)
    blocks = {"C": cfg["C"], "BK": cfg["BK"], "BV": cfg["BV"], "PREC": _prec(_TORCH[t])}
    cases = []
    for f in flags:
        fwd_c = dict(FMAP=f["fmap"], HAS_DECAY=decay, HAS_S0=f["state"], NORMALIZE=f["norm"],
                     STORE_STATE=f["state"], REVERSE=f["rev"], DIAG=not f["rev"], ACCUMULATE=f["rev"], **blocks)
        ptrs = {"q_ptr": t, "k_ptr": t, "v_ptr": t, "lg_ptr": "fp32", "s0_ptr": "fp32", "z0_ptr": "fp32",
                "acc_ptr": "fp32", "o_ptr": t, "den_ptr": "fp32", "st_ptr": "fp32", "zt_ptr": "fp32"}
        tag = f"{t},D={D},fmap={f['fmap']},norm={f['norm']},state={f['state']},rev={f['rev']}"
        cases.append(AotCase(f"chunk_fwd[{tag}]", _chunk_fwd_kernel,
                             signature(_chunk_fwd_kernel, ptrs, fwd_c, {"eps": "fp32"}), fwd_c, _opts(cfg)))
        bwd_c = dict(FMAP=f["fmap"], HAS_DECAY=decay, HAS_S0=f["state"], NORMALIZE=f["norm"], HAS_DST=f["state"],
                     REVERSE=f["rev"], DIAG=not f["rev"], ACCUMULATE=f["rev"], **blocks)
        part = t if (D <= 64 and not f["rev"]) else "fp32"
        ptrs = {"q_ptr": t, "k_ptr": t, "v_ptr": t, "lg_ptr": "fp32", "s0_ptr": "fp32", "z0_ptr": "fp32",
                "do_ptr": t, "den_ptr": "fp32", "delta_ptr": "fp32", "dst_ptr": "fp32", "dzt_ptr": "fp32",
                "acc_ptr": "fp32", "dq_ptr": part, "dk_ptr": part, "dv_ptr": t, "ds0_ptr": "fp32", "dz0_ptr": "fp32"}
        cases.append(AotCase(f"chunk_bwd[{tag}]", _chunk_bwd_kernel,
                             signature(_chunk_bwd_kernel, ptrs, bwd_c, {"eps": "fp32"}), bwd_c, _opts(cfg)))
    return cases


def _global_cases(t: str, D: int, fmap: int, norm: bool) -> list[AotCase]:
    cfg = global_config(D, D)
    c = {"FMAP": fmap, "NORMALIZE": norm, "PREC": _prec(_TORCH[t]),
         "BN": cfg["BN"], "BK": cfg["BK"], "BV": cfg["BV"]}
    tag = f"{t},D={D},fmap={fmap},norm={norm}"
    out = []
    for grad in (False, True):
        sc = dict(GRAD=grad, **c)
        ptrs = {"a_ptr": t, "b_ptr": t, "den_ptr": "fp32", "delta_ptr": "fp32", "s_ptr": "fp32", "z_ptr": "fp32"}
        out.append(AotCase(f"global_state[{tag},grad={grad}]", _global_state_kernel,
                           signature(_global_state_kernel, ptrs, sc, {"eps": "fp32"}), sc, _opts(cfg)))
    ptrs = {"q_ptr": t, "s_ptr": "fp32", "z_ptr": "fp32", "o_ptr": t, "den_ptr": "fp32"}
    out.append(AotCase(f"global_out[{tag}]", _global_out_kernel,
                       signature(_global_out_kernel, ptrs, c, {"eps": "fp32"}), c, _opts(cfg)))
    ptrs = {"q_ptr": t, "k_ptr": t, "v_ptr": t, "do_ptr": t, "den_ptr": "fp32", "delta_ptr": "fp32",
            "s_ptr": "fp32", "z_ptr": "fp32", "ds_ptr": "fp32", "dz_ptr": "fp32", "dq_ptr": t, "dk_ptr": t,
            "dv_ptr": t}
    out.append(AotCase(f"global_bwd[{tag}]", _global_bwd_kernel,
                       signature(_global_bwd_kernel, ptrs, c, {"eps": "fp32"}), c, _opts(cfg)))
    return out


def aot_cases():
    """Linear attention (no decay): non-causal kernels and the causal chunk kernels; retention's cases (the same
    chunk kernels with HAS_DECAY) are listed by kernels/retention.py."""
    cases = []
    for t, D in (("bf16", 32), ("bf16", 64), ("fp32", 64), ("bf16", 256)):
        cases += _global_cases(t, D, fmap=1, norm=True)
    cases += _global_cases("bf16", 64, fmap=0, norm=False)
    for t, D in (("bf16", 64), ("fp32", 64), ("bf16", 128), ("bf16", 256)):
        cases += _chunk_cases(t, D, decay=False, flags=[dict(fmap=1, norm=True, state=True, rev=False)])
    cases += _chunk_cases("bf16", 64, decay=False, flags=[dict(fmap=0, norm=False, state=False, rev=False)])
    return cases
