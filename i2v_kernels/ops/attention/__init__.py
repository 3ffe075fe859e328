"""Factorized spatial-temporal attention: spatial, temporal, and dense/cross attention.

``softmax(q k^T * scale) v`` with fp32 accumulation; ``scale`` defaults to ``D ** -0.5``.

* ``spatial_attention(q, k, v)``: ``[B, T, S, H, D]``, each frame attends within itself.
* ``temporal_attention(q, k, v, causal=False)``: ``[B, T, S, H, D]``, each position across frames.
* ``attention(q, k, v, kv_lens=None)``: ``q [B, N, H, D]``, ``k, v [B, M, H, D]``; dense 3D attention
  (``N = M = T * S``) or cross-attention to text/image tokens with per-sample valid key lengths.

Inputs are read through their strides (unit stride on ``D`` only): views of a packed QKV projection,
``qkv.view(B, T, S, 3, H, D).unbind(3)``, go in without copies, and the output comes back in the same
``[B, T, S, H, D]`` / ``[B, N, H, D]`` layout (contiguous). Optional fused prologue, keyword-only:
``qk_norm="layer" | "rms"`` with ``q_norm_weight``/``k_norm_weight`` (and biases for ``"layer"``) over
``D``, and ``rope=(cos, sin)`` rotary embedding (``rope_style="interleaved"`` as CogVideoX/Wan, or
``"half"``). The Triton and native backends run the prologue once, through the ``qk_norm_rope`` op,
before their attention core; only the packed temporal Triton kernel fuses it (it reads each element
of q and k once anyway).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from i2v_kernels import _backend, _dispatch
from i2v_kernels.ops._checks import check_float_arg, check_float_tensor
from i2v_kernels.ops.attention import native, reference

__all__ = ["attention", "spatial_attention", "temporal_attention"]

SPATIAL, TEMPORAL, DENSE = 0, 1, 2
_NAMES = {SPATIAL: "spatial_attention", TEMPORAL: "temporal_attention", DENSE: "attention"}
_IMPLEMENTED = ("triton", "torch")  # backward kernels
_FWD = ("triton", "native", "native_packed", "flash_attn", "sageattention", "torch")
_IMPLEMENTED_FWD = {SPATIAL: _FWD, TEMPORAL: ("cuda", "cpu") + _FWD, DENSE: _FWD}

_backend.load_extension()


# --------------------------------------------------------------------------------------------------
# Argument checks


def _check(mode, q, k, v, scale, kv_lens, qk_norm, qw, qb, kw, kb, norm_eps, cos, sin, rope_style):
    op = _NAMES[mode]
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(op, name, t, q, "q")
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
    if mode == DENSE:
        layout = "[B, N, H, D] for q and [B, M, H, D] for k, v"
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"{op}: expected {layout}; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
            raise ValueError(f"{op}: expected {layout} with matching B, H, D and k.shape == v.shape; "
                             f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        if k.shape[1] == 0 and q.shape[0] * q.shape[1] * q.shape[2] != 0:
            # softmax over no keys is undefined (kv_lens likewise needs >= 1 key per sample)
            raise ValueError(f"{op}: k and v have M = 0 keys; every query needs at least one key "
                             f"(got q {tuple(q.shape)}, k {tuple(k.shape)})")
    else:
        if q.dim() != 5:
            raise ValueError(f"{op}: q must be [B, T, S, H, D], got shape {tuple(q.shape)}")
        for name, t in (("k", k), ("v", v)):
            if t.shape != q.shape:
                raise ValueError(f"{op}: {name} must have q's shape {tuple(q.shape)} [B, T, S, H, D], got {tuple(t.shape)}")
    D = q.shape[-1]
    if D == 0:
        raise ValueError(f"{op}: head dim D must be >= 1, got q of shape {tuple(q.shape)}")
    if scale is not None:
        check_float_arg(op, "scale", scale)
    if kv_lens is not None:
        if not isinstance(kv_lens, Tensor) or kv_lens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: kv_lens must be an int32/int64 tensor [B], got "
                            f"{kv_lens.dtype if isinstance(kv_lens, Tensor) else type(kv_lens).__name__}")
        if tuple(kv_lens.shape) != (q.shape[0],):
            raise ValueError(f"{op}: kv_lens must have shape [B] = ({q.shape[0]},), got {tuple(kv_lens.shape)}")
        if kv_lens.device != q.device:
            raise ValueError(f"{op}: kv_lens is on {kv_lens.device} but q is on {q.device}")
    if cos is not None and mode == DENSE and k.shape[1] != q.shape[1]:
        raise ValueError(f"{op}: rope applies to self-attention (N == M); got N={q.shape[1]}, M={k.shape[1]}")
    check_prologue(op, q, qk_norm, qw, qb, kw, kb, cos, sin, rope_style)


def check_prologue(op, q, qk_norm, qw, qb, kw, kb, cos, sin, rope_style) -> None:
    """The QK-norm / RoPE arguments against ``q [..., H, D]`` (shared with the qk_norm_rope op)."""
    D = q.shape[-1]
    if qk_norm not in (None, "layer", "rms"):
        raise ValueError(f"{op}: qk_norm must be None, 'layer' or 'rms', got {qk_norm!r}")
    for name, t in (("q_norm_weight", qw), ("q_norm_bias", qb), ("k_norm_weight", kw), ("k_norm_bias", kb)):
        if t is None:
            continue
        if qk_norm is None:
            raise ValueError(f"{op}: {name} was given but qk_norm is None; pass qk_norm='layer' or 'rms'")
        if qk_norm == "rms" and name.endswith("bias"):
            raise ValueError(f"{op}: {name} applies only to qk_norm='layer' (RMSNorm has no bias)")
        check_float_tensor(op, name, t, q, "q")
        if tuple(t.shape) != (D,):
            raise ValueError(f"{op}: {name} must have shape ({D},) (the head dim D), got {tuple(t.shape)}")
    if rope_style not in ("interleaved", "half"):
        raise ValueError(f"{op}: rope_style must be 'interleaved' or 'half', got {rope_style!r}")
    if (cos is None) != (sin is None):
        raise ValueError(f"{op}: rope must be a pair (cos, sin)")
    if cos is not None:
        if D % 2:
            raise ValueError(f"{op}: rope needs an even head dim D, got {D}")
        target = q.shape[:-2] + q.shape[-1:]
        for name, t in (("rope cos", cos), ("rope sin", sin)):
            check_float_tensor(op, name, t, q, "q")
            if t.dim() == 0 or t.dim() > len(target) or any(
                a != 1 and a != b for a, b in zip(reversed(t.shape), reversed(target))
            ):
                raise ValueError(f"{op}: {name} of shape {tuple(t.shape)} must broadcast to q's shape without "
                                 f"its head dim, {tuple(target)} (e.g. [S, D], [T, S, D], [N, D])")


def _check_kv_lens_values(kv_lens, M, op):
    """Value check (needs the numbers, so eager only; a fake tensor under torch.compile has none)."""
    if kv_lens is None or isinstance(kv_lens, torch._subclasses.FakeTensor):
        return
    lo, hi = int(kv_lens.min()), int(kv_lens.max())
    if lo < 1 or hi > M:
        raise ValueError(f"{op}: kv_lens values must be in [1, M={M}] (at least one key per sample), got [{lo}, {hi}]")


# --------------------------------------------------------------------------------------------------
# Dispatch


def _five_d(mode, t):
    """The kernel's [b0, b1, b2, seq, D] view of a caller tensor (no copy)."""
    if mode == SPATIAL:
        return t.permute(0, 1, 3, 2, 4)  # [B, T, H, S, D]
    if mode == TEMPORAL:
        return t.permute(0, 2, 3, 1, 4)  # [B, S, H, T, D]
    return t.unsqueeze(1).permute(0, 1, 3, 2, 4)  # [B, 1, H, N, D]


