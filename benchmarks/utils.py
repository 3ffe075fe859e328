"""Shared harness for ``benchmarks/bench_<family>.py``.

A benchmark script describes *cases* (one op on one input shape and dtype) and, per case, the
*providers* that compute it: ``torch`` (eager PyTorch as a video DiT writes it), ``compile``
(``torch.compile`` of that eager function), our backends ``triton``, ``cuda``, ``cpu`` and ``native``
and the outside ones ``flash_attn`` / ``sageattention`` (each forced with ``i2v_kernels.use_backend``),
``auto`` (no forcing: the measured dispatch, tuned during the provider's first, untimed call), and
outside libraries when they import. A provider that cannot run carries the reason and is listed as
skipped, never dropped. Each case's ``auto`` row is held to the first rule of shared/PERFORMANCE.md:
at least 0.97x (CPU: 0.95x) the best baseline -- the fastest of eager and the other non-compiled
baselines (each SDPA backend, cuDNN alone) -- and every row shows its speed relative to ``auto``.

For every case the harness

1. makes random inputs (never zeros) and the fp32 reference outputs,
2. times ``x.clone()`` as the copy reference (``copy`` row),
3. runs each provider once and checks it against the reference *before* timing it -- a wrong or
   crashing provider is recorded (``correct: false``) and makes the run exit non-zero,
4. times the checked providers: CUDA -> ``triton.testing.do_bench`` per provider (CUDA events, L2
   flushed before every rep, warm-up excluded), CPU -> ``time.perf_counter`` around each call after
   warm-up, all providers of the case in turns (one call each per round, so a load change on a shared
   machine hits them alike); median and min,
5. reports GB/s (minimal bytes / time), TFLOP/s where the case has FLOPs, the fraction of the
   measured roofline, speedups over eager and compile, and peak CUDA memory.

Rows go to ``benchmarks/results/<family>.jsonl`` (appended, one per case and provider); the run's table
to ``benchmarks/results/<family>_<device-slug>.md`` (overwritten) and, with matplotlib, a bar plot of
the speedups over eager to ``<family>_<device-slug>.png``. See ``benchmarks/results/README.md``.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import math
import os
import platform
import re
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REPO_ROOT = BENCH_DIR.parent

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
DEFAULT_DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}

# |out - ref| <= atol + rtol * |ref| against the fp32 reference. Our kernels do their math in fp32 and
# round once, so they get the test-suite tolerances (STYLE.md point 11). Baselines round every
# intermediate to the input dtype, as eager PyTorch does (bf16 eager adaLN reaches ~3e-2 here), so
# they get a looser bound that still catches a wrong formula.
OURS_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}
BASELINE_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (6e-2, 6e-2)}

OUR_BACKENDS = ("triton", "cuda", "cpu", "native")
# Backends of i2v_kernels that wrap outside libraries: forced like ours, held to the baselines' tolerance.
OUTSIDE_BACKENDS = ("flash_attn", "sageattention")
AUTO = "auto"
# The first rule (shared/PERFORMANCE.md): auto >= this x the best non-compiled baseline, per device type.
AUTO_RULE = {"cuda": 0.97, "cpu": 0.95}
# Table order: the copy reference, eager, other baselines, outside libraries, ours (each in run order).
KIND_ORDER = {"copy": 0, "eager": 1, "baseline": 2, "outside": 3, "ours": 4}

METHOD = (
    "Method (shared/PERFORMANCE.md): random inputs, never zeros; every provider is checked against the "
    "fp32 reference before it is timed. CUDA: median (and min) of `triton.testing.do_bench` -- CUDA "
    "events, L2 flushed before every rep, warm-up excluded -- with all baselines on the same card in the "
    "same run. CPU: wall clock (`time.perf_counter`) around each call after warm-up, median and min of "
    "many reps, the providers of a case taking turns (one call each per round) so that all of them see "
    "the same load; CPU figures are ratios within one run, absolute times only mean something on a GPU. "
    "Memory-bound ops are reported as minimal bytes / time (GB/s); the roofline is the copy bandwidth "
    "measured in this run (GPU: a large `copy_`, bytes read + written; CPU: `x.clone()` of the case's own "
    "input), and compute-bound ops use a large bf16 matmul measured on the card. `x eager` and "
    "`x compile` are speedups (baseline time / provider time; > 1 is faster); `copies` is the time in units of "
    "the case's `copy` row (a clone of the main input)."
)


# --------------------------------------------------------------------------------------------------
# What a benchmark script declares


@dataclass
class Provider:
    """One way to compute a case. ``fn(*inputs)`` returns a tensor or a tuple of tensors.

    ``kind``: ``eager`` (the ``torch`` baseline), ``baseline`` (compile, SDPA backends, ...), ``ours``
    (an i2v_kernels backend or ``auto``: targets apply), ``outside`` (another library). ``why_not`` set
    means the provider is skipped with that reason. ``skip_on_failure``: an exception on the first call
    is a skip (a baseline that cannot be built here), not a failure. ``loose``: held to the baselines'
    tolerance although ours (``native`` rounds like eager PyTorch, and ``auto`` may run it). ``auto``:
    this is the case's ``auto`` provider (the dispatch is reset before its first call and its decisions
    are recorded in the row; the first rule applies to it).
    """

    name: str
    fn: Optional[Callable[..., Any]] = None
    why_not: Optional[str] = None
    kind: str = "baseline"
    skip_on_failure: bool = False
    loose: bool = False
    auto: bool = False


@dataclass
class Case:
    """One op on one shape and dtype.

    ``make_inputs(device)`` returns the input tensors (random); ``reference(*inputs)`` the expected
    outputs, computed in fp32; ``min_bytes(inputs)`` the minimal memory traffic of the op; ``flops``
    its FLOPs (0: memory-bound); ``dims`` the main input's shape (the tensor ``copy`` clones is
    ``inputs[copy_input]``); ``extra`` family-specific facts recorded in the row's ``shape``.
    """

    op: str
    label: str
    dims: Sequence[int]
    dtype: torch.dtype
    make_inputs: Callable[[torch.device], tuple]
    reference: Callable[..., Any]
    min_bytes: Callable[[tuple], int]
    flops: int = 0
    copy_input: int = 0
    extra: dict = field(default_factory=dict)


def tensor_bytes(*tensors: Optional[torch.Tensor]) -> int:
    """Bytes of the distinct elements of each tensor (a broadcast view counts its own numel)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def eager_provider(fn: Callable[..., Any]) -> Provider:
    return Provider("torch", fn, kind="eager")


