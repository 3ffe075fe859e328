"""Causal 3D VAE: 8x spatial and 4x temporal compression, the first frame encoded alone.

Layouts: video ``[B, 3, F, H, W]`` in ``[-1, 1]``; latent ``[B, C_lat, 1 + (F - 1) / 4, H / 8, W / 8]``.

Every convolution is an :class:`i2v_kernels.CausalConv3d`: output frame ``t`` sees input frames
``<= t`` only, so latent frame 0 is a function of video frame 0 alone (the image an image-to-video
model starts from), and the decoder can run chunk by chunk through the convolutions' frame caches
(:meth:`CausalVAE.decode` with ``chunk=``) with the same result as decoding the whole latent.
Normalization is an RMSNorm over channels at each voxel (never over time, which would break
causality), through :func:`i2v_kernels.rms_norm`.

Every resolution change carries a parameter-free shortcut (residual autoencoding, as in DC-AE): the
encoder's downsamplings add the input's 2x2 (x 2 frames) blocks folded into channels and averaged down
to the output width, the decoder's upsamplings add their input's channels repeated and unfolded into
blocks, and the latent mean / the decoder's first features add the same around the bottleneck. The
convolutions learn residuals over plain reshapes, which is what lets the tiny VAE reach ~29 dB on
held-out clips after 4,000 steps (about 40 minutes on 2 CPU cores).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import i2v_kernels
from i2v_kernels.nn import CausalConv3d, ConvCache, decode_in_chunks, streaming
from i2v_kernels.ops.adaln import reference as adaln_ref
from i2v_kernels.ops.conv3d import output_format

from i2v_model.config import VAEConfig

__all__ = ["CausalVAE"]


class ChannelNorm(nn.Module):
    """RMSNorm over ``C`` of ``[B, C, T, H, W]`` (a view to ``[B, T, H, W, C]``: free in channels_last_3d)."""

    def __init__(self, channels: int, use_kernels: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.use_kernels = use_kernels

    def forward(self, x: Tensor) -> Tensor:
        fn = i2v_kernels.rms_norm if self.use_kernels else adaln_ref.rms_norm
        return fn(x.permute(0, 2, 3, 4, 1), self.weight).permute(0, 4, 1, 2, 3)


class ResBlock(nn.Module):
    """``x + conv(silu(norm(conv(silu(norm(x))))))``; the residual add is fused into the second conv."""

    def __init__(self, channels: int, time_pad: str, use_kernels: bool):
        super().__init__()
        self.norm1 = ChannelNorm(channels, use_kernels)
        self.conv1 = CausalConv3d(channels, channels, 3, time_pad=time_pad, use_kernels=use_kernels)
        self.norm2 = ChannelNorm(channels, use_kernels)
        self.conv2 = CausalConv3d(channels, channels, 3, time_pad=time_pad, use_kernels=use_kernels)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.conv1(F.silu(self.norm1(x)))
        h, _ = self.conv2(F.silu(self.norm2(h)), residual=x)
        return h


def space_to_channels(x: Tensor, temporal: bool) -> Tensor:
    """``[B, C, T, H, W] -> [B, C * 4 (* 2), T', H / 2, W / 2]``: every 2x2 (x 2 frames) block as channels.

    In time the blocks follow the causal frame grouping: ``(x0, x0), (x1, x2), (x3, x4), ...``, so output
    frame ``j`` holds the same input frames as a causal stride-2 convolution's output frame ``j``.
    """
    B, C, T, H, W = x.shape
    if temporal:
        x = torch.cat([x[:, :, :1], x], dim=2)                      # [B, C, 2 T', H, W]
        x = x.view(B, C, (T + 1) // 2, 2, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 7, 2, 4, 6)
        return x.reshape(B, C * 8, (T + 1) // 2, H // 2, W // 2)
    x = x.view(B, C, T, H // 2, 2, W // 2, 2).permute(0, 1, 4, 6, 2, 3, 5)
    return x.reshape(B, C * 4, T, H // 2, W // 2)


def channels_to_space(x: Tensor, temporal: bool, first: bool) -> Tensor:
    """Inverse grouping of :func:`space_to_channels` (``C`` divisible by 4, or 8 when ``temporal``); in
    time, frame 0 of a chunk that starts the video unfolds to one frame (the later of its pair)."""
    B, C, T, H, W = x.shape
    if temporal:
        x = x.view(B, C // 8, 2, 2, 2, T, H, W).permute(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(B, C // 8, 2 * T, 2 * H, 2 * W)
        return x[:, :, 1:] if first else x
    x = x.view(B, C // 4, 2, 2, T, H, W).permute(0, 1, 4, 5, 2, 6, 3)
    return x.reshape(B, C // 4, T, 2 * H, 2 * W)


def average_channels(x: Tensor, cout: int) -> Tensor:
    """Mean over consecutive groups of channels: ``[B, C, ...] -> [B, cout, ...]`` (``cout`` divides ``C``)."""
    B, C = x.shape[:2]
    return x.view(B, cout, C // cout, *x.shape[2:]).mean(dim=2)


def repeat_channels(x: Tensor, cout: int) -> Tensor:
    """Each channel repeated ``cout / C`` times (consecutively): ``[B, C, ...] -> [B, cout, ...]``."""
    return x.repeat_interleave(cout // x.shape[1], dim=1)


class Downsample(nn.Module):
    """Strided causal conv: halves H and W, and T (as ``1 + (T - 1) / 2``) when ``temporal``.

    Plus a parameter-free shortcut (as in DC-AE's residual autoencoding): the input's 2x2(x2) blocks
    folded into channels and averaged down to ``cout``, so the layer learns a residual over a plain
    space-to-channel reshape. The autoencoder trains much faster that way.
    """

    def __init__(self, cin: int, cout: int, temporal: bool, time_pad: str, use_kernels: bool):
        super().__init__()
        self.temporal = temporal
        self.shortcut = (cin * (8 if temporal else 4)) % cout == 0
        self.conv = CausalConv3d(cin, cout, 3, stride=(2 if temporal else 1, 2, 2), time_pad=time_pad,
                                 use_kernels=use_kernels)

    def forward(self, x: Tensor) -> Tensor:
        if not self.shortcut:
            return self.conv(x)[0]
        residual = average_channels(space_to_channels(x, self.temporal), self.conv.out_channels)
        # the residual in the conv's output format on this device: added without a layout copy
        return self.conv(x, residual=residual.contiguous(memory_format=output_format(x.device)))[0]


class Upsample(nn.Module):
    """Nearest 2x in H and W (and in T, keeping the video's first frame single) then a causal conv.

    Plus the mirror of :class:`Downsample`'s shortcut: channels repeated up to ``cout * 4 (* 2)`` and
    unfolded into 2x2(x2) blocks (pointwise in time, so chunked decoding needs no cache for it).
    """

    def __init__(self, cin: int, cout: int, temporal: bool, time_pad: str, use_kernels: bool):
        super().__init__()
        self.temporal = temporal
        self.shortcut = (cout * (8 if temporal else 4)) % cin == 0
        self.conv = CausalConv3d(cin, cout, 3, time_pad=time_pad, use_kernels=use_kernels)

    def forward(self, x: Tensor, first: bool) -> Tensor:
        residual = None
        if self.shortcut:
            wide = repeat_channels(x, self.conv.out_channels * (8 if self.temporal else 4))
            residual = channels_to_space(wide, self.temporal, first).contiguous(memory_format=output_format(x.device))
        if self.temporal:
            # Latent frame 0 holds video frame 0 alone; every later latent frame holds two frames.
            rest = x[:, :, 1:] if first else x
            rest = rest.repeat_interleave(2, dim=2)
            x = torch.cat([x[:, :, :1], rest], dim=2) if first else rest
        x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
        return self.conv(x, residual=residual)[0]


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig, use_kernels: bool):
        super().__init__()
        ch, tp, L = cfg.channels, cfg.time_pad, len(cfg.channels)
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0], 3, time_pad=tp, use_kernels=use_kernels)
        self.levels = nn.ModuleList()
        for i in range(L):
            level = nn.Module()
            level.blocks = nn.ModuleList(ResBlock(ch[i], tp, use_kernels) for _ in range(cfg.blocks_per_level))
            if i < L - 1:
                temporal = i >= L - 1 - cfg.temporal_downsamples
                level.down = Downsample(ch[i], ch[i + 1], temporal, tp, use_kernels)
            self.levels.append(level)
        self.norm_out = ChannelNorm(ch[-1], use_kernels)
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels, 3, time_pad=tp, use_kernels=use_kernels)
        self.shortcut = ch[-1] % cfg.latent_channels == 0

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.conv_in(x)
        for level in self.levels:
            for block in level.blocks:
                h = block(h)
            if hasattr(level, "down"):
                h = level.down(h)
        out = self.conv_out(F.silu(self.norm_out(h)))[0]
        if self.shortcut:  # the latent mean is a residual over the last features averaged down
            mean, logvar = out.chunk(2, dim=1)
            out = torch.cat([mean + average_channels(h, mean.shape[1]), logvar], dim=1)
        return out


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig, use_kernels: bool):
        super().__init__()
        ch, tp, L = cfg.channels[::-1], cfg.time_pad, len(cfg.channels)
        self.conv_in = CausalConv3d(cfg.latent_channels, ch[0], 3, time_pad=tp, use_kernels=use_kernels)
        self.shortcut = ch[0] % cfg.latent_channels == 0
        self.levels = nn.ModuleList()
        for i in range(L):
            level = nn.Module()
            level.blocks = nn.ModuleList(ResBlock(ch[i], tp, use_kernels) for _ in range(cfg.blocks_per_level))
            if i < L - 1:
                level.up = Upsample(ch[i], ch[i + 1], i < cfg.temporal_downsamples, tp, use_kernels)
            self.levels.append(level)
        self.norm_out = ChannelNorm(ch[-1], use_kernels)
        self.conv_out = CausalConv3d(ch[-1], cfg.in_channels, 3, time_pad=tp, use_kernels=use_kernels)

    def forward(self, z: Tensor, first: bool = True) -> Tensor:
        """``first``: this chunk starts the video (its latent frame 0 decodes to one frame)."""
        residual = repeat_channels(z, self.conv_in.out_channels) if self.shortcut else None
        h, _ = self.conv_in(z, residual=residual)
        for level in self.levels:
            for block in level.blocks:
                h = block(h)
            if hasattr(level, "up"):
                h = level.up(h, first)
        return self.conv_out(F.silu(self.norm_out(h)))[0]


class CausalVAE(nn.Module):
    """Encoder + decoder with a diagonal-Gaussian latent, normalized by stored statistics.

    ``encode`` returns the *normalized* latent ``(z - latent_mean) / latent_std`` (the DiT's space);
    ``decode`` takes it back. The statistics are buffers set after training (:meth:`set_latent_stats`).
    """

    def __init__(self, cfg: VAEConfig, use_kernels: bool = True):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, use_kernels)
        self.decoder = Decoder(cfg, use_kernels)
        self.register_buffer("latent_mean", torch.zeros(()))
        self.register_buffer("latent_std", torch.ones(()))
        with torch.no_grad():
            # Start the posterior narrow (std e^-3): with logvar near 0 the sampled latent would be
            # mostly noise, and Adam needs thousands of steps to walk the bias down by itself.
            self.encoder.conv_out.bias[cfg.latent_channels:].fill_(-6.0)

    def check_frames(self, frames: int) -> None:
        f = self.cfg.temporal_factor
        if frames < 1 or (frames - 1) % f:
            raise ValueError(f"the VAE needs 1 + {f}k frames (1, {1 + f}, {1 + 2 * f}, ...), got {frames}")

    def encode_dist(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, 3, F, H, W]`` -> raw posterior ``(mean, logvar)``, each ``[B, C_lat, T, h, w]``."""
        self.check_frames(x.shape[2])
        s = self.cfg.spatial_factor
        if x.shape[-1] % s or x.shape[-2] % s:
            raise ValueError(f"the VAE needs H and W divisible by {s}, got {tuple(x.shape[-2:])}")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-20.0, 10.0)

    def encode(self, x: Tensor, sample: bool = False, generator: Optional[torch.Generator] = None) -> Tensor:
        mean, logvar = self.encode_dist(x)
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise
        return (z - self.latent_mean) / self.latent_std

    def decode(self, z: Tensor, chunk: Union[None, int, Sequence[int]] = None,
               state: Optional[ConvCache] = None) -> Tensor:
        """Normalized latent ``[B, C_lat, T, h, w]`` -> video ``[B, 3, 1 + 4 (T - 1), H, W]``.

        ``chunk``: decode ``chunk`` latent frames at a time (after the first frame, which goes alone)
        through the convolutions' frame caches; the result equals the whole decode.

        ``state``: a :class:`~i2v_kernels.nn.ConvCache` that carries the decoder's frame caches from one
        call to the next (a streaming decode). Empty, ``z`` starts the video as above; after an earlier
        call, ``z``'s frames continue the latent decoded then and give ``4 T`` frames: decoding a long
        latent piece by piece through one state equals decoding it whole.
        """
        z = z * self.latent_std + self.latent_mean
        T, f = z.shape[2], self.cfg.temporal_factor
        first = state is None or len(state) == 0
        total = 1 + f * (T - 1) if first else f * T
        if chunk is None and state is None:
            return self.decoder(z, first=True)
        if chunk is None:
            sizes = [T]
        elif isinstance(chunk, int):
            sizes = ([1] if first else []) + [min(chunk, T - s) for s in range(1 if first else 0, T, chunk)]
        else:
            sizes = list(chunk)
        flags = {"first": first}

        def step(zc: Tensor) -> Tensor:
            y = self.decoder(zc, first=flags["first"])
            flags["first"] = False
            return y

        with streaming(self.decoder, state):
            return decode_in_chunks(step, z, sizes, total_frames=total)

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Training pass: ``(reconstruction, mean, logvar)`` with a sampled latent."""
        mean, logvar = self.encode_dist(x)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + torch.exp(0.5 * logvar) * noise
        return self.decoder(z), mean, logvar

    @torch.no_grad()
    def set_latent_stats(self, mean: float, std: float) -> None:
        self.latent_mean.fill_(mean)
        self.latent_std.fill_(std)
