"""Ahead-of-time compile of the package's Triton kernels for real GPU targets, on a machine without a GPU.

The interpreter (``TRITON_INTERPRET=1``, how CPU-only CI runs the kernels) is not a compiler: it runs
the kernel as Python and accepts code the compiler rejects. This module compiles every kernel with
``triton.compile`` for ``sm_80`` / ``sm_90a`` (and ``sm_120a``), PTX and cubin, and reads the resources
of each cubin (:mod:`i2v_kernels.tools.resources`).

What is compiled comes from the ``COMPILE_SPACES`` the kernel modules declare
(:mod:`i2v_kernels.ops._compile_space`). A space's full product (features x dtypes x launches) runs
to tens of thousands of compiles for the attention kernels, at seconds each, so :func:`plan` compiles a
covering subset instead (``full=True`` for all of it), as deep as ``DEPTH`` says per target:

* every launch-configuration value -- each tile size, warp count, stage count and dtype case -- at
  least once, with the heaviest feature combination (the most code, so the most registers), and the
  largest launch (the most shared memory) and the typical one among them;
* for an autotuned kernel, every config its autotuner can time on the target (the space's ``fits``:
  its shared-memory pruning at the target's limit), at the typical head tile where the config fits
  there, else at the largest launch holding it, with the space's ``config_feature`` flags;
* every pair (sm_90a) or every value (sm_80) of the feature values found in reachable combinations
  (a covering set chosen greedily from those combinations), at the smallest launch;
* the heaviest combination once more with every integer argument as ``i64``, as the JIT passes sizes
  and strides of 2**31 and more (video tensors reach that).

Compiles run in worker processes started without ``TRITON_INTERPRET`` (a kernel decorated under the
interpreter is not compilable, nor are the helpers it calls), and Triton's on-disk cache makes a
repeated run fast.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib
import io
import inspect
import itertools
import json
import os
import pkgutil
import queue
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional, Sequence

from i2v_kernels.tools import resources

#: Compile targets by report name. Triton names capability 90 and up with the ``a`` suffix
#: (``sm_90a``: wgmma and TMA), so GPUTarget("cuda", 90, 32) is sm_90a.
CAPABILITIES = {"sm80": 80, "sm90a": 90, "sm120a": 120}
REQUIRED_ARCHS = ("sm80", "sm90a")


def available_archs() -> tuple[str, ...]:
    """The required targets, and sm_120a when this Triton ships the ptxas that compiles it."""
    from triton import knobs

    try:
        blackwell = os.path.exists(knobs.nvidia.ptxas_blackwell.path)
    except (RuntimeError, AttributeError):  # no such tool in this Triton
        blackwell = False
    return REQUIRED_ARCHS + (("sm120a",) if blackwell else ())


# --------------------------------------------------------------------------------------------------
# Discovery: every @triton.jit function in the package, and which of them the spaces cover


def _jit_types() -> tuple[type, ...]:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return JITFunction, InterpretedFunction


def _jit_base(obj) -> Any:
    """The jit function under ``obj`` (through autotuner / heuristics wrappers), or None."""
    from triton.runtime.jit import KernelInterface

    jit_types = _jit_types()
    while isinstance(obj, KernelInterface) and not isinstance(obj, jit_types):
        obj = getattr(obj, "fn", None)
    return obj if isinstance(obj, jit_types) else None


def _python_function(obj):
    """The Python function under a jit function (and its autotuner / heuristics wrappers), or ``obj``."""
    base = _jit_base(obj)
    return base.fn if base is not None else obj


def qualified_name(fn) -> str:
    """``module.qualname`` of a jit function (of its Python function)."""
    py = _python_function(fn)
    return f"{py.__module__}.{py.__qualname__}"


def package_modules(package: str = "i2v_kernels") -> list:
    """Every module of the package, imported (``__main__`` modules excepted: importing runs them)."""
    root = importlib.import_module(package)
    mods = [root]
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
        if info.name.rsplit(".", 1)[-1] != "__main__":
            mods.append(importlib.import_module(info.name))
    return mods


def jit_functions(modules: Iterable) -> dict[str, Any]:
    """``{qualified name: jit function}`` for every ``@triton.jit`` function the modules define."""
    found = {}
    for mod in modules:
        for value in vars(mod).values():
            fn = _jit_base(value)
            if fn is not None and fn.fn.__module__ == mod.__name__:
                found[qualified_name(fn)] = fn
    return found


def compile_spaces(modules: Iterable) -> list:
    """Every ``KernelSpace`` the modules declare in ``COMPILE_SPACES``."""
    return [space for mod in modules for space in getattr(mod, "COMPILE_SPACES", ())]


def called_jit_functions(fn) -> dict[str, Any]:
    """The jit functions ``fn``'s body calls (by global name or ``module.name``), transitively."""
    seen: dict[str, Any] = {}
    todo = [_jit_base(fn)]
    while todo:
        current = todo.pop()
        py = current.fn
        scope = py.__globals__
        for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(py)))):
            value = None
            if isinstance(node, ast.Name):
                value = scope.get(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                value = getattr(scope.get(node.value.id), node.attr, None)
            callee = _jit_base(value)
            if callee is not None and callee is not current and qualified_name(callee) not in seen:
                seen[qualified_name(callee)] = callee
                todo.append(callee)
    return seen


def uncovered(modules: Sequence) -> list[str]:
    """Jit functions of the modules that no space declares and no declared kernel calls."""
    declared = {qualified_name(space.kernel): _jit_base(space.kernel) for space in compile_spaces(modules)}
    reached = set(declared)
    for kernel in declared.values():
        reached.update(called_jit_functions(kernel))
    return sorted(set(jit_functions(modules)) - reached)


# --------------------------------------------------------------------------------------------------
# Plan: which points of each space to compile


@dataclass(frozen=True)
class Variant:
    """One compile: a kernel (by qualified name), a target, and everything ``triton.compile`` needs."""

    kernel: str
    arch: str
    dtypes: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int
    num_stages: Optional[int]
    why: str  # which part of the plan asked for it: launch, typical, feature, int64, full or probe
    overrides: tuple[str, ...] = ()  # pointer arguments whose type the feature sets (not the dtype case)
    launch_keys: tuple[str, ...] = ()  # the constexprs that came from the launch configuration
    dtype_keys: tuple[str, ...] = ()   # ... and from the dtype case (shown by its name)

    def launch_label(self) -> str:
        """``BLOCK_M=128 BLOCK_N=64 w4 s2``: the launch configuration (``s`` absent: Triton's default)."""
        parts = [f"{k}={v}" for k, v in self.constexprs if k in self.launch_keys]
        stages = [] if self.num_stages is None else [f"s{self.num_stages}"]
        return " ".join(parts + [f"w{self.num_warps}"] + stages)

    def feature_label(self) -> str:
        """The other constexprs (flags by name when set), pointer types a feature overrides, ``i64``
        when integers are 64-bit."""
        parts = []
        for k, v in self.constexprs:
            if k in self.launch_keys or k in self.dtype_keys:
                continue
            if isinstance(v, bool):
                parts += [k] if v else []
            else:
                parts.append(f"{k}={v}")
        parts += [f"{k}:{t[1:]}" for k, t in self.signature if k in self.overrides]
        if any(t == "i64" for _, t in self.signature):
            parts.append("ints:i64")
        return " ".join(parts) or "-"

    def to_json(self) -> str:
        data = asdict(self)
        data["constexprs"] = [[k, _encode(v)] for k, v in self.constexprs]
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> "Variant":
        data = json.loads(text)
        data["signature"] = tuple(tuple(p) for p in data["signature"])
        data["overrides"] = tuple(data["overrides"])
        data["launch_keys"] = tuple(data["launch_keys"])
        data["dtype_keys"] = tuple(data["dtype_keys"])
        data["constexprs"] = tuple((k, _decode(v)) for k, v in data["constexprs"])
        return cls(**data)


def _encode(value):
    from triton import language as tl

    return {"tl": str(value)} if isinstance(value, tl.dtype) else value


def _decode(value):
    from triton import language as tl

    if isinstance(value, dict):
        names = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}
        return getattr(tl, names.get(value["tl"], value["tl"]))
    return value


