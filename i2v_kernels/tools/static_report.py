"""Static resource report of every GPU kernel, made without a GPU.

    python -m i2v_kernels.tools.static_report [--archs sm80,sm90a,sm120a] [--out benchmarks/results]
                                              [--jobs N] [--full] [--cuda-only]

Compiles the Triton kernels ahead of time (:mod:`i2v_kernels.tools.triton_aot`), reads the CUDA C++
kernels of the built extension (``cuobjdump`` on ``i2v_kernels/_C*.so``), and writes one table per
target, ``static_<arch>.md``: registers, spills, local memory, shared memory and estimated occupancy of
every compile, so a later GPU run can compare. Exits non-zero, listing them, on compile errors and on
shared memory above a required target's per-block limit. ``--cuda-only`` compiles nothing: it rewrites
the CUDA C++ section of the existing tables from the built extension (after a change in ``csrc/``).
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional, Sequence

from i2v_kernels.tools import resources, triton_aot

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(_REPO, "benchmarks", "results")

# The cubin of the extension that runs on each report target (sm_120 has none: the driver JIT-compiles
# the embedded PTX there, so no static numbers exist before it runs).
_EXTENSION_CUBIN = {"sm80": "sm_80", "sm90a": "sm_90", "sm120a": "sm_120"}


@dataclass
class Report:
    """Everything one run found; ``problems`` lists what makes the check fail."""

    archs: tuple[str, ...]
    variants: list
    results: list
    seconds: float
    jobs: int
    out: Optional[str] = None          # where the tables were written
    extension: Optional[list] = None   # resources.Usage of the CUDA C++ kernels, None if there are none
    extension_note: str = ""
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        hits = sum(1 for r in self.results if r.get("cache_hit"))
        return (f"Triton AOT compile check: {len(self.variants)} compiles for {', '.join(self.archs)} in "
                f"{self.seconds:.1f} s on {self.jobs} processes ({hits} from Triton's cache), "
                f"{len(self.problems)} problems")


def smem_bytes(result: dict) -> int:
    """Shared memory a block of this compile needs: Triton's dynamic allocation plus any static."""
    usage = resources.Usage(**result["usage"])
    return result["dynamic_smem"] + usage.smem


def extension_path() -> Optional[str]:
    """The built ``i2v_kernels._C`` library, or None when it does not import."""
    try:
        from i2v_kernels import _C
    except ImportError:
        return None
    return _C.__file__


@functools.lru_cache(maxsize=1)
def extension_usage() -> tuple[Optional[list], str]:
    """``(usage of the extension's CUDA kernels, note)``; None and the reason when there are none."""
    try:
        from i2v_kernels._build_info import BUILD_INFO
    except ImportError:
        BUILD_INFO = {}
    path = extension_path()
    if path is None:
        return None, "i2v_kernels._C is not built"
    if not BUILD_INFO.get("cuda_kernels", False):
        return None, f"i2v_kernels._C was built without CUDA kernels ({BUILD_INFO.get('cuda_skipped_because') or 'no nvcc'})"
    usage = resources.usage_of(path)
    if not usage:
        return None, f"{os.path.basename(path)} holds no cubin"
    return usage, f"{os.path.basename(path)}, built for {BUILD_INFO.get('arch_list', '?')}"


