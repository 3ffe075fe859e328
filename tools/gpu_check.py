"""``make gpu-check``: a fixed, bounded check of the package on one GPU machine.

``python tools/gpu_check.py [--dry-run] [--out DIR] [--stages a,b] [--list]``

Stages, in order, each under its own time cap (``STAGE_CAPS``), one log each:

1. ``build``      ``pip install --no-build-isolation --no-deps -e .`` for the visible GPU
                  (``TORCH_CUDA_ARCH_LIST`` from its capability and ``MAX_JOBS`` from the cores when
                  unset; CUDA kernels required), ``import i2v_kernels._C``, ``python -m i2v_kernels info``
2. ``tests``      ``pytest -m needs_cuda tests`` (junit XML kept)
3. ``smoke``      ``tools/gpu_smoke.py``: every CUDA C++ op and Triton kernel once on tiny and edge shapes
                  against the torch reference (this also fills Triton's cache for the next stage)
4. ``sanitizer``  the same script under ``compute-sanitizer --tool memcheck``
5. ``bench_*``    ``python -m benchmarks.bench_<name> --device cuda --quick``, one stage per script

then a one-page ``SUMMARY.md`` and a tarball of the run folder and ``benchmarks/results/``.

Time: the caps plus ``SUMMARY_RESERVE_S`` fit ``TOTAL_BUDGET_S`` (under 8 minutes, leaving ``make``'s
own few seconds). A stage may use its cap plus whatever earlier stages left unused, never the caps
reserved for the stages after it, so one slow stage cannot eat the rest. A stage that reaches its
allowance gets SIGINT (pytest and the benchmarks then print what they have), and SIGKILL a few
seconds later, its whole process group with it. The run goes on after a failed stage; the exit
status is 1 when any stage failed or hit its cap, 0 otherwise (skipped stages, such as
``bench_diffusers`` without diffusers, do not fail the run).

``--dry-run`` proves the wiring on a machine without a GPU: no build (the installed package is
imported), the needs_cuda tests of one file (all skipped), the smoke script on the CPU (C++ CPU
kernels and the Triton interpreter), no sanitizer, and each benchmark with ``--device cpu --quick
--no-save``.

Standard library only: this runs before anything is known to work.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"

TOTAL_BUDGET_S = 470     # the whole run; `make gpu-check` adds a few seconds: under 8 minutes
SUMMARY_RESERVE_S = 10   # summary, result copies and tarball

# Seconds per stage, from the H200 runs (shared/gpu-results/h200-2026-12-04 and make gpu-check on
# 2026-12-04 at 0dbff9a, torch 2.11, triton 3.6): build 63 s (38 s in the first run), needs_cuda tests
# 82 s (4 xdist workers), smoke 25 s, sanitizer 34 s (+ the planted-read self-check), bench_adaln 33 s,
# bench_attention 62 s, bench_conv3d 51 s, bench_diffusers --quick 38 s (first run; no diffusers on the
# second), bench_e2e --quick cut off at 101 s (70 s in the first run). The sum must stay within the
# budget, so a benchmark slower than its share is cut (and says so) until its --quick mode is bounded.
# Every benchmark must have a row here: one without is skipped and the summary says so.
# bench_qk_norm_rope has not run on a GPU yet (about 30 s expected, most of it one inductor compile);
# its 25 s came from the sanitizer (34 s measured) and bench_e2e (cut at its cap either way).
STAGE_CAPS = {
    "build": 70,
    "tests": 85,
    "smoke": 30,
    "sanitizer": 40,
    "bench_adaln": 35,
    "bench_attention": 60,
    "bench_conv3d": 50,
    "bench_diffusers": 40,
    "bench_e2e": 25,
    "bench_qk_norm_rope": 25,
}
# Python modules a benchmark needs beyond the package; missing -> the stage is skipped with the reason.
BENCH_NEEDS = {"bench_diffusers": ("diffusers",)}
SMOKE_JOBS = 8        # smoke processes without the sanitizer (Triton compiles in parallel)
SANITIZER_JOBS = 4    # and under it
SANITIZER_EXIT = 86   # compute-sanitizer's exit status when it found errors
TESTS_WORKERS = 4     # pytest-xdist workers for the needs_cuda tests, when xdist is installed


# --------------------------------------------------------------------------------------------------
# Running one command under a deadline


@dataclass
class Step:
    argv: list[str]
    env: dict = field(default_factory=dict)
    ok_codes: tuple = (0,)   # exit statuses that let the stage go on


@dataclass
class Stage:
    name: str
    cap_s: float
    what: str
    steps: list[Step] = field(default_factory=list)
    skip_reason: Optional[str] = None
    # after the run
    status: str = "not run"     # passed | failed | timeout | skipped | interrupted
    seconds: float = 0.0
    allowed_s: float = 0.0
    returncode: Optional[int] = None
    log: Optional[Path] = None
    notes: list[str] = field(default_factory=list)
    headline: list[str] = field(default_factory=list)   # benchmark stages: markdown table rows
    # parse(stage, run_dir) fills notes (and may override status) from the stage's outputs
    parse: Optional[Callable] = None


def kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _default_sigint() -> None:
    """In the child before exec: SIGINT as default even when this script runs in the background (where
    the shell ignores it), so the command's Python turns it into KeyboardInterrupt and reports."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_step(step: Step, log, timeout_s: float, env: dict) -> tuple[Optional[int], bool]:
    """Run one command in its own process group, output appended to ``log``; returns (exit status,
    timed out). At the deadline: SIGINT to the group, then SIGKILL after a short grace."""
    grace = min(5.0, max(0.2, timeout_s * 0.1))
    log.write(f"$ {' '.join(step.argv)}\n".encode())
    log.flush()
    if timeout_s <= grace:
        log.write(b"(not started: no time left in this stage)\n")
        return None, True
    proc = subprocess.Popen(step.argv, cwd=REPO, env={**env, **step.env}, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_default_sigint)
    try:
        try:
            code = proc.wait(timeout=timeout_s - grace)
            return code, False
        except subprocess.TimeoutExpired:
            kill_group(proc, signal.SIGINT)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                kill_group(proc, signal.SIGKILL)
                proc.wait()
            return proc.returncode, True
    finally:
        kill_group(proc, signal.SIGKILL)  # children left behind by a finished command
        if proc.poll() is None:  # interrupted from outside (Ctrl-C): do not leave it running
            proc.wait()


