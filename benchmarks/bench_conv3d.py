"""Benchmark of the causal 3D convolution: ``python -m benchmarks.bench_conv3d [--quick] [--device cpu|cuda]``.

Ops:

* ``causal_conv3d``  one convolution of a video VAE decoder, ``x [B, Cin, T, H, W]`` -> ``[B, Cout, T, H, W]``:
  ``P = kt - 1`` front frames from the previous chunk (``cache``: chunked decode) or, for a whole
  video, the first frame repeated (``replicate``: CogVideoX) or zeros (``zeros``: Wan); spatial zero
  padding ``k // 2``. FLOPs = 2*kt*kh*kw*Cin*Cout*T'*H'*W'.
* ``vae-decode``     a whole causal decoder (:class:`ToyDecoder`: ``i2v_kernels.nn.CausalConv3d`` +
  per-frame GroupNorm + SiLU, x4 temporal / x8 spatial upsampling, random weights) decoded whole and
  chunk by chunk through ``i2v_kernels.nn.decode_in_chunks`` / ``streaming``: time, peak memory, and
  that the chunked output equals the whole one.

Providers of ``causal_conv3d``: ``torch`` (eager as VAEs write it: ``torch.cat`` of the cache or the
replicated first frame, ``F.pad``, ``F.conv3d``, default NCDHW layout), ``eager-cl`` (the same code on
channels_last_3d tensors), ``cudnn-only`` (``F.conv3d`` alone on an input padded beforehand, channels_last_3d:
the "conv alone" yardstick), ``compile`` (torch.compile of ``torch``), our ``triton``, ``cuda``,
``cpu`` and ``native`` (``cat`` + cuDNN ``conv3d`` on channels_last_3d on GPUs, padded-input oneDNN
``conv3d`` in NCDHW on CPUs) backends (a backend the op does not have is listed as skipped, with the
reason) and ``auto`` (the measured dispatch). Our backends get the input and cache in the op's output
format on the device (``output_format``: channels_last_3d on GPUs, NCDHW on CPUs): that is what they
receive from the previous conv inside a decoder.

Providers of ``vae-decode``: ``torch`` (the decoder with eager convs, whole video), ``torch-chunked``
(eager convs, chunks with explicit caches, outputs joined by ``torch.cat`` -- how diffusers' VAEs
decode), ``whole`` (our ``CausalConv3d`` modules, backend ``auto``: the case's auto row), ``whole-native``
(the same, forced to ``native``) and ``streaming`` (backend ``auto``; writes each chunk into one
preallocated output).

Shapes: the CogVideoX decoder at 480x720 (latent 13x60x90; stage widths 512/256/256/128; frame
batches of 2 latent frames with a 2-frame conv cache) and the Wan2.1 decoder at its 480p, 832x480
(latent 21x60x104; widths 384/384/192/96; one latent frame per call with a 2-frame cache), plus a small
channel sweep; CPU runs use the same widths on small crops.

The model-level runner :func:`run_model_case` (also used by ``bench_diffusers.py``) checks a whole model
the way ``tests/test_diffusers.py`` does: a provider's max error against the fp32 model is at most twice
eager PyTorch's own error in the same dtype plus the dtype's tolerance times the output's scale -- an
elementwise bf16 tolerance does not survive a dozen layers of rounding.
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks import utils
from benchmarks.utils import Case, Provider, Session

FAMILY = "conv3d"
OPS = ("causal_conv3d", "vae-decode")
PROVIDERS = ("torch", "eager-cl", "cudnn-only", "compile", *utils.OUR_BACKENDS, utils.AUTO, "torch-chunked", "whole",
             "whole-native", "streaming")
QUICK_BUDGET_S = 60
CL = torch.channels_last_3d


# --------------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class Conv:
    """One causal conv of a decoder: ``x [B, Cin, T, H, W]``, weight ``[Cout, Cin, *kernel]``.

    ``cached``: a chunk of a chunked decode (the previous chunk's ``kt - 1`` frames are the cache);
    otherwise a whole video padded by ``time_pad``. ``vae``: a real decoder shape (targets apply when
    ``128 <= Cin <= 512``), False for the sweep.
    """

    label: str
    Cin: int
    Cout: int
    T: int
    H: int
    W: int
    cached: bool
    time_pad: str
    source: str
    kernel: tuple = (3, 3, 3)
    B: int = 1
    vae: bool = True


COG = "CogVideoX VAE decoder, 49 frames at 480x720 (latent 13x60x90), frame batches of 2 latent frames"
WAN = "Wan2.1 VAE decoder, 81 frames at 832x480 (latent 21x60x104), one latent frame per call"
GPU_SHAPES = {
    "cog-mid-chunk": Conv("cogvideox-mid-chunk", 512, 512, 2, 60, 90, True, "replicate", COG + ": mid block, 512 ch"),
    "cog-up1-chunk": Conv("cogvideox-up1-chunk", 256, 256, 4, 120, 180, True, "replicate",
                          COG + ": up block 1, 256 ch after the first x2 in time and space"),
    "cog-up2-chunk": Conv("cogvideox-up2-chunk", 256, 256, 8, 240, 360, True, "replicate",
                          COG + ": up block 2, 256 ch"),
    "cog-up3-chunk": Conv("cogvideox-up3-chunk", 128, 128, 8, 480, 720, True, "replicate",
                          COG + ": up block 3, 128 ch at full resolution"),
    "cog-out-chunk": Conv("cogvideox-conv_out-chunk", 128, 3, 8, 480, 720, True, "replicate",
                          COG + ": conv_out to RGB (Cout = 3)"),
    "cog-mid-whole": Conv("cogvideox-mid-whole", 512, 512, 13, 60, 90, False, "replicate",
                          COG.split(",")[0] + ", whole-video decode: mid block over all 13 latent frames"),
    "wan-mid-chunk": Conv("wan-mid-chunk", 384, 384, 1, 60, 104, True, "zeros", WAN + ": mid block, 384 ch"),
    "wan-up2-chunk": Conv("wan-up2-chunk", 192, 192, 4, 240, 416, True, "zeros", WAN + ": up block 2, 192 ch"),
    "wan-up3-chunk": Conv("wan-up3-chunk", 96, 96, 4, 480, 832, True, "zeros", WAN + ": up block 3, 96 ch"),
    "wan-time-conv": Conv("wan-time_conv-k311", 384, 768, 1, 60, 104, True, "zeros",
                          WAN + ": the temporal upsampler's (3,1,1) conv, 384 -> 768 ch", kernel=(3, 1, 1)),
}
SWEEP = tuple(Conv(f"sweep-C{c}", c, c, 4, 96, 96, True, "replicate", f"sweep over channels: {c} ch, 4 frames of 96x96",
                   vae=False) for c in (128, 256, 512))
# CPU: the decoders' widths on small crops (the frame sizes are what make the GPU shapes slow here).
CPU_SHAPES = {
    "cog-up3-chunk": Conv("cogvideox-up3-chunk-crop", 128, 128, 2, 16, 24, True, "replicate",
                          COG + ": up block 3 width, 16x24 crop"),
    "wan-mid-chunk": Conv("wan-mid-chunk-crop", 384, 384, 1, 8, 12, True, "zeros",
                          WAN + ": mid block width, 8x12 crop"),
    "cog-mid-chunk": Conv("cogvideox-mid-chunk-crop", 512, 512, 2, 8, 12, True, "replicate",
                          COG + ": mid block width, 8x12 crop"),
    "cog-whole": Conv("cogvideox-up3-whole-crop", 128, 128, 9, 16, 24, False, "replicate",
                      COG.split(",")[0] + ": up block 3 width, 9 frames whole, 16x24 crop"),
    "wan-time-conv": Conv("wan-time_conv-k311-crop", 384, 768, 1, 8, 12, True, "zeros",
                          WAN + ": temporal upsampler's (3,1,1) conv, 8x12 crop", kernel=(3, 1, 1)),
}

SHAPES = {
    ("cuda", False): tuple(GPU_SHAPES[k] for k in ("cog-mid-chunk", "cog-up1-chunk", "cog-up2-chunk", "cog-up3-chunk",
                                                   "cog-out-chunk", "cog-mid-whole", "wan-mid-chunk", "wan-up2-chunk",
                                                   "wan-up3-chunk", "wan-time-conv")) + SWEEP,
    ("cuda", True): tuple(GPU_SHAPES[k] for k in ("cog-mid-chunk", "cog-up3-chunk", "wan-mid-chunk", "wan-time-conv")),
    ("cpu", False): tuple(CPU_SHAPES.values()),
    ("cpu", True): (CPU_SHAPES["cog-up3-chunk"], CPU_SHAPES["wan-mid-chunk"]),
}


# --------------------------------------------------------------------------------------------------
# Eager PyTorch, as video VAEs write it


def eager_causal_conv3d(x: Tensor, weight: Tensor, bias: Optional[Tensor], cache: Optional[Tensor],
                        time_pad: str) -> Tensor:
    """diffusers' ``CogVideoXCausalConv3d`` / ``WanCausalConv3d`` (stride 1, dilation 1): the front frames
    concatenated in time (the cache, or the first frame ``kt - 1`` times), then ``F.pad`` with the spatial
    zeros (and Wan's temporal zeros), then ``F.conv3d`` -- a padded copy of the input before the conv."""
    return F.conv3d(eager_pad(x, cache, time_pad, weight.shape[2:]), weight, bias)


def eager_pad(x: Tensor, cache: Optional[Tensor], time_pad: str, kernel: Sequence[int]) -> Tensor:
    """``cat(front, x)`` in time and the spatial zeros: the input ``F.conv3d`` then reads unpadded."""
    kt, kh, kw = kernel
    P, zero_frames = kt - 1, 0
    if P and cache is not None:
        x = torch.cat([cache, x], dim=2)
    elif P and time_pad == "replicate":
        x = torch.cat([x[:, :, :1]] * P + [x], dim=2)
    else:
        zero_frames = P
    return F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2, zero_frames, 0))


