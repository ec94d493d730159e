"""Halo attention (HaloNet) in Triton: K/V windows streamed straight from the feature map, no unfolded copy.

Notation (as the reference): q: [B, H, Dqk, Hq, Wq]; k: [B, H, Dqk, Hf, Wf]; v: [B, H, Dv, Hf, Wf]; block b,
halo h, query stride s, query block side bq = b // s, window side win = b + 2h. lse, delta: [B*H, Hq*Wq] fp32.

Layout: every tensor is read through its own 5 strides, so a channels-first view of a conv output
([B, H*D, Y, X] -> [B, H, D, Y, X], x contiguous) and a channels-last one ([B, Y, X, H*D] permuted, d
contiguous) are both read in place, and k / v may be the two halves of one kv tensor. A key tile is one window
row: win keys x D channels. Channels-last reads each key's D channels as one contiguous run (D*2 bytes, whole
32-byte sectors for D >= 16: the coalesced layout); channels-first reads a run of win keys per channel (28 bytes
for win=14 in bf16), which costs up to two sectors per run. Triton specialises a stride equal to 1, so the
contiguous axis is known at compile time either way. Outputs follow their input's layout.

Programs: forward and dq: one per (batch*head, query block [, tile of <= 64 queries]) looping over the win window
rows with an fp32 online softmax. dk/dv: one per (batch*head, rows of one key block), gathering from the
query blocks whose windows cover it (no atomics: deterministic). Relative-position logits are built in-kernel:
q @ rel^T against the 2*win-1 table rows, then shifted per query into window coordinates.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import AotCase, TL_DTYPE, empty, next_pow2, signature

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _rel_to_window(qrel, pos, WIN, BLOCK_Q: tl.constexpr, WIN_P: tl.constexpr, REL_P: tl.constexpr):
    """qrel [BLOCK_Q, REL_P] (q . rel[r]) -> [BLOCK_Q, WIN_P]: out[i, c] = qrel[i, c - pos[i] + WIN - 1], c < WIN."""
    r = tl.arange(0, REL_P)
    cols = tl.arange(0, WIN_P)
    out = tl.zeros([BLOCK_Q, WIN_P], dtype=tl.float32)
    for c in range(0, WIN):
        col = tl.sum(tl.where(r[None, :] == (c - pos + WIN - 1)[:, None], qrel, 0.0), axis=1)
        out = tl.where(cols[None, :] == c, col[:, None], out)
    return out


@triton.jit
def _window_to_rel(g, pos, WIN, BLOCK_Q: tl.constexpr, WIN_P: tl.constexpr, REL_P: tl.constexpr):
    """The adjoint of _rel_to_window: g [BLOCK_Q, WIN_P] -> [BLOCK_Q, REL_P], out[i, c - pos[i] + WIN - 1] = g[i, c]."""
    r = tl.arange(0, REL_P)
    cols = tl.arange(0, WIN_P)
    out = tl.zeros([BLOCK_Q, REL_P], dtype=tl.float32)
    for c in range(0, WIN):
        col = tl.sum(tl.where(cols[None, :] == c, g, 0.0), axis=1)
        out = tl.where(r[None, :] == (c - pos + WIN - 1)[:, None], col[:, None], out)  # injective in c per row
    return out


@triton.jit
def _column(m, cols, c):
    """Column c of m [R, C] as [R]."""
    return tl.sum(tl.where(cols[None, :] == c, m, 0.0), axis=1)


@triton.jit
def _load_rows(ptr, base, roff, mrow, d, D, sd):
    """Tile [R, D_P] of rows at offsets roff [R] (int64), channels d [D_P] with stride sd; zeros where masked."""
    return tl.load(ptr + base + roff[:, None] + d.to(tl.int64)[None, :] * sd,
                   mask=mrow[:, None] & (d < D)[None, :], other=0.0)


@triton.jit
def _query_tile(pid_q, NBX, QBLK, Q_TILES: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Query block (by, bx) of program pid_q and its tile's queries: in-block row/col [BLOCK_Q], map y/x, mask."""
    blk = pid_q // Q_TILES
    t = (pid_q % Q_TILES) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    by = blk // NBX
    bx = blk % NBX
    qa = t // QBLK
    qc = t % QBLK
    return by, bx, qa, qc, by * QBLK + qa, bx * QBLK + qc, t < QBLK * QBLK


