"""Image + prompt -> video: text encoder, causal VAE and video DiT under a flow-matching sampler.

::

    pipe = I2VPipeline.from_pretrained("tiny")                 # bundled weights
    image = i2v_model.io.load_image("cat.png", 256, 256)       # any size: the output's
    video, timings = pipe.generate(image, "the camera pans right", seed=0)   # [3, 17, 256, 256] in [-1, 1]
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch
from torch import Tensor, nn

from i2v_model.config import ModelConfig, get_config
from i2v_model.dit import VideoDiT, affine_flow
from i2v_kernels.nn import ConvCache

from i2v_model.render import (FillCanvas, camera_matrix, compose, frame_motion, matrix_grid, render as render_frames,
                               resize, source_grid)
from i2v_model.sampler import euler_sample, guided, image_condition, shifted_timesteps
from i2v_model.text import TextEncoder
from i2v_model.vae import CausalVAE

__all__ = ["I2VPipeline", "WEIGHTS_DIR", "weights_path"]

WEIGHTS_DIR = Path(__file__).parent / "weights"


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"


class I2VPipeline(nn.Module):
    """The three models of one :class:`ModelConfig`; ``use_kernels`` goes to every module."""

    def __init__(self, cfg: ModelConfig, use_kernels: bool = True):
        super().__init__()
        self.cfg, self.use_kernels = cfg, use_kernels
        self.vae = CausalVAE(cfg.vae, use_kernels)
        self.text = TextEncoder(cfg.text, use_kernels)
        self.dit = VideoDiT(cfg.dit, cfg.vae.latent_channels, cfg.text.out_dim, use_kernels)
        self.pretrained = False
        self.camera_maps: Optional[Tensor] = None   # generate(): each frame's camera map to the input
        # (x0, flow, camera) of the DiT: a plain attribute, not a second copy in the state_dict.
        self.__dict__["_dit_fn"] = self.dit.predict_motion

    @property
    def resolution(self) -> tuple[int, int]:
        return self.cfg.height, self.cfg.width

    @classmethod
    def from_pretrained(cls, name: str = "tiny", *, weights: Optional[Union[str, Path]] = None,
                        use_kernels: bool = True, device: Union[str, torch.device] = "cpu",
                        dtype: torch.dtype = torch.float32, seed: int = 0) -> "I2VPipeline":
        """The named model with its shipped weights when it has them, else random weights from ``seed``.

        ``weights``: a safetensors file (written by ``i2v train --export``) to load instead; its recorded
        config replaces the registry's. The bundled weights keep their recorded architecture with the
        registry's sampling defaults (steps, guidance, shift).
        """
        cfg = get_config(name)
        path = Path(weights) if weights is not None else weights_path(name)
        state = None
        if weights is not None or (cfg.trained and path.exists()):
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if "config" in meta:
                recorded = ModelConfig.from_dict(json.loads(meta["config"]))
                if weights is None:  # the bundled weights: the registry's sampling defaults
                    recorded.steps, recorded.guidance, recorded.shift = cfg.steps, cfg.guidance, cfg.shift
                cfg = recorded
            state = load_file(str(path))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pipe = cls(cfg, use_kernels)
        if state is not None:
            pipe.load_state_dict(state)
            pipe.pretrained = True
        return pipe.to(device=device, dtype=dtype).eval()

    def compile_dit(self, **kwargs) -> None:
        """Run the DiT through ``torch.compile`` (the denoising loop's cost)."""
        self.__dict__["_dit_fn"] = torch.compile(self.dit.predict_motion, **kwargs)

    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        return self.text(prompts)

    def _sample_chunk(self, first: Tensor, context, null_context, frames: int, steps: int, guidance: float,
                      generator: torch.Generator, progress, timings: dict) -> tuple[Tensor, Tensor, Tensor]:
        """One chunk at the model's resolution from the latent of its first frame ``first [1, C, 1, h, w]``
        -> ``(latent [1, C, T, h, w], flow [2, T, h, w], camera [T, 6])``, ``latent``'s frame 0 being ``first``.

        The motion is the DiT's own: the flow (per-pixel part) and camera map of its prompt-conditioned
        prediction at every sampler step, averaged over the steps (it changes little along the
        trajectory; guidance is not applied to it, since extrapolating a flow overshoots its size).
        """
        cfg = self.cfg
        device, dtype = first.device, first.dtype
        start = time.perf_counter()
        T = 1 + (frames - 1) // cfg.vae.temporal_factor
        h, w = first.shape[-2:]
        noise = torch.randn(1, cfg.vae.latent_channels, T, h, w, generator=generator).to(device, dtype)
        cond = image_condition(first, T)
        motion = {"flow": 0.0, "camera": 0.0, "n": 0}
        predict = self._dit_fn

        def denoiser(x, t, cond, tokens, kv_lens, pooled):
            x0, flow, camera = predict(x, t, cond, tokens, kv_lens, pooled)
            motion["flow"] = motion["flow"] + flow[0].float()      # the prompt-conditioned half is first
            motion["camera"] = motion["camera"] + camera[0].float()
            motion["n"] += 1
            return (x - x0) / t.to(x.dtype).clamp_min(self.dit.min_t).view(-1, 1, 1, 1, 1)

        velocity = guided(denoiser, cond, context, null_context, guidance)
        times = shifted_timesteps(steps, cfg.shift, device=device).to(dtype)
        latent = euler_sample(velocity, noise, first, times, progress)
        timings["denoise"] = timings.get("denoise", 0.0) + time.perf_counter() - start
        camera = motion["camera"] / motion["n"]
        residual = motion["flow"] / motion["n"] - affine_flow(camera[None], h, w)[0]
        return latent, residual.cpu(), camera.cpu()

    @torch.no_grad()
    def generate(self, image: Tensor, prompt: str, *, frames: Optional[int] = None, steps: Optional[int] = None,
                 guidance: Optional[float] = None, seed: int = 0, decode_chunk: Optional[int] = None,
                 progress: Optional[Callable[[Iterable], Iterable]] = None,
                 render: bool = True, local_motion: bool = False) -> tuple[Tensor, dict[str, float]]:
        """``image [3, H, W]`` in ``[-1, 1]`` -> ``(video [3, frames, H, W], timings)``, any ``H, W >= 8``.

        The DiT samples at the model's :attr:`resolution` (the image resized to it); with ``render`` the
        frames are the full-size ``image`` warped by the sampled motion (:mod:`i2v_model.render`), the
        VAE-decoded frames filling only what the image does not show. ``render=False`` returns the
        VAE-decoded frames themselves, at the model's resolution. ``local_motion`` adds the DiT's
        per-pixel flow to its camera map (off by default: the tiny model's per-pixel part is an uneven
        field, up to ~0.7 latent pixels, that bends straight edges when applied at full resolution).

        ``frames`` beyond the model's clip length (17 for ``tiny``) are made chunk after chunk. Each
        chunk starts from the previous chunk's last *latent* frame (the sampled latent itself, not a
        decoded frame encoded again) as its first-frame condition; the VAE decodes the chunks' latents as
        one stream through its convolutions' frame caches (the same frames as decoding the whole long
        latent at once); the renderer composes each chunk's camera maps with the map so far, so every
        frame still samples the input image once, and keeps what the fill showed past the image's edge
        in a :class:`~i2v_model.render.FillCanvas`, so it moves with the camera from chunk to chunk.
        ``timings``: seconds spent in ``encode`` (prompt + image), ``denoise``, ``decode`` and
        ``render``. Afterwards :attr:`camera_maps` ``[frames, 3, 3]`` holds each frame's sampled camera
        map to the input (:func:`~i2v_model.render.camera_matrix`, composed; identity on frame 0). The initial noise comes from a CPU generator seeded with ``seed``, so the video
        depends on the seed alone, not on the device or on ``use_kernels``.
        """
        cfg = self.cfg
        frames = cfg.frames if frames is None else frames
        steps = cfg.steps if steps is None else steps
        guidance = cfg.guidance if guidance is None else guidance
        self.vae.check_frames(frames)
        if image.dim() != 3 or image.shape[0] != 3 or min(image.shape[1:]) < 8:
            raise ValueError(f"image must be [3, H, W] with H, W >= 8, got {tuple(image.shape)}")
        if not render and tuple(image.shape[1:]) != self.resolution:
            raise ValueError(f"image must be [3, {cfg.height}, {cfg.width}] when render=False, got {tuple(image.shape)}")
        image = image.float().cpu()
        H, W = image.shape[1:]
        timings = {"encode": 0.0, "denoise": 0.0, "decode": 0.0, "render": 0.0}
        start = time.perf_counter()
        context = self.encode_prompts([prompt])
        null_context = self.encode_prompts([""])
        timings["encode"] += time.perf_counter() - start
        generator = torch.Generator().manual_seed(seed)

        device, dtype = self.dit.patch_embed.weight.device, self.dit.patch_embed.weight.dtype
        start = time.perf_counter()
        first = self.vae.encode(resize(image, *self.resolution)[None, :, None].to(device, dtype))   # [1, C, 1, h, w]
        timings["encode"] += time.perf_counter() - start
        h, w = first.shape[-2:]
        stream = ConvCache()   # the decoder's frame caches: the chunks' latents decode as one latent video
        canvas = FillCanvas(*self.resolution) if render else None
        so_far = torch.eye(3, dtype=torch.float64)   # the last frame so far -> the input (camera, affine)
        residual = None                               # and its per-pixel part (local_motion)
        out, maps = [image[:, None]], [so_far[None]]
        done = 1
        while done < frames:
            n = min(cfg.frames, frames - done + 1)
            latent, flow, camera = self._sample_chunk(first, context, null_context, n, steps, guidance, generator,
                                                      progress, timings)
            start = time.perf_counter()
            # A later chunk's frame 0 is the previous chunk's last latent frame, decoded already: the
            # decoder goes on from its caches as if the latents were one video.
            first_chunk = done == 1
            decoded = self.vae.decode(latent if first_chunk else latent[:, :, 1:], chunk=decode_chunk, state=stream)
            decoded = decoded[0].float().clamp(-1, 1)
            if first_chunk:
                decoded = decoded[:, 1:]   # frame 0 of the video is the input image itself
            timings["decode"] += time.perf_counter() - start
            first = latent[:, :, -1:]     # the latent cache: the next chunk starts from this chunk's last latent
            per_flow, per_camera = frame_motion(flow if local_motion else torch.zeros_like(flow), camera, n,
                                                cfg.vae.temporal_factor)
            matrices = so_far @ camera_matrix(per_camera[1:], h, w)
            maps.append(matrices)
            if not render:
                out.append(decoded.cpu())
            else:
                start = time.perf_counter()
                grids = compose(so_far, source_grid(per_flow[1:], per_camera[1:], H, W), residual)
                out.append(render_frames(image, grids, decoded.cpu(), canvas=canvas, matrix=matrices))
                if local_motion:
                    residual = grids[-1] - matrix_grid(matrices[-1:], H, W)[0]
                timings["render"] += time.perf_counter() - start
            so_far = matrices[-1]
            done += n - 1
        self.camera_maps = torch.cat(maps)
        return torch.cat(out, dim=1).clamp(-1, 1), timings
