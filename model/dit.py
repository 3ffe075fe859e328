"""Factorized video DiT for image-to-video flow matching.

Input: the noisy latent ``x [B, C, T, h, w]``, the conditioning ``cond [B, C + 1, T, h, w]`` (the
first-frame latent repeated on every frame, then a mask channel that is 1 on frame 0: image latent
concatenated along channels as in CogVideoX-I2V, see :func:`i2v_model.sampler.image_condition`), the flow time ``t [B]`` in
``[0, 1]`` and the prompt tokens ``context [B, L, C_text]`` (first ``kv_lens[b]`` valid) with their
pooled vector ``pooled [B, C_text]``. Output: the velocity ``v [B, C, T, h, w]`` of the
predicted clean latent (:meth:`VideoDiT.denoise`: the first frame moved by a predicted flow, plus a
preconditioned correction).

Tokens are ``[B, T, S, D]`` with ``S = (h / p) (w / p)`` (``p x p`` spatial patches), plus a learned
projection of sin-cos features of their absolute position (frame, row, column). Each block::

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

__all__ = ["VideoDiT", "affine_flow", "rope_3d", "sinusoids", "timestep_features", "warp"]


def sinusoids(pos: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of positions ``pos [N] -> [N, dim]`` (cos then sin, periods 2 pi .. max_period)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=pos.device) / half)
    angles = pos.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def timestep_features(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal features of ``1000 t``: ``t [B] -> [B, dim]``."""
    return sinusoids(1000.0 * t.float(), dim)


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

    def forward(self, x: Tensor, c: Tensor, rope: tuple[Tensor, Tensor], context: Tensor, kv_lens: Tensor,
                sp=None) -> Tensor:
        """``x [B, T, S, D]``, ``c [B, D]`` (timestep + prompt embedding, already through SiLU); ``sp``: a
        sequence-parallel call (:mod:`i2v_model.parallel`: ``x`` holds this rank's frames)."""
        ops = i2v_kernels if self.use_kernels else adaln_ref
        B, D = c.shape
        # Twelve [B, 1, 1, D] views of one projection: strided, never copied.
        (sh1, sc1, g1, sh2, sc2, g2, sh3, sc3, g3, sh4, sc4, g4) = self.modulation(c).view(B, 1, 1, 12, D).unbind(3)
        h = self.norm(x, sh1, sc1)
        x, h = ops.gated_residual_adaln(x, self.spatial(h, rope), g1, sh2, sc2)
        temporal = self.temporal(h, rope) if sp is None else sp.temporal(self.temporal, h)
        x, h = ops.gated_residual_adaln(x, temporal, g2, sh3, sc3)
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
        # Absolute position (frame index, row and column from the centre; as Latte's and DiT's fixed
        # sin-cos embeddings, here through a learned projection): attention sees only relative
        # positions (and inside a frame none in time), yet a pan moves frame k's content k times as far
        # and a zoom moves each point in proportion to its distance from the centre.
        self.pos_embed = nn.Linear(3 * cfg.freq_dim, D)
        self.time_embed = nn.Sequential(nn.Linear(cfg.freq_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.text_embed = nn.Linear(context_dim, D)
        self.blocks = nn.ModuleList(DiTBlock(cfg, context_dim, use_kernels) for _ in range(cfg.depth))
        self.norm_out = AdaLNModulate(D, use_kernels=use_kernels)
        self.modulation_out = nn.Linear(D, 2 * D)
        self.proj_out = nn.Linear(D, (latent_channels + 2) * p * p)  # the denoiser output and a 2-D flow
        # The camera's part of the flow step of each frame: one affine map per frame (pans, zooms and
        # rotations are exactly that), from the frame's mean token; see affine_flow.
        self.motion_out = nn.Linear(D, 6)
        self.reset_parameters()
        self.sequence_parallel = None  # i2v_model.parallel.enable(): the blocks run on this rank's frames

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed[0].weight, std=0.02)
        nn.init.normal_(self.time_embed[2].weight, std=0.02)
        nn.init.normal_(self.pos_embed.weight, std=0.02)
        # adaLN-Zero: zero gates make every block the identity at initialization.
        for block in self.blocks:
            nn.init.zeros_(block.modulation.weight)
            nn.init.zeros_(block.modulation.bias)
        nn.init.zeros_(self.modulation_out.weight)
        nn.init.zeros_(self.modulation_out.bias)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        nn.init.zeros_(self.motion_out.weight)
        nn.init.zeros_(self.motion_out.bias)

    def patchify(self, x: Tensor) -> Tensor:
        """``[B, C, T, h, w] -> [B, T, (h/p)(w/p), C p p]``."""
        B, C, T, h, w = x.shape
        p = self.cfg.patch
        x = x.view(B, C, T, h // p, p, w // p, p).permute(0, 2, 3, 5, 1, 4, 6)
        return x.reshape(B, T, (h // p) * (w // p), C * p * p)

    def unpatchify(self, x: Tensor, h: int, w: int) -> Tensor:
        """``[B, T, S, C p p] -> [B, C, T, h, w]``."""
        B, T, S, _ = x.shape
        p = self.cfg.patch
        C = x.shape[-1] // (p * p)
        x = x.view(B, T, h // p, w // p, C, p, p).permute(0, 4, 1, 2, 5, 3, 6)
        return x.reshape(B, C, T, h, w)

    def position_features(self, T: int, H: int, W: int, device=None) -> Tensor:
        """Sinusoids of each token's frame index and of its row and column from the frame's centre:
        ``[T, H W, 3 freq_dim]`` (token grid ``T x H x W``)."""
        f = self.cfg.freq_dim
        t = sinusoids(torch.arange(T, device=device, dtype=torch.float32), f)
        r = sinusoids(torch.arange(H, device=device, dtype=torch.float32) - (H - 1) / 2, f)
        c = sinusoids(torch.arange(W, device=device, dtype=torch.float32) - (W - 1) / 2, f)
        return torch.cat([t[:, None, None].expand(T, H, W, f), r[None, :, None].expand(T, H, W, f),
                          c[None, None, :].expand(T, H, W, f)], dim=-1).reshape(T, H * W, 3 * f)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor, context: Tensor, kv_lens: Tensor,
                pooled: Tensor) -> Tensor:
        """The velocity ``v = (x_t - x0) / t`` of the predicted clean latent ``x0`` (:meth:`denoise`)."""
        x0 = self.denoise(x, t, cond, context, kv_lens, pooled)
        return (x - x0) / t.to(x.dtype).clamp_min(self.min_t).view(-1, 1, 1, 1, 1)

    def preconditioning(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(c_skip, c_out)``, each ``[B, 1, 1, 1, 1]``, of :meth:`denoise` at flow times ``t [B]``.

        With the clean latent ``x0 = z + d`` (``z`` the first frame's latent moved by the predicted
        flow, ``d`` the residual, std at most ``s = sigma_motion``) and ``x_t = (1 - t) x0 + t noise``, the best linear guess of ``d`` from
        ``x_t - (1 - t) z = (1 - t) d + t noise`` is ``c_skip (x_t - (1 - t) z)`` with
        ``c_skip = (1 - t) s^2 / ((1 - t)^2 s^2 + t^2)``, and its error has std
        ``c_out = s t / sqrt((1 - t)^2 s^2 + t^2)`` (EDM's preconditioning, Karras et al. 2022, around
        the first frame). The network predicts that error in units of ``c_out``: at low noise the skip
        is nearly exact (``x0 ~ x_t``), at high noise the network supplies the motion.
        """
        s2 = self.cfg.sigma_motion ** 2
        t = t.float().view(-1, 1, 1, 1, 1)
        a = 1 - t
        denom = a * a * s2 + t * t
        return a * s2 / denom, self.cfg.sigma_motion * t / denom.sqrt()

    def denoise(self, x: Tensor, t: Tensor, cond: Tensor, context: Tensor, kv_lens: Tensor,
                pooled: Tensor) -> Tensor:
        """The clean latent ``x0`` of :meth:`predict`."""
        return self.predict(x, t, cond, context, kv_lens, pooled)[0]

    def predict(self, x: Tensor, t: Tensor, cond: Tensor, context: Tensor, kv_lens: Tensor,
                pooled: Tensor) -> tuple[Tensor, Tensor]:
        """``(x0, camera)`` of :meth:`predict_motion` (see there)."""
        x0, _, camera = self.predict_motion(x, t, cond, context, kv_lens, pooled)
        return x0, camera

    def predict_motion(self, x: Tensor, t: Tensor, cond: Tensor, context: Tensor, kv_lens: Tensor,
                       pooled: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(x0, flow, camera)``. The clean latent ``x0 [B, C, T, h, w]``: the first frame's latent
        (``cond``'s first ``C`` channels) moved by a predicted flow (:func:`warp`), plus the
        preconditioned skip from ``x_t`` and the network's correction scaled by ``c_out``
        (:meth:`preconditioning`).

        The network's output has ``C + 2`` channels per latent pixel: the correction, and a flow step
        ``(dx, dy)`` in latent pixels from each frame to the next (their running sum is the flow from
        the first frame), to which a global affine step per frame is added (``motion_out`` of the
        frame's mean token, :func:`affine_flow`): a zoom or a rotation moves each pixel in proportion to
        its distance from the centre, one number for the whole frame here rather than a field that
        every token must derive from its position. ``camera [B, T, 6]`` is that affine part of each
        frame's flow from the first (zero on frame 0; latent pixels, :func:`affine_flow`'s parameters),
        which training can also supervise when the camera's path is known. ``flow [B, 2, T, h, w]`` is
        the whole flow from the first frame (latent pixels, the per-pixel part plus the camera's) by which
        ``x0`` moves the first frame: what :mod:`i2v_model.render` applies to the full-resolution image.

        Camera motion and moving objects are flows of the first frame, so motion is a smooth field to
        regress, not a pattern to paint; the correction adds what the flow cannot show (content
        entering the frame, blur). An untrained or unsure network gives a still image at high noise and
        the input itself at low noise, never noise.
        """
        B, C, T, h, w = x.shape
        p = self.cfg.patch
        if C != self.latent_channels or h % p or w % p:
            raise ValueError(f"VideoDiT: x must be [B, {self.latent_channels}, T, h, w] with h, w divisible by "
                             f"{p}, got {tuple(x.shape)}")
        if cond.shape != (B, C + 1, T, h, w):
            raise ValueError(f"VideoDiT: cond must be [B, {C + 1}, T, h, w] = {(B, C + 1, T, h, w)}, "
                             f"got {tuple(cond.shape)}")
        if t.shape != (B,):
            raise ValueError(f"VideoDiT: t must be [B] = [{B}], got {tuple(t.shape)}")
        tokens = self.patch_embed(self.patchify(torch.cat([x, cond.to(x.dtype)], dim=1)))
        pos = self.position_features(T, h // p, w // p, device=x.device).to(x.dtype)
        tokens = tokens + self.pos_embed(pos)[None]
        c = self.time_embed(timestep_features(t, self.cfg.freq_dim).to(x.dtype)) + self.text_embed(pooled)
        c = F.silu(c)
        rope = rope_3d(T, h // p, w // p, self.cfg.head_dim, self.cfg.rope_theta, device=x.device)
        sp = None if self.sequence_parallel is None else self.sequence_parallel.begin(tokens, rope)
        if sp is not None:
            tokens, rope = sp.tokens, sp.rope
        for block in self.blocks:
            tokens = block(tokens, c, rope, context, kv_lens, sp)
        if sp is not None:
            tokens = sp.end(tokens)
        shift, scale = self.modulation_out(c).view(B, 1, 1, 2, -1).unbind(3)
        tokens = self.norm_out(tokens, shift, scale)
        out = self.unpatchify(self.proj_out(tokens), h, w)
        # The flow of frame k is the sum of the per-frame steps of frames 1..k: a steady motion is one
        # step repeated, so the far frames' large shifts follow from the near frames' small ones (a
        # bilinear warp's gradient only reaches about a pixel; frame 0 is the image and never moves).
        # Each step is a global affine map (the camera) plus a per-pixel residual (moving objects).
        camera_steps = self.motion_out(tokens[:, 1:].mean(dim=2))                       # [B, T - 1, 6]
        camera = torch.cat([camera_steps.new_zeros(B, 1, 6), camera_steps.cumsum(dim=1)], dim=1)
        flow = torch.cat([torch.zeros_like(out[:, C:, :1]), out[:, C:, 1:].cumsum(dim=2)], dim=2)
        flow = flow + affine_flow(camera, h, w)
        moved = warp(cond[:, :C].to(x.dtype), flow)
        c_skip, c_out = (k.to(x.dtype) for k in self.preconditioning(t))
        x0 = moved + c_skip * (x - (1 - t.to(x.dtype).view(-1, 1, 1, 1, 1)) * moved) + c_out * out[:, :C]
        return x0, flow, camera


def pixel_centres(n: int, like: Tensor) -> Tensor:
    """The centres of an ``n``-pixel axis in ``grid_sample``'s normalized units (``align_corners=False``):
    ``(2 i + 1) / n - 1``, i.e. the offset from the axis centre in half-lengths; ``like``'s device and dtype."""
    return (2 * torch.arange(n, device=like.device, dtype=like.dtype) + 1) / n - 1


def affine_flow(params: Tensor, h: int, w: int) -> Tensor:
    """Flow fields ``[B, 2, T, h, w]`` (pixels) of affine maps ``params [B, T, 6]``: at pixel ``(x, y)``,
    with ``(u, v)`` its offset from the frame's centre in half-widths/half-heights (-1 .. 1),
    ``dx = a0 u + a1 v + a2`` and ``dy = a3 u + a4 v + a5``.

    A pan is ``(a2, a5)``; a zoom in (content growing about the centre) is ``a0 = a4 < 0``; a clockwise
    turn of the content (y down) is ``a1 = -a3 > 0``: parameters a camera motion shares by every pixel.
    """
    B, T, _ = params.shape
    v = pixel_centres(h, params).view(1, 1, h, 1)
    u = pixel_centres(w, params).view(1, 1, 1, w)
    a = params.view(B, T, 6, 1, 1).unbind(2)
    return torch.stack([a[0] * u + a[1] * v + a[2], a[3] * u + a[4] * v + a[5]], dim=1)


def warp(z: Tensor, flow: Tensor) -> Tensor:
    """``z [B, C, T, h, w]`` resampled at ``(x + dx, y + dy)`` for ``flow [B, 2, T, h, w]`` in pixels
    (bilinear, borders extended): each output pixel takes the content found ``flow`` away from it."""
    B, C, T, h, w = z.shape
    ys, xs = pixel_centres(h, z), pixel_centres(w, z)
    gx = xs.view(1, 1, 1, w) + flow[:, 0] * (2.0 / w)
    gy = ys.view(1, 1, h, 1) + flow[:, 1] * (2.0 / h)
    grid = torch.stack([gx, gy], dim=-1).reshape(B * T, h, w, 2)
    frames = z.transpose(1, 2).reshape(B * T, C, h, w)
    out = F.grid_sample(frames, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.view(B, T, C, h, w).transpose(1, 2)
