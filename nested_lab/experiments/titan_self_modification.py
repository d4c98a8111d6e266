"""Chapter 4, "Titan self-modification": what the replica's self-modifying layers compute, whether
they store anything, how they fare on multi-query associative recall, and how fast the chunked
memory kernels run.

1. The seed rule (:func:`projection_trace`, :func:`seed_rule_trace`): a
   :class:`~nested_lab.models.self_modifying.SelfModifyingLinear` sees the same batch again and
   again; the rule ``W <- W (I - lr P)``, ``P = x_bar x_bar^T / |x_bar|^2``, predicts
   ``|W x_bar| = (1 - lr)^n |W_0 x_bar|`` and ``|W y|`` constant for ``y`` orthogonal to ``x_bar``.
2. Capacity curves (:func:`capacity_curve`): write ``N`` random key -> value pairs into a memory,
   then read every key. Keys are random unit vectors and values Gaussian vectors in ``d``
   dimensions (:func:`random_pairs`); a memory is written with the pairs in order and read after
   the last write (:func:`write_then_read`); :func:`recall_scores` says how close each read is to
   its value; the load ``N / d`` is the x-axis. The rules (row convention ``read(k) = k S``):

   * ``"hebbian"``: ``S <- S + k^T v``, linear attention's rule. Exact for orthonormal keys; with
     random keys every read carries the cross-talk ``sum_{j != i} (k_i . k_j) v_j``.
   * ``"delta"``: ``S <- S + beta k^T (v - k S)`` (Yang et al. 2024, Eq. 1; option ``beta``,
     default 1), which corrects what the memory already returns for ``k`` before writing.
   * ``"titans"``: the neural memory of Behrouz et al. 2024 (Eqs. 10, 13), read with
     :func:`~nested_lab.memory.titans.memory_forward`; options ``depth`` (default 2), ``hidden``,
     ``theta`` (default 0.1; ``depth=1``, ``theta=0.5``, ``eta = alpha = 0`` with unit keys is the
     delta rule with ``beta = 1``), ``eta`` (0), ``alpha`` (0), ``chunk_size`` (default 1, the
     exact recurrence) and ``generator`` (the initial weights of a deeper memory; a depth-1
     memory starts at zero, like the others).
   * ``"seed"``: the self-modifying rule ``W <- clamp(W - lr (W k) k^T / |k|^2, -10, 10)`` of
     :func:`nested_lab.memory.self_modifying_rule.self_modifying_update`, one pair per call, from
     ``W = 0.01 randn`` (``generator``), read as ``k W^T``; options ``lr`` (default 1e-3),
     ``normalized`` (True). It takes no value: it can store nothing.

3. "Weights changed" is not evidence: :func:`demo_weight_change` repeats the document's
   validation (a ``SelfModifyingTitan`` 64 -> 128 -> 64, two GRU layers, rate 1e-3, one forward
   pass, then five more on the same input: the mean absolute change of the input projection);
   :func:`same_size_changes` produces a change of the same size by a weight decay and by noise.
   :func:`demo_attention_change` repeats the document's Demo 4; :func:`distance_to_delta_rule`
   compares the seed's step with a delta-rule step, :func:`layer_and_delta_writes` a layer's
   writes of random pairs with the delta rule's (and with noise of the same size);
   :func:`backward_succeeds` and :func:`pending_after` test the two historical update variants;
   :func:`update_target_dependence` and :func:`titan_in_context_reach` measure two properties
   fixed by the code: the update ignores the target, and never reaches its own pass's outputs.
4. Multi-query associative recall (:func:`mqar_sweep`, :func:`reading_probes`,
   :func:`future_leakage`) with the models of :mod:`nested_lab.models.mqar`.
5. Kernel speed (:func:`kernel_speeds`): the candidates of one kernel -- the per-token recurrence
   and the chunked forms -- run on the same random inputs, taking turns round after round
   (:func:`nested_lab.experiments.bench.interleaved_timings`), and every chunked output is compared
   with the reference's. :func:`scaling` returns one row per (length, candidate);
   :func:`delta_rule_matmul_fraction` reads the chunked delta rule's speed as a fraction of the
   machine's batched matrix product, timed side by side; :func:`titans_staleness` measures what
   the chunked Titans forms give up against the exact per-token recurrence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from nested_lab import runtime
from nested_lab.data.mqar import hide_last_answer, mqar_batch
from nested_lab.experiments import bench
from nested_lab.memory.delta_rule import delta_rule_chunked, delta_rule_recurrent
from nested_lab.memory.self_modifying_rule import NORM_EPS, self_modifying_update
from nested_lab.memory.titans import (
    GRADIENTS_AT,
    init_memory,
    memory_forward,
    titans_chunked,
    titans_sequential,
)
from nested_lab.models.mqar import MQARModel
from nested_lab.models.self_modifying import SelfModifyingAttention, SelfModifyingLinear, SelfModifyingTitan
from nested_lab.parameters import check_choice, check_positive_ints, check_range
from nested_lab.train.mqar import MQARResult, MQARSetup, mqar_accuracy, train_mqar

# ----- 1. what the update computes ------------------------------------------------------------


def projection_trace(layer: SelfModifyingLinear, batch: Tensor, updates: int) -> pd.DataFrame:
    """Apply the layer's update ``updates`` times to the same ``batch`` ``[N, in]`` and record, per
    update, ``along_mean`` = ``|W x_bar|``, ``orthogonal`` = ``|W y|`` for a fixed unit ``y``
    orthogonal to ``x_bar``, and ``predicted_along_mean`` = ``(1 - lr)^n |W_0 x_bar|``.
    The layer's weight is restored afterwards."""
    if not isinstance(layer, SelfModifyingLinear):
        raise TypeError(f"layer must be a SelfModifyingLinear, got {type(layer).__name__}")
    if not layer.normalized:
        raise ValueError("the (1 - lr)^n prediction holds for normalized=True only")
    if batch.ndim != 2 or batch.shape[1] != layer.in_features:
        raise ValueError(f"batch must have shape [N, {layer.in_features}], got {tuple(batch.shape)}")
    check_positive_ints(updates=updates)
    mean = batch.mean(dim=0)
    mean_unit = mean / mean.norm()
    other = torch.roll(mean_unit, 1)
    orthogonal = other - (other @ mean_unit) * mean_unit
    orthogonal = orthogonal / orthogonal.norm()
    saved = layer.weight.detach().clone()
    rows = []
    with torch.no_grad():
        start = float((layer.weight @ mean_unit).norm())
        for n in range(updates + 1):
            rows.append({"update": n, "along_mean": float((layer.weight @ mean_unit).norm()),
                         "orthogonal": float((layer.weight @ orthogonal).norm()),
                         "predicted_along_mean": start * (1 - layer.self_mod_lr) ** n})
            layer.weight.copy_(self_modifying_update(layer.weight, batch, layer.self_mod_lr, layer.normalized,
                                                    NORM_EPS[layer.update]))
        layer.weight.copy_(saved)
    return pd.DataFrame(rows)


