"""A behaviour to acquire: (context, decision) examples with a rule the pretraining text never shows.

A context is a run of lower-case words from one topic of the standard library's documentation
(``pydoc_data.topics``; a topic is one page, such as ``"for"`` or ``"typesseq"``). The decision
after the marker ``" => "`` follows a rule (``RULES``); the chapter's is the initial of the
context's last word, capitalised, then a newline::

    "   the loop variable is assigned => A\\n"

(``"last_word_capitals"`` gives ``ASSIGNED``: too hard for the book's small models to learn from
a few hundred examples.)

The rule is known, so a judge checks a decision exactly. Novel situations are contexts from topics
held out of fine-tuning. Every example is one row of the same length -- the context left-padded
with spaces, the decision right-padded -- so that a batch is one tensor and the context of every
row ends at the same position (what context-frozen training with a key/value cache needs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pydoc_data.topics import topics

import torch

from nested_lab.parameters import check_choice, check_positive_ints, check_range

MARKER = " => "
END = "\n"
MAX_WORD = 10
_WORD = re.compile(rf"\b[a-z]{{3,{MAX_WORD}}}\b")


RULES = {  # name -> the decision for a context
    "last_word_capitals": lambda context: context.split()[-1].upper(),
    "last_initial_capital": lambda context: context.split()[-1][0].upper(),
    "last_word_copy": lambda context: context.split()[-1],
}
DECISION_CHARS = {"last_word_capitals": MAX_WORD, "last_initial_capital": 1, "last_word_copy": MAX_WORD}


def topic_words(min_words: int = 100) -> dict[str, list[str]]:
    """Each pydoc topic with at least ``min_words`` lower-case words (3-10 letters), in text order."""
    return {key: found for key, found in _all_topic_words().items() if len(found) >= min_words}


@cache
def _all_topic_words() -> dict[str, list[str]]:
    return {key: _WORD.findall(topics[key]) for key in sorted(topics)}


@dataclass(frozen=True)
class DecisionTask:
    """Topics split into fine-tuning and held-out ones; contexts of ``words`` words.

    ``vocabulary`` is the character vocabulary of the pretrained model (every character used here
    occurs in the pydoc text). A row is ``context_chars`` characters of context, the marker, the
    decision and its newline, padded with spaces to ``row_length``.
    """

    vocabulary: str
    train_topics: tuple[str, ...]
    held_out_topics: tuple[str, ...]
    words: int = 3
    rule: str = "last_initial_capital"

    def __post_init__(self) -> None:
        check_choice("rule", self.rule, list(RULES))

    def decide(self, context: str) -> str:
        """The rule's decision for ``context``."""
        return RULES[self.rule](context)

    @classmethod
    def split(cls, vocabulary: str, held_out: int, generator: torch.Generator, *, words: int = 3,
              min_words: int = 100, rule: str = "last_initial_capital") -> DecisionTask:
        """Hold out ``held_out`` topics drawn with ``generator``; the rest are for fine-tuning."""
        check_positive_ints(held_out=held_out, words=words, min_words=min_words)
        names = list(topic_words(min_words))
        check_range("held_out", held_out, 1, len(names) - 2, integer=True)
        order = torch.randperm(len(names), generator=generator).tolist()
        held = tuple(sorted(names[i] for i in order[:held_out]))
        return cls(vocabulary, tuple(n for n in names if n not in held), held, words, rule)

    @property
    def context_chars(self) -> int:
        return self.words * (MAX_WORD + 1) - 1

    @property
    def decision_start(self) -> int:
        """Index of the first decision character in a row."""
        return self.context_chars + len(MARKER)

    @property
    def row_length(self) -> int:
        return self.decision_start + self.decision_chars + len(END)

    @property
    def decision_chars(self) -> int:
        """The longest decision the rule can give."""
        return DECISION_CHARS[self.rule]

    def contexts(self, topic: str, count: int, generator: torch.Generator, part: str = "all") -> list[str]:
        """``count`` contexts: runs of ``words`` consecutive words of ``topic`` starting at random
        places in its first 80% (``part="train"``), its last 20% (``"test"``) or anywhere."""
        check_choice("part", part, ("train", "test", "all"))
        check_positive_ints(count=count)
        found = _all_topic_words()[topic]
        cut = int(0.8 * len(found))
        low, high = {"train": (0, cut), "test": (cut, len(found)), "all": (0, len(found))}[part]
        starts = torch.randint(low, max(high - self.words, low + 1), (count,), generator=generator)
        return [" ".join(found[s:s + self.words]) for s in starts.tolist()]

    def row(self, context: str, decision: str | None = None) -> str:
        """The padded text of one example; the rule's decision unless ``decision`` is given."""
        decision = self.decide(context) if decision is None else decision
        body = context.rjust(self.context_chars)[-self.context_chars:] + MARKER + decision + END
        return body.ljust(self.row_length)[:self.row_length]

    def encode(self, rows: list[str], device: str | torch.device = "cpu") -> torch.Tensor:
        """Rows as ids ``[N, row_length]``."""
        index = {ch: i for i, ch in enumerate(self.vocabulary)}
        return torch.tensor([[index[ch] for ch in row] for row in rows], device=device)

    def decode(self, ids: torch.Tensor) -> list[str]:
        return ["".join(self.vocabulary[i] for i in row) for row in ids.tolist()]

    def decision_mask(self, rows: list[str], device: str | torch.device = "cpu") -> torch.Tensor:
        """``[N, row_length]`` booleans: True on the decision characters and their newline."""
        mask = torch.zeros(len(rows), self.row_length, dtype=torch.bool, device=device)
        for i, row in enumerate(rows):
            end = row.index(END, self.decision_start)
            mask[i, self.decision_start:end + 1] = True
        return mask

    def well_formed(self, words: list[str]) -> bool:
        """True when every word is a lower-case word of 3-10 letters (a context of the task)."""
        return all(_WORD.fullmatch(w) for w in words)

    def fits(self, decision: str) -> bool:
        """True when ``decision`` fits a row: 1 to :attr:`decision_chars` characters, no newline."""
        return 0 < len(decision) <= self.decision_chars and END not in decision

    def judge(self, contexts: list[str], answers: list[str]) -> torch.Tensor:
        """1.0 where an answer (text generated after the marker) is exactly the rule's decision."""
        return torch.tensor([float(a.split(END)[0] == self.decide(c)) for c, a in zip(contexts, answers, strict=True)])
