"""Plain-PyTorch reference of the causal 3D convolution: the test oracle and the fallback everywhere.

``x [B, Cin, T, H, W]``, ``weight [Cout, Cin, kt, kh, kw]``. The input is padded in front in time by
``P = (kt - 1) * dilation_t`` frames -- the ``cache`` (the last ``P`` frames of the previous chunk's
padded input) when given, else the first frame repeated (``time_pad="replicate"``) or zeros
(``"zeros"``) -- and symmetrically in space by ``dilation * (k - 1) // 2`` zeros; nothing is padded at
the end. Then an ordinary ``conv3d``:

    y[b, o, t] = bias[o] + sum_{c, i, j, l} weight[o, c, i, j, l] * xpad[b, c, t * s_t + i * d_t, ...]

Math in fp32 (fp64 for fp64 inputs); the result in ``x``'s dtype.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

TIME_PADS = ("replicate", "zeros")


def acc_dtype(x: Tensor) -> torch.dtype:
    """The dtype the math runs in: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def triple(v, name: str = "value") -> tuple[int, int, int]:
    """``v`` as a ``(t, h, w)`` triple (an int applies to all three dims)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v, v)
    return tuple(int(a) for a in v)  # type: ignore[return-value]


def time_padding(kernel_t: int, dilation_t: int) -> int:
    """Frames of front padding ``P = (kt - 1) * dilation_t`` (also the cache length)."""
    return (kernel_t - 1) * dilation_t


def spatial_padding(kernel_size: Sequence[int], dilation: Sequence[int]) -> tuple[int, int]:
    """Symmetric zero padding ``dilation * (k - 1) // 2`` for (h, w)."""
    return tuple(d * (k - 1) // 2 for k, d in zip(kernel_size[1:], dilation[1:]))  # type: ignore[return-value]


def output_shape(x_shape, w_shape, stride, dilation) -> tuple[int, int, int, int, int]:
    """``[B, Cout, T_out, H_out, W_out]``; ``T_out = (T - 1) // s_t + 1`` (P cancels the kernel's reach)."""
    B, _, T, H, W = x_shape
    Cout, _, kt, kh, kw = w_shape
    ph, pw = spatial_padding((kt, kh, kw), dilation)
    T_out = (T - 1) // stride[0] + 1
    H_out = (H + 2 * ph - dilation[1] * (kh - 1) - 1) // stride[1] + 1
    W_out = (W + 2 * pw - dilation[2] * (kw - 1) - 1) // stride[2] + 1
    return (B, Cout, T_out, H_out, W_out)


def front_padding(x: Tensor, P: int, time_pad: str, cache: Optional[Tensor]) -> Tensor:
    """The ``P`` frames that go before ``x`` in time: ``cache``, or made by ``time_pad``."""
    if cache is not None:
        return cache
    if time_pad == "replicate":
        return x[:, :, :1].expand(-1, -1, P, -1, -1)
    return x.new_zeros(x.shape[0], x.shape[1], P, x.shape[3], x.shape[4])


def padded_input(x: Tensor, P: int, time_pad: str, cache: Optional[Tensor]) -> Tensor:
    """``cat(front padding, x)`` along time: ``[B, Cin, P + T, H, W]``."""
    if P == 0:
        return x
    return torch.cat([front_padding(x, P, time_pad, cache).to(x.dtype), x], dim=2)


def next_cache(x: Tensor, P: int, time_pad: str, cache: Optional[Tensor]) -> Tensor:
    """What the next chunk needs: the last ``P`` frames of the padded input (a copy, never a view of
    ``x``, so holding it does not keep the whole chunk alive). With ``T < P`` part of it comes from
    the padding, so chunks of one frame work with any kernel."""
    T = x.shape[2]
    if T >= P:
        return x[:, :, T - P:].clone()
    return padded_input(x, P, time_pad, cache)[:, :, T:].clone()


def causal_conv3d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, stride=1, dilation=1,
                  time_pad: str = "replicate", cache: Optional[Tensor] = None,
                  residual: Optional[Tensor] = None) -> Tensor:
    """Causal 3D convolution (module docstring), plus an optional ``residual`` added to the output."""
    stride, dilation = triple(stride), triple(dilation)
    acc = acc_dtype(x)
    kt = weight.shape[2]
    P = time_padding(kt, dilation[0])
    xp = padded_input(x.to(acc), P, time_pad, None if cache is None else cache.to(acc))
    ph, pw = spatial_padding(weight.shape[2:], dilation)
    y = F.conv3d(xp, weight.to(acc), None if bias is None else bias.to(acc), stride, (0, ph, pw), dilation)
    if residual is not None:
        y = y + residual.to(acc)
    return y.to(x.dtype)


def causal_conv3d_bwd(grad_out: Tensor, x: Tensor, weight: Tensor, cache: Optional[Tensor], stride, dilation,
                      time_pad: str, needs: Sequence[bool]):
    """Gradients of :func:`causal_conv3d` for ``(x, weight, bias, cache)`` (None where not needed).

    Recomputes the padded input in the accumulation dtype; the gradient of the padding frames goes to
    ``cache`` when it was given, into frame 0 for ``"replicate"`` (every padding frame is a copy of
    it), and nowhere for ``"zeros"``. Results are in the accumulation dtype, in the inputs' shapes.
    """
    stride, dilation = triple(stride), triple(dilation)
    acc = acc_dtype(x)
    g = grad_out.to(acc)
    kt = weight.shape[2]
    P = time_padding(kt, dilation[0])
    padding = (0, *spatial_padding(weight.shape[2:], dilation))
    need_x, need_w, need_b, need_c = (bool(n) for n in needs)
    grad_x = grad_w = grad_b = grad_c = None
    if need_w:
        xp = padded_input(x.to(acc), P, time_pad, None if cache is None else cache.to(acc))
        grad_w = torch.nn.grad.conv3d_weight(xp, weight.shape, g, stride, padding, dilation)
    if need_b:
        grad_b = g.sum(dim=(0, 2, 3, 4))
    if need_x or need_c:
        T = x.shape[2]
        xp_shape = (x.shape[0], x.shape[1], P + T, x.shape[3], x.shape[4])
        grad_xp = torch.nn.grad.conv3d_input(xp_shape, weight.to(acc), g, stride, padding, dilation)
        grad_pad, grad_x = grad_xp[:, :, :P], grad_xp[:, :, P:]
        if cache is not None:
            grad_c = grad_pad if need_c else None
        elif time_pad == "replicate" and P > 0:
            grad_x = grad_x.clone()
            grad_x[:, :, :1] += grad_pad.sum(dim=2, keepdim=True)
        if not need_x:
            grad_x = None
    return grad_x, grad_w, grad_b, grad_c
