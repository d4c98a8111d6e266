"""A character-level corpus from the Python standard library (``pydoc_data.topics``,
about 465k characters of English technical prose): no download, same text everywhere."""

from __future__ import annotations

from dataclasses import dataclass
from pydoc_data.topics import topics

import torch

from nested_lab.parameters import check_choice, check_positive_ints, check_range


def stdlib_text() -> str:
    """The pydoc topic texts, concatenated in sorted-key order."""
    return "\n".join(topics[key] for key in sorted(topics))


@dataclass(frozen=True)
class CharCorpus:
    """The text encoded as integer ids, split into a training and a validation part."""

    vocabulary: str
    train: torch.Tensor
    val: torch.Tensor

    @classmethod
    def from_text(cls, text: str, val_fraction: float = 0.1) -> CharCorpus:
        check_range("val_fraction", val_fraction, 0, 1, low_open=True, high_open=True)
        vocabulary = "".join(sorted(set(text)))
        index = {ch: i for i, ch in enumerate(vocabulary)}
        ids = torch.tensor([index[ch] for ch in text], dtype=torch.long)
        split = int(len(ids) * (1 - val_fraction))
        return cls(vocabulary, ids[:split], ids[split:])

    def with_train_chars(self, count: int) -> CharCorpus:
        """The same corpus with only the first ``count`` training characters (a small training set)."""
        check_range("count", count, 2, len(self.train), integer=True)
        return CharCorpus(self.vocabulary, self.train[:count], self.val)

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def batch(self, split: str, batch_size: int, context: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows: inputs ``[B, context]`` and the next character ``[B]``."""
        check_choice("split", split, ("train", "val"))
        check_positive_ints(batch_size=batch_size, context=context)
        ids = self.train if split == "train" else self.val
        starts = torch.randint(0, len(ids) - context - 1, (batch_size,), generator=generator)
        offsets = torch.arange(context + 1)
        windows = ids[starts[:, None] + offsets]
        return windows[:, :-1], windows[:, -1]

    def sequences(self, split: str, batch_size: int, length: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows for language modelling: inputs ``[B, length]``
        and the next character at every position, targets ``[B, length]``."""
        inputs, last = self.batch(split, batch_size, length, generator)
        return inputs, torch.cat([inputs[:, 1:], last[:, None]], dim=1)