def seed_rule_trace(dim: int, seed: int, updates: int = 300, lr: float = 0.01) -> pd.DataFrame:
    """Section 1's measurement: :func:`projection_trace` of a ``SelfModifyingLinear(dim, dim)`` at
    rate ``lr`` whose weight is ``0.01 randn`` and whose batch is 16 inputs ``N(1, 1)`` (a non-zero
    mean), both drawn from ``runtime.generator(seed)``."""
    probe = SelfModifyingLinear(dim, dim, self_mod_lr=lr)
    generator = runtime.generator(seed)
    with torch.no_grad():
        probe.weight.copy_(0.01 * torch.randn(dim, dim, generator=generator))
    batch = torch.randn(16, dim, generator=generator) + 1.0
    return projection_trace(probe, batch, updates)


# ----- 2. capacity curves ---------------------------------------------------------------------

RULE_OPTIONS: dict[str, tuple[str, ...]] = {
    "hebbian": (),
    "delta": ("beta",),
    "titans": ("depth", "hidden", "theta", "eta", "alpha", "chunk_size", "generator"),
    "seed": ("lr", "normalized", "generator"),
}
RULES = tuple(RULE_OPTIONS)
CURVE_COLUMNS = ("rule", "count", "load", "seed", "cosine", "top1")
RuleTable = Mapping[str, tuple[str, Mapping[str, object]]]  # display name -> (rule, options)


def random_pairs(count: int, dim: int, generator: torch.Generator, batch: int = 1) -> tuple[Tensor, Tensor]:
    """``count`` pairs per batch element: keys ``[batch, count, dim]`` uniform on the unit sphere
    (normalised Gaussians) and values ``[batch, count, dim]`` standard Gaussian, keys drawn first."""
    check_positive_ints(count=count, dim=dim, batch=batch)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    keys = F.normalize(torch.randn(batch, count, dim, generator=generator), dim=-1)
    values = torch.randn(batch, count, dim, generator=generator)
    return keys, values


def recall_scores(retrieved: Tensor, values: Tensor) -> dict[str, float]:
    """How well ``retrieved`` ``[B, N, D]`` matches ``values`` ``[B, N, D]``, row for row.

    ``"cosine"``: the mean cosine similarity of each read to its value (0 for a zero read);
    ``"top1"``: the fraction of reads whose most similar value (by cosine, among the ``N`` values of
    the same batch element) is their own.
    """
    if retrieved.ndim != 3 or retrieved.shape != values.shape:
        raise ValueError(f"retrieved and values must share a shape [batch, count, dim], got "
                         f"{tuple(retrieved.shape)} and {tuple(values.shape)}")
    reads, targets = F.normalize(retrieved, dim=-1), F.normalize(values, dim=-1)
    similarity = reads @ targets.mT  # [B, N, N]: read i against value j
    own = torch.arange(values.shape[1], device=values.device)
    return {"cosine": float(similarity.diagonal(dim1=-2, dim2=-1).mean()),
            "top1": float((similarity.argmax(dim=-1) == own).float().mean())}


