"""diffusers integration: ``patch()`` composed with diffusers' own model APIs -- cache hooks
(``enable_cache``), ``set_attention_backend``, ``torch.compile`` / ``compile_repeated_blocks``,
``fuse_qkv_projections``, layerwise casting, group offloading, ``save_pretrained`` -- on the tiny models
of ``test_diffusers.py`` and ``test_diffusers_svd.py``, CPU, fp32. Each composition gives the output of
the same composition without ``patch()``, and the op spy shows ours still running (or the documented
fallback)."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402

import diffusers  # noqa: E402
from i2v_kernels.integrations.diffusers import core, patching  # noqa: E402
from i2v_kernels.integrations.diffusers import patch, patch_summary, unpatch  # noqa: E402
from test_diffusers import (  # noqa: E402
    FP32_TOL, TRANSFORMERS, VAES, OpCounter, ltx_model, needs_diffusers, patched_forwards, patched_processors,
    run_counted)
from test_diffusers_svd import svd_unet, svd_vae  # noqa: E402


def denoise(model, run, steps: int = 4):
    """Denoising-like calls: the latents drift from step to step (so caches have something to skip or
    reuse), each call inside the ``cache_context`` diffusers' cache hooks require."""
    outs = []
    for i in range(steps):
        handle = model.register_forward_pre_hook(lambda m, args, i=i: (args[0] * (1 - 0.05 * i), *args[1:]))
        try:
            with torch.no_grad(), model.cache_context("cond"):
                outs.append(run(model))
        finally:
            handle.remove()
    return outs


def replacements(model) -> list:
    """The patched forwards and processors now recorded on ``model``'s modules."""
    return [r.replacement for m in model.modules() for r in m.__dict__.get(core._RECORDS, {}).values()]


def assert_unpatched(model, replaced) -> None:
    """None of ``replaced`` (from :func:`replacements` before ``unpatch``) is left anywhere, hook chains
    included."""
    assert replaced
    for m in model.modules():
        assert core._RECORDS not in m.__dict__
        assert not isinstance(getattr(m, "processor", None), core._Processor)
        for holder, attr in patching._slots(m):
            assert not any(holder.__dict__.get(attr) is r for r in replaced), (type(m).__name__, attr)


def assert_all_close(outs, refs):
    assert len(outs) == len(refs)
    for a, b in zip(outs, refs):
        torch.testing.assert_close(a, b, **FP32_TOL)


# ==================================================================================================
# Cache hooks: FirstBlockCache, PyramidAttentionBroadcast


def cache_config(kind: str):
    if kind == "first-block":
        return diffusers.FirstBlockCacheConfig(threshold=0.2)
    # attention recomputed every other step, reused in between
    return diffusers.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, temporal_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(-1, 1001), temporal_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: 500)


@pytest.mark.parametrize("order", ["patch-then-cache", "cache-then-patch"])
@pytest.mark.parametrize("kind", ["first-block", "pyramid-attention"])
@pytest.mark.parametrize("name", ["cogvideox", "wan-t2v", "ltx", "latte"])
def test_cache_hooks(name, kind, order):
    if name == "latte" and kind == "first-block":
        pytest.skip("diffusers' FirstBlockCache does not run Latte (its spatial/temporal blocks take different "
                    "batch layouts; unpatched Latte fails too)")
    needs_diffusers("0.35", "FirstBlockCache")
    build, attention_calls = TRANSFORMERS[name]
    model, run = build()
    plain = copy.deepcopy(model)
    uncached = denoise(plain, run)
    plain.enable_cache(cache_config(kind))
    ref = denoise(plain, run)
    assert any(not torch.allclose(a, b, **FP32_TOL) for a, b in zip(ref, uncached)), "the cache changed nothing"

    if order == "patch-then-cache":
        patch(model)
    model.enable_cache(cache_config(kind))
    if order == "cache-then-patch":
        patch(model)
        assert not patch_summary(model).kept, patch_summary(model)
    with OpCounter() as counter:
        out = denoise(model, run)
    assert_all_close(out, ref)
    # every replaced family runs; Latte's [B, T, S, C] forward yields to the hooks on its blocks
    assert counter.calls["attention"] > 0 and counter.calls["gated_residual"] > 0, dict(counter.calls)
    if name == "latte":
        assert "spatial_attention" not in counter.calls

    replaced = replacements(model)
    unpatch(model)
    assert_unpatched(model, replaced)
    model.disable_cache()
    with torch.no_grad():
        assert torch.equal(run(model), uncached[0])
    for m in model.modules():  # hooks removed: diffusers leaves the class's own forward bound per instance
        assert m.forward.__func__ is type(m).forward