# --------------------------------------------------------------------------------------------------
# causal_conv3d cases
#
# Inputs of a case (every provider takes them all and uses its own):
#   (x, weight, bias, cache, x_cl, weight_cl, cache_cl, x_padded_cl)
# x / cache in NCDHW and channels_last_3d, and the padded input (cat + F.pad done) for `cudnn-only`.


def _conv_case(s: Conv, dtype: torch.dtype) -> Case:
    kt, kh, kw = s.kernel
    P = kt - 1
    out_dims = (s.B, s.Cout, s.T, s.H, s.W)

    def make(device):
        x = torch.randn(s.B, s.Cin, s.T, s.H, s.W, device=device, dtype=dtype)
        # nn.Conv3d-like scale (std 1/sqrt(fan_in)): outputs of order one, as inside a decoder
        w = torch.randn(s.Cout, s.Cin, kt, kh, kw, device=device, dtype=dtype) * (s.Cin * kt * kh * kw) ** -0.5
        b = torch.randn(s.Cout, device=device, dtype=dtype) * 0.1
        cache = torch.randn(s.B, s.Cin, P, s.H, s.W, device=device, dtype=dtype) if s.cached and P else None
        x_cl, w_cl = x.contiguous(memory_format=CL), w.contiguous(memory_format=CL)
        cache_cl = None if cache is None else cache.contiguous(memory_format=CL)
        x_padded_cl = eager_pad(x, cache, s.time_pad, s.kernel).contiguous(memory_format=CL)
        return x, w, b, cache, x_cl, w_cl, cache_cl, x_padded_cl

    def reference_fn(x, w, b, cache, *_):
        from i2v_kernels.ops.conv3d import reference

        return reference.causal_conv3d(x.float(), w.float(), b.float(), time_pad=s.time_pad,
                                       cache=None if cache is None else cache.float())

    def min_bytes(inputs):
        x, w, b, cache = inputs[:4]
        return utils.tensor_bytes(x, w, b, cache) + math.prod(out_dims) * x.element_size()

    flops = 2 * kt * kh * kw * s.Cin * s.Cout * s.T * s.H * s.W
    extra = {
        "model": s.source, "Cin": s.Cin, "Cout": s.Cout, "kernel": list(s.kernel),
        "cache": [s.B, s.Cin, P, s.H, s.W] if s.cached and P else None,
        "time_pad": "cache" if s.cached else s.time_pad,
        "targets_apply": s.vae and 128 <= s.Cin <= 512,
    }
    return Case(op="causal_conv3d", label=s.label, dims=(s.B, s.Cin, s.T, s.H, s.W), dtype=dtype, make_inputs=make,
                reference=reference_fn, min_bytes=min_bytes, flops=flops, extra=extra)


