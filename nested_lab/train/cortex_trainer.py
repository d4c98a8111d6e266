"""Training CortexGPT on the stdlib character corpus, with every option of
:class:`~nested_lab.train.cortex_setup.CortexTrainConfig` (chapters 2 and 3).

The original trainer (``cortexgpt/training/train_cortex_gpt.py`` at e52aae1):
AdamW with per-group learning-rate multipliers (STM x2, LTM x0.5, consolidator
x0.8), ``CosineAnnealingWarmRestarts(T_0=1000, T_mult=2)`` stepped every batch,
gradient clipping at 1.0. Here the restart period is a fraction of the run
(``restart_fraction``, 1/7: restarts at 1/7 and 3/7 of the run, as 1000 and 3000
are of 7000 steps). Two choices of the original trainer are not reproduced:
mixed precision (fp16 autocast with a gradient scaler; the replica trains in
fp32 on a CPU), and an extra consolidation every 500 batches, which at the
replica's run lengths would fire only at batch 0, on an empty memory. The
fixes of the two documents are options: separate
optimizers and clipping for memory parameters, adaptive clipping, EMA of the
weights (``torch.optim.swa_utils``), warm-up and cosine decay, the regularised
loss, and loss-spike rollback (:mod:`nested_lab.train.guards`).

:class:`CortexTrainer` runs one (setup, seed); :func:`train` runs it for a
number of optimizer steps and returns a :class:`CortexRun` with one record per
batch. Records stream into a :class:`~nested_lab.train.metrics.MetricStream`,
so a live dashboard can watch a run. The experiments of the chapters (many
seeds, tables, timings) are in :mod:`nested_lab.experiments.cortexgpt_instability`
and :mod:`nested_lab.experiments.cortexgpt_stabilized`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from functools import cache

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from nested_lab import runtime
from nested_lab.data.corpus import CharCorpus, stdlib_text
from nested_lab.memory.gates import gate_entropy
from nested_lab.models.cortex import CortexGPT, CortexOutput
from nested_lab.optim.clipping import AdaptiveClipper
from nested_lab.parameters import check_choice, check_ints_at_least, check_range
from nested_lab.train import metrics
from nested_lab.train.cortex_setup import CortexSetup, CortexTrainConfig
from nested_lab.train.ema import WeightEMA
from nested_lab.train.guards import SpikeGuard

FAULTS = ("corrupt_batch", "grad_spike", "lr_spike", "nan")
GROUP_MULTIPLIERS = {"core": 1.0, "stm": 2.0, "ltm": 0.5, "consolidator": 0.8}
VAL_BATCHES = 4


@cache
def corpus(train_chars: int | None = None) -> CharCorpus:
    """The stdlib character corpus, optionally with only its first ``train_chars`` training
    characters (the original's corpus held 103,600 tokens)."""
    if train_chars is not None:
        return corpus().with_train_chars(train_chars)
    return CharCorpus.from_text(stdlib_text())


@dataclass(frozen=True)
class Fault:
    """An injected failure at batch index ``batch`` (fires once): ``"corrupt_batch"``
    (every label replaced by the token the model finds least likely), ``"grad_spike"``
    (the loss times ``scale`` in the backward pass: every gradient times ``scale``, the
    recorded loss unchanged), ``"lr_spike"`` (learning rate times ``scale`` for one step)
    or ``"nan"`` (a NaN written into a weight)."""

    batch: int
    kind: str
    scale: float = 1e5

    def __post_init__(self) -> None:
        check_choice("fault", self.kind, FAULTS)
        check_ints_at_least(0, batch=self.batch)
        check_range("scale", self.scale, 0, low_open=True)


def build_optimizers(model: CortexGPT, cfg: CortexTrainConfig) -> list[torch.optim.Optimizer]:
    """One grouped AdamW (the original), or the solutions document's two: parameters whose
    name contains "memory" at ``lr * memory_lr_factor`` and weight decay 0.001, the rest at ``lr``."""
    if cfg.optimizer == "separate":
        main = [p for name, p in model.named_parameters() if "memory" not in name]
        memory = [p for name, p in model.named_parameters() if "memory" in name]
        return [torch.optim.AdamW(main, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=True),
                torch.optim.AdamW(memory, lr=cfg.lr * cfg.memory_lr_factor, betas=cfg.betas, weight_decay=1e-3,
                                 foreach=True)]
    multipliers = GROUP_MULTIPLIERS if cfg.group_lr_multipliers else dict.fromkeys(GROUP_MULTIPLIERS, 1.0)
    groups = [{"params": params, "lr": cfg.lr * multipliers[name], "name": name}
              for name, params in model.param_groups().items() if params]
    return [torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=True)]


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: CortexTrainConfig, steps: int):
    """Per-batch learning-rate schedule; None for ``"constant"``."""
    if cfg.schedule == "warm_restarts":
        period = max(1, round(steps * cfg.restart_fraction))
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=period, T_mult=2)
    if cfg.schedule == "warmup_cosine":
        warmup = max(1, round(steps * cfg.warmup_fraction))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return None


