"""diffusers' generic pieces: ``Attention`` with ``AttnProcessor(2_0)`` (Latte, PixArt-style and SVD
attention) and ``BasicTransformerBlock`` with ``ada_norm_single`` (fused adaLN)."""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor

from i2v_kernels.integrations.diffusers.core import (
    _UNSUPPORTED, _attention_extras, _fallback, _kv_lens, _layer_norm, _modulate, _out_proj, _plain_attention,
    _processor_spec, _Processor, _qk_norm_kwargs, _residual_modulate, _sdpa_scale, _Spec, _unwrapped, register)
from i2v_kernels.integrations.diffusers.patching import _any_hooks
from i2v_kernels.ops.adaln import gated_residual
from i2v_kernels.ops.attention import attention, spatial_attention, temporal_attention


class I2VAttnProcessor(_Processor):
    """Replaces ``AttnProcessor2_0`` / ``AttnProcessor`` of ``diffusers.Attention`` (Latte, PixArt-style
    self- and cross-attention on ``[B, N, C]`` tokens) with :func:`i2v_kernels.attention`.

    q ``[B, N, H, D]`` and k, v ``[B, M, H, D]`` are views of the projections. A QK-norm over the head
    dim (LayerNorm or RMSNorm) goes in as the call's ``qk_norm`` arguments. An attention mask becomes
    ``kv_lens`` when it keeps a key prefix per sample; other masks, 4D inputs, extra kwargs and
    group/spatial norms run the original processor."""

    replaces = ("AttnProcessor2_0", "AttnProcessor")

    # (fused projections are not static -- fuse/unfuse_qkv_projections switch them -- so compute checks them)
    why_not = staticmethod(_attention_extras)

    def compute(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, temb: Optional[Tensor] = None, *args, **kwargs) -> Tensor:
        def original():
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        if args or kwargs or hidden_states.dim() != 3 or not _plain_attention(attn):
            return original()
        B, N, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        M = context.shape[1]
        kv_lens = None
        if attention_mask is not None:
            kv_lens = _kv_lens(attention_mask, B, M)
            if kv_lens is _UNSUPPORTED:
                return original()
        H = attn.heads
        D = attn.inner_dim // H
        norm = _qk_norm_kwargs(attn, D, hidden_states.dtype)
        if norm is None:
            return original()
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q = attn.to_q(hidden_states).view(B, N, H, D)
        k = attn.to_k(context).view(B, M, H, D)
        v = attn.to_v(context).view(B, M, H, D)
        out = attention(q, k, v, scale=_sdpa_scale(attn), kv_lens=kv_lens, **norm)
        return _out_proj(attn, out.view(B, N, H * D))


