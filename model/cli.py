"""The ``i2v`` command: ``generate``, ``eval``, ``train``, ``info``.

Bad input (a bad or out-of-range argument, a missing, unreadable or non-image file, an unknown model
or backend, a backend that cannot run here, an output path that cannot be written) ends with one line
on stderr and exit status 2, found before anything is loaded (no torch import for most of it, no
weights, no image decoding) and without leaving a file behind. Outputs are written under temporary
names and renamed into place only when complete (:func:`i2v_model.io.save_videos`).

Ctrl-C (SIGINT) at any moment, start-up included, prints ``i2v: interrupted`` and exits with status
130 (SIGTERM and SIGHUP: one line, 128 + the signal number) with no traceback and no output file. The
handler is installed at the top of this module, before anything heavy is imported, when this module is
the process's entry (the ``i2v`` script, ``python -m i2v_model``); in-process callers of :func:`main`
get it for the duration of the call only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

_INTERRUPTS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


class _Signals:
    """Where the process is, for the signal handler.

    ``startup``: before :func:`main` runs (only when this module is the entry): nothing to clean up, so
    a signal exits at once. ``running``: the first signal raises ``KeyboardInterrupt`` (temporary files
    are removed as it unwinds), a second one exits at once after removing them. ``critical``: a signal
    waits until the section ends. ``done``: the command has finished; a signal is ignored.
    """

    phase = "startup"
    critical = 0
    pending = 0  # a signal that arrived inside a critical section
    received = 0  # the first signal while running


def _message(signum: int) -> str:
    return "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"


def _exit_now(signum: int) -> None:
    os.write(2, f"i2v: {_message(signum)}\n".encode())
    _exit_quietly(128 + signum)


def _exit_quietly(code: int) -> None:
    """End the process now with ``code``: temporary files removed, stdout and stderr flushed."""
    io = sys.modules.get("i2v_model.io")
    if io is not None:
        io.remove_temporaries()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _finish() -> None:
    """The command is over (outputs in place, or the interrupt reported): later signals change nothing.

    As the process's entry the signals are then ignored outright: Python puts back the default action
    when it shuts down, and a Ctrl-C pressed again meanwhile would otherwise kill it with no message.
    """
    _Signals.phase = "done"
    if _ENTRY:
        for signum in _INTERRUPTS:
            with contextlib.suppress(ValueError, OSError):  # not the main thread
                signal.signal(signum, signal.SIG_IGN)


def _on_signal(signum, frame):
    if _Signals.phase == "done":
        return
    if _Signals.phase == "startup" or _Signals.received:
        _exit_now(_Signals.received or signum)
    if _Signals.critical:
        _Signals.pending = _Signals.pending or signum
        return
    _Signals.received = signum
    raise KeyboardInterrupt


def _entry() -> bool:
    """True when this module runs as the process's command (not imported by a test or another program)."""
    if __name__ == "__main__":
        return True
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None:
        return spec.name in ("i2v_model", "i2v_model.__main__")
    return os.path.basename(sys.argv[0] if sys.argv else "") == "i2v"


def _unraisable(info) -> None:
    """``sys.unraisablehook``: the KeyboardInterrupt our handler raised inside a callback whose
    exceptions Python ignores (a weakref callback of the import system) is not printed as a traceback:
    the interrupt stands (``_Signals.received``) and is reported once, as one line. Anything else goes
    to the previous hook."""
    if isinstance(info.exc_value, KeyboardInterrupt) and _Signals.received:
        return
    _previous_unraisable(info)


_ENTRY = _entry()
_previous_unraisable = sys.unraisablehook
if _ENTRY and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _on_signal)  # before the imports below, and before torch's in main()
    sys.unraisablehook = _unraisable

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterable, Optional  # noqa: E402

__all__ = ["main"]

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch", "eager")
DEFAULT_OUT = "i2v_output"
MAX_FRAMES = 1025  # 1 + 4 * 256
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0
MAX_SIDE = 4096  # the largest written frame side (--upscale)
DEFAULT_SIZE, MIN_SIDE, MAX_RENDER = "256", 16, 2048  # --size: the rendered frames (the DiT runs at its own size)
MAX_IMAGES = 1000
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


class UserError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        raise UserError(f"{message} (see `{self.prog} --help`)")