def kernel_params(fn) -> tuple[list[str], set[str]]:
    """The kernel's argument names in order, and those annotated ``tl.constexpr``."""
    params = inspect.signature(_python_function(fn)).parameters
    names = list(params)
    constexpr = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
    return names, constexpr


def _is_pointer_type(value) -> bool:
    return isinstance(value, str) and value.startswith("*")


def make_variant(space, arch: str, case, launch, feature: dict, why: str, int_type: str = "i32") -> Variant:
    """The compile of ``space``'s kernel for one (dtype case, launch, feature) point."""
    names, constexpr_names = kernel_params(space.kernel)
    overrides = {k: v for k, v in feature.items() if _is_pointer_type(v)}
    constexprs = {**case.constexprs, **launch.as_dict(), **{k: v for k, v in feature.items() if k not in overrides}}
    missing, extra = constexpr_names - set(constexprs), set(constexprs) - constexpr_names
    if missing or extra:
        raise ValueError(f"{space.name}: the compile space sets constexprs {sorted(extra)} the kernel does not "
                         f"have and leaves {sorted(missing)} unset")
    signature = []
    for name in names:
        if name in constexpr_names:
            signature.append((name, "constexpr"))
        else:
            signature.append((name, overrides.get(name) or case.pointers.get(name)
                              or ("fp32" if name in space.floats else int_type)))
    return Variant(space.name, arch, case.name, tuple(signature),
                   tuple((n, constexprs[n]) for n in names if n in constexpr_names), launch.num_warps,
                   launch.num_stages, why, tuple(overrides), tuple(launch.as_dict()), tuple(case.constexprs))