def training_loss(out: CortexOutput, targets: torch.Tensor, loss: str, active_fraction: float,
                  label_smoothing: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimise, plain cross-entropy in nats). ``"regularised"`` is the solutions
    document's: label smoothing ``label_smoothing`` (0.1), ``+ 0.1 * mean((g_t - g_{t-1})^2)``,
    ``+ 0.05 * (2 - H)`` with ``H = -mean(g log g)`` over all gate entries, and
    ``+ 0.1 * (mean column weight - active_fraction)^2``."""
    logits, labels = out.logits.flatten(0, 1), targets.flatten()
    cross_entropy = F.cross_entropy(logits, labels)
    if loss == "cross_entropy":
        return cross_entropy, cross_entropy
    gates = out.gates
    smoothness = ((gates[:, 1:] - gates[:, :-1]) ** 2).mean()
    entropy = -(gates * (gates + 1e-8).log()).mean()
    sparsity = (out.column_weights.mean() - active_fraction) ** 2
    total = (F.cross_entropy(logits, labels, label_smoothing=label_smoothing) + 0.1 * smoothness
             + 0.05 * (2.0 - entropy) + 0.1 * sparsity)
    return total, cross_entropy


class CortexTrainer:
    """One training run of one setup and seed, step by step."""

    def __init__(self, setup: CortexSetup, seed: int = 0, steps: int = 500,
                 stream: metrics.MetricStream | None = None) -> None:
        if not isinstance(setup, CortexSetup):
            raise TypeError(f"setup must be a CortexSetup, got {type(setup).__name__}")
        check_ints_at_least(4, steps=steps)
        self.setup, self.seed, self.steps = setup, seed, steps
        config = setup.train
        self.device = runtime.device()
        self.model = CortexGPT(setup.model, corpus().vocab_size, seed).to(self.device)
        self.optimizers = build_optimizers(self.model, config)
        self.schedulers = [build_scheduler(opt, config, steps) for opt in self.optimizers]
        self.clipper = AdaptiveClipper(config.clip) if config.clipping == "adaptive" else None
        self.ema = WeightEMA(self.model, config.ema_decay) if config.ema_decay else None
        self.guard = SpikeGuard(config.spike_factor, checkpoint_every=config.checkpoint_every) \
            if config.spike_guard else None
        self.data = runtime.generator(seed + 1_000)
        self.stream = stream if stream is not None else metrics.MetricStream()
        self.step_count = self.batches = 0
        self.seconds = 0.0
        self.activation_bytes = 0
        if self.guard:
            self.guard.start(self.capture)

    # --- one batch ---------------------------------------------------------------
    def train_step(self, fault: Fault | None = None) -> dict:
        """Train on the next batch; returns its record (also appended to the stream)."""
        start = time.perf_counter()
        cfg = self.setup.train
        lr = self.optimizers[0].param_groups[0]["lr"]  # the rate this batch trains at
        inputs, targets = corpus(cfg.train_chars).sequences("train", cfg.batch_size, cfg.context, self.data)
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        self._inject_before(fault)
        measure = self.batches == 5  # memories are full by then
        saved = _SavedTensorBytes() if measure else contextlib.nullcontext()
        with saved:
            out = self.model(inputs)
            if fault is not None and fault.kind == "corrupt_batch":
                targets = out.logits.detach().argmin(dim=-1)
            loss, cross_entropy = training_loss(out, targets, cfg.loss, self.setup.model.active_fraction,
                                                cfg.label_smoothing)
        if measure:
            self.activation_bytes = saved.bytes
        self.batches += 1
        value = loss.item()
        if self.guard and self.guard.is_spike(value):
            self.step_count = self.guard.rollback(self.restore)
            return self._record({"loss": cross_entropy.item(), "rollback": True, "lr": lr}, start)
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at batch {self.batches} (seed {self.seed}); "
                                     "enable spike_guard to roll back instead")
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        (loss * (fault.scale if fault is not None and fault.kind == "grad_spike" else 1.0)).backward()
        row = {**self._gradient_stats(), **self._clip()}
        self._optimizer_step(lr_factor=fault.scale if fault is not None and fault.kind == "lr_spike" else 1.0)
        self.step_count += 1
        if self.guard:
            self.guard.healthy(value, self.step_count, self.capture)
        row.update(loss=cross_entropy.item(), total_loss=value, rollback=False, lr=lr, **self._output_stats(out))
        return self._record(row, start)

    def _inject_before(self, fault: Fault | None) -> None:
        if fault is not None and fault.kind == "nan":
            with torch.no_grad():
                self.model.output_proj.weight.view(-1)[0] = float("nan")

    def _clip(self) -> dict:
        cfg, params = self.setup.train, list(self.model.parameters())
        if self.clipper:
            norm, threshold = self.clipper(params)
            return {"grad_norm": norm, "clip": threshold}
        if cfg.clipping == "separate":
            named = list(self.model.named_parameters())
            memory = [p for name, p in named if "memory" in name]
            main = [p for name, p in named if "memory" not in name]
            norm = float(nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
            nn.utils.clip_grad_norm_(main, cfg.clip)
            nn.utils.clip_grad_norm_(memory, cfg.memory_clip)
            return {"grad_norm": norm, "clip": cfg.clip}
        return {"grad_norm": float(nn.utils.clip_grad_norm_(params, cfg.clip)), "clip": cfg.clip}

    def _optimizer_step(self, lr_factor: float) -> None:
        for opt, scheduler in zip(self.optimizers, self.schedulers, strict=True):
            saved = [group["lr"] for group in opt.param_groups]
            for group in opt.param_groups:
                group["lr"] *= lr_factor
            opt.step()
            for group, lr in zip(opt.param_groups, saved, strict=True):
                group["lr"] = lr
            if scheduler is not None:
                scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)

    def _gradient_stats(self) -> dict:
        columns = self.model.columns
        grads = [g for g in (columns.gate_weight.grad, columns.gate_bias.grad) if g is not None]
        return {"gate_grad": float(torch.cat([g.flatten() for g in grads]).norm()) if grads else 0.0,
                "gate_grad_none": not grads, "layer_grad_spread": _layer_gradient_spread(self.model)}

    @torch.no_grad()
    def _output_stats(self, out: CortexOutput) -> dict:
        gates, weights = out.gates, out.column_weights
        model = self.model
        return {
            "gate_entropy": float(gate_entropy(gates)),
            "gate_current": float(gates[..., 0].mean()), "gate_stm": float(gates[..., 1].mean()),
            "gate_ltm": float(gates[..., 2].mean()), "gate_max": float(gates.max(dim=-1).values.mean()),
            "stm_share": float(_share(out, 1)), "ltm_share": float(_share(out, 2)),
            "active": float(weights.mean()),
            "zero_output": float((weights.sum(dim=0) < 1e-6).float().mean()),
            "logit_max": float(out.logits.abs().max()),
            "stm_entries": model.stm.entries, "ltm_rows": model.ltm.size,
            "stm_norm": float(torch.cat([model.stm.keys, model.stm.values]).norm()),
            "ltm_norm": float(model.ltm.stored.norm()),
        }

    def _record(self, row: dict, start: float) -> dict:
        self.seconds += time.perf_counter() - start
        row = {"batch": self.batches, "step": self.step_count, **row}
        self.stream.append(row)
        return row

    # --- checkpoints ---------------------------------------------------------------
    def capture(self) -> dict:
        """Everything a rollback restores: parameters, optimizer, scheduler, clipper and EMA
        states, the memories (and the model's random generator), the step count."""
        return {
            "step": self.step_count,
            "model": self.model.state_dict(),
            "memory": self.model.memory_state(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "schedulers": [s.state_dict() if s is not None else None for s in self.schedulers],
            "clipper": self.clipper.state_dict() if self.clipper else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def restore(self, state: dict) -> None:
        self.step_count = state["step"]
        self.model.load_state_dict(state["model"])
        self.model.load_memory_state(state["memory"])
        for opt, saved in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(saved)
        for scheduler, saved in zip(self.schedulers, state["schedulers"], strict=True):
            if scheduler is not None:
                scheduler.load_state_dict(saved)
        if self.clipper:
            self.clipper.load_state_dict(state["clipper"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    # --- evaluation ----------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches: int = VAL_BATCHES) -> float:
        """Validation bits per character on fixed batches, with the EMA weights when there are
        any; the memories are restored afterwards, so evaluating does not change training."""
        cfg, model = self.setup.train, self.model
        state = model.memory_state()
        params = self.ema.as_dict() if self.ema is not None else None
        gen = runtime.generator(54_321)
        model.eval()
        total = 0.0
        for _ in range(batches):
            inputs, targets = corpus().sequences("val", cfg.batch_size, cfg.context, gen)
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            out = model(inputs) if params is None else functional_call(model, params, (inputs,))
            total += float(F.cross_entropy(out.logits.flatten(0, 1), targets.flatten()))
        model.train()
        model.load_memory_state(state)
        return total / batches / math.log(2)

    def state_bytes(self) -> int:
        """Bytes of persistent training state: parameters, gradients, optimizer moments,
        EMA weights, recovery and best checkpoints, memory contents."""
        tensors = [*self.model.parameters(), *(p.grad for p in self.model.parameters() if p.grad is not None)]
        tensors += [v for opt in self.optimizers for s in opt.state.values() for v in s.values()
                    if torch.is_tensor(v)]
        if self.ema is not None:
            tensors += self.ema.params
        tensors += list(self.model.buffers())
        total = sum(t.numel() * t.element_size() for t in tensors)
        total += self.model.ltm.size * self.model.ltm.code_dim * 4  # FAISS codes
        if self.guard:
            checkpoints = [self.guard.recovery, *([self.guard.best] if self.guard.best is not self.guard.recovery
                                                  else [])]
            total += sum(_nbytes(c.state) for c in checkpoints if c is not None)
        return total


@dataclass
class CortexRun:
    """The result of :func:`train`."""

    setup: CortexSetup
    seed: int
    steps: int
    records: pd.DataFrame
    val_bpc: float
    seconds: float
    state_bytes: int
    activation_bytes: int
    rollbacks: int
    clip_spikes: int
    ltm_rows: int
    queued_rows: int
    diverged: bool
    model: CortexGPT

    @property
    def losses(self) -> list[float]:
        """Per-batch training cross-entropy (nats) of the applied steps."""
        return self.records.loc[~self.records["rollback"], "loss"].tolist()

    def summary(self) -> dict[str, float]:
        """Loss-based stability metrics (:mod:`nested_lab.train.metrics`) and run statistics."""
        applied = self.records[~self.records["rollback"]]
        tail = applied.iloc[len(applied) // 2:]
        return {**metrics.summarize(self.losses), "val_bpc": self.val_bpc,
                "grad_norm_p90": float(applied["grad_norm"].quantile(0.9)), "gate_entropy": tail["gate_entropy"].mean(),
                "stm_share": tail["stm_share"].mean(), "ltm_share": tail["ltm_share"].mean(),
                "active": tail["active"].mean(), "zero_output": tail["zero_output"].mean(),
                "gate_grad": tail["gate_grad"].mean(), "logit_max": tail["logit_max"].max(),
                "rollbacks": self.rollbacks, "ltm_rows": self.ltm_rows, "seconds": self.seconds}


def train(setup: CortexSetup, seed: int = 0, steps: int = 500, faults: tuple[Fault, ...] = (),
          stream: metrics.MetricStream | None = None, progress: bool = False,
          stop_on_divergence: bool = False) -> CortexRun:
    """Train until ``steps`` optimizer steps are applied (a rollback sends the count back).

    A non-finite loss raises ``FloatingPointError`` -- or, with ``stop_on_divergence``
    (learning-rate stress tests), ends the run early with ``diverged=True``.
    """
    by_batch = {f.batch: f for f in faults}
    if len(by_batch) != len(faults):
        raise ValueError(f"at most one fault per batch, got batches {[f.batch for f in faults]}")
    trainer = CortexTrainer(setup, seed, steps, stream)
    bar = runtime.progress(total=steps, desc=f"seed {seed}", leave=False) if progress else None
    diverged = False
    while trainer.step_count < steps:
        if trainer.batches >= 3 * steps:
            raise RuntimeError(f"{trainer.batches} batches gave only {trainer.step_count} of {steps} steps: "
                               "training keeps rolling back")
        try:
            trainer.train_step(by_batch.get(trainer.batches))
        except FloatingPointError:
            if not stop_on_divergence:
                raise
            diverged = True
            break
        if bar is not None:
            bar.update(trainer.step_count - bar.n)
    if bar is not None:
        bar.close()
    return CortexRun(setup, seed, steps, trainer.stream.frame, math.inf if diverged else trainer.evaluate(),
                     trainer.seconds, trainer.state_bytes(), trainer.activation_bytes,
                     trainer.guard.rollbacks if trainer.guard else 0,
                     trainer.clipper.spikes if trainer.clipper else 0,
                     trainer.model.ltm.size, trainer.model.consolidator.queued_rows, diverged, trainer.model)


WEIGHT_NAMES = ("weight", "w1", "w2", "gate_weight")  # a layer's weight matrix; not biases, norms, scales


def _layer_gradient_spread(model: nn.Module) -> float:
    """Standard deviation, in decades, of the gradient norms of the weight matrices (parameters
    of two or more dimensions named as in :data:`WEIGHT_NAMES`) that receive a non-zero
    gradient; NaN when fewer than two do."""
    norms = [p.grad.norm() for name, p in model.named_parameters()
             if p.ndim >= 2 and name.rsplit(".", 1)[-1] in WEIGHT_NAMES and p.grad is not None]
    norms = torch.stack(norms) if norms else torch.zeros(0)
    norms = norms[norms > 0]
    return float(norms.log10().std()) if len(norms) > 1 else math.nan


def _share(out: CortexOutput, source: int) -> torch.Tensor:
    """Mean over tokens of ``g_i |v_i| / sum_j g_j |v_j|``: source ``i``'s share of the gate mix
    (0: current, 1: STM, 2: LTM)."""
    norms = torch.stack([out.current.norm(dim=-1), out.stm_read.norm(dim=-1), out.ltm_read.norm(dim=-1)], dim=-1)
    parts = out.gates * norms
    return (parts[..., source] / (parts.sum(dim=-1) + 1e-12)).mean()


def _nbytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_nbytes(v) for v in obj)
    return 0


class _SavedTensorBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes of the distinct tensors autograd saves for the backward pass."""

    def __init__(self) -> None:
        self.bytes, self._seen = 0, set()
        super().__init__(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += key[1]
        return tensor
