"""Benchmark of ``qk_norm_rope``: ``python -m benchmarks.bench_qk_norm_rope [--quick] [--device cpu|cuda]``.

One memory-bound pass over q and k (``[B, N, H, D]`` views of a packed QKV projection): QK-norm over
D (LayerNorm or RMSNorm with affine) then RoPE, both written contiguous. Minimal bytes: q and k read
once, both outputs written once (the RoPE table and the norm weights are negligible and not counted).

Providers: ``torch`` (eager, as diffusers' CogVideoX / Wan attention processors write it: transpose
to ``[B, H, N, D]``, ``nn.LayerNorm``/RMSNorm, then RoPE with fp32 tables), ``compile`` (torch.compile
of that), our ``triton``, ``cuda`` (CUDA C++; GPU rows only), ``cpu`` (its row routine compiled for
the CPU; CPU rows only) and ``native`` backends, and ``auto`` (the measured dispatch). Each row prints
GB/s and its fraction of the copy bandwidth measured on the same device.

Shapes: CogVideoX-5B (LayerNorm + interleaved RoPE, 48 heads of 64, 17,776 tokens, B 2), a
Wan2.1-14B-sized call (40 heads of 128, 32,760 tokens; per-head RMSNorm + interleaved RoPE -- Wan 2.1
itself normalizes over all 5120 channels before the head split, which ``rms_norm`` covers), and a
Latte-like one (16 heads of 72, 16 frames of 256 tokens, B 2; RMSNorm + half-style RoPE). CPU runs use
fewer tokens.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from benchmarks import utils
from benchmarks.utils import Case, Provider, Session

FAMILY = "qk_norm_rope"
EPS = 1e-6
OPS = ("qk_norm_rope",)
PROVIDERS = ("torch", "compile", *utils.OUR_BACKENDS, utils.AUTO)
OUR = utils.OUR_BACKENDS  # triton, cuda, cpu, native: each skipped (with its reason) where it cannot run
QUICK_BUDGET_S = 30


@dataclass(frozen=True)
class Shape:
    label: str
    B: int
    N: int
    H: int
    D: int
    norm: str
    style: str
    source: str


COGVIDEOX_5B = Shape("cogvideox-5b", 2, 17776, 48, 64, "layer", "interleaved",
                     "CogVideoX-5B, 49 frames at 720x480: 17550 video + 226 text tokens, 48 heads of 64, "
                     "LayerNorm (affine) + interleaved RoPE")
WAN_14B = Shape("wan2.1-14b-480p", 1, 32760, 40, 128, "rms", "interleaved",
                "Wan2.1-14B size, 81 frames at 832x480: 21 x 30x52 = 32760 tokens, 40 heads of 128; per-head "
                "RMSNorm + interleaved RoPE")
LATTE = Shape("latte-like", 2, 4096, 16, 72, "rms", "half",
              "Latte-XL/2 size, 16 frames of 16x16 tokens, 16 heads of 72; RMSNorm + half-style RoPE")
COGVIDEOX_CPU = Shape("cogvideox-5b-2k", 1, 2048, 48, 64, "layer", "interleaved",
                      "CogVideoX-5B heads, 2048 tokens")
LATTE_CPU = Shape("latte-like-1f", 2, 256, 16, 72, "rms", "half", "Latte-XL/2 heads, one frame of 16x16 tokens")

SHAPES = {
    ("cuda", False): (COGVIDEOX_5B, WAN_14B, LATTE),
    ("cuda", True): (COGVIDEOX_5B, WAN_14B, LATTE),
    ("cpu", False): (COGVIDEOX_CPU, LATTE_CPU),
    ("cpu", True): (LATTE_CPU,),
}


# --------------------------------------------------------------------------------------------------
# Eager PyTorch, as the diffusers processors write it (the `torch` provider; `compile` compiles it)


def _rotate_interleaved(x):
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-imag, real), dim=-1).flatten(-2)


def _rotate_half(x):
    lo, hi = x.chunk(2, dim=-1)
    return torch.cat((-hi, lo), dim=-1)


def _eager(norm: str, style: str):
    rotate = _rotate_interleaved if style == "interleaved" else _rotate_half

    def run(q, k, cos, sin, qw, qb, kw, kb):
        outs = []
        for x, w, b in ((q, qw, qb), (k, kw, kb)):
            x = x.transpose(1, 2)  # [B, H, N, D], as the processors transpose before the norm
            D = x.shape[-1]
            if norm == "layer":
                x = F.layer_norm(x, (D,), w, b, EPS)
            else:
                xf = x.float()
                x = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).type_as(x) * w
            x = (x.float() * cos + rotate(x).float() * sin).to(x.dtype)
            outs.append(x.transpose(1, 2))  # back to the op's [B, N, H, D] (a view)
        return tuple(outs)

    return run


def _ours(norm: str, style: str):
    import i2v_kernels

    def run(q, k, cos, sin, qw, qb, kw, kb):
        return i2v_kernels.qk_norm_rope(q, k, qk_norm=norm, q_norm_weight=qw, q_norm_bias=qb, k_norm_weight=kw,
                                        k_norm_bias=kb, norm_eps=EPS, rope=(cos, sin), rope_style=style)

    return run


def _reference(norm: str, style: str):
    from i2v_kernels.ops.attention import reference

    def run(q, k, cos, sin, qw, qb, kw, kb):
        f = lambda t: None if t is None else t.float()  # noqa: E731
        return tuple(reference.prologue(x.float(), norm, f(w), f(b), EPS, (cos.float(), sin.float()), style)
                     for x, w, b in ((q, qw, qb), (k, kw, kb)))

    return run


def _inputs(shape: Shape, dtype: torch.dtype):
    B, N, H, D = shape.B, shape.N, shape.H, shape.D

    def make(device):
        qkv = torch.randn(B, N, 3 * H * D, device=device, dtype=dtype)
        q, k, _ = qkv.view(B, N, 3, H, D).unbind(2)
        cos, sin = (torch.randn(N, D, device=device) for _ in range(2))  # fp32 tables, as diffusers keeps them
        qw, kw = (1 + 0.1 * torch.randn(D, device=device, dtype=dtype) for _ in range(2))
        qb, kb = (0.1 * torch.randn(D, device=device, dtype=dtype) if shape.norm == "layer" else None
                  for _ in range(2))
        return q, k, cos, sin, qw, qb, kw, kb

    return make


def build_cases(session: Session) -> list[Case]:
    cases = []
    for dtype in session.dtypes:
        for shape in SHAPES[(session.device.type, session.quick)]:
            dims = (shape.B, shape.N, shape.H, shape.D)

            def min_bytes(inputs):
                return 2 * utils.tensor_bytes(inputs[0], inputs[1])  # read q, k; write both

            cases.append(Case(
                op="qk_norm_rope", label=shape.label, dims=dims, dtype=dtype, make_inputs=_inputs(shape, dtype),
                reference=_reference(shape.norm, shape.style), min_bytes=min_bytes,
                extra={"model": shape.source, "qk_norm": shape.norm, "rope_style": shape.style,
                       "rows": shape.B * shape.N * shape.H, "D": shape.D},
            ))
    return cases


def providers(case: Case, session: Session) -> list[Provider]:
    norm, style = case.extra["qk_norm"], case.extra["rope_style"]
    eager = _eager(norm, style)
    compile_skip = session.quick_compile_why_not(case.label == COGVIDEOX_5B.label)
    if session.device.type == "cpu" and session.quick:
        compile_skip = ("left out of --quick on CPU: inductor spends ~20 s compiling each graph on this machine; "
                        "run without --quick to include it")
    out = [utils.eager_provider(eager)]
    if session.wants("compile"):
        out.append(utils.compile_provider(eager, why_not=compile_skip))
    out += utils.backend_providers(_ours(norm, style), session, names=OUR)
    return out


GPU_LEGEND = (
    "GPU, bf16: `bw>=85%` at least 85% of the copy bandwidth measured on the card (q and k read once, both "
    "written once); `compile>=1.0x` at least as fast as torch.compile of eager.",
)
CPU_LEGEND = ("CPU: no targets (the Triton and CUDA kernels run on GPUs; `cpu` is the CUDA kernel's row routine "
              "compiled for the CPU, a correctness twin rather than a tuned CPU kernel; `native` is eager PyTorch "
              "in the input dtype).",)


def targets(row: dict, case: Case, session: Session) -> dict:
    if session.device.type != "cuda" or case.dtype != torch.bfloat16:
        return {"targets": "n/a"}
    frac, vs_compile = row["frac_roofline"], row["ratio_vs_compile"]
    return {
        "bw>=85%": utils.verdict(frac is not None and frac >= 0.85),
        "compile>=1.0x": "n/a" if vs_compile is None else utils.verdict(vs_compile >= 1.0),
    }


def main(argv: Optional[list[str]] = None) -> int:
    session = utils.start_session(FAMILY, "Benchmark of qk_norm_rope", PROVIDERS, OPS, argv, QUICK_BUDGET_S)
    utils.run_cases(session, build_cases(session), providers, targets)
    legend = GPU_LEGEND if session.device.type == "cuda" else CPU_LEGEND
    return session.finish("qk_norm_rope: QK-norm + RoPE on q and k in one pass", legend)


if __name__ == "__main__":
    sys.exit(main())
