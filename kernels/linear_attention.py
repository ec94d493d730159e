"""Linear attention and retention in Triton: one kernel family for non-causal linear attention (SLAB), causal
chunkwise linear attention, and RetNet/RMT retention (decay γ per head; HAS_DECAY=True).

Notation: q, k: [BH, N, DK]; v, o: [BH, N, DV] (contiguous, BH = B*H flattened); φ the feature map
(FMAP: 0 identity, 1 relu, 2 elu+1) applied to q and k inside the kernels; lg = log2(γ) per head ([H], fp32).
Precision: tl.dot operands in the input dtype (bf16/fp16 tensor cores; fp32 inputs use 3xTF32), accumulation
and every state, normaliser and decay in fp32. Products with the fp32 state S use fp32 operands (TF32) when the
inputs are fp16 (STATE_F32), whose range a long sum could overflow; bf16 has fp32's range.
Tiles: DK and DV are cut into blocks of at most 64 (BK, BV); where a result sums over blocks (DK for outputs,
DV for dq/dk), each program writes a partial sum and the launcher adds them in a fixed order (deterministic).

Non-causal (`_global_*`): S = Σ_n φ(k_n)ᵀ v_n  [DK, DV],  z = Σ_n φ(k_n)  [DK],
    o_n = φ(q_n) S / (φ(q_n)·z + eps)   (the division only when NORMALIZE).
  S is reduced over N in NSPLIT partial sums (one program each), then summed in a fixed order on the host.

Causal (`_chunk_*`), one program per (bh, DV block, DK block) walking the chunks of C positions in order, its
[BK, BV] block of the state in registers:
    o_n = Σ_{m<=n} w(n,m) (φq_n·φk_m) v_m + γ^(n+1) φq_n S0,     w(n,m) = γ^(n-m)  (1 without decay)
    S_N = γ^N S0 + Σ_m γ^(N-1-m) φk_mᵀ v_m       (the recurrent S_n = γ S_{n-1} + φk_nᵀ v_n)
    with NORMALIZE the same for the normaliser z (v_m replaced by 1) and o_n = num_n / (den_n + eps).
  Both terms of o are linear in the DK blocks (φq_n·φk_m is a sum over DK), so a DK block's program computes its
  share of num and den. REVERSE=True runs the same recurrence on the reversed sequence and DIAG=False drops the
  m == n term: RMT's two-sided decay γ^|n-m| is the causal pass plus a strict reverse pass, added as partials.
Offsets inside one head are int32 (the launchers require N * max(DK, DV) < 2**31); head offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import AotCase, TL_DTYPE, empty, next_pow2, signature

FMAPS = {None: 0, "identity": 0, "relu": 1, "elu1": 2}


@triton.jit
def _phi(x, FMAP: tl.constexpr):
    """Feature map of an fp32 tile; NaN propagates (as torch.relu / F.elu do)."""
    if FMAP == 1:
        x = tl.where(x < 0, 0.0, x)
    elif FMAP == 2:
        x = tl.where(x > 0, x + 1.0, tl.exp(x))
    return x


@triton.jit
def _dphi(p, FMAP: tl.constexpr):
    """dφ/dx from p = φ(x), fp32: relu' = [p > 0] (0 at 0 and NaN, as torch); (elu+1)' = 1 if p > 1 else p."""
    p = p.to(tl.float32)
    if FMAP == 1:
        d = tl.where(p > 0, 1.0, 0.0)
    elif FMAP == 2:
        d = tl.where(p > 1, 1.0, p)
    else:
        d = tl.full(p.shape, 1.0, tl.float32)
    return d


@triton.jit
def _load(ptr, rows, mrow, cols, mcol, D):
    """Tile [len(rows), len(cols)] of the row-major [*, D] matrix at ptr, in its dtype, zeros outside."""
    return tl.load(ptr + rows[:, None] * D + cols[None, :], mask=mrow[:, None] & mcol[None, :], other=0.0)


@triton.jit
def _phi_load(ptr, rows, mrow, cols, mcol, D, FMAP: tl.constexpr):
    """φ of a tile, in the input dtype; zero outside the matrix (elu+1 of a padded 0 would be 1)."""
    x = _load(ptr, rows, mrow, cols, mcol, D)
    if FMAP != 0:
        m = mrow[:, None] & mcol[None, :]
        x = tl.where(m, _phi(x.to(tl.float32), FMAP), 0.0).to(ptr.dtype.element_ty)
    return x


@triton.jit
def _sdot(a, b, STATE_F32: tl.constexpr, PREC: tl.constexpr):
    """a @ b where one side is the fp32 state: fp32 (TF32) operands if STATE_F32, else a's dtype."""
    if STATE_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    return tl.dot(a, b.to(a.dtype), input_precision=PREC)


# ---------------------------------------------------------------------------------------------------------------
# non-causal: global state, then outputs




# ---------------------------------------------------------------------------------------------------------------
# non-causal: global state, then outputs


