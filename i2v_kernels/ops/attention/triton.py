"""Triton flash-attention forward for the attention family (formula in ``reference.py``).

Every mode is one strided batched problem ``[b0, b1, b2, seq, D]``: spatial attention is
``[B, T, H | S, D]``, temporal ``[B, S, H | T, D]``, dense/cross ``[B, 1, H | N, D]``. The views come
straight from the caller's ``[B, T, S, H, D]`` / ``[B, N, H, D]`` tensors (unit stride on ``D`` only),
so a packed QKV projection goes in without a copy and the output is written in the caller's layout.

Online softmax (exp2, fp32 statistics and accumulator), ``O(seq)`` memory, sequence lengths and head
dims off the tile size masked inside the kernel. The optional prologue (QK-norm over ``D``, RoPE) is
applied to the q tile once and to every k tile as it is loaded.
"""

from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl

from i2v_kernels.ops._compile_space import Dtypes, KernelSpace, Launch, distinct_launches, pointers, powers_of_two
from i2v_kernels.ops._triton_utils import TL_DTYPES, dot_dtype

NORMS = {None: 0, "layer": 1, "rms": 2}
ROPES = {None: 0, "interleaved": 1, "half": 2}
MAX_D = 256
MAX_PACKED_T = 128  # temporal attention up to this many frames runs the packed kernel ...
# ... when one head's [T, D] tile (powers of two) is at most this big. Larger tiles spill by the
# thousand (4,684 spill stores at T 64, D 128 on sm_90a; 28,381 at T 128, D 256) and take minutes in
# ptxas (benchmarks/results/static_*.md): temporal_fwd runs the flash kernel for them.
MAX_PACKED_TILE = 4096


