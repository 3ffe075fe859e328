"""Evaluation: first-frame fidelity, motion adherence and VAE reconstruction on held-out images.

Global motion between the first and last frame of a clip ``[3, T, H, W]`` (values in [-1, 1]):

* translation: phase correlation (Hann-windowed, sub-pixel peak) -> content shift ``(dx, dy)`` in
  pixels, ``+x`` right and ``+y`` down (a camera panning right moves the content left: ``dx < 0``);
* scale: the zoom ``s`` about the centre that best maps the first frame onto the last (``s > 1``: the
  content grew, a zoom in);
* rotation: the angle that best maps the first frame onto the last (degrees, ``> 0`` clockwise).

Scale and angle are found by a dense search over warps of the first frame, scored on the central
region (borders leave the frame). :func:`estimate_motion` is that first-to-last measure; a textured
pattern that stays put while the content fades can fool it, so ``i2v eval`` scores videos with
:func:`score_video` instead:

* (a) first-frame PSNR against the input image;
* (b) motion by accumulation: a similarity (shift, zoom, turn) fitted between every pair of consecutive
  frames (:func:`fit_similarity`: Gauss-Newton image alignment on a pyramid, started from phase
  correlation) and composed over the clip; it must point the prompt's way (:func:`motion_matches`),
  and every pair must be tracked (the fitted motion explains the next frame, below). A static texture
  measures as no motion, and frames of fresh noise are not tracked;
* (c) cleanliness: each frame's high-frequency energy (what a 1-pixel Gaussian blur removes) over frame
  0's, at most :data:`HF_BOUND`: noise or latent-grid texture raises it;
* (d) temporal consistency: each frame against the previous one moved by the fitted motion (PSNR on the
  part of the frame both show, central 80%), at least :data:`CONSISTENCY_DB` on every pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CONSISTENCY_DB", "HF_BOUND", "TRACKED_DB", "DriftScore", "MotionEstimate", "VideoScore", "estimate_motion",
           "fit_similarity", "high_frequency_energy", "matrix_motion", "measure_drift", "motion_matches",
           "phase_correlation", "psnr", "score_video"]

HF_BOUND = 1.25        # (c): a later frame's high-frequency energy at most this times frame 0's
CONSISTENCY_DB = 28.0  # (d): every motion-compensated pair of consecutive frames at least this PSNR
TRACKED_DB = 20.0      # (b): below this, a pair's fitted motion does not explain the next frame


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


# ------------------------------------------------------------------------------------------------
# Frame-to-frame measurement (i2v eval)


def _blur(x: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of ``[N, C, H, W]`` (edges replicated)."""
    from i2v_model.render import soften

    return soften(x, sigma)


def _centred(n: int, dtype=torch.float64) -> Tensor:
    """Pixel centres of an ``n``-pixel axis measured from the axis centre, in pixels."""
    return torch.arange(n, dtype=dtype) + 0.5 - n / 2


