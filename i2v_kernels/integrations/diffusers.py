"""Drop-in acceleration of diffusers video models: ``patch(obj)`` and ``unpatch(obj)``.

``i2v_kernels.patch(pipe)`` (or a model, or any ``nn.Module`` holding diffusers modules) swaps the
attention processors and the ``forward`` of specific module instances of the video DiTs and VAEs below
for versions built on the i2v_kernels ops, in place, and returns ``obj``. The model's output does not
change beyond floating-point rounding: the kernels compute the same math (in fp32 internally), and any
call a replacement cannot express exactly (an attention mask of an unsupported shape, gradient
checkpointing in Latte's layout, a padding mode the conv op lacks ...) runs the original code instead.

What is replaced (matched by class name and module, never by instance identity):

=============================  ==================================================================
diffusers class                 replaced by
=============================  ==================================================================
LatteTransformer3DModel         ``forward``: tokens stay ``[B, T, S, C]``; spatial blocks run
                                ``spatial_attention``, temporal blocks ``temporal_attention`` on
                                views of the projections (no rearrange copies), cross-attention
                                ``attention`` against the un-repeated prompt
BasicTransformerBlock           ``forward`` (``ada_norm_single``, Latte's blocks): fused adaLN --
                                ``adaln_modulate``, ``gated_residual_adaln``, ``gated_residual``
Attention + AttnProcessor2_0    processor -> :class:`I2VAttnProcessor`: ``attention`` (masks that
                                keep a key prefix become ``kv_lens``)
Attention + CogVideoX(Fused)    processor -> :class:`I2VCogVideoXAttnProcessor`: ``attention`` with
AttnProcessor2_0                the LayerNorm QK-norm and RoPE fused (identity RoPE on the text)
CogVideoXBlock                  ``forward``: CogVideoXLayerNormZero + gated residuals -> fused adaLN
WanAttention + WanAttnProcessor processor -> :class:`I2VWanAttnProcessor`: ``rms_norm`` (QK-norm
(0.33/0.34: Attention +         across heads) + ``attention`` with RoPE fused (0.33/0.34's complex
WanAttnProcessor2_0)            RoPE as interleaved cos/sin tables); I2V image branch
WanTransformerBlock             ``forward``: FP32LayerNorm + ``scale_shift_table`` -> fused adaLN
                                with the fp32 modulation passed as is
LTXAttention +                  processor -> :class:`I2VLTXAttnProcessor`: ``rms_norm`` + per-head
LTXVideoAttnProcessor           RoPE fused into ``spatial_attention``; masked cross-attention with
(0.33/0.34: Attention +         ``kv_lens``
LTXVideoAttentionProcessor2_0)
LTXVideoTransformerBlock        ``forward``: ``rms_norm`` + ``gated_residual`` (the RMSNorm
                                modulation itself stays in PyTorch: no fused RMS-modulate op)
CogVideoXCausalConv3d           ``forward(x, conv_cache)``: ``causal_conv3d(time_pad="replicate",
                                cache=conv_cache)``, same returned ``conv_cache``
WanCausalConv3d                 ``forward(x, cache_x)``: ``causal_conv3d(time_pad="zeros")`` with
                                ``cache_x`` (1 or 2 frames) as the cache; the unpadded temporal
                                downsample with its first frames as the cache
LTXVideoCausalConv3d            ``forward(x)``: ``causal_conv3d`` (causal, and non-causal through a
                                cache of the replicated first frames)
=============================  ==================================================================

The models these live in -- ``LatteTransformer3DModel``, ``CogVideoXTransformer3DModel``,
``WanTransformer3DModel``, ``LTXVideoTransformer3DModel``, ``AutoencoderKLCogVideoX``,
``AutoencoderKLWan``, ``AutoencoderKLLTXVideo`` -- are the known models. A pipeline has each of its
``nn.Module`` components patched (``transformer``, ``transformer_2``, ``vae`` ...). Other diffusers
models are left untouched; those that look like video DiTs or VAEs (``*Transformer3DModel``,
``AutoencoderKL*``) are named in one warning.

``ops`` picks the families: ``"attention"`` (processors, Latte's layout), ``"adaln"`` (block
forwards), ``"conv3d"`` (VAE convolutions); default all three.

Patching twice is harmless (a replaced module is skipped). ``unpatch(obj)`` puts back exactly what was
there: the original processor objects, and ``forward`` as the class's method again (the instance
attribute removed) -- or the previous instance attribute when there was one.

Hooks (diffusers' ``HookRegistry`` -- ``enable_cache(...)`` with FirstBlockCache, PyramidAttentionBroadcast
and the other caches, group offloading, layerwise casting -- and accelerate's): a replacement goes where
the hooks keep the real forward (the innermost link of diffusers' hook chain, accelerate's
``_old_forward``), so hooks added before ``patch`` keep running around ours, and hooks added after it
wrap ours as they wrap any forward. ``unpatch`` finds the replacement wherever hooks added or removed
since have moved it. Latte's ``[B, T, S, C]`` model forward skips its blocks' and attention modules'
own calls, so while any of them carries a hook (a cache's, say) the original model forward runs,
through the patched blocks. Modules whose *submodules* carry weight-moving hooks (sequential CPU offload,
leaf-level group offloading, layerwise casting) keep their original code, as the replacements read
submodules' weights (norms, tables) directly: ``patch`` leaves them alone when the hooks come first,
and a patched model's ``enable_group_offload`` / ``enable_layerwise_casting`` put diffusers' code back
in them (the summary lists them under ``kept``). Hooks added by other routes after ``patch``
(``apply_group_offloading(...)``, accelerate's sequential offload) are not seen: add those before.
The VAE convolutions cast stored weights to the input's dtype themselves.

Attention backends: ``model.set_attention_backend(name)`` is an explicit request for one of diffusers'
attention backends, so it is honoured -- the patched processors whose diffusers processor dispatches
through those backends (Wan's, LTX's) hand every call to it, which runs ``name``; the rest of the patch
(fused adaLN blocks, convolutions) stays. ``reset_attention_backend()`` brings our attention back.
Processors that call SDPA directly and have no backend setting (``AttnProcessor2_0`` of Latte,
CogVideoX's) are left alone by diffusers' ``set_attention_backend``, patched or not, so ours keeps
running there. To pick among our own backends use ``i2v_kernels.use_backend(...)``.

``fuse_qkv_projections()`` / ``unfuse_qkv_projections()`` of a patched model keep the patch: the fused
processors they install are replaced too (fused QKV views go into the same attention call), and the
ones ``unfuse`` puts back are ours again.

The summary of a call (:class:`PatchSummary`: what was replaced, class -> count; what stayed on the
original path and why; unsupported models) is stored as ``obj._i2v_kernels_patch_summary``, returned
by :func:`patch_summary`, and printed by ``patch(obj, verbose=True)``.

Example::

    pipe = diffusers.CogVideoXPipeline.from_pretrained("/models/CogVideoX-5b", torch_dtype=torch.bfloat16)
    pipe = i2v_kernels.patch(pipe.to("cuda"), verbose=True)
    video = pipe("a panda playing a guitar").frames[0]
    i2v_kernels.unpatch(pipe)

diffusers is not imported here (the classes are recognized by name and module), so the integration
costs nothing without it.
"""

from __future__ import annotations

import inspect
import types
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

from i2v_kernels import _backend, _dispatch
from i2v_kernels.ops.adaln import adaln_modulate, gated_residual, gated_residual_adaln, rms_norm
from i2v_kernels.ops.attention import attention, spatial_attention, temporal_attention
from i2v_kernels.ops.conv3d import causal_conv3d
from i2v_kernels.ops.conv3d import reference as _conv_ref

__all__ = [
    "OPS",
    "I2VAttnProcessor",
    "I2VCogVideoXAttnProcessor",
    "I2VLTXAttnProcessor",
    "I2VWanAttnProcessor",
    "PatchSummary",
    "patch",
    "patch_summary",
    "unpatch",
]

OPS = ("attention", "adaln", "conv3d")
SUMMARY_ATTR = "_i2v_kernels_patch_summary"
_RECORDS = "_i2v_kernels_patches"  # per module: {"forward" | "processor": _Record}
_MEMO = "_i2v_kernels_memo"
_ABSENT = object()

KNOWN_MODELS = (
    "LatteTransformer3DModel",
    "CogVideoXTransformer3DModel",
    "WanTransformer3DModel",
    "LTXVideoTransformer3DModel",
    "AutoencoderKLCogVideoX",
    "AutoencoderKLWan",
    "AutoencoderKLLTXVideo",
)

# Float masks: a key whose bias is at most this is dropped exactly (exp(-5000 + s) is 0 in fp32 for any
# score a normalized q.k can reach); diffusers writes -10000 (bf16: -9984) or -inf.
_MASK_DROP = -5000.0


# ==================================================================================================
# Summary


@dataclass
class PatchSummary:
    """What :func:`patch` did to an object.

    ``replaced``: ``"Class.attr -> replacement"`` -> number of module instances.
    ``kept``: ``"Class: why"`` -> number of instances left on the original code.
    ``unsupported``: model classes left untouched (not known to this integration).
    """

    replaced: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = ["i2v_kernels.patch: replaced" if self.replaced else "i2v_kernels.patch: nothing replaced"]
        lines += [f"  {n:4d} x {what}" for what, n in sorted(self.replaced.items())]
        if self.kept:
            lines.append("kept on the original code:")
            lines += [f"  {n:4d} x {what}" for what, n in sorted(self.kept.items())]
        if self.unsupported:
            lines.append("unsupported models (untouched): " + ", ".join(self.unsupported))
        return "\n".join(lines)


