"""Small two-layer models trained on multi-query associative recall (:mod:`nested_lab.data.mqar`).

Every model is the same pre-LayerNorm stack (Arora et al. 2023, "Zoology", Sec. 3):
token embedding + learned position embedding, then ``layers`` blocks of

    h <- h + mixer(LN(h)),        h <- h + MLP(LN(h)),

then LayerNorm and a linear head over the vocabulary. Only the token mixer changes:

* ``"attention"``: softmax attention (``F.scaled_dot_product_attention``, causal unless
  ``causal=False``);
* ``"delta"``: :class:`~nested_lab.models.self_modifying.DeltaRuleLayer` (Yang et al. 2024);
* ``"titans"``: :class:`~nested_lab.models.self_modifying.TitansLayer` (Behrouz et al. 2024);
* ``"self_modifying"``: the replica's
  :class:`~nested_lab.models.self_modifying.SelfModifyingAttention`, with
  ``update="deferred"``: the pending weight updates are applied after each optimizer step,
  as the later version of the original does. The model self-modifies in training mode only,
  so evaluation leaves no pending updates behind.

:func:`train_mqar` trains one model with AdamW on fresh batches and scores it on a held-out
set drawn from the same seeded generator before any training batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nested_lab import runtime
from nested_lab.data.mqar import IGNORE_INDEX, mqar_batch
from nested_lab.models.self_modifying import (
    DeltaRuleLayer,
    SelfModifyingAttention,
    TitansLayer,
    apply_pending_updates,
)
from nested_lab.parameters import check_ints_at_least, check_numbers, check_positive_ints

MIXERS = ("attention", "delta", "titans", "self_modifying")
_POSITIVE_INTS = ("dim", "layers", "heads", "vocab", "seq_len", "pairs", "steps", "batch_size", "eval_examples",
                  "chunk_size", "memory_depth")


@dataclass(frozen=True)
class MQARConfig:
    """A model, its task and its training.

    ``causal`` only matters for ``"attention"`` and ``"self_modifying"`` (the delta and Titans
    mixers are causal by construction); ``chunk_size`` for ``"delta"`` and ``"titans"``;
    ``memory_depth`` (the memory MLP's depth, hidden width ``dim``) for ``"titans"``;
    ``self_mod_lr`` for ``"self_modifying"``. ``gap_power`` shapes the query positions
    (:func:`nested_lab.data.mqar.query_positions`); the lr rises linearly over
    ``warmup_steps`` steps, then stays constant.
    """

    mixer: str = "attention"
    causal: bool = True
    dim: int = 64
    layers: int = 2
    heads: int = 4
    vocab: int = 64
    seq_len: int = 64
    pairs: int = 4
    gap_power: float = 1.0
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    steps: int = 300
    batch_size: int = 32
    eval_examples: int = 512
    chunk_size: int = 16
    memory_depth: int = 2
    self_mod_lr: float = 1e-3

    def __post_init__(self) -> None:
        if self.mixer not in MIXERS:
            raise ValueError(f"unknown mixer {self.mixer!r}; allowed: {', '.join(MIXERS)}")
        if not isinstance(self.causal, bool):
            raise TypeError(f"causal must be True or False, got {self.causal!r}")
        check_positive_ints(**{name: getattr(self, name) for name in _POSITIVE_INTS})
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        check_ints_at_least(0, warmup_steps=self.warmup_steps)
        rates = {name: getattr(self, name) for name in ("lr", "weight_decay", "self_mod_lr")}
        check_numbers(**rates)
        for name, value in rates.items():
            if not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        # the data's own checks (pairs vs seq_len and vocab) run on a one-example batch
        mqar_batch(1, self.seq_len, self.pairs, self.vocab, runtime.generator(0), self.gap_power)


class Attention(nn.Module):
    """Multi-head softmax attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int, causal: bool = True) -> None:
        super().__init__()
        self.num_heads, self.causal = num_heads, causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (part.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for part in self.qkv(x).chunk(3, -1))
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(mixed.transpose(1, 2).reshape(x.shape))


