"""Property-based fuzzing: every backend usable here agrees with an independent fp64 oracle on every
input a user can pass (docs/SEMANTICS.md), plus the regression examples the fuzzing found.

Profiles (``tests/fuzz/cases.py`` draws each case from its seed alone):

* CI (default): ``I2V_FUZZ_EXAMPLES`` cases per op (default 30) and a fifth as many gradient cases;
* long: ``I2V_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest -q tests/test_fuzz.py -k fuzz``
  (``I2V_FUZZ_SEED`` shifts the seeds; a failure names its op and seed, and
  ``fuzz.cases.draw(op, seed)`` rebuilds that case exactly).

Checked per case and backend (torch, cpu, native, triton under the interpreter, and auto): the call
either runs or, for a forced backend only, raises ``BackendUnavailableError`` with its reason; the
output has the oracle's shape and the input's dtype; exactly the outputs the oracle makes NaN/inf are
non-finite; the finite ones match within the dtype's tolerance.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import i2v_kernels
from fuzz import oracle
from fuzz.cases import ADALN_OPS, ATTENTION_OPS, BIG_ROWS, OPS, Case, draw
from i2v_kernels import _backend, use_backend
from i2v_kernels.ops.qk_norm_rope import qk_norm_rope

EXAMPLES = int(os.environ.get("I2V_FUZZ_EXAMPLES", "30"))
SEED = int(os.environ.get("I2V_FUZZ_SEED", "0"))
BACKENDS = ("torch", "cpu", "native", "triton", "auto")

# (atol, rtol) of an output against the fp64 oracle. Half precision: the native backend computes in
# the input dtype (several roundings), the kernels in fp32 with the input rounded once or twice.
TOLERANCE = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (2e-4, 2e-4),
    torch.float16: (1.5e-2, 1.5e-2),
    torch.bfloat16: (8e-2, 6e-2),
}


def call(op: str, args, kwargs):
    if op == "qk_norm_rope":
        return qk_norm_rope(*args, **kwargs)
    return getattr(i2v_kernels, op)(*args, **kwargs)


def _usable(backend: str) -> bool:
    return backend == "auto" or _backend._GENERIC[backend](torch.device("cpu")) is None


def run_backend(case: Case, backend: str):
    """The op's output on ``backend``, or None where a forced backend declines with a reason."""
    if backend == "triton" and case.big and EXAMPLES < 100:
        return None  # the interpreter takes minutes on 70,000 rows; the long profile runs it
    with use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallback notices and the interpreter's numpy NaN warnings
        try:
            return call(case.op, case.args, case.kwargs)
        except _backend.BackendUnavailableError as e:
            assert backend != "auto", f"{case.describe()}: auto raised {e}"
            assert "cannot run" in str(e)
            return None


def assert_matches(case: Case, out, backend: str) -> None:
    outs = out if isinstance(out, tuple) else (out,)
    expected = case.expected if isinstance(case.expected, tuple) else (case.expected,)
    where = f"{case.describe()} [backend {backend}]"
    assert len(outs) == len(expected), where
    atol, rtol = TOLERANCE[case.dtype]
    extras = list(case.extra_atol) + [None] * len(outs)
    for o, e, extra in zip(outs, expected, extras):
        assert tuple(o.shape) == tuple(e.shape), f"{where}: shape {tuple(o.shape)}, expected {tuple(e.shape)}"
        assert o.dtype == case.dtype, f"{where}: dtype {o.dtype}, expected {case.dtype}"
        got_bad, want_bad = ~torch.isfinite(o), ~torch.isfinite(e)
        wrong = (got_bad != want_bad).nonzero()
        assert wrong.numel() == 0, (f"{where}: {wrong.shape[0]} outputs non-finite where the oracle says otherwise, "
                                    f"first at {wrong[:4].tolist()} (got {o[tuple(wrong[0])].item()}, "
                                    f"expected {e[tuple(wrong[0])].item()})")
        got, want = o.double()[~want_bad], e[~want_bad]
        if extra is not None:  # an elementwise allowance: fold it into the comparison's absolute error
            slack = extra.expand(e.shape)[~want_bad]
            got = torch.where((got - want).abs() <= slack, want, got)
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{where}: {m}")


