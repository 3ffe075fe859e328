"""Seeded case generator for the fuzz suite: one ``Case`` per (op, seed).

Everything comes from ``random.Random(seed)`` (structure) and a ``torch.Generator`` seeded alike
(values), so a failure names its seed and ``draw(op, seed)`` rebuilds the case exactly. A case holds
the op's arguments as the user would pass them -- strided views (slices, permuted memory, storage
offsets, packed-QKV views, expanded modulation, channels_last_3d), optional arguments, NaN/inf at
random places (masked keys included) -- and the fp64 oracle's answer.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Callable, Optional

import torch
from torch import Tensor

from fuzz import oracle

HALF = (torch.float16, torch.bfloat16)
ADALN_OPS = ("adaln_modulate", "gated_residual", "gated_residual_adaln", "rms_norm")
ATTENTION_OPS = ("spatial_attention", "temporal_attention", "attention")
OPS = ADALN_OPS + ATTENTION_OPS + ("qk_norm_rope", "causal_conv3d")
BIG_ROWS = 70_000  # more rows than a CUDA grid's y/z dims take (65,535)


@dataclasses.dataclass
class Case:
    op: str
    seed: int
    args: tuple
    kwargs: dict
    expected: object  # fp64 tensor or tuple of them (the oracle's answer)
    dtype: torch.dtype
    note: str  # a readable summary for failure messages
    big: bool = False  # too big for the Triton interpreter in the CI profile
    extra_atol: tuple = ()  # per output: None or a tensor added to the absolute tolerance elementwise

    def describe(self) -> str:
        return f"{self.op} seed={self.seed}: {self.note}"


# --------------------------------------------------------------------------------------------------
# Values and layouts


class Draw:
    """The random source of one case."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)
        self.g = torch.Generator().manual_seed(seed)
        self.notes: list[str] = []

    def choice(self, xs):
        return xs[self.r.randrange(len(xs))]

    def chance(self, p: float) -> bool:
        return self.r.random() < p

    def randn(self, shape, dtype=torch.float32, scale: float = 1.0) -> Tensor:
        return (torch.randn(shape, generator=self.g, dtype=torch.float64) * scale).to(dtype)

    def note(self, s: str) -> None:
        self.notes.append(s)


def poke_nonfinite(d: Draw, t: Tensor, name: str, count: int = 0) -> Tensor:
    """``t`` (contiguous, logical values) with 1-3 random elements set to NaN, +inf or -inf."""
    if t.numel() == 0:
        return t
    t = t.clone()
    flat = t.view(-1)
    for _ in range(count or d.r.randint(1, 3)):
        i = d.r.randrange(flat.numel())
        value = d.choice((math.nan, math.inf, -math.inf))
        flat[i] = value
        d.note(f"{name}[{tuple(int(j) for j in torch.unravel_index(torch.tensor(i), t.shape))}]={value}")
    return t


def relayout(d: Draw, t: Tensor, name: str, allowed=("contiguous", "sliced", "permuted", "offset", "last")) -> Tensor:
    """A view with ``t``'s values in another memory layout."""
    if t.dim() == 0 or t.numel() == 0:
        return t
    kind = d.choice(allowed)
    if kind == "contiguous":
        return t.contiguous()
    d.note(f"{name}:{kind}")
    if kind == "sliced":  # every other element along one dim of a bigger buffer
        dim = d.r.randrange(t.dim())
        shape = list(t.shape)
        shape[dim] *= 2
        base = torch.full(shape, 7.0, dtype=t.dtype)  # garbage between the elements we read
        index = [slice(None)] * t.dim()
        index[dim] = slice(None, None, 2)
        base[tuple(index)] = t
        return base[tuple(index)]
    if kind == "permuted":  # the same logical tensor stored in another dim order
        perm = list(range(t.dim()))
        d.r.shuffle(perm)
        inverse = [perm.index(i) for i in range(t.dim())]
        return t.permute(perm).contiguous().permute(inverse)
    if kind == "offset":  # a storage offset that breaks 16-byte alignment
        base = torch.full((t.numel() + 3,), 7.0, dtype=t.dtype)
        view = base[3:].view(t.shape)
        view.copy_(t)
        return view
    # "last": non-unit stride on the last dim
    base = torch.full((*t.shape[:-1], 2 * t.shape[-1]), 7.0, dtype=t.dtype)
    base[..., ::2] = t
    return base[..., ::2]


