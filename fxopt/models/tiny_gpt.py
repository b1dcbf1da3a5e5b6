"""An in-repo GPT decoder whose KV cache is explicit, so a decode step traces
as one graph: ``forward(ids, past_k, past_v) -> logits, new_k, new_v``.

Caches are ``[layers, batch, heads, past_len, head_dim]``; ``past_len`` may be 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x, past_k, past_v):
        b, s, d = x.shape
        h = self.ln1(x)
        split = lambda t: t.view(b, s, self.heads, d // self.heads).transpose(1, 2)
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        total = k.shape[2]
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        # query i (at absolute position past+i) sees keys 0..past+i
        q_pos = torch.arange(total - s, total, device=x.device)[:, None]
        k_pos = torch.arange(total, device=x.device)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        att = F.softmax(scores, dim=-1) @ v
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, d))
        x = x + self.down(F.gelu(self.up(self.ln2(x)), approximate="tanh"))
        return x, k, v


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 96, dim: int = 64, heads: int = 4, layers: int = 2, max_len: int = 128):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied, as in GPT-2
        self.dims = (layers, heads, dim // heads)

    def forward(self, ids, past_k, past_v):
        past = past_k.shape[3]
        pos = torch.arange(past, past + ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(pos)[None]
        new_k, new_v = [], []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, past_k[i], past_v[i])
            new_k.append(k)
            new_v.append(v)
        return self.head(self.ln_f(x)), torch.stack(new_k), torch.stack(new_v)

    def empty_cache(self, batch: int, past: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        layers, heads, hd = self.dims
        shape = (layers, batch, heads, past, hd)
        return torch.randn(shape) * 0.5, torch.randn(shape) * 0.5
