"""Benchmark of attention variants: ``python -m benchmarks.bench_attention [--quick] [--device cpu|cuda]``.

Ops, on video tokens ``[B, T, S, H, D]`` taken as strided views of one packed QKV projection
(``qkv.view(B, T, S, 3, H, D).unbind(3)``), as a DiT block makes them:

* ``spatial``     each frame attends within itself (sequence ``S``, batch ``B*T*H``)
* ``temporal``    each position attends across frames (sequence ``T``, batch ``B*S*H``) -- memory-bound
* ``dense``       full 3D attention over all ``T*S`` tokens (CogVideoX, Wan)
* ``factorized``  spatial then temporal on the same video: the cost a factorized model pays instead of
  ``dense`` -- compare the two ops' rows of one shape
* ``cross``       video tokens attend to ``M`` text tokens (77 CLIP, 226 T5 in CogVideoX, 512 in Wan)

Providers: ``torch`` (eager as a DiT writes it: rearrange copies into SDPA's ``[B, H, S, D]`` and back,
SDPA default backend), ``math`` (eager with materialized scores), ``sdpa-flash`` / ``sdpa-efficient`` /
``sdpa-cudnn`` / ``sdpa-math`` (the same eager code pinned to one SDPA backend), ``compile`` (torch.compile
of the eager code), our ``triton``, ``cuda``, ``native`` and ``native_packed`` backends and the outside
``flash_attn`` / ``sageattention`` backends (forced with ``use_backend``; skipped with the reason when not
installed), ``auto`` (the measured dispatch), and xformers when installed. FLOPs = 4*B*H*Sq*Sk*D (half when causal);
TFLOP/s against a bf16 matmul measured on the card for spatial/dense/cross, GB/s against the measured copy
bandwidth for temporal.

``--quick`` on a GPU keeps every model shape (the static dispatch table is generated from these rows),
thins the sweeps, and compiles at the headline shape (CogVideoX-5B) only.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from benchmarks import utils
from benchmarks.utils import Case, Provider, Session

FAMILY = "attention"
OPS = ("spatial", "temporal", "dense", "factorized", "cross")
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
OURS = ("triton", "cuda", "native", "native_packed", *utils.OUTSIDE_BACKENDS)
PROVIDERS = ("torch", "math", *(f"sdpa-{b}" for b in SDPA_BACKENDS), "compile", *OURS, utils.AUTO, "xformers")
HEADLINE = "cogvideox-5b"  # the shape a GPU --quick run compiles at
QUICK_BUDGET_S = 90


@dataclass(frozen=True)
class Video:
    label: str
    B: int
    T: int
    S: int
    H: int
    D: int
    source: str


LATTE = Video("latte-xl", 2, 16, 256, 16, 72, "Latte-XL/2: 16 frames of 16x16 tokens, 16 heads of 72")
COGVIDEOX_5B = Video("cogvideox-5b", 2, 13, 1350, 48, 64, "CogVideoX-5B: 13 latent frames of 30x45 tokens, 48 heads of 64")
WAN_14B = Video("wan2.1-14b", 1, 21, 1560, 40, 128, "Wan2.1-14B 480p: 21 latent frames of 30x52 tokens, 40 heads of 128")
SWEEP = tuple(Video(f"sweep-S{S}-D{D}", 1, 4, S, 16, D, "sweep over tokens per frame")
              for S in (1024, 2048, 4096) for D in (64, 128))
T_SWEEP = tuple(Video(f"sweep-T{T}", 1, T, 4096, 16, 64, "sweep over frames") for T in (8, 16, 32, 49, 64, 128))
T_SWEEP_QUICK = tuple(v for v in T_SWEEP if v.T in (8, 32, 128))
CPU_SMALL = Video("cpu-small", 1, 8, 256, 4, 64, "small CPU shape (Latte-like frame, 4 heads)")
TEXT_TOKENS = {"cogvideox-5b": 226, "wan2.1-14b": 512, "latte-xl": 77}

SHAPES = {
    ("cuda", False): {"spatial": (LATTE, COGVIDEOX_5B, WAN_14B) + SWEEP,
                      "temporal": (LATTE, COGVIDEOX_5B, WAN_14B) + T_SWEEP,
                      "dense": (LATTE, COGVIDEOX_5B),
                      "factorized": (LATTE, COGVIDEOX_5B),
                      "cross": (LATTE, COGVIDEOX_5B, WAN_14B)},
    ("cuda", True): {"spatial": (LATTE, COGVIDEOX_5B, WAN_14B),
                     "temporal": (LATTE, COGVIDEOX_5B, WAN_14B) + T_SWEEP_QUICK,
                     "dense": (LATTE, COGVIDEOX_5B),
                     "factorized": (),
                     "cross": (LATTE, COGVIDEOX_5B, WAN_14B)},
    ("cpu", False): {op: (CPU_SMALL,) for op in OPS},
    ("cpu", True): {"spatial": (CPU_SMALL,), "temporal": (CPU_SMALL,), "dense": (), "factorized": (), "cross": ()},
}


# --------------------------------------------------------------------------------------------------
# Eager PyTorch as video DiTs write it: rearrange (a copy) into [batch, heads, seq, D], SDPA, and back


def _to_heads(mode, t):
    """``[B, T, S, H, D]`` -> SDPA's ``[batch, H, seq, D]`` (``reshape`` of a permuted view copies)."""
    B, T, S, H, D = t.shape
    if mode == "spatial":
        return t.reshape(B * T, S, H, D).transpose(1, 2).contiguous()
    if mode == "temporal":
        return t.permute(0, 2, 3, 1, 4).reshape(B * S, H, T, D)
    return t.reshape(B, T * S, H, D).transpose(1, 2).contiguous()


