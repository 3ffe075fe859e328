"""Measured dispatch (``auto``) and the ``native`` backend.

The dispatcher is driven on CPU tensors with an injected timer, so which backend is "fastest" is
set by the test: adaLN on CPU has two candidates (the C++ ``cpu`` kernel and ``native``).
"""

import json
import threading
import warnings

import pytest
import torch

import i2v_kernels
from i2v_kernels import _backend, _dispatch

from _util import TOL


def _has_cpu_kernel():
    return _backend._cpu_reason(torch.device("cpu")) is None


needs_cpp = pytest.mark.skipif(not _has_cpu_kernel(), reason="i2v_kernels._C (CPU kernels) not built")


@pytest.fixture
def tuner(monkeypatch, tmp_path):
    """Measuring on, a private cache dir, a clean decision table, and a timer whose times the test
    sets per backend (``tuner.times``); every timed backend is counted in ``tuner.calls``."""
    monkeypatch.setenv(_dispatch.TUNE_ENV, "1")
    monkeypatch.setenv(_dispatch.CACHE_ENV, str(tmp_path / "cache"))
    _dispatch.clear()

    class Tuner:
        times = {"cpu": 2.0, "native": 1.0}
        calls: list = []

        def timer(self, backend, fn, device):
            fn()
            self.calls.append(backend)
            return self.times[backend]

    t = Tuner()
    t.calls = []
    monkeypatch.setattr(_dispatch, "_timer", t.timer)
    yield t
    _dispatch.clear()


def _adaln_inputs(rows=64, C=32, dtype=torch.float32):
    x = torch.randn(2, rows, C, dtype=dtype)
    return x, torch.randn(2, 1, C, dtype=dtype), torch.randn(2, 1, C, dtype=dtype)


def _decision(op):
    return [d for d in _dispatch.decisions() if d["op"] == op]


@needs_cpp
@pytest.mark.parametrize("fast", ["cpu", "native"])
def test_picks_the_fastest_and_caches_it(tuner, fast):
    tuner.times = {"cpu": 1.0 if fast == "cpu" else 3.0, "native": 1.0 if fast == "native" else 3.0}
    x, shift, scale = _adaln_inputs()
    y = i2v_kernels.adaln_modulate(x, shift, scale)
    assert sorted(tuner.calls) == ["cpu", "native"]
    (d,) = _decision("adaln_modulate")
    assert d["backend"] == fast and d["source"] == "measured"
    assert set(d["times_ms"]) == {"cpu", "native"}
    torch.testing.assert_close(y, i2v_kernels.ops.adaln.reference.adaln_modulate(x, shift, scale), **TOL[x.dtype])
    # same key (same bucket: 60 rows round up to 64 as 64 do) -> no new measurement
    i2v_kernels.adaln_modulate(*_adaln_inputs(rows=60))
    assert len(tuner.calls) == 2
    # another bucket -> measured again
    i2v_kernels.adaln_modulate(*_adaln_inputs(rows=200))
    assert len(tuner.calls) == 4


@needs_cpp
@pytest.mark.parametrize("fast", ["cpu", "native"])
def test_conv3d_auto_runs_the_measured_fastest(tuner, fast):
    """causal_conv3d on the CPU: native (eager's padded NCDHW conv) and the C++ op are both
    candidates; auto runs the one the timer says is faster, and either matches the reference."""
    from i2v_kernels.ops.conv3d import reference as conv_ref

    tuner.times = {"cpu": 1.0 if fast == "cpu" else 3.0, "native": 1.0 if fast == "native" else 3.0}
    x, w = torch.randn(1, 4, 3, 5, 6), torch.randn(6, 4, 3, 3, 3) * 0.2
    cache = torch.randn(1, 4, 2, 5, 6)
    i2v_kernels.causal_conv3d(x, w, cache=cache)  # measured in the first call
    tuner.calls.clear()
    y = i2v_kernels.causal_conv3d(x, w, cache=cache)
    assert tuner.calls == []
    (d,) = _decision("causal_conv3d")
    assert d["backend"] == fast and set(d["times_ms"]) == {"cpu", "native"}
    torch.testing.assert_close(y, conv_ref.causal_conv3d(x, w, cache=cache), **TOL[x.dtype])


@needs_cpp
def test_the_chosen_backend_runs(tuner, monkeypatch):
    """After the decision, calls run the chosen backend only (the profiler sees the C++ op or not)."""
    tuner.times = {"cpu": 5.0, "native": 1.0}
    x, shift, scale = _adaln_inputs()
    i2v_kernels.adaln_modulate(x, shift, scale)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        i2v_kernels.adaln_modulate(x, shift, scale)
    names = {e.name for e in prof.events()}
    assert "i2v_kernels::_adaln_fwd" not in names and "aten::layer_norm" in names