def build_cases(session: Session) -> list[Case]:
    if not session.wants_op("causal_conv3d"):
        return []
    return [_conv_case(s, dtype) for dtype in session.dtypes for s in SHAPES[(session.device.type, session.quick)]]


def providers(case: Case, session: Session) -> list[Provider]:
    time_pad = case.extra["time_pad"]
    pad = "zeros" if time_pad == "cache" else time_pad  # unused when a cache is given

    def eager(x, w, b, cache, *_):
        return eager_causal_conv3d(x, w, b, cache, pad)

    def eager_cl(_x, _w, b, _cache, x_cl, w_cl, cache_cl, _xp):
        return eager_causal_conv3d(x_cl, w_cl, b, cache_cl, pad)

    def cudnn_only(_x, _w, b, _cache, _x_cl, w_cl, _cache_cl, x_padded_cl):
        return F.conv3d(x_padded_cl, w_cl, b)

    def ours(x, w, b, cache, x_cl, _w_cl, cache_cl, _xp):
        import i2v_kernels

        if x.device.type != "cpu":  # the op's output_format: channels_last_3d on GPUs, NCDHW on CPUs
            x, cache = x_cl, cache_cl
        return i2v_kernels.causal_conv3d(x, w, b, time_pad=pad, cache=cache)

    out = [utils.eager_provider(eager)]
    if session.wants("eager-cl"):
        out.append(Provider("eager-cl", eager_cl, kind="baseline"))
    if session.wants("cudnn-only"):
        out.append(Provider("cudnn-only", cudnn_only, kind="baseline"))
    if session.wants("compile"):
        why = session.quick_compile_why_not(case.label == GPU_SHAPES["cog-mid-chunk"].label)
        if session.device.type == "cpu" and session.quick:
            why = ("left out of --quick on CPU: inductor spends ~20 s compiling each graph on this machine; "
                   "run without --quick to include it")
        out.append(utils.compile_provider(eager, why_not=why))
    out += utils.backend_providers(ours, session)
    return out