@contextlib.contextmanager
def _critical(final: bool = False):
    """Hold signals back while creating a temporary file or renaming the outputs into place.

    A signal that came meanwhile is delivered at the end, except after the ``final`` section (the
    renames) succeeded: the outputs are then complete and the command ends normally, ignoring signals.
    """
    if _Signals.received:
        # The signal's KeyboardInterrupt was swallowed where Python ignores exceptions (a weakref or
        # import-lock callback; sys.unraisablehook): still interrupted, so no output is started or
        # committed.
        raise KeyboardInterrupt
    _Signals.critical += 1
    done = False
    try:
        yield
        done = final
    finally:
        _Signals.critical -= 1
        pending, _Signals.pending = _Signals.pending, 0
        if done:
            _finish()
        elif pending and not _Signals.critical:
            _on_signal(pending, None)


# ------------------------------------------------------------------------------------------------
# Shared option checks (cheap ones first: nothing here imports torch unless said so)


def _check_model(name: str):
    from i2v_model.config import CONFIGS, get_config

    if name not in CONFIGS:
        raise UserError(f"--model: unknown model {name!r}; choose one of: {', '.join(CONFIGS)}")
    return get_config(name)


def _check_range(flag: str, value, low, high, what: str = "") -> None:
    """``low <= value <= high`` and finite, else a one-line :class:`UserError` naming the flag."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{flag} must be a finite number, got {value}")
    if not low <= value <= high:
        raise UserError(f"{flag} must be {what or f'in [{low:g}, {high:g}]'}, got {value}")


def _check_size(size: Optional[str]) -> tuple[int, int]:
    """``--size``: ``N`` (square) or ``WxH``, each side in [MIN_SIDE, MAX_RENDER] -> ``(height, width)``."""
    text = DEFAULT_SIZE if size is None else size.strip().lower()
    parts = text.split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
        raise UserError(f"--size must be N or WxH in pixels (e.g. 256 or 320x240), got {size!r}")
    w, h = int(parts[0]), int(parts[-1])
    if not (MIN_SIDE <= w <= MAX_RENDER and MIN_SIDE <= h <= MAX_RENDER):
        raise UserError(f"--size: each side must be in [{MIN_SIDE}, {MAX_RENDER}] pixels, got {size!r}")
    return h, w


def _check_frames(frames: Optional[int], factor: int) -> None:
    if frames is not None and (frames < 1 or (frames - 1) % factor or frames > MAX_FRAMES):
        raise UserError(f"--frames must be 1 + {factor}k (1, {1 + factor}, {1 + 2 * factor}, 17, ...) and at most "
                        f"{MAX_FRAMES}, got {frames}")


def _check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise UserError(f"--backend: unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    return name


def _check_backend_usable(name: str) -> None:
    """Whether a forced backend can run the model here (imports torch and i2v_kernels)."""
    if name in ("auto", "eager"):
        return
    import i2v_kernels

    usable = i2v_kernels.available_backends()
    if name not in usable:
        raise UserError(f"--backend {name!r} cannot run here (usable: {', '.join(usable + ['auto', 'eager'])}); "
                        f"see `i2v info`")


def _check_file(flag: str, path: Optional[str]) -> None:
    """An existing, readable file (without reading it)."""
    if path is None:
        return
    if path == "" or "\x00" in path:
        raise UserError(f"{flag}: not a file name: {path!r}")
    p = Path(path)
    if not p.exists():
        raise UserError(f"{flag}: no such file: {path}")
    if not p.is_file():
        raise UserError(f"{flag}: not a file: {path}")
    try:
        with open(p, "rb"):
            pass
    except OSError as e:
        raise UserError(f"{flag}: cannot read {path}: {e.strerror or e}") from None


def _check_text(flag: str, text: Optional[str]) -> None:
    if text is not None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"{flag} is not valid UTF-8 text: {text!r}") from None


def _device(backend: str):
    import torch

    if backend == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def _backend_context(name: str):
    if name in ("auto", "eager"):
        return contextlib.nullcontext()
    import i2v_kernels

    return i2v_kernels.use_backend(name)


def _progress(total: int, desc: str):
    """A progress bar over ``range(total)`` on stderr when it is a terminal: tqdm when installed, else a plain one."""
    def wrap(it: Iterable) -> Iterable:
        if not sys.stderr.isatty():
            yield from it
            return
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


def _check_image(path: Optional[str]) -> None:
    """An existing file that Pillow recognises as an image (its header only: nothing is decoded)."""
    _check_file("--image", path)
    if path is None:
        return
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):
            pass
    except UnidentifiedImageError:
        raise UserError(f"--image: not an image (Pillow cannot identify it): {path}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"--image: cannot read image {path}: {e}") from None


def _outputs(out: Optional[str]) -> list[Path]:
    """The files ``--out`` asks for, each checked (and its folder probed for writing)."""
    try:
        return _output_paths(out)
    except (OSError, ValueError) as e:  # a name too long to stat, a NUL character, ...
        raise UserError(f"--out: {e}") from None


def _output_paths(out: Optional[str]) -> list[Path]:
    from i2v_model.io import VIDEO_FORMATS, check_output_path

    if out is None:
        names = [DEFAULT_OUT + s for s in VIDEO_FORMATS]
    elif out == "":
        raise UserError("--out is empty; give a file name such as clip.mp4, or clip for both formats")
    elif out.endswith(("/", os.sep)) or Path(out).name in (".", "..") or Path(out).is_dir():
        raise UserError(f"--out names a folder: {out!r}; give a file name such as {os.path.join(out, 'clip.mp4')}")
    elif Path(out).suffix.lower() in VIDEO_FORMATS:
        names = [out]
    elif Path(out).suffix == "" and not out.endswith("."):
        names = [out + s for s in VIDEO_FORMATS]
    else:
        raise UserError(f"--out must end in .mp4 or .gif (or have no suffix for both), got {out!r}")
    return [check_output_path(name) for name in names]


def _load_pipeline(args, cfg):
    from i2v_model.pipeline import I2VPipeline

    weights = getattr(args, "weights", None)
    try:
        pipe = I2VPipeline.from_pretrained(cfg.name, weights=weights, use_kernels=args.backend != "eager",
                                           device=_device(args.backend))
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


def _check_generate(args):
    """Every ``generate`` argument, before anything is loaded; returns ``(config, output paths, fps)``."""
    from i2v_model.io import check_fps

    cfg = _check_model(args.model)
    _check_backend_name(args.backend)
    _check_frames(args.frames, cfg.vae.temporal_factor)
    _check_range("--steps", args.steps, 1, MAX_STEPS)
    _check_range("--guidance", args.guidance, -MAX_GUIDANCE, MAX_GUIDANCE)
    _check_range("--seed", args.seed, SEED_MIN, SEED_MAX, "in [-2**63, 2**64 - 1]")
    height, width = _check_size(args.size)
    max_upscale = max(1, MAX_SIDE // max(height, width))
    _check_range("--upscale", args.upscale, 1, max_upscale,
                 f"in [1, {max_upscale}] (frames at most {MAX_SIDE} pixels a side)")
    try:
        fps = check_fps(args.fps)
    except ValueError as e:
        raise UserError(f"--{e}") from None
    _check_text("--prompt", args.prompt)
    _check_file("--weights", args.weights)
    outs = _outputs(args.out)
    _check_image(args.image)
    _check_backend_usable(args.backend)  # the first check that imports torch
    return cfg, outs, fps, (height, width)


def cmd_generate(args) -> int:
    cfg, outs, fps, (height, width) = _check_generate(args)
    import i2v_model
    from i2v_model.io import ImageError, load_image, save_videos, to_uint8

    image_path = Path(args.image) if args.image is not None else i2v_model.SAMPLE_IMAGE
    try:
        image = load_image(image_path, height, width)
    except ImageError as e:
        raise UserError(f"--image: {e}") from None
    prompt = cfg.default_prompt if args.prompt is None else args.prompt

    from i2v_model import parallel

    run = parallel.launch(_device(args.backend))  # under torchrun: join its process group (else None)
    start = time.perf_counter()
    pipe = _load_pipeline(args, cfg)
    if run is not None:
        run.enable(pipe.dit)
    load_s = time.perf_counter() - start
    steps = args.steps or cfg.steps
    with _backend_context(args.backend), parallel.guard(run):
        video, timings = pipe.generate(image, prompt, frames=args.frames, steps=steps, guidance=args.guidance,
                                       seed=args.seed,
                                       progress=_progress(steps, "denoise") if parallel.writes(run) else None)
    if not parallel.writes(run):
        return 0  # rank 0 writes the video
    frames = to_uint8(video)
    if args.upscale > 1:
        frames = frames.repeat(args.upscale, axis=1).repeat(args.upscale, axis=2)
    start = time.perf_counter()
    save_videos(frames, outs, fps=fps, critical=_critical)
    write_s = time.perf_counter() - start
    total = load_s + sum(timings.values()) + write_s
    print(f"prompt   {prompt!r}  ({len(frames)} frames, {frames.shape[2]}x{frames.shape[1]}, {steps} steps, "
          f"guidance {args.guidance if args.guidance is not None else cfg.guidance}, seed {args.seed}, "
          f"backend {args.backend}, {pipe.dit.patch_embed.weight.device})")
    print(f"timings  load {load_s:.2f}s  encode {timings['encode']:.2f}s  denoise {timings['denoise']:.2f}s  "
          f"decode {timings['decode']:.2f}s  render {timings.get('render', 0.0):.2f}s  write {write_s:.2f}s  "
          f"total {total:.2f}s")
    for p in outs:
        print(f"wrote    {p.resolve()}")
    return 0


def _check_eval(args):
    """Every ``eval`` argument, before anything is loaded; returns ``(config, motions)``."""
    cfg = _check_model(args.model)
    _check_backend_name(args.backend)
    _check_range("--images", args.images, 1, MAX_IMAGES)
    _check_size(args.size)
    _check_range("--steps", args.steps, 1, MAX_STEPS)
    # Image i uses seed + i for the sampler and (seed, i) for the held-out picture (numpy: not negative).
    _check_range("--seed", args.seed, 0, SEED_MAX - args.images + 1, f"in [0, 2**64 - {args.images}]")
    # data imports torch; read the motion names without it when the default is asked for.
    motions = None if args.motions is None else tuple(m.strip() for m in args.motions.split(","))
    _check_file("--weights", args.weights)
    _check_backend_usable(args.backend)
    from i2v_model.data import CAMERA_MOTIONS

    motions = CAMERA_MOTIONS if motions is None else motions
    unknown = [m for m in motions if m not in CAMERA_MOTIONS]
    if unknown or not motions:
        raise UserError(f"--motions: unknown motion(s) {', '.join(unknown) or '(none)'}; choose from: "
                        f"{', '.join(CAMERA_MOTIONS)}")
    return cfg, motions


def _eval_images(count: int, seed: int, height: int, width: int):
    """``count`` held-out pictures ``(name, [3, H, W] in [-1, 1])``, none seen in training: photo-like
    scenes made by code (:mod:`i2v_model.photos`) and the held-out stream of procedural pictures, in turn."""
    import numpy as np
    import torch

    from i2v_model.data import ClipSource
    from i2v_model.io import resize_cover
    from i2v_model.photos import heldout_photo

    source = ClipSource(seed, 1, max(height, width), split="heldout")
    images = []
    for i in range(count):
        if i % 2 == 0:
            name, picture = heldout_photo(seed + i // 2, height, width)
        else:
            name, picture = f"procedural-{i // 2}", source.image(i // 2)
        image = torch.from_numpy(np.array(picture)).permute(2, 0, 1).float() / 127.5 - 1
        images.append((name, resize_cover(image, height, width)))
    return images


def cmd_eval(args) -> int:
    cfg, motions = _check_eval(args)
    height, width = _check_size(args.size)
    import torch

    from i2v_model.data import PROMPTS
    from i2v_model.evaluate import CONSISTENCY_DB, HF_BOUND, mean, score_video, to_numpy_table

    pipe = _load_pipeline(args, cfg)
    images = _eval_images(args.images, args.seed, height, width)
    rows, scores, gen_s = [], [], []
    start = time.perf_counter()
    with _backend_context(args.backend), torch.no_grad():
        for kind in motions:
            prompt = PROMPTS[kind][0]
            found = []
            for i, (_, image) in enumerate(images):
                t0 = time.perf_counter()
                video, _ = pipe.generate(image, prompt, steps=args.steps, seed=args.seed + i)
                gen_s.append(time.perf_counter() - t0)
                found.append(score_video(video, image, kind))
            scores += found
            rows.append([kind, repr(prompt), _db(min(s.first_psnr for s in found)),
                         f"{sum(s.matches for s in found)}/{len(found)}",
                         f"{max(s.hf_ratio for s in found):.2f}", _db(min(s.consistency for s in found)),
                         "; ".join(str(s.motion) for s in found)])
            print(f"eval {kind:<11} adherence {rows[-1][3]}  hf {rows[-1][4]}  consistency {rows[-1][5]} dB",
                  file=sys.stderr)
    print(to_numpy_table(rows, ["motion", "prompt", "(a) first-frame PSNR, min (dB)", "(b) adherence",
                                "(c) HF ratio, max", "(d) consistency, min (dB)", "accumulated motion per image"]))
    n = len(scores)
    adherence = 100.0 * sum(s.matches for s in scores) / n
    print()
    print(to_numpy_table([
        ["(a) first-frame PSNR vs input (min)", _db(min(s.first_psnr for s in scores)) + " dB", ">= 28 dB"],
        ["(b) motion adherence (frame-to-frame, accumulated)", f"{adherence:.0f}% ({sum(s.matches for s in scores)}/{n})",
         ">= 90%"],
        ["(c) cleanliness: HF energy / frame 0's (max)", f"{max(s.hf_ratio for s in scores):.2f} "
         f"({sum(s.clean for s in scores)}/{n} within)", f"<= {HF_BOUND}"],
        ["(d) consistency: compensated PSNR of consecutive frames (min)",
         f"{_db(min(s.consistency for s in scores))} dB ({sum(s.consistent for s in scores)}/{n} within)",
         f">= {CONSISTENCY_DB:g} dB"],
        ["generate time per video (mean)", f"{mean(gen_s):.2f} s", "<= 10 s"],
    ], ["metric", "value", "target"]))
    print(f"\n{args.images} held-out images ({', '.join(name for name, _ in images)}) x {len(motions)} motions, "
          f"{width}x{height}, {args.steps or cfg.steps} steps, {time.perf_counter() - start:.0f} s")
    return 0


def _db(x: float) -> str:
    return "inf" if x == float("inf") else f"{x:.2f}"


def cmd_info(args) -> int:
    from i2v_kernels.__main__ import main as kernels_info

    return kernels_info(["info"] + (["--json"] if args.json else []))


def cmd_train(args) -> int:
    from i2v_model import train

    return train.main(args=args)


def _command_word(argv: list[str]) -> Optional[str]:
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Optional[list[str]] = None) -> argparse.ArgumentParser:
    """The ``i2v`` parser. ``train``'s own options (whose module imports torch) are added only when
    ``argv`` asks for ``train`` (``None``: always), so other commands parse without importing torch."""
    from i2v_model.config import config_names

    parser = _Parser(prog="i2v", description="Image-to-video generation with the reference DiT built on i2v_kernels.",
                     epilog="Bad arguments: one line on stderr, exit status 2, nothing written. Ctrl-C: "
                            "`i2v: interrupted`, exit status 130, nothing written.")
    sub = parser.add_subparsers(dest="command", metavar="{generate,eval,train,info}", parser_class=_Parser)

    g = sub.add_parser("generate", help="make a video from an image and a prompt")
    g.add_argument("--image", help="input image (default: the bundled sample)")
    g.add_argument("--prompt", help="text prompt (default: the model's default prompt)")
    g.add_argument("--out", help=f"output .mp4 or .gif, or a name without suffix for both (default: {DEFAULT_OUT}.mp4 "
                                 f"and .gif); written only when complete")
    g.add_argument("--frames", type=int, help=f"frames, 1 + 4k up to {MAX_FRAMES} (default: the model's, 17 for tiny)")
    g.add_argument("--steps", type=int, help=f"sampler steps, 1 to {MAX_STEPS} (default: the model's)")
    g.add_argument("--guidance", type=float,
                   help=f"classifier-free guidance scale, -{MAX_GUIDANCE:g} to {MAX_GUIDANCE:g} (default: the model's)")
    g.add_argument("--seed", type=int, default=0, help="any integer torch accepts: -2**63 to 2**64 - 1")
    g.add_argument("--backend", default="auto", help=f"kernel backend: {', '.join(BACKENDS)} (eager: plain PyTorch)")
    g.add_argument("--compile", action="store_true", help="torch.compile the DiT")
    g.add_argument("--model", default="tiny", help=f"one of: {', '.join(config_names())}")
    g.add_argument("--weights", help="a safetensors file from `i2v train --export` (default: the bundled weights)")
    g.add_argument("--size", help=f"frame size, N or WxH pixels, sides {MIN_SIDE} to {MAX_RENDER} (default "
                                  f"{DEFAULT_SIZE}: 256x256); the image is resized to cover it and centre-cropped")
    g.add_argument("--fps", type=float, default=8, help="frames per second of the video, 0.1 to 100 (default 8)")
    g.add_argument("--upscale", type=int, default=1,
                   help=f"enlarge the written frames N times (nearest), up to {MAX_SIDE} pixels a side")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="first-frame PSNR, motion adherence, cleanliness, consistency on held-out images")
    e.add_argument("--images", type=int, default=4, help=f"held-out images, 1 to {MAX_IMAGES} (each runs every "
                                                         f"motion prompt)")
    e.add_argument("--steps", type=int, default=None)
    e.add_argument("--seed", type=int, default=0, help="0 or more")
    e.add_argument("--motions", help="comma-separated subset of the camera motions (default: all)")
    e.add_argument("--size", help=f"frame size, N or WxH pixels (default {DEFAULT_SIZE})")
    e.add_argument("--backend", default="auto")
    e.add_argument("--model", default="tiny")
    e.add_argument("--weights", help="a safetensors file from `i2v train --export` (default: the bundled weights)")
    e.set_defaults(func=cmd_eval)

    t = sub.add_parser("train", help="train the VAE and the DiT on procedural clips (resumable), or export")
    if argv is None or _command_word(argv) == "train":
        from i2v_model.train import build_parser as train_parser

        train_parser(t)
    t.set_defaults(func=cmd_train)

    i = sub.add_parser("info", help="what `python -m i2v_kernels info` prints")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
    return parser


def _install_handlers() -> dict:
    """Our handler for SIGINT/SIGTERM/SIGHUP where they have their default one; returns what it replaced."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for signum in _INTERRUPTS:
        current = signal.getsignal(signum)
        default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        if current is default or current is _on_signal:
            previous[signum] = current
            signal.signal(signum, _on_signal)
    return previous


