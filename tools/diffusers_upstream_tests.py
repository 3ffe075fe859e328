"""Run diffusers' own model tests twice -- unpatched, then with ``i2v_kernels.patch()`` on every model they
build -- and compare the outcomes test by test (``make diffusers-tests DIFFUSERS_SRC=/path/to/diffusers``).

diffusers ships its tests in neither the wheel nor the sdist: point ``--src`` (or ``I2V_DIFFUSERS_TESTS``)
at a checkout of the diffusers repository (only its ``tests/`` is used; the installed diffusers is the one
tested). The plugin ``tests/diffusers_upstream/i2v_upstream_plugin.py`` does the patching and the
bookkeeping; this script picks the test files, runs pytest in the checkout for each mode, and writes

* ``--json`` (JSON lines): the run (versions, commands, the differing tests), then every test's outcome in
  each mode, the models it built and how often our code ran;
* ``--md``: the report -- versions, commands, pass/skip/fail counts per test class both ways, the tests
  whose outcome differs, why tests skip, and the tests that do not apply (:data:`NOT_APPLICABLE`).

The exit status is 1 when a test's outcome differs between the modes or a test fails patched, else 0.
diffusers' test helpers need ``accelerate`` (and ``psutil``); ``--deps DIR`` adds a directory holding
them to ``PYTHONPATH`` (the make target installs them there with ``pip install --target``).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN_DIR = os.path.join(ROOT, "tests", "diffusers_upstream")

# The test files of the models i2v_kernels.patch() knows (diffusers' tests/models/...), all their classes.
FILES = (
    "tests/models/transformers/test_models_transformer_latte.py",
    "tests/models/transformers/test_models_transformer_cogvideox.py",
    "tests/models/transformers/test_models_transformer_wan.py",
    "tests/models/transformers/test_models_transformer_ltx.py",
    "tests/models/unets/test_models_unet_spatiotemporal.py",
    "tests/models/autoencoders/test_models_autoencoder_kl_cogvideox.py",
    "tests/models/autoencoders/test_models_autoencoder_wan.py",
    "tests/models/autoencoders/test_models_autoencoder_ltx_video.py",
    "tests/models/autoencoders/test_models_autoencoder_kl_temporal_decoder.py",
)

# Test classes (by the mixin in their name) that exercise something patch() does not take part in,
# with why: they run (or skip) the same either way, and a pass there says nothing about the patch.
NOT_APPLICABLE = {
    "LoRA": "PEFT adapters: LoRA layers replace nn.Linear projections; patch() replaces processors and block "
            "forwards that call those projections as modules, so adapters act the same patched or not -- these "
            "need `peft` and skip without it",
    "SingleFile": "loading original (non-diffusers) checkpoints from the Hub: needs network, a loading path only",
    "BitsAndBytes": "bitsandbytes 4/8-bit quantized weights: CUDA and the `bitsandbytes` package",
    "TorchAo": "torchao quantized weights: a GPU and the `torchao` package",
    "GGUF": "GGUF quantized checkpoints downloaded from the Hub: network and the `gguf` package",
}


def not_applicable(nodeid: str):
    cls = nodeid.split("::")[1] if "::" in nodeid else ""
    for key, why in NOT_APPLICABLE.items():
        if key in cls:
            return key, why
    return None


def run_mode(args, patched: bool, log: str) -> tuple[list[str], float, int]:
    if os.path.exists(log):
        os.remove(log)
    env = dict(os.environ)
    env["I2V_UPSTREAM_PATCH"] = "1" if patched else "0"
    env["I2V_UPSTREAM_LOG"] = log
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PLUGIN_DIR, args.deps, ROOT, env.get("PYTHONPATH")) if p)
    cmd = ["nice", "-n", str(args.nice), sys.executable, "-m", "pytest", "-p", "i2v_upstream_plugin",
           "-p", "no:cacheprovider", "-q", "-rfE", *args.files]
    if args.k:
        cmd += ["-k", args.k]
    cmd += args.pytest_args
    print(f"== {'patched' if patched else 'unpatched'}: (cd {args.src} && {shlex.join(cmd)})", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=args.src, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - t0
    tail = proc.stdout.strip().splitlines()
    print("\n".join(tail[-3:]), flush=True)
    if proc.returncode not in (0, 1):  # 1: some tests failed (compared below); else pytest itself failed
        sys.stdout.write(proc.stdout[-6000:])
        raise SystemExit(f"pytest exited with {proc.returncode} in the {'patched' if patched else 'unpatched'} run")
    return cmd, seconds, proc.returncode


def read_log(path: str) -> tuple[dict, dict[str, dict]]:
    """The plugin's log: ``(versions, nodeid -> record)``."""
    with open(path) as f:
        lines = list(map(json.loads, f))
    session = next((r["session"] for r in lines if "session" in r), {})
    return session, {r["nodeid"]: r for r in lines if "nodeid" in r}


