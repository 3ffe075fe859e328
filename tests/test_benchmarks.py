"""Every benchmark script runs end to end on this machine (quick mode, nothing saved).

A benchmark exits non-zero when a provider computes a wrong result, so this also checks that every
provider runnable here agrees with the reference; every run also reports its `auto` rows against the
best baseline (the first rule of shared/PERFORMANCE.md).
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHES = sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py"))


@pytest.mark.parametrize("bench", BENCHES)
def test_benchmark_quick_run(bench):
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{bench}", "--quick", "--no-save", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all results correct" in proc.stdout
    assert "## `auto` against the best baseline" in proc.stdout
    assert "auto>=0.95x best" in proc.stdout  # the first rule's verdict on an auto row (CPU: 0.95x)
