"""`make gpu-check` without a GPU: the smoke script's CPU path, and the orchestrator's caps, kills and reports
(tools/gpu_smoke.py, tools/gpu_check.py)."""

import datetime as dt
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_OPS = {"adaln_modulate", "gated_residual", "gated_residual_adaln", "rms_norm", "spatial_attention",
              "temporal_attention", "attention", "causal_conv3d", "qk_norm_rope", "spatial_attention.backward",
              "temporal_attention.backward", "attention.backward"}


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


gpu_check = _load("gpu_check")
gpu_smoke = _load("gpu_smoke")


# --------------------------------------------------------------------------------------------------
# The smoke script


def test_smoke_dry_run_runs_every_op_on_the_cpu(tmp_path):
    out = tmp_path / "smoke.json"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "tools/gpu_smoke.py", "--dry-run", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads(out.read_text())["records"]
    assert {r["device"] for r in records} == {"cpu"}
    assert not [r for r in records if r["status"] == "fail"]
    ok = {(r["op"], r["backend"]) for r in records if r["status"] == "ok"}
    assert {op for op, _ in ok} == PUBLIC_OPS, "every public op (and the attention backward) ran somewhere"
    # the interpreter ran every op's Triton kernel; the C++ CPU kernels ran the families that have one
    assert {op for op, b in ok if b == "triton"} == PUBLIC_OPS
    assert {"adaln_modulate", "gated_residual_adaln", "rms_norm", "causal_conv3d", "qk_norm_rope"} <= {
        op for op, b in ok if b == "cpu"}
    big = [r for r in records if r["big"]]
    assert {r["op"] for r in big} == {"gated_residual_adaln", "spatial_attention", "temporal_attention", "attention",
                                      "causal_conv3d", "qk_norm_rope"}
    assert all(r["status"] == "skip" and "interpreter" in r["reason"] for r in big if r["backend"] == "triton")
    assert any(r["status"] == "ok" for r in big if r["backend"] == "cpu"), "a big case ran on the C++ CPU kernels"
    assert "skipped" in proc.stdout and "there is no cpu kernel for spatial_attention" in proc.stdout
    print(f"smoke dry run: {time.monotonic() - started:.1f} s")


def test_smoke_compare_catches_wrong_results():
    ref = torch.linspace(-2, 2, 50, dtype=torch.float16)
    assert gpu_smoke.compare(ref.clone(), ref, "float16")[0]
    wrong = ref.clone()
    wrong[7] += 0.1
    ok, err, why = gpu_smoke.compare(wrong, ref, "float16")
    assert not ok and err == pytest.approx(0.1, rel=0.05) and "1 of 50" in why
    unwritten = ref.clone()
    unwritten[3] = float("nan")
    assert "NaN" in gpu_smoke.compare(unwritten, ref, "float16")[2]
    assert "shape" in gpu_smoke.compare(ref[:49], ref, "float16")[2]
    assert "dtype" in gpu_smoke.compare(ref.float(), ref, "float16")[2]
    # gradients: the looser bound, still not loose enough for a wrong index
    assert gpu_smoke.compare((ref, ref + 0.01), (ref, ref), "float16", grad=True)[0]
    assert not gpu_smoke.compare((ref, ref.flip(0)), (ref, ref), "float16", grad=True)[0]


# --------------------------------------------------------------------------------------------------
# The orchestrator


def test_caps_fit_eight_minutes_and_cover_every_benchmark():
    total = sum(gpu_check.STAGE_CAPS.values()) + gpu_check.SUMMARY_RESERVE_S
    assert total <= gpu_check.TOTAL_BUDGET_S <= 8 * 60 - 5, "stage caps + summary must fit the budget (< 8 min)"
    assert all(cap > 0 for cap in gpu_check.STAGE_CAPS.values())
    benches = sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py"))
    missing = [b for b in benches if b not in gpu_check.STAGE_CAPS]
    assert not missing, f"benchmarks without a cap in tools/gpu_check.py STAGE_CAPS: {missing}"


