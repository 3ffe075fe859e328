"""The ``native`` backend of the attention family, and the outside libraries (flash_attn, sageattention).

``native`` is what a user who knows PyTorch well would write, in the input dtype: QK-norm and RoPE by
eager ops (``F.layer_norm`` / ``F.rms_norm``, multiply-add), then ``F.scaled_dot_product_attention``
on views of the caller's tensors -- SDPA picks its own kernel (cuDNN, flash, memory-efficient, or the
CPU flash kernel). A view needs no copy when the batch dims can be merged (frames of a packed QKV
projection for spatial attention, ``[B, N, H, D]`` for dense); otherwise ``reshape`` copies, as it
would in the user's own code. It is a dispatch candidate next to our kernels, so ``auto`` is never
slower than it.

The outside libraries take the same prologue and their own ``[batch, seq, heads, D]`` layout.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from i2v_kernels.ops.attention import semantics
from i2v_kernels.ops.attention.reference import lse_nan_rows, rotate

SPATIAL, TEMPORAL, DENSE = 0, 1, 2


def prologue(x: Tensor, norm: Optional[str], weight, bias, eps: float, cos, sin, rope_style: str) -> Tensor:
    """QK-norm over D then RoPE, eager ops in x's dtype (the norms accumulate in fp32 inside)."""
    if norm is None and cos is None:
        return x
    D = x.shape[-1]
    w = None if weight is None else weight.to(x.dtype)
    if norm == "layer":
        x = F.layer_norm(x, (D,), w, None if bias is None else bias.to(x.dtype), eps)
    elif norm == "rms":
        x = F.rms_norm(x, (D,), None, eps)
        x = x + x.sum(-1, keepdim=True) * 0  # a row with an infinity: all NaN, as LayerNorm gives
        if w is not None:
            x = x * w
    if cos is not None:
        c, s = cos.to(x.dtype).unsqueeze(-2), sin.to(x.dtype).unsqueeze(-2)
        x = x * c + rotate(x, rope_style) * s
    return x


def prologue_pair(q: Tensor, k: Tensor, norm, qw, qb, kw, kb, eps: float, cos, sin, rope_style: str):
    """QK-norm + RoPE of q and k: under ``auto``, through the ``qk_norm_rope`` op (one pass over both,
    its own backend measured: the Triton kernel where it wins, these eager ops elsewhere) when q and k
    have one shape; else (a forced backend: stock PyTorch throughout; cross attention with QK-norm)
    eager per tensor."""
    if norm is None and cos is None:
        return q, k
    from i2v_kernels import _backend

    if q.shape == k.shape and _backend.requested_backend() == "auto":
        from i2v_kernels.ops.qk_norm_rope import qk_norm_rope

        return qk_norm_rope(q, k, qk_norm=norm, q_norm_weight=qw, q_norm_bias=qb, k_norm_weight=kw, k_norm_bias=kb,
                            norm_eps=eps, rope=None if cos is None else (cos, sin), rope_style=rope_style)
    return prologue(q, norm, qw, qb, eps, cos, sin, rope_style), prologue(k, norm, kw, kb, eps, cos, sin, rope_style)


def _merges(t: Tensor, outer: int, inner: int) -> bool:
    """Whether dims ``outer`` and ``inner`` of ``t`` fold into one without a copy."""
    return t.shape[outer] == 1 or t.shape[inner] == 1 or t.stride(outer) == t.shape[inner] * t.stride(inner)