# --------------------------------------------------------------------------------------------------
# Targets (shared/PERFORMANCE.md); informational only


CONV_LEGEND = (
    "GPU, bf16/fp16, decoder shapes with 128 <= Cin <= 512 (other cases: n/a): `eager>=1.3x` at least 1.3x "
    "eager cat + F.pad + conv3d (`torch`, NCDHW as VAEs run it); `cudnn>=0.9x` at least 0.9x `cudnn-only`, "
    "cuDNN's conv3d alone on an input padded beforehand (channels_last_3d).",
    "`cudnn-only` does less work than the op (no padding, no cache): it is the yardstick for the conv itself "
    "(on the CPU: the same F.conv3d, oneDNN). Our backends take the input in the op's output format on the "
    "device (channels_last_3d on GPUs, NCDHW on CPUs), as they receive it from the previous conv inside a "
    "decoder; `torch` takes NCDHW, as diffusers' VAEs run.",
)
DECODE_LEGEND = (
    "vae-decode: `mem<=1/3` the `streaming` row's peak memory at most 1/3 of the `whole` row's (same "
    "kernels, whole video in one call); `same` the chunked output equals the whole one to rounding (checked before "
    "timing for `streaming` against `whole` and `torch-chunked` against `torch`: a mismatch fails the run).",
    "Peak MiB: what one call allocates beyond what was live before it, output included: on a GPU the CUDA "
    "allocator's peak, on the CPU the running total of PyTorch's CPU allocator events (torch.profiler with "
    "profile_memory, one untimed call; oneDNN's own scratch buffers are not seen).",
)



def _case_ms(session: Session, case, provider: str) -> Optional[float]:
    for r in session.case_rows:
        if r["provider"] == provider and r["op"] == case.op and r["shape"]["label"] == case.label and r["ms"]:
            return r["ms"]
    return None


def targets(row: dict, case: Case, session: Session) -> dict:
    if session.device.type != "cuda" or case.dtype == torch.float32:
        return {}
    if not case.extra["targets_apply"]:
        return {"targets": "n/a"}
    vs_eager = row["ratio_vs_eager"]
    out = {"eager>=1.3x": "n/a" if vs_eager is None else utils.verdict(vs_eager >= 1.3)}
    cudnn = _case_ms(session, case, "cudnn-only")
    if cudnn is not None:
        out["cudnn>=0.9x"] = utils.verdict(cudnn / row["ms"] >= 0.9)
    return out


# ==================================================================================================
# Model-level cases (a whole decoder here; diffusers models in bench_diffusers.py)

# Per-dtype tolerance on the output's scale (STYLE.md point 11's figures): fp32 1e-5, fp16 1e-3, bf16 1e-2.
MODEL_EPS = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}

