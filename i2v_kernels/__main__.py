"""``python -m i2v_kernels info``: versions, build, GPU, the usable backends and the dispatch decisions.

``python -m i2v_kernels tune SCRIPT [ARGS...]`` runs a Python script (your model or pipeline call on
the shapes you serve) with measuring on, so every op key it reaches is timed once and saved to the
dispatch cache; later processes on this machine start tuned. ``python -m i2v_kernels tune --clear``
deletes this environment's cache file.
"""

from __future__ import annotations

import argparse
import json
import sys


def format_info(data: dict) -> str:
    lines = [
        f"i2v-kernels {data['i2v_kernels']}  (python {data['python']})",
        f"torch       {data['torch']}  (CUDA {data['torch_cuda'] or 'none'})",
        f"triton      {data['triton'] or 'not installed'}" + ("  [TRITON_INTERPRET=1]" if data["triton_interpret"] else ""),
    ]
    gpu = data["gpu"]
    lines.append("gpu         " + (f"{gpu['name']} (sm {gpu['capability']}, {gpu['memory_gib']} GiB) x{gpu['count']}" if gpu else "none visible"))
    build = data["build"]
    if "error" in build:
        lines.append(f"build       {build['error']}")
    else:
        cuda = f"CUDA kernels for {build['arch_list']}" if build["cuda_kernels"] else f"no CUDA kernels ({build['cuda_skipped_because']})"
        lines.append(f"build       torch {build['built_with_torch']}; {cuda}")
    lines.append(f"requested   {data['requested_backend']}")
    lines.append("backends")
    for name, state in data["backends"].items():
        lines.append(f"  {name:<13} " + ("usable" if state["usable"] else f"unusable: {state['why_not']}"))
    for fb in data["fallbacks"]:
        lines.append(f"ineligible  {fb['op']}: {fb['backend']} {fb['count']}x ({fb['reason']})")
    tuning = data["tuning"]
    lines.append(f"dispatch    auto {'measures' if tuning['measure'] else 'does not measure (I2V_KERNELS_TUNE=0)'}; "
                 f"cache {tuning['cache_file']}")
    for d in data["dispatch"]:
        times = d.get("times_ms") or {}
        timing = ", ".join(f"{b} {t:.4g} ms" for b, t in sorted(times.items(), key=lambda kv: kv[1]))
        lines.append(f"  {d['key']} -> {d['backend']} [{d['source']}]" + (f"  ({timing})" if timing else ""))
    return "\n".join(lines)


def _tune(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m i2v_kernels tune",
                                     description="measure the dispatch of every op a script reaches")
    parser.add_argument("script", nargs="?", help="a Python file that runs your model or pipeline")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    parser.add_argument("--clear", action="store_true", help="delete this environment's dispatch cache first")
    args = parser.parse_args(argv)
    import os
    import runpy

    from i2v_kernels import _dispatch

    if args.clear:
        _dispatch.clear(disk=True)
        print(f"cleared {_dispatch.cache_file()}")
    if args.script is None:
        return 0 if args.clear else parser.error("give a script to run (or --clear)")
    if not os.path.isfile(args.script):
        parser.error(f"script {args.script!r} does not exist")
    saved_argv = sys.argv
    sys.argv = [args.script, *args.args]
    try:
        made = _dispatch.tune(runpy.run_path, args.script, run_name="__main__")
    finally:
        sys.argv = saved_argv
    print(f"{len(made)} new decision(s) saved to {_dispatch.cache_file()}")
    for d in made:
        times = ", ".join(f"{b} {t:.4g} ms" for b, t in sorted(d["times_ms"].items(), key=lambda kv: kv[1]))
        print(f"  {d['key']} -> {d['backend']}  ({times})")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["tune"]:
        return _tune(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m i2v_kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="info", choices=["info", "tune"])
    parser.add_argument("--json", action="store_true", help="print the raw dict as JSON")
    args = parser.parse_args(argv)
    from i2v_kernels import info

    data = info()
    print(json.dumps(data, indent=2, default=str) if args.json else format_info(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
