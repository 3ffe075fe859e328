"""Attention family: spatial, temporal, dense/cross, with the fused QK-norm + RoPE prologue.

Pass criterion (STYLE.md): the kernel's error against the fp32 reference is at most 2x the error of
PyTorch's own same-dtype eager attention (scores, softmax and the value product each rounded to the
dtype, as a DiT written in eager PyTorch computes them), plus a small absolute slack.
"""

import pytest
import torch

import i2v_kernels
from i2v_kernels import _backend
from i2v_kernels.ops.attention import native
from i2v_kernels.ops.attention import reference as ref
from _util import skip_unless_usable

HALF = [torch.float16, torch.bfloat16]


def _eager_same_dtype(q, k, v, scale, causal=False, kv_lens=None):
    """Attention computed entirely in q's dtype, as eager PyTorch does it: [..., S, D] inputs."""
    s = (q @ k.transpose(-1, -2)) * scale
    Sq, Sk = s.shape[-2:]
    if causal:
        s = s.masked_fill(~torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if kv_lens is not None:
        s = s.masked_fill(~(torch.arange(Sk, device=q.device) < kv_lens.view(-1, *([1] * (s.dim() - 1)))),
                          float("-inf"))
    return s.softmax(-1) @ v


def _eager_mode(mode, q, k, v, scale, causal=False, kv_lens=None):
    """_eager_same_dtype in the caller's layout for each mode."""
    if mode == "spatial":
        t = lambda x: x.transpose(2, 3)
        return t(_eager_same_dtype(t(q), t(k), t(v), scale))
    if mode == "temporal":
        p = lambda x: x.permute(0, 2, 3, 1, 4)
        return _eager_same_dtype(p(q), p(k), p(v), scale, causal=causal).permute(0, 3, 1, 2, 4)
    t = lambda x: x.transpose(1, 2)
    return t(_eager_same_dtype(t(q), t(k), t(v), scale, kv_lens=kv_lens))


def _assert_within_eager_error(out, expected, eager, slack=2e-3):
    err = (out.double() - expected.double()).abs().max().item()
    eager_err = (eager.double() - expected.double()).abs().max().item()
    assert out.dtype == eager.dtype and out.shape == expected.shape
    assert err <= 2 * eager_err + slack, f"kernel error {err:.3g} > 2 x eager same-dtype error {eager_err:.3g}"


def _packed_qkv(B, T, S, H, D, dtype):
    """q, k, v as strided views of one packed projection, the way a DiT block makes them."""
    qkv = torch.randn(B, T, S, 3 * H * D, dtype=dtype)
    return qkv.view(B, T, S, 3, H, D).unbind(3)


VIDEO_SHAPES = {
    # id: (B, T, S, H, D)
    "B2-T3-S37-H2-D32": (2, 3, 37, 2, 32),
    "B1-T2-S70-H1-D64": (1, 2, 70, 1, 64),
    "B1-T5-S9-H3-D72": (1, 5, 9, 3, 72),
    "B1-T1-S16-H2-D128": (1, 1, 16, 2, 128),
    "B2-T13-S4-H2-D40": (2, 13, 4, 2, 40),
    "S1-T4": (1, 4, 1, 2, 32),
}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shape", list(VIDEO_SHAPES))
def test_spatial_attention(backend, dtype, shape):
    skip_unless_usable(backend)
    B, T, S, H, D = VIDEO_SHAPES[shape]
    q, k, v = _packed_qkv(B, T, S, H, D, dtype)
    with i2v_kernels.use_backend(backend):
        out = i2v_kernels.spatial_attention(q, k, v)
    expected = ref.spatial_attention(q.float(), k.float(), v.float())
    _assert_within_eager_error(out, expected, _eager_mode("spatial", q, k, v, D ** -0.5))
    assert out.is_contiguous()


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", list(VIDEO_SHAPES))
def test_temporal_attention(backend, dtype, causal, shape):
    skip_unless_usable(backend)
    B, T, S, H, D = VIDEO_SHAPES[shape]
    q, k, v = _packed_qkv(B, T, S, H, D, dtype)
    with i2v_kernels.use_backend(backend):
        out = i2v_kernels.temporal_attention(q, k, v, causal=causal)
    expected = ref.temporal_attention(q.float(), k.float(), v.float(), causal=causal)
    _assert_within_eager_error(out, expected, _eager_mode("temporal", q, k, v, D ** -0.5, causal=causal))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_temporal_beyond_packed_kernel(causal):
    """T above the packed kernel's limit goes through the flash kernel: same answer."""
    skip_unless_usable("triton")
    from i2v_kernels.ops.attention import triton as attn_triton

    T = attn_triton.MAX_PACKED_T + 3
    q, k, v = _packed_qkv(1, T, 2, 1, 16, torch.float16)
    with i2v_kernels.use_backend("triton"):
        out = i2v_kernels.temporal_attention(q, k, v, causal=causal)
    expected = ref.temporal_attention(q.float(), k.float(), v.float(), causal=causal)
    _assert_within_eager_error(out, expected, _eager_mode("temporal", q, k, v, 0.25, causal=causal))


def test_temporal_causal_first_frame_sees_only_itself():
    q, k, v = _packed_qkv(1, 4, 3, 2, 16, torch.float32)
    out = i2v_kernels.temporal_attention(q, k, v, causal=True)
    torch.testing.assert_close(out[:, 0], v[:, 0])


# The C++ CPU temporal kernel (csrc/attention/temporal_cpu.cpp): register tiles of 8 query rows x one
# 64-byte vector of keys or of the head dim, so T and D around those sizes and past them.
CPU_TEMPORAL_SHAPES = {
    # id: (B, T, S, H, D)
    "T1-D1": (1, 1, 3, 2, 1),
    "T7-D15": (2, 7, 5, 2, 15),
    "T8-D16": (1, 8, 4, 3, 16),
    "T9-D17": (1, 9, 6, 1, 17),
    "T16-D64": (1, 16, 5, 2, 64),
    "T33-D72": (1, 33, 3, 2, 72),
    "T70-D128": (1, 70, 2, 1, 128),
}


def _layout(layout, B, T, S, H, D, dtype):
    if layout == "packed":
        return _packed_qkv(B, T, S, H, D, dtype)
    if layout == "contiguous":
        return tuple(torch.randn(B, T, S, H, D, dtype=dtype) for _ in range(3))
    # [B, S, H, T, D] memory seen as [B, T, S, H, D]: frames adjacent, D still unit-stride
    return tuple(torch.randn(B, S, H, T, D, dtype=dtype).permute(0, 3, 1, 2, 4) for _ in range(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["packed", "contiguous", "frames-inner"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", list(CPU_TEMPORAL_SHAPES))
def test_cpu_temporal_kernel(dtype, layout, causal, shape):
    skip_unless_usable("cpu")
    B, T, S, H, D = CPU_TEMPORAL_SHAPES[shape]
    q, k, v = _layout(layout, B, T, S, H, D, dtype)
    with i2v_kernels.use_backend("cpu"):
        out = i2v_kernels.temporal_attention(q, k, v, causal=causal, scale=0.7 / D ** 0.5)
    expected = ref.temporal_attention(q, k, v, causal=causal, scale=0.7 / D ** 0.5)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(out, expected, **tol)
    assert out.is_contiguous() and out.dtype == dtype


@pytest.mark.parametrize("qk_norm", [None, "layer", "rms"])
@pytest.mark.parametrize("rope_style", [None, "interleaved", "half"])
def test_cpu_temporal_kernel_prologue(qk_norm, rope_style):
    """QK-norm / RoPE run first (the qk_norm_rope op), then the kernel: the reference's answer."""
    skip_unless_usable("cpu")
    B, T, S, H, D = 1, 13, 6, 2, 32
    q, k, v = _packed_qkv(B, T, S, H, D, torch.float32)
    kw = {}
    if qk_norm:
        kw.update(qk_norm=qk_norm, q_norm_weight=torch.randn(D), k_norm_weight=torch.randn(D))
    if rope_style:
        angle = torch.randn(T, S, D)
        kw.update(rope=(angle.cos(), angle.sin()), rope_style=rope_style)
    with i2v_kernels.use_backend("cpu"):
        out = i2v_kernels.temporal_attention(q, k, v, causal=True, **kw)
    torch.testing.assert_close(out, ref.temporal_attention(q, k, v, causal=True, **kw), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("frame", [0, 5, 9])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cpu_temporal_kernel_non_finite(value, where, frame, causal):
    """The non-finite rule (semantics.py) inside the CPU kernel: the rows and elements the reference
    makes NaN are NaN, every other output equals the reference's."""
    skip_unless_usable("cpu")
    q, k, v = _packed_qkv(1, 10, 4, 2, 24, torch.float32)
    t = dict(q=q, k=k, v=v)[where]
    t[0, frame, 2, 1, 5] = value
    t[0, 3, 0, 0, 0] = value  # a second problem with a bad element
    with i2v_kernels.use_backend("cpu"):
        out = i2v_kernels.temporal_attention(q, k, v, causal=causal)
    expected = ref.temporal_attention(q, k, v, causal=causal)
    assert expected.isnan().any() and not expected.isnan().all()
    assert torch.equal(out.isnan(), expected.isnan())
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_cpu_temporal_kernel_bad_input_is_refused():
    """The C++ op checks what the Python side guarantees: a clear error, never a wrong read."""
    skip_unless_usable("cpu")
    q = torch.randn(1, 4, 3, 2, 8)
    op = torch.ops.i2v_kernels._temporal_attention_fwd
    with pytest.raises(RuntimeError, match="unit stride on the head dim"):
        op(q.transpose(-1, -2).contiguous().transpose(-1, -2), q, q, 1.0, False)
    with pytest.raises(RuntimeError, match="k must have q's shape"):
        op(q, q[:, :3], q, 1.0, False)
    with pytest.raises(RuntimeError, match="v must have q's dtype"):
        op(q, q, q.double(), 1.0, False)
    with pytest.raises(RuntimeError, match="float32, float64, float16 or bfloat16"):
        op(q.int(), q.int(), q.int(), 1.0, False)


DENSE_SHAPES = {
    # id: (B, N, M, H, D)
    "self-N50-D64": (2, 50, 50, 2, 64),
    "cross-N70-M23-D40": (2, 70, 23, 2, 40),
    "cross-N16-M226-D96": (1, 16, 226, 2, 96),
    "cross-N33-M77-D80": (2, 33, 77, 1, 80),
    "N1-M5-D32": (3, 1, 5, 2, 32),
}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("with_lens", [False, True], ids=["all-keys", "kv_lens"])
@pytest.mark.parametrize("shape", list(DENSE_SHAPES))
def test_dense_and_cross_attention(backend, dtype, with_lens, shape):
    skip_unless_usable(backend)
    B, N, M, H, D = DENSE_SHAPES[shape]
    q = torch.randn(B, N, H, D, dtype=dtype)
    kv = torch.randn(B, M, 2, H, D, dtype=dtype)
    k, v = kv.unbind(2)  # strided views of a packed KV projection
    kv_lens = torch.randint(1, M + 1, (B,)) if with_lens else None
    if with_lens:
        kv_lens[0] = M
    with i2v_kernels.use_backend(backend):
        out = i2v_kernels.attention(q, k, v, kv_lens=kv_lens)
    expected = ref.attention(q.float(), k.float(), v.float(), kv_lens=kv_lens)
    _assert_within_eager_error(out, expected, _eager_mode("dense", q, k, v, D ** -0.5, kv_lens=kv_lens))


def test_kv_lens_ignores_padding_keys():
    q = torch.randn(2, 5, 2, 16)
    k, v = torch.randn(2, 9, 2, 16), torch.randn(2, 9, 2, 16)
    lens = torch.tensor([4, 9])
    out = i2v_kernels.attention(q, k, v, kv_lens=lens)
    trimmed = i2v_kernels.attention(q[:1], k[:1, :4], v[:1, :4])
    torch.testing.assert_close(out[:1], trimmed)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("qk_norm", ["layer", "rms"])
@pytest.mark.parametrize("rope_style", ["interleaved", "half"])
@pytest.mark.parametrize("mode", ["spatial", "temporal", "dense"])
def test_fused_prologue_matches_unfused(backend, qk_norm, rope_style, mode):
    """QK-norm + RoPE inside the kernel equals normalizing and rotating first, then attending."""
    skip_unless_usable(backend)
    dtype = torch.bfloat16
    B, T, S, H, D = 1, 3, 10, 2, 32
    if mode == "dense":
        q, k, v = (torch.randn(B, T * S, H, D, dtype=dtype) for _ in range(3))
        cos, sin = torch.randn(T * S, D), torch.randn(T * S, D)
        fused, plain = i2v_kernels.attention, ref.attention
    else:
        q, k, v = _packed_qkv(B, T, S, H, D, dtype)
        cos, sin = torch.randn(T, S, D), torch.randn(1, S, D)  # sin broadcast over frames
        fused = i2v_kernels.spatial_attention if mode == "spatial" else i2v_kernels.temporal_attention
        plain = ref.spatial_attention if mode == "spatial" else ref.temporal_attention
    qw, kw = torch.randn(D), torch.randn(D)
    qb = torch.randn(D) if qk_norm == "layer" else None
    kwargs = dict(qk_norm=qk_norm, q_norm_weight=qw, q_norm_bias=qb, k_norm_weight=kw, rope=(cos, sin),
                  rope_style=rope_style)
    with i2v_kernels.use_backend(backend):
        out = fused(q, k, v, **kwargs)
    expected = plain(q.float(), k.float(), v.float(), **kwargs)
    # unfused, same dtype: the prologue rounded to bf16, then eager bf16 attention
    qp = ref.prologue(q, qk_norm, qw, qb, 1e-6, (cos, sin), rope_style).to(dtype)
    kp = ref.prologue(k, qk_norm, kw, None, 1e-6, (cos, sin), rope_style).to(dtype)
    _assert_within_eager_error(out, expected, _eager_mode(mode, qp, kp, v, D ** -0.5))


def test_rope_reference_rotates_pairs():
    """The oracle's RoPE: with cos = cos(theta), sin = sin(theta) it rotates each pair by theta."""
    x = torch.randn(4, 1, 8, dtype=torch.float64)
    theta = torch.rand(4, 8, dtype=torch.float64)
    theta = theta[:, 0::2].repeat_interleave(2, dim=-1)
    out = ref.prologue(x, None, None, None, 1e-6, (theta.cos(), theta.sin()), "interleaved")
    z = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
    rotated = torch.view_as_real(z * torch.exp(1j * theta[:, None, 0::2])).flatten(-2)
    torch.testing.assert_close(out, rotated)


def test_default_scale_and_explicit_scale():
    q, k, v = _packed_qkv(1, 2, 8, 2, 16, torch.float32)
    torch.testing.assert_close(i2v_kernels.spatial_attention(q, k, v),
                               i2v_kernels.spatial_attention(q, k, v, scale=0.25))
    doubled = i2v_kernels.spatial_attention(q, k, v, scale=0.5)
    torch.testing.assert_close(doubled, ref.spatial_attention(q * 2, k, v))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batch(backend):
    skip_unless_usable(backend)
    q = torch.randn(0, 3, 5, 2, 16, dtype=torch.float16)
    with i2v_kernels.use_backend(backend):
        assert i2v_kernels.spatial_attention(q, q, q).shape == q.shape
        assert i2v_kernels.temporal_attention(q, q, q).shape == q.shape


def test_float32_and_float64_on_the_reference():
    for dtype in (torch.float32, torch.float64):
        q, k, v = _packed_qkv(1, 3, 6, 2, 8, dtype)
        out = i2v_kernels.temporal_attention(q, k, v)
        assert out.dtype == dtype
        torch.testing.assert_close(out, ref.temporal_attention(q, k, v))


# --------------------------------------------------------------------------------------------------
# Gradients, opcheck, compile


@pytest.mark.parametrize("mode", ["spatial", "temporal", "dense"])
def test_gradcheck(mode):
    D = 4
    q, k, v = (torch.randn(1, 2, 3, 2, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    qw, kw, qb = (torch.randn(D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    cos, sin = (torch.randn(3, D, dtype=torch.float64, requires_grad=True) for _ in range(2))
    kw_args = lambda a: dict(qk_norm="layer", q_norm_weight=a[3], k_norm_weight=a[4], q_norm_bias=a[5], rope=(a[6], a[7]))
    if mode == "spatial":
        fn = lambda *a: i2v_kernels.spatial_attention(*a[:3], **kw_args(a))
    elif mode == "temporal":
        fn = lambda *a: i2v_kernels.temporal_attention(*a[:3], causal=True, **kw_args(a))
    else:
        q, k, v = (t.detach()[:, 0].requires_grad_() for t in (q, k, v))
        fn = lambda *a: i2v_kernels.attention(*a[:3], kv_lens=torch.tensor([2]), **kw_args(a))
    torch.autograd.gradcheck(fn, (q, k, v, qw, kw, qb, cos, sin))


GRAD_CASES = {
    # id: (mode, shape, extra kwargs)
    "spatial-S37-D16": ("spatial", (1, 3, 37, 2, 16), {}),
    "spatial-D72-qknorm-rope": ("spatial", (1, 2, 9, 2, 72), {"qk_norm": "layer", "rope": True}),
    "temporal-T13-causal": ("temporal", (2, 13, 3, 2, 32), {"causal": True}),
    "temporal-T5": ("temporal", (1, 5, 4, 3, 16), {}),
    "dense-N70": ("dense", (1, 70, 2, 32), {}),
    "cross-kv_lens": ("dense", (2, 33, 2, 16), {"M": 20, "kv_lens": True}),
    "temporal-T33-D96-causal": ("temporal", (1, 33, 2, 1, 96), {"causal": True}),
    "cross-D256-kv_lens": ("dense", (2, 17, 1, 256), {"M": 40, "kv_lens": True}),
    "temporal-T5-D40-packed-rms-rope": ("temporal", (1, 5, 3, 2, 40), {"qk_norm": "rms", "rope": True}),
}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_gradients_match_reference(backend, dtype, case):
    """Half-precision gradients (Triton flash backward, or the fp32 formulas) against fp32 autograd."""
    skip_unless_usable(backend)
    mode, shape, extra = GRAD_CASES[case]
    extra = dict(extra)
    if mode == "dense":
        B, N, H, D = shape
        M = extra.pop("M", N)
        q = torch.randn(B, N, H, D, dtype=dtype)
        k, v = torch.randn(B, M, 2, H, D, dtype=dtype).unbind(2)
        if extra.pop("kv_lens", False):
            extra["kv_lens"] = torch.tensor([M, M // 2 + 1])
        fused, plain = i2v_kernels.attention, ref.attention
    else:
        q, k, v = _packed_qkv(*shape, dtype)
        D = shape[-1]
        fused = i2v_kernels.spatial_attention if mode == "spatial" else i2v_kernels.temporal_attention
        plain = ref.spatial_attention if mode == "spatial" else ref.temporal_attention
    if extra.pop("rope", False):
        extra.update(rope=(torch.randn(shape[2], D), torch.randn(shape[2], D)), q_norm_weight=torch.randn(D),
                     k_norm_weight=torch.randn(D))
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    with i2v_kernels.use_backend(backend):
        out = fused(q, k, v, **extra)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), g)
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad(plain(*leaves, **extra), leaves, g.float())
    for name, a, e in zip("qkv", grads, expected):
        assert a.dtype == dtype
        err = (a.float() - e).abs().max().item()
        scale = e.abs().max().item()
        assert err <= 3e-2 * max(scale, 1.0), f"d{name}: error {err:.3g} vs gradient scale {scale:.3g}"


def _op_samples():
    q, k, v = (t.clone().requires_grad_() for t in _packed_qkv(1, 2, 5, 2, 16, torch.float16))
    cos, sin = torch.randn(5, 16), torch.randn(5, 16)
    w = torch.randn(16)
    dq, dk = torch.randn(2, 7, 2, 16, dtype=torch.float16), torch.randn(2, 4, 2, 16, dtype=torch.float16)
    return [
        (torch.ops.i2v_kernels.spatial_attention, (q, k, v, None, "rms", w, None, w, None, 1e-6, cos, sin, "interleaved")),
        (torch.ops.i2v_kernels.temporal_attention, (q, k, v, 0.3, True, None, None, None, None, None, 1e-6, None, None, "half")),
        (torch.ops.i2v_kernels.attention, (dq.requires_grad_(), dk, dk, None, torch.tensor([4, 2]), None, None, None,
                                           None, None, 1e-6, None, None, "interleaved")),
    ]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_opcheck(backend):
    skip_unless_usable(backend)
    with i2v_kernels.use_backend(backend):
        for op, args in _op_samples():
            torch.library.opcheck(op, args)


def test_compile_fullgraph():
    def block(q, k, v, cos, sin):
        h = i2v_kernels.spatial_attention(q, k, v, rope=(cos, sin))
        h = i2v_kernels.temporal_attention(h, k, v, causal=True)
        return i2v_kernels.attention(h.flatten(1, 2), k.flatten(1, 2), v.flatten(1, 2))

    q, k, v = (t.clone().requires_grad_() for t in _packed_qkv(1, 3, 6, 2, 16, torch.float32))
    cos, sin = torch.randn(6, 16), torch.randn(6, 16)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    expected, actual = block(q, k, v, cos, sin), compiled(q, k, v, cos, sin)
    torch.testing.assert_close(actual, expected)
    g1 = torch.autograd.grad(expected.sum(), (q, k, v))
    g2 = torch.autograd.grad(actual.sum(), (q, k, v))
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b)


def test_reference_feeds_sdpa_4d(monkeypatch):
    """The eager reference (the benchmarks' baseline, the model's use_kernels=False path) folds the
    frame/position dims into SDPA's batch: its fused CUDA kernels take 4-D inputs only, and inductor
    mis-permutes a 5-D SDPA's output (below)."""
    real = torch.nn.functional.scaled_dot_product_attention
    dims = []

    def spy(q, k, v, **kw):
        dims.append(q.dim())
        return real(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    q, k, v = _packed_qkv(2, 3, 5, 2, 8, torch.float32)
    s, t = ref.spatial_attention(q, k, v), ref.temporal_attention(q, k, v, causal=True)
    assert dims == [4, 4]
    e = lambda x: x.double()
    torch.testing.assert_close(s, _eager_mode("spatial", e(q), e(k), e(v), 8 ** -0.5).float())
    torch.testing.assert_close(t, _eager_mode("temporal", e(q), e(k), e(v), 8 ** -0.5, causal=True).float())


@pytest.mark.slow
def test_reference_under_inductor():
    """torch.compile (inductor) of the factorized reference equals eager (a 5-D SDPA came back with its
    dims permuted under inductor in torch 2.14)."""
    def block(q, k, v):
        return ref.temporal_attention(ref.spatial_attention(q, k, v), k, v, causal=True)

    q, k, v = _packed_qkv(2, 5, 16, 6, 32, torch.float32)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(block)(q, k, v), block(q, k, v))


# --------------------------------------------------------------------------------------------------
# Bad input


def _bad_inputs():
    q5 = torch.randn(1, 2, 4, 2, 8)
    q4 = torch.randn(2, 4, 2, 8)
    return [
        ("q-rank", lambda: i2v_kernels.spatial_attention(q4, q4, q4), ValueError, r"\bq\b"),
        ("k-shape", lambda: i2v_kernels.temporal_attention(q5, q5[:, :1], q5), ValueError, r"\bk\b"),
        ("v-dtype", lambda: i2v_kernels.spatial_attention(q5, q5, q5.double()), TypeError, r"\bv\b"),
        ("int-q", lambda: i2v_kernels.attention(q4.long(), q4, q4), TypeError, r"\bq\b"),
        ("mixed-devices", lambda: i2v_kernels.attention(q4, q4.to("meta"), q4), ValueError, r"\bk\b"),
        ("cross-head-mismatch", lambda: i2v_kernels.attention(q4, torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 8)),
         ValueError, r"\bH\b"),
        ("kv_lens-too-long", lambda: i2v_kernels.attention(q4, q4, q4, kv_lens=torch.tensor([4, 5])), ValueError, "kv_lens"),
        ("kv_lens-zero", lambda: i2v_kernels.attention(q4, q4, q4, kv_lens=torch.tensor([0, 2])), ValueError, "kv_lens"),
        ("kv_lens-shape", lambda: i2v_kernels.attention(q4, q4, q4, kv_lens=torch.tensor([2])), ValueError, "kv_lens"),
        ("kv_lens-float", lambda: i2v_kernels.attention(q4, q4, q4, kv_lens=torch.tensor([2.0, 1.0])), TypeError, "kv_lens"),
        ("norm-kind", lambda: i2v_kernels.spatial_attention(q5, q5, q5, qk_norm="batch"), ValueError, "qk_norm"),
        ("norm-weight-shape", lambda: i2v_kernels.spatial_attention(q5, q5, q5, qk_norm="rms", q_norm_weight=torch.randn(4)),
         ValueError, "q_norm_weight"),
        ("weight-without-norm", lambda: i2v_kernels.spatial_attention(q5, q5, q5, k_norm_weight=torch.randn(8)),
         ValueError, "k_norm_weight"),
        ("rope-not-pair", lambda: i2v_kernels.spatial_attention(q5, q5, q5, rope=torch.randn(4, 8)), TypeError, "rope"),
        ("rope-shape", lambda: i2v_kernels.spatial_attention(q5, q5, q5, rope=(torch.randn(5, 8), torch.randn(5, 8))),
         ValueError, "rope"),
        ("rope-style", lambda: i2v_kernels.spatial_attention(q5, q5, q5, rope=(torch.randn(4, 8),) * 2, rope_style="x"),
         ValueError, "rope_style"),
        ("rope-cross", lambda: i2v_kernels.attention(q4, q4[:, :2], q4[:, :2], rope=(torch.randn(4, 8),) * 2),
         ValueError, "rope"),
        ("scale-nan", lambda: i2v_kernels.spatial_attention(q5, q5, q5, scale=float("nan")), ValueError, "scale"),
        ("causal-not-bool", lambda: i2v_kernels.temporal_attention(q5, q5, q5, causal=1), TypeError, "causal"),
        ("not-a-tensor", lambda: i2v_kernels.attention(q4, None, q4), TypeError, r"\bk\b"),
    ]


@pytest.mark.parametrize("name", [b[0] for b in _bad_inputs()])
def test_bad_input_names_the_argument(name):
    (fn, exc, pattern), = [b[1:] for b in _bad_inputs() if b[0] == name]
    with pytest.raises(exc, match=pattern):
        fn()


def test_forced_backend_without_kernel_raises():
    q = torch.randn(1, 2, 4, 2, 8)
    with i2v_kernels.use_backend("cpu"), pytest.raises(i2v_kernels.BackendUnavailableError, match="no cpu kernel"):
        i2v_kernels.spatial_attention(q, q, q)
    with i2v_kernels.use_backend("cuda"), pytest.raises(i2v_kernels.BackendUnavailableError, match="no cuda kernel"):
        i2v_kernels.spatial_attention(q, q, q)
    with i2v_kernels.use_backend("cuda"), pytest.raises(i2v_kernels.BackendUnavailableError, match="cuda"):
        i2v_kernels.temporal_attention(q, q, q)
    if _backend._GENERIC["triton"](torch.device("cpu")) is None:
        with i2v_kernels.use_backend("triton"), pytest.raises(i2v_kernels.BackendUnavailableError, match="float32"):
            i2v_kernels.spatial_attention(q, q, q)


# --------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shape", ["latte-S256-D72", "cogvideox-S1350-D64", "wan-S1560-D128", "odd-S226-D96", "D256"])
def test_gpu_spatial_and_dense(dtype, shape):
    B, T, S, H, D = {"latte-S256-D72": (2, 4, 256, 16, 72), "cogvideox-S1350-D64": (1, 2, 1350, 8, 64),
                     "wan-S1560-D128": (1, 2, 1560, 4, 128), "odd-S226-D96": (2, 3, 226, 4, 96),
                     "D256": (1, 2, 200, 2, 256)}[shape]
    qkv = torch.randn(B, T, S, 3 * H * D, device="cuda", dtype=dtype)
    q, k, v = qkv.view(B, T, S, 3, H, D).unbind(3)
    out = i2v_kernels.spatial_attention(q, k, v)
    t = lambda x: x.transpose(2, 3)
    sdpa = t(torch.nn.functional.scaled_dot_product_attention(t(q), t(k), t(v)))
    expected = ref.spatial_attention(q.float(), k.float(), v.float())
    _assert_within_eager_error(out, expected, sdpa, slack=1e-3)
    dense = i2v_kernels.attention(q.flatten(1, 2), k.flatten(1, 2), v.flatten(1, 2))
    expected = ref.attention(q.flatten(1, 2).float(), k.flatten(1, 2).float(), v.flatten(1, 2).float())
    sdpa = torch.nn.functional.scaled_dot_product_attention(*(x.flatten(1, 2).transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    _assert_within_eager_error(dense, expected, sdpa, slack=1e-3)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "native"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(2, 1, 5, 3, 64), (1, 13, 7, 2, 72), (2, 33, 3, 4, 32), (1, 128, 2, 2, 128),
                                   (1, 49, 4, 3, 40)], ids=str)
def test_gpu_temporal_backends(backend, dtype, shape):
    skip_unless_usable(backend, "cuda")
    if backend == "triton" and dtype == torch.float32:
        pytest.skip("the Triton attention kernels take float16/bfloat16")
    B, T, S, H, D = shape
    qkv = torch.randn(B, T, S, 3 * H * D, device="cuda", dtype=dtype)
    q, k, v = qkv.view(B, T, S, 3, H, D).unbind(3)
    for causal in (False, True):
        with i2v_kernels.use_backend(backend):
            out = i2v_kernels.temporal_attention(q, k, v, causal=causal)
        expected = ref.temporal_attention(q.float(), k.float(), v.float(), causal=causal)
        if dtype == torch.float32:
            torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
        else:
            _assert_within_eager_error(out, expected, _eager_mode("temporal", q, k, v, D ** -0.5, causal=causal))


@pytest.mark.needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "native"])
@pytest.mark.parametrize("T", [1, 8, 13, 49, 64, 128])
def test_gpu_temporal_many_positions(backend, T):
    """B*S*H above 65,535 problems (where SDPA's efficient kernel's grid overflows)."""
    skip_unless_usable(backend, "cuda")
    B, S, H, D = 1, 70000 // 4 + 1, 4, 64
    qkv = torch.randn(B, T, S, 3 * H * D, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.view(B, T, S, 3, H, D).unbind(3)
    for causal in (False, True):
        with i2v_kernels.use_backend(backend):
            out = i2v_kernels.temporal_attention(q, k, v, causal=causal)
        expected = ref.temporal_attention(q[:, :, :512].float(), k[:, :, :512].float(), v[:, :, :512].float(), causal=causal)
        torch.testing.assert_close(out[:, :, :512].float(), expected, atol=2e-2, rtol=2e-2)
        tail = ref.temporal_attention(q[:, :, -512:].float(), k[:, :, -512:].float(), v[:, :, -512:].float(), causal=causal)
        torch.testing.assert_close(out[:, :, -512:].float(), tail, atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------------------------------------------
# Modules


@pytest.mark.parametrize("mode", ["spatial", "temporal", "dense"])
@pytest.mark.parametrize("qk_norm", [None, "layer", "rms"])
def test_factorized_attention_module_kernels_match_plain(mode, qk_norm):
    B, T, S, C, H = 2, 3, 6, 32, 2
    fused = i2v_kernels.FactorizedAttention(C, H, mode, qk_norm=qk_norm, causal=mode == "temporal")
    plain = i2v_kernels.FactorizedAttention(C, H, mode, qk_norm=qk_norm, causal=mode == "temporal", use_kernels=False)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(B, T, S, C)
    rope = (torch.randn(T, S, C // H), torch.randn(S, C // H))
    a, b = fused(x, rope=rope), plain(x, rope=rope)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    for (name, p1), p2 in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_dense_module_is_full_3d_attention():
    """Dense mode equals attention over all T * S tokens at once (checked against a direct SDPA)."""
    m = i2v_kernels.FactorizedAttention(16, 2, "dense")
    x = torch.randn(1, 3, 4, 16)
    q, k, v = m.qkv(x).view(1, 12, 3, 2, 8).unbind(2)
    expected = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    torch.testing.assert_close(m(x), m.proj(expected.transpose(1, 2).reshape(1, 3, 4, 16)))


def test_cross_attention_module():
    fused = i2v_kernels.CrossAttention(32, 24, 4, qk_norm="rms")
    plain = i2v_kernels.CrossAttention(32, 24, 4, qk_norm="rms", use_kernels=False)
    plain.load_state_dict(fused.state_dict())
    x, ctx = torch.randn(2, 3, 5, 32), torch.randn(2, 7, 24)
    lens = torch.tensor([7, 3])
    out = fused(x, ctx, kv_lens=lens)
    assert out.shape == x.shape
    torch.testing.assert_close(out, plain(x, ctx, kv_lens=lens))
    # padding tokens beyond kv_lens do not matter
    ctx2 = ctx.clone()
    ctx2[1, 3:] = 100.0
    torch.testing.assert_close(fused(x, ctx2, kv_lens=lens), out)


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        i2v_kernels.FactorizedAttention(30, 4)
    with pytest.raises(ValueError, match="mode"):
        i2v_kernels.FactorizedAttention(32, 4, "diagonal")
    with pytest.raises(ValueError, match="causal"):
        i2v_kernels.FactorizedAttention(32, 4, "spatial", causal=True)
    with pytest.raises(ValueError, match=r"\[B, T, S, C=32\]"):
        i2v_kernels.FactorizedAttention(32, 4)(torch.randn(2, 5, 32))


@pytest.mark.parametrize("rope_style", ["interleaved", "half"])
def test_temporal_over_packed_tile_limit(rope_style):
    """T and D whose packed tile would spill (T 40 -> 64 frames x D 128) go through the flash kernel
    inside the Triton backend, QK-norm and RoPE included: same answer."""
    skip_unless_usable("triton")
    from i2v_kernels.ops.attention import triton as attn_triton

    B, T, S, H, D = 1, 40, 2, 2, 128
    assert T <= attn_triton.MAX_PACKED_T and not attn_triton.packed_temporal(T, D)
    dtype = torch.bfloat16
    q, k, v = _packed_qkv(B, T, S, H, D, dtype)
    cos, sin = torch.randn(T, S, D), torch.randn(1, S, D)
    qw, qb, kw = torch.randn(D), torch.randn(D), torch.randn(D)
    kwargs = dict(qk_norm="layer", q_norm_weight=qw, q_norm_bias=qb, k_norm_weight=kw, rope=(cos, sin),
                  rope_style=rope_style)
    with i2v_kernels.use_backend("triton"):
        out = i2v_kernels.temporal_attention(q, k, v, causal=True, **kwargs)
    expected = ref.temporal_attention(q.float(), k.float(), v.float(), causal=True, **kwargs)
    qp = ref.prologue(q, "layer", qw, qb, 1e-6, (cos, sin), rope_style).to(dtype)
    kp = ref.prologue(k, "layer", kw, None, 1e-6, (cos, sin), rope_style).to(dtype)
    _assert_within_eager_error(out, expected, _eager_mode("temporal", qp, kp, v, D ** -0.5, causal=True))


# The Triton backend's prologue: the qk_norm_rope op once, then the plain flash kernel (the packed
# temporal kernel fuses it). id: (mode, shape: (B, T, S, H, D) or dense (B, N, M, H, D)); odd head dims.
TRITON_PROLOGUE_SHAPES = {
    "spatial-S19-D40": ("spatial", (1, 2, 19, 2, 40)),
    "temporal-packed-T5-D72": ("temporal", (1, 5, 3, 2, 72)),
    "temporal-flash-T33-D96": ("temporal", (1, 33, 2, 1, 96)),
    "dense-N37-D72": ("dense", (1, 37, 37, 2, 72)),
    "cross-N20-M13-D40": ("dense", (2, 20, 13, 2, 40)),  # QK-norm only: RoPE needs N == M
}
# (qk_norm, q weight, q bias, k weight, k bias)
TRITON_NORMS = {
    "layer-wb": ("layer", True, True, True, True),
    "layer-q-weight": ("layer", True, False, False, False),
    "layer-plain": ("layer", False, False, False, False),
    "rms-w": ("rms", True, False, True, False),
    "rms-plain": ("rms", False, False, False, False),
}


def _prologue_inputs(mode, shape, norm, rope_style, dtype):
    """Non-contiguous q, k, v (a transposed q; k and v views of a packed projection) and the prologue
    kwargs: weights and biases as ``norm`` names them, RoPE tables broadcast over frames/heads."""
    qk_norm, *present = TRITON_NORMS[norm]
    if mode == "dense":
        B, N, M, H, D = shape
        q = torch.randn(B, H, N, D, dtype=dtype).transpose(1, 2)
        k, v = torch.randn(B, M, 2, H, D, dtype=dtype).unbind(2)
        table = (N, D)
    else:
        B, T, S, H, D = shape
        q = torch.randn(B, S, T, H, D, dtype=dtype).transpose(1, 2)
        _, k, v = _packed_qkv(B, T, S, H, D, dtype)
        table = (T, S, D)
    weights = [torch.randn(D) if p else None for p in present]
    kwargs = dict(zip(("q_norm_weight", "q_norm_bias", "k_norm_weight", "k_norm_bias"), weights), qk_norm=qk_norm)
    if rope_style is not None:
        kwargs.update(rope=(torch.randn(table), torch.randn(table)), rope_style=rope_style)
    return q, k, v, kwargs


@pytest.mark.parametrize("rope_style", ["interleaved", "half", None], ids=str)
@pytest.mark.parametrize("norm", list(TRITON_NORMS))
@pytest.mark.parametrize("case", list(TRITON_PROLOGUE_SHAPES))
def test_triton_prologue_against_reference(case, norm, rope_style):
    """Every QK-norm variant (LayerNorm/RMSNorm, with and without weights and biases, q's and k's
    differing) with either RoPE style or none, on each Triton path, against the fp32 reference."""
    skip_unless_usable("triton")
    mode, shape = TRITON_PROLOGUE_SHAPES[case]
    if rope_style is not None and case.startswith("cross"):
        pytest.skip("rope applies to self-attention only")
    # fp16: the interpreter turns fp32 into bf16 by truncation (up to 1 ulp, where a GPU rounds to
    # nearest), which the sharp scores of normalized, biased q and k amplify past the eager bound
    dtype = torch.float16
    q, k, v, kwargs = _prologue_inputs(mode, shape, norm, rope_style, dtype)
    fused = {"spatial": i2v_kernels.spatial_attention, "temporal": i2v_kernels.temporal_attention,
             "dense": i2v_kernels.attention}[mode]
    plain = {"spatial": ref.spatial_attention, "temporal": ref.temporal_attention, "dense": ref.attention}[mode]
    with i2v_kernels.use_backend("triton"):
        out = fused(q, k, v, **kwargs)
    expected = plain(q.float(), k.float(), v.float(), **kwargs)
    # eager same-dtype baseline: the prologue as a DiT writes it (F.layer_norm / F.rms_norm and the
    # rotation in fp16), then eager fp16 attention
    cos, sin = kwargs.get("rope", (None, None))
    qp, kp = (native.prologue(x, kwargs["qk_norm"], kwargs[f"{n}_norm_weight"], kwargs[f"{n}_norm_bias"], 1e-6, cos,
                              sin, rope_style or "interleaved") for x, n in ((q, "q"), (k, "k")))
    _assert_within_eager_error(out, expected, _eager_mode(mode, qp, kp, v, shape[-1] ** -0.5))


def test_triton_flash_kernel_has_no_prologue(monkeypatch):
    """The K-side prologue never runs inside the flash loop again (there it was recomputed for every
    query block: 7x slower than eager on CogVideoX's dense call): the kernel takes no norm/RoPE
    argument, and each Triton call through it runs the qk_norm_rope op exactly once, on q and k
    together; the packed temporal kernel (each element read once) fuses it and runs the op never."""
    skip_unless_usable("triton")
    from i2v_kernels.ops import qk_norm_rope as qk_module
    from i2v_kernels.ops.attention import triton as attn_triton

    prologue_args = {"NORM", "ROPE", "COS", "SIN", "QW", "QB", "KW", "KB", "HAS_QW", "HAS_KW", "eps"}
    assert not prologue_args & set(attn_triton._attn_fwd_kernel.arg_names)
    assert prologue_args <= set(attn_triton._temporal_fwd_kernel.arg_names) | {"HAS_QW"}
    calls = []
    real = qk_module.qk_norm_rope

    def counting(q, k, **kwargs):
        calls.append((q.shape, k.shape))
        return real(q, k, **kwargs)

    monkeypatch.setattr(qk_module, "qk_norm_rope", counting)
    expected_calls = {"spatial-S19-D40": 1, "temporal-packed-T5-D72": 0, "temporal-flash-T33-D96": 1,
                      "dense-N37-D72": 1}
    for case, n in expected_calls.items():
        mode, shape = TRITON_PROLOGUE_SHAPES[case]
        q, k, v, kwargs = _prologue_inputs(mode, shape, "layer-wb", "half", torch.float16)
        fused = {"spatial": i2v_kernels.spatial_attention, "temporal": i2v_kernels.temporal_attention,
                 "dense": i2v_kernels.attention}[mode]
        calls.clear()
        with i2v_kernels.use_backend("triton"):
            fused(q, k, v, **kwargs)
            if mode == "dense":
                fused(q, k, v, return_lse=True, **kwargs)
                n *= 2
        assert calls == [(q.shape, q.shape)] * n, case


# --------------------------------------------------------------------------------------------------
# Triton: the autotuned flash kernels and the packed temporal kernel at the edges of their tiles

TRITON_TEMPORAL = {
    # id: (B, T, S, H, D); "flash": T x D too big for the packed kernel (temporal_fwd runs the flash one)
    "T1-D256": (1, 1, 2, 2, 256),
    "T2-D96": (2, 2, 3, 2, 96),
    "T33-D96-flash": (1, 33, 2, 1, 96),
    "T64-D40": (1, 64, 2, 1, 40),
    "T65-D16": (1, 65, 2, 2, 16),
    "T128-D72-flash": (1, 128, 1, 1, 72),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", list(TRITON_TEMPORAL))
def test_triton_temporal_frames(shape, causal):
    """Frame counts off every tile (1, 2, 33, 64, 65, 128), odd head dims and D 256, on both of the
    Triton backend's temporal paths; q is a permuted view (frames not outermost), k and v packed views."""
    skip_unless_usable("triton")
    from i2v_kernels.ops.attention import triton as attn_triton

    B, T, S, H, D = TRITON_TEMPORAL[shape]
    assert attn_triton.packed_temporal(T, D) != shape.endswith("flash")
    dtype = torch.float16
    q = torch.randn(B, S, T, H, D, dtype=dtype).transpose(1, 2)
    _, k, v = _packed_qkv(B, T, S, H, D, dtype)
    with i2v_kernels.use_backend("triton"):
        out = i2v_kernels.temporal_attention(q, k, v, causal=causal)
    expected = ref.temporal_attention(q.float(), k.float(), v.float(), causal=causal)
    _assert_within_eager_error(out, expected, _eager_mode("temporal", q, k, v, D ** -0.5, causal=causal))


@pytest.mark.parametrize("D", [72, 256])
def test_triton_cross_attention_wide_heads(D):
    """Head dims 72 and 256 in one masked power-of-two tile (no padded copy), a transposed q, keys
    off the tile size and kv_lens."""
    skip_unless_usable("triton")
    B, N, M, H = 2, 19, 45, 2
    q = torch.randn(B, H, N, D, dtype=torch.bfloat16).transpose(1, 2)
    k, v = torch.randn(B, M, 2, H, D, dtype=torch.bfloat16).unbind(2)
    kv_lens = torch.tensor([M, 17])
    with i2v_kernels.use_backend("triton"):
        out = i2v_kernels.attention(q, k, v, kv_lens=kv_lens)
    expected = ref.attention(q.float(), k.float(), v.float(), kv_lens=kv_lens)
    _assert_within_eager_error(out, expected, _eager_mode("dense", q, k, v, D ** -0.5, kv_lens=kv_lens))


def test_triton_interpreter_times_no_config():
    """Under the interpreter the autotuners time nothing: the pruning hands each one its heuristic
    config alone (no GPU to time on), and the launch runs with it."""
    skip_unless_usable("triton")
    from i2v_kernels.ops.attention import triton as attn_triton

    B, T, S, H, D = 1, 5, 3, 2, 40
    q, k, v = (t.clone().requires_grad_() for t in _packed_qkv(B, T, S, H, D, torch.float16))
    with i2v_kernels.use_backend("triton"):
        i2v_kernels.spatial_attention(q, k, v).sum().backward()
        i2v_kernels.temporal_attention(q, k, v)
    assert attn_triton._attn_fwd.best_config == attn_triton._fwd_heuristic(S, S, D)
    assert attn_triton._attn_bwd_dkdv.best_config == attn_triton._bwd_heuristic(S, S, D)
    assert attn_triton._attn_bwd_dq.best_config == attn_triton._bwd_heuristic(S, S, D)
    block_h, _, _, warps = attn_triton._temporal_tiles(T, H, D)
    assert attn_triton._temporal_fwd.best_config.kwargs == {"BLOCK_H": block_h}
    assert attn_triton._temporal_fwd.best_config.num_warps == warps


def _flash_points(configs, resources, block_d, smem):
    from i2v_kernels.ops.attention import triton as attn_triton

    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs
            if attn_triton._flash_fits(resources, c, block_d, smem)}


def test_autotune_pruning_by_device(monkeypatch):
    """On a GPU the pruning keeps the configs whose tiles fit the device: per shared-memory limit
    (sm_80 163 KiB, sm_90 227 KiB), with the known good points kept where they fit and the heuristic
    config only when nothing does. The GPU branch runs here on CPU tensors with the limit patched in."""
    from i2v_kernels.ops.attention import triton as attn_triton

    sm80, sm90 = 163 * 1024, 227 * 1024
    fwd = lambda d, smem: _flash_points(attn_triton.FWD_CONFIGS, attn_triton._fwd_resources, d, smem)  # noqa: E731
    assert (128, 64, 4, 2) in fwd(64, sm80) and (128, 64, 4, 3) in fwd(128, sm80)  # Ampere (FA2's tiles)
    assert (128, 128, 8, 3) in fwd(128, sm90) and (128, 128, 8, 3) not in fwd(128, sm80)  # Hopper
    assert (64, 64, 8, 2) in fwd(256, sm80) and not any(m == 128 and w == 4 for m, _, w, _ in fwd(256, sm90))
    assert fwd(128, sm80) < fwd(128, sm90) and fwd(256, sm90) < fwd(64, sm90)
    monkeypatch.setattr(attn_triton, "_timing_allowed", lambda t: True)
    monkeypatch.setattr(attn_triton, "_smem_limit", lambda device: sm80)
    q = torch.empty(1, 1, 1, 300, 128, dtype=torch.float16)
    prune = attn_triton._attn_fwd.early_config_prune
    kept = prune(attn_triton.FWD_CONFIGS, {"Q": q, "Sq": 300, "Sk": 300, "D": 128}, BLOCK_D=128)
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept} == fwd(128, sm80)
    monkeypatch.setattr(attn_triton, "_smem_limit", lambda device: 1024)
    assert prune(attn_triton.FWD_CONFIGS, {"Q": q, "Sq": 300, "Sk": 300, "D": 128}, BLOCK_D=128) == [
        attn_triton._fwd_heuristic(300, 300, 128)]
    for configs, resources in ((attn_triton.DKDV_CONFIGS, attn_triton._dkdv_resources),
                               (attn_triton.DQ_CONFIGS, attn_triton._dq_resources)):
        for d in (16, 64, 128, 256):
            assert _flash_points(configs, resources, d, sm80), (resources.__name__, d)


def test_temporal_autotune_candidates():
    """The packed temporal kernel times several heads a program and 2-8 warps, never more heads than
    the call has, and always has a candidate on sm_80 for the packed shapes."""
    from i2v_kernels.ops.attention import triton as attn_triton

    configs = attn_triton.TEMPORAL_CONFIGS
    cog = attn_triton._temporal_candidates(configs, 13, 48, 64, 163 * 1024)  # CogVideoX-5B: 13 frames, 48 heads
    assert {c.kwargs["BLOCK_H"] for c in cog} >= {2, 4, 8} and {c.num_warps for c in cog} == {2, 4, 8}
    assert {c.kwargs["BLOCK_H"] for c in attn_triton._temporal_candidates(configs, 13, 1, 64, 163 * 1024)} == {1}
    for T in (1, 8, 16, 32, 49, 64, 128):
        for D in (16, 40, 64, 72, 128, 256):
            if attn_triton.packed_temporal(T, D):
                assert attn_triton._temporal_candidates(configs, T, 16, D, 163 * 1024), (T, D)


def test_autotune_times_only_where_the_dispatch_may_measure(monkeypatch):
    """On a GPU the autotuners time configs only where the dispatch may measure: not under
    ``I2V_KERNELS_TUNE=0`` (nor during CUDA-graph capture or torch.compile tracing, the same check)."""
    import types

    from i2v_kernels.ops.attention import triton as attn_triton

    monkeypatch.setattr(attn_triton, "triton_interpreted", lambda: False)
    on_gpu = types.SimpleNamespace(device=torch.device("cuda", 0))  # no GPU is touched: only .device is read
    monkeypatch.setenv("I2V_KERNELS_TUNE", "0")
    assert not attn_triton._timing_allowed(on_gpu)
    monkeypatch.setattr(attn_triton._dispatch, "_measuring_forbidden", lambda device: None)
    assert attn_triton._timing_allowed(on_gpu)
    assert not attn_triton._timing_allowed(types.SimpleNamespace(device=torch.device("cpu")))