def main(argv: Optional[list[str]] = None) -> int:
    """Run the ``i2v`` command; returns the exit status (0, 2 for bad input, 128 + N for signal N)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    _Signals.phase, _Signals.received, _Signals.pending, _Signals.critical = "running", 0, 0, 0
    previous = _install_handlers()
    try:
        try:
            parser = build_parser(argv)
            args = parser.parse_args(argv)
            if args.command is None:
                parser.print_help(sys.stderr)
                return 2
            status = args.func(args)
            if _Signals.received:  # interrupted, but the KeyboardInterrupt was swallowed (see _critical)
                raise KeyboardInterrupt
            return status
        except UserError as e:
            msg = str(e)
        except KeyboardInterrupt:
            signum = _Signals.received or signal.SIGINT
            _finish()  # reporting it: a second signal now changes nothing (and prints nothing)
            print(f"i2v: {_message(signum)}", file=sys.stderr)
            if _ENTRY:
                # Exit here: returning 130 to the interpreter sometimes ended the process by SIGINT
                # (status -2, seen with the Triton interpreter loaded), as CPython does when it
                # recorded a KeyboardInterrupt as unhandled.
                _exit_quietly(128 + signum)
            return 128 + signum
        except OSError as e:  # OutputError (a write that failed: nothing was left), FileNotFoundError, ...
            msg = str(e)
        except (ValueError, KeyError) as e:  # ImageError and the model's own argument checks
            msg = str(e).strip("'\"")
        except RuntimeError as e:  # a forced kernel backend that cannot run, and the like
            if type(e).__name__ not in ("BackendUnavailableError", "ParallelError"):
                raise
            msg = str(e)
        print(f"i2v: error: {msg.splitlines()[0] if msg else 'failed'}", file=sys.stderr)
        return 2
    finally:
        io = sys.modules.get("i2v_model.io")
        if io is not None:
            io.remove_temporaries()
        if _ENTRY:
            _finish()  # the process is about to exit: nothing left to interrupt
        else:
            _Signals.phase = "startup"
            for signum, handler in previous.items():
                signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
