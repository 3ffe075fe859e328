"""Fused adaLN family: every backend that can run here against the fp32/fp64 reference."""

import pytest
import torch

import i2v_kernels
from i2v_kernels.ops.adaln import reference as ref
from _util import TOL, skip_unless_usable

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CPU_BACKENDS = ["triton", "cpu", "torch"]


# --------------------------------------------------------------------------------------------------
# Inputs: each case makes (x, modulation shape) with readable ids


def _strided(shape, how):
    """x of `shape`, made non-contiguous in the named way."""
    if how == "contiguous":
        return torch.randn(shape)
    if how == "permuted":  # leading dims swapped: a transposed view
        return torch.randn(shape[0], shape[2], shape[1], *shape[3:]).transpose(1, 2)
    if how == "sliced":  # rows of a wider buffer (unit stride on C, row stride > C)
        return torch.randn(*shape[:-1], shape[-1] + 13)[..., : shape[-1]]
    if how == "every-other-row":
        return torch.randn(shape[0], 2 * shape[1], *shape[2:])[:, ::2]
    raise AssertionError(how)


CASES = {
    # id: (x shape, modulation shape, layout)
    "per-sample-B2N7C64": ((2, 7, 64), (2, 1, 64), "contiguous"),
    "per-frame-B2T3S5C48": ((2, 3, 5, 48), (2, 3, 1, 48), "contiguous"),
    "per-token-B2N9C40": ((2, 9, 40), (2, 9, 40), "contiguous"),
    "shared-C1000": ((3, 5, 1000), (1000,), "contiguous"),
    "per-position-B2T3S4C32": ((2, 3, 4, 32), (2, 1, 4, 32), "contiguous"),
    "one-frame-C1152": ((1, 1, 3, 1152), (1, 1, 1, 1152), "contiguous"),
    "C1": ((4, 3, 1), (4, 1, 1), "contiguous"),
    "permuted-C64": ((2, 3, 5, 64), (2, 1, 1, 64), "permuted"),
    "sliced-C72": ((2, 6, 72), (2, 1, 72), "sliced"),
    "strided-rows-C96": ((2, 4, 3, 96), (2, 1, 3, 96), "every-other-row"),
}


def _case(case, dtype, mod_dtype=None):
    shape, mshape, how = CASES[case]
    x = _strided(shape, how).to(dtype)
    mod_dtype = mod_dtype or dtype
    shift, scale, gate = (torch.randn(mshape).to(mod_dtype) for _ in range(3))
    y = torch.randn(shape).to(dtype)
    C = shape[-1]
    weight, bias = torch.randn(C).to(mod_dtype), torch.randn(C).to(mod_dtype)
    return x, y, gate, shift, scale, weight, bias


def _run(backend, fn):
    with i2v_kernels.use_backend(backend):
        return fn()


def _close(actual, expected, dtype):
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, **TOL[dtype])


