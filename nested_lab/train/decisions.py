"""Fine-tuning a language model on (context, decision) rows: three ways to take the gradient, the
judge's accuracy, and the dream loop.

Shapes: N rows, L row length, c the index where the decision starts, V vocabulary.

Gradient modes (``GRADIENT_MODES``):

* ``"all_tokens"``: full backpropagation, loss on every next-token prediction of the row;
* ``"decision_tokens"``: full backpropagation, loss on the decision tokens only;
* ``"context_frozen"``: the context runs under ``torch.no_grad`` and leaves its keys and values in a
  cache; the decision tokens run with gradients against that cache; loss on the decision tokens.
  Every weight still processes the decision tokens; only the path back through the context's
  activations is cut.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nested_lab.data.decisions import END, DecisionTask
from nested_lab.models.gpt import GPT

GRADIENT_MODES = ("all_tokens", "decision_tokens", "context_frozen")


def masked_next_token_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits [N, L-1, V]`` (predictions for ``ids[:, 1:]``) on the target
    positions where ``mask [N, L]`` is True."""
    targets = mask[:, 1:]
    return F.cross_entropy(logits[targets], ids[:, 1:][targets])


def decision_loss(model: GPT, ids: torch.Tensor, mask: torch.Tensor, mode: str, start: int) -> torch.Tensor:
    """The fine-tuning loss of rows ``ids [N, L]`` whose decision (``mask``) starts at ``start``."""
    if mode == "context_frozen":
        with torch.no_grad():
            _, cache = model(ids[:, :start - 1])  # context and marker up to the last marker char
        logits, _ = model(ids[:, start - 1:-1], cache)  # (N, L - start, V), predicts ids[:, start:]
        targets = mask[:, start:]
        return F.cross_entropy(logits[targets], ids[:, start:][targets])
    logits = model.logits(ids[:, :-1])
    loss_mask = torch.ones_like(mask) if mode == "all_tokens" else mask
    return masked_next_token_loss(logits, ids, loss_mask)


@torch.no_grad()
def answers(model: GPT, task: DecisionTask, contexts: list[str], demos: list[str] | None = None) -> list[str]:
    """The model's greedy decisions for ``contexts``; ``demos`` (one full row per context) are
    placed before each query in the context window."""
    rows = [task.row(c) for c in contexts]
    prompts = task.encode(rows, _device(model))[:, :task.decision_start]
    if demos is not None:
        prompts = torch.cat([task.encode(demos, prompts.device), prompts], dim=1)
    out = model.generate(prompts, task.row_length - task.decision_start)
    return [text[prompts.size(1):] for text in task.decode(out)]


def accuracy(model: GPT, task: DecisionTask, contexts: list[str], demos: list[str] | None = None) -> float:
    """The judge's share of exactly right decisions."""
    return task.judge(contexts, answers(model, task, contexts, demos)).mean().item()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ----- the dream loop --------------------------------------------------------------------------

def collision_prompts(task: DecisionTask, memories: list[str], count: int, generator: torch.Generator) -> list[str]:
    """``count`` prompts that collide two stored experiences: the first half of one context's words
    followed by the first word of another's (experiences drawn with ``generator``)."""
    pairs = torch.randint(len(memories), (count, 2), generator=generator).tolist()
    half = task.words // 2
    return [" ".join(memories[a].split()[:half] + memories[b].split()[:1]) + " " for a, b in pairs]


@torch.no_grad()
def dream_contexts(model: GPT, task: DecisionTask, prompts: list[str], generator: torch.Generator,
                   temperature: float = 1.0) -> list[str]:
    """The model continues each prompt by sampling; a scenario is the prompt plus the generated
    words up to the task's word count. Continuations that do not give well-formed words are
    dropped (they are not scenarios of the task)."""
    new = task.context_chars // 2
    width = task.context_chars - new  # the continuation ends where a row's context ends
    ids = task.encode([p.rjust(width)[-width:] for p in prompts], _device(model))
    out = model.generate(ids, new, temperature=temperature, generator=generator)
    scenarios = []
    for prompt, text in zip(prompts, task.decode(out[:, width:]), strict=True):
        words = (prompt + text).split()
        if len(words) > task.words and task.well_formed(words[:task.words]):
            scenarios.append(" ".join(words[:task.words]))
    return scenarios


def dream(model: GPT, task: DecisionTask, memories: list[str], count: int, generator: torch.Generator,
          use_judge: bool = True) -> tuple[list[str], list[str], int]:
    """One cycle of the dream loop: collide memories, let the model write scenarios and answer them,
    keep the answers the judge accepts (all of them when ``use_judge`` is False).

    Returns the kept scenarios, the model's decisions for them, and the number of scenarios written.
    """
    scenarios = dream_contexts(model, task, collision_prompts(task, memories, count, generator), generator)
    if not scenarios:
        return [], [], 0
    decided = [a.split(END)[0] for a in answers(model, task, scenarios)]
    keep = task.judge(scenarios, decided).bool().tolist() if use_judge else [True] * len(scenarios)
    kept = [(s, d) for s, d, k in zip(scenarios, decided, keep, strict=True) if k and task.fits(d)]
    return [s for s, _ in kept], [d for _, d in kept], len(scenarios)