def maybe_nonfinite(d: Draw, t: Optional[Tensor], name: str, p: float) -> Optional[Tensor]:
    return t if t is None or not d.chance(p) else poke_nonfinite(d, t, name)


def _f64(x):
    if isinstance(x, Tensor):
        return x.to(torch.float64) if x.is_floating_point() else x
    return x


# --------------------------------------------------------------------------------------------------
# adaLN family


def _lead_shape(d: Draw, big_ok: bool) -> tuple[list[int], bool]:
    if big_ok and d.chance(0.04):
        d.note(f"{BIG_ROWS} rows")
        return [BIG_ROWS], True
    rank = d.r.randint(0, 4)
    return [d.choice((0, 1, 1, 2, 3, 5, 7)) if d.chance(0.08) else d.choice((1, 2, 3, 5, 7)) for _ in range(rank)], False


def _broadcast_shape(d: Draw, lead: list[int], C: int) -> list[int]:
    """A modulation shape that broadcasts to [*lead, C]: some leading dims 1, some dropped."""
    keep = d.r.randint(0, len(lead))
    shape = [n if d.chance(0.5) else 1 for n in lead[len(lead) - keep:]]
    return shape + [C]


def _modulation(d: Draw, lead, C, x_dtype, name, p_none=0.25, p_bad=0.1) -> Optional[Tensor]:
    if d.chance(p_none):
        return None
    dtype = torch.float32 if x_dtype in HALF and d.chance(0.3) else x_dtype
    t = maybe_nonfinite(d, d.randn(_broadcast_shape(d, lead, C), dtype, 0.5), name, p_bad)
    if d.chance(0.2):  # the full shape as a stride-0 view
        t = t.expand(*lead, C) if len(lead) else t
        d.note(f"{name}:expanded")
        return t
    return relayout(d, t, name)


def _param(d: Draw, C: int, dtype, name: str, p_none: float = 0.5, p_bad: float = 0.05, center: float = 0.0):
    if d.chance(p_none):
        return None
    t = maybe_nonfinite(d, d.randn((C,), dtype, 0.5) + center, name, p_bad)
    return relayout(d, t, name, ("contiguous", "sliced", "offset"))


def adaln_case(op: str, seed: int) -> Case:
    d = Draw(seed)
    dtype = d.choice((torch.float32, torch.float16, torch.bfloat16, torch.float64))
    lead, big = _lead_shape(d, big_ok=True)
    C = d.choice((1, 2, 3, 8, 17, 64, 130)) if not big else d.choice((1, 2, 3))
    shape = lead + [C]
    p_bad = 0.15
    x = maybe_nonfinite(d, d.randn(shape, dtype), "x", p_bad)
    eps = d.choice((1e-6, 1e-5, 0.1))
    extra: tuple = ()
    wdtype = dtype if d.chance(0.7) else torch.float32
    if op == "rms_norm":
        w = _param(d, C, wdtype, "weight", center=1.0)
        args, kwargs = (relayout(d, x, "x"), w), dict(eps=eps)
        expected = oracle.rms_norm_op(x, w, eps=eps)
    elif op == "adaln_modulate":
        shift, scale = _modulation(d, lead, C, dtype, "shift"), _modulation(d, lead, C, dtype, "scale")
        w, b = _param(d, C, wdtype, "weight", center=1.0), _param(d, C, wdtype, "bias")
        args, kwargs = (relayout(d, x, "x"), shift, scale), dict(eps=eps, weight=w, bias=b)
        expected = oracle.adaln_modulate(x, shift, scale, eps=eps, weight=w, bias=b)
    else:
        y = maybe_nonfinite(d, d.randn(shape, dtype), "y", p_bad)
        gate = _modulation(d, lead, C, dtype, "gate")
        if op == "gated_residual":
            args, kwargs = (relayout(d, x, "x"), relayout(d, y, "y"), gate), {}
            expected = oracle.gated_residual(x, y, gate)
        else:
            shift, scale = _modulation(d, lead, C, dtype, "shift"), _modulation(d, lead, C, dtype, "scale")
            w, b = _param(d, C, wdtype, "weight", center=1.0), _param(d, C, wdtype, "bias")
            args = (relayout(d, x, "x"), relayout(d, y, "y"), gate, shift, scale)
            kwargs = dict(eps=eps, weight=w, bias=b)
            expected = oracle.gated_residual_adaln(x, y, gate, shift, scale, eps=eps, weight=w, bias=b)
            if dtype in HALF:
                extra = (None, _rounded_residual_atol(expected, dtype))
    return Case(op, seed, args, kwargs, expected, dtype, f"x {tuple(shape)} {dtype} " + " ".join(d.notes), big,
                extra)


