"""qk_norm_rope: every backend that can run here against the fp32 reference (attention.reference.prologue)."""

import warnings

import pytest
import torch

import i2v_kernels
from i2v_kernels.ops.attention import reference as ref
from _util import TOL, skip_unless_usable

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CPU_BACKENDS = ["triton", "cpu", "native", "torch"]
# native rounds every intermediate to the input dtype (as eager PyTorch does): a looser bound
NATIVE_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2),
              torch.bfloat16: dict(atol=6e-2, rtol=6e-2)}


def _packed(lead, H, D, dtype, device="cpu"):
    """q, k as views of a packed QKV projection ``[*lead, 3 * H * D]`` (non-contiguous, unit stride on D)."""
    qkv = torch.randn(*lead, 3 * H * D, device=device).to(dtype)
    q, k, _ = qkv.view(*lead, 3, H, D).unbind(-3)
    return q, k


def _layout(shape, how, dtype):
    """q, k of ``shape`` [..., H, D] laid out in the named way."""
    if how == "packed":
        return _packed(shape[:-2], shape[-2], shape[-1], dtype)
    if how == "contiguous":
        return tuple(torch.randn(shape).to(dtype) for _ in range(2))
    if how == "permuted":  # [B, H, N, D] storage seen as [B, N, H, D]
        B, N, H, D = shape
        return tuple(torch.randn(B, H, N, D).to(dtype).transpose(1, 2) for _ in range(2))
    if how == "sliced":  # rows of a wider buffer
        return tuple(torch.randn(*shape[:-1], shape[-1] + 6).to(dtype)[..., : shape[-1]] for _ in range(2))
    raise AssertionError(how)


CASES = {
    # id: (q shape [..., H, D], cos/sin shape, layout)
    "dense-packed-N9H3D64-ND": ((2, 9, 3, 64), (9, 64), "packed"),
    "dense-D40-per-sample-BND": ((2, 7, 2, 40), (2, 7, 40), "contiguous"),
    "video-D72-TSD": ((2, 3, 5, 2, 72), (3, 5, 72), "packed"),
    "video-D96-SD": ((1, 2, 6, 3, 96), (6, 96), "packed"),
    "permuted-D32": ((2, 5, 3, 32), (5, 32), "permuted"),
    "sliced-D48-shared-row": ((3, 4, 2, 48), (1, 48), "sliced"),
    "one-token-D128": ((1, 1, 4, 128), (1, 128), "contiguous"),
    "D256": ((1, 3, 2, 256), (3, 256), "packed"),
}

NORMS = [None, "layer", "rms"]
STYLES = ["interleaved", "half"]


def _inputs(case, dtype, param_dtype=None, table_dtype=None):
    shape, tshape, how = CASES[case]
    q, k = _layout(shape, how, dtype)
    D = shape[-1]
    table_dtype = table_dtype or dtype
    cos, sin = (torch.randn(tshape).to(table_dtype) for _ in range(2))
    param_dtype = param_dtype or dtype
    qw, qb, kw, kb = (torch.randn(D).to(param_dtype) for _ in range(4))
    return q, k, cos, sin, qw, qb, kw, kb


def _kwargs(norm, affine, qw, qb, kw, kb, cos, sin, style):
    kw_ = dict(qk_norm=norm, rope=None if cos is None else (cos, sin), rope_style=style)
    if norm is not None and affine:
        kw_.update(q_norm_weight=qw, k_norm_weight=kw)
        if norm == "layer":
            kw_.update(q_norm_bias=qb, k_norm_bias=kb)
    return kw_


def _expected(q, k, kw_):
    rope = kw_.get("rope")
    style = kw_["rope_style"]
    eps = kw_.get("norm_eps", 1e-6)
    outs = []
    for x, w, b in ((q, kw_.get("q_norm_weight"), kw_.get("q_norm_bias")),
                    (k, kw_.get("k_norm_weight"), kw_.get("k_norm_bias"))):
        outs.append(ref.prologue(x, kw_["qk_norm"], w, b, eps, rope, style).to(q.dtype))
    return outs


def _check_outputs(outs, q, k, kw_, tol):
    for out, exp, x in zip(outs, _expected(q, k, kw_), (q, k)):
        assert out.dtype == x.dtype and out.shape == x.shape
        assert out.is_contiguous()
        torch.testing.assert_close(out, exp, **tol)