MODEL_METHOD_NOTE = (
    "model-level check: max |out - fp32 model| <= 2 x (eager's own max error in this dtype) + eps x max |fp32 output|, "
    "eps = 1e-5 fp32, 1e-3 fp16, 1e-2 bf16"
)


@dataclass
class ModelRun:
    """What a model case's ``setup`` returns: the inputs every provider is called with, the fp32
    reference output, the providers, and which providers must reproduce another's output
    (``same_as = {"streaming": "whole"}``: chunked equals whole)."""

    inputs: tuple
    reference: Tensor
    providers: list
    same_as: dict = field(default_factory=dict)


@dataclass
class ModelCase:
    """A whole model on one input (the row fields of :class:`benchmarks.utils.Case`, built lazily).

    ``setup(device)`` builds the model with random weights (the seed is fixed before it runs) and returns
    a :class:`ModelRun`. ``why_not`` set: the case is listed with every name in ``provider_names`` skipped
    for that reason (e.g. diffusers is not installed).
    """

    op: str
    label: str
    dims: Sequence[int]
    dtype: torch.dtype
    setup: Optional[Callable[[torch.device], ModelRun]]
    provider_names: Sequence[str] = ()
    extra: dict = field(default_factory=dict)
    flops: int = 0
    why_not: Optional[str] = None


class SkipCase(Exception):
    """Raised by a model case's ``setup`` when the case cannot be built here (an older diffusers without
    the class or a config argument): every provider is listed as skipped with the message."""


