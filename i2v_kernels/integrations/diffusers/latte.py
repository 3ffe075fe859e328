"""Latte: the whole model forward in the ``[B, T, S, C]`` layout."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from i2v_kernels.integrations.diffusers.basic import (
    _blocks_hooked, _pixart_block, _pixart_block_why_not, _video_attention_ok, _video_cross_attention,
    _video_self_attention)
from i2v_kernels.integrations.diffusers.core import _RECORDS, _fallback, _layer_norm, _modulate, _Spec, register


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
            if not _video_attention_ok(block.attn1, cross=False):
                return "an attn1 is not plain Attention + AttnProcessor2_0"
            if block.attn2 is not None and (temporal or not _video_attention_ok(block.attn2, cross=True)):
                return "an attn2 is not plain Attention + AttnProcessor2_0 cross-attention"
    if len(model.transformer_blocks) != len(model.temporal_transformer_blocks):
        return "different numbers of spatial and temporal blocks"
    return None


def _latte_forward(self, hidden_states: Tensor, timestep: Optional[Tensor] = None,
                   encoder_hidden_states: Optional[Tensor] = None, encoder_attention_mask: Optional[Tensor] = None,
                   enable_temporal_attentions: bool = True, return_dict: bool = True):
    """``LatteTransformer3DModel.forward`` keeping the tokens ``[B, T, S, C]`` between blocks: spatial
    blocks attend within frames and temporal blocks across frames on views of the same tensor, so the
    two ``[B*T, S, C] <-> [B*S, T, C]`` rearrange copies per layer of the original disappear.
    A prompt mask, gradient checkpointing or a changed processor run the original forward."""
    if (encoder_attention_mask is not None or encoder_hidden_states is None or timestep is None
            or (torch.is_grad_enabled() and self.gradient_checkpointing) or _latte_why_not(self) is not None
            or _blocks_hooked(self.transformer_blocks, self.temporal_transformer_blocks)):
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
                          lambda h: _video_self_attention(a1, h, temporal=False),
                          None if a2 is None else (lambda h: _video_cross_attention(a2, h, context)), fused)
        if enable_temporal_attentions:
            if i == 0 and num_frame > 1:
                x = x + self.temp_pos_embed.to(x.dtype).unsqueeze(2)  # [1, T, 1, C]
            t1 = temporal_block.attn1
            x = _pixart_block(temporal_block, x, block_mods(temporal_block),
                              lambda h: _video_self_attention(t1, h, temporal=True), None, fused)

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


register(
    models=("LatteTransformer3DModel",),
    components={
        "LatteTransformer3DModel": (
            _Spec("attention", "forward", "forward -> [B, T, S, C] layout: spatial_attention / temporal_attention / "
                  "attention (no rearrange copies)", _latte_why_not, _latte_forward),),
    })