def run_stages(stages: list[Stage], run_dir: Path, total_s: float = TOTAL_BUDGET_S,
               reserve_s: float = SUMMARY_RESERVE_S, env: Optional[dict] = None,
               echo: Callable[[str], None] = print) -> list[Stage]:
    """Run the stages in order, each under ``cap + time earlier stages left``, never more than the
    budget minus the caps of the stages still to come. Fills each stage's result fields."""
    env = dict(os.environ if env is None else env)
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    interrupted = False
    for i, stage in enumerate(stages):
        later = sum(s.cap_s for s in stages[i + 1:] if s.skip_reason is None)
        stage.allowed_s = max(0.0, total_s - reserve_s - (time.monotonic() - started) - later)
        head = f"[{i + 1}/{len(stages)}] {stage.name:<16}"
        if interrupted:
            stage.status, stage.skip_reason = "skipped", "the run was interrupted"
        if stage.skip_reason is not None:
            stage.status = "skipped"
            echo(f"{head} skipped: {stage.skip_reason}")
            continue
        stage.log = logs / f"{i + 1:02d}-{stage.name}.log"
        t0 = time.monotonic()
        try:
            with open(stage.log, "wb") as log:
                log.write(f"# {stage.name}: {stage.what}\n# allowed {stage.allowed_s:.0f} s (cap {stage.cap_s:.0f} s)\n"
                          .encode())
                for step in stage.steps:
                    left = stage.allowed_s - (time.monotonic() - t0)
                    code, timed_out = run_step(step, log, left, env)
                    stage.returncode = code
                    if timed_out:
                        stage.status = "timeout"
                        log.write(f"\n# stopped: the stage reached its {stage.allowed_s:.0f} s\n".encode())
                        break
                    if code not in step.ok_codes:
                        stage.status = "failed"
                        break
                else:
                    stage.status = "passed"
        except KeyboardInterrupt:
            stage.status, interrupted = "interrupted", True
        stage.seconds = time.monotonic() - t0
        if stage.parse is not None:
            try:
                stage.parse(stage, run_dir)
            except Exception as e:  # a parser bug must not lose the run
                stage.notes.append(f"(could not read this stage's output: {type(e).__name__}: {e})")
        echo(f"{head} {stage.status:<8} {stage.seconds:6.1f} s  (cap {stage.cap_s:.0f} s, allowed "
             f"{stage.allowed_s:.0f} s)" + (f"  {stage.notes[0]}" if stage.notes else ""))
    return stages


