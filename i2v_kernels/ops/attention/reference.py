"""Plain-PyTorch reference of the attention family: the test oracle and the fallback everywhere.

``softmax(q k^T * scale) v`` in fp32 (fp64 for fp64 inputs), output in ``q``'s dtype.

Layouts:
* spatial / temporal: ``q, k, v [B, T, S, H, D]`` ("video layout"); spatial attends over ``S`` within
  each frame, temporal over ``T`` at each spatial position.
* dense / cross: ``q [B, N, H, D]``, ``k, v [B, M, H, D]``; ``kv_lens [B]`` keeps the first
  ``kv_lens[b]`` keys of sample ``b`` (padded prompts).

Optional prologue applied to q and k before the scores (CogVideoX / Wan style):
* ``qk_norm``: ``"layer"`` or ``"rms"`` normalization over ``D`` with weights ``q_norm_weight``,
  ``k_norm_weight`` (``[D]``) and, for ``"layer"``, optional biases;
* ``rope = (cos, sin)``: rotary embedding, ``q * cos + rotate(q) * sin``, cos/sin ``[..., D]``
  broadcastable to ``q`` without its head dim (``[S, D]``, ``[T, S, D]``, ``[N, D]`` ...);
  ``rope_style="interleaved"`` pairs ``(x[2i], x[2i+1])`` (CogVideoX, Wan), ``"half"`` pairs
  ``(x[i], x[i + D/2])`` (GPT-NeoX style).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from i2v_kernels.ops.attention import semantics


def acc_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def rotate(x: Tensor, style: str) -> Tensor:
    """The partner term of RoPE: ``(-x1, x0)`` per pair."""
    if style == "interleaved":
        x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((-x1, x0), dim=-1).flatten(-2)
    x0, x1 = x.chunk(2, dim=-1)
    return torch.cat((-x1, x0), dim=-1)


def prologue(x: Tensor, norm: Optional[str], weight, bias, eps: float, rope, rope_style: str) -> Tensor:
    """QK-norm over the last dim then RoPE, in the accumulation dtype. ``x``: ``[B, *, H, D]`` with the
    head dim second to last; ``rope`` cos/sin broadcast to ``x`` once a head dim is inserted."""
    acc = acc_dtype(x)
    x = x.to(acc)
    if norm is not None:
        x, _ = _normalize(x, norm, eps)
        if weight is not None:
            x = x * weight.to(acc)
        if bias is not None:
            x = x + bias.to(acc)
    if rope is not None:
        cos, sin = (t.to(acc).unsqueeze(-2) for t in rope)
        x = x * cos + rotate(x, rope_style) * sin
    return x


def sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool = False, kv_lens: Optional[Tensor] = None) -> Tensor:
    """``[..., Sq, D] x [..., Sk, D]`` attention through PyTorch SDPA, in the inputs' dtype (the caller
    upcasts); batch dim 0 indexes ``kv_lens``. NaN/inf inputs give NaN exactly where
    :mod:`~i2v_kernels.ops.attention.semantics` says, and masked keys have no effect whatever they hold."""
    q, k, v, poisoned = semantics.finite_inputs(q, k, v, causal, kv_lens)
    q, scale = semantics.zero_scale(q, scale)
    return semantics.poison(_sdpa(q, k, v, scale, causal, kv_lens), poisoned)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool = False, kv_lens: Optional[Tensor] = None) -> Tensor:
    if q.dim() > 4 and kv_lens is None:
        # Fold the leading dims into one batch: SDPA's fused CUDA kernels take 4-D inputs only, and
        # inductor (torch 2.14) permutes the output of a 5-D SDPA wrongly under torch.compile.
        lead = q.shape[:-3]
        n = math.prod(lead)  # not -1: a zero-size dim (T = 0 or S = 0) makes -1 ambiguous
        out = _sdpa(q.reshape(n, *q.shape[-3:]), k.reshape(n, *k.shape[-3:]), v.reshape(n, *v.shape[-3:]),
                    scale, causal)
        return out.view(*lead, *out.shape[-3:])
    mask = None
    if kv_lens is not None:
        Sk = k.shape[-2]
        mask = torch.arange(Sk, device=q.device) < kv_lens.view(-1, *([1] * (q.dim() - 1)))
    if q.is_cuda and q.shape[0] > GRID_YZ:
        # SDPA's CUDA kernels put batch and heads in grid dims capped at 65,535 (found by the H200 smoke run)
        return torch.cat([_sdpa(q[i:i + GRID_YZ], k[i:i + GRID_YZ], v[i:i + GRID_YZ], scale, causal,
                                None if kv_lens is None else kv_lens[i:i + GRID_YZ])
                          for i in range(0, q.shape[0], GRID_YZ)])
    if q.is_cuda and q.dim() == 4 and q.shape[1] > GRID_YZ:
        return torch.cat([_sdpa(q[:, i:i + GRID_YZ], k[:, i:i + GRID_YZ], v[:, i:i + GRID_YZ], scale, causal, kv_lens)
                          for i in range(0, q.shape[1], GRID_YZ)], dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


GRID_YZ = 65535


def _default_scale(q: Tensor, scale: Optional[float]) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def spatial_attention(q, k, v, *, scale=None, qk_norm=None, q_norm_weight=None, q_norm_bias=None,
                      k_norm_weight=None, k_norm_bias=None, norm_eps=1e-6, rope=None, rope_style="interleaved"):
    """``[B, T, S, H, D]``: every frame attends within itself (sequence ``S``)."""
    qp = prologue(q, qk_norm, q_norm_weight, q_norm_bias, norm_eps, rope, rope_style)
    kp = prologue(k, qk_norm, k_norm_weight, k_norm_bias, norm_eps, rope, rope_style)
    out = sdpa(qp.transpose(2, 3), kp.transpose(2, 3), v.to(qp.dtype).transpose(2, 3), _default_scale(q, scale))
    return out.transpose(2, 3).to(q.dtype).contiguous()


def temporal_attention(q, k, v, *, scale=None, causal=False, qk_norm=None, q_norm_weight=None, q_norm_bias=None,
                       k_norm_weight=None, k_norm_bias=None, norm_eps=1e-6, rope=None, rope_style="interleaved"):
    """``[B, T, S, H, D]``: every spatial position attends across frames (sequence ``T``)."""
    qp = prologue(q, qk_norm, q_norm_weight, q_norm_bias, norm_eps, rope, rope_style)
    kp = prologue(k, qk_norm, k_norm_weight, k_norm_bias, norm_eps, rope, rope_style)
    to_seq = (0, 2, 3, 1, 4)  # [B, S, H, T, D]
    out = sdpa(qp.permute(to_seq), kp.permute(to_seq), v.to(qp.dtype).permute(to_seq), _default_scale(q, scale), causal)
    return out.permute(0, 3, 1, 2, 4).to(q.dtype).contiguous()


def attention(q, k, v, *, scale=None, kv_lens=None, qk_norm=None, q_norm_weight=None, q_norm_bias=None,
              k_norm_weight=None, k_norm_bias=None, norm_eps=1e-6, rope=None, rope_style="interleaved"):
    """Dense / cross attention: ``q [B, N, H, D]``, ``k, v [B, M, H, D]`` -> ``[B, N, H, D]``."""
    qp = prologue(q, qk_norm, q_norm_weight, q_norm_bias, norm_eps, rope, rope_style)
    kp = prologue(k, qk_norm, k_norm_weight, k_norm_bias, norm_eps, rope, rope_style)
    out = sdpa(qp.transpose(1, 2), kp.transpose(1, 2), v.to(qp.dtype).transpose(1, 2), _default_scale(q, scale),
               kv_lens=kv_lens)
    return out.transpose(1, 2).to(q.dtype).contiguous()


def attention_lse(q, k, v, *, scale=None, kv_lens=None, qk_norm=None, q_norm_weight=None, q_norm_bias=None,
                  k_norm_weight=None, k_norm_bias=None, norm_eps=1e-6, rope=None, rope_style="interleaved"):
    """:func:`attention` and its log-sum-exp: ``(out [B, N, H, D], lse [B, H, N])`` with
    ``lse = log sum_j exp(scale q_i . k_j)`` over the kept keys, in fp32 (fp64 for fp64 inputs). Two
    partial results over disjoint key sets merge exactly: ``lse = logaddexp(lse1, lse2)``,
    ``out = exp(lse1 - lse) out1 + exp(lse2 - lse) out2`` (ring attention). Non-finite inputs follow
    :mod:`~i2v_kernels.ops.attention.semantics`; ``lse`` is NaN on the rows it makes all-NaN
    (:func:`lse_nan_rows`)."""
    qp = prologue(q, qk_norm, q_norm_weight, q_norm_bias, norm_eps, rope, rope_style).transpose(1, 2)
    kp = prologue(k, qk_norm, k_norm_weight, k_norm_bias, norm_eps, rope, rope_style).transpose(1, 2)
    nan_rows = lse_nan_rows(qp, kp, kv_lens)
    qp, kp, vh, poisoned = semantics.finite_inputs(qp, kp, v.to(qp.dtype).transpose(1, 2), False, kv_lens)
    scores = torch.matmul(qp, kp.transpose(-1, -2)) * _default_scale(q, scale)  # [B, H, N, M]
    keep = _mask(scores.shape[-2], scores.shape[-1], False, kv_lens, scores.dim(), q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    lse = scores.logsumexp(dim=-1)
    out = semantics.poison(torch.matmul((scores - lse.unsqueeze(-1)).exp(), vh), poisoned)
    return out.transpose(1, 2).to(q.dtype).contiguous(), lse.masked_fill(nan_rows, float("nan"))


def lse_nan_rows(q: Tensor, k: Tensor, kv_lens: Optional[Tensor]) -> Tensor:
    """``[B, H, N]`` rows of ``q, k [B, H, N | M, D]`` (after the prologue) whose log-sum-exp is NaN: a
    non-finite query, or a non-finite key the row sees (semantics.py's rule for an all-NaN row)."""
    k_bad = ~torch.isfinite(k).all(-1)  # [B, H, M]
    if kv_lens is not None:
        k_bad = k_bad & (torch.arange(k.shape[-2], device=k.device) < kv_lens.reshape(-1, 1, 1))
    return ~torch.isfinite(q).all(-1) | k_bad.any(-1, keepdim=True)


# --------------------------------------------------------------------------------------------------
# Backward (explicit formulas, fp32: what the ops' recompute-based backward runs)


def _mask(Sq: int, Sk: int, causal: bool, kv_lens: Optional[Tensor], dims: int, device) -> Optional[Tensor]:
    keep = None
    if causal:
        keep = torch.ones(Sq, Sk, dtype=torch.bool, device=device).tril()
    if kv_lens is not None:
        valid = torch.arange(Sk, device=device) < kv_lens.view(-1, *([1] * (dims - 1)))
        keep = valid if keep is None else keep & valid
    return keep


def sdpa_bwd(q, k, v, grad_out, scale, causal=False, kv_lens=None, grad_lse=None):
    """Gradients of :func:`sdpa` for ``[..., S, D]`` inputs (same dtype, fp32 or fp64); ``grad_lse
    [..., S]``: the gradient of the log-sum-exp output too (``d lse / d scores = softmax``)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    keep = _mask(q.shape[-2], k.shape[-2], causal, kv_lens, scores.dim(), q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    p = scores.softmax(dim=-1)
    out = torch.matmul(p, v)
    grad_v = torch.matmul(p.transpose(-1, -2), grad_out)
    grad_p = torch.matmul(grad_out, v.transpose(-1, -2))
    delta = (grad_out * out).sum(-1, keepdim=True)
    if grad_lse is not None:
        delta = delta - grad_lse.to(delta.dtype).unsqueeze(-1)
    grad_s = p * (grad_p - delta) * scale
    return torch.matmul(grad_s, k), torch.matmul(grad_s.transpose(-1, -2), q), grad_v


def prologue_bwd(x, grad_y, norm, weight, bias, eps, rope, rope_style, needs):
    """Gradients of :func:`prologue` for ``(x, weight, bias, cos, sin)`` (None where not needed)."""
    acc = acc_dtype(x)
    xa = x.to(acc)
    grads = [None] * 5
    if norm is not None:
        n, rstd = _normalize(xa, norm, eps)
        a = n if weight is None else n * weight.to(acc)
        if bias is not None:
            a = a + bias.to(acc)
    else:
        a = xa
    da = grad_y
    if rope is not None:
        cos, sin = (t.to(acc).unsqueeze(-2) for t in rope)
        if needs[3]:
            grads[3] = (grad_y * a).sum_to_size(cos.shape).squeeze(-2)
        if needs[4]:
            grads[4] = (grad_y * rotate(a, rope_style)).sum_to_size(sin.shape).squeeze(-2)
        da = grad_y * cos - rotate(grad_y * sin, rope_style)  # rotate's transpose is -rotate
    if norm is not None:
        if needs[1] and weight is not None:
            grads[1] = (da * n).sum_to_size(weight.shape)
        if needs[2] and bias is not None:
            grads[2] = da.sum_to_size(bias.shape)
        dn = da if weight is None else da * weight.to(acc)
        proj = (dn * n).mean(-1, keepdim=True)
        if norm == "layer":
            da = rstd * (dn - dn.mean(-1, keepdim=True) - n * proj)
        else:
            da = rstd * (dn - n * proj)
    grads[0] = da
    return grads


def _normalize(x: Tensor, norm: str, eps: float) -> tuple[Tensor, Tensor]:
    if norm == "layer":
        centered = x - x.mean(-1, keepdim=True)
        rstd = torch.rsqrt(centered.square().mean(-1, keepdim=True) + eps)
        return centered * rstd, rstd
    ms = x.square().mean(-1, keepdim=True)
    rstd = torch.rsqrt(ms + eps) + ms * 0  # + ms * 0: an infinity NaNs the whole row, as LayerNorm does
    return x * rstd, rstd