def _rounded_residual_atol(expected, dtype) -> Tensor:
    """A backend may round ``r`` to the input dtype before normalizing it (native does): LayerNorm
    then amplifies that rounding by ``max|r| / std(r)`` per row (unbounded for near-constant rows).
    The extra absolute tolerance of the normalized output that allows, times the modulation's gain."""
    r, out = expected
    u = torch.finfo(dtype).eps / 2
    centered = r - r.mean(-1, keepdim=True)
    cond = r.abs().amax(-1, keepdim=True) / centered.square().mean(-1, keepdim=True).sqrt().clamp(min=1e-30)
    gain = out.abs().amax(-1, keepdim=True).clamp(min=1.0)
    return (4 * u * cond * gain).nan_to_num(0.0)


# --------------------------------------------------------------------------------------------------
# Attention and its prologue


def _prologue_kwargs(d: Draw, D: int, dtype, rope_shapes: list, p_bad: float) -> dict:
    kw: dict = {}
    norm = d.choice((None, None, "layer", "rms"))
    if norm is not None:
        kw["qk_norm"] = norm
        pdtype = dtype if d.chance(0.7) else torch.float32
        for name in ("q_norm_weight", "k_norm_weight") + (("q_norm_bias", "k_norm_bias") if norm == "layer" else ()):
            t = _param(d, D, pdtype, name, p_none=0.4, p_bad=p_bad / 3, center=1.0 if "weight" in name else 0.0)
            if t is not None:
                kw[name] = t
        kw["norm_eps"] = d.choice((1e-6, 1e-5))
    if D % 2 == 0 and rope_shapes and d.chance(0.4):
        shape = d.choice(rope_shapes)
        angles = d.randn(shape, torch.float64, 2.0)
        rdtype = dtype if d.chance(0.6) else torch.float32
        cos, sin = angles.cos().to(rdtype), angles.sin().to(rdtype)
        cos = maybe_nonfinite(d, cos, "cos", p_bad / 2)
        kw["rope"] = (relayout(d, cos, "cos"), relayout(d, sin, "sin"))
        kw["rope_style"] = d.choice(("interleaved", "half"))
        d.note(f"rope {tuple(shape)} {kw['rope_style']}")
    if norm:
        d.note(f"qk_norm={norm} " + ",".join(k for k in kw if "norm_" in k and k != "norm_eps"))
    return kw


def _oracle_prologue(kw: dict) -> dict:
    out = {k: v for k, v in kw.items() if k != "rope"}
    if "rope" in kw:
        out["rope_tables"] = kw["rope"]
    return out


def _qkv(d: Draw, q_shape, kv_shape, dtype, p_bad: float, packed_dim: int):
    """q, k, v values (logical) and their views: often slices of one packed QKV projection."""
    q = maybe_nonfinite(d, d.randn(q_shape, dtype), "q", p_bad)
    k = maybe_nonfinite(d, d.randn(kv_shape, dtype), "k", p_bad)
    v = maybe_nonfinite(d, d.randn(kv_shape, dtype), "v", p_bad)
    if tuple(q_shape) == tuple(kv_shape) and d.chance(0.35):
        d.note("packed qkv")
        qkv = torch.stack((q, k, v), dim=packed_dim)  # [..., 3, H, D]: q, k, v are views of it
        return (q, k, v), qkv.unbind(packed_dim)
    return (q, k, v), tuple(relayout(d, t, n) for t, n in ((q, "q"), (k, "k"), (v, "v")))