def build(archs: Sequence[str], *, out: Optional[str] = None, jobs: Optional[int] = None,
          full: bool = False) -> Report:
    """Compile, read resources, check limits, and (``out`` given) write the tables."""
    modules = triton_aot.package_modules()
    missing = triton_aot.uncovered(modules)
    spaces = triton_aot.compile_spaces(modules)
    variants = [v for arch in archs for space in spaces
                for v in triton_aot.plan(space, arch, full=full)]
    start = time.perf_counter()
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(variants)))
    results = triton_aot.run(variants, jobs)
    report = Report(tuple(archs), variants, results, time.perf_counter() - start, jobs, out)
    report.problems += [f"{name} is a @triton.jit function that no COMPILE_SPACES entry declares or calls"
                        for name in missing]
    for v, r in zip(variants, results):
        where = f"{v.kernel} [{v.arch}, {v.dtypes}, {v.launch_label()}, {v.feature_label()}]"
        if not r["ok"]:
            report.problems.append(f"{where} does not compile: {r['error']}")
            continue
        limit = resources.ARCHS[v.arch].smem_per_block
        if smem_bytes(r) > limit:
            message = f"{where} needs {smem_bytes(r)} B of shared memory, over the {limit} B a block may use"
            # sm_120a is checked when this Triton can target it, but only sm_80 and sm_90a are required.
            (report.problems if v.arch in triton_aot.REQUIRED_ARCHS else report.warnings).append(message)
    report.extension, report.extension_note = extension_usage()
    if out is not None:
        os.makedirs(out, exist_ok=True)
        for arch in archs:
            with open(os.path.join(out, f"static_{arch}.md"), "w") as f:
                f.write(render(report, arch))
    return report


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _kib(n: int) -> str:
    return f"{n / 1024:.1f}"