def write_then_read(rule: str, keys: Tensor, values: Tensor, **options) -> Tensor:
    """Write every pair of ``keys`` ``[B, N, D_k]``, ``values`` ``[B, N, D_v]`` in order with ``rule``
    (one memory per batch element), then read every key: returns ``[B, N, D_v]``.

    Rules and options: see the module docstring (:data:`RULE_OPTIONS` lists the option names).
    """
    check_choice("rule", rule, RULES)
    unknown = sorted(set(options) - set(RULE_OPTIONS[rule]))
    if unknown:
        raise ValueError(f"unknown options {unknown} for rule {rule!r}; allowed: {RULE_OPTIONS[rule]}")
    if keys.ndim != 3 or values.ndim != 3 or keys.shape[:2] != values.shape[:2] or keys.shape[1] < 1:
        raise ValueError(f"keys, values must have shapes [B, N >= 1, D_k], [B, N, D_v], got {keys.shape}, {values.shape}")
    return _WRITERS[rule](keys, values, **options)


def _hebbian(keys: Tensor, values: Tensor) -> Tensor:
    """``S = sum_i k_i^T v_i``, read ``k S``."""
    return keys @ (keys.mT @ values)


def _delta(keys: Tensor, values: Tensor, beta: float = 1.0) -> Tensor:
    """The delta rule from ``S = 0`` (Yang et al. 2024, Eq. 1), read ``k S``."""
    gates = torch.full(keys.shape[:2], float(beta), dtype=keys.dtype, device=keys.device)[:, None]
    _, state = delta_rule_recurrent(keys[:, None], keys[:, None], values[:, None], gates)
    return keys @ state[:, 0]


def _titans(keys: Tensor, values: Tensor, depth: int = 2, hidden: int | None = None, theta: float = 0.1,
            eta: float = 0.0, alpha: float = 0.0, chunk_size: int = 1,
            generator: torch.Generator | None = None) -> Tensor:
    """Titans' memory (Eqs. 10, 13) written with every pair, read with the final weights."""
    params = init_memory(keys.shape[-1], depth, hidden, values.shape[-1], generator)
    if depth == 1:
        params = {name: torch.zeros_like(weight) for name, weight in params.items()}
    params = {name: weight.to(keys) for name, weight in params.items()}
    _, memory = titans_chunked(params, keys, values, keys, theta=theta, eta=eta, alpha=alpha,
                               chunk_size=chunk_size)
    return memory_forward(memory, keys)


def _seed(keys: Tensor, values: Tensor, lr: float = 1e-3, normalized: bool = True,
          generator: torch.Generator | None = None) -> Tensor:
    """The self-modifying rule, one call per key from ``W = 0.01 randn(D_v, D_k)``; read ``k W^T``."""
    check_range("lr", lr, 0)  # the rule itself trusts its caller
    generator = runtime.generator(0) if generator is None else generator
    reads = []
    for sequence in keys:
        weight = 0.01 * torch.randn(values.shape[-1], keys.shape[-1], generator=generator).to(keys)
        for key in sequence:
            weight = self_modifying_update(weight, key[None], lr, normalized)
        reads.append(sequence @ weight.T)
    return torch.stack(reads)


_WRITERS = {"hebbian": _hebbian, "delta": _delta, "titans": _titans, "seed": _seed}


def capacity_curve(rule: str, counts: Sequence[int], dim: int, seeds: Sequence[int], **options) -> pd.DataFrame:
    """Recall of ``rule`` after writing ``count`` random pairs in ``dim`` dimensions, for every count
    and seed: columns ``rule, count, load (= count / dim), seed, cosine, top1``.

    Each (count, seed) draws its pairs from ``runtime.generator(seed)``; a rule with a random
    initial memory draws it from the same generator, after the pairs, unless ``generator`` is given.
    """
    check_choice("rule", rule, RULES)
    check_positive_ints(dim=dim)
    for name, values in (("counts", counts), ("seeds", seeds)):
        if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
            raise TypeError(f"{name} must be a non-empty sequence of ints, got {values!r}")
    for count in counts:
        check_positive_ints(**{"every count": count})
    rows = []
    for seed in seeds:
        for count in counts:
            generator = runtime.generator(seed)
            keys, values = random_pairs(count, dim, generator)
            extra = {"generator": generator} if "generator" in RULE_OPTIONS[rule] and "generator" not in options else {}
            scores = recall_scores(write_then_read(rule, keys, values, **options, **extra), values)
            rows.append({"rule": rule, "count": count, "load": count / dim, "seed": seed, **scores})
    return pd.DataFrame(rows, columns=list(CURVE_COLUMNS))


def load_counts(dim: int, loads: Sequence[float] = (0.125, 0.25, 0.5, 1, 2, 4)) -> list[int]:
    """The pair counts ``N = max(1, int(dim * load))`` of the given loads, sorted, without repeats."""
    return sorted({max(1, int(dim * load)) for load in loads})


def capacity_curves(rules: RuleTable, counts: Sequence[int], dim: int, seeds: Sequence[int]) -> pd.DataFrame:
    """:func:`capacity_curve` of every rule of ``rules`` (display name -> (rule, options)), one
    table with the display name in column ``name``."""
    return pd.concat([capacity_curve(rule, counts, dim, seeds, **options).assign(name=name)
                      for name, (rule, options) in runtime.progress(rules.items(), desc="rules")], ignore_index=True)


def recall_summary(curves: pd.DataFrame) -> pd.DataFrame:
    """Mean ``cosine`` and ``top1`` over seeds, one row per rule name, one column per load."""
    return curves.groupby(["name", "load"], sort=False)[["cosine", "top1"]].mean().unstack("load")


