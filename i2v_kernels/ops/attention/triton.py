"""Triton flash-attention forward for the attention family (formula in ``reference.py``).

Every mode is one strided batched problem ``[b0, b1, b2, seq, D]``: spatial attention is
``[B, T, H | S, D]``, temporal ``[B, S, H | T, D]``, dense/cross ``[B, 1, H | N, D]``. The views come
straight from the caller's ``[B, T, S, H, D]`` / ``[B, N, H, D]`` tensors (unit stride on ``D`` only),
so a packed QKV projection goes in without a copy and the output is written in the caller's layout.

Online softmax (exp2, the scale times log2 e folded into q; fp32 statistics and accumulator),
``O(seq)`` memory, sequence lengths and head dims off the tile size masked inside the kernel (head
dims up to 256 in one power-of-two tile, no padded copy). The flash kernel takes q and k already
through the QK-norm / RoPE prologue (the ``qk_norm_rope`` op runs first: fused into the loop over k
tiles, the k prologue was recomputed for every query block, 7x slower than eager on CogVideoX's dense
call on an H200). Only the packed temporal kernel fuses the prologue: it loads each head's whole
``[T, D]`` q and k once, so every element is normalized and rotated exactly once.

On a GPU the tiles, warps and stages of every kernel are autotuned per sequence bucket, head dim,
dtype and flags, over config lists pruned to the device's shared memory (see "Launch
configurations" below); the interpreter runs one heuristic config, timing nothing.
"""

from __future__ import annotations

import inspect
import itertools
import math

import torch
import triton
import triton.language as tl

from i2v_kernels import _dispatch
from i2v_kernels._backend import triton_interpreted
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


