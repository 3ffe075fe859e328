"""Backend registry, eligibility and per-call selection.

Backends:

* ``cuda``   -- CUDA C++ kernels of the extension ``i2v_kernels._C`` (CUDA tensors);
* ``triton`` -- Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``, and then
  only when asked for explicitly: ``auto`` never picks the interpreter, a debugging tool);
* ``cpu``    -- C++ CPU kernels of ``i2v_kernels._C`` (CPU tensors);
* ``native`` -- the fastest stock-PyTorch way to compute the op in the input dtype (SDPA on strided
  views, ``F.layer_norm`` + modulate, cuDNN ``conv3d`` on channels_last_3d): what a user would write;
* ``native_packed`` -- attention only: SDPA on contiguous ``[batch, H, seq, D]`` copies, eager DiT
  code's layout, for which PyTorch picks cuDNN on GPUs (it wins some shapes there, and temporal
  attention on CPUs);
* ``flash_attn``, ``sageattention`` -- outside attention libraries, when installed (never required);
* ``torch``  -- the pure-PyTorch reference (fp32 math, fp64 for fp64 inputs): the test oracle, run by
  ``auto`` only when nothing else can take the call.

``auto`` is measured (:mod:`i2v_kernels._dispatch`): among the backends eligible for a call (device,
dtype and shape checks, each with a reason string), the one measured fastest for the call's key on
this device runs. ``use_backend(name)`` or the environment variable ``I2V_KERNELS_BACKEND`` forces one;
a forced backend that cannot run raises :class:`BackendUnavailableError` saying why.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import platform
import threading
import warnings
from typing import Callable, Iterator, Optional

import torch

BACKENDS = ("cuda", "triton", "cpu", "native", "native_packed", "flash_attn", "sageattention", "torch")
OUTSIDE = ("flash_attn", "sageattention")  # outside libraries: imported lazily, never required
OWN_KERNELS = ("cuda", "triton", "cpu")  # this package's kernels (their why_not reasons are input limits)
CHOICES = ("auto",) + BACKENDS
ENV_VAR = "I2V_KERNELS_BACKEND"

# Oldest GPU architecture the kernels are written for (cp.async-era features, bf16 math).
MIN_CUDA_CAPABILITY = (8, 0)

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("i2v_kernels_backend", default=None)
_lock = threading.Lock()
_fallbacks: dict[tuple[str, str, str], int] = {}


class BackendUnavailableError(RuntimeError):
    """A backend that was asked for explicitly cannot run this call."""


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or name not in CHOICES:
        raise ValueError(f"{what} must be one of {', '.join(CHOICES)}; got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block (``"auto"`` restores per-call selection).

    Example::

        with i2v_kernels.use_backend("torch"):
            y = i2v_kernels.adaln_modulate(x, shift, scale)
    """
    token = _forced.set(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _forced.reset(token)


def requested_backend() -> str:
    """The backend asked for now: ``use_backend`` first, then ``I2V_KERNELS_BACKEND``, else ``auto``."""
    name = _forced.get()
    if name is not None:
        return name
    env = _getenv(ENV_VAR).strip().lower()
    if not env:
        return "auto"
    return _check_name(env, f"environment variable {ENV_VAR}")


def _environ_lookup() -> Callable[[str], str]:
    """``os.environ.get(name, "")`` without its cost for an unset name (a raised and caught KeyError,
    ~1.5 us): every op call asks for the forced backend. CPython keeps the environment in
    ``os.environ._data`` under encoded keys; elsewhere the plain lookup."""
    data, encode = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None)
    decode = getattr(os.environ, "decodevalue", None)
    if not isinstance(data, dict) or encode is None or decode is None:
        return lambda name: os.environ.get(name, "")
    keys: dict[str, object] = {}

    def get(name: str) -> str:
        key = keys.get(name)
        if key is None:
            key = keys[name] = encode(name)
        value = data.get(key)
        return "" if value is None else decode(value)

    return get


_getenv = _environ_lookup()


# --------------------------------------------------------------------------------------------------
# What loaded, and why not


class _Lazy:
    """Import a module once, keeping the error (shown by info()) instead of raising it."""

    def __init__(self, name: str):
        self.name = name
        self._done = False
        self.module = None
        self.error: Optional[str] = None

    def get(self):
        if not self._done:
            with _lock:
                if not self._done:
                    try:
                        self.module = importlib.import_module(self.name)
                    except ImportError as e:  # missing build, missing triton, ABI mismatch ...
                        self.error = f"{type(e).__name__}: {e}"
                    self._done = True
        return self.module


_ext = _Lazy("i2v_kernels._C")
_triton = _Lazy("triton")
_outside = {"flash_attn": _Lazy("flash_attn"), "sageattention": _Lazy("sageattention")}


