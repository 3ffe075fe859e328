"""Rectified flow (flow matching): training loss and an Euler sampler with classifier-free guidance.

Convention: ``x_t = (1 - t) x_0 + t noise`` for ``t`` in ``[0, 1]`` (``t = 1`` is pure noise); the model
predicts the velocity ``v = noise - x_0``, and sampling integrates ``dx/dt = v`` from ``t = 1`` to ``0``.
Image-to-video: latent frame 0 is the encoded input image and stays clean (``t = 0``) throughout, in
training and sampling alike; the loss covers the frames the model must invent.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

__all__ = ["euler_sample", "flow_matching_loss", "image_condition", "noised", "sample_timesteps", "shifted_timesteps",
           "x0_matching_loss"]


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Spend more of the schedule at high noise: ``t' = s t / (1 + (s - 1) t)`` (SD3's shift)."""
    return shift * t / (1 + (shift - 1) * t)


def shifted_timesteps(steps: int, shift: float = 1.0, device=None) -> Tensor:
    """``steps + 1`` times from 1 down to 0 for Euler integration."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


def sample_timesteps(batch: int, shift: float = 1.0, generator: Optional[torch.Generator] = None,
                     device=None, uniform: float = 0.1) -> Tensor:
    """Training times: logit-normal (mass in the middle), then shifted like the sampling schedule; a
    ``uniform`` fraction is drawn uniformly instead, so the ends the sampler visits (its first step is
    ``t = 1``) are trained too."""
    t = torch.sigmoid(torch.randn(batch, generator=generator, device=device))
    u = torch.rand(batch, generator=generator, device=device)
    pick = torch.rand(batch, generator=generator, device=device) < uniform
    return shift_time(torch.where(pick, u, t), shift)


def image_condition(image_latent: Tensor, frames: int) -> Tensor:
    """``[B, C, 1, h, w]`` first-frame latent -> ``cond [B, C + 1, frames, h, w]``: the latent repeated on
    every frame, and a mask channel that is 1 on frame 0 (the frame that *is* the image) and 0 after it.

    Channel concatenation as in CogVideoX-I2V, except that every frame's tokens carry the image latent at
    their own position (CogVideoX pads the later frames with zeros and leaves it to temporal attention
    to carry the image forward): a still shot is then a per-token identity, and motion a local warp of
    the condition, which a small DiT learns in a few thousand steps.
    """
    B, C, _, h, w = image_latent.shape
    cond = image_latent.new_zeros(B, C + 1, frames, h, w)
    cond[:, :C] = image_latent
    cond[:, C, 0] = 1.0
    return cond


def noised(z0: Tensor, t: Tensor, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """``(x_t, noise)``: ``x_t = (1 - t) z0 + t noise`` for ``z0 [B, C, T, h, w]`` and ``t [B]``, frame 0
    kept clean (it is the given image)."""
    noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    tt = t.view(-1, 1, 1, 1, 1).to(z0.dtype)
    xt = (1 - tt) * z0 + tt * noise
    return torch.cat([z0[:, :, :1], xt[:, :, 1:]], dim=2), noise


def x0_matching_loss(denoise: Callable[[Tensor, Tensor], Tensor], z0: Tensor, t: Tensor,
                     generator: Optional[torch.Generator] = None, weight: Optional[Tensor] = None) -> Tensor:
    """Flow matching in clean-latent form: MSE between ``denoise(x_t, t)`` and ``z0`` over frames ``1:``,
    each sample's squared error times ``weight [B]`` when given.

    Unweighted it equals :func:`flow_matching_loss` of the velocity ``(x_t - x0) / t`` weighted by ``t^2``
    (which keeps the low-noise end, where the velocity divides by a small ``t``, from dominating);
    ``weight = c_out^-2`` trains a preconditioned denoiser (:meth:`VideoDiT.preconditioning`) with unit
    weight on its network output at every noise level, as EDM does.
    """
    xt, _ = noised(z0, t, generator)
    err = ((denoise(xt, t) - z0)[:, :, 1:] ** 2).flatten(1).mean(1)
    return (err if weight is None else err * weight.to(err.dtype)).mean()


def flow_matching_loss(velocity: Callable[[Tensor, Tensor], Tensor], z0: Tensor, t: Tensor,
                       generator: Optional[torch.Generator] = None) -> Tensor:
    """MSE between ``velocity(x_t, t)`` and ``noise - z0`` over frames ``1:`` (frame 0 is given clean).

    ``z0 [B, C, T, h, w]`` clean latents, ``t [B]``.
    """
    xt, noise = noised(z0, t, generator)
    v = velocity(xt, t)
    return ((v - (noise - z0))[:, :, 1:] ** 2).mean()


@torch.no_grad()
def euler_sample(velocity: Callable[[Tensor, Tensor], Tensor], noise: Tensor, first_frame: Tensor,
                 times: Tensor, progress: Optional[Callable[[Iterable], Iterable]] = None) -> Tensor:
    """Integrate from ``noise [B, C, T, h, w]`` at ``times[0] = 1`` to ``times[-1] = 0``.

    ``velocity(x, t [B]) -> v`` (classifier-free guidance goes inside it, see :func:`guided`);
    ``first_frame [B, C, 1, h, w]`` is written into frame 0 before every step.
    """
    x = noise.clone()
    steps = range(len(times) - 1)
    for i in (progress(steps) if progress is not None else steps):
        x[:, :, :1] = first_frame
        t, t_next = times[i], times[i + 1]
        v = velocity(x, t.expand(x.shape[0]))
        x = x + (t_next - t) * v
    x[:, :, :1] = first_frame
    return x


def guided(model: Callable[..., Tensor], cond: Tensor, context: tuple[Tensor, Tensor, Tensor],
           null_context: tuple[Tensor, Tensor, Tensor], guidance: float) -> Callable[[Tensor, Tensor], Tensor]:
    """A velocity function with classifier-free guidance: ``v_u + g (v_c - v_u)``.

    ``model(x, t, cond, tokens, kv_lens, pooled)``; ``context``/``null_context`` are the text encoder's
    ``(tokens, kv_lens, pooled)`` for the prompt and the empty prompt. Both halves run as one batch.
    ``guidance == 1`` skips the unconditional half.
    """
    if guidance == 1.0:
        return lambda x, t: model(x, t, cond, *context)
    both = tuple(torch.cat([c, n]) for c, n in zip(context, null_context))
    cond2 = torch.cat([cond, cond])

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        v_c, v_u = model(torch.cat([x, x]), torch.cat([t, t]), cond2, *both).chunk(2)
        return v_u + guidance * (v_c - v_u)

    return velocity
