"""Measured dispatch: ``auto`` runs the backend measured fastest for this call's key on this device.

A *key* is ``(op, device name, dtype, shape bucket, flags)``: each op turns its arguments into a
short tuple of features (sequence lengths and row counts rounded up to a power of two, head dim and
channel counts exact, flags such as causal / kv_lens / prologue), so a video DiT's handful of shapes
is tuned once. On the first call of a key, every eligible backend is run once as a warm-up (which
also absorbs Triton's JIT), then timed a few times (CUDA events on GPUs; on CPUs the wall clock, the
candidates taking turns so that a shared machine's changing load hits them alike); the fastest wins
and the decision is kept in memory and in a JSON file under the user's cache directory
(``I2V_KERNELS_CACHE_DIR`` overrides), one file per environment (GPU name, driver, torch, triton and
package versions). A backend that raises while being measured is ruled out for that key (with one
warning), so a kernel that cannot take an input never becomes the choice.

Nothing is measured while ``torch.compile`` traces, during CUDA-graph capture, or when
``I2V_KERNELS_TUNE=0``: then the cached decision, else the shipped static table
(:mod:`i2v_kernels._static_table`, generated from committed benchmark results), else ``native`` --
stock PyTorch -- answers. ``I2V_KERNELS_TUNE=1`` (the default) measures on every device;
``I2V_KERNELS_LOG=dispatch`` logs each new decision.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

TUNE_ENV = "I2V_KERNELS_TUNE"
CACHE_ENV = "I2V_KERNELS_CACHE_DIR"
LOG_ENV = "I2V_KERNELS_LOG"
CACHE_FORMAT = 1
WARMUP = 1  # calls per backend before timing (JIT, autotune, cuDNN plan selection)
REPS = 3  # timed calls per backend per key

logger = logging.getLogger("i2v_kernels.dispatch")

_lock = threading.RLock()
_decisions: dict[str, dict] = {}  # key -> {"backend", "times_ms", "failed", "source": measured|disk, "op"}
_static_used: dict[str, dict] = {}  # keys answered without measuring (shown by info(); measured later if allowed)
_disk_loaded = False
_generation = 0  # bumped when decisions are forgotten: memos of decisions kept elsewhere check it
_warned: set[str] = set()
# Tests inject a timer ``(backend, fn, device) -> ms``; by default CUDA events or the wall clock.
_timer: Optional[Callable[[str, Callable[[], object], torch.device], float]] = None


# --------------------------------------------------------------------------------------------------
# Keys


def bucket(n: int) -> int:
    """``n`` rounded up to a power of two (0 stays 0): shapes in one bucket share a decision."""
    n = int(n)
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


_device_names: dict[str, str] = {}


def device_name(device: torch.device) -> str:
    label = str(device)
    name = _device_names.get(label)
    if name is None:
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
        else:
            name = device.type
        _device_names[label] = name
    return name


_keys: dict[tuple, str] = {}


def make_key(op: str, device: torch.device, dtype: torch.dtype, features: Sequence) -> str:
    """The decision key as a string (JSON-friendly): ``op|device|dtype|f1,f2,...`` (memoized)."""
    memo = (op, device, dtype, tuple(features))
    key = _keys.get(memo)
    if key is None:
        key = _keys[memo] = _make_key(op, device, dtype, features)
    return key


def _make_key(op: str, device: torch.device, dtype: torch.dtype, features: Sequence) -> str:
    parts = ("x".join(map(str, f)) if isinstance(f, tuple) else str(f) for f in features)
    return "|".join((op, device_name(device), str(dtype).replace("torch.", ""), ",".join(parts)))


# --------------------------------------------------------------------------------------------------
# Settings


_force_tuning = threading.local()


def tuning_enabled() -> bool:
    if getattr(_force_tuning, "on", False):
        return True
    value = os.environ.get(TUNE_ENV, "1").strip().lower()
    return value not in ("0", "false", "off", "no")


def tune(fn: Callable, *args, **kwargs) -> list[dict]:
    """Run ``fn(*args, **kwargs)`` once with measuring on (even under ``I2V_KERNELS_TUNE=0``), so every
    op key it reaches is measured and saved to the disk cache; returns the decisions it made.

    Example (pre-tune a pipeline's shapes before serving; later processes start tuned)::

        import i2v_kernels
        i2v_kernels.tune(pipe, image=image, prompt="a boat drifts left", num_inference_steps=1)
    """
    before = {d["key"] for d in decisions() if d["source"] in ("measured", "disk")}
    previous = getattr(_force_tuning, "on", False)
    _force_tuning.on = True
    try:
        with torch.no_grad():
            fn(*args, **kwargs)
    finally:
        _force_tuning.on = previous
    return [d for d in decisions() if d["source"] == "measured" and d["key"] not in before]


def _logging_on() -> bool:
    return "dispatch" in os.environ.get(LOG_ENV, "").lower().split(",")


def _measuring_forbidden(device: torch.device) -> Optional[str]:
    """Why no measurement may run now, or None."""
    if not tuning_enabled():
        return f"{TUNE_ENV}=0"
    if torch.compiler.is_compiling():
        return "torch.compile is tracing"
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured"
    return None


# --------------------------------------------------------------------------------------------------
# Disk cache


def _environment() -> dict:
    from i2v_kernels import _backend

    env = {"format": CACHE_FORMAT, "torch": torch.__version__, "i2v_kernels": _backend._version(),
           "extension": _extension_identity()}
    triton = _backend._triton.get()
    env["triton"] = getattr(triton, "__version__", None)
    if torch.cuda.is_available():
        env["gpus"] = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        try:
            env["driver"] = torch._C._cuda_getDriverVersion()
        except (AttributeError, RuntimeError) as e:  # older torch, or no driver API
            env["driver"] = f"unknown ({type(e).__name__})"
    env["cuda"] = torch.version.cuda
    return env


def _extension_identity() -> Optional[list]:
    """Size and modification time of the compiled extension ``i2v_kernels._C``: a rebuilt extension (new
    kernels, same package version -- an editable install) starts a fresh cache instead of reusing
    decisions measured on the old kernels. None when it is not built."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("i2v_kernels._C")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    try:
        st = os.stat(spec.origin)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def cache_dir() -> Path:
    override = os.environ.get(CACHE_ENV, "").strip()
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "i2v_kernels"


def cache_file() -> Path:
    env = _environment()
    digest = hashlib.sha1(json.dumps(env, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"dispatch-{digest}.json"


def _warn_once(message: str) -> None:
    with _lock:
        if message in _warned:
            return
        _warned.add(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _load_disk() -> None:
    """Read this environment's decisions once; a corrupt or foreign file is ignored with one warning."""
    global _disk_loaded
    if _disk_loaded:
        return
    _disk_loaded = True
    path = cache_file()
    if not path.exists():
        return
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("decisions"), dict):
            raise ValueError("no 'decisions' table")
        if data.get("environment") != _environment():
            _warn_once(f"i2v_kernels: dispatch cache {path} was written by another environment "
                       f"(versions or GPU differ); ignoring it and measuring again")
            return
        for key, rec in data["decisions"].items():
            if isinstance(rec, dict) and isinstance(rec.get("backend"), str):
                _decisions.setdefault(key, {**rec, "source": "disk"})
    except (OSError, ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        _warn_once(f"i2v_kernels: dispatch cache {path} is unreadable ({type(e).__name__}: {e}); ignoring it")


def _save_disk() -> None:
    path = cache_file()
    measured = {k: {kk: vv for kk, vv in rec.items() if kk != "source"}
                for k, rec in _decisions.items() if rec.get("source") in ("measured", "disk")}
    payload = {"environment": _environment(), "decisions": measured}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    except OSError as e:
        _warn_once(f"i2v_kernels: could not write the dispatch cache {path} ({e}); decisions stay in memory")


def clear(memory: bool = True, disk: bool = False) -> None:
    """Forget decisions (in memory and/or this environment's cache file)."""
    global _disk_loaded, _generation
    with _lock:
        if memory:
            _generation += 1
            _decisions.clear()
            _static_used.clear()
            _disk_loaded = False
        if disk:
            try:
                cache_file().unlink()
            except FileNotFoundError:
                pass


def decisions() -> list[dict]:
    """Every decision made or loaded in this process (for :func:`i2v_kernels.info`)."""
    with _lock:
        merged = {**_static_used, **_decisions}
        return [{"key": k, **v} for k, v in sorted(merged.items())]


# --------------------------------------------------------------------------------------------------
# Timing


def _time_cuda(fn: Callable[[], object], device: torch.device, give_up_ms: float = math.inf) -> float:
    stream = torch.cuda.current_stream(device)
    times = []
    for _ in range(REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end))
        if times[-1] > give_up_ms:  # hopeless: one rep says enough (a 359 ms Triton call at T = 128)
            break
    return statistics.median(times)


# Host (CPU) measurement: the candidates take turns, one call each per round, for this many rounds;
# each is judged by its median call. On a CPU shared with other work the load changes within a second,
# so candidates timed one after another were judged under different loads (a 30% error between two
# backends running the same convolution); in turns they see the same moments. The median, not the
# fastest call: a backend whose calls are sometimes fast and mostly slow (fresh memory paid in page
# faults under load: native_packed temporal attention ran 1.7 ms once and 18 ms typically) lost by
# its median but had won by its minimum.
HOST_ROUNDS = 7

# A candidate whose first run takes this many times the best time so far is not timed further (a
# bf16 conv3d through PyTorch on a CPU can take 20x our kernel's time: seconds per call).
ABORT_RATIO = 4.0


def _rule_out(op: str, backend: str, failed: dict, e: Exception) -> None:
    failed[backend] = f"{type(e).__name__}: {e}"
    _warn_once(f"i2v_kernels.{op}: backend {backend!r} failed while being measured and is ruled out "
               f"for this shape ({failed[backend]})")


# A warm-up call during which other keys were measured (the first call of a module whose ops, or
# patched submodules, are new: their candidates all ran inside it) is repeated, up to this many times,
# so the warm-up time that judges a candidate hopeless is its own.
NESTED_WARMUPS = 3
_measures = 0  # measurements started in this process (a change tells a call measured keys inside it)


def _warm_up(run: Callable[[str], object], backend: str) -> float:
    """Milliseconds of the last warm-up call of ``backend`` that measured no other key."""
    for i in range(WARMUP + NESTED_WARMUPS):
        before = _measures
        t0 = time.perf_counter()
        run(backend)
        ms = (time.perf_counter() - t0) * 1e3
        if i + 1 >= WARMUP and _measures == before:
            break
    return ms


def _measure_host(op: str, run: Callable[[str], object], order: Sequence[str]) -> dict:
    """CPU timing without an injected timer: warm-up calls (:func:`_warm_up`), one more call whose time rules out
    hopeless candidates), then :data:`HOST_ROUNDS` rounds in turns, the order reversed every other round."""
    times: dict[str, float] = {}
    failed: dict[str, str] = {}
    for backend in order:
        try:
            _warm_up(run, backend)
            # judged by a second call: a first one can carry one-time costs (conv3d's native path took
            # 61 ms on its first call against 8 ms for the C++ op, and was ruled out while faster)
            t0 = time.perf_counter()
            run(backend)
            times[backend] = (time.perf_counter() - t0) * 1e3
        except Exception as e:  # noqa: BLE001 -- any failure rules this backend out for the key, loudly
            _rule_out(op, backend, failed, e)
    if not times:
        return {"times_ms": times, "failed": failed}
    first_best = min(times.values())
    turns = [b for b in times if times[b] <= ABORT_RATIO * first_best]  # the others keep their first time
    samples: dict[str, list[float]] = {b: [] for b in turns}
    for r in range(HOST_ROUNDS):
        for backend in (turns if r % 2 == 0 else turns[::-1]):
            if backend in failed:
                continue
            try:
                t0 = time.perf_counter()
                run(backend)
                samples[backend].append((time.perf_counter() - t0) * 1e3)
            except Exception as e:  # noqa: BLE001
                _rule_out(op, backend, failed, e)
                times.pop(backend, None)
    for backend, ms in samples.items():
        if backend not in failed:
            times[backend] = statistics.median(ms)
    return {"times_ms": times, "failed": failed}


def _measure(op: str, device: torch.device, run: Callable[[str], object], candidates: Sequence[str]) -> dict:
    global _measures
    _measures += 1  # (under _lock)
    # the likeliest winner first, so a hopeless candidate is recognised by its first run
    order = sorted(candidates, key=lambda b: b != default_choice(device, candidates))
    if device.type != "cuda" and _timer is None:
        return _measure_host(op, run, order)
    times: dict[str, float] = {}

    def default(backend, fn, dev):
        return _time_cuda(fn, dev, ABORT_RATIO * min(times.values()) if times else math.inf)

    timer = _timer or default
    failed: dict[str, str] = {}
    for backend in order:
        try:
            _warm_up(run, backend)  # on a GPU the first run includes JIT compiles: no judging by it
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[backend] = float(timer(backend, lambda b=backend: run(b), device))
        except Exception as e:  # noqa: BLE001 -- any failure rules this backend out for the key, loudly
            _rule_out(op, backend, failed, e)
    return {"times_ms": times, "failed": failed}


# --------------------------------------------------------------------------------------------------
# Choosing


def cached(key: str, device: torch.device) -> Optional[str]:
    """The decision already made for ``key`` that still stands (measured or loaded; or static while
    measuring stays forbidden), else None. Lock-free: dict reads are atomic."""
    rec = _decisions.get(key)
    if rec is not None:
        return rec["backend"]
    rec = _static_used.get(key)
    if rec is not None and (rec["source"] == "only eligible" or (
            _disk_loaded and rec.get("why_not_measured", "") == _measuring_forbidden(device))):
        return rec["backend"]
    return None


def decision(key: str) -> Optional[dict]:
    """``key``'s measured or disk-loaded decision record (backend, times), or None."""
    return _decisions.get(key)


def settled(key: str) -> bool:
    """Whether ``key`` has a measured or disk-loaded decision (final; a static choice may be measured
    later), so a caller may memoize it until :data:`_generation` changes."""
    return key in _decisions


# A candidate named ``prefer`` (the user's own code, e.g. a patched module's original forward) is kept
# unless another measured at least this much faster: a measured tie keeps what runs without us.
PREFER_MARGIN = 0.03


def _fastest(times: dict, prefer: Optional[str]) -> str:
    best = min(times, key=times.get)
    if prefer in times and best != prefer and times[best] > (1.0 - PREFER_MARGIN) * times[prefer]:
        return prefer
    return best


def choose(op: str, key: str, device: torch.device, candidates: Sequence[str], run: Callable[[str], object],
           static: Callable[[], Optional[str]], prefer: Optional[str] = None) -> str:
    """The backend ``auto`` runs for ``key`` among the eligible ``candidates`` (at least one); ``prefer``
    wins measured ties (:data:`PREFER_MARGIN`)."""
    if len(candidates) == 1:
        if key not in _static_used:
            with _lock:
                _static_used[key] = {"backend": candidates[0], "source": "only eligible", "op": op}
        return candidates[0]
    known = cached(key, device)  # lock-free
    if known in candidates:
        return known
    with _lock:
        _load_disk()
        rec = _decisions.get(key)
        if rec is not None and rec["backend"] in candidates:
            return rec["backend"]
        forbidden = _measuring_forbidden(device)
        if forbidden is None:
            result = _measure(op, device, run, candidates)
            if result["times_ms"]:
                best = _fastest(result["times_ms"], prefer)
                rec = {"backend": best, "source": "measured", "op": op, **result}
                _decisions[key] = rec
                _save_disk()
                if _logging_on():
                    logger.warning("i2v_kernels dispatch: %s -> %s (%s)", key, best,
                                   ", ".join(f"{b} {t:.4g} ms" for b, t in sorted(result["times_ms"].items(),
                                                                                key=lambda kv: kv[1])))
                return best
            # every candidate failed: fall through to the static choice, which then raises for real
        choice = static()
        if choice not in candidates:
            choice = default_choice(device, candidates)
        _static_used[key] = {"backend": choice, "source": "static", "op": op, "why_not_measured": forbidden}
        return choice


def fastest(times_ms: dict, prefer: Optional[str] = None) -> str:
    """The candidate with the least time; ``prefer`` unless another is :data:`PREFER_MARGIN` faster."""
    return _fastest(times_ms, prefer)


def measuring_forbidden(device: torch.device) -> Optional[str]:
    """Why nothing may be measured now on ``device`` (compile tracing, graph capture, tuning off), or None."""
    return _measuring_forbidden(device)


def revise(key: str, backend: str, in_context_ms: dict) -> None:
    """Replace ``key``'s measured decision by ``backend``, chosen from times taken in the caller's real
    calls (``in_context_ms``: candidate -> median ms); kept on disk like a measured one, marked so that
    it is not verified again."""
    with _lock:
        rec = _decisions.get(key)
        if rec is None:
            return
        _decisions[key] = {**rec, "backend": backend, "in_context_ms": dict(in_context_ms), "source": "measured"}
        _save_disk()
        if _logging_on():
            logger.warning("i2v_kernels dispatch: %s -> %s in context (%s)", key, backend,
                           ", ".join(f"{b} {t:.4g} ms" for b, t in sorted(in_context_ms.items(), key=lambda kv: kv[1])))


def default_choice(device: torch.device, candidates: Sequence[str]) -> str:
    """Without a measurement or a static entry: stock PyTorch on GPUs (never slower than the user's
    own code); on CPUs our C++ kernel where it exists, since PyTorch's CPU convolution and norms in
    bf16/fp16 can be many times slower than fp32 (measured: a bf16 conv3d 45x slower)."""
    order = ("cpu", "native") if device.type == "cpu" else ("native",)
    for backend in order:
        if backend in candidates:
            return backend
    return candidates[0]


def nearest_static(table: Sequence[tuple], op: str, device: torch.device, dtype: torch.dtype,
                   flags: tuple, sizes: Sequence[int]) -> Optional[str]:
    """The backend of the static-table entry closest to this call: same op, device type, dtype and
    flags; the smallest summed |log2| distance over the size features, within a factor of 8 in all."""
    dtype_name = str(dtype).replace("torch.", "")
    best, best_d = None, 3.0 + 1e-9
    for entry_op, dev_type, entry_dtype, entry_flags, entry_sizes, backend in table:
        if (entry_op != op or dev_type != device.type or entry_dtype != dtype_name or tuple(entry_flags) != flags
                or len(entry_sizes) != len(sizes)):
            continue
        d = sum(abs(math.log2(max(a, 1)) - math.log2(max(b, 1))) for a, b in zip(entry_sizes, sizes))
        if d < best_d:
            best, best_d = backend, d
    return best