def compile_provider(fn: Callable[..., Any], why_not: Optional[str] = None) -> Provider:
    """``torch.compile`` of the eager function, static shapes (the strongest compile baseline).

    Dynamo's caches are reset first: every case compiles its own graph, and a long run never hits the
    recompile limit (after which dynamo would silently run eager).
    """
    if why_not is not None:
        return Provider("compile", why_not=why_not)
    torch._dynamo.reset()
    return Provider("compile", torch.compile(fn, dynamic=False), kind="baseline", skip_on_failure=True)


def backend_provider(name: str, fn: Callable[..., Any], session: "Session") -> Provider:
    """i2v_kernels backend ``name`` (ours, ``native*`` or an outside one) forced around every call of ``fn``."""
    kind = "outside" if name in OUTSIDE_BACKENDS else "ours"
    loose = name.startswith("native") or name in OUTSIDE_BACKENDS  # native_packed rounds like eager too
    reason = session.backend_why_not(name)
    if reason is not None:
        return Provider(name, why_not=reason, kind=kind)
    return Provider(name, forced(name, fn), kind=kind, loose=loose)


def backend_providers(fn: Callable[..., Any], session: "Session", names: Sequence[str] = OUR_BACKENDS) -> list[Provider]:
    """``backend_provider`` for each wanted name, then ``auto`` (the provider the first rule is about)."""
    out = [backend_provider(name, fn, session) for name in names if session.wants(name)]
    if session.wants(AUTO):
        out.append(auto_provider(fn))
    return out


def forced(backend: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with every i2v_kernels op inside it forced to ``backend``."""
    import i2v_kernels

    def call(*inputs):
        with i2v_kernels.use_backend(backend):
            return fn(*inputs)

    return call


def auto_provider(fn: Callable[..., Any], name: str = AUTO) -> Provider:
    """``fn`` unforced: i2v_kernels' measured dispatch (``auto``). Skipped when the environment forces
    a backend on every call (then there is no ``auto`` to measure)."""
    from i2v_kernels import _backend

    forced_env = os.environ.get(_backend.ENV_VAR, "").strip()
    if forced_env and forced_env != "auto":
        return Provider(name, why_not=f"{_backend.ENV_VAR}={forced_env} forces every call", kind="ours")
    return Provider(name, fn, kind="ours", loose=True, auto=True)


def outside_provider(name: str, build: Callable[[], Callable[..., Any]]) -> Provider:
    """An outside library: ``build()`` imports it and returns the callable; an ImportError is a skip."""
    try:
        fn = build()
    except ImportError as e:
        return Provider(name, why_not=f"not installed ({type(e).__name__}: {e})", kind="outside")
    return Provider(name, fn, kind="outside", skip_on_failure=True)


# --------------------------------------------------------------------------------------------------
# Environment: device, versions, git


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def git_state() -> tuple[str, Optional[bool]]:
    """``(short sha, dirty)`` of the repository, ``("unknown", None)`` outside one."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)

    try:
        sha = git("rev-parse", "--short", "HEAD")
        if sha.returncode != 0:
            return "unknown", None
        status = git("status", "--porcelain", "--untracked-files=no")
        return sha.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("i2v-kernels")
    except metadata.PackageNotFoundError:
        pass
    try:
        text = (REPO_ROOT / "pyproject.toml").read_text()
    except OSError:
        return "unknown"
    m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    return f"{m.group(1)}+source" if m else "unknown"


def triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


# Environment that changes what is measured (allocator behaviour, threads, forced backends).
_ENV_PREFIXES = ("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "OMP_", "MKL_", "I2V_KERNELS_", "TRITON_", "TORCHINDUCTOR_",
                 "CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF")


def measured_env() -> dict:
    # The dispatch cache directory is where decisions are kept, not what is measured (and each run
    # points it at a fresh temporary directory: isolate_dispatch_cache).
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(_ENV_PREFIXES) and k != DISPATCH_CACHE_ENV}


DISPATCH_CACHE_ENV = "I2V_KERNELS_CACHE_DIR"


def dispatch_mode() -> str:
    """How ``auto`` decides in this run (for the header)."""
    from i2v_kernels import _dispatch

    if not _dispatch.tuning_enabled():
        return f"`auto` is not measured ({_dispatch.TUNE_ENV}=0): the static table decides"
    return "`auto` measured per case in its first (untimed) call, fresh dispatch cache"


def isolate_dispatch_cache() -> Path:
    """Point i2v_kernels' dispatch cache at a fresh temporary directory (removed at exit), so no
    decision from an earlier run or another process leaks into this one's ``auto`` rows."""
    path = Path(tempfile.mkdtemp(prefix="i2v-bench-dispatch-"))
    os.environ[DISPATCH_CACHE_ENV] = str(path)
    atexit.register(shutil.rmtree, path, True)
    return path


def reset_dispatch() -> None:
    """Forget every dispatch decision (memory and this run's cache file): the next ``auto`` call of
    each key measures afresh."""
    from i2v_kernels import _dispatch

    _dispatch.clear(memory=True, disk=True)


def dispatch_decisions() -> list[dict]:
    """The decisions ``auto`` made since :func:`reset_dispatch`: key, backend, measured times."""
    from i2v_kernels import _dispatch

    keep = ("key", "op", "backend", "source", "times_ms", "failed", "why_not_measured")
    return [{k: d[k] for k in keep if d.get(k) is not None} for d in _dispatch.decisions()]


