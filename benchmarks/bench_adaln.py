"""Benchmark of the fused adaLN family: ``python -m benchmarks.bench_adaln [--quick] [--device cpu|cuda]``.

Ops (x: video tokens ``[B, N, C]`` or ``[B, T, S, C]``):

* ``adaln_modulate``        ``LayerNorm(x) * (1 + scale) + shift``
* ``gated_residual_adaln``  ``r = x + gate * y``; ``(r, LayerNorm(r) * (1 + scale) + shift)`` -- the
  residual of one sub-block fused with the next sub-block's adaLN
* ``gated_residual``        ``x + gate * y``
* ``rms_norm``              ``x / sqrt(mean(x^2) + eps) * weight`` (QK-norm)

Modulation is *per-sample* (``[B, 1, C]`` against ``x [B, N, C]``, as CogVideoX, Latte and Wan2.1
run it) or *per-frame* (``[B, T, 1, C]`` against ``x [B, T, S, C]``, per-frame timesteps as in
diffusion-forcing video models), taken like a DiT block takes it: ``chunk(6, -1)`` views of one
``[.., 6C]`` embedding (shift/scale/gate for attention and MLP), so strided, never expanded.

Providers: ``torch`` (eager, written as DiTs write it), ``compile`` (torch.compile of that), our
``triton``/``cuda`` (GPU), ``cpu`` (C++, CPU) and ``native`` (``F.layer_norm`` + modulate in the input
dtype) backends, ``auto`` (the measured dispatch), and Liger-Kernel's LayerNorm/RMSNorm plus eager
modulation when it is installed. Shapes come from real video DiTs (Latte, CogVideoX-5B, Wan2.1-14B);
CPU runs use fewer rows. ``--quick`` on a GPU keeps the three model shapes (the static dispatch table is
generated from these rows) and compiles at CogVideoX-5B only.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from benchmarks import utils
from benchmarks.utils import Case, Provider, Session

FAMILY = "adaln"
EPS = 1e-6
OPS = ("adaln_modulate", "gated_residual_adaln", "gated_residual", "rms_norm")
PROVIDERS = ("torch", "compile", *utils.OUR_BACKENDS, utils.AUTO, "liger")
QUICK_BUDGET_S = 45


# --------------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class VideoShape:
    """Video tokens of one DiT input: ``B`` videos, ``T`` latent frames of ``S`` tokens, width ``C``."""

    label: str
    B: int
    T: int
    S: int
    C: int
    source: str


LATTE = VideoShape("latte", 2, 16, 256, 1152,
                   "Latte-XL/2, 16 frames at 256x256: 32x32 latent, patch 2 -> 16x16 tokens per frame")
COGVIDEOX_5B = VideoShape("cogvideox-5b", 2, 13, 1350, 3072,
                          "CogVideoX-5B, 49 frames at 720x480: 13 latent frames of 30x45 tokens = 17550 per video")
WAN_14B = VideoShape("wan2.1-14b-480p", 1, 21, 1560, 5120,
                     "Wan2.1-14B, 81 frames at 832x480: 21 latent frames of 30x52 tokens = 32760")
# CPU: the same model widths with fewer rows, so a full run takes minutes on two cores.
LATTE_B8 = VideoShape("latte-b8", 8, 16, 256, 1152, "Latte-XL/2 width and frame size, batch 8 (32768 rows)")
COGVIDEOX_5B_3F = VideoShape("cogvideox-5b-3f", 2, 3, 1350, 3072,
                             "CogVideoX-5B width and frame size, 3 latent frames (8100 rows)")
# Per-head QK RMSNorm (HunyuanVideo: 24 heads of 128, 544x960 at 129 frames -> 33 x 34x60 tokens).
HUNYUAN_HEADS = (1, 67320, 24, 128)

SHAPES = {
    # (device, quick) -> shapes
    ("cuda", False): (LATTE, COGVIDEOX_5B, WAN_14B),
    ("cuda", True): (LATTE, COGVIDEOX_5B, WAN_14B),
    ("cpu", False): (LATTE_B8, COGVIDEOX_5B_3F),
    ("cpu", True): (LATTE,),
}

# op -> modulation variants run in (quick, full) runs
VARIANTS = {
    "adaln_modulate": (("per-sample", "per-frame"), ("per-sample", "per-frame")),
    "gated_residual_adaln": (("per-sample",), ("per-sample", "per-frame")),
    "gated_residual": (("per-sample",), ("per-sample",)),
    "rms_norm": (("full-dim",), ("full-dim",)),
}


# --------------------------------------------------------------------------------------------------
# Eager PyTorch, as video DiTs write these ops (the `torch` provider; `compile` compiles these)


def eager_adaln_modulate(x, shift, scale):
    return F.layer_norm(x, (x.shape[-1],), eps=EPS) * (1 + scale) + shift


def eager_gated_residual(x, y, gate):
    return x + gate * y


def eager_gated_residual_adaln(x, y, gate, shift, scale):
    r = x + gate * y
    return r, F.layer_norm(r, (r.shape[-1],), eps=EPS) * (1 + scale) + shift


def eager_rms_norm(x, weight):
    # Wan / diffusers RMSNorm: statistics in fp32, the normalized value cast back, then the weight.
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).type_as(x) * weight


EAGER = {
    "adaln_modulate": eager_adaln_modulate,
    "gated_residual": eager_gated_residual,
    "gated_residual_adaln": eager_gated_residual_adaln,
    "rms_norm": eager_rms_norm,
}


def _ours(op: str):
    """The public i2v_kernels function for ``op``, taking the case's inputs positionally."""
    import i2v_kernels

    return {
        "adaln_modulate": lambda x, shift, scale: i2v_kernels.adaln_modulate(x, shift, scale, eps=EPS),
        "gated_residual": lambda x, y, gate: i2v_kernels.gated_residual(x, y, gate),
        "gated_residual_adaln": lambda x, y, gate, shift, scale: i2v_kernels.gated_residual_adaln(
            x, y, gate, shift, scale, eps=EPS),
        "rms_norm": lambda x, weight: i2v_kernels.rms_norm(x, weight, eps=EPS),
    }[op]


