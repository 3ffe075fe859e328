"""Factorized video DiT for image-to-video flow matching.

Input: the noisy latent ``x [B, C, T, h, w]``, the conditioning ``cond [B, C + 1, T, h, w]`` (the
first-frame latent repeated on every frame, then a mask channel that is 1 on frame 0: image latent
concatenated along channels as in CogVideoX-I2V, see :func:`i2v_model.sampler.image_condition`), the flow time ``t [B]`` in
``[0, 1]`` and the prompt tokens ``context [B, L, C_text]`` (first ``kv_lens[b]`` valid) with their
pooled vector ``pooled [B, C_text]``. Output: the velocity ``v [B, C, T, h, w]`` of the
predicted clean latent (:meth:`VideoDiT.denoise`).

Tokens are ``[B, T, S, D]`` with ``S = (h / p) (w / p)`` (``p x p`` spatial patches). Each block::

    h = adaLN(x; shift1, scale1)
    x, h = x + gate1 * spatial_attn(h),  adaLN(.; shift2, scale2)     # gated_residual_adaln (fused)
    x, h = x + gate2 * temporal_attn(h), adaLN(.; shift3, scale3)
    x, h = x + gate3 * cross_attn(h, prompt), adaLN(.; shift4, scale4)
    x    = x + gate4 * mlp(h)                                           # gated_residual

with the twelve shift/scale/gate vectors ``[B, 1, 1, D]`` regressed from the timestep + pooled prompt
embedding (adaLN-Zero: zero-initialized, so every block starts as the identity). Spatial and temporal
attention share one 3D rotary table ``[T, S, head_dim]`` (the head dim split into time, row and column
bands): inside a frame the time band rotates every token alike and cancels, and likewise the
row/column bands across time.

``use_kernels=True`` runs every attention and adaLN op through i2v_kernels; ``False`` through their
plain-PyTorch references. Both compute the same function of the same parameters.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import i2v_kernels
from i2v_kernels.nn import AdaLNModulate, CrossAttention, FactorizedAttention
from i2v_kernels.ops.adaln import reference as adaln_ref

from i2v_model.config import DiTConfig

__all__ = ["VideoDiT", "rope_3d", "timestep_features"]


def timestep_features(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of ``1000 t``: ``t [B] -> [B, dim]`` (cos then sin)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def rope_bands(head_dim: int) -> tuple[int, int, int]:
    """Split the head dim into (time, row, column) bands, each even."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def rope_3d(T: int, H: int, W: int, head_dim: int, theta: float = 10000.0,
            device: Optional[torch.device] = None) -> tuple[Tensor, Tensor]:
    """Interleaved 3D rotary table: ``(cos, sin)``, each ``[T, H * W, head_dim]`` (fp32)."""
    def angles(n: int, band: int) -> Tensor:
        freqs = theta ** (-torch.arange(0, band, 2, dtype=torch.float64, device=device) / band)
        return (torch.arange(n, dtype=torch.float64, device=device)[:, None] * freqs[None, :]).repeat_interleave(2, -1)

    bt, bh, bw = rope_bands(head_dim)
    a = torch.cat([
        angles(T, bt)[:, None, None, :].expand(T, H, W, bt),
        angles(H, bh)[None, :, None, :].expand(T, H, W, bh),
        angles(W, bw)[None, None, :, :].expand(T, H, W, bw),
    ], dim=-1).reshape(T, H * W, head_dim)
    return a.cos().float(), a.sin().float()


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Spatial -> temporal -> cross attention -> MLP, each modulated and gated (see module docstring)."""

    def __init__(self, cfg: DiTConfig, context_dim: int, use_kernels: bool):
        super().__init__()
        D, H = cfg.width, cfg.heads
        self.use_kernels = use_kernels
        self.norm = AdaLNModulate(D, use_kernels=use_kernels)
        self.spatial = FactorizedAttention(D, H, "spatial", qk_norm=cfg.qk_norm, use_kernels=use_kernels)
        self.temporal = FactorizedAttention(D, H, "temporal", qk_norm=cfg.qk_norm, use_kernels=use_kernels)
        self.cross = CrossAttention(D, context_dim, H, qk_norm=cfg.qk_norm, use_kernels=use_kernels)
        self.mlp = MLP(D, int(D * cfg.mlp_ratio))
        self.modulation = nn.Linear(D, 12 * D)

    def forward(self, x: Tensor, c: Tensor, rope: tuple[Tensor, Tensor], context: Tensor, kv_lens: Tensor) -> Tensor:
        """``x [B, T, S, D]``, ``c [B, D]`` (timestep + prompt embedding, already through SiLU)."""
        ops = i2v_kernels if self.use_kernels else adaln_ref
        B, D = c.shape
        # Twelve [B, 1, 1, D] views of one projection: strided, never copied.
        (sh1, sc1, g1, sh2, sc2, g2, sh3, sc3, g3, sh4, sc4, g4) = self.modulation(c).view(B, 1, 1, 12, D).unbind(3)
        h = self.norm(x, sh1, sc1)
        x, h = ops.gated_residual_adaln(x, self.spatial(h, rope), g1, sh2, sc2)
        x, h = ops.gated_residual_adaln(x, self.temporal(h, rope), g2, sh3, sc3)
        x, h = ops.gated_residual_adaln(x, self.cross(h, context, kv_lens), g3, sh4, sc4)
        return ops.gated_residual(x, self.mlp(h), g4)


class VideoDiT(nn.Module):
    """``forward(x, t, cond, context, kv_lens, pooled) -> v`` (shapes in the module docstring)."""

    def __init__(self, cfg: DiTConfig, latent_channels: int, context_dim: int, use_kernels: bool = True):
        super().__init__()
        self.cfg, self.latent_channels, self.use_kernels = cfg, latent_channels, use_kernels
        self.min_t = 1e-3  # velocity = (x - x0) / t: t floored (the sampler never asks at t = 0)
        D, p = cfg.width, cfg.patch
        in_channels = 2 * latent_channels + 1  # noisy latent, image latent, mask
        self.patch_embed = nn.Linear(in_channels * p * p, D)
        self.time_embed = nn.Sequential(nn.Linear(cfg.freq_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.text_embed = nn.Linear(context_dim, D)
        self.blocks = nn.ModuleList(DiTBlock(cfg, context_dim, use_kernels) for _ in range(cfg.depth))
        self.norm_out = AdaLNModulate(D, use_kernels=use_kernels)
        self.modulation_out = nn.Linear(D, 2 * D)
        self.proj_out = nn.Linear(D, latent_channels * p * p)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed[0].weight, std=0.02)
        nn.init.normal_(self.time_embed[2].weight, std=0.02)
        # adaLN-Zero: zero gates make every block the identity at initialization.
        for block in self.blocks:
            nn.init.zeros_(block.modulation.weight)
            nn.init.zeros_(block.modulation.bias)
        nn.init.zeros_(self.modulation_out.weight)
        nn.init.zeros_(self.modulation_out.bias)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def patchify(self, x: Tensor) -> Tensor:
        """``[B, C, T, h, w] -> [B, T, (h/p)(w/p), C p p]``."""
        B, C, T, h, w = x.shape
        p = self.cfg.patch
        x = x.view(B, C, T, h // p, p, w // p, p).permute(0, 2, 3, 5, 1, 4, 6)
        return x.reshape(B, T, (h // p) * (w // p), C * p * p)

    def unpatchify(self, x: Tensor, h: int, w: int) -> Tensor:
        """``[B, T, S, C p p] -> [B, C, T, h, w]``."""
        B, T, S, _ = x.shape
        p, C = self.cfg.patch, self.latent_channels
        x = x.view(B, T, h // p, w // p, C, p, p).permute(0, 4, 1, 2, 5, 3, 6)
        return x.reshape(B, C, T, h, w)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor, context: Tensor, kv_lens: Tensor,
                pooled: Tensor) -> Tensor:
        """The velocity ``v = (x_t - x0) / t`` of the predicted clean latent ``x0`` (:meth:`denoise`)."""
        x0 = self.denoise(x, t, cond, context, kv_lens, pooled)
        return (x - x0) / t.to(x.dtype).clamp_min(self.min_t).view(-1, 1, 1, 1, 1)

    def denoise(self, x: Tensor, t: Tensor, cond: Tensor, context: Tensor, kv_lens: Tensor,
                pooled: Tensor) -> Tensor:
        """The clean latent ``x0 [B, C, T, h, w]``, predicted as the image latent (``cond``'s first ``C``
        channels, the first frame on every frame) plus what the network adds: motion is a residual over
        a still shot, and an untrained or unsure network gives a still image, never noise."""
        B, C, T, h, w = x.shape
        p = self.cfg.patch
        if C != self.latent_channels or h % p or w % p:
            raise ValueError(f"VideoDiT: x must be [B, {self.latent_channels}, T, h, w] with h, w divisible by "
                             f"{p}, got {tuple(x.shape)}")
        if cond.shape != (B, C + 1, T, h, w):
            raise ValueError(f"VideoDiT: cond must be [B, {C + 1}, T, h, w] = {(B, C + 1, T, h, w)}, "
                             f"got {tuple(cond.shape)}")
        tokens = self.patch_embed(self.patchify(torch.cat([x, cond.to(x.dtype)], dim=1)))
        c = self.time_embed(timestep_features(t, self.cfg.freq_dim).to(x.dtype)) + self.text_embed(pooled)
        c = F.silu(c)
        rope = rope_3d(T, h // p, w // p, self.cfg.head_dim, self.cfg.rope_theta, device=x.device)
        for block in self.blocks:
            tokens = block(tokens, c, rope, context, kv_lens)
        shift, scale = self.modulation_out(c).view(B, 1, 1, 2, -1).unbind(3)
        out = self.proj_out(self.norm_out(tokens, shift, scale))
        return cond[:, :C].to(x.dtype) + self.unpatchify(out, h, w)