# --------------------------------------------------------------------------------------------------
# Reading what the stages wrote


def tail(path: Optional[Path], n: int = 5) -> list[str]:
    if path is None or not path.exists():
        return []
    return path.read_text(errors="replace").splitlines()[-n:]


def parse_junit(path: Path) -> Optional[dict]:
    """Counts and failing test ids from a pytest junit XML file (None when absent or unreadable)."""
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failing = []
    for case in root.iter("testcase"):
        kinds = {child.tag for child in case}
        cls = case.get("classname", "")
        # "tests.test_conv3d" -> "tests/test_conv3d.py"; a class name, if any, stays after "::"
        parts = cls.split(".")
        mod = next((j for j in range(len(parts), 0, -1) if parts[j - 1].startswith("test")), len(parts))
        node = "/".join(parts[:mod]) + ".py" + "".join(f"::{p}" for p in parts[mod:]) + f"::{case.get('name')}"
        if "failure" in kinds:
            counts["failed"] += 1
            failing.append(node)
        elif "error" in kinds:
            counts["errors"] += 1
            failing.append(node + " (error)")
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {"counts": counts, "failing": failing}


def parse_build(stage: Stage, run_dir: Path) -> None:
    path = run_dir / "info.json"
    if not path.exists():
        return
    info = json.loads(path.read_text())
    build = info.get("build") or {}
    cuda = (f"CUDA kernels for {build.get('arch_list')}" if build.get("cuda_kernels") else
            f"no CUDA kernels ({build.get('cuda_skipped_because') or build.get('error') or 'unknown'})")
    usable = [name for name, b in (info.get("backends") or {}).items() if b.get("usable")]
    stage.notes.append(f"{cuda}; usable backends: {', '.join(usable) or 'none'}")
    if info.get("extension_error"):
        stage.notes.append(f"extension error: {info['extension_error']}")