def low_load_top1(curves: pd.DataFrame, name: str, max_load: float = 0.25) -> pd.Series:
    """Top-1 recall of rule ``name`` per seed, averaged over the loads up to ``max_load``."""
    low = curves[(curves["load"] <= max_load) & (curves["name"] == name)]
    return low.groupby("seed")["top1"].mean()


def low_load_chance(curves: pd.DataFrame, max_load: float = 0.25) -> float:
    """Top-1 recall by chance, ``1 / N``, averaged over the counts at loads up to ``max_load``."""
    return float(np.mean(1 / curves[curves["load"] <= max_load]["count"].unique()))


def forgetting_grid(rules: RuleTable, counts: Sequence[int], dim: int, seeds: Sequence[int],
                    alphas: Sequence[float], reference: tuple[str, pd.DataFrame]) -> dict:
    """A static slider's grid: for each forgetting rate ``alpha``, the mean top-1 recall against
    load of every rule of ``rules`` written with that ``alpha``, beside the fixed curve
    ``reference`` = (its name, its rows of a :func:`capacity_curves` table)."""
    name, rows = reference
    fixed = _mean_top1(rows)
    grid = {}
    for alpha in runtime.progress(alphas, desc="forgetting"):
        grid[alpha] = {rule_name: _mean_top1(capacity_curve(rule, counts, dim, seeds, **{**options, "alpha": alpha}))
                       for rule_name, (rule, options) in rules.items()}
        grid[alpha][name] = fixed
    return grid


def _mean_top1(curve: pd.DataFrame) -> tuple[list[float], list[float]]:
    """(loads, mean top-1 recall at each load) of a capacity curve."""
    mean = curve.groupby("load")["top1"].mean()
    return list(map(float, mean.index)), list(map(float, mean.values))


# ----- 3. "weights changed" is not evidence ---------------------------------------------------

def demo_weight_change(seed: int, passes: int = 5) -> tuple[float, SelfModifyingTitan]:
    """The document's check: mean ``|W_after - W_before|`` of the input projection over ``passes``
    forward passes of a fresh ``SelfModifyingTitan(64, 128, 64, num_layers=2, self_mod_lr=1e-3)``
    on one ``[4, 10, 64]`` Gaussian input, after a first pass. Returns the change and the model."""
    with runtime.seeded(seed):
        model = SelfModifyingTitan(input_dim=64, hidden_dim=128, output_dim=64, num_layers=2, self_mod_lr=1e-3)
    x = torch.randn(4, 10, 64, generator=runtime.generator(seed))
    model.train()
    with torch.no_grad(), runtime.seeded(seed):  # dropout draws from torch's generator
        model(x)
        before = model.input_proj.weight.detach().clone()
        for _ in range(passes):
            model(x)
    return float((model.input_proj.weight.detach() - before).abs().mean()), model


def same_size_changes(weight: Tensor, change: float, seed: int) -> dict[str, Tensor]:
    """Two weights whose mean absolute difference from ``weight`` is ``change``: a weight decay
    ``(1 - lam) W`` with ``lam = change / mean|W|``, and ``W + noise`` with Gaussian noise of
    standard deviation ``change * sqrt(pi / 2)`` (the mean absolute value of N(0, s^2) is
    ``s sqrt(2 / pi)``)."""
    check_range("change", change, 0, low_open=True)
    decay = change / float(weight.abs().mean())
    noise = torch.randn(weight.shape, generator=runtime.generator(seed)) * change * math.sqrt(math.pi / 2)
    return {"decay": (1 - decay) * weight, "noise": weight + noise}


def lookalike_changes(seed: int) -> tuple[float, pd.DataFrame]:
    """The document's weight change (:func:`demo_weight_change`) and a table of the mean absolute
    change of its two same-size lookalikes (:func:`same_size_changes`)."""
    change, titan = demo_weight_change(seed)
    weight = titan.input_proj.weight.detach()
    lookalikes = same_size_changes(weight, change, seed)
    table = pd.DataFrame({name: {"mean |change|": float((changed - weight).abs().mean())}
                          for name, changed in lookalikes.items()}).T
    return change, table


def backward_succeeds(update: str, seed: int) -> bool:
    """Whether ``loss.backward()`` runs after a training-mode forward pass of a small
    ``SelfModifyingTitan`` built with ``update`` (``"in_forward"`` changes the weight that
    autograd saved, and the backward pass refuses)."""
    with runtime.seeded(seed):
        model = SelfModifyingTitan(input_dim=16, hidden_dim=32, output_dim=16, num_layers=1, update=update)
    with runtime.seeded(seed):  # dropout draws from torch's generator
        output, _ = model.train()(torch.randn(2, 5, 16, generator=runtime.generator(seed)))
    try:
        output.square().mean().backward()
    except RuntimeError as error:
        if "modified by an inplace operation" not in str(error):
            raise
        return False
    return True


def pending_after(passes: int, seed: int) -> int:
    """Length of the input projection's pending-update list after ``passes`` forward passes, in eval
    mode, of a ``SelfModifyingTitan(update="deferred")`` whose updates are never applied."""
    with runtime.seeded(seed):
        model = SelfModifyingTitan(input_dim=16, hidden_dim=32, output_dim=16, num_layers=1, update="deferred")
    model.eval()
    x = torch.randn(2, 5, 16, generator=runtime.generator(seed))
    with torch.no_grad():
        for _ in range(passes):
            model(x)
    return len(model.input_proj.pending_updates)


