"""pytest plugin: diffusers' own model tests with ``i2v_kernels.patch()`` applied to every model they build.

Loaded by name in a diffusers checkout (``tools/diffusers_upstream_tests.py`` does this, twice: patched and
unpatched)::

    cd /path/to/diffusers
    PYTHONPATH=/path/to/i2v-kernels/tests/diffusers_upstream \
        python -m pytest -p i2v_upstream_plugin tests/models/transformers/test_models_transformer_latte.py

Every model class :data:`i2v_kernels.integrations.diffusers.KNOWN_MODELS` names gets its ``__init__``
wrapped (``functools.wraps``, so diffusers' config machinery still reads the real signature): an instance
is patched as its construction ends, whichever route built it -- ``Model(**init_dict)``, ``from_config``,
``from_pretrained`` (which goes through ``from_config``, under ``init_empty_weights`` too); copies
(``copy.deepcopy``) carry the patch along. A patch that replaced nothing fails the test there and then,
with the summary: nothing is skipped silently.

Environment:

* ``I2V_UPSTREAM_PATCH``: ``1`` (default) patches; ``0`` runs diffusers unchanged with the same
  bookkeeping, the baseline.
* ``I2V_UPSTREAM_LOG``: a JSON-lines file: the versions tested, then one line per test: its outcome (and
  skip reason), the models
  it built (class, modules replaced, modules kept on diffusers' code), and how many patched-module calls
  ran our code and how many diffusers' own (the measured dispatch's choice, counted at
  ``core._measured_call``).

The dispatch runs without timing (``I2V_KERNELS_TUNE=0``, a throw-away decision cache): a patched module
runs our code, never a decision taken from noisy timings on a loaded CPU. diffusers is imported when the
plugin loads, before the checkout's ``tests/conftest.py`` puts the checkout's ``src/`` on ``sys.path``:
the installed diffusers is the one tested (its version and path go in the pytest header).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import weakref

import torch

os.environ.setdefault("I2V_KERNELS_TUNE", "0")
os.environ.setdefault("I2V_KERNELS_CACHE_DIR", os.path.join(tempfile.mkdtemp(prefix="i2v-upstream-"), "cache"))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import diffusers  # noqa: E402  (before the checkout's conftest can shadow it with its src/)
import pytest  # noqa: E402

import i2v_kernels  # noqa: E402
from i2v_kernels.integrations.diffusers import KNOWN_MODELS, core, patch_summary  # noqa: E402

PATCH_ENV, LOG_ENV = "I2V_UPSTREAM_PATCH", "I2V_UPSTREAM_LOG"


def patching() -> bool:
    value = os.environ.get(PATCH_ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{PATCH_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


class SilentlySkipped(RuntimeError):
    """A model the tests built on which ``patch()`` replaced nothing."""


class _Ledger:
    """What the current test built and ran."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.models: list[weakref.ref] = []
        self.built: list[dict] = []
        self.ours = 0
        self.theirs = 0
        self.reports: list = []


LEDGER = _Ledger()


def _after_init(model, patch_it: bool) -> None:
    entry = {"class": type(model).__name__, "replaced": 0, "kept": 0}
    if patch_it:
        i2v_kernels.patch(model)
        summary = patch_summary(model)
        entry["replaced"] = sum(summary.replaced.values())
        entry["kept"] = sum(summary.kept.values())
        if not summary.replaced:
            raise SilentlySkipped(f"i2v_upstream_plugin: patch() replaced nothing on the "
                                  f"{type(model).__name__} this test built:\n{summary}")
    LEDGER.built.append(entry)
    LEDGER.models.append(weakref.ref(model))


def wrap_init(cls, patch_it: bool) -> None:
    """Make ``cls(...)`` end with :func:`_after_init` on instances of exactly ``cls``."""
    original = cls.__init__
    if getattr(original, "_i2v_upstream", False):
        return

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if type(self) is cls:
            _after_init(self, patch_it)

    __init__._i2v_upstream = True
    cls.__init__ = __init__


def install(patch_it: bool) -> list[str]:
    """Wrap the known models' ``__init__`` and count the patched modules' calls; returns the classes
    this diffusers has."""
    found = []
    for name in sorted(KNOWN_MODELS):
        cls = getattr(diffusers, name, None)
        if cls is not None:
            wrap_init(cls, patch_it)
            found.append(name)
    measured = core._measured_call
    if not getattr(measured, "_i2v_upstream", False):

        def counted(label, module, args, kwargs, ours, theirs):
            if torch.compiler.is_compiling():
                return measured(label, module, args, kwargs, ours, theirs)

            def run_ours():
                LEDGER.ours += 1
                return ours()

            def run_theirs():
                LEDGER.theirs += 1
                return theirs()

            return measured(label, module, args, kwargs, run_ours, run_theirs)

        counted._i2v_upstream = True
        core._measured_call = counted
    return found


def pytest_configure(config):
    config._i2v_upstream_classes = install(patching())


def pytest_sessionstart(session):
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"session": {"diffusers": diffusers.__version__,
                                            "diffusers_path": os.path.dirname(diffusers.__file__),
                                            "i2v_kernels": os.path.dirname(i2v_kernels.__file__),
                                            "torch": torch.__version__,
                                            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available()
                                            else "none"}}) + "\n")


def pytest_report_header(config):
    mode = "patched" if patching() else "unpatched (baseline)"
    return [f"i2v_upstream_plugin: {mode}; diffusers {diffusers.__version__} from "
            f"{os.path.dirname(diffusers.__file__)}; i2v_kernels from {os.path.dirname(i2v_kernels.__file__)}; "
            f"torch {torch.__version__}",
            "i2v_upstream_plugin: hooked " + ", ".join(getattr(config, "_i2v_upstream_classes", []))]


def outcome(reports) -> tuple[str, str]:
    """``(passed | failed | error | skipped | xfailed | xpassed, detail)`` of one test from its reports."""
    for r in reports:
        if r.failed:
            kind = "failed" if r.when == "call" else "error"
            return kind, _first_line(r.longreprtext)
    for r in reports:
        if r.skipped:
            if hasattr(r, "wasxfail"):
                return "xfailed", r.wasxfail
            reason = r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr)
            return "skipped", reason.removeprefix("Skipped: ")
    for r in reports:
        if r.when == "call" and hasattr(r, "wasxfail"):
            return "xpassed", r.wasxfail
    return "passed", ""


def _first_line(text: str) -> str:
    """The exception line of a failure (pytest's ``E   ...`` lines), else the text's last line."""
    lines = [ln for ln in text.splitlines() if ln.startswith("E ")]
    pick = lines[0] if lines else (text.strip().splitlines() or [""])[-1]
    return pick[1:].strip()[:300] if lines else pick.strip()[:300]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    LEDGER.reset()
    yield
    kind, detail = outcome(LEDGER.reports)
    path = os.environ.get(LOG_ENV)
    if path:
        record = {"nodeid": item.nodeid, "outcome": kind, "detail": detail, "patched": patching(),
                  "built": LEDGER.built, "ours": LEDGER.ours, "theirs": LEDGER.theirs}
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    LEDGER.reset()


def pytest_runtest_logreport(report):
    LEDGER.reports.append(report)