def patch_summary(obj) -> Optional[PatchSummary]:
    """The :class:`PatchSummary` of the last :func:`patch` of ``obj`` (None when not patched)."""
    return getattr(obj, "__dict__", {}).get(SUMMARY_ATTR)


# ==================================================================================================
# Small helpers shared by the replacements


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _memo(tensors: tuple[Tensor, ...], key: tuple, build: Callable[[], Any]):
    """``build()``, kept on ``tensors[0]`` while none of ``tensors`` changes: tables derived from the
    RoPE tensors or a mask are built once per forward and shared by every layer that receives the same
    tensors. Not under torch.compile, with autograd recording, or for inference tensors (which have no
    version counter to tell an in-place change)."""
    if _compiling() or torch.is_grad_enabled() or any(t.is_inference() for t in tensors):
        return build()
    stamp = (key, tuple((id(t), t._version) for t in tensors))
    slot = tensors[0].__dict__.get(_MEMO)
    if slot is not None and slot[0] == stamp:
        return slot[1]
    value = build()
    setattr(tensors[0], _MEMO, (stamp, value))
    return value


_UNSUPPORTED = object()


def _kv_lens(mask: Tensor, B: int, M: int):
    """``kv_lens [B]`` (int32) for an attention mask that keeps a prefix of the ``M`` keys of every
    sample, the same for all queries and heads; None when it keeps every key; ``_UNSUPPORTED`` for
    any other mask (the caller then runs the original processor).

    Accepted: ``[B, M]``, ``[B, 1, M]``, ``[B, 1, 1, M]``; bool (True keeps) or float (0 keeps,
    <= -5000 or -inf drops). The check reads the mask's values (one device sync, memoized on the mask
    tensor), so under torch.compile masked calls take the original path."""
    if _compiling() or not isinstance(mask, Tensor):
        return _UNSUPPORTED
    if (mask.dim() < 2 or mask.shape[0] != B or mask.shape[-1] != M or any(s != 1 for s in mask.shape[1:-1])
            or not (mask.dtype == torch.bool or mask.is_floating_point())):
        return _UNSUPPORTED

    def build():
        flat = mask.reshape(B, M)
        if flat.dtype == torch.bool:
            keep, valid = flat, None
        else:
            keep = flat == 0
            valid = keep | (flat <= _MASK_DROP)
        n = keep.sum(-1)
        ok = (keep == (torch.arange(M, device=mask.device) < n[:, None])).all() & (n >= 1).all()
        if valid is not None:
            ok = ok & valid.all()
        if not bool(ok):
            return _UNSUPPORTED
        return None if bool((n == M).all()) else n.to(torch.int32)

    return _memo((mask,), ("kv_lens", B, M), build)


def _norm_params(norm, D: int, dtype: torch.dtype):
    """``(kind, weight, bias, eps)`` of a LayerNorm / RMSNorm over a last dim of ``D`` that the fused
    QK-norm prologue computes exactly, else None."""
    if isinstance(norm, nn.LayerNorm):
        if tuple(norm.normalized_shape) != (D,):
            return None
        return "layer", norm.weight, norm.bias, float(norm.eps)
    if isinstance(norm, nn.RMSNorm):
        if tuple(norm.normalized_shape) != (D,):
            return None
        return "rms", norm.weight, None, float(norm.eps if norm.eps is not None else torch.finfo(dtype).eps)
    if type(norm).__name__ == "RMSNorm" and hasattr(norm, "dim"):  # diffusers.models.normalization.RMSNorm
        if tuple(norm.dim) != (D,) or getattr(norm, "bias", None) is not None:
            return None
        return "rms", norm.weight, None, float(norm.eps)
    return None


def _qk_norm_kwargs(attn, D: int, dtype: torch.dtype) -> Optional[dict]:
    """The fused prologue's QK-norm arguments for ``attn.norm_q`` / ``attn.norm_k`` (over the head dim),
    ``{}`` without QK-norm, None when ours cannot express them."""
    nq, nk = getattr(attn, "norm_q", None), getattr(attn, "norm_k", None)
    if nq is None and nk is None:
        return {}
    pq, pk = _norm_params(nq, D, dtype), _norm_params(nk, D, dtype)
    if pq is None or pk is None or pq[0] != pk[0] or pq[3] != pk[3]:
        return None
    return dict(qk_norm=pq[0], q_norm_weight=pq[1], q_norm_bias=pq[2], k_norm_weight=pk[1], k_norm_bias=pk[2],
                norm_eps=pq[3])


def _rms(norm, x: Tensor) -> Tensor:
    """``norm(x)`` for an RMSNorm over the last dim -- our ``rms_norm`` when it gives the same result in
    the same dtype, else the module itself (Identity included)."""
    if isinstance(norm, nn.Identity):
        return x
    C = x.shape[-1]
    if isinstance(norm, nn.RMSNorm):  # torch's: output in x's dtype whatever the weight's
        if tuple(norm.normalized_shape) == (C,):
            eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
            return rms_norm(x, norm.weight, eps=float(eps))
    elif type(norm).__name__ == "RMSNorm" and hasattr(norm, "dim"):
        # diffusers': the output takes the weight's dtype when there is a weight
        w = norm.weight
        if (tuple(norm.dim) == (C,) and getattr(norm, "bias", None) is None and (w is None or w.dtype == x.dtype)
                and norm.eps is not None and norm.eps > 0):
            return rms_norm(x, w, eps=float(norm.eps))
    return norm(x)


def _rms_or_none(norm, x: Tensor) -> Tensor:
    """:func:`_rms`, where ``None`` (older diffusers' ``Attention`` without QK-norm) is no norm."""
    return x if norm is None else _rms(norm, x)


def _layer_norm(norm) -> Optional[tuple]:
    """``(weight, bias, eps)`` of an ``nn.LayerNorm`` over one last dim (FP32LayerNorm included)."""
    if isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1 and norm.eps > 0:
        return norm.weight, norm.bias, float(norm.eps)
    return None


def _modulate(norm, x: Tensor, shift, scale) -> Tensor:
    """``norm(x) * (1 + scale) + shift`` fused (``norm``: a LayerNorm over the last dim)."""
    w, b, eps = _layer_norm(norm)
    return adaln_modulate(x, shift, scale, eps=eps, weight=w, bias=b)


def _residual_modulate(norm, x: Tensor, y: Tensor, gate, shift, scale) -> tuple[Tensor, Tensor]:
    """``r = x + gate * y`` and ``norm(r) * (1 + scale) + shift`` in one pass: ``(r, out)``."""
    w, b, eps = _layer_norm(norm)
    return gated_residual_adaln(x, y, gate, shift, scale, eps=eps, weight=w, bias=b)


def _out_proj(attn, out: Tensor) -> Tensor:
    out = attn.to_out[0](out)
    return attn.to_out[1](out)


def _fallback(module, kind: str = "forward"):
    """The callable a replaced ``forward`` falls back to (the original, bound to the module)."""
    return module.__dict__[_RECORDS][kind].fallback


# ==================================================================================================
# Measured replacement: a patched module runs ours or diffusers' own code, whichever is faster

OURS, DIFFUSERS = "i2v_kernels", "diffusers"


def _measured_call(label: str, module: nn.Module, args: tuple, kwargs: dict, ours: Callable[[], Any],
                   theirs: Callable[[], Any]):
    """Run ``ours()`` or ``theirs()`` (the unpatched code) for this call: the first call of a key (the
    module's class, the tensor arguments' shapes, dtype and device) times both, as the ops' ``auto``
    times backends, and the faster runs from then on, so a patched module is never slower than the
    unpatched one on the user's device. Ours runs without measuring under torch.compile, in training
    mode (repeated forwards would advance dropout's RNG), when a backend is forced, or when measuring is
    off and nothing was measured (``I2V_KERNELS_TUNE=0``)."""
    if _compiling() or module.training or _backend.requested_backend() != "auto":
        return ours()
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)]
    if not tensors:
        return ours()
    first = tensors[0]
    features = tuple(tuple(t.shape) for t in tensors)
    key = _dispatch.make_key(f"diffusers:{label}", first.device, first.dtype, features)
    choice = _dispatch.choose(f"diffusers:{label}", key, first.device, (OURS, DIFFUSERS),
                              lambda b: ours() if b == OURS else theirs(), lambda: OURS)
    return ours() if choice == OURS else theirs()


def _measured_forward(label: str, ours: Callable) -> Callable:
    """A replacement ``forward`` that runs through :func:`_measured_call` against the original."""

    def forward(self, *args, **kwargs):
        return _measured_call(label, self, args, kwargs, lambda: ours(self, *args, **kwargs),
                              lambda: _fallback(self)(*args, **kwargs))

    forward.__name__ = getattr(ours, "__name__", "forward")
    forward.__doc__ = ours.__doc__
    return forward


# ==================================================================================================
# Attention processors


def _delegated(name: str):
    """A property forwarding ``name`` to the replaced processor, so diffusers' model-level switches
    (``set_attention_backend``, ``enable_parallelism``) reach it through ours -- and only when the
    replaced processor has it: diffusers sets these on processors that have them (``hasattr``), so a
    processor without one (``AttnProcessor2_0``, CogVideoX's) stays as untouched as unpatched."""

    def get(self):
        if not hasattr(self.original, name):
            raise AttributeError(name)
        return getattr(self.original, name)

    return property(get, lambda self, value: setattr(self.original, name, value))