def _reference(op: str):
    """The package's fp32 oracle for ``op`` (inputs upcast, so outputs are fp32)."""
    from i2v_kernels.ops.adaln import reference

    def f32(*ts):
        return [t.float() for t in ts]

    return {
        "adaln_modulate": lambda x, shift, scale: reference.adaln_modulate(*f32(x, shift, scale), eps=EPS),
        "gated_residual": lambda x, y, gate: reference.gated_residual(*f32(x, y, gate)),
        "gated_residual_adaln": lambda x, y, gate, shift, scale: reference.gated_residual_adaln(
            *f32(x, y, gate, shift, scale), eps=EPS),
        "rms_norm": lambda x, weight: reference.rms_norm(*f32(x, weight), eps=EPS),
    }[op]


def _liger(op: str, session: Session) -> Provider:
    """Liger-Kernel's Triton LayerNorm / RMSNorm, with the modulation in eager (what a user could
    assemble from an outside library today)."""
    if session.device.type != "cuda":
        return Provider("liger", why_not="Liger-Kernel runs on CUDA only", kind="outside")
    if op == "gated_residual":
        return Provider("liger", why_not="Liger-Kernel has no gated residual", kind="outside")

    def build():
        if op == "rms_norm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            return lambda x, weight: LigerRMSNormFunction.apply(x, weight, EPS)
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction

        def layer_norm(t):
            C = t.shape[-1]
            ones = torch.ones(C, device=t.device, dtype=t.dtype)
            zeros = torch.zeros(C, device=t.device, dtype=t.dtype)
            return LigerLayerNormFunction.apply(t, ones, zeros, EPS)

        if op == "adaln_modulate":
            return lambda x, shift, scale: layer_norm(x) * (1 + scale) + shift

        def fused(x, y, gate, shift, scale):
            r = x + gate * y
            return r, layer_norm(r) * (1 + scale) + shift

        return fused

    return utils.outside_provider("liger", build)


# --------------------------------------------------------------------------------------------------
# Cases


def _modulated_inputs(op: str, shape: VideoShape, variant: str, dtype: torch.dtype):
    B, T, S, C = shape.B, shape.T, shape.S, shape.C
    if variant == "per-frame":
        x_dims, emb_dims = (B, T, S, C), (B, T, 1, 6 * C)
    else:
        x_dims, emb_dims = (B, T * S, C), (B, 1, 6 * C)

    def make(device):
        x = torch.randn(x_dims, device=device, dtype=dtype)
        emb = torch.randn(emb_dims, device=device, dtype=dtype)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, _gate_mlp = emb.chunk(6, dim=-1)
        if op == "adaln_modulate":
            return x, shift_msa, scale_msa
        y = torch.randn(x_dims, device=device, dtype=dtype)
        if op == "gated_residual":
            return x, y, gate_msa
        return x, y, gate_msa, shift_mlp, scale_mlp

    mod_dims = list(emb_dims[:-1]) + [C]
    return x_dims, mod_dims, make


def _rms_inputs(x_dims, dtype: torch.dtype):
    def make(device):
        return (torch.randn(x_dims, device=device, dtype=dtype),
                torch.randn(x_dims[-1], device=device, dtype=dtype))

    return make