@triton.jit
def _load_prologue(base, row_offs, rope_offs, offs_d, D, row_mask, w_ptr, b_ptr, cos_base, sin_base,
                   eps, NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ROPE: tl.constexpr):
    """Load a [rows, D] tile (fp32) whose rows start at ``base + row_offs`` and apply QK-norm then RoPE
    (cos/sin rows at ``rope_offs``); padded rows/dims come back as 0."""
    d_mask = offs_d < D
    mask = row_mask[:, None] & d_mask[None, :]
    row_offs = row_offs[:, None]
    x = tl.load(base + row_offs + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    if ROPE != 0:
        if ROPE == 1:
            partner = offs_d ^ 1
            sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
        else:
            half = D // 2
            partner = tl.where(offs_d < half, offs_d + half, offs_d - half)
            sign = tl.where(offs_d < half, -1.0, 1.0)
        xp = tl.load(base + row_offs + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    if NORM != 0:
        if NORM == 1:
            mean = tl.sum(x, axis=1) / D
            x = tl.where(mask, x - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
            if ROPE != 0:
                xp = xp - mean[:, None]
        else:
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        x = x * rstd[:, None]
        if ROPE != 0:
            xp = xp * rstd[:, None]
        if HAS_W:
            x = x * tl.load(w_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
            if ROPE != 0:
                xp = xp * tl.load(w_ptr + partner, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            x = x + tl.load(b_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
            if ROPE != 0:
                xp = xp + tl.load(b_ptr + partner, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    if ROPE != 0:
        rope_2d = rope_offs[:, None] + offs_d[None, :]
        cos = tl.load(cos_base + rope_2d, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_base + rope_2d, mask=mask, other=0.0).to(tl.float32)
        x = x * cos + sign[None, :] * xp * sin
    return tl.where(mask, x, 0.0)


@triton.jit
def _row_poison(x):
    """Per row of a [rows, D] fp32 tile: 0, or NaN when the row holds a NaN or an infinity."""
    return tl.sum(x * 0.0, axis=1)


@triton.jit
def _finite_values(v):
    """``v`` [..., D] with NaN/inf zeroed, and where they were (a value tile of a causal problem: a
    future key's value is loaded with the tile but must not leak through ``0 * NaN``)."""
    vf = v.to(tl.float32)
    bad = (vf != vf) | (tl.abs(vf) == float("inf"))
    return tl.where(bad, tl.zeros_like(v), v), bad


@triton.jit
def _poison_values(out, keep, bad, DOT_DTYPE: tl.constexpr):
    """``out`` [..., M, D] with NaN where its row keeps (``keep`` [..., M, N]) a key whose value was
    non-finite (``bad`` [..., N, D]). Only a tile that holds one pays for the count (one ``tl.dot``)."""
    if tl.max(tl.ravel(bad.to(tl.int32)), axis=0) > 0:
        seen = tl.dot(keep.to(DOT_DTYPE), bad.to(DOT_DTYPE), out_dtype=tl.float32)
        out = tl.where(seen > 0, float("nan"), out)
    return out


@triton.jit
def _batch_index(pid_b, nb1, nb2):
    """Split a flat program index over the three batch dims ``[b0, b1, b2]`` (b0 outermost)."""
    rest = pid_b // nb2
    return rest // nb1, rest % nb1, pid_b % nb2


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KV_LENS, COS, SIN, QW, QB, KW, KB,
    nb1, nb2, Sq, Sk, D, qk_scale, eps,
    sq0, sq1, sq2, sqs, sk0, sk1, sk2, sks, sv0, sv1, sv2, svs, so0, so1, so2, sos, sc0, sc1, sc2, scs,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr,
    NORM: tl.constexpr, HAS_QW: tl.constexpr, HAS_QB: tl.constexpr, HAS_KW: tl.constexpr, HAS_KB: tl.constexpr,
    ROPE: tl.constexpr, DOT_DTYPE: tl.constexpr, STORE_LSE: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    b0, b1, b2 = _batch_index(pid_b, nb1, nb2)
    q_base = Q + b0 * sq0 + b1 * sq1 + b2 * sq2
    k_base = K + b0 * sk0 + b1 * sk1 + b2 * sk2
    v_base = V + b0 * sv0 + b1 * sv1 + b2 * sv2
    o_base = O + b0 * so0 + b1 * so1 + b2 * so2
    c_off = b0 * sc0 + b1 * sc1 + b2 * sc2

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    m_mask = offs_m < Sq

    q = _load_prologue(q_base, offs_m.to(tl.int64) * sqs, offs_m.to(tl.int64) * scs, offs_d, D, m_mask, QW, QB,
                       COS + c_off, SIN + c_off, eps, NORM, HAS_QW, HAS_QB, ROPE)
    q = q + _row_poison(q)[:, None]  # a NaN/inf anywhere in a query makes its whole row NaN (semantics.py)
    q = (q * qk_scale).to(K.dtype.element_ty).to(DOT_DTYPE)

    kv_len = Sk
    if HAS_KV_LENS:
        kv_len = tl.minimum(tl.load(KV_LENS + b0).to(tl.int32), Sk)
    hi = kv_len
    if CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        n_mask = cols < kv_len
        k = _load_prologue(k_base, cols.to(tl.int64) * sks, cols.to(tl.int64) * scs, offs_d, D, n_mask, KW, KB,
                           COS + c_off, SIN + c_off, eps, NORM, HAS_KW, HAS_KB, ROPE)
        k_poison = _row_poison(k)
        k = k.to(K.dtype.element_ty).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k)) + k_poison[None, :]  # a NaN/inf key: NaN for every row that sees it
        keep = n_mask[None, :]
        if CAUSAL:
            keep = keep & (offs_m[:, None] >= cols[None, :])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols.to(tl.int64)[:, None] * svs + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        if CAUSAL:  # a future key's value is loaded but must not leak through 0 * NaN into earlier rows
            v, bad = _finite_values(v)
            acc = _poison_values(acc, keep, bad, DOT_DTYPE)  # NaN stays NaN through the rescaling
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(DOT_DTYPE), v.to(DOT_DTYPE))
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_base + offs_m.to(tl.int64)[:, None] * sos + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])
    if STORE_LSE:  # log2-domain log-sum-exp of the scaled scores, for the backward
        tl.store(LSE + pid_b * Sq + offs_m, m_i + tl.math.log2(l_i), mask=m_mask)


@triton.jit
def _bwd_tile(q, k, v, do, lse, delta, keep, qk_scale, DOT_DTYPE: tl.constexpr):
    """Recompute P for one [M, N] tile from the saved log-sum-exp; return (P, dS) in fp32."""
    s = tl.dot(q, tl.trans(k)) * qk_scale
    p = tl.where(keep, tl.math.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v))
    return p, p * (dp - delta[:, None])


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, KV_LENS,
    nb1, nb2, Sq, Sk, D, qk_scale, scale,
    sq0, sq1, sq2, sqs, sk0, sk1, sk2, sks, sv0, sv1, sv2, svs, sdo0, sdo1, sdo2, sdos,
    sdk0, sdk1, sdk2, sdks, sdv0, sdv1, sdv2, sdvs,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """dK, dV for one block of keys, looping over the query blocks that see it."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    b0, b1, b2 = _batch_index(pid_b, nb1, nb2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    kv_len = Sk
    if HAS_KV_LENS:
        kv_len = tl.minimum(tl.load(KV_LENS + b0).to(tl.int32), Sk)
    n_mask = offs_n < kv_len
    rows_n = offs_n.to(tl.int64)[:, None]
    nd_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(K + b0 * sk0 + b1 * sk1 + b2 * sk2 + rows_n * sks + offs_d[None, :], mask=nd_mask, other=0.0)
    v = tl.load(V + b0 * sv0 + b1 * sv1 + b2 * sv2 + rows_n * svs + offs_d[None, :], mask=nd_mask, other=0.0)
    k = k.to(DOT_DTYPE)
    v = v.to(DOT_DTYPE)
    q_base = Q + b0 * sq0 + b1 * sq1 + b2 * sq2
    do_base = DO + b0 * sdo0 + b1 * sdo1 + b2 * sdo2
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = 0
    if CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for start_m in range(lo, Sq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < Sq
        rows_m = offs_m.to(tl.int64)[:, None]
        md_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(q_base + rows_m * sqs + offs_d[None, :], mask=md_mask, other=0.0).to(DOT_DTYPE)
        do = tl.load(do_base + rows_m * sdos + offs_d[None, :], mask=md_mask, other=0.0).to(DOT_DTYPE)
        lse = tl.load(LSE + pid_b * Sq + offs_m, mask=m_mask, other=0.0)
        delta = tl.load(DELTA + pid_b * Sq + offs_m, mask=m_mask, other=0.0)
        keep = m_mask[:, None] & n_mask[None, :]
        if CAUSAL:
            keep = keep & (offs_m[:, None] >= offs_n[None, :])
        p, ds = _bwd_tile(q, k, v, do, lse, delta, keep, qk_scale, DOT_DTYPE)
        dv += tl.dot(tl.trans(p.to(DO.dtype.element_ty).to(DOT_DTYPE)), do)
        dk += tl.dot(tl.trans(ds.to(Q.dtype.element_ty).to(DOT_DTYPE)), q)
    out_mask = (offs_n < Sk)[:, None] & d_mask[None, :]
    tl.store(DK + b0 * sdk0 + b1 * sdk1 + b2 * sdk2 + rows_n * sdks + offs_d[None, :], dk * scale, mask=out_mask)
    tl.store(DV + b0 * sdv0 + b1 * sdv1 + b2 * sdv2 + rows_n * sdvs + offs_d[None, :], dv, mask=out_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, KV_LENS,
    nb1, nb2, Sq, Sk, D, qk_scale, scale,
    sq0, sq1, sq2, sqs, sk0, sk1, sk2, sks, sv0, sv1, sv2, svs, sdo0, sdo1, sdo2, sdos,
    sdq0, sdq1, sdq2, sdqs,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """dQ for one block of queries, looping over the keys it sees."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    b0, b1, b2 = _batch_index(pid_b, nb1, nb2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    m_mask = offs_m < Sq
    rows_m = offs_m.to(tl.int64)[:, None]
    md_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + b0 * sq0 + b1 * sq1 + b2 * sq2 + rows_m * sqs + offs_d[None, :], mask=md_mask, other=0.0)
    do = tl.load(DO + b0 * sdo0 + b1 * sdo1 + b2 * sdo2 + rows_m * sdos + offs_d[None, :], mask=md_mask, other=0.0)
    q = q.to(DOT_DTYPE)
    do = do.to(DOT_DTYPE)
    lse = tl.load(LSE + pid_b * Sq + offs_m, mask=m_mask, other=0.0)
    delta = tl.load(DELTA + pid_b * Sq + offs_m, mask=m_mask, other=0.0)
    kv_len = Sk
    if HAS_KV_LENS:
        kv_len = tl.minimum(tl.load(KV_LENS + b0).to(tl.int32), Sk)
    hi = kv_len
    if CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M)
    k_base = K + b0 * sk0 + b1 * sk1 + b2 * sk2
    v_base = V + b0 * sv0 + b1 * sv1 + b2 * sv2
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < kv_len
        rows_n = offs_n.to(tl.int64)[:, None]
        nd_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + rows_n * sks + offs_d[None, :], mask=nd_mask, other=0.0).to(DOT_DTYPE)
        v = tl.load(v_base + rows_n * svs + offs_d[None, :], mask=nd_mask, other=0.0).to(DOT_DTYPE)
        keep = m_mask[:, None] & n_mask[None, :]
        if CAUSAL:
            keep = keep & (offs_m[:, None] >= offs_n[None, :])
        p, ds = _bwd_tile(q, k, v, do, lse, delta, keep, qk_scale, DOT_DTYPE)
        dq += tl.dot(ds.to(Q.dtype.element_ty).to(DOT_DTYPE), k)
    tl.store(DQ + b0 * sdq0 + b1 * sdq1 + b2 * sdq2 + rows_m * sdqs + offs_d[None, :], dq * scale, mask=md_mask)


