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
TransformerSpatioTemporalModel  ``forward`` (SVD's UNet): temporal blocks on ``[B, T, S, C]`` views
                                -- ``temporal_attention``, cross-attention ``attention`` against
                                each sample's context once; spatial blocks as they are
TemporalResnetBlock,            ``forward``: the ``(3, 1, 1)`` time convolutions (zero padding at
TemporalDecoder                 both ends) through ``causal_conv3d`` (SVD's UNet and temporal VAE)
=============================  ==================================================================

The models these live in -- ``LatteTransformer3DModel``, ``CogVideoXTransformer3DModel``,
``WanTransformer3DModel``, ``LTXVideoTransformer3DModel``, ``AutoencoderKLCogVideoX``,
``AutoencoderKLWan``, ``AutoencoderKLLTXVideo``, ``UNetSpatioTemporalConditionModel``,
``AutoencoderKLTemporalDecoder`` -- are the known models. A pipeline has each of its
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
leaf-level group offloading) keep their original code, as the replacements read submodules' weights
(norms, tables) directly: ``patch`` leaves them alone when the hooks come first, and a patched model's
``enable_group_offload`` puts diffusers' code back in them (the summary lists them under ``kept``).
Hooks added by other routes after ``patch`` (``apply_group_offloading(...)``, accelerate's sequential
offload) are not seen: add those before. Layerwise casting (``enable_layerwise_casting``, fp8/fp16
storage) keeps ours running, before or after ``patch``: diffusers casts only Linear, Conv and Embedding
layers, which ours calls as modules (their hooks run), except the VAE convolutions, which cast the
stored weight to the input's dtype themselves; the norms and tables ours reads are never cast.

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

The code is split the way diffusers splits its models: :mod:`.core` (summary, shared helpers, the
measured per-module dispatch, the processor base class, the registry), :mod:`.patching` (hooks, records,
``patch`` / ``unpatch``), and one file per family -- :mod:`.basic` (``Attention``, ``BasicTransformerBlock``),
:mod:`.cogvideox`, :mod:`.wan`, :mod:`.ltx`, :mod:`.latte`, :mod:`.vae` (causal convolutions), :mod:`.svd`;
:mod:`.stream`: ``decode_streaming(vae, z)`` / ``iter_decode(vae, z)``, the CogVideoX and Wan VAE decode
written chunk by chunk into one video or handed to a callback (``streaming_why_not(vae)`` says when not).

Example::

    pipe = diffusers.CogVideoXPipeline.from_pretrained("/models/CogVideoX-5b", torch_dtype=torch.bfloat16)
    pipe = i2v_kernels.patch(pipe.to("cuda"), verbose=True)
    video = pipe("a panda playing a guitar").frames[0]
    i2v_kernels.unpatch(pipe)

diffusers is not imported here (the classes are recognized by name and module), so the integration
costs nothing without it.
"""

from __future__ import annotations


from i2v_kernels.integrations.diffusers import basic, cogvideox, latte, ltx, svd, vae, wan  # noqa: F401  (register)
from i2v_kernels.integrations.diffusers.basic import I2VAttnProcessor
from i2v_kernels.integrations.diffusers.cogvideox import I2VCogVideoXAttnProcessor
from i2v_kernels.integrations.diffusers.core import KNOWN_MODELS, OPS, PatchSummary, patch_summary
from i2v_kernels.integrations.diffusers.ltx import I2VLTXAttnProcessor
from i2v_kernels.integrations.diffusers.patching import patch, unpatch
from i2v_kernels.integrations.diffusers.stream import StreamChunk, decode_streaming, iter_decode, streaming_why_not
from i2v_kernels.integrations.diffusers.wan import I2VWanAttnProcessor

__all__ = [
    "KNOWN_MODELS",
    "OPS",
    "I2VAttnProcessor",
    "I2VCogVideoXAttnProcessor",
    "I2VLTXAttnProcessor",
    "I2VWanAttnProcessor",
    "PatchSummary",
    "StreamChunk",
    "decode_streaming",
    "iter_decode",
    "patch",
    "patch_summary",
    "streaming_why_not",
    "unpatch",
]