def load_extension() -> Optional[str]:
    """Load ``i2v_kernels._C`` (registers the C++ ops); return why it is unusable, or None."""
    if _ext.get() is None:
        return f"extension i2v_kernels._C did not load ({_ext.error}); build it with `pip install --no-build-isolation -e .`"
    return None


_registered: set = set()  # (op, dispatch key) pairs seen registered: a registration is never undone


def _has_kernel(op: str, key: str) -> bool:
    if (op, key) in _registered:
        return True
    try:
        found = torch._C._dispatch_has_kernel_for_dispatch_key(f"i2v_kernels::{op}", key)
    except RuntimeError:  # no such operator: the extension is missing or older than this package
        return False
    if found:
        _registered.add((op, key))
    return found


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cuda_build_reason() -> Optional[str]:
    reason = load_extension()
    if reason:
        return reason
    if not _has_kernel("_adaln_fwd", "CUDA"):
        return "i2v_kernels._C was built without CUDA kernels (no nvcc or a CPU-only torch at build time)"
    return None


def _cuda_reason(device: torch.device) -> Optional[str]:
    reason = _cuda_build_reason()
    if reason:
        return reason
    if device.type != "cuda":
        return f"tensors are on {device}, not a CUDA device"
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CUDA_CAPABILITY:
        return f"GPU capability {cap} is below {MIN_CUDA_CAPABILITY}"
    return None


def _triton_reason(device: torch.device) -> Optional[str]:
    if _triton.get() is None:
        return f"triton did not import ({_triton.error})"
    if device.type == "cpu" and not triton_interpreted():
        return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
    if device.type not in ("cpu", "cuda"):
        return f"Triton kernels do not run on {device.type} tensors"
    return None