def cover(items: Sequence[dict], strength: int, start: Sequence[int] = (), cost=None) -> list[int]:
    """Indices of items (``start`` first) such that every combination of ``strength`` ``(key, value)``
    pairs found in some item is found in a chosen one. Greedy and deterministic: each step takes the
    item that covers the most new combinations, the cheapest (``cost(i)``) among equals."""

    def tuples(item):  # an item with fewer keys than the strength counts as one tuple
        pairs = [(k, repr(v)) for k, v in sorted(item.items(), key=lambda kv: kv[0])]
        return set(itertools.combinations(pairs, min(strength, len(pairs))))

    sets = [tuples(item) for item in items]
    needed = set().union(*sets) if sets else set()
    chosen = list(dict.fromkeys(start))
    covered = set().union(*(sets[i] for i in chosen)) if chosen else set()
    cost = cost or (lambda i: 0)
    while covered != needed:
        best = max(range(len(items)), key=lambda i: (len(sets[i] - covered), -cost(i)))
        chosen.append(best)
        covered |= sets[best]
    return chosen


def _tile_size(constexprs) -> int:
    """Product of the integer constexprs (tile sizes, and conv geometry): a proxy for a compile's cost."""
    size = 1
    for _, value in constexprs:
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            size *= value
    return size


def _launch_size(launch) -> int:
    """Tile elements x stages: the launch that needs the most shared memory maximizes it."""
    return _tile_size(launch.constexprs) * (launch.num_stages or 3) * 1000 + launch.num_warps


#: How deep each target is checked: (launches, feature strength). Flag combinations decide which code
#: exists, which is mostly target-independent: every pair of flag values on sm_90a, every value on
#: sm_80. sm_120a (not required) gets each kernel's largest launch only: what it adds is a smaller
#: shared-memory budget (99 KiB a block).
DEPTH = {"sm90a": ("cover", 2), "sm80": ("cover", 1), "sm120a": ("largest", 0)}


def _config_points(space, points) -> list[int]:
    """For an autotuned space: per config the autotuner can time (``space.config_of``), one point that
    holds it -- at the typical launch's other constexprs (head tile) where the config fits there, else
    at the largest launch holding it (the most shared memory and registers it meets)."""
    best: dict = {}

    def rank(i):
        case, launch = points[i]
        typical = space.typical_of(case).as_dict()
        same = all(typical.get(k) == v for k, v in launch.constexprs if k not in space.tuned)
        return same, _launch_size(launch)

    for i, (_, launch) in enumerate(points):
        key = space.config_of(launch)
        if key not in best or rank(i) > rank(best[key]):
            best[key] = i
    return list(best.values())


