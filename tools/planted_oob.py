"""A deliberately out-of-bounds read, for checking that compute-sanitizer sees a process's kernels.

``tools/gpu_smoke.py --plant-oob`` calls :func:`read_past_end` in each of its processes; ``make gpu-check``
runs that under ``compute-sanitizer --tool memcheck`` before the real smoke run and expects errors: a
sanitizer that reports none here would report none for a real bug either. Only run it under the
sanitizer (on its own the read may fault and leave the CUDA context unusable). Not part of the package.
"""

import torch
import triton
import triton.language as tl

PAST_END = 4096  # elements past the end of a 16-element tensor: outside any allocation


@triton.jit
def _read_past_end_kernel(src, dst, OFFSET: tl.constexpr):
    i = tl.arange(0, 16)
    tl.store(dst + i, tl.load(src + OFFSET + i))  # no mask: every load is out of bounds


def read_past_end() -> None:
    src = torch.ones(16, device="cuda")
    dst = torch.empty(16, device="cuda")
    _read_past_end_kernel[(1,)](src, dst, OFFSET=PAST_END)
    torch.cuda.synchronize()
