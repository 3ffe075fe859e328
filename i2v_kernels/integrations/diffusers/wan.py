"""Wan 2.1 / 2.2: the attention processor (RMS QK-norm, RoPE fused, the I2V image branch) and
``WanTransformerBlock`` (fused adaLN with fp32 modulation)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from i2v_kernels.integrations.diffusers.core import (
    _diffusers_version, _layer_norm, _memo, _modulate, _out_proj, _pair, _processor_spec, _Processor,
    _residual_modulate, _rms, _rms_or_none, _Spec, register)
from i2v_kernels.ops.adaln import gated_residual
from i2v_kernels.ops.attention import attention




def _wan_rope(rotary_emb, N: int, D: int):
    """Wan's ``(freqs_cos, freqs_sin)`` ``[1, N, 1, D]`` as the kernel's interleaved tables ``[1, N, D]``.

    Wan rotates pair ``i`` with ``cos[2i]`` and ``sin[2i + 1]``; repeating exactly those entries over
    each pair gives tables whose ``x * cos + rotate(x) * sin`` is Wan's formula for any input tables."""
    if not _pair(rotary_emb):
        return None
    cos, sin = rotary_emb
    if cos.dim() != 4 or cos.shape != sin.shape or cos.shape[1:] != (N, 1, D) or D % 2:
        return None

    def build():
        return (cos[:, :, 0, 0::2].repeat_interleave(2, dim=-1), sin[:, :, 0, 1::2].repeat_interleave(2, dim=-1))

    return _memo((cos, sin), ("wan-rope",), build)


