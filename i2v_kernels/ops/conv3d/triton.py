"""Triton implicit-GEMM causal 3D convolution (formula in ``reference.py``).

The convolution is one GEMM ``out[M, N] = A[M, K] @ Wt[K, N]`` that is never materialized:

* ``M = B * T_out * H_out * W_out`` output positions (rows), ``N = Cout``;
* ``K = kt * kh * kw * Cin``, walked as one loop over (tap, channel block) so the compiler can
  pipeline it; each iteration gathers a ``[BLOCK_M, BLOCK_K]`` tile of input channels at one kernel
  tap for ``BLOCK_M`` output positions -- contiguous loads, since the input is channels-last
  (``NDHWC``: unit stride on ``C``) -- and a ``[BLOCK_K, BLOCK_N]`` tile of the weight.

Temporal front padding is read in place: input frame ``t < 0`` comes from the ``cache`` (a second
pointer, ``[B, Cin, P, H, W]``), or from frame 0 (``replicate``), or is zero (``zeros``), chosen by a
``tl.constexpr``; spatial zero padding is a load mask. No ``F.pad``, no ``torch.cat``. fp32
accumulation; bias and an optional residual are added in the epilogue; the output is written
channels-last (``NDHWC``), i.e. a ``[B, Cout, T', H', W']`` tensor in ``torch.channels_last_3d``
format. All address arithmetic is int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from i2v_kernels._backend import triton_interpreted
from i2v_kernels.ops._compile_space import Dtypes, KernelSpace, Launch, combinations, distinct_launches, pointers, \
    powers_of_two
from i2v_kernels.ops._triton_utils import TL_DTYPES, dot_dtype
from i2v_kernels.ops.conv3d.reference import spatial_padding, time_padding

# Read inside the kernel, so they must be ``tl.constexpr``: the compiler rejects plain Python globals in
# ``@triton.jit`` code (the interpreter does not, which is how a plain int once slipped through).
PAD_ZEROS, PAD_REPLICATE, PAD_CACHE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _causal_conv3d_fwd_kernel(
    X, CACHE, Wt, BIAS, RES, OUT,
    M, N, C, H, W, T_out, H_out, W_out, P,
    sxb, sxt, sxh, sxw,
    scb, sct, sch, scw,
    swo, swi, swt, swh, sww,
    srb, src, srt, srh, srw,
    ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    DT: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    TIME_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # Consecutive programs share their M tile (the input rows, the big operand) across the N tiles.
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = (pid // num_n).to(tl.int64)
    pid_n = pid % num_n

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < M
    wo = rows % W_out
    rest = rows // W_out
    ho = rest % H_out
    rest = rest // H_out
    to = rest % T_out
    b = rest // T_out

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    offs_k = tl.arange(0, BLOCK_K)

    # Loop-invariant parts of the addresses.
    t0 = to * ST - P  # input frame of tap 0 (negative: padding)
    h0 = ho * SH - PH
    w0 = wo * SW - PW
    x_row0 = b * sxb
    c_row0 = b * scb
    w_cols = cols.to(tl.int64) * swo

    num_cb = tl.cdiv(C, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kk in range(0, KT * KH * KW * num_cb):
        tap = kk // num_cb
        c_start = (kk % num_cb) * BLOCK_K
        it = tap // (KH * KW)
        ih = (tap // KW) % KH
        iw = tap % KW

        t_in = t0 + it * DT
        h_in = h0 + ih * DH
        w_in = w0 + iw * DW
        valid = row_mask & (h_in >= 0) & (h_in < H) & (w_in >= 0) & (w_in < W)
        h_c = tl.minimum(tl.maximum(h_in, 0), H - 1)
        w_c = tl.minimum(tl.maximum(w_in, 0), W - 1)
        in_x = t_in >= 0
        t_x = tl.maximum(t_in, 0)  # replicate reads frame 0 for every padding frame

        chan = c_start + offs_k
        k_mask = chan < C
        x_off = x_row0 + t_x * sxt + h_c * sxh + w_c * sxw
        x_mask = valid
        if TIME_PAD != PAD_REPLICATE:
            x_mask = x_mask & in_x
        a = tl.load(X + x_off[:, None] + chan[None, :], mask=x_mask[:, None] & k_mask[None, :], other=0.0)
        if TIME_PAD == PAD_CACHE:
            t_c = tl.minimum(t_in + P, P - 1)
            c_off = c_row0 + t_c * sct + h_c * sch + w_c * scw
            c_mask = valid & (t_in < 0)
            a += tl.load(CACHE + c_off[:, None] + chan[None, :], mask=c_mask[:, None] & k_mask[None, :], other=0.0)

        w_off = it * swt + ih * swh + iw * sww + chan.to(tl.int64) * swi
        wt = tl.load(Wt + w_off[:, None] + w_cols[None, :], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), wt.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_mask = row_mask[:, None] & col_mask[None, :]
    if HAS_RES:
        r_off = b * srb + to * srt + ho * srh + wo * srw
        acc += tl.load(RES + r_off[:, None] + cols.to(tl.int64)[None, :] * src, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(OUT + rows[:, None] * N + cols[None, :], acc.to(OUT.dtype.element_ty), mask=out_mask)


def why_not(x: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot take this call, or None."""
    if x.dtype not in TL_DTYPES:
        return f"the Triton conv3d kernel supports float16/bfloat16/float32, not {x.dtype}"
    return None


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its channel dim has unit stride (any other strides are read as they are),
    else a ``torch.channels_last_3d`` copy."""
    if t.stride(1) == 1 or t.shape[1] == 1:
        return t
    return t.contiguous(memory_format=torch.channels_last_3d)


def _tiles(M: int, N: int, C: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): a simple heuristic, to be tuned on a GPU."""
    block_m = min(128, max(16, triton.next_power_of_2(M)))
    block_n = min(128, max(16, triton.next_power_of_2(N)))
    block_k = min(32 if dtype == torch.float32 else 64, max(16, triton.next_power_of_2(C)))
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    num_stages = 2 if dtype == torch.float32 else 3
    return block_m, block_n, block_k, num_warps, num_stages


