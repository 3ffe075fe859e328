"""GPU code checked without a GPU.

CI runs the Triton kernels through the interpreter, which is not a compiler: it once accepted a conv3d
kernel that read a plain Python global, which the compiler rejects. Here every Triton kernel of the
package is compiled ahead of time for sm_80 and sm_90a (and sm_120a when this Triton can), over the
launches and flags its module declares in ``COMPILE_SPACES``; shared memory is checked against each
target's per-block limit, and the CUDA C++ kernels of the built extension are checked for spills.
The run's length is reported in pytest's terminal summary.
"""

import itertools
import os
import sys
import types

import pytest
import torch
import triton
import triton.language as tl

from i2v_kernels._backend import triton_interpreted
from i2v_kernels.ops._compile_space import Dtypes, KernelSpace, Launch, launches_from_configs, pointers
from i2v_kernels.tools import resources, static_report, triton_aot


class _Summary:
    """A pytest plugin that adds one line to the terminal summary."""

    def __init__(self, line: str):
        self.line = line

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.write_line(self.line)


@pytest.fixture(scope="module")
def report(request, tmp_path_factory):
    result = static_report.build(triton_aot.available_archs(), out=str(tmp_path_factory.mktemp("static")))
    request.config.pluginmanager.register(_Summary(result.summary()), "i2v-triton-compile-summary")
    return result


@pytest.fixture(scope="module")
def modules():
    return triton_aot.package_modules()


def test_every_jit_function_is_declared(modules):
    """A kernel nobody declared would skip the compile check: every @triton.jit function of the package
    is a declared kernel or a helper one calls."""
    found = triton_aot.jit_functions(modules)
    assert "i2v_kernels.ops.conv3d.triton._causal_conv3d_fwd_kernel" in found  # the walk sees the package
    assert "i2v_kernels.ops.adaln.triton._row_offsets" in found                # ... helpers included
    assert triton_aot.uncovered(modules) == []


def test_uncovered_names_undeclared_kernels(modules):
    """The coverage check is real: this module's own kernels (below), in no COMPILE_SPACES, are reported."""
    this = sys.modules[__name__]
    mine = [triton_aot.qualified_name(fn) for fn in (_reads_python_global, _reads_constexpr_global,
                                                     _mismatched_shapes, _wide_row, _autotuned)]
    assert triton_aot.uncovered([*modules, this]) == sorted(mine)


_AUTOTUNE_CONFIGS = [triton.Config({"BLOCK": 64}, num_warps=2, num_stages=2),
                     triton.Config({"BLOCK": 128}, num_warps=4, num_stages=3)]


@triton.autotune(configs=_AUTOTUNE_CONFIGS, key=["N"])
@triton.jit
def _autotuned(X, N, DOUBLE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < N)
    if DOUBLE:
        x = x * 2
    tl.store(X + offs, x, mask=offs < N)


def test_an_autotuned_kernel_is_declared_by_its_configs():
    """An autotuner's config list is a compile space's launches: the plan compiles each config and both
    flag values, and the declaration covers the kernel under the autotuner."""
    space = KernelSpace(_autotuned, [Dtypes("fp16", pointers(["X"], "fp16"))],
                        launches=lambda case: launches_from_configs(_AUTOTUNE_CONFIGS),
                        features=[{"DOUBLE": True}, {"DOUBLE": False}])
    planned = {(dict(v.constexprs)["BLOCK"], v.num_warps, v.num_stages, dict(v.constexprs)["DOUBLE"])
               for v in triton_aot.plan(space, "sm90a")}
    assert {(64, 2, 2), (128, 4, 3)} <= {p[:3] for p in planned} and {p[3] for p in planned} == {True, False}
    declaring = types.ModuleType(__name__)
    declaring.__dict__.update(_autotuned=_autotuned, COMPILE_SPACES=[space])
    assert triton_aot.uncovered([declaring]) == []


@pytest.mark.parametrize("arch", triton_aot.REQUIRED_ARCHS)
def test_plan_covers_every_launch_value_and_feature_tuple(modules, arch):
    """The covering plan holds every value of every launch axis, and every pair (sm_90a) or value (sm_80)
    of flag values that a reachable combination holds -- checked against the spaces themselves."""
    launches, strength = triton_aot.DEPTH[arch]
    assert launches == "cover" and strength >= 1
    for space in triton_aot.compile_spaces(modules):
        variants = triton_aot.plan(space, arch)
        compiled = [dict(v.constexprs) for v in variants]
        for case in space.dtypes:
            for launch in space.launches_on(case, arch):
                for key, value in launch.constexprs:
                    assert any(c[key] == value for c in compiled), (space.name, key, value)
            assert any(v.dtypes == case.name for v in variants), (space.name, case.name)
        # what each compile fixes: its constexprs and the pointer types its feature set
        seen = [{**dict(v.constexprs), **{k: t for k, t in v.signature if k in v.overrides}} for v in variants]
        for f in space.features:
            for combo in itertools.combinations(f.items(), min(strength, len(f))):
                assert any(all(c.get(k) == value for k, value in combo) for c in seen), (space.name, combo)