def _from_heads(mode, o, shape):
    B, T, S, H, D = shape
    if mode == "spatial":
        return o.transpose(1, 2).reshape(B, T, S, H, D)
    if mode == "temporal":
        return o.reshape(B, S, H, T, D).permute(0, 3, 1, 2, 4).contiguous()
    return o.transpose(1, 2).reshape(B, T, S, H, D)


def _math_attention(q, k, v):
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return scores.softmax(-1) @ v


def _eager(mode, attend):
    def fn(q, k, v):
        return _from_heads(mode, attend(_to_heads(mode, q), _to_heads(mode, k), _to_heads(mode, v)), q.shape)

    return fn


def _eager_factorized(attend):
    spatial, temporal = _eager("spatial", attend), _eager("temporal", attend)
    return lambda q, k, v: temporal(spatial(q, k, v), k, v)


def _eager_cross(attend):
    def fn(q, k, v):  # q [B, N, H, D], k/v [B, M, H, D]
        t = lambda x: x.transpose(1, 2)
        return t(attend(t(q), t(k), t(v))).contiguous()

    return fn


def _pinned(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]

    def attend(q, k, v):
        with sdpa_kernel(which):
            return F.scaled_dot_product_attention(q, k, v)

    return attend


def _eager_for(op, attend):
    if op == "factorized":
        return _eager_factorized(attend)
    if op == "cross":
        return _eager_cross(attend)
    return _eager(op, attend)


def _ours(op):
    import i2v_kernels

    return {
        "spatial": i2v_kernels.spatial_attention,
        "temporal": i2v_kernels.temporal_attention,
        "dense": lambda q, k, v: i2v_kernels.attention(q.flatten(1, 2), k.flatten(1, 2), v.flatten(1, 2)).unflatten(
            1, q.shape[1:3]),
        "factorized": lambda q, k, v: i2v_kernels.temporal_attention(i2v_kernels.spatial_attention(q, k, v), k, v),
        "cross": i2v_kernels.attention,
    }[op]


def _reference(op):
    from i2v_kernels.ops.attention import reference

    f32 = lambda *ts: [t.float() for t in ts]  # noqa: E731
    return {
        "spatial": lambda q, k, v: reference.spatial_attention(*f32(q, k, v)),
        "temporal": lambda q, k, v: reference.temporal_attention(*f32(q, k, v)),
        "dense": lambda q, k, v: reference.attention(*f32(q.flatten(1, 2), k.flatten(1, 2), v.flatten(1, 2))).unflatten(
            1, q.shape[1:3]),
        "factorized": lambda q, k, v: reference.temporal_attention(reference.spatial_attention(*f32(q, k, v)),
                                                                    *f32(k, v)),
        "cross": lambda q, k, v: reference.attention(*f32(q, k, v)),
    }[op]


