"""The ``native`` backend (stock PyTorch in the input dtype) of every op, against the fp32 reference.

``native`` rounds its intermediates to the input dtype as eager PyTorch does, so half precision gets
the eager-baseline tolerances (the benchmarks' BASELINE_TOL); fp32/fp64 must match tightly. It must
also keep the ops' contracts: outputs in the caller's layout and memory format, strided inputs read
right, optional inputs honoured. The measured outside backends (flash_attn, sageattention) are wired
through the same layout code; a stand-in module checks that wiring here.
"""

import types

import pytest
import torch
import torch.nn.functional as F

import i2v_kernels
from i2v_kernels import _backend, _dispatch
from i2v_kernels.ops.adaln import reference as adaln_ref
from i2v_kernels.ops.attention import reference as attn_ref
from i2v_kernels.ops.conv3d import reference as conv_ref

NATIVE_TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=6e-2, rtol=6e-2),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


BACKEND = "native"


def _native(fn, *args, **kwargs):
    with i2v_kernels.use_backend(BACKEND):
        return fn(*args, **kwargs)


@pytest.fixture(params=["native", "native_packed"])
def attn_backend(request):
    """The attention tests run for both stock-PyTorch layouts (strided views, packed copies)."""
    global BACKEND
    previous, BACKEND = BACKEND, request.param
    yield request.param
    BACKEND = previous


def _close(out, expected, dtype):
    assert out.dtype == dtype and out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected.double(), **NATIVE_TOL[dtype])


# --------------------------------------------------------------------------------------------------
# attention


def _packed(B, T, S, H, D, dtype):
    qkv = torch.randn(B, T, S, 3 * H * D, dtype=dtype)
    return qkv.view(B, T, S, 3, H, D).unbind(3)  # strided views, as a DiT block makes them


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["packed", "packed-b1", "contiguous", "permuted"])
@pytest.mark.parametrize("causal", [False, True])
def test_video_attention(dtype, layout, causal, attn_backend):
    B, T, S, H, D = 2, 5, 12, 3, 16
    if layout.startswith("packed"):  # B = 1: temporal SDPA on [B*S, H, T, D] views on CPU (no copies)
        q, k, v = _packed(1 if layout == "packed-b1" else B, T, S, H, D, dtype)
    elif layout == "contiguous":
        q, k, v = (torch.randn(B, T, S, H, D, dtype=dtype) for _ in range(3))
    else:  # [B, S, T, H, D] memory seen as [B, T, S, H, D]
        q, k, v = (torch.randn(B, S, T, H, D, dtype=dtype).transpose(1, 2) for _ in range(3))
    out = _native(i2v_kernels.temporal_attention, q, k, v, causal=causal)
    _close(out, attn_ref.temporal_attention(q, k, v, causal=causal), dtype)
    assert out.is_contiguous()
    if not causal:
        out = _native(i2v_kernels.spatial_attention, q, k, v, scale=0.3)
        _close(out, attn_ref.spatial_attention(q, k, v, scale=0.3), dtype)
        assert out.is_contiguous()


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("order", ["qkv", "vkq"])
def test_packed_views_non_finite(value, where, order, attn_backend):
    """One non-finite element in one view of a packed projection: the NaN check sums the three views
    as one [3, ...] view of their storage (in either order of offsets), and the rule still holds."""
    q, k, v = _packed(1, 4, 6, 2, 8, torch.float32)
    if order == "vkq":
        q, v = v, q
    t = dict(q=q, k=k, v=v)[where]
    t[0, 2, 3, 1, 5] = value
    for fn in (i2v_kernels.temporal_attention, i2v_kernels.spatial_attention):
        out = _native(fn, q, k, v)
        expected = getattr(attn_ref, fn.__name__)(q, k, v)
        assert expected.isnan().any() and not expected.isnan().all()
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, equal_nan=True)


