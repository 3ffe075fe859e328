"""Causal 3D convolution for video VAEs (CogVideoX, Wan, LTX, HunyuanVideo), with a frame cache for
streaming (chunked) decoding.

``causal_conv3d(x [B, Cin, T, H, W], weight [Cout, Cin, kt, kh, kw])`` pads ``x`` in front in time by
``P = (kt - 1) * dilation_t`` frames -- the ``cache`` when given (the last ``P`` frames of the
previous chunk's padded input, ``[B, Cin, P, H, W]``), else the first frame repeated
(``time_pad="replicate"``: CogVideoX, LTX) or zeros (``"zeros"``: Wan) -- pads symmetrically in space
by ``dilation * (k - 1) // 2`` zeros, nothing at the end, and convolves: ``T_out = (T - 1) // s_t + 1``.
Formula in ``reference.py``; the module :class:`i2v_kernels.ops.conv3d.modules.CausalConv3d` keeps the
cache between chunks.

Output layout: per device, the same on every backend (so the fake implementation's strides match),
given by :func:`output_format`: ``torch.channels_last_3d`` (``NDHWC`` in memory) on GPUs, the format
cuDNN convolves the next conv fastest in; contiguous ``NCDHW`` on CPUs, the layout PyTorch's CPU conv3d
computes in, so neither this op nor the next conv pays a layout copy.

One ``torch.library`` op, ``torch.ops.i2v_kernels.causal_conv3d``, with a fake implementation and a
recompute-based autograd (gradients for ``x``, ``weight``, ``bias``, ``cache`` and ``residual``).
Backends: ``cuda`` (the C++ op ``_causal_conv3d_fwd``: the padded input built once in
channels_last_3d, then ATen's convolution, i.e. cuDNN; bias and residual added after) and ``triton``
(implicit GEMM, padding read in place) for CUDA tensors; ``cpu`` (the same C++ op on CPU tensors:
oneDNN, fp16/bf16 computed in fp32 as the reference) and the ``torch`` reference (fp32 math)
everywhere. Autocast: as ``F.conv3d`` -- floating inputs are cast to the autocast dtype when autocast
is on for ``x``'s device.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from i2v_kernels import _backend, _dispatch, _static_table
from i2v_kernels.ops._checks import check_float_tensor, check_triple
from i2v_kernels.ops.conv3d import native, reference
from i2v_kernels.ops.conv3d.reference import TIME_PADS

__all__ = ["causal_conv3d"]

_OP = "causal_conv3d"
_IMPLEMENTED = ("cuda", "triton", "cpu", "native", "torch")

_backend.load_extension()  # registers the C++ schemas before the Python ops join the namespace


# --------------------------------------------------------------------------------------------------
# Argument checks (shared by the real and fake implementations, so torch.compile reports them too)


def _check_triple(name: str, v) -> tuple[int, int, int]:
    return check_triple(_OP, name, v)


def _check(x, weight, bias, cache, residual, stride, dilation, time_pad):
    """Validate one call; returns ``(out_shape, P, (pad_h, pad_w))``."""
    check_float_tensor(_OP, "x", x, x, "x")
    if x.dim() != 5:
        raise ValueError(f"{_OP}: x must be [B, Cin, T, H, W] (5 dims), got shape {tuple(x.shape)}")
    B, C, T, H, W = x.shape
    if C < 1 or T < 1 or H < 1 or W < 1:
        raise ValueError(f"{_OP}: x [B, Cin, T, H, W] needs Cin, T, H, W >= 1, got shape {tuple(x.shape)}")
    check_float_tensor(_OP, "weight", weight, x, "x")
    if weight.dim() != 5:
        raise ValueError(f"{_OP}: weight must be [Cout, Cin, kt, kh, kw] (5 dims), got shape {tuple(weight.shape)}")
    Cout, Cin_w, kt, kh, kw = weight.shape
    if Cin_w != C:
        raise ValueError(f"{_OP}: weight must be [Cout, Cin={C}, kt, kh, kw] to match x's {C} channels "
                         f"(x is [B, Cin, T, H, W] = {tuple(x.shape)}), got weight {tuple(weight.shape)}")
    if Cout < 1 or kt < 1 or kh < 1 or kw < 1:
        raise ValueError(f"{_OP}: weight [Cout, Cin, kt, kh, kw] needs Cout and kernel sizes >= 1, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{_OP}: weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if bias is not None:
        check_float_tensor(_OP, "bias", bias, x, "x")
        if tuple(bias.shape) != (Cout,):
            raise ValueError(f"{_OP}: bias must have shape ({Cout},) (Cout of weight), got {tuple(bias.shape)}")
    stride = _check_triple("stride", stride)
    dilation = _check_triple("dilation", dilation)
    if time_pad not in TIME_PADS:
        raise ValueError(f"{_OP}: time_pad must be one of {', '.join(map(repr, TIME_PADS))}, got {time_pad!r}")
    P = reference.time_padding(kt, dilation[0])
    ph, pw = reference.spatial_padding((kt, kh, kw), dilation)
    for dim, size, pad, k, d in (("H", H, ph, kh, dilation[1]), ("W", W, pw, kw, dilation[2])):
        if size + 2 * pad < d * (k - 1) + 1:
            raise ValueError(f"{_OP}: the kernel (size {k}, dilation {d}) spans {d * (k - 1) + 1} pixels, more than "
                             f"the padded input's {dim} = {size} + 2 * {pad}; x is {tuple(x.shape)}")
    if cache is not None:
        check_float_tensor(_OP, "cache", cache, x, "x")
        if tuple(cache.shape) != (B, C, P, H, W):
            raise ValueError(f"{_OP}: cache must be [B, Cin, P, H, W] = {(B, C, P, H, W)} (P = (kt - 1) * dilation_t "
                             f"= {P} frames of the previous chunk), got {tuple(cache.shape)}")
        if cache.dtype != x.dtype:
            raise TypeError(f"{_OP}: cache must have x's dtype {x.dtype}, got {cache.dtype}")
    out_shape = reference.output_shape(x.shape, weight.shape, stride, dilation)
    if residual is not None:
        check_float_tensor(_OP, "residual", residual, x, "x")
        if tuple(residual.shape) != tuple(out_shape):
            raise ValueError(f"{_OP}: residual must have the output's shape [B, Cout, T_out, H_out, W_out] = "
                             f"{tuple(out_shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"{_OP}: residual must have x's dtype {x.dtype}, got {residual.dtype}")
    return out_shape, P, (ph, pw)


def output_format(device: torch.device) -> torch.memory_format:
    """The op's output memory format on ``device``: ``torch.contiguous_format`` (NCDHW) on CPU, where
    ATen's conv3d computes in NCDHW; ``torch.channels_last_3d`` elsewhere (cuDNN's fast format)."""
    return torch.contiguous_format if device.type == "cpu" else torch.channels_last_3d


def _empty_out(shape, x: Tensor) -> Tensor:
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=output_format(x.device))


# --------------------------------------------------------------------------------------------------
# Dispatch


def _triton():
    from i2v_kernels.ops.conv3d import triton as conv_triton

    return conv_triton


_CPP_DTYPES = {"cuda": (torch.float16, torch.bfloat16, torch.float32),
               "cpu": (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def _cpp_why_not(backend: str, x: Tensor) -> Optional[str]:
    """Why the C++ op ``_causal_conv3d_fwd`` cannot take this call on ``backend`` (cuda/cpu), or None."""
    key = backend.upper()
    if not _backend._has_kernel("_causal_conv3d_fwd", key):
        return f"i2v_kernels._C was built without the {key} causal_conv3d kernel"
    if x.dtype not in _CPP_DTYPES[backend]:
        names = "/".join(str(d).replace("torch.", "") for d in _CPP_DTYPES[backend])
        return f"the {backend} causal_conv3d kernel supports {names}, not {x.dtype}"
    return None


# A call's checked geometry and dispatch features by its signature (shapes, dtypes, devices, stride,
# dilation, time_pad): everything _check and dispatch_features read, so a hit skips them. A small conv
# (the Wan temporal upsampler's k311 on a CPU crop: ~1 ms) otherwise spends a few percent in them.
_plans: dict[tuple, tuple] = {}
_PLANS_MAX = 512


def _signature(t: Optional[Tensor]):
    return None if t is None else (t.shape, t.dtype, t.device)


def _plan(x, weight, bias, cache, residual, stride, dilation, time_pad) -> tuple:
    """``(out_shape, P, padding_hw, stride, dilation, flags, sizes, features)`` of a call, checked."""
    stride, dilation = tuple(stride), tuple(dilation)
    sig = (x.shape, x.dtype, x.device, _signature(weight), _signature(bias), _signature(cache), _signature(residual),
           stride, dilation, time_pad)
    plan = _plans.get(sig)
    if plan is None:
        out_shape, P, padding_hw = _check(x, weight, bias, cache, residual, stride, dilation, time_pad)
        flags, sizes = dispatch_features(x.shape, weight.shape, stride, dilation, time_pad, cache is not None,
                                         residual is not None, bias is not None)
        features = flags + tuple(_dispatch.bucket(n) for n in sizes[:3]) + tuple(sizes[3:])
        plan = (out_shape, P, tuple(padding_hw), stride, dilation, flags, sizes, features)
        if len(_plans) >= _PLANS_MAX:
            _plans.clear()
        _plans[sig] = plan
    return plan


def _forward(x, weight, bias, cache, residual, stride, dilation, time_pad) -> Tensor:
    out_shape, P, padding_hw, stride, dilation, flags, sizes, features = _plan(x, weight, bias, cache, residual,
                                                                               stride, dilation, time_pad)
    if x.numel() == 0:
        return _empty_out(out_shape, x)

    def why_not(backend: str) -> Optional[str]:
        if backend == "triton":
            return _triton().why_not(x)
        if backend in ("cuda", "cpu"):
            return _cpp_why_not(backend, x)
        return None

    def run(backend: str) -> Tensor:
        # The autocast cast (if any) happened in the public function; the math inside runs as asked.
        if not torch.is_autocast_enabled(x.device.type):
            return compute(backend)
        with torch.autocast(x.device.type, enabled=False):
            return compute(backend)

    def compute(backend: str) -> Tensor:
        if backend in ("cuda", "cpu"):
            return torch.ops.i2v_kernels._causal_conv3d_fwd(x, weight, bias, cache, residual, list(stride),
                                                            list(dilation), TIME_PADS.index(time_pad))
        if backend == "native":
            return native.causal_conv3d(x, weight, bias, cache, residual, stride, dilation, padding_hw, P, time_pad)
        if backend == "triton":
            t = _triton()
            y = t.causal_conv3d_fwd(t.channels_last(x), weight, None if bias is None else bias.contiguous(),
                                    None if cache is None else t.channels_last(cache), residual, out_shape,
                                    stride, dilation, padding_hw, P, time_pad)
            # the kernel writes channels_last_3d; on CPU (the interpreter) the op returns NCDHW
            return y.contiguous(memory_format=output_format(x.device))
        y = reference.causal_conv3d(x, weight, bias, stride=stride, dilation=dilation, time_pad=time_pad,
                                    cache=cache, residual=residual)
        out = _empty_out(out_shape, x)
        out.copy_(y)
        return out

    return _backend.dispatch(_OP, x.device, x.dtype, why_not, _IMPLEMENTED, features, run,
                             lambda: _dispatch.nearest_static(_static_table.TABLE, _OP, x.device, x.dtype, flags, sizes))


def dispatch_features(x_shape, w_shape, stride, dilation, time_pad: str, has_cache: bool, has_residual: bool,
                      has_bias: bool) -> tuple[tuple, tuple]:
    """``(flags, sizes)`` of a call for the dispatch key: kernel, stride, dilation and the optional
    inputs must match; sizes ``(B * T, H * W, Cin * Cout, Cin, Cout)`` (the first three bucketed)."""
    B, Cin, T, H, W = x_shape
    Cout = w_shape[0]
    flags = (tuple(w_shape[2:]), tuple(stride), tuple(dilation), "cache" if has_cache else time_pad,
             int(has_residual), int(has_bias))
    return flags, (B * T, H * W, Cin * Cout, Cin, Cout)


# --------------------------------------------------------------------------------------------------
# The op and its backward op


@torch.library.custom_op("i2v_kernels::causal_conv3d", mutates_args=())
def _causal_conv3d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], cache: Optional[Tensor],
                      residual: Optional[Tensor], stride: list[int], dilation: list[int], time_pad: str) -> Tensor:
    return _forward(x, weight, bias, cache, residual, stride, dilation, time_pad)


@_causal_conv3d_op.register_fake
def _(x, weight, bias, cache, residual, stride, dilation, time_pad):
    out_shape, _, _ = _check(x, weight, bias, cache, residual, stride, dilation, time_pad)
    return _empty_out(out_shape, x)


@torch.library.custom_op("i2v_kernels::_causal_conv3d_bwd", mutates_args=())
def _causal_conv3d_bwd_op(grad_out: Tensor, x: Tensor, weight: Tensor, cache: Optional[Tensor], stride: list[int],
                          dilation: list[int], time_pad: str, needs: list[bool]) -> list[Tensor]:
    """Gradients for ``(x, weight, bias, cache)``: x's, weight's, the accumulation dtype (bias: cast by
    the caller to its own dtype) and cache's dtype; an empty tensor where ``needs`` is False."""
    with torch.autocast(x.device.type, enabled=False):
        grads = reference.causal_conv3d_bwd(grad_out, x, weight, cache, stride, dilation, time_pad, needs)
    dtypes = _bwd_dtypes(x, weight, cache)
    return [g.to(dt).contiguous() if g is not None else x.new_empty(0) for g, dt in zip(grads, dtypes)]


