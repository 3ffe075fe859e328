"""Applying and undoing the replacements: where a module's real forward lives under diffusers' and
accelerate's hooks, the records :func:`unpatch` restores from, the model methods kept consistent with
the patch (fuse/unfuse QKV, offloading), and the public :func:`patch` / :func:`unpatch`."""

from __future__ import annotations

import types
import warnings
from collections import Counter
from typing import Any, Iterable, Iterator

from torch import nn

from i2v_kernels.integrations.diffusers.core import (
    _ABSENT, _COMPONENTS, _PROCESSORS, _RECORDS, KNOWN_MODELS, OPS, SUMMARY_ATTR, PatchSummary, _measured_forward,
    _Processor, _processor_spec, _Spec, _unwrapped, patch_summary)


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


# diffusers hooks that move a module's weights inside its own call (group offloading and its lazy
# prefetch): a replacement that reads those weights without calling the module would see them offloaded.
# Cache hooks (FirstBlockCache, PyramidAttentionBroadcast, FasterCache, TaylorSeer ...) sit on blocks and
# attention modules, which the replacements call. Layerwise casting is not in the way: it casts only
# Linear, Conv and Embedding layers, which the replacements call as modules (so its hook runs), except
# the VAE convolutions, which cast the stored weight to the compute dtype themselves as its hook does
# (vae._conv_params); the norms and tables they read directly are never cast.
_WEIGHT_HOOKS = ("group_offloading", "lazy_prefetch_group_offloading")


def _hooks_in_the_way(module: nn.Module, kind: str) -> bool:
    """Offload hooks on submodules the replacement would bypass: ours read submodules' weights directly
    (norms, tables), which accelerate's sequential / diffusers' group offloading only bring to the device
    inside those submodules' own calls. Hooks on the module itself are fine: the replacement goes below
    them (see :func:`_forward_slot`)."""
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
_HOOKED = "diffusers/accelerate offloading hooks on its submodules"


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
    """After offloading was enabled on a patched model: the replacements whose submodules now carry
    weight-moving hooks go back to diffusers' code, as :func:`patch` leaves them when those hooks come
    first (the summary of ``model`` says so)."""
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
# new ones are replaced too; offloading adds the hooks ours cannot read weights under.
_WRAPPED_METHODS = {
    "fuse_qkv_projections": _repatch_processors,
    "unfuse_qkv_projections": _repatch_processors,
    "enable_group_offload": _yield_to_weight_hooks,
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
    - ``enable_layerwise_casting`` (fp8/fp16 storage), before or after ``patch``: ours keeps running, on
      weights cast to the compute dtype as diffusers' hook casts them.
    - ``enable_group_offload``: block-level keeps ours running; leaf-level (and sequential CPU offload)
      puts diffusers' code back in the modules whose submodules it hooks, whichever comes first (listed
      in the summary's ``kept``).
    - ``state_dict`` / ``save_pretrained`` are unchanged; ``unpatch`` works with hooks added or removed
      since ``patch``.
    - ``enable_parallelism(ContextParallelConfig(ulysses_degree=N))`` (Wan, LTX; before or after ``patch``):
      the attention processors hand every call to diffusers' sharded attention, the fused blocks stay ours;
      same output as the unpatched model (tested with two gloo processes).
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