def _unit_d(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _rope_views(mode, q, cos, sin):
    """cos/sin as views of q's shape (stride 0 across heads and broadcast dims) sharing one set of
    strides: only their own broadcast shape is ever materialized."""
    cos, sin = (t.contiguous() for t in torch.broadcast_tensors(cos, sin))
    target = q.shape[:-2] + q.shape[-1:]
    return tuple(_five_d(mode, t.expand(target).unsqueeze(-2).expand(q.shape)) for t in (cos, sin))


CUDA_TEMPORAL_MAX_T = 128


def _cuda_temporal_why_not(q, qk_norm, cos) -> Optional[str]:
    """Why the CUDA C++ temporal kernel cannot take this call, or None."""
    if not _backend._has_kernel("_temporal_attention_fwd", "CUDA"):
        return "i2v_kernels._C was built without the CUDA temporal-attention kernel"
    if qk_norm is not None or cos is not None:
        return "the CUDA temporal kernel has no fused QK-norm/RoPE prologue"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the CUDA temporal kernel supports float16/bfloat16/float32, not {q.dtype}"
    T, D = q.shape[1], q.shape[-1]
    if T > CUDA_TEMPORAL_MAX_T:
        return f"T = {T} frames exceeds the CUDA temporal kernel's {CUDA_TEMPORAL_MAX_T}"
    # One warp's staged q, k, v rows (each an odd number of 16-byte chunks) and its T fp32 softmax
    # weights: temporal_smem_per_warp in csrc/attention/temporal_params.h.
    chunks = -(-D * q.element_size() // 16)
    need = 3 * T * 16 * (chunks | 1) + 4 * 4 * -(-T // 4)
    have = getattr(torch.cuda.get_device_properties(q.device), "shared_memory_per_block_optin", 48 * 1024)
    if need > have:
        return f"T * D = {T} * {D} needs {need} bytes of shared memory per problem; the GPU has {have}"
    return None


def _cpu_temporal_why_not(q) -> Optional[str]:
    """Why the C++ CPU temporal kernel cannot take this call, or None (the prologue, when asked for,
    runs first through the ``qk_norm_rope`` op)."""
    if not _backend._has_kernel("_temporal_attention_fwd", "CPU"):
        return "i2v_kernels._C was built without the CPU temporal-attention kernel"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"the CPU temporal kernel supports float16/bfloat16/float32/float64, not {q.dtype}"
    return None


def dispatch_features(mode, q_shape, k_shape, causal: bool, has_kv_lens: bool, qk_norm, has_rope: bool,
                      rope_style: str) -> tuple[tuple, tuple]:
    """``(flags, sizes)`` of a call for the dispatch key: flags must match exactly; sizes are
    ``(problems, query length, key length, D)``, bucketed to powers of two (D exact) in the key."""
    D = q_shape[-1]
    if mode == SPATIAL:
        B, T, S, H, _ = q_shape
        sizes = (B * T * H, S, S, D)
    elif mode == TEMPORAL:
        B, T, S, H, _ = q_shape
        sizes = (B * S * H, T, T, D)
    else:
        B, N, H, _ = q_shape
        sizes = (B * H, N, k_shape[1], D)
    flags = (int(causal), int(has_kv_lens), qk_norm or "none", rope_style if has_rope else "none")
    return flags, sizes


# The CUDA C++ temporal kernel measured fastest at one shape, Latte-XL's (T = 16, D = 72, B*S*H = 8192,
# bf16; H200 2026-12-04: 0.197 ms vs Triton 0.299), and slower than Triton at every other measured one
# (T = 8, 13, 32 at D = 64; T = 21 at D = 128; T = 128). The static table's nearest-entry rule would
# stretch its Latte entry to such shapes (T = 8 or 13 at D = 64 lie within its reach), so a static
# pick of ``cuda`` holds only strictly between those measurements, T 14..20 and D 65..127; elsewhere
# the nearest entry of another backend decides. Measured dispatch (tuning on) is not limited.
CUDA_TEMPORAL_STATIC_T = (14, 20)
CUDA_TEMPORAL_STATIC_D = (65, 127)


def _static_choice(op, device, dtype, flags, sizes):
    from i2v_kernels import _static_table

    table = _static_table.TABLE
    choice = _dispatch.nearest_static(table, op, device, dtype, flags, sizes)
    T, D = sizes[1], sizes[3]
    if choice == "cuda" and not (CUDA_TEMPORAL_STATIC_T[0] <= T <= CUDA_TEMPORAL_STATIC_T[1]
                                 and CUDA_TEMPORAL_STATIC_D[0] <= D <= CUDA_TEMPORAL_STATIC_D[1]):
        choice = _dispatch.nearest_static([e for e in table if e[5] != "cuda"], op, device, dtype, flags, sizes)
    return choice


def _forward(mode, q, k, v, scale, causal, kv_lens, qk_norm, qw, qb, kw, kb, norm_eps, cos, sin, rope_style,
             signature=None):
    op = _NAMES[mode]
    _check(mode, q, k, v, scale, kv_lens, qk_norm, qw, qb, kw, kb, norm_eps, cos, sin, rope_style)
    _check_kv_lens_values(kv_lens, k.shape[1], op)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.numel() == 0:
        return _run("torch", mode, q, k, v, scale, causal, kv_lens, qk_norm, qw, qb, kw, kb, norm_eps, cos, sin,
                    rope_style)

    def why_not(backend):
        if backend == "triton":
            from i2v_kernels.ops.attention import triton as attn_triton

            return attn_triton.why_not(q)
        if backend == "cuda":
            return _cuda_temporal_why_not(q, qk_norm, cos)
        if backend == "cpu":
            return _cpu_temporal_why_not(q)
        if backend in _backend.OUTSIDE:
            return native.outside_why_not(backend, q, kv_lens)
        return None

    def run(backend):
        return _run(backend, mode, q, k, v, scale, causal, kv_lens, qk_norm, qw, qb, kw, kb, norm_eps, cos, sin,
                    rope_style)

    flags, sizes = dispatch_features(mode, q.shape, k.shape, causal, kv_lens is not None, qk_norm, cos is not None,
                                     rope_style)
    features = flags + tuple(_dispatch.bucket(n) for n in sizes[:3]) + (sizes[3],)
    out = _backend.dispatch(op, q.device, q.dtype, why_not, _IMPLEMENTED_FWD[mode], features, run,
                            lambda: _static_choice(op, q.device, q.dtype, flags, sizes))
    if signature is not None:
        key = _dispatch.make_key(op, q.device, q.dtype, features)
        if _dispatch.settled(key) and len(_plans) < _PLANS_MAX:
            _plans[signature] = _dispatch.cached(key, q.device)
    return out


def _run(backend, mode, q, k, v, scale, causal, kv_lens, qk_norm, qw, qb, kw, kb, norm_eps, cos, sin, rope_style):
    """One call on ``backend`` (arguments checked, ``scale`` resolved)."""
    if backend in ("native", "native_packed"):
        return native.sdpa(mode, q, k, v, scale, causal, kv_lens, qk_norm, qw, qb, kw, kb, norm_eps, cos, sin,
                           rope_style, packed=backend == "native_packed")
    if backend == "torch":
        kwargs = dict(scale=scale, qk_norm=qk_norm, q_norm_weight=qw, q_norm_bias=qb, k_norm_weight=kw,
                      k_norm_bias=kb, norm_eps=norm_eps, rope=None if cos is None else (cos, sin),
                      rope_style=rope_style)
        return reference_forward(mode, q, k, v, causal, kv_lens, kwargs)
    if backend in _backend.OUTSIDE:
        return native.outside(backend, _backend._outside[backend].get(), mode, q, k, v, scale, causal, qk_norm,
                              qw, qb, kw, kb, norm_eps, cos, sin, rope_style)
    if backend == "cuda":
        return torch.ops.i2v_kernels._temporal_attention_fwd(_unit_d(q), _unit_d(k), _unit_d(v), scale, causal)
    if backend == "cpu":
        qp, kp = _prologue_first(q, k, qk_norm, qw, qb, kw, kb, norm_eps, cos, sin, rope_style)
        return torch.ops.i2v_kernels._temporal_attention_fwd(_unit_d(qp), _unit_d(kp), _unit_d(v), scale, causal)
    return _triton_forward(mode, q, k, v, scale, causal, kv_lens, qk_norm, qw, qb, kw, kb, norm_eps, cos, sin,
                           rope_style)


def reference_forward(mode, q, k, v, causal, kv_lens, kwargs):
    if mode == SPATIAL:
        return reference.spatial_attention(q, k, v, **kwargs)
    if mode == TEMPORAL:
        return reference.temporal_attention(q, k, v, causal=causal, **kwargs)
    return reference.attention(q, k, v, kv_lens=kv_lens, **kwargs)


def _prologue_first(q, k, qk_norm, qw, qb, kw, kb, norm_eps, cos, sin, rope_style):
    """q and k through QK-norm + RoPE once, before a kernel without a prologue: the ``qk_norm_rope``
    op (one pass over both, its backend the requested one or, under ``auto``, the fastest measured),
    or, for cross attention's two lengths (QK-norm without RoPE), eager ops per tensor."""
    if (qk_norm is None and cos is None) or q.shape != k.shape:
        return native.prologue_pair(q, k, qk_norm, qw, qb, kw, kb, norm_eps, cos, sin, rope_style)
    from i2v_kernels.ops.qk_norm_rope import qk_norm_rope

    return qk_norm_rope(q, k, qk_norm=qk_norm, q_norm_weight=qw, q_norm_bias=qb, k_norm_weight=kw, k_norm_bias=kb,
                        norm_eps=norm_eps, rope=None if cos is None else (cos, sin), rope_style=rope_style)


def _triton_forward(mode, q, k, v, scale, causal, kv_lens, qk_norm, qw, qb, kw, kb, norm_eps, cos, sin, rope_style):
    """The packed temporal kernel (prologue fused: each element normalized once) where it applies, else
    the prologue first (:func:`_prologue_first`), then the flash kernel, plain and autotuned."""
    from i2v_kernels.ops.attention import triton as attn_triton

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if mode == TEMPORAL and attn_triton.packed_temporal(q.shape[1], q.shape[-1]):
        rope4 = None
        if cos is not None:
            cos, sin = (t.contiguous() for t in torch.broadcast_tensors(cos, sin))
            rope4 = tuple(t.expand(q.shape[:3] + q.shape[-1:]) for t in (cos, sin))
        return attn_triton.temporal_fwd(
            _unit_d(q), _unit_d(k), _unit_d(v), out, scale=scale, causal=causal, qk_norm=qk_norm, q_norm_weight=qw,
            q_norm_bias=qb, k_norm_weight=kw, k_norm_bias=kb, norm_eps=norm_eps, rope=rope4, rope_style=rope_style)
    q, k = _prologue_first(q, k, qk_norm, qw, qb, kw, kb, norm_eps, cos, sin, rope_style)
    attn_triton.attention_fwd(*(_five_d(mode, t) for t in (_unit_d(q), _unit_d(k), _unit_d(v), out)),
                              scale=scale, causal=causal, kv_lens=kv_lens)
    return out


_TO_SEQ = {
    SPATIAL: (lambda t: t.transpose(2, 3), lambda t: t.transpose(2, 3)),
    TEMPORAL: (lambda t: t.permute(0, 2, 3, 1, 4), lambda t: t.permute(0, 3, 1, 2, 4)),
    DENSE: (lambda t: t.transpose(1, 2), lambda t: t.transpose(1, 2)),
}


def _backward_impl(mode, grad_out, q, k, v, scale, causal, kv_lens, qk_norm, qw, qb, kw, kb, norm_eps, cos, sin,
                   rope_style, needs, grad_lse=None):
    """Recompute-based backward. The prologue (QK-norm, RoPE) is recomputed and differentiated in
    plain PyTorch (fp32); the attention itself by the Triton flash backward (dK/dV and dQ kernels over
    the recomputed log-sum-exp, O(seq) memory) or, on the torch backend, the reference's explicit
    fp32 formulas (fp64 for fp64).

    Returns gradients for (q, k, v, qw, qb, kw, kb, cos, sin), an empty tensor where not needed."""
    acc = reference.acc_dtype(q)
    rope = None if cos is None else (cos, sin)
    to_seq, from_seq = _TO_SEQ[mode]
    qp = reference.prologue(q, qk_norm, qw, qb, norm_eps, rope, rope_style)
    kp = reference.prologue(k, qk_norm, kw, kb, norm_eps, rope, rope_style)

    def why_not(backend):
        if backend == "triton":
            from i2v_kernels.ops.attention import triton as attn_triton

            return attn_triton.why_not(q)
        return None

    # The forward's forced backend may have no backward kernel (cuda): then the backward picks as auto.
    forced = _backend.requested_backend()
    with _backend.use_backend(forced if forced in _IMPLEMENTED else "auto"):
        backend = _backend.select(_NAMES[mode] + " backward", q.device, why_not, _IMPLEMENTED)
    if backend == "triton":
        from i2v_kernels.ops.attention import triton as attn_triton

        g_qp, g_kp, g_v = (torch.empty(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v))
        attn_triton.attention_bwd(*(_five_d(mode, t) for t in (qp.to(q.dtype), kp.to(q.dtype), _unit_d(v),
                                                               _unit_d(grad_out), g_qp, g_kp, g_v)),
                                  scale=scale, causal=causal, kv_lens=kv_lens, grad_lse=grad_lse)
    else:
        g_qp, g_kp, g_v = (from_seq(g) for g in reference.sdpa_bwd(
            to_seq(qp), to_seq(kp), to_seq(v.to(acc)), to_seq(grad_out.to(acc)), scale, causal, kv_lens, grad_lse))
    dq, dqw, dqb, dcos, dsin = reference.prologue_bwd(q, g_qp, qk_norm, qw, qb, norm_eps, rope, rope_style,
                                                      [needs[0], needs[3], needs[4], needs[7], needs[8]])
    dk, dkw, dkb, dcos_k, dsin_k = reference.prologue_bwd(k, g_kp, qk_norm, kw, kb, norm_eps, rope, rope_style,
                                                          [needs[1], needs[5], needs[6], needs[7], needs[8]])
    if dcos is not None:
        dcos = dcos + dcos_k
    if dsin is not None:
        dsin = dsin + dsin_k
    grads = [dq, dk, g_v, dqw, dqb, dkw, dkb, dcos, dsin]
    inputs = [q, k, v, qw, qb, kw, kb, cos, sin]
    return [g.to(t.dtype).contiguous() if n and t is not None and g is not None else q.new_empty(0)
            for g, t, n in zip(grads, inputs, needs)]


# --------------------------------------------------------------------------------------------------
# The ops (one per public function) and their shared backward op


@torch.library.custom_op("i2v_kernels::spatial_attention", mutates_args=())
def _spatial_op(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], qk_norm: Optional[str],
                q_norm_weight: Optional[Tensor], q_norm_bias: Optional[Tensor], k_norm_weight: Optional[Tensor],
                k_norm_bias: Optional[Tensor], norm_eps: float, rope_cos: Optional[Tensor],
                rope_sin: Optional[Tensor], rope_style: str) -> Tensor:
    return _forward(SPATIAL, q, k, v, scale, False, None, qk_norm, q_norm_weight, q_norm_bias, k_norm_weight,
                    k_norm_bias, norm_eps, rope_cos, rope_sin, rope_style)


@torch.library.custom_op("i2v_kernels::temporal_attention", mutates_args=())
def _temporal_op(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], causal: bool, qk_norm: Optional[str],
                 q_norm_weight: Optional[Tensor], q_norm_bias: Optional[Tensor], k_norm_weight: Optional[Tensor],
                 k_norm_bias: Optional[Tensor], norm_eps: float, rope_cos: Optional[Tensor],
                 rope_sin: Optional[Tensor], rope_style: str) -> Tensor:
    return _forward(TEMPORAL, q, k, v, scale, causal, None, qk_norm, q_norm_weight, q_norm_bias, k_norm_weight,
                    k_norm_bias, norm_eps, rope_cos, rope_sin, rope_style)


@torch.library.custom_op("i2v_kernels::attention", mutates_args=())
def _dense_op(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], kv_lens: Optional[Tensor],
              qk_norm: Optional[str], q_norm_weight: Optional[Tensor], q_norm_bias: Optional[Tensor],
              k_norm_weight: Optional[Tensor], k_norm_bias: Optional[Tensor], norm_eps: float,
              rope_cos: Optional[Tensor], rope_sin: Optional[Tensor], rope_style: str) -> Tensor:
    return _forward(DENSE, q, k, v, scale, False, kv_lens, qk_norm, q_norm_weight, q_norm_bias, k_norm_weight,
                    k_norm_bias, norm_eps, rope_cos, rope_sin, rope_style)