def _pixart_block(block, x: Tensor, mods, attn1: Callable, attn2: Optional[Callable], fused: bool) -> Tensor:
    """The ``ada_norm_single`` branch of ``BasicTransformerBlock.forward`` (Latte, PixArt) with the
    modulation ``mods = (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp)`` given;
    ``fused`` runs the adaLN steps as i2v_kernels ops, else as diffusers writes them."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
    n1, n2 = block.norm1, block.norm2
    if not fused:  # diffusers' own formulas, op for op
        x = gate_msa * attn1(n1(x) * (1 + scale_msa) + shift_msa) + x
        if attn2 is not None:
            x = attn2(x) + x
        return gate_mlp * block.ff(n2(x) * (1 + scale_mlp) + shift_mlp) + x
    a = attn1(_modulate(n1, x, shift_msa, scale_msa))
    if attn2 is not None:
        x = gated_residual(x, a, gate_msa)
        a, gate_msa = attn2(x), None  # PixArt: no norm before the cross-attention, no gate after it
    x, h = _residual_modulate(n2, x, a, gate_msa, shift_mlp, scale_mlp)
    return gated_residual(x, block.ff(h), gate_mlp)


def _pixart_block_why_not(block) -> Optional[str]:
    if getattr(block, "norm_type", None) != "ada_norm_single":
        return f"norm_type={getattr(block, 'norm_type', None)!r} (only 'ada_norm_single' is fused)"
    if block.pos_embed is not None or hasattr(block, "fuser") or block.only_cross_attention:
        return "positional embedding, GLIGEN fuser or only-cross-attention"
    if _layer_norm(block.norm1) is None or _layer_norm(block.norm2) is None:
        return "norm1/norm2 are not LayerNorms"
    return None


def _basic_block_forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                         encoder_hidden_states: Optional[Tensor] = None,
                         encoder_attention_mask: Optional[Tensor] = None, timestep: Optional[Tensor] = None,
                         cross_attention_kwargs: Optional[dict] = None, class_labels=None,
                         added_cond_kwargs=None) -> Tensor:
    """``BasicTransformerBlock.forward`` (``ada_norm_single``) with fused adaLN."""
    if cross_attention_kwargs or self._chunk_size is not None or hidden_states.dim() != 3 or timestep is None:
        return _fallback(self)(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                               timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
    B = hidden_states.shape[0]
    mods = (self.scale_shift_table[None] + timestep.reshape(B, 6, -1)).chunk(6, dim=1)  # [B, 1, C] each
    attn1 = lambda h: self.attn1(h, encoder_hidden_states=None, attention_mask=attention_mask)  # noqa: E731
    attn2 = None
    if self.attn2 is not None:
        attn2 = lambda h: self.attn2(h, encoder_hidden_states=encoder_hidden_states,  # noqa: E731
                                     attention_mask=encoder_attention_mask)
    return _pixart_block(self, hidden_states, mods, attn1, attn2, fused=True)


# ==================================================================================================
# Video tokens [B, T, S, C]: attention on views (Latte's and SVD's model forwards)


def _video_attention_ok(attn, cross: bool) -> bool:
    """A plain ``Attention`` + ``AttnProcessor2_0`` the ``[B, T, S, C]`` helpers below compute exactly."""
    return (type(attn).__name__ == "Attention" and _plain_attention(attn)
            and type(_unwrapped(attn.processor)).__name__ in I2VAttnProcessor.replaces
            and not getattr(attn, "norm_cross", None) and (cross or not attn.is_cross_attention))


def _video_self_attention(attn, x: Tensor, temporal: bool) -> Tensor:
    """Self-attention of ``x [B, T, S, C]`` within each frame (spatial) or across frames (temporal),
    on ``[B, T, S, H, D]`` views of the projections."""
    B, T, S, _ = x.shape
    H = attn.heads
    D = attn.inner_dim // H
    q, k, v = (proj(x).view(B, T, S, H, D) for proj in (attn.to_q, attn.to_k, attn.to_v))
    norm = _qk_norm_kwargs(attn, D, x.dtype)
    fn = temporal_attention if temporal else spatial_attention
    out = fn(q, k, v, scale=_sdpa_scale(attn), **norm)
    return _out_proj(attn, out.view(B, T, S, H * D))


def _video_cross_attention(attn, x: Tensor, context: Tensor) -> Tensor:
    """Every frame of ``x [B, T, S, C]`` attends to its sample's prompt ``context [B, L, C]``: one call
    over ``T * S`` queries instead of projecting the prompt once per frame."""
    B, T, S, _ = x.shape
    H = attn.heads
    D = attn.inner_dim // H
    L = context.shape[1]
    q = attn.to_q(x).view(B, T * S, H, D)
    k = attn.to_k(context).view(B, L, H, D)
    v = attn.to_v(context).view(B, L, H, D)
    out = attention(q, k, v, scale=_sdpa_scale(attn), **_qk_norm_kwargs(attn, D, x.dtype))
    return _out_proj(attn, out.view(B, T, S, H * D))


def _blocks_hooked(*block_lists) -> bool:
    """Hooks on a block or its attention (diffusers' caches: PyramidAttentionBroadcast, FasterCache,
    TaylorSeer ...; offloading; torch forward hooks) act inside calls a ``[B, T, S, C]`` model forward does
    not make: with any of them the original forward runs, through the (patched) blocks and their hooks."""
    return any(_any_hooks(m) for blocks in block_lists for block in blocks
               for m in (block, block.attn1, block.attn2) if m is not None)


register(
    components={
        "BasicTransformerBlock": (
            _Spec("adaln", "forward", "forward -> fused adaLN (adaln_modulate, gated_residual_adaln, gated_residual)",
                  _pixart_block_why_not, _basic_block_forward),),
        "Attention": (_processor_spec(),),
    },
    processors=(I2VAttnProcessor,))
