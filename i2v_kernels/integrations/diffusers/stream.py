"""Streaming decode of diffusers' causal video VAEs: the frames of ``vae.decode(z).sample``, chunk by chunk.

``decode_streaming(vae, z)`` returns the same tensor as ``vae.decode(z).sample`` for
``AutoencoderKLCogVideoX`` and ``AutoencoderKLWan`` (patched by :func:`i2v_kernels.patch` or not),
without diffusers' extra copies of the video:

* diffusers' CogVideoX decode runs the decoder on frame batches (its ``num_latent_frames_batch_size``,
  the first batch taking the remainder), keeps every batch's frames in a list and ``torch.cat``s them
  at the end: the video is held twice at the peak.
* diffusers' Wan decode runs the decoder one latent frame at a time and grows the video with a
  ``torch.cat`` per frame (the frames decoded so far are copied again at every frame: quadratic in the
  frame count), then ``torch.clamp``s it into a third copy.

Here the decoder runs on exactly the same chunks, with the same caches (the conv caches CogVideoX's
decoder returns, Wan's ``feat_cache``; a patched VAE's convolutions take them as the ``cache`` of
``causal_conv3d`` instead of concatenating them in front of each chunk), so each chunk's frames are the
ones diffusers computes. Each chunk is written straight into one preallocated video (Wan's clamp
written in the same pass) and dropped, so the peak is one video plus one chunk's working set.

That working set is usually the larger part: a top-resolution decoder layer holds activations many
times the size of the video. For CogVideoX the decoder's SpatialNorm3D and ResnetBlock3D blocks run
through memory-lean forwards while streaming (:mod:`.lean`: in-place products and residuals, old conv
caches freed as consumed), the same arithmetic in the same order: the video stays bit for bit
diffusers', and the peak drops (CPU allocator, released widths: 17 frames of 96x96 805 -> 525 MiB).

``iter_decode(vae, z)`` yields the chunks instead (:class:`StreamChunk`: frames, first frame index,
samples), and ``decode_streaming(vae, z, callback=fn)`` hands each to ``fn`` and returns None: a
writer (a video encoder, a file) then never holds the whole video.

``streaming_why_not(vae, z=None)`` says why a VAE cannot stream (another VAE class, or tiling enabled
for a latent larger than a tile: tiled decode blends overlapping tiles of the whole video); then
``decode_streaming`` returns ``vae.decode(z).sample`` (the callback gets it as one chunk), or raises with
``strict=True``. Slicing (``enable_slicing()``, batch > 1) decodes sample by sample as diffusers does.
Decoding runs under ``torch.no_grad()``: it is for inference.
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Optional

import torch
from torch import Tensor

from i2v_kernels.integrations.diffusers.lean import lean_decoder

__all__ = ["StreamChunk", "decode_streaming", "iter_decode", "streaming_why_not"]

STREAMING_VAES = ("AutoencoderKLCogVideoX", "AutoencoderKLWan")


class StreamChunk(NamedTuple):
    """One decoded piece of the video: ``frames [b, C, t, H, W]`` are frames ``start .. start + t - 1``
    of samples ``batch`` (a slice of the batch; all samples unless the VAE decodes with slicing)."""

    frames: Tensor
    start: int
    batch: slice


def _kind(vae) -> Optional[str]:
    # by name, as patch() recognizes classes: diffusers is never imported here
    for cls in type(vae).__mro__:
        if cls.__name__ in STREAMING_VAES and cls.__module__.startswith("diffusers."):
            return cls.__name__
    return None


def _latent_channels(vae) -> Optional[int]:
    config = getattr(vae, "config", None)
    if config is None:
        return None
    return config.get("latent_channels", config.get("z_dim")) if hasattr(config, "get") else None


def _tiles(vae, z: Optional[Tensor]) -> Optional[str]:
    """Why diffusers would tile this decode, or None."""
    if not getattr(vae, "use_tiling", False):
        return None
    if _kind(vae) == "AutoencoderKLWan":
        ratio = vae.spatial_compression_ratio
        tile_h, tile_w = vae.tile_sample_min_height // ratio, vae.tile_sample_min_width // ratio
    else:
        tile_h, tile_w = vae.tile_latent_min_height, vae.tile_latent_min_width
    if z is None:
        return (f"tiling is enabled (enable_tiling): latents larger than {tile_h}x{tile_w} are decoded in "
                f"overlapping tiles blended over the whole video, which does not stream")
    h, w = z.shape[3], z.shape[4]
    if h > tile_h or w > tile_w:
        return (f"tiling is enabled (enable_tiling) and the {h}x{w} latent is larger than a {tile_h}x{tile_w} "
                f"tile: tiles are blended over the whole video, which does not stream; call vae.disable_tiling() "
                f"to stream")
    return None


def streaming_why_not(vae, z: Optional[Tensor] = None) -> Optional[str]:
    """None when ``decode_streaming(vae, z)`` streams, else why it falls back to ``vae.decode``.

    Without ``z``, answers for any latent (tiling enabled counts against it; with ``z``, only when
    diffusers would really tile that latent)."""
    kind = _kind(vae)
    if kind is None:
        name = type(vae).__name__
        extra = (" (its decoder is not causal in time chunk by chunk in diffusers: it decodes the whole latent "
                 "at once)" if name == "AutoencoderKLLTXVideo" else "")
        return f"{name} is not a streaming VAE: decode_streaming streams {', '.join(STREAMING_VAES)}{extra}"
    if kind == "AutoencoderKLWan" and not hasattr(vae, "clear_cache"):
        return "this diffusers' AutoencoderKLWan has no clear_cache() (an unsupported diffusers version)"
    return _tiles(vae, z)


def _check_z(vae, z) -> None:
    if not isinstance(z, Tensor):
        raise ValueError(f"decode_streaming: z must be a latent tensor [B, C, T, h, w], got {type(z).__name__}")
    if z.dim() != 5:
        raise ValueError(f"decode_streaming: z must be a latent tensor [B, C, T, h, w], got shape {tuple(z.shape)}")
    if z.numel() == 0:
        raise ValueError(f"decode_streaming: z must not be empty, got shape {tuple(z.shape)}")
    if not z.is_floating_point():
        raise ValueError(f"decode_streaming: z must be a floating-point tensor, got {z.dtype}")
    channels = _latent_channels(vae)
    if _kind(vae) is not None and channels is not None and z.shape[1] != channels:
        raise ValueError(f"decode_streaming: z has {z.shape[1]} channels but the VAE's latent has {channels} "
                         f"(z shape {tuple(z.shape)}, expected [B, {channels}, T, h, w])")


def _cogvideox_chunks(vae, z: Tensor) -> Iterator[tuple[Tensor, bool]]:
    """The decoder on diffusers' frame batches: ``n = max(T // fb, 1)`` batches, the first one taking
    the remainder ``T % fb`` too. The conv cache the decoder returns goes into the next batch."""
    T = z.shape[2]
    fb = vae.num_latent_frames_batch_size
    extra = T % fb
    cache = None
    for i in range(max(T // fb, 1)):
        start = 0 if i == 0 else fb * i + extra
        x = z[:, :, start:fb * (i + 1) + extra]
        if vae.post_quant_conv is not None:
            x = vae.post_quant_conv(x)
        with lean_decoder(vae):  # not across the yield: the caller's code runs between chunks
            frames, cache = vae.decoder(x, conv_cache=cache)
        del x
        yield frames, False


def _wan_chunks(vae, z: Tensor) -> Iterator[tuple[Tensor, bool]]:
    """The decoder one latent frame at a time with the VAE's ``feat_cache`` (diffusers' own cache list,
    reset before and after); the frames still need Wan's clamp to [-1, 1]."""
    patch_size = vae.config.get("patch_size") if hasattr(vae.config, "get") else None
    vae.clear_cache()
    try:
        x = vae.post_quant_conv(z)
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            frames = vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                 first_chunk=i == 0)
            if patch_size is not None and patch_size != 1:
                frames = _unpatchify(vae, frames, patch_size)
            yield frames, True
    finally:
        vae.clear_cache()