# --------------------------------------------------------------------------------------------------
# Forward against the reference


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_adaln_modulate(backend, dtype, case):
    skip_unless_usable(backend)
    x, _, _, shift, scale, weight, bias = _case(case, dtype)
    out = _run(backend, lambda: i2v_kernels.adaln_modulate(x, shift, scale, eps=1e-5))
    _close(out, ref.adaln_modulate(x, shift, scale, eps=1e-5), dtype)
    out = _run(backend, lambda: i2v_kernels.adaln_modulate(x, shift, scale, weight=weight, bias=bias))
    _close(out, ref.adaln_modulate(x, shift, scale, weight=weight, bias=bias), dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_gated_residual_adaln(backend, dtype, case):
    skip_unless_usable(backend)
    x, y, gate, shift, scale, weight, bias = _case(case, dtype)
    r, out = _run(backend, lambda: i2v_kernels.gated_residual_adaln(x, y, gate, shift, scale))
    r_ref, out_ref = ref.gated_residual_adaln(x, y, gate, shift, scale)
    _close(r, r_ref, dtype)
    _close(out, out_ref, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["per-sample-B2N7C64", "per-frame-B2T3S5C48", "shared-C1000", "sliced-C72", "C1"])
def test_gated_residual(backend, dtype, case):
    skip_unless_usable(backend)
    x, y, gate, *_ = _case(case, dtype)
    out = _run(backend, lambda: i2v_kernels.gated_residual(x, y, gate))
    _close(out, ref.gated_residual(x, y, gate), dtype)
    out = _run(backend, lambda: i2v_kernels.gated_residual(x, y, None))
    _close(out, (x.float() + y.float()).to(dtype), dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["per-sample-B2N7C64", "shared-C1000", "permuted-C64", "sliced-C72", "C1"])
def test_rms_norm(backend, dtype, case):
    skip_unless_usable(backend)
    x, *_, weight, _ = _case(case, dtype)
    _close(_run(backend, lambda: i2v_kernels.rms_norm(x, weight)), ref.rms_norm(x, weight), dtype)
    _close(_run(backend, lambda: i2v_kernels.rms_norm(x, eps=1e-3)), ref.rms_norm(x, eps=1e-3), dtype)


def test_reference_matches_pytorch_layer_norm():
    """The oracle itself, against torch's own LayerNorm/RMSNorm in fp64."""
    x, y, gate, shift, scale, weight, bias = _case("per-frame-B2T3S5C48", torch.float64)
    ln = torch.nn.functional.layer_norm(x, (48,), weight, bias, eps=1e-6)
    torch.testing.assert_close(ref.adaln_modulate(x, shift, scale, weight=weight, bias=bias), ln * (1 + scale) + shift)
    r = x + gate * y
    r2, out = ref.gated_residual_adaln(x, y, gate, shift, scale)
    torch.testing.assert_close(r2, r)
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(r, (48,), eps=1e-6) * (1 + scale) + shift)
    torch.testing.assert_close(ref.rms_norm(x, weight), torch.nn.functional.rms_norm(x, (48,), weight, eps=1e-6))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_float64(backend):
    skip_unless_usable(backend)
    x, y, gate, shift, scale, weight, bias = _case("per-frame-B2T3S5C48", torch.float64)
    r, out = _run(backend, lambda: i2v_kernels.gated_residual_adaln(x, y, gate, shift, scale, weight=weight, bias=bias))
    r_ref, out_ref = ref.gated_residual_adaln(x, y, gate, shift, scale, weight=weight, bias=bias)
    _close(r, r_ref, torch.float64)
    _close(out, out_ref, torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_modulation_with_half_x(backend, dtype):
    """Wan keeps its modulation in fp32 next to bf16 activations: no lossy cast of the modulation."""
    skip_unless_usable(backend)
    x, y, gate, shift, scale, weight, bias = _case("per-frame-B2T3S5C48", dtype, mod_dtype=torch.float32)
    r, out = _run(backend, lambda: i2v_kernels.gated_residual_adaln(x, y, gate, shift, scale, weight=weight, bias=bias))
    r_ref, out_ref = ref.gated_residual_adaln(x, y, gate, shift, scale, weight=weight, bias=bias)
    _close(r, r_ref, dtype)
    _close(out, out_ref, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_shift_or_scale_absent(backend):
    skip_unless_usable(backend)
    x, _, _, shift, scale, *_ = _case("per-sample-B2N7C64", torch.float32)
    _close(_run(backend, lambda: i2v_kernels.adaln_modulate(x, None, scale)), ref.adaln_modulate(x, None, scale), torch.float32)
    _close(_run(backend, lambda: i2v_kernels.adaln_modulate(x, shift, None)), ref.adaln_modulate(x, shift, None), torch.float32)
    plain = torch.nn.functional.layer_norm(x, (64,), eps=1e-6)
    _close(_run(backend, lambda: i2v_kernels.adaln_modulate(x, None, None)), plain, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64), (0, 3, 5, 8)], ids=str)
