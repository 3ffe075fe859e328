"""Causal 3D convolution: reference, the C++ op (cpu backend; cuda on a GPU) and Triton (interpreter
on CPU) against the formula written out here (F.pad + torch.cat + F.conv3d), streaming caches, the
decode helper, gradients, opcheck, compile."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import i2v_kernels
from i2v_kernels import _backend
from i2v_kernels.ops.conv3d import causal_conv3d, output_format
from i2v_kernels.ops.conv3d import reference as ref
from i2v_kernels.ops.conv3d.modules import CausalConv3d, ConvCache, decode_in_chunks, streaming
from _util import TOL, skip_unless_usable

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["cpu", "triton", "torch"]


def _triple(v):
    return (v, v, v) if isinstance(v, int) else tuple(v)


def _expected(x, w, b=None, *, stride=1, dilation=1, time_pad="replicate", cache=None, residual=None):
    """The causal conv written out in fp64: temporal front padding by cat, spatial zeros by F.pad."""
    d = _triple(dilation)
    kt, kh, kw = w.shape[2:]
    P = (kt - 1) * d[0]
    x64 = x.double()
    if cache is not None:
        front = cache.double()
    elif time_pad == "replicate":
        front = x64[:, :, :1].repeat(1, 1, P, 1, 1)
    else:
        front = torch.zeros_like(x64[:, :, :1]).repeat(1, 1, P, 1, 1)
    xp = torch.cat([front, x64], dim=2)
    ph, pw = d[1] * (kh - 1) // 2, d[2] * (kw - 1) // 2
    xp = F.pad(xp, (pw, pw, ph, ph, 0, 0))
    y = F.conv3d(xp, w.double(), None if b is None else b.double(), stride=_triple(stride), dilation=d)
    return y if residual is None else y + residual.double()


# --------------------------------------------------------------------------------------------------
# Cases with readable ids: (B, Cin, Cout, T, H, W, kernel, stride, dilation, time_pad, with_cache)

CASES = {
    "k333-replicate-T5-H7W6": (2, 5, 9, 5, 7, 6, (3, 3, 3), 1, 1, "replicate", False),
    "k333-zeros-cache": (1, 4, 6, 3, 5, 7, (3, 3, 3), 1, 1, "zeros", True),
    "k333-replicate-cache": (1, 4, 6, 2, 6, 5, (3, 3, 3), 1, 1, "replicate", True),
    "wan-down-k311-s211": (2, 6, 6, 5, 5, 6, (3, 1, 1), (2, 1, 1), 1, "zeros", False),
    "k311-s211-cache-T4": (1, 6, 6, 4, 5, 5, (3, 1, 1), (2, 1, 1), 1, "zeros", True),
    "k111": (2, 7, 5, 3, 5, 9, (1, 1, 1), 1, 1, "replicate", False),
    "k133-spatial-only": (1, 5, 7, 2, 6, 6, (1, 3, 3), 1, 1, "zeros", False),
    "T1-replicate": (2, 4, 8, 1, 7, 7, (3, 3, 3), 1, 1, "replicate", False),
    "T1-zeros-cache": (1, 4, 8, 1, 5, 6, (3, 3, 3), 1, 1, "zeros", True),
    "dilation-212": (1, 4, 6, 4, 7, 8, (3, 3, 3), 1, (2, 1, 2), "replicate", False),
    "stride-222-odd-H9W5": (1, 4, 6, 5, 9, 5, (3, 3, 3), 2, 1, "replicate", True),
    "even-kernel-224": (1, 3, 5, 3, 6, 7, (2, 2, 4), 1, 1, "zeros", False),
    "rgb-C3-to-16": (1, 3, 16, 3, 8, 8, (3, 3, 3), 1, 1, "replicate", False),
    "C72-to-130-multi-block": (1, 72, 130, 2, 3, 4, (3, 3, 3), 1, 1, "replicate", True),
}
LOW_PRECISION_CASES = ["k333-replicate-T5-H7W6", "wan-down-k311-s211", "k333-zeros-cache", "T1-replicate",
                       "even-kernel-224", "C72-to-130-multi-block"]


def _case(name, dtype, with_bias=True):
    B, Cin, Cout, T, H, W, k, s, d, time_pad, with_cache = CASES[name]
    x = torch.randn(B, Cin, T, H, W).to(dtype)
    fan_in = Cin * k[0] * k[1] * k[2]
    w = (torch.randn(Cout, Cin, *k) / fan_in ** 0.5).to(dtype)
    b = torch.randn(Cout).to(dtype) if with_bias else None
    P = (k[0] - 1) * _triple(d)[0]
    cache = torch.randn(B, Cin, P, H, W).to(dtype) if with_cache else None
    return x, w, b, dict(stride=s, dilation=d, time_pad=time_pad, cache=cache)


def _close(actual, expected, dtype):
    assert actual.dtype == dtype
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected, **TOL[dtype])


# --------------------------------------------------------------------------------------------------
# Forward against the formula


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_construction(case):
    x, w, b, kw = _case(case, torch.float64)
    _close(ref.causal_conv3d(x, w, b, **kw), _expected(x, w, b, **kw), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_forward_float32(backend, case):
    skip_unless_usable(backend)
    x, w, b, kw = _case(case, torch.float32)
    with i2v_kernels.use_backend(backend):
        y = causal_conv3d(x, w, b, **kw)
    _close(y, _expected(x, w, b, **kw), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LOW_PRECISION_CASES)
def test_forward_half(backend, dtype, case):
    skip_unless_usable(backend)
    x, w, b, kw = _case(case, dtype)
    with i2v_kernels.use_backend(backend):
        y = causal_conv3d(x, w, b, **kw)
    _close(y, _expected(x, w, b, **kw), dtype)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_float64(backend):
    x, w, b, kw = _case("k333-zeros-cache", torch.float64)
    with i2v_kernels.use_backend(backend):  # auto on CPU: the cpu backend, fp64 math
        y = causal_conv3d(x, w, b, **kw)
    _close(y, _expected(x, w, b, **kw), torch.float64)


@pytest.mark.parametrize("backend", [*BACKENDS, "native", "auto"])
@pytest.mark.parametrize("case", ["stride-222-odd-H9W5", "k333-zeros-cache"])
def test_cpu_output_is_contiguous_ncdhw_on_every_backend(backend, case):
    """On CPU the op returns NCDHW (what ATen's CPU conv3d computes in and the next conv reads), whatever
    the input's layout (channels_last_3d here), with the reference's values."""
    if backend != "auto":
        skip_unless_usable(backend)
    x, w, b, kw = _case(case, torch.float32)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    if kw.get("cache") is not None:
        kw["cache"] = kw["cache"].contiguous(memory_format=torch.channels_last_3d)
    with i2v_kernels.use_backend(backend):
        y = causal_conv3d(x, w, b, **kw)
    assert output_format(x.device) == torch.contiguous_format
    assert y.stride() == torch.empty(y.shape).stride()
    _close(y, _expected(x, w, b, **kw), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "time-slice-of-channels-last", "permuted", "channel-slice"])
def test_strided_inputs(backend, layout):
    skip_unless_usable(backend)
    B, C, T, H, W = 1, 6, 4, 5, 7
    if layout == "channels_last":
        x = torch.randn(B, C, T, H, W).contiguous(memory_format=torch.channels_last_3d)
    elif layout == "time-slice-of-channels-last":  # a chunk of a channels-last video: read in place
        x = torch.randn(B, C, T + 3, H, W).contiguous(memory_format=torch.channels_last_3d)[:, :, 2:2 + T]
    elif layout == "permuted":
        x = torch.randn(B, T, C, W, H).permute(0, 2, 1, 4, 3)
    else:
        x = torch.randn(B, C + 3, T, H, W)[:, 1:1 + C]
    w = torch.randn(8, C, 3, 3, 3).permute(0, 1, 4, 3, 2).contiguous().permute(0, 1, 4, 3, 2) / 12
    cache = torch.randn(B, T, C, H, W).transpose(1, 2)[:, :, :2]
    res = torch.randn(B, T, 8, H, W).transpose(1, 2)  # read through its strides, no copy
    with i2v_kernels.use_backend(backend):
        y = causal_conv3d(x, w, None, cache=cache, residual=res)
    _close(y, _expected(x, w, None, cache=cache, residual=res), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_residual_fused(backend, dtype):
    skip_unless_usable(backend)
    x, w, b, kw = _case("k333-replicate-T5-H7W6", dtype)
    res = torch.randn(2, 9, 5, 7, 6).to(dtype)
    with i2v_kernels.use_backend(backend):
        y = causal_conv3d(x, w, b, residual=res, **kw)
    _close(y, _expected(x, w, b, residual=res, **kw), dtype)


def test_replicate_and_zeros_differ_only_in_the_first_frames():
    x, w, b, _ = _case("k333-replicate-T5-H7W6", torch.float32)
    rep = causal_conv3d(x, w, b, time_pad="replicate")
    zer = causal_conv3d(x, w, b, time_pad="zeros")
    torch.testing.assert_close(rep[:, :, 2:], zer[:, :, 2:])
    assert not torch.allclose(rep[:, :, :2], zer[:, :, :2])


def test_empty_batch():
    x, w = torch.randn(0, 4, 3, 5, 5), torch.randn(6, 4, 3, 3, 3)
    for backend in BACKENDS:
        if _backend._GENERIC[backend](torch.device("cpu")) is None:
            with i2v_kernels.use_backend(backend):
                assert causal_conv3d(x, w).shape == (0, 6, 3, 5, 5)


def test_autocast_casts_like_conv3d():
    x, w, b, kw = _case("k333-replicate-T5-H7W6", torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = causal_conv3d(x, w, b, **kw)
    assert y.dtype == torch.bfloat16
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    _close(y, _expected(xb, wb, bb, **kw), torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# Module, caches, streaming


def test_module_matches_nn_conv3d_layout_and_init():
    m = CausalConv3d(4, 6, (3, 1, 1), stride=(2, 1, 1), time_pad="zeros")
    c = nn.Conv3d(4, 6, (3, 1, 1), stride=(2, 1, 1))
    assert m.weight.shape == c.weight.shape and m.bias.shape == c.bias.shape
    bound = 1 / (4 * 3) ** 0.5
    assert m.weight.abs().max() <= bound and m.bias.abs().max() <= bound
    m.load_state_dict(c.state_dict())
    assert CausalConv3d(4, 6, 3, bias=False).bias is None


@pytest.mark.parametrize("T,P", [(1, 2), (2, 4), (5, 2)])
@pytest.mark.parametrize("time_pad", ["replicate", "zeros"])
def test_new_cache_is_last_P_frames_of_padded_input(T, P, time_pad):
    m = CausalConv3d(3, 4, 3, dilation=(P // 2, 1, 1), time_pad=time_pad)
    x = torch.randn(1, 3, T, 4, 5)
    _, cache = m(x)
    front = x[:, :, :1].repeat(1, 1, P, 1, 1) if time_pad == "replicate" else torch.zeros(1, 3, P, 4, 5)
    assert cache.shape == (1, 3, P, 4, 5)
    torch.testing.assert_close(cache, torch.cat([front, x], 2)[:, :, -P:])
    x2 = torch.randn(1, 3, 1, 4, 5)
    _, cache2 = m(x2, cache)
    torch.testing.assert_close(cache2, torch.cat([cache, x2], 2)[:, :, -P:])
    assert cache2.data_ptr() != x2.data_ptr()


def _chunked(module, x, sizes):
    cache, ys = None, []
    for piece in x.split(sizes, dim=2):
        y, cache = module(piece, cache)
        ys.append(y)
    return torch.cat(ys, dim=2)


CHUNKINGS = {"ones": [1] * 6, "twos": [2, 2, 2], "uneven": [3, 1, 2], "one-then-five": [1, 5]}


CHUNK_CONFS = ["k333-replicate", "k333-zeros-dilation2", "k311-zeros"]
# Every chunking on the reference; the interpreter (slow) gets the one-frame and uneven chunkings.
CHUNK_PARAMS = [(b, c, conf) for b in ("torch", "cpu") for c in CHUNKINGS for conf in CHUNK_CONFS] + [
    ("triton", c, conf) for c in ("ones", "uneven") for conf in CHUNK_CONFS]


@pytest.mark.parametrize("backend,chunks,conf", CHUNK_PARAMS, ids="-".join)
def test_chunked_equals_whole(backend, chunks, conf):
    skip_unless_usable(backend)
    kernel, dilation, time_pad = {"k333-replicate": (3, 1, "replicate"),
                                  "k333-zeros-dilation2": (3, (2, 1, 1), "zeros"),
                                  "k311-zeros": ((3, 1, 1), 1, "zeros")}[conf]
    m = CausalConv3d(5, 7, kernel, dilation=dilation, time_pad=time_pad)
    x = torch.randn(2, 5, 6, 5, 7)
    with i2v_kernels.use_backend(backend), torch.no_grad():
        whole, _ = m(x)
        chunked = _chunked(m, x, CHUNKINGS[chunks])
    torch.testing.assert_close(chunked, whole)


@pytest.mark.parametrize("chunks", [[2, 2, 2], [4, 2], [2, 4], [2, 2, 1]])
def test_chunked_equals_whole_with_temporal_stride(chunks):
    """Stride (2, 1, 1) (Wan's temporal downsample): chunks of a multiple of the stride (the last may be odd)."""
    m = CausalConv3d(4, 4, (3, 1, 1), stride=(2, 1, 1), time_pad="zeros")
    x = torch.randn(1, 4, sum(chunks), 3, 4)
    with torch.no_grad():
        whole, _ = m(x)
        chunked = _chunked(m, x, chunks)
    assert chunked.shape == whole.shape
    torch.testing.assert_close(chunked, whole)


def test_temporal_stride_misaligned_chunks_differ():
    """Documented limitation: an odd chunk before the last shifts the stride-2 grid."""
    m = CausalConv3d(4, 4, (3, 1, 1), stride=(2, 1, 1), time_pad="zeros")
    x = torch.randn(1, 4, 6, 3, 4)
    with torch.no_grad():
        whole, _ = m(x)
        chunked = _chunked(m, x, [1, 5])
    assert chunked.shape != whole.shape or not torch.allclose(chunked, whole)


class ToyDecoder(nn.Module):
    """A tiny causal video decoder: conv -> SiLU -> x4 temporal and x2 spatial upsample -> strided
    temporal conv (/2) -> SiLU -> conv with dilated time -> conv (3,1,1) with a fused residual.
    Two output frames per latent frame."""

    def __init__(self, use_kernels=True):
        super().__init__()
        self.conv_in = CausalConv3d(4, 8, 3, time_pad="replicate", use_kernels=use_kernels)
        self.down_t = CausalConv3d(8, 8, (3, 1, 1), stride=(2, 1, 1), time_pad="zeros", use_kernels=use_kernels)
        self.mid = CausalConv3d(8, 8, 3, dilation=(2, 1, 1), time_pad="zeros", use_kernels=use_kernels)
        self.conv_out = CausalConv3d(8, 3, (3, 1, 1), time_pad="replicate", use_kernels=use_kernels)
        self.act = nn.SiLU()

    def forward(self, z):
        h = self.act(self.conv_in(z)[0])
        h = F.interpolate(h.repeat_interleave(4, dim=2), scale_factor=(1, 2, 2), mode="nearest")
        h = self.act(self.down_t(h)[0])
        h = self.mid(h)[0]
        return self.conv_out(self.act(h))[0]


@pytest.mark.parametrize("chunk", [1, 2, [3, 1, 1], [1, 4]], ids=str)
def test_decode_in_chunks_equals_whole(chunk):
    dec = ToyDecoder()
    z = torch.randn(1, 4, 5, 3, 4)
    with torch.no_grad():
        whole = dec(z)
        chunked = decode_in_chunks(dec, z, chunk, out_frames_per_latent_frame=2, model=dec)
    assert whole.shape == (1, 3, 10, 6, 8)
    torch.testing.assert_close(chunked, whole)


def test_decode_in_chunks_triton_one_frame_chunks():
    skip_unless_usable("triton")
    dec = ToyDecoder()
    z = torch.randn(1, 4, 3, 2, 3)
    with torch.no_grad(), i2v_kernels.use_backend("triton"):
        chunked = decode_in_chunks(dec, z, 1, out_frames_per_latent_frame=2, model=dec)
    with torch.no_grad():
        whole = dec(z)  # the reference backend: kernels and caches agree across backends
    torch.testing.assert_close(chunked, whole)


def test_decode_in_chunks_writes_into_preallocated_output_and_bounds_caches():
    dec = ToyDecoder()
    z = torch.randn(2, 4, 4, 3, 3)
    out = torch.full((2, 3, 8, 6, 6), float("nan"))
    state = ConvCache()

    def decode(zc):
        return dec(zc)

    with torch.no_grad(), streaming(dec, state):
        got = decode_in_chunks(decode, z, 2, out_frames_per_latent_frame=2, out=out)
    assert got is out and not out.isnan().any()
    # one cache per module, each exactly P input frames of its last chunk
    assert len(state) == 4
    expected = {dec.conv_in: (2, 4, 2, 3, 3), dec.down_t: (2, 8, 2, 6, 6), dec.mid: (2, 8, 4, 6, 6),
                dec.conv_out: (2, 8, 2, 6, 6)}
    for m, shape in expected.items():
        assert state.get(m).shape == shape
    assert state.nbytes() == sum(4 * torch.Size(s).numel() for s in expected.values())
    assert all(m._stream is None for m in dec.modules() if isinstance(m, CausalConv3d))
    with torch.no_grad():
        torch.testing.assert_close(out, dec(z))


def test_decode_in_chunks_checks_sizes():
    dec = ToyDecoder()
    z = torch.randn(1, 4, 3, 2, 2)
    with torch.no_grad():
        with pytest.raises(ValueError, match="sum to"):
            decode_in_chunks(dec, z, [1, 1], out_frames_per_latent_frame=2, model=dec)
        with pytest.raises(ValueError, match="does not fit"):
            decode_in_chunks(dec, z, 1, out_frames_per_latent_frame=1, model=dec)
        with pytest.raises(ValueError, match="produced 6 frames"):
            decode_in_chunks(dec, z, 1, total_frames=7, model=dec)


def test_module_without_kernels_matches():
    z = torch.randn(1, 4, 3, 3, 3)
    a, b = ToyDecoder(), ToyDecoder(use_kernels=False)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(a(z), b(z))


# --------------------------------------------------------------------------------------------------
# Gradients, opcheck, compile


GRAD_CASES = {
    "replicate-no-cache": dict(time_pad="replicate"),
    "zeros-no-cache": dict(time_pad="zeros"),
    "cache-residual": dict(time_pad="zeros", cache=True, residual=True),
    "stride-dilation-replicate": dict(time_pad="replicate", stride=(2, 1, 2), dilation=(2, 1, 1)),
}


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradcheck(case):
    kw = dict(GRAD_CASES[case])
    d = _triple(kw.get("dilation", 1))
    B, C, T, H, W = 1, 2, 3, 3, 4
    P = 2 * d[0]
    x = torch.randn(B, C, T, H, W, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, C, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    cache = torch.randn(B, C, P, H, W, dtype=torch.float64, requires_grad=True) if kw.pop("cache", False) else None
    with_res = kw.pop("residual", False)
    out_shape = ref.output_shape(x.shape, w.shape, _triple(kw.get("stride", 1)), d)
    res = torch.randn(out_shape, dtype=torch.float64, requires_grad=True) if with_res else None
    inputs = [t for t in (x, w, b, cache, res) if t is not None]

    def fn(*args):
        it = iter(args)
        xx, ww, bb = next(it), next(it), next(it)
        cc = next(it) if cache is not None else None
        rr = next(it) if res is not None else None
        return causal_conv3d(xx, ww, bb, cache=cc, residual=rr, **kw)

    torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_construction(backend):
    skip_unless_usable(backend)
    x, w, b, kw = _case("k333-replicate-cache", torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, kw["cache"])]
    with i2v_kernels.use_backend(backend):
        y = causal_conv3d(*leaves[:3], time_pad="replicate", cache=leaves[3])
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, g)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    expected = torch.autograd.grad(_expected(*leaves64[:3], time_pad="replicate", cache=leaves64[3]), leaves64,
                                   g.double())
    for a, e in zip(grads, expected):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, atol=1e-4, rtol=1e-4)