def test_class(nodeid: str) -> str:
    parts = nodeid.split("::")
    return f"{os.path.basename(parts[0])}::{parts[1]}" if len(parts) > 2 else os.path.basename(parts[0])


def compare(unpatched: dict[str, dict], patched: dict[str, dict]) -> dict:
    """Per-class outcome counts both ways, the tests whose outcome differs, skip reasons (with why they
    do not apply here), and the patched tests that built a model but never ran our code; on the
    records as committed (:func:`slim`)."""
    kinds = ("passed", "skipped", "failed", "error", "xfailed", "xpassed", "missing")
    per_class: dict[str, dict[str, collections.Counter]] = collections.defaultdict(
        lambda: {"unpatched": collections.Counter(), "patched": collections.Counter()})
    differ, skips, idle, ran = [], collections.defaultdict(list), [], collections.Counter()
    for nodeid in sorted(set(unpatched) | set(patched)):
        a = unpatched.get(nodeid, {"outcome": "missing", "ours": 0})
        b = patched.get(nodeid, {"outcome": "missing", "ours": 0})
        cls = test_class(nodeid)
        per_class[cls]["unpatched"][a["outcome"]] += 1
        per_class[cls]["patched"][b["outcome"]] += 1
        if a["outcome"] != b["outcome"]:
            differ.append({"nodeid": nodeid, "unpatched": a["outcome"], "patched": b["outcome"],
                           "detail": b.get("detail") or a.get("detail", "")})
        if b["outcome"] == "skipped":
            skips[(b.get("detail", ""), skip_note(b.get("detail", ""), nodeid))].append(nodeid)
        if b["outcome"] == "passed" and b.get("models") and b["ours"] == 0:
            idle.append(nodeid)
        ran[cls] += b["ours"] > 0
    totals = {mode: collections.Counter() for mode in ("unpatched", "patched")}
    for counts in per_class.values():
        for mode in totals:
            totals[mode].update(counts[mode])
    return {"kinds": kinds, "per_class": per_class, "totals": totals, "differ": differ, "skips": skips,
            "idle": idle, "ran": ran}


def slim(record: dict) -> dict:
    """A test's record as committed: outcome, detail, the models it built (class -> count), the fewest
    modules replaced on any of them, how often our code ran (and diffusers' own, when it did)."""
    out = {"outcome": record["outcome"], "ours": record["ours"]}
    if record["detail"]:
        out["detail"] = record["detail"]
    if record["built"]:
        out["models"] = dict(collections.Counter(b["class"] for b in record["built"]))
        out["replaced_min"] = min(b["replaced"] for b in record["built"])
    if record["theirs"]:
        out["theirs"] = record["theirs"]
    return out


def read_results(path: str) -> tuple[dict, dict[str, dict[str, dict]]]:
    """The results file (``--json``): its first line, and mode -> test -> record."""
    with open(path) as f:
        head, *lines = map(json.loads, f)
    tests: dict[str, dict[str, dict]] = {}
    for line in lines:
        tests.setdefault(line.pop("mode"), {})[line.pop("test")] = line
    return head, tests