@triton.jit(do_not_specialize=["q_bucket", "k_bucket"])
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KV_LENS,
    nb1, nb2, Sq, Sk, D, q_bucket, k_bucket, qk_scale,
    sq0, sq1, sq2, sqs, sk0, sk1, sk2, sks, sv0, sv1, sv2, svs, so0, so1, so2, sos,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr, DOT_DTYPE: tl.constexpr, STORE_LSE: tl.constexpr,
):
    """Flash forward of one block of queries over all its keys. q and k come in already normalized
    and rotated (the qk_norm_rope op runs first): a prologue fused here would be recomputed on every
    k tile for every query block."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    b0, b1, b2 = _batch_index(pid_b, nb1, nb2)
    q_base = Q + b0 * sq0 + b1 * sq1 + b2 * sq2
    k_base = K + b0 * sk0 + b1 * sk1 + b2 * sk2
    v_base = V + b0 * sv0 + b1 * sv1 + b2 * sv2
    o_base = O + b0 * so0 + b1 * so1 + b2 * so2

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    m_mask = offs_m < Sq

    q = tl.load(q_base + offs_m.to(tl.int64)[:, None] * sqs + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :],
                other=0.0)
    q_poison = _row_poison(q.to(tl.float32))  # a NaN/inf anywhere in a query: its whole row NaN (semantics.py)
    q = q.to(DOT_DTYPE)  # the scale goes on the fp32 scores: q is not rounded a second time

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
        k = tl.load(k_base + cols.to(tl.int64)[:, None] * sks + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        k_poison = _row_poison(k.to(tl.float32))
        k = k.to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k)) * qk_scale + (q_poison[:, None] + k_poison[None, :])  # a NaN/inf key: NaN for
        # every row that sees it
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


@triton.jit(do_not_specialize=["q_bucket", "k_bucket"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, KV_LENS,
    nb1, nb2, Sq, Sk, D, q_bucket, k_bucket, qk_scale, scale,
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


@triton.jit(do_not_specialize=["q_bucket", "k_bucket"])
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, KV_LENS,
    nb1, nb2, Sq, Sk, D, q_bucket, k_bucket, qk_scale, scale,
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


# --------------------------------------------------------------------------------------------------
# Launch configurations. On a GPU every kernel is autotuned (``triton.autotune``) over a config list
# pruned per call to what the device's shared memory and a thread's registers can hold; the tuning is
# keyed by power-of-two sequence buckets, the head dim, the flags and (Triton adds them) the dtypes.
# The pruning returns one heuristic config instead, so that nothing is timed, under the interpreter,
# where the dispatch may not measure (I2V_KERNELS_TUNE=0, CUDA-graph capture: timing would break the
# capture; the autotuner then keeps that config for the key, so tune by one eager call before
# capturing, or with i2v_kernels.tune), and for a packed temporal call with its fused QK-norm / RoPE
# prologue (compiled with the heuristic launches only: tests/test_triton_compile.py). The flash kernels
# have no prologue: the ops run the qk_norm_rope op first, so a QK-normed call is tuned as a plain one.

#: fp32 words of accumulators and score tiles a thread may hold (of its 255 registers; the dot
#: operands may stay in shared memory) for a config to be worth timing: past it ptxas spills.
REGISTER_BUDGET = 224
_ELT = 2  # fp16 / bf16 operands (why_not)

#: Forward: BLOCK_M 64/128, BLOCK_N 32/64/128, 4 or 8 warps, 2-4 stages (the Ampere points -- 128x64 or
#: 64x64 tiles, 4 warps -- and the Hopper ones -- 128x128, 8 warps, 3-4 stages -- among them).
FWD_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)]
#: Backward dK/dV: a block of BLOCK_N keys stays, query blocks of BLOCK_M stream past it.
DKDV_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                for m in (32, 64) for n in (64, 128) for w in (4, 8) for s in (2, 3)]
#: Backward dQ: a block of BLOCK_M queries stays, key blocks of BLOCK_N stream past it.
DQ_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
              for m in (64, 128) for n in (32, 64) for w in (4, 8) for s in (2, 3)]


def _fwd_resources(m: int, n: int, d: int, stages: int) -> tuple[int, int]:
    """``(fp32 words of live tiles in the loop, shared-memory bytes)`` of a forward tile: the fp32
    accumulator, the scores and the 16-bit probabilities; q, ``stages - 1`` buffered k and v tiles and
    the probability tile in shared memory. Meant as an over-estimate of what the compiler allocates
    (tests/test_triton_compile.py compiles every kept config for each target and checks the real figure)."""
    return m * d + 3 * m * n // 2, _ELT * (m * d + (stages - 1) * 2 * n * d + m * n)


def _dkdv_resources(m: int, n: int, d: int, stages: int) -> tuple[int, int]:
    """The dK and dV accumulators and the P, dP, dS tiles; buffered q and dO tiles, k and v, and the
    transposed P and dS in shared memory."""
    return 2 * n * d + 3 * m * n, _ELT * ((stages - 1) * 2 * m * d + 2 * n * d + 2 * m * n)


def _dq_resources(m: int, n: int, d: int, stages: int) -> tuple[int, int]:
    """The dQ accumulator and the P, dP, dS tiles; buffered k and v, q and dO, and dS in shared memory."""
    return m * d + 3 * m * n, _ELT * ((stages - 1) * 2 * n * d + 2 * m * d + 2 * m * n)


def _fits(resources, tiles: tuple[int, int], block_d: int, num_warps: int, num_stages: int, smem_limit: int) -> bool:
    """Whether a config with ``tiles`` (``(BLOCK_M, BLOCK_N)``, or ``(BLOCK_H, BLOCK_T)``) at head tile
    ``block_d`` holds its live tiles in registers and fits ``smem_limit`` bytes of shared memory."""
    words, smem = resources(*tiles, block_d, num_stages)
    return words <= REGISTER_BUDGET * 32 * num_warps and smem <= smem_limit


def _flash_fits(resources, config, block_d: int, smem_limit: int) -> bool:
    tiles = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"])
    return _fits(resources, tiles, block_d, config.num_warps, config.num_stages, smem_limit)


def _timing_allowed(t: torch.Tensor) -> bool:
    """Whether the autotuner may time configs for a call on ``t``: a GPU tensor, not interpreted, and
    measuring allowed as for the dispatch (not under ``I2V_KERNELS_TUNE=0``, ``torch.compile`` tracing
    or CUDA-graph capture; a tuned entry made before is used then). Else the heuristic config runs:
    nothing beyond it is compiled or timed (a first call per key otherwise compiles and times every
    kept config)."""
    return t.device.type == "cuda" and not triton_interpreted() and _dispatch._measuring_forbidden(t.device) is None


def _smem_limit(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def _heuristic_tiles(Sq: int, Sk: int, D: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_D)`` chosen without timing: tiles by head dim, clamped to short
    sequences (the interpreter's speed depends on it)."""
    block_d = max(16, triton.next_power_of_2(D))
    short = max(16, triton.next_power_of_2(max(Sq, Sk)))
    if block_d <= 64:
        block_m, block_n = 128, 64
    elif block_d <= 128:
        block_m, block_n = 128, 32
    else:
        block_m, block_n = 64, 32
    return min(block_m, short), min(block_n, short), block_d


