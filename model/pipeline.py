"""Image + prompt -> video: text encoder, causal VAE and video DiT under a flow-matching sampler.

::

    pipe = I2VPipeline.from_pretrained("tiny")                 # bundled weights
    image = i2v_model.io.load_image("cat.png", *pipe.resolution)
    video, timings = pipe.generate(image, "the camera pans right", seed=0)   # [3, 17, 64, 64] in [-1, 1]
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch
from torch import Tensor, nn

from i2v_model.config import ModelConfig, get_config
from i2v_model.dit import VideoDiT
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
        self.__dict__["_dit_fn"] = self.dit  # a plain attribute: not a second copy in the state_dict

    @property
    def resolution(self) -> tuple[int, int]:
        return self.cfg.height, self.cfg.width

    @classmethod
    def from_pretrained(cls, name: str = "tiny", *, weights: Optional[Union[str, Path]] = None,
                        use_kernels: bool = True, device: Union[str, torch.device] = "cpu",
                        dtype: torch.dtype = torch.float32, seed: int = 0) -> "I2VPipeline":
        """The named model with its shipped weights when it has them, else random weights from ``seed``.

        ``weights``: a safetensors file (written by ``i2v train --export``) to load instead; its recorded
        config replaces the registry's.
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
                cfg = ModelConfig.from_dict(json.loads(meta["config"]))
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
        self.__dict__["_dit_fn"] = torch.compile(self.dit, **kwargs)

    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        return self.text(prompts)

    @torch.no_grad()
    def generate(self, image: Tensor, prompt: str, *, frames: Optional[int] = None, steps: Optional[int] = None,
                 guidance: Optional[float] = None, seed: int = 0, decode_chunk: Optional[int] = None,
                 progress: Optional[Callable[[Iterable], Iterable]] = None) -> tuple[Tensor, dict[str, float]]:
        """``image [3, H, W]`` in ``[-1, 1]`` at :attr:`resolution` -> ``(video [3, frames, H, W], timings)``.

        ``timings``: seconds spent in ``encode`` (prompt + image), ``denoise`` and ``decode``. The
        initial noise comes from a CPU generator seeded with ``seed``, so the video depends on the seed
        alone, not on the device or on ``use_kernels``.
        """
        cfg = self.cfg
        frames = cfg.frames if frames is None else frames
        steps = cfg.steps if steps is None else steps
        guidance = cfg.guidance if guidance is None else guidance
        self.vae.check_frames(frames)
        if image.dim() != 3 or image.shape[0] != 3 or tuple(image.shape[1:]) != self.resolution:
            raise ValueError(f"image must be [3, {cfg.height}, {cfg.width}], got {tuple(image.shape)}")
        device, dtype = self.dit.patch_embed.weight.device, self.dit.patch_embed.weight.dtype
        timings = {}

        start = time.perf_counter()
        context = self.encode_prompts([prompt])
        null_context = self.encode_prompts([""])
        first = self.vae.encode(image[None, :, None].to(device, dtype))         # [1, C, 1, h, w]
        timings["encode"] = time.perf_counter() - start

        start = time.perf_counter()
        T = 1 + (frames - 1) // cfg.vae.temporal_factor
        h, w = first.shape[-2:]
        noise = torch.randn(1, cfg.vae.latent_channels, T, h, w, generator=torch.Generator().manual_seed(seed))
        noise = noise.to(device, dtype)
        cond = image_condition(first, T)
        velocity = guided(self._dit_fn, cond, context, null_context, guidance)
        times = shifted_timesteps(steps, cfg.shift, device=device).to(dtype)
        latent = euler_sample(velocity, noise, first, times, progress)
        timings["denoise"] = time.perf_counter() - start

        start = time.perf_counter()
        video = self.vae.decode(latent, chunk=decode_chunk)[0]
        timings["decode"] = time.perf_counter() - start
        return video.float().clamp(-1, 1), timings