@pytest.mark.parametrize("op", OPS)
def test_fuzz(op):
    """EXAMPLES seeded cases of ``op``, every usable backend against the fp64 oracle."""
    backends = [b for b in BACKENDS if _usable(b)]
    for seed in range(SEED, SEED + EXAMPLES):
        case = draw(op, seed)
        for backend in backends:
            out = run_backend(case, backend)
            if out is not None:
                assert_matches(case, out, backend)


def _grad_cases(op: str, count: int):
    """Small, finite fp64 cases of ``op`` (drawn by the same generator, seeds searched upward)."""
    found, seed = [], SEED + 10_000
    while len(found) < count:
        case = draw(op, seed)
        seed += 1
        tensors = [t for t in _float_tensors(case)]
        if case.dtype != torch.float64 or case.big or any(not torch.isfinite(t).all() for t in tensors):
            continue
        if sum(t.numel() for t in tensors) > 6000 or any(t.numel() == 0 for t in tensors):
            continue
        found.append(case)
    return found


def _float_tensors(case: Case):
    for t in list(case.args) + list(case.kwargs.values()):
        for u in (t if isinstance(t, tuple) else (t,)):
            if isinstance(u, torch.Tensor) and u.is_floating_point():
                yield u


def _with_leaves(case: Case):
    """The case's args and kwargs with every float tensor a fresh leaf (same strides) that needs grad."""
    leaves = []

    def leaf(t):
        if isinstance(t, tuple):
            return tuple(leaf(u) for u in t)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t = t.detach().requires_grad_(True)
            leaves.append(t)
        return t

    return tuple(leaf(a) for a in case.args), {k: leaf(v) for k, v in case.kwargs.items()}, leaves


def _oracle_of(case: Case, args, kwargs):
    """The fp64 oracle on (possibly grad-carrying) arguments."""
    op = case.op
    if op in ADALN_OPS:
        fn = {"adaln_modulate": oracle.adaln_modulate, "gated_residual": oracle.gated_residual,
              "gated_residual_adaln": oracle.gated_residual_adaln,
              "rms_norm": oracle.rms_norm_op}[op]
        return fn(*args, **kwargs)
    kw = {k: v for k, v in kwargs.items() if k != "rope"}
    if "rope" in kwargs:
        kw["rope_tables"] = kwargs["rope"]
    if op in ATTENTION_OPS:
        mode = {"spatial_attention": "spatial", "temporal_attention": "temporal", "attention": "dense"}[op]
        return oracle.attention_oracle(mode, *args, **kw)
    if op == "qk_norm_rope":
        return oracle.qk_norm_rope(*args, **kw)
    return oracle.causal_conv3d(*args, **kw)


@pytest.mark.parametrize("op", OPS)
def test_fuzz_gradients(op):
    """Gradients of every input on small fp64 cases, each fp64-capable backend against autograd
    through the oracle."""
    for case in _grad_cases(op, max(1, EXAMPLES // 5)):
        args, kwargs, leaves = _with_leaves(case)
        expected = _oracle_of(case, args, kwargs)
        expected = expected if isinstance(expected, tuple) else (expected,)
        cotangents = [torch.randn(e.shape, dtype=torch.float64) for e in expected]
        want = torch.autograd.grad(expected, leaves, cotangents, allow_unused=True)
        for backend in ("torch", "cpu", "native"):
            if not _usable(backend):
                continue
            with use_backend(backend):
                try:
                    out = call(op, args, kwargs)
                except _backend.BackendUnavailableError:
                    continue
                out = out if isinstance(out, tuple) else (out,)
                got = torch.autograd.grad(out, leaves, cotangents, allow_unused=True)
            for i, (g, w) in enumerate(zip(got, want)):
                w = torch.zeros_like(leaves[i]) if w is None else w
                g = torch.zeros_like(leaves[i]) if g is None else g
                torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6,
                                           msg=lambda m: f"{case.describe()} [backend {backend}] grad {i}: {m}")


# --------------------------------------------------------------------------------------------------
# Regression examples: the cases issue 18 reported and the fuzzing found, each kept explicit


def _backends(*names):
    return [b for b in names if _usable(b)]


def _half_qkv(shape, seed=0, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g).to(dtype) for _ in range(3))