@triton.jit
def _temporal_fwd_kernel(
    Q, K, V, O, COS, SIN, QW, QB, KW, KB,
    S, H, T, D, qk_scale, eps,
    sqb, sqt, sqs, sqh, skb, skt, sks, skh, svb, svt, svs, svh, sob, sot, sos, soh, scb, sct, scs,
    BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    NORM: tl.constexpr, HAS_QW: tl.constexpr, HAS_QB: tl.constexpr, HAS_KW: tl.constexpr, HAS_KB: tl.constexpr,
    ROPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """Temporal attention for short T: one program takes BLOCK_H heads of one (b, s) position, the
    whole [T, T] score block of each in registers, one pass of softmax. Rows (head, frame) of the tile
    are read as whole contiguous head vectors, adjacent heads next to each other."""
    n_hb = tl.cdiv(H, BLOCK_H)
    pid = tl.program_id(0).to(tl.int64)
    hb = pid % n_hb
    rest = pid // n_hb
    s = rest % S
    b = rest // S
    rows = tl.arange(0, BLOCK_H * BLOCK_T)
    h = hb * BLOCK_H + rows // BLOCK_T
    t = (rows % BLOCK_T).to(tl.int64)
    row_mask = (h < H) & (t < T)
    h = h.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    rope_offs = t * sct
    c_off = b * scb + s * scs

    q = _load_prologue(Q + b * sqb + s * sqs, h * sqh + t * sqt, rope_offs, offs_d, D, row_mask, QW, QB,
                       COS + c_off, SIN + c_off, eps, NORM, HAS_QW, HAS_QB, ROPE)
    k = _load_prologue(K + b * skb + s * sks, h * skh + t * skt, rope_offs, offs_d, D, row_mask, KW, KB,
                       COS + c_off, SIN + c_off, eps, NORM, HAS_KW, HAS_KB, ROPE)
    mask = row_mask[:, None] & (offs_d < D)[None, :]
    v = tl.load(V + b * svb + s * svs + (h * svh + t * svt)[:, None] + offs_d[None, :], mask=mask, other=0.0)
    q = q + _row_poison(q)[:, None]  # NaN/inf rules of semantics.py, as in _attn_fwd_kernel
    k_poison = tl.reshape(_row_poison(k), (BLOCK_H, BLOCK_T))
    q = tl.reshape((q * qk_scale).to(V.dtype.element_ty).to(DOT_DTYPE), (BLOCK_H, BLOCK_T, BLOCK_D))
    k = tl.reshape(k.to(V.dtype.element_ty).to(DOT_DTYPE), (BLOCK_H, BLOCK_T, BLOCK_D))

    scores = tl.dot(q, tl.permute(k, (0, 2, 1))) + k_poison[:, None, :]  # [BLOCK_H, T_q, T_k]
    tq = tl.arange(0, BLOCK_T)[None, :, None]
    tk = tl.arange(0, BLOCK_T)[None, None, :]
    keep = tk < T
    if CAUSAL:
        keep = keep & (tk <= tq)
        v, bad = _finite_values(v)
    v = tl.reshape(v.to(DOT_DTYPE), (BLOCK_H, BLOCK_T, BLOCK_D))
    scores = tl.where(keep, scores, float("-inf"))
    p = tl.math.exp2(scores - tl.max(scores, axis=2)[:, :, None])
    out = tl.dot(p.to(V.dtype.element_ty).to(DOT_DTYPE), v) / tl.sum(p, axis=2)[:, :, None]  # [BLOCK_H, T, BLOCK_D]
    if CAUSAL:
        out = _poison_values(out, tl.broadcast_to(keep, (BLOCK_H, BLOCK_T, BLOCK_T)),
                             tl.reshape(bad, (BLOCK_H, BLOCK_T, BLOCK_D)), DOT_DTYPE)
    out = tl.reshape(out, (BLOCK_H * BLOCK_T, BLOCK_D))
    tl.store(O + b * sob + s * sos + (h * soh + t * sot)[:, None] + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=mask)


def why_not(q: torch.Tensor) -> str | None:
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"the Triton attention kernel supports float16/bfloat16, not {q.dtype}"
    if q.shape[-1] > MAX_D or q.shape[-1] < 8:
        return f"head dim D = {q.shape[-1]} is outside the Triton kernel's 8..{MAX_D}"
    return None


def _tiles(Sq: int, Sk: int, D: int) -> tuple[int, int, int]:
    block_d = max(16, triton.next_power_of_2(D))
    short = max(16, triton.next_power_of_2(max(Sq, Sk)))
    if block_d <= 64:
        block_m, block_n = 128, 64
    elif block_d <= 128:
        block_m, block_n = 128, 32
    else:
        block_m, block_n = 64, 32
    return min(block_m, short), min(block_n, short), block_d


def _bwd_tiles(Sq: int, Sk: int, D: int) -> tuple[int, int, int]:
    block_m, block_n, block_d = _tiles(Sq, Sk, D)
    return min(block_m, 64), block_n, block_d


def _num_warps(block_d: int) -> int:
    return 4 if block_d <= 64 else 8


_FWD_STAGES = 2


def _dense(*side):
    """The kernels index the small side tensors (kv_lens [B], norm weights and biases [D]) as packed
    arrays: a strided view (``kv_lens[::2]``, a weight sliced out of a bigger one) is copied."""
    return tuple(None if t is None else t.contiguous() for t in side)


def _strides(t: torch.Tensor) -> list[int]:
    return list(t.stride()[:4])


def attention_fwd(q5, k5, v5, o5, *, scale: float, causal: bool = False, kv_lens=None, qk_norm=None,
                  q_norm_weight=None, q_norm_bias=None, k_norm_weight=None, k_norm_bias=None, norm_eps=1e-6,
                  rope5=None, rope_style=None, lse=None):
    """Run the kernel on ``[b0, b1, b2, seq, D]`` views (unit stride on D): ``q5``, ``k5``, ``v5`` in,
    ``o5`` written. ``rope5``: ``(cos, sin)`` views with ``q5``'s shape (stride 0 across heads)."""
    nb0, nb1, nb2, Sq, D = q5.shape
    Sk = k5.shape[3]
    if q5.numel() == 0 or Sk == 0:
        return o5
    kv_lens, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias = _dense(
        kv_lens, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias)
    block_m, block_n, block_d = _tiles(Sq, Sk, D)
    num_warps = _num_warps(block_d)
    operand_dtype = dot_dtype(q5.dtype)
    dummy = q5
    cos, sin = rope5 if rope5 is not None else (dummy, dummy)
    grid = (nb0 * nb1 * nb2, triton.cdiv(Sq, block_m))
    _attn_fwd_kernel[grid](
        q5, k5, v5, o5, lse if lse is not None else dummy, kv_lens if kv_lens is not None else dummy, cos, sin,
        q_norm_weight if q_norm_weight is not None else dummy, q_norm_bias if q_norm_bias is not None else dummy,
        k_norm_weight if k_norm_weight is not None else dummy, k_norm_bias if k_norm_bias is not None else dummy,
        nb1, nb2, Sq, Sk, D, scale * math.log2(math.e), norm_eps,
        *_strides(q5), *_strides(k5), *_strides(v5), *_strides(o5), *(_strides(cos) if rope5 is not None else [0] * 4),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, CAUSAL=causal, HAS_KV_LENS=kv_lens is not None,
        NORM=NORMS[qk_norm], HAS_QW=q_norm_weight is not None, HAS_QB=q_norm_bias is not None,
        HAS_KW=k_norm_weight is not None, HAS_KB=k_norm_bias is not None,
        ROPE=ROPES[rope_style if rope5 is not None else None], DOT_DTYPE=operand_dtype, STORE_LSE=lse is not None,
        num_warps=num_warps, num_stages=_FWD_STAGES,
    )
    return o5


def attention_bwd(q5, k5, v5, do5, dq5, dk5, dv5, *, scale: float, causal: bool = False, kv_lens=None,
                  grad_lse=None):
    """Flash-attention backward on ``[b0, b1, b2, seq, D]`` views (post-prologue q and k): recomputes
    the forward for its log-sum-exp, then one kernel for dK/dV and one for dQ. ``dq5``, ``dk5``,
    ``dv5`` are fp32 views written in full. ``grad_lse`` (``b0 * b1 * b2 * seq`` values): the gradient
    of a natural-log log-sum-exp output as well; ``d lse / d s = P``, so it enters as ``delta - dlse``."""
    nb0, nb1, nb2, Sq, D = q5.shape
    Sk = k5.shape[3]
    if q5.numel() == 0 or Sk == 0:
        return
    (kv_lens,) = _dense(kv_lens)
    o5 = torch.empty(q5.shape, dtype=q5.dtype, device=q5.device)
    lse = torch.empty(nb0 * nb1 * nb2, Sq, dtype=torch.float32, device=q5.device)
    attention_fwd(q5, k5, v5, o5, scale=scale, causal=causal, kv_lens=kv_lens, lse=lse)
    delta = (do5.float() * o5.float()).sum(-1).reshape(-1, Sq)
    if grad_lse is not None:
        delta = delta - grad_lse.float().reshape(-1, Sq)
    delta = delta.contiguous()
    block_m, block_n, block_d = _bwd_tiles(Sq, Sk, D)
    num_warps = _num_warps(block_d)
    operand_dtype = dot_dtype(q5.dtype)
    common = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, CAUSAL=causal,
                  HAS_KV_LENS=kv_lens is not None, DOT_DTYPE=operand_dtype, num_warps=num_warps)
    lens = kv_lens if kv_lens is not None else q5
    qk_scale = scale * math.log2(math.e)
    strides = [*_strides(q5), *_strides(k5), *_strides(v5), *_strides(do5)]
    _attn_bwd_dkdv_kernel[(nb0 * nb1 * nb2, triton.cdiv(Sk, block_n))](
        q5, k5, v5, do5, dk5, dv5, lse, delta, lens, nb1, nb2, Sq, Sk, D, qk_scale, scale,
        *strides, *_strides(dk5), *_strides(dv5), **common)
    _attn_bwd_dq_kernel[(nb0 * nb1 * nb2, triton.cdiv(Sq, block_m))](
        q5, k5, v5, do5, dq5, lse, delta, lens, nb1, nb2, Sq, Sk, D, qk_scale, scale,
        *strides, *_strides(dq5), **common)


