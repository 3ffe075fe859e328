"""Run every CUDA C++ op and Triton kernel of i2v_kernels once on tiny and edge shapes.

``python tools/gpu_smoke.py [--device cuda|cpu] [--dry-run] [--jobs N] [--json FILE] [--only TEXT]``

Each case (one public function on one small input: odd sizes, strided and broadcast inputs, empty
tensors where they are valid, and per kernel family one launch with a grid above 65,535 programs or
blocks) is run with each backend forced through ``i2v_kernels.use_backend`` and compared with
``use_backend("torch")``, the fp32 reference. Gradient cases differentiate through the attention
backward (the Triton flash backward) and compare every input's gradient.

On a GPU the backends are ``cuda`` and ``triton``. On the CPU (``--dry-run``, or when no GPU is
visible) they are ``cpu`` (the C++ CPU kernels) and ``triton`` under ``TRITON_INTERPRET=1``; the
grid > 65,535 cases then run only on the C++ CPU kernels, the interpreter being far too slow for
them. A backend without a kernel for an op (or for that dtype/shape) is reported as skipped with the
reason it gave. The script is meant for ``compute-sanitizer --tool memcheck`` (``make gpu-check`` runs
it once plainly to warm Triton's cache, then under the sanitizer), so shapes stay tiny.

Exit status: 0 when every case that ran matched the reference, 1 otherwise (2 on bad arguments).
Output: one line per case and backend, a count per op and backend, and with ``--json`` the same
records as a JSON list.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

GPU_BACKENDS = ("cuda", "triton")
CPU_BACKENDS = ("cpu", "triton")
REFERENCE = "torch"
BIG_GRID = 65_535  # the largest gridDim.y / gridDim.z; the big cases launch more programs than this


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python tools/gpu_smoke.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: cuda when a GPU is visible, else cpu (the dry run)")
    p.add_argument("--dry-run", action="store_true",
                   help="run on the CPU: the C++ CPU kernels and Triton under TRITON_INTERPRET=1")
    p.add_argument("--backends", default=None,
                   help="comma-separated backends to force (default: cuda,triton on a GPU; cpu,triton on the CPU)")
    p.add_argument("--only", default=None, help="run only cases whose op or label contains this text")
    p.add_argument("--no-big", action="store_true", help="leave out the grid > 65,535 cases")
    p.add_argument("--jobs", type=int, default=1,
                   help="run the cases in N processes (round-robin shards); Triton compiles in parallel")
    p.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # "k/n", set by --jobs
    p.add_argument("--json", default=None, help="write the records (one per case and backend) to this file")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--plant-oob", action="store_true",
                   help="instead of the cases, one deliberately out-of-bounds read per process (tools/planted_oob.py), "
                        "to check that compute-sanitizer sees these processes; only under the sanitizer")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.shard is not None:
        try:
            k, n = (int(s) for s in args.shard.split("/"))
            if not 0 <= k < n:
                raise ValueError
        except ValueError:
            p.error(f"--shard must be k/n with 0 <= k < n, got {args.shard!r}")
        args.shard = (k, n)
    return args


def choose_device(args: argparse.Namespace) -> str:
    """The device to run on; sets TRITON_INTERPRET=1 for the CPU before Triton is imported."""
    import torch

    if args.dry_run or args.device == "cpu":
        device = "cpu"
    elif args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("gpu_smoke: --device cuda but no CUDA GPU is visible (use --dry-run for the CPU path)")
        device = "cuda"
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    return device


# --------------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    op: str                    # public function (".backward" for gradient cases)
    label: str                 # what is special about the input
    dtype: str                 # "float16" ...
    make: Callable             # make(device) -> inputs (a dict)
    run: Callable              # run(inputs) -> Tensor or tuple of Tensors
    big: bool = False          # a launch with more than BIG_GRID programs/blocks
    grad: bool = False         # run() returns gradients too

    @property
    def name(self) -> str:
        return f"{self.op} [{self.label}] {self.dtype}"


def _tensors(device, dtype_name: str, seed: int, shapes: dict, scale: float = 1.0) -> dict:
    """Random (never zero) tensors made on the CPU from one seed, so every device sees the same data."""
    import torch

    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, dtype_name)
    out = {}
    for name, spec in shapes.items():
        shape, dt = spec if isinstance(spec, tuple) else (spec, dtype)  # (shape, dtype) or a shape
        t = torch.randn(shape, generator=g, dtype=torch.float32) * scale
        out[name] = t.to(device=device, dtype=dt)
    return out


def adaln_cases() -> list[Case]:
    import torch

    import i2v_kernels as k

    def make(shapes, seed, dtype, after=None):
        def build(device):
            t = _tensors(device, dtype, seed, shapes)
            return after(t) if after else t
        return build

    f32 = torch.float32
    cases = [
        Case("adaln_modulate", "odd C=37, per-frame shift, per-sample scale, affine", "float32",
             make({"x": [2, 3, 5, 37], "shift": [2, 3, 1, 37], "scale": [2, 1, 1, 37], "w": [37], "b": [37]}, 1,
                  "float32"),
             lambda t: k.adaln_modulate(t["x"], t["shift"], t["scale"], weight=t["w"], bias=t["b"])),
        Case("adaln_modulate", "strided x (a slice), fp32 scale next to bf16 x", "bfloat16",
             make({"x": [2, 7, 80], "shift": [2, 1, 64], "scale": ([64], f32)}, 2, "bfloat16",
                  lambda t: dict(t, x=t["x"][..., :64])),
             lambda t: k.adaln_modulate(t["x"], t["shift"], t["scale"])),
        Case("adaln_modulate", "wide row C=16392 (streamed, vectorized)", "float16",
             make({"x": [2, 16392], "shift": [16392], "scale": [2, 16392]}, 3, "float16"),
             lambda t: k.adaln_modulate(t["x"], t["shift"], t["scale"])),
        Case("adaln_modulate", "empty x [0, 4, 32]", "float16",
             make({"x": [0, 4, 32], "shift": [32], "scale": [32]}, 4, "float16"),
             lambda t: k.adaln_modulate(t["x"], t["shift"], t["scale"])),
        Case("gated_residual", "odd C=33, per-sample gate", "float16",
             make({"x": [3, 5, 33], "y": [3, 5, 33], "gate": [3, 1, 33]}, 5, "float16"),
             lambda t: k.gated_residual(t["x"], t["y"], t["gate"])),
        Case("gated_residual", "empty x [2, 0, 16], no gate", "bfloat16",
             make({"x": [2, 0, 16], "y": [2, 0, 16]}, 6, "bfloat16"),
             lambda t: k.gated_residual(t["x"], t["y"], None)),
        Case("gated_residual_adaln", "per-frame gate/scale, per-sample shift, weight", "float16",
             make({"x": [2, 4, 3, 40], "y": [2, 4, 3, 40], "gate": [2, 4, 1, 40], "shift": [2, 1, 1, 40],
                   "scale": [2, 4, 1, 40], "w": [40]}, 7, "float16"),
             lambda t: k.gated_residual_adaln(t["x"], t["y"], t["gate"], t["shift"], t["scale"], weight=t["w"])),
        Case("gated_residual_adaln", "wide odd row C=8193 (streamed, scalar)", "float32",
             make({"x": [2, 8193], "y": [2, 8193], "gate": [8193], "shift": [2, 8193], "scale": [8193]}, 8,
                  "float32"),
             lambda t: k.gated_residual_adaln(t["x"], t["y"], t["gate"], t["shift"], t["scale"])),
        Case("gated_residual_adaln", f"1,048,580 rows of C=8: grid > {BIG_GRID:,}", "float16",
             make({"x": [4, 262145, 8], "y": [4, 262145, 8], "gate": [4, 1, 8], "shift": [8], "scale": [4, 1, 8]},
                  9, "float16"),
             lambda t: k.gated_residual_adaln(t["x"], t["y"], t["gate"], t["shift"], t["scale"]), big=True),
        Case("rms_norm", "odd C=19 with weight", "bfloat16",
             make({"x": [5, 3, 19], "w": [19]}, 10, "bfloat16"),
             lambda t: k.rms_norm(t["x"], t["w"])),
        Case("rms_norm", "C=128, no weight", "float32",
             make({"x": [4, 128]}, 11, "float32"),
             lambda t: k.rms_norm(t["x"])),
    ]
    return cases


def _packed(t: dict, B, T, S, H, D) -> dict:
    """q, k, v as strided views of one packed projection (as a DiT block makes them)."""
    q, k_, v = t["qkv"].view(B, T, S, 3, H, D).unbind(3)
    return dict(t, q=q, k=k_, v=v)


def attention_cases() -> list[Case]:
    import torch

    import i2v_kernels as k

    def video(seed, dtype, B, T, S, H, D, extra=None, packed=False):
        def build(device):
            shapes = {"qkv": [B, T, S, 3 * H * D]} if packed else {n: [B, T, S, H, D] for n in "qkv"}
            t = _tensors(device, dtype, seed, dict(shapes, **(extra or {})))
            return _packed(t, B, T, S, H, D) if packed else t
        return build

    def dense(seed, dtype, B, N, M, H, D, kv_lens=None):
        def build(device):
            t = _tensors(device, dtype, seed, {"q": [B, N, H, D], "k": [B, M, H, D], "v": [B, M, H, D]})
            if kv_lens is not None:
                t["kv_lens"] = torch.tensor(kv_lens, dtype=torch.int32, device=device)
            return t
        return build

    def rope_norm(t, style):
        return dict(t, rope=(t["cos"], t["sin"]), rope_style=style)

    spatial = lambda t, **kw: k.spatial_attention(t["q"], t["k"], t["v"], **kw)
    temporal = lambda t, **kw: k.temporal_attention(t["q"], t["k"], t["v"], **kw)
    full = lambda t, **kw: k.attention(t["q"], t["k"], t["v"], kv_lens=t.get("kv_lens"), **kw)

    cases = [
        Case("spatial_attention", "odd S=37, D=40, H=3", "float16", video(20, "float16", 1, 2, 37, 3, 40), spatial),
        Case("spatial_attention", "packed-QKV strided views, S=33", "bfloat16",
             video(21, "bfloat16", 2, 3, 33, 2, 16, packed=True), spatial),
        Case("spatial_attention", "rms QK-norm + interleaved RoPE, S=21", "float16",
             video(22, "float16", 1, 2, 21, 2, 32, extra={"qw": [32], "kw": [32], "cos": [21, 32], "sin": [21, 32]}),
             lambda t: spatial(t, qk_norm="rms", q_norm_weight=t["qw"], k_norm_weight=t["kw"],
                               rope=(t["cos"], t["sin"]))),
        Case("spatial_attention", "empty B=0", "float16", video(23, "float16", 0, 2, 5, 1, 16), spatial),
        Case("spatial_attention", f"B*T*H = 65,537 frames: grid > {BIG_GRID:,}", "float16",
             video(24, "float16", 1, 65537, 3, 1, 16), spatial, big=True),
        Case("temporal_attention", "odd T=7, S=5, D=24", "float16", video(30, "float16", 1, 7, 5, 3, 24), temporal),
        Case("temporal_attention", "causal, T=13, D=64", "bfloat16", video(31, "bfloat16", 2, 13, 3, 2, 64),
             lambda t: temporal(t, causal=True)),
        Case("temporal_attention", "fp32, T=9", "float32", video(32, "float32", 1, 9, 5, 2, 32), temporal),
        Case("temporal_attention", "causal, T=130 (past the packed kernel)", "float16",
             video(33, "float16", 1, 130, 2, 1, 16), lambda t: temporal(t, causal=True)),
        Case("temporal_attention", "layer QK-norm with biases + half RoPE, T=6", "bfloat16",
             video(34, "bfloat16", 1, 6, 4, 2, 32,
                   extra={"qw": [32], "qb": [32], "kw": [32], "kb": [32], "cos": [6, 4, 32], "sin": [6, 4, 32]}),
             lambda t: temporal(t, qk_norm="layer", q_norm_weight=t["qw"], q_norm_bias=t["qb"],
                                k_norm_weight=t["kw"], k_norm_bias=t["kb"], rope=(t["cos"], t["sin"]),
                                rope_style="half")),
        Case("temporal_attention", f"B*S*H = 266,000 positions: grid > {BIG_GRID:,}", "float16",
             video(35, "float16", 1, 2, 266000, 1, 8), lambda t: temporal(t, causal=True), big=True),
        Case("attention", "dense, N=M=33", "float16", dense(40, "float16", 2, 33, 33, 2, 16), full),
        Case("attention", "cross with kv_lens [29, 5], N=17, M=29", "bfloat16",
             dense(41, "bfloat16", 2, 17, 29, 3, 32, kv_lens=[29, 5]), full),
        Case("attention", "odd D=72, N=45", "float16", dense(42, "float16", 1, 45, 45, 2, 72), full),
        Case("attention", "empty N=0 queries", "bfloat16", dense(43, "bfloat16", 1, 0, 7, 2, 16), full),
        Case("attention", f"B*H = 65,537 heads: grid > {BIG_GRID:,}", "float16",
             dense(44, "float16", 1, 5, 5, 65537, 8), full, big=True),
    ]

    def with_grad(fn):
        """Forward, then backward with a fixed random upstream gradient: (out, dq, dk, dv)."""
        def run(t):
            leaves = {n: t[n].detach().clone().requires_grad_(True) for n in "qkv"}
            out = fn(dict(t, **leaves))
            g = torch.Generator().manual_seed(99)
            grad_out = torch.randn(out.shape, generator=g).to(device=out.device, dtype=out.dtype)
            dq, dk, dv = torch.autograd.grad(out, [leaves[n] for n in "qkv"], grad_out)
            return out.detach(), dq, dk, dv
        return run

    cases += [
        Case("spatial_attention.backward", "S=19, H=2", "float16", video(50, "float16", 1, 2, 19, 2, 16),
             with_grad(spatial), grad=True),
        Case("temporal_attention.backward", "causal, T=7", "float16", video(51, "float16", 1, 7, 5, 2, 16),
             with_grad(lambda t: temporal(t, causal=True)), grad=True),
        Case("attention.backward", "cross with kv_lens [13, 4]", "bfloat16",
             dense(52, "bfloat16", 2, 9, 13, 2, 32, kv_lens=[13, 4]), with_grad(full), grad=True),
    ]
    return cases


def conv3d_cases() -> list[Case]:
    import torch

    import i2v_kernels as k

    def make(seed, dtype, shapes, channels_last=False):
        def build(device):
            t = _tensors(device, dtype, seed, shapes, scale=0.5)
            if channels_last:
                t["x"] = t["x"].contiguous(memory_format=torch.channels_last_3d)
            return t
        return build

    def conv(t, **kw):
        return k.causal_conv3d(t["x"], t["w"], t.get("b"), cache=t.get("cache"), residual=t.get("res"), **kw)

    return [
        Case("causal_conv3d", "odd T/H/W, k=3, bias, time_pad=replicate", "float32",
             make(60, "float32", {"x": [1, 3, 5, 7, 9], "w": [4, 3, 3, 3, 3], "b": [4]}),
             lambda t: conv(t, time_pad="replicate")),
        Case("causal_conv3d", "time_pad=zeros, stride (1, 2, 2)", "float16",
             make(61, "float16", {"x": [2, 2, 4, 9, 11], "w": [3, 2, 3, 3, 3]}),
             lambda t: conv(t, time_pad="zeros", stride=(1, 2, 2))),
        Case("causal_conv3d", "frame cache of 2 frames, bias", "bfloat16",
             make(62, "bfloat16", {"x": [1, 4, 3, 6, 5], "w": [5, 4, 3, 3, 3], "b": [5], "cache": [1, 4, 2, 6, 5]}),
             conv),
        Case("causal_conv3d", "temporal stride 2, dilation (2, 1, 1), k=(3, 1, 1)", "float16",
             make(63, "float16", {"x": [1, 3, 9, 5, 5], "w": [2, 3, 3, 1, 1]}),
             lambda t: conv(t, stride=(2, 1, 1), dilation=(2, 1, 1))),
        Case("causal_conv3d", "kt=1 (no time padding), channels_last_3d x, residual", "float32",
             make(64, "float32", {"x": [1, 8, 2, 4, 4], "w": [8, 8, 1, 3, 3], "res": [1, 8, 2, 4, 4]},
                  channels_last=True),
             conv),
        Case("causal_conv3d", "empty B=0", "float16",
             make(65, "float16", {"x": [0, 2, 3, 4, 4], "w": [3, 2, 3, 3, 3]}), conv),
        Case("causal_conv3d", f"8.4 M output positions: grid > {BIG_GRID:,}", "float16",
             make(66, "float16", {"x": [1, 1, 1, 2048, 4097], "w": [1, 1, 1, 1, 1]}), conv, big=True),
    ]


def qk_norm_rope_cases() -> list[Case]:
    """The CUDA kernel's access widths (16-byte, 8-byte, scalar), both RoPE styles, odd D, fp32 and
    same-dtype side tensors, an empty input and a grid of more than 65,535 blocks."""
    import i2v_kernels as k

    def packed(seed, dtype, lead, H, D, side=None, offset=0, table=None):
        def build(device):
            import torch

            dt = lambda shape: (shape, getattr(torch, side)) if side else shape  # noqa: E731
            shapes = {"qkv": list(lead) + [3 * H * D + offset], "w": dt([4, D])}
            if table is not None:
                shapes["table"] = dt([2] + list(table) + [D])
            t = _tensors(device, dtype, seed, shapes)
            qkv = t["qkv"][..., offset:].unflatten(-1, (3, H, D))  # offset: rows off the 16-byte grid
            return dict(t, q=qkv[..., 0, :, :], k=qkv[..., 1, :, :])
        return build

    def call(norm, style="interleaved", affine=True):
        def run(t):
            w = t["w"]
            extra = dict(q_norm_weight=w[0], k_norm_weight=w[2]) if affine and norm else {}
            if affine and norm == "layer":
                extra.update(q_norm_bias=w[1], k_norm_bias=w[3])
            rope = (t["table"][0], t["table"][1]) if "table" in t else None
            return k.qk_norm_rope(t["q"], t["k"], qk_norm=norm, rope=rope, rope_style=style, **extra)
        return run

    return [
        Case("qk_norm_rope", "CogVideoX-like packed QKV, D=64, fp32 table: 16-byte accesses", "bfloat16",
             packed(70, "bfloat16", (2, 33), 3, 64, side="float32", table=(33,)), call("layer")),
        Case("qk_norm_rope", "half RoPE, D=40 (8-byte accesses), same-dtype table", "float16",
             packed(71, "float16", (2, 3, 7), 2, 40, table=(3, 7)), call("rms", "half")),
        Case("qk_norm_rope", "rows 1 element off alignment, D=72: scalar accesses", "bfloat16",
             packed(72, "bfloat16", (2, 9), 2, 72, offset=1, table=(9,)), call("layer", "half")),
        Case("qk_norm_rope", "odd D=33, no RoPE", "float32", packed(73, "float32", (3, 5), 3, 33), call("rms")),
        Case("qk_norm_rope", "D=256, interleaved", "float32", packed(74, "float32", (2, 5), 2, 256, table=(5,)),
             call("layer")),
        Case("qk_norm_rope", "empty q [2, 0, 3, 16]", "bfloat16", packed(75, "bfloat16", (2, 0), 3, 16, table=(0,)),
             call("rms")),
        Case("qk_norm_rope", f"16.8 M rows of D=2: grid > {BIG_GRID:,}", "float16",
             packed(76, "float16", (65_536 * 256 + 3,), 1, 2, table=(1,)), call("rms", affine=False),
             big=True),
    ]


def all_cases() -> list[Case]:
    return adaln_cases() + attention_cases() + qk_norm_rope_cases() + conv3d_cases()


# --------------------------------------------------------------------------------------------------
# Running and checking

# |out - ref| <= atol + rtol * |ref| against the torch backend (fp32 math, rounded to the dtype once).
# A smoke check, not the precision tests: loose enough for any correct kernel, tight enough for a
# wrong index. Gradients (several rounded stages) get GRAD_FACTOR times more.
TOL = {"float32": (1e-4, 1e-4), "float16": (5e-3, 5e-3), "bfloat16": (3e-2, 3e-2), "float64": (1e-9, 1e-9)}
GRAD_FACTOR = 4.0


def compare(out, ref, dtype: str, grad: bool = False) -> tuple[bool, float, Optional[str]]:
    """(ok, max abs error, why not ok) of ``out`` against ``ref`` (tensors or tuples of tensors)."""
    import torch

    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    if len(outs) != len(refs):
        return False, math.inf, f"{len(outs)} outputs, the reference has {len(refs)}"
    atol, rtol = TOL[dtype]
    if grad:
        atol, rtol = atol * GRAD_FACTOR, rtol * GRAD_FACTOR
    worst = 0.0
    for i, (o, r) in enumerate(zip(outs, refs)):
        if tuple(o.shape) != tuple(r.shape):
            return False, math.inf, f"output {i}: shape {tuple(o.shape)}, reference {tuple(r.shape)}"
        if o.dtype != r.dtype:
            return False, math.inf, f"output {i}: dtype {o.dtype}, reference {r.dtype}"
        if o.numel() == 0:
            continue
        o64, r64 = o.detach().double().cpu(), r.detach().double().cpu()
        bad_nan = torch.isnan(o64) & ~torch.isnan(r64)
        if bad_nan.any():
            return False, math.inf, f"output {i}: {int(bad_nan.sum())} NaN where the reference is a number"
        err = (o64 - r64).abs().nan_to_num(0.0)
        worst = max(worst, float(err.max()))
        over = err > atol + rtol * r64.abs().nan_to_num(0.0)
        if over.any():
            return False, worst, (f"output {i}: {int(over.sum())} of {o.numel()} elements off by more than "
                                  f"atol {atol:g} + rtol {rtol:g} (max error {worst:.3g})")
    return True, worst, None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400]


def reference(case: Case, inputs: dict, sync: Callable[[], None]):
    """(the torch backend's result, None) -- or, when it fails on a GPU, (its result on CPU copies of the
    inputs, why it failed on the GPU): the GPU failure is a finding of its own, reported as such."""
    import torch

    import i2v_kernels

    try:
        with i2v_kernels.use_backend(REFERENCE):
            out = case.run(inputs)
        sync()
        return out, None
    except Exception as e:
        if not any(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs.values()):
            raise
        why = f"the {REFERENCE} backend failed on the GPU ({_first_line(e)}); compared against it on the CPU"
    cpu_inputs = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with i2v_kernels.use_backend(REFERENCE):
        return case.run(cpu_inputs), why


def run_case(case: Case, device: str, backends, sync: Callable[[], None]) -> list[dict]:
    """Run one case on each backend; one record per backend."""
    import i2v_kernels
    from i2v_kernels import BackendUnavailableError

    records = []
    base = {"op": case.op, "label": case.label, "dtype": case.dtype, "device": device, "big": case.big}
    try:
        inputs = case.make(device)
    except Exception as e:  # e.g. a CUDA context broken by an earlier case
        return [dict(base, backend=b, status="fail", reason="inputs: " + _first_line(e)) for b in backends]
    ref = None
    for backend in backends:
        rec = dict(base, backend=backend)
        started = time.perf_counter()
        if case.big and device == "cpu" and backend == "triton":
            records.append(dict(rec, status="skip", reason="grid > 65,535 cases run on the GPU, or on the CPU "
                                "through the C++ kernels: the Triton interpreter runs one program at a time"))
            continue
        try:
            with i2v_kernels.use_backend(backend):
                out = case.run(inputs)
            sync()
        except BackendUnavailableError as e:
            records.append(dict(rec, status="skip", reason=str(e).split("cannot run: ", 1)[-1]))
            continue
        except Exception as e:  # a crash of one backend is that backend's failure; go on
            records.append(dict(rec, status="fail", reason=_first_line(e), traceback=traceback.format_exc()[-3000:]))
            continue
        try:
            if ref is None:
                ref, broken = reference(case, inputs, sync)
                if broken:
                    records.append(dict(base, backend=REFERENCE, status="fail", reason=broken))
            ok, err, why = compare(out, ref, case.dtype, case.grad)
        except Exception as e:
            records.append(dict(rec, status="fail", reason="reference: " + _first_line(e),
                                traceback=traceback.format_exc()[-3000:]))
            continue
        records.append(dict(rec, status="ok" if ok else "fail", max_err=err, reason=why,
                            seconds=round(time.perf_counter() - started, 3)))
    return records


def _line(r: dict) -> str:
    status = {"ok": "ok  ", "skip": "skip", "fail": "FAIL"}[r["status"]]
    text = f"{status}  {r['backend']:<6} {r['op']} [{r['label']}] {r['dtype']}"
    if r["status"] == "ok":
        return text + f"  max err {r['max_err']:.2g}"
    return text + f"  -- {r['reason']}"


def summarize(records: list[dict]) -> list[str]:
    """Counts per op and backend, and the totals."""
    table: dict[tuple[str, str], dict[str, int]] = {}
    for r in records:
        cell = table.setdefault((r["op"], r["backend"]), {"ok": 0, "skip": 0, "fail": 0})
        cell[r["status"]] += 1
    lines = ["", f"{'op':<30} {'backend':<7} {'ok':>3} {'skip':>4} {'fail':>4}"]
    for (op, backend), c in sorted(table.items()):
        lines.append(f"{op:<30} {backend:<7} {c['ok']:>3} {c['skip']:>4} {c['fail']:>4}")
    fails = [r for r in records if r["status"] == "fail"]
    ran = sum(1 for r in records if r["status"] != "skip")
    lines.append(f"\n{len(records)} runs: {ran - len(fails)} ok, {len(fails)} failed, "
                 f"{len(records) - ran} skipped")
    return lines


def triton_kernels() -> Optional[dict[str, bool]]:
    """Each @triton.jit kernel of the package (``i2v_kernels/ops/<family>/triton.py``, found by walking the
    families, so a new one shows up) -> whether this process compiled it (GPU only; None when
    this triton does not say: its JITFunction has no ``device_caches``)."""
    import importlib
    import importlib.util
    import pkgutil

    import triton

    import i2v_kernels.ops

    families = [m.name for m in pkgutil.iter_modules(i2v_kernels.ops.__path__) if m.ispkg]
    seen = {}
    for module in (f"i2v_kernels.ops.{f}.triton" for f in families):
        if importlib.util.find_spec(module) is None:
            continue
        for name, fn in vars(importlib.import_module(module)).items():
            if not isinstance(fn, triton.runtime.jit.JITFunction) or not name.endswith("_kernel"):
                continue
            caches = getattr(fn, "device_caches", None)
            if caches is None:
                return None
            seen[f"{module.rsplit('.', 2)[1]}.{name}"] = any(
                entry[0] for entry in caches.values() if isinstance(entry, tuple) and entry)
    return seen


def coverage_line(per_process: list[Optional[dict[str, bool]]]) -> str:
    """One line: which of the package's Triton kernels no process compiled."""
    if not per_process or any(p is None for p in per_process):
        return "triton kernels compiled: this triton does not say (no JITFunction.device_caches)"
    names = sorted(set().union(*per_process))
    missing = [n for n in names if not any(p.get(n) for p in per_process)]
    return (f"triton kernels compiled: all {len(names)}" if not missing else
            f"triton kernels never compiled ({len(missing)} of {len(names)}): {', '.join(missing)}")


