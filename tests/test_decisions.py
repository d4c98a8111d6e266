"""The (context, decision) task and its fine-tuning: row layout, rules, the exact judge, the topic
split; what each gradient mode lets through; the dream loop's collisions, determinism and filter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nested_lab.data.corpus import CharCorpus, stdlib_text
from nested_lab.data.decisions import END, MARKER, MAX_WORD, RULES, DecisionTask, topic_words
from nested_lab.models.gpt import GPT, GPTConfig
from nested_lab.runtime import generator, seeded
from nested_lab.train import decisions as rows

CONTEXT = "the loop variable is assigned"


@pytest.fixture(scope="module")
def corpus() -> CharCorpus:
    return CharCorpus.from_text(stdlib_text())


@pytest.fixture(scope="module")
def task(corpus: CharCorpus) -> DecisionTask:
    return DecisionTask.split(corpus.vocabulary, held_out=5, generator=generator(0))


@pytest.fixture(scope="module")
def contexts(task: DecisionTask) -> list[str]:
    gen = generator(1)
    return [c for topic in task.train_topics[:6] for c in task.contexts(topic, 4, gen)]


def _model(vocab_size: int, seed: int = 0) -> GPT:
    with seeded(seed):
        return GPT(GPTConfig(vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=16))


# ----- the task ----------------------------------------------------------------------------------

def test_rows_have_one_length_and_one_layout(task: DecisionTask, contexts: list[str]) -> None:
    longest = " ".join(["a" * MAX_WORD] * task.words)
    for context in [*contexts, longest]:
        row = task.row(context)
        assert len(row) == task.row_length
        assert row[:task.context_chars] == context.rjust(task.context_chars)
        assert row[task.decision_start - len(MARKER):task.decision_start] == MARKER
        assert row[task.decision_start:] == (task.decide(context) + END).ljust(task.row_length - task.decision_start)


@pytest.mark.parametrize("rule", list(RULES))
def test_decision_mask_covers_the_decision_and_its_newline(task: DecisionTask, contexts: list[str],
                                                         rule: str) -> None:
    ruled = DecisionTask(task.vocabulary, task.train_topics, task.held_out_topics, task.words, rule)
    row_list = [ruled.row(c) for c in contexts]
    mask = ruled.decision_mask(row_list)
    assert mask.shape == (len(row_list), ruled.row_length)
    for context, row, marked in zip(contexts, row_list, mask, strict=True):
        width = len(ruled.decide(context)) + 1
        assert marked.nonzero().flatten().tolist() == list(range(ruled.decision_start, ruled.decision_start + width))
        assert row[ruled.decision_start + width - 1] == END


@pytest.mark.parametrize(("rule", "decision"), [
    ("last_word_capitals", "ASSIGNED"), ("last_initial_capital", "A"), ("last_word_copy", "assigned")])
def test_each_rule_gives_what_its_name_says(task: DecisionTask, rule: str, decision: str) -> None:
    assert DecisionTask(task.vocabulary, (), (), rule=rule).decide(CONTEXT) == decision


def test_judge_scores_exactly(task: DecisionTask) -> None:
    answers = ["A\n", "A\n" + " " * 9, "B\n", "a\n", "AS\n", "A \n", " A\n"]
    scores = task.judge([CONTEXT] * len(answers), answers)
    assert scores.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_judge_accepts_every_decision_of_the_rule(task: DecisionTask, contexts: list[str]) -> None:
    """A model that always answers right: its answers are the row's text after the marker."""
    perfect = [task.row(c)[task.decision_start:] for c in contexts]
    assert task.judge(contexts, perfect).mean().item() == 1.0
    shifted = perfect[1:] + perfect[:1]
    wrong = [i for i, (a, b) in enumerate(zip(perfect, shifted, strict=True)) if a != b]
    assert task.judge(contexts, shifted)[wrong].sum().item() == 0.0


class _Oracle(nn.Module):
    """Writes the rule's decision after any prompt of the task (``answer`` overrides it)."""

    def __init__(self, task: DecisionTask, answer: str | None = None) -> None:
        super().__init__()
        self.task, self.answer = task, answer
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the stub a device

    def generate(self, prompts: torch.Tensor, new_tokens: int, **_: object) -> torch.Tensor:
        texts = [text[-self.task.decision_start:-len(MARKER)].strip() for text in self.task.decode(prompts)]
        out = [self.task.row(c, self.answer)[self.task.decision_start:][:new_tokens] for c in texts]
        return torch.cat([prompts, self.task.encode(out)], dim=1)


