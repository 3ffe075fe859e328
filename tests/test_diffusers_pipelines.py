"""diffusers integration end to end: ``patch(pipe)`` on the image-to-video pipelines (and Latte's
text-to-video), built from tiny random configs on CPU -- text encoders and tokenizers made in code, no
downloads. Each pipeline runs a full 2-step denoising loop (classifier-free guidance on) and the VAE
decode unpatched, then patched with the same seed: the same frames (fp32), with the op spy showing our
ops in the transformer / UNet and the VAE; ``unpatch(pipe)`` gives back the unpatched frames exactly."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers", reason="the pipelines' text/image encoders need transformers")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import diffusers  # noqa: E402
from i2v_kernels.integrations.diffusers import patch, patch_summary, unpatch  # noqa: E402
from test_diffusers import OpCounter, cogvideox_vae, ltx_vae, wan_vae  # noqa: E402
from test_diffusers_svd import svd_unet, svd_vae  # noqa: E402

# two denoising steps compound the fp32 rounding of the fused kernels a little
PIPE_TOL = dict(atol=1e-4, rtol=1e-4)
WORDS = ["<pad>", "</s>", "<unk>", "a", "cat", "dog", "runs", "on", "the", "beach", "at", "night", "blurry"]


def tiny_tokenizer(max_length: int):
    """A T5-like fast tokenizer over a dozen words, built in code: whitespace words, ``</s>`` appended,
    ``<pad>`` padding (what the pipelines ask of their tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def tiny_t5(d_model: int, umt5: bool = False):
    import transformers

    config_cls, model_cls = ((transformers.UMT5Config, transformers.UMT5EncoderModel) if umt5
                             else (transformers.T5Config, transformers.T5EncoderModel))
    config = config_cls(vocab_size=len(WORDS), d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return model_cls(config).eval()


def tiny_clip_vision(image_size: int, hidden: int, projection: int = 0):
    """CLIP's vision tower (with a projection when ``projection``) and its image processor."""
    import transformers

    config = transformers.CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=image_size, patch_size=image_size // 4,
                                           projection_dim=projection or hidden)
    cls = transformers.CLIPVisionModelWithProjection if projection else transformers.CLIPVisionModel
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": image_size},
                                                crop_size={"height": image_size, "width": image_size})
    return cls(config).eval(), processor


def image(size: int = 16) -> Image.Image:
    g = torch.Generator().manual_seed(7)
    return Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy())


# ==================================================================================================
# Pipelines: name -> builder() -> (pipe, call kwargs without the generator)


def cogvideox_i2v():
    transformer = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=4, time_embed_dim=8,
        text_embed_dim=32, num_layers=1, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8, use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=True)
    pipe = diffusers.CogVideoXImageToVideoPipeline(
        tokenizer=tiny_tokenizer(8), text_encoder=tiny_t5(32), vae=cogvideox_vae(), transformer=transformer,
        scheduler=diffusers.CogVideoXDDIMScheduler())
    return pipe, dict(image=image(16), prompt="a cat runs", negative_prompt="blurry", height=16, width=16,
                      num_frames=9, num_inference_steps=2, guidance_scale=6.0, max_sequence_length=8,
                      use_dynamic_cfg=False)


def wan_i2v():
    pytest.importorskip("ftfy", reason="WanImageToVideoPipeline cleans prompts with ftfy")
    image_encoder, image_processor = tiny_clip_vision(8, 16)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=10, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32,
        image_dim=16, added_kv_proj_dim=24)
    vae = wan_vae()
    # one mean/std per latent channel; the tiny VAE halves time (the pipeline's mask has one channel per frame)
    vae.register_to_config(latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_temporal=2)
    pipe = diffusers.WanImageToVideoPipeline(
        tokenizer=tiny_tokenizer(512), text_encoder=tiny_t5(16, umt5=True), vae=vae, transformer=transformer,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), image_encoder=image_encoder,
        image_processor=image_processor)
    return pipe, dict(image=image(16), prompt="a dog on the beach", negative_prompt="blurry", height=16, width=16,
                      num_frames=5, num_inference_steps=2, guidance_scale=5.0)