def _temporal_by_position(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Temporal attention's SDPA layout on CPU: ``[B*S, H, T, D]`` (True) where every input folds that
    way without a copy and not the other, else ``[B, S*H, T, D]`` (always on GPUs, where it was
    measured). Views of a packed QKV projection (``[B, T, S, 3, H, D]``) fold by position when B = 1;
    a contiguous ``[B, T, S, H, D]`` folds positions into heads, and SDPA's CPU kernel then writes its
    ``[B, T, S*H, D]`` output in the caller's layout (no copy back). Each copy avoided also spares a
    fresh allocation, which costs a page fault per 4 KiB where the allocator hands memory back
    (measured on the 2-core CPU: 2 MiB inputs copied cost 0.4-1 ms next to SDPA's 0.7 ms)."""
    ts = (q, k, v)
    return (q.device.type == "cpu" and not all(_merges(t, 2, 3) for t in ts)
            and all(_merges(t, 0, 2) for t in ts))


def _as_heads_seq(mode: int, t: Tensor, by_position: bool = False) -> Tensor:
    """``[batch, H, seq, D]`` view (or copy, where the batch dims cannot merge) for SDPA."""
    if mode == SPATIAL:  # [B, T, S, H, D] -> [B*T, H, S, D]
        B, T, S, H, D = t.shape
        return t.reshape(B * T, S, H, D).transpose(1, 2)
    if mode == TEMPORAL:  # [B, T, S, H, D] -> [B*S, H, T, D] or [B, S*H, T, D] (positions x heads as heads)
        B, T, S, H, D = t.shape
        return t.permute(0, 2, 3, 1, 4).reshape(*((B * S, H) if by_position else (B, S * H)), T, D)
    return t.transpose(1, 2)  # [B, N, H, D] -> [B, H, N, D]


def _from_heads_seq(mode: int, o: Tensor, shape) -> Tensor:
    """Back from ``[batch, H, seq, D]`` to the caller's layout, contiguous."""
    if mode == SPATIAL:
        return o.transpose(1, 2).reshape(shape).contiguous()
    if mode == TEMPORAL:
        B, T, S, H, D = shape
        return o.reshape(B, S, H, T, D).permute(0, 3, 1, 2, 4).contiguous()
    return o.transpose(1, 2).contiguous()


# CUDA grids cap their y and z dimensions at 65,535; SDPA's kernels put batch and heads there.
GRID_YZ = 65535


def _sdpa_chunked(q, k, v, mask, causal: bool, scale: float) -> Tensor:
    """SDPA over ``[batch, heads, seq, D]``, split along batch or heads where either exceeds a grid dim."""
    for dim in (0, 1):
        n = q.shape[dim]
        if n > GRID_YZ:
            chunk = GRID_YZ // 2
            outs = []
            for i in range(0, n, chunk):
                sl = [slice(None)] * 4
                sl[dim] = slice(i, i + chunk)
                m = mask if mask is None or mask.shape[dim] == 1 else mask[tuple(sl)]
                outs.append(_sdpa_chunked(q[tuple(sl)], k[tuple(sl)], v[tuple(sl)], m, causal, scale))
            return torch.cat(outs, dim=dim)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def _packed_heads(mode: int, t: Tensor) -> Tensor:
    """A contiguous ``[batch, H, seq, D]`` copy: the rearrange eager DiT code does before SDPA."""
    if mode == SPATIAL:
        B, T, S, H, D = t.shape
        return t.reshape(B * T, S, H, D).transpose(1, 2).contiguous()
    if mode == TEMPORAL:
        B, T, S, H, D = t.shape
        return t.permute(0, 2, 3, 1, 4).reshape(B * S, H, T, D).contiguous()
    return t.transpose(1, 2).contiguous()


def _from_packed(mode: int, o: Tensor, shape) -> Tensor:
    if mode == TEMPORAL:
        B, T, S, H, D = shape
        return o.reshape(B, S, H, T, D).permute(0, 3, 1, 2, 4).contiguous()
    return _from_heads_seq(mode, o, shape)


_CPU_FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _cpu_flash_checked(q: Tensor, k: Tensor, v: Tensor, kv_lens: Optional[Tensor], causal: bool,
                       scale: float) -> Optional[Tensor]:
    """SDPA's CPU flash kernel on ``[batch, H, seq, D]`` views when q, k and v are all finite, checked
    and run in one call of the C++ op ``_sdpa_cpu_checked`` (csrc/attention/sdpa_cpu.cpp). None where
    an input is not finite, or the call is not the op's (not CPU, scale 0, a strided last dim,
    autograd to record, a build without the op): the caller then takes the rule's usual path
    (semantics.finite_inputs, then SDPA).

    Why: the usual path's fp32 sums and ``.item()`` cost 0.1-0.2 ms of a 2.7 ms cross-attention call
    at ``[1, 2048, 4, 64]`` queries and 226 keys on the 2-core CPU; the op's check costs ~0.07 ms."""
    if (q.device.type != "cpu" or scale == 0 or q.dtype not in _CPU_FLASH_DTYPES
            or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1
            or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            or not _checked_kernel()):
        return None
    bias = None
    if kv_lens is not None:  # the kernel takes an additive mask in q's dtype, [B, 1, 1, M]
        keep = torch.arange(k.shape[-2], device=q.device) < kv_lens.reshape(-1, 1)
        bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(~keep, float("-inf"))
        bias = bias.view(-1, 1, 1, k.shape[-2])
    return torch.ops.i2v_kernels._sdpa_cpu_checked(q, k, v, bias, causal, scale)


def _checked_kernel() -> bool:
    from i2v_kernels import _backend

    return _backend._has_kernel("_sdpa_cpu_checked", "CPU")


def sdpa(mode: int, q, k, v, scale: float, causal: bool, kv_lens: Optional[Tensor], qk_norm, qw, qb, kw, kb,
         eps: float, cos, sin, rope_style: str, packed: bool = False) -> Tensor:
    """The ``native`` backend (``packed=False``: SDPA on views of the caller's tensors) and
    ``native_packed`` (SDPA on contiguous ``[batch, H, seq, D]`` copies). Copies cost bandwidth, but
    PyTorch picks its cuDNN kernel for that layout where it takes the strided one to flash or
    memory-efficient attention (measured on an H200: cross attention at Latte's shape 0.033 ms packed,
    0.052 ms strided; temporal attention at T = 128 1.06 ms packed, 7.3 ms as ``[B, S*H, T, D]`` views)."""
    shape = q.shape
    q, k = prologue_pair(q, k, qk_norm, qw, qb, kw, kb, eps, cos, sin, rope_style)
    mask = None
    if kv_lens is not None:  # [B, 1, 1, M]: key j of sample b is kept when j < kv_lens[b]
        mask = (torch.arange(k.shape[1], device=q.device) < kv_lens.reshape(-1, 1)).view(-1, 1, 1, k.shape[1])
    if packed:
        qh, kh, vh = (_packed_heads(mode, t) for t in (q, k, v))
    else:
        by_position = mode == TEMPORAL and _temporal_by_position(q, k, v)
        qh, kh, vh = (_as_heads_seq(mode, t, by_position) for t in (q, k, v))
    o = _cpu_flash_checked(qh, kh, vh, kv_lens, causal, scale)
    if o is not None:
        return _from_packed(mode, o, shape) if packed else _from_heads_seq(mode, o, shape)
    # SDPA's kernels disagree on NaN/inf: feed it finite inputs and write the NaNs semantics.py asks for
    qh, kh, vh, poisoned = semantics.finite_inputs(qh, kh, vh, causal, kv_lens)
    qh, scale = semantics.zero_scale(qh, scale)
    o = semantics.poison(_sdpa_chunked(qh, kh, vh, mask, causal, scale), poisoned)
    return _from_packed(mode, o, shape) if packed else _from_heads_seq(mode, o, shape)


def lse_why_not(q: Tensor) -> Optional[str]:
    """Why :func:`sdpa_lse` cannot take ``q``, or None."""
    if q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"native attention with return_lse runs PyTorch's memory-efficient kernel: no {q.dtype}"
    if not q.is_cuda and q.device.type != "cpu":
        return f"native attention with return_lse runs on CPU and CUDA only, not {q.device.type}"
    return None


def sdpa_lse(q, k, v, scale: float, kv_lens: Optional[Tensor], qk_norm, qw, qb, kw, kb, eps: float, cos, sin,
             rope_style: str) -> tuple[Tensor, Tensor]:
    """Dense/cross attention and its log-sum-exp ``(out [B, N, H, D], lse [B, H, N] fp32)`` from the
    ATen kernel SDPA itself dispatches to that returns both: the CPU flash kernel, or on CUDA the
    memory-efficient one (its lse is padded to a multiple of 32 queries). ``kv_lens`` becomes an
    additive ``-inf`` bias in the input dtype (what those kernels take), its key dim padded to 16 on
    CUDA for the kernel's alignment."""
    q, k = prologue_pair(q, k, qk_norm, qw, qb, kw, kb, eps, cos, sin, rope_style)
    (B, N, H, _), M = q.shape, k.shape[1]
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    nan_rows = lse_nan_rows(qh, kh, kv_lens)
    qh, kh, vh, poisoned = semantics.finite_inputs(qh, kh, vh, False, kv_lens)  # the NaN rule, as sdpa()
    bias = None
    if kv_lens is not None:
        width = -(-M // 16) * 16 if q.is_cuda else M
        keep = torch.arange(width, device=q.device) < kv_lens.reshape(-1, 1)
        bias = torch.zeros(B, 1, 1, width, dtype=q.dtype, device=q.device).masked_fill(~keep.view(B, 1, 1, width),
                                                                                        float("-inf"))[..., :M]
    if q.is_cuda:
        bias = None if bias is None else bias.expand(B, H, N, M)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qh, kh, vh, bias, True, scale=scale)[:2]
        lse = lse[..., :N]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, attn_mask=bias, scale=scale)
    lse = (lse if lse.dtype == torch.float64 else lse.float()).masked_fill(nan_rows, float("nan"))
    return semantics.poison(out, poisoned).transpose(1, 2).contiguous(), lse.contiguous()


# --------------------------------------------------------------------------------------------------
# Outside libraries: [batch, seq, H, D] layouts


def _as_seq_heads(mode: int, t: Tensor) -> Tensor:
    if mode == SPATIAL:
        B, T, S, H, D = t.shape
        return t.reshape(B * T, S, H, D)
    if mode == TEMPORAL:
        B, T, S, H, D = t.shape
        return t.transpose(1, 2).reshape(B * S, T, H, D)
    return t


def _from_seq_heads(mode: int, o: Tensor, shape) -> Tensor:
    if mode == SPATIAL:
        return o.reshape(shape).contiguous()
    if mode == TEMPORAL:
        B, T, S, H, D = shape
        return o.reshape(B, S, T, H, D).transpose(1, 2).contiguous()
    return o.contiguous()


def outside_why_not(name: str, q: Tensor, kv_lens) -> Optional[str]:
    """Why an outside library cannot take this call (beyond being installed and on CUDA), or None."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"{name} takes float16/bfloat16, not {q.dtype}"
    D = q.shape[-1]
    if kv_lens is not None:
        return f"{name} is wired here without per-sample key lengths (kv_lens)"
    if name == "flash_attn" and (D % 8 or D > 256):
        return f"flash_attn needs a head dim that is a multiple of 8 and <= 256, got {D}"
    if name == "sageattention" and D not in (64, 96, 128):
        return f"sageattention takes head dims 64, 96 and 128, got {D}"
    return None


def outside(name: str, module, mode: int, q, k, v, scale: float, causal: bool, qk_norm, qw, qb, kw, kb,
            eps: float, cos, sin, rope_style: str) -> Tensor:
    shape = q.shape
    q, k = prologue_pair(q, k, qk_norm, qw, qb, kw, kb, eps, cos, sin, rope_style)
    qs, ks, vs = (_as_seq_heads(mode, t) for t in (q, k, v))
    if name == "flash_attn":
        o = module.flash_attn_func(qs, ks, vs, softmax_scale=scale, causal=causal)
    else:
        o = module.sageattn(qs, ks, vs, tensor_layout="NHD", is_causal=causal, sm_scale=scale)
    if isinstance(o, tuple):  # some flash_attn versions return (out, lse)
        o = o[0]
    return _from_seq_heads(mode, o, shape)