def render(report: Report, arch: str) -> str:
    """The markdown table of one target."""
    import triton

    limits = resources.ARCHS[arch]
    rows = [(v, r) for v, r in zip(report.variants, report.results) if v.arch == arch]
    lines = [
        f"# Static resources on {arch}",
        "",
        f"Written by `python -m i2v_kernels.tools.static_report` at {_git_sha()} with triton {triton.__version__}, "
        "on a machine without a GPU: Triton kernels compiled ahead of time for this target "
        "(`i2v_kernels/tools/triton_aot.py`, the launches each module declares in `COMPILE_SPACES`), CUDA C++ "
        "kernels read from the built extension. Compare with a GPU run's profile.",
        "",
        f"Target limits: {_kib(limits.smem_per_block)} KiB shared memory per block, {_kib(limits.smem_per_sm)} KiB "
        f"per SM, {limits.max_warps} warps and {limits.max_blocks} blocks per SM, {limits.regs_per_sm} registers "
        "per SM.",
        "",
        "Columns: *regs* registers per thread; *spills* bytes stored / loaded by register-spill instructions "
        "(ptxas -v's count, or the SASS's STL/LDL); *local* bytes of local memory per thread (the stack frame "
        "spills go to); *smem* shared memory per block in KiB (Triton's dynamic allocation plus static); "
        "*occupancy* estimated resident warps per SM and the limit that binds it. *why*: " + _why_legend(arch),
        "",
        "## Triton kernels",
        "",
    ]
    by_kernel: dict = defaultdict(list)
    for v, r in rows:
        by_kernel[v.kernel].append((v, r))
    for kernel, entries in by_kernel.items():
        module, _, name = kernel.rpartition(".")
        lines += [f"### `{name}` ({module.replace('.', '/')}.py)", "",
                  "| why | dtypes | launch | flags and constexprs | regs | spills st/ld | local | smem KiB | occupancy |",
                  "|---|---|---|---|---:|---:|---:|---:|---|"]
        for v, r in entries:
            head = f"| {v.why} | {v.dtypes} | {v.launch_label()} | {v.feature_label()} |"
            if not r["ok"]:
                lines.append(f"{head} compile error: {r['error'].splitlines()[0][:120]} | | | | |")
                continue
            u = resources.Usage(**r["usage"])
            smem = smem_bytes(r)
            warps, binding = resources.occupancy(limits, u.regs, v.num_warps, smem)
            flag = " **over the limit**" if smem > limits.smem_per_block else ""
            lines.append(f"{head} {u.regs} | {u.spill_stores}/{u.spill_loads} | {u.local_bytes} | {_kib(smem)}{flag} | "
                         f"{warps} ({binding}) |")
        lines.append("")
    lines += [_CUDA_HEADING, ""]
    cubin = _EXTENSION_CUBIN[arch]
    usage = [u for u in report.extension or () if u.arch == cubin]
    if report.extension is None:
        lines.append(f"None: {report.extension_note}.")
    elif not usage:
        lines.append(f"No {cubin} cubin in {report.extension_note}: on this target the driver compiles the embedded "
                     "PTX at load time, so there are no static numbers.")
    else:
        lines += [f"From the {cubin} cubin of {report.extension_note}. Block size and dynamic shared memory are "
                  "chosen at launch, so occupancy is the register limit alone.", "",
                  "| kernel | regs | spills st/ld | local | static smem B | warps/SM by registers |",
                  "|---|---:|---:|---:|---:|---:|"]
        names = resources.demangle([u.function for u in usage])
        for u, name in sorted(zip(usage, names), key=lambda p: resources.short_kernel_name(p[1])):
            per_warp = -(-u.regs * 32 // 256) * 256
            warps = min(limits.max_warps, limits.regs_per_sm // per_warp)
            lines.append(f"| `{resources.short_kernel_name(name)}` | {u.regs} | {u.spill_stores}/{u.spill_loads} | "
                         f"{u.local_bytes} | {u.smem} | {warps} |")
    lines.append("")
    return "\n".join(lines)


_CUDA_HEADING = "## CUDA C++ kernels (i2v_kernels/_C)"


def rewrite_cuda_sections(archs: Sequence[str], out: str) -> list[str]:
    """Replace the CUDA C++ section of each existing ``static_<arch>.md`` in ``out`` with the built
    extension's; the Triton tables stay as they were. Returns the files rewritten."""
    report = Report(tuple(archs), [], [], 0.0, 0, out)
    report.extension, report.extension_note = extension_usage()
    written = []
    for arch in archs:
        path = os.path.join(out, f"static_{arch}.md")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            old = f.read()
        head, found, _ = old.partition(_CUDA_HEADING)
        if not found:
            continue
        section = render(report, arch)
        with open(path, "w") as f:
            f.write(head + section[section.index(_CUDA_HEADING):])
        written.append(path)
    return written


def _why_legend(arch: str) -> str:
    launches, strength = triton_aot.DEPTH[arch]
    if launches != "cover":
        return "`launch` is each kernel's largest launch (heaviest flags); this target is checked that far only."
    flags = {1: "every flag value", 2: "every pair of flag values"}.get(strength, f"every {strength}-tuple of flag values")
    text = ("`launch` rows cover every launch-configuration value (heaviest flags), `typical` is a typical "
            "video-DiT call, `config` rows compile every config an autotuner can time on this target (at the "
            "typical head tile where it fits, with the flags it is timed with)")
    if strength:
        text += f", `feature` rows cover {flags} (at the smallest launch), `int64` passes every integer as 64-bit"
    return text + "."


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=",".join(triton_aot.available_archs()),
                        help="comma-separated targets (default: %(default)s)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for static_<arch>.md (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per CPU)")
    parser.add_argument("--full", action="store_true",
                        help="compile every point of every space instead of the covering plan (hours)")
    parser.add_argument("--cuda-only", action="store_true",
                        help="compile nothing; rewrite only the CUDA C++ section of the existing tables")
    args = parser.parse_args(argv)
    archs = tuple(a for a in args.archs.split(",") if a)
    unknown = [a for a in archs if a not in triton_aot.CAPABILITIES]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; choose from {sorted(triton_aot.CAPABILITIES)}")
    if args.cuda_only:
        written = rewrite_cuda_sections(archs, args.out)
        print(f"CUDA C++ sections rewritten: {', '.join(written) or 'none (no tables in ' + args.out + ')'}")
        return 0
    report = build(archs, out=args.out, jobs=args.jobs, full=args.full)
    print(report.summary())
    for line in report.warnings:
        print(f"warning: {line}")
    for line in report.problems:
        print(f"problem: {line}", file=sys.stderr)
    print(f"tables: {', '.join(os.path.join(args.out, f'static_{a}.md') for a in archs)}")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