class _Processor:
    """An attention processor that keeps the one it replaced: calls it cannot compute exactly go there
    (and every call under diffusers' context parallelism, whose sharded attention ours is not), and so
    does every call once ``set_attention_backend(name)`` picked one of diffusers' attention backends for
    it (``reset_attention_backend()`` brings ours back)."""

    replaces: tuple[str, ...] = ()
    _attention_backend = _delegated("_attention_backend")
    _parallel_config = _delegated("_parallel_config")

    def __init__(self, original):
        self.original = original

    def __repr__(self) -> str:
        return f"{type(self).__name__}(original={type(self.original).__name__})"

    def __init_subclass__(cls, **kwargs):
        """Each processor's ``compute`` (ours, falling back to ``self.original`` itself) is called through a
        measured ``__call__`` carrying ``compute``'s signature: diffusers reads the processor's signature
        to decide which attention kwargs (``image_rotary_emb`` ...) to pass."""
        super().__init_subclass__(**kwargs)

        def __call__(self, attn, *args, **kw):
            if getattr(self.original, "_attention_backend", None) is not None:
                # set_attention_backend(...) asked for one of diffusers' backends: its processor runs it
                return self.original(attn, *args, **kw)
            return _measured_call(type(self).__name__, attn, args, kw, lambda: self.compute(attn, *args, **kw),
                                  lambda: self.original(attn, *args, **kw))

        __call__.__signature__ = inspect.signature(cls.compute)
        cls.__call__ = __call__


def _unwrapped(processor):
    return processor.original if isinstance(processor, _Processor) else processor


def _plain_attention(attn) -> bool:
    """A diffusers ``Attention`` whose AttnProcessor(2_0) math our ops reproduce: no group/spatial norm,
    no residual or output rescale, q and k/v of one width, unfused projections."""
    return (getattr(attn, "spatial_norm", None) is None and getattr(attn, "group_norm", None) is None
            and not getattr(attn, "residual_connection", False) and getattr(attn, "rescale_output_factor", 1.0) == 1.0
            and getattr(attn, "inner_kv_dim", None) == getattr(attn, "inner_dim", None)
            and not getattr(attn, "fused_projections", False))


def _sdpa_scale(attn) -> Optional[float]:
    """AttnProcessor2_0 leaves SDPA's default ``D ** -0.5``; the classic AttnProcessor uses ``attn.scale``."""
    return float(attn.scale) if type(_unwrapped(attn.processor)).__name__ == "AttnProcessor" else None


class I2VAttnProcessor(_Processor):
    """Replaces ``AttnProcessor2_0`` / ``AttnProcessor`` of ``diffusers.Attention`` (Latte, PixArt-style
    self- and cross-attention on ``[B, N, C]`` tokens) with :func:`i2v_kernels.attention`.

    q ``[B, N, H, D]`` and k, v ``[B, M, H, D]`` are views of the projections. A QK-norm over the head
    dim (LayerNorm or RMSNorm) is fused into the kernel's prologue. An attention mask becomes
    ``kv_lens`` when it keeps a key prefix per sample; other masks, 4D inputs, extra kwargs and
    group/spatial norms run the original processor."""

    replaces = ("AttnProcessor2_0", "AttnProcessor")

    def compute(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, temb: Optional[Tensor] = None, *args, **kwargs) -> Tensor:
        def original():
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        if args or kwargs or hidden_states.dim() != 3 or not _plain_attention(attn):
            return original()
        B, N, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        M = context.shape[1]
        kv_lens = None
        if attention_mask is not None:
            kv_lens = _kv_lens(attention_mask, B, M)
            if kv_lens is _UNSUPPORTED:
                return original()
        H = attn.heads
        D = attn.inner_dim // H
        norm = _qk_norm_kwargs(attn, D, hidden_states.dtype)
        if norm is None:
            return original()
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q = attn.to_q(hidden_states).view(B, N, H, D)
        k = attn.to_k(context).view(B, M, H, D)
        v = attn.to_v(context).view(B, M, H, D)
        out = attention(q, k, v, scale=_sdpa_scale(attn), kv_lens=kv_lens, **norm)
        return _out_proj(attn, out.view(B, N, H * D))


def _pair(rope) -> bool:
    """RoPE given as a ``(cos, sin)`` pair of real tensors (older diffusers passed complex tensors)."""
    return (isinstance(rope, (tuple, list)) and len(rope) == 2
            and all(isinstance(t, Tensor) and t.is_floating_point() for t in rope))


def _prefix_identity_rope(rope, L: int, Nv: int, D: int, device):
    """CogVideoX's RoPE covers the video tokens only, after ``L`` text tokens: the same tables with
    ``cos = 1, sin = 0`` rows for the text (an exact identity rotation) cover all ``L + Nv`` tokens, so
    RoPE fuses into the kernel. None for tables of another shape."""
    if not _pair(rope):
        return None
    cos, sin = rope
    if cos.shape != (Nv, D) or sin.shape != (Nv, D):
        return None

    def build():
        c, s = cos.to(device), sin.to(device)
        return (torch.cat([c.new_ones(L, D), c]), torch.cat([s.new_zeros(L, D), s]))

    return _memo((cos, sin), ("cogvideox-rope", L, str(device)), build)


class I2VCogVideoXAttnProcessor(_Processor):
    """Replaces ``CogVideoXAttnProcessor2_0`` (and its fused-QKV variant): text tokens prepended to the
    video tokens, LayerNorm QK-norm over the head dim, RoPE on the video tokens only -- all of it one
    :func:`i2v_kernels.attention` call with ``qk_norm="layer"`` and ``rope`` fused (identity rotation on
    the text tokens). Masks, cross-attention and other RoPE shapes run the original processor."""

    replaces = ("CogVideoXAttnProcessor2_0", "FusedCogVideoXAttnProcessor2_0")

    def compute(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor,
                 attention_mask: Optional[Tensor] = None, image_rotary_emb=None):
        def original():
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        fused = type(self.original).__name__.startswith("Fused")
        if (attention_mask is not None or attn.is_cross_attention or hidden_states.dim() != 3
                or getattr(attn, "inner_kv_dim", None) != attn.inner_dim
                or (fused and not getattr(attn, "fused_projections", False))):
            return original()
        B, Nv, _ = hidden_states.shape
        L = encoder_hidden_states.size(1)
        N = L + Nv
        H = attn.heads
        D = attn.inner_dim // H
        norm = _qk_norm_kwargs(attn, D, hidden_states.dtype)
        rope = None
        if image_rotary_emb is not None:
            rope = _prefix_identity_rope(image_rotary_emb, L, Nv, D, hidden_states.device)
        if norm is None or (image_rotary_emb is not None and rope is None):
            return original()
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        if fused:
            q, k, v = attn.to_qkv(x).view(B, N, 3, H, D).unbind(2)
        else:
            q, k, v = (proj(x).view(B, N, H, D) for proj in (attn.to_q, attn.to_k, attn.to_v))
        out = attention(q, k, v, rope=rope, rope_style="interleaved", **norm)
        out = _out_proj(attn, out.view(B, N, H * D))
        encoder_out, video_out = out.split([L, Nv], dim=1)
        return video_out, encoder_out


def _wan_rope(rotary_emb, N: int, D: int):
    """Wan's ``(freqs_cos, freqs_sin)`` ``[1, N, 1, D]`` as the kernel's interleaved tables ``[1, N, D]``.

    Wan rotates pair ``i`` with ``cos[2i]`` and ``sin[2i + 1]``; repeating exactly those entries over
    each pair gives tables whose ``x * cos + rotate(x) * sin`` is Wan's formula for any input tables."""
    if not _pair(rotary_emb):
        return None
    cos, sin = rotary_emb
    if cos.dim() != 4 or cos.shape != sin.shape or cos.shape[1:] != (N, 1, D) or D % 2:
        return None

    def build():
        return (cos[:, :, 0, 0::2].repeat_interleave(2, dim=-1), sin[:, :, 0, 1::2].repeat_interleave(2, dim=-1))

    return _memo((cos, sin), ("wan-rope",), build)


