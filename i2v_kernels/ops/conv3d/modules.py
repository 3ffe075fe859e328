"""Causal 3D convolution module and streaming (chunked) decoding for video VAEs.

* :class:`CausalConv3d` -- ``forward(x, cache=None) -> (y, new_cache)``, parameters shaped as
  ``nn.Conv3d``'s. ``new_cache`` is what the next chunk needs, so a video convolved chunk by chunk,
  each call given the previous call's cache, equals the video convolved whole.
* :class:`ConvCache` and :func:`streaming` -- one container threaded through every ``CausalConv3d`` of
  a model: inside ``with streaming(model):`` each module reads its cache from it and writes its new
  cache back, so a decoder written with these modules decodes chunk by chunk without passing caches
  around by hand. Memory: one cache of ``P = (kt - 1) * dilation_t`` input frames per module (copies,
  never views of a chunk, so nothing else of a chunk stays alive).
* :func:`decode_in_chunks` -- runs a decoder over the latent frames in chunks and writes each decoded
  chunk into one preallocated output (no growing ``torch.cat``).

Chunking rule: with a temporal stride ``s_t > 1``, chunked equals whole only when every chunk but the
last feeds the strided conv a multiple of ``s_t`` frames. (Wan's encoder downsample, kernel (3, 1, 1)
stride (2, 1, 1), instead passes its first frame through unconvolved and keeps one cached frame: that
first-frame special case belongs to the model code -- e.g. call the conv with
``cache=cat(prev_last_frame, x[:, :, :1])`` on ``x[:, :, 1:]`` -- not to this op. Likewise Wan's decoder
skips its temporal upsampling conv on the first latent frame and then starts that conv from zeros, which
is ``cache=None`` with ``time_pad="zeros"``.)
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from i2v_kernels.ops._checks import check_choice, check_int, check_triple
from i2v_kernels.ops.conv3d import causal_conv3d
from i2v_kernels.ops.conv3d import reference
from i2v_kernels.ops.conv3d.reference import TIME_PADS

__all__ = ["CausalConv3d", "ConvCache", "decode_in_chunks", "streaming"]


class ConvCache:
    """The frame caches of a model's :class:`CausalConv3d` modules for one stream (one video).

    Keyed by module; each entry is that module's last ``new_cache`` ``[B, Cin, P, H, W]``. A module
    absent from it pads by its ``time_pad`` (the start of the video). Each module must be called once
    per chunk (a module called twice per chunk would read its own second-call cache).
    """

    def __init__(self) -> None:
        self._frames: dict[nn.Module, Tensor] = {}

    def get(self, module: nn.Module) -> Optional[Tensor]:
        return self._frames.get(module)

    def set(self, module: nn.Module, frames: Tensor) -> None:
        self._frames[module] = frames

    def reset(self) -> None:
        """Forget every cache: the next chunk starts a new video."""
        self._frames.clear()

    def __len__(self) -> int:
        return len(self._frames)

    def __contains__(self, module: nn.Module) -> bool:
        return module in self._frames

    def nbytes(self) -> int:
        """Bytes held by the caches."""
        return sum(t.numel() * t.element_size() for t in self._frames.values())


@contextlib.contextmanager
def streaming(model: nn.Module, state: Optional[ConvCache] = None) -> Iterator[ConvCache]:
    """Thread one :class:`ConvCache` through every :class:`CausalConv3d` in ``model``.

    Inside the block, a ``CausalConv3d`` called without an explicit ``cache`` takes its cache from the
    state and stores its ``new_cache`` there. Pass ``state`` to resume an earlier stream; the state
    outlives the block (call ``state.reset()`` or drop it to free the caches).

    Example::

        with torch.inference_mode(), streaming(decoder):
            frames = [decoder(z[:, :, i:i + 2]) for i in range(0, z.shape[2], 2)]
    """
    state = ConvCache() if state is None else state
    convs = [m for m in model.modules() if isinstance(m, CausalConv3d)]
    previous = [m._stream for m in convs]
    for m in convs:
        m._stream = state
    try:
        yield state
    finally:
        for m, p in zip(convs, previous):
            m._stream = p


class CausalConv3d(nn.Module):
    """Causal 3D convolution with a frame cache (see :func:`i2v_kernels.causal_conv3d`).

    Args:
        in_channels, out_channels: ``Cin``, ``Cout``.
        kernel_size, stride, dilation: int or ``(t, h, w)`` triple (an int applies to all three dims,
            as in ``nn.Conv3d``; note CogVideoX's module reads an int stride as temporal only).
        bias: learn a bias ``[Cout]``.
        time_pad: ``"replicate"`` (CogVideoX, LTX) or ``"zeros"`` (Wan): the front padding of the first
            chunk.
        use_kernels: run the i2v_kernels op (True) or the plain-PyTorch reference (False).

    Parameters ``weight [Cout, Cin, kt, kh, kw]`` and ``bias [Cout]``, initialized as ``nn.Conv3d``'s
    (so its ``state_dict`` loads here unchanged).

    ``forward(x [B, Cin, T, H, W], cache=None, *, residual=None) -> (y, new_cache)``: ``y`` is
    ``[B, Cout, T_out, H_out, W_out]`` (the op's ``output_format``: channels_last_3d on GPUs, NCDHW on
    CPUs), ``new_cache`` the last
    ``P = (kt - 1) * dilation_t`` frames of ``cat(cache or padding, x)`` -- ``[B, Cin, P, H, W]`` even
    when ``T < P``. ``residual`` (shaped like ``y``) is added in the kernel's epilogue.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, dilation=1, bias: bool = True,
                 time_pad: str = "replicate", use_kernels: bool = True, device=None, dtype=None):
        super().__init__()
        name = "CausalConv3d"
        check_choice(name, "time_pad", time_pad, TIME_PADS)
        self.in_channels = check_int(name, "in_channels", in_channels)
        self.out_channels = check_int(name, "out_channels", out_channels)
        self.kernel_size = check_triple(name, "kernel_size", kernel_size)
        self.stride, self.dilation = check_triple(name, "stride", stride), check_triple(name, "dilation", dilation)
        if not isinstance(bias, bool):
            raise TypeError(f"{name}: bias must be a bool, got {type(bias).__name__}")
        self.time_pad, self.use_kernels = time_pad, use_kernels
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self._stream: Optional[ConvCache] = None
        self.reset_parameters()

    @property
    def time_padding(self) -> int:
        """``P = (kt - 1) * dilation_t``: frames of front padding, and the cache length."""
        return reference.time_padding(self.kernel_size[0], self.dilation[0])

    def reset_parameters(self) -> None:
        # nn.Conv3d's initialization: kaiming-uniform weight, bias uniform in +-1/sqrt(fan_in).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * math.prod(self.kernel_size)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, cache: Optional[Tensor] = None, *,
                residual: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        stream = self._stream
        if cache is None and stream is not None:
            cache = stream.get(self)
        fn = causal_conv3d if self.use_kernels else reference.causal_conv3d
        y = fn(x, self.weight, self.bias, stride=self.stride, dilation=self.dilation, time_pad=self.time_pad,
               cache=cache, residual=residual)
        new_cache = reference.next_cache(x, self.time_padding, self.time_pad, cache)
        if stream is not None:
            stream.set(self, new_cache)
        return y, new_cache

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"dilation={self.dilation}, bias={self.bias is not None}, time_pad={self.time_pad!r}, "
                f"use_kernels={self.use_kernels}")