def _assert_oracle(out, expected, dtype, where):
    case = Case("regression", 0, (), {}, expected, dtype, where)
    assert_matches(case, out, "")


@pytest.mark.parametrize("backend", _backends("torch", "native", "triton"))
def test_strided_side_tensors(backend):
    """kv_lens and QK-norm weights given as strided views (the Triton kernels read them as packed
    arrays: errors of 1-4, silently)."""
    q, k, v = _half_qkv((4, 9, 2, 16))
    kv_lens = torch.tensor([4, 9, 2, 9, 3, 5, 7, 1])[::2]
    weight = torch.linspace(0.5, 1.5, 32)[::2]
    with use_backend(backend):
        out = i2v_kernels.attention(q, k, v, kv_lens=kv_lens, qk_norm="rms", q_norm_weight=weight,
                                    k_norm_weight=weight)
        v5 = [t.view(1, 4, 9, 2, 16) for t in (q, k, v)]
        temporal = i2v_kernels.temporal_attention(*v5, qk_norm="layer", q_norm_weight=weight, k_norm_bias=weight)
    _assert_oracle(out, oracle.attention_oracle("dense", q, k, v, kv_lens=kv_lens, qk_norm="rms",
                                                q_norm_weight=weight, k_norm_weight=weight), q.dtype, "dense")
    _assert_oracle(temporal, oracle.attention_oracle("temporal", *v5, qk_norm="layer", q_norm_weight=weight,
                                                     k_norm_bias=weight), q.dtype, "temporal")


@pytest.mark.parametrize("backend", _backends("torch", "native", "triton", "auto"))
def test_attention_without_keys(backend):
    """M = 0 keys for N > 0 queries is a named error (Triton returned uninitialised memory); with no
    queries either the result is empty."""
    q, k, v = _half_qkv((2, 5, 2, 16))
    with use_backend(backend):
        with pytest.raises(ValueError, match="M = 0 keys"):
            i2v_kernels.attention(q, k[:, :0], v[:, :0])
        assert i2v_kernels.attention(q[:, :0], k[:, :0], v[:, :0]).shape == (2, 0, 2, 16)


@pytest.mark.parametrize("backend", _backends("torch", "native", "triton"))
def test_nan_query_row_is_nan_on_every_backend(backend):
    """A NaN query row came back as zeros from one backend and NaN from another: now NaN everywhere,
    and only that row."""
    q, k, v = _half_qkv((1, 4, 9, 2, 16))
    q[0, 1, 3, 0, 5] = float("nan")
    with use_backend(backend):
        for fn in (i2v_kernels.temporal_attention, i2v_kernels.spatial_attention):
            out = fn(q, k, v)
            assert out[0, 1, 3, 0].isnan().all()
            assert out.isnan().sum() == 16, fn.__name__
        dense = i2v_kernels.attention(q[0], k[0], v[0])
        assert dense[1, 3, 0].isnan().all() and dense.isnan().sum() == 16


@pytest.mark.parametrize("backend", _backends("torch", "native", "triton", "cpu", "auto"))
def test_zero_size_dims_give_empty_results(backend):
    """T = 0 / S = 0 raised a reshape error inside the op; every zero-size batch dim is an empty result."""
    with use_backend(backend):
        for shape in ((1, 0, 3, 2, 16), (1, 3, 0, 2, 16), (0, 3, 3, 2, 16), (1, 3, 3, 0, 16)):
            q = torch.randn(shape, dtype=torch.float16)
            for fn in (i2v_kernels.spatial_attention, i2v_kernels.temporal_attention):
                try:
                    assert fn(q, q, q).shape == shape
                except _backend.BackendUnavailableError:
                    pass
        for shape in ((0, 8), (2, 0, 8), (0, 3, 2, 8)):
            x = torch.randn(shape)
            assert i2v_kernels.adaln_modulate(x, x[..., :1, :] if x.dim() > 2 else None, None).shape == shape
            assert i2v_kernels.rms_norm(x).shape == shape
            assert qk_norm_rope(x, x, qk_norm="rms")[0].shape == shape


