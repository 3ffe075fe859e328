"""diffusers integration: ``patch`` / ``unpatch`` on tiny random-config models (no downloads).

Each model runs unpatched, patched (same inputs, fp32, tight tolerance) and unpatched again; a
dispatch-mode spy counts the ``torch.ops.i2v_kernels`` calls, so a replacement that silently fell back
to the original code fails. Triton runs through the interpreter on the smallest configs.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections import Counter

import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import i2v_kernels  # noqa: E402
from i2v_kernels.integrations.diffusers import core, wan  # noqa: E402
from i2v_kernels.integrations.diffusers import PatchSummary, patch, patch_summary, unpatch  # noqa: E402

import diffusers  # noqa: E402
from diffusers.models.embeddings import get_3d_rotary_pos_embed  # noqa: E402
from packaging.version import Version  # noqa: E402

FP32_TOL = dict(atol=1e-5, rtol=1e-5)
DIFFUSERS = Version(diffusers.__version__)


# ==================================================================================================
# Helpers


class OpCounter(TorchDispatchMode):
    """Counts the i2v_kernels ops dispatched inside the block (by name, e.g. ``"attention"``)."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "i2v_kernels":
            self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def run_counted(run, model):
    with torch.no_grad(), OpCounter() as counter:
        out = run(model)
    return out, counter.calls


def snapshot(model: nn.Module):
    """What patch may change: per module, the instance-level forward and the processor object."""
    return {name: (m.__dict__.get("forward"), getattr(m, "processor", None)) for name, m in model.named_modules()}


def assert_restored(model: nn.Module, before) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, (forward, processor) in before.items():
        assert after[name][0] is forward, f"{name}: forward not restored"
        assert after[name][1] is processor, f"{name}: processor not restored"
    for m in model.modules():
        assert core._RECORDS not in m.__dict__
        if "forward" not in m.__dict__:
            assert m.forward.__func__ is type(m).forward
    assert patch_summary(model) is None


def patched_forwards(model: nn.Module) -> Counter:
    return Counter(type(m).__name__ for m in model.modules()
                   if "forward" in m.__dict__.get(core._RECORDS, {}))


def patched_processors(model: nn.Module) -> Counter:
    return Counter(type(m.processor).__name__ for m in model.modules()
                   if isinstance(getattr(m, "processor", None), core._Processor))


# ==================================================================================================
# Tiny models: (model, run) with run(model) -> output tensor; inputs drawn once, reused every call
#
# The configs are built against the installed diffusers (0.33 ... newest): a constructor argument the
# installed class lacks is dropped when it only tunes something else (``optional``), otherwise the
# test is skipped, naming the version -- it never fails for a missing argument.


def build(cls, optional=(), **kwargs):
    """``cls(**kwargs)`` with the arguments the installed ``cls.__init__`` accepts."""
    accepted = inspect.signature(cls.__init__).parameters
    missing = [k for k in kwargs if k not in accepted]
    needed = [k for k in missing if k not in optional]
    if needed:
        pytest.skip(f"{cls.__name__} in diffusers {diffusers.__version__} has no {', '.join(needed)}")
    return cls(**{k: v for k, v in kwargs.items() if k not in missing})


def needs_diffusers(version: str, what: str) -> None:
    if DIFFUSERS < Version(version):
        pytest.skip(f"{what} needs diffusers >= {version} (installed: {diffusers.__version__})")


def latte_model(dtype=torch.float32):
    model = build(
        diffusers.LatteTransformer3DModel,
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=8, patch_size=2, norm_type="ada_norm_single", caption_channels=32,
        video_length=3, norm_elementwise_affine=False, norm_eps=1e-6, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000).eval().to(dtype)
    x = torch.randn(2, 4, 3, 8, 8).to(dtype)
    context = torch.randn(2, 5, 32).to(dtype)
    t = torch.tensor([10, 500])
    return model, lambda m, **kw: m(x, timestep=t, encoder_hidden_states=context, **kw).sample


def cogvideox_model(dtype=torch.float32, rope=True, heads=2, head_dim=16, layers=2, frames=3, size=8, text=6):
    model = build(
        diffusers.CogVideoXTransformer3DModel,
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=layers, sample_width=size, sample_height=size, sample_frames=4 * (frames - 1) + 1,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=text,
        use_rotary_positional_embeddings=rope).eval().to(dtype)
    x = torch.randn(2, frames, 4, size, size).to(dtype)
    context = torch.randn(2, text, 16).to(dtype)
    t = torch.tensor([10, 500])
    grid = size // 2
    freqs = get_3d_rotary_pos_embed(head_dim, ((0, 0), (grid, grid)), (grid, grid), frames) if rope else None
    return model, lambda m: m(x, encoder_hidden_states=context, timestep=t, image_rotary_emb=freqs).sample