def _bwd_dtypes(x, weight, cache):
    return (x.dtype, weight.dtype, reference.acc_dtype(x), cache.dtype if cache is not None else x.dtype)


@_causal_conv3d_bwd_op.register_fake
def _(grad_out, x, weight, cache, stride, dilation, time_pad, needs):
    shapes = (x.shape, weight.shape, weight.shape[:1], cache.shape if cache is not None else None)
    return [torch.empty(s, dtype=dt, device=x.device) if n and s is not None else x.new_empty(0)
            for s, dt, n in zip(shapes, _bwd_dtypes(x, weight, cache), needs)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, cache, residual, stride, dilation, time_pad = inputs
    ctx.args = (list(stride), list(dilation), time_pad)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.save_for_backward(x, weight, cache)


def _backward(ctx, grad_out):
    x, weight, cache = ctx.saved_tensors
    need_x, need_w, need_b, need_c, need_r = ctx.needs_input_grad[:5]
    needs = [bool(need_x), bool(need_w), bool(need_b and ctx.bias_dtype is not None),
             bool(need_c and cache is not None)]
    gx = gw = gb = gc = gr = None
    if any(needs):
        grads = torch.ops.i2v_kernels._causal_conv3d_bwd(grad_out, x, weight, cache, *ctx.args, needs)
        gx, gw, gb, gc = (g if n else None for g, n in zip(grads, needs))
        if gb is not None:
            gb = gb.to(ctx.bias_dtype)
    if need_r and ctx.residual_dtype is not None:
        gr = grad_out.to(ctx.residual_dtype)
    return gx, gw, gb, gc, gr, None, None, None


_causal_conv3d_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Public function


def _autocast(x: Tensor, *tensors):
    """Cast floating tensors to the autocast dtype when autocast is on for x's device (as F.conv3d)."""
    device_type = x.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in (x, *tensors))


