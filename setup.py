"""Build script for i2v-kernels.

Builds the extension ``i2v_kernels._C``:

* C++ CPU kernels, always;
* CUDA kernels whenever nvcc and a CUDA build of torch are present, even when no GPU is visible.
  ``I2V_KERNELS_CUDA=1`` forces them (failing loudly if they cannot be built), ``=0`` skips them.

Environment knobs:

* ``TORCH_CUDA_ARCH_LIST``: the GPU architectures to compile for. Default when unset and no GPU is
  visible: ``"8.0;9.0+PTX"`` -- sm_80 code runs on every Ampere/Ada card (8.x), sm_90 on Hopper, and
  the PTX lets newer GPUs JIT-compile it.
* ``MAX_JOBS``: parallel compile jobs; default bounded by cores and by memory (about 3 GiB per job).

torch is not a build requirement: install with ``pip install --no-build-isolation -e .`` into an
environment that already has torch.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _env_flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        sys.exit(f"setup.py: {name} must be 0 or 1, got {value!r}")
    return value == "1"


def _default_max_jobs():
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 8
    return max(1, min(cores, int(mem_gib // 3)))


def _find_cuda_home():
    """Point CUDA_HOME at a toolkit that has its headers, before torch guesses one.

    torch derives CUDA_HOME from the nvcc on PATH; when that nvcc is a wrapper script (as in
    /usr/local/bin), the guess has no include/ folder. Try the usual places instead.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
    candidates += [Path("/usr/local/cuda")] + sorted(Path("/usr/local").glob("cuda-*"), reverse=True)
    for home in candidates:
        if (home / "include" / "cuda_runtime.h").exists() and (home / "bin" / "nvcc").exists():
            os.environ["CUDA_HOME"] = str(home)
            return


def _build_config():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    forced = _env_flag("I2V_KERNELS_CUDA")
    have_nvcc = CUDA_HOME is not None and (
        shutil.which("nvcc") is not None or Path(CUDA_HOME, "bin", "nvcc").exists()
    )
    cuda_torch = torch.version.cuda is not None
    reasons = []
    if not have_nvcc:
        reasons.append("nvcc not found (CUDA_HOME unset)")
    if not cuda_torch:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
    if forced is False:
        with_cuda = False
        reasons = ["I2V_KERNELS_CUDA=0"]
    elif forced is True:
        if reasons:
            sys.exit("setup.py: I2V_KERNELS_CUDA=1 but CUDA kernels cannot be built: " + "; ".join(reasons))
        with_cuda = True
    else:
        with_cuda = not reasons
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    return with_cuda, reasons


def _write_build_info(with_cuda, reasons):
    """Record what this build contains, for i2v_kernels.info()."""
    import torch

    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    if with_cuda and not arch:
        arch = "visible GPUs: " + ",".join(
            "%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())
        )
    info = {
        "cuda_kernels": with_cuda,
        "cuda_skipped_because": "" if with_cuda else "; ".join(reasons),
        "arch_list": arch,
        "built_with_torch": torch.__version__,
        "built_with_cuda": torch.version.cuda or "",
    }
    text = '"""Written by setup.py at build time."""\n\nBUILD_INFO = ' + repr(info) + "\n"
    (ROOT / "i2v_kernels" / "_build_info.py").write_text(text)


def _extensions():
    _find_cuda_home()  # before torch.utils.cpp_extension computes its CUDA_HOME on import
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    with_cuda, reasons = _build_config()
    csrc = ROOT / "csrc"
    cpp = sorted(str(p.relative_to(ROOT)) for p in csrc.rglob("*.cpp"))
    cu = sorted(str(p.relative_to(ROOT)) for p in csrc.rglob("*.cu"))
    # Files named *_cuda.cpp hold CUDA bindings: they need CUDA headers, so they go with the .cu files.
    cuda_cpp = [p for p in cpp if p.endswith("_cuda.cpp")]
    cpu_cpp = [p for p in cpp if p not in cuda_cpp]
    # No -std flag: torch adds the C++ standard its own headers need (C++20 for torch 2.14).
    cxx = ["-O3", "-fopenmp"]
    macros = []
    print("=" * 72)
    print("i2v-kernels build configuration")
    print(f"  torch            {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"  CUDA kernels     {'yes' if with_cuda else 'no: ' + '; '.join(reasons)}")
    if with_cuda:
        print(f"  CUDA_HOME        {CUDA_HOME}")
        print(f"  arch list        {os.environ.get('TORCH_CUDA_ARCH_LIST') or '(visible GPUs)'}")
        print(f"  nvcc             {os.environ.get('PYTORCH_NVCC', 'nvcc')}")
    print(f"  MAX_JOBS         {os.environ['MAX_JOBS']}")
    print(f"  sources          {len(cpu_cpp)} C++" + (f", {len(cuda_cpp)} C++ (CUDA bindings), {len(cu)} CUDA" if with_cuda else ""))
    print("=" * 72)
    _write_build_info(with_cuda, reasons)
    if with_cuda:
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        macros.append(("I2V_WITH_CUDA", "1"))
        return [
            CUDAExtension(
                "i2v_kernels._C",
                cpu_cpp + cuda_cpp + cu,
                include_dirs=[str(csrc)],
                define_macros=macros,
                extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        CppExtension(
            "i2v_kernels._C",
            cpu_cpp,
            include_dirs=[str(csrc)],
            define_macros=macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


packages = find_packages(include=["i2v_kernels", "i2v_kernels.*"])
packages += ["i2v_model"] + ["i2v_model." + p for p in find_packages(where="model")]

setup(
    packages=packages,
    package_dir={"i2v_model": "model"},
    package_data={"i2v_model": ["weights/*.safetensors", "assets/*.png"]},
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
)
