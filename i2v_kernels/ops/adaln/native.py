"""The ``native`` backend of the adaLN family: stock PyTorch as a DiT would write it, in x's dtype.

``torch.addcmul`` for the gated residual, ``F.layer_norm`` / ``F.rms_norm`` (fp32 statistics inside),
then the modulation as broadcast multiply-adds; modulation tensors in another dtype (Wan keeps them
in fp32) promote the arithmetic as they would in the user's code, and the result is cast back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from i2v_kernels.ops.adaln.reference import NORM_LAYER, NORM_NONE


def fused_fwd(x, y, gate, shift, scale, weight, bias, norm: int, eps: float):
    """Same contract as ``reference.fused_fwd``: ``(out, residual)``."""
    r = x
    if y is not None:
        r = (x + y if gate is None else torch.addcmul(x, y, gate)).to(x.dtype)
    if norm == NORM_NONE:
        return r, x.new_empty(0)
    C = x.shape[-1]
    w = None if weight is None else weight.to(x.dtype)
    if norm == NORM_LAYER:
        out = F.layer_norm(r, (C,), w, None if bias is None else bias.to(x.dtype), eps)
    else:
        out = F.rms_norm(r, (C,), None, eps)
        out = out + out.sum(-1, keepdim=True) * 0  # a row with an infinity: all NaN (docs/SEMANTICS.md)
        if w is not None:
            out = out * w
    if scale is not None:
        out = torch.addcmul(out, out, scale)
    if shift is not None:
        out = out + shift
    return out.to(x.dtype).contiguous(), (r.contiguous() if y is not None else x.new_empty(0))