def test_empty_rows(backend, shape):
    skip_unless_usable(backend)
    x = torch.randn(shape)
    out = _run(backend, lambda: i2v_kernels.adaln_modulate(x, torch.randn(shape[-1]), torch.randn(shape[-1])))
    assert out.shape == x.shape
    r, out = _run(backend, lambda: i2v_kernels.gated_residual_adaln(x, x, None, None, None))
    assert r.shape == out.shape == x.shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_constant_rows_stay_finite(backend):
    """A constant row has zero variance: eps alone keeps the result finite (it is shift)."""
    skip_unless_usable(backend)
    x = torch.full((3, 4, 32), 2.5)
    shift, scale = torch.randn(3, 1, 32), torch.randn(3, 1, 32)
    out = _run(backend, lambda: i2v_kernels.adaln_modulate(x, shift, scale))
    torch.testing.assert_close(out, shift.expand_as(out), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_modulation_is_read_in_place(backend, monkeypatch):
    """Broadcast modulation reaches the kernel as stride-0 views of the original storage, not copies."""
    skip_unless_usable(backend)
    if backend == "torch":
        pytest.skip("the reference broadcasts through PyTorch ops")
    seen = []
    import i2v_kernels.ops.adaln as adaln_ops

    original = adaln_ops._kernel_views

    def spy(*args):
        views = original(*args)
        seen.append(views)
        return views

    monkeypatch.setattr(adaln_ops, "_kernel_views", spy)
    x, _, _, shift, scale, *_ = _case("per-frame-B2T3S5C48", torch.float32)
    _run(backend, lambda: i2v_kernels.adaln_modulate(x, shift, scale))
    (_, _, _, shift_v, scale_v, _, _), = seen
    assert shift_v.data_ptr() == shift.data_ptr() and scale_v.data_ptr() == scale.data_ptr()
    assert shift_v.stride()[2] == 0 and shift_v.shape == x.shape


# --------------------------------------------------------------------------------------------------
# Gradients


def _grad_inputs(dtype=torch.float64):
    x, y, gate, shift, scale, weight, bias = _case("per-frame-B2T3S5C48", dtype)
    x = x[:, :2, :3, :6].clone()
    y = y[:, :2, :3, :6].clone()
    gate, shift, scale = gate[:, :2, :, :6].clone(), shift[:, :1, :, :6].clone(), scale[:, :2, :, :6].clone()
    weight, bias = weight[:6].clone(), bias[:6].clone()
    return [t.requires_grad_() for t in (x, y, gate, shift, scale, weight, bias)]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_gradcheck(backend):
    skip_unless_usable(backend)
    x, y, gate, shift, scale, weight, bias = _grad_inputs()
    with i2v_kernels.use_backend(backend):
        torch.autograd.gradcheck(lambda *a: i2v_kernels.adaln_modulate(a[0], a[1], a[2], weight=a[3], bias=a[4]),
                                 (x, shift, scale, weight, bias))
        torch.autograd.gradcheck(lambda *a: i2v_kernels.gated_residual_adaln(*a[:5], weight=a[5], bias=a[6]),
                                 (x, y, gate, shift, scale, weight, bias))
        torch.autograd.gradcheck(i2v_kernels.gated_residual, (x, y, gate))
        torch.autograd.gradcheck(lambda a, w: i2v_kernels.rms_norm(a, w), (x, weight))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradients_match_reference_autograd(backend):
    """fp32 gradients of every input (broadcast ones summed back) against autograd of the reference."""
    skip_unless_usable(backend)
    inputs = _grad_inputs(torch.float32)
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    r, out = _run(backend, lambda: i2v_kernels.gated_residual_adaln(*inputs[:5], weight=inputs[5], bias=inputs[6]))
    r_ref, out_ref = ref.gated_residual_adaln(*ref_inputs[:5], weight=ref_inputs[5], bias=ref_inputs[6])
    g_out, g_r = torch.randn_like(out), torch.randn_like(r)
    torch.autograd.backward((out, r), (g_out, g_r))
    torch.autograd.backward((out_ref, r_ref), (g_out, g_r))
    for t, t_ref in zip(inputs, ref_inputs):
        assert t.grad.shape == t.shape
        torch.testing.assert_close(t.grad, t_ref.grad, atol=1e-4, rtol=1e-4)


def test_backward_honours_needs_input_grad():
    x, _, _, shift, scale, *_ = _case("per-sample-B2N7C64", torch.float32)
    x.requires_grad_()
    out = i2v_kernels.adaln_modulate(x, shift, scale)
    out.sum().backward()
    assert x.grad is not None and shift.grad is None and scale.grad is None


# --------------------------------------------------------------------------------------------------
# torch.library contract: opcheck and torch.compile


def _opcheck_samples():
    x, y, gate, shift, scale, weight, bias = _case("per-frame-B2T3S5C48", torch.float32)
    x.requires_grad_()
    shift.requires_grad_()
    return [
        (torch.ops.i2v_kernels.adaln_modulate, (x, shift, scale, weight, bias, 1e-6)),
        (torch.ops.i2v_kernels.adaln_modulate, (x, None, scale, None, None, 1e-5)),
        (torch.ops.i2v_kernels.gated_residual, (x, y, gate)),
        (torch.ops.i2v_kernels.gated_residual_adaln, (x, y, gate, shift, scale, None, bias, 1e-6)),
        (torch.ops.i2v_kernels.rms_norm, (x, weight, 1e-6)),
    ]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    skip_unless_usable(backend)
    with i2v_kernels.use_backend(backend):
        for op, args in _opcheck_samples():
            torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph(backend):
    skip_unless_usable(backend)

    def block(x, y, gate, shift, scale, weight):
        r, h = i2v_kernels.gated_residual_adaln(x, y, gate, shift, scale)
        h = i2v_kernels.rms_norm(h, weight)
        return i2v_kernels.gated_residual(r, h, gate), i2v_kernels.adaln_modulate(r, shift, scale)

    x, y, gate, shift, scale, weight, _ = _case("per-frame-B2T3S5C48", torch.float32)
    x.requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with i2v_kernels.use_backend(backend):
        expected = block(x, y, gate, shift, scale, weight)
        actual = compiled(x, y, gate, shift, scale, weight)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e)
        (g_expected,) = torch.autograd.grad(sum(t.sum() for t in expected), x)
        (g_actual,) = torch.autograd.grad(sum(t.sum() for t in actual), x)
    torch.testing.assert_close(g_actual, g_expected)