def plan(space, arch: str, *, full: bool = False) -> list[Variant]:
    """The compiles that check ``space`` on ``arch``: with ``DEPTH[arch]``'s ``"cover"``, every launch
    value, the largest and the typical launch, all with the heaviest flags, and for an autotuned space
    (``space.tuned``) every config (at the typical head tile where it fits, :func:`_config_points`; with
    ``space.config_feature``'s flags); with strength ``s > 0``, every ``s``-tuple of
    flag values (at the smallest launch) and the ``i64`` compile. ``full``: the whole space. Only the
    launches that can run on ``arch`` (``space.fits``) are compiled for it."""
    cases = list(space.dtypes)
    if full:
        return [make_variant(space, arch, case, launch, feature, "full") for case in cases
                for launch in space.launches_on(case, arch) for feature in space.features]
    launches, strength = DEPTH[arch]
    heavy = dict(space.features[0])
    points = [(case, launch) for case in cases for launch in space.launches_on(case, arch)]
    largest = max(range(len(points)), key=lambda i: _launch_size(points[i][1]))
    variants = [make_variant(space, arch, *points[largest], heavy, "launch")]
    if launches == "cover":
        items = [{"dtypes": case.name, "num_warps": launch.num_warps, "num_stages": launch.num_stages,
                  **launch.as_dict()} for case, launch in points]
        chosen = cover(items, 1, start=[largest], cost=lambda i: _launch_size(points[i][1]))
        variants += [make_variant(space, arch, *points[i], heavy, "launch") for i in chosen]
        variants.append(make_variant(space, arch, cases[0], space.typical_of(cases[0]), heavy, "typical"))
        if space.tuned:
            flags = dict(space.config_feature or heavy)
            variants += [make_variant(space, arch, *points[i], flags, "config") for i in _config_points(space, points)]
    if strength:
        # Flags change which code exists, not how big its tiles are: the smallest launch compiles fastest.
        for n, i in enumerate(cover(space.features, strength, start=[0])):
            case = cases[n % len(cases)]
            smallest = min(space.launches_on(case, arch), key=_launch_size)
            variants.append(make_variant(space, arch, case, smallest, dict(space.features[i]), "feature"))
        smallest = min(space.launches_on(cases[0], arch), key=_launch_size)
        variants.append(make_variant(space, arch, cases[0], smallest, heavy, "int64", int_type="i64"))
    unique = {}
    for v in variants:  # the first reason a compile is in the plan names it
        unique.setdefault(dataclasses.replace(v, why=""), v)
    return list(unique.values())


# --------------------------------------------------------------------------------------------------
# Compiling


