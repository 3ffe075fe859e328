"""Render the README's example results with the bundled ``tiny`` weights.

``python docs/make_examples.py`` writes, next to this file:

* ``examples.png`` -- one row per prompt: the input image, then frames 0, 4, 8, 12 and 16 of the
  generated video (each 64x64, shown at 2x);
* ``<motion>.gif`` -- each generated video at 2x.

Every video starts from the bundled sample image with seed 0 and the model's default steps and guidance,
exactly what ``i2v generate --prompt "<prompt>"`` makes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
EXAMPLES = (("pan_right", "the camera pans right"), ("pan_left", "the camera pans left"),
            ("tilt_up", "the camera tilts up"), ("zoom_in", "zoom in"), ("zoom_out", "zoom out"),
            ("rotate_cw", "the scene rotates clockwise"))
SHOWN = (0, 4, 8, 12, 16)
SCALE = 2


def main() -> int:
    from PIL import Image

    import i2v_model
    from i2v_model.io import load_image, save_video, to_uint8
    from i2v_model.pipeline import I2VPipeline

    if not i2v_model.BUNDLED:
        print("no bundled tiny weights: nothing to render", file=sys.stderr)
        return 1
    pipe = I2VPipeline.from_pretrained("tiny")
    image = load_image(i2v_model.SAMPLE_IMAGE, *pipe.resolution)
    first = to_uint8(image[:, None])[0]
    gap = np.full((first.shape[0], 4, 3), 255, np.uint8)
    rows = []
    for name, prompt in EXAMPLES:
        video, _ = pipe.generate(image, prompt, seed=0)
        frames = to_uint8(video)
        big = frames.repeat(SCALE, axis=1).repeat(SCALE, axis=2)
        save_video(big, HERE / f"{name}.gif", fps=8)
        row = [first, gap] + [x for i in SHOWN for x in (frames[i], gap)][:-1]
        rows.append(np.concatenate(row, axis=1))
        print(f"{prompt!r}: {HERE / (name + '.gif')}")
    sep = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
    strip = np.concatenate([x for r in rows for x in (r, sep)][:-1], axis=0)
    img = Image.fromarray(strip)
    img.resize((img.width * SCALE, img.height * SCALE), Image.Resampling.NEAREST).save(HERE / "examples.png")
    print(f"wrote {HERE / 'examples.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