@triton.jit
def _rel_window_logits(q, hrel_ptr, wrel_ptr, qa, qc, WIN, N_REL, DQK, pos_scale,
                       BLOCK_Q: tl.constexpr, WIN_P: tl.constexpr, REL_P: tl.constexpr, DQK_P: tl.constexpr,
                       PREC: tl.constexpr):
    """Relative logits of the tile's queries q [BLOCK_Q, DQK_P] against window rows (rh) and columns (rw),
    [BLOCK_Q, WIN_P] each, times pos_scale; also the tables [REL_P, DQK_P] (rows >= 2*win-1 zero)."""
    r = tl.arange(0, REL_P)
    d = tl.arange(0, DQK_P)
    m = (r < N_REL)[:, None] & (d < DQK)[None, :]
    hrel = tl.load(hrel_ptr + r[:, None] * DQK + d[None, :], mask=m, other=0.0)
    wrel = tl.load(wrel_ptr + r[:, None] * DQK + d[None, :], mask=m, other=0.0)
    rh = _rel_to_window(tl.dot(q, tl.trans(hrel), input_precision=PREC), qa, WIN, BLOCK_Q, WIN_P, REL_P)
    rw = _rel_to_window(tl.dot(q, tl.trans(wrel), input_precision=PREC), qc, WIN, BLOCK_Q, WIN_P, REL_P)
    return rh * pos_scale, rw * pos_scale, hrel, wrel


@triton.jit
def _key_window(by, bx, cols, BLK, HALO, WIN, HF, WF, MASK_PAD: tl.constexpr):
    """The key window of query block (by, bx): its first image row y0, its columns kx [WIN_P], which columns
    are inside the image (x_in) and take part (valid), and the window rows [lo, hi_r) a program visits
    (mask_padding skips rows outside the image; timm's zero keys keep them)."""
    y0 = by * BLK - HALO
    kx = bx * BLK - HALO + cols
    col_ok = cols < WIN
    x_in = col_ok & (kx >= 0) & (kx < WF)
    if MASK_PAD:
        valid = x_in
        lo = tl.maximum(-y0, 0)
        hi_r = tl.minimum(HF - y0, WIN)
    else:
        valid = col_ok
        lo = 0
        hi_r = WIN
    return y0, kx, x_in, valid, lo, hi_r


@triton.jit
def _halo_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, hrel_ptr, wrel_ptr, o_ptr, lse_ptr,
    NH, WQ, HF, WF, NBX, BLK, HALO, QBLK, WIN, N_REL, DQK, DV, NQ,
    sm_scale, pos_scale,
    sqb, sqh, sqd, sqy, sqx,
    skb, skh, skd, sky, skx,
    svb, svh, svd, svy, svx,
    sob, soh, sod, soy, sox,
    HAS_REL: tl.constexpr, MASK_PAD: tl.constexpr, Q_TILES: tl.constexpr, BLOCK_Q: tl.constexpr,
    WIN_P: tl.constexpr, REL_P: tl.constexpr, DQK_P: tl.constexpr, DV_P: tl.constexpr, PREC: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bi = (pid_bh // NH).to(tl.int64)
    hi = (pid_bh % NH).to(tl.int64)
    by, bx, qa, qc, qy, qx, mq = _query_tile(pid_q, NBX, QBLK, Q_TILES, BLOCK_Q)
    dq_ = tl.arange(0, DQK_P)
    dv_ = tl.arange(0, DV_P)
    q = _load_rows(q_ptr, bi * sqb + hi * sqh, qy.to(tl.int64) * sqy + qx.to(tl.int64) * sqx, mq, dq_, DQK, sqd)
    cols = tl.arange(0, WIN_P)
    if HAS_REL:
        rh, rw, hrel, wrel = _rel_window_logits(q, hrel_ptr, wrel_ptr, qa, qc, WIN, N_REL, DQK, pos_scale,
                                                BLOCK_Q, WIN_P, REL_P, DQK_P, PREC)
    y0, kx, x_in, valid, lo, hi_r = _key_window(by, bx, cols, BLK, HALO, WIN, HF, WF, MASK_PAD)
    k_base = bi * skb + hi * skh
    v_base = bi * svb + hi * svh
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, DV_P], tl.float32)
    for kr in range(lo, hi_r):
        ky = y0 + kr
        m_k = x_in & (ky >= 0) & (ky < HF)  # out-of-image keys load as zeros
        k = _load_rows(k_ptr, k_base, ky.to(tl.int64) * sky + kx.to(tl.int64) * skx, m_k, dq_, DQK, skd)
        v = _load_rows(v_ptr, v_base, ky.to(tl.int64) * svy + kx.to(tl.int64) * svx, m_k, dv_, DV, svd)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * sm_scale
        if HAS_REL:
            s += _column(rh, cols, kr)[:, None] + rw
        s = tl.where(valid[None, :], s * LOG2E, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    out = acc / l_i[:, None]
    o_off = bi * sob + hi * soh + qy.to(tl.int64)[:, None] * soy + qx.to(tl.int64)[:, None] * sox \
        + dv_.to(tl.int64)[None, :] * sod
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=mq[:, None] & (dv_ < DV)[None, :])
    tl.store(lse_ptr + pid_bh.to(tl.int64) * NQ + qy * WQ + qx, m_i + tl.log2(l_i), mask=mq)  # base 2