def build_cases(session: Session) -> list[Case]:
    shapes = SHAPES[(session.device.type, session.quick)]
    n_out = {"adaln_modulate": 1, "gated_residual": 1, "gated_residual_adaln": 2, "rms_norm": 1}
    cases = []
    for dtype in session.dtypes:
        for op in OPS:
            if not session.wants_op(op):
                continue
            variants = VARIANTS[op][0 if session.quick else 1]

            def min_bytes(inputs, k=n_out[op]):
                # read every input once (modulation rows once, not per token), write each output once
                return utils.tensor_bytes(*inputs) + k * utils.tensor_bytes(inputs[0])

            for shape in shapes:
                for variant in variants:
                    if op == "rms_norm":
                        x_dims = (shape.B, shape.T * shape.S, shape.C)
                        make = _rms_inputs(x_dims, dtype)
                        extra = {"variant": "full-dim QK-norm over C", "weight": [shape.C]}
                    else:
                        x_dims, mod_dims, make = _modulated_inputs(op, shape, variant, dtype)
                        extra = {"variant": variant, "modulation": mod_dims}
                    rows = x_dims[0] * x_dims[1] * (x_dims[2] if len(x_dims) == 4 else 1)
                    extra.update(model=shape.source, rows=rows, C=shape.C)
                    label = shape.label if op == "rms_norm" else f"{shape.label} {variant}"
                    cases.append(Case(op=op, label=label, dims=x_dims, dtype=dtype, make_inputs=make,
                                      reference=_reference(op), min_bytes=min_bytes, extra=extra))
            if op == "rms_norm" and session.device.type == "cuda" and not session.quick:
                B, N, H, D = HUNYUAN_HEADS
                cases.append(Case(
                    op=op, label="hunyuanvideo-544p per-head", dims=HUNYUAN_HEADS, dtype=dtype,
                    make_inputs=_rms_inputs(HUNYUAN_HEADS, dtype), reference=_reference(op), min_bytes=min_bytes,
                    extra={"variant": "per-head QK-norm over D", "weight": [D], "rows": B * N * H, "C": D,
                           "model": "HunyuanVideo, 129 frames at 544x960: 33 latent frames of 34x60 tokens, 24 heads of 128"},
                ))
    return cases


def providers(case: Case, session: Session) -> list[Provider]:
    eager = EAGER[case.op]
    compile_skip = session.quick_compile_why_not(case.label.split()[0] == COGVIDEOX_5B.label)
    if session.device.type == "cpu" and session.quick:
        compile_skip = ("left out of --quick on CPU: inductor spends ~20 s compiling each graph on this machine; "
                        "run without --quick to include it")
    out = [utils.eager_provider(eager)]
    if session.wants("compile"):
        out.append(utils.compile_provider(eager, why_not=compile_skip))
    out += utils.backend_providers(_ours(case.op), session)
    if session.wants("liger"):
        out.append(_liger(case.op, session))
    return out


# --------------------------------------------------------------------------------------------------
# Targets (shared/PERFORMANCE.md); informational only


GPU_LEGEND = (
    "GPU, bf16, C >= 1024, >= 16k rows (other cases: n/a): `bw>=85%` at least 85% of the copy bandwidth "
    "measured on the card; `eager>=3x` at least 3x eager PyTorch; `compile>=1.3x` at least 1.3x torch.compile "
    "of eager.",
)
CPU_LEGEND = (
    "CPU C++ kernel (`cpu` provider), C >= 1024: `eager>=3x` at least 3x eager PyTorch on the CPU.",
    "CPU aim `copy<=2x`: within 2x of a copy of x, i.e. at most 2 `copies` (the `copy` row times `x.clone()`).",
)



def targets(row: dict, case: Case, session: Session) -> dict:
    C, rows = case.extra["C"], case.extra["rows"]
    frac, vs_eager, vs_compile = row["frac_roofline"], row["ratio_vs_eager"], row["ratio_vs_compile"]
    if session.device.type == "cuda":
        if not (case.dtype == torch.bfloat16 and C >= 1024 and rows >= 16384):
            return {"targets": "n/a"}
        return {
            "bw>=85%": utils.verdict(frac is not None and frac >= 0.85),
            "eager>=3x": "n/a" if vs_eager is None else utils.verdict(vs_eager >= 3.0),
            "compile>=1.3x": "n/a" if vs_compile is None else utils.verdict(vs_compile >= 1.3),
        }
    if row["provider"] != "cpu":
        return {}
    return {
        "eager>=3x": "n/a (C < 1024)" if C < 1024 else "n/a" if vs_eager is None else utils.verdict(vs_eager >= 3.0),
        "copy<=2x": utils.verdict(row["time_in_copies"] <= 2.0),
    }


# --------------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    session = utils.start_session(FAMILY, "Benchmark of the fused adaLN family", PROVIDERS, OPS, argv, QUICK_BUDGET_S)
    utils.run_cases(session, build_cases(session), providers, targets)
    legend = GPU_LEGEND if session.device.type == "cuda" else CPU_LEGEND
    return session.finish("adaLN family: fused LayerNorm + modulation, gated residual, RMSNorm", legend)


if __name__ == "__main__":
    sys.exit(main())