def _cpu_reason(device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return f"tensors are on {device}, not the CPU"
    return load_extension()


def _outside_reason(name: str, device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"{name} runs CUDA tensors only"
    if _outside[name].get() is None:
        return f"{name} is not installed ({_outside[name].error})"
    return None


_GENERIC: dict[str, Callable[[torch.device], Optional[str]]] = {
    "cuda": _cuda_reason,
    "triton": _triton_reason,
    "cpu": _cpu_reason,
    "native": lambda device: None,
    "native_packed": lambda device: None,
    "flash_attn": lambda device: _outside_reason("flash_attn", device),
    "sageattention": lambda device: _outside_reason("sageattention", device),
    "torch": lambda device: None,
}


def _auto_candidate(backend: str, device: torch.device) -> bool:
    """Does ``auto`` consider this backend for tensors on ``device`` at all (no warning when not)."""
    if backend == "cuda" or backend == "triton":
        return device.type == "cuda"
    if backend == "cpu":
        return device.type == "cpu"
    if backend in OUTSIDE:
        return device.type == "cuda"
    return backend != "torch"  # the fp32 reference is the last resort, not a speed candidate


def _warn_fallback(op: str, backend: str, reason: str) -> None:
    key = (op, backend, reason)
    with _lock:
        first = key not in _fallbacks
        _fallbacks[key] = _fallbacks.get(key, 0) + 1
    if first:
        warnings.warn(f"i2v_kernels.{op}: backend {backend!r} cannot run this call ({reason}); falling back",
                      RuntimeWarning, stacklevel=4)


def select(op: str, device: torch.device, why_not: Callable[[str], Optional[str]],
           implemented: tuple[str, ...] = BACKENDS) -> str:
    """Pick the backend for one call of ``op`` by a fixed order (kernels first, the reference last):
    for paths that are not measured yet (the attention backward).

    ``implemented`` lists the backends that have a kernel for ``op`` at all (``auto`` skips the others
    silently); ``why_not(backend)`` returns the op-specific reason a backend cannot take this call
    (dtype, shape ...) or None; device-level availability is checked here first.
    """
    wanted = requested_backend()
    if wanted != "auto":
        _forced_check(op, wanted, device, why_not, implemented)
        return wanted
    for backend in BACKENDS:
        if backend not in implemented or not _auto_candidate(backend, device):
            continue
        reason = _GENERIC[backend](device) or why_not(backend)
        if reason is None:
            return backend
        _warn_fallback(op, backend, reason)
    return "torch"  # the reference runs everywhere


_Parameter = torch.nn.Parameter


def direct_call_ok(*tensors) -> bool:
    """May a public function run its implementation directly instead of through its ``torch.library``
    op? Only in plain eager calls: not under ``torch.compile``, with no autograd to record, no
    dispatch or function mode active (fake tensors, op counters, FLOP counters see the op), no
    profiler running (it sees the op), and plain tensors. The op's Python dispatch (autograd wrapper,
    redispatch, dynamo guard) costs tens of microseconds per call -- more than a small video-DiT op
    takes on a GPU -- and buys nothing in such a call."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled() or torch.autograd.profiler._is_profiler_enabled):
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        # nn.Parameter counts as plain: a module's weights are Parameters, and its subclass adds no
        # dispatch of its own (no __torch_function__ / __torch_dispatch__ override)
        if t is not None and ((type(t) is not torch.Tensor and type(t) is not _Parameter)
                              or (grad and t.requires_grad)):
            return False
    return True


def _forced_check(op: str, wanted: str, device: torch.device, why_not, implemented) -> None:
    reason = None if wanted in implemented else f"there is no {wanted} kernel for {op} (it has: {', '.join(implemented)})"
    reason = reason or _GENERIC[wanted](device) or why_not(wanted)
    if reason:
        raise BackendUnavailableError(f"i2v_kernels.{op}: backend {wanted!r} was requested but cannot run: {reason}")


def eligible(op: str, device: torch.device, why_not: Callable[[str], Optional[str]],
             implemented: tuple[str, ...]) -> list[str]:
    """The backends ``auto`` may run for this call (``torch`` only when no other can); the reasons the
    others cannot are recorded for :func:`info`."""
    ok = []
    for backend in BACKENDS:
        if backend not in implemented or not _auto_candidate(backend, device):
            continue
        generic = _GENERIC[backend](device)
        reason = generic or why_not(backend)
        if reason is None:
            ok.append(backend)
        elif generic is None and backend in OWN_KERNELS:
            _warn_fallback(op, backend, reason)  # our kernel cannot take this input: say so once, run another
        else:
            key = (op, backend, reason)
            with _lock:
                _fallbacks[key] = _fallbacks.get(key, 0) + 1
    return ok or ["torch"]


def dispatch(op: str, device: torch.device, dtype: torch.dtype, why_not: Callable[[str], Optional[str]],
             implemented: tuple[str, ...], features: tuple, run: Callable[[str], object],
             static: Optional[Callable[[], Optional[str]]] = None):
    """Run one call of ``op``: on the forced backend, else on the one ``auto`` chooses by measurement.

    ``features`` is the call's shape bucket and flags (part of the decision key); ``run(backend)``
    computes the op on that backend (called more than once while the key is being measured);
    ``static()`` names the shipped static table's choice for when nothing may be measured.
    """
    wanted = requested_backend()
    if wanted != "auto":
        _forced_check(op, wanted, device, why_not, implemented)
        return run(wanted)
    from i2v_kernels import _dispatch

    key = _dispatch.make_key(op, device, dtype, features)
    known = _dispatch.cached(key, device)
    if known is not None and known in implemented and _auto_candidate(known, device) and \
            _GENERIC[known](device) is None and why_not(known) is None:
        return run(known)  # the common case: one eligibility check instead of every backend's
    candidates = eligible(op, device, why_not, implemented)
    # a measured tie keeps native: stock PyTorch, what the caller would run without us
    backend = _dispatch.choose(op, key, device, candidates, run, static or (lambda: None), prefer="native")
    return run(backend)


def available_backends() -> list[str]:
    """Backends usable in this process for some device (``torch`` always)."""
    usable = []
    if torch.cuda.is_available() and _cuda_reason(torch.device("cuda")) is None:
        usable.append("cuda")
    if _triton_reason(torch.device("cuda" if torch.cuda.is_available() else "cpu")) is None:
        usable.append("triton")
    if _cpu_reason(torch.device("cpu")) is None:
        usable.append("cpu")
    usable.append("torch")
    return usable


def info() -> dict:
    """Versions, build configuration, GPU, and which backends are usable (and why not)."""
    from i2v_kernels import _dispatch

    load_extension()
    try:
        from i2v_kernels._build_info import BUILD_INFO
    except ImportError as e:
        BUILD_INFO = {"error": f"no build information ({e}); the extension was not built with setup.py"}
    triton = _triton.get()
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
        }
    cuda_dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = {}
    for name in BACKENDS:
        if name == "cuda":
            reason = _cuda_build_reason() or (None if torch.cuda.is_available() else "no CUDA GPU visible")
            if reason is None:
                reason = _cuda_reason(torch.device("cuda"))
        elif name == "triton" or name in OUTSIDE:
            reason = _GENERIC[name](cuda_dev)  # GPU backends: judged on the GPU when one is visible
        else:
            reason = _GENERIC[name](torch.device("cpu"))
        backends[name] = {"usable": reason is None, "why_not": reason}
    return {
        "i2v_kernels": _version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": getattr(triton, "__version__", None),
        "triton_interpret": triton_interpreted(),
        "gpu": gpu,
        "build": BUILD_INFO,
        "extension_error": _ext.error,
        "requested_backend": requested_backend(),
        "backends": backends,
        "fallbacks": [
            {"op": op, "backend": b, "reason": r, "count": n} for (op, b, r), n in sorted(_fallbacks.items())
        ],
        "tuning": {"measure": _dispatch.tuning_enabled(), "cache_file": str(_dispatch.cache_file())},
        "dispatch": _dispatch.decisions(),
    }


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("i2v-kernels")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"