def parse_tests(stage: Stage, run_dir: Path) -> None:
    junit = parse_junit(run_dir / "pytest-junit.xml")
    text = stage.log.read_text(errors="replace") if stage.log and stage.log.exists() else ""
    final = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|error)", ln)]
    if junit is not None:
        c = junit["counts"]
        stage.notes.append(f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped")
        stage.notes += [f"FAILED {t}" for t in junit["failing"]]
    elif final:
        stage.notes.append(final[-1].strip("= "))
        stage.notes += [ln for ln in text.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    else:
        stage.notes.append("no pytest results (see the log)")


def gpu_smoke():
    """tools/gpu_smoke.py as a module (it imports torch only inside its functions)."""
    spec = importlib.util.spec_from_file_location("gpu_smoke", REPO / "tools" / "gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_smoke", module)  # its dataclass looks its module up by name
    spec.loader.exec_module(module)
    return module


def parse_smoke(json_name: str) -> Callable:
    def parse(stage: Stage, run_dir: Path) -> None:
        path = run_dir / json_name
        if path.exists():
            data = json.loads(path.read_text())
        else:  # cut off before the shards' records were merged: merge them here
            shards = sorted(str(p) for p in run_dir.glob(json_name + ".shard*"))
            if not shards:
                stage.notes.append("no smoke results (see the log)")
                return
            data = {"records": gpu_smoke().merge_shards(shards)[0], "merged": len(shards)}
        records = data["records"]
        n = {s: sum(r["status"] == s for r in records) for s in ("ok", "fail", "skip")}
        stage.notes.append(f"{n['ok']} ok, {n['fail']} failed, {n['skip']} skipped of {len(records)} case x backend runs"
                           + (f" (cut off: merged from {data['merged']} shard files)" if data.get("merged") else ""))
        if data.get("triton_coverage"):
            stage.notes.append(data["triton_coverage"])
        stage.notes += [f"FAIL {r['backend']} {r['op']} [{r['label']}] {r['dtype']}: {r['reason']}"
                        for r in records if r["status"] == "fail"]
    return parse


_SANITIZER_SUMMARY = re.compile(r"=+ ERROR SUMMARY: (\d+) errors?")
_SANITIZER_ERROR = re.compile(r"=+ (Invalid|Out-of-range|Misaligned|Address|Malloc|Program hit|Barrier|Race)")


def memcheck_report(text: str) -> tuple[Optional[int], list[str]]:
    """(errors summed over the ERROR SUMMARY lines, None when there is none; distinct error headlines
    with the kernel they were in)."""
    totals = [int(m) for m in _SANITIZER_SUMMARY.findall(text)]
    seen: list[str] = []
    lines = text.splitlines()
    for j, ln in enumerate(lines):
        if _SANITIZER_ERROR.match(ln):
            where = next((x.strip("= ").strip() for x in lines[j + 1:j + 3] if " at " in x), "")
            item = f"{ln.strip('= ').strip()} {where}".strip()
            if item not in seen:
                seen.append(item)
    return (sum(totals) if totals else None), seen


def parse_sanitizer(stage: Stage, run_dir: Path) -> None:
    text = stage.log.read_text(errors="replace") if stage.log and stage.log.exists() else ""
    if "Device not supported" in text:
        stage.status = "skipped"
        stage.notes.append("compute-sanitizer does not support this device or runtime (see the log)")
        return
    runs = re.split(r"^\$ ", text, flags=re.M)[1:]  # one part per command (run_step writes "$ argv")
    planted, _ = memcheck_report(runs[0]) if runs else (None, [])
    check = (f"self-check: the planted out-of-bounds read was reported ({planted} errors)" if planted else
             "self-check FAILED: no error reported for the planted out-of-bounds read, so a silent run means nothing")
    if not planted and stage.status == "passed":
        stage.status = "failed"
    if len(runs) < 2:
        stage.notes += ["the smoke run under the sanitizer did not start", check]
        return
    errors, found = memcheck_report(runs[1])
    stage.notes.append(f"{errors} memcheck errors" if errors is not None else
                       "no ERROR SUMMARY from compute-sanitizer (see the log)")
    if errors and stage.status == "passed":
        stage.status = "failed"
    stage.notes.append(check)
    stage.notes += found[:10]
    smoke = run_dir / "smoke-sanitizer.json"
    if smoke.exists():
        records = json.loads(smoke.read_text())["records"]
        fails = [r for r in records if r["status"] == "fail"]
        stage.notes.append(f"smoke under the sanitizer: {len(records) - len(fails)} runs without a wrong result, "
                           f"{len(fails)} failed")


def headline_rows(rows: list[dict], limit: int = 6) -> list[str]:
    """Markdown rows: per case (op, shape, dtype) the best baseline and ours (`auto` when present)."""
    cases: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("status") != "ok" or r.get("ms") in (None, "inf", "nan"):
            continue
        shape = r.get("shape") or {}
        key = (r.get("op"), shape.get("label", "?") if isinstance(shape, dict) else str(shape), r.get("dtype"))
        cases.setdefault(key, []).append(r)
    out = []
    for (op, label, dtype), rs in list(cases.items())[:limit]:
        base = [r for r in rs if r.get("kind") in ("eager", "baseline")]
        auto = [r for r in rs if r.get("provider") == "auto"]
        ours = auto or [r for r in rs if r.get("kind") == "ours"]
        b = min(base, key=lambda r: r["ms"]) if base else None
        o = min(ours, key=lambda r: r["ms"]) if ours else None
        fmt = lambda r: f"{r['provider']} {r['ms']:.3g} ms" if r else "-"
        ratio = f"{b['ms'] / o['ms']:.2f}x" if b and o and o["ms"] > 0 else "-"
        out.append(f"| {op} | {label} | {dtype} | {fmt(b)} | {fmt(o)} | {ratio} |")
    if len(cases) > limit:
        out.append(f"| ... | {len(cases) - limit} more cases in the table | | | | |")
    return out


def _row_time(row: dict) -> Optional[datetime.datetime]:
    try:
        t = datetime.datetime.fromisoformat(str(row.get("timestamp")))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=datetime.timezone.utc)


def parse_bench(family: str, marks: dict) -> Callable:
    """Read the rows this stage appended to ``benchmarks/results/<family>.jsonl``: those after the
    file's size at planning time, and stamped no earlier than this run (rows someone else wrote to the
    file meanwhile are left out). Nothing with ``--no-save``."""
    def parse(stage: Stage, run_dir: Path) -> None:
        path = RESULTS_DIR / f"{family}.jsonl"
        start = marks["offsets"].get(family, 0)
        rows = []
        no_save = "--no-save" in stage.steps[0].argv
        if not no_save and path.exists() and path.stat().st_size > start:
            with open(path, "rb") as f:
                f.seek(start)
                new = f.read()
            for ln in new.decode(errors="replace").splitlines():
                try:
                    row = json.loads(ln)
                except ValueError:
                    continue
                when = _row_time(row)
                if when is None or when >= marks["started"]:
                    rows.append(row)
            if rows:
                (run_dir / "results").mkdir(exist_ok=True)
                with open(run_dir / "results" / f"{family}.jsonl", "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)
        if not rows:
            note = "no rows saved" + (" (--no-save)" if no_save else "")
        else:
            n = {s: sum(r.get("status") == s for r in rows) for s in ("ok", "skipped", "wrong", "error")}
            note = f"{len(rows)} rows: {n['ok']} ok, {n['skipped']} skipped, {n['wrong']} wrong, {n['error']} errors"
            stage.headline = headline_rows(rows)
        done = [ln for ln in tail(stage.log, 400) if ln.startswith(("all results correct", "FAILED:"))]
        stage.notes.append("; ".join([note] + done[-1:]))
    return parse


# --------------------------------------------------------------------------------------------------
# The plan


def probe(python: str) -> dict:
    """What the Python that runs the stages sees: versions and the GPU (a subprocess: the orchestrator
    itself imports nothing heavy)."""
    code = ("import json, torch\n"
            "try:\n import triton; tv = triton.__version__\nexcept Exception as e:\n tv = None\n"
            "gpu = torch.cuda.is_available()\n"
            "print(json.dumps({'torch': torch.__version__, 'torch_cuda': torch.version.cuda, 'triton': tv,"
            " 'gpu': torch.cuda.get_device_name(0) if gpu else None,"
            " 'capability': list(torch.cuda.get_device_capability(0)) if gpu else None}))\n")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-2000:]}
    except (subprocess.TimeoutExpired, ValueError, IndexError, OSError) as e:
        return {"error": f"{type(e).__name__}: {e}"}


