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
  from frame to frame, and chunks of a long video compose their maps (:func:`compose`: the camera's
  affine maps exactly, as 3x3 matrices, :func:`camera_matrix`) instead of resampling rendered frames;
* where that position falls outside the source (content brought into view by a pan, a zoom out or a
  turn), the VAE-decoded frame of the sampled latent, blurred and upsampled, fills in, blended over a
  few pixels. Its colours are first matched to what the frame already shows (:func:`colour_offset`:
  the decoder's colour error, smoothed, is taken off), and with a :class:`FillCanvas` what it fills in is
  painted once into a canvas around the source, in the source's coordinates: later frames (and later
  chunks) sample that canvas like the source, so ground that came into view moves with the camera and
  keeps its colour instead of being made again, blurrier, by every frame.

Grids are ``[F, H, W, 2]`` in ``grid_sample``'s normalized units (``align_corners=False``, ``x`` first).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from i2v_model.dit import affine_flow, pixel_centres

__all__ = ["FillCanvas", "camera_matrix", "colour_offset", "compose", "coverage", "frame_motion", "identity_grid",
           "matrix_grid", "render", "resize", "soften", "source_grid"]


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


def camera_matrix(camera: Tensor, h: int, w: int) -> Tensor:
    """The camera maps ``camera [F, 6]`` (:func:`affine_flow` parameters in pixels of an ``h x w`` latent)
    as ``[F, 3, 3]`` float64 matrices on normalized coordinates: a frame's pixel at ``(x, y, 1)`` samples
    the first frame at ``matrix @ (x, y, 1)``, which is :func:`source_grid`'s camera part at any size."""
    if camera.dim() != 2 or camera.shape[1] != 6:
        raise ValueError(f"camera must be [F, 6], got {tuple(camera.shape)}")
    a = camera.double()
    m = torch.zeros(a.shape[0], 3, 3, dtype=torch.float64, device=camera.device)
    m[:, 0] = torch.stack([1 + 2 * a[:, 0] / w, 2 * a[:, 1] / w, 2 * a[:, 2] / w], dim=-1)
    m[:, 1] = torch.stack([2 * a[:, 3] / h, 1 + 2 * a[:, 4] / h, 2 * a[:, 5] / h], dim=-1)
    m[:, 2, 2] = 1.0
    return m


def _apply(matrix: Tensor, points: Tensor) -> Tensor:
    """``matrix [F, 3, 3]`` applied to grid points ``[F, H, W, 2]`` (or one ``[3, 3]`` to all of them)."""
    m = matrix.to(points.dtype)
    m = m.view(-1, 1, 1, 3, 3) if m.dim() == 3 else m.view(1, 1, 1, 3, 3)
    return (m[..., :2, :2] @ points[..., None])[..., 0] + m[..., :2, 2]