@needs_cpp
def test_disk_cache_is_reloaded(tuner):
    x, shift, scale = _adaln_inputs()
    i2v_kernels.adaln_modulate(x, shift, scale)
    path = _dispatch.cache_file()
    data = json.loads(path.read_text())
    assert data["environment"] == _dispatch._environment()
    assert [k for k in data["decisions"] if k.startswith("adaln_modulate|")]
    _dispatch.clear()  # a new process: memory empty, the file stays
    tuner.calls.clear()
    i2v_kernels.adaln_modulate(x, shift, scale)
    assert tuner.calls == []
    (d,) = _decision("adaln_modulate")
    assert d["source"] == "disk" and d["backend"] == "native"


@needs_cpp
def test_rebuilt_extension_starts_a_fresh_cache(tuner, monkeypatch):
    """Decisions measured on the old kernels of an editable install are not reused after a rebuild: the
    cache file is keyed by the built extension's size and modification time."""
    x, shift, scale = _adaln_inputs()
    i2v_kernels.adaln_modulate(x, shift, scale)
    identity = _dispatch._extension_identity()
    assert isinstance(identity, list) and len(identity) == 2 and identity[0] > 0
    before = _dispatch.cache_file()
    assert before.exists()
    monkeypatch.setattr(_dispatch, "_extension_identity", lambda: [identity[0], identity[1] + 1])
    after = _dispatch.cache_file()
    assert after != before and not after.exists()
    _dispatch.clear()  # a new process with the rebuilt extension: nothing measured is found
    tuner.calls.clear()
    i2v_kernels.adaln_modulate(x, shift, scale)
    assert tuner.calls and _decision("adaln_modulate")[0]["source"] != "disk"


@needs_cpp
@pytest.mark.parametrize("content", ["{not json", json.dumps({"environment": {"torch": "0.0"}, "decisions": {}}),
                                     json.dumps([1, 2, 3])], ids=["corrupt", "foreign-version", "wrong-shape"])
def test_bad_cache_file_is_ignored_with_one_warning(tuner, content):
    path = _dispatch.cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    _dispatch._warned.clear()
    x, shift, scale = _adaln_inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        i2v_kernels.adaln_modulate(x, shift, scale)
        i2v_kernels.adaln_modulate(*_adaln_inputs(rows=300))
    cache_warnings = [w for w in caught if "dispatch cache" in str(w.message)]
    assert len(cache_warnings) == 1
    assert sorted(tuner.calls) == ["cpu", "cpu", "native", "native"]  # measured despite the bad file
    assert json.loads(path.read_text())["environment"] == _dispatch._environment()  # rewritten


@needs_cpp
def test_tune_off_uses_static_and_never_measures(tuner, monkeypatch):
    monkeypatch.setenv(_dispatch.TUNE_ENV, "0")
    x, shift, scale = _adaln_inputs()
    i2v_kernels.adaln_modulate(x, shift, scale)
    assert tuner.calls == []
    (d,) = _decision("adaln_modulate")
    assert d["source"] == "static" and d["why_not_measured"] == "I2V_KERNELS_TUNE=0"
    assert d["backend"] == _dispatch.default_choice(torch.device("cpu"), ["cpu", "native"])
    # once measuring is allowed again the key is measured (a static answer is not final)
    monkeypatch.setenv(_dispatch.TUNE_ENV, "1")
    i2v_kernels.adaln_modulate(x, shift, scale)
    assert sorted(tuner.calls) == ["cpu", "native"]


@needs_cpp
@pytest.mark.parametrize("forced", ["cpu", "native", "torch"])
def test_forced_backend_is_not_measured(tuner, forced):
    x, shift, scale = _adaln_inputs()
    with i2v_kernels.use_backend(forced):
        y = i2v_kernels.adaln_modulate(x, shift, scale)
    assert tuner.calls == [] and _decision("adaln_modulate") == []
    torch.testing.assert_close(y, i2v_kernels.ops.adaln.reference.adaln_modulate(x, shift, scale), **TOL[x.dtype])


def test_measuring_forbidden_while_compiling_or_capturing(monkeypatch):
    monkeypatch.setenv(_dispatch.TUNE_ENV, "1")
    assert _dispatch._measuring_forbidden(torch.device("cpu")) is None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _dispatch._measuring_forbidden(torch.device("cpu")) == "torch.compile is tracing"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert _dispatch._measuring_forbidden(torch.device("cuda")) == "a CUDA graph is being captured"


