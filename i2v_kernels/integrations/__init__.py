"""Integrations of the i2v_kernels ops into other libraries' models.

* :mod:`i2v_kernels.integrations.diffusers` -- ``patch(obj)`` / ``unpatch(obj)``: drop-in acceleration
  of diffusers video DiTs, UNets and VAEs (CogVideoX, Wan, Latte, LTX-Video, Stable Video Diffusion).
  diffusers is optional; nothing here imports it.
"""

from i2v_kernels.integrations.diffusers import patch, patch_summary, unpatch

__all__ = ["patch", "patch_summary", "unpatch"]