def demo_attention_change(seed: int) -> float:
    """The document's Demo 4: mean ``|W_q after - W_q before|`` of a fresh
    ``SelfModifyingAttention(128, num_heads=8, self_mod_lr=1e-3)`` after one training-mode
    forward pass on a ``[4, 16, 128]`` Gaussian input."""
    with runtime.seeded(seed):
        layer = SelfModifyingAttention(128, num_heads=8, self_mod_lr=1e-3).train()
        before = layer.q_proj.weight.detach().clone()
        with torch.no_grad():
            layer(torch.randn(4, 16, 128, generator=runtime.generator(seed)))
    return float((layer.q_proj.weight.detach() - before).abs().mean())


def distance_to_delta_rule(seed: int, dim: int = 32, lr: float = 0.01) -> float:
    """How far the seed's step is from a delta-rule step on the same input:
    ``|dW_seed - dW_delta| / |dW_delta|`` (Frobenius), with ``dW_seed = -lr (W x) x^T / |x|^2``
    and ``dW_delta = -lr (W x - v) x^T / |x|^2`` for a random weight ``W = 0.01 randn``, input
    ``x`` and target ``v`` -- 0 if the seed's rule were the delta rule."""
    gen = runtime.generator(seed)
    weight = 0.01 * torch.randn(dim, dim, generator=gen)
    x, target = torch.randn(dim, generator=gen), torch.randn(dim, generator=gen)
    seed_step = self_modifying_update(weight, x.unsqueeze(0), lr) - weight
    delta_step = -lr * torch.outer(weight @ x - target, x) / x.square().sum()
    return float((seed_step - delta_step).norm() / delta_step.norm())


def layer_and_delta_writes(seed: int, rate: float = 0.01, dim: int = 32, count: int = 8,
                           memories: int = 16) -> dict[str, float]:
    """Write the same ``count`` random pairs (:func:`random_pairs`, ``memories`` sequences) into a
    ``SelfModifyingLinear(dim, dim, self_mod_lr=rate)`` -- one training-mode forward pass per key,
    the layer has no value input -- and with the delta rule at ``beta = rate``, both from the
    layer's initial weight ``W_0 = 0.01 randn`` (drawn under ``seed``); then read every key.

    Returns ``distance`` = ``|dW_layer - dW_delta| / |dW_delta|`` (Frobenius over all memories;
    0 if the layer's update were the delta rule's), the mean absolute weight change and the top-1
    recall (:func:`recall_scores`) of the layer, the delta rule, and ``noise``: ``W_0`` plus
    Gaussian noise whose mean absolute size is the delta rule's change (:func:`same_size_changes`).
    """
    check_range("rate", rate, 0, low_open=True)
    check_positive_ints(memories=memories)
    keys, values = random_pairs(count, dim, runtime.generator(seed), batch=memories)
    changes = {"layer": [], "delta rule": [], "noise": []}
    reads = {name: [] for name in changes}
    with runtime.threads(1):  # tiny matrices: the thread pool only costs
        for index, (sequence, targets) in enumerate(zip(keys, values, strict=True)):
            _write_one(seed + index, rate, sequence, targets, changes, reads)
    layer_change, delta_change = torch.stack(changes["layer"]), torch.stack(changes["delta rule"])
    result = {"distance": float((layer_change - delta_change).norm() / delta_change.norm())}
    for name in changes:
        result[f"change: {name}"] = float(torch.stack(changes[name]).abs().mean())
        result[f"top1: {name}"] = recall_scores(torch.stack(reads[name]), values)["top1"]
    return result


def _write_one(seed: int, rate: float, keys: Tensor, values: Tensor, changes: dict[str, list[Tensor]],
               reads: dict[str, list[Tensor]]) -> None:
    """One memory of :func:`layer_and_delta_writes`: append each writer's weight change and its
    reads of ``keys`` ``[N, D]`` to ``changes`` and ``reads``."""
    dim = keys.shape[-1]
    with runtime.seeded(seed):
        layer = SelfModifyingLinear(dim, dim, self_mod_lr=rate, bias=False).train()
    start = layer.weight.detach().clone()
    memory = start.clone()
    with torch.no_grad():
        for key, value in zip(keys, values, strict=True):
            layer(key[None])
            memory = memory - rate * torch.outer(memory @ key - value, key)  # the delta rule, W = S^T
    noisy = same_size_changes(start, float((memory - start).abs().mean()), seed)["noise"]
    for name, weight in (("layer", layer.weight.detach()), ("delta rule", memory), ("noise", noisy)):
        changes[name].append(weight - start)
        reads[name].append(keys @ weight.T)


def update_target_dependence(seed: int, dim: int = 16) -> float:
    """How much the self-modification of a ``SelfModifyingLinear(update="deferred")`` depends on
    what the layer should output: one training-mode forward pass on a ``[4, dim]`` input, then
    ``backward`` of the regression loss ``|y - v|^2`` for two different targets ``v``; returns
    ``|term_1 - term_2| / |term_1|`` of the two pending updates. Nested Learning's update (delta
    gradient descent) carries ``-lr grad_y L x^T``, which changes with the target."""
    gen = runtime.generator(seed)
    x = torch.randn(4, dim, generator=gen) + 1.0
    targets = torch.randn(2, 4, dim, generator=gen)
    terms = []
    for target in targets:
        with runtime.seeded(seed):
            layer = SelfModifyingLinear(dim, dim, update="deferred").train()
        (layer(x) - target).square().sum().backward()
        terms.append(layer.pending_updates[0])
    return float((terms[0] - terms[1]).norm() / terms[0].norm())


