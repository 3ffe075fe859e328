"""The ``i2v`` command: ``generate``, ``eval``, ``train``, ``info``.

Bad input (a missing, unreadable or non-image file, frames not of the form 1 + 4k, an unknown model or
backend, an output path in a missing folder) ends with one line on stderr and exit status 2, before
any work and without leaving a file behind.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

__all__ = ["main"]

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch", "eager")
DEFAULT_OUT = "i2v_output"


class UserError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        raise UserError(f"{message} (see `{self.prog} --help`)")


# ------------------------------------------------------------------------------------------------
# Shared option checks


def _check_model(name: str):
    from i2v_model.config import CONFIGS, get_config

    if name not in CONFIGS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(CONFIGS)}")
    return get_config(name)


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    if name not in ("auto", "eager"):
        import i2v_kernels

        usable = i2v_kernels.available_backends()
        if name not in usable:
            raise UserError(f"backend {name!r} cannot run here (usable: {', '.join(usable + ['auto', 'eager'])}); "
                            f"see `i2v info`")
    return name


def _check_frames(frames: Optional[int], factor: int) -> None:
    if frames is not None and (frames < 1 or (frames - 1) % factor):
        raise UserError(f"--frames must be 1 + {factor}k (1, {1 + factor}, {1 + 2 * factor}, 17, ...), got {frames}")


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _backend_context(name: str):
    if name in ("auto", "eager"):
        return contextlib.nullcontext()
    import i2v_kernels

    return i2v_kernels.use_backend(name)


def _progress(total: int, desc: str):
    """A progress bar over ``range(total)`` on stderr: tqdm when installed, else a plain one."""
    def wrap(it: Iterable) -> Iterable:
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            yield from tqdm(it, total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
            return
        start = time.perf_counter()
        for i, x in enumerate(it):
            yield x
            done = i + 1
            bar = "#" * (30 * done // total)
            sys.stderr.write(f"\r{desc} [{bar:<30}] {done}/{total} {time.perf_counter() - start:.1f}s")
            sys.stderr.flush()
        sys.stderr.write("\r" + " " * 70 + "\r")
    return wrap


def _outputs(out: Optional[str]) -> list[Path]:
    from i2v_model.io import VIDEO_FORMATS, check_output_path

    if out is None:
        paths = [Path(DEFAULT_OUT + s) for s in VIDEO_FORMATS]
    elif Path(out).suffix.lower() in VIDEO_FORMATS:
        paths = [Path(out)]
    elif Path(out).suffix == "":
        paths = [Path(out + s) for s in VIDEO_FORMATS]
    else:
        raise UserError(f"--out must end in .mp4 or .gif (or have no suffix for both), got {out!r}")
    for p in paths:
        try:
            check_output_path(p)
        except ValueError as e:
            raise UserError(str(e)) from None
    return paths


def _load_pipeline(args, cfg):
    from i2v_model.pipeline import I2VPipeline

    weights = getattr(args, "weights", None)
    if weights is not None and not Path(weights).is_file():
        raise UserError(f"--weights: no such file: {weights}")
    try:
        pipe = I2VPipeline.from_pretrained(cfg.name, weights=weights, use_kernels=args.backend != "eager",
                                           device=_device())
    except Exception as e:  # not safetensors (SafetensorError), or weights of another architecture
        if weights is None:
            raise
        raise UserError(f"--weights: cannot load {weights}: {str(e).splitlines()[0]}") from None
    if not pipe.pretrained:
        print(f"i2v: note: model {cfg.name!r} has no trained weights here; using random weights", file=sys.stderr)
    if getattr(args, "compile", False):
        pipe.compile_dit()
    return pipe


# ------------------------------------------------------------------------------------------------
# Commands


def cmd_generate(args) -> int:
    import i2v_model
    from i2v_model.io import ImageError, load_image, save_video, to_uint8

    cfg = _check_model(args.model)
    _check_backend(args.backend)
    _check_frames(args.frames, cfg.vae.temporal_factor)
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if args.upscale < 1:
        raise UserError(f"--upscale must be >= 1, got {args.upscale}")
    outs = _outputs(args.out)
    image_path = Path(args.image) if args.image else i2v_model.SAMPLE_IMAGE
    try:
        image = load_image(image_path, cfg.height, cfg.width)
    except ImageError as e:
        raise UserError(str(e)) from None
    prompt = cfg.default_prompt if args.prompt is None else args.prompt

    start = time.perf_counter()
    pipe = _load_pipeline(args, cfg)
    load_s = time.perf_counter() - start
    steps = args.steps or cfg.steps
    with _backend_context(args.backend):
        video, timings = pipe.generate(image, prompt, frames=args.frames, steps=steps, guidance=args.guidance,
                                       seed=args.seed, progress=_progress(steps, "denoise"))
    frames = to_uint8(video)
    if args.upscale > 1:
        frames = frames.repeat(args.upscale, axis=1).repeat(args.upscale, axis=2)
    start = time.perf_counter()
    for p in outs:
        save_video(frames, p, fps=args.fps)
    write_s = time.perf_counter() - start
    total = load_s + sum(timings.values()) + write_s
    print(f"prompt   {prompt!r}  ({len(frames)} frames, {frames.shape[2]}x{frames.shape[1]}, {steps} steps, "
          f"guidance {args.guidance if args.guidance is not None else cfg.guidance}, seed {args.seed}, "
          f"backend {args.backend}, {pipe.dit.patch_embed.weight.device})")
    print(f"timings  load {load_s:.2f}s  encode {timings['encode']:.2f}s  denoise {timings['denoise']:.2f}s  "
          f"decode {timings['decode']:.2f}s  write {write_s:.2f}s  total {total:.2f}s")
    for p in outs:
        print(f"wrote    {p.resolve()}")
    return 0


def cmd_eval(args) -> int:
    import torch

    from i2v_model.data import CAMERA_MOTIONS, PROMPTS, ClipSource, Motion, render_clip
    from i2v_model.evaluate import estimate_motion, mean, motion_matches, psnr, to_numpy_table

    cfg = _check_model(args.model)
    _check_backend(args.backend)
    if args.images < 1:
        raise UserError(f"--images must be >= 1, got {args.images}")
    motions = CAMERA_MOTIONS if args.motions is None else tuple(m.strip() for m in args.motions.split(","))
    unknown = [m for m in motions if m not in CAMERA_MOTIONS]
    if unknown or not motions:
        raise UserError(f"unknown motion(s) {', '.join(unknown) or '(none)'}; choose from: {', '.join(CAMERA_MOTIONS)}")
    pipe = _load_pipeline(args, cfg)
    source = ClipSource(args.seed, cfg.frames, cfg.width, split="heldout")
    canvases = [torch.from_numpy(source.image(i)).permute(2, 0, 1).float() / 127.5 - 1 for i in range(args.images)]
    # The input image is the centre of the canvas: what frame 0 of a static clip shows.
    images = [render_clip(c, Motion("static"), 1, cfg.width)[:, 0] for c in canvases]
    rows, first_psnr, all_matches, vae_psnr = [], [], [], []
    start = time.perf_counter()
    with _backend_context(args.backend), torch.no_grad():
        for kind in motions:
            prompt = PROMPTS[kind][0]
            matches, fp = [], []
            for i, image in enumerate(images):
                video, _ = pipe.generate(image, prompt, steps=args.steps, seed=args.seed + i)
                fp.append(psnr(video[:, 0], image))
                m = estimate_motion(video)
                matches.append(motion_matches(kind, m, cfg.width))
                # The VAE on the real clip of this motion.
                clip = render_clip(canvases[i], Motion(kind), cfg.frames, cfg.width).to(video.device)
                recon = pipe.vae.decode(pipe.vae.encode(clip[None]))[0].clamp(-1, 1)
                vae_psnr.append(psnr(recon, clip))
            first_psnr += fp
            all_matches += matches
            rows.append([kind, repr(prompt), f"{mean(fp):.2f}", f"{sum(matches)}/{len(matches)}"])
            print(f"eval {kind:<11} first-frame {mean(fp):5.2f} dB  motion {sum(matches)}/{len(matches)}",
                  file=sys.stderr)
    print(to_numpy_table(rows, ["motion", "prompt", "first-frame PSNR (dB)", "direction matches"]))
    adherence = 100.0 * sum(all_matches) / len(all_matches)
    print()
    print(to_numpy_table([
        ["first-frame PSNR vs input", f"{mean(first_psnr):.2f} dB", ">= 25 dB"],
        ["motion adherence", f"{adherence:.0f}% ({sum(all_matches)}/{len(all_matches)})", ">= 90%"],
        ["VAE reconstruction PSNR", f"{mean(vae_psnr):.2f} dB", ">= 28 dB"],
    ], ["metric", "value", "target"]))
    print(f"\n{args.images} held-out images x {len(motions)} motions, {args.steps or cfg.steps} steps, "
          f"{time.perf_counter() - start:.0f} s")
    return 0


def cmd_info(args) -> int:
    from i2v_kernels.__main__ import main as kernels_info

    return kernels_info(["info"] + (["--json"] if args.json else []))


def cmd_train(args) -> int:
    from i2v_model import train

    return train.main(args=args)


def build_parser() -> argparse.ArgumentParser:
    from i2v_model.config import config_names

    parser = _Parser(prog="i2v", description="Image-to-video generation with the reference DiT built on i2v_kernels.")
    sub = parser.add_subparsers(dest="command", metavar="{generate,eval,train,info}", parser_class=_Parser)

    g = sub.add_parser("generate", help="make a video from an image and a prompt")
    g.add_argument("--image", help="input image (default: the bundled sample)")
    g.add_argument("--prompt", help="text prompt (default: the model's default prompt)")
    g.add_argument("--out", help=f"output .mp4 or .gif, or a name without suffix for both (default: {DEFAULT_OUT}.mp4 "
                                 f"and .gif)")
    g.add_argument("--frames", type=int, help="frames, 1 + 4k (default: the model's, 17 for tiny)")
    g.add_argument("--steps", type=int, help="sampler steps (default: the model's)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--backend", default="auto", help=f"kernel backend: {', '.join(BACKENDS)} (eager: plain PyTorch)")
    g.add_argument("--compile", action="store_true", help="torch.compile the DiT")
    g.add_argument("--model", default="tiny", help=f"one of: {', '.join(config_names())}")
    g.add_argument("--weights", help="a safetensors file from `i2v train --export` (default: the bundled weights)")
    g.add_argument("--fps", type=int, default=8)
    g.add_argument("--upscale", type=int, default=1, help="enlarge the written frames N times (nearest)")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="first-frame PSNR, motion adherence, VAE PSNR on held-out images")
    e.add_argument("--images", type=int, default=4, help="held-out images (each runs every motion prompt)")
    e.add_argument("--steps", type=int, default=None)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--motions", help="comma-separated subset of the camera motions (default: all)")
    e.add_argument("--backend", default="auto")
    e.add_argument("--model", default="tiny")
    e.add_argument("--weights", help="a safetensors file from `i2v train --export` (default: the bundled weights)")
    e.set_defaults(func=cmd_eval)

    from i2v_model.train import build_parser as train_parser

    t = sub.add_parser("train", help="train the VAE and the DiT on procedural clips (resumable), or export")
    train_parser(t)
    t.set_defaults(func=cmd_train)

    i = sub.add_parser("info", help="what `python -m i2v_kernels info` prints")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    from i2v_model.io import ImageError

    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return args.func(args)
    except UserError as e:
        msg = str(e)
    except (ImageError, FileNotFoundError, ValueError, KeyError) as e:
        msg = str(e).strip("'\"")
    except KeyboardInterrupt:
        msg = "interrupted"
    except RuntimeError as e:  # a forced kernel backend that cannot run, and the like
        if type(e).__name__ != "BackendUnavailableError":
            raise
        msg = str(e)
    print(f"i2v: error: {msg.splitlines()[0] if msg else 'failed'}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