def _heuristic_warps(block_d: int) -> int:
    return 4 if block_d <= 64 else 8


def _fwd_heuristic(Sq: int, Sk: int, D: int) -> triton.Config:
    block_m, block_n, block_d = _heuristic_tiles(Sq, Sk, D)
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=_heuristic_warps(block_d), num_stages=2)


def _bwd_heuristic(Sq: int, Sk: int, D: int) -> triton.Config:
    block_m, block_n, block_d = _heuristic_tiles(Sq, Sk, D)
    return triton.Config({"BLOCK_M": min(block_m, 64), "BLOCK_N": block_n}, num_warps=_heuristic_warps(block_d),
                         num_stages=3)


def _pruner(resources, heuristic):
    """An ``early_config_prune`` for the flash kernels: the configs that fit the device (the heuristic
    when none does), or the heuristic alone where nothing may be timed."""

    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        fallback = heuristic(named_args["Sq"], named_args["Sk"], named_args["D"])
        if not _timing_allowed(q):
            return [fallback]
        limit = _smem_limit(q.device)
        return [c for c in configs if _flash_fits(resources, c, kwargs["BLOCK_D"], limit)] or [fallback]

    return prune


def _autotuned(kernel, configs, key, prune):
    """``triton.autotune`` of ``kernel``; the timings are kept in Triton's on-disk cache where this
    Triton can (``cache_results``), so another process on the machine does not time the key again."""
    extra = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune}, **extra)(kernel)


_FLASH_KEY = ["q_bucket", "k_bucket", "D", "CAUSAL", "HAS_KV_LENS"]
_attn_fwd = _autotuned(_attn_fwd_kernel, FWD_CONFIGS, _FLASH_KEY + ["STORE_LSE"],
                       _pruner(_fwd_resources, _fwd_heuristic))
_attn_bwd_dkdv = _autotuned(_attn_bwd_dkdv_kernel, DKDV_CONFIGS, _FLASH_KEY, _pruner(_dkdv_resources, _bwd_heuristic))
_attn_bwd_dq = _autotuned(_attn_bwd_dq_kernel, DQ_CONFIGS, _FLASH_KEY, _pruner(_dq_resources, _bwd_heuristic))


def _buckets(Sq: int, Sk: int) -> tuple[int, int]:
    """The sequence lengths' power-of-two buckets: the autotuning key (one tuning per bucket)."""
    return triton.next_power_of_2(max(Sq, 1)), triton.next_power_of_2(max(Sk, 1))


def _dense(*side):
    """The kernels index the small side tensors (kv_lens [B], norm weights and biases [D]) as packed
    arrays: a strided view (``kv_lens[::2]``, a weight sliced out of a bigger one) is copied."""
    return tuple(None if t is None else t.contiguous() for t in side)


def _strides(t: torch.Tensor) -> list[int]:
    return list(t.stride()[:4])


def _block_d(D: int) -> int:
    """Head dims up to 256 in one power-of-two tile, masked past ``D`` (no padded copy)."""
    return max(16, triton.next_power_of_2(D))


