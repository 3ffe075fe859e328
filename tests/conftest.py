"""Test configuration: CUDA auto-skip, RNG hygiene, poisoned allocations, Triton interpreter on CPU."""

import os
import tempfile

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors through the interpreter; the variable must be
# set before triton compiles anything (it is read when @triton.jit decorates).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Dispatch: tests see the static decisions (no timing noise deciding which backend a test runs) and
# never read or write the user's dispatch cache; tests of the measured dispatcher turn it on themselves.
os.environ.setdefault("I2V_KERNELS_TUNE", "0")
os.environ.setdefault("I2V_KERNELS_CACHE_DIR", os.path.join(tempfile.mkdtemp(prefix="i2v-dispatch-"), "cache"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _rng_hygiene():
    """Every test starts from seed 0 and leaves the global RNG as it found it."""
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    torch.manual_seed(0)
    yield
    torch.set_rng_state(cpu_state)
    if cuda_states is not None:
        torch.cuda.set_rng_state_all(cuda_states)


@pytest.fixture(autouse=True)
def _poison_uninitialized_memory():
    """torch.empty (Python and C++ at::empty alike) returns NaN-filled memory during tests, so an
    element a kernel forgets to write fails the comparison instead of passing by luck."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = fill
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@pytest.fixture(scope="session")
def cpu_backends():
    """Our backends that can run CPU tensors in this process (the interpreter counts for triton)."""
    from i2v_kernels import _backend

    return [b for b in ("triton", "cpu", "torch") if _backend._GENERIC[b](torch.device("cpu")) is None]