def compile_kernel(fn, signature: dict, constexprs: dict, arch: str, num_warps: int,
                   num_stages: Optional[int] = None):
    """``triton.compile`` of a jit function for ``arch`` with the real compiler; returns
    ``(compiled kernel, cache hit)``. Raises what the compiler raises.

    ``fn``: a ``JITFunction``, or a plain Python function compiled as if decorated. Call it in a
    process started without ``TRITON_INTERPRET`` (the workers of :func:`run`): under the interpreter
    the jit helpers it calls, Triton's own ``tl.sum`` & co. included, are interpreter objects the
    compiler cannot take. Non-constexpr globals are rejected whatever
    ``TRITON_ALLOW_NON_CONSTEXPR_GLOBALS`` says; every pointer is taken as 16-byte aligned, as the JIT
    specializes torch's allocations.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    if not isinstance(fn, JITFunction):
        fn = JITFunction(getattr(fn, "fn", fn))
    names = fn.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items() if _is_pointer_type(t)}
    source = triton.compiler.ASTSource(fn, dict(signature), dict(constexprs), attrs)
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    hits = []
    with triton.knobs.compilation.scope():
        triton.knobs.compilation.allow_non_constexpr_globals = False
        triton.knobs.compilation.listener = lambda **kw: hits.append(kw.get("cache_hit", False))
        kernel = triton.compile(source, target=GPUTarget("cuda", CAPABILITIES[arch], 32), options=options)
    return kernel, bool(hits and hits[-1])


def _resolve(name: str):
    """The function a variant names: a jit function, or a plain one to compile as if it were."""
    module, _, attr = name.rpartition(".")
    value = getattr(importlib.import_module(module), attr)
    return _jit_base(value) or value


def probe(fn, signature: dict, constexprs: dict, arch: str, num_warps: int, num_stages: Optional[int] = None) -> Variant:
    """A variant for a function outside the compile spaces (``module.qualname`` importable by the
    workers, which see the caller's ``sys.path``), e.g. a test's deliberately broken kernel."""
    py = _python_function(fn)
    names = list(inspect.signature(py).parameters)
    return Variant(f"{py.__module__}.{py.__qualname__}", arch, "-", tuple((n, signature[n]) for n in names),
                   tuple((n, constexprs[n]) for n in names if n in constexprs), num_warps, num_stages, "probe")


_USAGE_FILE = "i2v_resources.json"  # kept next to the cubin in Triton's cache


def _usage(kernel, arch: str, ptxas_log: str) -> resources.Usage:
    """The compile's resources: from this compile's ptxas log, else (a cache hit) from what an earlier
    run stored beside the cached cubin, else from the cubin itself (cuobjdump)."""
    from triton.runtime.cache import get_cache_manager

    cache = get_cache_manager(kernel.hash)
    usage = resources.ptxas_usage(ptxas_log, arch)
    stored = cache.get_file(_USAGE_FILE)
    if usage is None and stored is not None:
        with open(stored) as f:
            usage = resources.Usage(**json.load(f))
    if usage is None:
        usage = resources.cubin_usage(kernel.asm["cubin"], arch)
    if stored is None:
        cache.put(json.dumps(asdict(usage)), _USAGE_FILE, binary=False)
    return usage


def compile_variant(v: Variant) -> dict:
    """Compile one variant and read its resources; a dict with ``ok`` and ``error`` or the numbers."""
    import triton

    start = time.perf_counter()
    log = io.StringIO()
    try:
        # Triton prints ptxas's -v log when asked: the resources come free with the compile.
        with contextlib.redirect_stdout(log), triton.knobs.nvidia.scope():
            triton.knobs.nvidia.dump_ptxas_log = True
            kernel, hit = compile_kernel(_resolve(v.kernel), dict(v.signature), dict(v.constexprs), v.arch,
                                         v.num_warps, v.num_stages)
        usage = _usage(kernel, v.arch, log.getvalue())
    except Exception as e:  # the compiler's errors are of many types; each is the result, not a crash
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - start}
    return {"ok": True, "cache_hit": hit, "seconds": time.perf_counter() - start, "dynamic_smem": kernel.metadata.shared,
            "usage": asdict(usage)}


def _worker() -> None:
    """Compile variants read as JSON lines from stdin; answer one JSON line each on the original stdout
    (anything the compiler prints goes to stderr)."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        result = compile_variant(Variant.from_json(line))
        answers.write(json.dumps(result) + "\n")
        answers.flush()


def worker_env() -> dict:
    """The environment of a compile worker: the interpreter off, non-constexpr globals rejected."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_ALLOW_NON_CONSTEXPR_GLOBALS"] = "0"
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
    return env


def run(variants: Sequence[Variant], jobs: Optional[int] = None) -> list[dict]:
    """Compile the variants on ``jobs`` worker processes (default: one per CPU); results in order."""
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(variants)))
    todo: queue.Queue = queue.Queue()
    # Big tiles first, so the long compiles do not end up alone at the tail.
    order = sorted(range(len(variants)), key=lambda i: -_tile_size(variants[i].constexprs))
    for i in order:
        todo.put(i)
    results: list = [None] * len(variants)
    failures: list[str] = []

    def serve():
        with tempfile.TemporaryFile(mode="w+") as log:
            proc = subprocess.Popen([sys.executable, "-m", "i2v_kernels.tools.triton_aot", "--worker"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                    env=worker_env())
            try:
                while True:
                    try:
                        i = todo.get_nowait()
                    except queue.Empty:
                        break
                    proc.stdin.write(variants[i].to_json() + "\n")
                    proc.stdin.flush()
                    answer = proc.stdout.readline()
                    if not answer:
                        log.seek(0)
                        failures.append(f"compile worker exited ({variants[i].kernel}, {variants[i].arch}):\n"
                                        f"{log.read()[-4000:]}")
                        return
                    results[i] = json.loads(answer)
            finally:
                proc.stdin.close()
                proc.wait()

    threads = [threading.Thread(target=serve) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError("\n".join(failures))
    return results


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker()
    else:
        sys.exit("usage: python -m i2v_kernels.tools.triton_aot --worker  (see i2v_kernels.tools.static_report)")
