"""``python -m i2v_kernels info``: versions, build, GPU and the usable backends."""

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m i2v_kernels", description=__doc__)
    parser.add_argument("command", nargs="?", default="info", choices=["info"])
    parser.add_argument("--json", action="store_true", help="print the raw dict as JSON")
    args = parser.parse_args(argv)
    from i2v_kernels import info

    data = info()
    print(json.dumps(data, indent=2, default=str) if args.json else format_info(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
