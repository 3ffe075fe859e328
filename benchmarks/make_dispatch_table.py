"""Regenerate the static dispatch table from measured benchmark rows:
``python -m benchmarks.make_dispatch_table [--results DIR] [--out FILE]``.

``auto`` measures on the user's device; when it may not (``I2V_KERNELS_TUNE=0``, ``torch.compile``
tracing, CUDA-graph capture) the static table ``i2v_kernels/_static_table.py`` answers. This script
writes that table from ``benchmarks/results/*.jsonl``:

1. keep the correct, timed rows of the backends ``auto`` can dispatch to (every backend of
   ``i2v_kernels._backend.BACKENDS`` but the ``torch`` reference: ``cuda``, ``triton``, ``cpu``,
   ``native``, ``flash_attn``, ...; forced with ``use_backend`` in the benchmarks);
2. per (device, case) keep the latest run only; a run without a ``native`` row is left out (it was
   measured before ``native`` existed, so it cannot say whether a kernel beats stock PyTorch);
3. map each case to the dispatcher's key -- ``(op, device type, dtype, flags, sizes)`` from the op
   module's ``dispatch_features`` -- and take the fastest backend (when two devices give the same key,
   the later run wins);
4. merge with the hand-written entries below (from the first H200 run, whose rows are not in the
   results files): measured entries replace every fallback entry of the same op, device type, dtype
   and flags.

Cases with no single dispatch key (``factorized`` attention, model-level rows) are not used.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional, Sequence

from benchmarks import utils

OUT = utils.REPO_ROOT / "i2v_kernels" / "_static_table.py"

FALLBACK_SOURCE = (
    "the first H200 run (shared/gpu-results/h200-2026-12-04: bench_attention, bench_adaln and bench_conv3d; "
    "torch 2.11, triton 3.6), transcribed by hand from its tables before `native` existed: eager/SDPA stood "
    "in for it. Spatial, dense and cross attention lost to SDPA at every shape (so `native`), Triton temporal "
    "attention won at T <= 32 and lost at T = 49, the CUDA adaLN kernels beat the Triton ones and eager at "
    "every row, and the CUDA causal conv3d was 0.95-0.98x of `cat` + cuDNN (so `native`)"
)
_ATTN = (0, 0, "none", "none")  # non-causal, no kv_lens, no QK-norm, no RoPE
FALLBACK = [
    ("spatial_attention", "cuda", "bfloat16", _ATTN, (512, 256, 256, 72), "native"),
    ("spatial_attention", "cuda", "bfloat16", _ATTN, (1248, 1350, 1350, 64), "native"),
    ("spatial_attention", "cuda", "bfloat16", _ATTN, (840, 1560, 1560, 128), "native"),
    ("spatial_attention", "cuda", "bfloat16", _ATTN, (64, 1024, 1024, 64), "native"),
    ("spatial_attention", "cuda", "bfloat16", _ATTN, (64, 4096, 4096, 128), "native"),
    ("temporal_attention", "cuda", "bfloat16", _ATTN, (8192, 16, 16, 72), "triton"),
    ("temporal_attention", "cuda", "bfloat16", _ATTN, (129600, 13, 13, 64), "triton"),
    ("temporal_attention", "cuda", "bfloat16", _ATTN, (62400, 21, 21, 128), "triton"),
    ("temporal_attention", "cuda", "bfloat16", _ATTN, (65536, 8, 8, 64), "triton"),
    ("temporal_attention", "cuda", "bfloat16", _ATTN, (65536, 16, 16, 64), "triton"),
    ("temporal_attention", "cuda", "bfloat16", _ATTN, (65536, 32, 32, 64), "triton"),
    ("temporal_attention", "cuda", "bfloat16", _ATTN, (65536, 49, 49, 64), "native"),
    ("attention", "cuda", "bfloat16", _ATTN, (32, 4096, 4096, 72), "native"),
    ("attention", "cuda", "bfloat16", _ATTN, (96, 17550, 17550, 64), "native"),
    ("attention", "cuda", "bfloat16", _ATTN, (32, 4096, 120, 72), "native"),
    ("attention", "cuda", "bfloat16", _ATTN, (96, 17550, 226, 64), "native"),
    ("attention", "cuda", "bfloat16", _ATTN, (40, 32760, 512, 128), "native"),
    ("adaln_modulate", "cuda", "bfloat16", ("sample",), (35100, 3072), "cuda"),
    ("adaln_modulate", "cuda", "bfloat16", ("frame",), (35100, 3072), "cuda"),
    ("gated_residual_adaln", "cuda", "bfloat16", ("sample",), (35100, 3072), "cuda"),
    ("gated_residual", "cuda", "bfloat16", ("sample",), (35100, 3072), "cuda"),
    ("rms_norm", "cuda", "bfloat16", ("none",), (35100, 3072), "cuda"),
]

_ATTENTION_MODES = {"spatial": (0, "spatial_attention"), "temporal": (1, "temporal_attention"),
                    "dense": (2, "attention"), "cross": (2, "attention")}
_ADALN_OPS = ("adaln_modulate", "gated_residual_adaln", "gated_residual", "rms_norm")


# --------------------------------------------------------------------------------------------------
# Rows -> dispatch keys


def device_type(row: dict) -> str:
    """``cpu`` for CPU runs (``cpu: <model>, <N> threads``), ``cuda`` for a GPU's name."""
    return "cpu" if row["device"].startswith("cpu") else "cuda"


