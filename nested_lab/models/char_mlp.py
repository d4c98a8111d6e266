"""A character-level MLP language model (Bengio et al. 2003 style): the training
workload of chapter 1, small enough for many seeds on a CPU, with parameter
norms in the tens like a real network's."""

from __future__ import annotations

import torch
from torch import nn

from nested_lab.parameters import check_positive_ints


class CharMLP(nn.Module):
    """Embed ``context`` characters, concatenate, one hidden tanh layer, logits over the vocabulary."""

    def __init__(self, vocab_size: int, context: int = 8, embed: int = 16, hidden: int = 128,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        check_positive_ints(vocab_size=vocab_size, context=context, embed=embed, hidden=hidden)
        self.context = context
        self.embedding = nn.Embedding(vocab_size, embed)
        self.hidden = nn.Linear(context * embed, hidden)
        self.out = nn.Linear(hidden, vocab_size)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None) -> None:
        nn.init.normal_(self.embedding.weight, generator=generator)
        for layer in (self.hidden, self.out):
            bound = layer.in_features ** -0.5
            nn.init.uniform_(layer.weight, -bound, bound, generator=generator)
            nn.init.zeros_(layer.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens).flatten(1)
        return self.out(torch.tanh(self.hidden(x)))

    def param_groups(self) -> list[dict]:
        """The original's two groups: ``core`` (the MLP) and ``memory`` (the embedding table)."""
        return [
            {"name": "core", "params": [*self.hidden.parameters(), *self.out.parameters()], "depth": 0.6},
            {"name": "memory", "params": list(self.embedding.parameters()), "depth": 0.3},
        ]