def _save_rows(session: Session, rows: list[dict]) -> None:
    session.rows.extend(rows)
    if session.save:
        utils.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        with open(utils.RESULTS_DIR / f"{session.family}.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps(utils._finite(r), default=utils._json_default, allow_nan=False) + "\n")


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip().splitlines()[0][:500]


def run_model_case(session: Session, case: ModelCase,
                   targets_fn: Optional[Callable[[dict, ModelCase, Session], dict]] = None) -> list[dict]:
    """Measure every provider of a model case, as ``Session.run_case`` does for an op, with the
    model-level correctness check (module docstring). Rows have no ``copy`` reference and no bytes."""
    import i2v_kernels

    print(f"\n== {case.op}  {case.label}  {list(case.dims)}  {utils.dtype_name(case.dtype)}", flush=True)
    session._case_load = utils._load_avg()  # the row's load_avg, as run_case records it

    def row(name, kind, status, **kw):
        return session._row(case, name, kind=kind, status=status, bytes_=0, flops=case.flops, **kw)

    def skip_all(reason):
        rows = [row(n, "baseline", "skipped", note=reason) for n in case.provider_names if session.wants(n)]
        print(f"   skipped: {reason}", flush=True)
        _save_rows(session, rows)
        return rows

    if case.why_not is not None:
        return skip_all(case.why_not)
    torch.manual_seed(0)
    with torch.no_grad():
        try:
            run = case.setup(session.device)
            session.sync()
        except SkipCase as e:
            return skip_all(str(e))
        except torch.cuda.OutOfMemoryError as e:
            gc.collect()
            torch.cuda.empty_cache()
            return skip_all(f"out of GPU memory while building the case and its fp32 reference "
                            f"({_first_line(e)[:200]})")
        ref = run.reference.float()
        scale = ref.abs().max().item()
        eps = MODEL_EPS.get(case.dtype, 1e-5)
        rows, outputs, own_err, timed = [], {}, None, []
        for p in run.providers:
            if not session.wants(p.name):
                continue
            if p.why_not is not None:
                print(f"   {p.name:<14} skipped: {p.why_not}", flush=True)
                rows.append(row(p.name, p.kind, "skipped", note=p.why_not))
                continue
            call = lambda p=p: p.fn(*run.inputs)  # noqa: E731
            if p.auto:
                utils.reset_dispatch()  # the model's keys are measured in its first call, never in the timed ones
            t0 = time.perf_counter()
            try:
                out = call()
                session.sync()
            except i2v_kernels.BackendUnavailableError as e:
                print(f"   {p.name:<14} skipped: {e}", flush=True)
                rows.append(row(p.name, p.kind, "skipped", note=str(e)))
                continue
            except Exception as e:  # noqa: BLE001 -- any failure of the provider is recorded in its row
                msg = _first_line(e)
                status = "skipped" if p.skip_on_failure else "error"
                what = "skipped: failed on its first call" if p.skip_on_failure else "ERROR"
                print(f"   {p.name:<14} {what} ({msg})", flush=True)
                rows.append(row(p.name, p.kind, status, correct=None if p.skip_on_failure else False,
                                note=f"failed on its first call: {msg}" if p.skip_on_failure else msg))
                continue
            first_call_s = time.perf_counter() - t0
            decisions = utils.note_dispatch(p) if p.auto else None
            ok, err, tol, problem = _model_check(out, ref, p.kind, own_err, eps, scale)
            if p.kind == "eager":
                own_err = err
            other, same = run.same_as.get(p.name), None
            if ok and other in outputs:
                diff = (out.float() - outputs[other].float()).abs().max().item()
                same = {"provider": other, "max_diff": diff, "ok": diff <= tol}
                if not same["ok"]:
                    ok, problem = False, f"differs from `{other}` by {diff:.3g} (bound {tol:.3g})"
                else:
                    problem = f"max |{p.name} - {other}| = {diff:.2g}"
            if not ok:
                print(f"   {p.name:<14} WRONG: {problem} (max abs error {err:.3g})", flush=True)
                rows.append(utils.mark_auto(row(p.name, p.kind, "wrong", note=problem, correct=False, max_err=err,
                                                tol=[tol, 0.0], first_call_s=first_call_s), p, decisions))
                rows[-1]["same_as"] = same
                del out
                continue
            if p.name in run.same_as.values():
                outputs[p.name] = out
            del out
            if problem:
                print(f"   {p.name:<14} {problem}", flush=True)
            rows.append(utils.mark_auto(row(p.name, p.kind, "ok", correct=True, max_err=err, tol=[tol, 0.0],
                                            first_call_s=first_call_s,
                                            note="; ".join(x for x in (MODEL_METHOD_NOTE, problem) if x)),
                                        p, decisions))
            rows[-1]["same_as"] = same
            timed.append((rows[-1], call))
        session.time_checked(timed, cpu_memory=True)  # every checked provider, in turns on the CPU; peak memory
        del outputs, run, ref, timed

    for r in rows:
        if r["ms"] is not None:
            r["tflops"] = r["flops"] / (r["ms"] * 1e-3) / 1e12 if r["flops"] else None
    session.finish_case(case, rows, targets_fn)
    utils.print_speedups(rows)
    torch._dynamo.reset()  # compiled providers hold the case's models
    gc.collect()
    if session.device.type == "cuda":
        torch.cuda.empty_cache()
    _save_rows(session, rows)
    return rows


def _model_check(out, ref: Tensor, kind: str, own_err: Optional[float], eps: float, scale: float):
    """``(ok, max error, bound, problem)`` of one model output against the fp32 model's."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor) or tuple(out.shape) != tuple(ref.shape):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        return False, math.inf, 0.0, f"output {got}, expected shape {tuple(ref.shape)}"
    err = (out.float() - ref).abs().max().item()
    if not math.isfinite(err):
        return False, math.inf, 0.0, "non-finite output"
    bound = 2 * (own_err or 0.0) + eps * scale
    if kind == "eager":  # the yardstick: its own error defines the bound for the others
        return True, err, bound, None
    if err > bound:
        return False, err, bound, (f"max error {err:.3g} > 2 x eager's {own_err or 0.0:.3g} "
                                   f"+ {eps:g} x scale {scale:.3g}")
    return True, err, bound, None


# --------------------------------------------------------------------------------------------------
# vae-decode: a small causal decoder built from i2v_kernels.nn.CausalConv3d


def frame_group_norm(x: Tensor, norm: nn.GroupNorm) -> Tensor:
    """GroupNorm of each frame on its own (statistics over ``C / G, H, W``). A GroupNorm over a whole
    5-D chunk (``nn.GroupNorm`` on ``[B, C, T, H, W]``) would mix frames, and the output would depend on
    how the video was chunked."""
    B, C, T, H, W = x.shape
    y = F.group_norm(x.transpose(1, 2).reshape(B * T, C, H, W), norm.num_groups, norm.weight, norm.bias, norm.eps)
    return y.reshape(B, T, C, H, W).transpose(1, 2)


class ToyDecoder(nn.Module):
    """A causal video decoder shaped like CogVideoX's and Wan's (random weights):
    latent ``[B, z, T, h, w]`` -> frames ``[B, 3, 4T, 8h, 8w]``.

    ``conv_in``; per stage a residual block (GroupNorm -> SiLU -> 3x3x3 causal conv, twice, plus the
    block's input); between stages an upsampler (nearest x2 in space -- and in time for the first two,
    each frame repeated -- then a causal conv); GroupNorm -> SiLU -> ``conv_out`` to RGB. Everything is
    per frame or causal in time, so chunked decoding (with the conv caches) equals whole decoding.

    ``forward(z, conv)`` calls ``conv(module, x, residual)`` for each :class:`CausalConv3d`, so one set of
    weights runs through our op (:func:`ours_conv`) or eager PyTorch (:class:`EagerConvs`).
    """

    def __init__(self, z_channels: int, widths: Sequence[int], time_pad: str = "replicate", groups: int = 8):
        super().__init__()
        from i2v_kernels.nn import CausalConv3d

        def conv(cin, cout):
            return CausalConv3d(cin, cout, 3, time_pad=time_pad)

        self.conv_in = conv(z_channels, widths[0])
        self.stages = nn.ModuleList()
        for i, width in enumerate(widths):
            stage = nn.Module()
            stage.up = None if i == 0 else conv(widths[i - 1], width)
            stage.up_time = i in (1, 2)
            stage.norm1, stage.norm2 = nn.GroupNorm(groups, width), nn.GroupNorm(groups, width)
            stage.conv1, stage.conv2 = conv(width, width), conv(width, width)
            self.stages.append(stage)
        self.norm_out = nn.GroupNorm(groups, widths[-1])
        self.conv_out = conv(widths[-1], 3)

    def forward(self, z: Tensor, conv: Callable) -> Tensor:
        x = conv(self.conv_in, z, None)
        for stage in self.stages:
            if stage.up is not None:
                x = F.interpolate(x, scale_factor=(2 if stage.up_time else 1, 2, 2), mode="nearest")
                x = conv(stage.up, x, None)
            h = conv(stage.conv1, F.silu(frame_group_norm(x, stage.norm1)), None)
            x = conv(stage.conv2, F.silu(frame_group_norm(h, stage.norm2)), x)
        return conv(self.conv_out, F.silu(frame_group_norm(x, self.norm_out)), None)


def ours_conv(module, x: Tensor, residual: Optional[Tensor]) -> Tensor:
    """Our module (backend ``auto``); inside ``streaming(decoder)`` it reads and writes its cache; the
    residual add is fused into the conv's epilogue."""
    return module(x, residual=residual)[0]


class EagerConvs:
    """Eager convs over the decoder's weights, as VAEs write them (:func:`eager_causal_conv3d`). With
    ``chunked=True`` each module keeps the last ``kt - 1`` frames of its time-padded input (a ``.clone()``,
    as diffusers keeps ``conv_cache``) for the next chunk; the first chunk pads by the module's ``time_pad``."""

    def __init__(self, chunked: bool):
        self.caches: Optional[dict] = {} if chunked else None

    def __call__(self, module, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        if self.caches is None:
            y = eager_causal_conv3d(x, module.weight, module.bias, None, module.time_pad)
        else:
            P = module.time_padding
            if P:
                front = self.caches.get(module)
                if front is None:
                    front = (torch.cat([x[:, :, :1]] * P, dim=2) if module.time_pad == "replicate"
                             else x.new_zeros(x.shape[0], x.shape[1], P, *x.shape[3:]))
                x = torch.cat([front, x], dim=2)
                self.caches[module] = x[:, :, -P:].clone()
            kh, kw = module.kernel_size[1:]
            y = F.conv3d(F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2)), module.weight, module.bias)
        return y if residual is None else y + residual


