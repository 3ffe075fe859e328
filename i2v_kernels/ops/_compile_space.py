"""What the Triton launchers can ask the compiler for, declared as data.

Every module with ``@triton.jit`` kernels lists, next to its launchers, one :class:`KernelSpace` per
kernel it launches, in a module-level ``COMPILE_SPACES``. A space says

* ``dtypes``: the element types of the kernel's pointer arguments, one :class:`Dtypes` case per dtype
  combination the dispatcher can hand the launcher (plus constexprs that follow from the dtype, such
  as ``DOT_DTYPE``);
* ``launches``: the launch configurations -- tile constexprs, ``num_warps``, ``num_stages`` -- the
  launcher can choose for a dtype case, computed by calling the launcher's own config helper over the
  inputs that reach every branch of it (:func:`distinct_launches`), so the two cannot drift apart; an
  autotuned kernel lists its ``triton.Config`` list here instead (:func:`launches_from_configs`);
* ``fits`` (optional): whether a launch can run on a target (``"sm80"``): an autotuner prunes its
  configs by the device's shared memory, so a config may be launched on one target and not another;
* ``tuned`` (optional): the launch constexprs an autotuner picks (with ``num_warps`` and
  ``num_stages``), so that the plan compiles every config it can time, not only every value, with the
  flags ``config_feature`` (default: the heaviest, the first of ``features``);
* ``features``: every reachable combination of the remaining constexprs (flags, modes, conv
  geometry), heaviest first; an entry may also name a pointer argument whose type differs from the
  dtype case (``{"HAS_KV_LENS": True, "KV_LENS": "*i32"}``).

The spaces are plain data: nothing here compiles. ``i2v_kernels.tools.triton_aot`` turns them into
ahead-of-time compiles for real GPU targets (``tests/test_triton_compile.py``) and picks which points
of a space to compile (all of them, or a covering subset where the product is too large).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

#: Triton's names for the torch dtypes a launcher can see (pointer element types: ``"*" + name``).
TRITON_TYPE_NAMES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64",
                     "int32": "i32", "int64": "i64"}


def type_name(dtype) -> str:
    """Triton's name (``"bf16"``) for a torch dtype (``torch.bfloat16``)."""
    return TRITON_TYPE_NAMES[str(dtype).replace("torch.", "")]


@dataclass(frozen=True)
class Launch:
    """One launch configuration: the tile constexprs and the compile options that go with them."""

    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int
    num_stages: int

    @classmethod
    def of(cls, num_warps: int, num_stages: int, **constexprs) -> "Launch":
        return cls(tuple(sorted(constexprs.items())), num_warps, num_stages)

    def as_dict(self) -> dict:
        return dict(self.constexprs)


@dataclass(frozen=True)
class Dtypes:
    """One dtype combination: a label, the type of every pointer argument (``"*bf16"``), and the
    constexprs that follow from the dtypes."""

    name: str
    pointers: Mapping[str, str]
    constexprs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class KernelSpace:
    """Everything one ``@triton.jit`` kernel can be compiled with (see the module docstring).

    ``floats`` names the scalar arguments passed as Python floats (fp32); every other scalar is an
    integer. ``typical(dtypes)`` is the launch of a typical video-DiT call, the one feature
    combinations are compiled at when not every (feature, launch) pair is (default: the first launch).
    ``fits(arch, launch)`` and ``tuned``: see the module docstring.
    """

    kernel: Any
    dtypes: Sequence[Dtypes]
    launches: Callable[[Dtypes], Sequence[Launch]]
    features: Sequence[Mapping[str, Any]]
    floats: Sequence[str] = ()
    typical: Optional[Callable[[Dtypes], Launch]] = None
    fits: Optional[Callable[[str, Launch], bool]] = None
    tuned: Sequence[str] = ()
    config_feature: Optional[Mapping[str, Any]] = None
    _memo: dict = field(default_factory=dict, compare=False, repr=False)

    def launches_of(self, case: Dtypes) -> list[Launch]:
        """``launches(case)``, computed once per case."""
        if case.name not in self._memo:
            self._memo[case.name] = list(self.launches(case))
        return self._memo[case.name]

    def launches_on(self, case: Dtypes, arch: str) -> list[Launch]:
        """The launches of ``case`` that can run on ``arch`` (all of them without ``fits``)."""
        return [launch for launch in self.launches_of(case) if self.fits is None or self.fits(arch, launch)]

    def config_of(self, launch: Launch) -> tuple:
        """What an autotuner chose in ``launch``: its ``tuned`` constexprs, warps and stages."""
        values = launch.as_dict()
        return tuple(values[k] for k in self.tuned) + (launch.num_warps, launch.num_stages)

    def typical_of(self, case: Dtypes) -> Launch:
        return self.typical(case) if self.typical is not None else self.launches_of(case)[0]

    @property
    def name(self) -> str:
        """``module.qualname`` of the kernel's Python function (under any autotuner / jit wrappers)."""
        fn = self.kernel
        while hasattr(fn, "fn"):
            fn = fn.fn
        return f"{fn.__module__}.{fn.__qualname__}"

    def size(self) -> int:
        """How many distinct compiles the whole space holds (features x dtypes x launches)."""
        return len(self.features) * sum(len(self.launches_of(d)) for d in self.dtypes)


def pointers(names: Iterable[str], ty: str) -> dict[str, str]:
    """``{name: "*<ty>"}`` for every name: the pointer arguments that share one element type."""
    return {name: f"*{ty}" for name in names}


def distinct_launches(config_of: Callable[..., Launch], inputs: Iterable[tuple]) -> list[Launch]:
    """The distinct results of the launcher's own config helper over ``inputs`` (first-seen order).

    ``inputs`` must reach every result the helper can return for the inputs the dispatcher accepts;
    the helpers depend on sizes only through powers of two and clamps, so small grids do.
    """
    return list(dict.fromkeys(config_of(*args) for args in inputs))


def launches_from_configs(configs) -> list[Launch]:
    """``Launch`` entries for a list of ``triton.Config`` (an autotuner's ``configs``, after whatever
    pruning the autotuner itself applies): ``kwargs`` become constexprs."""
    return [Launch.of(c.num_warps, c.num_stages, **c.kwargs) for c in configs]


def combinations(**axes: Sequence[Any]) -> list[dict]:
    """Every combination of the axes' values, as dicts (the first value of every axis first)."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*axes.values())]


def powers_of_two(upto: int) -> list[int]:
    """1, 2, 4, ... up to ``upto`` inclusive."""
    return [1 << i for i in range(upto.bit_length()) if 1 << i <= upto]
