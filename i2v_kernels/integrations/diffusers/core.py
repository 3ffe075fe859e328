"""Shared machinery of the diffusers integration: the patch summary, helpers the replacements share
(masks to ``kv_lens``, QK-norm arguments, fused adaLN calls), the measured per-module dispatch
(:func:`_measured_call`: ours or diffusers' own code, whichever measured faster), the attention-processor
base class, and the registry the per-family files fill (:func:`register`)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from i2v_kernels import _backend, _dispatch
from i2v_kernels.ops.adaln import adaln_modulate, gated_residual_adaln, rms_norm

OPS = ("attention", "adaln", "conv3d")
SUMMARY_ATTR = "_i2v_kernels_patch_summary"
_RECORDS = "_i2v_kernels_patches"  # per module: {"forward" | "processor": _Record}
_MEMO = "_i2v_kernels_memo"
_CHOICE = "_i2v_kernels_choice"  # per module: {label: {call signature: ours?}}, see _measured_call
_ABSENT = object()

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
_MEMO_SIGNATURES = 8  # call signatures remembered per patched module and label

# On CPUs a module's code measured faster on its own can be slower inside the model (measured: a
# patched CogVideoX VAE conv, 290 against 295 us alone, 550 against 350 us between the decoder's other
# layers -- caches and oneDNN's reorders see a different machine state there). So where ours won the
# isolated measurement, the next real calls of that key take turns between ours and diffusers' code,
# each timed where it runs, and ours is kept only if it still wins by PREFER_MARGIN. The turns compute
# the same thing (to rounding), so they cost nothing but the slower half of them.
IN_CONTEXT_CALLS = 6  # real calls per candidate
_trials: dict[str, dict] = {}  # key -> {OURS: [ms, ...], DIFFUSERS: [...], "generation": _dispatch._generation}


def _in_context(key: str, device: torch.device) -> bool:
    """Whether ``key``'s decision for ours is still to be checked in real calls (CPUs only: a GPU call
    returns before its kernels ran)."""
    if device.type != "cpu" or IN_CONTEXT_CALLS <= 0:
        return False
    rec = _dispatch.decision(key)
    return rec is not None and rec["backend"] == OURS and "in_context_ms" not in rec


def _timed(name: str, fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), its wall time in ms)``: one real call of candidate ``name`` (tests replace this)."""
    import time

    start = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - start) * 1e3


def _trial_call(key: str, ours: Callable[[], Any], theirs: Callable[[], Any]):
    """One real call of a key under check: the candidate with fewer timed calls runs, timed."""
    import statistics

    trial = _trials.get(key)
    if trial is None or trial["generation"] != _dispatch._generation:  # none yet, or from forgotten decisions
        trial = _trials[key] = {OURS: [], DIFFUSERS: [], "generation": _dispatch._generation}
    name = OURS if len(trial[OURS]) <= len(trial[DIFFUSERS]) else DIFFUSERS
    out, ms = _timed(name, ours if name == OURS else theirs)
    trial[name].append(ms)
    if min(len(trial[OURS]), len(trial[DIFFUSERS])) >= IN_CONTEXT_CALLS:
        medians = {b: statistics.median(trial[b]) for b in (OURS, DIFFUSERS)}
        _dispatch.revise(key, _dispatch.fastest(medians, DIFFUSERS), medians)
        _trials.pop(key, None)
    return out


def _memo_hit(label: str, module: nn.Module, args: tuple, kwargs: dict) -> Optional[bool]:
    """The memoized decision of this call (True: ours), or None when there is none or the call must go
    through :func:`_measured_call` (compiling, training, a forced backend)."""
    memo = module.__dict__.get(_CHOICE)
    if memo is None:
        return None
    seen = memo.get(label)
    if seen is None or module.training or _compiling() or _backend.requested_backend() != "auto":
        return None
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)]
    return seen.get(_call_signature(tensors)) if tensors else None


def _call_signature(tensors: list) -> tuple:
    """A call's memo key: device and dtype of the first tensor argument, every tensor's shape, and the
    dispatch generation (a forgotten decision invalidates the memo)."""
    first = tensors[0]
    return (first.device, first.dtype, _dispatch._generation, *(t.shape for t in tensors))


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
    # The decision is memoized on the module per call signature (read by the callers through _memo_hit
    # before they build their closures): a toy-sized model calls a dozen patched modules per forward, and
    # the key lookup cost ~3% of it. A few signatures per module, not one: CogVideoX's decoder calls each
    # conv with alternating frame counts (first chunk, then the rest), and a one-entry memo missed on
    # every call.
    features = tuple(tuple(t.shape) for t in tensors)
    op = f"diffusers:{label}"
    key = _dispatch.make_key(op, first.device, first.dtype, features)
    choice = _dispatch.choose(op, key, first.device, (OURS, DIFFUSERS), lambda b: ours() if b == OURS else theirs(),
                              lambda: OURS, prefer=DIFFUSERS)  # a measured tie keeps diffusers' own code
    if choice == OURS and _in_context(key, first.device) and _dispatch.measuring_forbidden(first.device) is None:
        return _trial_call(key, ours, theirs)  # no memo until the check is done
    if _dispatch.settled(key):
        seen = module.__dict__.setdefault(_CHOICE, {}).setdefault(label, {})
        if len(seen) >= _MEMO_SIGNATURES:
            seen.pop(next(iter(seen)))  # oldest first
        seen[_call_signature(tensors)] = choice == OURS
    return ours() if choice == OURS else theirs()