_BAD = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("value", list(_BAD))
@pytest.mark.parametrize("where", ["q-element", "q-row", "k", "v", "k-masked", "none"])
@pytest.mark.parametrize("grad", [False, True], ids=["plain", "autograd"])
def test_cpu_flash_check_follows_the_nan_rule(dtype, value, where, grad, attn_backend):
    """A plain CPU call checks q, k, v and runs the flash kernel in one C++ call
    (native._cpu_flash_checked); a call recording autograd sums with ATen ops. Every kind of
    non-finite input, in every attention mode, gives exactly the reference's NaNs. The shapes are
    short on purpose: at 6 keys ATen's kernel returned a zero row and lse 0 for a NaN query, so the
    kernel's lse cannot stand in for reading q. k holds a -inf whose scores are all -inf (q >= 0),
    which leaves the kernel's output finite."""
    torch.manual_seed(3)
    bad = _BAD[value]
    B, T, S, H, D, M = 2, 5, 6, 2, 16, 7
    q, k, v = (torch.randn(B, T, S, H, D, dtype=dtype) for _ in range(3))
    qd = torch.randn(B, 11, H, D, dtype=dtype)
    kd, vd = (torch.randn(B, M, H, D, dtype=dtype) for _ in range(2))
    kv_lens = torch.tensor([4, 7])
    if where == "q-element":
        q[1, 2, 3, 1, 5] = qd[1, 4, 0, 7] = bad
    elif where == "q-row":
        q[0, 1, 2, 0] = qd[0, 3, 1] = bad
    elif where == "k":
        q, qd = q.abs(), qd.abs()  # every score of the bad key is -inf for value "-inf": the lse stays finite
        k[1, 3, 4, 1, :] = kd[1, 2, 0, :] = bad
    elif where == "v":
        v[0, 4, 1, 1, 3] = vd[1, 5, 1, 2] = bad
    elif where == "k-masked":  # past kv_lens[0]: no row of sample 0 sees it
        kd[0, 5, 1, 3] = bad
    tensors = (q, k, v, qd, kd, vd)
    if grad:
        for t in tensors:
            t.requires_grad_(True)
    cases = [(lambda: i2v_kernels.attention(qd, kd, vd, kv_lens=kv_lens),
              lambda: attn_ref.attention(qd, kd, vd, kv_lens=kv_lens))]
    if where != "k-masked":
        cases += [
            (lambda: i2v_kernels.spatial_attention(q, k, v), lambda: attn_ref.spatial_attention(q, k, v)),
            (lambda: i2v_kernels.temporal_attention(q, k, v, causal=True),
             lambda: attn_ref.temporal_attention(q, k, v, causal=True)),
            (lambda: i2v_kernels.temporal_attention(q, k, v), lambda: attn_ref.temporal_attention(q, k, v)),
            (lambda: i2v_kernels.attention(qd, kd, vd), lambda: attn_ref.attention(qd, kd, vd)),
        ]
    for ours, ref in cases:
        out, expected = _native(ours), ref()
        if where == "none" or where == "k-masked":
            assert torch.isfinite(expected).all()
        else:
            assert expected.isnan().any()
        assert out.dtype == dtype and out.shape == expected.shape
        torch.testing.assert_close(out.detach().double(), expected.detach().double(), equal_nan=True,
                                   **NATIVE_TOL[dtype])


