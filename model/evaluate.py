"""Evaluation: first-frame fidelity, motion adherence and VAE reconstruction on held-out images.

Global motion between the first and last frame of a clip ``[3, T, H, W]`` (values in [-1, 1]):

* translation: phase correlation (Hann-windowed, sub-pixel peak) -> content shift ``(dx, dy)`` in
  pixels, ``+x`` right and ``+y`` down (a camera panning right moves the content left: ``dx < 0``);
* scale: the zoom ``s`` about the centre that best maps the first frame onto the last (``s > 1``: the
  content grew, a zoom in);
* rotation: the angle that best maps the first frame onto the last (degrees, ``> 0`` clockwise).

Scale and angle are found by a dense search over warps of the first frame, scored on the central
region (borders leave the frame).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MotionEstimate", "estimate_motion", "motion_matches", "phase_correlation", "psnr"]


def psnr(a: Tensor, b: Tensor) -> float:
    """PSNR in dB of two images/videos in [-1, 1] (peak = the [0, 1] range)."""
    mse = (((a.float() - b.float()) / 2) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def _gray(frame: Tensor) -> Tensor:
    return (0.299 * frame[0] + 0.587 * frame[1] + 0.114 * frame[2]).double()


def phase_correlation(a: Tensor, b: Tensor) -> tuple[float, float]:
    """Shift ``(dx, dy)`` in pixels that moves the content of ``a [3, H, W]`` onto ``b``."""
    ga, gb = _gray(a), _gray(b)
    H, W = ga.shape
    window = torch.outer(torch.hann_window(H, periodic=False, dtype=torch.float64),
                         torch.hann_window(W, periodic=False, dtype=torch.float64))
    Fa = torch.fft.fft2((ga - ga.mean()) * window)
    Fb = torch.fft.fft2((gb - gb.mean()) * window)
    cross = Fb * Fa.conj()
    r = torch.fft.ifft2(cross / (cross.abs() + 1e-9)).real
    peak = int(torch.argmax(r))
    py, px = divmod(peak, W)

    def refine(m1: float, c: float, p1: float) -> float:  # parabola through the peak and its neighbours
        d = m1 - 2 * c + p1
        return 0.0 if abs(d) < 1e-12 else 0.5 * (m1 - p1) / d

    dy = py + refine(r[(py - 1) % H, px].item(), r[py, px].item(), r[(py + 1) % H, px].item())
    dx = px + refine(r[py, (px - 1) % W].item(), r[py, px].item(), r[py, (px + 1) % W].item())
    dy = dy - H if dy > H / 2 else dy
    dx = dx - W if dx > W / 2 else dx
    return float(dx), float(dy)


def warp(frame: Tensor, scale: Tensor, angle_cw_deg: Tensor) -> Tensor:
    """``frame [3, H, W]`` with its content scaled by ``scale [N]`` and turned clockwise by ``angle [N]``
    about the centre: ``[N, 3, H, W]``."""
    a = torch.deg2rad(angle_cw_deg.float())
    # Output pixel u samples the input at R(-a) u / s (y down: positive angles turn clockwise).
    cos, sin = torch.cos(a) / scale, torch.sin(a) / scale
    zeros = torch.zeros_like(cos)
    affine = torch.stack([torch.stack([cos, sin, zeros], -1), torch.stack([-sin, cos, zeros], -1)], -2)
    N = affine.shape[0]
    grid = F.affine_grid(affine, [N, *frame.shape], align_corners=False)
    return F.grid_sample(frame[None].float().expand(N, -1, -1, -1), grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


def _best(first: Tensor, last: Tensor, scales: Tensor, angles: Tensor) -> tuple[float, float]:
    H, W = first.shape[-2:]
    m = H // 4
    warped = warp(first, scales, angles)[..., m:H - m, m:W - m]
    err = ((warped - last[None, :, m:H - m, m:W - m].float()) ** 2).mean(dim=(1, 2, 3))
    i = int(torch.argmin(err))
    return float(scales[i]), float(angles[i])


@dataclass
class MotionEstimate:
    dx: float       # content shift right, pixels (first -> last frame)
    dy: float       # content shift down, pixels
    scale: float    # content scale (> 1 grew)
    angle: float    # content rotation, degrees clockwise

    def __str__(self) -> str:
        return f"dx={self.dx:+.1f} dy={self.dy:+.1f} s={self.scale:.2f} rot={self.angle:+.1f}"


def estimate_motion(video: Tensor) -> MotionEstimate:
    """Global motion between the first and the last frame of ``video [3, T, H, W]``."""
    first, last = video[:, 0], video[:, -1]
    dx, dy = phase_correlation(first, last)
    scales = torch.exp(torch.linspace(-0.7, 0.7, 57))
    s, _ = _best(first, last, scales, torch.zeros_like(scales))
    angles = torch.linspace(-45, 45, 91)
    _, a = _best(first, last, torch.ones_like(angles), angles)
    return MotionEstimate(dx, dy, s, a)


def motion_matches(kind: str, m: MotionEstimate, size: int = 64) -> bool:
    """Whether the measured motion has the direction the prompt ``kind`` asks for."""
    px = 2.0 * size / 64        # a shift that counts as motion over the clip
    zoom, turn = 1.06, 3.0
    if kind == "pan_right":
        return m.dx < -px and abs(m.dx) > abs(m.dy)
    if kind == "pan_left":
        return m.dx > px and abs(m.dx) > abs(m.dy)
    if kind == "tilt_up":
        return m.dy > px and abs(m.dy) > abs(m.dx)
    if kind == "tilt_down":
        return m.dy < -px and abs(m.dy) > abs(m.dx)
    if kind == "zoom_in":
        return m.scale > zoom
    if kind == "zoom_out":
        return m.scale < 1 / zoom
    if kind == "rotate_cw":
        return m.angle > turn
    if kind == "rotate_ccw":
        return m.angle < -turn
    if kind == "static":
        return (abs(m.dx) < px and abs(m.dy) < px and 1 / zoom < m.scale < zoom and abs(m.angle) < turn)
    raise ValueError(f"no direction test for motion {kind!r}")


def to_numpy_table(rows: list[list[str]], header: list[str]) -> str:
    """A Markdown table."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([fmt(header), "| " + " | ".join("-" * w for w in widths) + " |"] + [fmt(r) for r in rows])


def mean(xs) -> float:
    xs = [x for x in xs if np.isfinite(x)]
    return float(np.mean(xs)) if xs else float("nan")
