"""A small causal transformer language model: the ``lm:`` student, and the shape of the shipped LM teacher.

Pre-norm GPT blocks (Radford et al. 2019) in plain torch: token and learned position embeddings, per block
LayerNorm -> causal self-attention by :func:`torch.nn.functional.scaled_dot_product_attention` -> residual,
LayerNorm -> MLP (4x, GELU) -> residual; a final LayerNorm and an output layer tied to the token embedding.
``forward(ids [B, L] int) -> logits [B, L, V]``; position ``j``'s logits predict token ``j + 1``.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["CausalLM"]


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)
        self.p = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.mlp(self.ln2(x)))


class CausalLM(nn.Module):
    """``layers`` pre-norm blocks of width ``dim`` with ``heads`` heads over ``vocab`` ids, up to ``max_len``."""

    takes_ids = True

    def __init__(self, vocab: int, layers: int, dim: int, heads: int, max_len: int = 1024,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.vocab, self.max_len = vocab, max_len
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """The final-norm hidden states [B, L, dim] (the logits are ``hidden @ embed.T``)."""
        ids = ids.to(torch.int64)
        n = ids.shape[1]
        x = self.drop(self.embed(ids) + self.pos(torch.arange(n, device=ids.device)))
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(ids))