@needs_cpp
def test_fullgraph_compile_has_no_graph_break(tuner):
    x, shift, scale = _adaln_inputs()
    q = k = v = torch.randn(1, 2, 16, 2, 8)

    def f(x, shift, scale, q, k, v):
        return i2v_kernels.adaln_modulate(x, shift, scale).sum() + i2v_kernels.spatial_attention(q, k, v).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, shift, scale, q, k, v), f(x, shift, scale, q, k, v), rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


@needs_cpp
def test_a_backend_that_raises_is_ruled_out(tuner, monkeypatch):
    """A kernel that fails on an input while being measured is never chosen for that key."""
    tuner.times = {"cpu": 1.0, "native": 2.0}

    def broken(*args, **kwargs):
        raise RuntimeError("kernel cannot take this input")

    monkeypatch.setattr(torch.ops.i2v_kernels, "_adaln_fwd", broken)
    _dispatch._warned.clear()
    x, shift, scale = _adaln_inputs()
    with pytest.warns(RuntimeWarning, match="failed while being measured"):
        y = i2v_kernels.adaln_modulate(x, shift, scale)
    torch.testing.assert_close(y, i2v_kernels.ops.adaln.reference.adaln_modulate(x, shift, scale), **TOL[x.dtype])
    (d,) = _decision("adaln_modulate")
    assert d["backend"] == "native" and "cpu" in d["failed"]


@needs_cpp
def test_thread_safe(tuner):
    """Threads hitting one new key at once measure it once and all get right answers."""
    x, shift, scale = _adaln_inputs()
    ref = i2v_kernels.ops.adaln.reference.adaln_modulate(x, shift, scale)
    errors, barrier = [], threading.Barrier(6)

    def work():
        barrier.wait()
        try:
            torch.testing.assert_close(i2v_kernels.adaln_modulate(x, shift, scale), ref, **TOL[x.dtype])
        except Exception as e:  # noqa: BLE001 -- collected and re-raised by the test
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(tuner.calls) == ["cpu", "native"]


def test_info_lists_decisions(tuner):
    q = k = v = torch.randn(1, 4, 8, 2, 16)
    i2v_kernels.temporal_attention(q, k, v)  # one CPU candidate (native): decided without timing
    data = i2v_kernels.info()
    assert data["tuning"]["measure"] is True
    assert data["tuning"]["cache_file"] == str(_dispatch.cache_file())
    from i2v_kernels.__main__ import format_info

    text = format_info(data)
    assert "dispatch    auto measures" in text


def test_bucket_and_key():
    assert [_dispatch.bucket(n) for n in (0, 1, 2, 3, 17, 64, 65)] == [0, 1, 2, 4, 32, 64, 128]
    key = _dispatch.make_key("attention", torch.device("cpu"), torch.bfloat16, (0, 1, "rms", 4096, 64))
    assert key == "attention|cpu|bfloat16|0,1,rms,4096,64"


def test_static_table_nearest():
    table = [("temporal_attention", "cuda", "bfloat16", (0, 0, "none", "none"), (65536, 16, 16, 64), "triton"),
             ("temporal_attention", "cuda", "bfloat16", (0, 0, "none", "none"), (65536, 49, 49, 64), "native")]
    cuda = torch.device("cuda")
    flags = (0, 0, "none", "none")
    pick = lambda sizes, dtype=torch.bfloat16, fl=flags: _dispatch.nearest_static(table, "temporal_attention", cuda,
                                                                                     dtype, fl, sizes)
    assert pick((50000, 13, 13, 64)) == "triton"
    assert pick((50000, 64, 64, 64)) == "native"
    assert pick((50000, 13, 13, 64), torch.float16) is None  # other dtype: no entry
    assert pick((50000, 13, 13, 64), fl=(1, 0, "none", "none")) is None  # causal: other flags
    assert pick((1 << 30, 16, 16, 64)) is None  # too far from every entry


