"""Argument checks shared by the op families (their messages name the argument)."""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensor(op: str, name: str, t, ref: Tensor, ref_name: str) -> None:
    """``t`` is a floating-point Tensor on the device of the op's main input ``ref`` (called ``ref_name``)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating-point tensor (float16/bfloat16/float32/float64), "
                        f"got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device")