@dataclass(frozen=True)
class Decoder:
    label: str
    z: tuple  # latent [B, C, T, h, w]
    widths: tuple
    chunk: int  # latent frames per call in the chunked decode
    source: str
    time_pad: str = "replicate"


DECODERS = {
    ("cuda", False): (Decoder("cogvideox-like-240x360", (1, 16, 13, 30, 45), (512, 256, 256, 128), 2,
                              "CogVideoX decoder widths (512/256/256/128), 13 latent frames of 30x45 -> 52 frames at "
                              "240x360, chunks of 2 latent frames as CogVideoX decodes"),),
    ("cuda", True): (Decoder("cogvideox-like-240x360-5f", (1, 16, 5, 30, 45), (512, 256, 256, 128), 1,
                             "CogVideoX decoder widths, 5 latent frames of 30x45 -> 20 frames at 240x360, "
                             "one latent frame per chunk"),),
    ("cpu", False): (Decoder("small-48x64", (1, 16, 3, 6, 8), (48, 32, 32, 16), 2,
                             "small decoder (widths 48/32/32/16), 3 latent frames of 6x8 -> 12 frames at 48x64, "
                             "chunks of 2 and 1 latent frames"),),
    ("cpu", True): (Decoder("tiny-32x48", (1, 8, 2, 4, 6), (32, 32, 16, 16), 1,
                            "tiny decoder (widths 32/32/16/16), 2 latent frames of 4x6 -> 8 frames at 32x48, "
                            "one latent frame per chunk"),),
}
DECODE_PROVIDERS = ("torch", "torch-chunked", "whole", "whole-native", "streaming")