def dispatch_summary(decisions: Sequence[dict]) -> str:
    """One line: ``op -> backend`` per decision (counted when an op has several keys), e.g.
    ``spatial_attention -> native (native 2.39, triton 2.96 ms)``."""
    if not decisions:
        return "nothing measured: one eligible backend per call"
    if len(decisions) == 1:
        d = decisions[0]
        times = ", ".join(f"{b} {t:.3g}" for b, t in sorted(d.get("times_ms", {}).items(), key=lambda kv: kv[1]))
        how = f" ({times} ms)" if times else f" ({d.get('source', '?')})"
        return f"{d.get('op', '?')} -> {d['backend']}{how}"
    counts: dict[tuple[str, str], int] = {}
    for d in decisions:
        key = (d.get("op", "?"), d["backend"])
        counts[key] = counts.get(key, 0) + 1
    return "; ".join(f"{op} -> {b}" + (f" x{n}" if n > 1 else "") for (op, b), n in counts.items())


def _load_avg() -> Optional[float]:
    """1-minute load average: CPU timings only mean something when it is below the core count."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def slugify(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch")
    return torch.device(name)


def parse_dtypes(text: str, device: torch.device) -> list[torch.dtype]:
    if text == "auto":
        return [DEFAULT_DTYPE[device.type]]
    out = []
    for name in text.split(","):
        name = name.strip().lower()
        if name not in DTYPES:
            raise SystemExit(f"--dtype: unknown dtype {name!r}; choose from {', '.join(DTYPES)} (comma-separated)")
        if DTYPES[name] not in out:
            out.append(DTYPES[name])
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def make_parser(description: str, prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--quick", action="store_true", help="few shapes and reps (for tests and smoke runs)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run (auto: cuda when a GPU is visible, else cpu)")
    p.add_argument("--dtype", default="auto",
                   help="comma-separated dtypes: float32, float16, bfloat16 (auto: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--providers", default=None,
                   help="comma-separated providers to run (default: all); the copy reference always runs")
    p.add_argument("--ops", default=None, help="comma-separated ops to run (default: all)")
    p.add_argument("--no-save", action="store_true", help="print the table only; write nothing to benchmarks/results/")
    return p


def _name_filter(text: Optional[str], known: Sequence[str], flag: str) -> Optional[set[str]]:
    if text is None:
        return None
    names = {n.strip() for n in text.split(",") if n.strip()}
    unknown = names - set(known)
    if unknown:
        raise SystemExit(f"{flag}: unknown {', '.join(sorted(unknown))}; known: {', '.join(known)}")
    return names


# --------------------------------------------------------------------------------------------------
# Timing and memory


def time_cuda(fn: Callable[[], Any], quick: bool) -> tuple[float, float, int]:
    """``(median ms, min ms, reps)`` with CUDA events and an L2 flush before every rep."""
    warmup_ms, rep_ms = (5, 25) if quick else (25, 100)
    try:
        from triton.testing import do_bench
    except ImportError:
        return _time_cuda_events(fn, 3 if quick else 10, 10 if quick else 50)
    try:
        times = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
    except (TypeError, AssertionError):  # a triton without return_mode="all"
        med, lo = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.0])
        return float(med), float(lo), -1
    return statistics.median(times), min(times), len(times)


def _time_cuda_events(fn: Callable[[], Any], warmup: int, reps: int) -> tuple[float, float, int]:
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")  # larger than any L2 we target
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return statistics.median(times), min(times), reps


def time_cpu(fn: Callable[[], Any], quick: bool) -> tuple[float, float, int]:
    """``(median ms, min ms, reps)``: wall clock per call, at least ``min_reps`` and ``min_s`` seconds."""
    warmup, min_reps, max_reps, min_s = (1, 3, 50, 0.2) if quick else (2, 7, 200, 1.0)
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < min_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), len(times)


def time_cpu_in_turns(fns: Sequence[Callable[[], Any]], quick: bool) -> list[tuple[float, float, int]]:
    """``time_cpu`` for all providers of one case at once, taking turns: each round calls every
    provider once (the order reversed every other round), until each has ``min_reps`` calls and the
    round budget (``min_s`` per provider) is spent. On a CPU shared with other work the load drifts
    within seconds; timed one after another, two providers running the same code differed by 30% here,
    while in turns each sees the same mix of quiet and busy moments, so their ratio holds."""
    # at least 15 rounds in a full run: a median over fewer calls still moved by 10-20% at load ~10
    warmup, min_reps, max_reps, min_s = (1, 3, 50, 0.2) if quick else (2, 15, 200, 1.0)
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    budget = min_s * len(fns)
    start = time.perf_counter()
    rounds = 0
    while rounds < min_reps or (rounds < max_reps and time.perf_counter() - start < budget):
        for i in (order if rounds % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            fns[i]()
            times[i].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return [(statistics.median(t), min(t), len(t)) for t in times]


def cuda_peak_mb(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak CUDA memory one call allocates beyond what was live before it (outputs included), MiB."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20


def cpu_peak_mb(fn: Callable[[], Any]) -> float:
    """Peak CPU memory one call allocates beyond what was live before it (outputs included), MiB: the
    running sum of PyTorch's CPU allocator events (``torch.profiler`` with ``profile_memory=True``, one
    extra untimed call). Memory a library allocates outside PyTorch's allocator is not seen."""
    import json
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    allocs = sorted((float(e["ts"]), e["args"]["Bytes"]) for e in events
                    if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0)
    live = peak = 0
    for _, nbytes in allocs:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


# --------------------------------------------------------------------------------------------------
# Correctness