def _run(backend, q, k, **kw_):
    with i2v_kernels.use_backend(backend):
        return i2v_kernels.qk_norm_rope(q, k, **kw_)


def _tol(backend, dtype):
    return NATIVE_TOL[dtype] if backend == "native" else TOL[dtype]


# --------------------------------------------------------------------------------------------------
# Forward against the reference


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", NORMS, ids=str)
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("case", list(CASES))
def test_forward(backend, dtype, norm, style, case):
    skip_unless_usable(backend)
    q, k, cos, sin, qw, qb, kw, kb = _inputs(case, dtype)
    for affine in (False, True) if norm else (False,):
        kw_ = _kwargs(norm, affine, qw, qb, kw, kb, cos, sin, style)
        _check_outputs(_run(backend, q, k, **kw_), q, k, kw_, _tol(backend, dtype))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("D", [40, 72, 96, 33])
def test_norm_only(backend, norm, D):
    """No RoPE: any head dim, odd ones included."""
    skip_unless_usable(backend)
    q, k = _packed((2, 5), 3, D, torch.float32)
    w = torch.randn(D)
    kw_ = dict(qk_norm=norm, q_norm_weight=w, k_norm_weight=w * 2, rope_style="interleaved", norm_eps=1e-5)
    _check_outputs(_run(backend, q, k, **kw_), q, k, kw_, _tol(backend, torch.float32))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("style", STYLES)
def test_rope_only(backend, style):
    skip_unless_usable(backend)
    q, k = _packed((2, 6), 4, 64, torch.bfloat16)
    cos, sin = torch.randn(6, 64), torch.randn(6, 64)
    kw_ = dict(qk_norm=None, rope=(cos, sin), rope_style=style)
    _check_outputs(_run(backend, q, k, **kw_), q, k, kw_, _tol(backend, torch.bfloat16))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_identity_is_a_contiguous_copy(backend):
    skip_unless_usable(backend)
    for q, k in (_packed((2, 3), 2, 16, torch.float32), _layout((2, 3, 2, 16), "contiguous", torch.float32)):
        qo, ko = _run(backend, q, k)
        assert qo.is_contiguous() and qo.data_ptr() != q.data_ptr() and ko.data_ptr() != k.data_ptr()
        torch.testing.assert_close(qo, q)
        torch.testing.assert_close(ko, k)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_param_dtypes(backend):
    """bf16 q/k with fp32 norm weights and an fp32 RoPE table (as diffusers keeps them)."""
    skip_unless_usable(backend)
    q, k, cos, sin, qw, qb, kw, kb = _inputs("video-D72-TSD", torch.bfloat16, torch.float32, torch.float32)
    kw_ = _kwargs("layer", True, qw, qb, kw, kb, cos, sin, "interleaved")
    _check_outputs(_run(backend, q, k, **kw_), q, k, kw_, _tol(backend, torch.bfloat16))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_only_q_has_weight(backend):
    skip_unless_usable(backend)
    q, k, cos, sin, qw, qb, kw, kb = _inputs("dense-packed-N9H3D64-ND", torch.float32)
    kw_ = dict(qk_norm="layer", q_norm_weight=qw, k_norm_bias=kb, rope=(cos, sin), rope_style="half")
    _check_outputs(_run(backend, q, k, **kw_), q, k, kw_, _tol(backend, torch.float32))


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_cos_sin_of_different_broadcast_shapes(backend):
    q, k = _packed((2, 4), 2, 8, torch.float32)
    cos, sin = torch.randn(4, 8), torch.randn(2, 1, 8)  # [N, D] and per-sample [B, 1, D]
    kw_ = dict(qk_norm="rms", rope=(cos, sin), rope_style="interleaved")
    skip_unless_usable(backend)
    _check_outputs(_run(backend, q, k, **kw_), q, k, kw_, TOL[torch.float32])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cos_sin_strides_differ_on_a_size_one_dim(backend):
    """Found by the fuzzing: cos and sin whose size-1 dim has different (unused) strides are one table
    layout all the same; the C++ op compared every stride and refused."""
    skip_unless_usable(backend)
    q, k = _packed((1, 4), 2, 8, torch.float32)
    cos = torch.randn(1, 4, 8)                      # strides (32, 8, 1)
    sin = torch.randn(4, 1, 8).transpose(0, 1)      # shape (1, 4, 8), strides (8, 8, 1)
    kw_ = dict(qk_norm="layer", rope=(cos, sin), rope_style="half")
    _check_outputs(_run(backend, q, k, **kw_), q, k, kw_, _tol(backend, torch.float32))