# --------------------------------------------------------------------------------------------------
# Bad input


def _bad_inputs():
    x = torch.randn(2, 5, 16)
    m = torch.randn(2, 1, 16)
    return [
        ("mismatched-C", lambda: i2v_kernels.adaln_modulate(x, torch.randn(2, 1, 8), m), ValueError, "shift"),
        ("not-broadcastable", lambda: i2v_kernels.adaln_modulate(x, m, torch.randn(3, 1, 16)), ValueError, "scale"),
        ("mod-rank-too-high", lambda: i2v_kernels.adaln_modulate(x, torch.randn(1, 2, 5, 16), m), ValueError, "shift"),
        ("int-x", lambda: i2v_kernels.adaln_modulate(x.long(), m, m), TypeError, "x"),
        ("int-gate", lambda: i2v_kernels.gated_residual(x, x, m.int()), TypeError, "gate"),
        ("negative-eps", lambda: i2v_kernels.adaln_modulate(x, m, m, eps=-1e-6), ValueError, "eps"),
        ("zero-eps", lambda: i2v_kernels.rms_norm(x, eps=0.0), ValueError, "eps"),
        ("nan-eps", lambda: i2v_kernels.rms_norm(x, eps=float("nan")), ValueError, "eps"),
        ("string-eps", lambda: i2v_kernels.rms_norm(x, eps="1e-6"), TypeError, "eps"),
        ("mixed-devices", lambda: i2v_kernels.adaln_modulate(x, m.to("meta"), m), ValueError, "shift"),
        ("y-shape", lambda: i2v_kernels.gated_residual(x, x[:, :3], m), ValueError, "y"),
        ("y-dtype", lambda: i2v_kernels.gated_residual(x, x.double(), m), TypeError, "y"),
        ("weight-shape", lambda: i2v_kernels.rms_norm(x, torch.randn(15)), ValueError, "weight"),
        ("bias-shape", lambda: i2v_kernels.adaln_modulate(x, m, m, bias=torch.randn(1, 16)), ValueError, "bias"),
        ("scalar-x", lambda: i2v_kernels.rms_norm(torch.tensor(1.0)), ValueError, "x"),
        ("zero-channels", lambda: i2v_kernels.rms_norm(torch.randn(3, 0)), ValueError, "x"),
        ("not-a-tensor", lambda: i2v_kernels.gated_residual(x, [1.0], m), TypeError, "y"),
    ]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", [b[0] for b in _bad_inputs()])
def test_bad_input_names_the_argument(backend, name):
    skip_unless_usable(backend)
    (fn, exc, arg), = [b[1:] for b in _bad_inputs() if b[0] == name]
    with i2v_kernels.use_backend(backend), pytest.raises(exc, match=rf"\b{arg}\b"):
        fn()


def test_cpp_op_checks_its_arguments():
    """Called directly (bypassing the Python checks), the C++ op refuses bad input with TORCH_CHECK."""
    skip_unless_usable("cpu")
    x = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match="shift"):
        torch.ops.i2v_kernels._adaln_fwd(x, None, None, torch.randn(4, 8), None, None, None, 1, 1e-6)
    with pytest.raises(RuntimeError, match="eps"):
        torch.ops.i2v_kernels._adaln_fwd(x, None, None, None, None, None, None, 1, -1.0)
    with pytest.raises(RuntimeError, match="x"):
        torch.ops.i2v_kernels._adaln_fwd(x.t(), None, None, None, None, None, None, 1, 1e-6)


