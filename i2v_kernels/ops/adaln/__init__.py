"""Fused adaLN family: LayerNorm + modulation, gated residual, both fused, and RMSNorm.

Layouts: ``x`` is ``[..., C]``. ``shift``, ``scale`` and ``gate`` are any shape that broadcasts to ``x``
with last dim ``C`` -- per-sample ``[B, 1, C]``, per-frame ``[B, T, 1, C]`` against ``x [B, T, S, C]``,
per-token ``[B, N, C]``, shared ``[C]`` -- and are read through their strides, never expanded in
memory. ``weight``/``bias`` are the LayerNorm (or RMSNorm) affine, ``[C]``.

Each public function is one ``torch.library`` op (``torch.ops.i2v_kernels.<name>``) with a fake
implementation and autograd; the backend (cuda, triton, cpu, torch) is chosen inside it per call.
Numerics: statistics and math in fp32 (fp64 for fp64 inputs), outputs in ``x``'s dtype. Autocast
policy: inputs are not cast (modulation tensors may be fp32 next to a bf16 ``x``, as Wan keeps them).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from i2v_kernels import _backend, _dispatch, _static_table
from i2v_kernels.ops._checks import FLOAT_DTYPES, check_float_arg, check_float_tensor
from i2v_kernels.ops._rows import coalesce_rows
from i2v_kernels.ops.adaln import native, reference
from i2v_kernels.ops.adaln.reference import NORM_LAYER, NORM_NONE, NORM_RMS

__all__ = ["adaln_modulate", "gated_residual", "gated_residual_adaln", "rms_norm"]

_NATIVE_DTYPES = {
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
    "cpu": FLOAT_DTYPES,
}

_IMPLEMENTED = ("cuda", "triton", "cpu", "native", "torch")

_backend.load_extension()  # registers the C++ schemas before the Python ops join the namespace


# --------------------------------------------------------------------------------------------------
# Argument checks (shared by the real and fake implementations, so torch.compile reports them too)


def _check_eps(eps, op: str) -> float:
    return check_float_arg(op, "eps", eps, positive=True, what=" (it keeps 1/sqrt(var + eps) finite)")


def _check_types(op: str, **tensors) -> None:
    """Before the op's schema sees them: non-tensors get our error, not the dispatcher's cast error."""
    for name, t in tensors.items():
        required = name in ("x", "y")
        if (required or t is not None) and not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor" + ("" if required else " or None") +
                            f", got {type(t).__name__}")


def _check(op: str, x, y=None, gate=None, shift=None, scale=None, weight=None, bias=None) -> None:
    check_float_tensor(op, "x", x, x, "x")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must be [..., C] with C >= 1 channels, got shape {tuple(x.shape)}")
    C = x.shape[-1]
    if y is not None:
        check_float_tensor(op, "y", y, x, "x")
        if y.shape != x.shape:
            raise ValueError(f"{op}: y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
        if y.dtype != x.dtype:
            raise TypeError(f"{op}: y must have x's dtype {x.dtype}, got {y.dtype}")
    for name, m in (("gate", gate), ("shift", shift), ("scale", scale)):
        if m is None:
            continue
        check_float_tensor(op, name, m, x, "x")
        if m.dim() == 0 or m.shape[-1] != C or m.dim() > x.dim() or any(
            a != 1 and a != b for a, b in zip(reversed(m.shape), reversed(x.shape))
        ):
            raise ValueError(
                f"{op}: {name} of shape {tuple(m.shape)} must broadcast to x {tuple(x.shape)} with last dim "
                f"C={C} (e.g. [B, 1, C] per sample, [B, T, 1, C] per frame, [C] shared)"
            )
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        check_float_tensor(op, name, p, x, "x")
        if tuple(p.shape) != (C,):
            raise ValueError(f"{op}: {name} must have shape ({C},) to match x's last dim, got {tuple(p.shape)}")


# --------------------------------------------------------------------------------------------------
# Dispatch


def _kernel_views(x, y, gate, shift, scale, weight, bias):
    """What the kernels take: unit stride on C, modulation expanded (as stride-0 views) to x's shape,
    all modulation tensors in one dtype (x's, else fp32 -- never a lossy cast)."""
    mods = [gate, shift, scale, weight, bias]
    present = [m for m in mods if m is not None]
    mod_dtype = x.dtype if all(m.dtype == x.dtype for m in present) else torch.float32
    if x.dtype == torch.float64:
        mod_dtype = torch.float64

    def unit(t):
        if t.stride(-1) == 1:
            return t
        if t.shape[-1] == 1:  # the last stride is never used; say so without copying
            return t.as_strided(t.shape, (*t.stride()[:-1], 1))
        return t.contiguous()

    def mod(t, expand):
        if t is None:
            return None
        t = unit(t.to(mod_dtype))
        return t.expand(x.shape) if expand else t.contiguous()

    x = unit(x)
    y = None if y is None else unit(y)
    return x, y, mod(gate, True), mod(shift, True), mod(scale, True), mod(weight, False), mod(bias, False)


# csrc/common/rows.h kMaxRowDims: the C++ kernels address rows through at most this many coalesced dims.
CPP_MAX_ROW_DIMS = 8


def _row_dims_why_not(backend: str, views, max_dims: int) -> Optional[str]:
    """Why a kernel that addresses rows through ``max_dims`` coalesced leading dims cannot take these
    row-shaped views (x, y, gate, shift, scale; None where absent), or None."""
    x = views[0]
    dims = coalesce_rows(x.shape[:-1], [None if v is None else v.stride()[:-1] for v in views])[0]
    if len(dims) > max_dims:
        return (f"the {backend} kernel addresses rows through at most {max_dims} coalesced leading dims; "
                f"these strides need {len(dims)}")
    return None


def _triton():
    from i2v_kernels.ops.adaln import triton as triton_kernels

    return triton_kernels


def dispatch_features(x_shape, mod_shapes) -> tuple[tuple, tuple]:
    """``(flags, sizes)`` of a call for the dispatch key: the modulation's broadcast pattern (``none``,
    ``shared`` [C], ``sample`` [B, 1, C], ``frame`` (varies along a middle dim), ``token`` (varies along
    the rows' last dim)) and ``(rows, C)``. ``mod_shapes``: the shapes of gate, shift, scale (None
    where absent)."""
    C = x_shape[-1]
    rows = 1
    for n in x_shape[:-1]:
        rows *= n
    kind = "none"
    order = ("none", "shared", "sample", "frame", "token")
    for shape in mod_shapes:
        if shape is None:
            continue
        lead = [1] * (len(x_shape) - len(shape)) + list(shape[:-1])
        if len(lead) and lead[-1] != 1 and x_shape[-2] != 1:
            k = "token"
        elif any(n != 1 for n in lead[1:]):
            k = "frame"
        elif lead and lead[0] != 1:
            k = "sample"
        else:
            k = "shared"
        kind = max(kind, k, key=order.index)
    return (kind,), (rows, C)


def _fused(op: str, x, y, gate, shift, scale, weight, bias, norm: int, eps: float):
    _check(op, x, y, gate, shift, scale, weight, bias)
    if x.numel() == 0:
        return reference.fused_fwd(x, y, gate, shift, scale, weight, bias, norm, eps)
    views = None

    def kernel_views():
        nonlocal views
        if views is None:
            views = _kernel_views(x, y, gate, shift, scale, weight, bias)
        return views

    def why_not(backend: str) -> Optional[str]:
        if backend == "triton":
            v = kernel_views()
            return _triton().why_not(v[0], v[:5])
        if backend in _NATIVE_DTYPES and x.dtype not in _NATIVE_DTYPES[backend]:
            return f"the {backend} kernel does not support {x.dtype}"
        if backend in _NATIVE_DTYPES:
            return _row_dims_why_not(backend, kernel_views()[:5], CPP_MAX_ROW_DIMS)
        return None

    def run(backend: str):
        if backend == "torch":
            return reference.fused_fwd(x, y, gate, shift, scale, weight, bias, norm, eps)
        if backend == "native":
            return native.fused_fwd(x, y, gate, shift, scale, weight, bias, norm, eps)
        if backend == "triton":
            return _triton().adaln_fwd(*kernel_views(), norm, eps)
        return torch.ops.i2v_kernels._adaln_fwd(*kernel_views(), norm, eps)

    mods = (gate, shift, scale)
    flags, sizes = dispatch_features(x.shape, [None if m is None else tuple(m.shape) for m in mods])
    mixed = any(m is not None and m.dtype != x.dtype for m in mods + (weight, bias))
    features = flags + (_dispatch.bucket(sizes[0]), sizes[1], int(mixed), int(weight is not None),
                        int(bias is not None))
    return _backend.dispatch(op, x.device, x.dtype, why_not, _IMPLEMENTED, features, run,
                             lambda: _dispatch.nearest_static(_static_table.TABLE, op, x.device, x.dtype, flags, sizes))


# --------------------------------------------------------------------------------------------------
# The ops


@torch.library.custom_op("i2v_kernels::adaln_modulate", mutates_args=())
def _adaln_modulate_op(
    x: Tensor, shift: Optional[Tensor], scale: Optional[Tensor], weight: Optional[Tensor],
    bias: Optional[Tensor], eps: float,
) -> Tensor:
    return _fused("adaln_modulate", x, None, None, shift, scale, weight, bias, NORM_LAYER, eps)[0]


@torch.library.custom_op("i2v_kernels::gated_residual", mutates_args=())
def _gated_residual_op(x: Tensor, y: Tensor, gate: Optional[Tensor]) -> Tensor:
    return _fused("gated_residual", x, y, gate, None, None, None, None, NORM_NONE, 1.0)[0]


@torch.library.custom_op("i2v_kernels::gated_residual_adaln", mutates_args=())
def _gated_residual_adaln_op(
    x: Tensor, y: Tensor, gate: Optional[Tensor], shift: Optional[Tensor], scale: Optional[Tensor],
    weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
) -> tuple[Tensor, Tensor]:
    out, r = _fused("gated_residual_adaln", x, y, gate, shift, scale, weight, bias, NORM_LAYER, eps)
    return r, out


@torch.library.custom_op("i2v_kernels::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    return _fused("rms_norm", x, None, None, None, None, weight, None, NORM_RMS, eps)[0]


@_adaln_modulate_op.register_fake
def _(x, shift, scale, weight, bias, eps):
    _check("adaln_modulate", x, None, None, shift, scale, weight, bias)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_gated_residual_op.register_fake
def _(x, y, gate):
    _check("gated_residual", x, y, gate)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_gated_residual_adaln_op.register_fake
def _(x, y, gate, shift, scale, weight, bias, eps):
    _check("gated_residual_adaln", x, y, gate, shift, scale, weight, bias)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


@_rms_norm_op.register_fake
def _(x, weight, eps):
    _check("rms_norm", x, weight=weight)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# Autograd: one recompute-based backward (fp32 math in plain PyTorch) serves the whole family; it
# maps each op's inputs onto reference.fused_bwd's (x, y, gate, shift, scale, weight, bias).


def _setup(ctx, names, inputs, norm):
    ctx.names = names
    ctx.norm = norm
    args = dict(zip(names, inputs))
    ctx.eps = args.pop("eps", 0.0)
    ctx.save_for_backward(*(args.get(k) for k in ("x", "y", "gate", "shift", "scale", "weight", "bias")))


def _backward(ctx, grad_out, grad_res=None):
    saved = ctx.saved_tensors
    order = ("x", "y", "gate", "shift", "scale", "weight", "bias")
    needs_by_name = dict(zip(ctx.names, ctx.needs_input_grad))
    needs = [needs_by_name.get(k, False) for k in order]
    grads = dict(zip(order, reference.fused_bwd(grad_out, grad_res, *saved, ctx.norm, ctx.eps, needs)))
    return tuple(grads.get(name) for name in ctx.names)


_SIGNATURES = {
    _adaln_modulate_op: (("x", "shift", "scale", "weight", "bias", "eps"), NORM_LAYER),
    _gated_residual_op: (("x", "y", "gate"), NORM_NONE),
    _gated_residual_adaln_op: (("x", "y", "gate", "shift", "scale", "weight", "bias", "eps"), NORM_LAYER),
    _rms_norm_op: (("x", "weight", "eps"), NORM_RMS),
}


def _register_autograd(op, names, norm):
    def setup_context(ctx, inputs, output):
        _setup(ctx, names, inputs, norm)

    if op is _gated_residual_adaln_op:
        def backward(ctx, grad_r, grad_out):
            return _backward(ctx, grad_out, grad_r)
    else:
        def backward(ctx, grad_out):
            return _backward(ctx, grad_out)

    op.register_autograd(backward, setup_context=setup_context)


for _op, (_names, _norm) in _SIGNATURES.items():
    _register_autograd(_op, _names, _norm)


# --------------------------------------------------------------------------------------------------
# Public functions


def adaln_modulate(x: Tensor, shift: Optional[Tensor], scale: Optional[Tensor], *, eps: float = 1e-6,
                   weight: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
    """Fused ``LayerNorm(x) * (1 + scale) + shift`` over the last dim.

    Args:
        x: ``[..., C]``.
        shift, scale: broadcastable to ``x`` with last dim ``C`` (``[B, 1, C]``, ``[B, T, 1, C]``,
            ``[B, N, C]``, ``[C]``), or None to skip that term.
        eps: LayerNorm epsilon, > 0.
        weight, bias: optional LayerNorm affine, ``[C]`` (applied before the modulation).

    Returns:
        ``[..., C]`` in ``x``'s dtype (contiguous).

    Example::

        x = torch.randn(2, 16, 256, 1152)            # [B, T, S, C]
        shift = torch.randn(2, 16, 1, 1152)          # per frame
        scale = torch.randn(2, 1, 1, 1152)           # per sample
        y = i2v_kernels.adaln_modulate(x, shift, scale)
    """
    _check_types("adaln_modulate", x=x, shift=shift, scale=scale, weight=weight, bias=bias)
    eps = _check_eps(eps, "adaln_modulate")
    if _backend.direct_call_ok(x, shift, scale, weight, bias):
        return _fused("adaln_modulate", x, None, None, shift, scale, weight, bias, NORM_LAYER, eps)[0]
    return torch.ops.i2v_kernels.adaln_modulate(x, shift, scale, weight, bias, eps)


def gated_residual(x: Tensor, y: Tensor, gate: Optional[Tensor]) -> Tensor:
    """``x + gate * y`` with ``gate`` broadcast to ``x`` (last dim ``C``); ``x``, ``y``: ``[..., C]``."""
    _check_types("gated_residual", x=x, y=y, gate=gate)
    if _backend.direct_call_ok(x, y, gate):
        return _fused("gated_residual", x, y, gate, None, None, None, None, NORM_NONE, 1.0)[0]
    return torch.ops.i2v_kernels.gated_residual(x, y, gate)


def gated_residual_adaln(x: Tensor, y: Tensor, gate: Optional[Tensor], shift: Optional[Tensor],
                         scale: Optional[Tensor], *, eps: float = 1e-6, weight: Optional[Tensor] = None,
                         bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Gated residual and the next block's adaLN in one pass over the row.

    Returns ``(r, out)`` with ``r = x + gate * y`` (the new residual stream) and
    ``out = LayerNorm(r) * (1 + scale) + shift`` (the next sub-block's input).
    """
    _check_types("gated_residual_adaln", x=x, y=y, gate=gate, shift=shift, scale=scale, weight=weight, bias=bias)
    eps = _check_eps(eps, "gated_residual_adaln")
    if _backend.direct_call_ok(x, y, gate, shift, scale, weight, bias):
        out, r = _fused("gated_residual_adaln", x, y, gate, shift, scale, weight, bias, NORM_LAYER, eps)
        return r, out
    return torch.ops.i2v_kernels.gated_residual_adaln(x, y, gate, shift, scale, weight, bias, eps)


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, *, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dim: ``x / sqrt(mean(x ** 2) + eps) * weight`` (QK-norm); ``weight``: ``[C]``."""
    _check_types("rms_norm", x=x, weight=weight)
    eps = _check_eps(eps, "rms_norm")
    if _backend.direct_call_ok(x, weight):
        return _fused("rms_norm", x, None, None, None, None, weight, None, NORM_RMS, eps)[0]
    return torch.ops.i2v_kernels.rms_norm(x, weight, eps)
