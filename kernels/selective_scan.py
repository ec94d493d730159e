"""Mamba's selective scan in Triton, forward and backward (see fastlayers.reference.selective_scan).

Notation: u, delta, z, out: [B, D, L] contiguous; A: [D, N] fp32; B, C: fixed [D, N] fp32 or variable
[B, G, N, L] in u's dtype (G = 1 for [B, N, L]); D, delta_bias: [D] fp32; states [B, D, N] fp32.

One program owns (batch b, group g, a block of KC channels of that group) and walks the sequence in sub-chunks of
T time steps; the state h [KC, N] stays in registers. Inside a sub-chunk the recurrence h_t = a_t h_{t-1} + b_t
(a_t = exp(dt_t A), b_t = dt_t B_t u_t) is a parallel scan over the [KC, N, T] tile (tl.associative_scan of the
(a, b) pairs, log2(T) steps across lanes instead of T dependent steps), and the sub-chunk's last column is the
carry. The forward stores the state at the start of every segment of M sub-chunks (`chk`, [B, D, n_chk, N]); the
backward walks the segments in reverse: it recomputes the segment's sub-chunk start states into a small scratch
buffer, then for each sub-chunk in reverse recomputes h and runs the adjoint recurrence
    g_t = C_t dy_t + a_{t+1} g_{t+1}        (g = dL/dh, a reverse associative scan)
so no per-step state is ever stored. Sums over channels (dB, dC when input-dependent) are written as per-program
partial slices and summed on the host in a fixed order; sums over time (dA, D, delta_bias, fixed B/C) are kept in
registers and written per (b, d): every gradient is deterministic, no atomics.
Padded time steps (t >= L) get dt = 0, i.e. a = 1 and b = 0: the state passes through them unchanged.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import AotCase, empty, next_pow2, signature


@triton.jit
def _lin_combine(a1, b1, a2, b2):
    # (a1, b1) followed by (a2, b2): x -> a2 * (a1 * x + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    # log(1 + e^x) without overflow and with log1p accuracy for small e^-|x| (torch: linear above 20)
    e = tl.exp(-tl.abs(x))
    w = 1.0 + e
    lp = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + lp)


@triton.jit
def _dt_tile(delta_ptr, off2, m2, bias, SOFTPLUS: tl.constexpr):
    """delta + bias (softplus'd) on a [KC, T] tile, 0 where masked; also returns the pre-softplus value."""
    raw = tl.load(delta_ptr + off2, mask=m2, other=0.0).to(tl.float32) + bias[:, None]
    dt = _softplus(raw) if SOFTPLUS else raw
    return tl.where(m2, dt, 0.0), raw


@triton.jit
def _bc_tile(ptr, bg_off, offs_n, mask_n, t, mask_t, L):
    """Variable B or C: the [NP, T] tile of row (b, g) at times t (fp32, 0 where masked)."""
    p = ptr + bg_off + offs_n.to(tl.int64)[:, None] * L + t[None, :]
    return tl.load(p, mask=mask_n[:, None] & mask_t[None, :], other=0.0).to(tl.float32)


@triton.jit
def _sub_chunk(u_ptr, delta_ptr, B_ptr, row, bg_off, offs_n, mask_n, mask_k, t, L, A, bias, Bf, h0,
               VAR_B: tl.constexpr, SOFTPLUS: tl.constexpr):
    """One sub-chunk at times t: returns u, dt, raw dt (before softplus) [KC, T]; a, b, h [KC, NP, T] (h_t for
    every t, from h0 = the state before the sub-chunk); B broadcastable to [KC, NP, T]; the mask and offsets of
    the [KC, T] tile."""
    mask_t = t < L
    m2 = mask_k[:, None] & mask_t[None, :]
    off2 = row[:, None] + t[None, :]
    u = tl.load(u_ptr + off2, mask=m2, other=0.0).to(tl.float32)
    dt, raw = _dt_tile(delta_ptr, off2, m2, bias, SOFTPLUS)
    a = tl.exp(dt[:, None, :] * A[:, :, None])
    if VAR_B:
        Bv = _bc_tile(B_ptr, bg_off, offs_n, mask_n, t, mask_t, L)[None, :, :]
    else:
        Bv = Bf[:, :, None]
    # padded state rows (n >= N) get b = 0, not 0 * u: an Inf in u must not turn them into NaN (they are summed)
    b = tl.where(mask_n[None, :, None], (dt * u)[:, None, :] * Bv, 0.0)
    pa, pb = tl.associative_scan((a, b), 2, _lin_combine)
    h = pa * h0[:, :, None] + pb
    return u, dt, raw, a, b, h, Bv, m2, off2


@triton.jit
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, init_ptr, out_ptr, last_ptr, chk_ptr,
    Dm, L, N, H, G, M, n_chk,
    VAR_B: tl.constexpr, VAR_C: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
    KC: tl.constexpr, NP: tl.constexpr, T: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_g = tl.program_id(1)
    pid_b = tl.program_id(2)
    ch = pid_c * KC + tl.arange(0, KC)                 # channels within the group
    mask_k = ch < H
    d = pid_g * H + ch
    offs_n = tl.arange(0, NP)
    mask_n = offs_n < N
    offs_t = tl.arange(0, T)
    mkn = mask_k[:, None] & mask_n[None, :]
    dn = d.to(tl.int64)[:, None] * N + offs_n[None, :]              # [KC, NP] into [D, N]
    bdn = pid_b.to(tl.int64) * Dm * N + dn                           # [KC, NP] into [B, D, N]
    row = (pid_b.to(tl.int64) * Dm + d) * L                          # [KC] row starts of [B, D, L]
    bg_off = (pid_b.to(tl.int64) * G + pid_g) * N * L                # row (b, g) of [B, G, N, L]

    A = tl.load(A_ptr + dn, mask=mkn, other=0.0)
    Dv = tl.load(D_ptr + d, mask=mask_k, other=0.0)
    bias = tl.load(bias_ptr + d, mask=mask_k, other=0.0)
    Bf = tl.load(B_ptr + dn, mask=mkn, other=0.0) if not VAR_B else A
    Cf = tl.load(C_ptr + dn, mask=mkn, other=0.0) if not VAR_C else A
    h = tl.load(init_ptr + bdn, mask=mkn, other=0.0)
    chk_row = (pid_b.to(tl.int64) * Dm + d)[:, None] * n_chk * N + offs_n[None, :]
    for i in range(0, n_chk * M):  # one flat loop over sub-chunks (nested loops made ptxas spill the carry)
        tl.store(chk_ptr + chk_row + (i // M) * N, h, mask=mkn & (i % M == 0))
        t = i * T + offs_t
        u, dt, raw, a, b, h3, Bv, m2, off2 = _sub_chunk(
            u_ptr, delta_ptr, B_ptr, row, bg_off, offs_n, mask_n, mask_k, t, L, A, bias, Bf, h,
            VAR_B, SOFTPLUS)
        if VAR_C:
            Cv = _bc_tile(C_ptr, bg_off, offs_n, mask_n, t, t < L, L)[None, :, :]
        else:
            Cv = Cf[:, :, None]
        y = tl.sum(h3 * Cv, axis=1) + Dv[:, None] * u
        if HAS_Z:
            zz = tl.load(z_ptr + off2, mask=m2, other=0.0).to(tl.float32)
            y = y * zz * tl.sigmoid(zz)
        tl.store(out_ptr + off2, y.to(out_ptr.dtype.element_ty), mask=m2)
        h = tl.sum(tl.where(offs_t[None, None, :] == T - 1, h3, 0.0), axis=2)  # padded steps keep h
    tl.store(last_ptr + bdn, h, mask=mkn)


@triton.jit
def _selective_scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, chk_ptr, dout_ptr, dlast_ptr, scratch_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dinit_ptr,
    Bsz, Dm, L, N, H, G, M, n_chk, n_sub,
    VAR_B: tl.constexpr, VAR_C: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
    KC: tl.constexpr, NP: tl.constexpr, T: tl.constexpr,
):
    # Program (pid_c, g, b) handles n_sub blocks of KC channels one after the other. Outputs: du, ddelta, dz
    # [B, D, L]; dA, dinit [B, D, N] and dD, dbias [B, D] per (b, d) (summed over b on the host); dB/dC: fixed ->
    # [B, D, N] per (b, d), variable -> partial slice pid_c of [n_progs, B, G, N, L] (the program's channels).
    pid_c = tl.program_id(0)
    pid_g = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_n = tl.arange(0, NP)
    mask_n = offs_n < N
    offs_t = tl.arange(0, T)
    first_t = offs_t[None, None, :] == 0
    bg_off = (pid_b.to(tl.int64) * G + pid_g) * N * L
    part_off = ((pid_c.to(tl.int64) * Bsz + pid_b) * G + pid_g) * N * L      # this program's partial slice
    slot = ((pid_b * G + pid_g) * tl.num_programs(0) + pid_c).to(tl.int64) * M * KC * NP
    scr = scratch_ptr + slot + tl.arange(0, KC)[:, None] * NP + offs_n[None, :]   # [KC, NP] scratch tile
    K = tl.zeros([KC, NP], dtype=tl.float32)          # adjoint flowing into the current segment's end state
    dA_acc = tl.zeros([KC, NP], dtype=tl.float32)
    dBf_acc = tl.zeros([KC, NP], dtype=tl.float32)
    dCf_acc = tl.zeros([KC, NP], dtype=tl.float32)
    dD_acc = tl.zeros([KC], dtype=tl.float32)
    dbias_acc = tl.zeros([KC], dtype=tl.float32)
    # one flat loop over (channel sub-block sb, segment s from the last): nested loops made ptxas spill carries
    for j in range(0, n_sub * n_chk):
        tl.debug_barrier()  # scratch and partial-slice writes of the previous iteration are visible
        sb = j // n_chk
        s = n_chk - 1 - j % n_chk
        first = j % n_chk == 0
        last = s == 0
        ch = (pid_c * n_sub + sb) * KC + tl.arange(0, KC)
        mask_k = ch < H
        d = pid_g * H + ch
        mkn = mask_k[:, None] & mask_n[None, :]
        dn = d.to(tl.int64)[:, None] * N + offs_n[None, :]
        bdn = pid_b.to(tl.int64) * Dm * N + dn
        row = (pid_b.to(tl.int64) * Dm + d) * L
        chk_row = (pid_b.to(tl.int64) * Dm + d)[:, None] * n_chk * N + offs_n[None, :]
        A = tl.load(A_ptr + dn, mask=mkn, other=0.0)
        Dv = tl.load(D_ptr + d, mask=mask_k, other=0.0)
        bias = tl.load(bias_ptr + d, mask=mask_k, other=0.0)
        Bf = tl.load(B_ptr + dn, mask=mkn, other=0.0) if not VAR_B else A
        Cf = tl.load(C_ptr + dn, mask=mkn, other=0.0) if not VAR_C else A
        # a new sub-block starts from the last state's gradient with zeroed sums
        K = tl.where(first, tl.load(dlast_ptr + bdn, mask=mkn & first, other=0.0), K)
        dA_acc = tl.where(first, 0.0, dA_acc)
        dBf_acc = tl.where(first, 0.0, dBf_acc)
        dCf_acc = tl.where(first, 0.0, dCf_acc)
        dD_acc = tl.where(first, 0.0, dD_acc)
        dbias_acc = tl.where(first, 0.0, dbias_acc)
        # 1. the start state of every sub-chunk of segment s, from its checkpoint
        h = tl.load(chk_ptr + chk_row + s * N, mask=mkn, other=0.0)
        for m in range(0, M):
            tl.store(scr + m * KC * NP, h)
            t = (s * M + m) * T + offs_t
            _u, _dt, _raw, _a, _b, h3, _Bv, _m2, _off2 = _sub_chunk(
                u_ptr, delta_ptr, B_ptr, row, bg_off, offs_n, mask_n, mask_k, t, L, A, bias, Bf, h,
                VAR_B, SOFTPLUS)
            h = tl.sum(tl.where(offs_t[None, None, :] == T - 1, h3, 0.0), axis=2)
        tl.debug_barrier()
        # 2. the sub-chunks in reverse: recompute h, then the adjoint scan
        for m_rev in range(0, M):
            m = M - 1 - m_rev
            t = (s * M + m) * T + offs_t
            mask_t = t < L
            h0 = tl.load(scr + m * KC * NP)
            u, dt, raw, a, b, h3, Bv, m2, off2 = _sub_chunk(
                u_ptr, delta_ptr, B_ptr, row, bg_off, offs_n, mask_n, mask_k, t, L, A, bias, Bf, h0,
                VAR_B, SOFTPLUS)
            if VAR_C:
                Cv = _bc_tile(C_ptr, bg_off, offs_n, mask_n, t, mask_t, L)[None, :, :]
            else:
                Cv = Cf[:, :, None]
            dout = tl.load(dout_ptr + off2, mask=m2, other=0.0).to(tl.float32)
            if HAS_Z:
                y = tl.sum(h3 * Cv, axis=1) + Dv[:, None] * u
                zz = tl.load(z_ptr + off2, mask=m2, other=0.0).to(tl.float32)
                sg = tl.sigmoid(zz)
                dy = dout * zz * sg
                dz = dout * y * (sg + zz * sg * (1.0 - sg))
                tl.store(dz_ptr + off2, dz.to(dz_ptr.dtype.element_ty), mask=m2)
            else:
                dy = dout
            # a_{t+1} (1 at the sub-chunk's last step: the carry K already holds a_{t+1} g_{t+1} there)
            nxt = mask_k[:, None] & ((t + 1 < L) & (offs_t < T - 1))[None, :]
            dt1, _raw1 = _dt_tile(delta_ptr, off2 + 1, nxt, bias, SOFTPLUS)
            a_next = tl.exp(dt1[:, None, :] * A[:, :, None])
            P, Gs = tl.associative_scan((a_next, Cv * dy[:, None, :]), 2, _lin_combine, reverse=True)
            g = Gs + P * K[:, :, None]                                   # dL/dh_t [KC, NP, T]
            K = tl.sum(tl.where(first_t, a * g, 0.0), axis=2)           # into the state before the sub-chunk
            gah = g * (h3 - b)                                           # g_t a_t h_{t-1}
            dA_acc += tl.sum(gah * dt[:, None, :], axis=2)
            gB = g * Bv
            ddt = tl.sum(gah * A[:, :, None] + gB * u[:, None, :], axis=1)
            du = tl.sum(gB, axis=1) * dt + Dv[:, None] * dy
            dD_acc += tl.sum(dy * u, axis=1)
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(raw)
            ddt = tl.where(m2, ddt, 0.0)
            dbias_acc += tl.sum(ddt, axis=1)
            tl.store(du_ptr + off2, du.to(du_ptr.dtype.element_ty), mask=m2)
            tl.store(ddelta_ptr + off2, ddt.to(ddelta_ptr.dtype.element_ty), mask=m2)
            dBt = g * (dt * u)[:, None, :]
            dCt = h3 * dy[:, None, :]
            pmask = mask_n[:, None] & mask_t[None, :]
            pptr = part_off + offs_n.to(tl.int64)[:, None] * L + t[None, :]
            if VAR_B:
                v = tl.sum(dBt, axis=0)
                if sb > 0:
                    v += tl.load(dB_ptr + pptr, mask=pmask, other=0.0)
                tl.store(dB_ptr + pptr, v, mask=pmask)
            else:
                dBf_acc += tl.sum(dBt, axis=2)
            if VAR_C:
                v = tl.sum(dCt, axis=0)
                if sb > 0:
                    v += tl.load(dC_ptr + pptr, mask=pmask, other=0.0)
                tl.store(dC_ptr + pptr, v, mask=pmask)
            else:
                dCf_acc += tl.sum(dCt, axis=2)
        # the sub-block's sums, after its first segment
        tl.store(dinit_ptr + bdn, K, mask=mkn & last)
        tl.store(dA_ptr + bdn, dA_acc, mask=mkn & last)
        bd = pid_b.to(tl.int64) * Dm + d
        tl.store(dD_ptr + bd, dD_acc, mask=mask_k & last)
        tl.store(dbias_ptr + bd, dbias_acc, mask=mask_k & last)
        if not VAR_B:
            tl.store(dB_ptr + bdn, dBf_acc, mask=mkn & last)
        if not VAR_C:
            tl.store(dC_ptr + bdn, dCf_acc, mask=mkn & last)


# ---------------------------------------------------------------------------------------------------------------
# launch configuration

_SEG = 256            # time steps between stored states (the backward recomputes a segment at a time)
_MAX_SLICES = 64      # partial slices of variable dB/dC per (b, g): bounds their memory to 64x dB's
_T_MAX = 16           # time steps per sub-chunk (the scan length)
_TILE = {False: 2048, True: 1024}  # elements of one [KC, NP, T] tile, forward / backward


def config(N: int, L: int, H: int = 1 << 20, bwd: bool = False) -> dict:
    """Tile shape: KC channels (of H per group) x NP states x T steps; M sub-chunks per stored-state segment.
    T*M is _SEG when L > _SEG, else covers L: the stored states line up in both directions whatever T is.
    Sizes were picked with the sm_90 compile check (registers, no spills): the forward holds a 2048-element
    tile; the backward keeps ~10 tiles live, so it holds 1024 elements with 8 warps (16 for N > 128)."""
    NP = max(2, next_pow2(N))
    T = max(4, min(_T_MAX, _SEG, next_pow2(L), 512 // NP if bwd else _T_MAX))
    KC = max(1, min(16, next_pow2(H), _TILE[bwd] // (NP * T)))
    warps = (16 if NP >= 256 else 8) if bwd else (8 if NP >= 16 else 4)
    M = max(1, min(_SEG // T, triton.cdiv(max(L, 1), T)))
    return {"KC": KC, "NP": NP, "T": T, "M": M, "num_warps": warps}


def checkpoint_count(L: int) -> int:
    """Number of stored states [B, D, n_chk, N] the forward writes: one per segment of T*M steps, which is
    _SEG steps, or the whole sequence when L <= _SEG."""
    return max(1, triton.cdiv(L, _SEG))


def _groups(B: torch.Tensor, C: torch.Tensor) -> int:
    for M in (B, C):
        if M.dim() == 4:
            return M.shape[1]
    return 1


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, softplus: bool):
    """u, delta, z: [B, D, L] contiguous (one dtype); A, D, delta_bias, initial_state fp32 contiguous; B, C:
    fixed [D, N] fp32 or variable [B, G, N, L] in u's dtype. Returns (out [B, D, L] u's dtype, last [B, D, N]
    fp32, chk [B, D, n_chk, N] fp32: the state at the start of every segment)."""
    Bsz, Dm, L = u.shape
    N = A.shape[1]
    G = _groups(B, C)
    H = Dm // G
    cfg = config(N, L, H)
    n_chk = checkpoint_count(L)
    out = empty((Bsz, Dm, L), dtype=u.dtype, device=u.device)
    last = empty((Bsz, Dm, N), dtype=torch.float32, device=u.device)
    chk = empty((Bsz, Dm, n_chk, N), dtype=torch.float32, device=u.device)
    if Bsz * Dm * N == 0:
        return out, last, chk
    grid = (triton.cdiv(H, cfg["KC"]), G, Bsz)
    _selective_scan_fwd_kernel[grid](
        u, delta, A, B, C, D, z if z is not None else u, delta_bias, initial_state, out, last, chk,
        Dm, L, N, H, G, cfg["M"], n_chk,
        VAR_B=B.dim() == 4, VAR_C=C.dim() == 4, HAS_Z=z is not None, SOFTPLUS=softplus,
        KC=cfg["KC"], NP=cfg["NP"], T=cfg["T"], num_warps=cfg["num_warps"],
    )
    return out, last, chk


def _n_sub(n_cblk: int, variable: bool) -> int:
    """Channel blocks per backward program: 1, unless variable dB/dC would need more than _MAX_SLICES slices."""
    return triton.cdiv(n_cblk, _MAX_SLICES) if variable else 1


def selective_scan_bwd(u, delta, A, B, C, D, z, delta_bias, chk, dout, dlast, softplus: bool):
    """Gradients of selective_scan_fwd. dout: [B, D, L] contiguous, u's dtype; dlast: [B, D, N] fp32.
    Returns (du, ddelta, dz | None in u's dtype; dA [D, N], dB, dC (B's/C's shape), dD [D], ddelta_bias [D],
    dinit [B, D, N], all fp32)."""
    Bsz, Dm, L = u.shape
    N = A.shape[1]
    G = _groups(B, C)
    H = Dm // G
    cfg = config(N, L, H, bwd=True)
    n_chk = chk.shape[2]
    assert n_chk == checkpoint_count(L) and n_chk * cfg["T"] * cfg["M"] >= L, "stored states do not match"
    dev = u.device
    var_b, var_c = B.dim() == 4, C.dim() == 4
    du = empty((Bsz, Dm, L), dtype=u.dtype, device=dev)
    ddelta = empty((Bsz, Dm, L), dtype=u.dtype, device=dev)
    dz = empty((Bsz, Dm, L), dtype=u.dtype, device=dev) if z is not None else None
    n_cblk = triton.cdiv(H, cfg["KC"]) if H else 0
    n_sub = _n_sub(n_cblk, var_b or var_c)
    n_prog = triton.cdiv(n_cblk, n_sub) if n_cblk else 0
    f32 = {"dtype": torch.float32, "device": dev}
    dA = empty((Bsz, Dm, N), **f32)
    dinit = empty((Bsz, Dm, N), **f32)
    dD = empty((Bsz, Dm), **f32)
    dbias = empty((Bsz, Dm), **f32)
    dB = empty((n_prog, Bsz, G, N, L) if var_b else (Bsz, Dm, N), **f32)
    dC = empty((n_prog, Bsz, G, N, L) if var_c else (Bsz, Dm, N), **f32)
    if Bsz * Dm * N == 0 or L == 0:
        for t in (du, ddelta, dz, dA, dD, dbias, dB, dC):
            if t is not None:
                t.zero_()
        dinit.copy_(dlast.expand_as(dinit))
    else:
        scratch = torch.empty(n_prog * G * Bsz * cfg["M"] * cfg["KC"] * cfg["NP"], **f32)
        grid = (n_prog, G, Bsz)
        _selective_scan_bwd_kernel[grid](
            u, delta, A, B, C, D, z if z is not None else u, delta_bias, chk, dout, dlast, scratch,
            du, ddelta, dz if dz is not None else du, dA, dB, dC, dD, dbias, dinit,
            Bsz, Dm, L, N, H, G, cfg["M"], n_chk, n_sub,
            VAR_B=var_b, VAR_C=var_c, HAS_Z=z is not None, SOFTPLUS=softplus,
            KC=cfg["KC"], NP=cfg["NP"], T=cfg["T"], num_warps=cfg["num_warps"],
        )
    # fixed-order reductions over batch / partial slices: bit-reproducible
    return du, ddelta, dz, dA.sum(0), dB.sum(0), dC.sum(0), dD.sum(0), dbias.sum(0), dinit


# ---------------------------------------------------------------------------------------------------------------
# ahead-of-time compile cases (CI compiles each for sm_90; see kernels/common.py)

def aot_cases():
    """The configurations the launchers pick: every state-size class (the tile shape depends on N), short and
    long sequences, the flag combinations Mamba uses, fixed B/C, in bf16 and fp32 (fp16 compiles as bf16)."""
    F32 = {"A_ptr", "D_ptr", "bias_ptr", "init_ptr", "last_ptr", "chk_ptr", "dlast_ptr", "scratch_ptr", "dA_ptr",
           "dB_ptr", "dC_ptr", "dD_ptr", "dbias_ptr", "dinit_ptr"}
    # (dtype, N, L, variable B/C, z, softplus)
    combos = [("bf16", 16, 1 << 16, True, True, True), ("fp32", 16, 1 << 16, True, True, True),
              ("bf16", 16, 7, True, True, True), ("bf16", 16, 1 << 16, False, False, False),
              ("fp32", 4, 1 << 16, False, True, False), ("bf16", 1, 1 << 16, True, False, True),
              ("bf16", 32, 1 << 16, True, True, True), ("bf16", 64, 1 << 16, True, True, True),
              ("fp32", 64, 1 << 16, True, True, True), ("bf16", 128, 1 << 16, True, True, True),
              ("bf16", 256, 1 << 16, True, False, False), ("fp32", 256, 5, False, True, True)]
    cases = []
    for t, N, L, var, has_z, sp in combos:
        for bwd, fn in ((False, _selective_scan_fwd_kernel), (True, _selective_scan_bwd_kernel)):
            cfg = config(N, L, bwd=bwd)
            c = dict(VAR_B=var, VAR_C=var, HAS_Z=has_z, SOFTPLUS=sp, KC=cfg["KC"], NP=cfg["NP"], T=cfg["T"])
            ptrs = {a: "fp32" if a in F32 or (a in ("B_ptr", "C_ptr") and not var) else t
                    for a in fn.arg_names if a.endswith("_ptr")}
            name = (f"selective_scan_{'bwd' if bwd else 'fwd'}[{t},N={N},KC={cfg['KC']},T={cfg['T']},var={var},"
                    f"z={has_z},softplus={sp}]")
            cases.append(AotCase(name, fn, signature(fn, ptrs, c), c, {"num_warps": cfg["num_warps"]}))
    return cases