def causal_conv3d_fwd(x, weight, bias, cache, residual, out_shape, stride, dilation, padding_hw, P: int,
                      time_pad: str) -> torch.Tensor:
    """Launch the kernel; returns ``out_shape`` (``[B, Cout, T', H', W']``) in channels_last_3d format.

    ``x`` and ``cache`` are read through their strides and need unit stride on ``C`` (see
    :func:`channels_last`); ``weight`` and ``residual`` are read through any strides; ``bias`` is
    contiguous ``[Cout]`` or None. ``cache`` is used only when ``P > 0``.
    """
    out = torch.empty(out_shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
    B, Cout, T_out, H_out, W_out = out_shape
    M = B * T_out * H_out * W_out
    if M == 0 or Cout == 0:
        return out
    _, C, _, H, W = x.shape
    _, _, kt, kh, kw = weight.shape
    # Weight tiles are [BLOCK_K channels, BLOCK_N outputs]: unit stride on Cin keeps their loads contiguous.
    weight = weight.contiguous(memory_format=torch.channels_last_3d)
    mode = PAD_ZEROS if time_pad == "zeros" else PAD_REPLICATE
    if cache is not None and P > 0:
        mode = PAD_CACHE
    else:
        cache = x
    block_m, block_n, block_k, num_warps, num_stages = _tiles(M, Cout, C, x.dtype)
    interpreted = triton_interpreted()
    operand_dtype = dot_dtype(x.dtype)
    # fp32 follows cuDNN's default (TF32 allowed unless torch.backends.cudnn.allow_tf32 is False).
    precision = "tf32" if (x.dtype == torch.float32 and not interpreted and torch.backends.cudnn.allow_tf32) else "ieee"
    sxb, _, sxt, sxh, sxw = x.stride()
    scb, _, sct, sch, scw = cache.stride()
    srb, src, srt, srh, srw = residual.stride() if residual is not None else (0,) * 5
    grid = (triton.cdiv(M, block_m) * triton.cdiv(Cout, block_n),)
    _causal_conv3d_fwd_kernel[grid](
        x, cache, weight, bias if bias is not None else x, residual if residual is not None else x, out,
        M, Cout, C, H, W, T_out, H_out, W_out, P,
        sxb, sxt, sxh, sxw,
        scb, sct, sch, scw,
        *weight.stride(),
        srb, src, srt, srh, srw,
        ST=stride[0], SH=stride[1], SW=stride[2], DT=dilation[0], DH=dilation[1], DW=dilation[2],
        PH=padding_hw[0], PW=padding_hw[1], KT=kt, KH=kh, KW=kw,
        TIME_PAD=mode.value, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_DTYPE=operand_dtype, INPUT_PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


# --------------------------------------------------------------------------------------------------
# Compile space (i2v_kernels/ops/_compile_space.py): every launch causal_conv3d_fwd can make, for
# the ahead-of-time compile check.

_POINTERS = ("X", "CACHE", "Wt", "BIAS", "RES", "OUT")

# Conv geometry is unbounded (any kernel size, stride, dilation); these are the ones video VAEs use.
# They only scale index arithmetic, so the code's shape does not change between them beyond the
# 1-vs-more cases (no time padding, no spatial padding, unit stride) that the list also holds.
_GEOMETRIES = (  # (kernel, stride, dilation), each (t, h, w)
    ((3, 3, 3), (1, 1, 1), (1, 1, 1)),  # VAE resnet conv (CogVideoX, Wan, LTX, model/vae.py)
    ((3, 3, 3), (1, 2, 2), (1, 1, 1)),  # spatial downsample (model/vae.py)
    ((3, 3, 3), (2, 2, 2), (1, 1, 1)),  # space-time downsample (model/vae.py)
    ((3, 1, 1), (2, 1, 1), (1, 1, 1)),  # Wan's time_conv of the temporal downsample
    ((3, 1, 1), (1, 1, 1), (1, 1, 1)),  # Wan's time_conv of the temporal upsample
    ((1, 1, 1), (1, 1, 1), (1, 1, 1)),  # 1x1x1 shortcut: no padding at all
    ((3, 3, 3), (1, 1, 1), (2, 2, 2)),  # dilated
)


def _geometry(kernel, stride, dilation) -> dict:
    ph, pw = spatial_padding(kernel, dilation)
    return dict(ST=stride[0], SH=stride[1], SW=stride[2], DT=dilation[0], DH=dilation[1], DW=dilation[2],
                PH=ph, PW=pw, KT=kernel[0], KH=kernel[1], KW=kernel[2])


def _features() -> list[dict]:
    """Geometry x time padding x bias (in any float dtype: the op checks only that it is floating,
    modelled as x's dtype, fp32, fp64) x residual; the cache mode needs front padding (P > 0)."""
    out = []
    for kernel, stride, dilation in _GEOMETRIES:
        pads = (PAD_CACHE, PAD_REPLICATE, PAD_ZEROS) if time_padding(kernel[0], dilation[0]) else (PAD_REPLICATE, PAD_ZEROS)
        for f in combinations(TIME_PAD=[p.value for p in pads], HAS_RES=(True, False),
                              BIAS=(None, "*fp32", "*fp64", False)):
            bias = f.pop("BIAS")
            f.update(_geometry(kernel, stride, dilation), HAS_BIAS=bias is not False)
            if bias:
                f["BIAS"] = bias
            out.append(f)
    return out


_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _dtype_cases() -> list[Dtypes]:
    """fp16/bf16 with IEEE dot inputs; fp32 with TF32 (cuDNN's default) or IEEE (allow_tf32 off)."""
    cases = []
    for name, dtype in _TORCH_DTYPES.items():
        for precision in (("tf32", "ieee") if dtype == torch.float32 else ("ieee",)):
            cases.append(Dtypes(name if dtype != torch.float32 else f"{name}-{precision}", pointers(_POINTERS, name),
                                dict(DOT_DTYPE=TL_DTYPES[dtype], INPUT_PRECISION=precision)))
    return cases


def _launch(M: int, N: int, C: int, dtype: torch.dtype) -> Launch:
    block_m, block_n, block_k, num_warps, num_stages = _tiles(M, N, C, dtype)
    return Launch.of(num_warps, num_stages, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)


def _launches(case: Dtypes) -> list[Launch]:
    dtype = _TORCH_DTYPES[case.pointers["X"][1:]]
    sizes = powers_of_two(256)
    return distinct_launches(_launch, [(m, n, c, dtype) for m in sizes for n in sizes for c in powers_of_two(128)])


COMPILE_SPACES = [
    KernelSpace(
        _causal_conv3d_fwd_kernel, _dtype_cases(), launches=_launches, features=_features(),
        # a 3x3x3 conv of a 128-channel VAE block on a 480p latent-frame chunk
        typical=lambda case: _launch(4 * 60 * 90, 128, 128, _TORCH_DTYPES[case.pointers["X"][1:]]),
    ),
]
