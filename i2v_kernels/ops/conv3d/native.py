"""The ``native`` backend of the causal conv3d: stock PyTorch as a VAE would write it, in x's dtype.

On GPUs: the front padding (cache, replicated first frame or zeros) concatenated in front of ``x`` in
time, both in ``channels_last_3d`` (the format cuDNN convolves fastest), then ``F.conv3d`` with the
symmetric spatial padding, then the residual added; the output stays ``channels_last_3d`` (the op's GPU
output format).

On CPUs: what eager VAE code does there -- ``cat`` of the front frames, ``F.pad`` with the spatial
zeros, ``F.conv3d`` without padding, all NCDHW (PyTorch's CPU convolution converts a channels-last
input to NCDHW anyway) -- with the cat and the pad done as one copy into a zeroed buffer; the output
stays NCDHW (the op's CPU output format, ``output_format`` in ``__init__.py``). Padding beforehand
is what makes it eager's speed: ATen's CPU conv3d below oneDNN's size threshold (``slow_conv3d``)
gathers a padded input ~25% slower than an unpadded one (measured 19.2 against 15.2 ms at
[1, 128, 4, 16, 24], 3x3x3, one thread).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from i2v_kernels.ops.conv3d.reference import front_padding

CL = torch.channels_last_3d


def causal_conv3d(x, weight, bias, cache, residual, stride, dilation, padding_hw, P: int, time_pad: str):
    if x.device.type == "cpu":
        return _cpu_padded(x, weight, bias, cache, residual, stride, dilation, padding_hw, P, time_pad)
    x = x.contiguous(memory_format=CL)
    if P:
        pad = front_padding(x, P, time_pad, cache).to(x.dtype).contiguous(memory_format=CL)
        x = torch.cat([pad, x], dim=2)
    y = F.conv3d(x, weight, None if bias is None else bias.to(x.dtype), tuple(stride), (0, *padding_hw),
                 tuple(dilation))
    if residual is not None:
        y = y + residual
    return y.contiguous(memory_format=CL)


def _cpu_padded(x, weight, bias, cache, residual, stride, dilation, padding_hw, P: int, time_pad: str):
    """The CPU path (module docstring): the padded NCDHW input built once, an unpadded conv."""
    B, C, T, H, W = x.shape
    ph, pw = padding_hw
    if not (ph or pw):  # no spatial padding (a 1x1 or (k, 1, 1) kernel): eager's one cat is the padded input
        padded = torch.cat([front_padding(x, P, time_pad, cache), x], dim=2) if P else x
        return _conv_residual(padded, weight, bias, residual, stride, dilation, x.dtype)
    zero_front = P and cache is None and time_pad == "zeros"
    shape = (B, C, P + T, H + 2 * ph, W + 2 * pw)
    padded = x.new_zeros(shape) if ph or pw or zero_front else x.new_empty(shape)
    inner = padded[:, :, :, ph:ph + H, pw:pw + W]
    inner[:, :, P:].copy_(x)
    if P and not zero_front:
        inner[:, :, :P].copy_(front_padding(x, P, time_pad, cache))
    return _conv_residual(padded, weight, bias, residual, stride, dilation, x.dtype)


def _conv_residual(padded, weight, bias, residual, stride, dilation, dtype):
    """The unpadded conv of the padded input, plus the residual; NCDHW (the op's CPU output format)."""
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    if stride[0] > 1 or stride[1] > 1 or stride[2] > 1:
        padded, stride = _single_output_unstrided(padded, weight, stride, dilation)
    if dilation[0] == dilation[1] == dilation[2] == stride[0] == stride[1] == stride[2] == 1:
        y = F.conv3d(padded, weight, bias)  # the call as eager code writes it
    else:
        y = F.conv3d(padded, weight, bias, tuple(stride), 0, tuple(dilation))
    if residual is not None:
        y += residual
    return y.contiguous()  # NCDHW already unless the input was channels-last and unpadded (P = 0)


def _single_output_unstrided(padded, weight, stride, dilation):
    """``(padded, stride)`` with every dim that has one output cropped to the taps' extent and its
    stride set to 1 (the same sums). PyTorch 2.14's bf16 CPU conv3d is wrong when the output width is 1
    with a width stride > 1 and input past the taps (found by tests/test_fuzz.py, seed 17, Intel Xeon)."""
    stride = list(stride)
    for i in range(3):
        extent = dilation[i] * (weight.shape[2 + i] - 1) + 1
        if stride[i] > 1 and (padded.shape[2 + i] - extent) // stride[i] == 0:
            padded, stride[i] = padded.narrow(2 + i, 0, extent), 1
    return padded, stride