@triton.jit
def _global_state_kernel(
    a_ptr, b_ptr, den_ptr, delta_ptr, s_ptr, z_ptr,
    BH, N, DK, DV, ROWS, NV, eps,
    FMAP: tl.constexpr, GRAD: tl.constexpr, NORMALIZE: tl.constexpr, PREC: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    # Partial sums over rows [split*ROWS, (split+1)*ROWS) of one [BK, BV] block: S = Σ φ(a)ᵀ b' -> s_ptr[split, bh],
    # z = Σ φ(a) w [DK] -> z_ptr[split, bh].  Forward: a = k, b' = v, w = 1.
    # GRAD: a = q, b' = dN = do/(den+eps), w = dD = -delta/(den+eps) (delta = rowsum(do*o)): dS and dz.
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_v = tl.program_id(2) % NV
    pid_k = tl.program_id(2) // NV
    bh = pid_bh.to(tl.int64)
    a_ptr += bh * N * DK
    b_ptr += bh * N * DV
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mk = offs_k < DK
    mv = offs_v < DV
    S = tl.zeros([BK, BV], dtype=tl.float32)
    z = tl.zeros([BK], dtype=tl.float32)
    start = pid_s * ROWS
    for n0 in range(start, tl.minimum(start + ROWS, N), BN):
        rows = n0 + tl.arange(0, BN)
        mr = rows < N
        a = _phi_load(a_ptr, rows, mr, offs_k, mk, DK, FMAP)
        b = _load(b_ptr, rows, mr, offs_v, mv, DV)
        w = tl.where(mr, 1.0, 0.0)
        if GRAD:
            if NORMALIZE:
                inv = 1.0 / (tl.load(den_ptr + bh * N + rows, mask=mr, other=1.0) + eps)
                b = (b.to(tl.float32) * inv[:, None]).to(a.dtype)
                w = -tl.load(delta_ptr + bh * N + rows, mask=mr, other=0.0) * inv
        S += tl.dot(tl.trans(a), b, input_precision=PREC)
        if NORMALIZE:
            z += tl.sum(a.to(tl.float32) * w[:, None], axis=0)
    part = (pid_s * BH + pid_bh).to(tl.int64)
    tl.store(s_ptr + part * DK * DV + offs_k[:, None] * DV + offs_v[None, :], S, mask=mk[:, None] & mv[None, :])
    if NORMALIZE:
        tl.store(z_ptr + part * DK + offs_k, z, mask=mk & (pid_v == 0))


@triton.jit
def _global_out_kernel(
    q_ptr, s_ptr, z_ptr, o_ptr, den_ptr,
    N, DK, DV, eps,
    FMAP: tl.constexpr, NORMALIZE: tl.constexpr, STATE_F32: tl.constexpr, PREC: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    # o = φ(q) S [/ (φ(q)·z + eps)] for BN rows and one DV block, summing over the DK blocks; den = φ(q)·z (fp32,
    # saved for the backward). Also the backward's dv = φ(k) dS (q = k, S = dS, no normalisation).
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_v = tl.program_id(2)
    bh = pid_bh.to(tl.int64)
    q_ptr += bh * N * DK
    rows = pid_n * BN + tl.arange(0, BN)
    mr = rows < N
    offs_v = pid_v * BV + tl.arange(0, BV)
    mv = offs_v < DV
    o = tl.zeros([BN, BV], dtype=tl.float32)
    den = tl.zeros([BN], dtype=tl.float32)
    for k0 in range(0, DK, BK):
        offs_k = k0 + tl.arange(0, BK)
        mk = offs_k < DK
        q = _phi_load(q_ptr, rows, mr, offs_k, mk, DK, FMAP)
        S = tl.load(s_ptr + bh * DK * DV + offs_k[:, None] * DV + offs_v[None, :], mask=mk[:, None] & mv[None, :],
                    other=0.0)
        o += _sdot(q, S, STATE_F32, PREC)
        if NORMALIZE:
            z = tl.load(z_ptr + bh * DK + offs_k, mask=mk, other=0.0)
            den += tl.sum(q.to(tl.float32) * z[None, :], axis=1)
    if NORMALIZE:
        o = o / (den + eps)[:, None]
        tl.store(den_ptr + bh * N + rows, den, mask=mr & (pid_v == 0))
    tl.store(o_ptr + bh * N * DV + rows[:, None] * DV + offs_v[None, :], o.to(o_ptr.dtype.element_ty),
             mask=mr[:, None] & mv[None, :])


@triton.jit
def _global_dqk_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, den_ptr, delta_ptr, s_ptr, z_ptr, ds_ptr, dz_ptr, dq_ptr, dk_ptr,
    N, DK, DV, eps,
    FMAP: tl.constexpr, NORMALIZE: tl.constexpr, STATE_F32: tl.constexpr, PREC: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    # For BN rows and one DK block: dq = (dN Sᵀ + dD zᵀ) φ'(q),  dk = (v dSᵀ + dz) φ'(k), summing over the DV
    # blocks; dN = do/(den+eps), dD = -delta/(den+eps) (NORMALIZE) else dN = do.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_k = tl.program_id(2)
    bh = pid_bh.to(tl.int64)
    rows = pid_n * BN + tl.arange(0, BN)
    mr = rows < N
    offs_k = pid_k * BK + tl.arange(0, BK)
    mk = offs_k < DK
    qk_off = bh * N * DK
    v_off = bh * N * DV
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
        dn = _load(do_ptr + v_off, rows, mr, offs_v, mv, DV)
        if NORMALIZE:
            dn = (dn.to(tl.float32) * inv[:, None]).to(dn.dtype)
        v = _load(v_ptr + v_off, rows, mr, offs_v, mv, DV)
        # Sᵀ, dSᵀ [BV, BK] read transposed from memory
        st_off = bh * DK * DV + offs_v[:, None] + offs_k[None, :] * DV
        stm = mv[:, None] & mk[None, :]
        dq += _sdot(dn, tl.load(s_ptr + st_off, mask=stm, other=0.0), STATE_F32, PREC)
        dk += _sdot(v, tl.load(ds_ptr + st_off, mask=stm, other=0.0), STATE_F32, PREC)
    q = _phi_load(q_ptr + qk_off, rows, mr, offs_k, mk, DK, FMAP)
    k = _phi_load(k_ptr + qk_off, rows, mr, offs_k, mk, DK, FMAP)
    dq = dq * _dphi(q, FMAP)
    dk = dk * _dphi(k, FMAP)
    off = qk_off + rows[:, None] * DK + offs_k[None, :]
    m2 = mr[:, None] & mk[None, :]
    tl.store(dq_ptr + off, dq.to(dq_ptr.dtype.element_ty), mask=m2)
    tl.store(dk_ptr + off, dk.to(dk_ptr.dtype.element_ty), mask=m2)


# ---------------------------------------------------------------------------------------------------------------
# causal: chunkwise parallel, state carried across chunks


@triton.jit
def _chunk_decays(lg, t0, N, C: tl.constexpr, HAS_DECAY: tl.constexpr, DIAG: tl.constexpr):
    """For the chunk of positions [t0, t0+C): the causal mask [C, C], intra-chunk weights w [C, C] (γ^(i-j), used
    on the mask only; 1 without decay), query decay γ^(i+1) [C], key decay γ^(L-1-j) [C] (zero past the end),
    chunk decay γ^L, L = valid length. Scores are masked with tl.where, not multiplied by 0: a NaN in a later
    key stays out of earlier rows."""
    i = tl.arange(0, C)
    L = tl.minimum(N - t0, C)
    diff = i[:, None] - i[None, :]
    causal = (diff >= 0) if DIAG else (diff > 0)
    if HAS_DECAY:
        w = tl.exp2(diff.to(tl.float32) * lg)  # meaningful on the mask only (inf above it when γ ~ 0)
        dq = tl.exp2((i + 1).to(tl.float32) * lg)
        dk = tl.where(i < L, tl.exp2(tl.where(i < L, L - 1 - i, 0).to(tl.float32) * lg), 0.0)
        dc = tl.exp2(L.to(tl.float32) * lg)
    else:
        w = 1.0
        dq = tl.full([C], 1.0, tl.float32)
        dk = tl.where(i < L, 1.0, 0.0)
        dc = 1.0
    return causal, w, dq, dk, dc


@triton.jit
def _scale_rows(x, s, HAS_DECAY: tl.constexpr):
    """x * s[:, None] in x's dtype (a no-op without decay: x is already zero past the end)."""
    if HAS_DECAY:
        x = (x.to(tl.float32) * s[:, None]).to(x.dtype)
    return x


@triton.jit
def _chunk_rows(c, N, C: tl.constexpr, REVERSE: tl.constexpr):
    """Kernel times t of chunk c, their mask, and the memory rows they read (reversed with REVERSE)."""
    t = c * C + tl.arange(0, C)
    rows = t
    if REVERSE:
        rows = N - 1 - t
    return t, t < N, rows


@triton.jit
def _chunk_fwd_kernel(
    q_ptr, k_ptr, v_ptr, lg_ptr, s0_ptr, z0_ptr,
    o_ptr, den_ptr, st_ptr, zt_ptr,
    BH, H, N, DK, DV, NC, PART, eps,
    FMAP: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_S0: tl.constexpr, NORMALIZE: tl.constexpr,
    STORE_STATE: tl.constexpr, REVERSE: tl.constexpr, DIAG: tl.constexpr, SPLIT: tl.constexpr,
    STATE_F32: tl.constexpr, PREC: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    # SPLIT: o_ptr / den_ptr are fp32 partial sums [P, BH, N, DV] / [P, BH, N]; this program writes its DK block's
    # share of num (undivided) and den into partial PART + pid_k. Else o = num / (den + eps) directly.
    pid_bh = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid_k = tl.program_id(2)
    bh = pid_bh.to(tl.int64)
    q_ptr += bh * N * DK
    k_ptr += bh * N * DK
    v_ptr += bh * N * DV
    part = bh
    if SPLIT:
        part = (PART + pid_k).to(tl.int64) * BH + bh
    o_ptr += part * N * DV
    den_ptr += part * N
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mk = offs_k < DK
    mv = offs_v < DV
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
        t, mt, rows = _chunk_rows(c, N, C, REVERSE)
        q = _phi_load(q_ptr, rows, mt, offs_k, mk, DK, FMAP)
        k = _phi_load(k_ptr, rows, mt, offs_k, mk, DK, FMAP)
        v = _load(v_ptr, rows, mt, offs_v, mv, DV)
        cm, w, dq, dk, dc = _chunk_decays(lg, c * C, N, C, HAS_DECAY, DIAG)
        A = tl.where(cm, tl.dot(q, tl.trans(k), input_precision=PREC) * w, 0.0)
        o = tl.dot(A.to(v.dtype), v, input_precision=PREC) + _sdot(q, S, STATE_F32, PREC) * dq[:, None]
        if NORMALIZE:
            den = tl.sum(A, axis=1) + tl.sum(q.to(tl.float32) * z[None, :], axis=1) * dq
            if not SPLIT:
                o = o / (den + eps)[:, None]
            tl.store(den_ptr + rows, den, mask=mt & (pid_v == 0))
        tl.store(o_ptr + rows[:, None] * DV + offs_v[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=mt[:, None] & mv[None, :])
        kd = _scale_rows(k, dk, HAS_DECAY)
        S = S * dc + tl.dot(tl.trans(kd), v, input_precision=PREC)
        if NORMALIZE:
            z = z * dc + tl.sum(k.to(tl.float32) * dk[:, None], axis=0)
    if STORE_STATE:
        tl.store(st_ptr + soff, S, mask=sm)
        if NORMALIZE:
            tl.store(zt_ptr + bh * DK + offs_k, z, mask=mk & (pid_v == 0))


@triton.jit
def _chunk_dn(do_ptr, den_ptr, delta_ptr, rows, mt, offs_v, mv, DV, eps, first_v, NORMALIZE: tl.constexpr):
    """dO tile and, with NORMALIZE, dN = dO/(den+eps) (input dtype), 1/(den+eps) and dD = -delta/(den+eps)
    (fp32 [C]; dD only in the first DV block's programs, so that it enters the dq/dk partial sums once)."""
    do = _load(do_ptr, rows, mt, offs_v, mv, DV)
    if NORMALIZE:
        inv = 1.0 / (tl.load(den_ptr + rows, mask=mt, other=1.0) + eps)
        dd = -tl.load(delta_ptr + rows, mask=mt, other=0.0) * inv * first_v
        dn = (do.to(tl.float32) * inv[:, None]).to(do.dtype)
    else:
        inv = tl.full([do.shape[0]], 1.0, tl.float32)
        dd = tl.zeros([do.shape[0]], tl.float32)
        dn = do
    return do, dn, inv, dd


@triton.jit
def _chunk_bwd_kernel(
    q_ptr, k_ptr, v_ptr, lg_ptr, s0_ptr, z0_ptr, do_ptr, den_ptr, delta_ptr, dst_ptr, dzt_ptr,
    dq_ptr, dk_ptr, dv_ptr, ds0_ptr, dz0_ptr,
    BH, H, N, DK, DV, NC, QPART, VPART, eps,
    FMAP: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_S0: tl.constexpr, NORMALIZE: tl.constexpr,
    HAS_DST: tl.constexpr, REVERSE: tl.constexpr, DIAG: tl.constexpr,
    STATE_F32: tl.constexpr, PREC: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    # Partial sums: dq, dk over the DV blocks -> dq_ptr/dk_ptr[QPART + pid_v] ([P, BH, N, DK]); dv over the DK
    # blocks -> dv_ptr[VPART + pid_k] ([P', BH, N, DV]). ds0 [BH, DK, DV] and dz0 [BH, DK] block by block.
    pid_bh = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid_k = tl.program_id(2)
    bh = pid_bh.to(tl.int64)
    q_ptr += bh * N * DK
    k_ptr += bh * N * DK
    v_ptr += bh * N * DV
    do_ptr += bh * N * DV
    den_ptr += bh * N
    delta_ptr += bh * N
    dq_ptr += ((QPART + pid_v).to(tl.int64) * BH + bh) * N * DK
    dk_ptr += ((QPART + pid_v).to(tl.int64) * BH + bh) * N * DK
    dv_ptr += ((VPART + pid_k).to(tl.int64) * BH + bh) * N * DV
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mk = offs_k < DK
    mv = offs_v < DV
    lg = 0.0
    if HAS_DECAY:
        lg = tl.load(lg_ptr + pid_bh % H)
    soff = bh * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
    sm = mk[:, None] & mv[None, :]
    first_v = (pid_v == 0).to(tl.float32)

    # forward sweep: dq = (G ⊙ w) k + γ^(i+1) (dN Sᵀ + dD zᵀ), G = dN vᵀ + dD, S the state before the chunk
    S = tl.zeros([BK, BV], dtype=tl.float32)
    z = tl.zeros([BK], dtype=tl.float32)
    if HAS_S0:
        S += tl.load(s0_ptr + soff, mask=sm, other=0.0)
        if NORMALIZE:
            z += tl.load(z0_ptr + bh * DK + offs_k, mask=mk, other=0.0)
    for c in range(0, NC):
        t, mt, rows = _chunk_rows(c, N, C, REVERSE)
        k = _phi_load(k_ptr, rows, mt, offs_k, mk, DK, FMAP)
        v = _load(v_ptr, rows, mt, offs_v, mv, DV)
        do, dn, inv, dd = _chunk_dn(do_ptr, den_ptr, delta_ptr, rows, mt, offs_v, mv, DV, eps, first_v, NORMALIZE)
        cm, w, dqd, dkd, dc = _chunk_decays(lg, c * C, N, C, HAS_DECAY, DIAG)
        G = tl.where(cm, (tl.dot(do, tl.trans(v), input_precision=PREC) * inv[:, None] + dd[:, None]) * w, 0.0)
        dq = tl.dot(G.to(k.dtype), k, input_precision=PREC) + _sdot(dn, tl.trans(S), STATE_F32, PREC) * dqd[:, None]
        if NORMALIZE:
            dq += (dd * dqd)[:, None] * z[None, :]
        q = _phi_load(q_ptr, rows, mt, offs_k, mk, DK, FMAP)
        dq = dq * _dphi(q, FMAP)
        tl.store(dq_ptr + rows[:, None] * DK + offs_k[None, :], dq.to(dq_ptr.dtype.element_ty),
                 mask=mt[:, None] & mk[None, :])
        kd = _scale_rows(k, dkd, HAS_DECAY)
        S = S * dc + tl.dot(tl.trans(kd), v, input_precision=PREC)
        if NORMALIZE:
            z = z * dc + tl.sum(k.to(tl.float32) * dkd[:, None], axis=0)

    # reverse sweep: dS, dz = gradient of the state after the current chunk
    dS = tl.zeros([BK, BV], dtype=tl.float32)
    dz = tl.zeros([BK], dtype=tl.float32)
    if HAS_DST:
        dS += tl.load(dst_ptr + soff, mask=sm, other=0.0)
        if NORMALIZE:
            dz += tl.load(dzt_ptr + bh * DK + offs_k, mask=mk, other=0.0) * first_v
    for cc in range(0, NC):
        c = NC - 1 - cc
        t, mt, rows = _chunk_rows(c, N, C, REVERSE)
        q = _phi_load(q_ptr, rows, mt, offs_k, mk, DK, FMAP)
        k = _phi_load(k_ptr, rows, mt, offs_k, mk, DK, FMAP)
        v = _load(v_ptr, rows, mt, offs_v, mv, DV)
        do, dn, inv, dd = _chunk_dn(do_ptr, den_ptr, delta_ptr, rows, mt, offs_v, mv, DV, eps, first_v, NORMALIZE)
        cm, w, dqd, dkd, dc = _chunk_decays(lg, c * C, N, C, HAS_DECAY, DIAG)
        G = tl.where(cm, (tl.dot(do, tl.trans(v), input_precision=PREC) * inv[:, None] + dd[:, None]) * w, 0.0)
        dk = tl.dot(tl.trans(G.to(q.dtype)), q, input_precision=PREC)
        dk += _sdot(v, tl.trans(dS), STATE_F32, PREC) * dkd[:, None]
        if NORMALIZE:
            dk += dkd[:, None] * dz[None, :]
        dk = dk * _dphi(k, FMAP)
        tl.store(dk_ptr + rows[:, None] * DK + offs_k[None, :], dk.to(dk_ptr.dtype.element_ty),
                 mask=mt[:, None] & mk[None, :])
        A = tl.where(cm, tl.dot(q, tl.trans(k), input_precision=PREC) * w, 0.0)
        kd = _scale_rows(k, dkd, HAS_DECAY)
        dv = tl.dot(tl.trans(A.to(dn.dtype)), dn, input_precision=PREC) + _sdot(kd, dS, STATE_F32, PREC)
        tl.store(dv_ptr + rows[:, None] * DV + offs_v[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=mt[:, None] & mv[None, :])
        qd = _scale_rows(q, dqd, HAS_DECAY)
        dS = dS * dc + tl.dot(tl.trans(qd), dn, input_precision=PREC)
        if NORMALIZE:
            dz = dz * dc + tl.sum(q.to(tl.float32) * (dqd * dd)[:, None], axis=0)
    if HAS_S0:
        tl.store(ds0_ptr + soff, dS, mask=sm)
        if NORMALIZE:
            tl.store(dz0_ptr + bh * DK + offs_k, dz, mask=mk & (pid_v == 0))


# ---------------------------------------------------------------------------------------------------------------
# launch configuration (fixed heuristics, no autotuning: aot_cases() lists every configuration)

_TARGET_PROGRAMS = 512     # non-causal state pass: split N until about this many programs (fixed: deterministic)


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs: 3xTF32 (about fp32 accuracy on tensor cores); 16-bit operands ignore the setting
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _state_f32(dtype: torch.dtype) -> bool:
    return dtype != torch.bfloat16


def _block(D: int, cap: int) -> int:
    return max(16, min(cap, next_pow2(D)))


def chunk_config(DK: int, DV: int, dtype: torch.dtype, bwd: bool) -> dict:
    """Chunk length C and the [BK, BV] state block per dtype: the largest tiles with which no configuration spills
    registers on sm_90 (see aot_cases). fp16 keeps fp32 state operands; fp32 runs 3xTF32 (three times the
    operand registers)."""
    if dtype == torch.float32:
        C, bk, bv = 16, (16 if bwd else 32), 32
    elif dtype == torch.float16:
        C, bk, bv = 32, 64, (32 if bwd else 64)
    else:
        C, bk, bv = (32 if bwd else 64), 64, 64
    return {"C": C, "BK": _block(DK, bk), "BV": _block(DV, bv), "num_warps": 8, "num_stages": 1}


def global_config(DK: int, DV: int, dtype: torch.dtype) -> dict:
    cap = 32 if dtype == torch.float32 else 64
    BN = 32 if dtype == torch.float16 else 64
    return {"BN": BN, "BK": _block(DK, cap), "BV": _block(DV, cap), "num_warps": 8, "num_stages": 1}


def _launch(cfg: dict) -> dict:
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def _splits(N: int, BN: int, programs: int) -> tuple[int, int]:
    """(number of N splits, rows per split) for the non-causal state pass."""
    n_blocks = triton.cdiv(N, BN)
    nsplit = max(1, min(n_blocks, _TARGET_PROGRAMS // max(1, programs)))
    rows = triton.cdiv(n_blocks, nsplit) * BN
    return triton.cdiv(N, rows), rows


def _global_state(a, b, den, delta, fmap, normalize, grad, eps, cfg):
    """Σ_n φ(a_n)ᵀ b'_n [B, H, DK, DV] and Σ_n φ(a_n) w_n [B, H, DK] (fp32; see _global_state_kernel)."""
    B, H, N, DK = a.shape
    DV = b.shape[-1]
    BH = B * H
    BN, BK, BV = cfg["BN"], cfg["BK"], cfg["BV"]
    NV, NK = triton.cdiv(DV, BV), triton.cdiv(DK, BK)
    nsplit, rows = _splits(N, BN, BH * NV * NK)
    s_part = empty((nsplit, B, H, DK, DV), dtype=torch.float32, device=a.device)
    z_part = empty((nsplit, B, H, DK), dtype=torch.float32, device=a.device) if normalize else s_part
    _global_state_kernel[(nsplit, BH, NV * NK)](
        a, b, den if den is not None else a, delta if delta is not None else a, s_part, z_part,
        BH, N, DK, DV, rows, NV, eps, FMAP=fmap, GRAD=grad, NORMALIZE=normalize, PREC=_prec(a.dtype),
        BN=BN, BK=BK, BV=BV, **_launch(cfg))
    # fixed-order reductions: deterministic
    return s_part.sum(0), (z_part.sum(0) if normalize else None)


def _global_out(q, S, z, fmap, normalize, eps, cfg, den=None):
    B, H, N, DK = q.shape
    DV = S.shape[-1]
    o = empty((B, H, N, DV), dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(N, cfg["BN"]), B * H, triton.cdiv(DV, cfg["BV"]))
    _global_out_kernel[grid](q, S, z if z is not None else S, o, den if den is not None else o, N, DK, DV, eps,
                             FMAP=fmap, NORMALIZE=normalize, STATE_F32=_state_f32(q.dtype), PREC=_prec(q.dtype),
                             BN=cfg["BN"], BK=cfg["BK"], BV=cfg["BV"], **_launch(cfg))
    return o


def global_fwd(q, k, v, fmap: int, normalize: bool, eps: float):
    """Non-causal. q, k: [B, H, N, DK]; v: [B, H, N, DV] (contiguous). Returns o [B, H, N, DV] (q's dtype),
    den [B, H, N] fp32 (φq·z; zeros if not normalize), S [B, H, DK, DV] fp32, z [B, H, DK] fp32."""
    B, H, N, DK = q.shape
    DV = v.shape[-1]
    dev = q.device
    den = empty((B, H, N), dtype=torch.float32, device=dev)
    if B * H * N * DK * DV == 0:
        return (torch.zeros(B, H, N, DV, dtype=q.dtype, device=dev), den.zero_(),
                torch.zeros(B, H, DK, DV, device=dev), torch.zeros(B, H, DK, device=dev))
    cfg = global_config(DK, DV, q.dtype)
    S, z = _global_state(k, v, None, None, fmap, normalize, False, eps, cfg)
    if not normalize:
        z = torch.zeros(B, H, DK, device=dev)
        den.zero_()
    o = _global_out(q, S, z, fmap, normalize, eps, cfg, den)
    return o, den, S, z


def global_bwd(do, q, k, v, o, den, S, z, fmap: int, normalize: bool, eps: float):
    """Gradients of global_fwd: (dq, dk, dv) in the inputs' dtype."""
    B, H, N, DK = q.shape
    DV = v.shape[-1]
    BH = B * H
    if BH * N * DK * DV == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    cfg = global_config(DK, DV, q.dtype)
    delta = (do.float() * o.float()).sum(-1) if normalize else None  # rowsum(do * o) [B, H, N]
    dS, dz = _global_state(q, do, den, delta, fmap, normalize, True, eps, cfg)
    dq, dk = empty(q.shape, dtype=q.dtype, device=q.device), empty(k.shape, dtype=k.dtype, device=k.device)
    grid = (triton.cdiv(N, cfg["BN"]), BH, triton.cdiv(DK, cfg["BK"]))
    _global_dqk_kernel[grid](q, k, v, do, den, delta if normalize else den, S, z, dS, dz if normalize else z,
                             dq, dk, N, DK, DV, eps, FMAP=fmap, NORMALIZE=normalize,
                             STATE_F32=_state_f32(q.dtype), PREC=_prec(q.dtype),
                             BN=cfg["BN"], BK=cfg["BK"], BV=cfg["BV"], **_launch(cfg))
    dv = _global_out(k, dS, None, fmap, False, eps, cfg)  # dv = φ(k) dS
    return dq, dk, dv


def _chunk_kw(q, v, lg, fmap, normalize, bwd):
    cfg = chunk_config(q.shape[-1], v.shape[-1], q.dtype, bwd)
    kw = dict(FMAP=fmap, HAS_DECAY=lg is not None, NORMALIZE=normalize, STATE_F32=_state_f32(q.dtype),
              PREC=_prec(q.dtype), C=cfg["C"], BK=cfg["BK"], BV=cfg["BV"], **_launch(cfg))
    NV = triton.cdiv(v.shape[-1], cfg["BV"])
    NK = triton.cdiv(q.shape[-1], cfg["BK"])
    NC = triton.cdiv(q.shape[2], cfg["C"])
    return kw, NV, NK, NC


def chunk_fwd(q, k, v, lg, s0, z0, fmap: int, normalize: bool, eps: float, two_sided: bool, store_state: bool):
    """Causal (or, with two_sided, RMT's γ^|n-m|) chunkwise linear attention / retention.

    q, k: [B, H, N, DK]; v: [B, H, N, DV]; lg: [H] fp32 log2(γ) or None (no decay); s0: [B, H, DK, DV] fp32 or
    None; z0: [B, H, DK] fp32 or None (normalize only). Returns o [B, H, N, DV] (q's dtype), den [B, H, N] fp32,
    S_N [B, H, DK, DV] fp32 and z_N [B, H, DK] fp32 (empty unless normalize / store_state)."""
    B, H, N, DK = q.shape
    DV = v.shape[-1]
    BH = B * H
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    st = empty((B, H, DK, DV), **f32) if store_state else torch.zeros(0, **f32)
    zt = empty((B, H, DK), **f32) if store_state and normalize else torch.zeros(0, **f32)
    if BH * N * DK * DV == 0:  # nothing to attend: zeros, and the state passes through (decayed by γ^0 = 1)
        if store_state:
            st.copy_(s0) if s0 is not None else st.zero_()
            if normalize:
                zt.copy_(z0) if z0 is not None else zt.zero_()
        den = torch.zeros(B, H, N, **f32) if normalize else torch.zeros(0, **f32)
        return torch.zeros(B, H, N, DV, dtype=q.dtype, device=dev), den, st, zt
    kw, NV, NK, NC = _chunk_kw(q, v, lg, fmap, normalize, bwd=False)
    n_dir = 2 if two_sided else 1
    P = n_dir * NK  # partial sums of o over DK blocks and directions
    if P == 1:
        o = empty((B, H, N, DV), dtype=q.dtype, device=dev)
        den = empty((B, H, N), **f32) if normalize else torch.zeros(0, **f32)
    else:
        o = empty((P, B, H, N, DV), **f32)
        den = empty((P, B, H, N), **f32) if normalize else torch.zeros(0, **f32)
    dummy = st
    lg = lg if lg is not None else dummy
    for d in range(n_dir):  # d = 1: the strictly later positions, decayed by γ^(m-n) (reversed recurrence)
        has_s0 = s0 is not None and d == 0
        _chunk_fwd_kernel[(BH, NV, NK)](
            q, k, v, lg, s0 if has_s0 else dummy, z0 if (has_s0 and normalize) else dummy, o,
            den if normalize else dummy, st, zt, BH, H, N, DK, DV, NC, d * NK, eps, HAS_S0=has_s0,
            STORE_STATE=store_state and d == 0, REVERSE=d == 1, DIAG=d == 0, SPLIT=P > 1, **kw)
    if P > 1:  # fixed-order sums over the partials: deterministic
        num = o.sum(0)
        if normalize:
            den = den.sum(0)
            num = num / (den + eps)[..., None]
        o = num.to(q.dtype)
    return o, den, st, zt


def chunk_bwd(do, dst, dzt, q, k, v, lg, s0, z0, o, den, fmap: int, normalize: bool, eps: float, two_sided: bool):
    """Gradients of chunk_fwd. do: [B, H, N, DV]; dst: [B, H, DK, DV] fp32 or None (gradient of the final state);
    dzt: [B, H, DK] fp32 or None. Returns dq, dk, dv (inputs' dtype), ds0 [B, H, DK, DV] fp32 or None,
    dz0 [B, H, DK] fp32 or None."""
    B, H, N, DK = q.shape
    DV = v.shape[-1]
    BH = B * H
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    has_s0 = s0 is not None
    ds0 = empty((B, H, DK, DV), **f32) if has_s0 else None
    dz0 = empty((B, H, DK), **f32) if has_s0 and normalize else None
    if BH * N * DK * DV == 0:  # the final state is the initial state: its gradient passes through
        for d, g in ((ds0, dst), (dz0, dzt)):
            if d is not None:
                d.copy_(g) if g is not None else d.zero_()
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), ds0, dz0
    kw, NV, NK, NC = _chunk_kw(q, v, lg, fmap, normalize, bwd=True)
    n_dir = 2 if two_sided else 1
    PQ, PV = n_dir * NV, n_dir * NK  # partial sums of dq, dk (over DV blocks) and dv (over DK blocks)
    dq_part = empty((PQ, B, H, N, DK), dtype=q.dtype if PQ == 1 else torch.float32, device=dev)
    dk_part = empty((PQ, B, H, N, DK), dtype=k.dtype if PQ == 1 else torch.float32, device=dev)
    dv_part = empty((PV, B, H, N, DV), dtype=v.dtype if PV == 1 else torch.float32, device=dev)
    delta = (do.float() * o.float()).sum(-1) if normalize else None  # rowsum(do * o) [B, H, N]
    dummy = dv_part
    lg = lg if lg is not None else dummy
    for d in range(n_dir):
        first = d == 0
        _chunk_bwd_kernel[(BH, NV, NK)](
            q, k, v, lg, s0 if has_s0 and first else dummy, z0 if dz0 is not None and first else dummy, do,
            den if normalize else dummy, delta if normalize else dummy, dst if dst is not None and first else dummy,
            dzt if (dzt is not None and normalize and first) else dummy, dq_part, dk_part, dv_part,
            ds0 if has_s0 and first else dummy, dz0 if dz0 is not None and first else dummy,
            BH, H, N, DK, DV, NC, d * NV, d * NK, eps, HAS_S0=has_s0 and first, HAS_DST=dst is not None and first,
            REVERSE=not first, DIAG=first, **kw)

    def total(part, dtype):  # fixed-order sums over the partials: deterministic
        return part[0] if part.shape[0] == 1 else part.sum(0).to(dtype)
    return total(dq_part, q.dtype), total(dk_part, k.dtype), total(dv_part, v.dtype), ds0, dz0


# ---------------------------------------------------------------------------------------------------------------
# ahead-of-time compile cases (CI compiles each for sm_90; see kernels/common.py)

_TORCH = {v: k for k, v in TL_DTYPE.items()}


def chunk_cases(t: str, D: int, decay: bool, fmap: int, norm: bool, state: bool, two_sided: bool) -> list[AotCase]:
    """The chunk kernels a launcher call with these arguments compiles (two_sided: also the reverse pass)."""
    dt = _TORCH[t]
    fl = {"PREC": _prec(dt), "STATE_F32": _state_f32(dt)}
    cases = []
    for d in range(2 if two_sided else 1):
        first = d == 0
        tag = f"{t},D={D},decay={decay},fmap={fmap},norm={norm},state={state},rev={not first}"
        cfg = chunk_config(D, D, dt, bwd=False)
        P = (2 if two_sided else 1) * triton.cdiv(D, cfg["BK"])
        c = dict(FMAP=fmap, HAS_DECAY=decay, HAS_S0=state and first, NORMALIZE=norm, STORE_STATE=state and first,
                 REVERSE=not first, DIAG=first, SPLIT=P > 1, C=cfg["C"], BK=cfg["BK"], BV=cfg["BV"], **fl)
        out_t = "fp32" if P > 1 else t
        ptrs = {"q_ptr": t, "k_ptr": t, "v_ptr": t, "lg_ptr": "fp32", "s0_ptr": "fp32", "z0_ptr": "fp32",
                "o_ptr": out_t, "den_ptr": "fp32", "st_ptr": "fp32", "zt_ptr": "fp32"}
        cases.append(AotCase(f"chunk_fwd[{tag}]", _chunk_fwd_kernel,
                             signature(_chunk_fwd_kernel, ptrs, c, {"eps": "fp32"}), c, _launch(cfg)))
        cfg = chunk_config(D, D, dt, bwd=True)
        n = 2 if two_sided else 1
        pq = t if n * triton.cdiv(D, cfg["BV"]) == 1 else "fp32"
        pv = t if n * triton.cdiv(D, cfg["BK"]) == 1 else "fp32"
        c = dict(FMAP=fmap, HAS_DECAY=decay, HAS_S0=state and first, NORMALIZE=norm, HAS_DST=state and first,
                 REVERSE=not first, DIAG=first, C=cfg["C"], BK=cfg["BK"], BV=cfg["BV"], **fl)
        ptrs = {"q_ptr": t, "k_ptr": t, "v_ptr": t, "lg_ptr": "fp32", "s0_ptr": "fp32", "z0_ptr": "fp32",
                "do_ptr": t, "den_ptr": "fp32", "delta_ptr": "fp32", "dst_ptr": "fp32", "dzt_ptr": "fp32",
                "dq_ptr": pq, "dk_ptr": pq, "dv_ptr": pv, "ds0_ptr": "fp32", "dz0_ptr": "fp32"}
        cases.append(AotCase(f"chunk_bwd[{tag}]", _chunk_bwd_kernel,
                             signature(_chunk_bwd_kernel, ptrs, c, {"eps": "fp32"}), c, _launch(cfg)))
    return cases


def global_cases(t: str, D: int, fmap: int, norm: bool) -> list[AotCase]:
    dt = _TORCH[t]
    cfg = global_config(D, D, dt)
    blocks = {"BN": cfg["BN"], "BK": cfg["BK"], "BV": cfg["BV"], "PREC": _prec(dt)}
    tag = f"{t},D={D},fmap={fmap},norm={norm}"
    out = []
    for grad in (False, True):
        c = dict(FMAP=fmap, GRAD=grad, NORMALIZE=norm, **blocks)
        ptrs = {"a_ptr": t, "b_ptr": t, "den_ptr": "fp32", "delta_ptr": "fp32", "s_ptr": "fp32", "z_ptr": "fp32"}
        out.append(AotCase(f"global_state[{tag},grad={grad}]", _global_state_kernel,
                           signature(_global_state_kernel, ptrs, c, {"eps": "fp32"}), c, _launch(cfg)))
    for norm_out in ((norm, False) if norm else (False,)):  # the output pass, and dv = φ(k) dS
        c = dict(FMAP=fmap, NORMALIZE=norm_out, STATE_F32=_state_f32(dt), **blocks)
        ptrs = {"q_ptr": t, "s_ptr": "fp32", "z_ptr": "fp32", "o_ptr": t, "den_ptr": "fp32"}
        out.append(AotCase(f"global_out[{tag},normalize={norm_out}]", _global_out_kernel,
                           signature(_global_out_kernel, ptrs, c, {"eps": "fp32"}), c, _launch(cfg)))
    c = dict(FMAP=fmap, NORMALIZE=norm, STATE_F32=_state_f32(dt), **blocks)
    ptrs = {"q_ptr": t, "k_ptr": t, "v_ptr": t, "do_ptr": t, "den_ptr": "fp32", "delta_ptr": "fp32",
            "s_ptr": "fp32", "z_ptr": "fp32", "ds_ptr": "fp32", "dz_ptr": "fp32", "dq_ptr": t, "dk_ptr": t}
    out.append(AotCase(f"global_dqk[{tag}]", _global_dqk_kernel,
                       signature(_global_dqk_kernel, ptrs, c, {"eps": "fp32"}), c, _launch(cfg)))
    return out


def aot_cases():
    """Linear attention (no decay): the non-causal kernels and the causal chunk kernels at the head dims and dtypes
    that pick distinct tile shapes; retention's cases (the chunk kernels with HAS_DECAY) are in kernels/retention.py."""
    cases = []
    for t, D in (("bf16", 32), ("bf16", 64), ("fp16", 64), ("fp32", 64), ("bf16", 256)):
        cases += global_cases(t, D, fmap=1, norm=True)
    cases += global_cases("bf16", 64, fmap=2, norm=False)
    for t, D in (("bf16", 64), ("fp16", 64), ("fp32", 64), ("bf16", 256)):
        cases += chunk_cases(t, D, decay=False, fmap=1, norm=True, state=True, two_sided=False)
    cases += chunk_cases("bf16", 64, decay=False, fmap=0, norm=False, state=False, two_sided=False)
    return cases
