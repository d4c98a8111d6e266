"""CortexGPT's long-term memory: a compressor, an exact FAISS index, a decompressor.

The original (``cortexgpt/models/cortex_gpt.py`` at e52aae1, ``LongTermMemory``):
a key is compressed by an MLP ``d -> d/2 -> d/4 -> code`` and added to a
``faiss.IndexFlatL2``; a query is compressed the same way, its ``top_k`` nearest
codes are found, their stored values are averaged with inverse-distance weights
``w_i = (1 / (dist_i + 1e-6)) / sum_j (1 / (dist_j + 1e-6))`` (FAISS distances
are squared L2) and the average goes through the decompressor ``code -> d/4 ->
d/2 -> d``. The search runs outside autograd, so only the decompressor learns:
the compressor never receives a gradient.

The original appends one ``[B, code]`` value per consolidated batch entry but
adds ``B`` keys to the index, so ids and values misalign and retrieval breaks
once the batch is larger than one. This replica stores one value per key (the
phase-1 summary's "memory storage fix"). Nothing is ever removed: the original
re-adds the same entries at every consolidation, so the index grows without
bound, and so does the cost of a search.
"""

from __future__ import annotations

import itertools

import faiss
import numpy as np
import torch
from torch import nn

from nested_lab.parameters import check_ints_at_least, check_positive_ints


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class LongTermMemory(nn.Module):
    """Compressed keys in an exact L2 index; values averaged by inverse distance."""

    def __init__(self, dim: int, code_dim: int = 32, top_k: int = 5) -> None:
        super().__init__()
        check_ints_at_least(4, dim=dim)  # the compressor halves it twice
        check_positive_ints(code_dim=code_dim, top_k=top_k)
        self.dim, self.code_dim, self.top_k = dim, code_dim, top_k
        self.compressor = _mlp([dim, dim // 2, dim // 4, code_dim])
        self.decompressor = _mlp([code_dim, dim // 4, dim // 2, dim])
        self.index = faiss.IndexFlatL2(code_dim)
        self.register_buffer("stored", torch.zeros(0, code_dim), persistent=False)

    @property
    def size(self) -> int:
        """Number of stored (key, value) rows."""
        return self.index.ntotal

    def reset(self) -> None:
        self.index.reset()
        self.stored = self.stored[:0]

    @torch.no_grad()
    def write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add ``keys`` ``[N, d]`` (compressed into the index) with ``values`` ``[N, code_dim]``."""
        if not len(keys):
            return
        self.index.add(_to_numpy(self.compressor(keys)))
        self.stored = torch.cat([self.stored, values.detach().to(self.stored.device)])

    def read(self, query: torch.Tensor) -> torch.Tensor:
        """``[N, d]`` -> ``[N, d]``: the decompressed inverse-distance average of the
        ``top_k`` nearest stored values; zeros while the memory is empty."""
        if self.size == 0:
            return torch.zeros_like(query)
        distances, ids = self.search(query)
        weights = torch.where(ids >= 0, 1.0 / (distances + 1e-6), 0.0)
        weights = weights / weights.sum(dim=1, keepdim=True)
        mixed = (weights[..., None] * self.stored[ids.clamp(min=0)]).sum(dim=1)
        return self.decompressor(mixed)

    @torch.no_grad()
    def search(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared L2 distances and ids ``[N, top_k]`` of the nearest compressed keys (id -1: none)."""
        distances, ids = self.index.search(_to_numpy(self.compressor(query)), self.top_k)
        return torch.from_numpy(distances).to(query.device), torch.from_numpy(ids).to(query.device)

    def codes(self) -> torch.Tensor:
        """Every compressed key in the index, ``[size, code_dim]``."""
        return torch.from_numpy(self.index.reconstruct_n(0, self.size)) if self.size else torch.zeros(0, self.code_dim)

    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codes(), self.stored.clone()

    def load_state(self, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        codes, stored = state
        self.index.reset()
        if len(codes):
            self.index.add(_to_numpy(codes))
        self.stored = stored.clone().to(self.stored.device)


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().float().cpu().numpy())