def _wan_complex_rope(rotary_emb, N: int, D: int):
    """Older diffusers' Wan RoPE (``WanAttnProcessor2_0`` up to 0.34): complex ``freqs [1, 1, N, D/2]``
    multiplying each pair ``(x[2i], x[2i+1])`` read as ``x[2i] + 1j x[2i+1]``. That product is the
    interleaved rotation with ``cos = freqs.real`` and ``sin = freqs.imag`` repeated over each pair,
    as fp32 tables ``[1, N, D]`` (diffusers rotates in fp64 and rounds to the input's dtype)."""
    if not (isinstance(rotary_emb, Tensor) and rotary_emb.is_complex()) or D % 2:
        return None
    if rotary_emb.dim() != 4 or tuple(rotary_emb.shape) != (1, 1, N, D // 2):
        return None

    def build():
        f = rotary_emb[:, 0]
        return tuple(t.float().repeat_interleave(2, dim=-1).contiguous() for t in (f.real, f.imag))

    return _memo((rotary_emb,), ("wan-complex-rope",), build)


def _wan_image_tokens(n_context: int, legacy: bool) -> Optional[int]:
    """How many leading context tokens are image tokens in Wan's I2V cross-attention: 512 text tokens
    follow them (the context length Wan hardcodes); diffusers 0.33's ``WanAttnProcessor2_0`` instead
    took the first 257 (CLIP's token count) whatever the length. None when the older processor comes
    from a diffusers whose version is unknown."""
    if legacy:
        version = _diffusers_version()
        if not version:
            return None
        if version < (0, 34):
            return 257
    return n_context - 512


class I2VWanAttnProcessor(_Processor):
    """Replaces ``WanAttnProcessor`` (``WanAttention``, diffusers >= 0.35) and the older
    ``WanAttnProcessor2_0`` (a generic ``Attention``, diffusers 0.33 / 0.34, complex RoPE): RMSNorm
    QK-norm across heads (over the full inner dim, so :func:`i2v_kernels.rms_norm` on ``[B, N, C]``),
    then :func:`i2v_kernels.attention` with the RoPE fused; in I2V cross-attention the image tokens
    (``add_k_proj`` / ``add_v_proj``, the context's leading tokens) get a second ``attention`` call
    whose output is added, as in Wan."""

    # (newer diffusers' WanAttnProcessor2_0() returns a WanAttnProcessor: that name only appears on
    # the older versions, whose class computes the same math with a complex RoPE)
    replaces = ("WanAttnProcessor", "WanAttnProcessor2_0")

    def compute(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, rotary_emb=None) -> Tensor:
        def original():
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

        legacy = type(self.original).__name__ == "WanAttnProcessor2_0"
        has_image = getattr(attn, "add_k_proj", None) is not None
        if (attention_mask is not None or hidden_states.dim() != 3 or self._parallel_config is not None
                or getattr(attn, "kv_inner_dim", attn.inner_dim) != attn.inner_dim
                or getattr(attn, "inner_kv_dim", attn.inner_dim) != attn.inner_dim
                or (has_image and (rotary_emb is not None or encoder_hidden_states is None))):
            return original()
        B, N, _ = hidden_states.shape
        H = attn.heads
        D = attn.inner_dim // H
        rope = None
        if rotary_emb is not None:
            rope = _wan_complex_rope(rotary_emb, N, D) if legacy else _wan_rope(rotary_emb, N, D)
            if rope is None:
                return original()
        context, image = encoder_hidden_states, None
        if has_image:
            n_image = _wan_image_tokens(encoder_hidden_states.shape[1], legacy)
            if n_image is None:
                return original()
            image, context = encoder_hidden_states[:, :n_image], encoder_hidden_states[:, n_image:]
            if image.shape[1] == 0 or context.shape[1] == 0:
                return original()
        if context is None:
            context = hidden_states
        # the older processor ignores fused projections (it always reads to_q / to_k / to_v)
        fused = getattr(attn, "fused_projections", False) and not legacy
        if fused and not attn.is_cross_attention:
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        elif fused:
            q = attn.to_q(hidden_states)
            k, v = attn.to_kv(context).chunk(2, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        q, k = _rms_or_none(attn.norm_q, q), _rms_or_none(attn.norm_k, k)
        heads = lambda t: t.unflatten(2, (H, -1))  # noqa: E731
        q = heads(q)
        out = attention(q, heads(k), heads(v), rope=rope, rope_style="interleaved")
        if image is not None:
            if fused:
                k_img, v_img = attn.to_added_kv(image).chunk(2, dim=-1)
            else:
                k_img, v_img = attn.add_k_proj(image), attn.add_v_proj(image)
            k_img = _rms(attn.norm_added_k, k_img)
            out = out + attention(q, heads(k_img), heads(v_img))
        return _out_proj(attn, out.flatten(2, 3))


def _wan_block_why_not(block) -> Optional[str]:
    if _layer_norm(block.norm1) is None or _layer_norm(block.norm3) is None:
        return "norm1/norm3 are not LayerNorms"
    if not (isinstance(block.norm2, nn.Identity) or _layer_norm(block.norm2) is not None):
        return "norm2 is neither Identity nor a LayerNorm"
    return None


def _wan_block_forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
                       rotary_emb=None) -> Tensor:
    """``WanTransformerBlock.forward``: FP32LayerNorm + ``scale_shift_table`` modulation and the gated
    residuals fused. The modulation stays fp32 (as Wan computes it) next to a bf16 ``x``; the kernels
    do the math in fp32 and write ``x``'s dtype, as Wan's ``.float() ... .type_as(x)`` does."""
    if temb.dim() == 4:  # Wan 2.2 TI2V: per-token modulation [B, N, 6, C]
        mods = [m.squeeze(2) for m in (self.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)]
    else:  # [B, 6, C]
        mods = (self.scale_shift_table + temb.float()).chunk(6, dim=1)
    shift, scale, gate, c_shift, c_scale, c_gate = mods
    norm_h = _modulate(self.norm1, hidden_states, shift, scale)
    # keywords: older diffusers' Wan blocks hold a generic Attention whose forward takes no positional rotary_emb
    attn = self.attn1(norm_h, rotary_emb=rotary_emb)
    hidden_states = gated_residual(hidden_states, attn, gate)
    norm_h = hidden_states if isinstance(self.norm2, nn.Identity) else _modulate(self.norm2, hidden_states, None, None)
    attn = self.attn2(norm_h, encoder_hidden_states=encoder_hidden_states)
    hidden_states, norm_h = _residual_modulate(self.norm3, hidden_states, attn, None, c_shift, c_scale)
    ff = self.ffn(norm_h)
    return gated_residual(hidden_states, ff, c_gate)


register(
    models=("WanTransformer3DModel",),
    components={
        "WanTransformerBlock": (
            _Spec("adaln", "forward", "forward -> fused adaLN with fp32 modulation (adaln_modulate, "
                  "gated_residual_adaln, gated_residual)", _wan_block_why_not, _wan_block_forward),),
        "WanAttention": (_processor_spec(),),
    },
    processors=(I2VWanAttnProcessor,))