def wan_model(dtype=torch.float32, image=False, per_token_timestep=False, heads=2, head_dim=12, layers=2, size=8):
    if per_token_timestep:
        needs_diffusers("0.35", "Wan 2.2 TI2V (per-token timesteps)")
    model = build(
        diffusers.WanTransformer3DModel,
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=layers, cross_attn_norm=True, rope_max_seq_len=32,
        image_dim=16 if image else None, added_kv_proj_dim=heads * head_dim if image else None).eval().to(dtype)
    x = torch.randn(2, 4, 3, size, size).to(dtype)
    # I2V: Wan splits the context as [image tokens, 512 text tokens] (diffusers 0.33: the first 257
    # tokens are the image's, so here 257 of the 512 "text" tokens; both sides compute the same split)
    context = torch.randn(2, 512 if image else 10, 16).to(dtype)
    image_context = torch.randn(2, 7, 16).to(dtype) if image else None
    t = torch.randint(0, 1000, (2, 3 * (size // 2) ** 2)) if per_token_timestep else torch.tensor([10, 500])
    return model, lambda m: m(x, timestep=t, encoder_hidden_states=context,
                              encoder_hidden_states_image=image_context).sample


def ltx_model(dtype=torch.float32, mask="prefix", heads=2, head_dim=8, layers=2):
    model = build(
        diffusers.LTXVideoTransformer3DModel,
        in_channels=8, out_channels=8, num_attention_heads=heads, attention_head_dim=head_dim,
        cross_attention_dim=heads * head_dim, num_layers=layers, caption_channels=16).eval().to(dtype)
    x = torch.randn(2, 3 * 4 * 4, 8).to(dtype)
    context = torch.randn(2, 6, 16).to(dtype)
    masks = {"prefix": [[1] * 6, [1] * 4 + [0] * 2], "hole": [[1, 0, 1, 1, 1, 1]] * 2, "none": None}
    m_ = None if masks[mask] is None else torch.tensor(masks[mask])
    t = torch.tensor([10, 500])
    return model, lambda m: m(x, context, t, m_, num_frames=3, height=4, width=4).sample


TRANSFORMERS = {
    # name: (builder, the attention-family calls one forward must make: one per attention layer)
    "latte": (latte_model, {"spatial_attention": 2, "temporal_attention": 2, "attention": 2}),
    "cogvideox": (cogvideox_model, {"attention": 2}),
    "cogvideox-no-rope": (lambda: cogvideox_model(rope=False), {"attention": 2}),
    "wan-t2v": (wan_model, {"attention": 4}),
    "wan-i2v": (lambda: wan_model(image=True), {"attention": 6}),
    "wan-ti2v": (lambda: wan_model(per_token_timestep=True), {"attention": 4}),
    "ltx": (ltx_model, {"spatial_attention": 2, "attention": 2}),
}
ADALN_OPS = {
    "latte": {"adaln_modulate", "gated_residual", "gated_residual_adaln"},
    "cogvideox": {"adaln_modulate", "gated_residual", "gated_residual_adaln"},
    "wan": {"adaln_modulate", "gated_residual", "gated_residual_adaln", "rms_norm"},
    "ltx": {"gated_residual", "rms_norm"},
}


def cogvideox_vae():
    return build(
        diffusers.AutoencoderKLCogVideoX,
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 2,
        up_block_types=("CogVideoXUpBlock3D",) * 2, block_out_channels=(8, 16), latent_channels=4, layers_per_block=1,
        norm_num_groups=4, temporal_compression_ratio=4, sample_height=16, sample_width=16).eval()


def wan_vae():
    # scale_factor_spatial (diffusers >= 0.35) only sizes the tiles (0.33 has no Wan tiling at all)
    return build(diffusers.AutoencoderKLWan, optional=("scale_factor_spatial",), base_dim=8, z_dim=4,
                 dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
                 scale_factor_spatial=4).eval()


def ltx_vae(decoder_causal=False):
    return build(
        diffusers.AutoencoderKLLTXVideo,
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1), spatio_temporal_scaling=(True, False),
        decoder_spatio_temporal_scaling=(True, False), decoder_inject_noise=(False, False, False),
        downsample_type=("conv", "conv"), upsample_residual=(False, False), upsample_factor=(1, 1), patch_size=1,
        encoder_causal=True, decoder_causal=decoder_causal).eval()


def enable_small_tiles(vae) -> bool:
    """Small tiles (and LTX's frame batches); False when the installed VAE cannot tile (Wan's before
    diffusers 0.35)."""
    if not hasattr(vae, "enable_tiling"):
        return False
    name = type(vae).__name__
    if name == "AutoencoderKLCogVideoX":
        vae.enable_tiling(tile_sample_min_height=8, tile_sample_min_width=8, tile_overlap_factor_height=1 / 4,
                          tile_overlap_factor_width=1 / 4)
    elif name == "AutoencoderKLWan":
        vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16, tile_sample_stride_height=12,
                          tile_sample_stride_width=12)
    else:
        vae.enable_tiling(tile_sample_min_height=8, tile_sample_min_width=8, tile_sample_stride_height=4,
                          tile_sample_stride_width=4, tile_sample_min_num_frames=4, tile_sample_stride_num_frames=2)
        vae.use_framewise_decoding = True
    return True


VAES = {
    "cogvideox": (cogvideox_vae, "CogVideoXCausalConv3d"),
    "wan": (wan_vae, "WanCausalConv3d"),
    "ltx": (ltx_vae, "LTXVideoCausalConv3d"),
    "ltx-causal-decoder": (lambda: ltx_vae(decoder_causal=True), "LTXVideoCausalConv3d"),
}


# ==================================================================================================
# Transformers: parity, spies, unpatch


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_transformer_parity_and_unpatch(name):
    build, attention_calls = TRANSFORMERS[name]
    model, run = build()
    before = snapshot(model)
    with torch.no_grad():
        ref = run(model)
    assert patch(model) is model
    out, calls = run_counted(run, model)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    for op, n in attention_calls.items():
        assert calls[op] == n, f"{op}: {calls[op]} calls, expected {n} (a replacement fell back?) {dict(calls)}"
    assert ADALN_OPS[name.split("-")[0]] <= set(calls), dict(calls)
    summary = patch_summary(model)
    assert isinstance(summary, PatchSummary) and summary.replaced and not summary.unsupported
    assert not summary.kept, summary

    unpatch(model)
    assert_restored(model, before)
    with torch.no_grad():
        assert torch.equal(run(model), ref)


def test_patch_twice_is_harmless():
    model, run = cogvideox_model()
    before = snapshot(model)
    with torch.no_grad():
        ref = run(model)
    patch(model)
    first = snapshot(model)
    summary = patch_summary(model)
    patch(model)
    assert snapshot(model) == first  # nothing wrapped twice
    assert patch_summary(model) == summary
    with torch.no_grad():
        torch.testing.assert_close(run(model), ref, **FP32_TOL)
    unpatch(model)  # one unpatch undoes both
    assert_restored(model, before)


def test_ops_subset():
    model, run = cogvideox_model()
    before = snapshot(model)
    with torch.no_grad():
        ref = run(model)
    patch(model, ops={"adaln"})
    assert patched_forwards(model) == Counter({"CogVideoXBlock": 2}) and not patched_processors(model)
    out, calls = run_counted(run, model)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    assert "attention" not in calls and calls["gated_residual_adaln"] > 0

    patch(model, ops="attention")  # adds the processors, keeps the blocks
    assert patched_processors(model) == Counter({"I2VCogVideoXAttnProcessor": 2})
    assert patched_forwards(model) == Counter({"CogVideoXBlock": 2})
    out, calls = run_counted(run, model)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    assert calls["attention"] == 2

    unpatch(model)
    patch(model, ops=["conv3d"])  # nothing of a transformer is a conv
    assert not patched_forwards(model) and not patched_processors(model)
    unpatch(model)
    assert_restored(model, before)
    with pytest.raises(ValueError, match="ops"):
        patch(model, ops={"attention", "softmax"})


@pytest.mark.parametrize("ops", ["attention", "adaln"])
def test_latte_one_family(ops):
    """Latte's [B, T, S, C] forward without the fused adaLN runs diffusers' own adaLN formulas; the
    fused blocks alone keep the original layout and attention."""
    model, run = latte_model()
    with torch.no_grad():
        ref = run(model)
    patch(model, ops={ops})
    out, calls = run_counted(run, model)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    if ops == "attention":
        assert calls == Counter({"spatial_attention": 2, "temporal_attention": 2, "attention": 2})
    else:
        assert set(calls) == ADALN_OPS["latte"]


def test_cogvideox_fused_qkv_projections():
    model, run = cogvideox_model()
    model.fuse_qkv_projections()
    with torch.no_grad():
        ref = run(model)
    patch(model)
    assert patched_processors(model) == Counter({"I2VCogVideoXAttnProcessor": 2})
    out, calls = run_counted(run, model)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    assert calls["attention"] == 2


def test_latte_original_layout_paths():
    """Temporal attention can be switched off; gradient checkpointing takes the original forward
    (diffusers' layout), whose blocks and processors are patched too."""
    model, run = latte_model()
    with torch.no_grad():
        ref, ref_spatial_only = run(model), run(model, enable_temporal_attentions=False)
    patch(model)
    out, calls = run_counted(lambda m: run(m, enable_temporal_attentions=False), model)
    torch.testing.assert_close(out, ref_spatial_only, **FP32_TOL)
    assert calls["spatial_attention"] == 2 and "temporal_attention" not in calls

    model.enable_gradient_checkpointing()
    model.train()  # no dropout in this config: train mode changes nothing but the path
    with OpCounter() as counter:
        out = run(model)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    # the original layout: dense attention through the patched processors, fused adaLN blocks
    assert counter.calls["attention"] == 6 and "spatial_attention" not in counter.calls
    assert counter.calls["gated_residual_adaln"] == 4


def test_wan_complex_rope_is_the_interleaved_rotation():
    """diffusers 0.33/0.34's Wan RoPE (complex freqs times the pairs read as complex numbers, in fp64)
    equals the attention op's interleaved rotation with the tables the integration derives."""
    N, D = 5, 8
    freqs = torch.polar(torch.ones(N, D // 2, dtype=torch.float64), torch.rand(N, D // 2, dtype=torch.float64) * 6)
    freqs = freqs.view(1, 1, N, D // 2)
    x = torch.randn(1, 2, N, D)  # [B, H, N, D] as the old processor has it
    ref = torch.view_as_real(torch.view_as_complex(x.double().unflatten(3, (-1, 2))) * freqs).flatten(3).float()
    cos, sin = wan._wan_complex_rope(freqs, N, D)
    assert cos.shape == sin.shape == (1, N, D) and cos.dtype == torch.float32
    rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(3)
    torch.testing.assert_close(x * cos[:, None] + rotated * sin[:, None], ref, atol=1e-6, rtol=1e-6)
    assert wan._wan_complex_rope(freqs, N + 1, D) is None  # another length: original path


def test_masks_to_kv_lens_or_original_path():
    # a prefix mask (padded prompt) becomes kv_lens: the cross-attention stays on our op
    model, run = ltx_model(mask="prefix")
    with torch.no_grad():
        ref = run(model)
    patch(model)
    out, calls = run_counted(run, model)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    assert calls["attention"] == 2
    # a mask with a hole cannot be kv_lens: the cross-attention runs the original processor
    model, run = ltx_model(mask="hole")
    with torch.no_grad():
        ref = run(model)
    patch(model)
    out, calls = run_counted(run, model)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    assert calls["attention"] == 0 and calls["spatial_attention"] == 2


@pytest.mark.parametrize("mask_kind", ["bool", "bias", "none-masked", "hole", "per-query"])
def test_attn_processor_masks(mask_kind):
    """A loose diffusers Attention (outside any model) is patched; masks: bool and additive bias
    prefixes become kv_lens, an all-keep mask drops, others take the original processor."""
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8).eval()
    x, context = torch.randn(2, 5, 16), torch.randn(2, 4, 8)
    lens = torch.tensor([4, 2])
    keep = torch.arange(4) < lens[:, None]  # [B, M]
    masks = {
        "bool": keep,
        "bias": ((~keep).float() * -10000.0)[:, None, :],
        "none-masked": torch.ones(2, 4, dtype=torch.bool),
        "hole": torch.tensor([[True, False, True, True]] * 2),
        "per-query": keep[:, None, :].expand(2, 5, 4),
    }
    mask = masks[mask_kind]
    with torch.no_grad():
        ref = attn(x, context, attention_mask=mask)
    patch(attn)
    assert type(attn.processor).__name__ == "I2VAttnProcessor"
    with torch.no_grad(), OpCounter() as counter:
        out = attn(x, context, attention_mask=mask)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    assert counter.calls["attention"] == (1 if mask_kind in ("bool", "bias", "none-masked") else 0)


def test_gradients_match():
    model, run = cogvideox_model()
    model.train()
    run(model).square().sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    patch(model)
    run(model).square().sum().backward()
    for n, p in model.named_parameters():
        if n in ref:
            torch.testing.assert_close(p.grad, ref[n], atol=1e-4, rtol=1e-4, msg=n)


def _block_inputs(name, model):
    if name == "cogvideox":
        freqs = get_3d_rotary_pos_embed(16, ((0, 0), (4, 4)), (4, 4), 3)
        return model.transformer_blocks[0], (torch.randn(2, 48, 32), torch.randn(2, 6, 32), torch.randn(2, 8), freqs)
    if name == "wan":
        rotary = model.rope(torch.randn(2, 4, 3, 8, 8))
        return model.blocks[0], (torch.randn(2, 48, 24), torch.randn(2, 519, 24), torch.randn(2, 6, 24), rotary)
    if name == "latte":
        return model.transformer_blocks[0], (torch.randn(6, 16, 16), None, torch.randn(6, 5, 16), None,
                                             torch.randn(6, 6 * 16))
    x = torch.randn(2, 48, 16)
    return model.transformer_blocks[0], (x, torch.randn(2, 6, 16), torch.randn(2, 1, 6 * 16), model.rope(x, 3, 4, 4))


@pytest.mark.parametrize("name", ["cogvideox", "wan", "latte", "ltx"])
def test_compile_patched_block(name):
    builders = {"cogvideox": cogvideox_model, "wan": lambda: wan_model(image=True), "latte": latte_model,
                "ltx": ltx_model}
    model, _ = builders[name]()
    patch(model)
    block, args = _block_inputs(name, model)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager, traced = block(*args), compiled(*args)
    torch.testing.assert_close(traced, eager, **FP32_TOL)
    torch._dynamo.reset()


def test_compile_whole_patched_latte():
    """Latte's replaced model forward traces whole, [B, T, S, C] layout included."""
    model, run = latte_model()
    patch(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(run(compiled), run(model), **FP32_TOL)
    torch._dynamo.reset()


# ==================================================================================================
# VAEs: decode (whole, tiled / frame-batched with the caches), encode, the cache protocols


@pytest.mark.parametrize("name", list(VAES))
def test_vae_parity(name):
    build, conv_class = VAES[name]
    vae = build()
    before = snapshot(vae)
    z = torch.randn(1, 4, 5, 6, 6)  # 5 latent frames: CogVideoX decodes them in two cached batches
    x = torch.randn(1, 3, 9, 16, 16)
    with torch.no_grad():
        ref = vae.decode(z).sample
        ref_enc = vae.encode(x).latent_dist.mean
        tiles = enable_small_tiles(vae)
        ref_tiled = vae.decode(z).sample if tiles else None
        vae.use_tiling = vae.use_framewise_decoding = False
    patch(vae)
    summary = patch_summary(vae)
    assert all(k.startswith(conv_class) for k in summary.replaced) and not summary.kept, summary
    out, calls = run_counted(lambda v: v.decode(z).sample, vae)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    assert calls["causal_conv3d"] > 0
    with torch.no_grad():  # (the spy's per-op Python dispatch is slow: counted once above)
        torch.testing.assert_close(vae.encode(x).latent_dist.mean, ref_enc, **FP32_TOL)
        if tiles:
            enable_small_tiles(vae)
            torch.testing.assert_close(vae.decode(z).sample, ref_tiled, **FP32_TOL)
    unpatch(vae)
    assert_restored(vae, before)


def test_vae_every_conv_runs_the_op():
    vae = wan_vae()
    patch(vae)
    convs = [m for m in vae.modules() if type(m).__name__ == "WanCausalConv3d"]
    seen = Counter()
    handles = [m.register_forward_hook(lambda *a: seen.update(["call"])) for m in convs]
    with torch.no_grad(), OpCounter() as counter:
        vae.encode(torch.randn(1, 3, 9, 16, 16))
        vae.decode(torch.randn(1, 4, 3, 4, 4))
    for h in handles:
        h.remove()
    assert counter.calls["causal_conv3d"] == seen["call"] > 0


def test_cogvideox_conv_cache_protocol():
    from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXCausalConv3d

    for kernel, pad_mode in ((3, "constant"), (3, "first"), (1, "constant")):
        conv = CogVideoXCausalConv3d(4, 6, kernel, pad_mode=pad_mode).eval()
        chunks = [torch.randn(1, 4, n, 5, 5) for n in (1, 2, 3)]

        def stream(c):
            cache, outs = None, []
            for chunk in chunks:
                y, cache = c(chunk, conv_cache=cache)
                outs.append((y, cache))
            return outs

        with torch.no_grad():
            ref = stream(conv)
            patch(conv)
            assert "forward" in conv.__dict__
            out = stream(conv)
        for (y0, c0), (y1, c1) in zip(ref, out):
            torch.testing.assert_close(y1, y0, **FP32_TOL)
            assert c1.shape == c0.shape
            torch.testing.assert_close(c1, c0, atol=0, rtol=0)
    # spatial replicate padding is not ours: left alone
    conv = CogVideoXCausalConv3d(4, 6, 3, pad_mode="replicate")
    patch(conv)
    assert "forward" not in conv.__dict__ and patch_summary(conv).kept


def test_wan_conv_cache_protocol():
    """Caches of 1 or 2 frames (zeros fill the rest), none, 1x1x1 convs, and the unpadded temporal
    downsample (a "valid" conv in time)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    convs = [WanCausalConv3d(4, 6, 3, padding=1), WanCausalConv3d(4, 6, (3, 1, 1), padding=(1, 0, 0)),
             WanCausalConv3d(4, 6, (3, 1, 1), stride=(2, 1, 1)), WanCausalConv3d(4, 6, 1)]
    x = torch.randn(1, 4, 4, 5, 5)
    calls = [(x, None), (x[:, :, :1], None), (x, x[:, :, -1:]), (x, x[:, :, -2:]), (x[:, :, :1], x[:, :, :2])]
    for conv in convs:
        conv.eval()
        unpadded = conv._padding[4] == 0 and conv.kernel_size[0] > 1
        usable = [(a, c) for a, c in calls if not (unpadded and a.shape[2] < conv.kernel_size[0])]
        with torch.no_grad():
            ref = [conv(a, c) for a, c in usable]
            patch(conv)
            assert "forward" in conv.__dict__
            out, calls_made = run_counted(lambda m: [m(a, c) for a, c in usable], conv)
        assert calls_made["causal_conv3d"] == len(usable)
        for y1, y0 in zip(out, ref):
            torch.testing.assert_close(y1, y0, **FP32_TOL)


# ==================================================================================================
# Pipelines, unknown models, summary


class TinyPipeline(diffusers.DiffusionPipeline):
    def __init__(self, transformer, vae):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae)


def test_pipeline_patches_transformer_and_vae(capsys):
    model, run = wan_model()
    vae = wan_vae()
    pipe = TinyPipeline(model, vae)
    before = (snapshot(model), snapshot(vae))
    assert patch(pipe, verbose=True) is pipe
    printed = capsys.readouterr().out
    assert "WanTransformerBlock.forward" in printed and "WanCausalConv3d.forward" in printed
    summary = patch_summary(pipe)
    assert str(summary) in printed
    assert summary.replaced["WanTransformerBlock.forward -> fused adaLN with fp32 modulation (adaln_modulate, "
                            "gated_residual_adaln, gated_residual)"] == 2
    assert patched_forwards(vae)["WanCausalConv3d"] == 36
    unpatch(pipe)
    assert_restored(model, before[0])
    assert_restored(vae, before[1])
    assert patch_summary(pipe) is None


class MyVideoTransformer3DModel(diffusers.ModelMixin, diffusers.ConfigMixin):
    """A video DiT this integration does not know, holding a block class it does know."""

    def __init__(self):
        super().__init__()
        from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

        self.block = CogVideoXBlock(32, 2, 16, 8)


def test_unknown_model_untouched_with_one_warning():
    known, run = cogvideox_model()
    unknown = MyVideoTransformer3DModel()
    other = MyVideoTransformer3DModel()
    holder = nn.ModuleDict({"known": known, "unknown": unknown, "other": other})
    before = snapshot(unknown)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch(holder)
    ours = [w for w in caught if str(w.message).startswith("i2v_kernels.patch")]
    assert len(ours) == 1 and "MyVideoTransformer3DModel" in str(ours[0].message)
    assert snapshot(unknown) == before
    assert patched_forwards(known)["CogVideoXBlock"] == 2
    assert patch_summary(holder).unsupported == ["MyVideoTransformer3DModel"]


def test_loose_block_is_patched():
    model, _ = cogvideox_model()
    block, args = _block_inputs("cogvideox", model)
    with torch.no_grad():
        ref = block(*args)
    patch(block)
    assert "forward" in block.__dict__ and type(block.attn1.processor).__name__ == "I2VCogVideoXAttnProcessor"
    with torch.no_grad():
        out = block(*args)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, **FP32_TOL)


def test_layerwise_casting_hooks_keep_ours():
    """diffusers' functional ``apply_layerwise_casting`` before patch (bf16 storage): its hooks sit on the
    Linear layers, which ours calls as modules, so every block and processor is still replaced.
    (``enable_layerwise_casting`` before and after patch, all models: test_diffusers_compose.py.)"""
    from diffusers.hooks import apply_layerwise_casting

    model, run = cogvideox_model()
    apply_layerwise_casting(model, storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    with torch.no_grad():
        ref = run(model)
    patch(model)
    assert patched_forwards(model) == {"CogVideoXBlock": 2} and patched_processors(model) == {
        "I2VCogVideoXAttnProcessor": 2}
    assert not patch_summary(model).kept
    out, calls = run_counted(run, model)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    assert calls["attention"] == 2 and calls["gated_residual_adaln"] == 4, dict(calls)


def test_accelerate_style_hook_is_followed():
    """accelerate keeps the real forward in ``_old_forward`` behind a wrapper: the replacement goes
    there, the wrapper stays, unpatch puts the original back."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    conv = WanCausalConv3d(4, 6, 3, padding=1).eval()
    original = conv.forward
    conv._hf_hook = object()
    conv._old_forward = original
    conv.forward = lambda *args, **kwargs: conv._old_forward(*args, **kwargs)
    wrapper = conv.forward
    x = torch.randn(1, 4, 3, 5, 5)
    with torch.no_grad():
        ref = conv(x)
    patch(conv)
    assert conv.forward is wrapper and conv._old_forward is not original
    out, calls = run_counted(lambda c: c(x), conv)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    assert calls["causal_conv3d"] == 1
    unpatch(conv)
    assert conv.forward is wrapper and conv._old_forward is original


def test_bad_object():
    with pytest.raises(TypeError, match="pipeline"):
        patch(object())


# ==================================================================================================
# Triton through the interpreter (smallest configs)


def test_triton_interpreter(cpu_backends):
    if "triton" not in cpu_backends:
        pytest.skip("Triton cannot run CPU tensors here (needs triton and TRITON_INTERPRET=1)")
    # attention + adaLN in bf16 (the Triton attention kernel takes fp16/bf16): the patched model is at
    # most as far from the fp32 model as diffusers' own bf16 run, up to a bf16 rounding step
    torch.manual_seed(1)
    model, run = cogvideox_model()
    torch.manual_seed(1)
    model_bf16, run_bf16 = cogvideox_model(dtype=torch.bfloat16)
    with torch.no_grad():
        ref32 = run(model)
        ref16 = run_bf16(model_bf16).float()
        patch(model_bf16)
        with i2v_kernels.use_backend("triton"):
            out, calls = run_counted(run_bf16, model_bf16)
    assert calls["attention"] == 2
    own_err = (ref16 - ref32).abs().max().item()
    assert (out.float() - ref32).abs().max().item() <= 2 * own_err + 2 ** -8 * ref32.abs().max().item()

    # adaLN in fp32 (Wan keeps its modulation fp32)
    model, run = wan_model()
    with torch.no_grad():
        ref = run(model)
        patch(model, ops={"adaln"})
        with i2v_kernels.use_backend("triton"):
            out, calls = run_counted(run, model)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    assert calls["gated_residual_adaln"] == 2

    # causal conv with the caches, fp32
    from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXCausalConv3d
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    wan_conv, cog_conv = WanCausalConv3d(4, 6, 3, padding=1).eval(), CogVideoXCausalConv3d(4, 6, 3).eval()
    x, x2 = torch.randn(1, 4, 3, 5, 5), torch.randn(1, 4, 1, 5, 5)
    with torch.no_grad():
        ref = [wan_conv(x), wan_conv(x2, x[:, :, -1:]), *cog_conv(x2, conv_cache=x[:, :, -2:])]
        patch(wan_conv)
        patch(cog_conv)
        with i2v_kernels.use_backend("triton"):
            out = [wan_conv(x), wan_conv(x2, x[:, :, -1:]), *cog_conv(x2, conv_cache=x[:, :, -2:])]
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, **FP32_TOL)


# ==================================================================================================
# GPU: bf16 at a larger config, patched error within 2x of diffusers' own bf16 error


def _bf16_errors(build):
    """Max errors against the fp32 model of (the patched bf16 model, diffusers' own bf16 run), and the
    fp32 output's max magnitude; the same seed gives both dtypes the same weights and inputs."""
    torch.manual_seed(1)
    model, run = build(torch.float32)
    torch.manual_seed(1)
    model16, run16 = build(torch.bfloat16)
    with torch.no_grad():
        ref32 = run(model)
        own = run16(model16).float()
        patch(model16)
        ours = run16(model16).float()
    return (ours - ref32).abs().max().item(), (own - ref32).abs().max().item(), ref32.abs().max().item()


@pytest.mark.needs_cuda
@pytest.mark.parametrize("name", ["cogvideox", "wan-i2v", "ltx", "latte"])
def test_cuda_bf16_transformers(name):
    configs = {
        "cogvideox": lambda dtype: cogvideox_model(dtype, heads=4, head_dim=64, layers=2, frames=5, size=16, text=16),
        "wan-i2v": lambda dtype: wan_model(dtype, image=True, heads=4, head_dim=64, layers=2, size=16),
        "ltx": lambda dtype: ltx_model(dtype, heads=4, head_dim=64, layers=2),
        "latte": latte_model,
    }
    with torch.device("cuda"):
        ours, own, scale = _bf16_errors(configs[name])
    assert ours <= 2 * own + 1e-2 * scale, (ours, own, scale)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("name", ["cogvideox", "wan", "ltx"])
def test_cuda_bf16_vae_decode(name):
    build, _ = VAES[name]

    def vae_model(dtype):
        vae = build().to(dtype)
        z = torch.randn(1, 4, 5, 16, 16).to(dtype)
        return vae, lambda v: v.decode(z).sample

    with torch.device("cuda"):
        ours, own, scale = _bf16_errors(vae_model)
    assert ours <= 2 * own + 1e-2 * scale, (ours, own, scale)


# ==================================================================================================
# Measured replacement: never slower than diffusers' own code


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """Measuring on with an injected timer: ``times[backend]`` ms for ours ("i2v_kernels") and theirs."""
    from i2v_kernels import _dispatch

    monkeypatch.setenv(_dispatch.TUNE_ENV, "1")
    monkeypatch.setenv(_dispatch.CACHE_ENV, str(tmp_path))
    _dispatch.clear()
    times = {"i2v_kernels": 1.0, "diffusers": 2.0, "cpu": 1.0, "native": 1.0}

    def timer(backend, fn, device):
        fn()
        return times.get(backend, 1.0)  # op backends not named here tie

    monkeypatch.setattr(_dispatch, "_timer", timer)
    monkeypatch.setattr(core, "IN_CONTEXT_CALLS", 0)  # no check in real calls (test_in_context_check turns it on)
    core._trials.clear()
    yield times
    _dispatch.clear()
    core._trials.clear()


def calls_after_measuring(model, run) -> Counter:
    """Patch ``model``, run it once (measuring every key), then again under the op spy: the ops the
    winners run. Both outputs match the unpatched model's."""
    with torch.no_grad():
        ref = run(model)
    patch(model)
    with torch.no_grad():
        torch.testing.assert_close(run(model), ref, **FP32_TOL)  # measures every key, then runs the winner
    out, calls = run_counted(run, model)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    return calls


@pytest.mark.parametrize("winner", ["i2v_kernels", "diffusers"])
@pytest.mark.parametrize("name", ["cogvideox", "wan-t2v"])
def test_patched_modules_run_the_faster_code(measured, name, winner):
    """Where diffusers' own code measures faster, the patched model runs it (no op of ours at all)."""
    measured["diffusers"] = 0.5 if winner == "diffusers" else 2.0
    build, _ = TRANSFORMERS[name]
    calls = calls_after_measuring(*build())
    if winner == "diffusers":
        assert sum(calls.values()) == 0, dict(calls)
    else:
        assert calls["attention"] > 0 and ADALN_OPS[name.split("-")[0]] <= set(calls), dict(calls)
    from i2v_kernels import _dispatch

    labels = {d["op"] for d in _dispatch.decisions() if d["op"].startswith("diffusers:")}
    assert any("Processor" in label for label in labels) and any("Block" in label for label in labels), labels


def test_module_decisions_are_memoized_and_forgotten_with_the_dispatch(measured, monkeypatch):
    """A patched module called again with the same shapes takes its decision from a memo on itself
    (no key lookup); forgetting the decisions (``_dispatch.clear``) forgets the memo too."""
    from i2v_kernels import _dispatch

    model, run = TRANSFORMERS["cogvideox"][0]()
    patch(model)
    with torch.no_grad():
        run(model)  # ours wins (1 ms against 2): measured
    looked_up = []
    choose = _dispatch.choose
    monkeypatch.setattr(_dispatch, "choose", lambda op, *a, **k: looked_up.append(op) or choose(op, *a, **k))
    _, calls = run_counted(run, model)
    assert looked_up == [] and calls["attention"] > 0
    measured["diffusers"] = 0.5  # now diffusers' code is faster
    _dispatch.clear(disk=True)
    with torch.no_grad():
        run(model)
    assert any(op.startswith("diffusers:") for op in looked_up)
    _, calls = run_counted(run, model)
    assert sum(calls.values()) == 0, dict(calls)


def test_module_memo_holds_several_call_shapes(measured, monkeypatch):
    """CogVideoX's decoder calls each conv with alternating frame counts (its first latent frame, then
    the rest): after one measured decode, a second decode looks nothing up and equals the first."""
    from i2v_kernels import _dispatch

    vae = cogvideox_vae()
    z = torch.randn(1, 4, 5, 4, 4, generator=torch.Generator().manual_seed(0))  # batches of 3 and 2 frames
    patch(vae)
    with torch.no_grad():
        first = vae.decode(z).sample  # measures every key
    looked_up = []
    choose = _dispatch.choose
    monkeypatch.setattr(_dispatch, "choose", lambda op, *a, **k: looked_up.append(op) or choose(op, *a, **k))
    with torch.no_grad():
        again = vae.decode(z).sample
    assert looked_up == []
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    memo = {label: len(seen) for m in vae.modules() for label, seen in m.__dict__.get(core._CHOICE, {}).items()}
    assert max(memo.values()) >= 2, memo  # some module was called with two shapes


def test_training_mode_is_not_measured(measured):
    """Repeated forwards would advance dropout's RNG: in training mode ours runs, unmeasured."""
    measured["diffusers"] = 0.1
    model, run = TRANSFORMERS["cogvideox"][0]()
    patch(model)
    model.train()
    out, calls = run_counted(run, model)
    assert calls["attention"] > 0
    from i2v_kernels import _dispatch

    assert not [d for d in _dispatch.decisions() if d["op"].startswith("diffusers:")]


@pytest.mark.parametrize("name", ["cogvideox", "wan", "ltx"])
def test_vae_outputs_keep_diffusers_memory_format(name):
    vae = VAES[name][0]()
    z = torch.randn(1, 4, 3, 6, 6)
    with torch.no_grad():
        ref = vae.decode(z).sample
        patch(vae)
        out = vae.decode(z).sample
    assert out.stride() == ref.stride() and out.is_contiguous()
    torch.testing.assert_close(out, ref, **FP32_TOL)


@pytest.mark.parametrize("in_context_winner", ["i2v_kernels", "diffusers"])
def test_in_context_check_of_a_module_that_won_alone(measured, monkeypatch, in_context_winner):
    """On a CPU, a module whose code won the isolated measurement takes turns with diffusers' code in its
    next real calls, each timed where it runs; the faster there is kept (a tie keeps diffusers'), and the
    decision is not checked again."""
    from i2v_kernels import _dispatch

    measured["diffusers"] = 2.0  # alone: ours (1.0) wins every key
    monkeypatch.setattr(core, "IN_CONTEXT_CALLS", 2)
    context = {"i2v_kernels": 1.0, "diffusers": 1.0, in_context_winner: 0.5}
    ran = Counter()

    def timed(name, fn):
        ran[name] += 1
        return fn(), context[name]

    monkeypatch.setattr(core, "_timed", timed)
    vae = cogvideox_vae()
    z = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = vae.decode(z).sample
        patch(vae)
        outs = [vae.decode(z).sample for _ in range(6)]  # measured, then 2 + 2 timed turns per key
    for out in outs:
        torch.testing.assert_close(out, ref, **FP32_TOL)
    assert ran["i2v_kernels"] >= 2 and ran["diffusers"] >= 2 and not core._trials
    revised = [d for d in _dispatch.decisions() if d["op"].startswith("diffusers:")]
    assert revised and all(d["backend"] == in_context_winner and d["in_context_ms"] == {
        "i2v_kernels": context["i2v_kernels"], "diffusers": context["diffusers"]} for d in revised), revised
    ran.clear()
    _, calls = run_counted(lambda v: v.decode(z).sample, vae)
    assert not ran  # settled: no more turns
    assert (calls["causal_conv3d"] > 0) == (in_context_winner == "i2v_kernels"), dict(calls)
