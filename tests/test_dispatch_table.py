"""benchmarks/make_dispatch_table.py turns results rows into the static dispatch table (CPU only, no timing)."""

import json
import runpy

import pytest
import torch

from benchmarks import make_dispatch_table
from i2v_kernels import _backend, _dispatch
from i2v_kernels.ops import attention, conv3d, qk_norm_rope

H200 = "NVIDIA H200"
CPU = "cpu: Some CPU, 2 threads"
OLD, NEW = "2026-12-04T15:30:14+00:00", "2026-12-05T10:00:00+00:00"


def _row(op, label, dims, provider, ms, *, device=H200, timestamp=NEW, dtype="bfloat16", status="ok",
         correct=True, **shape):
    return {"op": op, "provider": provider, "shape": {"label": label, "dims": list(dims), **shape}, "dtype": dtype,
            "device": device, "timestamp": timestamp, "status": status, "correct": correct if status == "ok" else False,
            "ms": ms if status == "ok" else None, "kind": "ours"}


def _case(op, label, dims, times, **kw):
    return [_row(op, label, dims, provider, ms, **kw) for provider, ms in times.items()]


COG = (2, 13, 1350, 48, 64)
LATTE = (2, 16, 256, 16, 72)
T49 = (1, 49, 4096, 16, 64)
CONV = dict(Cin=384, Cout=384, kernel=[3, 3, 3], time_pad="cache")


def _rows():
    rows = []
    # spatial, from a run without a `native_packed` row: bench_attention's eager row (packed copies + SDPA)
    # stands in for that backend, and is fastest
    rows += _case("spatial", "cogvideox-5b", COG, {"torch": 2.3, "native": 2.4, "triton": 2.9, "auto": 2.4})
    # dense, from a run that timed `native_packed` itself: eager is then no backend, and native wins
    rows += _case("dense", "latte-xl", LATTE, {"torch": 0.40, "native": 0.43, "native_packed": 0.45, "triton": 2.3})
    # temporal at Latte: an older run preferred native, the latest prefers triton
    rows += _case("temporal", "latte-xl", LATTE, {"native": 0.2, "triton": 0.3}, timestamp=OLD)
    rows += _case("temporal", "latte-xl", LATTE, {"native": 0.30, "triton": 0.08, "cuda": 0.19})
    # a run from before `native` existed: left out, whatever it says
    rows += _case("temporal", "sweep-T49", T49, {"triton": 0.5, "cuda": 4.0})
    # cross attention against 226 text tokens: flash_attn (outside) fastest; the SDPA baseline does not count
    rows += _case("cross", "cogvideox-5b", (2, 17550, 48, 64), {"sdpa-cudnn": 0.30, "native": 0.35, "flash_attn": 0.33,
                                                                 "triton": 0.55}, M=226)
    # CPU adaLN: native is faster but wrong, so the C++ kernel is chosen
    rows += _case("adaln_modulate", "latte per-sample", (2, 4096, 1152), {"cpu": 1.0, "torch": 2.0},
                  device=CPU, dtype="float32", modulation=[2, 1, 1152])
    rows.append(_row("adaln_modulate", "latte per-sample", (2, 4096, 1152), "native", None, device=CPU,
                     dtype="float32", status="wrong", modulation=[2, 1, 1152]))
    # causal conv3d with a cache: native
    rows += _case("causal_conv3d", "wan-mid-chunk", (1, 384, 1, 60, 104), {"native": 0.11, "cuda": 0.16}, **CONV)
    # QK-norm + RoPE on CogVideoX-5B's heads: the Triton kernel; eager is not a backend
    rows += _case("qk_norm_rope", "cogvideox-5b", (2, 17550, 48, 64), {"torch": 0.9, "native": 0.5, "triton": 0.2},
                  qk_norm="layer", rope_style="interleaved")
    # a case with no single dispatch key
    rows += _case("factorized", "latte-xl", LATTE, {"native": 0.4, "triton": 0.3})
    return rows