def dispatch_key(row: dict) -> Optional[tuple]:
    """``(op, device type, dtype, flags, sizes)`` the dispatcher uses for a benchmark case, or None for a
    case that is not one call of one op."""
    op, shape = row["op"], row["shape"]
    dims = tuple(shape["dims"])
    if op in _ATTENTION_MODES:
        from i2v_kernels.ops import attention

        mode, name = _ATTENTION_MODES[op]
        if op == "dense":  # [B, T, S, H, D] attended as one sequence of T*S tokens
            B, T, S, H, D = dims
            q = k = (B, T * S, H, D)
        elif op == "cross":  # [B, N, H, D] against M text tokens
            q = dims
            k = (dims[0], shape["M"], *dims[2:])
        else:
            q = k = dims
        flags, sizes = attention.dispatch_features(mode, q, k, False, False, None, False, "interleaved")
    elif op in _ADALN_OPS:
        from i2v_kernels.ops import adaln

        mod = None if op == "rms_norm" else tuple(shape["modulation"])
        gate = mod if op.startswith("gated") else None
        shift_scale = None if op == "gated_residual" else mod
        flags, sizes = adaln.dispatch_features(dims, [gate, shift_scale, shift_scale])
        name = op
    elif op == "qk_norm_rope":
        from i2v_kernels.ops import qk_norm_rope

        norm = shape["qk_norm"]
        flags, sizes = qk_norm_rope.dispatch_features(dims, norm, True, norm == "layer", True, shape["rope_style"])
        name = qk_norm_rope.OP
    elif op == "causal_conv3d":
        from i2v_kernels.ops import conv3d

        weight = (shape["Cout"], shape["Cin"], *shape["kernel"])
        cached = shape["time_pad"] == "cache"
        flags, sizes = conv3d.dispatch_features(dims, weight, (1, 1, 1), (1, 1, 1),
                                                "zeros" if cached else shape["time_pad"], cached, False, True)
        name = op
    else:
        return None
    return name, device_type(row), row["dtype"], _tuples(flags), tuple(sizes)