def test_replicate_gradient_flows_into_first_frame():
    x = torch.randn(1, 2, 3, 3, 3, requires_grad=True)
    w = torch.zeros(1, 2, 3, 1, 1)
    w[:, :, 0] = 1.0  # output t reads input frame t - 2 only
    causal_conv3d(x, w, time_pad="replicate").sum().backward()
    # frames -2, -1 (copies of frame 0) and frame 0 itself feed outputs 0, 1, 2: frame 0 gets 3x
    torch.testing.assert_close(x.grad[:, :, 0], torch.full((1, 2, 3, 3), 3.0))
    torch.testing.assert_close(x.grad[:, :, 2], torch.zeros(1, 2, 3, 3))
    x.grad = None
    causal_conv3d(x, w, time_pad="zeros").sum().backward()
    torch.testing.assert_close(x.grad[:, :, 0], torch.ones(1, 2, 3, 3))


def _op_samples():
    x = torch.randn(1, 3, 3, 5, 4, requires_grad=True)
    w = (torch.randn(4, 3, 3, 3, 3) / 9).requires_grad_()
    b = torch.randn(4, requires_grad=True)
    cache = torch.randn(1, 3, 2, 5, 4, requires_grad=True)
    res = torch.randn(1, 4, 2, 5, 4, requires_grad=True)
    xh = torch.randn(1, 3, 2, 4, 4, dtype=torch.float16)
    wh = torch.randn(5, 3, 3, 1, 1, dtype=torch.float16, requires_grad=True)
    op = torch.ops.i2v_kernels.causal_conv3d
    return [
        (op, (x, w, b, None, None, [1, 1, 1], [1, 1, 1], "replicate")),
        (op, (x, w, None, cache, res, [2, 1, 1], [1, 1, 1], "zeros")),
        (op, (xh, wh, None, None, None, [1, 1, 1], [1, 1, 1], "zeros")),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    skip_unless_usable(backend)
    with i2v_kernels.use_backend(backend):
        for op, args in _op_samples():
            torch.library.opcheck(op, args)


def test_opcheck_backward_op():
    x = torch.randn(1, 3, 3, 5, 4)
    w = torch.randn(4, 3, 3, 3, 3)
    cache = torch.randn(1, 3, 2, 5, 4)
    g = torch.randn(1, 4, 2, 5, 4)
    op = torch.ops.i2v_kernels._causal_conv3d_bwd
    torch.library.opcheck(op, (g, x, w, cache, [2, 1, 1], [1, 1, 1], "zeros", [True, True, True, True]))
    torch.library.opcheck(op, (g, x, w, None, [2, 1, 1], [1, 1, 1], "replicate", [True, False, True, False]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    skip_unless_usable(backend)
    w1 = (torch.randn(6, 4, 3, 3, 3) / 10).requires_grad_()
    w2 = (torch.randn(6, 6, 3, 1, 1) / 4).requires_grad_()
    b = torch.randn(6, requires_grad=True)

    def block(x, cache, res):
        h = F.silu(causal_conv3d(x, w1, b, time_pad="zeros", cache=cache))
        return causal_conv3d(h, w2, None, stride=(2, 1, 1), residual=res)

    x = torch.randn(1, 4, 4, 5, 6, requires_grad=True)
    cache = torch.randn(1, 4, 2, 5, 6)
    res = torch.randn(1, 6, 2, 5, 6)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with i2v_kernels.use_backend(backend):
        expected, actual = block(x, cache, res), compiled(x, cache, res)
        torch.testing.assert_close(actual, expected)
        assert actual.stride() == expected.stride()
        g1 = torch.autograd.grad(expected.sum(), (x, w1, w2, b))
        g2 = torch.autograd.grad(actual.sum(), (x, w1, w2, b))
    for a, e in zip(g2, g1):
        torch.testing.assert_close(a, e)


# --------------------------------------------------------------------------------------------------
# Bad input


def _bad_inputs():
    x = torch.randn(1, 3, 2, 5, 5)
    w = torch.randn(4, 3, 3, 3, 3)
    return [
        ("x-rank", lambda: causal_conv3d(x[0], w), ValueError, r"x must be \[B, Cin, T, H, W\]"),
        ("x-no-frames", lambda: causal_conv3d(x[:, :, :0], w), ValueError, r"\bx\b.*T"),
        ("int-x", lambda: causal_conv3d(x.long(), w), TypeError, r"\bx\b"),
        ("x-not-tensor", lambda: causal_conv3d(x.numpy(), w), TypeError, r"\bx\b"),
        ("channel-mismatch", lambda: causal_conv3d(x, torch.randn(4, 5, 3, 3, 3)), ValueError, r"Cin=3"),
        ("weight-rank", lambda: causal_conv3d(x, torch.randn(4, 3, 3, 3)), ValueError, r"weight must be \[Cout"),
        ("weight-dtype", lambda: causal_conv3d(x, w.double()), TypeError, r"weight"),
        ("weight-device", lambda: causal_conv3d(x, w.to("meta")), ValueError, r"weight is on meta"),
        ("weight-none", lambda: causal_conv3d(x, None), TypeError, r"weight"),
        ("bias-shape", lambda: causal_conv3d(x, w, torch.randn(3)), ValueError, r"bias must have shape \(4,\)"),
        ("bias-int", lambda: causal_conv3d(x, w, torch.ones(4, dtype=torch.int32)), TypeError, r"bias"),
        ("kernel-larger-than-padded-input", lambda: causal_conv3d(torch.randn(1, 3, 2, 1, 5), torch.randn(4, 3, 1, 2, 2)),
         ValueError, r"padded input's H"),
        ("cache-frames", lambda: causal_conv3d(x, w, cache=torch.randn(1, 3, 1, 5, 5)), ValueError,
         r"cache must be \[B, Cin, P, H, W\] = \(1, 3, 2, 5, 5\)"),
        ("cache-spatial", lambda: causal_conv3d(x, w, cache=torch.randn(1, 3, 2, 5, 4)), ValueError, r"cache"),
        ("cache-dtype", lambda: causal_conv3d(x, w, cache=torch.randn(1, 3, 2, 5, 5).half()), TypeError, r"cache"),
        ("cache-device", lambda: causal_conv3d(x, w, cache=torch.randn(1, 3, 2, 5, 5, device="meta")), ValueError,
         r"cache is on meta"),
        ("time-pad", lambda: causal_conv3d(x, w, time_pad="reflect"), ValueError, r"time_pad"),
        ("stride-zero", lambda: causal_conv3d(x, w, stride=(0, 1, 1)), ValueError, r"stride must be positive"),
        ("dilation-negative", lambda: causal_conv3d(x, w, dilation=-1), ValueError, r"dilation"),
        ("stride-float", lambda: causal_conv3d(x, w, stride=1.5), TypeError, r"stride"),
        ("stride-pair", lambda: causal_conv3d(x, w, stride=(1, 2)), TypeError, r"stride"),
        ("residual-shape", lambda: causal_conv3d(x, w, residual=torch.randn(1, 4, 2, 5, 4)), ValueError, r"residual"),
        ("module-time-pad", lambda: CausalConv3d(3, 4, 3, time_pad="circular"), ValueError, r"time_pad"),
    ]


@pytest.mark.parametrize("name", [b[0] for b in _bad_inputs()])
def test_bad_input_names_the_argument(name):
    (fn, exc, pattern), = [b[1:] for b in _bad_inputs() if b[0] == name]
    with pytest.raises(exc, match=pattern):
        fn()


def test_forced_backend_that_cannot_run_raises():
    x, w = torch.randn(1, 3, 2, 5, 5), torch.randn(4, 3, 3, 3, 3)
    with i2v_kernels.use_backend("cuda"), pytest.raises(i2v_kernels.BackendUnavailableError, match="cuda"):
        causal_conv3d(x, w)
    if _backend._GENERIC["triton"](torch.device("cpu")) is None:
        with i2v_kernels.use_backend("triton"), pytest.raises(i2v_kernels.BackendUnavailableError, match="float64"):
            causal_conv3d(x.double(), w.double())


# --------------------------------------------------------------------------------------------------
# The C++ op (_causal_conv3d_fwd): cpu backend here, cuda backend on a GPU


def _needs_cpp(key="CPU"):
    if _backend.load_extension() or not _backend._has_kernel("_causal_conv3d_fwd", key):
        pytest.skip(f"i2v_kernels._C has no {key} _causal_conv3d_fwd kernel")


def test_auto_on_cpu_runs_the_cpp_kernel():
    _needs_cpp()
    x, w, b, kw = _case("k333-replicate-cache", torch.float32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        causal_conv3d(x, w, b, **kw)
    assert "i2v_kernels::_causal_conv3d_fwd" in {e.name for e in prof.events()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("variant", ["replicate", "zeros-residual", "cache-channels-last-x", "k311-s211"])
def test_cpu_backend_equals_reference_vae_shape(dtype, variant):
    """Same math as the reference (fp32 for fp16/bf16): equal to rounding on a VAE-like block."""
    _needs_cpp()
    x = torch.randn(1, 32, 5, 12, 10).to(dtype)
    k, s, time_pad = ((3, 1, 1), (2, 1, 1), "zeros") if variant == "k311-s211" else (3, 1, "replicate")
    w = (torch.randn(24, 32, *_triple(k)) / (32 * 27) ** 0.5).to(dtype)
    b = torch.randn(24).to(dtype)
    kw = dict(stride=s, time_pad=time_pad)
    if variant == "zeros-residual":
        kw.update(time_pad="zeros", residual=torch.randn(1, 24, 5, 12, 10).to(dtype))
    if variant == "cache-channels-last-x":
        x = x.contiguous(memory_format=torch.channels_last_3d)
        kw.update(cache=torch.randn(1, 32, 2, 12, 10).to(dtype))
    outs = {}
    for backend in ("cpu", "torch"):
        with i2v_kernels.use_backend(backend):
            outs[backend] = causal_conv3d(x, w, b, **kw)
    assert outs["cpu"].stride() == outs["torch"].stride() and outs["cpu"].dtype == dtype
    torch.testing.assert_close(outs["cpu"], outs["torch"])


def test_cpu_backend_bias_in_another_dtype():
    """bias may have any float dtype; it is cast to the math dtype, as the reference does."""
    _needs_cpp()
    x, w, _, kw = _case("k333-replicate-T5-H7W6", torch.bfloat16)
    for b in (torch.randn(9), torch.randn(9, dtype=torch.float64)):
        with i2v_kernels.use_backend("cpu"):
            y = causal_conv3d(x, w, b, **kw)
        _close(y, _expected(x, w, b, **kw), torch.bfloat16)


@pytest.mark.parametrize("shape", ["Cout1", "H1W1", "C1-k111", "B3-T1"])
def test_cpu_backend_strides_match_the_fake(shape):
    """Degenerate sizes (where channels-last and contiguous strides coincide or not): opcheck compares
    the real output's strides with the fake's."""
    _needs_cpp()
    B, Cin, Cout, T, H, W, k = {"Cout1": (1, 3, 1, 3, 4, 5, 3), "H1W1": (1, 3, 4, 2, 1, 1, (3, 1, 1)),
                                "C1-k111": (2, 1, 1, 2, 3, 3, 1), "B3-T1": (3, 2, 5, 1, 3, 4, 3)}[shape]
    x = torch.randn(B, Cin, T, H, W)
    w = torch.randn(Cout, Cin, *_triple(k))
    with i2v_kernels.use_backend("cpu"):
        y = causal_conv3d(x, w)
        assert y.stride() == torch.empty(y.shape).stride()  # NCDHW on CPU
        torch.library.opcheck(torch.ops.i2v_kernels.causal_conv3d, (x, w, None, None, None, [1, 1, 1], [1, 1, 1], "zeros"))
    _close(y, _expected(x, w), torch.float32)


def _cpp_bad_inputs(device="cpu"):
    x = torch.randn(1, 3, 2, 5, 5, device=device)
    w = torch.randn(4, 3, 3, 3, 3, device=device)
    op = torch.ops.i2v_kernels._causal_conv3d_fwd
    one = [1, 1, 1]
    return [
        ("x-rank", lambda: op(x[0], w, None, None, None, one, one, 0), r"x must be \[B, Cin, T, H, W\]"),
        ("x-no-frames", lambda: op(x[:, :, :0], w, None, None, None, one, one, 0), r"x .*T, H, W >= 1"),
        ("x-int", lambda: op(x.long(), w.long(), None, None, None, one, one, 0), r"x must be a floating-point"),
        ("channel-mismatch", lambda: op(x, w[:, :2], None, None, None, one, one, 0), r"weight must be \[Cout, Cin=3"),
        ("weight-dtype", lambda: op(x, w.double(), None, None, None, one, one, 0), r"weight must have x's dtype"),
        ("bias-shape", lambda: op(x, w, torch.randn(3, device=device), None, None, one, one, 0),
         r"bias must have shape \(4,\)"),
        ("stride-pair", lambda: op(x, w, None, None, None, [1, 1], one, 0), r"stride must be a \(t, h, w\) triple"),
        ("dilation-zero", lambda: op(x, w, None, None, None, one, [1, 0, 1], 0), r"dilation must be positive"),
        ("time-pad", lambda: op(x, w, None, None, None, one, one, 2), r"time_pad must be 0 \(replicate\) or 1"),
        ("kernel-larger-than-padded-input",
         lambda: op(torch.randn(1, 3, 2, 1, 5, device=device), torch.randn(4, 3, 1, 2, 2, device=device), None, None,
                    None, one, one, 0), r"padded input's H"),
        ("cache-frames", lambda: op(x, w, None, torch.randn(1, 3, 1, 5, 5, device=device), None, one, one, 0),
         r"cache must be \[B, Cin, P, H, W\] = \[1, 3, 2, 5, 5\]"),
        ("cache-dtype", lambda: op(x, w, None, torch.randn(1, 3, 2, 5, 5, device=device).half(), None, one, one, 0),
         r"cache must have x's dtype"),
        ("residual-shape", lambda: op(x, w, None, None, torch.randn(1, 4, 2, 5, 4, device=device), one, one, 0),
         r"residual must have the output's shape \[B, Cout, T_out, H_out, W_out\] = \[1, 4, 2, 5, 5\]"),
    ]


@pytest.mark.parametrize("name", [b[0] for b in _cpp_bad_inputs()])
def test_cpp_op_bad_input_names_the_argument(name):
    _needs_cpp()
    (fn, pattern), = [b[1:] for b in _cpp_bad_inputs() if b[0] == name]
    with pytest.raises(RuntimeError, match=pattern):
        fn()


def test_cpp_op_empty_batch():
    _needs_cpp()
    y = torch.ops.i2v_kernels._causal_conv3d_fwd(torch.randn(0, 4, 3, 5, 5), torch.randn(6, 4, 3, 3, 3), None, None,
                                                 None, [1, 1, 1], [1, 1, 1], 0)
    assert y.shape == (0, 6, 3, 5, 5) and y.stride() == torch.empty(y.shape).stride()  # NCDHW on CPU


# --------------------------------------------------------------------------------------------------
# diffusers parity (when diffusers is installed): weights copied across, whole and chunked


def test_matches_diffusers_cogvideox():
    pytest.importorskip("diffusers")
    from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXCausalConv3d

    theirs = CogVideoXCausalConv3d(4, 6, 3, pad_mode="constant")  # repeats frame 0 in time, zeros in space
    ours = CausalConv3d(4, 6, 3, time_pad="replicate")
    ours.load_state_dict({"weight": theirs.conv.weight, "bias": theirs.conv.bias})
    x = torch.randn(1, 4, 5, 6, 7)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], theirs(x)[0])
        cache_t = cache_o = None
        for piece in x.split([1, 2, 2], dim=2):
            y_t, cache_t = theirs(piece, conv_cache=cache_t)
            y_o, cache_o = ours(piece, cache_o)
            torch.testing.assert_close(y_o, y_t)
            torch.testing.assert_close(cache_o, cache_t)


def test_matches_diffusers_wan():
    pytest.importorskip("diffusers")
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    theirs = WanCausalConv3d(4, 6, 3, padding=1)  # zeros in front (2 frames), zeros in space
    ours = CausalConv3d(4, 6, 3, time_pad="zeros")
    ours.load_state_dict({"weight": theirs.weight, "bias": theirs.bias})
    x = torch.randn(1, 4, 5, 6, 7)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], theirs(x))
        feat, cache_o = None, None
        for piece in x.split([1, 2, 2], dim=2):  # Wan's own bookkeeping (CACHE_T = 2 frames of input)
            cache_x = piece[:, :, -2:].clone()
            if cache_x.shape[2] < 2 and feat is not None:
                cache_x = torch.cat([feat[:, :, -1:], cache_x], dim=2)
            y_t = theirs(piece, feat)
            feat = cache_x
            y_o, cache_o = ours(piece, cache_o)
            torch.testing.assert_close(y_o, y_t)

        # The encoder's temporal downsample (kernel (3,1,1), stride (2,1,1), no padding) passes frame 0
        # through, then convolves [last frame of the previous chunk, chunk]; with this op that is the
        # chunk minus its first frame, with that frame and the previous last frame as the cache.
        down = WanCausalConv3d(4, 4, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))
        prev, piece = x[:, :, :1], x[:, :, 1:5]
        y_t = down(torch.cat([prev[:, :, -1:], piece], 2))
        y_o = causal_conv3d(piece[:, :, 1:], down.weight, down.bias, stride=(2, 1, 1), time_pad="zeros",
                            cache=torch.cat([prev[:, :, -1:], piece[:, :, :1]], 2))
        torch.testing.assert_close(y_o, y_t)