def _generate(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    with open(results / "attention.jsonl", "w") as f:
        for r in _rows():
            f.write(json.dumps(r) + "\n")
        f.write("not json\n")  # a damaged line is reported and skipped
    out = tmp_path / "table.py"
    assert make_dispatch_table.main(["--results", str(results), "--out", str(out)]) == 0
    return out, runpy.run_path(str(out))["TABLE"]


def _lookup(table, op, device, dtype, flags, sizes):
    return _dispatch.nearest_static(table, op, torch.device(device), dtype, flags, sizes)


def test_generated_table_chooses_fastest_backend_of_latest_run(tmp_path):
    out, table = _generate(tmp_path)
    none = (0, 0, "none", "none")

    flags, sizes = attention.dispatch_features(0, COG, COG, False, False, None, False, "interleaved")
    packed = "native_packed" if "native_packed" in _backend.BACKENDS else "native"  # the proxy needs the backend
    assert _lookup(table, "spatial_attention", "cuda", torch.bfloat16, flags, sizes) == packed
    assert ("attention", "cuda", "bfloat16", none, (32, 4096, 4096, 72), "native") in table
    flags, sizes = attention.dispatch_features(1, LATTE, LATTE, False, False, None, False, "interleaved")
    assert _lookup(table, "temporal_attention", "cuda", torch.bfloat16, flags, sizes) == "triton"
    assert ("attention", "cuda", "bfloat16", none, (96, 17550, 226, 64), "flash_attn") in table
    assert ("adaln_modulate", "cpu", "float32", ("sample",), (8192, 1152), "cpu") in table
    flags, sizes = conv3d.dispatch_features((1, 384, 1, 60, 104), (384, 384, 3, 3, 3), (1, 1, 1), (1, 1, 1), "zeros",
                                            True, False, True)
    assert flags[3] == "cache"
    assert (("causal_conv3d", "cuda", "bfloat16", flags, sizes, "native")) in table
    flags, sizes = qk_norm_rope.dispatch_features((2, 17550, 48, 64), "layer", True, True, True, "interleaved")
    assert _lookup(table, "qk_norm_rope", "cuda", torch.bfloat16, flags, sizes) == "triton"
    assert "wan-mid-chunk on NVIDIA H200" in out.read_text()


def test_measured_entries_replace_fallback_of_their_group_only(tmp_path):
    _, table = _generate(tmp_path)
    keys = {entry[:5] for entry in table}
    assert len(keys) == len(table), "one entry per dispatch key"
    temporal = [e for e in table if e[0] == "temporal_attention"]
    # the measured Latte row replaced every hand-written temporal entry; the pre-native T49 run added none
    assert [e[4] for e in temporal] == [(8192, 16, 16, 72)]
    spatial = [e for e in table if e[0] == "spatial_attention"]
    assert [e[4] for e in spatial] == [(1248, 1350, 1350, 64)]
    # no adaLN rows on the GPU: the H200 fallback stays
    assert ("gated_residual", "cuda", "bfloat16", ("sample",), (35100, 3072), "cuda") in table
    assert not any(e[0] == "factorized" for e in table)


def test_without_measured_rows_the_table_is_the_fallback(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    old = _case("spatial", "cogvideox-5b", COG, {"triton": 2.9, "torch": 2.3})  # no native row
    (results / "attention.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    out = tmp_path / "table.py"
    make_dispatch_table.main(["--results", str(results), "--out", str(out)])
    table = runpy.run_path(str(out))["TABLE"]
    assert sorted(table) == sorted(make_dispatch_table.FALLBACK)


def test_static_cuda_temporal_only_in_its_measured_range():
    """The shipped table's one cuda entry (temporal, Latte-XL: T 16, D 72) reaches T = 8 or 13 at D = 64
    by the nearest-entry rule, where the kernel measured 2-6x slower than Triton: the static pick of
    cuda holds only for T 14..20, D 65..127 (attention.CUDA_TEMPORAL_STATIC_*)."""
    from i2v_kernels import _static_table

    cuda = torch.device("cuda")  # only its type is read: no GPU needed
    table_has_cuda = any(e[0] == "temporal_attention" and e[5] == "cuda" for e in _static_table.TABLE)
    if not table_has_cuda:
        pytest.skip("the shipped static table has no cuda temporal entry")
    flags, _ = attention.dispatch_features(1, (2, 16, 256, 16, 72), None, False, False, None, False, "interleaved")
    choice = lambda sizes: attention._static_choice("temporal_attention", cuda, torch.bfloat16, flags, sizes)  # noqa: E731
    assert choice((8192, 16, 16, 72)) == "cuda"
    assert choice((4096, 18, 18, 80)) == "cuda"
    raw = lambda sizes: _dispatch.nearest_static(_static_table.TABLE, "temporal_attention", cuda,  # noqa: E731
                                                 torch.bfloat16, flags, sizes)
    for sizes in ((8192, 8, 8, 64), (16384, 13, 13, 64), (8192, 32, 32, 72), (8192, 16, 16, 64)):
        if raw(sizes) == "cuda":  # the nearest-entry rule alone would run the kernel here
            assert choice(sizes) != "cuda", sizes
        else:
            assert choice(sizes) == raw(sizes), sizes