def _chunk_sizes(T: int, chunk: Union[int, Sequence[int]]) -> list[int]:
    if isinstance(chunk, int) and not isinstance(chunk, bool):
        if chunk < 1:
            raise ValueError(f"decode_in_chunks: chunk must be >= 1 latent frames, got {chunk}")
        return [min(chunk, T - s) for s in range(0, T, chunk)]
    sizes = [int(n) for n in chunk]
    if any(n < 1 for n in sizes) or sum(sizes) != T:
        raise ValueError(f"decode_in_chunks: chunk sizes {sizes} must be positive and sum to the {T} latent frames")
    return sizes


def decode_in_chunks(decode_fn: Callable[[Tensor], Tensor], z: Tensor, chunk: Union[int, Sequence[int]],
                     out_frames_per_latent_frame: int = 1, *, model: Optional[nn.Module] = None,
                     total_frames: Optional[int] = None, out: Optional[Tensor] = None) -> Tensor:
    """Decode latent frames ``z [B, C, T, h, w]`` chunk by chunk into one preallocated output.

    Args:
        decode_fn: ``z_chunk [B, C, t, h, w] -> frames [B, C', t', H, W]``; called on consecutive
            chunks in order, so its ``CausalConv3d`` caches carry over (see ``model``).
        chunk: latent frames per call, or the list of chunk lengths (e.g. ``[1, 2, 2]`` to decode the
            first frame alone, as Wan does).
        out_frames_per_latent_frame: output frames per latent frame; the output has
            ``T * out_frames_per_latent_frame`` frames unless ``total_frames`` says otherwise (e.g.
            ``1 + 4 * (T - 1)`` for a decoder whose first latent frame gives one frame).
        model: if given, decoding runs inside ``streaming(model)`` with a fresh :class:`ConvCache`;
            leave it None when ``decode_fn`` manages its caches itself.
        out: write into this tensor ``[B, C', total_frames, H, W]`` instead of allocating one.

    Returns:
        ``[B, C', total_frames, H, W]``, allocated from the first decoded chunk's shape, dtype,
        device and memory format. Only one chunk's activations are alive at a time; run it under
        ``torch.inference_mode()`` for decoding.
    """
    if not isinstance(z, Tensor) or z.dim() != 5:
        raise ValueError(f"decode_in_chunks: z must be a [B, C, T, h, w] tensor, got "
                         f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
    T = z.shape[2]
    sizes = _chunk_sizes(T, chunk)
    total = T * out_frames_per_latent_frame if total_frames is None else total_frames
    pos = start = 0
    with streaming(model) if model is not None else contextlib.nullcontext():
        for n in sizes:
            y = decode_fn(z[:, :, start:start + n])
            start += n
            if out is None:
                fmt = torch.channels_last_3d if (y.is_contiguous(memory_format=torch.channels_last_3d)
                                                 and not y.is_contiguous()) else torch.contiguous_format
                out = torch.empty((y.shape[0], y.shape[1], total, *y.shape[3:]), dtype=y.dtype, device=y.device,
                                  memory_format=fmt)
            t = y.shape[2]
            if y.dim() != 5 or y.shape[:2] != out.shape[:2] or y.shape[3:] != out.shape[3:] or pos + t > out.shape[2]:
                raise ValueError(f"decode_in_chunks: decoded chunk {tuple(y.shape)} does not fit the output "
                                 f"{tuple(out.shape)} at frame {pos}; check out_frames_per_latent_frame/total_frames")
            out[:, :, pos:pos + t].copy_(y)
            pos += t
            del y
    if pos != out.shape[2]:
        raise ValueError(f"decode_in_chunks: the decoder produced {pos} frames but the output has {out.shape[2]}; "
                         f"check out_frames_per_latent_frame/total_frames")
    return out