def titan_in_context_reach(seed: int) -> float:
    """Whether the Titan's self-modification reaches what the model outputs while it reads: the
    largest change of the outputs of one training-mode forward pass of the document's Titan
    (:func:`demo_weight_change`'s sizes, dropout 0) on a ``[4, 10, 64]`` input when its
    self-modification is switched on rather than off, relative to the largest output. A Titans
    memory writes at token ``t`` what later tokens of the same pass read."""
    with runtime.seeded(seed):
        model = SelfModifyingTitan(input_dim=64, hidden_dim=128, output_dim=64, num_layers=2, self_mod_lr=1e-3,
                                   dropout=0.0).train()
    x = torch.randn(4, 10, 64, generator=runtime.generator(seed))
    with torch.no_grad():
        off, _ = model(x, enable_self_modification=False)
        on, _ = model(x, enable_self_modification=True)
        changed = model.input_proj.update_count > 0
    if not changed:
        raise RuntimeError("the Titan did not modify itself; the comparison would be empty")
    return float((on - off).abs().max() / off.abs().max())


def titan_output_is_finite(seed: int) -> bool:
    """Whether the document's Titan (:func:`demo_weight_change`'s model, in training mode) gives a
    finite output on a fresh ``[2, 5, 64]`` Gaussian input."""
    output, _ = demo_weight_change(seed)[1](torch.randn(2, 5, 64, generator=runtime.generator(seed)))
    return bool(torch.isfinite(output).all())


# ----- 4. multi-query associative recall ------------------------------------------------------

def setting_name(seq_len: int, pairs: int) -> str:
    """How a task setting is named in the tables: ``"L=16, N=2"``."""
    return f"L={seq_len}, N={pairs}"


def mqar_sweep(mixers: Mapping[str, Mapping[str, object]], settings: Sequence[tuple[int, int]],
               lrs: Sequence[float], seed: int, **fields: object) -> tuple[dict, pd.DataFrame]:
    """Train one model per (setting, mixer, learning rate) on one thread, seed ``seed``:
    ``mixers`` maps a display name to its model fields, ``settings`` holds (sequence length,
    pairs), ``fields`` are the other fields of every :class:`~nested_lab.train.mqar.MQARSetup`.
    Every setup is built (and checked) before the first run. Returns the results by
    ``(name, seq_len, pairs, lr)`` and a table ``model, setting, lr, accuracy, seconds``."""
    setups = {(name, seq_len, pairs, lr): MQARSetup.of(**mixers[name], seq_len=seq_len, pairs=pairs, lr=lr, **fields)
              for seq_len, pairs in settings for name in mixers for lr in lrs}
    runs, rows = {}, []
    with runtime.threads(1):
        for key, setup in runtime.progress(setups.items(), desc="MQAR runs"):
            runs[key] = result = train_mqar(setup, seed, show_progress=False)
            rows.append({"model": key[0], "setting": setting_name(*key[1:3]), "lr": key[3],
                         "accuracy": result.accuracy, "seconds": result.seconds})
    return runs, pd.DataFrame(rows)


def best_per_setting(table: pd.DataFrame) -> pd.DataFrame:
    """The row of the best learning rate (highest accuracy) of every model and setting."""
    return table.loc[table.groupby(["model", "setting"], sort=False)["accuracy"].idxmax()]


@torch.no_grad()
def future_leakage(model: MQARModel, inputs: Tensor, position: int) -> float:
    """``max |logits[:, :position + 1] changes|`` when every token after ``position`` is replaced
    by another one (``(token + 1) mod vocab``): 0 for a causal model."""
    check_range("position", position, 0, inputs.shape[-1] - 2, integer=True)
    altered = inputs.clone()
    altered[:, position + 1 :] = (altered[:, position + 1 :] + 1) % model.config.vocab
    was_training = model.training
    model.eval()
    try:
        before, after = model(inputs), model(altered)
    finally:
        model.train(was_training)
    return (before[:, : position + 1] - after[:, : position + 1]).abs().max().item()


def reading_probes(runs: Mapping[str, MQARResult], setting: tuple[int, int], vocab: int,
                   seed: int) -> pd.DataFrame:
    """Two tests of reading ahead, one row per model of ``runs`` (name -> its best run), on 256
    fresh sequences of ``setting`` from ``runtime.generator(seed)``, one thread: the largest
    output change at positions ``<= L/2`` when every later token changes (:func:`future_leakage`,
    64 sequences), the accuracy, and the last query's accuracy as it is and with its answer hidden
    (:func:`~nested_lab.data.mqar.hide_last_answer`)."""
    inputs, targets = mqar_batch(256, *setting, vocab, runtime.generator(seed))
    last_inputs, last_targets = hide_last_answer(inputs, targets)
    middle = setting[0] // 2
    with runtime.threads(1):
        return pd.DataFrame({name: {
            f"max |output change| at t <= {middle}": future_leakage(run.model, inputs[:64], middle),
            "accuracy": mqar_accuracy(run.model, inputs, targets),
            "last query": mqar_accuracy(run.model, inputs, last_targets),
            "last query, answer hidden": mqar_accuracy(run.model, last_inputs, last_targets),
        } for name, run in runs.items()}).T