def _temporal_tiles(T: int, H: int, D: int) -> tuple[int, int, int, int]:
    """``(BLOCK_H, BLOCK_T, BLOCK_D, num_warps)`` of the packed temporal kernel: as many heads a
    program as keep its tile near 8192 elements."""
    block_t = max(16, triton.next_power_of_2(T))
    block_d = max(16, triton.next_power_of_2(D))
    block_h = max(1, min(triton.next_power_of_2(H), 8192 // (block_t * block_d)))
    return block_h, block_t, block_d, 4 if block_h * block_t * block_d <= 4096 else 8


def packed_temporal(T: int, D: int) -> bool:
    """Whether ``temporal_fwd`` runs the packed kernel (else the flash kernel) for T frames, head dim D."""
    _, block_t, block_d, _ = _temporal_tiles(T, 1, D)
    return T <= MAX_PACKED_T and block_t * block_d <= MAX_PACKED_TILE


def temporal_fwd(q, k, v, out, *, scale: float, causal: bool, qk_norm=None, q_norm_weight=None, q_norm_bias=None,
                 k_norm_weight=None, k_norm_bias=None, norm_eps=1e-6, rope=None, rope_style=None):
    """Temporal attention on the caller's ``[B, T, S, H, D]`` tensors (unit stride on D), ``T <=
    MAX_PACKED_T``: the packed kernel, or the flash kernel where its tile would be too big
    (:func:`packed_temporal`). ``rope``: ``(cos, sin)`` views of shape ``[B, T, S, D]`` sharing strides."""
    B, T, S, H, D = q.shape
    if q.numel() == 0:
        return out
    q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias = _dense(q_norm_weight, q_norm_bias, k_norm_weight,
                                                                    k_norm_bias)
    if not packed_temporal(T, D):
        def seq(t):  # [B, S, H, T, D]: the flash kernel's [b0, b1, b2, seq, D] view, no copy
            return t.permute(0, 2, 3, 1, 4)

        rope5 = None if rope is None else tuple(seq(t.unsqueeze(3).expand(q.shape)) for t in rope)
        attention_fwd(seq(q), seq(k), seq(v), seq(out), scale=scale, causal=causal, qk_norm=qk_norm,
                      q_norm_weight=q_norm_weight, q_norm_bias=q_norm_bias, k_norm_weight=k_norm_weight,
                      k_norm_bias=k_norm_bias, norm_eps=norm_eps, rope5=rope5, rope_style=rope_style)
        return out
    block_h, block_t, block_d, num_warps = _temporal_tiles(T, H, D)
    operand_dtype = dot_dtype(q.dtype)
    dummy = q
    cos, sin = rope if rope is not None else (dummy, dummy)
    rope_strides = [cos.stride(0), cos.stride(1), cos.stride(2)] if rope is not None else [0, 0, 0]
    grid = (B * S * triton.cdiv(H, block_h),)
    _temporal_fwd_kernel[grid](
        q, k, v, out, cos, sin,
        q_norm_weight if q_norm_weight is not None else dummy, q_norm_bias if q_norm_bias is not None else dummy,
        k_norm_weight if k_norm_weight is not None else dummy, k_norm_bias if k_norm_bias is not None else dummy,
        S, H, T, D, scale * math.log2(math.e), norm_eps,
        *q.stride()[:4], *k.stride()[:4], *v.stride()[:4], *out.stride()[:4], *rope_strides,
        BLOCK_H=block_h, BLOCK_T=block_t, BLOCK_D=block_d, CAUSAL=causal,
        NORM=NORMS[qk_norm], HAS_QW=q_norm_weight is not None, HAS_QB=q_norm_bias is not None,
        HAS_KW=k_norm_weight is not None, HAS_KB=k_norm_bias is not None,
        ROPE=ROPES[rope_style if rope is not None else None], DOT_DTYPE=operand_dtype,
        num_warps=num_warps,
    )
    return out


# --------------------------------------------------------------------------------------------------
# Compile space (i2v_kernels/ops/_compile_space.py): every launch attention_fwd, attention_bwd and
# temporal_fwd can make, for the ahead-of-time compile check.

_NORM_POINTERS = ("QW", "QB", "KW", "KB")
# Norm weights and rope tables may come in any float dtype (the op checks only that they are floating
# point); modelled as q's dtype (None: no override), fp32 and fp64.
_AUX_TYPES = (None, "fp32", "fp64")


def _prologues() -> list[dict]:
    """The QK-norm / RoPE combinations the ops accept: weights and biases only with a norm, no bias
    with RMSNorm; the fullest (LayerNorm with every weight and bias, RoPE) first."""
    out = []
    for rope, rope_type in [(r, t) for r in (ROPES["half"], ROPES["interleaved"]) for t in _AUX_TYPES] + [(0, None)]:
        for norm, allowed in ((NORMS["layer"], _NORM_POINTERS), (NORMS["rms"], ("QW", "KW")), (0, ())):
            for present in itertools.product((True, False), repeat=len(allowed)):
                given = [name for name, p in zip(allowed, present) if p]
                for weight_type in _AUX_TYPES if given else (None,):
                    f = dict(NORM=norm, ROPE=rope, **{f"HAS_{name}": name in given for name in _NORM_POINTERS})
                    f.update({name: f"*{t}" for name, t in ((n, weight_type) for n in given) if t})
                    if rope_type:
                        f.update(COS=f"*{rope_type}", SIN=f"*{rope_type}")
                    out.append(f)
    return out


def _masks() -> list[dict]:
    """(CAUSAL, HAS_KV_LENS) by mode: temporal (causal or not), spatial, dense/cross with int32 or
    int64 kv_lens."""
    return [dict(CAUSAL=True, HAS_KV_LENS=False), dict(CAUSAL=False, HAS_KV_LENS=False)] + [
        dict(CAUSAL=False, HAS_KV_LENS=True, KV_LENS=f"*{t}") for t in ("i32", "i64")]


_NO_PROLOGUE = dict(NORM=0, ROPE=0, HAS_QW=False, HAS_QB=False, HAS_KW=False, HAS_KB=False)


def _dtype_cases(fp32_pointers=()) -> list[Dtypes]:
    """fp16 and bf16 (``why_not``); dot operands in the input dtype as on a GPU (``dot_dtype``)."""
    return [Dtypes(name, {**pointers(("Q", "K", "V", "O", "DO", "COS", "SIN", "LSE", "KV_LENS") + _NORM_POINTERS, name),
                          **pointers(fp32_pointers, "fp32")}, dict(DOT_DTYPE=TL_DTYPES[dtype]))
            for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16))]