def _xformers(op, session):
    """xformers' memory-efficient attention on ``[batch, seq, H, D]`` views (an outside library that is
    not an i2v_kernels backend)."""
    if session.device.type != "cuda":
        return Provider("xformers", why_not="CUDA only", kind="outside")

    def seq_first(mode, t):
        """[B, T, S, H, D] -> [batch, seq, H, D] (a view where possible)."""
        B, T, S, H, D = t.shape
        if mode == "spatial":
            return t.reshape(B * T, S, H, D)
        if mode == "temporal":
            return t.permute(0, 2, 1, 3, 4).reshape(B * S, T, H, D)
        return t.reshape(B, T * S, H, D)

    def wrap_mode(mode, attend):
        def fn(q, k, v):
            B, T, S, H, D = q.shape
            o = attend(seq_first(mode, q), seq_first(mode, k), seq_first(mode, v))
            if mode == "temporal":
                return o.reshape(B, S, T, H, D).transpose(1, 2)
            return o.reshape(B, T, S, H, D)

        return fn

    def build():
        from xformers.ops import memory_efficient_attention

        if op == "cross":
            return memory_efficient_attention
        if op == "factorized":
            sp, tm = wrap_mode("spatial", memory_efficient_attention), wrap_mode("temporal", memory_efficient_attention)
            return lambda q, k, v: tm(sp(q, k, v), k, v)
        return wrap_mode(op, memory_efficient_attention)

    return utils.outside_provider("xformers", build)


# --------------------------------------------------------------------------------------------------
# Cases


def build_cases(session: Session) -> list[Case]:
    shapes = SHAPES[(session.device.type, session.quick)]
    cases = []
    for dtype in session.dtypes:
        for op in OPS:
            if not session.wants_op(op):
                continue
            for v in shapes[op]:
                cases.append(_case(op, v, dtype))
    return cases


def _case(op: str, v: Video, dtype: torch.dtype) -> Case:
    B, T, S, H, D = v.B, v.T, v.S, v.H, v.D
    extra = {"model": v.source, "B": B, "T": T, "S": S, "H": H, "D": D}
    if op == "cross":
        M = TEXT_TOKENS.get(v.label, 226)
        N = T * S
        extra["M"] = M

        def make(device):
            q = torch.randn(B, N, H, D, device=device, dtype=dtype)
            k, v_ = torch.randn(B, M, 2, H, D, device=device, dtype=dtype).unbind(2)
            return q, k, v_

        flops = 4 * B * H * N * M * D
        dims = (B, N, H, D)
        min_bytes = lambda inputs: 2 * utils.tensor_bytes(inputs[0]) + utils.tensor_bytes(inputs[1], inputs[2])  # noqa: E731
    else:
        def make(device):
            qkv = torch.randn(B, T, S, 3 * H * D, device=device, dtype=dtype)
            return qkv.view(B, T, S, 3, H, D).unbind(3)

        per = {"spatial": B * T * H * S * S * D, "temporal": B * S * H * T * T * D,
               "dense": B * H * (T * S) ** 2 * D}
        flops = 4 * (per["spatial"] + per["temporal"] if op == "factorized" else per[op])
        dims = (B, T, S, H, D)
        passes = 2 if op == "factorized" else 1
        min_bytes = lambda inputs: passes * 4 * utils.tensor_bytes(inputs[0])  # noqa: E731 - read q, k, v; write o
    memory_bound = op == "temporal"
    return Case(op=op, label=v.label, dims=dims, dtype=dtype, make_inputs=make, reference=_reference(op),
                min_bytes=min_bytes, flops=0 if memory_bound else flops, extra=dict(extra, flops=flops))


def providers(case: Case, session: Session) -> list[Provider]:
    op = case.op
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    out = [utils.eager_provider(_eager_for(op, sdpa))]
    big_scores = case.extra["flops"] > 4e12 or (op in ("dense", "factorized") and case.extra["T"] * case.extra["S"] > 8192)
    if session.wants("math"):
        out.append(Provider("math", why_not="scores would not fit in memory (dense attention over the whole video)")
                   if big_scores and op in ("dense", "cross") else
                   Provider("math", _eager_for(op, _math_attention), kind="baseline", skip_on_failure=True))
    for backend in SDPA_BACKENDS:
        name = f"sdpa-{backend}"
        if not session.wants(name):
            continue
        if session.device.type != "cuda" and backend in ("flash", "efficient", "cudnn"):
            out.append(Provider(name, why_not="CUDA-only SDPA backend"))
        elif backend == "math" and big_scores:
            out.append(Provider(name, why_not="the math backend materializes the scores: too large for this shape"))
        else:
            out.append(Provider(name, _eager_for(op, _pinned(backend)), kind="baseline", skip_on_failure=True))
    if session.wants("compile"):
        why = ("left out on CPU: inductor spends ~20 s compiling each graph on this machine"
               if session.device.type == "cpu" else session.quick_compile_why_not(case.label == HEADLINE))
        out.append(utils.compile_provider(_eager_for(op, sdpa), why_not=why))
    out += utils.backend_providers(_ours(op), session, OURS)
    if session.wants("xformers"):
        out.append(_xformers(op, session))
    return out


