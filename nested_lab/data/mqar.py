"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology", Sec. 3.1).

An example of length ``L`` with ``N`` pairs reads, as in Zoology (inputs are a sequence,
targets the next token of it),

    k_1 v_1 k_2 v_2 ... k_N v_N   0 0 ... k_a v_a 0 0 ... k_b v_b ... 0 0

* keys are drawn from ``[1, vocab // 2)``, distinct within an example; values from
  ``[vocab // 2, vocab)``, distinct within an example too (token 0 is reserved for filler);
* after the ``2N``-token prefix each key appears once more, at a *query position*, followed by
  its value. The target at the query position is that value (the next token) and every other
  target is ``-100`` (ignored by ``F.cross_entropy``). A causal model must recall the value
  from the prefix; a model that sees the future can copy it from the next position -- which is
  what the leakage test of chapter 4 catches;
* the sequence after the prefix is cut into two-token slots; the query slots are ``N``
  distinct slots drawn without replacement with probability proportional to
  ``(slot + 1) ** -gap_power`` (slot 0 follows the prefix): a power law in the distance from
  the prefix, so that most queries come soon after it and a few far away (Zoology draws the
  gaps from a power law too; ``gap_power=0`` is uniform). Which key is asked in which slot is
  a uniform random permutation;
* every other position holds the filler token 0.
"""

from __future__ import annotations

import torch

from nested_lab.parameters import check_positive_ints, check_range

IGNORE_INDEX = -100
FILLER_TOKEN = 0


def mqar_batch(batch: int, seq_len: int, pairs: int, vocab: int, generator: torch.Generator,
               gap_power: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` MQAR examples: (inputs ``[B, L]`` long, targets ``[B, L]`` long, -100 where ignored),
    drawn from ``generator`` (a CPU ``torch.Generator``, see :func:`nested_lab.runtime.generator`)."""
    check_positive_ints(batch=batch)
    check_task(seq_len, pairs, vocab, gap_power)
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError(f"generator must be a torch.Generator on the CPU (runtime.generator), got {generator!r}")
    keys = _distinct(batch, pairs, 1, vocab // 2, generator)
    values = _distinct(batch, pairs, vocab // 2, vocab, generator)
    inputs = torch.full((batch, seq_len), FILLER_TOKEN, dtype=torch.long)
    targets = torch.full((batch, seq_len), IGNORE_INDEX, dtype=torch.long)
    inputs[:, 0 : 2 * pairs : 2], inputs[:, 1 : 2 * pairs : 2] = keys, values
    positions = query_positions(batch, seq_len, pairs, generator, gap_power)
    asked = torch.rand(batch, pairs, generator=generator).argsort(dim=1)  # which pair each query asks
    inputs.scatter_(1, positions, keys.gather(1, asked))
    inputs.scatter_(1, positions + 1, values.gather(1, asked))
    targets.scatter_(1, positions, values.gather(1, asked))
    return inputs, targets


def check_task(seq_len: int, pairs: int, vocab: int, gap_power: float = 1.0) -> None:
    """An MQAR task's sizes: the prefix and the queries with their values (``4 N`` positions) fit in
    ``seq_len``, the keys ``[1, vocab // 2)`` hold ``N`` distinct ones, and ``gap_power >= 0``."""
    check_positive_ints(seq_len=seq_len, pairs=pairs, vocab=vocab)
    check_range("gap_power", gap_power, 0)
    if 4 * pairs > seq_len:
        raise ValueError(f"seq_len={seq_len} is too short for {pairs} pairs: they need 4 * pairs positions")
    if pairs > vocab // 2 - 1:
        raise ValueError(f"vocab={vocab} holds fewer than pairs={pairs} distinct keys in [1, vocab // 2)")


def elimination_accuracy(pairs: int) -> float:
    """MQAR accuracy of a model that knows only the format: each query's answer is one of the
    prefix values not asked before it (its value appears in the input after it), guessed
    uniformly, so query ``i`` is right with probability ``1 / (N - i)``; the mean over queries."""
    check_positive_ints(pairs=pairs)
    return sum(1 / (pairs - i) for i in range(pairs)) / pairs


def hide_last_answer(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last query of every example alone, with the value that follows it replaced by the filler
    token: (inputs, targets with every other query ignored). A causal model answers that query
    exactly as before -- the hidden token comes after it -- and a model that reads ahead does not.
    Every example needs a query that some token follows, as :func:`mqar_batch` makes them."""
    if inputs.shape != targets.shape or inputs.ndim != 2:
        raise ValueError(f"inputs and targets must share a [batch, time] shape, got {tuple(inputs.shape)} and "
                         f"{tuple(targets.shape)}")
    asked = targets != IGNORE_INDEX
    last = asked.shape[1] - 1 - asked.flip(1).int().argmax(dim=1)
    rows = torch.arange(inputs.shape[0])
    hidden, kept = inputs.clone(), torch.full_like(targets, IGNORE_INDEX)
    hidden[rows, last + 1] = FILLER_TOKEN
    kept[rows, last] = targets[rows, last]
    return hidden, kept


def query_positions(batch: int, seq_len: int, pairs: int, generator: torch.Generator,
                    gap_power: float = 1.0) -> torch.Tensor:
    """``[B, N]`` sorted query positions: the first positions of ``N`` distinct two-token slots
    after the ``2N``-token prefix, drawn without replacement with probability proportional to
    ``(slot + 1) ** -gap_power``."""
    start = 2 * pairs
    slots = (seq_len - start) // 2
    distance = torch.arange(1, slots + 1, dtype=torch.float64)
    weights = distance.pow(-gap_power).expand(batch, -1)
    drawn = torch.multinomial(weights, pairs, replacement=False, generator=generator)
    return 2 * drawn.sort(dim=1).values + start


def _distinct(batch: int, count: int, low: int, high: int, generator: torch.Generator) -> torch.Tensor:
    """``[B, count]`` tokens of ``[low, high)``, distinct within each row, in random order."""
    order = torch.rand(batch, high - low, generator=generator).argsort(dim=1)
    return order[:, :count] + low
