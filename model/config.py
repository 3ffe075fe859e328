"""Model configurations: one dataclass per part, one :class:`ModelConfig` per named model.

``tiny`` is the bundled model with trained weights (64x64, 17 frames, sized for 2 CPU cores; the
pipeline renders its motion at any output size, 256x256 by default in the CLI). The
``*-like`` entries copy the widths, depths, heads and token counts of published video DiTs onto this
architecture; they exist for benchmarks and have random weights.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

__all__ = ["DiTConfig", "ModelConfig", "TextConfig", "VAEConfig", "CONFIGS", "get_config", "config_names"]


@dataclass
class VAEConfig:
    """Causal 3D VAE: ``[B, 3, F, H, W] <-> [B, latent_channels, 1 + (F - 1) / 4, H / 8, W / 8]``.

    ``channels[i]`` is the width at resolution level ``i`` (level 0 = full resolution); every level but
    the last halves H and W, and the last ``temporal_downsamples`` of those also halve time (causally,
    so the first frame is encoded alone).
    """

    in_channels: int = 3
    latent_channels: int = 16
    channels: tuple[int, ...] = (16, 32, 64, 64)
    blocks_per_level: int = 1
    temporal_downsamples: int = 2
    time_pad: str = "replicate"

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** self.temporal_downsamples


@dataclass
class TextConfig:
    """Byte-level text encoder: UTF-8 bytes -> ``[B, max_len, out_dim]`` tokens (+ their count)."""

    width: int = 128
    depth: int = 2
    heads: int = 4
    max_len: int = 64
    out_dim: int = 128


@dataclass
class DiTConfig:
    """Factorized video DiT: ``depth`` blocks of spatial -> temporal -> cross attention -> MLP."""

    width: int = 192
    depth: int = 6
    heads: int = 6
    mlp_ratio: float = 4.0
    patch: int = 2            # spatial patch size on the latent (time is never patched)
    qk_norm: str | None = "rms"
    rope_theta: float = 10000.0
    freq_dim: int = 256       # sinusoidal timestep (and token position) features
    # Std of the clean latent minus the first frame's (normalized latent units; measured on training
    # clips of the tiny model), the residual's std before the predicted flow moves the first frame:
    # the denoiser's preconditioning, see VideoDiT.preconditioning.
    sigma_motion: float = 0.75

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


@dataclass
class ModelConfig:
    name: str
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    height: int = 64
    width: int = 64
    frames: int = 17
    steps: int = 20           # default sampler steps
    guidance: float = 4.0     # default classifier-free guidance scale
    shift: float = 2.0        # flow-matching timestep shift (more steps at high noise)
    default_prompt: str = "the camera pans right"
    trained: bool = False     # True when weights ship for it

    @property
    def latent_frames(self) -> int:
        return 1 + (self.frames - 1) // self.vae.temporal_factor

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // self.vae.spatial_factor, self.width // self.vae.spatial_factor

    @property
    def tokens(self) -> int:
        """Video tokens the DiT sees: latent frames x (h / patch) x (w / patch)."""
        h, w = self.latent_size
        return self.latent_frames * (h // self.dit.patch) * (w // self.dit.patch)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        vae = d.pop("vae", None)
        vae = VAEConfig(**{**vae, "channels": tuple(vae["channels"])}) if vae else VAEConfig()
        text = TextConfig(**d.pop("text")) if "text" in d else TextConfig()
        dit = DiTConfig(**d.pop("dit")) if "dit" in d else DiTConfig()
        return cls(vae=vae, text=text, dit=dit, **d)


def _like(name, *, width, depth, heads, text_dim, text_len, frames, height, px_width, vae_channels,
          mlp_ratio=4.0, qk_norm="layer"):
    return ModelConfig(
        name=name,
        vae=VAEConfig(latent_channels=16, channels=vae_channels),
        text=TextConfig(width=256, depth=1, heads=4, max_len=text_len, out_dim=text_dim),
        dit=DiTConfig(width=width, depth=depth, heads=heads, mlp_ratio=mlp_ratio, patch=2, qk_norm=qk_norm),
        height=height, width=px_width, frames=frames, steps=50, guidance=6.0,
    )


CONFIGS: dict[str, ModelConfig] = {
    # 32 latent channels (not CogVideoX's 16): at 64x64 the tiny VAE needs the room to reach 28 dB.
    # Guidance 1 (no unconditional half): the rendered frames take their motion from the prompt-conditioned
    # prediction either way, and guided decoding only adds speckle to the parts that fill the frame's edges.
    "tiny": ModelConfig(name="tiny", vae=VAEConfig(latent_channels=32, channels=(16, 32, 64, 128)), guidance=1.0,
                        trained=True),
    # CogVideoX-2B: 1920 wide, 30 layers, 30 heads of 64; 49 frames at 480x720 -> 13 x 30 x 45 tokens; T5 226.
    "cogvideox-2b-like": _like("cogvideox-2b-like", width=1920, depth=30, heads=30, text_dim=4096, text_len=226,
                               frames=49, height=480, px_width=720, vae_channels=(128, 256, 256, 512)),
    # CogVideoX-5B: 3072 wide, 42 layers, 48 heads of 64; same token counts.
    "cogvideox-5b-like": _like("cogvideox-5b-like", width=3072, depth=42, heads=48, text_dim=4096, text_len=226,
                               frames=49, height=480, px_width=720, vae_channels=(128, 256, 256, 512)),
    # Wan2.1 1.3B: 1536 wide, 30 layers, 12 heads of 128, FFN 8960; 81 frames at 480x832 -> 21 x 30 x 52; umT5 512.
    "wan-1.3b-like": _like("wan-1.3b-like", width=1536, depth=30, heads=12, text_dim=4096, text_len=512, frames=81,
                           height=480, px_width=832, vae_channels=(96, 192, 384, 384), mlp_ratio=8960 / 1536,
                           qk_norm="rms"),
}


def config_names() -> list[str]:
    return list(CONFIGS)


def get_config(name: str) -> ModelConfig:
    """A copy of the named config (``KeyError`` listing the names when unknown)."""
    if name not in CONFIGS:
        raise KeyError(f"unknown model {name!r}; choose one of: {', '.join(CONFIGS)}")
    return copy.deepcopy(CONFIGS[name])