def compare(out: Any, ref: Any, atol: float, rtol: float) -> tuple[bool, float, Optional[str]]:
    """``(ok, max abs error, problem)`` of ``out`` against the fp32 reference ``ref``."""
    outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    refs = tuple(ref) if isinstance(ref, (tuple, list)) else (ref,)
    if len(outs) != len(refs):
        return False, math.inf, f"returned {len(outs)} outputs, expected {len(refs)}"
    ok, max_err, problem = True, 0.0, None
    for i, (o, r) in enumerate(zip(outs, refs)):
        if not isinstance(o, torch.Tensor) or tuple(o.shape) != tuple(r.shape):
            got = tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__
            return False, math.inf, f"output {i}: got {got}, expected shape {tuple(r.shape)}"
        err = (o.float() - r).abs()
        within = err <= atol + rtol * r.abs()  # NaN compares False, so NaN outputs fail
        worst = err.max().item() if err.numel() else 0.0
        if not torch.isfinite(err).all():
            worst = math.inf
        max_err = max(max_err, worst)
        if not bool(within.all()):
            ok = False
            n_bad = int((~within).sum())
            problem = problem or f"output {i}: {n_bad} of {err.numel()} elements outside atol={atol}, rtol={rtol}"
        del err, within
    return ok, max_err, problem


# --------------------------------------------------------------------------------------------------
# auto and the first rule


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def note_dispatch(p: Provider) -> list[dict]:
    """After an ``auto`` provider's first call: its decisions, printed and returned for the row."""
    decisions = dispatch_decisions()
    print(f"   {p.name:<8} dispatch: {dispatch_summary(decisions)}", flush=True)
    return decisions


def mark_auto(row: dict, p: Provider, decisions: Optional[list[dict]]) -> dict:
    if p.auto:
        row["auto"] = True
        row["dispatch"] = decisions
    return row


def print_speedups(rows: Sequence[dict]) -> None:
    """Model-level cases: each timed provider's speedup over eager and its targets, one line each."""
    for r in rows:
        if r["provider"] != "torch" and r["ms"] is not None:
            print(f"   {r['provider']:<14} {_fmt_x(r['ratio_vs_eager'])} eager"
                  + (f"  {_targets_text(r['targets'])}" if r.get("targets") else ""), flush=True)


def best_baseline(rows: Sequence[dict]) -> Optional[dict]:
    """The fastest measured baseline of a case: eager and every other non-compiled baseline (SDPA
    backends, cuDNN alone, eager variants); ``torch.compile`` is shown but not part of the rule."""
    timed = [r for r in rows if r["kind"] in ("eager", "baseline") and r["status"] == "ok" and r["ms"]
             and "compile" not in r["provider"]]
    return min(timed, key=lambda r: r["ms"]) if timed else None


# --------------------------------------------------------------------------------------------------
# One run