@pytest.mark.needs_cuda
def test_gpu_auto_measures_every_op_and_stays_correct(monkeypatch, tmp_path):
    """On a GPU, auto times the eligible backends (CUDA events) of each op's first key and the answer
    matches the fp32 reference whichever won."""
    monkeypatch.setenv(_dispatch.TUNE_ENV, "1")
    monkeypatch.setenv(_dispatch.CACHE_ENV, str(tmp_path))
    _dispatch.clear()
    from i2v_kernels.ops.adaln import reference as adaln_ref
    from i2v_kernels.ops.attention import reference as attn_ref
    from i2v_kernels.ops.conv3d import reference as conv_ref

    dev, bf16 = "cuda", torch.bfloat16
    x = torch.randn(2, 512, 256, device=dev, dtype=bf16)
    shift, scale = (torch.randn(2, 1, 256, device=dev, dtype=bf16) for _ in range(2))
    torch.testing.assert_close(i2v_kernels.adaln_modulate(x, shift, scale).float(),
                               adaln_ref.adaln_modulate(x, shift, scale).float(), atol=6e-2, rtol=6e-2)
    qkv = torch.randn(1, 8, 64, 3 * 4 * 64, device=dev, dtype=bf16)
    q, k, v = qkv.view(1, 8, 64, 3, 4, 64).unbind(3)
    for fn, ref_fn in ((i2v_kernels.spatial_attention, attn_ref.spatial_attention),
                       (i2v_kernels.temporal_attention, attn_ref.temporal_attention)):
        torch.testing.assert_close(fn(q, k, v).float(), ref_fn(q, k, v).float(), atol=3e-2, rtol=3e-2)
    xc = torch.randn(1, 32, 3, 16, 16, device=dev, dtype=bf16)
    w = torch.randn(32, 32, 3, 3, 3, device=dev, dtype=bf16) * 0.05
    torch.testing.assert_close(i2v_kernels.causal_conv3d(xc, w).float(), conv_ref.causal_conv3d(xc, w).float(),
                               atol=6e-2, rtol=6e-2)
    measured = {d["op"]: d for d in _dispatch.decisions() if d["source"] == "measured"}
    for op in ("adaln_modulate", "spatial_attention", "temporal_attention", "causal_conv3d"):
        assert op in measured, sorted(measured)
        assert len(measured[op]["times_ms"]) >= 2 and measured[op]["backend"] in measured[op]["times_ms"]
    _dispatch.clear()


