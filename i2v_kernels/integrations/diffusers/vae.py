"""The causal 3D convolutions of the CogVideoX, Wan and LTX-Video VAEs."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from i2v_kernels.integrations.diffusers.core import _fallback, _Spec, register
from i2v_kernels.ops.conv3d import causal_conv3d
from i2v_kernels.ops.conv3d import reference as _conv_ref




def _conv_why_not(conv: nn.Conv3d, time_front: int, spatial: tuple[int, int]) -> Optional[str]:
    """Does ``causal_conv3d`` compute ``conv`` after ``time_front`` front frames and ``spatial`` zero
    padding exactly?"""
    if conv.groups != 1 or conv.padding_mode != "zeros":
        return f"groups={conv.groups}, padding_mode={conv.padding_mode!r}"
    kt = conv.kernel_size[0]
    if _conv_ref.time_padding(kt, conv.dilation[0]) != time_front:
        return f"{time_front} front frames for a time kernel of {kt} (dilation {conv.dilation[0]})"
    if _conv_ref.spatial_padding(conv.kernel_size, conv.dilation) != tuple(spatial):
        return f"spatial padding {tuple(spatial)} is not dilation * (k - 1) // 2"
    return None


def _conv_params(conv, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """The conv's weight and bias in x's dtype: with diffusers' layerwise casting the stored weights are
    fp8/fp16 and its hook casts them inside the conv's own forward, which ours does not call."""
    w, b = conv.weight, conv.bias
    if w.dtype != x.dtype:
        w = w.to(x.dtype)
    if b is not None and b.dtype != x.dtype:
        b = b.to(x.dtype)
    return w, b


def _like_input(out: Tensor, x: Tensor) -> Tensor:
    """The output in the memory format diffusers gives (its conv keeps the input's): our op returns its
    device's ``output_format`` (channels_last_3d on GPUs, NCDHW on CPUs), which would otherwise change
    every stride-sensitive step downstream (GroupNorm, randn_like)."""
    if x.is_contiguous():
        return out.contiguous()
    if x.is_contiguous(memory_format=torch.channels_last_3d):
        return out.contiguous(memory_format=torch.channels_last_3d)
    return out


def _cogvideox_conv_why_not(module) -> Optional[str]:
    if module.pad_mode == "replicate":
        return "pad_mode='replicate' (replicate padding in space)"
    conv = module.conv
    if tuple(conv.padding[1:]) != (module.width_pad, module.height_pad) or conv.padding[0] != 0:
        return "unexpected conv padding"
    return _conv_why_not(conv, module.time_kernel_size - 1, conv.padding[1:])


def _cogvideox_conv_forward(self, inputs: Tensor, conv_cache: Optional[Tensor] = None):
    """``CogVideoXCausalConv3d.forward``: front padding from ``conv_cache`` or the first frame repeated,
    zeros in space; returns ``(output, conv_cache)`` with the cache exactly as diffusers builds it (the
    last ``kt - 1`` frames of the padded input, a copy; for ``kt == 1`` the whole input, as there)."""
    conv = self.conv
    P = self.time_kernel_size - 1
    cache = conv_cache if P > 0 else None
    if cache is not None and (cache.shape != (*inputs.shape[:2], P, *inputs.shape[3:]) or cache.dtype != inputs.dtype):
        return _fallback(self)(inputs, conv_cache)
    if cache is not None:
        cache = cache.to(inputs.device)
    w, b = _conv_params(conv, inputs)
    out = causal_conv3d(inputs, w, b, stride=conv.stride, dilation=conv.dilation, time_pad="replicate", cache=cache)
    new_cache = inputs.clone() if P == 0 else _conv_ref.next_cache(inputs, P, "replicate", cache)
    return _like_input(out, inputs), new_cache


def _wan_conv_why_not(module) -> Optional[str]:
    pw0, pw1, ph0, ph1, pt, tail = module._padding
    if pw0 != pw1 or ph0 != ph1 or tail != 0 or tuple(module.padding) != (0, 0, 0):
        return "asymmetric padding"
    # pt == 0 with a longer time kernel: the encoder's temporal downsample, a "valid" conv in time
    # (its caller prepends the cached frame itself); computed with the first frames as the cache
    P = _conv_ref.time_padding(module.kernel_size[0], module.dilation[0])
    return _conv_why_not(module, P if pt == 0 else pt, (ph0, pw0))


