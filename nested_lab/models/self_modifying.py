"""Self-modifying "Titan" layers of the Nested Learning replica, and the token mixers they stand for.

The replica's document describes a *self-modifying linear layer*: after each forward
pass ``y = x W^T + b`` the layer changes its own weight, with no gradient, by

    x_bar = mean of the inputs over every row,
    W <- clamp(W - lr * (W x_bar) x_bar^T / (|x_bar|^2 + eps), -10, 10)        (the seed rule)

when ``|x_bar|^2 > eps`` (``eps`` = 1e-6 in the in-forward original, 1e-8 in the deferred
one, :data:`NORM_EPS`). The rule has no value target: it is one step of gradient
descent on ``1/2 |W x_bar|^2 / |x_bar|^2``, so it drives ``W x_bar`` to zero by a
factor ``1 - lr`` per update and leaves ``W`` unchanged on every direction orthogonal to
``x_bar``. It stores no association, unlike the delta rule (Yang et al. 2024, Eq. 1:
``S <- S - beta (S k - v) k^T``, a step on ``1/2 |S k - v|^2``) or the Titans memory
(Behrouz et al. 2024, Eqs. 10 and 13), of which it is the special case with value
``v = 0``, one mean key per batch and no forgetting.

Two historical variants of the layer, the option ``update``:

* ``"in_forward"`` (the document's code): the weight is changed in place during the
  forward pass, in training mode only. ``F.linear`` saved ``W`` to compute the input
  gradient, so ``loss.backward()`` then fails autograd's version check;
* ``"deferred"`` (a later version): forward passes, in training and in eval mode, append
  the update to ``pending_updates``; :meth:`SelfModifyingLinear.apply_pending_updates`
  applies them in order. Nothing else empties the list.

:class:`SelfModifyingTitan` (linear -> GRU/LSTM -> linear) and
:class:`SelfModifyingAttention` (softmax attention with self-modifying projections)
are the document's models. The original attention has no causal mask
(``causal=False``); the default applies one. :class:`DeltaRuleLayer` and
:class:`TitansLayer` are the correct counterparts: token mixers whose memory is
written with a value target.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nested_lab.memory.delta_rule import delta_rule_chunked
from nested_lab.memory.self_modifying_rule import NORM_EPS, WEIGHT_LIMIT, update_term
from nested_lab.memory.titans import init_memory, titans_chunked
from nested_lab.parameters import check_choice, check_numbers, check_positive_ints, check_range

UPDATES = ("in_forward", "deferred")
RNNS = ("gru", "lstm")


def _head_dim(dim: int, num_heads: int) -> int:
    """The width of one head: ``dim`` must split evenly into ``num_heads`` heads."""
    check_positive_ints(dim=dim, num_heads=num_heads)
    if dim % num_heads:
        raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
    return dim // num_heads


class SelfModifyingLinear(nn.Module):
    """``y = x W^T + b``, then the seed rule on ``W`` (see the module docstring for ``update``).

    ``W`` starts at ``0.01 * randn(out, in)`` (torch's generator, like ``nn.Linear``: build
    under :func:`nested_lab.runtime.seeded`), ``b`` at zero.
    """

    def __init__(self, in_features: int, out_features: int, self_mod_lr: float = 0.01, bias: bool = True,
                 update: str = "in_forward", normalized: bool = True) -> None:
        super().__init__()
        check_positive_ints(in_features=in_features, out_features=out_features)
        check_range("self_mod_lr", self_mod_lr, 0)
        check_choice("update", update, UPDATES)
        if not isinstance(bias, bool) or not isinstance(normalized, bool):
            raise TypeError(f"bias and normalized must be True or False, got {bias!r} and {normalized!r}")
        self.in_features, self.out_features = in_features, out_features
        self.self_mod_lr, self.update, self.normalized = float(self_mod_lr), update, normalized
        self.weight = nn.Parameter(0.01 * torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_buffer("update_count", torch.zeros((), dtype=torch.long))
        self.pending_updates: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, update_weights: bool = True) -> torch.Tensor:
        """``x`` ``[..., in]`` -> ``[..., out]``; then the seed rule, when ``update_weights``."""
        y = F.linear(x, self.weight, self.bias)
        if update_weights:
            self._self_modify(x)
        return y

    def _self_modify(self, x: torch.Tensor) -> None:
        if self.update == "in_forward" and not self.training:
            return
        term = update_term(self.weight, x, self.self_mod_lr, self.normalized, NORM_EPS[self.update])
        if term is None:
            return
        if self.update == "deferred":
            self.pending_updates.append(term)
            return
        self._apply_update(term)

    @torch.no_grad()
    def _apply_update(self, term: torch.Tensor) -> None:
        self.weight.sub_(term).clamp_(-WEIGHT_LIMIT, WEIGHT_LIMIT)
        self.update_count += 1

    def apply_pending_updates(self) -> int:
        """Apply the pending updates in order, then clamp once (as the deferred original does),
        empty the list, and return how many were applied."""
        applied = len(self.pending_updates)
        if applied:
            with torch.no_grad():
                for term in self.pending_updates:
                    self.weight.sub_(term)
                self.weight.clamp_(-WEIGHT_LIMIT, WEIGHT_LIMIT)
            self.update_count += applied
        self.pending_updates.clear()
        return applied

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"self_mod_lr={self.self_mod_lr}, update={self.update!r}, normalized={self.normalized}")


def apply_pending_updates(module: nn.Module) -> int:
    """Apply the pending updates of every :class:`SelfModifyingLinear` inside ``module``;
    returns how many were applied in all."""
    return sum(layer.apply_pending_updates() for layer in module.modules() if isinstance(layer, SelfModifyingLinear))


class SelfModifyingTitan(nn.Module):
    """The document's "Titan": self-modifying linear -> ReLU -> dropout -> GRU/LSTM ->
    LayerNorm -> self-modifying linear."""

    def __init__(self, input_dim: int = 512, hidden_dim: int = 512, output_dim: int = 512, num_layers: int = 2,
                 self_mod_lr: float = 1e-3, dropout: float = 0.1, rnn: str = "gru",
                 update: str = "in_forward") -> None:
        super().__init__()
        check_positive_ints(input_dim=input_dim, hidden_dim=hidden_dim, output_dim=output_dim, num_layers=num_layers)
        check_choice("rnn", rnn, RNNS)
        check_range("dropout", dropout, 0, 1, high_open=True)
        self.input_proj = SelfModifyingLinear(input_dim, hidden_dim, self_mod_lr, update=update)
        self.dropout = nn.Dropout(dropout)
        recurrent = nn.GRU if rnn == "gru" else nn.LSTM
        self.rnn = recurrent(hidden_dim, hidden_dim, num_layers, batch_first=True,
                             dropout=dropout if num_layers > 1 else 0.0)
        self.norm = nn.LayerNorm(hidden_dim)
        self.output_proj = SelfModifyingLinear(hidden_dim, output_dim, self_mod_lr, update=update)

    def forward(self, x: torch.Tensor, hidden: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
                enable_self_modification: bool = True):
        """``x`` ``[B, T, input_dim]`` -> (output ``[B, T, output_dim]``, the RNN's hidden state)."""
        h = self.dropout(torch.relu(self.input_proj(x, update_weights=enable_self_modification)))
        h, hidden = self.rnn(h, hidden)
        return self.output_proj(self.norm(h), update_weights=enable_self_modification), hidden

    def update_stats(self) -> dict[str, int]:
        """How many times each self-modifying layer has changed its weight."""
        return {"input_proj": int(self.input_proj.update_count), "output_proj": int(self.output_proj.update_count)}


class SelfModifyingAttention(nn.Module):
    """Multi-head softmax attention, ``softmax(q k^T / sqrt(head_dim)) v``, whose four
    projections (no bias) are self-modifying; dropout on the attention weights.

    ``causal=False`` is the document's version: every token reads the whole sequence,
    its future included.
    """

    def __init__(self, dim: int, num_heads: int = 8, self_mod_lr: float = 1e-3, dropout: float = 0.1,
                 causal: bool = True, update: str = "in_forward") -> None:
        super().__init__()
        head_dim = _head_dim(dim, num_heads)
        check_range("dropout", dropout, 0, 1, high_open=True)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be True or False, got {causal!r}")
        self.dim, self.num_heads, self.head_dim, self.causal = dim, num_heads, head_dim, causal
        self.scale = self.head_dim**-0.5
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            SelfModifyingLinear(dim, dim, self_mod_lr, bias=False, update=update) for _ in range(4))
        self.attn_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, enable_self_modification: bool = True) -> torch.Tensor:
        """``x`` ``[B, T, dim]`` -> ``[B, T, dim]``."""
        q, k, v = (self._heads(proj(x, update_weights=enable_self_modification))
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        scores = (q @ k.transpose(-1, -2)) * self.scale
        if self.causal:
            steps = x.shape[1]
            future = torch.ones(steps, steps, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, -math.inf)
        weights = self.attn_dropout(torch.softmax(scores, dim=-1))
        mixed = (weights @ v).transpose(1, 2).reshape(x.shape)
        return self.o_proj(mixed, update_weights=enable_self_modification)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, dim]`` -> ``[B, heads, T, head_dim]``."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)