def _fwd_launch(S: int, D: int) -> Launch:
    block_m, block_n, block_d = _tiles(S, S, D)
    return Launch.of(_num_warps(block_d), _FWD_STAGES, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)


def _bwd_launch(S: int, D: int) -> Launch:
    block_m, block_n, block_d = _bwd_tiles(S, S, D)
    return Launch.of(_num_warps(block_d), None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)


def _temporal_launch(T: int, H: int, D: int) -> Launch:
    block_h, block_t, block_d, num_warps = _temporal_tiles(T, H, D)
    return Launch.of(num_warps, None, BLOCK_H=block_h, BLOCK_T=block_t, BLOCK_D=block_d)


# The tile helpers see sequence lengths only through max(16, next_power_of_2(.)) clamped at 128 and
# head dims through next_power_of_2, so these grids reach every tile they can return.
_SEQS = powers_of_two(256)
_HEAD_DIMS = range(8, MAX_D + 1)
_BWD_POINTERS = ("DQ", "DK", "DV", "LSE", "DELTA")

COMPILE_SPACES = [
    KernelSpace(
        _attn_fwd_kernel, _dtype_cases(),
        launches=lambda case: distinct_launches(_fwd_launch, [(s, d) for s in _SEQS for d in _HEAD_DIMS]),
        # forward calls (with any prologue), then the backward's recompute (post-prologue q and k)
        features=[{**m, **p, "STORE_LSE": False} for m in _masks() for p in _prologues()]
        + [{**m, **_NO_PROLOGUE, "STORE_LSE": True, "LSE": "*fp32"} for m in _masks()],
        floats=("qk_scale", "eps"), typical=lambda case: _fwd_launch(4096, 128),
    ),
    *[KernelSpace(
        kernel, _dtype_cases(_BWD_POINTERS),
        launches=lambda case: distinct_launches(_bwd_launch, [(s, d) for s in _SEQS for d in _HEAD_DIMS]),
        features=_masks(), floats=("qk_scale", "scale"), typical=lambda case: _bwd_launch(4096, 128),
    ) for kernel in (_attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel)],
    KernelSpace(
        _temporal_fwd_kernel, _dtype_cases(),
        launches=lambda case: distinct_launches(
            _temporal_launch, [(t, h, d) for t in powers_of_two(MAX_PACKED_T) for h in powers_of_two(64)
                               for d in _HEAD_DIMS if packed_temporal(t, d)]),
        features=[dict(CAUSAL=c, **p) for c in (True, False) for p in _prologues()],
        floats=("qk_scale", "eps"), typical=lambda case: _temporal_launch(13, 30, 64),  # CogVideoX-2B, 49 frames
    ),
]
