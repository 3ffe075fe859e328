"""Images in (Pillow), videos out (MP4 through PyAV, GIF through Pillow), with no partial files.

* :func:`load_image`: any Pillow-readable image (RGBA composited on white, grayscale, palette, 16-bit,
  CMYK, EXIF-rotated ...), resized so it covers the target size, then center-cropped:
  ``[3, H, W]`` float in ``[-1, 1]``.
* :func:`save_videos` (one path: :func:`save_video`): ``frames [T, H, W, 3]`` uint8 to ``.mp4`` and/or
  ``.gif``. Every output is written under a temporary name in its destination folder; only when all of
  them are complete are they renamed into place, so an exception, a full disk or a signal leaves neither
  a partial file nor a temporary one, and a file already at a target stays as it was (with several
  targets: all are written or none). Only a kill that cannot be caught (SIGKILL, power loss) can leave a
  hidden ``.NAME.*`` temporary file behind.

torch is imported on first use, so checking output paths costs no torch import.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager, Sequence, Union

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["ImageError", "OutputError", "VIDEO_FORMATS", "check_output_path", "load_image", "resize_cover",
           "save_video", "save_videos", "to_uint8"]

VIDEO_FORMATS = (".mp4", ".gif")
MIN_FPS, MAX_FPS = 0.1, 100.0  # a GIF frame lasts 10 ms .. 655 s, in steps of 10 ms
PathLike = Union[str, os.PathLike]

_TEMPS: set[str] = set()  # temporary files being written now (removed by remove_temporaries())


class ImageError(ValueError):
    """The input image is missing, unreadable or not an image."""


class OutputError(OSError):
    """An output cannot be written (full disk, a folder that went away, an encoder failure): nothing was left."""


def _to_rgb(img):
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits by the image's own range (Pillow's convert would clip).
        a = np.asarray(img, dtype=np.float64)
        top = a.max() if a.max() > 255 else 255.0
        a = np.clip(a / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    return img.convert("RGB")


def load_image(path: PathLike, height: int, width: int) -> Tensor:
    """Read ``path`` as ``[3, height, width]`` in ``[-1, 1]``: converted to RGB, resized to cover, center-cropped.

    Raises :class:`ImageError` with a one-line reason for a missing, unreadable or non-image file.
    """
    import torch
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise ImageError(f"image not found: {path}")
    if not path.is_file():
        raise ImageError(f"not a file: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
    except UnidentifiedImageError:
        raise ImageError(f"not an image (Pillow cannot identify it): {path}") from None
    except PermissionError:
        raise ImageError(f"cannot read image (permission denied): {path}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot read image {path}: {e}") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError(f"image has no pixels: {path}")
    s = max(width / w, height / h)
    new_w, new_h = max(width, round(w * s)), max(height, round(h * s))
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0 if s < 0.5 else None)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    img = img.crop((left, top, left + width, top + height))
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return a.permute(2, 0, 1).float() / 127.5 - 1.0


def resize_cover(image: Tensor, height: int, width: int) -> Tensor:
    """``image [3, h, w]`` resized (anti-aliased bilinear down, bicubic up) so it covers ``height x width``,
    then centre-cropped to it, as :func:`load_image` does with a file."""
    import torch.nn.functional as F

    h, w = image.shape[-2:]
    s = max(width / w, height / h)
    new_h, new_w = max(height, round(h * s)), max(width, round(w * s))
    if (new_h, new_w) != (h, w):
        down = s < 1
        image = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear" if down else "bicubic",
                              antialias=down, align_corners=False)[0].clamp(-1, 1)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return image[:, top:top + height, left:left + width]


def to_uint8(video: Tensor) -> np.ndarray:
    """``[3, T, H, W]`` in ``[-1, 1]`` -> ``[T, H, W, 3]`` uint8."""
    import torch

    v = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(1, 2, 3, 0).cpu().numpy()


def _temp_pattern(path: Path) -> tuple[str, str]:
    """``(prefix, suffix)`` of the temporary names for ``path``: hidden, same folder, same suffix."""
    return f".{path.stem}.", path.suffix + ".part"


def check_output_path(path: PathLike, probe: bool = True) -> Path:
    """Validate an output path before any work; returns it as a :class:`Path`.

    Rejects an empty path, a path naming a folder (``dir/``, ``.``, an existing folder), a suffix other
    than :data:`VIDEO_FORMATS`, a missing parent folder and a name too long for the file system. With
    ``probe`` it also creates and removes a temporary file in the folder, the way :func:`save_videos`
    will, so a read-only or full-quota folder is reported now rather than after the generation.
    Raises ``ValueError`` with a one-line reason.
    """
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if text == "":
        raise ValueError("output path is empty")
    if "\x00" in text:
        raise ValueError(f"output path contains a NUL character: {text!r}")
    if text.endswith(("/", os.sep)) or Path(text).name in ("", ".", ".."):
        raise ValueError(f"output path names a folder, not a file: {text!r}")
    path = Path(text)
    if path.suffix.lower() not in VIDEO_FORMATS or path.stem == "":
        raise ValueError(f"output must end in {' or '.join(VIDEO_FORMATS)}, got {text!r}")
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"output folder does not exist: {folder}")
    if path.is_dir():
        raise ValueError(f"output path is a folder: {path}")
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    prefix, suffix = _temp_pattern(path)
    if len(os.fsencode(prefix + suffix)) + 8 > name_max:
        raise ValueError(f"output file name is too long ({len(os.fsencode(path.name))} bytes): {path.name[:40]}...")
    if probe:
        try:
            fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
        except OSError as e:
            raise ValueError(f"cannot write in output folder {folder}: {e.strerror or e}") from None
        os.close(fd)
        os.unlink(tmp)
    return path


def _write_mp4(frames: np.ndarray, path: str, fps: float) -> None:
    from fractions import Fraction

    import av

    T, H, W, _ = frames.shape
    with av.open(path, mode="w", format="mp4") as container:
        rate = Fraction(fps).limit_denominator(1001)
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=rate)
        # yuv420p needs even sizes; odd ones get one replicated row/column.
        stream.width, stream.height = W + W % 2, H + H % 2
        stream.pix_fmt = "yuv420p"
        if stream.codec_context.name == "libx264":
            stream.options = {"crf": "12", "preset": "medium"}
        for f in frames:
            if W % 2 or H % 2:
                f = np.pad(f, ((0, H % 2), (0, W % 2), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_gif(frames: np.ndarray, path: str, fps: float) -> None:
    from PIL import Image

    images = [Image.fromarray(f, "RGB") for f in frames]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0,
                   optimize=False)


def _writer(suffix: str) -> Callable[[np.ndarray, str, float], None]:
    return {".mp4": _write_mp4, ".gif": _write_gif}[suffix.lower()]  # looked up per call (tests replace them)


def check_fps(fps: float) -> float:
    """``fps`` as a float, or ``ValueError`` unless it is finite and in ``[MIN_FPS, MAX_FPS]``."""
    try:
        value = float(fps)
    except (TypeError, ValueError):
        raise ValueError(f"fps must be a number, got {fps!r}") from None
    if not (math.isfinite(value) and MIN_FPS <= value <= MAX_FPS):
        raise ValueError(f"fps must be in [{MIN_FPS:g}, {MAX_FPS:g}], got {fps!r}")
    return value


def _unlink_quietly(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)
    _TEMPS.discard(name)


def remove_temporaries() -> None:
    """Remove the temporary files of writes in progress (for a process about to exit without unwinding)."""
    for name in list(_TEMPS):
        with contextlib.suppress(OSError):
            os.unlink(name)
    _TEMPS.clear()


def _new_temp(path: Path) -> str:
    prefix, suffix = _temp_pattern(path)
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    _TEMPS.add(name)
    os.close(fd)
    return name


def _commit(staged: list[tuple[str, Path]]) -> None:
    """Rename every ``(temporary, target)`` into place, all or none: on failure the targets are as they were."""
    backups: list[tuple[str, Path]] = []  # files that were at the targets, moved aside until all is in place
    placed: list[Path] = []
    try:
        if len(staged) > 1:
            for _, target in staged:
                if os.path.lexists(target):
                    backup = _new_temp(target)
                    os.replace(target, backup)
                    backups.append((backup, target))
        for tmp, target in staged:
            os.replace(tmp, target)
            _TEMPS.discard(tmp)
            placed.append(target)
    except BaseException:
        for target in placed:
            with contextlib.suppress(OSError):
                os.unlink(target)
        for backup, target in backups:
            with contextlib.suppress(OSError):
                os.replace(backup, target)
                _TEMPS.discard(backup)
        raise
    for backup, _ in backups:
        _unlink_quietly(backup)


def save_videos(frames: np.ndarray, paths: Sequence[PathLike], fps: float = 8,
                critical: Callable[[bool], ContextManager] = lambda final: contextlib.nullcontext()) -> list[Path]:
    """Write ``frames [T, H, W, 3]`` uint8 to every path (``.mp4`` or ``.gif`` each): all of them or none.

    Each file is encoded under a temporary name in its own folder; after the last one is complete they
    are renamed into place. Creating a temporary file runs inside ``critical(False)`` and the renames
    inside ``critical(True)`` (the CLI passes a context that holds signals back for those moments, so
    none lands between creating a file and recording it, or between two renames). Any failure removes
    every temporary file and leaves the targets untouched.
    Raises ``ValueError`` for bad arguments and :class:`OutputError` when writing fails.
    """
    fps = check_fps(fps)
    targets = [check_output_path(p, probe=False) for p in paths]
    if len({os.path.abspath(t) for t in targets}) != len(targets):
        raise ValueError(f"the same output path twice: {[str(t) for t in targets]}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be a non-empty [T, H, W, 3] uint8 array, got {frames.shape} {frames.dtype}")
    umask = os.umask(0)
    os.umask(umask)
    staged: list[tuple[str, Path]] = []
    try:
        for target in targets:
            with critical(False):
                staged.append((_new_temp(target), target))
            tmp = staged[-1][0]
            try:
                _writer(target.suffix)(frames, tmp, fps)
                os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; give it a normal file's mode
            except Exception as e:  # the encoder's or the file system's error, as one line
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise OutputError(f"cannot write {target}: {reason}") from e
        with critical(True):
            _commit(staged)
    finally:
        for tmp, _ in staged:
            if tmp in _TEMPS:
                _unlink_quietly(tmp)
    return targets


def save_video(frames: np.ndarray, path: PathLike, fps: float = 8) -> Path:
    """Write ``frames [T, H, W, 3]`` uint8 to ``path`` (``.mp4`` or ``.gif``) atomically; returns the path."""
    return save_videos(frames, [path], fps)[0]


def read_video(path: PathLike) -> np.ndarray:
    """Frames of an MP4 or GIF as ``[T, H, W, 3]`` uint8 (for tests and evaluation)."""
    path = Path(path)
    if path.suffix.lower() == ".gif":
        from PIL import Image, ImageSequence

        with Image.open(path) as img:
            return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(img)])
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
