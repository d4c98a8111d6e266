"""Training on multi-query associative recall: the settings, the loop, the loss and the score.

:class:`MQARTraining` holds the task (``pairs``, ``gap_power``) and the optimisation (AdamW,
linear warmup then constant lr); :class:`MQARSetup` bundles it with the model's architecture
(:class:`~nested_lab.models.mqar.MQARModelConfig`), so that an ablation is a loop over field
names: ``setup.replace(mixer="delta", lr=3e-3)`` routes each field to the config that holds it.
:func:`train_mqar` trains one model on fresh batches and scores it on a held-out set drawn from
the same seeded generator before any training batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from nested_lab import runtime
from nested_lab.data.mqar import IGNORE_INDEX, check_task, mqar_batch
from nested_lab.models.mqar import MQARModel, MQARModelConfig, build_model
from nested_lab.models.self_modifying import apply_pending_updates
from nested_lab.parameters import check_ints_at_least, check_positive_ints, check_range


@dataclass(frozen=True)
class MQARTraining:
    """The task and the optimisation: ``pairs`` key-value pairs per example, query positions
    shaped by ``gap_power`` (:func:`nested_lab.data.mqar.query_positions`); AdamW at ``lr`` with
    ``weight_decay``, the lr rising linearly over ``warmup_steps`` steps, then constant; ``steps``
    batches of ``batch_size`` examples; ``eval_examples`` held-out examples."""

    pairs: int = 4
    gap_power: float = 1.0
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    steps: int = 300
    batch_size: int = 32
    eval_examples: int = 512

    def __post_init__(self) -> None:
        check_positive_ints(pairs=self.pairs, steps=self.steps, batch_size=self.batch_size,
                            eval_examples=self.eval_examples)
        check_ints_at_least(0, warmup_steps=self.warmup_steps)
        check_range("gap_power", self.gap_power, 0)
        check_range("lr", self.lr, 0, low_open=True)
        check_range("weight_decay", self.weight_decay, 0)


MODEL_FIELDS = tuple(f.name for f in fields(MQARModelConfig))
TRAINING_FIELDS = tuple(f.name for f in fields(MQARTraining))


@dataclass(frozen=True)
class MQARSetup:
    """A model and its training; the task's sizes must fit the model (``seq_len``, ``vocab``)."""

    model: MQARModelConfig = field(default_factory=MQARModelConfig)
    training: MQARTraining = field(default_factory=MQARTraining)

    def __post_init__(self) -> None:
        if not isinstance(self.model, MQARModelConfig) or not isinstance(self.training, MQARTraining):
            raise TypeError(f"an MQARSetup holds an MQARModelConfig and an MQARTraining, got {self!r}")
        check_task(self.model.seq_len, self.training.pairs, self.model.vocab, self.training.gap_power)

    @classmethod
    def of(cls, **changes: object) -> MQARSetup:
        """The defaults with ``changes`` (fields of either config, by name)."""
        return cls().replace(**changes)

    def replace(self, **changes: object) -> MQARSetup:
        """A copy with ``changes``, each field routed to the config that holds it."""
        unknown = sorted(set(changes) - set(MODEL_FIELDS) - set(TRAINING_FIELDS))
        if unknown:
            raise ValueError(f"unknown MQAR fields {unknown}; allowed: {', '.join(MODEL_FIELDS + TRAINING_FIELDS)}")
        model = {name: value for name, value in changes.items() if name in MODEL_FIELDS}
        training = {name: value for name, value in changes.items() if name in TRAINING_FIELDS}
        return MQARSetup(replace(self.model, **model), replace(self.training, **training))


@dataclass
class MQARResult:
    """One training run: held-out accuracy at the query positions, the loss at every step, the
    training's wall time in seconds, and the trained model."""

    setup: MQARSetup
    seed: int
    accuracy: float
    losses: list[float] = field(repr=False)
    seconds: float
    model: MQARModel = field(repr=False)


def train_mqar(setup: MQARSetup, seed: int, show_progress: bool = True) -> MQARResult:
    """Train a fresh model (AdamW, linear warmup then constant lr, gradient norm clipped to 1;
    pending self-modifications applied after each step) on ``steps`` fresh batches and score it
    on ``eval_examples`` held-out examples.

    Data come from ``runtime.generator(seed)``: the held-out set first, then the training batches.
    """
    model_config, training = setup.model, setup.training
    model = build_model(model_config, seed)
    data = runtime.generator(seed)

    def batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return mqar_batch(size, model_config.seq_len, training.pairs, model_config.vocab, data, training.gap_power)

    held_out = batch(training.eval_examples)
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    warmup = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / (training.warmup_steps + 1)))
    losses = []
    start = time.perf_counter()
    model.train()
    for _ in runtime.progress(range(training.steps), desc=f"MQAR {model_config.mixer}", disable=not show_progress):
        inputs, targets = batch(training.batch_size)
        loss = mqar_loss(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        apply_pending_updates(model)
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    return MQARResult(setup, seed, mqar_accuracy(model, *held_out), losses, seconds, model)


def mqar_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at the query positions only (targets of -100 are ignored)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def mqar_accuracy(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 256) -> float:
    """Fraction of query positions (targets != -100) where the argmax logit is the right value;
    evaluated in eval mode, the model's mode restored afterwards. ``inputs``, ``targets``: ``[B, T]``."""
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
