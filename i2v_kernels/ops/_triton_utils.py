"""Small helpers shared by the Triton kernels' launchers."""

from __future__ import annotations

import torch
import triton.language as tl

from i2v_kernels._backend import triton_interpreted

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def dot_dtype(dtype: torch.dtype):
    """The dtype ``tl.dot`` operands are given in.

    The input dtype on a GPU. The interpreter (triton 3.8) multiplies bfloat16 dot operands wrongly,
    so there the operands -- already rounded to bfloat16 by the kernel -- are widened to fp32 first:
    the same numbers, so the same result.
    """
    return tl.float32 if (triton_interpreted() and dtype == torch.bfloat16) else TL_DTYPES[dtype]