def find_sanitizer() -> Optional[str]:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and Path(home, "bin", "compute-sanitizer").exists():
            return str(Path(home, "bin", "compute-sanitizer"))
    return None


def bench_names() -> list[str]:
    return sorted(p.stem for p in (REPO / "benchmarks").glob("bench_*.py"))


def has_module(python: str, name: str) -> bool:
    """Whether ``python`` can find the module (without importing it)."""
    if python == sys.executable:
        return importlib.util.find_spec(name) is not None
    code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({name!r}) else 1)"
    return subprocess.run([python, "-c", code], timeout=60, cwd=REPO).returncode == 0


def plan(args, run_dir: Path, machine: dict, python: str = sys.executable) -> list[Stage]:
    """The stage list for this run (``args.dry_run``: the CPU variant)."""
    dry = args.dry_run
    cap = machine.get("capability")
    stages = []

    build_env = {}
    if not dry:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and cap:
            build_env["TORCH_CUDA_ARCH_LIST"] = f"{cap[0]}.{cap[1]}"
        if not os.environ.get("MAX_JOBS"):
            build_env["MAX_JOBS"] = str(os.cpu_count() or 1)
        build_env.setdefault("I2V_KERNELS_CUDA", os.environ.get("I2V_KERNELS_CUDA", "1"))
    # info.txt and info.json land in the run folder
    info = [Step([python, "-c", "import i2v_kernels._C"]),
            Step(["/bin/sh", "-c", f'cd "{run_dir}" && "{python}" -m i2v_kernels info > info.txt && cat info.txt && '
                                   f'"{python}" -m i2v_kernels info --json > info.json'])]
    build_steps = info if dry else [Step([python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
                                         env=build_env)] + info
    stages.append(Stage("build", STAGE_CAPS["build"],
                        "import check and info only (dry run: no build)" if dry else
                        f"pip install -e . ({', '.join(f'{k}={v}' for k, v in build_env.items())}), import, info",
                        build_steps, parse=parse_build))

    junit = str(run_dir / "pytest-junit.xml")
    test_argv = [python, "-m", "pytest", "-m", "needs_cuda", "tests/test_adaln.py" if dry else "tests",
                 "-q", "-rfE", "--durations=15", f"--junitxml={junit}", "-p", "no:cacheprovider"]
    if not dry and has_module(python, "xdist"):
        test_argv += ["-n", str(TESTS_WORKERS)]
    stages.append(Stage("tests", STAGE_CAPS["tests"], "pytest -m needs_cuda", [Step(test_argv)], parse=parse_tests))

    smoke = [python, "tools/gpu_smoke.py"] + (["--dry-run"] if dry else ["--device", "cuda"])
    stages.append(Stage("smoke", STAGE_CAPS["smoke"], "tools/gpu_smoke.py against the torch reference",
                        [Step(smoke + ["--jobs", str(1 if dry else SMOKE_JOBS), "--json", str(run_dir / "smoke.json")])],
                        parse=parse_smoke("smoke.json")))

    sanitizer = find_sanitizer()
    san_argv = [sanitizer or "compute-sanitizer", "--tool", "memcheck", "--error-exitcode", str(SANITIZER_EXIT),
                "--report-api-errors", "no", "--print-limit", "100", "--target-processes", "all"]
    planted = san_argv + smoke + ["--plant-oob", "--jobs", "2"]
    san_argv += smoke + ["--jobs", str(SANITIZER_JOBS), "--json", str(run_dir / "smoke-sanitizer.json")]
    skip = ("dry run: compute-sanitizer needs a GPU" if dry else
            None if sanitizer else "compute-sanitizer not found on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin")
    # Without the caching allocator every tensor is its own cudaMalloc: memcheck then sees an access
    # past a tensor's end instead of into its neighbour in the same cached block. First a self-check:
    # a planted out-of-bounds read in two child processes must be reported (exit SANITIZER_EXIT).
    no_caching = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    stages.append(Stage("sanitizer", STAGE_CAPS["sanitizer"], "compute-sanitizer --tool memcheck over the smoke script",
                        [Step(planted, env=no_caching, ok_codes=(SANITIZER_EXIT,)), Step(san_argv, env=no_caching)],
                        skip_reason=skip,
                        parse=parse_sanitizer))

    # the run's start to the second (benchmark rows carry their run's start, to the second)
    marks = {"offsets": {}, "started": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)}
    for name in bench_names():
        family = name[len("bench_"):]
        argv = [python, "-m", f"benchmarks.{name}"] + (["--device", "cpu", "--quick", "--no-save"] if dry else
                                                       ["--device", "cuda", "--quick"])
        skip = None if name in STAGE_CAPS else "no cap in tools/gpu_check.py STAGE_CAPS: add one to run it here"
        missing = [m for m in BENCH_NEEDS.get(name, ()) if skip is None and not has_module(python, m)]
        if missing:
            skip = f"{', '.join(missing)} not importable by {python}"
        jsonl = RESULTS_DIR / f"{family}.jsonl"
        marks["offsets"][family] = jsonl.stat().st_size if jsonl.exists() else 0
        stages.append(Stage(name, STAGE_CAPS.get(name, 0), " ".join(argv[1:]), [Step(argv)], skip_reason=skip,
                            parse=parse_bench(family, marks)))

    if args.stages:
        wanted = set(args.stages.split(","))
        unknown = wanted - {s.name for s in stages}
        if unknown:
            sys.exit(f"gpu_check: unknown stage(s) {', '.join(sorted(unknown))}; known: {', '.join(s.name for s in stages)}")
        for s in stages:
            if s.name not in wanted and s.skip_reason is None:
                s.skip_reason = "not in --stages"
    return stages