def test_plan_for_a_gpu_uses_the_cap_table(tmp_path):
    class Args:
        dry_run, stages = False, None

    machine = {"gpu": "NVIDIA H200", "capability": [9, 0]}
    env_before = {k: os.environ.get(k) for k in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS")}
    stages = gpu_check.plan(Args, tmp_path, machine)
    names = [s.name for s in stages]
    assert names[:4] == ["build", "tests", "smoke", "sanitizer"]
    assert all(s.cap_s == gpu_check.STAGE_CAPS[s.name] for s in stages)
    pip = stages[0].steps[0]
    assert pip.argv[1:] == ["-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    if env_before["TORCH_CUDA_ARCH_LIST"] is None:
        assert pip.env["TORCH_CUDA_ARCH_LIST"] == "9.0"
    if env_before["MAX_JOBS"] is None:
        assert pip.env["MAX_JOBS"] == str(os.cpu_count())
    benches = [s for s in stages if s.name.startswith("bench_")]
    assert all(s.steps[0].argv[-3:] == ["--device", "cuda", "--quick"] for s in benches)
    assert stages[3].steps[0].argv[1:3] == ["--tool", "memcheck"]


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as dead)."""
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        if state in ("Z", "X"):
            return False
        time.sleep(0.02)  # SIGKILL is delivered asynchronously
    return True


def _script(body: str) -> list[str]:
    return [sys.executable, "-c", body]


def test_stage_over_its_cap_is_killed_with_its_children_and_the_run_goes_on(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    # a stage that starts a child ignoring SIGINT, then sleeps far past its cap
    sleepy = _script(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGINT, "
        "signal.SIG_IGN); time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('sleeping', flush=True)\ntime.sleep(120)\n")
    S = gpu_check.Stage
    stages = [
        S("sleepy", 2.0, "sleeps past its cap", [gpu_check.Step(sleepy)]),
        S("fails", 10.0, "exits 3", [gpu_check.Step(_script("import sys; sys.exit(3)")),
                                      gpu_check.Step(_script("print('never')"))]),
        S("skipped", 10.0, "never runs", [gpu_check.Step(_script("print('no')"))], skip_reason="not wanted"),
        S("quick", 3.0, "prints", [gpu_check.Step(_script("print('ran after the timeout')"), env={"X_TEST": "1"})]),
    ]
    started = time.monotonic()
    gpu_check.run_stages(stages, tmp_path, total_s=2.0 + 10.0 + 3.0 + 1.0, reserve_s=1.0, echo=lambda s: None)
    elapsed = time.monotonic() - started
    sleepy_r, fails, skipped, quick = stages
    assert sleepy_r.status == "timeout" and sleepy_r.allowed_s == pytest.approx(2.0, abs=0.2)
    assert sleepy_r.seconds < 2.0 + 0.5, "killed at its allowance, not later"
    assert "sleeping" in sleepy_r.log.read_text() and "reached its" in sleepy_r.log.read_text()
    assert not _alive(int(pid_file.read_text())), "the SIGINT-proof grandchild went with its process group"
    assert fails.status == "failed" and fails.returncode == 3 and "never" not in fails.log.read_text()
    assert skipped.status == "skipped" and skipped.log is None
    # the skipped stage's cap and the time the failed one left over went to the last stage
    assert quick.status == "passed" and quick.allowed_s > 3.0 + 5.0
    assert "ran after the timeout" in quick.log.read_text()
    assert elapsed < 8.0


def test_dry_run_writes_summary_stage_table_and_tarball(tmp_path):
    out = tmp_path / "run"
    code = gpu_check.main(["--dry-run", "--stages", "build", "--out", str(out)])
    assert code == 0
    stages = {s["stage"]: s for s in json.loads((out / "stages.json").read_text())}
    assert stages["build"]["status"] == "passed"
    assert all(s["status"] == "skipped" for name, s in stages.items() if name != "build")
    assert stages["sanitizer"]["skip_reason"].startswith("dry run")
    summary = (out / "SUMMARY.md").read_text()
    assert "| 1 | build | passed |" in summary and "## Where everything is" in summary
    assert (out / "info.txt").read_text().startswith("i2v-kernels")
    assert json.loads((out / "info.json").read_text())["torch"] == torch.__version__
    assert (tmp_path / "run.tar.gz").stat().st_size > 0


def test_junit_and_benchmark_rows_are_read(tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_conv3d" name="test_a[x]"/>'
        '<testcase classname="tests.test_conv3d" name="test_b"><failure message="boom"/></testcase>'
        '<testcase classname="tests.test_adaln.TestThing" name="test_c"><error message="e"/></testcase>'
        '<testcase classname="tests.test_adaln" name="test_d"><skipped message="s"/></testcase>'
        '</testsuite></testsuites>')
    got = gpu_check.parse_junit(junit)
    assert got["counts"] == {"passed": 1, "failed": 1, "errors": 1, "skipped": 1}
    assert got["failing"] == ["tests/test_conv3d.py::test_b", "tests/test_adaln.py::TestThing::test_c (error)"]

    def row(provider, kind, ms, label="s1"):
        return {"op": "spatial", "shape": {"label": label}, "dtype": "bfloat16", "provider": provider, "kind": kind,
                "status": "ok", "ms": ms}

    rows = [row("copy", "copy", 0.1), row("torch", "eager", 2.0), row("sdpa-cudnn", "baseline", 1.0),
            row("triton", "ours", 1.6), row("auto", "ours", 0.9), row("torch", "eager", 4.0, "s2"),
            row("triton", "ours", 1.0, "s2")]
    lines = gpu_check.headline_rows(rows)
    assert lines[0] == "| spatial | s1 | bfloat16 | sdpa-cudnn 1 ms | auto 0.9 ms | 1.11x |"
    assert lines[1] == "| spatial | s2 | bfloat16 | torch 4 ms | triton 1 ms | 4.00x |"


def test_smoke_records_of_a_cut_off_run_are_merged_from_its_shard_files(tmp_path):
    def shard(i, status):
        rec = {"op": "rms_norm", "label": f"case {i}", "dtype": "float32", "backend": "cuda", "device": "cuda",
               "big": False, "status": status, "reason": None if status == "ok" else "wrong"}
        (tmp_path / f"smoke.json.shard{i}").write_text(json.dumps({"records": [rec], "interrupted": True}))

    shard(0, "ok")
    shard(1, "fail")
    stage = gpu_check.Stage("smoke", 10, "smoke")
    gpu_check.parse_smoke("smoke.json")(stage, tmp_path)
    assert stage.notes[0] == "1 ok, 1 failed, 0 skipped of 2 case x backend runs (cut off: merged from 2 shard files)"
    assert stage.notes[1] == "FAIL cuda rms_norm [case 1] float32: wrong"


def test_sanitizer_log_needs_the_planted_error_before_its_silence_counts(tmp_path):
    planted = ("$ compute-sanitizer ... --plant-oob\n========= Invalid __global__ read of size 4 bytes\n"
               "=========     at _read_past_end_kernel+0x70\n========= ERROR SUMMARY: 16 errors\n")
    clean = "$ compute-sanitizer ... gpu_smoke.py\nok  cuda rms_norm\n========= ERROR SUMMARY: 0 errors\n"
    bad = ("$ compute-sanitizer ... gpu_smoke.py\n========= Invalid __global__ write of size 2 bytes\n"
           "=========     at _adaln_fwd_kernel+0x1f0\n========= ERROR SUMMARY: 3 errors\n")

    def parse(text, status="passed"):
        stage = gpu_check.Stage("sanitizer", 10, "x", status=status, log=tmp_path / "san.log")
        stage.log.write_text(text)
        gpu_check.parse_sanitizer(stage, tmp_path)
        return stage

    ok = parse(planted + clean)
    assert ok.status == "passed" and ok.notes[:2] == ["0 memcheck errors", "self-check: the planted out-of-bounds "
                                                      "read was reported (16 errors)"]
    blind = parse(planted.replace("16 errors", "0 errors") + clean)
    assert blind.status == "failed" and blind.notes[1].startswith("self-check FAILED")
    found = parse(planted + bad, status="failed")
    assert found.notes[0] == "3 memcheck errors"
    assert "Invalid __global__ write of size 2 bytes at _adaln_fwd_kernel+0x1f0" in found.notes


def test_benchmark_stage_reads_only_its_own_new_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "RESULTS_DIR", tmp_path / "results")
    (tmp_path / "results").mkdir()
    jsonl = tmp_path / "results" / "adaln.jsonl"

    def row(ts, provider, ms):
        return json.dumps({"op": "adaln_modulate", "shape": {"label": "x"}, "dtype": "bfloat16", "provider": provider,
                           "kind": "ours" if provider == "auto" else "eager", "status": "ok", "ms": ms,
                           "timestamp": ts}) + "\n"

    jsonl.write_text(row("2026-01-01T00:00:00+00:00", "auto", 9.0))  # an earlier run's row
    marks = {"offsets": {"adaln": jsonl.stat().st_size}, "started": dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)}
    with open(jsonl, "a") as f:  # someone else's old row copied in meanwhile, then this run's rows
        f.write(row("2026-02-01T00:00:00+00:00", "auto", 7.0))
        f.write(row("2026-06-01T00:00:05+00:00", "torch", 2.0) + row("2026-06-01T00:00:05+00:00", "auto", 1.0))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stage = gpu_check.Stage("bench_adaln", 10, "x", [gpu_check.Step(["python", "-m", "benchmarks.bench_adaln"])])
    gpu_check.parse_bench("adaln", marks)(stage, run_dir)
    assert stage.notes[0] == "2 rows: 2 ok, 0 skipped, 0 wrong, 0 errors"
    assert stage.headline == ["| adaln_modulate | x | bfloat16 | torch 2 ms | auto 1 ms | 2.00x |"]
    assert len((run_dir / "results" / "adaln.jsonl").read_text().splitlines()) == 2
    dry = gpu_check.Stage("bench_adaln", 10, "x", [gpu_check.Step(["python", "--no-save"])])
    gpu_check.parse_bench("adaln", {"offsets": {}, "started": marks["started"]})(dry, run_dir)
    assert dry.notes[0] == "no rows saved (--no-save)" and not dry.headline
