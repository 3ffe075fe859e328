"""Training clips made from still images: camera motions and moving objects, with prompts.

Source images: procedural ones (:func:`procedural_image`: gradients, smooth noise, stripes, shapes) and
images that ship inside installed packages (:func:`package_images`: scikit-image's and matplotlib's
sample data when installed). Each clip looks through a moving window onto a canvas twice the clip's
size (:func:`render_clip`), using the cinematographer's convention:

* the camera pans right -> the window moves right -> the content moves left in the frame;
* the camera tilts/moves up -> the window moves up -> the content moves down;
* zoom in -> the window shrinks about the centre -> the content grows about the centre;
* "the scene rotates clockwise" -> the content turns clockwise on screen.

Everything is a pure function of ``(seed, index)``: sample ``i`` of a stream is the same whatever was
drawn before it, so training resumes exactly and the held-out stream never meets the training one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CAMERA_MOTIONS", "MOTIONS", "PROMPTS", "ClipSource", "Motion", "camera_flow", "camera_path",
           "package_images", "procedural_image", "render_clip", "scene_image"]

CAMERA_MOTIONS = ("pan_right", "pan_left", "tilt_up", "tilt_down", "zoom_in", "zoom_out", "rotate_cw", "rotate_ccw",
                  "static")
OBJECT_MOTIONS = ("object_right", "object_left", "object_up", "object_down")
MOTIONS = CAMERA_MOTIONS + OBJECT_MOTIONS

PROMPTS: dict[str, tuple[str, ...]] = {
    "pan_right": ("the camera pans right", "camera slowly pans right", "pan right", "the view drifts to the right",
                  "the camera moves to the right", "a tracking shot moving right", "truck right"),
    "pan_left": ("the camera pans left", "camera slowly pans left", "pan left", "the view drifts to the left",
                 "the camera moves to the left", "a tracking shot moving left", "truck left"),
    "tilt_up": ("the camera tilts up", "tilt up", "the camera moves up", "the view rises", "camera pans up",
                "crane up", "the camera slowly rises"),
    "tilt_down": ("the camera tilts down", "tilt down", "the camera moves down", "the view sinks",
                  "camera pans down", "crane down", "the camera slowly descends"),
    "zoom_in": ("zoom in", "the camera zooms in", "slow zoom in", "push in on the scene", "the camera moves closer",
                "dolly in", "zooming into the centre"),
    "zoom_out": ("zoom out", "the camera zooms out", "slow zoom out", "pull back from the scene",
                 "the camera moves away", "dolly out", "zooming out from the centre"),
    "rotate_cw": ("the scene rotates clockwise", "rotate clockwise", "the image spins clockwise",
                  "clockwise rotation", "everything turns clockwise"),
    "rotate_ccw": ("the scene rotates counterclockwise", "rotate counterclockwise", "the image spins anticlockwise",
                   "counterclockwise rotation", "everything turns counterclockwise"),
    "static": ("a still shot", "static camera", "the camera holds still", "nothing moves", "a locked-off shot",
               "a frozen moment"),
}
_OBJECT_TEMPLATES = ("a {color} {shape} moves {dir}", "the {color} {shape} slides to the {dir}",
                     "a {shape} moving {dir}", "the {color} {shape} travels {dir}")
_COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40),
           "white": (245, 245, 245), "black": (15, 15, 15), "orange": (250, 140, 20), "purple": (150, 50, 200)}
_SHAPES = ("ball", "square", "box", "dot")


@dataclass
class Motion:
    """One clip's motion: ``kind`` in :data:`MOTIONS` and its per-clip magnitude."""

    kind: str
    speed: float = 1.0        # pans: canvas px per frame; objects: px per frame
    zoom: float = 1.5         # total scale change over the clip
    angle: float = 20.0       # total rotation in degrees over the clip
    color: str = "red"        # objects only
    shape: str = "ball"       # objects only