@torch.library.custom_op("i2v_kernels::_attention_bwd", mutates_args=())
def _attention_bwd_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mode: int, scale: Optional[float],
                      causal: bool, kv_lens: Optional[Tensor], qk_norm: Optional[str],
                      q_norm_weight: Optional[Tensor], q_norm_bias: Optional[Tensor], k_norm_weight: Optional[Tensor],
                      k_norm_bias: Optional[Tensor], norm_eps: float, rope_cos: Optional[Tensor],
                      rope_sin: Optional[Tensor], rope_style: str, needs: list[bool],
                      grad_lse: Optional[Tensor] = None) -> list[Tensor]:
    """Gradients for (q, k, v, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, cos, sin); an
    empty tensor where ``needs`` is False or the input is absent. ``grad_lse [B, H, N]``: dense mode's
    log-sum-exp output's gradient (``attention(..., return_lse=True)``)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _backward_impl(mode, grad_out, q, k, v, scale, causal, kv_lens, qk_norm, q_norm_weight, q_norm_bias,
                          k_norm_weight, k_norm_bias, norm_eps, rope_cos, rope_sin, rope_style, needs, grad_lse)


def _fake_forward(mode):
    def fake(q, k, v, scale, *rest):
        args = dict(zip(_ARG_NAMES[mode][4:], rest))
        _check(mode, q, k, v, scale, args.get("kv_lens"), args["qk_norm"], args["q_norm_weight"],
               args["q_norm_bias"], args["k_norm_weight"], args["k_norm_bias"], args["norm_eps"], args["rope_cos"],
               args["rope_sin"], args["rope_style"])
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    return fake


@_attention_bwd_op.register_fake
def _(grad_out, q, k, v, mode, scale, causal, kv_lens, qk_norm, qw, qb, kw, kb, norm_eps, cos, sin, rope_style, needs,
      grad_lse=None):
    inputs = [q, k, v, qw, qb, kw, kb, cos, sin]
    return [torch.empty(t.shape, dtype=t.dtype, device=t.device) if t is not None and n else q.new_empty(0)
            for t, n in zip(inputs, needs)]


_TAIL = ("qk_norm", "q_norm_weight", "q_norm_bias", "k_norm_weight", "k_norm_bias", "norm_eps", "rope_cos",
         "rope_sin", "rope_style")
_ARG_NAMES = {
    SPATIAL: ("q", "k", "v", "scale") + _TAIL,
    TEMPORAL: ("q", "k", "v", "scale", "causal") + _TAIL,
    DENSE: ("q", "k", "v", "scale", "kv_lens") + _TAIL,
}
_GRAD_INPUTS = ("q", "k", "v", "q_norm_weight", "q_norm_bias", "k_norm_weight", "k_norm_bias", "rope_cos", "rope_sin")


def _register(op, mode, fake=None):
    names = _ARG_NAMES[mode]
    op.register_fake(fake or _fake_forward(mode))

    def setup_context(ctx, inputs, output):
        args = dict(zip(names, inputs))
        ctx.args = {n: args.get(n) for n in ("scale", "causal", "qk_norm", "norm_eps", "rope_style")}
        ctx.save_for_backward(*(args.get(n) for n in _GRAD_INPUTS), args.get("kv_lens"))

    def backward(ctx, grad_out, grad_lse=None):  # grad_lse: the attention_lse op's second output
        *saved, kv_lens = ctx.saved_tensors
        needs_by_name = dict(zip(names, ctx.needs_input_grad))
        needs = [bool(needs_by_name.get(n, False)) for n in _GRAD_INPUTS]
        a = ctx.args
        grads = torch.ops.i2v_kernels._attention_bwd(
            grad_out, saved[0], saved[1], saved[2], mode, a["scale"], bool(a["causal"]), kv_lens, a["qk_norm"],
            *saved[3:7], a["norm_eps"], saved[7], saved[8], a["rope_style"], needs, grad_lse)
        by_name = {n: (g if need else None) for n, g, need in zip(_GRAD_INPUTS, grads, needs)}
        return tuple(by_name.get(n) for n in names)

    op.register_autograd(backward, setup_context=setup_context)


_register(_spatial_op, SPATIAL)
_register(_temporal_op, TEMPORAL)
_register(_dense_op, DENSE)


# --------------------------------------------------------------------------------------------------
# Dense/cross attention with its log-sum-exp (the merge of ring attention needs it)

_IMPLEMENTED_LSE = ("triton", "native", "torch")


def _forward_lse(q, k, v, scale, kv_lens, qk_norm, qw, qb, kw, kb, norm_eps, cos, sin, rope_style):
    """``(out [B, N, H, D], lse [B, H, N])`` on a backend that computes the log-sum-exp (the others are
    ineligible: ``why_not``). ``lse`` is fp32 (fp64 for fp64 inputs)."""
    _check(DENSE, q, k, v, scale, kv_lens, qk_norm, qw, qb, kw, kb, norm_eps, cos, sin, rope_style)
    _check_kv_lens_values(kv_lens, k.shape[1], "attention")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kwargs = dict(scale=scale, kv_lens=kv_lens, qk_norm=qk_norm, q_norm_weight=qw, q_norm_bias=qb, k_norm_weight=kw,
                  k_norm_bias=kb, norm_eps=norm_eps, rope=None if cos is None else (cos, sin), rope_style=rope_style)
    if q.numel() == 0 or k.shape[1] == 0:
        return reference.attention_lse(q, k, v, **kwargs)

    def why_not(backend):
        if backend == "triton":
            from i2v_kernels.ops.attention import triton as attn_triton

            return attn_triton.why_not(q)
        return native.lse_why_not(q) if backend == "native" else None

    def run(backend):
        if backend == "native":
            return native.sdpa_lse(q, k, v, scale, kv_lens, qk_norm, qw, qb, kw, kb, norm_eps, cos, sin, rope_style)
        if backend == "triton":
            return _triton_lse(q, k, v, kwargs)
        return reference.attention_lse(q, k, v, **kwargs)

    flags, sizes = dispatch_features(DENSE, q.shape, k.shape, False, kv_lens is not None, qk_norm, cos is not None,
                                     rope_style)
    features = flags + tuple(_dispatch.bucket(n) for n in sizes[:3]) + (sizes[3],)
    return _backend.dispatch("attention_lse", q.device, q.dtype, why_not, _IMPLEMENTED_LSE, features, run,
                             lambda: _static_choice("attention", q.device, q.dtype, flags, sizes))


def _triton_lse(q, k, v, kwargs):
    """The Triton forward with its log-sum-exp stored (``[B * H, N]``, log2 units), after the
    QK-norm/RoPE prologue (:func:`_prologue_first`), as every flash call."""
    from i2v_kernels.ops.attention import triton as attn_triton

    cos, sin = (None, None) if kwargs["rope"] is None else kwargs["rope"]
    q, k = _prologue_first(q, k, *(kwargs[n] for n in ("qk_norm", "q_norm_weight", "q_norm_bias", "k_norm_weight",
                                                       "k_norm_bias", "norm_eps")), cos, sin, kwargs["rope_style"])
    B, N, H, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(B * H, N, dtype=torch.float32, device=q.device)
    attn_triton.attention_fwd(*(_five_d(DENSE, t) for t in (_unit_d(q), _unit_d(k), _unit_d(v), out)),
                              scale=kwargs["scale"], kv_lens=kwargs["kv_lens"], lse=lse)
    nan_rows = reference.lse_nan_rows(q.transpose(1, 2), k.transpose(1, 2), kwargs["kv_lens"])
    return out, (lse * math.log(2.0)).view(B, H, N).masked_fill(nan_rows, float("nan"))


@torch.library.custom_op("i2v_kernels::attention_lse", mutates_args=())
def _dense_lse_op(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], kv_lens: Optional[Tensor],
                  qk_norm: Optional[str], q_norm_weight: Optional[Tensor], q_norm_bias: Optional[Tensor],
                  k_norm_weight: Optional[Tensor], k_norm_bias: Optional[Tensor], norm_eps: float,
                  rope_cos: Optional[Tensor], rope_sin: Optional[Tensor], rope_style: str) -> tuple[Tensor, Tensor]:
    return _forward_lse(q, k, v, scale, kv_lens, qk_norm, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias,
                        norm_eps, rope_cos, rope_sin, rope_style)


def _fake_lse(q, *rest):
    B, N, H, _ = q.shape
    return _fake_forward(DENSE)(q, *rest), q.new_empty((B, H, N), dtype=reference.acc_dtype(q))


_register(_dense_lse_op, DENSE, _fake_lse)


# --------------------------------------------------------------------------------------------------
# Public functions


_NO_PROLOGUE = (None, None, None, None, None, 1e-6, None, None, "interleaved")  # the defaults: no QK-norm, no RoPE


def _prologue_args(op, qk_norm, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, norm_eps, rope, rope_style):
    if (qk_norm is None and rope is None and q_norm_weight is None and q_norm_bias is None and k_norm_weight is None
            and k_norm_bias is None and type(norm_eps) is float and norm_eps == 1e-6 and rope_style == "interleaved"):
        return _NO_PROLOGUE  # the common call, recognised by identity in _signature
    if rope is not None and (not isinstance(rope, (tuple, list)) or len(rope) != 2):
        raise TypeError(f"{op}: rope must be a pair (cos, sin) of tensors, got {type(rope).__name__}")
    norm_eps = check_float_arg(op, "norm_eps", norm_eps, positive=True)
    cos, sin = (None, None) if rope is None else rope
    return (qk_norm, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, norm_eps, cos, sin, rope_style)


def _scale_arg(op, scale):
    return None if scale is None else check_float_arg(op, "scale", scale)


def _tensors(op, q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")


# Call signature -> the settled decision of its key, for plain eager calls that passed the checks once:
# a repeated call (every layer of a DiT at every step) skips the argument checks and the dispatch
# lookup, ~20 us of Python per call. The signature holds everything the checks and the decision read.
_plans: dict[tuple, str] = {}
_PLANS_MAX = 4096


def _meta(t):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def _signature(mode, q, k, v, scale, causal, kv_lens, prologue) -> tuple:
    if prologue is _NO_PROLOGUE and kv_lens is None:
        return (mode, q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, k.dtype, v.dtype,
                q.device, k.device, v.device, scale, causal, _backend.requested_backend(), _dispatch._generation)
    qk_norm, qw, qb, kw, kb, norm_eps, cos, sin, rope_style = prologue
    return (mode, q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, k.dtype, v.dtype, q.device,
            k.device, v.device, scale, causal, _meta(kv_lens), qk_norm, _meta(qw), _meta(qb), _meta(kw), _meta(kb),
            norm_eps, _meta(cos), _meta(sin), rope_style, _backend.requested_backend(), _dispatch._generation)


def _call(mode, q, k, v, scale, causal, kv_lens, prologue, return_lse=False):
    """The op for ``mode``, or its implementation directly in a plain eager call (``direct_call_ok``)."""
    qk_norm, qw, qb, kw, kb, norm_eps, cos, sin, rope_style = prologue
    if return_lse:
        if _backend.direct_call_ok(q, k, v, kv_lens, qw, qb, kw, kb, cos, sin):
            return _forward_lse(q, k, v, scale, kv_lens, *prologue)
        return tuple(torch.ops.i2v_kernels.attention_lse(q, k, v, scale, kv_lens, *prologue))
    if _backend.direct_call_ok(q, k, v, kv_lens, qw, qb, kw, kb, cos, sin):
        signature = _signature(mode, q, k, v, scale, causal, kv_lens, prologue)
        backend = _plans.get(signature)
        if backend is None:
            return _forward(mode, q, k, v, scale, causal, kv_lens, *prologue, signature=signature)
        if kv_lens is not None:
            _check_kv_lens_values(kv_lens, k.shape[1], _NAMES[mode])
        return _run(backend, mode, q, k, v, q.shape[-1] ** -0.5 if scale is None else scale, causal, kv_lens,
                    *prologue)
    if mode == SPATIAL:
        return torch.ops.i2v_kernels.spatial_attention(q, k, v, scale, *prologue)
    if mode == TEMPORAL:
        return torch.ops.i2v_kernels.temporal_attention(q, k, v, scale, causal, *prologue)
    return torch.ops.i2v_kernels.attention(q, k, v, scale, kv_lens, *prologue)


def spatial_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None, qk_norm: Optional[str] = None,
                      q_norm_weight=None, q_norm_bias=None, k_norm_weight=None, k_norm_bias=None,
                      norm_eps: float = 1e-6, rope=None, rope_style: str = "interleaved") -> Tensor:
    """Attention within each frame: ``q, k, v [B, T, S, H, D]`` -> ``[B, T, S, H, D]`` (sequence ``S``).

    Example::

        qkv = torch.randn(2, 16, 256, 3 * 1152, device="cuda", dtype=torch.bfloat16)   # Latte-like
        q, k, v = qkv.view(2, 16, 256, 3, 16, 72).unbind(3)                           # views, no copy
        out = i2v_kernels.spatial_attention(q, k, v)                                   # [2, 16, 256, 16, 72]
    """
    _tensors("spatial_attention", q, k, v)
    return _call(SPATIAL, q, k, v, _scale_arg("spatial_attention", scale), False, None,
                 _prologue_args("spatial_attention", qk_norm, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias,
                                norm_eps, rope, rope_style))


def temporal_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None, causal: bool = False,
                       qk_norm: Optional[str] = None, q_norm_weight=None, q_norm_bias=None, k_norm_weight=None,
                       k_norm_bias=None, norm_eps: float = 1e-6, rope=None, rope_style: str = "interleaved") -> Tensor:
    """Attention across frames at each spatial position: ``[B, T, S, H, D]`` (sequence ``T``).

    ``causal=True`` lets frame ``t`` see frames ``<= t`` only.
    """
    _tensors("temporal_attention", q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"temporal_attention: causal must be a bool, got {type(causal).__name__}")
    return _call(TEMPORAL, q, k, v, _scale_arg("temporal_attention", scale), causal, None,
                 _prologue_args("temporal_attention", qk_norm, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias,
                                norm_eps, rope, rope_style))


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None, kv_lens: Optional[Tensor] = None,
              qk_norm: Optional[str] = None, q_norm_weight=None, q_norm_bias=None, k_norm_weight=None,
              k_norm_bias=None, norm_eps: float = 1e-6, rope=None, rope_style: str = "interleaved",
              return_lse: bool = False):
    """Dense or cross attention: ``q [B, N, H, D]``, ``k, v [B, M, H, D]`` -> ``[B, N, H, D]``.

    ``kv_lens [B]`` (int) keeps the first ``kv_lens[b]`` keys of sample ``b`` (1 <= kv_lens <= M), for
    padded prompts. ``return_lse=True`` returns ``(out, lse)`` with ``lse [B, H, N]`` (fp32; fp64 for
    fp64 inputs) ``= log sum_j exp(scale q_i . k_j)`` over the kept keys, differentiable like ``out``:
    partial results over disjoint key sets then merge exactly (ring attention,
    :mod:`i2v_kernels.distributed`). Only backends that compute it run such a call (``torch``,
    ``native``, ``triton``).
    """
    _tensors("attention", q, k, v)
    if not isinstance(return_lse, bool):
        raise TypeError(f"attention: return_lse must be a bool, got {type(return_lse).__name__}")
    return _call(DENSE, q, k, v, _scale_arg("attention", scale), False, kv_lens,
                 _prologue_args("attention", qk_norm, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, norm_eps,
                                rope, rope_style), return_lse)
