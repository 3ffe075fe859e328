"""Row addressing shared by the row-wise kernels: coalesce the leading dims of several tensors."""

from __future__ import annotations

from typing import Optional, Sequence


def coalesce_rows(sizes: Sequence[int], strides: Sequence[Optional[Sequence[int]]]):
    """Merge the leading dims ``sizes`` of several same-shaped tensors as far as all their strides allow.

    ``strides[t]`` holds tensor ``t``'s strides for those dims (None for an absent tensor). Size-1 dims
    are dropped, and dim ``i`` merges into ``i + 1`` when every tensor has
    ``stride[i] == stride[i + 1] * size[i + 1]``. Returns ``(sizes, strides)`` in the same form, fewest
    dims first-to-last (row-major), so row ``r`` of tensor ``t`` starts at
    ``sum(((r // prod(sizes[d+1:])) % sizes[d]) * strides[t][d])``.
    """
    present = [i for i, s in enumerate(strides) if s is not None]
    dims = [(n, [strides[i][d] for i in present]) for d, n in enumerate(sizes) if n != 1]
    merged: list[tuple[int, list[int]]] = []
    for n, st in dims:
        if merged:
            prev_n, prev_st = merged[-1]
            if all(p == s * n for p, s in zip(prev_st, st)):
                merged[-1] = (prev_n * n, st)
                continue
        merged.append((n, st))
    out_sizes = [n for n, _ in merged]
    out_strides: list[Optional[list[int]]] = [None] * len(strides)
    for k, i in enumerate(present):
        out_strides[i] = [st[k] for _, st in merged]
    return out_sizes, out_strides


def padded_rows(sizes: Sequence[int], strides: Sequence[Optional[Sequence[int]]], max_dims: int):
    """``coalesce_rows``' output front-padded to ``max_dims`` dims (size 1, stride 0), the fixed number
    of row dims a kernel takes; an absent tensor's strides become all zeros."""
    pad = max_dims - len(sizes)
    return ([1] * pad + list(sizes),
            [[0] * pad + list(s) if s is not None else [0] * max_dims for s in strides])
