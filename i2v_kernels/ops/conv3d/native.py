"""The ``native`` backend of the causal conv3d: stock PyTorch as a VAE would write it, in x's dtype.

The front padding (cache, replicated first frame or zeros) concatenated in front of ``x`` in time,
both in ``channels_last_3d`` (the format cuDNN and oneDNN convolve fastest), then ``F.conv3d`` with
the symmetric spatial padding, then the residual added; the output stays ``channels_last_3d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from i2v_kernels.ops.conv3d.reference import front_padding

CL = torch.channels_last_3d


def causal_conv3d(x, weight, bias, cache, residual, stride, dilation, padding_hw, P: int, time_pad: str):
    x = x.contiguous(memory_format=CL)
    if P:
        pad = front_padding(x, P, time_pad, cache).to(x.dtype).contiguous(memory_format=CL)
        x = torch.cat([pad, x], dim=2)
    y = F.conv3d(x, weight, None if bias is None else bias.to(x.dtype), tuple(stride), (0, *padding_hw),
                 tuple(dilation))
    if residual is not None:
        y = y + residual
    return y.contiguous(memory_format=CL)
