"""CogVideoX: the attention processor (QK-norm and RoPE fused) and ``CogVideoXBlock`` (fused adaLN)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from i2v_kernels.integrations.diffusers.core import (
    _layer_norm, _memo, _modulate, _out_proj, _pair, _Processor, _qk_norm_kwargs,
    _residual_modulate, _Spec, register)
from i2v_kernels.ops.adaln import gated_residual
from i2v_kernels.ops.attention import attention




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


register(
    models=("CogVideoXTransformer3DModel",),
    components={
        "CogVideoXBlock": (
            _Spec("adaln", "forward", "forward -> fused adaLN (CogVideoXLayerNormZero: adaln_modulate, "
                  "gated_residual_adaln, gated_residual)", _cogvideox_block_why_not, _cogvideox_block_forward),),
    },
    processors=(I2VCogVideoXAttnProcessor,))