def test_cpu_candidates_are_timed_in_turns(monkeypatch, tmp_path):
    """Without an injected timer a CPU key is measured with the candidates taking turns (one call
    each per round, the order reversed every other round), so a load change on a shared machine hits
    them alike; the fastest wins, a candidate that raises is ruled out, and one whose first call is
    hopeless (> ABORT_RATIO x the best first call) is not called again."""
    monkeypatch.setenv(_dispatch.TUNE_ENV, "1")
    monkeypatch.setenv(_dispatch.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(_dispatch, "_timer", None)
    monkeypatch.setattr(_dispatch, "ABORT_RATIO", 20.0)  # wide margins: sleeps overshoot on a loaded CPU
    _dispatch.clear()
    delays = {"native": 0.006, "native_packed": 0.002, "hopeless": 0.3}
    calls = []

    def run(backend):
        calls.append(backend)
        if backend == "broken":
            raise RuntimeError("cannot take this input")
        import time
        time.sleep(delays[backend])

    cands = ["native", "native_packed", "broken", "hopeless"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        key = _dispatch.make_key("toy", torch.device("cpu"), torch.float32, (1,))
        best = _dispatch.choose("toy", key, torch.device("cpu"), cands, run, lambda: None)
    assert best == "native_packed"
    (d,) = [d for d in _dispatch.decisions() if d["op"] == "toy"]
    assert set(d["failed"]) == {"broken"} and set(d["times_ms"]) == {"native", "native_packed", "hopeless"}
    assert calls.count("hopeless") == _dispatch.WARMUP + 1 and calls.count("broken") == 1
    rounds = calls[1 + 3 * (_dispatch.WARMUP + 1):]  # broken: 1 call; the others: warm-up + the judged call
    assert len(rounds) == 2 * _dispatch.HOST_ROUNDS
    assert rounds[:4] == ["native", "native_packed", "native_packed", "native"]  # in turns, reversed
    _dispatch.clear()


def test_nested_measuring_is_not_counted_against_a_candidate(monkeypatch, tmp_path):
    """A patched module's first call measures the ops inside it; its warm-up is repeated until a call
    measures nothing more, so that time (seconds of inner measuring) does not rule it out as hopeless."""
    import time

    monkeypatch.setenv(_dispatch.TUNE_ENV, "1")
    monkeypatch.setenv(_dispatch.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(_dispatch, "_timer", None)
    _dispatch.clear()
    cpu = torch.device("cpu")
    inner_key = _dispatch.make_key("inner", cpu, torch.float32, (1,))
    outer_key = _dispatch.make_key("outer", cpu, torch.float32, (1,))

    def inner():
        return _dispatch.choose("inner", inner_key, cpu, ["native", "native_packed"],
                                lambda b: time.sleep(0.02), lambda: None)

    def outer(backend):  # "ours" runs the inner op (measured on its first call); "theirs" is 3x slower
        inner() if backend == "ours" else time.sleep(0.06)

    assert _dispatch.choose("outer", outer_key, cpu, ["ours", "theirs"], outer, lambda: None) == "ours"
    (d,) = [d for d in _dispatch.decisions() if d["op"] == "outer"]
    assert d["times_ms"]["ours"] < d["times_ms"]["theirs"]
    _dispatch.clear()


@pytest.mark.parametrize("ours_ms, expected", [(0.99, "theirs"), (0.9, "ours"), (1.2, "theirs")])
def test_preferred_candidate_wins_measured_ties(tuner, ours_ms, expected):
    """``prefer`` (a patched module's own code) is kept unless another is PREFER_MARGIN faster."""
    tuner.times = {"ours": ours_ms, "theirs": 1.0}
    cpu = torch.device("cpu")
    key = _dispatch.make_key("tie", cpu, torch.float32, (ours_ms,))
    assert _dispatch.choose("tie", key, cpu, ["ours", "theirs"], lambda b: None, lambda: None,
                            prefer="theirs") == expected


@needs_cpp
def test_op_ties_keep_native(tuner):
    """An op whose kernel measures within PREFER_MARGIN of native runs native (stock PyTorch)."""
    tuner.times = {"cpu": 0.99, "native": 1.0}
    i2v_kernels.adaln_modulate(*_adaln_inputs())
    (d,) = _decision("adaln_modulate")
    assert d["backend"] == "native"


def test_direct_call_takes_module_parameters():
    """A module's weights are nn.Parameters: in a no-grad eager call they must not push the op onto its
    torch.library path (tens of microseconds of autograd redispatch per call); tensors that need autograd
    and tensor subclasses with their own dispatch still take it."""
    from torch import nn

    from i2v_kernels import _backend

    class Traced(torch.Tensor):
        pass

    x = torch.randn(2, 3)
    w = nn.Parameter(torch.randn(3))
    with torch.no_grad():
        assert _backend.direct_call_ok(x, w, None)
        assert not _backend.direct_call_ok(x.as_subclass(Traced), w)
    assert not _backend.direct_call_ok(x, w)  # grad on and w requires it: the op records autograd
    assert _backend.direct_call_ok(x, nn.Parameter(torch.randn(3), requires_grad=False))


def test_repeated_attention_calls_reuse_the_decision_and_keep_the_checks(tuner, monkeypatch):
    """A plain call whose decision is settled is remembered by its signature (attention's _plans):
    the next call with that signature skips the argument checks and the dispatch lookup. A call that
    differs in anything the checks or the decision read (a dtype, a forced backend, kv_lens, the
    decision generation) goes the full way again, and kv_lens values are checked on every call."""
    from i2v_kernels.ops import attention as attn
    from i2v_kernels.ops.attention import reference

    tuner.times = {"native": 1.0, "native_packed": 2.0}
    q = torch.randn(2, 9, 2, 8)
    k, v = torch.randn(2, 5, 2, 2, 8).unbind(2)
    kv_lens = torch.tensor([3, 5])
    want = reference.attention(q, k, v)
    torch.testing.assert_close(i2v_kernels.attention(q, k, v), want, **TOL[q.dtype])
    torch.testing.assert_close(i2v_kernels.attention(q, k, v, kv_lens=kv_lens),
                               reference.attention(q, k, v, kv_lens=kv_lens), **TOL[q.dtype])
    assert "native" in attn._plans.values()

    full = []
    forward = attn._forward
    monkeypatch.setattr(attn, "_forward", lambda *a, **kw: full.append(1) or forward(*a, **kw))
    torch.testing.assert_close(i2v_kernels.attention(q, k, v), want, **TOL[q.dtype])
    i2v_kernels.attention(q, k, v, kv_lens=kv_lens)
    assert full == []  # both remembered
    with pytest.raises(ValueError, match="kv_lens values"):
        i2v_kernels.attention(q, k, v, kv_lens=torch.tensor([0, 5]))
    with pytest.raises(TypeError, match="k must have q's dtype"):
        i2v_kernels.attention(q, k.double(), v)
    with pytest.raises(ValueError, match="head dim|expected"):
        i2v_kernels.attention(q, k[..., :4], v)
    assert len(full) == 2
    with i2v_kernels.use_backend("torch"):
        torch.testing.assert_close(i2v_kernels.attention(q, k, v), want, **TOL[q.dtype])
    assert len(full) == 3
    _dispatch.clear()  # a forgotten decision is not reused
    i2v_kernels.attention(q, k, v)
    assert len(full) == 4