def _unpatchify(vae, x: Tensor, p: int) -> Tensor:
    """Wan 2.2's output unpatchify, per chunk (it only moves pixels within a frame): diffusers' own
    function, from the VAE's module."""
    import sys

    return sys.modules[type(vae).__module__].unpatchify(x, patch_size=p)


def _chunks(vae, z: Tensor) -> Iterator[tuple[Tensor, bool]]:
    return (_wan_chunks if _kind(vae) == "AutoencoderKLWan" else _cogvideox_chunks)(vae, z)


def _pre_forward(vae) -> None:
    # what diffusers' @apply_forward_hook does before decode: accelerate's CPU offload moves the VAE in
    hook = getattr(vae, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(vae)


def _samples(vae, z: Tensor) -> list[slice]:
    B = z.shape[0]
    if getattr(vae, "use_slicing", False) and B > 1:
        return [slice(b, b + 1) for b in range(B)]
    return [slice(0, B)]


def iter_decode(vae, z: Tensor) -> Iterator[StreamChunk]:
    """Yield the decoded video of ``z [B, C, T, h, w]`` chunk by chunk, in order (sample slice by sample
    slice when the VAE decodes with slicing). Concatenated along frames (and samples) the chunks are
    ``vae.decode(z).sample``. Each chunk is a fresh tensor the caller may keep or modify.

    Raises ValueError for bad ``z`` and when the VAE cannot stream (see :func:`streaming_why_not`)."""
    _check_z(vae, z)
    why = streaming_why_not(vae, z)
    if why is not None:
        raise ValueError(f"iter_decode: {why}")
    _pre_forward(vae)
    for samples in _samples(vae, z):
        start = 0
        with torch.no_grad():
            gen = _chunks(vae, z[samples])
            try:
                for frames, clamp in gen:
                    if clamp:
                        frames = frames.clamp_(-1.0, 1.0)
                    n = frames.shape[2]
                    yield StreamChunk(frames, start, samples)
                    start += n
                    del frames
            finally:
                gen.close()


def decode_streaming(vae, z: Tensor, *, callback: Optional[Callable[[StreamChunk], None]] = None,
                     out: Optional[Tensor] = None, strict: bool = False) -> Optional[Tensor]:
    """``vae.decode(z).sample`` decoded chunk by chunk into one preallocated video.

    Args:
        vae: a diffusers ``AutoencoderKLCogVideoX`` or ``AutoencoderKLWan`` (patched or not; any hooks
            and offloading as for ``vae.decode``).
        z: latent ``[B, C_lat, T, h, w]`` in the VAE's dtype and device.
        callback: if given, called with each :class:`StreamChunk` in order instead of assembling the
            video (nothing but one chunk is held); the function then returns None.
        out: write the video into this tensor (``[B, C, F, H, W]``, the decoded shape, dtype and device)
            instead of allocating one.
        strict: raise ValueError when the VAE cannot stream, instead of falling back to ``vae.decode``.

    Returns:
        ``[B, C, F, H, W]``, equal to ``vae.decode(z).sample`` (``out`` when given), or None with
        ``callback``. Peak memory: the video plus one chunk's working set; diffusers' decode peaks at
        the larger of that and about twice the video (its final ``cat``; Wan's clamp copies once more).
        CogVideoX's working set is smaller here too (the lean decoder blocks of :mod:`.lean`: 0.65x the
        peak of ``vae.decode`` at the released widths, 17 frames of 96x96, CPU). Wan's working set is
        diffusers' own, so where it is larger than the video (short clips) the peaks are close
        (0.97-1.01x on tiny configs); with ``callback`` no video is held at all.
    """
    _check_z(vae, z)
    if callback is not None and not callable(callback):
        raise ValueError(f"decode_streaming: callback must be callable, got {type(callback).__name__}")
    if out is not None and not isinstance(out, Tensor):
        raise ValueError(f"decode_streaming: out must be a tensor, got {type(out).__name__}")
    if out is not None and callback is not None:
        raise ValueError("decode_streaming: pass either out or callback, not both")
    if not isinstance(strict, bool):
        raise ValueError(f"decode_streaming: strict must be a bool, got {type(strict).__name__}")
    why = streaming_why_not(vae, z)
    if why is not None:
        if strict:
            raise ValueError(f"decode_streaming: {why}")
        with torch.no_grad():
            video = vae.decode(z).sample
        if callback is not None:
            callback(StreamChunk(video, 0, slice(0, z.shape[0])))
            return None
        if out is not None:
            _check_out(out, video.shape, video.dtype, video.device)
            return out.copy_(video)
        return video
    if callback is not None:
        for chunk in iter_decode(vae, z):
            callback(chunk)
            del chunk
        return None
    _pre_forward(vae)
    owned = out is None
    with torch.no_grad():
        for samples in _samples(vae, z):
            out = _decode_into(vae, z, samples, out, owned)
    return out


def _check_out(out: Tensor, shape, dtype, device) -> None:
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(f"decode_streaming: out must be {tuple(shape)} {dtype} on {device} (the decoded video), "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")


def _decode_into(vae, z: Tensor, samples: slice, out: Optional[Tensor], owned: bool) -> Tensor:
    """Decode samples ``samples`` of ``z`` into ``out`` (allocated here when None, once the frame count is
    known: the first chunk can differ from the others, which are all alike, so the first one waits for the
    second). ``owned``: ``out`` is ours (not the caller's), so a decoder whose chunks break that rule only
    costs a reallocation, never an error."""
    n_chunks = _chunk_count(vae, z.shape[2])
    pending, pos, done = None, 0, 0

    def put(frames: Tensor, clamp: bool) -> None:
        nonlocal pos, out, done
        t = frames.shape[2]
        done += 1
        if pos + t > out.shape[2]:
            if not owned:
                raise ValueError(f"decode_streaming: out must be as long as the decoded video, which has more "
                                 f"frames than out's {out.shape[2]} (at least {pos + t})")
            grown = torch.empty((*out.shape[:2], pos + t * max(n_chunks - done + 1, 1), *out.shape[3:]), dtype=out.dtype,
                                device=out.device, memory_format=_format(out))
            grown[:, :, :pos].copy_(out[:, :, :pos])
            out = grown
        dst = out[samples, :, pos:pos + t]
        if clamp:
            torch.clamp(frames, -1.0, 1.0, out=dst)
        else:
            dst.copy_(frames)
        pos += t

    for i, (frames, clamp) in enumerate(_chunks(vae, z[samples])):
        if out is None and i == 0 and n_chunks > 1:
            pending = (frames, clamp)
            continue
        if out is None:
            first = frames if pending is None else pending[0]
            total = first.shape[2] + frames.shape[2] * (n_chunks - 1) if pending is not None else frames.shape[2]
            shape = (z.shape[0], frames.shape[1], total, *frames.shape[3:])
            out = torch.empty(shape, dtype=frames.dtype, device=frames.device, memory_format=_format(frames))
        elif pos == 0 and pending is None:
            _check_out_frames(out, z, frames, samples)
        if pending is not None:
            put(*pending)
            pending = None
        put(frames, clamp)
        del frames
    if pos != out.shape[2]:
        if not owned:
            raise ValueError(f"decode_streaming: out must have the decoded video's {pos} frames, got {out.shape[2]}")
        out = out[:, :, :pos].contiguous(memory_format=_format(out))
    return out


def _format(t: Tensor) -> torch.memory_format:
    """The memory format the decoder gave (diffusers' ``torch.cat`` keeps it): NCDHW unless channels-last."""
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _check_out_frames(out: Tensor, z: Tensor, frames: Tensor, samples: slice) -> None:
    if (out.dim() != 5 or out.shape[0] != z.shape[0] or out.shape[1] != frames.shape[1]
            or out.shape[3:] != frames.shape[3:] or out.dtype != frames.dtype or out.device != frames.device):
        raise ValueError(f"decode_streaming: out must be [{z.shape[0]}, {frames.shape[1]}, F, "
                         f"{frames.shape[3]}, {frames.shape[4]}] {frames.dtype} on {frames.device} (the decoded "
                         f"video), got {tuple(out.shape)} {out.dtype} on {out.device}")


def _chunk_count(vae, T: int) -> int:
    if _kind(vae) == "AutoencoderKLWan":
        return T
    return max(T // vae.num_latent_frames_batch_size, 1)