def test_accuracy_is_the_judges_share(task: DecisionTask, contexts: list[str]) -> None:
    assert rows.accuracy(_Oracle(task), task, contexts) == 1.0
    assert rows.accuracy(_Oracle(task, answer="?"), task, contexts) == 0.0


def test_split_is_deterministic_disjoint_and_covers_the_topics(corpus: CharCorpus) -> None:
    first = DecisionTask.split(corpus.vocabulary, 5, generator(3))
    assert first == DecisionTask.split(corpus.vocabulary, 5, generator(3))
    assert first.held_out_topics != DecisionTask.split(corpus.vocabulary, 5, generator(4)).held_out_topics
    assert len(first.held_out_topics) == 5
    assert not set(first.train_topics) & set(first.held_out_topics)
    assert set(first.train_topics) | set(first.held_out_topics) == set(topic_words())


def test_bad_rule_and_held_out_are_refused(corpus: CharCorpus) -> None:
    eligible = len(topic_words())
    with pytest.raises(ValueError, match="rule"):
        DecisionTask(corpus.vocabulary, (), (), rule="first_word")
    with pytest.raises(ValueError, match="rule"):
        DecisionTask.split(corpus.vocabulary, 5, generator(0), rule="first_word")
    for held_out in (0, eligible - 1):
        with pytest.raises(ValueError, match="held_out"):
            DecisionTask.split(corpus.vocabulary, held_out, generator(0))
    with pytest.raises(TypeError, match="held_out"):
        DecisionTask.split(corpus.vocabulary, 2.0, generator(0))
    assert len(DecisionTask.split(corpus.vocabulary, eligible - 2, generator(0)).train_topics) == 2


@pytest.mark.parametrize("part", ["train", "test"])
def test_contexts_come_from_their_part_of_the_topic(task: DecisionTask, part: str) -> None:
    topic = task.train_topics[0]
    found = topic_words()[topic]
    cut = int(0.8 * len(found))
    starts = range(0, cut - task.words + 1) if part == "train" else range(cut, len(found) - task.words + 1)
    allowed = {" ".join(found[s:s + task.words]) for s in starts}
    drawn = task.contexts(topic, 50, generator(5), part=part)
    assert all(len(c.split()) == task.words for c in drawn)
    assert set(drawn) <= allowed
    assert drawn == task.contexts(topic, 50, generator(5), part=part)


# ----- gradient modes ----------------------------------------------------------------------------

def _loss_and_grads(task: DecisionTask, contexts: list[str], mode: str) -> tuple[float, dict, list]:
    """The mode's loss, every parameter's gradient, and the token embeddings each forward produced."""
    model = _model(len(task.vocabulary))
    row_list = [task.row(c) for c in contexts]
    embedded = []

    def keep(_module: nn.Module, _inputs: tuple, out: torch.Tensor) -> None:
        if out.requires_grad:
            out.retain_grad()
        embedded.append(out)

    model.wte.register_forward_hook(keep)
    loss = rows.decision_loss(model, task.encode(row_list), task.decision_mask(row_list), mode, task.decision_start)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}, embedded


def test_context_frozen_cuts_the_path_back_through_the_context(task: DecisionTask, contexts: list[str]) -> None:
    start = task.decision_start
    _, full, full_embedded = _loss_and_grads(task, contexts, "decision_tokens")
    _, frozen, frozen_embedded = _loss_and_grads(task, contexts, "context_frozen")
    assert full_embedded[0].grad[:, :start - 1].abs().sum() > 0  # the context's embedded inputs
    assert not frozen_embedded[0].requires_grad  # the context ran without a graph: nothing flows back
    assert frozen_embedded[1].grad.abs().sum() > 0  # the decision's inputs
    assert full["wpe.weight"][:start - 1].abs().sum() > 0  # positions only the context occupies
    assert torch.count_nonzero(frozen["wpe.weight"][:start - 1]) == 0
    assert frozen["wpe.weight"][start - 1].abs().sum() > 0


