"""Helpers shared by the op-family tests."""

import pytest
import torch

from i2v_kernels import _backend

# assert_close tolerances per dtype for kernels that do their math in fp32 and round once (STYLE.md 11)
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def skip_unless_usable(backend: str, device: str = "cpu") -> None:
    """Skip the calling test when ``backend`` cannot run tensors on ``device`` in this process."""
    reason = _backend._GENERIC[backend](torch.device(device))
    if reason:
        pytest.skip(f"{backend} backend unusable here: {reason}")
