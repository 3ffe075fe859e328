"""Render the README's example results with the bundled ``tiny`` weights.

``python docs/make_examples.py`` writes, next to this file:

* ``examples.png`` -- one row per example: frames 0, 4, 8, 12 and 16 of a generated 256x256 video
  (shown at half size);
* ``<motion>.gif`` -- each generated video at 256x256, 17 frames.

The pictures: the bundled drawn sample and photo-like scenes made by code that the model never saw in
training (:mod:`i2v_model.photos`: ray-traced spheres, a fractal landscape). Every video uses seed 0 and
the model's default steps and guidance: what ``i2v generate --image PICTURE --prompt PROMPT`` makes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SIZE = 256
# (file stem, picture, prompt): "sample" is the bundled image, "<kind>-<n>" i2v_model.photos' picture n.
EXAMPLES = (("pan_right", "sample", "the camera pans right"), ("zoom_in", "spheres-0", "zoom in"),
            ("pan_left", "terrain-0", "the camera pans left"), ("rotate_cw", "spheres-1", "the scene rotates clockwise"),
            ("tilt_up", "terrain-1", "the camera tilts up"), ("zoom_out", "sample", "zoom out"))
SHOWN = (0, 4, 8, 12, 16)


def picture(name: str):
    """``[3, SIZE, SIZE]`` in [-1, 1]."""
    import torch

    import i2v_model
    from i2v_model.io import load_image
    from i2v_model.photos import PHOTOS

    if name == "sample":
        return load_image(i2v_model.SAMPLE_IMAGE, SIZE, SIZE)
    kind, n = name.rsplit("-", 1)
    a = PHOTOS[kind](int(n), SIZE, SIZE)
    return torch.from_numpy(np.array(a)).permute(2, 0, 1).float() / 127.5 - 1


def main() -> int:
    from PIL import Image

    import i2v_model
    from i2v_model.io import save_video, to_uint8
    from i2v_model.pipeline import I2VPipeline

    if not i2v_model.BUNDLED:
        print("no bundled tiny weights: nothing to render", file=sys.stderr)
        return 1
    pipe = I2VPipeline.from_pretrained("tiny")
    half = SIZE // 2
    gap = np.full((half, 4, 3), 255, np.uint8)
    rows = []
    for name, source, prompt in EXAMPLES:
        video, _ = pipe.generate(picture(source), prompt, seed=0)
        frames = to_uint8(video)
        save_video(frames, HERE / f"{name}.gif", fps=8)
        thumbs = [np.asarray(Image.fromarray(frames[i]).resize((half, half), Image.Resampling.LANCZOS)) for i in SHOWN]
        rows.append(np.concatenate([x for t in thumbs for x in (t, gap)][:-1], axis=1))
        print(f"{source}, {prompt!r}: {HERE / (name + '.gif')}")
    sep = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
    strip = np.concatenate([x for r in rows for x in (r, sep)][:-1], axis=0)
    Image.fromarray(strip).save(HERE / "examples.png", optimize=True)
    print(f"wrote {HERE / 'examples.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