def _measured_forward(label: str, ours: Callable) -> Callable:
    """A replacement ``forward`` that runs through :func:`_measured_call` against the original."""

    def forward(self, *args, **kwargs):
        hit = _memo_hit(label, self, args, kwargs)  # the common case, without building the closures
        if hit is not None:
            return ours(self, *args, **kwargs) if hit else self.__dict__[_RECORDS]["forward"].fallback(*args, **kwargs)
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

    @staticmethod
    def why_not(attn) -> Optional[str]:
        """Why calls on ``attn`` could never take ours (then its processor stays diffusers'), else None."""
        return None

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
            label = type(self).__name__
            hit = _memo_hit(label, attn, args, kw)  # the common case, without building the closures
            if hit is not None:
                return self.compute(attn, *args, **kw) if hit else self.original(attn, *args, **kw)
            return _measured_call(label, attn, args, kw, lambda: self.compute(attn, *args, **kw),
                                  lambda: self.original(attn, *args, **kw))

        __call__.__signature__ = inspect.signature(cls.compute)
        cls.__call__ = __call__


def _unwrapped(processor):
    return processor.original if isinstance(processor, _Processor) else processor


def _attention_extras(attn) -> Optional[str]:
    """What a diffusers ``Attention`` adds around the attention itself that our processors do not
    compute (a VAE's attention has them), else None."""
    if (getattr(attn, "spatial_norm", None) is not None or getattr(attn, "group_norm", None) is not None
            or getattr(attn, "residual_connection", False) or getattr(attn, "rescale_output_factor", 1.0) != 1.0):
        return "group/spatial norm, residual connection or output rescale"
    return None


def _plain_attention(attn) -> bool:
    """A diffusers ``Attention`` whose AttnProcessor(2_0) math our ops reproduce: no group/spatial norm,
    no residual or output rescale, q and k/v of one width, unfused projections."""
    return (_attention_extras(attn) is None and getattr(attn, "inner_kv_dim", None) == getattr(attn, "inner_dim", None)
            and not getattr(attn, "fused_projections", False))


def _sdpa_scale(attn) -> Optional[float]:
    """AttnProcessor2_0 leaves SDPA's default ``D ** -0.5``; the classic AttnProcessor uses ``attn.scale``."""
    return float(attn.scale) if type(_unwrapped(attn.processor)).__name__ == "AttnProcessor" else None


def _pair(rope) -> bool:
    """RoPE given as a ``(cos, sin)`` pair of real tensors (older diffusers passed complex tensors)."""
    return (isinstance(rope, (tuple, list)) and len(rope) == 2
            and all(isinstance(t, Tensor) and t.is_floating_point() for t in rope))


def _diffusers_version() -> tuple[int, ...]:
    """The imported diffusers' ``(major, minor, patch)`` (``()`` when unknown)."""
    import re
    import sys

    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", getattr(sys.modules.get("diffusers"), "__version__", ""))
    return tuple(int(g) for g in match.groups() if g is not None) if match else ()


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
        cls = _PROCESSORS.get(name)
        return f"processor {name} is not one this integration replaces" if cls is None else cls.why_not(attn)

    return _Spec("attention", "processor", "processor -> i2v_kernels attention processor", why_not)


# ==================================================================================================
# The registry: filled by the per-family files (cogvideox, wan, ltx, latte, basic, vae, svd)

# the diffusers models whose subtrees are patched (class names)
KNOWN_MODELS: set[str] = set()
# diffusers class name -> what is replaced on its instances
_COMPONENTS: dict[str, tuple[_Spec, ...]] = {}
# diffusers attention-processor class name -> the processor replacing it
_PROCESSORS: dict[str, type[_Processor]] = {}


def register(*, models: tuple[str, ...] = (), components: Optional[dict[str, tuple[_Spec, ...]]] = None,
             processors: tuple[type[_Processor], ...] = ()) -> None:
    """Add a model family: its model classes, the specs of its module classes, its processors."""
    KNOWN_MODELS.update(models)
    _COMPONENTS.update(components or {})
    _PROCESSORS.update({name: cls for cls in processors for name in cls.replaces})