# ----- 5. kernel speed ------------------------------------------------------------------------

Candidates = Mapping[str, Callable[[], Tensor]]
GOAL_LENGTH = 1024  # the sequence length at which the book states its speed goals


def delta_rule_candidates(length: int, heads: int = 4, dim: int = 64, chunk_size: int = 64,
                          seed: int = 0, other_chunk_sizes: Sequence[int] = (32,)) -> Candidates:
    """The recurrent delta rule (the reference, first) and the chunked form with each inverse at
    ``chunk_size``, then the triangular-solve form at each of ``other_chunk_sizes`` (named
    ``"delta: chunked, triangular solve, chunk C"``), on ``(1, heads, length, dim)`` unit keys and
    queries, Gaussian values and ``beta`` in (0, 1)."""
    gen = runtime.generator(seed)
    q, k = (F.normalize(torch.randn(1, heads, length, dim, generator=gen), dim=-1) for _ in range(2))
    v = torch.randn(1, heads, length, dim, generator=gen)
    beta = torch.rand(1, heads, length, generator=gen)
    candidates = {
        "delta: recurrent": lambda: delta_rule_recurrent(q, k, v, beta)[0],
        "delta: chunked, triangular solve": lambda: delta_rule_chunked(q, k, v, beta, chunk_size)[0],
        "delta: chunked, row substitution": lambda: delta_rule_chunked(q, k, v, beta, chunk_size,
                                                                       inverse="substitution")[0],
    }
    for size in other_chunk_sizes:
        candidates[f"delta: chunked, triangular solve, chunk {size}"] = (
            lambda size=size: delta_rule_chunked(q, k, v, beta, size)[0])
    return candidates


def titans_candidates(length: int, heads: int = 4, dim: int = 64, chunk_size: int = 64,
                      seed: int = 0) -> Candidates:
    """The sequential Titans memory with gradients refreshed every ``chunk_size`` tokens (the
    chunk-parallel semantics; the reference, first) and the chunk-parallel form in its two gradient
    forms (``"Titans: chunk-parallel"`` is the default, factored one; ``", vmap"`` takes per-token
    gradients with ``torch.func``); 2-layer memory, ``heads`` independent sequences of ``length``
    tokens, fixed gates."""
    gen = runtime.generator(seed)
    params = init_memory(dim, depth=2, generator=gen)
    keys, queries = (F.normalize(torch.randn(heads, length, dim, generator=gen), dim=-1) for _ in range(2))
    values = torch.randn(heads, length, dim, generator=gen)
    gates = {"theta": 0.02, "eta": 0.5, "alpha": 0.02}
    return {
        "Titans: sequential": lambda: titans_sequential(params, keys, values, queries, gradient_every=chunk_size,
                                                        **gates)[0],
        "Titans: chunk-parallel": lambda: titans_chunked(params, keys, values, queries, chunk_size=chunk_size,
                                                         **gates)[0],
        "Titans: chunk-parallel, vmap": lambda: titans_chunked(params, keys, values, queries, chunk_size=chunk_size,
                                                               gradient_form="vmap", **gates)[0],
    }


def scaling(make_candidates: Callable[[int], Candidates], lengths: Sequence[int], rounds: int = 3,
            calls: int = 1) -> pd.DataFrame:
    """Time the candidates of ``make_candidates(length)`` for every length, warm, best of ``rounds``
    (gradients off). Columns: ``length, candidate, seconds, speedup`` (reference seconds / seconds,
    the reference being the first candidate) and ``max_error`` (largest absolute difference of the
    outputs from the reference's)."""
    if not lengths:
        raise ValueError("give at least one sequence length")
    rows = []
    with torch.no_grad():
        for length in runtime.progress(lengths, desc="sequence lengths"):
            candidates = make_candidates(length)
            reference_name = next(iter(candidates))
            reference = candidates[reference_name]()
            errors = {name: float((run() - reference).abs().max()) for name, run in candidates.items()}
            seconds = bench.interleaved_timings(candidates, rounds=rounds, calls=calls, warmup=1)
            rows += [{"length": length, "candidate": name, "seconds": seconds[name],
                      "speedup": seconds[reference_name] / seconds[name], "max_error": errors[name]}
                     for name in candidates]
    return pd.DataFrame(rows)