def _wan_conv_forward(self, x: Tensor, cache_x: Optional[Tensor] = None) -> Tensor:
    """``WanCausalConv3d.forward``: ``cache_x`` (the previous chunk's last 1 or 2 frames) goes in front,
    zeros fill the rest of the front padding, zeros in space. Without front padding (the temporal
    downsample) the conv is "valid" in time: the first ``P`` frames of ``x`` are the cache."""
    P = self._padding[4]
    kw = dict(stride=self.stride, dilation=self.dilation, time_pad="zeros")
    w, b = _conv_params(self, x)
    if P == 0:
        P = _conv_ref.time_padding(self.kernel_size[0], self.dilation[0])
        if P == 0:
            return _like_input(causal_conv3d(x, w, b, **kw), x)
        if x.shape[2] <= P:
            return _fallback(self)(x, cache_x)
        return _like_input(causal_conv3d(x[:, :, P:], w, b, cache=x[:, :, :P], **kw), x)
    cache = None
    if cache_x is not None:
        n = cache_x.shape[2]
        if n > P or cache_x.dtype != x.dtype or cache_x.shape[:2] != x.shape[:2] or cache_x.shape[3:] != x.shape[3:]:
            return _fallback(self)(x, cache_x)
        cache = cache_x.to(x.device)
        if n < P:
            cache = torch.cat([cache.new_zeros(*cache.shape[:2], P - n, *cache.shape[3:]), cache], dim=2)
    return _like_input(causal_conv3d(x, w, b, cache=cache, **kw), x)


def _ltx_conv_why_not(module) -> Optional[str]:
    conv = module.conv
    kt = module.kernel_size[0]
    if module.is_causal:
        return _conv_why_not(conv, kt - 1, conv.padding[1:])
    if kt % 2 == 0:
        return "non-causal with an even time kernel"
    return _conv_why_not(conv, kt - 1, conv.padding[1:])


def _ltx_conv_forward(self, hidden_states: Tensor) -> Tensor:
    """``LTXVideoCausalConv3d.forward``. Causal: the first frame repeated in front. Non-causal (first
    frame repeated ``h = (kt - 1) // 2`` times in front, last frame ``h`` times behind): the same padded
    sequence handed to the op as ``cache = [x0] * h + x[:h]`` and ``x[h:] + [x_last] * h``."""
    conv = self.conv
    kt = self.kernel_size[0]
    w, b = _conv_params(conv, hidden_states)
    if self.is_causal:
        return _like_input(causal_conv3d(hidden_states, w, b, stride=conv.stride, dilation=conv.dilation,
                                         time_pad="replicate"), hidden_states)
    h = (kt - 1) // 2
    if hidden_states.shape[2] < h:
        return _fallback(self)(hidden_states)
    return _two_sided_conv(conv, hidden_states, h, "replicate")


def _two_sided_conv(conv: nn.Conv3d, x: Tensor, h: int, time_pad: str) -> Tensor:
    """``conv`` over ``x`` padded by ``h`` frames at both ends in time (the first / last frame repeated,
    or zeros), as a causal conv: the padded sequence is handed to the op as ``cache = front + x[:h]`` and
    ``x[h:] + back``. Needs ``x.shape[2] >= h``."""
    w, b = _conv_params(conv, x)
    body, cache = x, None
    if h > 0:
        if time_pad == "replicate":
            front, back = x[:, :, :1].expand(-1, -1, h, -1, -1), x[:, :, -1:].expand(-1, -1, h, -1, -1)
        else:
            front = back = x.new_zeros(*x.shape[:2], h, *x.shape[3:])
        cache = torch.cat([front, x[:, :, :h]], dim=2)
        body = torch.cat([x[:, :, h:], back], dim=2)
    out = causal_conv3d(body, w, b, stride=conv.stride, dilation=conv.dilation, time_pad=time_pad, cache=cache)
    return _like_input(out, x)


register(
    models=("AutoencoderKLCogVideoX", "AutoencoderKLWan", "AutoencoderKLLTXVideo"),
    components={
        "CogVideoXCausalConv3d": (
            _Spec("conv3d", "forward", "forward -> causal_conv3d (replicate first frame, conv_cache)",
                  _cogvideox_conv_why_not, _cogvideox_conv_forward),),
        "WanCausalConv3d": (
            _Spec("conv3d", "forward", "forward -> causal_conv3d (zeros, cache_x)", _wan_conv_why_not,
                  _wan_conv_forward),),
        "LTXVideoCausalConv3d": (
            _Spec("conv3d", "forward", "forward -> causal_conv3d", _ltx_conv_why_not, _ltx_conv_forward),),
    })