def shard_files(json_path: str, jobs: int) -> list[str]:
    """Where shard ``i`` of ``jobs`` writes its records: next to the merged file, so that a run cut off
    before the merge still leaves them (``tools/gpu_check.py`` merges them then)."""
    return [f"{json_path}.shard{i}" for i in range(jobs)]


def merge_shards(paths: list[str]) -> tuple[list[dict], list, list[str]]:
    """(records, each shard's triton_kernels, shard files that are missing or unreadable)."""
    records, kernels, missing = [], [], []
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            missing.append(path)
            continue
        records += data["records"]
        kernels.append(data.get("triton_kernels"))
    return records, kernels, missing


def _run_sharded(args, argv, device: str) -> int:
    """Re-run this script in ``args.jobs`` processes (one shard each) and merge their records."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gpu_smoke-") as tmp:
        outs = shard_files(args.json or os.path.join(tmp, "smoke.json"), args.jobs)
        base = _drop_values(argv, ("--jobs", "--json"))
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *base, "--shard", f"{i}/{args.jobs}",
                                   "--json", out]) for i, out in enumerate(outs)]
        interrupted = False
        try:
            codes = [p.wait() for p in procs]
        except KeyboardInterrupt:  # the shards got the same SIGINT: they write what they have and exit
            interrupted = True
            deadline = time.monotonic() + 2.0
            for p in procs:
                try:
                    p.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
            codes = [p.wait() for p in procs]
        records, kernels, missing = merge_shards(outs)
    for path, code in zip(outs, codes):
        if path in missing:
            records.append({"op": "(shard)", "label": os.path.basename(path), "dtype": "-", "backend": "-",
                            "device": device, "big": False, "status": "fail",
                            "reason": f"shard exited {code} without records"})
    print("\n".join(summarize(records)))
    coverage = coverage_line(kernels) if device == "cuda" and not (args.only or args.no_big) else None
    if coverage:
        print(coverage)
    _write_json(args.json, records, {"device": device, "jobs": args.jobs, "triton_coverage": coverage,
                                     "interrupted": interrupted})
    if args.json:
        for path in outs:
            if os.path.exists(path):
                os.remove(path)
    if interrupted:
        print("gpu_smoke: interrupted; the records above are what the shards finished")
        return 130
    return 0 if all(c == 0 for c in codes) and not any(r["status"] == "fail" for r in records) else 1


def plant_oob(args, device: str) -> int:
    """--plant-oob: the planted read in each of ``args.jobs`` processes (children, as the real run's shards)."""
    if device != "cuda":
        print("gpu_smoke: --plant-oob needs a GPU (and compute-sanitizer around it)", file=sys.stderr)
        return 2
    if args.jobs > 1 and args.shard is None:
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--device", "cuda", "--plant-oob",
                                   "--shard", f"{i}/{args.jobs}"]) for i in range(args.jobs)]
        return max(p.wait() for p in procs)
    from planted_oob import PAST_END, read_past_end  # tools/ is this script's folder, first on sys.path

    print(f"gpu_smoke: planted read {PAST_END} elements past a 16-element tensor", flush=True)
    try:
        read_past_end()
    except Exception as e:  # under memcheck the kernel is stopped and the launch reports an error
        print(f"gpu_smoke: the planted read raised {_first_line(e)}")
        return 1
    return 0