class Session:
    """One benchmark run: device, versions, measured roofline, options, collected rows."""

    def __init__(self, family: str, args: argparse.Namespace, known_providers: Sequence[str],
                 known_ops: Sequence[str]):
        self.family = family
        self.args = args
        self.quick = bool(args.quick)
        self.save = not args.no_save
        self.device = resolve_device(args.device)
        self.dtypes = parse_dtypes(args.dtype, self.device)
        self.provider_filter = _name_filter(args.providers, known_providers, "--providers")
        self.op_filter = _name_filter(args.ops, known_ops, "--ops")
        if self.device.type == "cuda":
            self.device_name = torch.cuda.get_device_name(self.device)
            self.device_label = self.device_name
            self.slug = slugify(self.device_name)
        else:
            threads = torch.get_num_threads()
            self.device_name = cpu_model()
            self.device_label = f"cpu: {self.device_name}, {threads} threads"
            self.slug = f"cpu-{slugify(self.device_name)}-{threads}t"
        self.git_sha, self.git_dirty = git_state()
        self.versions = {
            "torch": torch.__version__,
            "triton": triton_version(),
            "i2v_kernels": package_version(),
            "python": platform.python_version(),
        }
        self.timestamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.rows: list[dict] = []
        self.case_rows: list[dict] = []
        self.roofline = {"copy_gbps": None, "matmul_tflops": None, "source": None}
        self._backend_info: Optional[dict] = None
        self.started = time.perf_counter()
        self.load_avg = _load_avg()
        self.env = measured_env()
        self._case_load = self.load_avg
        self.budget_s: Optional[float] = None  # GPU --quick: the run should end within this (start_session)

    # -- availability of our backends

    def backend_why_not(self, name: str) -> Optional[str]:
        if name in ("cuda", "triton") and self.device.type != "cuda":
            return "GPU backend; this run is on the CPU (run with --device cuda on a GPU machine)"
        if name == "cpu" and self.device.type != "cpu":
            return "CPU backend; this run is on the GPU (run with --device cpu)"
        if self._backend_info is None:
            import i2v_kernels

            self._backend_info = i2v_kernels.info()["backends"]
        state = self._backend_info.get(name)
        if state is None:
            return f"i2v_kernels has no backend {name!r}"
        return state["why_not"]

    def wants(self, provider: str) -> bool:
        return self.provider_filter is None or provider in self.provider_filter or provider == "copy"

    def wants_op(self, op: str) -> bool:
        return self.op_filter is None or op in self.op_filter

    def time(self, fn: Callable[[], Any]) -> tuple[float, float, int]:
        if self.device.type == "cuda":
            return time_cuda(fn, self.quick)
        return time_cpu(fn, self.quick)

    def time_all(self, fns: Sequence[Callable[[], Any]]) -> list[tuple[float, float, int]]:
        """``time`` for every checked provider of a case: on a GPU one after another (CUDA events see
        the card alone), on the CPU in turns (:func:`time_cpu_in_turns`)."""
        if self.device.type == "cuda":
            return [time_cuda(fn, self.quick) for fn in fns]
        return time_cpu_in_turns(fns, self.quick) if fns else []

    def time_checked(self, checked: Sequence[tuple[dict, Optional[Callable[[], Any]]]],
                     cpu_memory: bool = False) -> list[dict]:
        """Time the rows that passed their check (``(row, call)``; call None: not timed) and fill in
        ``ms``, ``ms_min``, ``reps`` and the peak memory: on CUDA always, on the CPU with ``cpu_memory``
        (:func:`cpu_peak_mb`, one more untimed call per row); returns the rows in order."""
        pending = [(r, call) for r, call in checked if call is not None]
        for (r, call), (ms, ms_min, reps) in zip(pending, self.time_all([call for _, call in pending])):
            r.update(ms=ms, ms_min=ms_min, reps=reps)
            if self.device.type == "cuda":
                r["peak_mem_mb"] = cuda_peak_mb(call, self.device)
            elif cpu_memory:
                r["peak_mem_mb"] = cpu_peak_mb(call)
            print(f"   {r['provider']:<14} {ms:10.4f} ms  (min {ms_min:.4f}, {reps} reps, max err {r['max_err']:.2e}"
                  + (f", peak {r['peak_mem_mb']:,.1f} MiB" if r.get("peak_mem_mb") is not None else "") + ")",
                  flush=True)
        return [r for r, _ in checked]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def quick_compile_why_not(self, headline: bool) -> Optional[str]:
        """Why a ``torch.compile`` provider is left out of a GPU ``--quick`` case, or None: inductor
        compiles each case's graph afresh (seconds to a minute for a model), so a bounded run compiles
        at the family's headline shape only, and not at all once half its time budget is spent."""
        if not (self.quick and self.device.type == "cuda"):
            return None
        if not headline:
            return "left out of --quick on the GPU except at the headline shape (inductor compiles every graph afresh)"
        if self.budget_s is not None and self.elapsed() > self.budget_s / 2:
            return f"left out: half of the --quick time budget ({self.budget_s:.0f} s) was spent"
        return None

    def finish_case(self, case: Any, rows: list[dict], targets: Optional[Callable[[dict, Any, "Session"], dict]]) -> None:
        """Speedups over eager, compile and ``auto``; the family's targets on our rows; the first rule
        on the ``auto`` row. The rows become ``case_rows`` (what targets compare against)."""
        by_name = {r["provider"]: r for r in rows if r["ms"] is not None}
        eager, compiled = by_name.get("torch"), by_name.get("compile")
        auto = next((r for r in rows if r["auto"] and r["ms"] is not None), None)
        for r in rows:
            if r["ms"] is None:
                continue
            r["ratio_vs_eager"] = eager["ms"] / r["ms"] if eager else None
            r["ratio_vs_compile"] = compiled["ms"] / r["ms"] if compiled else None
            r["ratio_vs_auto"] = auto["ms"] / r["ms"] if auto else None
        self.case_rows = rows
        if targets is not None:
            for r in rows:
                if r["kind"] == "ours" and r["status"] == "ok":
                    r["targets"] = targets(r, case, self)
        best = best_baseline(rows)
        if auto is not None and best is not None:
            need = AUTO_RULE.get(self.device.type, AUTO_RULE["cuda"])
            ratio = best["ms"] / auto["ms"]
            auto["best_baseline"] = {"provider": best["provider"], "ms": best["ms"]}
            auto["auto_vs_best"] = ratio
            auto["targets"] = {**(auto["targets"] or {}),
                               f"auto>={need}x best": f"{verdict(ratio >= need)} ({ratio:.2f}x {best['provider']})"}

    # -- the roofline

    def measure_gpu_roofline(self) -> None:
        """Copy bandwidth (1 GiB ``copy_``, bytes read + written) and bf16 8192^3 matmul TFLOP/s."""
        n = 2**28
        src = torch.randn(n, device=self.device)
        dst = torch.empty_like(src)
        ms, _, _ = time_cuda(lambda: dst.copy_(src), self.quick)
        copy_gbps = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
        del src, dst
        m = 8192
        a = torch.randn(m, m, device=self.device, dtype=torch.bfloat16)
        b = torch.randn(m, m, device=self.device, dtype=torch.bfloat16)
        ms, _, _ = time_cuda(lambda: a @ b, self.quick)
        tflops = 2 * m**3 / (ms * 1e-3) / 1e12
        del a, b
        torch.cuda.empty_cache()
        self.roofline = {"copy_gbps": copy_gbps, "matmul_tflops": tflops,
                         "source": "measured on this card: 1 GiB fp32 copy_ (read + write), 8192^3 bf16 matmul"}
        print(f"roofline: copy {copy_gbps:,.0f} GB/s, bf16 matmul {tflops:,.0f} TFLOP/s (measured on {self.device_name})",
              flush=True)

    # -- running cases

    def run_case(self, case: Case, providers: Callable[[Case, "Session"], list[Provider]],
                 targets: Optional[Callable[[dict, Case, "Session"], dict]] = None) -> list[dict]:
        """Measure every provider on ``case``; returns (and collects) its rows."""
        print(f"\n== {case.op}  {case.label}  {list(case.dims)}  {dtype_name(case.dtype)}", flush=True)
        self._case_load = _load_avg()
        torch.manual_seed(0)
        inputs = case.make_inputs(self.device)
        ref = case.reference(*inputs)
        self.sync()
        n_bytes = case.min_bytes(inputs)
        rows = []

        # The copy reference: a clone of the main input (a plain read + write of it).
        x = inputs[case.copy_input]
        ms, ms_min, reps = self.time(lambda: x.clone())
        copy_gbps = 2 * tensor_bytes(x) / (ms * 1e-3) / 1e9
        if self.device.type == "cuda":
            roof_gbps, roof_tflops = self.roofline["copy_gbps"], self.roofline["matmul_tflops"]
            roof_src = "card copy_ and matmul, measured once per run"
        else:
            roof_gbps, roof_tflops = copy_gbps, None
            roof_src = "x.clone() of this case's input"
        note = "x.clone(): allocates its output, as the ops do"
        pre_ms = None
        if self.device.type == "cpu":
            # Fresh CPU memory is paid in page faults; a copy into a reused buffer shows their share.
            dst = torch.empty_like(x)
            pre_ms, _, _ = self.time(lambda: dst.copy_(x))
            del dst
            note += f"; copy_ into a preallocated buffer: {pre_ms:.4g} ms ({2 * tensor_bytes(x) / (pre_ms * 1e-3) / 1e9:,.1f} GB/s)"
        copy_row = self._row(case, "copy", kind="copy", status="ok", ms=ms, ms_min=ms_min, reps=reps,
                             bytes_=2 * tensor_bytes(x), flops=0, note=note)
        copy_row["copy_prealloc_ms"] = pre_ms
        rows.append(copy_row)
        print(f"   {'copy':<8} {ms:10.4f} ms  ({copy_gbps:,.1f} GB/s; {note})", flush=True)

        checked = [self._run_provider(case, p, inputs, ref, n_bytes) for p in providers(case, self)
                   if self.wants(p.name)]
        rows += self.time_checked(checked)

        # Derived columns, once every provider of the case is measured.
        for r in rows:
            r["roofline"] = {"gbps": roof_gbps, "tflops": roof_tflops, "source": roof_src}
            if r["ms"] is None:
                continue
            sec = r["ms"] * 1e-3
            r["gbps"] = r["bytes"] / sec / 1e9 if r["bytes"] else None
            r["tflops"] = r["flops"] / sec / 1e12 if r["flops"] else None
            floors = []
            if r["bytes"] and roof_gbps:
                floors.append(r["bytes"] / (roof_gbps * 1e9))
            if r["flops"] and roof_tflops:
                floors.append(r["flops"] / (roof_tflops * 1e12))
            r["frac_roofline"] = max(floors) / sec if floors else None
            r["time_in_copies"] = r["ms"] / ms
        self.finish_case(case, rows, targets)
        for r in rows:
            if r["provider"] not in ("copy", "torch") and r["ms"] is not None:
                print(f"   {r['provider']:<8} {_fmt_x(r['ratio_vs_eager'])} eager, {_fmt_pct(r['frac_roofline'])} of roofline"
                      + ("  " + _targets_text(r["targets"]) if r.get("targets") else ""), flush=True)

        del inputs, ref, x
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.rows.extend(rows)
        if self.save:
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            with open(RESULTS_DIR / f"{self.family}.jsonl", "a") as f:
                for r in rows:
                    f.write(json.dumps(_finite(r), default=_json_default, allow_nan=False) + "\n")
        return rows

    def _run_provider(self, case: Case, p: Provider, inputs: tuple, ref: Any,
                      n_bytes: int) -> tuple[dict, Optional[Callable[[], Any]]]:
        """Run provider ``p`` once and check it: ``(row, call)``, ``call`` set when the row is to be
        timed (:meth:`time_checked`, once every provider of the case is checked)."""
        def row(status, **kw):
            return self._row(case, p.name, kind=p.kind, status=status, bytes_=n_bytes, flops=case.flops, **kw)

        if p.why_not is not None:
            print(f"   {p.name:<8} skipped: {p.why_not}", flush=True)
            return row("skipped", note=p.why_not), None
        import i2v_kernels

        call = lambda: p.fn(*inputs)  # noqa: E731
        if p.auto:
            reset_dispatch()  # this case's keys are measured in the first call below, never in the timed ones
        t0 = time.perf_counter()
        try:
            out = call()
            self.sync()
        except i2v_kernels.BackendUnavailableError as e:
            print(f"   {p.name:<8} skipped: {e}", flush=True)
            return row("skipped", note=str(e)), None
        except Exception as e:  # noqa: BLE001 -- any failure of the provider is recorded in its row
            msg = f"{type(e).__name__}: {e}".strip().splitlines()[0][:500]
            if p.skip_on_failure:
                print(f"   {p.name:<8} skipped: failed on its first call ({msg})", flush=True)
                return row("skipped", note=f"failed on its first call: {msg}"), None
            print(f"   {p.name:<8} ERROR: {msg}", flush=True)
            return row("error", note=msg, correct=False), None
        first_call_s = time.perf_counter() - t0
        decisions = note_dispatch(p) if p.auto else None
        strict = p.kind == "ours" and not p.loose
        atol, rtol = (OURS_TOL if strict else BASELINE_TOL).get(case.dtype, (1e-5, 1e-5))
        ok, max_err, problem = compare(out, ref, atol, rtol)
        del out
        if not ok:
            print(f"   {p.name:<8} WRONG: {problem} (max abs error {max_err:.3g})", flush=True)
            r = row("wrong", note=problem, correct=False, max_err=max_err, tol=[atol, rtol], first_call_s=first_call_s)
            return mark_auto(r, p, decisions), None
        r = row("ok", correct=True, max_err=max_err, tol=[atol, rtol], first_call_s=first_call_s)
        return mark_auto(r, p, decisions), call

    def _row(self, case: Case, provider: str, *, kind: str, status: str, bytes_: int, flops: int,
             ms=None, ms_min=None, reps=None, correct=None, max_err=None, tol=None, peak_mem_mb=None,
             first_call_s=None, note=None) -> dict:
        return {
            "op": case.op,
            "provider": provider,
            "shape": {"label": case.label, "dims": list(case.dims), **case.extra},
            "dtype": dtype_name(case.dtype),
            "device": self.device_label,
            "torch": self.versions["torch"],
            "triton": self.versions["triton"],
            "i2v_kernels": self.versions["i2v_kernels"],
            "python": self.versions["python"],
            "git_sha": self.git_sha,
            "git_dirty": self.git_dirty,
            "timestamp": self.timestamp,
            "load_avg": self._case_load,
            "env": self.env,
            "quick": self.quick,
            "kind": kind,
            "status": status,
            "ms": ms,
            "ms_min": ms_min,
            "reps": reps,
            "bytes": bytes_,
            "flops": flops,
            "gbps": None,
            "tflops": None,
            "frac_roofline": None,
            "ratio_vs_eager": None,
            "ratio_vs_compile": None,
            "time_in_copies": None,
            "peak_mem_mb": peak_mem_mb,
            "correct": correct,
            "max_err": max_err,
            "tol": tol,
            "first_call_s": first_call_s,
            "targets": None,
            "note": note,
            "auto": False,
            "ratio_vs_auto": None,
            "best_baseline": None,
            "auto_vs_best": None,
            "dispatch": None,
        }

    # -- reporting

    def failures(self) -> list[dict]:
        return [r for r in self.rows if r["status"] in ("wrong", "error")]

    def finish(self, title: str, target_legend: Sequence[str] = ()) -> int:
        """Render, print and save the table (and plot); returns the exit status (1 on a wrong result)."""
        elapsed = time.perf_counter() - self.started
        need = AUTO_RULE.get(self.device.type, AUTO_RULE["cuda"])
        rule = (f"Every case, our `auto` row (model rows: the provider running our ops unforced): `auto>={need}x best` "
                f"its time at least {need}x the best baseline's -- the fastest of eager and the other non-compiled "
                f"baselines (each SDPA backend, cuDNN alone); the ratio and that baseline are shown (the first rule of "
                f"shared/PERFORMANCE.md: 0.97x on GPUs, 0.95x on CPUs). `x auto` in every row: auto's time / the row's.")
        md = render_markdown(self, title, (rule, *target_legend), elapsed)
        print("\n" + md)
        if self.save:
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            md_path = RESULTS_DIR / f"{self.family}_{self.slug}.md"
            tmp = md_path.with_suffix(".md.tmp")
            tmp.write_text(md)
            os.replace(tmp, md_path)
            print(f"wrote {_rel(md_path)}; appended {len(self.rows)} rows to {_rel(RESULTS_DIR / (self.family + '.jsonl'))}")
            png = plot_speedups(self, RESULTS_DIR / f"{self.family}_{self.slug}.png", title)
            print(f"wrote {_rel(png)}" if png else "no plot: matplotlib is not installed")
        if self.budget_s is not None and elapsed > self.budget_s:
            print(f"\nover the --quick time budget: {elapsed:.0f} s > {self.budget_s:.0f} s", file=sys.stderr)
        bad = self.failures()
        if bad:
            print(f"\nFAILED: {len(bad)} provider result(s) wrong or crashed:", file=sys.stderr)
            for r in bad:
                print(f"  {r['op']} {r['shape']['label']} {r['dtype']} {r['provider']}: {r['note']}", file=sys.stderr)
            return 1
        print(f"all results correct ({elapsed:.0f} s)")
        return 0


    def add_tables(self, lines: Sequence[str]) -> None:
        """Print extra markdown tables after :meth:`finish` and append them to the run's ``.md`` file."""
        if not lines:
            return
        print("\n".join(lines))
        if self.save:
            with open(RESULTS_DIR / f"{self.family}_{self.slug}.md", "a") as f:
                f.write("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------
# Rendering


def _fmt_ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if v < 1 else f"{v:.3f}" if v < 100 else f"{v:.1f}"


def _fmt_x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _fmt_pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _fmt_num(v: Optional[float], digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _targets_text(targets: Optional[dict]) -> str:
    if not targets:
        return ""
    return ", ".join(f"{name} {outcome}" for name, outcome in targets.items())


def _finite(o):
    """JSON has no inf/nan: write them as strings ("inf")."""
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def render_markdown(session: Session, title: str, target_legend: Sequence[str], elapsed_s: float) -> str:
    rows = session.rows
    v = session.versions
    dirty = " (uncommitted changes)" if session.git_dirty else ""
    lines = [
        f"# {title}",
        "",
        f"- device: {session.device_label}",
        f"- torch {v['torch']}, triton {v['triton'] or 'not installed'}, i2v_kernels {v['i2v_kernels']}, python {v['python']}",
        f"- git {session.git_sha}{dirty}; {session.timestamp}; {'--quick' if session.quick else 'full'} run, {elapsed_s:.0f} s",
        f"- load average (1 min) at start {session.load_avg}, at end {_load_avg()} ({os.cpu_count()} cores; "
        "a load above the core count means other work shared the machine and CPU times are noisy)",
    ]
    lines.append(f"- dispatch: {dispatch_mode()}")
    if session.env:
        lines.append("- environment: " + ", ".join(f"`{k}={v}`" for k, v in session.env.items()))
    if session.device.type == "cuda":
        roof = session.roofline
        lines.append(f"- roofline measured on this card: copy {_fmt_num(roof['copy_gbps'], 0)} GB/s, "
                     f"bf16 matmul {_fmt_num(roof['matmul_tflops'], 0)} TFLOP/s")
    else:
        lines.append("- roofline: the `copy` row of each case (x.clone(), bytes read + written)")
    lines += ["", METHOD, ""]
    header = ("| op | shape | dtype | provider | ms (median) | ms (min) | GB/s | % roofline | x eager | "
              "x compile | x auto | copies | peak MiB | correct (max err) | targets |")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    skipped: dict[tuple[str, str], int] = {}
    for r in rows:
        if r["status"] == "skipped":
            skipped[(r["provider"], r["note"])] = skipped.get((r["provider"], r["note"]), 0) + 1
    shown = [r for r in rows if r["status"] != "skipped"]
    # keep case order, sort providers within a case
    case_index: dict[tuple, int] = {}
    for r in shown:
        case_index.setdefault((r["op"], r["shape"]["label"], r["dtype"]), len(case_index))
    shown.sort(key=lambda r: (case_index[(r["op"], r["shape"]["label"], r["dtype"])], KIND_ORDER.get(r["kind"], 9)))
    for r in shown:
        if r["status"] == "ok" and r["provider"] == "copy":
            pre = r.get("copy_prealloc_ms")
            correct = "(reference)" if pre is None else f"(reference; copy_ into a reused buffer: {_fmt_ms(pre)} ms)"
        elif r["status"] == "ok":
            correct = f"yes ({r['max_err']:.1e})"
        elif r["status"] == "wrong":
            correct = f"**WRONG** ({r['max_err']:.2g}): {r['note']}"
        else:
            correct = f"**ERROR**: {r['note']}"
        dims = "x".join(str(d) for d in r["shape"]["dims"])
        lines.append(
            f"| {r['op']} | {r['shape']['label']} [{dims}] | {r['dtype']} | {r['provider']} | {_fmt_ms(r['ms'])} | "
            f"{_fmt_ms(r['ms_min'])} | {_fmt_num(r['gbps'])} | {_fmt_pct(r['frac_roofline'])} | "
            f"{_fmt_x(r['ratio_vs_eager'])} | {_fmt_x(r['ratio_vs_compile'])} | {_fmt_x(r.get('ratio_vs_auto'))} | "
            f"{_fmt_num(r['time_in_copies'], 2)} | "
            f"{_fmt_num(r['peak_mem_mb'])} | "
            f"{correct} | {_targets_text(r['targets'])} |"
        )
    lines += auto_table(rows, session.device.type)
    if skipped:
        lines += ["", "Skipped providers (not run, with the reason):", ""]
        for (name, note), n in skipped.items():
            lines.append(f"- `{name}` ({n} case{'s' if n > 1 else ''}): {note}")
    if target_legend:
        lines += ["", "Targets (informational; a miss never fails the run, a wrong result does):", ""]
        lines += [f"- {t}" for t in target_legend]
    return "\n".join(lines) + "\n"


def auto_table(rows: Sequence[dict], device_type: str) -> list[str]:
    """One line per case: ``auto`` against the best baseline (the first rule) and what it dispatched to."""
    autos = [r for r in rows if r.get("auto")]
    if not autos:
        return []
    need = AUTO_RULE.get(device_type, AUTO_RULE["cuda"])
    lines = ["", f"## `auto` against the best baseline (the first rule: >= {need}x)", "",
             "Best baseline: the fastest of eager and the other non-compiled baselines (each SDPA backend, cuDNN "
             "alone, eager variants) in the same case; `torch.compile` is in the table above but not in the rule. "
             "`auto ran`: the dispatch decisions its first (untimed) call made, with the times it measured.", "",
             "| op | shape | dtype | auto ms | best baseline | its ms | auto / best | target | auto ran |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in autos:
        best = r.get("best_baseline") or {}
        ratio = r.get("auto_vs_best")
        target = "-" if ratio is None else f"{verdict(ratio >= need)}"
        ran = "-" if r.get("dispatch") is None else dispatch_summary(r["dispatch"])
        if r["status"] != "ok":
            ran = f"{r['status']}: {r['note']}"
        lines.append(f"| {r['op']} | {r['shape']['label']} | {r['dtype']} | {_fmt_ms(r['ms'])} | "
                     f"{best.get('provider', '-')} | {_fmt_ms(best.get('ms'))} | {_fmt_x(ratio)} | {target} | {ran} |")
    return lines


def plot_speedups(session: Session, path: Path, title: str) -> Optional[Path]:
    """Grouped bars: speedup over eager per case and provider. None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in session.rows if r["ratio_vs_eager"] is not None and r["provider"] not in ("torch", "copy")]
    if not rows:
        return None
    cases: list[str] = []
    for r in rows:
        key = f"{r['op']}\n{r['shape']['label']}\n{r['dtype']}"
        if key not in cases:
            cases.append(key)
    providers: list[str] = []
    for r in sorted(rows, key=lambda r: KIND_ORDER.get(r["kind"], 9)):
        if r["provider"] not in providers:
            providers.append(r["provider"])
    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(cases)), 4.5))
    for i, name in enumerate(providers):
        xs, ys = [], []
        for r in rows:
            if r["provider"] == name:
                xs.append(cases.index(f"{r['op']}\n{r['shape']['label']}\n{r['dtype']}") + (i - (len(providers) - 1) / 2) * width)
                ys.append(r["ratio_vs_eager"])
        ax.bar(xs, ys, width=width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, fontsize=7)
    ax.set_ylabel("speedup over eager PyTorch (x)")
    ax.set_title(f"{title}\n{session.device_label}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def start_session(family: str, description: str, known_providers: Sequence[str], known_ops: Sequence[str],
                  argv: Optional[list[str]] = None, quick_budget_s: Optional[float] = None) -> Session:
    """Parse the common flags, open the run (printing its header) and, on a GPU, measure the roofline.

    ``quick_budget_s``: the wall time a GPU ``--quick`` run must stay within on an H100/H200 (compile
    providers are dropped once half of it is spent; the end of the run says when it was exceeded).
    """
    parser = make_parser(f"{description} (see benchmarks/results/README.md).", prog=f"python -m benchmarks.bench_{family}")
    isolate_dispatch_cache()
    session = Session(family, parser.parse_args(argv), known_providers, known_ops)
    if session.quick and session.device.type == "cuda":
        session.budget_s = quick_budget_s
    budget = f" (time budget {session.budget_s:.0f} s)" if session.budget_s else ""
    print(f"{family}: {session.device_label}; dtypes {', '.join(dtype_name(d) for d in session.dtypes)}; "
          f"{'quick' if session.quick else 'full'} run{budget}; {dispatch_mode()}", flush=True)
    if session.device.type == "cuda":
        session.measure_gpu_roofline()
    return session


def run_cases(session: Session, cases: Iterable[Case], providers: Callable[[Case, Session], list[Provider]],
              targets: Optional[Callable[[dict, Case, Session], dict]] = None) -> None:
    """Run every case in turn (inputs live one case at a time)."""
    with torch.no_grad():
        for case in cases:
            session.run_case(case, providers, targets)
