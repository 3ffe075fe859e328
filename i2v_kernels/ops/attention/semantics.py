"""Non-finite inputs in attention: one rule for every backend (docs/SEMANTICS.md).

Output row ``r`` (a query) *sees* key ``c`` when ``c`` is not masked for it: ``c < kv_lens[b]`` for
dense/cross attention with ``kv_lens``, ``c <= r`` under ``causal``, every key otherwise. Then, with
``q`` and ``k`` taken after the optional QK-norm / RoPE prologue:

* ``out[r, :]`` is all NaN when ``q[r]`` holds a NaN or an infinity, or when some key ``k[c]`` that row
  ``r`` sees does;
* otherwise ``out[r, d]`` is NaN when some ``v[c, d]`` that row ``r`` sees is NaN or infinite;
* every other output is finite, and a key row ``r`` does not see has no effect on it at all, whatever
  it holds.

SDPA's kernels do not follow one rule (a NaN query row comes back as zeros from PyTorch's CPU flash
kernel and as NaN from its math kernel; a NaN value behind a causal or ``kv_lens`` mask leaks through
``0 * NaN``), so the ``torch`` and ``native`` backends feed SDPA finite inputs
(:func:`finite_inputs`) and then write the NaNs this rule asks for (:func:`poison`). The Triton kernels
apply the same rule inside (``triton.py``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def _bad(t: Tensor) -> Tensor:
    return ~torch.isfinite(t)


def _fp32_sum(*ts: Tensor) -> Tensor:
    """The fp32 sum of all the tensors: NaN or infinite when one of them holds a NaN or an infinity.
    Views of one packed projection (one storage, one shape and strides, equally spaced offsets:
    ``qkv.unbind(dim)``, ``kv.unbind(dim)``) are summed as one ``[n, ...]`` view of that storage: one
    reduction over contiguous memory instead of n strided ones and a stack (2-core CPU, 6 MiB of q, k,
    v: 0.13 ms instead of 0.20-0.28). Adding the sums keeps a non-finite one non-finite (inf - inf is
    NaN); finite sums that overflow only send the call down the full path."""
    ts = sorted(ts, key=Tensor.storage_offset)
    first = ts[0]
    if len(ts) > 1:
        step = ts[1].storage_offset() - first.storage_offset()
        ptr = first.untyped_storage().data_ptr()
        if step > 0 and all(t.shape == first.shape and t.stride() == first.stride() and t.dtype == first.dtype
                            and t.storage_offset() - first.storage_offset() == i * step
                            and t.untyped_storage().data_ptr() == ptr for i, t in enumerate(ts)):
            return first.as_strided((len(ts), *first.shape), (step, *first.stride())).sum(dtype=torch.float32)
    total = first.sum(dtype=torch.float32)
    for t in ts[1:]:
        total = total + t.sum(dtype=torch.float32)
    return total


def all_finite(*ts: Tensor) -> bool:
    """Whether none of the tensors holds a NaN or an infinity, by their fp32 sum (:func:`_fp32_sum`);
    False also where a finite sum overflows, which only sends a caller down its full path."""
    return math.isfinite(_fp32_sum(*ts).item())


def finite_inputs(q: Tensor, k: Tensor, v: Tensor, causal: bool, kv_lens: Optional[Tensor]):
    """``(q, k, v, poisoned)`` for ``[..., Sq, D]`` / ``[..., Sk, D]`` inputs (batch dim 0 indexes
    ``kv_lens``): the inputs with every NaN/infinity replaced by 0, and the bool ``[..., Sq, D]`` mask
    of the outputs the rule above makes NaN (None, and the inputs untouched, when all are finite).

    The common case costs one fp32 sum over the three (:func:`_fp32_sum`): a tensor holding a NaN or an infinity sums to a
    non-finite number (a finite one only when its fp32 sum overflows, which just takes the full path).
    Only such a call -- or one inside CUDA-graph capture, where the check cannot read the result --
    takes the full path."""
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing and all_finite(q, k, v):
        return q, k, v, None
    q_row = _bad(q).any(-1)  # [..., Sq]
    k_row = _bad(k).any(-1)  # [..., Sk]
    v_bad = _bad(v)  # [..., Sk, D]
    if kv_lens is not None:
        seen = torch.arange(k.shape[-2], device=k.device) < kv_lens.reshape(-1, *([1] * (k.dim() - 2)))
        k_row = k_row & seen
        v_bad = v_bad & seen.unsqueeze(-1)
    if causal:  # row r sees keys 0..r: prefix "any" along the key axis (Sq == Sk)
        k_seen = torch.cumsum(k_row.to(torch.int32), -1) > 0
        v_seen = torch.cumsum(v_bad.to(torch.int32), -2) > 0
        k_seen, v_seen = k_seen[..., :q.shape[-2]], v_seen[..., :q.shape[-2], :]
    else:
        k_seen = k_row.any(-1, keepdim=True)
        v_seen = v_bad.any(-2, keepdim=True)
    poisoned = (q_row | k_seen).unsqueeze(-1) | v_seen
    finite = [torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype, device=t.device)) for t in (q, k, v)]
    return (*finite, poisoned)


def poison(out: Tensor, poisoned: Tensor) -> Tensor:
    """``out`` with NaN where ``poisoned`` (broadcast to ``out``; None: nothing to write)."""
    return out if poisoned is None else out.masked_fill(poisoned, float("nan"))


def zero_scale(q: Tensor, scale: float):
    """``(q, scale)`` for SDPA: with ``scale = 0`` (a uniform average over the keys a row sees), zero
    queries and scale 1 instead -- SDPA's CPU kernels scale a causal mask's -inf too, and 0 * -inf
    is NaN. ``q`` must be finite (:func:`finite_inputs`)."""
    if scale == 0:
        return torch.zeros_like(q), 1.0
    return q, scale