def kernel_speeds(delta_lengths: Sequence[int], titans_lengths: Sequence[int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Section 5's benchmark on two threads: :func:`scaling` of :func:`delta_rule_candidates` (3
    calls per round) and of :func:`titans_candidates` (1 call). Both length lists must hold
    :data:`GOAL_LENGTH`, where the speed goals are stated."""
    for name, lengths in (("delta_lengths", delta_lengths), ("titans_lengths", titans_lengths)):
        if GOAL_LENGTH not in lengths:
            raise ValueError(f"{name} must include {GOAL_LENGTH} (a speed goal is stated there), got {lengths}")
    with runtime.threads(2):
        delta_speed = scaling(delta_rule_candidates, delta_lengths, calls=3)
        titans_speed = scaling(titans_candidates, titans_lengths)
    return delta_speed, titans_speed


def at_length(table: pd.DataFrame, length: int) -> pd.DataFrame:
    """The rows of a :func:`scaling` table at one sequence length, indexed by candidate."""
    return table[table["length"] == length].set_index("candidate")


def speed_goals(delta_long: pd.DataFrame, titans_1024: pd.DataFrame, matmul_fraction: float,
                longest: int) -> pd.DataFrame:
    """The book's speed goals, each with its target, this run's measurement and whether it was met:
    ``delta_long`` and ``titans_1024`` are :func:`at_length` rows of the delta rule at its longest
    length ``longest`` and of Titans at 1024; ``matmul_fraction`` from
    :func:`delta_rule_matmul_fraction`."""
    solve = delta_long[delta_long.index.str.startswith("delta: chunked, triangular solve")]
    substitution = (delta_long.loc["delta: chunked, row substitution", "seconds"]
                    / delta_long.loc["delta: chunked, triangular solve", "seconds"])
    return pd.DataFrame([
        {"goal": f"chunked delta rule vs recurrence, T={longest} (faster chunk size)", "target": 15.0,
         "measured": solve["speedup"].max()},
        {"goal": "triangular solve vs row substitution", "target": 1.5, "measured": substitution},
        {"goal": "achieved / batched-matmul GFLOP/s (chunk 64)", "target": 0.5, "measured": matmul_fraction},
        {"goal": "chunk-parallel vs sequential Titans, T=1024", "target": 5.0,
         "measured": titans_1024.loc["Titans: chunk-parallel", "speedup"]},
        {"goal": "... the same, gradients by vmap(grad)", "target": 5.0,
         "measured": titans_1024.loc["Titans: chunk-parallel, vmap", "speedup"]},
    ]).assign(met=lambda t: t["measured"] >= t["target"])


def delta_rule_matmul_fraction(length: int, heads: int = 4, dim: int = 64, chunk_size: int = 64,
                               seed: int = 0, rounds: int = 3) -> dict[str, float]:
    """How close the chunked delta rule comes to the machine's batched matrix product: the kernel at
    ``chunk_size`` on the inputs of :func:`delta_rule_candidates` and a ``torch.bmm`` of 256
    ``dim x dim`` matrices, timed in the same interleaved rounds so that both see the same machine.
    Returns ``kernel_gflops`` (:func:`bench.delta_rule_flops` over the best round), ``matmul_gflops``
    and their ratio ``fraction``."""
    kernel = delta_rule_candidates(length, heads, dim, chunk_size, seed,
                                   other_chunk_sizes=())["delta: chunked, triangular solve"]
    product, product_flops = bench.batched_matmul(dim, batch=256)
    with torch.no_grad():
        seconds = bench.interleaved_timings({"kernel": kernel, "matmul": product}, rounds=rounds, calls=3, warmup=1)
    kernel_gflops = bench.delta_rule_flops(1, heads, length, dim, dim, chunk_size) / seconds["kernel"] / 1e9
    matmul_gflops = product_flops / seconds["matmul"] / 1e9
    return {"kernel_gflops": kernel_gflops, "matmul_gflops": matmul_gflops, "fraction": kernel_gflops / matmul_gflops}


def titans_staleness(length: int = 256, chunk_sizes: Sequence[int] = (4, 16, 64), seed: int = 0) -> pd.DataFrame:
    """What taking gradients at stale weights costs: the relative error
    ``|y - y_exact| / |y_exact|`` of the chunk-parallel Titans memory against the exact per-token
    recurrence, for gradients at each chunk's start (the paper) and at the call's start (the
    common approximation). 2-layer memory, 4 sequences of ``length`` tokens, fixed gates."""
    gen = runtime.generator(seed)
    params = init_memory(64, depth=2, generator=gen)
    keys, queries = (F.normalize(torch.randn(4, length, 64, generator=gen), dim=-1) for _ in range(2))
    values = torch.randn(4, length, 64, generator=gen)
    gates = {"theta": 0.02, "eta": 0.5, "alpha": 0.02}
    with torch.no_grad():
        exact = titans_sequential(params, keys, values, queries, **gates)[0]
        rows = [{"chunk size": size, "gradients at": where,
                 "relative error": float((titans_chunked(params, keys, values, queries, chunk_size=size,
                                                         gradients_at=where, **gates)[0] - exact).norm()
                                         / exact.norm())}
                for size in chunk_sizes for where in GRADIENTS_AT]
    return pd.DataFrame(rows)


def top1_extreme_by_seed(curves: pd.DataFrame, names: Sequence[str], loads: Sequence[float],
                         extreme: str) -> list[float]:
    """Per seed, the lowest (``extreme="min"``) or highest (``"max"``) top-1 recall among the
    rules ``names`` at the loads ``loads``: one value per independent seeded run."""
    check_choice("extreme", extreme, ("min", "max"))
    rows = curves[curves["name"].isin(list(names)) & curves["load"].isin(list(loads))]
    per_cell = rows.groupby(["seed", "name", "load"])["top1"].mean()
    return per_cell.groupby("seed").agg(extreme).tolist()
