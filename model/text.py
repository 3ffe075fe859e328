"""A small text encoder with a byte-level tokenizer: nothing to download, every string encodable.

Tokens: ``0`` pad, ``1`` begin, ``2`` end, ``3 + b`` for each UTF-8 byte ``b`` of the lower-cased,
whitespace-collapsed prompt. The encoder is a few pre-norm transformer layers (attention through
:func:`i2v_kernels.attention` with ``kv_lens`` so padding is never attended) and a projection to the
DiT's context width. It also returns a pooled vector (mean over the real tokens) for the DiT's
timestep conditioning.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import i2v_kernels
from i2v_kernels.ops.adaln import reference as adaln_ref
from i2v_kernels.ops.attention import reference as attn_ref

from i2v_model.config import TextConfig

__all__ = ["ByteTokenizer", "TextEncoder"]

PAD, BOS, EOS, OFFSET = 0, 1, 2, 3
VOCAB = OFFSET + 256


class ByteTokenizer:
    """``__call__(prompts, max_len) -> (ids [B, max_len] int64, lens [B] int64)``; long prompts are cut."""

    def __init__(self, max_len: int):
        self.max_len = max_len

    @staticmethod
    def normalize(prompt: str) -> str:
        return " ".join(prompt.lower().split())

    def __call__(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        ids = torch.full((len(prompts), self.max_len), PAD, dtype=torch.long)
        lens = torch.empty(len(prompts), dtype=torch.long)
        for i, p in enumerate(prompts):
            body = [OFFSET + b for b in self.normalize(p).encode("utf-8")][: self.max_len - 2]
            seq = [BOS, *body, EOS]
            ids[i, : len(seq)] = torch.tensor(seq)
            lens[i] = len(seq)
        return ids, lens


class TextLayer(nn.Module):
    def __init__(self, width: int, heads: int, use_kernels: bool):
        super().__init__()
        self.heads, self.use_kernels = heads, use_kernels
        self.norm1 = nn.Parameter(torch.ones(width))
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.Parameter(torch.ones(width))
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: Tensor, lens: Tensor) -> Tensor:
        B, N, C = x.shape
        rms = i2v_kernels.rms_norm if self.use_kernels else adaln_ref.rms_norm
        attention = i2v_kernels.attention if self.use_kernels else attn_ref.attention
        q, k, v = self.qkv(rms(x, self.norm1)).view(B, N, 3, self.heads, C // self.heads).unbind(2)
        x = x + self.proj(attention(q, k, v, kv_lens=lens).reshape(B, N, C))
        return x + self.fc2(F.gelu(self.fc1(rms(x, self.norm2)), approximate="tanh"))


class TextEncoder(nn.Module):
    """``forward(prompts: list[str]) -> (tokens [B, L, out_dim], lens [B], pooled [B, out_dim])``."""

    def __init__(self, cfg: TextConfig, use_kernels: bool = True):
        super().__init__()
        self.cfg, self.use_kernels = cfg, use_kernels
        self.tokenizer = ByteTokenizer(cfg.max_len)
        self.embed = nn.Embedding(VOCAB, cfg.width)
        self.pos = nn.Parameter(torch.randn(cfg.max_len, cfg.width) / math.sqrt(cfg.width))
        self.layers = nn.ModuleList(TextLayer(cfg.width, cfg.heads, use_kernels) for _ in range(cfg.depth))
        self.norm_out = nn.Parameter(torch.ones(cfg.width))
        self.out = nn.Linear(cfg.width, cfg.out_dim)

    def forward(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        device = self.embed.weight.device
        ids, lens = self.tokenizer(prompts)
        ids, lens = ids.to(device), lens.to(device)
        # Keys are cut at lens by the attention; the trailing pad queries are dropped from the pool.
        x = self.embed(ids) + self.pos
        for layer in self.layers:
            x = layer(x, lens)
        rms = i2v_kernels.rms_norm if self.use_kernels else adaln_ref.rms_norm
        x = self.out(rms(x, self.norm_out))
        keep = (torch.arange(ids.shape[1], device=device)[None, :] < lens[:, None]).to(x.dtype)
        pooled = (x * keep[..., None]).sum(1) / lens[:, None].to(x.dtype)
        return x, lens, pooled