def test_cpu_flash_check_runs_the_cpp_op(monkeypatch):
    """A plain CPU call goes through the C++ op (one call: check, then the kernel); when the op says
    None the full path still gives the rule's NaNs."""
    if not _backend._has_kernel("_sdpa_cpu_checked", "CPU"):
        pytest.skip("i2v_kernels._C without the CPU kernels")
    from i2v_kernels.ops.attention import native

    calls = []
    real = torch.ops.i2v_kernels._sdpa_cpu_checked

    class Ops:
        @staticmethod
        def _sdpa_cpu_checked(*args):
            calls.append(args)
            return real(*args)

    monkeypatch.setattr(native.torch.ops, "i2v_kernels", Ops)
    q, k, v = (torch.randn(1, 9, 2, 8) for _ in range(3))
    _close(_native(i2v_kernels.attention, q, k, v), attn_ref.attention(q, k, v), torch.float32)
    assert len(calls) == 1
    q[0, 3, 1, 2] = float("nan")
    assert real(*(t.transpose(1, 2) for t in (q, k, v)), None, False, 0.3) is None
    out = _native(i2v_kernels.attention, q, k, v)
    assert out[0, 3, 1].isnan().all() and out.isnan().sum() == 8


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qk_norm", [None, "layer", "rms"])
@pytest.mark.parametrize("rope_style", [None, "interleaved", "half"])
def test_attention_prologue(dtype, qk_norm, rope_style, attn_backend):
    B, T, S, H, D = 1, 3, 10, 2, 8
    q, k, v = _packed(B, T, S, H, D, dtype)
    kw = {}
    if qk_norm:
        kw.update(qk_norm=qk_norm, q_norm_weight=torch.randn(D, dtype=dtype), k_norm_weight=torch.randn(D, dtype=dtype))
        if qk_norm == "layer":
            kw.update(q_norm_bias=torch.randn(D, dtype=dtype), k_norm_bias=torch.randn(D, dtype=dtype))
    if rope_style:
        angle = torch.randn(T, S, D, dtype=torch.float32)
        kw.update(rope=(angle.cos().to(dtype), angle.sin().to(dtype)), rope_style=rope_style)
    for fn, ref_fn in ((i2v_kernels.spatial_attention, attn_ref.spatial_attention),
                       (i2v_kernels.temporal_attention, attn_ref.temporal_attention)):
        ref_kw = {**kw, "rope": kw.get("rope")}
        _close(_native(fn, q, k, v, **kw), ref_fn(q, k, v, **ref_kw), dtype)
    dense = [t.flatten(1, 2) for t in (q, k, v)]
    if rope_style:
        kw["rope"] = tuple(t.flatten(0, 1) for t in kw["rope"])
    _close(_native(i2v_kernels.attention, *dense, **kw), attn_ref.attention(*dense, **kw), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_attention_kv_lens(dtype, attn_backend):
    B, N, M, H, D = 3, 17, 9, 2, 16
    q = torch.randn(B, N, H, D, dtype=dtype)
    k, v = (torch.randn(B, M, H, D, dtype=dtype) for _ in range(2))
    kv_lens = torch.tensor([9, 1, 4, 7, 2, 5])[::2]  # a strided side tensor: [9, 4, 2]
    k_poisoned = k.clone()
    for b, n in enumerate(kv_lens.tolist()):
        k_poisoned[b, n:] = 1e4  # keys past kv_lens must have no effect
    out = _native(i2v_kernels.attention, q, k_poisoned, v, kv_lens=kv_lens)
    _close(out, attn_ref.attention(q, k, v, kv_lens=kv_lens), dtype)


def test_sdpa_chunks_past_the_grid_limit(monkeypatch, attn_backend):
    """Batch or heads above a CUDA grid dim are split (the limit is lowered here to test it on CPU)."""
    from i2v_kernels.ops.attention import native

    monkeypatch.setattr(native, "GRID_YZ", 4)
    q, k, v = (torch.randn(1, 3, 11, 2, 8) for _ in range(3))  # temporal: heads = S*H = 22 > 4
    _close(_native(i2v_kernels.temporal_attention, q, k, v, causal=True),
           attn_ref.temporal_attention(q, k, v, causal=True), torch.float32)
    q = torch.randn(9, 5, 2, 8)  # dense with kv_lens: batch 9 > 4, the mask split with it
    kv_lens = torch.arange(9) % 5 + 1
    _close(_native(i2v_kernels.attention, q, q, q, kv_lens=kv_lens), attn_ref.attention(q, q, q, kv_lens=kv_lens),
           torch.float32)


def _fake_outside(name):
    """A stand-in for an outside library computing with SDPA in its [batch, seq, H, D] layout."""
    calls = []

    def attend(q, k, v, scale, causal):
        calls.append(tuple(q.shape))
        assert q.dim() == 4 and q.stride(-1) == 1
        t = lambda x: x.transpose(1, 2).float()
        return F.scaled_dot_product_attention(t(q), t(k), t(v), is_causal=causal, scale=scale).transpose(1, 2).to(q.dtype)

    if name == "flash_attn":
        module = types.SimpleNamespace(flash_attn_func=lambda q, k, v, softmax_scale, causal: attend(q, k, v, softmax_scale, causal))
    else:
        module = types.SimpleNamespace(sageattn=lambda q, k, v, tensor_layout, is_causal, sm_scale: attend(q, k, v, sm_scale, is_causal))
    return module, calls


@pytest.mark.parametrize("name", ["flash_attn", "sageattention"])
def test_outside_library_wiring(name, monkeypatch):
    from i2v_kernels.ops.attention import native

    module, calls = _fake_outside(name)
    B, T, S, H, D = 2, 4, 6, 2, 64
    q, k, v = _packed(B, T, S, H, D, torch.bfloat16)
    for mode, fn, ref_fn, kw in ((native.SPATIAL, i2v_kernels.spatial_attention, attn_ref.spatial_attention, {}),
                                 (native.TEMPORAL, i2v_kernels.temporal_attention, attn_ref.temporal_attention,
                                  {"causal": True})):
        causal = kw.get("causal", False)
        out = native.outside(name, module, mode, q, k, v, D ** -0.5, causal, None, None, None, None, None, 1e-6,
                             None, None, "interleaved")
        _close(out, ref_fn(q, k, v, **kw), torch.bfloat16)
    assert calls == [(B * T, S, H, D), (B * S, T, H, D)]
    assert native.outside_why_not(name, q.float(), None) is not None  # fp32: ruled out
    assert native.outside_why_not(name, q, torch.ones(2, dtype=torch.int32)) is not None  # kv_lens: ruled out
    # on CPU tensors the outside backends are never eligible, and forcing one says why
    with i2v_kernels.use_backend(name), pytest.raises(i2v_kernels.BackendUnavailableError, match="CUDA"):
        i2v_kernels.spatial_attention(q, k, v)


# --------------------------------------------------------------------------------------------------
# adaLN family


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mods", ["per-sample", "per-frame", "per-token", "fp32-mods"])
def test_adaln_family(dtype, mods):
    B, T, S, C = 2, 3, 5, 24
    x, y = torch.randn(B, T, S, C, dtype=dtype), torch.randn(B, T, S, C, dtype=dtype)
    mod_dtype = torch.float32 if mods == "fp32-mods" else dtype
    shape = {"per-sample": (B, 1, 1, C), "per-frame": (B, T, 1, C), "per-token": (B, T, S, C),
             "fp32-mods": (B, 1, 1, C)}[mods]
    gate, shift, scale = (torch.randn(shape, dtype=mod_dtype) for _ in range(3))
    weight, bias = torch.randn(C, dtype=dtype), torch.randn(C, dtype=dtype)
    _close(_native(i2v_kernels.adaln_modulate, x, shift, scale, weight=weight, bias=bias),
           adaln_ref.adaln_modulate(x, shift, scale, weight=weight, bias=bias), dtype)
    _close(_native(i2v_kernels.gated_residual, x, y, gate), adaln_ref.gated_residual(x, y, gate), dtype)
    r, out = _native(i2v_kernels.gated_residual_adaln, x, y, gate, shift, scale)
    r_ref, out_ref = adaln_ref.gated_residual_adaln(x, y, gate, shift, scale)
    _close(r, r_ref, dtype)
    _close(out, out_ref, dtype)
    _close(_native(i2v_kernels.rms_norm, x, weight), adaln_ref.rms_norm(x, weight), dtype)
    assert _native(i2v_kernels.adaln_modulate, x.transpose(1, 2), None, None).is_contiguous()


# --------------------------------------------------------------------------------------------------
# causal conv3d


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", ["replicate", "zeros", "cache", "stride-t2", "dilation", "k1", "residual"])
def test_causal_conv3d(dtype, case):
    B, Cin, Cout, T, H, W = 2, 6, 5, 7, 9, 8
    k, stride, dilation, time_pad = (3, 3, 3), 1, 1, "replicate"
    if case == "zeros":
        time_pad = "zeros"
    if case == "stride-t2":
        stride = (2, 1, 2)
    if case == "dilation":
        dilation = (2, 1, 1)
    if case == "k1":
        k = (1, 3, 1)
    x = torch.randn(B, Cin, T, H, W, dtype=dtype)
    w, b = torch.randn(Cout, Cin, *k, dtype=dtype) * 0.2, torch.randn(Cout, dtype=dtype)
    P = (k[0] - 1) * (dilation if isinstance(dilation, int) else dilation[0])
    cache = torch.randn(B, Cin, P, H, W, dtype=dtype) if case == "cache" else None
    expected = conv_ref.causal_conv3d(x, w, b, stride=stride, dilation=dilation, time_pad=time_pad, cache=cache)
    residual = torch.randn(expected.shape, dtype=dtype) if case == "residual" else None
    if residual is not None:
        expected = expected + residual
    y = _native(i2v_kernels.causal_conv3d, x, w, b, stride=stride, dilation=dilation, time_pad=time_pad, cache=cache,
                residual=residual)
    _close(y, expected, dtype)
    assert y.stride() == torch.empty(y.shape).stride()  # the op's CPU output format: NCDHW


@pytest.mark.parametrize("time_pad", ["replicate", "zeros", "cache"])
def test_causal_conv3d_channels_last_input(time_pad):
    """The CPU path builds its padded NCDHW input from any layout (the bench and decoders hand it
    channels_last_3d tensors), dilated spatial padding included; output NCDHW (the op's CPU format)."""
    B, Cin, Cout, T, H, W = 1, 5, 4, 3, 6, 7
    x = torch.randn(B, Cin, T, H, W).contiguous(memory_format=torch.channels_last_3d)
    w, b = torch.randn(Cout, Cin, 3, 3, 3) * 0.2, torch.randn(Cout)
    cache = torch.randn(B, Cin, 2, H, W).contiguous(memory_format=torch.channels_last_3d) if time_pad == "cache" else None
    pad = "zeros" if time_pad == "cache" else time_pad
    kw = dict(dilation=(1, 2, 1), time_pad=pad, cache=cache)
    expected = conv_ref.causal_conv3d(x, w, b, **kw)
    residual = torch.randn(expected.shape)
    y = _native(i2v_kernels.causal_conv3d, x, w, b, residual=residual, **kw)
    _close(y, expected + residual, torch.float32)
    assert y.stride() == torch.empty(y.shape).stride()


def test_native_is_an_auto_candidate_everywhere():
    """native runs on any device and is never ruled out for a valid call; torch is not a candidate."""
    x = torch.randn(2, 4, 8)
    assert "native" in _backend.eligible("adaln_modulate", x.device, lambda b: None, _backend.BACKENDS)
    assert "torch" not in _backend.eligible("adaln_modulate", x.device, lambda b: None, _backend.BACKENDS)
    assert _backend.eligible("x", x.device, lambda b: "no", ("native", "torch")) == ["torch"]
    assert _dispatch.default_choice(torch.device("cuda"), ["triton", "native"]) == "native"


def test_auto_prologue_runs_through_qk_norm_rope():
    """Under auto, native attention's QK-norm + RoPE is the qk_norm_rope op (one pass over q and k,
    its own backend measured), and the result matches the reference."""
    B, T, S, H, D = 1, 2, 6, 2, 8
    q, k, v = _packed(B, T, S, H, D, torch.float32)
    angle = torch.randn(S, D)
    kw = dict(qk_norm="rms", q_norm_weight=torch.randn(D), k_norm_weight=torch.randn(D), rope=(angle.cos(), angle.sin()))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = i2v_kernels.spatial_attention(q, k, v, **kw)
    names = {e.name for e in prof.events()}
    assert "i2v_kernels::qk_norm_rope" in names
    _close(out, attn_ref.spatial_attention(q, k, v, **kw), torch.float32)
