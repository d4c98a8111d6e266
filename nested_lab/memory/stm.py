"""CortexGPT's short-term memory: a bounded buffer read by softmax attention.

The original (``cortexgpt/models/cortex_gpt.py`` at e52aae1, ``ShortTermMemory``)
keeps a ``deque(maxlen=128)``. Each forward pass stores one *entry* per timestep:
the whole batch's detached keys ``[B, d]`` (the mixer output ``current``) and
values ``[B, d]`` (the gated output ``y``). A query ``q = W_q x`` attends over
every row of every entry,

    r_stm(x) = softmax(q K^T / sqrt(d)) V,      K = W_k [keys of all entries],

so a token reads values written by other sequences of the batch and by earlier
batches, computed with older parameters. The buffer is bounded: the proof's
"unbounded append" (its Theorem 1) does not describe this code.

Here the entries are flat rows with an entry id, so that a whole sequence can
be read at once: :meth:`ShortTermMemory.read` scores every timestep against the
entries stored before this forward pass and against this pass's own earlier
timesteps (a causal window of ``capacity`` entries), and :meth:`SequenceRead.at`
adds the rows written during the pass one timestep at a time, as the original's
Python loop does.

Options (the original's first):

* ``storage``: ``"batch"`` -- one entry per timestep holding the whole batch (the
  original) | ``"row"`` -- one entry per row, ``B`` entries per timestep (the
  phase-1 summary's "memory storage fix", as ``cortex_gpt_unified.py`` stores);
  the capacity then counts rows;
* ``access_count``: ``"flat_index"`` -- the original increments the count at the
  argmax's *flat row* index, treating it as an entry index (only rows below the
  entry count are counted, and on the wrong entry) | ``"entry"`` -- the entry that
  holds the argmax row;
* ``decay_rate``: ``None`` (the original: no importance) | a rate such as 0.95, the
  bounded buffer with decay of the solutions document: every store multiplies
  each entry's importance by the rate. (The document also invalidates entries
  older than ``2 * capacity`` stores; a buffer of ``capacity`` entries never holds
  one, so that line is dead code and is left out.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from nested_lab.parameters import check_choice, check_positive_ints, check_range

ACCESS_COUNTS = ("flat_index", "entry")
STORAGES = ("batch", "row")


class SequenceRead:
    """The attention of one forward pass, computed before its sequential loop.

    ``past`` ``[B, T, d]``: the weighted values of the entries stored before this pass;
    ``weights_new`` ``[B, T, T * B']``: the weight of query ``(b, t)`` on this pass's
    row ``(t', b')`` at column ``t' * B' + b'`` (zero unless ``t' < t``).
    """

    def __init__(self, past: torch.Tensor, weights_new: torch.Tensor) -> None:
        self.past, self.weights_new = past, weights_new
        self._past, self._weights = past.unbind(1), weights_new.unbind(1)  # per-timestep views

    def at(self, t: int, written: list[torch.Tensor]) -> torch.Tensor:
        """The read-out ``[B, d]`` at timestep ``t``, given the (detached) values ``[B', d]``
        written at timesteps ``0..t-1`` (one per timestep, the caller's loop keeps them)."""
        if t == 0:
            return self._past[0]
        rows = torch.cat(written)
        return self._past[t] + self._weights[t][:, : len(rows)] @ rows


@dataclass
class MemoryState:
    """A copy of the buffer's contents, for checkpoints and rollback."""

    keys: torch.Tensor
    values: torch.Tensor
    entry_sizes: torch.Tensor
    counts: torch.Tensor
    importance: torch.Tensor


STATE_FIELDS = ("keys", "values", "entry_sizes", "counts", "importance")

class ShortTermMemory(nn.Module):
    """A buffer of the last ``capacity`` entries (one per stored timestep), read by attention."""

    def __init__(self, dim: int, capacity: int = 128, access_count: str = "flat_index",
                 decay_rate: float | None = None, storage: str = "batch") -> None:
        super().__init__()
        check_positive_ints(dim=dim, capacity=capacity)
        check_choice("access_count", access_count, ACCESS_COUNTS)
        check_choice("storage", storage, STORAGES)
        if decay_rate is not None:
            check_range("decay_rate", decay_rate, 0, 1, low_open=True)
        self.dim, self.capacity, self.storage = dim, capacity, storage
        self.access_count, self.decay_rate = access_count, decay_rate
        self.query_proj = nn.Linear(dim, dim)
        self.key_proj = nn.Linear(dim, dim)
        # the buffer's contents: moved by .to(), not part of the state_dict
        self.register_buffer("keys", torch.zeros(0, dim), persistent=False)
        self.register_buffer("values", torch.zeros(0, dim), persistent=False)
        self.register_buffer("entry_sizes", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("counts", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("importance", torch.zeros(0), persistent=False)
        self._pending_counts: torch.Tensor | None = None

    def reset(self) -> None:
        """Empty the buffer."""
        for name in STATE_FIELDS:
            setattr(self, name, getattr(self, name)[:0])
        self._pending_counts = None

    @property
    def entries(self) -> int:
        return len(self.entry_sizes)

    def read(self, current: torch.Tensor, own_rows_only: bool = False) -> SequenceRead:
        """Attention of every timestep of ``current`` ``[B, T, d]`` over the window of
        ``capacity`` entries before it; updates the access counts of the entries read.

        ``own_rows_only``: a query reads only rows of its own sequence (needs an empty
        buffer, since stored entries may come from batches of another size).
        """
        batch, steps, _ = current.shape
        if own_rows_only and self.entries:
            raise ValueError("own_rows_only needs an empty buffer: call reset() first")
        keys = torch.cat([self.keys, _rows(current)])
        sizes = torch.cat([self.entry_sizes, self._new_sizes(batch, steps)])
        entry_of_row = torch.repeat_interleave(torch.arange(len(sizes), device=sizes.device), sizes)
        readable = self._window(entry_of_row, steps, batch)[None]  # [1, T, rows]
        if own_rows_only:
            owner = torch.arange(batch, device=keys.device)
            readable = readable & (owner.repeat(steps)[None, None, :] == owner[:, None, None])
        query = self.query_proj(current) / math.sqrt(self.dim)
        scores = (query @ self.key_proj(keys).T).masked_fill(~readable, -math.inf)  # [B, T, rows]
        anything = readable.any(dim=-1)  # [1 or B, T]: only the very first timesteps can have nothing to read
        if anything.all():  # the common case; the masked form below costs ~15% of a training step
            weights = torch.softmax(scores, dim=-1)
        else:
            weights = torch.softmax(scores.masked_fill(~anything[..., None], 0.0), dim=-1) * anything[..., None]
        self._count_accesses(scores.detach(), anything.expand(batch, steps), entry_of_row, sizes, batch)
        old_rows = len(self.keys)
        past = weights[..., :old_rows] @ self.values
        return SequenceRead(past, weights[..., old_rows:])

    def _new_sizes(self, batch: int, steps: int) -> torch.Tensor:
        """Row counts of the entries one pass stores: ``T`` of ``B`` rows, or ``T * B`` of one row."""
        if self.storage == "row":
            return self.entry_sizes.new_ones(steps * batch)
        return self.entry_sizes.new_full((steps,), batch)

    def _window_end(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """Number of entries stored before timestep ``t`` of the current pass."""
        return self.entries + t * (batch if self.storage == "row" else 1)

    def _window(self, entry_of_row: torch.Tensor, steps: int, batch: int) -> torch.Tensor:
        """``[T, rows]``: row r is readable at timestep t iff its entry is one of the
        ``capacity`` entries stored last before t (the deque's contents at t)."""
        end = self._window_end(torch.arange(steps, device=entry_of_row.device)[:, None], batch)
        return (entry_of_row[None] < end) & (entry_of_row[None] >= end - self.capacity)

    def _count_accesses(self, scores: torch.Tensor, readable: torch.Tensor, entry_of_row: torch.Tensor,
                        sizes: torch.Tensor, batch: int) -> None:
        """Every query that reads adds one access to the entry of its argmax row (see ``access_count``)."""
        steps = readable.shape[1]
        best = scores.argmax(dim=-1)[readable]
        if self.access_count == "entry":
            hit = entry_of_row[best]
        else:  # the original indexes the deque with the flat row index counted from the window start
            end = self._window_end(torch.arange(steps, device=scores.device).expand_as(readable)[readable], batch)
            first_entry = (end - self.capacity).clamp(min=0)
            row_start = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
            flat = best - row_start[first_entry]
            hit = (first_entry + flat)[flat < end - first_entry]
        self._pending_counts = torch.bincount(hit, minlength=len(sizes))

    @torch.no_grad()
    def write(self, current: torch.Tensor, outputs: torch.Tensor) -> None:
        """Append one entry per timestep (keys ``current``, values ``outputs``, both
        ``[B, T, d]``, detached) and keep the last ``capacity`` entries."""
        batch, steps, _ = current.shape
        new_sizes = self._new_sizes(batch, steps)
        counts = torch.cat([self.counts, torch.ones_like(new_sizes)])
        if self._pending_counts is not None:
            if len(self._pending_counts) != len(counts):
                raise RuntimeError("write() must store the pass that the last read() read")
            counts = counts + self._pending_counts
        self._pending_counts = None
        self.keys = torch.cat([self.keys, _rows(current)])
        self.values = torch.cat([self.values, _rows(outputs)])
        self.entry_sizes = torch.cat([self.entry_sizes, new_sizes])
        self.counts = counts
        self._decay(steps, len(new_sizes) // steps)
        self._evict()

    def _decay(self, steps: int, per_step: int) -> None:
        """Every timestep's store multiplies every entry's importance by ``decay_rate``
        (new entries start at 1)."""
        rate = 1.0 if self.decay_rate is None else self.decay_rate
        stored_after = torch.arange(steps - 1, -1, -1, device=self.importance.device, dtype=self.importance.dtype)
        new = (rate**stored_after).repeat_interleave(per_step)
        self.importance = torch.cat([self.importance * rate**steps, new])

    def _evict(self) -> None:
        drop = max(0, self.entries - self.capacity)
        if drop == 0:
            return
        rows = int(self.entry_sizes[:drop].sum())
        self.keys, self.values = self.keys[rows:], self.values[rows:]
        self.entry_sizes, self.counts = self.entry_sizes[drop:], self.counts[drop:]
        self.importance = self.importance[drop:]

    def candidates(self, threshold: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows of the entries accessed at least ``threshold`` times: keys, values, importance."""
        chosen = self.counts >= threshold
        row_mask = torch.repeat_interleave(chosen, self.entry_sizes)
        importance = torch.repeat_interleave(self.importance, self.entry_sizes)
        return self.keys[row_mask], self.values[row_mask], importance[row_mask]

    def scale_importance(self, threshold: int, moved: torch.Tensor, factor: float) -> None:
        """Multiply by ``factor`` the importance of every entry that has a row flagged in
        ``moved``, a mask over the rows :meth:`candidates` returns for ``threshold``."""
        chosen = torch.nonzero(self.counts >= threshold).flatten()
        entry_of_row = torch.repeat_interleave(chosen, self.entry_sizes[chosen])
        hit = torch.zeros_like(self.counts, dtype=torch.bool)
        hit[entry_of_row[moved]] = True
        self.importance = torch.where(hit, self.importance * factor, self.importance)

    def first_entries(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the ``count`` oldest entries (the shipped version's consolidation candidates)."""
        rows = int(self.entry_sizes[:count].sum())
        return self.keys[:rows], self.values[:rows]

    def state(self) -> MemoryState:
        """A copy of the buffer's contents."""
        return MemoryState(**{name: getattr(self, name).clone() for name in STATE_FIELDS})

    def load_state(self, state: MemoryState) -> None:
        """Replace the buffer's contents by a copy of ``state``."""
        for name in STATE_FIELDS:
            setattr(self, name, getattr(state, name).clone().to(getattr(self, name).device))
        self._pending_counts = None


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[B, T, d]`` -> ``[T * B, d]``, timestep-major: the order in which the rows are stored."""
    return x.detach().transpose(0, 1).reshape(-1, x.shape[-1])