def causal_conv3d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, stride=1, dilation=1,
                  time_pad: str = "replicate", cache: Optional[Tensor] = None,
                  residual: Optional[Tensor] = None) -> Tensor:
    """Causal 3D convolution, temporal padding from ``cache`` or ``time_pad``.

    Args:
        x: ``[B, Cin, T, H, W]`` (any memory format; the device's :func:`output_format` is read without
            a copy).
        weight: ``[Cout, Cin, kt, kh, kw]``, x's dtype.
        bias: ``[Cout]`` or None.
        stride, dilation: int or ``(t, h, w)`` triple.
        time_pad: ``"replicate"`` (repeat the first frame; CogVideoX, LTX) or ``"zeros"`` (Wan); used
            only without ``cache``.
        cache: ``[B, Cin, P, H, W]`` with ``P = (kt - 1) * dilation_t``: the last ``P`` frames of the
            previous chunk's padded input (what :class:`CausalConv3d` returns as ``new_cache``).
        residual: ``[B, Cout, T_out, H_out, W_out]`` added to the output (fused in the epilogue).

    Returns:
        ``[B, Cout, T_out, H_out, W_out]`` in x's dtype, in :func:`output_format` of x's device
        (``torch.channels_last_3d`` on GPUs, contiguous NCDHW on CPUs), with
        ``T_out = (T - 1) // s_t + 1`` and ``H_out = (H + 2 * (d_h * (kh - 1) // 2) - d_h * (kh - 1) - 1) // s_h + 1``.

    Chunked calls equal one whole call when each chunk gets the previous chunk's cache and, with a
    temporal stride ``s_t > 1``, every chunk but the last has a multiple of ``s_t`` frames.

    Example::

        x = torch.randn(1, 128, 5, 60, 90, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(128, 128, 3, 3, 3, device="cuda", dtype=torch.bfloat16) * 0.02
        y = i2v_kernels.causal_conv3d(x, w, time_pad="replicate")       # [1, 128, 5, 60, 90]
    """
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{_OP}: {name} must be a Tensor, got {type(t).__name__}")
    for name, t in (("bias", bias), ("cache", cache), ("residual", residual)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{_OP}: {name} must be a Tensor or None, got {type(t).__name__}")
    stride = _check_triple("stride", stride)
    dilation = _check_triple("dilation", dilation)
    if time_pad not in TIME_PADS:
        raise ValueError(f"{_OP}: time_pad must be one of {', '.join(map(repr, TIME_PADS))}, got {time_pad!r}")
    x, weight, bias, cache, residual = _autocast(x, weight, bias, cache, residual)
    if _backend.direct_call_ok(x, weight, bias, cache, residual):
        return _forward(x, weight, bias, cache, residual, stride, dilation, time_pad)
    return torch.ops.i2v_kernels.causal_conv3d(x, weight, bias, cache, residual, list(stride), list(dilation),
                                               time_pad)