@pytest.mark.parametrize("backend", _backends("torch", "native", "triton"))
def test_masked_keys_have_no_effect(backend):
    """NaN/inf in keys past kv_lens or in future frames under causal change nothing."""
    q, k, v = _half_qkv((2, 7, 2, 16))
    kv_lens = torch.tensor([3, 7])
    k2, v2 = k.clone(), v.clone()
    k2[0, 3:], v2[0, 5] = float("nan"), float("inf")
    with use_backend(backend):
        torch.testing.assert_close(i2v_kernels.attention(q, k2, v2, kv_lens=kv_lens),
                                   i2v_kernels.attention(q, k, v, kv_lens=kv_lens), atol=0, rtol=0)
        for T in (5, 33):  # the packed temporal kernel and the flash kernel
            q5, k5, v5 = _half_qkv((1, T, 3, 2, 16), seed=T)
            k6, v6 = k5.clone(), v5.clone()
            v6[0, T - 1, 1, 0, 3] = float("nan")
            k6[0, T - 2, 2, 1, 0] = float("inf")
            got = i2v_kernels.temporal_attention(q5, k6, v6, causal=True)
            want = i2v_kernels.temporal_attention(q5, k5, v5, causal=True)
            torch.testing.assert_close(got[:, :T - 2], want[:, :T - 2], atol=0, rtol=0)
            assert got[0, T - 2:, 2, 1].isnan().all() and got[0, T - 1, 1, 0, 3].isnan()
            assert torch.isfinite(got[0, T - 1, 1, 0, :3]).all()


@pytest.mark.parametrize("backend", _backends("torch", "native", "triton", "cpu"))
def test_nan_conv_weight(backend):
    """Found by the fuzzing (seed 1088): a NaN weight tap that falls on the zero spatial padding gives
    NaN on native/triton and is skipped by oneDNN's NCDHW kernel (torch/cpu). The contract: every
    output whose tap reads a real input pixel is NaN; the border outputs reading only padding there
    are left to the library."""
    x = torch.randn(1, 2, 3, 5, 4)
    w = torch.randn(2, 2, 3, 3, 3) * 0.3
    w[1, 0, 1, 2, 1] = float("nan")  # tap (t-1, h+1, w): reads padding only at h = H - 1
    with use_backend(backend):
        out = i2v_kernels.causal_conv3d(x, w)
    assert out[:, 1, :, :4].isnan().all() and torch.isfinite(out[:, 0]).all()


@pytest.mark.parametrize("backend", _backends("torch", "native", "triton", "cpu"))
def test_rms_norm_row_with_an_infinity_is_nan(backend):
    """Found by the fuzzing: RMSNorm of a row holding an infinity gave NaN there and zeros beside it."""
    x = torch.randn(3, 2, 17)
    x[0, 1, 3] = float("inf")
    with use_backend(backend):
        out = i2v_kernels.rms_norm(x, torch.rand(17) + 0.5)
        assert out[0, 1].isnan().all() and torch.isfinite(out[[1, 2]]).all() and torch.isfinite(out[0, 0]).all()
        q = torch.randn(2, 3, 2, 16)
        q[1, 2, 0, 7] = -float("inf")
        qo, ko = qk_norm_rope(q, q.clone(), qk_norm="rms")
        assert qo[1, 2, 0].isnan().all() and (~torch.isfinite(qo)).sum() == 16


