"""A small decoder-only transformer (GPT-2 shaped, pre-norm) with a key/value cache.

Shapes: B batch, T new tokens, P cached (past) tokens, C = n_embd, nh heads, hs = C / nh head size,
V vocabulary. The cache is one ``(k, v)`` pair per block, each ``[B, nh, P, hs]``.

The cache is what context-frozen training needs: run the context once under ``torch.no_grad``,
keep its keys and values, then run the decision tokens with gradients against that cache. The
weights still see the decision tokens (every projection and MLP processes them), but no
gradient flows back through the context's activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nested_lab.parameters import check_positive_ints, check_range

Cache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class GPTConfig:
    """The architecture only; optimizer settings belong to the training code."""

    vocab_size: int
    block_size: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_positive_ints(vocab_size=self.vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                            n_head=self.n_head, n_embd=self.n_embd)
        check_range("dropout", self.dropout, 0, 1, high_open=True)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, T, C = x.shape  # noqa: N806 (the shape legend's letters)
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, nh, P + T, hs)
        mask = _causal_mask(T, k.size(2), x.device)
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y), (k, v)


def _causal_mask(new: int, total: int, device: torch.device) -> torch.Tensor:
    """``[new, total]`` boolean mask: new token i (at position total - new + i) sees positions <= its own."""
    rows = torch.arange(total - new, total, device=device)[:, None]
    return torch.arange(total, device=device)[None, :] <= rows


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, past=None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        attended, present = self.attn(self.ln_1(x), past)
        x = x + attended
        x = x + self.mlp(self.ln_2(x))
        return x, present


class GPT(nn.Module):
    """Token and position embeddings, ``n_layer`` pre-norm blocks, a final norm and a tied head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, past: Cache | None = None) -> tuple[torch.Tensor, Cache]:
        """Logits ``[B, T, V]`` for tokens ``idx [B, T]`` that follow ``past`` (``P`` cached tokens),
        and the cache extended by them."""
        start = past[0][0].size(2) if past else 0
        positions = torch.arange(start, start + idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(positions)  # (B, T, C)
        present = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, past[i] if past else None)
            present.append(kv)
        logits = self.ln_f(x) @ self.wte.weight.T  # (B, T, V), head tied to the embedding
        return logits, present

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]`` without a cache."""
        return self(idx)[0]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, new_tokens: int, *, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """``idx [B, T]`` followed by ``new_tokens`` tokens: greedy when ``temperature`` is 0, else
        sampled from softmax(logits / temperature) with ``generator``. Keeps the cache between steps."""
        logits, cache = self(idx)
        out = [idx]
        for _ in range(new_tokens):
            last = logits[:, -1]
            if temperature > 0:
                probs = F.softmax(last / temperature, dim=-1)
                token = torch.multinomial(probs, 1, generator=generator)
            else:
                token = last.argmax(dim=-1, keepdim=True)
            out.append(token)
            logits, cache = self(token, cache)
        return torch.cat(out, dim=1)
