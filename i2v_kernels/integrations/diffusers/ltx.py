"""LTX-Video: the attention processor (RMS QK-norm, per-head RoPE fused) and ``LTXVideoTransformerBlock``."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from i2v_kernels.integrations.diffusers.core import (
    _UNSUPPORTED, _kv_lens, _memo, _out_proj, _pair, _processor_spec, _Processor, _rms, _Spec, register)
from i2v_kernels.ops.adaln import gated_residual
from i2v_kernels.ops.attention import attention, spatial_attention




def _ltx_rope_by_head(rope, B: int, N: int, H: int, D: int):
    """LTX's RoPE tables ``[B, N, H * D]`` differ per head; as ``[B, H, N, D]`` (contiguous) they
    broadcast over :func:`spatial_attention`'s ``[B, T=H, S=N, 1, D]`` view of the heads."""
    if not _pair(rope):
        return None
    cos, sin = rope
    if cos.dim() != 3 or cos.shape != sin.shape or cos.shape[1:] != (N, H * D) or cos.shape[0] not in (1, B):
        return None

    def build():
        return tuple(t.view(t.shape[0], N, H, D).transpose(1, 2).contiguous() for t in (cos, sin))

    return _memo((cos, sin), ("ltx-rope", H), build)


class I2VLTXAttnProcessor(_Processor):
    """Replaces ``LTXVideoAttnProcessor``: RMSNorm across heads (:func:`i2v_kernels.rms_norm`), then

    * self-attention with RoPE: the tables differ per head, so the heads are laid out as the frames of
      :func:`spatial_attention` (``[B, T=H, S=N, 1, D]``, a view) and the RoPE is fused;
    * cross-attention: :func:`i2v_kernels.attention`, the prompt mask as ``kv_lens``.

    Other masks and grouped KV heads run the original processor."""

    # diffusers <= 0.34: LTXVideoAttentionProcessor2_0 on a generic Attention, the same math (the mask
    # repeated per head, RoPE on the flat projections); newer versions' LTXVideoAttentionProcessor2_0()
    # returns an LTXVideoAttnProcessor
    replaces = ("LTXVideoAttnProcessor", "LTXVideoAttentionProcessor2_0")

    def compute(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, image_rotary_emb=None) -> Tensor:
        def original():
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        if (hidden_states.dim() != 3 or self._parallel_config is not None
                or getattr(attn, "inner_kv_dim", attn.inner_dim) != attn.inner_dim):
            return original()
        B, N, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        M = context.shape[1]
        H = attn.heads
        D = attn.inner_dim // H
        kv_lens = rope = None
        if attention_mask is not None:
            kv_lens = _kv_lens(attention_mask, B, M)
            if kv_lens is _UNSUPPORTED:
                return original()
        if image_rotary_emb is not None:
            rope = _ltx_rope_by_head(image_rotary_emb, B, N, H, D)
            if rope is None or M != N or kv_lens is not None:
                return original()
        q = _rms(attn.norm_q, attn.to_q(hidden_states))
        k = _rms(attn.norm_k, attn.to_k(context))
        v = attn.to_v(context)
        if rope is None:
            out = attention(q.view(B, N, H, D), k.view(B, M, H, D), v.view(B, M, H, D), kv_lens=kv_lens)
            return _out_proj(attn, out.view(B, N, H * D))
        by_head = lambda t: t.view(B, N, H, 1, D).transpose(1, 2)  # noqa: E731  [B, H, N, 1, D], a view
        out = spatial_attention(by_head(q), by_head(k), by_head(v), rope=rope, rope_style="interleaved")
        return _out_proj(attn, out.transpose(1, 2).reshape(B, N, H * D))


def _ltx_block_forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
                       image_rotary_emb=None, encoder_attention_mask: Optional[Tensor] = None) -> Tensor:
    """``LTXVideoTransformerBlock.forward`` with ``rms_norm`` and ``gated_residual``. LTX modulates an
    RMSNorm (not a LayerNorm), which the fused adaLN ops do not cover: that product stays in PyTorch."""
    B = hidden_states.size(0)
    n_ada = self.scale_shift_table.shape[0]
    ada = self.scale_shift_table[None, None].to(temb.device) + temb.reshape(B, temb.size(1), n_ada, -1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada.unbind(dim=2)
    norm_h = _rms(self.norm1, hidden_states) * (1 + scale_msa) + shift_msa
    attn = self.attn1(hidden_states=norm_h, encoder_hidden_states=None, image_rotary_emb=image_rotary_emb)
    hidden_states = gated_residual(hidden_states, attn, gate_msa)
    attn = self.attn2(hidden_states, encoder_hidden_states=encoder_hidden_states, image_rotary_emb=None,
                      attention_mask=encoder_attention_mask)
    hidden_states = hidden_states + attn
    norm_h = _rms(self.norm2, hidden_states) * (1 + scale_mlp) + shift_mlp
    ff = self.ff(norm_h)
    return gated_residual(hidden_states, ff, gate_mlp)


register(
    models=("LTXVideoTransformer3DModel",),
    components={
        "LTXVideoTransformerBlock": (
            _Spec("adaln", "forward", "forward -> rms_norm + gated_residual", lambda m: None, _ltx_block_forward),),
        "LTXAttention": (_processor_spec(),),
    },
    processors=(I2VLTXAttnProcessor,))
