"""Triton kernel of the fused adaLN family (see ``reference.fused_fwd`` for the formula).

One program normalizes ``ROWS`` rows of ``C`` channels held whole in registers; statistics in fp32.
Rows are addressed through up to four coalesced leading dims with per-tensor strides, so broadcast
modulation (stride 0) and strided ``x`` are read in place, never expanded or copied.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from i2v_kernels.ops._compile_space import (Dtypes, KernelSpace, Launch, combinations, distinct_launches, pointers,
                                            powers_of_two)
from i2v_kernels.ops._rows import coalesce_rows, padded_rows
from i2v_kernels.ops.adaln.reference import NORM_LAYER, NORM_NONE, NORM_RMS

MAX_DIMS = 4
MAX_C = 32768  # one row lives in registers; wider rows fall back


@triton.jit
def _row_offsets(rows, size1, size2, size3, s0, s1, s2, s3):
    i3 = rows % size3
    rest = rows // size3
    i2 = rest % size2
    rest = rest // size2
    i1 = rest % size1
    i0 = rest // size1
    return i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3


@triton.jit
def _adaln_fwd_kernel(
    x_ptr, y_ptr, gate_ptr, shift_ptr, scale_ptr, w_ptr, b_ptr, out_ptr, res_ptr,
    n_rows, C, eps,
    size1, size2, size3,
    sx0, sx1, sx2, sx3,
    sy0, sy1, sy2, sy3,
    sg0, sg1, sg2, sg3,
    ssh0, ssh1, ssh2, ssh3,
    ssc0, ssc1, ssc2, ssc3,
    HAS_Y: tl.constexpr, HAS_GATE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, NORM: tl.constexpr, STORE_RES: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = row_mask[:, None] & col_mask[None, :]

    off_x = _row_offsets(rows, size1, size2, size3, sx0, sx1, sx2, sx3)
    r = tl.load(x_ptr + off_x[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_Y:
        off_y = _row_offsets(rows, size1, size2, size3, sy0, sy1, sy2, sy3)
        y = tl.load(y_ptr + off_y[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            off_g = _row_offsets(rows, size1, size2, size3, sg0, sg1, sg2, sg3)
            gate = tl.load(gate_ptr + off_g[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            y = gate * y
        r = r + y

    out_offs = rows[:, None] * C + cols[None, :]
    if NORM == 0:
        out = r
    else:
        if NORM == 1:
            mean = tl.sum(r, axis=1) / C
            centered = tl.where(mask, r - mean[:, None], 0.0)
            var = tl.sum(centered * centered, axis=1) / C
            n = centered * (1.0 / tl.sqrt(var + eps))[:, None]
        else:
            ms = tl.sum(r * r, axis=1) / C
            n = r * (1.0 / tl.sqrt(ms + eps) + ms * 0.0)[:, None]  # + ms * 0: an infinity NaNs the row
        if HAS_W:
            n = n * tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            n = n + tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_SCALE:
            off_sc = _row_offsets(rows, size1, size2, size3, ssc0, ssc1, ssc2, ssc3)
            sc = tl.load(scale_ptr + off_sc[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            n = n * (1.0 + sc)
        if HAS_SHIFT:
            off_sh = _row_offsets(rows, size1, size2, size3, ssh0, ssh1, ssh2, ssh3)
            n = n + tl.load(shift_ptr + off_sh[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        out = n
        if STORE_RES:
            tl.store(res_ptr + out_offs, r.to(res_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def why_not(x: torch.Tensor, views) -> str | None:
    """Why this kernel cannot take the call, or None."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the Triton kernel supports float32/float16/bfloat16, not {x.dtype}"
    if x.shape[-1] > MAX_C:
        return f"C = {x.shape[-1]} exceeds the Triton kernel's {MAX_C} channels per row"
    if len(coalesce_rows(x.shape[:-1], [v.stride()[:-1] for v in views if v is not None])[0]) > MAX_DIMS:
        return f"the tensors' strides need more than {MAX_DIMS} leading dims to address rows"
    return None