class Block(nn.Module):
    """``h + mixer(LN(h))`` then ``h + MLP(LN(h))``, the MLP ``dim -> 4 dim -> dim`` with GELU."""

    def __init__(self, config: MQARConfig) -> None:
        super().__init__()
        self.mixer_norm, self.mlp_norm = nn.LayerNorm(config.dim), nn.LayerNorm(config.dim)
        self.mixer = _mixer(config)
        self.mlp = nn.Sequential(nn.Linear(config.dim, 4 * config.dim), nn.GELU(),
                                 nn.Linear(4 * config.dim, config.dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if isinstance(self.mixer, SelfModifyingAttention):
            h = h + self.mixer(self.mixer_norm(h), enable_self_modification=self.training)
        else:
            h = h + self.mixer(self.mixer_norm(h))
        return h + self.mlp(self.mlp_norm(h))


def _mixer(config: MQARConfig) -> nn.Module:
    if config.mixer == "attention":
        return Attention(config.dim, config.heads, config.causal)
    if config.mixer == "delta":
        return DeltaRuleLayer(config.dim, config.heads, chunk_size=config.chunk_size)
    if config.mixer == "titans":
        return TitansLayer(config.dim, depth=config.memory_depth, chunk_size=config.chunk_size, hidden=config.dim)
    return SelfModifyingAttention(config.dim, config.heads, config.self_mod_lr, dropout=0.0, causal=config.causal,
                                  update="deferred")


class MQARModel(nn.Module):
    """Embeddings -> ``layers`` pre-LN blocks -> LayerNorm -> vocabulary logits."""

    def __init__(self, config: MQARConfig) -> None:
        super().__init__()
        if not isinstance(config, MQARConfig):
            raise TypeError(f"config must be an MQARConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.dim)
        self.position = nn.Embedding(config.seq_len, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``[B, T]`` (``T <= seq_len``) -> logits ``[B, T, vocab]``."""
        _check_tokens(tokens, self.config)
        h = self.embed(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def _check_tokens(tokens: torch.Tensor, config: MQARConfig) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long:
        raise TypeError(f"tokens must be a LongTensor, got {getattr(tokens, 'dtype', type(tokens).__name__)}")
    if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= config.seq_len:
        raise ValueError(f"tokens must have shape [batch, time] with 1 <= time <= {config.seq_len}, "
                         f"got {tuple(tokens.shape)}")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= config.vocab):
        raise ValueError(f"tokens must lie in [0, {config.vocab}), got [{int(tokens.min())}, {int(tokens.max())}]")


@dataclass
class MQARResult:
    """One training run: held-out accuracy at the query positions, the loss at every step, the
    training's wall time in seconds, and the trained model."""

    config: MQARConfig
    seed: int
    accuracy: float
    losses: list[float] = field(repr=False)
    seconds: float
    model: MQARModel = field(repr=False)


def build_model(config: MQARConfig, seed: int) -> MQARModel:
    """An :class:`MQARModel` initialised under ``seed``."""
    with runtime.seeded(seed):
        return MQARModel(config)


def train_mqar(config: MQARConfig, seed: int, show_progress: bool = True) -> MQARResult:
    """Train a fresh model (AdamW, linear warmup then constant lr, gradient norm clipped to 1)
    on ``steps`` fresh batches and score it on ``eval_examples`` held-out examples.

    Data come from ``runtime.generator(seed)``: the held-out set first, then the training batches.
    """
    model = build_model(config, seed)
    data = runtime.generator(seed)
    held_out = mqar_batch(config.eval_examples, config.seq_len, config.pairs, config.vocab, data, config.gap_power)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (config.warmup_steps + 1)))
    losses = []
    start = time.perf_counter()
    model.train()
    for _ in runtime.progress(range(config.steps), desc=f"MQAR {config.mixer}", disable=not show_progress):
        inputs, targets = mqar_batch(config.batch_size, config.seq_len, config.pairs, config.vocab, data,
                                     config.gap_power)
        loss = mqar_loss(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        apply_pending_updates(model)
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    return MQARResult(config, seed, mqar_accuracy(model, *held_out), losses, seconds, model)


def mqar_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at the query positions only (targets of -100 are ignored)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def mqar_accuracy(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 256) -> float:
    """Fraction of query positions (targets != -100) where the argmax logit is the right value;
    evaluated in eval mode, the model's mode restored afterwards."""
    if inputs.shape != targets.shape or inputs.ndim != 2:
        raise ValueError(f"inputs and targets must share a [batch, time] shape, got {tuple(inputs.shape)} and "
                         f"{tuple(targets.shape)}")
    asked = targets != IGNORE_INDEX
    if not asked.any():
        raise ValueError("targets have no query position (every target is -100)")
    was_training = model.training
    model.eval()
    try:
        predictions = torch.cat([model(part).argmax(-1) for part in inputs.split(batch_size)])
    finally:
        model.train(was_training)
    return (predictions[asked] == targets[asked]).float().mean().item()


@torch.no_grad()
def future_leakage(model: MQARModel, inputs: torch.Tensor, position: int) -> float:
    """``max |logits[:, :position + 1] changes|`` when every token after ``position`` is replaced
    by another one (``(token + 1) mod vocab``): 0 for a causal model."""
    if isinstance(position, bool) or not isinstance(position, int):
        raise TypeError(f"position must be an int, got {type(position).__name__}")
    if not 0 <= position < inputs.shape[-1] - 1:
        raise ValueError(f"position must lie in [0, {inputs.shape[-1] - 1}) so that some token follows it, "
                         f"got {position}")
    altered = inputs.clone()
    altered[:, position + 1 :] = (altered[:, position + 1 :] + 1) % model.config.vocab
    was_training = model.training
    model.eval()
    try:
        before, after = model(inputs), model(altered)
    finally:
        model.train(was_training)
    return (before[:, : position + 1] - after[:, : position + 1]).abs().max().item()