def attention_case(op: str, seed: int) -> Case:
    d = Draw(seed)
    dtype = d.choice((torch.float16, torch.float16, torch.bfloat16, torch.float32, torch.float64))
    big = False
    H = d.choice((1, 2, 3))
    D = d.choice((8, 16, 16, 18, 32, 72)) if d.chance(0.9) else d.choice((1, 2, 6))
    p_bad = 0.3
    kwargs: dict = {}
    scale = d.choice((None, None, None, 0.0, 0.3, 1.1))
    if scale is not None:
        kwargs["scale"] = scale
        d.note(f"scale={scale}")
    if op == "attention":
        B = d.choice((1, 2, 3)) if d.chance(0.95) else 0
        N = d.choice((1, 5, 16, 33, 70))
        cross = d.chance(0.5)
        M = d.choice((1, 7, 16, 40)) if cross else N
        q_shape, kv_shape = (B, N, H, D), (B, M, H, D)
        (q, k, v), views = _qkv(d, q_shape, kv_shape, dtype, p_bad, packed_dim=2)
        if d.chance(0.5) and B > 0:
            lens = torch.tensor([d.r.randint(1, M) for _ in range(B)],
                                dtype=d.choice((torch.int32, torch.int64)))
            kv = relayout(d, lens, "kv_lens", ("contiguous", "sliced", "offset"))
            kwargs["kv_lens"] = kv
            d.note(f"kv_lens={lens.tolist()}")
            if d.chance(0.5):  # NaN/inf behind the mask: must change nothing
                b = d.r.randrange(B)
                if lens[b] < M:
                    j = d.r.randrange(int(lens[b]), M)
                    for t, name in ((k, "k"), (v, "v")):
                        if d.chance(0.7):
                            t[b, j, d.r.randrange(H), d.r.randrange(D)] = d.choice((math.nan, math.inf))
                            d.note(f"masked {name}[{b},{j}]")
                    views = _rebuild(views, (q, k, v))
        rope_shapes = [(N, D), (B, N, D)] if not cross else []
        kwargs.update(_prologue_kwargs(d, D, dtype, rope_shapes, p_bad))
        expected = oracle.attention_oracle("dense", q, k, v, scale=scale, kv_lens=kwargs.get("kv_lens"),
                                           **_oracle_prologue({k_: v_ for k_, v_ in kwargs.items()
                                                               if k_ not in ("scale", "kv_lens")}))
        shape_note = f"q {q_shape} k {kv_shape}"
    else:
        B = d.choice((1, 2)) if d.chance(0.95) else 0
        T = d.choice((1, 2, 3, 5, 8)) if d.chance(0.93) else 0
        S = d.choice((1, 3, 7, 17)) if d.chance(0.95) else 0
        if op == "temporal_attention" and d.chance(0.1):
            T = d.choice((33, 130))  # past the packed kernel's T
        if d.chance(0.03):  # more problems (B*T*H or B*S*H) than a CUDA grid's y/z dims take
            big = True
            B, H, D = 1, 1, 8
            T, S = (BIG_ROWS, 2) if op == "spatial_attention" else (2, BIG_ROWS)
            d.note("70,000 problems")
        shape = (B, T, S, H, D)
        (q, k, v), views = _qkv(d, shape, shape, dtype, p_bad, packed_dim=3)
        if op == "temporal_attention":
            causal = d.chance(0.5)
            kwargs["causal"] = causal
            if causal and T > 1 and B * S > 0 and d.chance(0.5):  # NaN/inf in a future frame's value
                t = d.r.randrange(1, T)
                v[d.r.randrange(B), t, d.r.randrange(S), d.r.randrange(H), d.r.randrange(D)] = math.nan
                views = _rebuild(views, (q, k, v))
                d.note(f"future v frame {t}")
        rope_shapes = [(S, D), (T, S, D), (B, T, S, D), (1, T, 1, D)]
        kwargs.update(_prologue_kwargs(d, D, dtype, rope_shapes, p_bad))
        mode = "spatial" if op == "spatial_attention" else "temporal"
        expected = oracle.attention_oracle(mode, q, k, v, scale=scale, causal=kwargs.get("causal", False),
                                           **_oracle_prologue({k_: v_ for k_, v_ in kwargs.items()
                                                               if k_ not in ("scale", "causal")}))
        shape_note = f"{shape}" + (" causal" if kwargs.get("causal") else "")
    return Case(op, seed, views, kwargs, expected, dtype, f"{shape_note} {dtype} " + " ".join(d.notes), big)


def _rebuild(views, values):
    """Views in the same layouts as ``views`` holding ``values`` (after a late edit of the values)."""
    out = []
    for view, value in zip(views, values):
        fresh = torch.empty_strided(view.shape, view.stride(), dtype=view.dtype) if view.numel() else view.clone()
        fresh.copy_(value)
        out.append(fresh)
    return tuple(out)