def test_triton_refuses_rows_wider_than_registers():
    from i2v_kernels.ops.adaln import triton as adaln_triton

    x = torch.empty(2, adaln_triton.MAX_C + 1)
    assert "exceeds" in adaln_triton.why_not(x, [None] * 4)
    assert "float64" in adaln_triton.why_not(x.double()[:, :8], [None] * 4)


# --------------------------------------------------------------------------------------------------
# Module


def test_adaln_module_kernels_match_plain_pytorch():
    x = torch.randn(2, 3, 5, 32)
    shift, scale = torch.randn(2, 3, 1, 32), torch.randn(2, 1, 1, 32)
    fused = i2v_kernels.AdaLNModulate(32, elementwise_affine=True)
    plain = i2v_kernels.AdaLNModulate(32, elementwise_affine=True, use_kernels=False)
    with torch.no_grad():
        fused.weight.normal_()
        fused.bias.normal_()
    plain.load_state_dict(fused.state_dict())
    a, b = fused(x, shift, scale), plain(x, shift, scale)
    torch.testing.assert_close(a, b)
    a.square().sum().backward()
    b.square().sum().backward()
    torch.testing.assert_close(fused.weight.grad, plain.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused.bias.grad, plain.bias.grad, atol=1e-4, rtol=1e-4)
    assert "use_kernels=True" in repr(fused)


# --------------------------------------------------------------------------------------------------
# GPU paths


GPU_CASES = {
    "latte-C1152-per-frame": ((2, 16, 256, 1152), (2, 16, 1, 1152)),
    "cogvideox-C3072-per-sample": ((2, 1350, 3072), (2, 1, 3072)),
    "wan-C5120-fp32-mod": ((1, 780, 5120), (1, 1, 5120)),
    "odd-C1000": ((3, 333, 1000), (3, 1, 1000)),
    "odd-C999-unaligned": ((2, 77, 999), (999,)),
    "rows-over-65535-C64": ((70000, 64), (64,)),
}


@pytest.mark.needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_backends(backend, dtype, case):
    skip_unless_usable(backend, "cuda")
    shape, mshape = GPU_CASES[case]
    mod_dtype = torch.float32 if "fp32-mod" in case else dtype
    x, y = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(2))
    shift, scale, gate = (torch.randn(mshape, device="cuda", dtype=mod_dtype) for _ in range(3))
    weight = torch.randn(shape[-1], device="cuda", dtype=mod_dtype)
    with i2v_kernels.use_backend(backend):
        r, out = i2v_kernels.gated_residual_adaln(x, y, gate, shift, scale, weight=weight)
        mod = i2v_kernels.adaln_modulate(x, shift, scale)
        rms = i2v_kernels.rms_norm(x, weight)
        gr = i2v_kernels.gated_residual(x, y, gate)
    r_ref, out_ref = ref.gated_residual_adaln(x, y, gate, shift, scale, weight=weight)
    _close(r, r_ref, dtype)
    _close(out, out_ref, dtype)
    _close(mod, ref.adaln_modulate(x, shift, scale), dtype)
    _close(rms, ref.rms_norm(x, weight), dtype)
    _close(gr, ref.gated_residual(x, y, gate), dtype)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_strided_inputs(backend):
    skip_unless_usable(backend, "cuda")
    base = torch.randn(2, 8, 5, 3 * 256, device="cuda", dtype=torch.bfloat16)
    x = base[..., 256:512].transpose(1, 2)  # [2, 5, 8, 256], sliced and permuted
    shift = torch.randn(2, 1, 8, 256, device="cuda", dtype=torch.bfloat16)
    with i2v_kernels.use_backend(backend):
        out = i2v_kernels.adaln_modulate(x, shift, shift)
    _close(out, ref.adaln_modulate(x, shift, shift), torch.bfloat16)


@pytest.mark.needs_cuda
def test_gpu_wide_rows_fall_back_from_triton():
    x = torch.randn(4, 40000, device="cuda", dtype=torch.bfloat16)
    m = torch.randn(40000, device="cuda", dtype=torch.bfloat16)
    with i2v_kernels.use_backend("triton"), pytest.raises(i2v_kernels.BackendUnavailableError, match="exceeds"):
        i2v_kernels.adaln_modulate(x, m, m)
    _close(i2v_kernels.adaln_modulate(x, m, m), ref.adaln_modulate(x, m, m), torch.bfloat16)
