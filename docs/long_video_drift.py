"""Measure drift over long videos made in chunks: ``python docs/long_video_drift.py`` writes
``docs/long_video_drift.md``.

For every camera prompt and each of ``--images`` held-out pictures (``i2v eval``'s, never seen in
training), a ``--frames`` video (65: four 17-frame chunks) at ``--size`` with the bundled weights, seed 0,
the model's default steps, scored by :func:`i2v_model.evaluate.measure_drift`:

* the accumulated frame-to-frame motion as measured, against the one the DiT sampled (the renderer's
  composed camera map, :attr:`I2VPipeline.camera_maps`), its scale as a ratio;
* brightness drift: the mean gray of what a frame shows of frame 0's content against frame 0 moved
  onto it, and the same against the frame one chunk earlier (which also covers ground the fill brought
  into view then), the largest difference over the video, in the [-1, 1] units of the frames;
* the seams: the largest change across a seam (mean |frame t+1 - frame t|) over the mean change of
  the four pairs around it, and the worst motion-compensated PSNR of a seam pair against that
  of the other pairs.

``--save DIR`` also keeps the videos (``.pt``); ``--load DIR`` scores videos saved so by an earlier
run (with the sampled maps when that run saved them; videos of an older version of the generator have
none to compare with). On a shared CPU run it with ``OMP_NUM_THREADS=1`` (small tensors: a second
thread mostly waits).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=65)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--motions", default=None, help="comma-separated camera motions (default: all)")
    parser.add_argument("--save", type=Path, default=None)
    parser.add_argument("--load", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "long_video_drift.md")
    args = parser.parse_args(argv)

    import torch

    from i2v_model.cli import _eval_images
    from i2v_model.data import CAMERA_MOTIONS, PROMPTS
    from i2v_model.evaluate import matrix_motion, measure_drift, to_numpy_table
    from i2v_model.pipeline import I2VPipeline

    motions = args.motions.split(",") if args.motions else list(CAMERA_MOTIONS)
    images = _eval_images(args.images, 0, args.size, args.size)
    pipe = None if args.load else I2VPipeline.from_pretrained("tiny")
    rows, started = [], time.perf_counter()
    for kind in motions:
        for name, image in images:
            key = f"{kind}-{name}"
            if args.load:
                video, maps = torch.load(args.load / f"{key}.pt"), args.load / f"{key}.maps.pt"
                maps = torch.load(maps) if maps.exists() else None
            else:
                video, _ = pipe.generate(image, PROMPTS[kind][0], frames=args.frames, steps=args.steps, seed=0)
                maps = pipe.camera_maps
                if args.save:
                    args.save.mkdir(parents=True, exist_ok=True)
                    torch.save(video, args.save / f"{key}.pt")
                    torch.save(maps, args.save / f"{key}.maps.pt")
            asked = None if maps is None else matrix_motion(maps[-1], args.size, args.size)
            d = measure_drift(video, chunk=16)
            ratio = "-" if asked is None else f"{d.motion.scale / asked.scale:.3f}"
            rows.append([kind, name, "-" if asked is None else str(asked), str(d.motion), ratio,
                         f"{d.brightness:.3f}", f"{d.brightness_chunk:.3f}", f"{d.seam_change:.2f}",
                         f"{d.seam_psnr:.1f} / {d.other_psnr:.1f}"])
            print(" | ".join(rows[-1]), flush=True)
    header = ["motion", "picture", f"sampled motion (frame {args.frames - 1})", "measured (accumulated)",
              "scale measured / sampled", "brightness vs frame 0", "vs one chunk back", "seam change / neighbours",
              "PSNR seam / other pairs (min, dB)"]
    seconds = time.perf_counter() - started
    text = (f"# Long-video drift ({args.frames} frames at {args.size}x{args.size}, bundled weights, seed 0, "
            f"{'loaded videos' if args.load else 'default steps'})\n\n"
            f"`python docs/long_video_drift.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
            f"({seconds:.0f} s); columns in the script's docstring.\n\n" + to_numpy_table(rows, header) + "\n")
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
