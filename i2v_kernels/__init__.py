"""i2v-kernels: GPU kernels for image-to-video diffusion transformers.

Every function below runs through one ``torch.library`` op (``torch.ops.i2v_kernels.<name>``); the
backend inside it (cuda, triton, cpu, native, ...) is the one measured fastest for the call's shape on
this device (``auto``), or the one forced with ``use_backend`` -- see ``i2v_kernels.info()``.
"""

from i2v_kernels._backend import BackendUnavailableError, available_backends, info, use_backend
from i2v_kernels._dispatch import tune
from i2v_kernels.nn import AdaLNModulate, CausalConv3d, CrossAttention, FactorizedAttention
from i2v_kernels.ops.adaln import adaln_modulate, gated_residual, gated_residual_adaln, rms_norm
from i2v_kernels.ops.attention import attention, spatial_attention, temporal_attention
from i2v_kernels.integrations.diffusers import patch, unpatch
from i2v_kernels.ops.conv3d import causal_conv3d
from i2v_kernels.ops.qk_norm_rope import qk_norm_rope
from i2v_kernels import distributed

__all__ = [
    "AdaLNModulate",
    "BackendUnavailableError",
    "CausalConv3d",
    "CrossAttention",
    "FactorizedAttention",
    "adaln_modulate",
    "attention",
    "available_backends",
    "causal_conv3d",
    "distributed",
    "gated_residual",
    "gated_residual_adaln",
    "info",
    "patch",
    "qk_norm_rope",
    "rms_norm",
    "spatial_attention",
    "temporal_attention",
    "tune",
    "unpatch",
    "use_backend",
]
