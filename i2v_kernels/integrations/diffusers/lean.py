"""Memory-lean forwards of CogVideoX's decoder blocks, used while :mod:`.stream` decodes.

They compute what diffusers' ``CogVideoXSpatialNorm3D.forward`` and ``CogVideoXResnetBlock3D.forward``
compute, bit for bit, with fewer full-size tensors alive at once:

* ``norm_f * conv_y + conv_b`` becomes ``norm_f.mul_(conv_y).add_(conv_b)`` with ``conv_b`` computed
  after ``conv_y`` is freed (the same two roundings per element, in the same order): at the peak
  three activation-sized tensors instead of six.
* SiLU runs in place on the fresh normalized tensor; the residual is added in place to the fresh
  output of ``conv2``.
* The previous frame batch's conv caches are taken out of its cache dict (``pop``) as each conv
  consumes them, so the old and the new cache of a layer are not both held until the decoder returns.
* A 1-frame conv (``conv_y``/``conv_b``, time kernel 1) needs no cache: diffusers keeps a copy of its
  whole input as one anyway (for every SpatialNorm, twice per frame batch); the lean norm returns
  None there, which those convs ignore.

Only without autograd (in-place ops would overwrite what backward needs): a call with grad enabled
runs diffusers' own forward. ``lean_decoder(vae)`` installs them on the decoder's blocks for the
duration of a ``with`` block and puts everything back after, skipping any block whose ``forward`` is
already replaced on the instance (diffusers' hooks, ``patch()``).
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_NORM, _RESNET = "CogVideoXSpatialNorm3D", "CogVideoXResnetBlock3D"


def _same(a: Tensor, b: Tensor) -> bool:
    """Whether ``a op= b`` gives exactly ``a op b`` (no broadcast or type promotion into ``a``)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def _cache(conv_cache, key):
    """The previous batch's cache of ``key``, removed from its dict (freed once the conv is done)."""
    return None if conv_cache is None else conv_cache.pop(key, None)


def _spatial_norm(self, f: Tensor, zq: Tensor, conv_cache=None):
    if torch.is_grad_enabled():
        return type(self).forward(self, f, zq, conv_cache)
    new_conv_cache = {}
    if f.shape[2] > 1 and f.shape[2] % 2 == 1:  # the first frame on its own, as diffusers interpolates it
        z_first = F.interpolate(zq[:, :, :1], size=(1, *f.shape[-2:]))
        z_rest = F.interpolate(zq[:, :, 1:], size=(f.shape[2] - 1, *f.shape[-2:]))
        zq = torch.cat([z_first, z_rest], dim=2)
        del z_first, z_rest
    else:
        zq = F.interpolate(zq, size=f.shape[-3:])
    out = self.norm_layer(f)
    for name in ("conv_y", "conv_b"):
        conv = getattr(self, name)
        t, cache = conv(zq, conv_cache=_cache(conv_cache, name))
        new_conv_cache[name] = None if conv.time_kernel_size == 1 else cache
        del cache
        if name == "conv_y":
            out = out.mul_(t) if _same(out, t) else out * t
        else:
            out = out.add_(t) if _same(out, t) else out + t
        del t
    return out, new_conv_cache


def _resnet(self, inputs: Tensor, temb=None, zq=None, conv_cache=None):
    if (torch.is_grad_enabled() or temb is not None or zq is None or not isinstance(self.nonlinearity, nn.SiLU)
            or (self.dropout.p > 0 and self.dropout.training)):
        return type(self).forward(self, inputs, temb, zq, conv_cache)
    new_conv_cache = {}
    h, new_conv_cache["norm1"] = self.norm1(inputs, zq, conv_cache=_cache(conv_cache, "norm1"))
    h = F.silu(h, inplace=True)
    h, new_conv_cache["conv1"] = self.conv1(h, conv_cache=_cache(conv_cache, "conv1"))
    h, new_conv_cache["norm2"] = self.norm2(h, zq, conv_cache=_cache(conv_cache, "norm2"))
    h = F.silu(h, inplace=True)
    h = self.dropout(h)
    h, new_conv_cache["conv2"] = self.conv2(h, conv_cache=_cache(conv_cache, "conv2"))
    if self.in_channels != self.out_channels:
        if self.use_conv_shortcut:
            inputs, new_conv_cache["conv_shortcut"] = self.conv_shortcut(
                inputs, conv_cache=_cache(conv_cache, "conv_shortcut"))
        else:
            inputs = self.conv_shortcut(inputs)
    h = h.add_(inputs) if _same(h, inputs) else h + inputs
    return h, new_conv_cache


_LEAN = {_NORM: _spatial_norm, _RESNET: _resnet}


def _lean_kind(module: nn.Module):
    for cls in type(module).__mro__:
        if cls.__name__ in _LEAN and cls.__module__.startswith("diffusers."):
            return cls.__name__
    return None


@contextlib.contextmanager
def lean_decoder(vae) -> Iterator[int]:
    """Install the lean forwards on ``vae.decoder``'s SpatialNorm3D and ResnetBlock3D modules for the
    ``with`` block (yields how many); any other VAE is left alone."""
    installed = []
    decoder = getattr(vae, "decoder", None)
    try:
        if isinstance(decoder, nn.Module):
            for module in decoder.modules():
                kind = _lean_kind(module)
                if kind is None or "forward" in module.__dict__:
                    continue
                module.forward = types.MethodType(_LEAN[kind], module)
                installed.append(module)
        yield len(installed)
    finally:
        for module in installed:
            module.__dict__.pop("forward", None)