def attention_fwd(q5, k5, v5, o5, *, scale: float, causal: bool = False, kv_lens=None, lse=None):
    """Run the kernel on ``[b0, b1, b2, seq, D]`` views (unit stride on D): ``q5``, ``k5``, ``v5`` in
    (already through any QK-norm / RoPE: the ``qk_norm_rope`` op), ``o5`` written."""
    nb0, nb1, nb2, Sq, D = q5.shape
    Sk = k5.shape[3]
    if q5.numel() == 0 or Sk == 0:
        return o5
    (kv_lens,) = _dense(kv_lens)
    dummy = q5
    nb = nb0 * nb1 * nb2
    _attn_fwd[lambda meta: (nb, triton.cdiv(Sq, meta["BLOCK_M"]))](
        q5, k5, v5, o5, lse if lse is not None else dummy, kv_lens if kv_lens is not None else dummy,
        nb1, nb2, Sq, Sk, D, *_buckets(Sq, Sk), scale * math.log2(math.e),
        *_strides(q5), *_strides(k5), *_strides(v5), *_strides(o5),
        BLOCK_D=_block_d(D), CAUSAL=causal, HAS_KV_LENS=kv_lens is not None, DOT_DTYPE=dot_dtype(q5.dtype),
        STORE_LSE=lse is not None,
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
    common = dict(BLOCK_D=_block_d(D), CAUSAL=causal, HAS_KV_LENS=kv_lens is not None,
                  DOT_DTYPE=dot_dtype(q5.dtype))
    lens = kv_lens if kv_lens is not None else q5
    sizes = (nb1, nb2, Sq, Sk, D, *_buckets(Sq, Sk), scale * math.log2(math.e), scale)
    strides = [*_strides(q5), *_strides(k5), *_strides(v5), *_strides(do5)]
    nb = nb0 * nb1 * nb2
    _attn_bwd_dkdv[lambda meta: (nb, triton.cdiv(Sk, meta["BLOCK_N"]))](
        q5, k5, v5, do5, dk5, dv5, lse, delta, lens, *sizes, *strides, *_strides(dk5), *_strides(dv5), **common)
    _attn_bwd_dq[lambda meta: (nb, triton.cdiv(Sq, meta["BLOCK_M"]))](
        q5, k5, v5, do5, dq5, lse, delta, lens, *sizes, *strides, *_strides(dq5), **common)


# --------------------------------------------------------------------------------------------------
# Temporal attention's packed kernel: BLOCK_H heads of BLOCK_T frames a program, autotuned likewise

#: BLOCK_H heads a program (several (b, s, h) problems at short T) and 2-8 warps; pruned per shape to
#: the tiles a thread's registers and the block's shared memory hold.
TEMPORAL_CONFIGS = [triton.Config({"BLOCK_H": h}, num_warps=w, num_stages=1)
                    for h in (1, 2, 4, 8, 16) for w in (2, 4, 8)
                    if h < 16 or w > 2]  # 16 heads of the smallest tile (16 x 16) are more than 2 warps hold


def _temporal_resources(block_h: int, block_t: int, d: int, stages: int) -> tuple[int, int]:
    """The q, k, v and output tiles of BLOCK_H heads live at once (fp32 where the prologue and the
    NaN rules work on them: counted as three), the scores and 16-bit probabilities; the q, k, v tiles
    and the probabilities in shared memory (no loop: nothing is buffered). Compiled, 128 tile elements
    a thread spill 3.5-25 KB on sm_80 / sm_90a; the budget stops at about 64."""
    tile, scores = block_h * block_t * d, block_h * block_t * block_t
    return 3 * tile + 3 * scores // 2, _ELT * (3 * tile + scores)


def _temporal_tiles(T: int, H: int, D: int) -> tuple[int, int, int, int]:
    """``(BLOCK_H, BLOCK_T, BLOCK_D, num_warps)`` chosen without timing: as many heads a program as
    keep its tile near 8192 elements."""
    block_t = max(16, triton.next_power_of_2(T))
    block_d = _block_d(D)
    block_h = max(1, min(triton.next_power_of_2(H), 8192 // (block_t * block_d)))
    return block_h, block_t, block_d, 4 if block_h * block_t * block_d <= 4096 else 8


def _temporal_candidates(configs, T: int, H: int, D: int, smem_limit: int) -> list:
    """The configs worth timing for one shape: no more heads than H has, registers and shared memory
    that hold the tile, and at least 256 elements of it a warp (else fewer warps do the same work)."""
    _, block_t, block_d, _ = _temporal_tiles(T, H, D)
    heads = triton.next_power_of_2(H)
    return [c for c in configs if c.kwargs["BLOCK_H"] <= heads
            and _fits(_temporal_resources, (c.kwargs["BLOCK_H"], block_t), block_d, c.num_warps, 1, smem_limit)
            and (c.kwargs["BLOCK_H"] * block_t * block_d >= 256 * c.num_warps or c.num_warps == 2)]


def _temporal_prune(configs, named_args, **kwargs):
    T, H, D = named_args["T"], named_args["H"], named_args["D"]
    block_h, _, _, num_warps = _temporal_tiles(T, H, D)
    fallback = triton.Config({"BLOCK_H": block_h}, num_warps=num_warps, num_stages=1)
    if not _timing_allowed(named_args["Q"]) or kwargs["NORM"] or kwargs["ROPE"]:
        return [fallback]
    return _temporal_candidates(configs, T, H, D, _smem_limit(named_args["Q"].device)) or [fallback]


_temporal_fwd = _autotuned(_temporal_fwd_kernel, TEMPORAL_CONFIGS, ["T", "H", "D", "CAUSAL", "NORM", "ROPE"],
                           _temporal_prune)


def packed_temporal(T: int, D: int) -> bool:
    """Whether ``temporal_fwd`` runs the packed kernel (else the flash kernel) for T frames, head dim D."""
    _, block_t, block_d, _ = _temporal_tiles(T, 1, D)
    return T <= MAX_PACKED_T and block_t * block_d <= MAX_PACKED_TILE


def temporal_fwd(q, k, v, out, *, scale: float, causal: bool, qk_norm=None, q_norm_weight=None, q_norm_bias=None,
                 k_norm_weight=None, k_norm_bias=None, norm_eps=1e-6, rope=None, rope_style=None):
    """Temporal attention on the caller's ``[B, T, S, H, D]`` tensors (unit stride on D) by the packed
    kernel, for the shapes it takes (:func:`packed_temporal`; the others run :func:`attention_fwd` on
    ``[B, S, H, T, D]`` views after the qk_norm_rope op). ``rope``: ``(cos, sin)`` views of shape
    ``[B, T, S, D]`` sharing strides. The prologue is fused: each program loads its heads' whole [T, D]
    q and k tiles once, so it normalizes and rotates every element once."""
    B, T, S, H, D = q.shape
    if not packed_temporal(T, D):
        raise ValueError(f"temporal_fwd: T = {T}, D = {D} is beyond the packed kernel (packed_temporal); "
                         "run attention_fwd on [B, S, H, T, D] views")
    if q.numel() == 0:
        return out
    q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias = _dense(q_norm_weight, q_norm_bias, k_norm_weight,
                                                                    k_norm_bias)
    _, block_t, block_d, _ = _temporal_tiles(T, H, D)
    dummy = q
    cos, sin = rope if rope is not None else (dummy, dummy)
    rope_strides = [cos.stride(0), cos.stride(1), cos.stride(2)] if rope is not None else [0, 0, 0]
    # one program per BLOCK_H heads of one (b, s): B * S * H programs at most, on grid axis 0 (2**31 - 1)
    _temporal_fwd[lambda meta: (B * S * triton.cdiv(H, meta["BLOCK_H"]),)](
        q, k, v, out, cos, sin,
        q_norm_weight if q_norm_weight is not None else dummy, q_norm_bias if q_norm_bias is not None else dummy,
        k_norm_weight if k_norm_weight is not None else dummy, k_norm_bias if k_norm_bias is not None else dummy,
        S, H, T, D, scale * math.log2(math.e), norm_eps,
        *q.stride()[:4], *k.stride()[:4], *v.stride()[:4], *out.stride()[:4], *rope_strides,
        BLOCK_T=block_t, BLOCK_D=block_d, CAUSAL=causal,
        NORM=NORMS[qk_norm], HAS_QW=q_norm_weight is not None, HAS_QB=q_norm_bias is not None,
        HAS_KW=k_norm_weight is not None, HAS_KB=k_norm_bias is not None,
        ROPE=ROPES[rope_style if rope is not None else None], DOT_DTYPE=dot_dtype(q.dtype),
    )
    return out


# --------------------------------------------------------------------------------------------------
# Compile space (i2v_kernels/ops/_compile_space.py): every launch attention_fwd, attention_bwd and
# temporal_fwd can make -- every autotuning config at every head tile where it fits a target, and the
# heuristic configs of the interpreter and of CUDA-graph capture -- for the ahead-of-time compile check.

_NORM_POINTERS = ("QW", "QB", "KW", "KB")
# Norm weights and rope tables may come in any float dtype (the op checks only that they are floating
# point); modelled as q's dtype (None: no override), fp32 and fp64.
_AUX_TYPES = (None, "fp32", "fp64")


def _prologues() -> list[dict]:
    """The QK-norm / RoPE combinations the ops accept, for the packed temporal kernel's fused prologue:
    weights and biases only with a norm, no bias with RMSNorm; the fullest (LayerNorm with every weight
    and bias, RoPE) first."""
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


def _launch(config: triton.Config, **tiles) -> Launch:
    return Launch.of(config.num_warps, config.num_stages, **config.kwargs, **tiles)


def _smem_per_block(arch: str) -> int:
    from i2v_kernels.tools.resources import ARCHS

    return ARCHS[arch].smem_per_block


def _most_smem() -> int:
    from i2v_kernels.tools.resources import ARCHS

    return max(a.smem_per_block for a in ARCHS.values())


# The heuristic helpers see sequence lengths only through max(16, next_power_of_2(.)) clamped at 128
# and head dims through next_power_of_2, so these grids reach every tile they can return.
_SEQS = powers_of_two(256)
_HEAD_DIMS = range(8, MAX_D + 1)
_BLOCK_DS = sorted({_block_d(d) for d in _HEAD_DIMS})
_BWD_POINTERS = ("DQ", "DK", "DV", "LSE", "DELTA")


def _tuned_space(kernel, launches, resources, features, typical, tiles=("BLOCK_M", "BLOCK_N"), tuned=None,
                 fallback=(), **kw) -> KernelSpace:
    """The configs an autotuner times, each at every head tile where it fits the target (``fits``: the
    pruning at the target's shared-memory limit; ``fallback`` launches run on every target), with the
    flags they are timed with; each config is compiled with the plain flags of spatial attention
    (``config_feature``), the heavier ones at the largest launch and flag by flag. ``tiles``: the
    resource model's tile constexprs; ``tuned``: those a config sets (default: ``tiles``)."""

    def arch_fits(arch: str, launch: Launch) -> bool:
        t = launch.as_dict()
        return launch in fallback or _fits(resources, tuple(t[k] for k in tiles), t["BLOCK_D"], launch.num_warps,
                                          launch.num_stages, _smem_per_block(arch))

    return KernelSpace(kernel, kw.pop("dtypes", None) or _dtype_cases(), launches=lambda case: launches,
                       features=features, fits=arch_fits, tuned=tuned or tiles,
                       typical=lambda case: typical, config_feature=next(f for f in features if not f["CAUSAL"]
                                                                         and not f.get("HAS_KV_LENS")
                                                                         and not f.get("STORE_LSE")), **kw)


def _flash_launches(configs, resources) -> list[Launch]:
    return [_launch(c, BLOCK_D=d) for d in _BLOCK_DS for c in configs if _flash_fits(resources, c, d, _most_smem())]


def _heuristic_launches(heuristic) -> list[Launch]:
    return distinct_launches(lambda s, d: _launch(heuristic(s, s, d), BLOCK_D=_block_d(d)),
                             [(s, d) for s in _SEQS for d in _HEAD_DIMS])


def _temporal_launches() -> tuple[list[Launch], list[Launch]]:
    """``(heuristic launches, tuned launches)`` of the packed temporal kernel over every packed shape."""
    fallback, tuned = [], []
    for t in powers_of_two(MAX_PACKED_T):
        for d in _HEAD_DIMS:
            if not packed_temporal(t, d):
                continue
            for h in powers_of_two(64):
                block_h, block_t, block_d, num_warps = _temporal_tiles(t, h, d)
                fallback.append(Launch.of(num_warps, 1, BLOCK_H=block_h, BLOCK_T=block_t, BLOCK_D=block_d))
                tuned += [_launch(c, BLOCK_T=block_t, BLOCK_D=block_d)
                          for c in _temporal_candidates(TEMPORAL_CONFIGS, t, h, d, _most_smem())]
    return list(dict.fromkeys(fallback)), list(dict.fromkeys(tuned))


_FWD_PLAIN = [{**m, "STORE_LSE": lse, **({"LSE": "*fp32"} if lse else {})}
              for lse in (True, False) for m in _masks()]  # the causal backward recompute first: the most code
_TEMPORAL_FALLBACK, _TEMPORAL_TUNED = _temporal_launches()
_TYPICAL_TEMPORAL = _temporal_tiles(13, 30, 64)  # CogVideoX-2B, 49 frames
_BWD_FALLBACK = _heuristic_launches(_bwd_heuristic)
# The tuned spaces' typical launches are at head dim 64 (CogVideoX, and the sweeps' D 64), where every
# config is compiled that fits there (triton_aot._config_points): the compile check's time stays in
# bounds while each config meets both targets' compilers; larger head tiles are compiled by value.
_TYPICAL_BWD = _launch(_bwd_heuristic(4096, 4096, 64), BLOCK_D=64)

COMPILE_SPACES = [
    # Heuristic (untimed) launches with every flag: the interpreter, CUDA-graph capture, and (temporal
    # only: the flash kernel has none) the fused prologues.
    KernelSpace(
        _attn_fwd_kernel, _dtype_cases(), launches=lambda case: _heuristic_launches(_fwd_heuristic),
        features=_FWD_PLAIN, floats=("qk_scale",),
        typical=lambda case: _launch(_fwd_heuristic(4096, 4096, 128), BLOCK_D=128),
    ),
    KernelSpace(
        _temporal_fwd_kernel, _dtype_cases(), launches=lambda case: _TEMPORAL_FALLBACK,
        features=[dict(CAUSAL=c, **p) for c in (True, False) for p in _prologues()], floats=("qk_scale", "eps"),
        typical=lambda case: Launch.of(_TYPICAL_TEMPORAL[3], 1, BLOCK_H=_TYPICAL_TEMPORAL[0],
                                       BLOCK_T=_TYPICAL_TEMPORAL[1], BLOCK_D=_TYPICAL_TEMPORAL[2]),
    ),
    # Autotuned launches: every config where it fits the target (the packed temporal kernel's timed
    # without its fused prologue).
    _tuned_space(_attn_fwd_kernel, _flash_launches(FWD_CONFIGS, _fwd_resources), _fwd_resources, _FWD_PLAIN,
                 Launch.of(4, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_D=64), floats=("qk_scale",)),
    _tuned_space(_temporal_fwd_kernel, _TEMPORAL_TUNED, _temporal_resources,
                 [dict(CAUSAL=c, **_NO_PROLOGUE) for c in (True, False)],
                 Launch.of(4, 1, BLOCK_H=8, BLOCK_T=16, BLOCK_D=64), tiles=("BLOCK_H", "BLOCK_T"), tuned=("BLOCK_H",),
                 floats=("qk_scale", "eps")),
    # The backward has no prologue: its heuristic launches and every config, one space each.
    *[_tuned_space(kernel, list(dict.fromkeys(_BWD_FALLBACK + _flash_launches(configs, fit))), fit, _masks(),
                   _TYPICAL_BWD, fallback=_BWD_FALLBACK, floats=("qk_scale", "scale"),
                   dtypes=_dtype_cases(_BWD_POINTERS))
      for kernel, configs, fit in ((_attn_bwd_dkdv_kernel, DKDV_CONFIGS, _dkdv_resources),
                                   (_attn_bwd_dq_kernel, DQ_CONFIGS, _dq_resources))],
]
