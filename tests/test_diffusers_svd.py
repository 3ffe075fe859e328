"""diffusers integration, Stable Video Diffusion: ``patch`` on a tiny random-config
``UNetSpatioTemporalConditionModel`` and ``AutoencoderKLTemporalDecoder`` (no downloads), fp32 on CPU.

Outputs, gradients and state dicts match the unpatched model; the op spy shows the temporal blocks on
``temporal_attention`` and the time convolutions on ``causal_conv3d``; hooks on a temporal block send
the transformer back to diffusers' layout; ``unpatch`` restores everything."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402

import diffusers  # noqa: E402
from i2v_kernels.integrations.diffusers import patch, patch_summary, unpatch  # noqa: E402
from test_diffusers import (  # noqa: E402
    FP32_TOL, OpCounter, assert_restored, build, calls_after_measuring, measured, run_counted,  # noqa: F401
    snapshot)  # (measured: a fixture)


def svd_unet():
    """Two resolution levels, one layer each: 2 TransformerSpatioTemporalModels down, 2 up (one block
    pair each), 8 TemporalResnetBlocks; inputs drawn once."""
    model = build(
        diffusers.UNetSpatioTemporalConditionModel,
        sample_size=8, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), block_out_channels=(32, 64),
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=12, layers_per_block=1,
        cross_attention_dim=16, num_attention_heads=(2, 4)).eval()
    x = torch.randn(2, 3, 8, 4, 4)  # [B, T, C, H, W]
    t = torch.tensor([10.0, 500.0])
    context = torch.randn(2, 1, 16)  # the image embedding
    added = torch.randn(2, 3)  # fps, motion bucket, noise augmentation
    return model, lambda m: m(x, t, context, added).sample


def svd_vae():
    return build(diffusers.AutoencoderKLTemporalDecoder, in_channels=3, out_channels=3,
                 down_block_types=("DownEncoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
                 latent_channels=4).eval()


UNET_REPLACED = {
    "Attention.processor AttnProcessor2_0 -> I2VAttnProcessor": 16,
    "TemporalResnetBlock.forward -> causal_conv3d (zero padding at both ends in time)": 8,
    "TransformerSpatioTemporalModel.forward -> temporal blocks on [B, T, S, C] views: temporal_attention / "
    "attention (no rearrange copies, context projected once per sample)": 4,
}


def test_unet_parity_ops_and_unpatch():
    model, run = svd_unet()
    before = snapshot(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = run(model)
    patch(model)
    summary = patch_summary(model)
    assert summary.replaced == UNET_REPLACED, summary
    # the spatial blocks are LayerNorm blocks (no adaLN to fuse): named, their attention is ours
    assert summary.kept == {"BasicTransformerBlock: norm_type='layer_norm' (only 'ada_norm_single' is fused)": 4}
    out, calls = run_counted(run, model)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    # per transformer: a temporal self-attention and its cross-attention, the spatial block's two dense
    # attentions (through the processors); two time convs per TemporalResnetBlock
    assert calls["temporal_attention"] == 4 and calls["attention"] == 4 * 3, dict(calls)
    assert calls["causal_conv3d"] == 16, dict(calls)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())

    unpatch(model)
    assert_restored(model, before)
    with torch.no_grad():
        assert torch.equal(run(model), ref)


def test_unet_gradients_match():
    """Through the UNet's first down block (its spatio-temporal resnets and transformer: every kind of
    replaced module), parameters and input."""
    model, _ = svd_unet()
    block = model.down_blocks[0].train()  # dropout is 0 in SVD's blocks
    x = torch.randn(6, 32, 4, 4, requires_grad=True)  # [B*T, C, H, W]
    temb, context, indicator = torch.randn(6, 128), torch.randn(6, 1, 16), torch.zeros(2, 3)

    def loss():
        out, _ = block(x, temb, context, indicator)
        return out.square().sum()

    loss().backward()
    ref = {n: p.grad.clone() for n, p in block.named_parameters()}
    ref_x = x.grad.clone()
    block.zero_grad()
    x.grad = None
    patch(model)
    with OpCounter() as counter:
        loss().backward()
    assert counter.calls["temporal_attention"] > 0 and counter.calls["causal_conv3d"] > 0, dict(counter.calls)
    torch.testing.assert_close(x.grad, ref_x, atol=1e-4, rtol=1e-4)
    for n, p in block.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-4, rtol=1e-4, msg=n)


def test_unet_hooked_temporal_block_takes_diffusers_layout():
    """A forward hook on a temporal block acts inside a call the [B, T, S, C] path does not make: the
    transformer then runs diffusers' forward (its processors still ours), and the hook sees every call."""
    model, run = svd_unet()
    with torch.no_grad():
        ref = run(model)
    patch(model)
    seen = []
    block = model.down_blocks[0].attentions[0].temporal_transformer_blocks[0]
    handle = block.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    out, calls = run_counted(run, model)
    handle.remove()
    torch.testing.assert_close(out, ref, **FP32_TOL)
    assert len(seen) == 1 and calls["temporal_attention"] == 3 and calls["attention"] == 4 * 3 + 1, dict(calls)


