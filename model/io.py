"""Images in (Pillow), videos out (MP4 through PyAV, GIF through Pillow), with no partial files.

* :func:`load_image`: any Pillow-readable image (RGBA composited on white, grayscale, palette, 16-bit,
  CMYK, EXIF-rotated ...), resized so it covers the target size, then center-cropped:
  ``[3, H, W]`` float in ``[-1, 1]``.
* :func:`save_video`: ``frames [T, H, W, 3]`` uint8 to ``.mp4`` or ``.gif``, written under a temporary
  name in the destination folder and renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["ImageError", "VIDEO_FORMATS", "check_output_path", "load_image", "save_video", "to_uint8"]

VIDEO_FORMATS = (".mp4", ".gif")
PathLike = Union[str, os.PathLike]


class ImageError(ValueError):
    """The input image is missing, unreadable or not an image."""


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


def to_uint8(video: Tensor) -> np.ndarray:
    """``[3, T, H, W]`` in ``[-1, 1]`` -> ``[T, H, W, 3]`` uint8."""
    v = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(1, 2, 3, 0).cpu().numpy()


def check_output_path(path: PathLike) -> Path:
    """Validate an output path before any work: known suffix, existing writable folder."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_FORMATS:
        raise ValueError(f"output must end in {' or '.join(VIDEO_FORMATS)}, got {str(path)!r}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"output folder is not writable: {folder}")
    if path.is_dir():
        raise ValueError(f"output path is a folder: {path}")
    return path


def _write_mp4(frames: np.ndarray, path: str, fps: int) -> None:
    import av

    T, H, W, _ = frames.shape
    with av.open(path, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
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


def _write_gif(frames: np.ndarray, path: str, fps: int) -> None:
    from PIL import Image

    images = [Image.fromarray(f, "RGB") for f in frames]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0,
                   optimize=False)


def save_video(frames: np.ndarray, path: PathLike, fps: int = 8) -> Path:
    """Write ``frames [T, H, W, 3]`` uint8 to ``path`` (``.mp4`` or ``.gif``) atomically; returns the path."""
    path = check_output_path(path)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be a non-empty [T, H, W, 3] uint8 array, got {frames.shape} {frames.dtype}")
    writer = _write_mp4 if path.suffix.lower() == ".mp4" else _write_gif
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent or ".")
    os.close(fd)
    try:
        writer(frames, tmp, fps)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


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