@triton.jit
def _halo_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, hrel_ptr, wrel_ptr, o_ptr, do_ptr, lse_ptr,
    dq_ptr, delta_ptr, rh_ptr, rw_ptr, dhrel_ptr, dwrel_ptr,
    NH, WQ, HF, WF, NBX, BLK, HALO, QBLK, WIN, N_REL, DQK, DV, NQ,
    sm_scale, pos_scale,
    sqb, sqh, sqd, sqy, sqx,
    skb, skh, skd, sky, skx,
    svb, svh, svd, svy, svx,
    sob, soh, sod, soy, sox,
    sgb, sgh, sgd, sgy, sgx,  # dout
    sdb, sdh, sdd, sdy, sdx,  # dq
    HAS_REL: tl.constexpr, MASK_PAD: tl.constexpr, Q_TILES: tl.constexpr, BLOCK_Q: tl.constexpr,
    WIN_P: tl.constexpr, REL_P: tl.constexpr, DQK_P: tl.constexpr, DV_P: tl.constexpr, PREC: tl.constexpr,
):
    # Writes dq, delta = rowsum(dout * out), the scaled relative logits rh / rw [B*H, NQ, WIN_P] for the dk/dv
    # kernel, and this program's share of d(height_rel), d(width_rel): [programs, 2*win-1, Dqk] fp32, summed on
    # the host in a fixed order.
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bi = (pid_bh // NH).to(tl.int64)
    hi = (pid_bh % NH).to(tl.int64)
    by, bx, qa, qc, qy, qx, mq = _query_tile(pid_q, NBX, QBLK, Q_TILES, BLOCK_Q)
    dq_ = tl.arange(0, DQK_P)
    dv_ = tl.arange(0, DV_P)
    qy64 = qy.to(tl.int64)
    qx64 = qx.to(tl.int64)
    q = _load_rows(q_ptr, bi * sqb + hi * sqh, qy64 * sqy + qx64 * sqx, mq, dq_, DQK, sqd)
    o = _load_rows(o_ptr, bi * sob + hi * soh, qy64 * soy + qx64 * sox, mq, dv_, DV, sod).to(tl.float32)
    do = _load_rows(do_ptr, bi * sgb + hi * sgh, qy64 * sgy + qx64 * sgx, mq, dv_, DV, sgd)
    delta = tl.sum(do.to(tl.float32) * o, axis=1)
    qidx = pid_bh.to(tl.int64) * NQ + qy * WQ + qx
    tl.store(delta_ptr + qidx, delta, mask=mq)
    lse = tl.load(lse_ptr + qidx, mask=mq, other=0.0)
    cols = tl.arange(0, WIN_P)
    if HAS_REL:
        rh, rw, hrel, wrel = _rel_window_logits(q, hrel_ptr, wrel_ptr, qa, qc, WIN, N_REL, DQK, pos_scale,
                                                BLOCK_Q, WIN_P, REL_P, DQK_P, PREC)
        r_off = qidx[:, None] * WIN_P + cols[None, :]
        tl.store(rh_ptr + r_off, rh, mask=mq[:, None])
        tl.store(rw_ptr + r_off, rw, mask=mq[:, None])
        gh = tl.zeros([BLOCK_Q, WIN_P], tl.float32)  # d(logits) summed over window columns, per window row
        gw = tl.zeros([BLOCK_Q, WIN_P], tl.float32)  # ... over window rows, per window column
    y0, kx, x_in, valid, lo, hi_r = _key_window(by, bx, cols, BLK, HALO, WIN, HF, WF, MASK_PAD)
    k_base = bi * skb + hi * skh
    v_base = bi * svb + hi * svh
    acc = tl.zeros([BLOCK_Q, DQK_P], tl.float32)
    for kr in range(lo, hi_r):
        ky = y0 + kr
        m_k = x_in & (ky >= 0) & (ky < HF)
        k = _load_rows(k_ptr, k_base, ky.to(tl.int64) * sky + kx.to(tl.int64) * skx, m_k, dq_, DQK, skd)
        v = _load_rows(v_ptr, v_base, ky.to(tl.int64) * svy + kx.to(tl.int64) * svx, m_k, dv_, DV, svd)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * sm_scale
        if HAS_REL:
            s += _column(rh, cols, kr)[:, None] + rw
        s = tl.where(valid[None, :], s * LOG2E, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])  # d loss / d logits
        acc += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        if HAS_REL:
            gh = tl.where(cols[None, :] == kr, tl.sum(ds, axis=1)[:, None], gh)
            gw += ds
    acc = acc * sm_scale
    if HAS_REL:
        g_h = (_window_to_rel(gh, qa, WIN, BLOCK_Q, WIN_P, REL_P) * pos_scale).to(q.dtype)  # [BLOCK_Q, REL_P]
        g_w = (_window_to_rel(gw, qc, WIN, BLOCK_Q, WIN_P, REL_P) * pos_scale).to(q.dtype)
        acc += tl.dot(g_h, hrel, input_precision=PREC) + tl.dot(g_w, wrel, input_precision=PREC)
        d_h = tl.dot(tl.trans(g_h), q, input_precision=PREC)  # [REL_P, DQK_P]
        d_w = tl.dot(tl.trans(g_w), q, input_precision=PREC)
        r = tl.arange(0, REL_P)
        prog = pid_bh.to(tl.int64) * tl.num_programs(0) + pid_q
        p_off = (prog * N_REL + r)[:, None] * DQK + dq_[None, :]
        p_mask = (r < N_REL)[:, None] & (dq_ < DQK)[None, :]
        tl.store(dhrel_ptr + p_off, d_h, mask=p_mask)
        tl.store(dwrel_ptr + p_off, d_w, mask=p_mask)
    d_off = bi * sdb + hi * sdh + qy64[:, None] * sdy + qx64[:, None] * sdx + dq_.to(tl.int64)[None, :] * sdd
    tl.store(dq_ptr + d_off, acc.to(dq_ptr.dtype.element_ty), mask=mq[:, None] & (dq_ < DQK)[None, :])


