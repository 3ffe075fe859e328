"""Full-resolution frames from generated motion: the input image warped by the DiT's flow.

The DiT runs at its own small resolution (64x64 for ``tiny``: an 8x8 latent) and predicts, besides the
clean latent, the flow that moves the first frame onto every later frame (:meth:`VideoDiT.predict_motion`:
a camera affine map per frame plus a per-pixel part). The renderer applies that flow to the *full*
resolution input image, so every frame is as sharp as the input:

* the latent-frame flow is interpolated linearly in time to every video frame (latent frame ``k`` is
  video frame ``4 k``, the VAE's causal layout);
* the camera part is evaluated exactly at full resolution (an affine map has no resolution), the
  per-pixel part is upsampled bilinearly; both are scaled from latent pixels to output pixels;
* each frame samples the source image once (bicubic) at the accumulated position, so no blur builds up
  from frame to frame, and chunks of a long video compose their maps (:func:`compose`) instead of
  resampling rendered frames;
* where that position falls outside the source (content brought into view by a pan, a zoom out or a
  turn), the VAE-decoded frame of the sampled latent, upsampled, fills in, blended over a few pixels.

Grids are ``[F, H, W, 2]`` in ``grid_sample``'s normalized units (``align_corners=False``, ``x`` first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from i2v_model.dit import affine_flow, pixel_centres

__all__ = ["compose", "coverage", "frame_motion", "identity_grid", "render", "resize", "soften", "source_grid"]


def resize(images: Tensor, height: int, width: int) -> Tensor:
    """``[..., 3, H, W] -> [..., 3, height, width]``: anti-aliased bilinear down, bicubic up (clamped to [-1, 1])."""
    lead = images.shape[:-3]
    x = images.reshape(-1, *images.shape[-3:])
    if tuple(x.shape[-2:]) != (height, width):
        down = height <= x.shape[-2] and width <= x.shape[-1]
        x = F.interpolate(x, size=(height, width), mode="bilinear" if down else "bicubic", antialias=down,
                          align_corners=False).clamp(-1, 1)
    return x.reshape(*lead, *x.shape[-3:])


def soften(images: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of ``[N, C, H, W]`` with std ``sigma`` pixels (edges replicated); ``sigma <= 0``: unchanged."""
    if sigma <= 0:
        return images
    r = max(1, int(3 * sigma))
    x = torch.arange(-r, r + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    C = images.shape[1]
    out = F.pad(images, (r, r, r, r), mode="replicate")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def frame_motion(flow: Tensor, camera: Tensor, frames: int, temporal_factor: int) -> tuple[Tensor, Tensor]:
    """Per-video-frame motion from per-latent-frame motion.

    ``flow [2, T, h, w]`` (the per-pixel part, latent pixels) and ``camera [T, 6]`` (:func:`affine_flow`
    parameters, latent pixels) for latent frames ``0 .. T-1`` -> ``([frames, 2, h, w], [frames, 6])``,
    linear in time between latent frame ``k`` (video frame ``temporal_factor * k``) and ``k + 1``.
    """
    T = flow.shape[1]
    if camera.shape != (T, 6) or flow.dim() != 4 or flow.shape[0] != 2:
        raise ValueError(f"flow must be [2, T, h, w] and camera [T, 6], got {tuple(flow.shape)}, {tuple(camera.shape)}")
    if frames > 1 + (T - 1) * temporal_factor:
        raise ValueError(f"frames: {frames} frames need {1 + (frames - 2) // temporal_factor + 1} latent frames, "
                         f"got {T}")
    pos = torch.arange(frames, dtype=torch.float64) / temporal_factor
    lo = pos.floor().long().clamp(max=T - 1)
    hi = (lo + 1).clamp(max=T - 1)
    w = (pos - lo).to(flow.dtype)
    f = flow.transpose(0, 1)
    per_flow = f[lo] * (1 - w.view(-1, 1, 1, 1)) + f[hi] * w.view(-1, 1, 1, 1)
    per_camera = camera[lo] * (1 - w.view(-1, 1)) + camera[hi] * w.view(-1, 1)
    return per_flow, per_camera


def identity_grid(height: int, width: int, like: Tensor) -> Tensor:
    """The grid that samples every pixel at its own centre: ``[1, height, width, 2]``."""
    ys, xs = pixel_centres(height, like), pixel_centres(width, like)
    return torch.stack([xs.view(1, width).expand(height, width), ys.view(height, 1).expand(height, width)], -1)[None]


def source_grid(flow: Tensor, camera: Tensor, height: int, width: int) -> Tensor:
    """Where each output pixel samples the first frame: ``[F, height, width, 2]`` (normalized).

    ``flow [F, 2, h, w]`` and ``camera [F, 6]`` in latent pixels (of an ``h x w`` latent): the camera
    part is scaled to output pixels and evaluated exactly at ``height x width``; the per-pixel part is
    upsampled bilinearly. A flow ``(dx, dy)`` at a pixel means it shows the content found ``(dx, dy)``
    away from it in the first frame (:func:`i2v_model.dit.warp`'s convention).
    """
    Fr, _, h, w = flow.shape
    sx, sy = width / w, height / h
    scale = camera.new_tensor([sx, sx, sx, sy, sy, sy])
    pixels = affine_flow((camera * scale)[None], height, width)[0].transpose(0, 1)     # [F, 2, H, W]
    local = F.interpolate(flow, size=(height, width), mode="bilinear", align_corners=False)
    pixels = pixels + local * flow.new_tensor([sx, sy]).view(1, 2, 1, 1)
    norm = pixels * flow.new_tensor([2.0 / width, 2.0 / height]).view(1, 2, 1, 1)
    return identity_grid(height, width, flow) + norm.permute(0, 2, 3, 1)


def compose(outer: Tensor, inner: Tensor) -> Tensor:
    """The grid of "first sample through ``inner``, then through ``outer``": ``outer [H, W, 2]`` maps
    a frame's pixels to the source, ``inner [F, H, W, 2]`` maps each new frame's pixels to that frame;
    the result maps the new frames' pixels to the source (``outer``'s displacement sampled bilinearly
    at ``inner``'s points, held constant past the border)."""
    H, W, _ = outer.shape
    shift = (outer[None] - identity_grid(H, W, outer)).permute(0, 3, 1, 2)              # [1, 2, H, W]
    moved = F.grid_sample(shift.expand(inner.shape[0], -1, -1, -1), inner, mode="bilinear", padding_mode="border",
                          align_corners=False)
    return inner + moved.permute(0, 2, 3, 1)


def coverage(grid: Tensor, height: int, width: int, feather: float = 3.0) -> Tensor:
    """``[F, 1, H, W]`` in [0, 1]: 1 where the grid samples inside the source image (``height x width``),
    falling to 0 over ``feather`` pixels past its edge (the image's edge pixels extended meanwhile)."""
    inside_x = (1 - grid[..., 0].abs()) * (width / 2)    # pixels from the edge (0.5 at the edge pixel's centre)
    inside_y = (1 - grid[..., 1].abs()) * (height / 2)
    inside = torch.minimum(inside_x, inside_y)
    return (1 + (inside - 0.5) / feather).clamp(0, 1)[:, None]


def render(image: Tensor, grid: Tensor, fill: Tensor, feather: float = 3.0, fill_sigma: float = 1.5) -> Tensor:
    """Frames ``[3, F, H, W]``: ``image [3, H', W']`` (the source, any size) sampled bicubically at
    ``grid [F, H, W, 2]``, and ``fill [3, F, h, w]`` (the model's own frames, any size, blurred by
    ``fill_sigma`` of their own pixels and upsampled) where the grid leaves the source
    (:func:`coverage`). Values clamped to [-1, 1].

    The blur: the tiny model's decoded frames carry latent-grid speckle; where they only continue the
    picture past its edge, their colours matter and their texture would be noise."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W], got {tuple(image.shape)}")
    if grid.dim() != 4 or grid.shape[-1] != 2:
        raise ValueError(f"grid must be [F, H, W, 2], got {tuple(grid.shape)}")
    Fr, H, W, _ = grid.shape
    if fill.dim() != 4 or fill.shape[0] != 3 or fill.shape[1] != Fr:
        raise ValueError(f"fill must be [3, {Fr}, h, w], got {tuple(fill.shape)}")
    src = image[None].to(grid.dtype).expand(Fr, -1, -1, -1)
    warped = F.grid_sample(src, grid, mode="bicubic", padding_mode="border", align_corners=False).clamp(-1, 1)
    alpha = coverage(grid, image.shape[-2], image.shape[-1], feather)
    filled = resize(soften(fill.transpose(0, 1).to(grid.dtype), fill_sigma), H, W)
    return (alpha * warped + (1 - alpha) * filled).transpose(0, 1)
