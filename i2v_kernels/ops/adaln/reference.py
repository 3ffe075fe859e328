"""Plain-PyTorch reference of the fused adaLN family: the test oracle and the fallback everywhere.

Math in fp32 (fp64 for fp64 inputs); results in the dtype of ``x``. ``x`` is ``[..., C]``; ``shift``,
``scale`` and ``gate`` are any shape that broadcasts to ``x`` with last dim ``C`` (per-sample
``[B, 1, C]``, per-frame ``[B, T, 1, C]`` against ``[B, T, S, C]``, per-token, shared ``[C]``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

NORM_NONE, NORM_LAYER, NORM_RMS = 0, 1, 2


def _acc(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def acc_dtype(x: Tensor) -> torch.dtype:
    """The dtype the math runs in: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def normalize(r: Tensor, norm: int, eps: float) -> tuple[Tensor, Tensor]:
    """``(xhat, rstd)`` of rows of ``r``: LayerNorm (biased variance) or RMSNorm over the last dim."""
    if norm == NORM_LAYER:
        centered = r - r.mean(dim=-1, keepdim=True)
        rstd = torch.rsqrt(centered.square().mean(dim=-1, keepdim=True) + eps)
        return centered * rstd, rstd
    ms = r.square().mean(dim=-1, keepdim=True)
    # An infinity makes ms = inf and rstd = 0, so inf * 0 = NaN at the infinity alone and zeros beside
    # it; + ms * 0 (NaN exactly then) makes the whole row NaN, as LayerNorm does (docs/SEMANTICS.md).
    rstd = torch.rsqrt(ms + eps) + ms * 0
    return r * rstd, rstd


def residual(x: Tensor, y: Optional[Tensor], gate: Optional[Tensor]) -> Tensor:
    """``r = x + gate * y`` in the accumulation dtype (``x`` alone when ``y`` is None)."""
    acc = acc_dtype(x)
    r = x.to(acc)
    if y is not None:
        r = r + (y.to(acc) if gate is None else gate.to(acc) * y.to(acc))
    return r


def modulate(xhat: Tensor, shift, scale, weight, bias) -> Tensor:
    """``(xhat * weight + bias) * (1 + scale) + shift``, each term only when given."""
    acc = xhat.dtype
    n = xhat
    if weight is not None:
        n = n * weight.to(acc)
    if bias is not None:
        n = n + bias.to(acc)
    if scale is not None:
        n = n * (1 + scale.to(acc))
    if shift is not None:
        n = n + shift.to(acc)
    return n


def fused_fwd(x, y, gate, shift, scale, weight, bias, norm: int, eps: float) -> tuple[Tensor, Tensor]:
    """Everything the family does in one function (what every backend implements).

    Returns ``(out, residual)``; ``residual`` is ``x + gate * y`` when ``y`` is given and a norm is
    applied, else an empty tensor.
    """
    r = residual(x, y, gate)
    if norm == NORM_NONE:
        return r.to(x.dtype), x.new_empty(0)
    xhat, _ = normalize(r, norm, eps)
    out = modulate(xhat, shift, scale, weight, bias).to(x.dtype)
    res = r.to(x.dtype) if y is not None else x.new_empty(0)
    return out, res


def adaln_modulate(x, shift, scale, *, eps=1e-6, weight=None, bias=None) -> Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` (LayerNorm affine ``weight``/``bias`` optional)."""
    return fused_fwd(x, None, None, shift, scale, weight, bias, NORM_LAYER, eps)[0]


def gated_residual(x, y, gate) -> Tensor:
    """``x + gate * y``."""
    return fused_fwd(x, y, gate, None, None, None, None, NORM_NONE, 0.0)[0]


def gated_residual_adaln(x, y, gate, shift, scale, *, eps=1e-6, weight=None, bias=None) -> tuple[Tensor, Tensor]:
    """``r = x + gate * y``; returns ``(r, LayerNorm(r) * (1 + scale) + shift)``."""
    out, r = fused_fwd(x, y, gate, shift, scale, weight, bias, NORM_LAYER, eps)
    return r, out


def rms_norm(x, weight=None, *, eps=1e-6) -> Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight``."""
    return fused_fwd(x, None, None, None, None, weight, None, NORM_RMS, eps)[0]


def fused_bwd(grad_out, grad_res, x, y, gate, shift, scale, weight, bias, norm: int, eps: float, needs):
    """Gradients of :func:`fused_fwd` for ``(x, y, gate, shift, scale, weight, bias)``.

    Recomputes the forward statistics in the accumulation dtype; each gradient is reduced to its
    input's (broadcast) shape and cast to its dtype. ``needs`` is ``ctx.needs_input_grad`` for those
    seven inputs; unneeded gradients are None.
    """
    acc = acc_dtype(x)
    g = grad_out.to(acc)
    grads = [None] * 7
    r = residual(x, y, gate)
    if norm == NORM_NONE:
        dr = g
    else:
        xhat, rstd = normalize(r, norm, eps)
        n = modulate(xhat, None, None, weight, bias)
        if needs[3]:
            grads[3] = g
        if needs[4]:
            grads[4] = g * n
        dn = g if scale is None else g * (1 + scale.to(acc))
        if needs[6]:
            grads[6] = dn
        if needs[5]:
            grads[5] = dn * xhat
        dxhat = dn if weight is None else dn * weight.to(acc)
        proj = (dxhat * xhat).mean(dim=-1, keepdim=True)
        if norm == NORM_LAYER:
            dr = rstd * (dxhat - dxhat.mean(dim=-1, keepdim=True) - xhat * proj)
        else:
            dr = rstd * (dxhat - xhat * proj)
        if grad_res is not None and grad_res.numel() > 0:
            dr = dr + grad_res.to(acc)
    if needs[0]:
        grads[0] = dr
    if y is not None:
        if needs[1]:
            grads[1] = dr if gate is None else dr * gate.to(acc)
        if needs[2] and gate is not None:
            grads[2] = dr * y.to(acc)
    inputs = (x, y, gate, shift, scale, weight, bias)
    return tuple(
        None if gr is None else gr.sum_to_size(inp.shape).to(inp.dtype) for gr, inp in zip(grads, inputs)
    )