class DeltaRuleLayer(nn.Module):
    """A DeltaNet token mixer (Yang et al. 2024, Eq. 1): per head, the memory ``S`` is written
    with ``S <- S + beta_t k_t^T (v_t - k_t S)`` and read with ``o_t = q_t S``; ``q`` and ``k``
    are L2-normalised per head and ``beta_t = sigmoid(w_beta x_t)`` is one step size per head
    and token. Causal by construction: token t reads the memory after its own write."""

    def __init__(self, dim: int, num_heads: int = 4, chunk_size: int = 64) -> None:
        super().__init__()
        head_dim = _head_dim(dim, num_heads)
        check_positive_ints(chunk_size=chunk_size)
        self.dim, self.num_heads, self.head_dim, self.chunk_size = dim, num_heads, head_dim, chunk_size
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.beta_proj = nn.Linear(dim, num_heads)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, T, dim]`` -> ``[B, T, dim]``."""
        q = F.normalize(self._heads(self.q_proj(x)), dim=-1)
        k = F.normalize(self._heads(self.k_proj(x)), dim=-1)
        v = self._heads(self.v_proj(x))
        beta = torch.sigmoid(self.beta_proj(x)).transpose(1, 2)  # [B, heads, T]
        mixed, _ = delta_rule_chunked(q, k, v, beta, chunk_size=self.chunk_size)
        return self.o_proj(mixed.transpose(1, 2).reshape(x.shape))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, dim]`` -> ``[B, heads, T, head_dim]``."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)


class TitansLayer(nn.Module):
    """A token mixer around the Titans neural memory (Behrouz et al. 2024, Eqs. 10, 12, 13, 15).

    Keys, values and queries are linear projections of ``x`` (keys and queries L2-normalised);
    per token, ``theta_t = theta_max * sigmoid(w_theta x_t)`` (Eq. 10's step size),
    ``eta_t = sigmoid(w_eta x_t)`` (momentum) and ``alpha_t = sigmoid(w_alpha x_t)`` (forgetting).
    The memory MLP's initial weights are parameters (``init_memory``); each sequence writes its
    own copy with :func:`~nested_lab.memory.titans.titans_chunked` and reads it with the queries.
    The gate biases start at ``gate_biases`` (theta, eta, alpha): with ``alpha`` near 0 the
    memory keeps what it wrote for the whole sequence from the first training step.

    The memory weights are drawn from ``generator``; without one, from a generator seeded by
    torch's global one, like ``nn.Linear`` (build under :func:`nested_lab.runtime.seeded`).
    """

    def __init__(self, dim: int, depth: int = 2, chunk_size: int = 16, hidden: int | None = None,
                 theta_max: float = 0.1, gate_biases: tuple[float, float, float] = (0.0, -2.0, -4.0),
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        check_positive_ints(dim=dim, depth=depth, chunk_size=chunk_size)
        check_range("theta_max", theta_max, 0, low_open=True)
        if not isinstance(gate_biases, tuple | list) or len(gate_biases) != 3:
            raise ValueError(f"gate_biases must hold three numbers (theta, eta, alpha), got {gate_biases!r}")
        check_numbers(**dict(zip(("theta bias", "eta bias", "alpha bias"), gate_biases, strict=True)))
        self.dim, self.chunk_size, self.theta_max = dim, chunk_size, float(theta_max)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.gate_proj = nn.Linear(dim, 3)
        with torch.no_grad():
            self.gate_proj.bias.copy_(torch.tensor(gate_biases, dtype=self.gate_proj.bias.dtype))
        self.o_proj = nn.Linear(dim, dim, bias=False)
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        self.memory = nn.ParameterDict(
            {name: nn.Parameter(weight) for name, weight in init_memory(dim, depth, hidden, generator=generator).items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, T, dim]`` -> ``[B, T, dim]``."""
        keys, queries = F.normalize(self.k_proj(x), dim=-1), F.normalize(self.q_proj(x), dim=-1)
        theta, eta, alpha = torch.sigmoid(self.gate_proj(x)).unbind(-1)
        read, _ = titans_chunked(dict(self.memory.items()), keys, self.v_proj(x), queries,
                                 theta=self.theta_max * theta, eta=eta, alpha=alpha, chunk_size=self.chunk_size)
        return self.o_proj(read)