# ------------------------------------------------------------------------------------------------
# Source images


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    from PIL import Image

    a = (rng.random((cells, cells, 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(a, "RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)


def _color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def procedural_image(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """A random picture ``[size, size, 3]`` uint8: a background (sky/ground, smooth noise or stripes)
    with shapes over it, drawn at 2x and downsampled (anti-aliased)."""
    from PIL import Image, ImageDraw

    S = 2 * size
    kind = rng.integers(3)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S
    if kind == 0:  # horizon: two vertical gradients
        horizon = rng.uniform(0.3, 0.7)
        top, mid, bottom = (np.array(_color(rng), np.float32) for _ in range(3))
        sky = top + (mid - top) * (yy / horizon)[..., None]
        ground = mid * 0.5 + bottom * 0.5 + (bottom - mid) * ((yy - horizon) / (1 - horizon))[..., None] * 0.5
        bg = np.where((yy < horizon)[..., None], sky, ground)
        bg += (_smooth_noise(rng, S, int(rng.integers(6, 20))) - 128) * 0.25
    elif kind == 1:  # smooth colour noise at two scales
        bg = _smooth_noise(rng, S, int(rng.integers(3, 8))) * 0.7 + _smooth_noise(rng, S, int(rng.integers(10, 30))) * 0.3
    else:  # stripes or checks at a random angle, mixed with noise
        a, b = np.array(_color(rng), np.float32), np.array(_color(rng), np.float32)
        theta, freq = rng.uniform(0, math.pi), rng.uniform(3, 12)
        u = np.cos(theta) * xx + np.sin(theta) * yy
        w = 0.5 + 0.5 * np.sin(2 * math.pi * freq * u)
        if rng.random() < 0.4:
            w = w * (0.5 + 0.5 * np.sin(2 * math.pi * freq * (-np.sin(theta) * xx + np.cos(theta) * yy)))
        bg = a + (b - a) * w[..., None]
        bg = bg * 0.75 + _smooth_noise(rng, S, int(rng.integers(4, 12))) * 0.25
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 14))):
        cx, cy = rng.uniform(0, S, 2)
        r = rng.uniform(0.03, 0.18) * S
        fill, shape = _color(rng), rng.integers(4)
        if shape == 0:
            draw.ellipse([cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r * rng.uniform(0.5, 1.5)], fill=fill)
        elif shape == 1:
            draw.rectangle([cx - r, cy - r * rng.uniform(0.4, 1.6), cx + r, cy + r], fill=fill)
        elif shape == 2:
            n = int(rng.integers(3, 7))
            angles = np.sort(rng.uniform(0, 2 * math.pi, n))
            draw.polygon([(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles], fill=fill)
        else:
            x2, y2 = rng.uniform(0, S, 2)
            draw.line([cx, cy, x2, y2], fill=fill, width=int(rng.integers(2, 10)))
    return np.array(img.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def scene_image(size: int = 256) -> np.ndarray:
    """The bundled sample picture: a landscape (sky, sun, hills, a house, trees) ``[size, size, 3]`` uint8."""
    from PIL import Image, ImageDraw

    S = 2 * size
    yy = np.linspace(0, 1, S, dtype=np.float32)[:, None, None]
    sky = np.array([70, 130, 220], np.float32) * (1 - yy) + np.array([200, 225, 250], np.float32) * yy
    img = Image.fromarray(np.broadcast_to(sky, (S, S, 3)).astype(np.uint8).copy(), "RGB")
    d = ImageDraw.Draw(img)
    u = S / 100
    d.ellipse([70 * u, 8 * u, 86 * u, 24 * u], fill=(255, 220, 80))
    d.polygon([(0, 60 * u), (20 * u, 35 * u), (45 * u, 58 * u), (65 * u, 30 * u), (100 * u, 62 * u), (100 * u, 100 * u),
               (0, 100 * u)], fill=(110, 120, 150))
    d.rectangle([0, 62 * u, S, S], fill=(70, 150, 60))
    d.ellipse([-20 * u, 55 * u, 60 * u, 80 * u], fill=(90, 170, 70))
    d.rectangle([30 * u, 60 * u, 52 * u, 80 * u], fill=(230, 210, 170))
    d.polygon([(27 * u, 61 * u), (41 * u, 48 * u), (55 * u, 61 * u)], fill=(170, 50, 40))
    d.rectangle([38 * u, 69 * u, 44 * u, 80 * u], fill=(100, 60, 30))
    d.rectangle([33 * u, 64 * u, 37 * u, 68 * u], fill=(120, 180, 230))
    d.rectangle([46 * u, 64 * u, 50 * u, 68 * u], fill=(120, 180, 230))
    for x in (65, 75, 88):
        d.rectangle([(x - 1) * u, 66 * u, (x + 1) * u, 78 * u], fill=(90, 60, 30))
        d.ellipse([(x - 6) * u, 52 * u, (x + 6) * u, 70 * u], fill=(30, 110, 40))
    d.line([0, 90 * u, S, 86 * u], fill=(200, 180, 120), width=int(3 * u))
    return np.array(img.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def package_images() -> list[Path]:
    """Sample images shipped inside installed packages (scikit-image, matplotlib), sorted; may be empty."""
    found: list[Path] = []
    import importlib.util

    for pkg, sub in (("skimage", "data"), ("matplotlib", "mpl-data/sample_data")):
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue
        folder = Path(list(spec.submodule_search_locations)[0]) / sub
        if folder.is_dir():
            found += [p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
    return sorted(found)


def _package_canvas(path: Path, rng: np.random.Generator, size: int) -> Optional[np.ndarray]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (OSError, ValueError):
        return None
    w, h = img.size
    side = int(min(w, h) * rng.uniform(0.6, 1.0))
    if side < 32:
        return None
    x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    crop = img.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.Resampling.LANCZOS)
    a = np.array(crop, dtype=np.uint8)
    return a[:, ::-1].copy() if rng.random() < 0.5 else a


# ------------------------------------------------------------------------------------------------
# Clips


def _paste_sprite(frame: Tensor, x: float, y: float, r: float, color: Tensor, square: bool) -> Tensor:
    """Soft-edged disc or square of radius ``r`` at pixel ``(x, y)`` over ``frame [3, H, W]``."""
    H, W = frame.shape[1:]
    yy = torch.arange(H, dtype=torch.float32)[:, None]
    xx = torch.arange(W, dtype=torch.float32)[None, :]
    if square:
        dist = torch.maximum((xx - x).abs(), (yy - y).abs())
    else:
        dist = ((xx - x) ** 2 + (yy - y) ** 2).sqrt()
    alpha = (r + 0.5 - dist).clamp(0, 1)
    return frame * (1 - alpha) + color[:, None, None] * alpha


def camera_path(motion: Motion, frames: int, size: int, canvas: int) -> Tensor:
    """The window of each frame on a ``canvas``-pixel square canvas: ``[frames, 2, 3]`` affine maps
    (``F.affine_grid``'s convention, normalized units) from a frame's pixel to the canvas point it shows.

    The window starts ``size`` canvas pixels wide at the centre (pans start off-centre, so the travel is
    symmetric) and moves as the module docstring says; object motions keep the camera still.
    """
    px = 2.0 / canvas  # one canvas pixel in grid_sample's normalized units
    half = size / canvas  # window half-width, normalized
    f = torch.arange(frames, dtype=torch.float32)
    cx, cy, scale, theta = torch.zeros(frames), torch.zeros(frames), torch.ones(frames), torch.zeros(frames)
    travel = motion.speed * (frames - 1)
    if motion.kind in ("pan_right", "pan_left"):
        sign = 1.0 if motion.kind == "pan_right" else -1.0
        cx = sign * (f * motion.speed - travel / 2) * px
    elif motion.kind in ("tilt_up", "tilt_down"):
        sign = -1.0 if motion.kind == "tilt_up" else 1.0  # image y points down: up is -y
        cy = sign * (f * motion.speed - travel / 2) * px
    elif motion.kind in ("zoom_in", "zoom_out"):
        sign = -1.0 if motion.kind == "zoom_in" else 1.0  # a shrinking window enlarges the content
        scale = torch.exp(sign * math.log(motion.zoom) * f / max(frames - 1, 1))
    elif motion.kind in ("rotate_cw", "rotate_ccw"):
        # Sampling at R(theta) u turns the content by -theta; with y down, positive theta is clockwise.
        sign = -1.0 if motion.kind == "rotate_cw" else 1.0
        theta = sign * math.radians(motion.angle) * f / max(frames - 1, 1)
    cos, sin = torch.cos(theta) * scale * half, torch.sin(theta) * scale * half
    return torch.stack([torch.stack([cos, -sin, cx], -1), torch.stack([sin, cos, cy], -1)], -2)


def camera_flow(motion: Motion, frames: int, size: int) -> Tensor:
    """The camera's flow from the first frame, as :func:`i2v_model.dit.affine_flow` parameters per frame
    ``[frames, 6]`` in normalized units (half-widths): frame ``k``'s pixel at offset ``p`` from the
    centre shows what the first frame showed at ``p + (a0 u + a1 v + a2, a3 u + a4 v + a5)``. Multiply
    by half the width in pixels (of any grid over the frame, e.g. the latent's) for pixels."""
    A = camera_path(motion, frames, size, 2 * size)  # relative to the first frame the canvas size cancels
    inv = torch.linalg.inv(A[0, :, :2])
    M = inv @ A[:, :, :2] - torch.eye(2)          # first-frame point of p: p + M p + inv (c_k - c_0)
    shift = (inv @ (A[:, :, 2] - A[0, :, 2])[..., None])[..., 0]
    return torch.stack([M[:, 0, 0], M[:, 0, 1], shift[:, 0], M[:, 1, 0], M[:, 1, 1], shift[:, 1]], dim=-1)


def render_clip(canvas: Tensor, motion: Motion, frames: int, size: int,
                rng: Optional[np.random.Generator] = None) -> Tensor:
    """Film ``canvas [3, S, S]`` (values in [-1, 1], ``S >= 2 size``) with ``motion`` through the windows
    of :func:`camera_path`: ``[3, frames, size, size]``."""
    affine = camera_path(motion, frames, size, canvas.shape[-1])
    grid = F.affine_grid(affine, [frames, 3, size, size], align_corners=False)
    video = F.grid_sample(canvas[None].expand(frames, -1, -1, -1), grid, mode="bilinear", padding_mode="reflection",
                          align_corners=False)
    if motion.kind.startswith("object_"):
        rng = rng or np.random.default_rng(0)
        direction = motion.kind.split("_")[1]
        dx, dy = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}[direction]
        r = float(rng.uniform(0.08, 0.16) * size)
        color = torch.tensor(_COLORS[motion.color], dtype=torch.float32) / 127.5 - 1
        span = motion.speed * (frames - 1)
        x0 = size / 2 - dx * span / 2 + (0 if dx else rng.uniform(-0.25, 0.25) * size)
        y0 = size / 2 - dy * span / 2 + (0 if dy else rng.uniform(-0.25, 0.25) * size)
        square = motion.shape in ("square", "box")
        video = torch.stack([_paste_sprite(video[i], x0 + dx * motion.speed * i, y0 + dy * motion.speed * i, r, color,
                                           square) for i in range(frames)])
    return video.permute(1, 0, 2, 3).contiguous()


def prompt_for(motion: Motion, rng: np.random.Generator) -> str:
    if motion.kind in PROMPTS:
        options = PROMPTS[motion.kind]
        return options[int(rng.integers(len(options)))]
    template = _OBJECT_TEMPLATES[int(rng.integers(len(_OBJECT_TEMPLATES)))]
    return template.format(color=motion.color, shape=motion.shape,
                           dir=motion.kind.split("_")[1])


def random_motion(rng: np.random.Generator, kinds=MOTIONS, size: int = 64) -> Motion:
    kind = kinds[int(rng.integers(len(kinds)))]
    m = Motion(kind, speed=float(rng.uniform(0.6, 1.5)) * size / 64, zoom=float(rng.uniform(1.3, 1.7)),
               angle=float(rng.uniform(15, 30)))
    if kind.startswith("object_"):
        m.speed = float(rng.uniform(1.0, 2.0)) * size / 64
        m.color = list(_COLORS)[int(rng.integers(len(_COLORS)))]
        m.shape = _SHAPES[int(rng.integers(len(_SHAPES)))]
    return m


class ClipSource:
    """Deterministic stream of ``(video [3, F, size, size] in [-1, 1], prompt, motion)`` samples.

    ``split="train"`` or ``"heldout"``: disjoint procedural seeds, and disjoint package images (every
    fifth one is held out).
    """

    def __init__(self, seed: int, frames: int, size: int, split: str = "train", package_fraction: float = 0.3):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        self.seed, self.frames, self.size, self.split = seed, frames, size, split
        pkg = package_images()
        self.package = [p for i, p in enumerate(pkg) if (i % 5 == 4) == (split == "heldout")]
        self.package_fraction = package_fraction if self.package else 0.0

    def rng(self, index: int, salt: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, 0 if self.split == "train" else 1, salt, index])

    def image(self, index: int) -> np.ndarray:
        """Source canvas ``[2 size, 2 size, 3]`` uint8 of sample ``index``."""
        rng = self.rng(index, salt=1)
        canvas = None
        if rng.random() < self.package_fraction:
            canvas = _package_canvas(self.package[int(rng.integers(len(self.package)))], rng, 2 * self.size)
        return canvas if canvas is not None else procedural_image(rng, 2 * self.size)

    def sample(self, index: int, kinds=MOTIONS) -> tuple[Tensor, str, Motion]:
        rng = self.rng(index)
        canvas = torch.from_numpy(self.image(index)).permute(2, 0, 1).float() / 127.5 - 1
        motion = random_motion(rng, kinds, self.size)
        video = render_clip(canvas, motion, self.frames, self.size, rng)
        return video, prompt_for(motion, rng), motion

    def batch(self, start: int, n: int, kinds=MOTIONS) -> tuple[Tensor, list[str], list[Motion]]:
        items = [self.sample(start + i, kinds) for i in range(n)]
        return torch.stack([v for v, _, _ in items]), [p for _, p, _ in items], [m for _, _, m in items]