def qk_norm_rope_case(op: str, seed: int) -> Case:
    d = Draw(seed)
    dtype = d.choice((torch.float32, torch.float16, torch.bfloat16, torch.float64))
    lead, big = _lead_shape(d, big_ok=True)
    lead = lead[:3] or [2]
    H = d.choice((1, 2, 3))
    D = d.choice((2, 8, 16, 18, 64)) if d.chance(0.9) else d.choice((1, 3))
    shape = lead + [H, D]
    q = maybe_nonfinite(d, d.randn(shape, dtype), "q", 0.25)
    k = maybe_nonfinite(d, d.randn(shape, dtype), "k", 0.25)
    rope_shapes = [tuple(lead[i:]) + (D,) for i in range(len(lead))]
    kwargs = _prologue_kwargs(d, D, dtype, rope_shapes, 0.2)
    expected = oracle.qk_norm_rope(q, k, **_oracle_prologue(kwargs))
    return Case(op, seed, (relayout(d, q, "q"), relayout(d, k, "k")), kwargs, expected, dtype,
                f"{tuple(shape)} {dtype} " + " ".join(d.notes), big)


# --------------------------------------------------------------------------------------------------
# Causal 3D convolution


def conv_case(op: str, seed: int) -> Case:
    d = Draw(seed)
    dtype = d.choice((torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16))
    B = d.choice((1, 2)) if d.chance(0.95) else 0
    Cin, Cout = d.choice((1, 2, 3, 5)), d.choice((1, 2, 4))
    T, H, W = d.choice((1, 2, 3, 5)), d.choice((1, 2, 5, 6)), d.choice((1, 3, 4, 7))
    kt, kh, kw = d.choice((1, 2, 3)), d.choice((1, 3)), d.choice((1, 3))
    stride = (d.choice((1, 1, 2)), d.choice((1, 1, 2)), d.choice((1, 2)))
    dilation = (d.choice((1, 1, 2)), 1 if H < 5 else d.choice((1, 2)), 1 if W < 5 else d.choice((1, 2)))
    if kh > H + 2 * (dilation[1] * (kh - 1) // 2) or dilation[1] * (kh - 1) + 1 > H + 2 * (dilation[1] * (kh - 1) // 2):
        kh = 1
    if dilation[2] * (kw - 1) + 1 > W + 2 * (dilation[2] * (kw - 1) // 2):
        kw = 1
    time_pad = d.choice(("replicate", "zeros"))
    x = maybe_nonfinite(d, d.randn((B, Cin, T, H, W), dtype), "x", 0.2)
    # Non-finite weights are not drawn: where a tap falls on the zero spatial padding, whether
    # NaN * 0 is computed depends on the convolution library (docs/SEMANTICS.md; test_nan_conv_weight).
    w = d.randn((Cout, Cin, kt, kh, kw), dtype, 0.3)
    bias = None if d.chance(0.4) else d.randn((Cout,), dtype, 0.3)
    P = (kt - 1) * dilation[0]
    cache = d.randn((B, Cin, P, H, W), dtype) if P and d.chance(0.3) else None
    layouts = ("contiguous", "channels_last", "sliced", "permuted")
    kind = d.choice(layouts)
    xv = x.contiguous(memory_format=torch.channels_last_3d) if kind == "channels_last" else \
        relayout(d, x, "x", (kind,)) if kind != "contiguous" else x
    if kind == "channels_last":
        d.note("x:channels_last_3d")
    kwargs = dict(stride=stride, dilation=dilation, time_pad=time_pad)
    if cache is not None:
        kwargs["cache"] = relayout(d, cache, "cache")
        d.note(f"cache P={P}")
    expected = oracle.causal_conv3d(x, w, bias, stride=stride, dilation=dilation, time_pad=time_pad, cache=cache)
    note = f"x {(B, Cin, T, H, W)} w {(Cout, Cin, kt, kh, kw)} s{stride} d{dilation} {time_pad} {dtype} "
    return Case(op, seed, (xv, relayout(d, w, "weight", ("contiguous", "permuted")), bias), kwargs, expected, dtype,
                note + " ".join(d.notes))


GENERATORS: dict[str, Callable[[str, int], Case]] = {
    **{op: adaln_case for op in ADALN_OPS},
    **{op: attention_case for op in ATTENTION_OPS},
    "qk_norm_rope": qk_norm_rope_case,
    "causal_conv3d": conv_case,
}


def draw(op: str, seed: int) -> Case:
    return GENERATORS[op](op, seed)