def versions(args, session: dict) -> dict:
    out = dict(session)
    rev = args.src_rev
    if not rev:
        git = subprocess.run(["git", "-C", args.src, "rev-parse", "HEAD"], capture_output=True, text=True)
        rev = git.stdout.strip() if git.returncode == 0 else "unknown (not a git checkout; pass --src-rev)"
    ours = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    out.update(diffusers_tests=rev, i2v_kernels_commit=ours.stdout.strip() or "unknown",
               python=platform.python_version(), machine=f"{platform.machine()}, {os.cpu_count()} CPUs", load=_load())
    return out


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def markdown(info: dict, runs: dict, result: dict) -> str:
    kinds = [k for k in result["kinds"] if any(result["totals"][m][k] for m in result["totals"])]
    lines = [
        "# diffusers' own model tests with `i2v_kernels.patch()` applied",
        "",
        "Generated by `tools/diffusers_upstream_tests.py` (`make diffusers-tests DIFFUSERS_SRC=...`); "
        "do not edit by hand.",
        "Each test file below runs twice in the diffusers checkout: unpatched (the baseline), then with the plugin "
        "`tests/diffusers_upstream/i2v_upstream_plugin.py` patching every model the tests build, as its "
        "construction ends (`Model(...)`, `from_config`, `from_pretrained`). A patch that replaced nothing fails "
        "the test; the dispatch runs without timing (`I2V_KERNELS_TUNE=0`), so patched modules run our code.",
        "",
        "## Setup",
        "",
        f"- diffusers (installed, tested): {info.get('diffusers', '?')} from `{info.get('diffusers_path', '?')}`",
        f"- diffusers tests: {info['diffusers_tests']}",
        f"- i2v_kernels: commit {info['i2v_kernels_commit']}; torch {info.get('torch', '?')}; Python {info['python']}",
        f"- machine: {info['machine']}, GPU: {info.get('gpu', '?')}; load average at the end: {info['load']}; "
        f"date {info['date']}",
    ]
    for mode in ("unpatched", "patched"):
        lines.append(f"- {mode}: {runs[mode]['seconds']:.0f} s, `{runs[mode]['command']}`")
    lines += ["", "## Outcomes", "", "| | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for mode in ("unpatched", "patched"):
        lines.append(f"| **{mode}, all** | " + " | ".join(str(result["totals"][mode][k]) for k in kinds) + " |")
    lines += ["", "Per test class (unpatched / patched; the last column: patched tests in which our code ran):", "",
              "| test class | " + " | ".join(kinds) + " | ran ours |", "|---|" + "---|" * (len(kinds) + 1)]
    for cls, counts in sorted(result["per_class"].items()):
        cells = [f"{counts['unpatched'][k]} / {counts['patched'][k]}" for k in kinds]
        lines.append(f"| `{cls}` | " + " | ".join(cells) + f" | {result['ran'][cls]} |")
    lines += ["", "## Tests whose outcome differs", ""]
    if result["differ"]:
        lines += ["| test | unpatched | patched | detail |", "|---|---|---|---|"]
        lines += [f"| `{d['nodeid']}` | {d['unpatched']} | {d['patched']} | {d['detail']} |" for d in result["differ"]]
    else:
        lines.append("None: every test has the same outcome patched and unpatched.")
    lines += ["", "## Tests that do not apply", "",
              "Their classes test features `patch()` takes no part in; they run anyway (their outcomes are in "
              "the tables above):", ""]
    lines += [f"- `*{key}*` classes: {why}" for key, why in NOT_APPLICABLE.items()]
    lines += ["", "## Why tests skip (patched run)", "",
              "| reason (diffusers' own) | tests | does not apply here because |", "|---|---|---|"]
    for (reason, note), nodeids in sorted(result["skips"].items(), key=lambda kv: -len(kv[1])):
        lines.append(f"| {reason} | {len(nodeids)} | {note} |")
    lines += ["", "## Patched tests that built a model but never ran our code", ""]
    if result["idle"]:
        lines.append("They pass, but only check what diffusers' code does (no forward, or processors the test "
                     "set itself):")
        lines += [f"- `{n}`" for n in result["idle"]]
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def skip_note(reason: str, nodeid: str) -> str:
    """Why a test diffusers skips here does not apply to this run."""
    applies = not_applicable(nodeid)
    if applies:
        return f"not applicable: `*{applies[0]}*` class"
    if re.search(r"accelerator|cuda|gpu", reason, re.I):
        return "needs a GPU (none on this machine): unmeasured here"
    if re.search(r"peft|bitsandbytes|torchao|gguf|installed|available", reason, re.I):
        return "needs a package the i2v_kernels environment does not install"
    if re.search(r"network|hub|token|download|slow|nightly", reason, re.I):
        return "needs the network / a Hub download, or is a slow or nightly test"
    return "diffusers' test opts out for this model or config"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default=os.environ.get("I2V_DIFFUSERS_TESTS"),
                        help="diffusers checkout (default: $I2V_DIFFUSERS_TESTS)")
    parser.add_argument("--src-rev", default="", help="what the checkout is, when it is not a git work tree")
    parser.add_argument("--deps", default="", help="directory with accelerate/psutil to put on PYTHONPATH")
    parser.add_argument("--files", nargs="+", default=list(FILES), help="test files (relative to --src)")
    parser.add_argument("-k", default="", help="pytest -k selection")
    parser.add_argument("--mode", choices=("both", "patched", "unpatched"), default="both")
    parser.add_argument("--nice", type=int, default=10)
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "diffusers_upstream_tests.jsonl"))
    parser.add_argument("--md", default=os.path.join(ROOT, "docs", "diffusers_upstream_tests.md"))
    parser.add_argument("--work", default="", help="where the per-run logs go (default: next to --json)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write --md again from the results in --json")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args(argv)
    if args.report_only:
        head, tests = read_results(args.json)
        with open(args.md, "w") as f:
            f.write(markdown(head["info"], head["runs"], compare(tests["unpatched"], tests["patched"])))
        return 0
    if not args.src or not os.path.isdir(os.path.join(args.src, "tests", "models")):
        parser.error(f"--src must be a diffusers checkout with tests/models/ (got {args.src!r}); "
                     f"or set I2V_DIFFUSERS_TESTS")
    args.src = os.path.abspath(args.src)
    work = args.work or os.path.dirname(os.path.abspath(args.json))
    os.makedirs(work, exist_ok=True)
    modes = ("unpatched", "patched") if args.mode == "both" else (args.mode,)
    runs, logs = {}, {}
    for mode in modes:
        log = os.path.join(work, f"diffusers_upstream_{mode}.jsonl")
        cmd, seconds, _ = run_mode(args, mode == "patched", log)
        runs[mode] = {"command": shlex.join(cmd), "seconds": seconds}
        session, logs[mode] = read_log(log)
        os.remove(log)
    if args.mode != "both":
        counts = collections.Counter(r["outcome"] for r in logs[modes[0]].values())
        print(f"{modes[0]}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
        return 0 if not (counts["failed"] or counts["error"]) else 1
    tests = {m: {n: slim(r) for n, r in sorted(logs[m].items())} for m in modes}
    result = compare(tests["unpatched"], tests["patched"])
    info = versions(args, session)
    info["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(args.json, "w") as f:  # JSON lines: the run, then one line per test and mode
        f.write(json.dumps({"info": info, "runs": runs, "differ": result["differ"]}, sort_keys=True) + "\n")
        for mode in modes:
            for nodeid, record in tests[mode].items():
                f.write(json.dumps({"mode": mode, "test": nodeid, **record}) + "\n")
    with open(args.md, "w") as f:
        f.write(markdown(info, runs, result))
    for mode in modes:
        t = result["totals"][mode]
        print(f"{mode}: " + ", ".join(f"{t[k]} {k}" for k in result["kinds"] if t[k]))
    print(f"{len(result['differ'])} tests differ; report: {args.md}")
    bad = result["differ"] or result["totals"]["patched"]["failed"] or result["totals"]["patched"]["error"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
