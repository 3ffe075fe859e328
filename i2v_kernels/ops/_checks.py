"""Argument checks shared by the op families (their messages name the argument)."""

from __future__ import annotations

import math
from numbers import Real

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


def check_float_arg(op: str, name: str, value, *, positive: bool = False, what: str = "") -> float:
    """A float argument (eps, scale): a real number, finite, and > 0 when ``positive``; returned as a float.

    Only comparisons touch the value (never ``math.isfinite`` or ``float()`` on it), so under
    ``torch.compile(dynamic=True)`` a symbolic float passes through traced, not specialized or broken.
    """
    if isinstance(value, bool) or not isinstance(value, (Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{op}: {name} must be a {'positive ' if positive else ''}float, got {type(value).__name__}")
    low = 0 if positive else -math.inf
    if not (low < value < math.inf):  # False for NaN too
        kind = "a positive finite float" if positive else "a finite float"
        raise ValueError(f"{op}: {name} must be {kind}{what}, got {value}")
    return value if isinstance(value, (torch.SymFloat, torch.SymInt)) else float(value)


def check_int(owner: str, name: str, value, *, minimum: int = 1) -> int:
    """An int argument (not a bool) that is at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}")
    return value


def check_triple(owner: str, name: str, v) -> tuple[int, int, int]:
    """``v`` as a ``(t, h, w)`` triple of positive ints (an int applies to all three dims)."""
    if type(v) is int and v >= 1:  # the common cases first: a plain int, a tuple of three plain ints
        return (v, v, v)
    if (type(v) is tuple and len(v) == 3 and type(v[0]) is int and type(v[1]) is int and type(v[2]) is int
            and v[0] >= 1 and v[1] >= 1 and v[2] >= 1):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v, v)
    if (not isinstance(v, (tuple, list)) or len(v) != 3
            or any(isinstance(a, bool) or not isinstance(a, int) for a in v)):
        raise TypeError(f"{owner}: {name} must be an int or a (t, h, w) triple of ints, got {v!r}")
    if any(a < 1 for a in v):
        raise ValueError(f"{owner}: {name} must be positive, got {tuple(v)}")
    return tuple(v)  # type: ignore[return-value]


def check_choice(owner: str, name: str, value, choices) -> None:
    """``value`` is one of ``choices``."""
    if not isinstance(value, (str, type(None))) or value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
