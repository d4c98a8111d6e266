"""The small GPT: the key/value cache changes no logit, generation is greedy or seeded sampling,
and the config checks its fields at the door."""

from __future__ import annotations

import pytest
import torch

from nested_lab.data.corpus import CharCorpus, stdlib_text
from nested_lab.models.gpt import GPT, GPTConfig
from nested_lab.runtime import generator, seeded


@pytest.fixture(scope="module")
def vocab_size() -> int:
    return CharCorpus.from_text(stdlib_text()).vocab_size


@pytest.fixture(scope="module")
def model(vocab_size: int) -> GPT:
    with seeded(0):
        return GPT(GPTConfig(vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=16)).eval()


def _tokens(vocab_size: int, length: int, seed: int = 1, batch: int = 3) -> torch.Tensor:
    return torch.randint(vocab_size, (batch, length), generator=generator(seed))


@pytest.mark.parametrize("split", [1, 7, 19])
def test_cached_logits_equal_full_logits(model: GPT, vocab_size: int, split: int) -> None:
    idx = _tokens(vocab_size, 20)
    full = model.logits(idx)
    with torch.no_grad():
        head, cache = model(idx[:, :split])
        tail, extended = model(idx[:, split:], cache)
    torch.testing.assert_close(torch.cat([head, tail], dim=1), full, atol=1e-5, rtol=1e-5)
    assert [k.size(2) for k, _ in extended] == [20] * model.config.n_layer


def test_token_by_token_cache_equals_full_logits(model: GPT, vocab_size: int) -> None:
    idx = _tokens(vocab_size, 12, seed=2)
    steps, cache = [], None
    with torch.no_grad():
        for t in range(idx.size(1)):
            logits, cache = model(idx[:, t:t + 1], cache)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), model.logits(idx), atol=1e-5, rtol=1e-5)


def test_greedy_generate_is_deterministic_and_follows_the_argmax(model: GPT, vocab_size: int) -> None:
    prompt = _tokens(vocab_size, 5, seed=3)
    out = model.generate(prompt, 8)
    assert out.shape == (3, 13)
    assert torch.equal(out[:, :5], prompt)
    assert torch.equal(model.generate(prompt, 8), out)
    with torch.no_grad():  # without the cache: each new token is the argmax of a full forward pass
        for t in range(5, 13):
            assert torch.equal(model.logits(out[:, :t])[:, -1].argmax(-1), out[:, t])


def test_sampled_generate_is_reproducible_per_generator(model: GPT, vocab_size: int) -> None:
    prompt = _tokens(vocab_size, 5, seed=4)
    first = model.generate(prompt, 20, temperature=1.0, generator=generator(7))
    again = model.generate(prompt, 20, temperature=1.0, generator=generator(7))
    other = model.generate(prompt, 20, temperature=1.0, generator=generator(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize(("fields", "error", "named"), [
    ({"n_embd": 18, "n_head": 4}, ValueError, "n_embd"),
    ({"vocab_size": 0}, ValueError, "vocab_size"),
    ({"vocab_size": 10.0}, TypeError, "vocab_size"),
    ({"n_layer": 0}, ValueError, "n_layer"),
    ({"dropout": 1.0}, ValueError, "dropout"),
    ({"dropout": -0.1}, ValueError, "dropout"),
    ({"dropout": "0.1"}, TypeError, "dropout"),
])
def test_config_rejects_bad_fields(fields: dict, error: type, named: str) -> None:
    with pytest.raises(error, match=named):
        GPTConfig(**{"vocab_size": 10, "n_head": 2, "n_embd": 16, **fields})