def _drop_values(argv, flags) -> list[str]:
    """argv without the given flags (``--flag value`` and ``--flag=value``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if any(a.startswith(f + "=") for f in flags):
            continue
        out.append(a)
    return out


def _write_json(path: Optional[str], records: list[dict], extra: dict) -> None:
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(extra, records=records), f, indent=1, default=str)
    os.replace(tmp, path)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = choose_device(args)
    if args.plant_oob:
        return plant_oob(args, device)
    if args.jobs > 1 and args.shard is None and not args.list:
        return _run_sharded(args, argv, device)

    import torch

    # Outputs a kernel forgets to write read as NaN (as in the tests), and fp32 compares against
    # full-precision math: no TF32 in the reference's matmuls or in cuDNN.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    backends = tuple(args.backends.split(",")) if args.backends else (GPU_BACKENDS if device == "cuda" else CPU_BACKENDS)
    cases = all_cases()
    if args.only:
        cases = [c for c in cases if args.only in c.op or args.only in c.label]
    if args.no_big:
        cases = [c for c in cases if not c.big]
    if args.shard is not None:
        k, n = args.shard
        cases = cases[k::n]
    if args.list:
        print("\n".join(c.name + ("  (big grid)" if c.big else "") for c in cases))
        return 0

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    print(f"gpu_smoke: {len(cases)} cases on {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}), "
          f"backends {', '.join(backends)} against {REFERENCE}"
          + (", Triton interpreted" if device == "cpu" else "")
          + (f", shard {args.shard[0]}/{args.shard[1]}" if args.shard else ""), flush=True)
    started = time.perf_counter()
    records = []
    meta = {"device": device, "backends": list(backends)}
    try:
        for case in cases:
            recs = run_case(case, device, backends, sync)
            records += recs
            for r in recs:
                print(_line(r), flush=True)
            _write_json(args.json, records, dict(meta, interrupted=True))  # what is done survives a kill
    except KeyboardInterrupt:
        print(f"gpu_smoke: interrupted after {len({(r['op'], r['label']) for r in records})} of {len(cases)} cases")
        _write_json(args.json, records, dict(meta, interrupted=True))
        return 130
    if args.shard is None:
        print("\n".join(summarize(records)))
    kernels = triton_kernels() if device == "cuda" and "triton" in backends else None
    coverage = None
    if kernels is not None and args.shard is None and not (args.only or args.no_big):
        coverage = coverage_line([kernels])
        print(coverage)
    print(f"gpu_smoke: {time.perf_counter() - started:.1f} s")
    _write_json(args.json, records, dict(meta, interrupted=False, triton_kernels=kernels, triton_coverage=coverage))
    return 1 if any(r["status"] == "fail" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