# --------------------------------------------------------------------------------------------------
# Machine facts, summary, tarball


def _cmd(argv, timeout=20) -> Optional[str]:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def machine_facts(python: str) -> dict:
    facts = probe(python)
    smi = _cmd(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    facts["nvidia_smi"] = smi
    # GPU_CHECK_GIT_SHA first: a tree copied to a GPU machine may carry no .git, or a stale one
    given = os.environ.get("GPU_CHECK_GIT_SHA")
    sha = given or _cmd(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    dirty = not given and _cmd(["git", "status", "--porcelain", "--untracked-files=no"])
    facts["git"] = sha + (" (uncommitted changes)" if dirty else "")
    facts["python"] = f"{python} ({sys.version.split()[0]})" if python == sys.executable else python
    facts["cores"] = os.cpu_count()
    facts["host"] = os.uname().nodename
    return facts


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def default_run_dir(facts: dict, dry: bool) -> Path:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    tag = f"dryrun-cpu-{date}" if dry else f"gpu-{slug(facts.get('gpu') or 'unknown')}-{date}"
    base = REPO / "gpu-check" / tag
    path, n = base, 2
    while path.exists():
        path, n = Path(f"{base}-{n}"), n + 1
    return path


def render_summary(stages: list[Stage], facts: dict, run_dir: Path, tarball: Path, total_s: float, dry: bool) -> str:
    rel = lambda p: (os.path.relpath(p, REPO) if Path(p).resolve().is_relative_to(REPO) else str(p)) if p else "-"
    lines = [f"# make gpu-check{' --dry-run (CPU, no GPU)' if dry else ''}: "
             f"{facts.get('gpu') or 'no GPU'}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", ""]
    lines.append(f"- machine: {facts.get('nvidia_smi') or 'nvidia-smi: none'}; {facts.get('cores')} cores; "
                 f"capability {'.'.join(map(str, facts['capability'])) if facts.get('capability') else '-'}")
    lines.append(f"- torch {facts.get('torch')} (CUDA {facts.get('torch_cuda')}), triton {facts.get('triton')}, "
                 f"python {facts.get('python')}")
    lines.append(f"- git {facts.get('git')}; total {total_s:.0f} s of a {TOTAL_BUDGET_S} s budget")
    if facts.get("error"):
        lines.append(f"- probe error: {facts['error'].strip().splitlines()[-1]}")
    lines += ["", "| # | stage | status | seconds | cap (allowed) | result |", "|---|---|---|---|---|---|"]
    for i, s in enumerate(stages, 1):
        result = s.notes[0] if s.notes else (s.skip_reason or (tail(s.log, 1)[0][:120] if tail(s.log, 1) else ""))
        lines.append(f"| {i} | {s.name} | {s.status} | {s.seconds:.0f} | {s.cap_s:.0f} ({s.allowed_s:.0f}) | "
                     f"{result.replace('|', '/')} |")
    for s in stages:
        extra = s.notes[1:]
        if s.status in ("failed", "timeout") and not extra:
            extra = [f"log tail: {ln}" for ln in tail(s.log, 3)]
        if extra:
            lines += ["", f"**{s.name}**", ""]
            lines += [f"- {x}" for x in extra[:25]]
            if len(extra) > 25:
                lines.append(f"- ... {len(extra) - 25} more in {rel(s.log)}")
    heads = [(s.name, s.headline) for s in stages if s.headline]
    if heads:
        lines += ["", "## Benchmark headlines (best baseline vs `auto`, else our fastest backend; ratio > 1: ours faster)", "",
                  "| op | shape | dtype | best baseline | ours | ratio |", "|---|---|---|---|---|---|"]
        for name, rows in heads:
            lines.append(f"| **{name}** | | | | | |")
            lines += rows
    caches = sorted((run_dir / "dispatch-cache").glob("*.json")) if (run_dir / "dispatch-cache").exists() else []
    for c in caches:
        try:
            n = len(json.loads(c.read_text()).get("decisions", []))
        except (ValueError, OSError, AttributeError):
            n = "?"
        lines.append(f"\nMeasured dispatch table: {rel(c)} ({n} decisions)")
    lines += ["", "## Where everything is", "",
              f"- this folder: `{rel(run_dir)}/`: `SUMMARY.md`, `stages.json` (the table above as data), "
              "`machine.json`, `info.txt`/`info.json`, `pytest-junit.xml`, `smoke.json` and `smoke-sanitizer.json` "
              "(one record per case and backend), `logs/NN-<stage>.log` (every command's output), `results/` (this "
              "run's benchmark tables, plots and jsonl rows), `dispatch-cache/` (the measured `auto` decisions)",
              f"- benchmark files also updated in place under `benchmarks/results/` (tables overwritten, rows appended)",
              f"- tarball of this folder and `benchmarks/results/`: `{rel(tarball)}`"]
    if not dry:
        lines.append(f"- to commit this run: copy this folder to `benchmarks/results/{run_dir.name}/`")
    return "\n".join(lines) + "\n"


def collect_results(run_dir: Path, since: float) -> None:
    """Copy the benchmark tables and plots written during the run into ``run_dir/results``."""
    if not RESULTS_DIR.exists():
        return
    for p in RESULTS_DIR.iterdir():
        if p.is_file() and p.suffix in (".md", ".png") and p.stat().st_mtime >= since and p.name != "README.md":
            (run_dir / "results").mkdir(exist_ok=True)
            shutil.copy2(p, run_dir / "results" / p.name)


def make_tarball(run_dir: Path) -> Path:
    tarball = run_dir.parent / f"{run_dir.name}.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(run_dir, arcname=run_dir.name)
        if RESULTS_DIR.exists():
            tar.add(RESULTS_DIR, arcname=f"{run_dir.name}/benchmarks-results")
    return tarball


def stage_table() -> str:
    rows = [f"{name:<18} {cap:>4} s" for name, cap in STAGE_CAPS.items()]
    rows.append(f"{'(summary reserve)':<18} {SUMMARY_RESERVE_S:>4} s")
    rows.append(f"{'total':<18} {sum(STAGE_CAPS.values()) + SUMMARY_RESERVE_S:>4} s of {TOTAL_BUDGET_S} s")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python tools/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="no GPU: prove the wiring on the CPU (see above)")
    p.add_argument("--out", default=None, help="run folder (default: gpu-check/gpu-<card>-<date>/, a new one per run)")
    p.add_argument("--stages", default=None, help="comma-separated stages to run (the others are skipped)")
    p.add_argument("--list", action="store_true", help="print the stage table with its caps and exit")
    args = p.parse_args(argv)
    if args.list:
        print(stage_table())
        return 0
    wall0, t0 = time.time(), time.monotonic()
    python = sys.executable
    facts = machine_facts(python)
    if not args.dry_run and not facts.get("gpu"):
        why = facts.get("error", "torch.cuda.is_available() is False").strip().splitlines()[-1]
        print(f"gpu-check: no CUDA GPU visible to {python} ({why}); use --dry-run for the CPU wiring check",
              file=sys.stderr)
        return 2
    run_dir = Path(args.out).resolve() if args.out else default_run_dir(facts, args.dry_run)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "machine.json").write_text(json.dumps(facts, indent=1))
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg",
               I2V_KERNELS_CACHE_DIR=str(run_dir / "dispatch-cache"))
    stages = plan(args, run_dir, facts, python)
    print(f"gpu-check: {facts.get('gpu') or 'CPU dry run'}; run folder {run_dir}; "
          f"budget {TOTAL_BUDGET_S} s", flush=True)
    spent = time.monotonic() - t0
    run_stages(stages, run_dir, total_s=TOTAL_BUDGET_S - spent, env=env,
               echo=lambda s: print(s, flush=True))
    collect_results(run_dir, wall0)
    (run_dir / "stages.json").write_text(json.dumps(
        [{"stage": s.name, "status": s.status, "seconds": round(s.seconds, 1), "cap_s": s.cap_s,
          "allowed_s": round(s.allowed_s, 1), "returncode": s.returncode, "skip_reason": s.skip_reason,
          "log": os.path.relpath(s.log, run_dir) if s.log else None, "notes": s.notes} for s in stages], indent=1))
    tarball = run_dir.parent / f"{run_dir.name}.tar.gz"
    summary = render_summary(stages, facts, run_dir, tarball, time.monotonic() - t0, args.dry_run)
    (run_dir / "SUMMARY.md").write_text(summary)
    make_tarball(run_dir)
    print("\n" + summary)
    bad = [s.name for s in stages if s.status in ("failed", "timeout", "interrupted")]
    if bad:
        print(f"gpu-check: {len(bad)} stage(s) failed or hit their cap: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