def _decode_case(d: Decoder, dtype: torch.dtype) -> ModelCase:
    def setup(device: torch.device) -> ModelRun:
        import i2v_kernels
        from i2v_kernels.nn import decode_in_chunks

        with torch.device(device):
            decoder = ToyDecoder(d.z[1], d.widths, d.time_pad).eval()
        z32 = torch.randn(d.z, device=device)
        with i2v_kernels.use_backend("torch"):  # the oracle: the op's fp32 reference, whole video
            reference = decoder(z32, ours_conv)
        decoder.to(dtype)
        z = z32.to(dtype)
        T = d.z[2]

        def eager_whole(z):
            return decoder(z, EagerConvs(chunked=False))

        def eager_chunked(z):
            convs = EagerConvs(chunked=True)
            return torch.cat([decoder(z[:, :, i:i + d.chunk], convs) for i in range(0, T, d.chunk)], dim=2)

        def whole(z):
            return decoder(z, ours_conv)

        def chunked(z):
            return decode_in_chunks(lambda zc: decoder(zc, ours_conv), z, d.chunk, out_frames_per_latent_frame=4,
                                    model=decoder)

        provs = [utils.eager_provider(eager_whole), Provider("torch-chunked", eager_chunked, kind="baseline"),
                 utils.auto_provider(whole, "whole"),
                 Provider("whole-native", utils.forced("native", whole), kind="ours", loose=True),
                 Provider("streaming", chunked, kind="ours")]
        return ModelRun(inputs=(z,), reference=reference, providers=provs,
                        same_as={"streaming": "whole", "torch-chunked": "torch"})

    B, _, T, h, w = d.z
    out_dims = [B, 3, 4 * T, 8 * h, 8 * w]
    extra = {"model": d.source, "widths": list(d.widths), "chunk_latent_frames": d.chunk, "output": out_dims}
    return ModelCase(op="vae-decode", label=d.label, dims=d.z, dtype=dtype, setup=setup,
                     provider_names=DECODE_PROVIDERS, extra=extra)


def decode_targets(row: dict, case: ModelCase, session: Session) -> dict:
    """Streaming decode rows (providers ``streaming*``): same video as ``whole``, and peak memory at most
    a third of ``whole``'s."""
    if not row["provider"].startswith("streaming"):
        return {}
    same = row.get("same_as")  # checked before timing: a mismatch makes the row `wrong` (the run fails)
    out = {"same": "n/a (`whole` not run)" if same is None else utils.verdict(same["ok"])}
    whole = next((r for r in session.case_rows if r["provider"] == "whole" and r["peak_mem_mb"]), None)
    if whole is None or row["peak_mem_mb"] is None:
        out["mem<=1/3"] = "n/a"
    else:
        frac = row["peak_mem_mb"] / whole["peak_mem_mb"]
        out["mem<=1/3"] = f"{utils.verdict(frac <= 1 / 3)} ({frac:.2f}x whole)"
    return out


# --------------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    session = utils.start_session(FAMILY, "Benchmark of the causal 3D convolution and streaming VAE decode",
                                  PROVIDERS, OPS, argv, QUICK_BUDGET_S)
    if session.device.type == "cuda":
        # fp32 means fp32: cuDNN would otherwise run fp32 convs (the fp32 reference included) in TF32.
        torch.backends.cudnn.allow_tf32 = False
    utils.run_cases(session, build_cases(session), providers, targets)
    if session.wants_op("vae-decode"):
        for dtype in session.dtypes:
            for d in DECODERS[(session.device.type, session.quick)]:
                run_model_case(session, _decode_case(d, dtype), decode_targets)
    return session.finish("Causal 3D convolution (VAE decoder shapes) and streaming VAE decode",
                          CONV_LEGEND + DECODE_LEGEND)


if __name__ == "__main__":
    sys.exit(main())
