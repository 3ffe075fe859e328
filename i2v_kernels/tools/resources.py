"""Static resource usage of compiled GPU code: registers, local memory (spills), shared memory, and the
occupancy they allow, read from cubins with ``cuobjdump`` -- no GPU needed.

Two sources give the same numbers: ``ptxas -v``'s log when the compile at hand ran ptxas
(:func:`ptxas_usage`), else the cubin through ``cuobjdump`` (:func:`usage_of`): ``--dump-resource-usage``
for registers, stack frame and shared memory, and the SASS for the spills -- the bytes its ``STL`` /
``LDL`` instructions move, which is what ptxas counts as spill stores / loads (local arrays aside,
which generated code does not have). The ``cuobjdump`` Triton ships (``triton/backends/nvidia/bin``) is
used when there is none on ``PATH``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Optional
_KIB = 1024


@dataclass(frozen=True)
class Arch:
    """Per-SM limits of one target (CUDA C++ Programming Guide, "Technical Specifications per Compute
    Capability"), for the occupancy estimate and the shared-memory check."""

    name: str              # "sm90a": the file-name form used in benchmarks/results/static_<name>.md
    capability: int        # 90
    max_warps: int         # resident warps per SM
    max_blocks: int        # resident blocks per SM
    smem_per_sm: int       # bytes of shared memory per SM usable by blocks
    smem_per_block: int    # opt-in maximum a block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin)
    regs_per_sm: int = 65536
    reserved_smem: int = _KIB  # reserved by the system per block (since sm_80)


ARCHS = {
    "sm80": Arch("sm80", 80, max_warps=64, max_blocks=32, smem_per_sm=164 * _KIB, smem_per_block=163 * _KIB),
    "sm90a": Arch("sm90a", 90, max_warps=64, max_blocks=32, smem_per_sm=228 * _KIB, smem_per_block=227 * _KIB),
    "sm120a": Arch("sm120a", 120, max_warps=48, max_blocks=32, smem_per_sm=100 * _KIB, smem_per_block=99 * _KIB),
}

_REG_ALLOC_UNIT = 256   # registers are allocated per warp in units of 256
_SMEM_ALLOC_UNIT = 128  # shared memory is allocated per block in units of 128 bytes


def occupancy(arch: Arch, regs: int, warps: int, smem: int) -> tuple[int, str]:
    """Resident warps per SM for a block of ``warps`` warps using ``regs`` registers per thread and
    ``smem`` bytes of shared memory (static + dynamic, without the system's reserve), and the limit
    that binds (``"warps"``, ``"blocks"``, ``"regs"``, ``"smem"``)."""
    per_warp = -(-max(regs, 1) * 32 // _REG_ALLOC_UNIT) * _REG_ALLOC_UNIT
    footprint = -(-(smem + arch.reserved_smem) // _SMEM_ALLOC_UNIT) * _SMEM_ALLOC_UNIT
    limits = {
        "warps": arch.max_warps // warps,
        "blocks": arch.max_blocks,
        "regs": (arch.regs_per_sm // per_warp) // warps,
        "smem": arch.smem_per_sm // footprint,
    }
    binding = min(limits, key=limits.get)
    return limits[binding] * warps, binding


def cuobjdump() -> str:
    """Path of a ``cuobjdump``: the one on PATH, else the one Triton ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    import triton

    shipped = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(shipped):
        raise FileNotFoundError("no cuobjdump on PATH and none in triton/backends/nvidia/bin")
    return shipped


def _run(args: list[str]) -> str:
    return subprocess.run([cuobjdump(), *args], check=True, capture_output=True, text=True).stdout


@dataclass(frozen=True)
class Usage:
    """One function's resources in one cubin (bytes are per thread unless said otherwise)."""

    arch: str          # the cubin's target: "sm_90" as cuobjdump names it, or a report name ("sm90a")
    function: str      # mangled name
    regs: int
    stack: int         # stack frame in local memory: spill slots (and local arrays)
    local: int         # other local memory
    smem: int          # static shared memory the code declares, per block
    spill_stores: int  # bytes stored by spill instructions (static count, as ptxas -v reports)
    spill_loads: int   # bytes loaded by them

    @property
    def local_bytes(self) -> int:
        """Local memory per thread, stack frame included (where spills go)."""
        return self.stack + self.local


_ARCH_LINE = re.compile(r"^arch = (sm_\d+\w*)", re.M)
_FUNCTION_USAGE = re.compile(r"^\s*Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", re.M)
_SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)", re.M)
_LOCAL_OP = re.compile(r"\b(STL|LDL)((?:\.[\w]+)*)\s")
_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def _split_by_arch(text: str) -> list[tuple[str, str]]:
    """``(arch, section)`` for each cubin's part of a cuobjdump listing (one part for a lone cubin)."""
    marks = list(_ARCH_LINE.finditer(text))
    if not marks:
        return [("", text)]
    return [(m.group(1), text[m.start():marks[i + 1].start() if i + 1 < len(marks) else len(text)])
            for i, m in enumerate(marks)]


def _local_ops(sass: str) -> dict[tuple[str, str], tuple[int, int]]:
    """``(arch, function) -> (bytes STL stores, bytes LDL loads)`` from ``cuobjdump -sass`` output."""
    out = {}
    for arch, section in _split_by_arch(sass):
        heads = list(_SASS_FUNCTION.finditer(section))
        for i, head in enumerate(heads):
            body = section[head.end():heads[i + 1].start() if i + 1 < len(heads) else len(section)]
            moved = {"STL": 0, "LDL": 0}
            for op, suffixes in _LOCAL_OP.findall(body):
                widths = [_WIDTH[x] for x in suffixes.split(".") if x in _WIDTH]
                moved[op] += widths[0] if widths else 4
            out[(arch, head.group(1))] = (moved["STL"], moved["LDL"])
    return out


def usage_of(path: str) -> list[Usage]:
    """Resource usage of every function of every cubin in ``path`` (a cubin, or a shared library with
    embedded cubins)."""
    listing = _run(["--dump-resource-usage", path])
    spills = _local_ops(_run(["-sass", path]))
    found = []
    for arch, section in _split_by_arch(listing):
        # cuobjdump's SHARED folds in the 1 KiB the system reserves per block from sm_90 on
        reserve = _KIB if int(re.sub(r"\D", "", arch) or 0) >= 90 else 0
        for m in _FUNCTION_USAGE.finditer(section):
            name = m.group(1)
            stores, loads = spills.get((arch, name), (0, 0))
            found.append(Usage(arch, name, regs=int(m.group(2)), stack=int(m.group(3)), local=int(m.group(5)),
                               smem=max(0, int(m.group(4)) - reserve), spill_stores=stores, spill_loads=loads))
    return found


def cubin_usage(cubin: bytes, arch: str) -> Usage:
    """The one kernel of a Triton cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        found = usage_of(f.name)
    if len(found) != 1:
        raise RuntimeError(f"expected one function in the cubin, cuobjdump listed {len(found)}")
    return dataclasses.replace(found[0], arch=arch)


_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def ptxas_usage(log: str, arch: str) -> Optional[Usage]:
    """The usage ``ptxas -v`` reports for the one entry function of its log, or None if the log has none."""
    entry, frame, regs = _PTXAS_ENTRY.search(log), _PTXAS_FRAME.search(log), _PTXAS_REGS.search(log)
    if not (entry and frame and regs):
        return None
    smem = _PTXAS_SMEM.search(log[regs.start():])
    return Usage(arch, entry.group(1), regs=int(regs.group(1)), stack=int(frame.group(1)), local=0,
                 smem=int(smem.group(1)) if smem else 0, spill_stores=int(frame.group(2)),
                 spill_loads=int(frame.group(3)))


def demangle(names: list[str]) -> list[str]:
    """C++ names for mangled ones (``c++filt``; unchanged when it is missing)."""
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return list(names)
    out = subprocess.run([tool], input="\n".join(names), check=True, capture_output=True, text=True).stdout
    return out.splitlines()


def short_kernel_name(demangled: str) -> str:
    """``adaln_fwd_reg_kernel<__half, float, 8, 2>`` from ``void i2v::adaln::(anonymous
    namespace)::adaln_fwd_reg_kernel<__half, float, 8, 2>(i2v::adaln::AdalnParams)``."""
    name = demangled.removeprefix("void ")
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # drop the parameter list: the last '(' outside template brackets
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0 and not name.startswith("(anonymous", i):
            cut = i
    name = name[:cut]
    head, sep, args = name.partition("<")
    return head.rsplit("::", 1)[-1] + sep + args