@pytest.mark.parametrize("backend", _backends("torch", "native", "triton"))
def test_scale_zero_is_a_uniform_average(backend):
    q, k, v = _half_qkv((2, 5, 2, 16))
    with use_backend(backend):
        out = i2v_kernels.attention(q, k, v, scale=0.0, kv_lens=torch.tensor([2, 5]))
    want = torch.stack([v[0, :2].float().mean(0), v[1].float().mean(0)])  # [B, H, D]
    torch.testing.assert_close(out.float(), want[:, None].expand(2, 5, 2, 16), atol=2e-3, rtol=2e-3)
    # Found by the fuzzing: SDPA's CPU kernel scales a causal mask's -inf by 0 (NaN rows on torch/native)
    v5 = v.view(1, 5, 2, 2, 16)
    with use_backend(backend):
        out = i2v_kernels.temporal_attention(v5, v5, v5, scale=0.0, causal=True)
    want = v5.float().cumsum(1) / torch.arange(1, 6).view(1, 5, 1, 1, 1)
    torch.testing.assert_close(out.float(), want, atol=2e-3, rtol=2e-3)


def test_auto_falls_back_when_a_kernel_cannot_take_the_layout():
    """A 10-d x sliced in every dim: the C++ kernel takes 8 coalesced row dims; auto used to raise."""
    if not _usable("cpu"):
        pytest.skip("the C++ extension is not built")
    x = torch.randn(*([3] * 9), 8)[(slice(None, None, 2),) * 9]
    shift, scale = torch.randn(8), torch.randn(8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = i2v_kernels.adaln_modulate(x, shift, scale)
    assert any("falling back" in str(w.message) and "'cpu'" in str(w.message) for w in caught)
    assert any(f["op"] == "adaln_modulate" and f["backend"] == "cpu" and "coalesced" in f["reason"]
               for f in i2v_kernels.info()["fallbacks"])
    _assert_oracle(out, oracle.adaln_modulate(x, shift, scale, eps=1e-6), x.dtype, "10-d x")
    with use_backend("cpu"), pytest.raises(_backend.BackendUnavailableError, match="coalesced"):
        i2v_kernels.adaln_modulate(x, shift, scale)
    if _usable("triton"):  # the Triton check ignored x's own strides and the launch failed inside
        with use_backend("triton"), pytest.raises(_backend.BackendUnavailableError, match="leading dims"):
            i2v_kernels.adaln_modulate(x, shift, scale)


# --------------------------------------------------------------------------------------------------
# torch.compile(dynamic=True, fullgraph=True): argument checks are symbolic-shape friendly

_R = torch.randn
_COMPILE_CASES = {
    "adaln_modulate": (lambda x, s, c, e: i2v_kernels.adaln_modulate(x, s, c, eps=e),
                       lambda n: (_R(2, n, 8), _R(8), _R(2, 1, 8), 1e-5)),
    "gated_residual": (lambda x, y, g: i2v_kernels.gated_residual(x, y, g), lambda n: (_R(2, n, 8), _R(2, n, 8), _R(8))),
    "gated_residual_adaln": (lambda x, y, g, e: i2v_kernels.gated_residual_adaln(x, y, g, g, g, eps=e),
                             lambda n: (_R(2, n, 8), _R(2, n, 8), _R(8), 1e-5)),
    "rms_norm": (lambda x, w, e: i2v_kernels.rms_norm(x, w, eps=e), lambda n: (_R(n, 8), _R(8), 1e-5)),
    "spatial_attention": (lambda q, s: i2v_kernels.spatial_attention(q, q, q, scale=s, qk_norm="rms"),
                          lambda n: (_R(1, 2, n, 2, 8), 0.3)),
    "temporal_attention": (lambda q, e: i2v_kernels.temporal_attention(q, q, q, causal=True, qk_norm="layer",
                                                                        norm_eps=e),
                           lambda n: (_R(1, n, 3, 2, 8), 1e-5)),
    "attention": (lambda q, k, lens, s: i2v_kernels.attention(q, k, k, kv_lens=lens, scale=s),
                  lambda n: (_R(2, n, 2, 8), _R(2, n + 2, 2, 8), torch.tensor([1, n]), 0.5)),
    "qk_norm_rope": (lambda q, c, e: qk_norm_rope(q, q, qk_norm="rms", rope=(c, c), norm_eps=e),
                     lambda n: (_R(n, 2, 8), _R(n, 8), 1e-5)),
    "causal_conv3d": (lambda x, w: i2v_kernels.causal_conv3d(x, w), lambda n: (_R(1, 2, n, 4, 5), _R(3, 2, 3, 3, 3))),
}


@pytest.mark.parametrize("op", list(_COMPILE_CASES))
def test_compiles_with_dynamic_shapes(op):
    """Every op traces with dynamic=True, fullgraph=True (math.isfinite on a symbolic float broke the
    adaLN and attention checks) and matches eager at two sizes of one symbolic dim."""
    fn, make = _COMPILE_CASES[op]
    torch._dynamo.reset()
    compiled = torch.compile(fn, dynamic=True, fullgraph=True, backend="aot_eager")
    for n in (3, 6):
        args = make(n)
        got, want = compiled(*args), fn(*args)
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(g, w)


# --------------------------------------------------------------------------------------------------
# Module constructors: named errors

_BAD_MODULES = [
    (lambda: i2v_kernels.nn.FactorizedAttention(64, 0), ValueError, "heads must be >= 1"),
    (lambda: i2v_kernels.nn.FactorizedAttention(64, -4), ValueError, "heads must be >= 1"),
    (lambda: i2v_kernels.nn.FactorizedAttention(64, 5), ValueError, "divisible by heads=5"),
    (lambda: i2v_kernels.nn.FactorizedAttention(64, 2.0), TypeError, "heads must be an int"),
    (lambda: i2v_kernels.nn.FactorizedAttention(0, 1), ValueError, "dim must be >= 1"),
    (lambda: i2v_kernels.nn.FactorizedAttention(64, 4, mode="full"), ValueError, "mode must be one of"),
    (lambda: i2v_kernels.nn.FactorizedAttention(64, 4, qk_norm="l2"), ValueError, "qk_norm must be one of"),
    (lambda: i2v_kernels.nn.FactorizedAttention(64, 4, rope_style="x"), ValueError, "rope_style must be one of"),
    (lambda: i2v_kernels.nn.FactorizedAttention(64, 4, norm_eps=0.0), ValueError, "norm_eps must be a positive"),
    (lambda: i2v_kernels.nn.FactorizedAttention(64, 4, causal=1), TypeError, "causal must be a bool"),
    (lambda: i2v_kernels.nn.CrossAttention(64, 0, 4), ValueError, "context_dim must be >= 1"),
    (lambda: i2v_kernels.nn.CrossAttention(64, 32, 3), ValueError, "divisible by heads=3"),
    (lambda: i2v_kernels.nn.CausalConv3d(2, 3, 0), ValueError, "kernel_size must be positive"),
    (lambda: i2v_kernels.nn.CausalConv3d(2, 3, (3, 3)), TypeError, r"kernel_size must be an int or a \(t, h, w\)"),
    (lambda: i2v_kernels.nn.CausalConv3d(2, 3, 3, stride=0), ValueError, "stride must be positive"),
    (lambda: i2v_kernels.nn.CausalConv3d(2, 3, 3, dilation=(1, 0, 1)), ValueError, "dilation must be positive"),
    (lambda: i2v_kernels.nn.CausalConv3d(0, 3, 3), ValueError, "in_channels must be >= 1"),
    (lambda: i2v_kernels.nn.CausalConv3d(2, -1, 3), ValueError, "out_channels must be >= 1"),
    (lambda: i2v_kernels.nn.CausalConv3d(2, 3, 3, time_pad="reflect"), ValueError, "time_pad must be one of"),
    (lambda: i2v_kernels.nn.AdaLNModulate(0), ValueError, "dim must be >= 1"),
    (lambda: i2v_kernels.nn.AdaLNModulate(8, eps=-1.0), ValueError, "eps must be a positive"),
]


@pytest.mark.parametrize("make, error, match", _BAD_MODULES, ids=[m for _, _, m in _BAD_MODULES])
def test_module_constructors_name_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()