def test_context_frozen_still_trains_every_weight(task: DecisionTask, contexts: list[str]) -> None:
    _, frozen, _ = _loss_and_grads(task, contexts, "context_frozen")
    untouched = [name for name, grad in frozen.items() if grad is None or grad.abs().sum() == 0]
    assert untouched == []


def test_context_frozen_has_the_same_loss_and_a_different_gradient(task: DecisionTask,
                                                                   contexts: list[str]) -> None:
    full_loss, full, _ = _loss_and_grads(task, contexts, "decision_tokens")
    frozen_loss, frozen, _ = _loss_and_grads(task, contexts, "context_frozen")
    assert frozen_loss == pytest.approx(full_loss, abs=1e-6)
    differing = [name for name in full if not torch.allclose(full[name], frozen[name], atol=1e-7)]
    assert {"wpe.weight", "blocks.0.attn.c_attn.weight"} <= set(differing)


def test_all_tokens_is_the_plain_language_model_loss(task: DecisionTask, contexts: list[str]) -> None:
    model = _model(len(task.vocabulary))
    row_list = [task.row(c) for c in contexts]
    ids = task.encode(row_list)
    loss = rows.decision_loss(model, ids, task.decision_mask(row_list), "all_tokens", task.decision_start)
    expected = F.cross_entropy(model.logits(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(loss, expected)


# ----- the dream loop ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def writer(corpus: CharCorpus) -> GPT:
    """A tiny model briefly trained on the documentation text: it writes word-like continuations."""
    model, gen = _model(corpus.vocab_size), generator(9)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(120):
        x, y = corpus.sequences("train", 16, 64, gen)
        loss = F.cross_entropy(model.logits(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_collision_prompts_join_half_of_one_memory_to_the_start_of_another(task: DecisionTask) -> None:
    memories = [" ".join(f"{letter}{i}" for i in range(task.words)) for letter in "abcd"]
    prompts = rows.collision_prompts(task, memories, 12, generator(2))
    assert prompts == rows.collision_prompts(task, memories, 12, generator(2))
    half = task.words // 2
    firsts = {m.split()[0] for m in memories}
    for prompt in prompts:
        assert prompt.endswith(" ")
        words = prompt.split()
        assert len(words) == half + 1
        assert any(m.split()[:half] == words[:half] for m in memories)
        assert words[-1] in firsts


def test_dream_is_deterministic_for_a_seed(writer: GPT, task: DecisionTask, contexts: list[str]) -> None:
    prompts = rows.collision_prompts(task, contexts, 32, generator(2))
    scenarios = rows.dream_contexts(writer, task, prompts, generator(3))
    assert scenarios and scenarios == rows.dream_contexts(writer, task, prompts, generator(3))
    assert scenarios != rows.dream_contexts(writer, task, prompts, generator(4))
    for scenario in scenarios:
        assert len(scenario.split()) == task.words and task.well_formed(scenario.split())
    first = rows.dream(writer, task, contexts, 32, generator(2), use_judge=False)
    assert first[2] > 0
    assert first == rows.dream(writer, task, contexts, 32, generator(2), use_judge=False)


def _mixed_answers(task: DecisionTask, scenarios: list[str]) -> list[str]:
    """Right, wrong and too long decisions in turn (what a partly trained model writes)."""
    return [[task.decide(s) + END, "?" + END, "x" * (MAX_WORD + 1)][i % 3] for i, s in enumerate(scenarios)]


def test_the_judge_is_what_removes_wrong_dreams(monkeypatch: pytest.MonkeyPatch, writer: GPT,
                                                task: DecisionTask, contexts: list[str]) -> None:
    monkeypatch.setattr(rows, "answers", lambda _model, t, scenarios, demos=None: _mixed_answers(t, scenarios))
    judged, judged_decisions, written = rows.dream(writer, task, contexts, 32, generator(2), use_judge=True)
    unjudged, decisions, _ = rows.dream(writer, task, contexts, 32, generator(2), use_judge=False)
    assert written >= 3
    assert judged and task.judge(judged, judged_decisions).min().item() == 1.0
    assert task.judge(unjudged, decisions).min().item() == 0.0  # a wrong dream is kept without the judge
    assert all(task.fits(d) for d in decisions)  # a decision that does not fit a row is never kept
    assert len(unjudged) == written - written // 3
