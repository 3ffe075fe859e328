"""Modules built on the i2v_kernels ops, for models written against them."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from i2v_kernels.ops import adaln as _adaln
from i2v_kernels.ops.adaln import reference as _adaln_ref


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