def test_compile_patched_spatio_temporal_transformer():
    model, _ = svd_unet()
    patch(model)
    transformer = model.down_blocks[0].attentions[0]
    x, context = torch.randn(6, 32, 2, 2), torch.randn(6, 1, 16)
    indicator = torch.zeros(2, 3)
    compiled = torch.compile(transformer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager = transformer(x, context, indicator).sample
        traced = compiled(x, context, indicator).sample
    torch.testing.assert_close(traced, eager, **FP32_TOL)
    torch._dynamo.reset()


def test_temporal_vae_decode_parity_and_unpatch():
    vae = svd_vae()
    plain = copy.deepcopy(vae)
    before = snapshot(vae)
    z = torch.randn(6, 4, 4, 4)  # 2 videos of 3 frames, frames in the batch as SVD decodes them
    image = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = vae.decode(z, num_frames=3).sample
        ref_enc = vae.encode(image).latent_dist.mean
    patch(vae)
    summary = patch_summary(vae)
    assert summary.replaced == {"TemporalDecoder.forward -> time_conv_out through causal_conv3d": 1,
                                "TemporalResnetBlock.forward -> causal_conv3d (zero padding at both ends in time)": 5}
    # the mid-block attention (group norm, residual) is not ours to compute: its processor stays
    assert summary.kept == {"Attention: group/spatial norm, residual connection or output rescale": 2}, summary
    out, calls = run_counted(lambda v: v.decode(z, num_frames=3).sample, vae)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    assert out.stride() == ref.stride()
    assert calls["causal_conv3d"] == 2 * 5 + 1, dict(calls)
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(image).latent_dist.mean, ref_enc, atol=0, rtol=0)
        # one frame: the time conv's zero padding is all it sees
        torch.testing.assert_close(vae.decode(z[:1], num_frames=1).sample, plain.decode(z[:1], num_frames=1).sample,
                                   **FP32_TOL)
    unpatch(vae)
    assert_restored(vae, before)


def test_time_conv_shapes_the_op_cannot_express_stay():
    """A TemporalResnetBlock whose convs are not zero-padded symmetrically in time keeps its code."""
    from diffusers.models.resnet import TemporalResnetBlock

    block = TemporalResnetBlock(32, 32, temb_channels=None)
    block.conv1.padding = (0, 0, 0)  # a "valid" conv in time
    patch(block)
    assert "forward" not in block.__dict__
    assert patch_summary(block).kept == {"TemporalResnetBlock: time kernel 3, stride 1, dilation 1, padding 0": 1}


def test_unet_modules_run_the_faster_code(measured):  # noqa: F811  (the fixture)
    """Each replaced SVD module is timed against diffusers' own code (injected timer) and the faster runs:
    where diffusers' measures faster, the patched UNet runs no op of ours at all. (Ours winning the
    measurement is the same code path, tested on CogVideoX and Wan in test_diffusers.py.)"""
    from i2v_kernels import _dispatch

    measured["diffusers"] = 0.5
    calls = calls_after_measuring(*svd_unet())
    assert sum(calls.values()) == 0, dict(calls)
    labels = {d["op"] for d in _dispatch.decisions() if d["op"].startswith("diffusers:")}
    assert {"diffusers:TransformerSpatioTemporalModel", "diffusers:TemporalResnetBlock"} <= labels, labels