def _wan_complex_rope(rotary_emb, N: int, D: int):
    """Older diffusers' Wan RoPE (``WanAttnProcessor2_0`` up to 0.34): complex ``freqs [1, 1, N, D/2]``
    multiplying each pair ``(x[2i], x[2i+1])`` read as ``x[2i] + 1j x[2i+1]``. That product is the
    interleaved rotation with ``cos = freqs.real`` and ``sin = freqs.imag`` repeated over each pair,
    as fp32 tables ``[1, N, D]`` (diffusers rotates in fp64 and rounds to the input's dtype)."""
    if not (isinstance(rotary_emb, Tensor) and rotary_emb.is_complex()) or D % 2:
        return None
    if rotary_emb.dim() != 4 or tuple(rotary_emb.shape) != (1, 1, N, D // 2):
        return None

    def build():
        f = rotary_emb[:, 0]
        return tuple(t.float().repeat_interleave(2, dim=-1).contiguous() for t in (f.real, f.imag))

    return _memo((rotary_emb,), ("wan-complex-rope",), build)


def _diffusers_version() -> tuple[int, ...]:
    """The imported diffusers' ``(major, minor, patch)`` (``()`` when unknown)."""
    import re
    import sys

    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", getattr(sys.modules.get("diffusers"), "__version__", ""))
    return tuple(int(g) for g in match.groups() if g is not None) if match else ()


def _wan_image_tokens(n_context: int, legacy: bool) -> Optional[int]:
    """How many leading context tokens are image tokens in Wan's I2V cross-attention: 512 text tokens
    follow them (the context length Wan hardcodes); diffusers 0.33's ``WanAttnProcessor2_0`` instead
    took the first 257 (CLIP's token count) whatever the length. None when the older processor comes
    from a diffusers whose version is unknown."""
    if legacy:
        version = _diffusers_version()
        if not version:
            return None
        if version < (0, 34):
            return 257
    return n_context - 512


class I2VWanAttnProcessor(_Processor):
    """Replaces ``WanAttnProcessor`` (``WanAttention``, diffusers >= 0.35) and the older
    ``WanAttnProcessor2_0`` (a generic ``Attention``, diffusers 0.33 / 0.34, complex RoPE): RMSNorm
    QK-norm across heads (over the full inner dim, so :func:`i2v_kernels.rms_norm` on ``[B, N, C]``),
    then :func:`i2v_kernels.attention` with the RoPE fused; in I2V cross-attention the image tokens
    (``add_k_proj`` / ``add_v_proj``, the context's leading tokens) get a second ``attention`` call
    whose output is added, as in Wan."""

    # (newer diffusers' WanAttnProcessor2_0() returns a WanAttnProcessor: that name only appears on
    # the older versions, whose class computes the same math with a complex RoPE)
    replaces = ("WanAttnProcessor", "WanAttnProcessor2_0")

    def compute(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, rotary_emb=None) -> Tensor:
        def original():
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

        legacy = type(self.original).__name__ == "WanAttnProcessor2_0"
        has_image = getattr(attn, "add_k_proj", None) is not None
        if (attention_mask is not None or hidden_states.dim() != 3 or self._parallel_config is not None
                or getattr(attn, "kv_inner_dim", attn.inner_dim) != attn.inner_dim
                or getattr(attn, "inner_kv_dim", attn.inner_dim) != attn.inner_dim
                or (has_image and (rotary_emb is not None or encoder_hidden_states is None))):
            return original()
        B, N, _ = hidden_states.shape
        H = attn.heads
        D = attn.inner_dim // H
        rope = None
        if rotary_emb is not None:
            rope = _wan_complex_rope(rotary_emb, N, D) if legacy else _wan_rope(rotary_emb, N, D)
            if rope is None:
                return original()
        context, image = encoder_hidden_states, None
        if has_image:
            n_image = _wan_image_tokens(encoder_hidden_states.shape[1], legacy)
            if n_image is None:
                return original()
            image, context = encoder_hidden_states[:, :n_image], encoder_hidden_states[:, n_image:]
            if image.shape[1] == 0 or context.shape[1] == 0:
                return original()
        if context is None:
            context = hidden_states
        # the older processor ignores fused projections (it always reads to_q / to_k / to_v)
        fused = getattr(attn, "fused_projections", False) and not legacy
        if fused and not attn.is_cross_attention:
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        elif fused:
            q = attn.to_q(hidden_states)
            k, v = attn.to_kv(context).chunk(2, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        q, k = _rms_or_none(attn.norm_q, q), _rms_or_none(attn.norm_k, k)
        heads = lambda t: t.unflatten(2, (H, -1))  # noqa: E731
        q = heads(q)
        out = attention(q, heads(k), heads(v), rope=rope, rope_style="interleaved")
        if image is not None:
            if fused:
                k_img, v_img = attn.to_added_kv(image).chunk(2, dim=-1)
            else:
                k_img, v_img = attn.add_k_proj(image), attn.add_v_proj(image)
            k_img = _rms(attn.norm_added_k, k_img)
            out = out + attention(q, heads(k_img), heads(v_img))
        return _out_proj(attn, out.flatten(2, 3))


def _ltx_rope_by_head(rope, B: int, N: int, H: int, D: int):
    """LTX's RoPE tables ``[B, N, H * D]`` differ per head; as ``[B, H, N, D]`` (contiguous) they
    broadcast over :func:`spatial_attention`'s ``[B, T=H, S=N, 1, D]`` view of the heads."""
    if not _pair(rope):
        return None
    cos, sin = rope
    if cos.dim() != 3 or cos.shape != sin.shape or cos.shape[1:] != (N, H * D) or cos.shape[0] not in (1, B):
        return None

    def build():
        return tuple(t.view(t.shape[0], N, H, D).transpose(1, 2).contiguous() for t in (cos, sin))

    return _memo((cos, sin), ("ltx-rope", H), build)


class I2VLTXAttnProcessor(_Processor):
    """Replaces ``LTXVideoAttnProcessor``: RMSNorm across heads (:func:`i2v_kernels.rms_norm`), then

    * self-attention with RoPE: the tables differ per head, so the heads are laid out as the frames of
      :func:`spatial_attention` (``[B, T=H, S=N, 1, D]``, a view) and the RoPE is fused;
    * cross-attention: :func:`i2v_kernels.attention`, the prompt mask as ``kv_lens``.

    Other masks and grouped KV heads run the original processor."""

    # diffusers <= 0.34: LTXVideoAttentionProcessor2_0 on a generic Attention, the same math (the mask
    # repeated per head, RoPE on the flat projections); newer versions' LTXVideoAttentionProcessor2_0()
    # returns an LTXVideoAttnProcessor
    replaces = ("LTXVideoAttnProcessor", "LTXVideoAttentionProcessor2_0")

    def compute(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, image_rotary_emb=None) -> Tensor:
        def original():
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        if (hidden_states.dim() != 3 or self._parallel_config is not None
                or getattr(attn, "inner_kv_dim", attn.inner_dim) != attn.inner_dim):
            return original()
        B, N, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        M = context.shape[1]
        H = attn.heads
        D = attn.inner_dim // H
        kv_lens = rope = None
        if attention_mask is not None:
            kv_lens = _kv_lens(attention_mask, B, M)
            if kv_lens is _UNSUPPORTED:
                return original()
        if image_rotary_emb is not None:
            rope = _ltx_rope_by_head(image_rotary_emb, B, N, H, D)
            if rope is None or M != N or kv_lens is not None:
                return original()
        q = _rms(attn.norm_q, attn.to_q(hidden_states))
        k = _rms(attn.norm_k, attn.to_k(context))
        v = attn.to_v(context)
        if rope is None:
            out = attention(q.view(B, N, H, D), k.view(B, M, H, D), v.view(B, M, H, D), kv_lens=kv_lens)
            return _out_proj(attn, out.view(B, N, H * D))
        by_head = lambda t: t.view(B, N, H, 1, D).transpose(1, 2)  # noqa: E731  [B, H, N, 1, D], a view
        out = spatial_attention(by_head(q), by_head(k), by_head(v), rope=rope, rope_style="interleaved")
        return _out_proj(attn, out.transpose(1, 2).reshape(B, N, H * D))


_PROCESSORS: dict[str, type[_Processor]] = {
    name: cls for cls in (I2VAttnProcessor, I2VCogVideoXAttnProcessor, I2VWanAttnProcessor, I2VLTXAttnProcessor)
    for name in cls.replaces
}


# ==================================================================================================
# Transformer blocks (fused adaLN)


def _pixart_block(block, x: Tensor, mods, attn1: Callable, attn2: Optional[Callable], fused: bool) -> Tensor:
    """The ``ada_norm_single`` branch of ``BasicTransformerBlock.forward`` (Latte, PixArt) with the
    modulation ``mods = (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp)`` given;
    ``fused`` runs the adaLN steps as i2v_kernels ops, else as diffusers writes them."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
    n1, n2 = block.norm1, block.norm2
    if not fused:  # diffusers' own formulas, op for op
        x = gate_msa * attn1(n1(x) * (1 + scale_msa) + shift_msa) + x
        if attn2 is not None:
            x = attn2(x) + x
        return gate_mlp * block.ff(n2(x) * (1 + scale_mlp) + shift_mlp) + x
    a = attn1(_modulate(n1, x, shift_msa, scale_msa))
    if attn2 is not None:
        x = gated_residual(x, a, gate_msa)
        a, gate_msa = attn2(x), None  # PixArt: no norm before the cross-attention, no gate after it
    x, h = _residual_modulate(n2, x, a, gate_msa, shift_mlp, scale_mlp)
    return gated_residual(x, block.ff(h), gate_mlp)


def _pixart_block_why_not(block) -> Optional[str]:
    if getattr(block, "norm_type", None) != "ada_norm_single":
        return f"norm_type={getattr(block, 'norm_type', None)!r} (only 'ada_norm_single' is fused)"
    if block.pos_embed is not None or hasattr(block, "fuser") or block.only_cross_attention:
        return "positional embedding, GLIGEN fuser or only-cross-attention"
    if _layer_norm(block.norm1) is None or _layer_norm(block.norm2) is None:
        return "norm1/norm2 are not LayerNorms"
    return None


def _basic_block_forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                         encoder_hidden_states: Optional[Tensor] = None,
                         encoder_attention_mask: Optional[Tensor] = None, timestep: Optional[Tensor] = None,
                         cross_attention_kwargs: Optional[dict] = None, class_labels=None,
                         added_cond_kwargs=None) -> Tensor:
    """``BasicTransformerBlock.forward`` (``ada_norm_single``) with fused adaLN."""
    if cross_attention_kwargs or self._chunk_size is not None or hidden_states.dim() != 3 or timestep is None:
        return _fallback(self)(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                               timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
    B = hidden_states.shape[0]
    mods = (self.scale_shift_table[None] + timestep.reshape(B, 6, -1)).chunk(6, dim=1)  # [B, 1, C] each
    attn1 = lambda h: self.attn1(h, encoder_hidden_states=None, attention_mask=attention_mask)  # noqa: E731
    attn2 = None
    if self.attn2 is not None:
        attn2 = lambda h: self.attn2(h, encoder_hidden_states=encoder_hidden_states,  # noqa: E731
                                     attention_mask=encoder_attention_mask)
    return _pixart_block(self, hidden_states, mods, attn1, attn2, fused=True)


def _cogvideox_block_why_not(block) -> Optional[str]:
    for norm in (block.norm1, block.norm2):
        if type(norm).__name__ != "CogVideoXLayerNormZero" or _layer_norm(norm.norm) is None:
            return "norm1/norm2 are not CogVideoXLayerNormZero with a LayerNorm"
    return None


def _cogvideox_block_forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
                             image_rotary_emb=None, attention_kwargs: Optional[dict] = None):
    """``CogVideoXBlock.forward``: both CogVideoXLayerNormZero modulations, the gated residuals and the
    second LayerNorm fused (``adaln_modulate``, ``gated_residual_adaln``, ``gated_residual``)."""
    L = encoder_hidden_states.size(1)
    attention_kwargs = attention_kwargs or {}
    mods1 = [m[:, None, :] for m in self.norm1.linear(self.norm1.silu(temb)).chunk(6, dim=1)]
    mods2 = [m[:, None, :] for m in self.norm2.linear(self.norm2.silu(temb)).chunk(6, dim=1)]
    shift, scale, gate, enc_shift, enc_scale, enc_gate = mods1
    norm_h = _modulate(self.norm1.norm, hidden_states, shift, scale)
    norm_e = _modulate(self.norm1.norm, encoder_hidden_states, enc_shift, enc_scale)
    attn_h, attn_e = self.attn1(hidden_states=norm_h, encoder_hidden_states=norm_e,
                                image_rotary_emb=image_rotary_emb, **attention_kwargs)
    shift, scale, gate_ff, enc_shift, enc_scale, enc_gate_ff = mods2
    hidden_states, norm_h = _residual_modulate(self.norm2.norm, hidden_states, attn_h, gate, shift, scale)
    encoder_hidden_states, norm_e = _residual_modulate(self.norm2.norm, encoder_hidden_states, attn_e, enc_gate,
                                                       enc_shift, enc_scale)
    ff = self.ff(torch.cat([norm_e, norm_h], dim=1))
    hidden_states = gated_residual(hidden_states, ff[:, L:], gate_ff)
    encoder_hidden_states = gated_residual(encoder_hidden_states, ff[:, :L], enc_gate_ff)
    return hidden_states, encoder_hidden_states


def _wan_block_why_not(block) -> Optional[str]:
    if _layer_norm(block.norm1) is None or _layer_norm(block.norm3) is None:
        return "norm1/norm3 are not LayerNorms"
    if not (isinstance(block.norm2, nn.Identity) or _layer_norm(block.norm2) is not None):
        return "norm2 is neither Identity nor a LayerNorm"
    return None


def _wan_block_forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
                       rotary_emb=None) -> Tensor:
    """``WanTransformerBlock.forward``: FP32LayerNorm + ``scale_shift_table`` modulation and the gated
    residuals fused. The modulation stays fp32 (as Wan computes it) next to a bf16 ``x``; the kernels
    do the math in fp32 and write ``x``'s dtype, as Wan's ``.float() ... .type_as(x)`` does."""
    if temb.dim() == 4:  # Wan 2.2 TI2V: per-token modulation [B, N, 6, C]
        mods = [m.squeeze(2) for m in (self.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)]
    else:  # [B, 6, C]
        mods = (self.scale_shift_table + temb.float()).chunk(6, dim=1)
    shift, scale, gate, c_shift, c_scale, c_gate = mods
    norm_h = _modulate(self.norm1, hidden_states, shift, scale)
    # keywords: older diffusers' Wan blocks hold a generic Attention whose forward takes no positional rotary_emb
    attn = self.attn1(norm_h, rotary_emb=rotary_emb)
    hidden_states = gated_residual(hidden_states, attn, gate)
    norm_h = hidden_states if isinstance(self.norm2, nn.Identity) else _modulate(self.norm2, hidden_states, None, None)
    attn = self.attn2(norm_h, encoder_hidden_states=encoder_hidden_states)
    hidden_states, norm_h = _residual_modulate(self.norm3, hidden_states, attn, None, c_shift, c_scale)
    ff = self.ffn(norm_h)
    return gated_residual(hidden_states, ff, c_gate)


def _ltx_block_forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
                       image_rotary_emb=None, encoder_attention_mask: Optional[Tensor] = None) -> Tensor:
    """``LTXVideoTransformerBlock.forward`` with ``rms_norm`` and ``gated_residual``. LTX modulates an
    RMSNorm (not a LayerNorm), which the fused adaLN ops do not cover: that product stays in PyTorch."""
    B = hidden_states.size(0)
    n_ada = self.scale_shift_table.shape[0]
    ada = self.scale_shift_table[None, None].to(temb.device) + temb.reshape(B, temb.size(1), n_ada, -1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada.unbind(dim=2)
    norm_h = _rms(self.norm1, hidden_states) * (1 + scale_msa) + shift_msa
    attn = self.attn1(hidden_states=norm_h, encoder_hidden_states=None, image_rotary_emb=image_rotary_emb)
    hidden_states = gated_residual(hidden_states, attn, gate_msa)
    attn = self.attn2(hidden_states, encoder_hidden_states=encoder_hidden_states, image_rotary_emb=None,
                      attention_mask=encoder_attention_mask)
    hidden_states = hidden_states + attn
    norm_h = _rms(self.norm2, hidden_states) * (1 + scale_mlp) + shift_mlp
    ff = self.ff(norm_h)
    return gated_residual(hidden_states, ff, gate_mlp)


# ==================================================================================================
# Latte: the whole model forward in the [B, T, S, C] layout


def _latte_attention_ok(attn, cross: bool) -> bool:
    return (type(attn).__name__ == "Attention" and _plain_attention(attn)
            and type(_unwrapped(attn.processor)).__name__ in I2VAttnProcessor.replaces
            and not getattr(attn, "norm_cross", None) and (cross or not attn.is_cross_attention))


def _latte_why_not(model) -> Optional[str]:
    """Static conditions of the [B, T, S, C] path (checked at patch time and on every call)."""
    for blocks, temporal in ((model.transformer_blocks, False), (model.temporal_transformer_blocks, True)):
        for block in blocks:
            why = None if type(block).__name__ == "BasicTransformerBlock" else "a block is not a BasicTransformerBlock"
            why = why or _pixart_block_why_not(block)
            if why:
                return why
            if block._chunk_size is not None:
                return "chunked feed-forward"
            if not _latte_attention_ok(block.attn1, cross=False):
                return "an attn1 is not plain Attention + AttnProcessor2_0"
            if block.attn2 is not None and (temporal or not _latte_attention_ok(block.attn2, cross=True)):
                return "an attn2 is not plain Attention + AttnProcessor2_0 cross-attention"
    if len(model.transformer_blocks) != len(model.temporal_transformer_blocks):
        return "different numbers of spatial and temporal blocks"
    return None


def _latte_blocks_hooked(model) -> bool:
    """Hooks on a block or its attention (diffusers' caches: PyramidAttentionBroadcast, FasterCache,
    TaylorSeer ...; offloading; torch forward hooks) act inside calls the [B, T, S, C] path does not
    make: with any of them the original forward runs, through the (patched) blocks and their hooks."""
    return any(_any_hooks(m) for blocks in (model.transformer_blocks, model.temporal_transformer_blocks)
               for block in blocks for m in (block, block.attn1, block.attn2) if m is not None)


def _latte_self_attention(attn, x: Tensor, temporal: bool) -> Tensor:
    """Self-attention of ``x [B, T, S, C]`` within each frame (spatial) or across frames (temporal),
    on ``[B, T, S, H, D]`` views of the projections."""
    B, T, S, _ = x.shape
    H = attn.heads
    D = attn.inner_dim // H
    q, k, v = (proj(x).view(B, T, S, H, D) for proj in (attn.to_q, attn.to_k, attn.to_v))
    norm = _qk_norm_kwargs(attn, D, x.dtype)
    fn = temporal_attention if temporal else spatial_attention
    out = fn(q, k, v, scale=_sdpa_scale(attn), **norm)
    return _out_proj(attn, out.view(B, T, S, H * D))


def _latte_cross_attention(attn, x: Tensor, context: Tensor) -> Tensor:
    """Every frame of ``x [B, T, S, C]`` attends to its sample's prompt ``context [B, L, C]``: one call
    over ``T * S`` queries instead of projecting the prompt once per frame."""
    B, T, S, _ = x.shape
    H = attn.heads
    D = attn.inner_dim // H
    L = context.shape[1]
    q = attn.to_q(x).view(B, T * S, H, D)
    k = attn.to_k(context).view(B, L, H, D)
    v = attn.to_v(context).view(B, L, H, D)
    out = attention(q, k, v, scale=_sdpa_scale(attn), **_qk_norm_kwargs(attn, D, x.dtype))
    return _out_proj(attn, out.view(B, T, S, H * D))


def _latte_forward(self, hidden_states: Tensor, timestep: Optional[Tensor] = None,
                   encoder_hidden_states: Optional[Tensor] = None, encoder_attention_mask: Optional[Tensor] = None,
                   enable_temporal_attentions: bool = True, return_dict: bool = True):
    """``LatteTransformer3DModel.forward`` keeping the tokens ``[B, T, S, C]`` between blocks: spatial
    blocks attend within frames and temporal blocks across frames on views of the same tensor, so the
    two ``[B*T, S, C] <-> [B*S, T, C]`` rearrange copies per layer of the original disappear.
    A prompt mask, gradient checkpointing or a changed processor run the original forward."""
    if (encoder_attention_mask is not None or encoder_hidden_states is None or timestep is None
            or (torch.is_grad_enabled() and self.gradient_checkpointing) or _latte_why_not(self) is not None
            or _latte_blocks_hooked(self)):
        return _fallback(self)(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                               enable_temporal_attentions, return_dict)
    fused = all(_RECORDS in b.__dict__ and "forward" in b.__dict__[_RECORDS]
                for b in (*self.transformer_blocks, *self.temporal_transformer_blocks))
    batch_size, channels, num_frame, height, width = hidden_states.shape
    hidden_states = hidden_states.permute(0, 2, 1, 3, 4).reshape(-1, channels, height, width)
    p = self.config.patch_size
    height, width = hidden_states.shape[-2] // p, hidden_states.shape[-1] // p
    hidden_states = self.pos_embed(hidden_states)  # [B*T, S, C]
    timestep, embedded_timestep = self.adaln_single(
        timestep, added_cond_kwargs={"resolution": None, "aspect_ratio": None}, batch_size=batch_size,
        hidden_dtype=hidden_states.dtype)
    context = self.caption_projection(encoder_hidden_states)  # [B, L, C], not repeated per frame
    B, T, S, C = batch_size, num_frame, hidden_states.shape[1], hidden_states.shape[2]
    x = hidden_states.view(B, T, S, C)

    def block_mods(block):
        # per sample [B, 1, 1, C]: the original repeats the same rows per frame / per position
        return [m.unsqueeze(1) for m in (block.scale_shift_table[None] + timestep.reshape(B, 6, -1)).chunk(6, dim=1)]

    for i, (spatial_block, temporal_block) in enumerate(zip(self.transformer_blocks, self.temporal_transformer_blocks)):
        a1 = spatial_block.attn1
        a2 = spatial_block.attn2
        x = _pixart_block(spatial_block, x, block_mods(spatial_block),
                          lambda h: _latte_self_attention(a1, h, temporal=False),
                          None if a2 is None else (lambda h: _latte_cross_attention(a2, h, context)), fused)
        if enable_temporal_attentions:
            if i == 0 and num_frame > 1:
                x = x + self.temp_pos_embed.to(x.dtype).unsqueeze(2)  # [1, T, 1, C]
            t1 = temporal_block.attn1
            x = _pixart_block(temporal_block, x, block_mods(temporal_block),
                              lambda h: _latte_self_attention(t1, h, temporal=True), None, fused)

    hidden_states = x.view(B * T, S, C)
    embedded_timestep = embedded_timestep.repeat_interleave(
        num_frame, dim=0, output_size=embedded_timestep.shape[0] * num_frame).view(-1, embedded_timestep.shape[-1])
    shift, scale = (self.scale_shift_table[None] + embedded_timestep[:, None]).chunk(2, dim=1)
    if fused and _layer_norm(self.norm_out) is not None:
        hidden_states = _modulate(self.norm_out, hidden_states, shift, scale)
    else:
        hidden_states = self.norm_out(hidden_states) * (1 + scale) + shift
    hidden_states = self.proj_out(hidden_states)
    hidden_states = hidden_states.reshape(shape=(-1, height, width, p, p, self.out_channels))
    hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
    output = hidden_states.reshape(shape=(-1, self.out_channels, height * p, width * p))
    output = output.reshape(batch_size, -1, output.shape[-3], output.shape[-2], output.shape[-1]).permute(0, 2, 1, 3, 4)
    if not return_dict:
        return (output,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=output)


# ==================================================================================================
# VAE causal convolutions


def _conv_why_not(conv: nn.Conv3d, time_front: int, spatial: tuple[int, int]) -> Optional[str]:
    """Does ``causal_conv3d`` compute ``conv`` after ``time_front`` front frames and ``spatial`` zero
    padding exactly?"""
    if conv.groups != 1 or conv.padding_mode != "zeros":
        return f"groups={conv.groups}, padding_mode={conv.padding_mode!r}"
    kt = conv.kernel_size[0]
    if _conv_ref.time_padding(kt, conv.dilation[0]) != time_front:
        return f"{time_front} front frames for a time kernel of {kt} (dilation {conv.dilation[0]})"
    if _conv_ref.spatial_padding(conv.kernel_size, conv.dilation) != tuple(spatial):
        return f"spatial padding {tuple(spatial)} is not dilation * (k - 1) // 2"
    return None


def _conv_params(conv, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """The conv's weight and bias in x's dtype: with diffusers' layerwise casting the stored weights are
    fp8/fp16 and its hook casts them inside the conv's own forward, which ours does not call."""
    w, b = conv.weight, conv.bias
    if w.dtype != x.dtype:
        w = w.to(x.dtype)
    if b is not None and b.dtype != x.dtype:
        b = b.to(x.dtype)
    return w, b


def _like_input(out: Tensor, x: Tensor) -> Tensor:
    """The output in the memory format diffusers gives (its conv keeps the input's): our op returns
    channels_last_3d, which would change every stride-sensitive step downstream (GroupNorm, randn_like)."""
    return out.contiguous() if x.is_contiguous() else out


def _cogvideox_conv_why_not(module) -> Optional[str]:
    if module.pad_mode == "replicate":
        return "pad_mode='replicate' (replicate padding in space)"
    conv = module.conv
    if tuple(conv.padding[1:]) != (module.width_pad, module.height_pad) or conv.padding[0] != 0:
        return "unexpected conv padding"
    return _conv_why_not(conv, module.time_kernel_size - 1, conv.padding[1:])


def _cogvideox_conv_forward(self, inputs: Tensor, conv_cache: Optional[Tensor] = None):
    """``CogVideoXCausalConv3d.forward``: front padding from ``conv_cache`` or the first frame repeated,
    zeros in space; returns ``(output, conv_cache)`` with the cache exactly as diffusers builds it (the
    last ``kt - 1`` frames of the padded input, a copy; for ``kt == 1`` the whole input, as there)."""
    conv = self.conv
    P = self.time_kernel_size - 1
    cache = conv_cache if P > 0 else None
    if cache is not None and (cache.shape != (*inputs.shape[:2], P, *inputs.shape[3:]) or cache.dtype != inputs.dtype):
        return _fallback(self)(inputs, conv_cache)
    if cache is not None:
        cache = cache.to(inputs.device)
    w, b = _conv_params(conv, inputs)
    out = causal_conv3d(inputs, w, b, stride=conv.stride, dilation=conv.dilation, time_pad="replicate", cache=cache)
    new_cache = inputs.clone() if P == 0 else _conv_ref.next_cache(inputs, P, "replicate", cache)
    return _like_input(out, inputs), new_cache


def _wan_conv_why_not(module) -> Optional[str]:
    pw0, pw1, ph0, ph1, pt, tail = module._padding
    if pw0 != pw1 or ph0 != ph1 or tail != 0 or tuple(module.padding) != (0, 0, 0):
        return "asymmetric padding"
    # pt == 0 with a longer time kernel: the encoder's temporal downsample, a "valid" conv in time
    # (its caller prepends the cached frame itself); computed with the first frames as the cache
    P = _conv_ref.time_padding(module.kernel_size[0], module.dilation[0])
    return _conv_why_not(module, P if pt == 0 else pt, (ph0, pw0))


def _wan_conv_forward(self, x: Tensor, cache_x: Optional[Tensor] = None) -> Tensor:
    """``WanCausalConv3d.forward``: ``cache_x`` (the previous chunk's last 1 or 2 frames) goes in front,
    zeros fill the rest of the front padding, zeros in space. Without front padding (the temporal
    downsample) the conv is "valid" in time: the first ``P`` frames of ``x`` are the cache."""
    P = self._padding[4]
    kw = dict(stride=self.stride, dilation=self.dilation, time_pad="zeros")
    w, b = _conv_params(self, x)
    if P == 0:
        P = _conv_ref.time_padding(self.kernel_size[0], self.dilation[0])
        if P == 0:
            return _like_input(causal_conv3d(x, w, b, **kw), x)
        if x.shape[2] <= P:
            return _fallback(self)(x, cache_x)
        return _like_input(causal_conv3d(x[:, :, P:], w, b, cache=x[:, :, :P], **kw), x)
    cache = None
    if cache_x is not None:
        n = cache_x.shape[2]
        if n > P or cache_x.dtype != x.dtype or cache_x.shape[:2] != x.shape[:2] or cache_x.shape[3:] != x.shape[3:]:
            return _fallback(self)(x, cache_x)
        cache = cache_x.to(x.device)
        if n < P:
            cache = torch.cat([cache.new_zeros(*cache.shape[:2], P - n, *cache.shape[3:]), cache], dim=2)
    return _like_input(causal_conv3d(x, w, b, cache=cache, **kw), x)


def _ltx_conv_why_not(module) -> Optional[str]:
    conv = module.conv
    kt = module.kernel_size[0]
    if module.is_causal:
        return _conv_why_not(conv, kt - 1, conv.padding[1:])
    if kt % 2 == 0:
        return "non-causal with an even time kernel"
    return _conv_why_not(conv, kt - 1, conv.padding[1:])


def _ltx_conv_forward(self, hidden_states: Tensor) -> Tensor:
    """``LTXVideoCausalConv3d.forward``. Causal: the first frame repeated in front. Non-causal (first
    frame repeated ``h = (kt - 1) // 2`` times in front, last frame ``h`` times behind): the same padded
    sequence handed to the op as ``cache = [x0] * h + x[:h]`` and ``x[h:] + [x_last] * h``."""
    conv = self.conv
    kt = self.kernel_size[0]
    w, b = _conv_params(conv, hidden_states)
    if self.is_causal:
        return _like_input(causal_conv3d(hidden_states, w, b, stride=conv.stride, dilation=conv.dilation,
                                         time_pad="replicate"), hidden_states)
    h = (kt - 1) // 2
    x, cache = hidden_states, None
    if h > 0:
        if x.shape[2] < h:
            return _fallback(self)(hidden_states)
        cache = torch.cat([x[:, :, :1].expand(-1, -1, h, -1, -1), x[:, :, :h]], dim=2)
        x = torch.cat([x[:, :, h:], x[:, :, -1:].expand(-1, -1, h, -1, -1)], dim=2)
    out = causal_conv3d(x, w, b, stride=conv.stride, dilation=conv.dilation, time_pad="replicate", cache=cache)
    return _like_input(out, hidden_states)


# ==================================================================================================
# What is patched where


@dataclass(frozen=True)
class _Spec:
    op: str                                   # the ops family that enables it
    kind: str                                 # "forward" or "processor"
    label: str                                # for the summary
    why_not: Callable[[nn.Module], Optional[str]] = lambda m: None
    forward: Optional[Callable] = None        # the function bound as the module's forward


def _processor_spec() -> _Spec:
    def why_not(attn):
        name = type(attn.processor).__name__
        return None if name in _PROCESSORS else f"processor {name} is not one this integration replaces"

    return _Spec("attention", "processor", "processor -> i2v_kernels attention processor", why_not)


_COMPONENTS: dict[str, tuple[_Spec, ...]] = {
    "LatteTransformer3DModel": (
        _Spec("attention", "forward", "forward -> [B, T, S, C] layout: spatial_attention / temporal_attention / "
              "attention (no rearrange copies)", _latte_why_not, _latte_forward),),
    "BasicTransformerBlock": (
        _Spec("adaln", "forward", "forward -> fused adaLN (adaln_modulate, gated_residual_adaln, gated_residual)",
              _pixart_block_why_not, _basic_block_forward),),
    "CogVideoXBlock": (
        _Spec("adaln", "forward", "forward -> fused adaLN (CogVideoXLayerNormZero: adaln_modulate, "
              "gated_residual_adaln, gated_residual)", _cogvideox_block_why_not, _cogvideox_block_forward),),
    "WanTransformerBlock": (
        _Spec("adaln", "forward", "forward -> fused adaLN with fp32 modulation (adaln_modulate, "
              "gated_residual_adaln, gated_residual)", _wan_block_why_not, _wan_block_forward),),
    "LTXVideoTransformerBlock": (
        _Spec("adaln", "forward", "forward -> rms_norm + gated_residual", lambda m: None, _ltx_block_forward),),
    "Attention": (_processor_spec(),),
    "WanAttention": (_processor_spec(),),
    "LTXAttention": (_processor_spec(),),
    "CogVideoXCausalConv3d": (
        _Spec("conv3d", "forward", "forward -> causal_conv3d (replicate first frame, conv_cache)",
              _cogvideox_conv_why_not, _cogvideox_conv_forward),),
    "WanCausalConv3d": (
        _Spec("conv3d", "forward", "forward -> causal_conv3d (zeros, cache_x)", _wan_conv_why_not, _wan_conv_forward),),
    "LTXVideoCausalConv3d": (
        _Spec("conv3d", "forward", "forward -> causal_conv3d", _ltx_conv_why_not, _ltx_conv_forward),),
}


class _Record:
    """One replacement on one module: where it went, what was there, what to call to fall back."""

    def __init__(self, kind: str, attr: str, original, replacement, fallback, label: str):
        self.kind, self.attr, self.original = kind, attr, original
        self.replacement, self.fallback, self.label = replacement, fallback, label


def _is_diffusers_model(module: nn.Module) -> bool:
    return any(c.__name__ == "ModelMixin" for c in type(module).__mro__)


def _from_diffusers(module: nn.Module) -> bool:
    return type(module).__module__.startswith("diffusers.")


def _looks_like_video_model(name: str) -> bool:
    return name.endswith("Transformer3DModel") or name.startswith("AutoencoderKL")


def _diffusers_hooks(module: nn.Module) -> list[str]:
    """Names of the diffusers hooks (``diffusers.hooks.HookRegistry``) on ``module`` itself."""
    registry = module.__dict__.get("_diffusers_hook")
    return list(getattr(registry, "hooks", {})) if registry is not None else []


# diffusers hooks that move or cast a module's weights inside its own call (group offloading and its
# lazy prefetch, layerwise casting): a replacement that reads those weights without calling the module
# would see them offloaded or in the storage dtype. Cache hooks (FirstBlockCache, PyramidAttentionBroadcast,
# FasterCache, TaylorSeer ...) sit on blocks and attention modules, which the replacements call.
_WEIGHT_HOOKS = ("group_offloading", "lazy_prefetch_group_offloading", "layerwise_casting")


def _hooks_in_the_way(module: nn.Module, kind: str) -> bool:
    """Offload / casting hooks on submodules the replacement would bypass: ours read submodules' weights
    directly (norms, tables), which accelerate's sequential / diffusers' group offloading and layerwise
    casting only prepare inside those submodules' own calls. Hooks on the module itself are fine: the
    replacement goes below them (see :func:`_forward_slot`)."""
    return any("_hf_hook" in m.__dict__ or any(h in _WEIGHT_HOOKS for h in _diffusers_hooks(m))
               for m in module.modules() if m is not module)


def _any_hooks(module: nn.Module) -> bool:
    """Any diffusers, accelerate or torch forward hook on ``module`` itself."""
    return bool(module.__dict__.get("_diffusers_hook") is not None and _diffusers_hooks(module)
                or "_hf_hook" in module.__dict__ or module._forward_hooks or module._forward_pre_hooks)


def _forward_slot(module: nn.Module) -> tuple[Any, str]:
    """``(holder, attr)``: where the module's real forward lives, the one hooks wrap and call.

    diffusers' ``HookRegistry`` (cache hooks, group offloading, layerwise casting) wraps ``forward`` in
    a chain whose innermost link keeps the real one (in ``original_forward`` when the hook brings its own
    ``new_forward``, e.g. FirstBlockCache); accelerate's hooks keep it in ``_old_forward``. Putting the
    replacement there keeps every hook running around it."""
    registry = module.__dict__.get("_diffusers_hook")
    refs = getattr(registry, "_fn_refs", None)
    if refs:
        link = refs[0]
        return link, "original_forward" if link.original_forward is not None else "forward"
    if "_old_forward" in module.__dict__ and "_hf_hook" in module.__dict__:
        return module, "_old_forward"
    return module, "forward"


def _slots(module: nn.Module) -> Iterator[tuple[Any, str]]:
    """Every place a replacement of ``module``'s forward may be by now (hooks come and go after patch)."""
    for attr in ("forward", "_old_forward"):
        yield module, attr
    registry = module.__dict__.get("_diffusers_hook")
    for link in getattr(registry, "_fn_refs", None) or ():
        yield link, "forward"
        yield link, "original_forward"


def _walk(root: nn.Module, unsupported: list[str]) -> Iterator[nn.Module]:
    """Modules of ``root`` that may be patched: the subtrees of known models and any module outside a
    diffusers model (e.g. a block passed alone); the subtree of another diffusers model is skipped
    (and named in ``unsupported`` when it looks like a video model)."""
    stack = [(root, False)]
    while stack:
        module, inside_known = stack.pop()
        name = type(module).__name__
        if name in KNOWN_MODELS and _from_diffusers(module):
            inside_known = True
        elif not inside_known and _is_diffusers_model(module):
            if _looks_like_video_model(name) and name not in unsupported:
                unsupported.append(name)
            continue
        yield module
        stack.extend((child, inside_known) for child in reversed(list(module.children())))


def _roots(obj) -> list[nn.Module]:
    """The modules to patch: ``obj`` itself, or every ``nn.Module`` component of a pipeline."""
    if isinstance(obj, nn.Module):
        return [obj]
    components = getattr(obj, "components", None)
    if isinstance(components, dict):
        return [m for m in components.values() if isinstance(m, nn.Module)]
    parts = [getattr(obj, name, None) for name in ("transformer", "transformer_2", "vae")]
    parts = [m for m in parts if isinstance(m, nn.Module)]
    if parts:
        return parts
    raise TypeError(f"i2v_kernels.patch: expected a diffusers pipeline, a diffusers model or an nn.Module, "
                    f"got {type(obj).__name__}")


def _check_ops(ops) -> frozenset:
    if ops is None:
        return frozenset(OPS)
    if isinstance(ops, str):
        ops = (ops,)
    ops = frozenset(ops)
    unknown = ops - set(OPS)
    if unknown:
        raise ValueError(f"i2v_kernels.patch: ops must be a subset of {set(OPS)}, got unknown {sorted(unknown)}")
    return ops


def _apply(module: nn.Module, spec: _Spec) -> None:
    records = module.__dict__.get(_RECORDS)
    if records is None:
        records = {}
        setattr(module, _RECORDS, records)
    if spec.kind == "processor":
        original = module.processor
        replacement = _PROCESSORS[type(original).__name__](original)
        label = f"processor {type(original).__name__} -> {type(replacement).__name__}"
        module.processor = replacement
        records["processor"] = _Record("processor", "processor", original, replacement, original, label)
        return
    holder, attr = _forward_slot(module)
    original = holder.__dict__.get(attr, _ABSENT) if holder is module else getattr(holder, attr)
    fallback = getattr(holder, attr)
    replacement = types.MethodType(_measured_forward(type(module).__name__, spec.forward), module)
    setattr(holder, attr, replacement)
    records["forward"] = _Record("forward", attr, original, replacement, fallback, spec.label)


# Why a module keeps diffusers' code under weight-moving hooks (see _hooks_in_the_way)
_HOOKED = "diffusers/accelerate hooks on it or its submodules (offloading, layerwise casting)"


def _repatch_processors(model: nn.Module) -> None:
    """After ``model`` swapped its processors: ours that came back (``unfuse_qkv_projections`` restores
    the processors saved by ``fuse``) are recorded again, stock ones that ours replace are replaced."""
    spec = _processor_spec()
    for module in model.modules():
        records = module.__dict__.get(_RECORDS)
        record = (records or {}).get("processor")
        if record is None or module.processor is record.replacement:
            continue
        processor = module.processor
        if isinstance(processor, _Processor):
            label = f"processor {type(processor.original).__name__} -> {type(processor).__name__}"
            records["processor"] = _Record("processor", "processor", processor.original, processor,
                                           processor.original, label)
        elif spec.why_not(module) is None and not _hooks_in_the_way(module, "processor"):
            _apply(module, spec)


def _yield_to_weight_hooks(model: nn.Module) -> None:
    """After offloading or layerwise casting was enabled on a patched model: the replacements whose
    submodules now carry weight-moving hooks go back to diffusers' code, as :func:`patch` leaves them
    when those hooks come first (the summary of ``model`` says so)."""
    summary = patch_summary(model)
    for module in model.modules():
        records = module.__dict__.get(_RECORDS, {})
        for kind in ("forward", "processor"):
            record = records.get(kind)
            if record is None or not _hooks_in_the_way(module, kind) or not _restore(module, record):
                continue
            del records[kind]
            if summary is not None:
                label = f"{type(module).__name__}.{record.label}"
                summary.replaced[label] = summary.replaced.get(label, 0) - 1
                if summary.replaced[label] <= 0:
                    del summary.replaced[label]
                why = f"{type(module).__name__}: {_HOOKED}"
                summary.kept[why] = summary.kept.get(why, 0) + 1
        if _RECORDS in module.__dict__ and not records:
            del module.__dict__[_RECORDS]


# Model methods wrapped per patched model instance, with what runs after the original:
# fuse/unfuse swap every attention processor for a stock one (or back to the saved ones, ours), so the
# new ones are replaced too; offloading / layerwise casting add the hooks ours cannot read weights under.
_WRAPPED_METHODS = {
    "fuse_qkv_projections": _repatch_processors,
    "unfuse_qkv_projections": _repatch_processors,
    "enable_group_offload": _yield_to_weight_hooks,
    "enable_layerwise_casting": _yield_to_weight_hooks,
}


def _wrap_methods(model: nn.Module) -> None:
    records = model.__dict__.setdefault(_RECORDS, {})
    for name, after in _WRAPPED_METHODS.items():
        if name in records or not callable(getattr(model, name, None)):
            continue
        method = getattr(model, name)

        def wrapped(*args, _method=method, _after=after, **kwargs):
            out = _method(*args, **kwargs)
            _after(model)
            return out

        wrapped.__name__, wrapped.__doc__ = name, method.__doc__
        original = model.__dict__.get(name, _ABSENT)
        setattr(model, name, wrapped)
        records[name] = _Record("method", name, original, wrapped, method, f"{name} -> keeps the patch consistent")


def _summarize(roots: Iterable[nn.Module], kept: Counter, unsupported: list[str]) -> PatchSummary:
    replaced: Counter = Counter()
    for root in roots:
        for module in root.modules():
            for record in module.__dict__.get(_RECORDS, {}).values():
                if record.kind != "method":
                    replaced[f"{type(module).__name__}.{record.label}"] += 1
    return PatchSummary(dict(replaced), dict(kept), list(unsupported))


# ==================================================================================================
# Public functions


def patch(obj, *, ops=None, verbose: bool = False):
    """Accelerate a diffusers video pipeline, model or any ``nn.Module`` holding diffusers modules, in
    place (see the module docstring for what is replaced); returns ``obj``.

    Args:
        obj: a pipeline (each ``nn.Module`` component is patched: ``transformer``, ``transformer_2``,
            ``vae`` ...), a diffusers model, or any ``nn.Module``.
        ops: subset of ``{"attention", "adaln", "conv3d"}`` to patch (default: all).
        verbose: print the :class:`PatchSummary`.

    The summary is stored as ``obj._i2v_kernels_patch_summary`` (see :func:`patch_summary`). Unknown
    video-model classes are left untouched and named in one ``UserWarning``. Patching again is harmless.

    With diffusers' own model APIs (each tested on CPU, before and after ``patch``; see the module
    docstring for the details):

    - ``enable_cache(FirstBlockCacheConfig | PyramidAttentionBroadcastConfig | ...)``: the cache hooks run
      around ours, same output as the cache without ``patch``.
    - ``set_attention_backend(name)``: honoured -- Wan's and LTX's patched processors hand their calls
      to diffusers' processor and the backend ``name``; processors without a backend setting (Latte's
      ``AttnProcessor2_0``, CogVideoX's) are left as diffusers leaves them, i.e. ours keeps running.
      ``reset_attention_backend()`` brings our attention back.
    - ``torch.compile(model, fullgraph=True)`` and ``compile_repeated_blocks(fullgraph=True)`` trace the
      patched code without graph breaks (masked cross-attention takes diffusers' processor there).
    - ``fuse_qkv_projections()`` / ``unfuse_qkv_projections()`` keep the patch.
    - ``enable_group_offload``: block-level keeps ours running; leaf-level (and ``enable_layerwise_casting``,
      sequential CPU offload) puts diffusers' code back in the modules whose submodules it hooks, whichever
      comes first (listed in the summary's ``kept``).
    - ``state_dict`` / ``save_pretrained`` are unchanged; ``unpatch`` works with hooks added or removed
      since ``patch``.
    """
    wanted = _check_ops(ops)
    roots = _roots(obj)
    kept: Counter = Counter()
    unsupported: list[str] = []
    for root in roots:
        for module in _walk(root, unsupported):
            if type(module).__name__ in KNOWN_MODELS and _from_diffusers(module):
                _wrap_methods(module)
            specs = _COMPONENTS.get(type(module).__name__)
            if not specs or not _from_diffusers(module):
                continue
            records = module.__dict__.get(_RECORDS, {})
            for spec in specs:
                if spec.op not in wanted or spec.kind in records:
                    continue
                why = spec.why_not(module)
                if why is None and _hooks_in_the_way(module, spec.kind):
                    why = _HOOKED
                if why is not None:
                    kept[f"{type(module).__name__}: {why}"] += 1
                    continue
                _apply(module, spec)
    summary = _summarize(roots, kept, unsupported)
    if unsupported:
        warnings.warn(f"i2v_kernels.patch: left untouched (not supported by the diffusers integration): "
                      f"{', '.join(unsupported)}", UserWarning, stacklevel=2)
    setattr(obj, SUMMARY_ATTR, summary)
    if verbose:
        print(summary)
    return obj


def _restore(module: nn.Module, record: _Record) -> bool:
    """Put back what ``record`` replaced, wherever hooks added or removed since have moved it; False
    when something else has replaced ours since."""
    if record.kind == "processor":
        if module.processor is not record.replacement:
            return False
        module.processor = record.original
        return True
    if record.kind == "method":
        if module.__dict__.get(record.attr) is not record.replacement:
            return False
        if record.original is _ABSENT:
            del module.__dict__[record.attr]
        else:
            setattr(module, record.attr, record.original)
        saved = getattr(module, "original_attn_processors", None)  # what unfuse_qkv_projections restores
        if isinstance(saved, dict):
            module.original_attn_processors = {k: _unwrapped(p) for k, p in saved.items()}
        return True
    for holder, attr in _slots(module):
        if holder.__dict__.get(attr) is not record.replacement:
            continue
        if holder is module and attr == record.attr and record.original is _ABSENT:
            del module.__dict__[attr]
        else:
            setattr(holder, attr, record.fallback)
        return True
    return False


def unpatch(obj):
    """Undo :func:`patch` on ``obj``: the original processors back, and each replaced ``forward``
    removed (so the class's method is used again) or set back to the instance attribute it replaced.
    Returns ``obj``. A module whose replacement was itself wrapped or replaced since is left as it is,
    with a warning."""
    stuck: Counter = Counter()
    for root in _roots(obj):
        for module in root.modules():
            records = module.__dict__.pop(_RECORDS, None)
            for record in (records or {}).values():
                if not _restore(module, record):
                    stuck[f"{type(module).__name__}.{record.attr}"] += 1
    if stuck:
        warnings.warn("i2v_kernels.unpatch: replaced since patch() and left as is: "
                      + ", ".join(f"{n} x {what}" for what, n in sorted(stuck.items())), UserWarning, stacklevel=2)
    getattr(obj, "__dict__", {}).pop(SUMMARY_ATTR, None)
    return obj