@pytest.mark.parametrize("arch", triton_aot.REQUIRED_ARCHS)
def test_plan_compiles_every_autotune_config(modules, arch):
    """An autotuned kernel's every config that its pruning can keep on the target is compiled for that
    target (at the largest launch holding it: the most shared memory and registers it meets), and only
    those: the attention kernels' config lists, pruned at the target's shared memory, checked directly."""
    from i2v_kernels.ops.attention import triton as attn_triton

    limit = resources.ARCHS[arch].smem_per_block
    tuned = {space.name.rsplit(".", 1)[-1]: space for space in triton_aot.compile_spaces(modules) if space.tuned}
    for space in tuned.values():
        reachable = {space.config_of(launch) for case in space.dtypes for launch in space.launches_on(case, arch)}
        planned = {space.config_of(Launch.of(v.num_warps, v.num_stages, **{
            k: value for k, value in v.constexprs if k in v.launch_keys})) for v in triton_aot.plan(space, arch)}
        assert reachable == planned, space.name
    for name, configs, fit in (("_attn_fwd_kernel", attn_triton.FWD_CONFIGS, attn_triton._fwd_resources),
                               ("_attn_bwd_dkdv_kernel", attn_triton.DKDV_CONFIGS, attn_triton._dkdv_resources),
                               ("_attn_bwd_dq_kernel", attn_triton.DQ_CONFIGS, attn_triton._dq_resources)):
        kept = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs
                for d in (16, 32, 64, 128, 256) if attn_triton._flash_fits(fit, c, d, limit)}
        planned = {tuned[name].config_of(launch) for case in tuned[name].dtypes
                   for launch in tuned[name].launches_on(case, arch)}
        assert kept <= planned and len(kept) >= len(configs) // 2, name
    temporal = {tuned["_temporal_fwd_kernel"].config_of(launch) for case in tuned["_temporal_fwd_kernel"].dtypes
                for launch in tuned["_temporal_fwd_kernel"].launches_on(case, arch)}
    assert {(c.kwargs["BLOCK_H"], c.num_warps, c.num_stages) for c in attn_triton.TEMPORAL_CONFIGS} <= temporal


def test_every_declared_kernel_compiles_within_limits(report):
    """Every planned compile succeeds for every target, and no block needs more shared memory than
    sm_80 (163 KiB) or sm_90a (227 KiB) gives one."""
    assert report.results and all(r is not None for r in report.results)
    assert {v.arch for v in report.variants} == set(triton_aot.available_archs())
    assert not report.problems, "\n".join(report.problems)


def test_tables_list_every_compile(report, modules):
    """Each target's table has a row for every compile of the target, under every declared kernel, and
    the CUDA C++ kernels when the extension has them."""
    for arch in report.archs:
        with open(os.path.join(report.out, f"static_{arch}.md")) as f:
            text = f.read()
        for space in triton_aot.compile_spaces(modules):
            assert f"`{space.name.rsplit('.', 1)[-1]}`" in text
        for v in report.variants:
            if v.arch == arch:
                assert f"| {v.why} | {v.dtypes} | {v.launch_label()} | {v.feature_label()} |" in text
        if report.extension and arch in ("sm80", "sm90a"):
            assert "adaln_fwd_reg_kernel<" in text and "temporal_attention_kernel<" in text


# --------------------------------------------------------------------------------------------------
# The check is real: the same helper rejects broken kernels (defined here, not in the package)

GLOBAL_SCALE = 2  # a plain Python int: the interpreter reads it, the compiler must refuse


@triton.jit
def _reads_python_global(X, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < N)
    tl.store(X + offs, x * GLOBAL_SCALE, mask=offs < N)


GLOBAL_SCALE_CONSTEXPR = tl.constexpr(2)


@triton.jit
def _reads_constexpr_global(X, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < N)
    tl.store(X + offs, x * GLOBAL_SCALE_CONSTEXPR, mask=offs < N)


@triton.jit
def _mismatched_shapes(X, BLOCK: tl.constexpr):
    a = tl.load(X + tl.arange(0, BLOCK))
    b = tl.load(X + tl.arange(0, 2 * BLOCK))
    tl.store(X + tl.arange(0, BLOCK), a + b)


@triton.jit
def _wide_row(X, BLOCK: tl.constexpr):
    # One warp holds the whole row until its sum is known: 512 fp32 values a thread, more than the
    # 255 registers a thread can have, so ptxas must spill.
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    tl.store(X + offs, x / tl.sum(x))


_SIGNATURE = {"X": "*fp32", "N": "i32", "BLOCK": "constexpr"}
_PROBES = {  # name: (function, signature, constexprs, arch, num_warps)
    **{f"global-{arch}": (_reads_python_global, _SIGNATURE, {"BLOCK": 128}, arch, 4)
       for arch in triton_aot.REQUIRED_ARCHS},
    **{f"constexpr-{arch}": (_reads_constexpr_global, _SIGNATURE, {"BLOCK": 128}, arch, 4)
       for arch in triton_aot.REQUIRED_ARCHS},
    "shapes": (_mismatched_shapes, {"X": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 64}, "sm90a", 4),
    "spills": (_wide_row, {"X": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 16384}, "sm80", 1),
}


