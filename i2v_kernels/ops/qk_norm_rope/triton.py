"""Triton kernel of ``qk_norm_rope`` (see ``attention.reference.prologue`` for the formula).

One program takes ``ROWS`` rows -- a row is one (token, head) vector of ``D`` -- of q *and* the same
rows of k, so the RoPE table rows are loaded once for both. A row is held as two halves ``(a, b)`` of
``BLOCK_H`` lanes, the two members of each RoPE pair: for the interleaved style the row is loaded
contiguously and split as ``[ROWS, BLOCK_H, 2]`` (no gathers), for the half style the halves are two
contiguous loads. Statistics and math in fp32, rows addressed with int64 offsets through up to four
coalesced leading dims (strided q/k views of a packed QKV projection are read in place).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from i2v_kernels.ops._compile_space import Dtypes, KernelSpace, Launch, combinations, distinct_launches, pointers
from i2v_kernels.ops._rows import coalesce_rows, padded_rows
from i2v_kernels.ops.adaln.triton import _row_offsets

MAX_DIMS = 4
MAX_D = 256
NORM_CODES = {None: 0, "layer": 1, "rms": 2}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _load_pairs(ptr, offs, row_mask, D, HALF_STYLE: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
                ALIGN: tl.constexpr):
    """Rows starting at ``ptr + offs`` as the pair halves ``(a, b)``, ``[ROWS, BLOCK_H]`` each, fp32."""
    if HALF_STYLE:
        h = tl.arange(0, BLOCK_H)
        mask = row_mask[:, None] & (h // ALIGN < D // 2 // ALIGN)[None, :]  # h < D/2, blockwise
        a = tl.load(ptr + offs[:, None] + h[None, :], mask=mask, other=0.0)
        offs_b = tl.multiple_of(offs + D // 2, ALIGN)
        b = tl.load(ptr + offs_b[:, None] + h[None, :], mask=mask, other=0.0)
    else:
        # a contiguous (vectorized) load, then split as [ROWS, BLOCK_H, 2]: each thread holds whole
        # pairs, so the split moves no data
        cols = tl.arange(0, 2 * BLOCK_H)
        mask = row_mask[:, None] & (cols // ALIGN < D // ALIGN)[None, :]  # cols < D, constant over ALIGN lanes
        x = tl.load(ptr + offs[:, None] + cols[None, :], mask=mask, other=0.0)
        a, b = tl.split(tl.reshape(x, (ROWS, BLOCK_H, 2)))
    return a.to(tl.float32), b.to(tl.float32)


@triton.jit
def _store_pairs(ptr, offs, row_mask, a, b, D, HALF_STYLE: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
                 ALIGN: tl.constexpr):
    a = a.to(ptr.dtype.element_ty)
    b = b.to(ptr.dtype.element_ty)
    if HALF_STYLE:
        h = tl.arange(0, BLOCK_H)
        mask = row_mask[:, None] & (h // ALIGN < D // 2 // ALIGN)[None, :]  # h < D/2, blockwise
        tl.store(ptr + offs[:, None] + h[None, :], a, mask=mask)
        offs_b = tl.multiple_of(offs + D // 2, ALIGN)
        tl.store(ptr + offs_b[:, None] + h[None, :], b, mask=mask)
    else:
        cols = tl.arange(0, 2 * BLOCK_H)
        mask = row_mask[:, None] & (cols // ALIGN < D // ALIGN)[None, :]  # cols < D, constant over ALIGN lanes
        tl.store(ptr + offs[:, None] + cols[None, :], tl.reshape(tl.join(a, b), (ROWS, 2 * BLOCK_H)), mask=mask)


@triton.jit
def _norm_rope_rows(src_ptr, dst_ptr, w_ptr, b_ptr, src_offs, dst_offs, row_mask, cos_a, cos_b, sin_a, sin_b,
                    D, eps, NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ROPE: tl.constexpr,
                    HALF_STYLE: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr, ALIGN: tl.constexpr):
    """Normalize (NORM 1 LayerNorm, 2 RMSNorm), apply the affine, rotate and store ROWS rows."""
    a, b = _load_pairs(src_ptr, src_offs, row_mask, D, HALF_STYLE, ROWS, BLOCK_H, ALIGN)
    if NORM != 0:
        h = tl.arange(0, BLOCK_H)
        if HALF_STYLE:
            in_a = h < D // 2
            in_b = in_a
        else:
            in_a = 2 * h < D
            in_b = 2 * h + 1 < D
        if NORM == 1:
            mean = (tl.sum(a, axis=1) + tl.sum(b, axis=1)) / D
            a = tl.where(in_a[None, :], a - mean[:, None], 0.0)
            b = tl.where(in_b[None, :], b - mean[:, None], 0.0)
        ms = (tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / D
        rstd = 1.0 / tl.sqrt(ms + eps) + ms * 0.0  # + ms * 0: an infinity NaNs the whole row
        a = a * rstd[:, None]
        b = b * rstd[:, None]
        # weight and bias: one "row" at offset 0, broadcast over the ROWS rows
        zero = tl.zeros([1], dtype=tl.int64)
        one = zero == 0
        if HAS_W:
            w_a, w_b = _load_pairs(w_ptr, zero, one, D, HALF_STYLE, 1, BLOCK_H, ALIGN)
            a = a * w_a
            b = b * w_b
        if HAS_B:
            b_a, b_b = _load_pairs(b_ptr, zero, one, D, HALF_STYLE, 1, BLOCK_H, ALIGN)
            a = a + b_a
            b = b + b_b
    if ROPE:
        # x * cos + rotate(x) * sin with rotate = (-b, a) per pair
        a, b = a * cos_a - b * sin_a, b * cos_b + a * sin_b
    _store_pairs(dst_ptr, dst_offs, row_mask, a, b, D, HALF_STYLE, ROWS, BLOCK_H, ALIGN)


@triton.jit
def _qk_norm_rope_fwd_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, qw_ptr, qb_ptr, kw_ptr, kb_ptr, cos_ptr, sin_ptr,
    n_rows, D, eps,
    size1, size2, size3,
    sq0, sq1, sq2, sq3,
    sk0, sk1, sk2, sk3,
    sc0, sc1, sc2, sc3,
    NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ROPE: tl.constexpr,
    HALF_STYLE: tl.constexpr, ALIGN: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_mask = rows < n_rows
    # ALIGN divides D and every row stride: row starts (and the masks' edges) are that aligned, so
    # loads and stores can be vectorized
    out_offs = tl.multiple_of(rows * D, ALIGN)
    if ROPE:
        off_c = tl.multiple_of(_row_offsets(rows, size1, size2, size3, sc0, sc1, sc2, sc3), ALIGN)
        cos_a, cos_b = _load_pairs(cos_ptr, off_c, row_mask, D, HALF_STYLE, ROWS, BLOCK_H, ALIGN)
        sin_a, sin_b = _load_pairs(sin_ptr, off_c, row_mask, D, HALF_STYLE, ROWS, BLOCK_H, ALIGN)
    else:
        cos_a = tl.zeros([ROWS, BLOCK_H], dtype=tl.float32)
        cos_b = cos_a
        sin_a = cos_a
        sin_b = cos_a
    off_q = tl.multiple_of(_row_offsets(rows, size1, size2, size3, sq0, sq1, sq2, sq3), ALIGN)
    _norm_rope_rows(q_ptr, q_out_ptr, qw_ptr, qb_ptr, off_q, out_offs, row_mask, cos_a, cos_b, sin_a, sin_b,
                    D, eps, NORM, HAS_W, HAS_B, ROPE, HALF_STYLE, ROWS, BLOCK_H, ALIGN)
    off_k = tl.multiple_of(_row_offsets(rows, size1, size2, size3, sk0, sk1, sk2, sk3), ALIGN)
    _norm_rope_rows(k_ptr, k_out_ptr, kw_ptr, kb_ptr, off_k, out_offs, row_mask, cos_a, cos_b, sin_a, sin_b,
                    D, eps, NORM, HAS_W, HAS_B, ROPE, HALF_STYLE, ROWS, BLOCK_H, ALIGN)


# --------------------------------------------------------------------------------------------------
# Launcher


def _row_strides(q, k, cos):
    """Coalesced ``(sizes, [q strides, k strides, cos strides])`` of the rows ``q.shape[:-1]``; the
    table is ``[..., D]`` expanded over the token dims and read with stride 0 across heads."""
    table = None
    if cos is not None:
        table = tuple(cos.expand(q.shape[:-2] + q.shape[-1:]).stride()[:-1]) + (0,)
    return coalesce_rows(q.shape[:-1], [q.stride()[:-1], k.stride()[:-1], table])


def why_not(q: torch.Tensor, k: torch.Tensor, cos) -> str | None:
    """Why this kernel cannot take the call, or None."""
    if q.dtype not in _DTYPES:
        return f"the Triton kernel supports float32/float16/bfloat16, not {q.dtype}"
    if q.shape[-1] > MAX_D:
        return f"head dim D = {q.shape[-1]} exceeds the Triton kernel's {MAX_D}"
    if len(_row_strides(q, k, cos)[0]) > MAX_DIMS:
        return f"q's and k's strides need more than {MAX_DIMS} leading dims to address rows"
    return None


def _launch_config(D: int) -> tuple[int, int, int]:
    """``(BLOCK_H, ROWS, num_warps)``: about 2048 elements of q (and as many of k) per program, about
    8 of each per thread (q, k and the fp32 table rows all live in registers at once)."""
    block_h = max(1, triton.next_power_of_2((D + 1) // 2))
    rows = max(1, min(64, 2048 // (2 * block_h)))
    num_warps = max(1, min(8, 2 * block_h * rows // 256))
    return block_h, rows, num_warps


def _alignment(D: int, half_style: bool, strides) -> int:
    """The largest power of two up to 16 dividing D (D/2 for the half style) and every row stride:
    the kernel's promise to the compiler that row starts are that aligned (sizes and strides not
    divisible by 16, e.g. D = 72, would otherwise get scalar loads)."""
    g = math.gcd(D, D // 2 if half_style else D, *(s for st in strides if st is not None for s in st))
    return min(16, g & -g)


def qk_norm_rope_fwd(q, k, norm: int, qw, qb, kw, kb, eps: float, cos, sin, half_style: bool):
    """Launch the kernel. ``q, k``: same shape ``[..., H, D]``, unit stride on D; ``qw, qb, kw, kb``:
    contiguous ``[D]`` (both weights or neither, both biases or neither); ``cos, sin``: one contiguous
    ``[..., D]`` table shape broadcastable to q without its head dim, or None."""
    D = q.shape[-1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    n_rows = q.numel() // D
    if n_rows == 0:
        return q_out, k_out
    sizes, strides = _row_strides(q, k, cos)
    sizes, strides = padded_rows(sizes, strides, MAX_DIMS)
    block_h, rows, num_warps = _launch_config(D)
    dummy = q
    _qk_norm_rope_fwd_kernel[(triton.cdiv(n_rows, rows),)](
        q, k, q_out, k_out,
        qw if qw is not None else dummy, qb if qb is not None else dummy,
        kw if kw is not None else dummy, kb if kb is not None else dummy,
        cos if cos is not None else dummy, sin if sin is not None else dummy,
        n_rows, D, eps,
        sizes[1], sizes[2], sizes[3],
        *strides[0], *strides[1], *strides[2],
        NORM=norm, HAS_W=qw is not None, HAS_B=qb is not None, ROPE=cos is not None, HALF_STYLE=half_style,
        ALIGN=_alignment(D, half_style, strides), ROWS=rows, BLOCK_H=block_h, num_warps=num_warps,
    )
    return q_out, k_out


# --------------------------------------------------------------------------------------------------
# Compile space (i2v_kernels/ops/_compile_space.py): every launch qk_norm_rope_fwd can make.

_ROW_POINTERS = ("q_ptr", "k_ptr", "q_out_ptr", "k_out_ptr")
_PARAM_POINTERS = ("qw_ptr", "qb_ptr", "kw_ptr", "kb_ptr")
_TABLE_POINTERS = ("cos_ptr", "sin_ptr")


def _launch(D: int) -> Launch:
    block_h, rows, num_warps = _launch_config(D)
    return Launch.of(num_warps, None, ROWS=rows, BLOCK_H=block_h)  # num_stages: Triton's default


def _dtype_cases() -> list[Dtypes]:
    """q/k in fp16/bf16/fp32; the norm affine and the RoPE table each in q's dtype or fp32 (the
    launcher casts a mixed set to fp32, never to a narrower type)."""
    cases = []
    for x in ("fp16", "bf16", "fp32"):
        for param in dict.fromkeys((x, "fp32")):
            for table in dict.fromkeys((x, "fp32")):
                name = x + ("" if param == x else f"+w{param}") + ("" if table == x else f"+rope{table}")
                cases.append(Dtypes(name, {**pointers(_ROW_POINTERS, x), **pointers(_PARAM_POINTERS, param),
                                           **pointers(_TABLE_POINTERS, table)}))
    return cases


def _features() -> list[dict]:
    align = (16, 8, 4, 2, 1)
    norm = combinations(NORM=(1, 2), HAS_W=(True, False), HAS_B=(True, False), ROPE=(True, False),
                        HALF_STYLE=(False, True), ALIGN=align)
    # RMSNorm has no bias; without RoPE the launcher always passes the interleaved layout
    norm = [f for f in norm if not (f["NORM"] == 2 and f["HAS_B"]) and (f["ROPE"] or not f["HALF_STYLE"])]
    rope_only = combinations(NORM=(0,), HAS_W=(False,), HAS_B=(False,), ROPE=(True,), HALF_STYLE=(False, True),
                             ALIGN=align)
    copy = combinations(NORM=(0,), HAS_W=(False,), HAS_B=(False,), ROPE=(False,), HALF_STYLE=(False,), ALIGN=align)
    return norm + rope_only + copy


COMPILE_SPACES = [
    KernelSpace(
        _qk_norm_rope_fwd_kernel, _dtype_cases(),
        launches=lambda dtypes: distinct_launches(_launch, [(d,) for d in range(1, MAX_D + 1)]),
        features=_features(), floats=("eps",),
        typical=lambda dtypes: _launch(64),  # CogVideoX / Latte head dim
    ),
]