def latte_t2v():
    transformer = diffusers.LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=16, sample_size=8, patch_size=2, norm_type="ada_norm_single", caption_channels=32,
        video_length=3, norm_elementwise_affine=False, norm_eps=1e-6, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                  latent_channels=4, norm_num_groups=2, layers_per_block=1)
    pipe = diffusers.LattePipeline(tokenizer=tiny_tokenizer(8), text_encoder=tiny_t5(32), vae=vae,
                                   transformer=transformer, scheduler=diffusers.DDIMScheduler())
    return pipe, dict(prompt="a cat at night", negative_prompt="blurry", height=16, width=16, video_length=3,
                      num_inference_steps=2, guidance_scale=3.0, clean_caption=False, mask_feature=False,
                      enable_temporal_attentions=True)


def ltx_i2v():
    transformer = diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=1, caption_channels=32, patch_size=1, patch_size_t=1)
    pipe = diffusers.LTXImageToVideoPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=ltx_vae(), text_encoder=tiny_t5(32),
        tokenizer=tiny_tokenizer(8), transformer=transformer)
    return pipe, dict(image=image(32), prompt="a dog runs", negative_prompt="blurry", height=32, width=32,
                      num_frames=5, num_inference_steps=2, guidance_scale=3.0, max_sequence_length=8,
                      decode_timestep=0.0, decode_noise_scale=None)


def svd_i2v():
    image_encoder, feature_extractor = tiny_clip_vision(224, 16, projection=16)
    unet, _ = svd_unet()
    pipe = diffusers.StableVideoDiffusionPipeline(
        vae=svd_vae(), image_encoder=image_encoder, unet=unet, scheduler=diffusers.EulerDiscreteScheduler(),
        feature_extractor=feature_extractor)
    return pipe, dict(image=image(16), height=16, width=16, num_frames=3, num_inference_steps=2,
                      min_guidance_scale=1.5, max_guidance_scale=2.5, decode_chunk_size=3)


PIPELINES = {
    # name: (builder, the denoiser's component name, ops that must run in it, ops that must run in the VAE)
    "cogvideox-i2v": (cogvideox_i2v, "transformer", {"attention", "gated_residual_adaln"}, {"causal_conv3d"}),
    "wan-i2v": (wan_i2v, "transformer", {"attention", "rms_norm", "gated_residual_adaln"}, {"causal_conv3d"}),
    "latte-t2v": (latte_t2v, "transformer", {"spatial_attention", "temporal_attention", "gated_residual_adaln"},
                  set()),  # Latte decodes with the 2D AutoencoderKL: nothing of ours applies there
    "ltx-i2v": (ltx_i2v, "transformer", {"spatial_attention", "rms_norm", "gated_residual"}, {"causal_conv3d"}),
    "svd": (svd_i2v, "unet", {"temporal_attention", "attention", "causal_conv3d"}, {"causal_conv3d"}),
}


def frames(pipe, kwargs, counter=None):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if counter is None:
            return pipe(**kwargs, generator=generator, output_type="pt").frames
        with counter:
            return pipe(**kwargs, generator=generator, output_type="pt").frames


@pytest.mark.parametrize("name", list(PIPELINES))
def test_pipeline_end_to_end(name):
    builder, denoiser, denoiser_ops, vae_ops = PIPELINES[name]
    torch.manual_seed(0)
    pipe, kwargs = builder()
    pipe.set_progress_bar_config(disable=True)
    ref = frames(pipe, kwargs)
    assert torch.isfinite(ref).all() and ref.std() > 0

    assert patch(pipe) is pipe
    summary = patch_summary(pipe)
    assert any(k.startswith(("LatteTransformer3DModel", "CogVideoXBlock", "WanTransformerBlock",
                             "LTXVideoTransformerBlock", "TransformerSpatioTemporalModel")) for k in summary.replaced)
    counter = OpCounter()
    out = frames(pipe, kwargs, counter)
    torch.testing.assert_close(out, ref, **PIPE_TOL)
    assert denoiser_ops <= set(counter.calls), dict(counter.calls)
    # the VAE's own ops: decode once more, alone, under the spy
    if vae_ops:
        vae_counter = OpCounter()
        config = pipe.vae.config
        latents = torch.randn(1, config.get("latent_channels") or config["z_dim"], 2, 4, 4)
        with torch.no_grad(), vae_counter:
            if name == "svd":
                pipe.vae.decode(latents[:, :, 0].expand(2, -1, -1, -1), num_frames=2)
            else:
                pipe.vae.decode(latents)
        assert vae_ops <= set(vae_counter.calls), dict(vae_counter.calls)

    unpatch(pipe)
    assert patch_summary(pipe) is None
    assert torch.equal(frames(pipe, kwargs), ref)
    assert getattr(pipe, denoiser) is not None