def _sample(img: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    """``img [N, C, H, W]`` bilinearly at centred pixel coordinates ``X, Y [H, W]`` (edges extended)."""
    H, W = img.shape[-2:]
    grid = torch.stack([X / (W / 2), Y / (H / 2)], dim=-1)[None].to(img.dtype)
    return F.grid_sample(img, grid.expand(img.shape[0], -1, -1, -1), mode="bilinear", padding_mode="border",
                         align_corners=False)


def _similarity_matrix(alpha: float, beta: float, cx: float, cy: float) -> Tensor:
    return torch.tensor([[alpha, -beta, cx], [beta, alpha, cy], [0.0, 0.0, 1.0]], dtype=torch.float64)


def fit_similarity(a: Tensor, b: Tensor, iters: int = 12) -> Tensor:
    """The content motion from frame ``a`` to frame ``b`` (each ``[C, H, W]``): a 3x3 similarity ``S``
    in pixels about the frame centre (``y`` down), such that content at ``q`` in ``a`` is at ``S q`` in
    ``b``. Fitted by Gauss-Newton on ``b(p) ~ a(S^-1 p)`` over a 3-level pyramid (gray, lightly
    blurred), starting from the phase-correlation shift; pixels whose source leaves ``a`` are ignored.
    """
    ga = _gray(a)[None, None]
    gb = _gray(b)[None, None]
    H, W = ga.shape[-2:]
    dx, dy = phase_correlation(a, b)
    # Inverse map p -> alpha p + beta p_perp + c (a rotation-scale and a shift), in full-size pixels.
    alpha, beta, cx, cy = 1.0, 0.0, -dx, -dy
    for level in (4, 2, 1):
        if min(H, W) // level < 16:
            continue
        la = _blur(F.avg_pool2d(ga, level) if level > 1 else ga, 1.0)
        lb = _blur(F.avg_pool2d(gb, level) if level > 1 else gb, 1.0)
        h, w = la.shape[-2:]
        Y, X = torch.meshgrid(_centred(h), _centred(w), indexing="ij")
        gy, gx = torch.gradient(la[0, 0])
        grads = torch.stack([gx, gy])[None]
        for _ in range(iters):
            sx, sy = alpha * X - beta * Y + cx / level, beta * X + alpha * Y + cy / level
            warped = _sample(la, sx, sy)[0, 0]
            g = _sample(grads, sx, sy)[0]
            inside = ((sx.abs() < w / 2 - 1) & (sy.abs() < h / 2 - 1)).double()
            r = (warped - lb[0, 0]) * inside
            J = torch.stack([g[0] * X + g[1] * Y, -g[0] * Y + g[1] * X, g[0], g[1]], dim=-1) * inside[..., None]
            J, r = J.reshape(-1, 4), r.reshape(-1)
            JtJ = J.T @ J + 1e-6 * torch.eye(4, dtype=J.dtype) * (J.T @ J).diagonal().mean()
            step = torch.linalg.solve(JtJ, -(J.T @ r))
            alpha, beta = alpha + step[0].item(), beta + step[1].item()
            cx, cy = cx + step[2].item() * level, cy + step[3].item() * level
            if step.abs().max().item() < 1e-4:
                break
    return torch.linalg.inv(_similarity_matrix(alpha, beta, cx, cy))


def motion_of(S: Tensor) -> MotionEstimate:
    """A similarity (content motion, :func:`fit_similarity`) as shift, scale and clockwise angle."""
    return MotionEstimate(float(S[0, 2]), float(S[1, 2]), float(torch.linalg.det(S[:2, :2]).abs().sqrt()),
                          math.degrees(math.atan2(float(S[1, 0]), float(S[0, 0]))))


def compensated_psnr(a: Tensor, b: Tensor, S: Tensor, keep: float = 0.8) -> float:
    """PSNR of ``b`` against ``a`` moved by the content motion ``S`` (both ``[3, H, W]`` in [-1, 1]), on the
    central ``keep`` of the frame where the moved ``a`` has a source."""
    H, W = a.shape[-2:]
    Y, X = torch.meshgrid(_centred(H), _centred(W), indexing="ij")
    inv = torch.linalg.inv(S)
    sx = inv[0, 0] * X + inv[0, 1] * Y + inv[0, 2]
    sy = inv[1, 0] * X + inv[1, 1] * Y + inv[1, 2]
    moved = _sample(a[None].double(), sx, sy)[0]
    mask = (sx.abs() < W / 2 - 1) & (sy.abs() < H / 2 - 1) & (X.abs() < keep * W / 2) & (Y.abs() < keep * H / 2)
    if not mask.any():
        return float("nan")
    mse = (((moved - b.double()) / 2) ** 2)[:, mask].mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def high_frequency_energy(frame: Tensor) -> float:
    """Mean squared difference between the gray frame ``[3, H, W]`` and its 1-pixel Gaussian blur."""
    g = _gray(frame)[None, None]
    return float(((g - _blur(g, 1.0)) ** 2).mean())


@dataclass
class VideoScore:
    first_psnr: float          # (a) frame 0 against the input, dB
    motion: MotionEstimate     # (b) accumulated frame-to-frame content motion
    tracked: bool              # (b) every pair's fitted motion explains the next frame (>= TRACKED_DB)
    matches: bool              # (b) tracked and pointing the prompt's way
    hf_ratio: float            # (c) the largest later-frame high-frequency energy over frame 0's
    consistency: float         # (d) the worst motion-compensated PSNR of consecutive frames, dB
    consistency_mean: float    # (d) its mean over the pairs, dB

    @property
    def clean(self) -> bool:
        return self.hf_ratio <= HF_BOUND

    @property
    def consistent(self) -> bool:
        return self.consistency >= CONSISTENCY_DB


def analysis_size(video: Tensor, side: int = 128) -> Tensor:
    """``video [3, T, H, W]`` resized (anti-aliased) so its longer side is at most ``side``."""
    H, W = video.shape[-2:]
    if max(H, W) <= side:
        return video.float()
    h, w = max(16, round(H * side / max(H, W))), max(16, round(W * side / max(H, W)))
    x = F.interpolate(video.float().transpose(0, 1), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return x.transpose(0, 1)


def score_video(video: Tensor, image: Tensor, kind: str) -> VideoScore:
    """All four measures of ``video [3, T, H, W]`` made from ``image [3, H, W]`` with the prompt of
    motion ``kind`` (values in [-1, 1]). Motion and consistency are measured at most 128 pixels a side
    and reported in the video's own pixels."""
    if video.dim() != 4 or video.shape[0] != 3 or video.shape[1] < 2:
        raise ValueError(f"video must be [3, T >= 2, H, W], got {tuple(video.shape)}")
    if image.shape != video[:, 0].shape:
        raise ValueError(f"image must be [3, H, W] = {tuple(video[:, 0].shape)}, got {tuple(image.shape)}")
    small = analysis_size(video)
    factor = video.shape[-1] / small.shape[-1]
    total = torch.eye(3, dtype=torch.float64)
    pair_psnr = []
    for t in range(small.shape[1] - 1):
        S = fit_similarity(small[:, t], small[:, t + 1])
        pair_psnr.append(compensated_psnr(small[:, t], small[:, t + 1], S))
        total = S @ total
    m = motion_of(total)
    m = MotionEstimate(m.dx * factor, m.dy * factor, m.scale, m.angle)
    finite = [p for p in pair_psnr if math.isfinite(p) or p == float("inf")]
    tracked = len(finite) == len(pair_psnr) and min(finite) >= TRACKED_DB
    hf0 = high_frequency_energy(video[:, 0])
    hf = max(high_frequency_energy(video[:, t]) for t in range(1, video.shape[1])) / max(hf0, 1e-12)
    return VideoScore(first_psnr=psnr(video[:, 0], image), motion=m, tracked=tracked,
                      matches=tracked and motion_matches(kind, m, video.shape[-1]), hf_ratio=hf,
                      consistency=min(pair_psnr), consistency_mean=mean([min(p, 100.0) for p in pair_psnr]))


# ------------------------------------------------------------------------------------------------
# Long videos: drift in brightness and scale, and the seams between chunks


def matrix_motion(matrix: Tensor, height: int, width: int) -> MotionEstimate:
    """The content motion of a frame whose pixels sample the first frame at ``matrix [3, 3]`` (normalized
    coordinates, :func:`i2v_model.render.camera_matrix`), in pixels of a ``height x width`` frame: what
    the renderer was asked to show, in :func:`motion_of`'s terms."""
    D = torch.diag(torch.tensor([width / 2, height / 2, 1.0], dtype=torch.float64))
    return motion_of(torch.linalg.inv(D @ matrix.double().cpu() @ torch.linalg.inv(D)))


def _moved_mean(a: Tensor, b: Tensor, S: Tensor) -> tuple[float, float]:
    """Mean gray of ``b`` and of ``a`` moved by the content motion ``S``, over the pixels of ``b`` that
    show ``a``'s content (away from its edges); ``(nan, nan)`` when none do."""
    H, W = a.shape[-2:]
    Y, X = torch.meshgrid(_centred(H), _centred(W), indexing="ij")
    inv = torch.linalg.inv(S)
    sx = inv[0, 0] * X + inv[0, 1] * Y + inv[0, 2]
    sy = inv[1, 0] * X + inv[1, 1] * Y + inv[1, 2]
    mask = (sx.abs() < W / 2 - 2) & (sy.abs() < H / 2 - 2)
    if not mask.any():
        return float("nan"), float("nan")
    moved = _sample(_gray(a)[None, None], sx, sy)[0, 0]
    return float(_gray(b)[mask].mean()), float(moved[mask].mean())


@dataclass
class DriftScore:
    motion: MotionEstimate   # accumulated frame-to-frame content motion over the whole video (measured)
    brightness: float        # max |mean gray of frame t - of frame 0 moved onto it|, on what both show ([-1, 1] units)
    brightness_chunk: float  # the same against the frame ``chunk`` frames earlier (content the fill brought in too)
    seam_change: float       # the largest seam pair's mean |frame t+1 - frame t| over its 4 neighbouring pairs' mean
    seam_psnr: float         # the worst motion-compensated PSNR of a seam pair, dB
    other_psnr: float        # the worst motion-compensated PSNR of the other pairs, dB


def measure_drift(video: Tensor, chunk: int = 16) -> DriftScore:
    """Drift of a long ``video [3, T, H, W]`` made in chunks of ``chunk`` new frames (seams after frames
    ``chunk, 2 chunk, ...``), measured as :func:`score_video` measures motion (frame-to-frame fits,
    composed, at most 128 pixels a side): the accumulated motion, how the brightness of content that
    stays in view changes (against frame 0 and against one chunk earlier), and whether the pairs of
    frames across a seam change more than the pairs next to them (mean absolute difference) or match
    worse after motion compensation than the other pairs."""
    if video.dim() != 4 or video.shape[0] != 3 or video.shape[1] < chunk + 2:
        raise ValueError(f"video must be [3, T > chunk + 1, H, W], got {tuple(video.shape)} (chunk {chunk})")
    small = analysis_size(video)
    factor = video.shape[-1] / small.shape[-1]
    totals = [torch.eye(3, dtype=torch.float64)]
    pair_psnr, change = [], []
    for t in range(small.shape[1] - 1):
        S = fit_similarity(small[:, t], small[:, t + 1])
        pair_psnr.append(compensated_psnr(small[:, t], small[:, t + 1], S))
        change.append(float((small[:, t + 1] - small[:, t]).abs().mean()))
        totals.append(S @ totals[-1])
    worst = [0.0, 0.0]   # against frame 0, against one chunk earlier
    for t in range(1, small.shape[1]):
        for i, ref in enumerate((0, max(0, t - chunk))):
            shown, moved = _moved_mean(small[:, ref], small[:, t], totals[t] @ torch.linalg.inv(totals[ref]))
            if math.isfinite(shown):
                worst[i] = max(worst[i], abs(shown - moved))
    drift, drift_chunk = worst
    seams = list(range(chunk, len(change), chunk))     # pair t: frames t and t + 1

    def around(t: int) -> float:   # the pairs on either side (how much the frames change there anyway)
        near = [change[u] for u in (t - 2, t - 1, t + 1, t + 2) if 0 <= u < len(change)]
        return max(float(np.mean(near)), 1e-9)

    m = motion_of(totals[-1])
    return DriftScore(motion=MotionEstimate(m.dx * factor, m.dy * factor, m.scale, m.angle), brightness=drift,
                      brightness_chunk=drift_chunk,
                      seam_change=max(change[t] / around(t) for t in seams) if seams else 1.0,
                      seam_psnr=min(pair_psnr[t] for t in seams) if seams else float("inf"),
                      other_psnr=min(p for t, p in enumerate(pair_psnr) if t not in seams))
