"""Modules built on the i2v_kernels ops, for models written against them."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from i2v_kernels.ops import adaln as _adaln
from i2v_kernels.ops._checks import check_choice, check_float_arg, check_int
from i2v_kernels.ops import attention as _attn
from i2v_kernels.ops.adaln import reference as _adaln_ref
from i2v_kernels.ops.attention import reference as _attn_ref
from i2v_kernels.ops.conv3d.modules import CausalConv3d, ConvCache, decode_in_chunks, streaming

__all__ = ["AdaLNModulate", "CausalConv3d", "ConvCache", "CrossAttention", "FactorizedAttention", "decode_in_chunks",
           "streaming"]


class AdaLNModulate(nn.Module):
    """LayerNorm over the last dim followed by adaLN modulation: ``LN(x) * (1 + scale) + shift``.

    Args:
        dim: channels ``C``.
        eps: LayerNorm epsilon.
        elementwise_affine: learn a LayerNorm ``weight``/``bias`` (``[C]``) applied before modulating.
        use_kernels: run the fused i2v_kernels op (True) or the plain-PyTorch formula (False).

    ``forward(x [..., C], shift, scale)`` with ``shift``/``scale`` broadcastable to ``x``.
    """

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False, use_kernels: bool = True):
        super().__init__()
        check_int("AdaLNModulate", "dim", dim)
        eps = check_float_arg("AdaLNModulate", "eps", eps, positive=True)
        self.dim, self.eps, self.use_kernels = dim, eps, use_kernels
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(dim))
            self.bias = nn.Parameter(torch.zeros(dim))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: Tensor, shift: Optional[Tensor], scale: Optional[Tensor]) -> Tensor:
        fn = _adaln.adaln_modulate if self.use_kernels else _adaln_ref.adaln_modulate
        return fn(x, shift, scale, eps=self.eps, weight=self.weight, bias=self.bias)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, elementwise_affine={self.weight is not None}, use_kernels={self.use_kernels}"


def _check_heads(owner: str, dim: int, heads: int, norm_eps: float) -> None:
    """``dim`` channels split into ``heads`` heads of ``dim // heads`` channels each, and a usable eps."""
    check_int(owner, "dim", dim)
    check_int(owner, "heads", heads)
    if dim % heads:
        raise ValueError(f"{owner}: dim={dim} must be divisible by heads={heads}")
    check_float_arg(owner, "norm_eps", norm_eps, positive=True)


def _register_qk_norm(module: nn.Module, qk_norm: Optional[str], head_dim: int) -> None:
    """QK-norm parameters over the head dim: weights for both norms, biases for LayerNorm only."""
    check_choice(type(module).__name__, "qk_norm", qk_norm, (None, "layer", "rms"))
    for name in ("q_norm_weight", "k_norm_weight"):
        module.register_parameter(name, nn.Parameter(torch.ones(head_dim)) if qk_norm else None)
    for name in ("q_norm_bias", "k_norm_bias"):
        module.register_parameter(name, nn.Parameter(torch.zeros(head_dim)) if qk_norm == "layer" else None)