def _tuples(x):
    """Lists (from JSON or a shape) as tuples, recursively: the dispatcher compares flags with ``==``."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _case(row: dict) -> tuple:
    return row["op"], row["shape"]["label"], tuple(row["shape"]["dims"]), row["dtype"]


# --------------------------------------------------------------------------------------------------
# Choosing


BENCH_ROW_KEYS = ("op", "provider", "device", "timestamp")


def load_rows(paths: Iterable[Path]) -> list[dict]:
    rows = []
    for path in paths:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    print(f"{path}:{n}: skipped, not JSON ({e})", file=sys.stderr)
                    continue
                if not isinstance(row, dict) or not all(k in row for k in BENCH_ROW_KEYS):
                    continue  # not a benchmark row (diffusers_upstream_tests.jsonl holds test outcomes)
                row["results_file"] = path.name
                rows.append(row)
    return rows


def latest_runs(rows: Sequence[dict]) -> dict[tuple, list[dict]]:
    """``(device, case) -> the rows of the latest run`` (a run's rows share its start timestamp)."""
    runs: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        runs[(r["device"], _case(r))][r["timestamp"]].append(r)
    return {key: by_time[max(by_time)] for key, by_time in runs.items()}


def dispatchable() -> tuple[str, ...]:
    """The backends ``auto`` may choose: all but the fp32 reference."""
    from i2v_kernels import _backend

    return tuple(b for b in _backend.BACKENDS if b != "torch")


# bench_attention's eager provider (`torch`) rearranges q, k, v into contiguous [batch, H, seq, D] copies
# and calls SDPA -- exactly what the `native_packed` backend computes -- for these cases (its cross
# attention takes strided views, as `native` does). Runs from before `native_packed` existed measured
# it only through that row, so it stands in for the backend (without our op's call overhead).
PACKED_PROXY = {"spatial", "temporal", "dense"}


def _as_backend(r: dict) -> dict:
    if r["provider"] == "torch" and r.get("op") in PACKED_PROXY and r.get("results_file", "").endswith("attention.jsonl"):
        return {**r, "provider": "native_packed"}
    return r


def _timed(run: Sequence[dict]) -> list[dict]:
    """The correct, timed rows of dispatchable backends, fastest first."""
    if not any(r["provider"] == "native_packed" for r in run):  # a run that timed the backend itself needs no proxy
        run = [_as_backend(r) for r in run]
    ok = [r for r in run if r["provider"] in dispatchable() and r["status"] == "ok" and r.get("correct") and r.get("ms")]
    return sorted(ok, key=lambda r: r["ms"])


def choose(run: Sequence[dict]) -> Optional[dict]:
    """The fastest correct dispatchable row of one run of one case; None when the run has no ``native``
    row or no correct timed row."""
    if not any(r["provider"] == "native" for r in run):
        return None
    timed = _timed(run)
    return timed[0] if timed else None


def measured_entries(rows: Sequence[dict]) -> list[dict]:
    """One entry per dispatch key: the fastest backend of the latest run that measured it."""
    entries: dict[tuple, dict] = {}
    for (device, _), run in latest_runs(rows).items():
        key = dispatch_key(run[0])
        best = choose(run)
        if key is None or best is None:
            continue
        times = [(r["provider"], r["ms"]) for r in _timed(run)]
        entry = {"key": key, "backend": best["provider"], "device": device, "timestamp": best["timestamp"],
                 "label": best["shape"]["label"], "bench_op": best["op"], "times": times,
                 "file": best.get("results_file", "?")}
        old = entries.get(key)
        if old is None or entry["timestamp"] > old["timestamp"]:
            entries[key] = entry
    return list(entries.values())


def merge(measured: Sequence[dict], fallback: Sequence[tuple] = FALLBACK) -> list[dict]:
    """Measured entries, plus the fallback entries of every (op, device type, dtype, flags) that no
    measured entry covers."""
    covered = {e["key"][:4] for e in measured}
    kept = [{"key": (op, dev, dt, _tuples(flags), tuple(sizes)), "backend": backend, "fallback": True}
            for op, dev, dt, flags, sizes, backend in fallback if (op, dev, dt, _tuples(flags)) not in covered]
    order = {op: i for i, op in enumerate(("spatial_attention", "temporal_attention", "attention", "qk_norm_rope",
                                           *_ADALN_OPS, "causal_conv3d"))}
    return sorted([*measured, *kept], key=lambda e: (order.get(e["key"][0], 99), e["key"][1], e["key"][2],
                                                     repr(e["key"][3]), e["key"][4]))


# --------------------------------------------------------------------------------------------------
# Writing


def render(entries: Sequence[dict], files: Sequence[Path]) -> str:
    measured = [e for e in entries if not e.get("fallback")]
    if measured:
        names = ", ".join(f"benchmarks/results/{name}" for name in sorted({e["file"] for e in measured}))
        where = "; ".join(f"{dev} ({day})" for dev, day in sorted({(e["device"], e["timestamp"][:10]) for e in measured}))
        source = f"measured rows of {names} -- {where}"
    else:
        names = ", ".join(f"benchmarks/results/{p.name}" for p in files) or "no results files"
        source = f"no measured rows with a `native` row in {names}"
    fallback = ("" if all(not e.get("fallback") for e in entries) else
                f" Entries marked `fallback` come from {FALLBACK_SOURCE}.")
    lines = [
        '"""Static dispatch defaults: what ``auto`` runs when it may not measure (``I2V_KERNELS_TUNE=0``,',
        "``torch.compile`` tracing, CUDA-graph capture) and has no cached decision for the key.",
        "",
        "Each entry is ``(op, device type, dtype, flags, sizes, backend)`` with the flags and sizes of the op's",
        "``dispatch_features``; a call takes the entry with equal op, device type, dtype and flags whose sizes",
        "are nearest (log2 distance, within a factor of 8 in all); with none near, ``native`` runs.",
        "",
        "Generated by ``python -m benchmarks.make_dispatch_table`` (do not edit by hand): the fastest backend",
        "of the latest run of each benchmark case that had a ``native`` row.",
        "",
        *_wrap(f"Source: {source}.{fallback}", 100),
        '"""',
        "",
        "TABLE = [",
    ]
    previous = None
    for e in entries:
        op, dev, dt, flags, sizes = e["key"]
        if e.get("fallback"):
            if previous is None or not previous.get("fallback") or previous["key"][0] != op:
                lines.append(f"    # {op}: fallback (the first H200 run, by hand)")
        else:
            times = ", ".join(f"{b} {ms:.4g}" for b, ms in e["times"])
            lines += _wrap(f"{e['bench_op']} {e['label']} on {e['device']}, {e['timestamp'][:10]}: {times} ms",
                           96, prefix="    # ")
        lines.append(f"    ({op!r}, {dev!r}, {dt!r}, {flags!r}, {sizes!r}, {e['backend']!r}),")
        previous = e
    lines.append("]")
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int, prefix: str = "") -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(prefix) + len(line) + 1 + len(word) > width:
            lines.append(prefix + line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + [prefix + line] if line else lines


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.make_dispatch_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=utils.RESULTS_DIR, help="folder of <family>.jsonl files")
    p.add_argument("--out", type=Path, default=OUT, help="the table module to write")
    args = p.parse_args(argv)
    files = sorted(args.results.glob("*.jsonl"))
    measured = measured_entries(load_rows(files))
    entries = merge(measured)
    args.out.write_text(render(entries, files))
    n_fallback = sum(1 for e in entries if e.get("fallback"))
    print(f"wrote {args.out}: {len(entries)} entries ({len(measured)} measured, {n_fallback} fallback)")
    for e in measured:
        op, dev, dt, flags, sizes = e["key"]
        print(f"  {op:<20} {dev:<4} {dt:<8} {flags} {sizes} -> {e['backend']}  ({e['label']}, {e['device']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