@pytest.fixture(scope="module")
def probes():
    """The probe kernels above, compiled by the same workers and helper as the package's kernels."""
    variants = [triton_aot.probe(fn, sig, const, arch, warps) for fn, sig, const, arch, warps in _PROBES.values()]
    return dict(zip(_PROBES, triton_aot.run(variants, jobs=2)))


@pytest.mark.parametrize("arch", triton_aot.REQUIRED_ARCHS)
def test_compile_rejects_a_non_constexpr_global(probes, arch):
    """The bug the interpreter let through (conv3d's PAD_REPLICATE) fails the compile check, and the
    fixed form (a ``tl.constexpr`` global) passes it."""
    broken, fixed = probes[f"global-{arch}"], probes[f"constexpr-{arch}"]
    assert not broken["ok"] and "Cannot access global variable GLOBAL_SCALE" in broken["error"]
    assert fixed["ok"], fixed.get("error")


@pytest.mark.skipif(not triton_interpreted(), reason="shows the interpreter's leniency; needs TRITON_INTERPRET=1")
def test_interpreter_runs_what_the_compiler_rejects():
    """Why the compile check exists: the interpreter runs the broken kernel without complaint."""
    x = torch.arange(8, dtype=torch.float32)
    _reads_python_global[(1,)](x, 8, BLOCK=8)
    assert torch.equal(x, 2 * torch.arange(8, dtype=torch.float32))


def test_compile_rejects_a_shape_error(probes):
    """A shape mismatch is a compile error too, and it comes back as a result, not a dead worker."""
    assert not probes["shapes"]["ok"] and "CompilationError" in probes["shapes"]["error"]


def test_resources_show_spills(probes):
    """The spill columns are read from the cubin, not assumed: a kernel that must spill shows local
    memory and STL/LDL instructions."""
    result = probes["spills"]
    assert result["ok"], result.get("error")
    usage = resources.Usage(**result["usage"])
    assert usage.local_bytes > 0 and usage.spill_stores > 0 and usage.spill_loads > 0, usage


# --------------------------------------------------------------------------------------------------
# Resource arithmetic


def test_occupancy_limits():
    sm90 = resources.ARCHS["sm90a"]
    assert resources.occupancy(sm90, regs=32, warps=4, smem=0) == (64, "warps")
    assert resources.occupancy(sm90, regs=255, warps=8, smem=0) == (8, "regs")           # 8 KiB regs a warp
    assert resources.occupancy(sm90, regs=64, warps=4, smem=100 * 1024) == (8, "smem")   # 2 blocks of 101 KiB
    assert resources.occupancy(resources.ARCHS["sm80"], regs=16, warps=1, smem=0) == (32, "blocks")


def test_short_kernel_name():
    long = ("void i2v::adaln::(anonymous namespace)::adaln_fwd_reg_kernel<__half, float, 8, 2>"
            "(i2v::adaln::AdalnParams)")
    assert resources.short_kernel_name(long) == "adaln_fwd_reg_kernel<__half, float, 8, 2>"


# --------------------------------------------------------------------------------------------------
# CUDA C++ kernels of the built extension


def test_cuda_kernels_do_not_spill():
    """No CUDA C++ kernel of ``_C`` uses local memory (so none spills), on every cubin it holds.

    * ``adaln_fwd_reg_kernel`` keeps a row in registers under the 64-register cap of its 1024-thread
      launch bound; ``reg_iters`` sizes the per-thread chunk count (8 scalar chunks, 16 values of
      vector chunks) so that it fits -- a spill would mean that sizing broke and the row went through
      local memory, the slow path the kernel exists to avoid.
    * ``adaln_fwd_stream_kernel`` holds one chunk at a time: nothing to spill.
    * ``temporal_attention_kernel`` keeps its per-lane scores (4) and accumulators (4 float2) in fixed,
      fully unrolled arrays; any local memory would mean an array went dynamic-indexed or spilled in
      the loop over keys, which runs once per query frame.
    """
    usage, note = static_report.extension_usage()
    if usage is None:
        pytest.skip(note)
    names = resources.demangle([u.function for u in usage])
    kernels = {resources.short_kernel_name(n).split("<")[0] for n in names}
    assert {"adaln_fwd_reg_kernel", "adaln_fwd_stream_kernel", "temporal_attention_kernel"} <= kernels
    spilling = [f"{u.arch} {resources.short_kernel_name(n)}: {u.local_bytes} B local, {u.spill_stores} STL, "
                f"{u.spill_loads} LDL" for u, n in zip(usage, names)
                if u.local_bytes or u.spill_stores or u.spill_loads]
    assert not spilling, "\n".join(spilling)