# --------------------------------------------------------------------------------------------------
# Targets (shared/PERFORMANCE.md); informational only

LEGEND = (
    "GPU, bf16. spatial (S 1k-4k, D 64/128): `sdpa>=1.1x` at least 1.1x the SDPA default (`torch`), "
    "`best>=0.85x` at least 0.85x the fastest SDPA backend. temporal (T 8-128): `bw>=80%` of the copy "
    "bandwidth, `eager>=4x` eager rearrange + SDPA. cross (M 77-512): `sdpa>=1.0x`.",
)



def targets(row: dict, case: Case, session: Session) -> dict:
    if session.device.type != "cuda" or case.dtype != torch.bfloat16:
        return {}
    vs_eager = row["ratio_vs_eager"]
    if case.op == "spatial":
        best = _best_sdpa_ms(case, session)
        out = {"sdpa>=1.1x": "n/a" if vs_eager is None else utils.verdict(vs_eager >= 1.1)}
        if best is not None and row["ms"]:
            out["best>=0.85x"] = utils.verdict(best / row["ms"] >= 0.85)
        return out
    if case.op == "temporal":
        frac = row["frac_roofline"]
        return {"bw>=80%": utils.verdict(frac is not None and frac >= 0.8),
                "eager>=4x": "n/a" if vs_eager is None else utils.verdict(vs_eager >= 4.0)}
    if case.op == "cross":
        return {"sdpa>=1.0x": "n/a" if vs_eager is None else utils.verdict(vs_eager >= 1.0)}
    return {}


#: What every row of ours is compared with in the per-shape table: eager, each SDPA backend, native.
RATIO_BASELINES = ("torch", *(f"sdpa-{b}" for b in SDPA_BACKENDS), "native")


def shape_table(session: Session) -> list[str]:
    """Per shape, each of our providers: TFLOP/s (GB/s where the case is memory-bound: temporal), the
    fraction of the measured roofline, and its speedup over each baseline of RATIO_BASELINES timed in
    the same case."""
    cases: dict[tuple, dict] = {}
    for r in session.rows:
        if r["status"] == "ok" and r["ms"]:
            cases.setdefault((r["op"], r["shape"]["label"], r["dtype"]), {})[r["provider"]] = r
    header = ("| op | shape | dtype | provider | TFLOP/s or GB/s | % roofline | "
              + " | ".join(f"x {b}" for b in RATIO_BASELINES) + " |")
    lines = ["", "## Ours per shape: throughput, roofline, speedup over each SDPA backend and `native`", "",
             "`x <baseline>`: the baseline's time / the row's (> 1: ours is faster); `-`: not timed in this case.",
             "", header, "|" + "---|" * (header.count("|") - 1)]
    for (op, label, dtype), by in cases.items():
        for name, r in by.items():
            if r["kind"] != "ours":
                continue
            speed = f"{r['tflops']:.3g} TFLOP/s" if r["tflops"] else f"{r['gbps']:.3g} GB/s"
            ratios = ["-" if b == name or b not in by else f"{by[b]['ms'] / r['ms']:.2f}x" for b in RATIO_BASELINES]
            frac = "-" if r["frac_roofline"] is None else f"{r['frac_roofline']:.0%}"
            lines.append(f"| {op} | {label} | {dtype} | {name} | {speed} | {frac} | " + " | ".join(ratios) + " |")
    return lines


def _best_sdpa_ms(case: Case, session: Session) -> Optional[float]:
    """Fastest SDPA provider measured for this case (the rows are collected before targets run)."""
    label = case.label
    times = [r["ms"] for r in getattr(session, "case_rows", ()) if r["shape"]["label"] == label and r["op"] == case.op
             and r["ms"] is not None and (r["provider"].startswith("sdpa-") or r["provider"] == "torch")]
    return min(times) if times else None


def main(argv: Optional[list[str]] = None) -> int:
    session = utils.start_session(FAMILY, "Benchmark of attention variants", PROVIDERS, OPS, argv, QUICK_BUDGET_S)
    utils.run_cases(session, build_cases(session), providers, targets)
    status = session.finish("Attention variants: spatial, temporal, dense 3D, factorized, cross", LEGEND)
    session.add_tables(shape_table(session))
    return status


if __name__ == "__main__":
    sys.exit(main())
