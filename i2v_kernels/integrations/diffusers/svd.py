"""Stable Video Diffusion: ``UNetSpatioTemporalConditionModel`` and ``AutoencoderKLTemporalDecoder``.

* ``TransformerSpatioTemporalModel.forward``: the tokens stay ``[B*T, S, C]`` (frames major) through the
  temporal blocks too, which attend across frames with :func:`temporal_attention` on ``[B, T, S, H, D]``
  views -- the original rearranges them to ``[B*S, T, C]`` and back in every temporal block -- and
  cross-attend to each sample's first-frame context once (the original repeats it for every one of the
  ``S`` positions and projects every copy). The spatial blocks run as they are (their attention
  processors are ours).
* ``TemporalResnetBlock.forward`` and ``TemporalDecoder.forward``: the ``(3, 1, 1)`` time convolutions
  (zero padding at both ends) through :func:`causal_conv3d`, fed as a causal conv whose cache holds the
  front padding.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from i2v_kernels.integrations.diffusers.basic import (
    _blocks_hooked, _video_attention_ok, _video_cross_attention, _video_self_attention)
from i2v_kernels.integrations.diffusers.core import _fallback, _Spec, register
from i2v_kernels.integrations.diffusers.vae import _conv_why_not, _two_sided_conv

# ==================================================================================================
# UNet: TransformerSpatioTemporalModel in the [B, T, S, C] layout


def _svd_transformer_why_not(model) -> Optional[str]:
    """Static conditions of the ``[B, T, S, C]`` temporal path."""
    if len(model.transformer_blocks) != len(model.temporal_transformer_blocks):
        return "different numbers of spatial and temporal blocks"
    for block in model.temporal_transformer_blocks:
        if type(block).__name__ != "TemporalBasicTransformerBlock" or block._chunk_size is not None:
            return "a temporal block is not a TemporalBasicTransformerBlock without chunked feed-forward"
        if not _video_attention_ok(block.attn1, cross=False):
            return "a temporal attn1 is not plain Attention + AttnProcessor2_0"
        if block.attn2 is not None and not _video_attention_ok(block.attn2, cross=True):
            return "a temporal attn2 is not plain Attention + AttnProcessor2_0 cross-attention"
    return None


def _temporal_block(block, x: Tensor, context: Tensor) -> Tensor:
    """``TemporalBasicTransformerBlock.forward`` on ``x [B, T, S, C]`` with the per-sample ``context
    [B, L, C']`` (the original takes ``[B*S, T, C]`` and the context repeated per position)."""
    residual = x
    h = block.ff_in(block.norm_in(x))
    if block.is_res:
        h = h + residual
    h = _video_self_attention(block.attn1, block.norm1(h), temporal=True) + h
    if block.attn2 is not None:
        h = _video_cross_attention(block.attn2, block.norm2(h), context) + h
    ff = block.ff(block.norm3(h))
    return ff + h if block.is_res else ff


def _svd_transformer_forward(self, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                             image_only_indicator: Optional[Tensor] = None, return_dict: bool = True):
    """``TransformerSpatioTemporalModel.forward`` with the temporal blocks on ``[B, T, S, C]`` views."""
    if (encoder_hidden_states is None or image_only_indicator is None or hidden_states.dim() != 4
            or (torch.is_grad_enabled() and self.gradient_checkpointing) or _svd_transformer_why_not(self) is not None
            or _blocks_hooked(self.temporal_transformer_blocks)):
        return _fallback(self)(hidden_states, encoder_hidden_states, image_only_indicator, return_dict)
    batch_frames, _, height, width = hidden_states.shape
    T = image_only_indicator.shape[-1]
    B, S = batch_frames // T, height * width
    # the original's time context: each sample's first-frame context, for every position
    context = encoder_hidden_states.reshape(B, T, -1, encoder_hidden_states.shape[-1])[:, 0]

    residual = hidden_states
    h = self.norm(hidden_states)
    inner_dim = h.shape[1]
    h = self.proj_in(h.permute(0, 2, 3, 1).reshape(batch_frames, S, inner_dim))
    C = h.shape[-1]
    frame_index = torch.arange(T, device=h.device).repeat(B, 1).reshape(-1)
    emb = self.time_pos_embed(self.time_proj(frame_index).to(dtype=h.dtype))[:, None, :]  # [B*T, 1, C]

    for block, temporal_block in zip(self.transformer_blocks, self.temporal_transformer_blocks):
        h = block(h, encoder_hidden_states=encoder_hidden_states)
        mix = _temporal_block(temporal_block, (h + emb).view(B, T, S, C), context).view(batch_frames, S, C)
        h = self.time_mixer(x_spatial=h, x_temporal=mix, image_only_indicator=image_only_indicator)

    h = self.proj_out(h)
    h = h.reshape(batch_frames, height, width, inner_dim).permute(0, 3, 1, 2).contiguous()
    output = h + residual
    if not return_dict:
        return (output,)
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModelOutput

    return TransformerTemporalModelOutput(sample=output)


# ==================================================================================================
# Time convolutions (UNet and temporal VAE decoder)


def _time_conv_why_not(conv) -> Optional[str]:
    """An ``nn.Conv3d`` zero-padded by ``(kt - 1) // 2`` frames at both ends that ours computes exactly."""
    if not isinstance(conv, nn.Conv3d):
        return "not an nn.Conv3d"
    kt = conv.kernel_size[0]
    if kt % 2 == 0 or conv.stride[0] != 1 or conv.dilation[0] != 1 or conv.padding[0] != (kt - 1) // 2:
        return f"time kernel {kt}, stride {conv.stride[0]}, dilation {conv.dilation[0]}, padding {conv.padding[0]}"
    return _conv_why_not(conv, kt - 1, conv.padding[1:])


def _time_conv(conv: nn.Conv3d, x: Tensor) -> Tensor:
    return _two_sided_conv(conv, x, (conv.kernel_size[0] - 1) // 2, "zeros")


def _temporal_resnet_why_not(block) -> Optional[str]:
    return _time_conv_why_not(block.conv1) or _time_conv_why_not(block.conv2)


def _temporal_resnet_forward(self, input_tensor: Tensor, temb: Optional[Tensor]) -> Tensor:
    """``TemporalResnetBlock.forward`` with both time convolutions through :func:`causal_conv3d`."""
    if input_tensor.dim() != 5 or input_tensor.shape[2] < 1:
        return _fallback(self)(input_tensor, temb)
    h = _time_conv(self.conv1, self.nonlinearity(self.norm1(input_tensor)))
    if self.time_emb_proj is not None:
        temb = self.time_emb_proj(self.nonlinearity(temb))[:, :, :, None, None]
        h = h + temb.permute(0, 2, 1, 3, 4)
    h = _time_conv(self.conv2, self.dropout(self.nonlinearity(self.norm2(h))))
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor)
    return input_tensor + h


def _temporal_decoder_why_not(decoder) -> Optional[str]:
    return _time_conv_why_not(decoder.time_conv_out)


def _temporal_decoder_forward(self, sample: Tensor, image_only_indicator: Tensor, num_frames: int = 1) -> Tensor:
    """``TemporalDecoder.forward`` with the final time convolution through :func:`causal_conv3d`."""
    if torch.is_grad_enabled() and self.gradient_checkpointing:
        return _fallback(self)(sample, image_only_indicator, num_frames)
    sample = self.conv_in(sample)
    upscale_dtype = next(iter(self.up_blocks.parameters())).dtype
    sample = self.mid_block(sample, image_only_indicator=image_only_indicator).to(upscale_dtype)
    for up_block in self.up_blocks:
        sample = up_block(sample, image_only_indicator=image_only_indicator)
    sample = self.conv_act(self.conv_norm_out(sample))
    sample = self.conv_out(sample)
    batch_frames, channels, height, width = sample.shape
    video = sample.reshape(batch_frames // num_frames, num_frames, channels, height, width).permute(0, 2, 1, 3, 4)
    video = _time_conv(self.time_conv_out, video)
    # contiguous, as diffusers' (its conv output is contiguous, so the reshape below copies)
    return video.permute(0, 2, 1, 3, 4).reshape(batch_frames, channels, height, width).contiguous()


register(
    models=("UNetSpatioTemporalConditionModel", "AutoencoderKLTemporalDecoder"),
    components={
        "TransformerSpatioTemporalModel": (
            _Spec("attention", "forward", "forward -> temporal blocks on [B, T, S, C] views: temporal_attention / "
                  "attention (no rearrange copies, context projected once per sample)", _svd_transformer_why_not,
                  _svd_transformer_forward),),
        "TemporalResnetBlock": (
            _Spec("conv3d", "forward", "forward -> causal_conv3d (zero padding at both ends in time)",
                  _temporal_resnet_why_not, _temporal_resnet_forward),),
        "TemporalDecoder": (
            _Spec("conv3d", "forward", "forward -> time_conv_out through causal_conv3d", _temporal_decoder_why_not,
                  _temporal_decoder_forward),),
    })
