"""Photo-like test pictures made by code, never seen in training (which draws flat shapes and noise,
:func:`i2v_model.data.procedural_image`): shaded 3D scenes with perspective, soft light and texture.

* :func:`spheres_photo`: ray-traced spheres on a checkered floor under a sky (shading, shadows, a
  reflective floor, perspective foreshortening);
* :func:`terrain_photo`: a fractal-noise landscape (mountain ridges, haze, clouds, a lake reflecting them).

Each is a pure function of ``(seed, height, width)`` returning ``[height, width, 3]`` uint8.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PHOTOS", "heldout_photo", "spheres_photo", "terrain_photo"]


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def spheres_photo(seed: int, height: int = 256, width: int = 256) -> np.ndarray:
    """Ray-traced spheres on a checkered floor, seen by a pinhole camera slightly above it (traced at
    2x and averaged down, so the far checks do not alias)."""
    from PIL import Image

    with np.errstate(invalid="ignore", divide="ignore"):  # rays that miss: masked out below
        big = _trace_spheres(seed, 2 * height, 2 * width)
    return np.asarray(Image.fromarray(big).resize((width, height), Image.Resampling.BOX), dtype=np.uint8)


def _trace_spheres(seed: int, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 11])
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    aspect = width / height
    u = ((xs + 0.5) / width * 2 - 1) * aspect * 0.6
    v = (1 - (ys + 0.5) / height * 2) * 0.6
    origin = np.array([0.0, 1.0 + rng.uniform(-0.2, 0.4), 0.0])
    dirs = _normalize(np.stack([u, v - 0.15, np.ones_like(u)], -1))
    n = int(rng.integers(3, 6))
    centres = np.stack([rng.uniform(-2.2, 2.2, n), np.zeros(n), rng.uniform(3.5, 8.0, n)], -1)
    radii = rng.uniform(0.45, 1.0, n)
    centres[:, 1] = radii
    colours = rng.uniform(0.15, 0.95, (n, 3))
    light = _normalize(np.array([rng.uniform(-1, 1), 1.2, rng.uniform(-1.0, 0.2)]))
    sky_top, sky_low = np.array([0.25, 0.45, 0.85]), np.array([0.85, 0.9, 0.97])
    check_a, check_b = rng.uniform(0.55, 0.95, 3), rng.uniform(0.05, 0.35, 3)

    def sky(d):
        t = np.clip(d[..., 1:2] * 2.5, 0, 1)
        return sky_low * (1 - t) + sky_top * t

    def trace(o, d, depth):
        best = np.full(d.shape[:-1], np.inf)
        hit = np.full(d.shape[:-1], -1)
        for i in range(n):
            oc = o - centres[i]
            b = (oc * d).sum(-1)
            c = (oc * oc).sum(-1) - radii[i] ** 2
            disc = b * b - c
            t = -b - np.sqrt(np.maximum(disc, 0))
            ok = (disc > 0) & (t > 1e-4) & (t < best)
            best, hit = np.where(ok, t, best), np.where(ok, i, hit)
        t_floor = np.where(d[..., 1] < -1e-6, -o[..., 1] / np.minimum(d[..., 1], -1e-6), np.inf)
        floor = (t_floor < best) & (t_floor > 1e-4)
        best = np.where(floor, t_floor, best)
        p = o + d * best[..., None]
        normal = np.where(floor[..., None], np.array([0.0, 1.0, 0.0]),
                          _normalize(p - centres[np.maximum(hit, 0)]) if n else 0)
        base = np.where(floor[..., None],
                        np.where(((np.floor(p[..., 0]) + np.floor(p[..., 2])) % 2 == 0)[..., None], check_a, check_b),
                        colours[np.maximum(hit, 0)])
        # Shadow rays toward the light.
        shadow = np.zeros(d.shape[:-1], bool)
        po = p + normal * 1e-3
        for i in range(n):
            oc = po - centres[i]
            b = (oc * light).sum(-1)
            c = (oc * oc).sum(-1) - radii[i] ** 2
            disc = b * b - c
            shadow |= (disc > 0) & (-b - np.sqrt(np.maximum(disc, 0)) > 0)
        diffuse = np.clip((normal * light).sum(-1), 0, 1) * (~shadow)
        half = _normalize(light - d)
        spec = np.clip((normal * half).sum(-1), 0, 1) ** 40 * (~shadow) * (~floor)
        fog = np.exp(-0.02 * np.where(np.isfinite(best), best, 1e3))[..., None]
        colour = base * (0.25 + 0.75 * diffuse[..., None]) + spec[..., None]
        if depth > 0:
            refl_d = d - 2 * (d * normal).sum(-1, keepdims=True) * normal
            reflected = trace(po, refl_d, depth - 1)
            colour = np.where(floor[..., None], 0.8 * colour + 0.2 * reflected, colour)
        colour = colour * fog + sky(d) * (1 - fog)
        missed = ~np.isfinite(best)
        return np.where(missed[..., None], sky(d), colour)

    img = trace(np.broadcast_to(origin, dirs.shape), dirs, 1)
    return (np.clip(img, 0, 1) ** (1 / 1.1) * 255).round().astype(np.uint8)


def _fbm(rng: np.random.Generator, n: int, octaves: int = 6, base: int = 4) -> np.ndarray:
    """Fractal noise on ``[0, 1]``: ``[n]`` samples of octaves of smooth 1-D noise."""
    x = np.linspace(0, 1, n)
    out = np.zeros(n)
    for o in range(octaves):
        k = base * 2 ** o
        knots = rng.standard_normal(k + 1)
        out += np.interp(x * k, np.arange(k + 1), knots) / 1.9 ** o
    return out


def _fbm2(rng: np.random.Generator, h: int, w: int, octaves: int = 5, base: int = 3) -> np.ndarray:
    from PIL import Image

    out = np.zeros((h, w), np.float32)
    for o in range(octaves):
        k = base * 2 ** o
        a = rng.standard_normal((k + 1, k + 1)).astype(np.float32)
        im = Image.fromarray(a, "F").resize((w, h), Image.Resampling.BICUBIC)
        out += np.asarray(im) / 1.9 ** o
    return out


def terrain_photo(seed: int, height: int = 256, width: int = 256) -> np.ndarray:
    """Mountain ridges in aerial perspective over a lake, under a cloudy sky."""
    rng = np.random.default_rng([seed, 12])
    H, W = height, width
    y = (np.arange(H)[:, None] + 0.5) / H
    sky = np.array([0.30, 0.50, 0.85]) * (1 - y[..., None]) + np.array([0.88, 0.85, 0.80]) * y[..., None]
    img = np.broadcast_to(sky, (H, W, 3)).copy()
    clouds = np.clip(_fbm2(rng, H, W) * 0.6 + 0.1, 0, 1)[..., None] * (1 - y[..., None] * 1.4).clip(0, 1)
    img = img * (1 - 0.8 * clouds) + 0.97 * 0.8 * clouds
    water = rng.uniform(0.62, 0.78)
    ridges = int(rng.integers(3, 5))
    rock = rng.uniform(0.2, 0.5, 3)
    for r in range(ridges):
        far = 1 - r / ridges                     # 1: the farthest ridge
        line = 0.25 + 0.1 * r + 0.09 * _fbm(rng, W, base=3 + r) * (1.2 - 0.3 * r)
        texture = _fbm2(rng, H, W, octaves=6, base=6 + 2 * r)
        colour = rock * (0.6 + 0.4 * r / ridges) + np.array([0.1, 0.25, 0.05]) * (r / ridges)
        shade = (0.75 + 0.12 * texture)[..., None] * (0.8 + 0.4 * (y - line[None, :]).clip(0, 0.3)[..., None])
        haze = 0.65 * far ** 1.5
        ridge = colour * shade * (1 - haze) + np.array([0.75, 0.8, 0.88]) * haze
        snow = ((y < line[None, :] + 0.04) & (texture > 0.2) & (r == 0))[..., None]
        ridge = np.where(snow, np.array([0.95, 0.95, 0.97]), ridge)
        mask = (y > line[None, :]) & (y < water)
        img = np.where(mask[..., None], ridge, img)
    # The lake: the picture above the waterline mirrored, darkened, rippled.
    rows = np.arange(H)
    src = np.clip((2 * water * H - rows - 1).round().astype(int), 0, H - 1)
    ripple = (2.0 * np.sin(rows[:, None] * 0.9 + np.arange(W)[None, :] * 0.05)).round().astype(int)
    cols = np.clip(np.arange(W)[None, :] + ripple, 0, W - 1)
    reflected = img[src[:, None], cols] * 0.7 + np.array([0.05, 0.12, 0.18])
    img = np.where((y >= water)[..., None], reflected, img)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


PHOTOS = {"spheres": spheres_photo, "terrain": terrain_photo}


def heldout_photo(index: int, height: int = 256, width: int = 256) -> tuple[str, np.ndarray]:
    """``(name, picture)`` number ``index`` of the evaluation set: the two kinds in turn."""
    name = list(PHOTOS)[index % len(PHOTOS)]
    return f"{name}-{index // len(PHOTOS)}", PHOTOS[name](index // len(PHOTOS), height, width)