def test_numel_zero():
    q = torch.randn(2, 0, 3, 8)
    qo, ko = i2v_kernels.qk_norm_rope(q, q.clone(), qk_norm="layer")
    assert qo.shape == q.shape and ko.shape == q.shape


def test_fp64_runs_the_reference_in_fp64():
    q, k = _packed((2, 3), 2, 8, torch.float64)
    cos, sin = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    kw_ = dict(qk_norm="layer", rope=(cos, sin), rope_style="interleaved")
    _check_outputs(i2v_kernels.qk_norm_rope(q, k, **kw_), q, k, kw_, TOL[torch.float64])


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_kernels_reject_fp64_when_forced(backend):
    skip_unless_usable(backend)
    q = torch.randn(2, 3, 2, 8, dtype=torch.float64)
    with pytest.raises(i2v_kernels.BackendUnavailableError, match="float64"):
        _run(backend, q, q, qk_norm="rms")


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_kernels_reject_wide_heads(backend):
    skip_unless_usable(backend)
    q = torch.randn(1, 2, 1, 512)
    with pytest.raises(i2v_kernels.BackendUnavailableError, match="exceeds"):
        _run(backend, q, q, qk_norm="rms")


# --------------------------------------------------------------------------------------------------
# The C++ kernels (csrc/qk_norm_rope): the cpu backend runs the CUDA kernel's row routine with the same
# access-width choice (16, 8, 4 bytes or scalar) and checks, on every access, the alignment a GPU's
# vector access needs


def _offset_views(lead, D, dtype, offset, pad, device="cpu"):
    """q, k of ``[*lead, D]`` whose rows start ``offset`` elements into rows of ``D + pad + offset``:
    row starts aligned to 16, 8, 4, 2 bytes or one element, depending on offset and pad."""
    buf = torch.randn(2, *lead, D + pad + offset, device=device).to(dtype)
    return buf[0, ..., offset:offset + D], buf[1, ..., offset:offset + D]


