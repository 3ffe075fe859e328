"""QK-norm + RoPE as one memory-bound op: q and k read once, written normalized and rotated.

``qk_norm_rope(q, k, qk_norm=..., rope=(cos, sin))`` computes, for q and for k (each ``[..., H, D]``,
the same shape),

    y = norm(x) * weight + bias              (LayerNorm or RMSNorm over D; weight/bias optional)
    y = y * cos + rotate(y) * sin            (RoPE; rotate = (-x1, x0) per pair)

with the formula of the attention family's prologue (``attention.reference.prologue``): pairs are
``(x[2i], x[2i+1])`` for ``rope_style="interleaved"`` (CogVideoX, Wan) and ``(x[i], x[i + D/2])`` for
``"half"``. ``cos``/``sin`` are ``[..., D]`` broadcastable to q without its head dim (``[S, D]``,
``[T, S, D]``, ``[N, D]``, ``[B, N, D]``) and are never expanded in memory.

q and k are read through their strides (unit stride on D), so ``qkv.view(B, N, 3, H, D).unbind(2)``
goes in without copies; the outputs are contiguous, same shape, in the input dtype. Math in fp32
(fp64 for fp64 inputs on the ``torch`` backend). Backends: ``cuda`` (CUDA C++, ``csrc/qk_norm_rope``:
a group of lanes per row of q and k, 16-byte accesses where D and the strides allow), ``triton`` (one
launch for q and k), ``cpu`` (the CUDA kernel's row routine compiled for the CPU: tests its arithmetic
without a GPU), ``native`` (eager ``F.layer_norm``/``F.rms_norm`` + multiply-add in the input dtype)
and ``torch`` (the fp32 reference); ``auto`` runs the fastest measured. Autocast: inputs are not cast.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from i2v_kernels import _backend, _dispatch, _static_table
from i2v_kernels.ops._checks import check_float_tensor
from i2v_kernels.ops.adaln import CPP_MAX_ROW_DIMS, _check_eps, _row_dims_why_not
from i2v_kernels.ops.attention import check_prologue, native, reference

__all__ = ["qk_norm_rope"]

OP = "qk_norm_rope"
_IMPLEMENTED = ("cuda", "triton", "cpu", "native", "torch")
# The C++ kernels (csrc/qk_norm_rope): dtypes, widest head dim (qk_norm_rope_params.h kMaxD), norm codes.
_CPP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPP_MAX_D = 256
_CPP_NORM = {None: 0, "layer": 1, "rms": 2}

_backend.load_extension()  # registers the C++ schemas before the Python op joins the namespace


# --------------------------------------------------------------------------------------------------
# Argument checks (shared by the real and fake implementations, so torch.compile reports them too)


def _check(q, k, qk_norm, qw, qb, kw, kb, cos, sin, rope_style) -> None:
    for name, t in (("q", q), ("k", k)):
        check_float_tensor(OP, name, t, q, "q")
    if k.dtype != q.dtype:
        raise TypeError(f"{OP}: k must have q's dtype {q.dtype}, got {k.dtype}")
    if q.dim() < 2 or q.shape[-1] == 0:
        raise ValueError(f"{OP}: q must be [..., H, D] with D >= 1, got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"{OP}: k must have q's shape {tuple(q.shape)} [..., H, D], got {tuple(k.shape)}")
    check_prologue(OP, q, qk_norm, qw, qb, kw, kb, cos, sin, rope_style)


def _check_types(q, k, qw, qb, kw, kb, rope) -> None:
    """Before the op's schema sees them: non-tensors get our error, not the dispatcher's cast error."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{OP}: {name} must be a Tensor, got {type(t).__name__}")
    for name, t in (("q_norm_weight", qw), ("q_norm_bias", qb), ("k_norm_weight", kw), ("k_norm_bias", kb)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{OP}: {name} must be a Tensor or None, got {type(t).__name__}")
    if rope is not None and (not isinstance(rope, (tuple, list)) or len(rope) != 2
                             or not all(isinstance(t, Tensor) for t in rope)):
        raise TypeError(f"{OP}: rope must be None or a pair (cos, sin) of Tensors, got {type(rope).__name__}")


# --------------------------------------------------------------------------------------------------
# Dispatch


def _unit_d(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _common(tensors, x: Tensor, pad=None):
    """The tensors (None where absent) in one dtype, contiguous: x's when they all have it, else fp32
    (never a lossy cast). ``pad`` fills a missing member of a present pair (ones for weights, zeros
    for biases), so the kernel takes both or neither."""
    present = [t for t in tensors if t is not None]
    if not present:
        return list(tensors)
    dtype = x.dtype if all(t.dtype == x.dtype for t in present) else torch.float32
    out = []
    for t in tensors:
        if t is None and pad is not None:
            t = pad(present[0])
        out.append(None if t is None else t.to(dtype).contiguous())
    return out


def _triton_forward(q, k, qk_norm, qw, qb, kw, kb, eps, cos, sin, rope_style):
    from i2v_kernels.ops.qk_norm_rope import triton as kernels

    qw, kw = _common((qw, kw), q, pad=torch.ones_like)
    qb, kb = _common((qb, kb), q, pad=torch.zeros_like)
    if cos is not None:
        cos, sin = _common(torch.broadcast_tensors(cos, sin), q)
    return kernels.qk_norm_rope_fwd(_unit_d(q), _unit_d(k), kernels.NORM_CODES[qk_norm], qw, qb, kw, kb, eps, cos,
                                    sin, cos is not None and rope_style == "half")


def _cpp_views(q, k, qw, qb, kw, kb, cos, sin):
    """What the C++ kernels take: q, k with unit stride on D; the weights, biases and RoPE table in one
    dtype (q's, else fp32), contiguous; cos/sin broadcast against each other, then expanded over q's
    heads as stride-0 views of q's shape (the table itself is never expanded in memory)."""
    if cos is not None:
        cos, sin = torch.broadcast_tensors(cos, sin)
    qw, qb, kw, kb, cos, sin = _common((qw, qb, kw, kb, cos, sin), q)
    if cos is not None:
        cos, sin = (t.unsqueeze(-2).expand(q.shape) for t in (cos, sin))
    return _unit_d(q), _unit_d(k), qw, qb, kw, kb, cos, sin


def _cpp_why_not(backend: str, q: Tensor, views: Callable[[], tuple]) -> Optional[str]:
    """Why the C++ kernel of ``backend`` (cuda or cpu) cannot take this call, or None; ``views()``
    makes the kernel's views (only once the cheap checks pass)."""
    key = backend.upper()
    if not hasattr(torch.ops.i2v_kernels, "_qk_norm_rope_fwd") or not _backend._has_kernel("_qk_norm_rope_fwd", key):
        return f"i2v_kernels._C was built without the {backend} qk_norm_rope kernel (rebuild the extension)"
    if q.dtype not in _CPP_DTYPES:
        return f"the {backend} kernel supports float32/float16/bfloat16, not {q.dtype}"
    if q.shape[-1] > CPP_MAX_D:
        return f"head dim D = {q.shape[-1]} exceeds the {backend} kernel's {CPP_MAX_D}"
    v = views()
    return _row_dims_why_not(backend, [v[0], v[1], v[6]], CPP_MAX_ROW_DIMS)


def _cpp_forward(views, qk_norm, eps, rope_style):
    q, k, qw, qb, kw, kb, cos, sin = views
    return torch.ops.i2v_kernels._qk_norm_rope_fwd(q, k, qw, qb, kw, kb, cos, sin, _CPP_NORM[qk_norm], eps,
                                                   cos is not None and rope_style == "half")


def _fresh(y: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
    """``y`` in ``dtype``, contiguous, and never ``x`` itself (an op's output may not alias its input:
    with neither norm nor RoPE the formula is the identity)."""
    y = y.to(dtype)
    return y.clone(memory_format=torch.contiguous_format) if y is x else y.contiguous()


def _reference_forward(q, k, qk_norm, qw, qb, kw, kb, eps, cos, sin, rope_style):
    rope = None if cos is None else (cos, sin)
    return tuple(_fresh(reference.prologue(x, qk_norm, w, b, eps, rope, rope_style), x, q.dtype)
                 for x, w, b in ((q, qw, qb), (k, kw, kb)))


def _native_forward(q, k, qk_norm, qw, qb, kw, kb, eps, cos, sin, rope_style):
    return tuple(_fresh(native.prologue(x, qk_norm, w, b, eps, cos, sin, rope_style), x, q.dtype)
                 for x, w, b in ((q, qw, qb), (k, kw, kb)))


def dispatch_features(q_shape, qk_norm, has_weight: bool, has_bias: bool, has_rope: bool,
                      rope_style: str) -> tuple[tuple, tuple]:
    """``(flags, sizes)`` of a call for the dispatch key: flags must match exactly; sizes are
    ``(rows, D)`` with rows = the number of (token, head) vectors of q."""
    rows = 1
    for n in q_shape[:-1]:
        rows *= n
    flags = (qk_norm or "none", rope_style if has_rope else "none", int(has_weight), int(has_bias))
    return flags, (rows, q_shape[-1])


def _forward(q, k, qk_norm, qw, qb, kw, kb, eps, cos, sin, rope_style):
    _check(q, k, qk_norm, qw, qb, kw, kb, cos, sin, rope_style)
    args = (q, k, qk_norm, qw, qb, kw, kb, eps, cos, sin, rope_style)
    if q.numel() == 0:
        return _reference_forward(*args)
    views = None

    def cpp_views():
        nonlocal views
        if views is None:
            views = _cpp_views(q, k, qw, qb, kw, kb, cos, sin)
        return views

    def why_not(backend: str) -> Optional[str]:
        if backend == "triton":
            from i2v_kernels.ops.qk_norm_rope import triton as kernels

            return kernels.why_not(_unit_d(q), _unit_d(k), cos if cos is None else torch.broadcast_tensors(cos, sin)[0])
        if backend in ("cuda", "cpu"):
            return _cpp_why_not(backend, q, cpp_views)
        return None

    def run(backend: str):
        if backend in ("cuda", "cpu"):
            return _cpp_forward(cpp_views(), qk_norm, eps, rope_style)
        if backend == "triton":
            return _triton_forward(*args)
        if backend == "native":
            return _native_forward(*args)
        return _reference_forward(*args)

    flags, sizes = dispatch_features(q.shape, qk_norm, qw is not None or kw is not None,
                                     qb is not None or kb is not None, cos is not None, rope_style)
    features = flags + (_dispatch.bucket(sizes[0]), sizes[1])
    return _backend.dispatch(OP, q.device, q.dtype, why_not, _IMPLEMENTED, features, run,
                             lambda: _dispatch.nearest_static(_static_table.TABLE, OP, q.device, q.dtype, flags, sizes))


# --------------------------------------------------------------------------------------------------
# The op


@torch.library.custom_op("i2v_kernels::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(q: Tensor, k: Tensor, qk_norm: Optional[str], q_norm_weight: Optional[Tensor],
                     q_norm_bias: Optional[Tensor], k_norm_weight: Optional[Tensor], k_norm_bias: Optional[Tensor],
                     norm_eps: float, rope_cos: Optional[Tensor], rope_sin: Optional[Tensor],
                     rope_style: str) -> tuple[Tensor, Tensor]:
    return _forward(q, k, qk_norm, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, norm_eps, rope_cos,
                    rope_sin, rope_style)


@_qk_norm_rope_op.register_fake
def _(q, k, qk_norm, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, norm_eps, rope_cos, rope_sin,
      rope_style):
    _check(q, k, qk_norm, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, rope_cos, rope_sin, rope_style)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format))


# Autograd: the reference's explicit backward of the prologue (fp32; fp64 for fp64), once for q and
# once for k; the RoPE table gets the sum of both.

_INPUTS = ("q", "k", "qk_norm", "q_norm_weight", "q_norm_bias", "k_norm_weight", "k_norm_bias", "norm_eps",
           "rope_cos", "rope_sin", "rope_style")


def _setup_context(ctx, inputs, output):
    args = dict(zip(_INPUTS, inputs))
    ctx.qk_norm, ctx.eps, ctx.rope_style = args["qk_norm"], args["norm_eps"], args["rope_style"]
    ctx.save_for_backward(*(args[n] for n in ("q", "k", "q_norm_weight", "q_norm_bias", "k_norm_weight",
                                              "k_norm_bias", "rope_cos", "rope_sin")))


def _backward(ctx, grad_q, grad_k):
    q, k, qw, qb, kw, kb, cos, sin = ctx.saved_tensors
    needs = dict(zip(_INPUTS, ctx.needs_input_grad))
    rope = None if cos is None else (cos, sin)
    acc = reference.acc_dtype(q)
    rope_needs = [needs["rope_cos"], needs["rope_sin"]]
    dq, dqw, dqb, dcos, dsin = reference.prologue_bwd(
        q, grad_q.to(acc), ctx.qk_norm, qw, qb, ctx.eps, rope, ctx.rope_style,
        [needs["q"], needs["q_norm_weight"], needs["q_norm_bias"], *rope_needs])
    dk, dkw, dkb, dcos_k, dsin_k = reference.prologue_bwd(
        k, grad_k.to(acc), ctx.qk_norm, kw, kb, ctx.eps, rope, ctx.rope_style,
        [needs["k"], needs["k_norm_weight"], needs["k_norm_bias"], *rope_needs])
    dcos = None if dcos is None else dcos + dcos_k
    dsin = None if dsin is None else dsin + dsin_k
    grads = {"q": dq, "k": dk, "q_norm_weight": dqw, "q_norm_bias": dqb, "k_norm_weight": dkw, "k_norm_bias": dkb,
             "rope_cos": dcos, "rope_sin": dsin}
    inputs = {"q": q, "k": k, "q_norm_weight": qw, "q_norm_bias": qb, "k_norm_weight": kw, "k_norm_bias": kb,
              "rope_cos": cos, "rope_sin": sin}
    return tuple(grads[n].to(inputs[n].dtype) if needs[n] and grads.get(n) is not None else None for n in _INPUTS)


_qk_norm_rope_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Public function


def qk_norm_rope(q: Tensor, k: Tensor, *, qk_norm: Optional[str] = None, q_norm_weight: Optional[Tensor] = None,
                 q_norm_bias: Optional[Tensor] = None, k_norm_weight: Optional[Tensor] = None,
                 k_norm_bias: Optional[Tensor] = None, norm_eps: float = 1e-6,
                 rope: Optional[tuple[Tensor, Tensor]] = None, rope_style: str = "interleaved") -> tuple[Tensor, Tensor]:
    """QK-norm over D then RoPE, for q and k in one pass.

    Args:
        q, k: ``[..., H, D]``, one shape and dtype, any strides with unit stride on D.
        qk_norm: None, ``"layer"`` (LayerNorm) or ``"rms"`` (RMSNorm) over D.
        q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias: ``[D]`` affine (biases: LayerNorm only).
        norm_eps: the norm's epsilon, > 0.
        rope: ``(cos, sin)``, each ``[..., D]`` broadcastable to q without its head dim, or None.
        rope_style: ``"interleaved"`` (pairs ``(x[2i], x[2i+1])``) or ``"half"`` (``(x[i], x[i + D/2])``).

    Returns:
        ``(q_out, k_out)``: contiguous, q's shape and dtype.

    Example::

        qkv = torch.randn(2, 17776, 3 * 48 * 64, dtype=torch.bfloat16, device="cuda")
        q, k, v = qkv.view(2, 17776, 3, 48, 64).unbind(2)              # [B, N, H, D] views
        cos, sin = torch.randn(2, 17776, 64, device="cuda").unbind(0)   # [N, D]
        q, k = i2v_kernels.qk_norm_rope(q, k, qk_norm="layer", rope=(cos, sin))
    """
    _check_types(q, k, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, rope)
    cos, sin = (None, None) if rope is None else rope
    eps = _check_eps(norm_eps, OP)
    if _backend.direct_call_ok(q, k, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, cos, sin):
        return _forward(q, k, qk_norm, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, eps, cos, sin,
                        rope_style)
    return torch.ops.i2v_kernels.qk_norm_rope(q, k, qk_norm, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias,
                                              eps, cos, sin, rope_style)