@triton.jit
def _halo_attention_bwd_dkv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, rh_ptr, rw_ptr, dk_ptr, dv_ptr,
    NH, WQ, NBY, NBX, BLK, HALO, QBLK, WIN, NB, DQK, DV, NQ,
    sm_scale,
    sqb, sqh, sqd, sqy, sqx,
    skb, skh, skd, sky, skx,
    svb, svh, svd, svy, svx,
    sgb, sgh, sgd, sgy, sgx,  # dout
    sab, sah, sad, say, sax,  # dk
    scb, sch, scd, scy, scx,  # dv
    HAS_REL: tl.constexpr, K_TILES: tl.constexpr, KROWS: tl.constexpr, BLK_P: tl.constexpr,
    Q_TILES: tl.constexpr, BLOCK_Q: tl.constexpr, WIN_P: tl.constexpr, DQK_P: tl.constexpr,
    DV_P: tl.constexpr, PREC: tl.constexpr,
):
    # Keys: KROWS rows x BLK columns of one key block (all inside the image). Every query block whose window
    # covers some of them (block offsets -NB..NB, NB = ceil(halo / block)) is visited in a fixed order.
    BLOCK_K: tl.constexpr = KROWS * BLK_P
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bi = (pid_bh // NH).to(tl.int64)
    hi = (pid_bh % NH).to(tl.int64)
    blk = pid // K_TILES
    r0 = (pid % K_TILES) * KROWS
    kby = blk // NBX
    kbx = blk % NBX
    rows = tl.arange(0, KROWS)
    cols = tl.arange(0, BLK_P)
    kk = tl.arange(0, BLOCK_K)  # key kk: row kk // BLK_P, column kk % BLK_P of the tile
    kr_in = r0 + kk // BLK_P
    kc_in = kk % BLK_P
    m_k = (kr_in < BLK) & (kc_in < BLK)
    ky = kby * BLK + kr_in
    kx = kbx * BLK + kc_in
    dq_ = tl.arange(0, DQK_P)
    dv_ = tl.arange(0, DV_P)
    k = _load_rows(k_ptr, bi * skb + hi * skh, ky.to(tl.int64) * sky + kx.to(tl.int64) * skx, m_k, dq_, DQK, skd)
    v = _load_rows(v_ptr, bi * svb + hi * svh, ky.to(tl.int64) * svy + kx.to(tl.int64) * svx, m_k, dv_, DV, svd)
    q_base = bi * sqb + hi * sqh
    g_base = bi * sgb + hi * sgh
    row_lo = kby * BLK + r0
    row_hi = kby * BLK + tl.minimum(r0 + KROWS, BLK)
    dk = tl.zeros([BLOCK_K, DQK_P], tl.float32)
    dv = tl.zeros([BLOCK_K, DV_P], tl.float32)
    for oy in range(0, 2 * NB + 1):
        qby = kby + oy - NB
        wy0 = qby * BLK - HALO
        if (qby >= 0) & (qby < NBY) & (wy0 < row_hi) & (wy0 + WIN > row_lo):
            for ox in range(0, 2 * NB + 1):
                qbx = kbx + ox - NB
                if (qbx >= 0) & (qbx < NBX):
                    # window row of each key row, window column of each key column, for this query block
                    wr = kby * BLK + r0 + rows - wy0
                    wc = kbx * BLK + cols - (qbx * BLK - HALO)
                    r_ok = (wr >= 0) & (wr < WIN) & (r0 + rows < BLK)
                    c_ok = (wc >= 0) & (wc < WIN) & (cols < BLK)
                    in_win = tl.reshape(r_ok[:, None] & c_ok[None, :], [BLOCK_K])
                    for qt in range(0, Q_TILES):
                        t = qt * BLOCK_Q + tl.arange(0, BLOCK_Q)
                        mq = t < QBLK * QBLK
                        qy = (qby * QBLK + t // QBLK).to(tl.int64)
                        qx = (qbx * QBLK + t % QBLK).to(tl.int64)
                        q = _load_rows(q_ptr, q_base, qy * sqy + qx * sqx, mq, dq_, DQK, sqd)
                        do = _load_rows(do_ptr, g_base, qy * sgy + qx * sgx, mq, dv_, DV, sgd)
                        qidx = pid_bh.to(tl.int64) * NQ + qy * WQ + qx
                        lse = tl.load(lse_ptr + qidx, mask=mq, other=float("inf"))  # padding queries: p = 0
                        delta = tl.load(delta_ptr + qidx, mask=mq, other=0.0)
                        s = tl.dot(k, tl.trans(q), input_precision=PREC) * sm_scale  # [BLOCK_K, BLOCK_Q]
                        if HAS_REL:
                            # rel[k, q] = rh[q, wr(row k)] + rw[q, wc(column k)]: two small tiles, broadcast
                            r_off = qidx[None, :] * WIN_P
                            rh = tl.load(rh_ptr + r_off + wr[:, None], mask=r_ok[:, None] & mq[None, :], other=0.0)
                            rw = tl.load(rw_ptr + r_off + wc[:, None], mask=c_ok[:, None] & mq[None, :], other=0.0)
                            s += tl.reshape(rh[:, None, :] + rw[None, :, :], [BLOCK_K, BLOCK_Q])
                        s = tl.where(in_win[:, None], s * LOG2E, float("-inf"))
                        p = tl.exp2(s - lse[None, :])
                        dv += tl.dot(p.to(do.dtype), do, input_precision=PREC)
                        dp = tl.dot(v, tl.trans(do), input_precision=PREC)
                        ds = p * (dp - delta[None, :])
                        dk += tl.dot(ds.to(q.dtype), q, input_precision=PREC)
    dk = dk * sm_scale
    m_dk = m_k[:, None] & (dq_ < DQK)[None, :]
    m_dv = m_k[:, None] & (dv_ < DV)[None, :]
    a_off = bi * sab + hi * sah + ky.to(tl.int64)[:, None] * say + kx.to(tl.int64)[:, None] * sax \
        + dq_.to(tl.int64)[None, :] * sad
    c_off = bi * scb + hi * sch + ky.to(tl.int64)[:, None] * scy + kx.to(tl.int64)[:, None] * scx \
        + dv_.to(tl.int64)[None, :] * scd
    tl.store(dk_ptr + a_off, dk.to(dk_ptr.dtype.element_ty), mask=m_dk)
    tl.store(dv_ptr + c_off, dv.to(dv_ptr.dtype.element_ty), mask=m_dv)


# ---------------------------------------------------------------------------------------------------------------
# launch configuration

MAX_WIN = 32   # window side b + 2h the kernels support (WIN_P <= 32, REL_P <= 64)
MAX_HEAD_DIM = 128


def config(block: int, halo: int, stride: int, dqk: int, dv: int, dtype: torch.dtype) -> dict:
    """Constexprs and launch options per kernel: {"fwd": ..., "dq": ..., "dkv": ...}; each holds the kernel's
    constexprs plus num_warps / num_stages. Sizes chosen so that every case compiles for sm_90 without spills
    (fp32 dots run on FMA units and hold larger operands: smaller query tiles, more warps)."""
    bq = block // stride
    win = block + 2 * halo
    fp32 = dtype == torch.float32
    big = max(dqk, dv) > 64
    pads = {"WIN_P": max(16, next_pow2(win)), "DQK_P": max(16, next_pow2(dqk)), "DV_P": max(16, next_pow2(dv)),
            "PREC": "ieee" if fp32 else "tf32"}  # fp32 inputs: full-precision dots, no TF32

    def q_tiles(cap):
        block_q = min(cap, max(16, next_pow2(bq * bq)))
        return {"BLOCK_Q": block_q, "Q_TILES": triton.cdiv(bq * bq, block_q)}

    rel_p = max(16, next_pow2(2 * win - 1))
    if fp32:
        fwd = dict(q_tiles(16 if big else 32), num_warps=4 if big else 8)
        dq = dict(q_tiles(32), num_warps=8)
        dkv = dict(q_tiles(16 if big else 32), num_warps=4)
    else:
        fwd = dict(q_tiles(64), num_warps=8 if big else 4)
        dq = dict(q_tiles(64), num_warps=4 if max(dqk, dv) <= 32 else 8)
        dkv = dict(q_tiles(64), num_warps=8)
    fwd.update(pads, REL_P=rel_p, num_stages=2)
    dq.update(pads, REL_P=rel_p, num_stages=2)
    # dk/dv: a key tile of whole rows of one key block, about 32 keys (16 for wide heads), >= 16 for tl.dot
    blk_p = next_pow2(block)
    want = 16 if big else 32
    krows = max(min(next_pow2(block), max(1, want // blk_p)), max(1, 16 // blk_p))
    dkv.update(pads, BLK_P=blk_p, KROWS=krows, K_TILES=triton.cdiv(block, krows), num_stages=1)
    return {"fwd": fwd, "dq": dq, "dkv": dkv}


def _split(cfg: dict) -> tuple[dict, dict]:
    """(constexprs, launch options) of one kernel's config."""
    opts = {k: cfg[k] for k in ("num_warps", "num_stages")}
    return {k: v for k, v in cfg.items() if k not in opts}, opts


def is_channels_last(t: torch.Tensor) -> bool:
    """[B, H, D, Y, X] with D innermost (a view of [B, Y, X, H, D] or of an NHWC conv output)."""
    return t.stride(2) == 1 and t.stride(4) != 1


def empty_5d(B: int, H: int, D: int, Y: int, X: int, channels_last: bool, dtype, device, alloc=empty):
    """[B, H, D, Y, X] in the requested layout (channels-last: D, then H, innermost)."""
    if channels_last:
        return alloc((B, Y, X, H, D), dtype=dtype, device=device).permute(0, 3, 4, 1, 2)
    return alloc((B, H, D, Y, X), dtype=dtype, device=device)


def _s(t: torch.Tensor) -> tuple:
    return tuple(t.stride())


def _geometry(q, k, v, block, halo, stride):
    B, H, DQK, HQ, WQ = q.shape
    DV, HF, WF = v.shape[2:]
    win = block + 2 * halo
    return dict(B=B, H=H, DQK=DQK, DV=DV, HQ=HQ, WQ=WQ, HF=HF, WF=WF, NBY=HF // block, NBX=WF // block,
                QBLK=block // stride, WIN=win, N_REL=2 * win - 1, NQ=HQ * WQ)


def halo_attention_fwd(q, k, v, hrel, wrel, block: int, halo: int, stride: int, scale: float, pos_scale: float,
                       mask_padding: bool):
    """Returns out [B, H, Dv, Hq, Wq] (q's layout and dtype) and lse [B, H, Hq, Wq] (fp32, base-2 log-sum-exp
    of the logits times log2(e))."""
    g = _geometry(q, k, v, block, halo, stride)
    out = empty_5d(g["B"], g["H"], g["DV"], g["HQ"], g["WQ"], is_channels_last(q), q.dtype, q.device)
    lse = empty((g["B"], g["H"], g["HQ"], g["WQ"]), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    c, opts = _split(config(block, halo, stride, g["DQK"], g["DV"], q.dtype)["fwd"])
    has_rel = hrel is not None
    grid = (g["NBY"] * g["NBX"] * c["Q_TILES"], g["B"] * g["H"])
    _halo_attention_fwd_kernel[grid](
        q, k, v, hrel if has_rel else q, wrel if has_rel else q, out, lse,
        g["H"], g["WQ"], g["HF"], g["WF"], g["NBX"], block, halo, g["QBLK"], g["WIN"], g["N_REL"], g["DQK"],
        g["DV"], g["NQ"], float(scale), float(pos_scale),
        *_s(q), *_s(k), *_s(v), *_s(out),
        HAS_REL=has_rel, MASK_PAD=bool(mask_padding), **c, **opts,
    )
    return out, lse


def halo_attention_bwd(dout, q, k, v, hrel, wrel, out, lse, block: int, halo: int, stride: int, scale: float,
                       pos_scale: float, mask_padding: bool):
    """Returns dq, dk, dv (each in its input's layout and dtype) and d(height_rel), d(width_rel) (fp32 [2*win-1,
    Dqk], None without rel_pos)."""
    g = _geometry(q, k, v, block, halo, stride)
    dev = q.device
    dq = empty_5d(g["B"], g["H"], g["DQK"], g["HQ"], g["WQ"], is_channels_last(q), q.dtype, dev)
    dk = empty_5d(g["B"], g["H"], g["DQK"], g["HF"], g["WF"], is_channels_last(k), k.dtype, dev)
    dv = empty_5d(g["B"], g["H"], g["DV"], g["HF"], g["WF"], is_channels_last(v), v.dtype, dev)
    has_rel = hrel is not None
    cfg = config(block, halo, stride, g["DQK"], g["DV"], q.dtype)
    c_dq, o_dq = _split(cfg["dq"])
    c_kv, o_kv = _split(cfg["dkv"])
    BH = g["B"] * g["H"]
    n_qprog = g["NBY"] * g["NBX"] * c_dq["Q_TILES"]
    if BH * n_qprog == 0 or g["DQK"] * g["DV"] == 0:
        for t in (dq, dk, dv):
            t.zero_()
        zrel = torch.zeros(g["N_REL"], g["DQK"], dtype=torch.float32, device=dev) if has_rel else None
        return dq, dk, dv, zrel, (zrel.clone() if has_rel else None)
    delta = empty((BH, g["NQ"]), dtype=torch.float32, device=dev)
    if has_rel:
        rh = empty((BH, g["NQ"], c_dq["WIN_P"]), dtype=torch.float32, device=dev)
        rw = empty((BH, g["NQ"], c_dq["WIN_P"]), dtype=torch.float32, device=dev)
        dh_part = empty((BH * n_qprog, g["N_REL"], g["DQK"]), dtype=torch.float32, device=dev)
        dw_part = empty((BH * n_qprog, g["N_REL"], g["DQK"]), dtype=torch.float32, device=dev)
    else:
        rh = rw = dh_part = dw_part = delta
    _halo_attention_bwd_dq_kernel[(n_qprog, BH)](
        q, k, v, hrel if has_rel else q, wrel if has_rel else q, out, dout, lse,
        dq, delta, rh, rw, dh_part, dw_part,
        g["H"], g["WQ"], g["HF"], g["WF"], g["NBX"], block, halo, g["QBLK"], g["WIN"], g["N_REL"], g["DQK"],
        g["DV"], g["NQ"], float(scale), float(pos_scale),
        *_s(q), *_s(k), *_s(v), *_s(out), *_s(dout), *_s(dq),
        HAS_REL=has_rel, MASK_PAD=bool(mask_padding), **c_dq, **o_dq,
    )
    _halo_attention_bwd_dkv_kernel[(g["NBY"] * g["NBX"] * c_kv["K_TILES"], BH)](
        q, k, v, dout, lse, delta, rh, rw, dk, dv,
        g["H"], g["WQ"], g["NBY"], g["NBX"], block, halo, g["QBLK"], g["WIN"], -(-halo // block), g["DQK"],
        g["DV"], g["NQ"], float(scale),
        *_s(q), *_s(k), *_s(v), *_s(dout), *_s(dk), *_s(dv),
        HAS_REL=has_rel, **c_kv, **o_kv,
    )
    if not has_rel:
        return dq, dk, dv, None, None
    # fixed-order reductions over programs: bit-reproducible
    return dq, dk, dv, dh_part.sum(0), dw_part.sum(0)


# ---------------------------------------------------------------------------------------------------------------
# ahead-of-time compile cases (CI compiles each for sm_90; see kernels/common.py)

def _unit_strides(channels_last: bool, prefixes) -> dict:
    """The stride the launcher sees as 1 (Triton specialises it): d for channels-last, x for channels-first."""
    return {f"s{p}{'d' if channels_last else 'x'}": 1 for p in prefixes}


_FP32_PTRS = ("lse_ptr", "delta_ptr", "rh_ptr", "rw_ptr", "dhrel_ptr", "dwrel_ptr")


def _aot(kernel, name, t, cfg, flags, units, scalars):
    c, opts = _split(cfg)
    c = dict(c, **flags, **_unit_strides(*units))
    ptrs = {a: ("fp32" if a in _FP32_PTRS else t) for a in kernel.arg_names if a.endswith("_ptr")}
    return AotCase(name, kernel, signature(kernel, ptrs, c, scalars), c, opts)


def aot_cases():
    cases = []
    # (label, block, halo, stride, Dqk, Dv): the benchmark shape, timm's stride-2 block, the widest window,
    # Dqk != Dv with the widest heads (haloregnetz: b=7, Dv=108)
    configs = [("b8h3d32", 8, 3, 1, 32, 32), ("b8h3s2d64", 8, 3, 2, 64, 64), ("b16h4d16x64", 16, 4, 1, 16, 64),
               ("b7h2d24x108", 7, 2, 1, 24, 108)]
    sc = {"sm_scale": "fp32", "pos_scale": "fp32"}
    for dt in (torch.bfloat16, torch.float32):
        t = TL_DTYPE[dt]
        for label, block, halo, stride, dqk, dv in configs:
            if dt == torch.float32 and label not in ("b8h3d32", "b7h2d24x108"):
                continue  # fp32 differs from bf16 in its dots and tile sizes only; two configs check it
            cfg = config(block, halo, stride, dqk, dv, dt)
            for cl in (False, True):
                if cl and label not in ("b8h3d32", "b7h2d24x108"):
                    continue
                lay = "cl" if cl else "cf"
                for has_rel, mask in ((True, False), (False, True)):
                    if not has_rel and label != "b8h3d32":
                        continue
                    tag = f"[{t},{lay},{label},rel={has_rel},mask={mask}]"
                    flags = {"HAS_REL": has_rel, "MASK_PAD": mask}
                    cases.append(_aot(_halo_attention_fwd_kernel, "halo_attention_fwd" + tag, t, cfg["fwd"], flags,
                                      (cl, "qkvo"), sc))
                    cases.append(_aot(_halo_attention_bwd_dq_kernel, "halo_attention_bwd_dq" + tag, t, cfg["dq"],
                                      flags, (cl, "qkvogd"), sc))
                    cases.append(_aot(_halo_attention_bwd_dkv_kernel, f"halo_attention_bwd_dkv[{t},{lay},{label},"
                                      f"rel={has_rel}]", t, cfg["dkv"], {"HAS_REL": has_rel}, (cl, "qkvgac"),
                                      {"sm_scale": "fp32"}))
    return cases