def _aligned_case_check(backend, dtype, D, style, offset, pad, table_dtype, device="cpu", tol=None):
    q, k = _offset_views((2, 5, 3), D, dtype, offset, pad, device)
    table = torch.randn(2, 5, D + offset, device=device).to(table_dtype)[..., offset:]  # offset rows too
    w = torch.randn(4, D, device=device).to(table_dtype)
    kw_ = dict(qk_norm="layer", q_norm_weight=w[0], q_norm_bias=w[1], k_norm_weight=w[2], k_norm_bias=w[3],
               rope=(table[0], table[1]), rope_style=style)
    outs = _run(backend, q, k, **kw_)
    for out, exp in zip(outs, _expected(q, k, kw_)):
        assert out.is_contiguous() and out.dtype == dtype
        torch.testing.assert_close(out, exp, **(tol or TOL[dtype]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("offset,pad", [(0, 0), (1, 0), (2, 2), (4, 4), (0, 2), (8, 8)])
def test_cpp_access_widths(dtype, style, offset, pad):
    """Every access width on views whose rows are 16-, 8-, 4-byte or element aligned; D = 40 (D/2 = 20:
    at most 8-byte accesses for the half style of 16-bit inputs), fp32 and same-dtype tables."""
    skip_unless_usable("cpu")
    for table_dtype in dict.fromkeys((dtype, torch.float32)):
        _aligned_case_check("cpu", dtype, 40, style, offset, pad, table_dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("norm", [None, "layer", "rms"])
def test_non_finite_reaches_its_row_only(backend, norm):
    """docs/SEMANTICS.md: under a norm a NaN/inf NaNs its whole row (head vector); without one, RoPE
    spreads it to its pair partner alone."""
    skip_unless_usable(backend)
    _non_finite_check(backend, norm, "cpu")


def _non_finite_check(backend, norm, device):
    q, k = _packed((2, 4), 3, 16, torch.float32, device=device)
    q, k = q.clone(), k.clone()
    q[1, 2, 0, 5], k[0, 3, 2, 10] = float("nan"), float("inf")
    cos, sin = torch.randn(4, 16, device=device), torch.randn(4, 16, device=device)
    qo, ko = _run(backend, q, k, qk_norm=norm, rope=(cos, sin), rope_style="interleaved")
    for out, (b, n, h, d) in ((qo, (1, 2, 0, 5)), (ko, (0, 3, 2, 10))):
        bad = ~torch.isfinite(out)
        want = torch.zeros_like(bad)
        if norm is None:
            want[b, n, h, d - d % 2:d - d % 2 + 2] = True  # the interleaved pair
        else:
            want[b, n, h] = True
        assert torch.equal(bad, want)
        if norm is not None:
            assert out[b, n, h].isnan().all()


def test_cpp_many_leading_dims_fall_back():
    """Strides that coalesce to more than 8 leading dims: the C++ kernels decline (auto runs another
    backend, a forced one raises saying why)."""
    skip_unless_usable("cpu")
    q = torch.randn([2] * 10 + [8]).permute(*reversed(range(10)), 10)  # 10 dims that cannot merge
    with pytest.raises(i2v_kernels.BackendUnavailableError, match="coalesced leading dims"):
        _run("cpu", q, q, qk_norm="rms")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one-time fallback notice (may have fired already)
        qo, ko = i2v_kernels.qk_norm_rope(q, q, qk_norm="rms")
    _check_outputs((qo, ko), q, q, dict(qk_norm="rms", rope_style="interleaved"), TOL[torch.float32])


CPP_BAD = {
    "wide-D": (dict(q=(1, 2, 300)), "head dim D"),
    "cos-sin-strides": (dict(rope="strides"), "same strides"),
    "side-dtypes": (dict(rope="bf16", weight="fp32"), "share one dtype"),
    "half-without-rope": (dict(half=True), "half_style needs"),
    "weight-without-norm": (dict(weight="fp32", norm=0), "without a norm"),
    "odd-D-rope": (dict(q=(1, 2, 7), rope="bf16"), "even head dim"),
    "k-shape": (dict(k=(1, 3, 8)), "k must have q's shape"),
}


@pytest.mark.parametrize("case", list(CPP_BAD))
def test_cpp_op_bad_input(case):
    """The C++ op's own checks (the public function validates first; these guard direct calls)."""
    skip_unless_usable("cpu")
    spec, match = CPP_BAD[case]
    q = torch.randn(spec.get("q", (1, 2, 8)), dtype=torch.bfloat16)
    k = torch.randn(spec.get("k", q.shape), dtype=torch.bfloat16)
    D = q.shape[-1]
    cos = sin = w = None
    if spec.get("rope") == "strides":
        cos, sin = torch.randn(q.shape, dtype=torch.bfloat16), torch.randn(q.shape[-1:], dtype=torch.bfloat16)
        sin = sin.expand(q.shape)
    elif spec.get("rope") == "bf16":
        cos = sin = torch.randn(q.shape, dtype=torch.bfloat16)
    if spec.get("weight") == "fp32":
        w = torch.randn(D)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.i2v_kernels._qk_norm_rope_fwd(q, k, w, None, None, None, cos, sin, spec.get("norm", 1), 1e-6,
                                                spec.get("half", False))


# --------------------------------------------------------------------------------------------------
# Gradients


def _grad_inputs(dtype, norm, style, requires=True):
    q, k = (torch.randn(2, 3, 2, 8, dtype=dtype) for _ in range(2))
    D = 8
    cos, sin = torch.randn(3, D, dtype=dtype), torch.randn(3, D, dtype=dtype)
    qw, qb, kw, kb = (torch.randn(D, dtype=dtype) for _ in range(4))
    tensors = [q, k, qw, kw, cos, sin] + ([qb, kb] if norm == "layer" else [])
    for t in tensors:
        t.requires_grad_(requires)
    kw_ = dict(qk_norm=norm, q_norm_weight=qw, k_norm_weight=kw, rope=(cos, sin), rope_style=style)
    if norm == "layer":
        kw_.update(q_norm_bias=qb, k_norm_bias=kb)
    return q, k, kw_, tensors


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("style", STYLES)
def test_gradcheck_fp64(norm, style):
    q, k, kw_, _ = _grad_inputs(torch.float64, norm, style)
    names = [n for n in ("q_norm_weight", "k_norm_weight", "q_norm_bias", "k_norm_bias") if n in kw_]

    def f(q, k, *rest):
        args = dict(kw_)
        args.update(dict(zip(names, rest[: len(names)])))
        args["rope"] = tuple(rest[len(names):])
        return i2v_kernels.qk_norm_rope(q, k, **args)

    inputs = (q, k, *(kw_[n] for n in names), *kw_["rope"])
    with i2v_kernels.use_backend("torch"):
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_autograd_matches_reference_autograd(backend, norm):
    skip_unless_usable(backend)
    q, k, kw_, tensors = _grad_inputs(torch.float32, norm, "interleaved")
    with i2v_kernels.use_backend(backend):
        qo, ko = i2v_kernels.qk_norm_rope(q, k, **kw_)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    grads = torch.autograd.grad((qo, ko), tensors, (gq, gk))
    rq, rk = (ref.prologue(x, norm, kw_.get(f"{n}_norm_weight"), kw_.get(f"{n}_norm_bias"), 1e-6, kw_["rope"],
                           "interleaved") for x, n in ((q, "q"), (k, "k")))
    expected = torch.autograd.grad((rq, rk), tensors, (gq, gk))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_backward_only_for_what_needs_it():
    q, k, kw_, tensors = _grad_inputs(torch.float32, "layer", "half", requires=False)
    q.requires_grad_(True)
    qo, ko = i2v_kernels.qk_norm_rope(q, k, **kw_)
    (g,) = torch.autograd.grad(qo.sum() + ko.sum(), [q])
    assert g.shape == q.shape


# --------------------------------------------------------------------------------------------------
# opcheck and torch.compile


def _op_args(q, k, kw_):
    cos, sin = kw_.get("rope") or (None, None)
    return (q, k, kw_["qk_norm"], kw_.get("q_norm_weight"), kw_.get("q_norm_bias"), kw_.get("k_norm_weight"),
            kw_.get("k_norm_bias"), 1e-6, cos, sin, kw_["rope_style"])


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_opcheck(backend, norm):
    skip_unless_usable(backend)
    q, k, kw_, _ = _grad_inputs(torch.float32, norm, "interleaved")
    with i2v_kernels.use_backend(backend):
        torch.library.opcheck(torch.ops.i2v_kernels.qk_norm_rope.default, _op_args(q, k, kw_))


def test_opcheck_strided_views_without_rope():
    q, k = _packed((2, 5), 3, 16, torch.float32)
    torch.library.opcheck(torch.ops.i2v_kernels.qk_norm_rope.default,
                          (q, k, "rms", None, None, None, None, 1e-6, None, None, "half"))


def test_compile_fullgraph():
    torch._dynamo.reset()
    q, k = _packed((2, 6), 2, 16, torch.float32)
    cos, sin = torch.randn(6, 16), torch.randn(6, 16)
    w = torch.randn(16)

    def f(q, k, cos, sin, w):
        qo, ko = i2v_kernels.qk_norm_rope(q, k, qk_norm="layer", q_norm_weight=w, k_norm_weight=w, rope=(cos, sin))
        return qo * 2, ko + 1

    expected = f(q, k, cos, sin, w)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, cos, sin, w)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


# --------------------------------------------------------------------------------------------------
# Bad input


BAD = {
    "k-shape": (lambda q: dict(k=q[:, :2]), ValueError, "k must have q's shape"),
    "k-dtype": (lambda q: dict(k=q.double()), TypeError, "k must have q's dtype"),
    "int-q": (lambda q: dict(q=q.long(), k=q.long()), TypeError, "q must be a floating-point"),
    "rank-1": (lambda q: dict(q=q[0, 0, 0], k=q[0, 0, 0]), ValueError, r"\[\.\.\., H, D\]"),
    "norm-name": (lambda q: dict(qk_norm="batch"), ValueError, "qk_norm must be None"),
    "weight-without-norm": (lambda q: dict(q_norm_weight=torch.ones(8)), ValueError, "q_norm_weight was given"),
    "rms-bias": (lambda q: dict(qk_norm="rms", k_norm_bias=torch.ones(8)), ValueError, "RMSNorm has no bias"),
    "weight-shape": (lambda q: dict(qk_norm="layer", q_norm_weight=torch.ones(7)), ValueError, r"shape \(8,\)"),
    "rope-style": (lambda q: dict(rope_style="neox"), ValueError, "rope_style must be"),
    "rope-not-pair": (lambda q: dict(rope=torch.ones(3, 8)), TypeError, "rope must be None or a pair"),
    "rope-shape": (lambda q: dict(rope=(torch.ones(4, 8), torch.ones(4, 8))), ValueError, "rope cos of shape"),
    "rope-odd-D": (lambda q: dict(q=q[..., :7], k=q[..., :7], rope=(torch.ones(3, 7), torch.ones(3, 7))),
                   ValueError, "even head dim"),
    "eps-zero": (lambda q: dict(norm_eps=0.0), ValueError, "eps must be a positive"),
    "eps-str": (lambda q: dict(norm_eps="1e-6"), TypeError, "eps must be a positive float"),
    "q-not-tensor": (lambda q: dict(q=[1.0]), TypeError, "q must be a Tensor"),
    "weight-not-tensor": (lambda q: dict(qk_norm="layer", q_norm_weight=[1.0] * 8), TypeError,
                          "q_norm_weight must be a Tensor"),
    "D-zero": (lambda q: dict(q=q[..., :0], k=q[..., :0]), ValueError, "D >= 1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case):
    q = torch.randn(2, 3, 2, 8)
    make, err, match = BAD[case]
    args = dict(q=q, k=q.clone())
    args.update(make(q))
    with pytest.raises(err, match=match):
        i2v_kernels.qk_norm_rope(**args)


# --------------------------------------------------------------------------------------------------
# GPU (every tensor built on the device)


GPU_BACKENDS = ["cuda", "triton", "native"]
GPU_TOL = {torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _gpu_check(backend, q, k, kw_, dtype):
    skip_unless_usable(backend, "cuda")
    outs = _run(backend, q, k, **kw_)
    tol = NATIVE_TOL[dtype] if backend == "native" else GPU_TOL[dtype]
    for out, exp, x in zip(outs, _expected(q, k, kw_), (q, k)):
        assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
        torch.testing.assert_close(out, exp, **tol)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_cogvideox_5b(backend, dtype):
    """CogVideoX-5B: LayerNorm with affine + interleaved RoPE on views of a packed qkv, [2, 17776, 48, 64]."""
    B, N, H, D = 2, 17776, 48, 64
    q, k = _packed((B, N), H, D, dtype, device="cuda")
    cos, sin = (torch.randn(N, D, device="cuda") for _ in range(2))
    qw, qb, kw, kb = (torch.randn(D, device="cuda", dtype=dtype) for _ in range(4))
    kw_ = dict(qk_norm="layer", q_norm_weight=qw, q_norm_bias=qb, k_norm_weight=kw, k_norm_bias=kb,
               rope=(cos, sin), rope_style="interleaved")
    _gpu_check(backend, q, k, kw_, dtype)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("D", [40, 72, 96, 128, 256])
def test_gpu_head_dims(backend, style, D):
    dtype = torch.bfloat16
    q, k = _packed((2, 3, 50), 4, D, dtype, device="cuda")  # [B, T, S, H, D]
    cos, sin = (torch.randn(3, 50, D, device="cuda", dtype=dtype) for _ in range(2))
    w = torch.randn(D, device="cuda", dtype=torch.float32)
    kw_ = dict(qk_norm="rms", q_norm_weight=w, k_norm_weight=w, rope=(cos, sin), rope_style=style)
    _gpu_check(backend, q, k, kw_, dtype)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_rows_over_65535(backend):
    """More than 65,535 programs (2.2M rows of D 64 at 32 rows a program): a 1-D grid, int64 offsets."""
    dtype = torch.bfloat16
    N, H, D = 1_100_000, 2, 64
    q, k = _packed((1, N), H, D, dtype, device="cuda")
    cos, sin = (torch.randn(N, D, device="cuda", dtype=dtype) for _ in range(2))
    kw_ = dict(qk_norm="layer", rope=(cos, sin), rope_style="half")
    _gpu_check(backend, q, k, kw_, dtype)


@pytest.mark.needs_cuda
def test_gpu_wan_rms_and_autograd():
    """Wan-like RMSNorm + interleaved RoPE, then gradients through the op on the GPU."""
    dtype = torch.bfloat16
    q, k = _packed((1, 512), 8, 128, dtype, device="cuda")
    q, k = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
    cos, sin = (torch.randn(512, 128, device="cuda") for _ in range(2))
    w = torch.randn(128, device="cuda", dtype=dtype)
    kw_ = dict(qk_norm="rms", q_norm_weight=w, k_norm_weight=w, rope=(cos, sin), rope_style="interleaved")
    _gpu_check("triton", q, k, kw_, dtype)
    with i2v_kernels.use_backend("triton"):
        qo, ko = i2v_kernels.qk_norm_rope(q, k, **kw_)
    (qo.float().sum() + ko.float().square().sum()).backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("offset,pad", [(0, 0), (1, 0), (2, 2), (4, 4)])
def test_gpu_cuda_access_widths(dtype, style, offset, pad):
    """The CUDA kernel's 16-, 8-, 4-byte and scalar accesses on rows that allow each, D = 40 and 72,
    with same-dtype and fp32 side tensors (a wrong width faults or reads across rows)."""
    skip_unless_usable("cuda", "cuda")
    tol = GPU_TOL.get(dtype, TOL[dtype])
    for D in (40, 72):
        for table_dtype in dict.fromkeys((dtype, torch.float32)):
            _aligned_case_check("cuda", dtype, D, style, offset, pad, table_dtype, device="cuda", tol=tol)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("norm", [None, "layer", "rms"])
def test_gpu_non_finite_reaches_its_row_only(backend, norm):
    """The NaN rules under nvcc's --use_fast_math (the kernel's `ss * 0` must survive it)."""
    skip_unless_usable(backend, "cuda")
    _non_finite_check(backend, norm, "cuda")


@pytest.mark.needs_cuda
@pytest.mark.parametrize("D", [33, 7, 1])
def test_gpu_cuda_odd_head_dims_without_rope(D):
    """Odd D (no RoPE): scalar accesses, the last pair's missing half masked."""
    skip_unless_usable("cuda", "cuda")
    q, k = _packed((3, 37), 5, D, torch.float16, device="cuda")
    w = torch.randn(D, device="cuda")
    kw_ = dict(qk_norm="layer", q_norm_weight=w, k_norm_bias=w, rope_style="interleaved")
    _gpu_check("cuda", q, k, kw_, torch.float16)


@pytest.mark.needs_cuda
def test_gpu_cuda_matches_cpu_kernel():
    """The CUDA kernel and its CPU twin (one row routine) agree on a CogVideoX-like call."""
    skip_unless_usable("cuda", "cuda")
    skip_unless_usable("cpu")
    q, k = _packed((2, 300), 6, 64, torch.bfloat16, device="cuda")
    cos, sin = (torch.randn(300, 64, device="cuda") for _ in range(2))
    w = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    kw_ = dict(qk_norm="layer", q_norm_weight=w[0], q_norm_bias=w[1], k_norm_weight=w[2], k_norm_bias=w[3],
               rope=(cos, sin), rope_style="interleaved")
    gpu = _run("cuda", q, k, **kw_)
    cpu_kw = {n: (tuple(t.cpu() for t in v) if isinstance(v, tuple) else v.cpu() if torch.is_tensor(v) else v)
              for n, v in kw_.items()}
    cpu = _run("cpu", q.cpu(), k.cpu(), **cpu_kw)
    for g, c in zip(gpu, cpu):
        torch.testing.assert_close(g.cpu(), c, **GPU_TOL[torch.bfloat16])


def test_alignment_promised_to_the_compiler():
    """ALIGN must divide D (D/2 for the half style) and every row stride, or vectorized loads would
    read across row edges on the GPU (the interpreter ignores the promise, so it is checked here)."""
    from i2v_kernels.ops.qk_norm_rope.triton import _alignment

    assert _alignment(64, False, [[3 * 48 * 64, 64], [3 * 48 * 64, 64], [64, 0]]) == 16
    assert _alignment(72, False, [[3 * 16 * 72, 72], None, None]) == 8
    assert _alignment(40, True, [[40], [40], [0]]) == 4  # D/2 = 20
    assert _alignment(48, False, [[54]]) == 2  # rows of a wider buffer
    assert _alignment(33, False, [[99]]) == 1