def matrix_grid(matrix: Tensor, height: int, width: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The grids ``[F, height, width, 2]`` of affine maps ``matrix [F, 3, 3]`` (:func:`camera_matrix`)."""
    return _apply(matrix, identity_grid(height, width, torch.empty(0, dtype=dtype, device=matrix.device)))


def compose(outer: Tensor, inner: Tensor, residual: Optional[Tensor] = None) -> Tensor:
    """The grids of "first through ``inner``, then through the motion so far": ``inner [F, H, W, 2]``
    maps each new frame's pixels to the chunk's first frame; the motion so far maps that frame's pixels
    to the source by the affine ``outer [3, 3]`` (:func:`camera_matrix`, exact everywhere, also past the
    frame's edge) plus ``residual [H, W, 2]`` when given (a per-pixel part, sampled bilinearly at
    ``inner``'s points and held constant past the border)."""
    out = _apply(outer, inner)
    if residual is not None:
        shift = residual.permute(2, 0, 1)[None].expand(inner.shape[0], -1, -1, -1).to(inner.dtype)
        out = out + F.grid_sample(shift, inner, mode="bilinear", padding_mode="border",
                                  align_corners=False).permute(0, 2, 3, 1)
    return out


def coverage(grid: Tensor, height: int, width: int, feather: float = 3.0) -> Tensor:
    """``[F, 1, H, W]`` in [0, 1]: 1 where the grid samples inside the source image (``height x width``),
    falling to 0 over ``feather`` pixels past its edge (the image's edge pixels extended meanwhile)."""
    inside_x = (1 - grid[..., 0].abs()) * (width / 2)    # pixels from the edge (0.5 at the edge pixel's centre)
    inside_y = (1 - grid[..., 1].abs()) * (height / 2)
    inside = torch.minimum(inside_x, inside_y)
    return (1 + (inside - 0.5) / feather).clamp(0, 1)[:, None]


def colour_offset(fill: Tensor, shown: Tensor, weight: Tensor, sigma: float) -> Tensor:
    """What to add to ``fill [N, 3, h, w]`` so that its colours agree with ``shown`` (same shape) where
    ``weight [N, 1, h, w]`` (0 .. 1) says the frame already shows content: the difference
    ``shown - fill`` averaged by a Gaussian of ``sigma`` pixels over the weighted pixels (normalized
    convolution), falling back to its weighted mean over the whole frame far from any of them.

    The tiny VAE's decoded colours are off by a smooth error that changes from latent to latent; left
    in, it shows as a seam at the source's edge and, chunk after chunk, as a drift in brightness."""
    diff = (shown - fill) * weight
    total = weight.sum(dim=(2, 3), keepdim=True)
    mean = diff.sum(dim=(2, 3), keepdim=True) / total.clamp_min(1e-6)
    prior = 0.05   # weight of the frame-wide mean, so the local average never divides by almost nothing
    return (soften(diff, sigma) + prior * mean) / (soften(weight, sigma) + prior)


class FillCanvas:
    """What a video has shown beyond its source image's edges, kept in the source's normalized
    coordinates (the source spans ``[-1, 1]`` on both axes, the canvas ``[-extent, extent]``).

    Pixels are painted once, from the (colour-matched, blurred) fill of the first frame that shows
    them, at ``density`` canvas pixels per fill pixel; later frames sample the canvas where they show
    ground outside the source, so it moves with the camera and stays as it was first shown. Beyond
    ``extent`` (a long zoom out) nothing is kept and the frame's own fill shows."""

    def __init__(self, fill_height: int, fill_width: int, extent: float = 4.0, density: int = 2,
                 device: Optional[torch.device] = None):
        if extent < 1:
            raise ValueError(f"extent must be >= 1, got {extent}")
        self.extent = float(extent)
        H, W = round(density * fill_height * extent), round(density * fill_width * extent)
        self.pixels = torch.zeros(4, H, W, device=device)     # RGB and "painted" (0 / 1)
        ys, xs = pixel_centres(H, self.pixels) * extent, pixel_centres(W, self.pixels) * extent
        self._points = torch.stack([xs.view(1, W).expand(H, W), ys.view(H, 1).expand(H, W)], -1).double()

    @property
    def painted(self) -> Tensor:
        """``[H, W]`` bool: the canvas pixels painted so far."""
        return self.pixels[3] > 0

    def sample(self, grid: Tensor) -> tuple[Tensor, Tensor]:
        """``(rgb [F, 3, H, W], painted [F, 1, H, W])`` at the source positions ``grid [F, H, W, 2]``
        (bilinear; ``painted`` is the fraction of painted canvas pixels that went into each value)."""
        src = self.pixels[None].to(grid.dtype).expand(grid.shape[0], -1, -1, -1)
        out = F.grid_sample(src, grid / self.extent, mode="bilinear", padding_mode="zeros", align_corners=False)
        known = out[:, 3:]
        return out[:, :3] / known.clamp_min(1e-6), known

    def paint(self, matrix: Tensor, fill: Tensor) -> int:
        """Paint the unpainted canvas pixels that a frame shows: ``matrix [3, 3]`` maps the frame's
        normalized coordinates to the source's (:func:`camera_matrix`, composed), ``fill [3, h, w]`` is
        the frame's fill. Returns how many pixels were painted."""
        h, w = fill.shape[-2:]
        mx, my = 1 + 2.0 / w, 1 + 2.0 / h          # a fill pixel past the frame's edge (border values)
        # Only the canvas rows and columns under the frame's footprint (its corners' bounding box).
        m = matrix.double().cpu()
        corners = torch.tensor([[-mx, -my, 1.0], [mx, -my, 1.0], [-mx, my, 1.0], [mx, my, 1.0]], dtype=torch.float64)
        xy = (corners @ m.T)[:, :2] / self.extent                         # canvas normalized coordinates
        Hc, Wc = self.painted.shape
        size = torch.tensor([Wc / 2, Hc / 2], dtype=torch.float64)
        lo = ((xy.min(dim=0).values + 1) * size).floor().clamp_min(0)
        hi = ((xy.max(dim=0).values + 1) * size).ceil()
        (x0, y0), (x1, y1) = lo.long().tolist(), (min(int(hi[0]), Wc), min(int(hi[1]), Hc))
        if x0 >= x1 or y0 >= y1:
            return 0
        box = self.pixels[:, y0:y1, x0:x1]
        q = _apply(torch.linalg.inv(m).to(self._points.device), self._points[y0:y1, x0:x1])[0]   # -> the frame
        inside = (q[..., 0].abs() <= mx) & (q[..., 1].abs() <= my) & (box[3] == 0)
        if not inside.any():
            return 0
        values = F.grid_sample(fill[None].to(self.pixels.dtype), q[None].to(self.pixels.dtype), mode="bilinear",
                               padding_mode="border", align_corners=False)[0]
        box[:3] = torch.where(inside, values, box[:3])
        box[3] = torch.where(inside, torch.ones_like(box[3]), box[3])
        return int(inside.sum())


def render(image: Tensor, grid: Tensor, fill: Tensor, feather: float = 3.0, fill_sigma: float = 1.5, *,
           match_sigma: float = 0.1, canvas: Optional[FillCanvas] = None,
           matrix: Optional[Tensor] = None) -> Tensor:
    """Frames ``[3, F, H, W]``: ``image [3, H', W']`` (the source, any size) sampled bicubically at
    ``grid [F, H, W, 2]``, and ``fill [3, F, h, w]`` (the model's own frames, any size, blurred by
    ``fill_sigma`` of their own pixels and upsampled) where the grid leaves the source
    (:func:`coverage`). Values clamped to [-1, 1].

    Each frame's fill is first shifted in colour to agree with what the frame shows of the source
    (and of ``canvas``), by :func:`colour_offset` over ``match_sigma`` of the fill's side (0: not
    matched). With ``canvas`` (and ``matrix [F, 3, 3]``, each frame's affine map to the source) the frames
    are made in order: each paints the canvas where it shows new ground, and shows the canvas there.

    The blur: the tiny model's decoded frames carry latent-grid speckle; where they only continue the
    picture past its edge, their colours matter and their texture would be noise."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W], got {tuple(image.shape)}")
    if grid.dim() != 4 or grid.shape[-1] != 2:
        raise ValueError(f"grid must be [F, H, W, 2], got {tuple(grid.shape)}")
    Fr, H, W, _ = grid.shape
    if fill.dim() != 4 or fill.shape[0] != 3 or fill.shape[1] != Fr:
        raise ValueError(f"fill must be [3, {Fr}, h, w], got {tuple(fill.shape)}")
    if canvas is not None and (matrix is None or matrix.shape != (Fr, 3, 3)):
        raise ValueError(f"matrix must be [{Fr}, 3, 3] with a canvas, got "
                         f"{None if matrix is None else tuple(matrix.shape)}")
    h, w = fill.shape[-2:]
    src = image[None].to(grid.dtype)
    fills = soften(fill.transpose(0, 1).to(grid.dtype), fill_sigma)                  # [F, 3, h, w]
    frames = []
    for f in range(Fr):
        g = grid[f:f + 1]
        warped = F.grid_sample(src, g, mode="bicubic", padding_mode="border", align_corners=False).clamp(-1, 1)
        alpha = coverage(g, image.shape[-2], image.shape[-1], feather)
        held, known = canvas.sample(g) if canvas is not None else (torch.zeros_like(warped), torch.zeros_like(alpha))
        fill_f = fills[f:f + 1]
        if match_sigma > 0:
            weight = alpha + (1 - alpha) * known
            shown = resize(alpha * warped + (1 - alpha) * known * held, h, w)
            small = resize(weight, h, w).clamp(0, 1)
            fill_f = fill_f + colour_offset(fill_f, shown / small.clamp_min(1e-6), small, match_sigma * max(h, w))
        if canvas is not None and canvas.paint(matrix[f], fill_f[0]):
            held, known = canvas.sample(g)
        back = known * held + (1 - known) * resize(fill_f, H, W)
        frames.append(alpha * warped + (1 - alpha) * back)
    return torch.cat(frames).clamp(-1, 1).transpose(0, 1)