def _launch_config(C: int) -> tuple[int, int, int]:
    """``(BLOCK_C, ROWS, num_warps)`` for rows of ``C`` channels: about 2048 elements a program and
    512 a warp, so short rows share a program and long rows get more warps."""
    block_c = triton.next_power_of_2(C)
    rows = max(1, min(16, 2048 // block_c))
    num_warps = max(1, min(16, block_c * rows // 512))
    return block_c, rows, num_warps


def adaln_fwd(x, y, gate, shift, scale, weight, bias, norm: int, eps: float):
    """Launch the kernel. ``y, gate, shift, scale`` are views expanded to ``x.shape`` (or None), all
    with unit stride on the last dim; ``weight, bias`` are contiguous ``[C]`` (or None)."""
    C = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    store_res = norm != 0 and y is not None
    res = torch.empty(x.shape if store_res else (0,), dtype=x.dtype, device=x.device)
    n_rows = out.numel() // C if C else 0
    if n_rows == 0:
        return out, res
    views = [x, y, gate, shift, scale]
    sizes, strides = coalesce_rows(x.shape[:-1], [v.stride()[:-1] if v is not None else None for v in views])
    sizes, strides = padded_rows(sizes, strides, MAX_DIMS)
    block_c, rows, num_warps = _launch_config(C)
    dummy = x
    _adaln_fwd_kernel[(triton.cdiv(n_rows, rows),)](
        x, y if y is not None else dummy, gate if gate is not None else dummy,
        shift if shift is not None else dummy, scale if scale is not None else dummy,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        out, res if store_res else out,
        n_rows, C, eps,
        sizes[1], sizes[2], sizes[3],
        *strides[0], *strides[1], *strides[2], *strides[3], *strides[4],
        HAS_Y=y is not None, HAS_GATE=gate is not None, HAS_SHIFT=shift is not None,
        HAS_SCALE=scale is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        NORM=norm, STORE_RES=store_res, ROWS=rows, BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return out, res


# --------------------------------------------------------------------------------------------------
# Compile space (i2v_kernels/ops/_compile_space.py): every launch adaln_fwd can make, for the
# ahead-of-time compile check.

_ROW_POINTERS = ("x_ptr", "y_ptr", "out_ptr", "res_ptr")
_MOD_POINTERS = ("gate_ptr", "shift_ptr", "scale_ptr", "w_ptr", "b_ptr")


def _launch(C: int) -> Launch:
    block_c, rows, num_warps = _launch_config(C)
    return Launch.of(num_warps, None, ROWS=rows, BLOCK_C=block_c)  # num_stages: Triton's default


def _dtype_cases() -> list[Dtypes]:
    """x in fp16/bf16/fp32; the modulation (gate, shift, scale, weight, bias) in x's dtype, or fp32
    when the caller's modulation tensors do not all share x's dtype (``_kernel_views``)."""
    cases = []
    for x in ("fp16", "bf16", "fp32"):
        for mod in dict.fromkeys((x, "fp32")):
            cases.append(Dtypes(x if mod == x else f"{x}+{mod}", {**pointers(_ROW_POINTERS, x),
                                                                  **pointers(_MOD_POINTERS, mod)}))
    return cases


def _features() -> list[dict]:
    """The flags each public op can pass, the fused op with everything first (heaviest)."""
    flags = dict(HAS_SHIFT=(True, False), HAS_SCALE=(True, False), HAS_W=(True, False), HAS_B=(True, False))
    none = dict(HAS_Y=(False,), HAS_GATE=(False,), HAS_SHIFT=(False,), HAS_SCALE=(False,), HAS_W=(False,),
                HAS_B=(False,), STORE_RES=(False,))
    fused = combinations(NORM=(NORM_LAYER,), HAS_Y=(True,), HAS_GATE=(True, False), STORE_RES=(True,), **flags)
    modulate = combinations(**{**none, "NORM": (NORM_LAYER,), **flags})
    residual = combinations(**{**none, "NORM": (NORM_NONE,), "HAS_Y": (True,), "HAS_GATE": (True, False)})
    rms = combinations(**{**none, "NORM": (NORM_RMS,), "HAS_W": (True, False)})
    return fused + modulate + residual + rms


COMPILE_SPACES = [
    KernelSpace(
        _adaln_fwd_kernel, _dtype_cases(),
        launches=lambda dtypes: distinct_launches(_launch, [(c,) for c in powers_of_two(MAX_C)]),
        features=_features(), floats=("eps",),
        typical=lambda dtypes: _launch(3072),  # hidden size of CogVideoX-5B / Wan-14B class models
    ),
]