# --------------------------------------------------------------------------------------------------
# GPU


GPU_SHAPES = {
    # id: (B, Cin, Cout, T, H, W, kernel, stride, time_pad)
    "cogvideox-480p-C128": (1, 128, 128, 5, 60, 90, (3, 3, 3), 1, "replicate"),
    "wan-480p-C384-cache": (1, 384, 384, 2, 60, 104, (3, 3, 3), 1, "zeros"),
    "C512-small": (1, 512, 512, 3, 30, 45, (3, 3, 3), 1, "replicate"),
    "conv-in-C16-to-512": (1, 16, 512, 5, 60, 90, (3, 3, 3), 1, "replicate"),
    "conv-out-C128-to-3": (1, 128, 3, 5, 61, 91, (3, 3, 3), 1, "replicate"),
    "wan-down-k311-s211": (1, 256, 256, 9, 60, 90, (3, 1, 1), (2, 1, 1), "zeros"),
}


# cuDNN's fp16 kernels may round partial sums to fp16 (1 element of 13.8 M was 2.7e-3 off at
# conv-in-C16-to-512 on an H200), so fp16 gets a little more room on the GPU than the fp32-math tolerance.
GPU_TOL = {**TOL, torch.float16: dict(atol=5e-3, rtol=5e-3)}


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_vae_shapes(dtype, shape):
    B, Cin, Cout, T, H, W, k, s, time_pad = GPU_SHAPES[shape]
    x = torch.randn(B, Cin, T, H, W, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
    w = (torch.randn(Cout, Cin, *k, device="cuda") / (Cin * k[0] * k[1] * k[2]) ** 0.5).to(dtype)
    b = torch.randn(Cout, device="cuda", dtype=dtype)
    cache = torch.randn(B, Cin, k[0] - 1, H, W, device="cuda", dtype=dtype) if "cache" in shape else None
    y = causal_conv3d(x, w, b, stride=s, time_pad=time_pad, cache=cache)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        expected = ref.causal_conv3d(x, w, b, stride=s, time_pad=time_pad, cache=cache)
    torch.testing.assert_close(y.float(), expected.float(), **GPU_TOL[dtype])


@pytest.mark.needs_cuda
def test_gpu_float32_and_chunked_equals_whole():
    m = CausalConv3d(64, 64, 3, time_pad="zeros").cuda()
    x = torch.randn(1, 64, 7, 33, 45, device="cuda")
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        whole, _ = m(x)
        expected = ref.causal_conv3d(x, m.weight, m.bias, time_pad="zeros")
        torch.testing.assert_close(whole, expected, atol=1e-4, rtol=1e-4)
        chunked = _chunked(m, x, [1, 2, 4])
    torch.testing.assert_close(chunked, whole)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("backend", ["cuda", "triton", "native"])
def test_gpu_backend_vae_shapes(backend, dtype, shape):
    skip_unless_usable(backend, "cuda")
    B, Cin, Cout, T, H, W, k, s, time_pad = GPU_SHAPES[shape]
    x = torch.randn(B, Cin, T, H, W, device="cuda", dtype=dtype)
    w = (torch.randn(Cout, Cin, *k, device="cuda") / (Cin * k[0] * k[1] * k[2]) ** 0.5).to(dtype)
    b = torch.randn(Cout, device="cuda", dtype=dtype)
    cache = torch.randn(B, Cin, k[0] - 1, H, W, device="cuda", dtype=dtype) if "cache" in shape else None
    T_out = (T - 1) // _triple(s)[0] + 1
    res = torch.randn(B, Cout, T_out, H, W, device="cuda", dtype=dtype)
    with i2v_kernels.use_backend(backend):
        y = causal_conv3d(x, w, b, stride=s, time_pad=time_pad, cache=cache, residual=res)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        expected = ref.causal_conv3d(x, w, b, stride=s, time_pad=time_pad, cache=cache, residual=res)
    assert y.stride() == torch.empty(y.shape, memory_format=torch.channels_last_3d).stride()
    torch.testing.assert_close(y.float(), expected.float(), **GPU_TOL[dtype])


@pytest.mark.needs_cuda
@pytest.mark.parametrize("case", CASES)
def test_gpu_cuda_backend_cases_float32(case):
    skip_unless_usable("cuda", "cuda")
    x, w, b, kw = _case(case, torch.float32)
    x, w, b = x.cuda(), w.cuda(), b.cuda()
    kw = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    with i2v_kernels.use_backend("cuda"), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        y = causal_conv3d(x, w, b, **kw)
    _close(y.cpu(), _expected(x.cpu(), w.cpu(), b.cpu(), **{k: v.cpu() if isinstance(v, torch.Tensor) else v
                                                           for k, v in kw.items()}), torch.float32)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("layout", ["channels_last", "time-slice-of-channels-last", "permuted", "channel-slice"])
def test_gpu_cuda_backend_strided_inputs(layout):
    skip_unless_usable("cuda", "cuda")
    B, C, T, H, W = 1, 6, 4, 5, 7
    if layout == "channels_last":
        x = torch.randn(B, C, T, H, W).contiguous(memory_format=torch.channels_last_3d)
    elif layout == "time-slice-of-channels-last":
        x = torch.randn(B, C, T + 3, H, W).contiguous(memory_format=torch.channels_last_3d)[:, :, 2:2 + T]
    elif layout == "permuted":
        x = torch.randn(B, T, C, W, H).permute(0, 2, 1, 4, 3)
    else:
        x = torch.randn(B, C + 3, T, H, W)[:, 1:1 + C]
    w = torch.randn(8, C, 3, 3, 3) / 12
    cache = torch.randn(B, T, C, H, W).transpose(1, 2)[:, :, :2]
    res = torch.randn(B, T, 8, H, W).transpose(1, 2)
    expected = _expected(x, w, None, cache=cache, residual=res)
    x, w, cache, res = (t.cuda() for t in (x, w, cache, res))
    with i2v_kernels.use_backend("cuda"), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        y = causal_conv3d(x, w, None, cache=cache, residual=res)
    _close(y.cpu(), expected, torch.float32)


@pytest.mark.needs_cuda
def test_gpu_cuda_backend_chunked_equals_whole_and_opcheck():
    skip_unless_usable("cuda", "cuda")
    m = CausalConv3d(16, 24, 3, time_pad="replicate").cuda()
    x = torch.randn(1, 16, 6, 9, 11, device="cuda")
    with i2v_kernels.use_backend("cuda"), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        with torch.no_grad():
            whole, _ = m(x)
            chunked = _chunked(m, x, [1, 3, 2])
        torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
        xs = torch.randn(1, 3, 3, 5, 4, device="cuda", requires_grad=True)
        ws = (torch.randn(4, 3, 3, 3, 3, device="cuda") / 9).requires_grad_()
        torch.library.opcheck(torch.ops.i2v_kernels.causal_conv3d,
                              (xs, ws, None, None, None, [1, 1, 1], [1, 1, 1], "replicate"))