class FactorizedAttention(nn.Module):
    """Fused QKV projection -> spatial, temporal or dense attention -> output projection.

    The unit a factorized video DiT block is made of (Latte's spatial/temporal blocks; CogVideoX's and
    Wan's full 3D attention with ``mode="dense"``).

    Args:
        dim: channels ``C = heads * head_dim``.
        heads: attention heads ``H``.
        mode: ``"spatial"`` (within each frame), ``"temporal"`` (across frames at each position) or
            ``"dense"`` (all ``T * S`` tokens).
        causal: temporal mode only: frame ``t`` sees frames ``<= t``.
        qk_norm: None, ``"layer"`` (CogVideoX: LayerNorm over the head dim, with affine) or ``"rms"``
            (RMSNorm over the head dim, weight only).
        bias: biases of the two projections.
        use_kernels: run the i2v_kernels ops (True) or the plain-PyTorch reference (False).

    ``forward(x [B, T, S, C], rope=None) -> [B, T, S, C]``; ``rope = (cos, sin)`` broadcastable to
    ``[B, T, S, D]`` (``[S, D]`` for spatial positions, ``[T, S, D]`` for 3D RoPE).
    The q, k, v handed to the kernel are strided views of the one QKV projection: no copies.
    """

    def __init__(self, dim: int, heads: int, mode: str = "spatial", *, causal: bool = False,
                 qk_norm: Optional[str] = None, bias: bool = True, norm_eps: float = 1e-6,
                 rope_style: str = "interleaved", use_kernels: bool = True):
        super().__init__()
        _check_heads("FactorizedAttention", dim, heads, norm_eps)
        check_choice("FactorizedAttention", "mode", mode, ("spatial", "temporal", "dense"))
        check_choice("FactorizedAttention", "rope_style", rope_style, ("interleaved", "half"))
        if not isinstance(causal, bool):
            raise TypeError(f"FactorizedAttention: causal must be a bool, got {type(causal).__name__}")
        if causal and mode != "temporal":
            raise ValueError("FactorizedAttention: causal=True applies to mode='temporal' only")
        self.dim, self.heads, self.head_dim, self.mode, self.causal = dim, heads, dim // heads, mode, causal
        self.qk_norm, self.norm_eps, self.rope_style, self.use_kernels = qk_norm, norm_eps, rope_style, use_kernels
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        _register_qk_norm(self, qk_norm, self.head_dim)

    def forward(self, x: Tensor, rope: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"FactorizedAttention: x must be [B, T, S, C={self.dim}], got {tuple(x.shape)}")
        B, T, S, C = x.shape
        q, k, v = self.qkv(x).view(B, T, S, 3, self.heads, self.head_dim).unbind(3)
        ops = _attn if self.use_kernels else _attn_ref
        kwargs = dict(qk_norm=self.qk_norm, q_norm_weight=self.q_norm_weight, q_norm_bias=self.q_norm_bias,
                      k_norm_weight=self.k_norm_weight, k_norm_bias=self.k_norm_bias, norm_eps=self.norm_eps,
                      rope=rope, rope_style=self.rope_style)
        if self.mode == "spatial":
            out = ops.spatial_attention(q, k, v, **kwargs)
        elif self.mode == "temporal":
            out = ops.temporal_attention(q, k, v, causal=self.causal, **kwargs)
        else:
            if rope is not None:  # [.., T, S, D] positions -> [.., T * S, D] tokens
                lead = lambda t: t.shape[:-3] if t.dim() >= 4 else ()
                kwargs["rope"] = tuple(t.expand(*lead(t), T, S, t.shape[-1]).reshape(*lead(t), T * S, t.shape[-1])
                                       for t in rope)
            out = ops.attention(q.flatten(1, 2), k.flatten(1, 2), v.flatten(1, 2), **kwargs).view(B, T, S, self.heads,
                                                                                                  self.head_dim)
        return self.proj(out.reshape(B, T, S, C))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, mode={self.mode!r}, causal={self.causal}, "
                f"qk_norm={self.qk_norm!r}, use_kernels={self.use_kernels}")


class CrossAttention(nn.Module):
    """Video tokens attend to context tokens (text or image): ``q`` from ``x``, ``k, v`` from ``context``.

    ``forward(x [B, N, C], context [B, M, C_ctx], kv_lens=None) -> [B, N, C]``; ``kv_lens [B]`` keeps the
    first ``kv_lens[b]`` context tokens of sample ``b`` (padded prompts). ``x`` may also be
    ``[B, T, S, C]``; it is attended as ``N = T * S`` tokens and returned in its own shape.
    """

    def __init__(self, dim: int, context_dim: int, heads: int, *, qk_norm: Optional[str] = None, bias: bool = True,
                 norm_eps: float = 1e-6, use_kernels: bool = True):
        super().__init__()
        _check_heads("CrossAttention", dim, heads, norm_eps)
        check_int("CrossAttention", "context_dim", context_dim)
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.qk_norm, self.norm_eps, self.use_kernels = qk_norm, norm_eps, use_kernels
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        _register_qk_norm(self, qk_norm, self.head_dim)

    def forward(self, x: Tensor, context: Tensor, kv_lens: Optional[Tensor] = None) -> Tensor:
        shape = x.shape
        if x.dim() == 4:
            x = x.flatten(1, 2)
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"CrossAttention: x must be [B, N, C={self.dim}] or [B, T, S, C], got {tuple(shape)}")
        if context.dim() != 3 or context.shape[0] != x.shape[0]:
            raise ValueError(f"CrossAttention: context must be [B={x.shape[0]}, M, C_ctx], got {tuple(context.shape)}")
        B, N, _ = x.shape
        q = self.q(x).view(B, N, self.heads, self.head_dim)
        k, v = self.kv(context).view(B, context.shape[1], 2, self.heads, self.head_dim).unbind(2)
        ops = _attn if self.use_kernels else _attn_ref
        out = ops.attention(q, k, v, kv_lens=kv_lens, qk_norm=self.qk_norm, q_norm_weight=self.q_norm_weight,
                            q_norm_bias=self.q_norm_bias, k_norm_weight=self.k_norm_weight,
                            k_norm_bias=self.k_norm_bias, norm_eps=self.norm_eps)
        return self.proj(out.reshape(B, N, self.dim)).view(shape)
