"""What one CortexGPT run is: the architecture (:class:`~nested_lab.models.cortex.CortexConfig`)
and its training (:class:`CortexTrainConfig`), kept apart and bundled by :class:`CortexSetup`.

The presets are the documents': ``CortexSetup.original()`` (``cortex_gpt.py`` and its
trainer), ``solutions()`` (every fix of the solutions document, seed 001) and ``phase1()``
(every improvement of the phase-1 summary, seed 003). Each fix is a named set of field
values (:data:`SOLUTION_FIXES`, :data:`PHASE1_FIXES`), and :meth:`CortexSetup.with_`
routes a field name to the half that holds it, so a fix is a one-field change and an
ablation a loop over fields, whichever half the field lives in.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from nested_lab.models.cortex import MAX_POSITIONS, CortexConfig
from nested_lab.parameters import check_choice, check_positive_ints, check_range

SCHEDULES = ("warm_restarts", "warmup_cosine", "constant")
OPTIMIZERS = ("grouped", "separate")
CLIPPINGS = ("global", "separate", "adaptive")
LOSSES = ("cross_entropy", "regularised")
_CHOICES = {"schedule": SCHEDULES, "optimizer": OPTIMIZERS, "clipping": CLIPPINGS, "loss": LOSSES}
_POSITIVE = ("lr", "clip", "memory_clip", "memory_lr_factor")


@dataclass(frozen=True)
class CortexTrainConfig:
    """Every training setting of :mod:`nested_lab.train.cortex_trainer`; the defaults are the
    original trainer's (batch 8 and context 64 here, batch 32 there)."""

    batch_size: int = 8
    context: int = 64
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    group_lr_multipliers: bool = True
    optimizer: str = "grouped"
    memory_lr_factor: float = 0.1
    schedule: str = "warm_restarts"
    restart_fraction: float = 1 / 7
    warmup_fraction: float = 0.1
    clipping: str = "global"
    clip: float = 1.0
    memory_clip: float = 0.5
    ema_decay: float | None = None
    loss: str = "cross_entropy"
    label_smoothing: float = 0.1  # of the "regularised" loss (solutions document)
    spike_guard: bool = False
    spike_factor: float = 5.0
    checkpoint_every: int = 25
    train_chars: int | None = None  # None: the whole corpus

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            check_choice(name, getattr(self, name), allowed)
        check_positive_ints(batch_size=self.batch_size, checkpoint_every=self.checkpoint_every)
        check_range("context", self.context, 1, MAX_POSITIONS, integer=True)
        for name in _POSITIVE:
            check_range(name, getattr(self, name), 0, low_open=True)
        check_range("weight_decay", self.weight_decay, 0)
        check_range("label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        check_range("restart_fraction", self.restart_fraction, 0, 1, low_open=True)
        check_range("warmup_fraction", self.warmup_fraction, 0, 1, high_open=True)
        check_range("spike_factor", self.spike_factor, 1, low_open=True)
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers, got {self.betas!r}")
        for i, beta in enumerate(self.betas):
            check_range(f"betas[{i}]", beta, 0, 1, high_open=True)
        if self.ema_decay is not None:
            check_range("ema_decay", self.ema_decay, 0, 1, low_open=True, high_open=True)
        if self.train_chars is not None:  # one window and its next character
            check_range("train_chars", self.train_chars, self.context + 2, integer=True)


# The fixes of each document, by name, as field values (of either half).
SOLUTION_FIXES: dict[str, dict] = {
    "temperature gate": {"gate": "temperature_softmax"},  # 1. learned temperature, bias, "residual"
    "Gumbel top-k 15%": {"selection": "gumbel_topk", "selection_tau": 0.1, "active_fraction": 0.15},  # 2.
    "gradual consolidation": {"consolidation": "gradual"},  # 3. at intervals, through a transfer gate
    "norms and residual": {"memory_norm": True, "memory_scale": True, "residual_weight": 1.0,
                           "output_norm": True},  # 4.
    "regularised loss": {"loss": "regularised"},  # 5. label smoothing, gate and sparsity terms
    "separate memory optimizer": {"optimizer": "separate", "clipping": "separate"},  # 6. lr x0.1, clip 0.5
    "EMA 0.999": {"ema_decay": 0.999},  # 6. EMA of the weights
    "decaying buffer": {"stm_decay": 0.95},  # 7. bounded memory buffer with decay
}
PHASE1_FIXES: dict[str, dict] = {
    "stop-gradient": {"stop_gradient": True},  # 1. on memory retrieval
    "memory storage fix": {"stm_storage": "row"},  # technical details: one STM entry per row
    "residual 0.1 and LayerNorms": {"residual_weight": 0.1, "layer_norms": True},  # 1.
    "spike rollback": {"spike_guard": True},  # 2. > 5x average, recovery checkpoints
    "interval consolidation": {"consolidation": "interval"},  # 2. structured consolidation
    "adaptive clipping": {"clipping": "adaptive"},  # 3. > 3x average: 10x tighter
    "sigmoid gate": {"gate": "temperature_sigmoid"},  # 4. temperature-controlled sigmoid
    "phase-1 training config": {"lr": 1e-4, "betas": (0.9, 0.98), "clip": 0.5, "schedule": "warmup_cosine",
                                "warmup_fraction": 0.1, "weight_decay": 0.1},  # 5.
}
MODEL_FIELDS = tuple(f.name for f in fields(CortexConfig))
TRAIN_FIELDS = tuple(f.name for f in fields(CortexTrainConfig))


@dataclass(frozen=True)
class CortexSetup:
    """A run's architecture and training settings; ``setup.model`` goes to
    :class:`~nested_lab.models.cortex.CortexGPT`, ``setup.train`` to the trainer."""

    model: CortexConfig = field(default_factory=CortexConfig)
    train: CortexTrainConfig = field(default_factory=CortexTrainConfig)

    @classmethod
    def original(cls, **overrides) -> CortexSetup:
        """``cortex_gpt.py`` and its trainer, as the phase-1 summary says it was run (lr 3e-4)."""
        return cls().with_(**overrides)

    @classmethod
    def solutions(cls, without: str | None = None, **overrides) -> CortexSetup:
        """Every fix of the solutions document (seed 001), optionally ``without`` one of them."""
        return cls().with_(**{**_bundle(SOLUTION_FIXES, without), **overrides})

    @classmethod
    def phase1(cls, without: str | None = None, **overrides) -> CortexSetup:
        """Every improvement of the phase-1 summary (seed 003), optionally ``without`` one of them."""
        return cls().with_(**{**_bundle(PHASE1_FIXES, without), **overrides})

    def with_(self, **changes) -> CortexSetup:
        """A copy with some fields changed, each in the half that holds it."""
        for name in changes:
            check_choice("CortexSetup field", name, MODEL_FIELDS + TRAIN_FIELDS)
        model = {name: value for name, value in changes.items() if name in MODEL_FIELDS}
        train = {name: value for name, value in changes.items() if name in TRAIN_FIELDS}
        return CortexSetup(replace(self.model, **model), replace(self.train, **train))

    def value(self, name: str):
        """The value of field ``name``, from whichever half holds it."""
        return getattr(self.model if name in MODEL_FIELDS else self.train, name)


def _bundle(fixes: dict[str, dict], without: str | None) -> dict:
    if without is not None:
        check_choice("fix", without, tuple(fixes))
    return {name: value for fix, changes in fixes.items() if fix != without for name, value in changes.items()}