def test_patch_between_cache_hooks_and_unpatch_before_removing_them():
    """unpatch while the hooks stay: the hooks then run diffusers' code; removing them afterwards
    leaves no trace of the patch."""
    needs_diffusers("0.35", "FirstBlockCache")
    model, run = TRANSFORMERS["wan-t2v"][0]()
    plain = copy.deepcopy(model)
    plain.enable_cache(cache_config("first-block"))
    ref = denoise(plain, run)
    model.enable_cache(cache_config("first-block"))
    patch(model)
    assert patched_forwards(model)["WanTransformerBlock"] == 2
    replaced = replacements(model)
    unpatch(model)
    assert_unpatched(model, replaced)
    with OpCounter() as counter:
        out = denoise(model, run)
    assert not counter.calls
    assert_all_close(out, ref)


# ==================================================================================================
# set_attention_backend: an explicit diffusers backend is honoured; reset brings ours back


@pytest.fixture
def active_attention_backend():
    """set_attention_backend also changes diffusers' process-wide active backend: put it back."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    saved = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry._active_backend = saved


@pytest.mark.parametrize("backend", ["native", "_native_math"])
@pytest.mark.parametrize("name", ["wan-t2v", "ltx"])
def test_set_attention_backend_runs_diffusers_backend(active_attention_backend, name, backend):
    """Wan's and LTX's processors dispatch through diffusers' attention backends: asking for one makes
    ours defer to diffusers' processor (the adaLN blocks stay ours); reset_attention_backend() brings
    our attention back."""
    needs_diffusers("0.35", "set_attention_backend on Wan and LTX")
    build, attention_calls = TRANSFORMERS[name]
    model, run = build()
    plain = copy.deepcopy(model)
    plain.set_attention_backend(backend)
    with torch.no_grad():
        ref = run(plain)
    patch(model)
    model.set_attention_backend(backend)
    processors = [m.processor for m in model.modules() if isinstance(getattr(m, "processor", None),
                                                                     core._Processor)]
    assert processors and all(p._attention_backend == backend for p in processors)
    with torch.no_grad(), OpCounter() as counter:
        out = run(model)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    assert not set(attention_calls) & set(counter.calls) and counter.calls["gated_residual"] > 0, dict(counter.calls)

    model.reset_attention_backend()
    with torch.no_grad(), OpCounter() as counter:
        out = run(model)
    assert all(counter.calls[op] == n for op, n in attention_calls.items()), dict(counter.calls)
    torch.testing.assert_close(out, ref, **FP32_TOL)


def test_set_attention_backend_without_backend_slot(active_attention_backend):
    """CogVideoX's processors call SDPA directly and have no backend slot, so diffusers leaves them as
    they are; the patched ones are left alike (no slot appears) and ours keeps running."""
    model, run = TRANSFORMERS["cogvideox"][0]()
    with torch.no_grad():
        ref = run(model)
    patch(model)
    model.set_attention_backend("native")
    for m in model.modules():
        if isinstance(getattr(m, "processor", None), core._Processor):
            assert not hasattr(m.processor, "_attention_backend") and not hasattr(m.processor.original,
                                                                                 "_attention_backend")
    with torch.no_grad(), OpCounter() as counter:
        out = run(model)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    assert counter.calls["attention"] == 2


# ==================================================================================================
# fuse_qkv_projections / unfuse_qkv_projections after patch()


def test_fuse_and_unfuse_qkv_keep_the_patch():
    model, run = TRANSFORMERS["cogvideox"][0]()
    plain = copy.deepcopy(model)
    with torch.no_grad():
        ref = run(plain)
    plain.fuse_qkv_projections()
    plain.unfuse_qkv_projections()
    patch(model)
    summary = patch_summary(model)
    model.fuse_qkv_projections()
    assert patched_processors(model) == {"I2VCogVideoXAttnProcessor": 2}
    assert all(type(p.original).__name__ == "FusedCogVideoXAttnProcessor2_0" for p in
               (m.processor for m in model.modules() if isinstance(getattr(m, "processor", None),
                                                                    core._Processor)))
    with torch.no_grad(), OpCounter() as counter:
        out = run(model)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    assert counter.calls["attention"] == 2

    # diffusers puts back the processors saved by fuse (ours), which read to_q/to_k/to_v as diffusers'
    # own unfused processor does (fuse keeps them next to to_qkv)
    model.unfuse_qkv_projections()
    assert patched_processors(model) == {"I2VCogVideoXAttnProcessor": 2}
    with torch.no_grad(), OpCounter() as counter:
        torch.testing.assert_close(run(model), ref, **FP32_TOL)
    assert counter.calls["attention"] == 2
    assert patch_summary(model) == summary  # the method wrappers are not kernels: not in the summary

    replaced = replacements(model)
    unpatch(model)
    assert_unpatched(model, replaced)
    assert "fuse_qkv_projections" not in model.__dict__ and "unfuse_qkv_projections" not in model.__dict__
    assert {k: type(p) for k, p in model.attn_processors.items()} == \
        {k: type(p) for k, p in plain.attn_processors.items()}
    assert not any(isinstance(p, core._Processor) for p in model.original_attn_processors.values())
    with torch.no_grad():
        torch.testing.assert_close(run(model), ref, **FP32_TOL)


# ==================================================================================================
# torch.compile: whole patched models and compile_repeated_blocks trace without graph breaks


class GraphOps:
    """A torch.compile backend that records the ops of every graph it gets and runs them eagerly."""

    def __init__(self):
        self.ops: set = set()
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        self.ops |= {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        return gm.forward

    def ours(self) -> set:
        return {op.split(".")[1] for op in self.ops if op.startswith("i2v_kernels.")}


# LTX without a prompt mask: under torch.compile a masked cross-attention takes diffusers' processor
# (turning a mask into kv_lens reads its values, which would break the graph)
COMPILE_MODELS = {"cogvideox": TRANSFORMERS["cogvideox"], "wan-t2v": TRANSFORMERS["wan-t2v"],
                  "ltx-no-mask": (lambda: ltx_model(mask="none"), TRANSFORMERS["ltx"][1])}


@pytest.mark.parametrize("name", list(COMPILE_MODELS))
def test_compile_whole_patched_model_fullgraph(name):
    build, attention_calls = COMPILE_MODELS[name]
    model, run = build()
    with torch.no_grad():
        ref = run(model)
    patch(model)
    backend = GraphOps()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    try:
        with torch.no_grad():
            out = run(compiled)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out, ref, **FP32_TOL)
    assert backend.graphs == 1
    assert set(attention_calls) <= backend.ours(), backend.ours()


@pytest.mark.parametrize("name", ["wan-t2v", "ltx-no-mask"])
def test_compile_repeated_blocks_of_patched_model(name):
    """diffusers' regional compilation compiles each block module; the patched forward is what it traces,
    whole (fullgraph=True) and with our ops in the graph."""
    needs_diffusers("0.35", "compile_repeated_blocks")
    build, _ = COMPILE_MODELS[name]
    model, run = build()
    with torch.no_grad():
        ref = run(model)
    patch(model)
    backend = GraphOps()
    model.compile_repeated_blocks(fullgraph=True, backend=backend)
    try:
        with torch.no_grad():
            out = run(model)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out, ref, **FP32_TOL)
    assert backend.graphs >= 1 and {"attention", "gated_residual", "rms_norm"} <= backend.ours(), backend.ours()


# ==================================================================================================
# Group offloading (onload and offload on the CPU: the hooks run, nothing moves)


@pytest.fixture
def group_offloading(monkeypatch):
    """diffusers' group offloading moves inputs with accelerate's ``send_to_device``; accelerate is no
    dependency of ours, so without it an equivalent (tensors in nested containers to the device) stands in."""
    needs_diffusers("0.33", "enable_group_offload")
    from diffusers.hooks import group_offloading as offloading

    try:
        import accelerate  # noqa: F401
    except ImportError:
        def send_to_device(obj, device, non_blocking=False):
            return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.to(device, non_blocking=non_blocking),
                                                     obj)

        monkeypatch.setattr(offloading, "send_to_device", send_to_device, raising=False)
    cpu = torch.device("cpu")
    return {"block_level": dict(onload_device=cpu, offload_device=cpu, offload_type="block_level",
                                num_blocks_per_group=1),
            "leaf_level": dict(onload_device=cpu, offload_device=cpu, offload_type="leaf_level")}


@pytest.mark.parametrize("order", ["patch-then-offload", "offload-then-patch"])
@pytest.mark.parametrize("offload", ["block_level", "leaf_level"])
def test_group_offloading(group_offloading, offload, order):
    """Block-level offloading hooks whole blocks, which onload everything a replaced block reads: ours
    runs under them. Leaf-level offloading hooks the norms and linears ours would read directly: the
    modules holding them keep diffusers' code -- left alone by patch() after it, put back by
    enable_group_offload() after patch() -- and the summary says so."""
    model, run = TRANSFORMERS["cogvideox"][0]()
    with torch.no_grad():
        ref = run(model)
    if order == "patch-then-offload":
        patch(model)
    model.enable_group_offload(**group_offloading[offload])
    if order == "offload-then-patch":
        patch(model)
    with torch.no_grad(), OpCounter() as counter:
        out = run(model)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    summary = patch_summary(model)
    if offload == "block_level":
        assert counter.calls["attention"] == 2 and counter.calls["gated_residual_adaln"] == 4, dict(counter.calls)
        assert not summary.kept and patched_forwards(model) == {"CogVideoXBlock": 2}
    else:
        assert not counter.calls and not patched_forwards(model) and not patched_processors(model)
        assert summary.kept == {f"Attention: {patching._HOOKED}": 2, f"CogVideoXBlock: {patching._HOOKED}": 2}
        assert not summary.replaced

    unpatch(model)
    assert all(core._RECORDS not in m.__dict__ for m in model.modules())
    assert not any(isinstance(getattr(m, "processor", None), core._Processor) for m in model.modules())
    with torch.no_grad(), OpCounter() as counter:
        torch.testing.assert_close(run(model), ref, **FP32_TOL)
    assert not counter.calls


def test_vae_group_offloading_leaf_level(group_offloading):
    """Wan's causal conv is itself the leaf that leaf-level offloading hooks: ours goes below its hook
    (which onloads the conv's own weight), before or after patch()."""
    z = torch.randn(1, 4, 3, 6, 6)
    for order in ("patch-then-offload", "offload-then-patch"):
        vae = VAES["wan"][0]()
        with torch.no_grad():
            ref = vae.decode(z).sample
        if order == "patch-then-offload":
            patch(vae)
        vae.enable_group_offload(**group_offloading["leaf_level"])
        if order == "offload-then-patch":
            patch(vae)
        with torch.no_grad(), OpCounter() as counter:
            out = vae.decode(z).sample
        torch.testing.assert_close(out, ref, **FP32_TOL)
        assert counter.calls["causal_conv3d"] > 0 and not patch_summary(vae).kept, order


# ==================================================================================================
# Layerwise casting (weights stored in fp8/fp16, cast per layer to the compute dtype)


def _vae(name):
    z = torch.randn(1, 4, 3, 6, 6)
    return VAES[name][0](), lambda v: v.decode(z).sample


def _svd_vae():
    z = torch.randn(6, 4, 4, 4)
    return svd_vae(), lambda v: v.decode(z, num_frames=3).sample


CASTING_MODELS = {
    **{name: TRANSFORMERS[name][0] for name in ("latte", "cogvideox", "wan-t2v", "ltx")},
    **{f"vae-{name}": (lambda name=name: _vae(name)) for name in ("cogvideox", "wan", "ltx")},
    "svd-unet": svd_unet, "svd-vae": _svd_vae,
}


# fp8 storage, both orders; the SVD UNet (the slowest here) after patch only; fp16 storage on one VAE
CASTING_CASES = [(name, torch.float8_e4m3fn, order) for name in CASTING_MODELS
                 for order in ("cast-then-patch", "patch-then-cast")
                 if (name, order) != ("svd-unet", "cast-then-patch")]
CASTING_CASES += [("vae-cogvideox", torch.float16, order) for order in ("cast-then-patch", "patch-then-cast")]


@pytest.mark.parametrize("name, storage, order", CASTING_CASES, ids=str)
def test_layerwise_casting_keeps_ours(name, storage, order):
    """``enable_layerwise_casting`` before or after patch(): the output of the unpatched model with the
    same casting, and every op call of the patched model without casting still made (the weights ours
    reads are cast as diffusers' hook casts them: Linear layers through their own hooks, the VAE
    convolutions by ours)."""
    needs_diffusers("0.33", "enable_layerwise_casting")
    model, run = CASTING_MODELS[name]()
    plain, uncast = copy.deepcopy(model), copy.deepcopy(model)
    patch(uncast)
    _, expected = run_counted(run, uncast)
    plain.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)
    with torch.no_grad():
        ref = run(plain)
    if order == "patch-then-cast":
        patch(model)
    model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)
    if order == "cast-then-patch":
        patch(model)
    assert patch_summary(model) == patch_summary(uncast)
    assert any(p.dtype == storage for p in model.parameters())
    out, calls = run_counted(run, model)
    assert calls == expected and sum(calls.values()) > 0, (dict(calls), dict(expected))
    torch.testing.assert_close(out, ref, **FP32_TOL)


# ==================================================================================================
# save_pretrained / state dicts


@pytest.mark.parametrize("name", ["cogvideox", "wan-vae"])
def test_state_dict_and_save_pretrained_unchanged(name, tmp_path):
    """patch() adds no parameter or buffer and renames none: the state dict, the saved files and a model
    loaded back are those of the unpatched model."""
    if name == "wan-vae":
        model = VAES["wan"][0]()
        z = torch.randn(1, 4, 3, 6, 6)

        def run(m):
            return m.decode(z).sample
    else:
        model, run = TRANSFORMERS[name][0]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "plain")
    patch(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    model.save_pretrained(tmp_path / "patched")
    for f in sorted(p.name for p in (tmp_path / "plain").iterdir()):
        assert (tmp_path / "patched" / f).read_bytes() == (tmp_path / "plain" / f).read_bytes(), f
    loaded = type(model).from_pretrained(tmp_path / "patched").eval()
    assert patch_summary(loaded) is None and not replacements(loaded)
    with torch.no_grad():
        torch.testing.assert_close(run(loaded), run(model), **FP32_TOL)
