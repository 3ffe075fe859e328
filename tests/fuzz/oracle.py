"""fp64 oracle for the fuzz suite, written from the formulas in docs/SEMANTICS.md and ARCHITECTURE.md.

Independent of the package: it imports nothing from ``i2v_kernels`` (no ``reference.py``), computes
in float64 with explicit formulas (scores, softmax, sums), and states the NaN/inf rules of
docs/SEMANTICS.md directly:

* a normalization (LayerNorm, RMSNorm, QK-norm) turns a row holding a NaN or an infinity into an
  all-NaN row; elementwise terms (modulation, affine, residual, RoPE) follow IEEE arithmetic;
* attention: a non-finite query, or a non-finite key the row sees, makes the whole output row NaN;
  a non-finite value ``v[c, d]`` the row sees makes ``out[r, d]`` NaN; keys a row does not see (past
  ``kv_lens``, future frames under ``causal``) have no effect at all.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

F64 = torch.float64


def _row_nan(x: Tensor) -> Tensor:
    """0 where the row (last dim) is finite, NaN where it holds a NaN or an infinity; shape [..., 1]."""
    bad = ~torch.isfinite(x).all(-1, keepdim=True)
    return torch.zeros_like(x[..., :1]).masked_fill(bad, math.nan)


def layer_norm(x: Tensor, eps: float) -> Tensor:
    x = x.to(F64)
    n = x.shape[-1]
    mean = x.sum(-1, keepdim=True) / n
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / n
    return (x - mean) / torch.sqrt(var + eps) + _row_nan(x)


def rms_norm(x: Tensor, eps: float) -> Tensor:
    x = x.to(F64)
    ms = (x * x).sum(-1, keepdim=True) / x.shape[-1]
    return x / torch.sqrt(ms + eps) + _row_nan(x)


def _opt(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.to(F64)


def modulate(n: Tensor, shift, scale, weight, bias) -> Tensor:
    if weight is not None:
        n = n * _opt(weight)
    if bias is not None:
        n = n + _opt(bias)
    if scale is not None:
        n = n * (1 + _opt(scale))
    if shift is not None:
        n = n + _opt(shift)
    return n


def adaln_modulate(x, shift, scale, *, eps, weight=None, bias=None):
    return modulate(layer_norm(x, eps), shift, scale, weight, bias)


def gated_residual(x, y, gate):
    x, y = x.to(F64), y.to(F64)
    return x + (y if gate is None else _opt(gate) * y)


def gated_residual_adaln(x, y, gate, shift, scale, *, eps, weight=None, bias=None):
    r = gated_residual(x, y, gate)
    return r, adaln_modulate(r, shift, scale, eps=eps, weight=weight, bias=bias)


def rms_norm_op(x, weight=None, *, eps):
    out = rms_norm(x, eps)
    return out if weight is None else out * _opt(weight)


# --------------------------------------------------------------------------------------------------
# Attention


def rope(x: Tensor, cos: Tensor, sin: Tensor, style: str) -> Tensor:
    """``x [..., H, D]``, cos/sin broadcastable to ``x`` without its head dim."""
    cos, sin = cos.to(F64).unsqueeze(-2), sin.to(F64).unsqueeze(-2)
    D = x.shape[-1]
    partner = torch.empty_like(x)
    if style == "interleaved":
        partner[..., 0::2] = -x[..., 1::2]
        partner[..., 1::2] = x[..., 0::2]
    else:
        partner[..., : D // 2] = -x[..., D // 2:]
        partner[..., D // 2:] = x[..., : D // 2]
    return x * cos + partner * sin


def prologue(x, norm, weight, bias, eps, cos, sin, style):
    x = x.to(F64)
    if norm is not None:
        x = layer_norm(x, eps) if norm == "layer" else rms_norm(x, eps)
        if weight is not None:
            x = x * _opt(weight)
        if bias is not None:
            x = x + _opt(bias)
    if cos is not None:
        x = rope(x, cos, sin, style)
    return x


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, keep: Tensor) -> Tensor:
    """``q [P, Sq, D]``, ``k, v [P, Sk, D]`` (fp64), ``keep [P or 1, Sq, Sk]`` bool -> ``[P, Sq, D]``,
    with the NaN rules above. Every row keeps at least one key."""
    if q.shape[-2] == 0 or k.shape[-2] == 0:  # no queries (or T = 0): an empty result
        return torch.zeros(q.shape, dtype=F64)
    bad_q = ~torch.isfinite(q).all(-1)  # [P, Sq]
    bad_k = ~torch.isfinite(k).all(-1)  # [P, Sk]
    bad_v = ~torch.isfinite(v)  # [P, Sk, D]
    zero = torch.zeros((), dtype=F64)
    q0, k0, v0 = (torch.where(torch.isfinite(t), t, zero) for t in (q, k, v))
    scores = torch.einsum("psd,ptd->pst", q0, k0) * scale
    scores = scores.masked_fill(~keep, -math.inf)
    scores = scores - scores.amax(-1, keepdim=True)
    w = torch.exp(scores)
    w = w / w.sum(-1, keepdim=True)
    out = torch.einsum("pst,ptd->psd", w, v0)
    keep = keep.expand(scores.shape)
    row_bad = bad_q | (keep & bad_k[:, None, :]).any(-1)  # [P, Sq]
    col_bad = torch.einsum("pst,ptd->psd", keep.to(F64), bad_v.to(F64)) > 0  # [P, Sq, D]
    return out.masked_fill(row_bad[..., None] | col_bad, math.nan)


def attention_oracle(mode: str, q, k, v, *, scale=None, causal=False, kv_lens=None, qk_norm=None,
                     q_norm_weight=None, q_norm_bias=None, k_norm_weight=None, k_norm_bias=None, norm_eps=1e-6,
                     rope_tables=None, rope_style="interleaved") -> Tensor:
    """``mode``: "spatial" / "temporal" ([B, T, S, H, D]) or "dense" (q [B, N, H, D], k, v [B, M, H, D])."""
    cos, sin = rope_tables if rope_tables is not None else (None, None)
    qp = prologue(q, qk_norm, q_norm_weight, q_norm_bias, norm_eps, cos, sin, rope_style)
    kp = prologue(k, qk_norm, k_norm_weight, k_norm_bias, norm_eps, cos, sin, rope_style)
    vp = v.to(F64)
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    if mode == "dense":
        B, N, H, _ = q.shape
        M = k.shape[1]
        # [B, N, H, D] -> [B, H, N, D] -> [B*H, N, D]
        qs, ks, vs = (t.permute(0, 2, 1, 3).reshape(B * H, t.shape[1], D) for t in (qp, kp, vp))
        keep = torch.ones(B, 1, N, M, dtype=torch.bool)
        if kv_lens is not None:
            keep = keep & (torch.arange(M) < kv_lens.to(torch.int64).reshape(B, 1, 1, 1))
        keep = keep.expand(B, H, N, M).reshape(B * H, N, M)
        out = softmax_attention(qs, ks, vs, scale, keep)
        return out.reshape(B, H, N, D).permute(0, 2, 1, 3)
    B, T, S, H, _ = q.shape
    if mode == "spatial":  # sequence S: [B, T, H, S, D]
        qs, ks, vs = (t.permute(0, 1, 3, 2, 4).reshape(B * T * H, S, D) for t in (qp, kp, vp))
        keep = torch.ones(1, S, S, dtype=torch.bool)
        out = softmax_attention(qs, ks, vs, scale, keep)
        return out.reshape(B, T, H, S, D).permute(0, 1, 3, 2, 4)
    qs, ks, vs = (t.permute(0, 2, 3, 1, 4).reshape(B * S * H, T, D) for t in (qp, kp, vp))  # [B, S, H, T, D]
    keep = torch.ones(1, T, T, dtype=torch.bool)
    if causal:
        keep = keep.tril()
    out = softmax_attention(qs, ks, vs, scale, keep)
    return out.reshape(B, S, H, T, D).permute(0, 3, 1, 2, 4)


def qk_norm_rope(q, k, *, qk_norm=None, q_norm_weight=None, q_norm_bias=None, k_norm_weight=None,
                 k_norm_bias=None, norm_eps=1e-6, rope_tables=None, rope_style="interleaved"):
    cos, sin = rope_tables if rope_tables is not None else (None, None)
    return (prologue(q, qk_norm, q_norm_weight, q_norm_bias, norm_eps, cos, sin, rope_style),
            prologue(k, qk_norm, k_norm_weight, k_norm_bias, norm_eps, cos, sin, rope_style))


# --------------------------------------------------------------------------------------------------
# Causal 3D convolution


def causal_conv3d(x, weight, bias=None, *, stride=(1, 1, 1), dilation=(1, 1, 1), time_pad="replicate",
                  cache=None):
    """``x [B, Cin, T, H, W]``: ``(kt - 1) * d_t`` front frames from ``cache`` or ``time_pad``, symmetric
    spatial zero padding ``d * (k - 1) // 2``, then a plain strided, dilated correlation as sums."""
    x = x.to(F64)
    w = weight.to(F64)
    B, Cin, T, H, W = x.shape
    Cout, _, kt, kh, kw = w.shape
    P = (kt - 1) * dilation[0]
    if cache is not None:
        front = cache.to(F64)
    elif time_pad == "replicate":
        front = x[:, :, :1].expand(B, Cin, P, H, W)
    else:
        front = torch.zeros(B, Cin, P, H, W, dtype=F64)
    xp = torch.cat([front, x], dim=2)
    ph, pw = dilation[1] * (kh - 1) // 2, dilation[2] * (kw - 1) // 2
    xp = torch.nn.functional.pad(xp, (pw, pw, ph, ph))
    T_out = (T - 1) // stride[0] + 1
    H_out = (H + 2 * ph - dilation[1] * (kh - 1) - 1) // stride[1] + 1
    W_out = (W + 2 * pw - dilation[2] * (kw - 1) - 1) // stride[2] + 1
    out = torch.zeros(B, Cout, T_out, H_out, W_out, dtype=F64)
    for a in range(kt):
        for b in range(kh):
            for c in range(kw):
                t0, h0, w0 = a * dilation[0], b * dilation[1], c * dilation[2]
                patch = xp[:, :, t0: t0 + stride[0] * (T_out - 1) + 1: stride[0],
                           h0: h0 + stride[1] * (H_out - 1) + 1: stride[1],
                           w0: w0 + stride[2] * (W_out - 1) + 1: stride[2]]  # [B, Cin, T_out, H_out, W_out]
                out = out + torch.einsum("bcthw,oc->bothw", patch, w[:, :, a, b, c])
    if bias is not None:
        out = out + bias.to(F64).view(1, Cout, 1, 1, 1)
    return out
