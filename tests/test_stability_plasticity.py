"""Chapter 6's experiments: recipes checked at the door, the factorial's fit, the pretraining cache,
and a fine-tuning run that is the same for the same seed."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from nested_lab.experiments import stability_plasticity as chapter
from nested_lab.optim import APOLLO

TINY = chapter.Pretraining(n_layer=1, n_head=2, n_embd=16, steps=4, batch_size=2)
TINY_SCALE = chapter.Scale(steps=4, experiences=8, eval_every=2, eval_examples=8, retention_windows=2,
                           dream_every=2, dream_count=4, held_out_topics=4)


@pytest.fixture(scope="module")
def tiny_setting(tmp_path_factory):
    base = chapter.pretrained(TINY, cache=tmp_path_factory.mktemp("cache"), device="cpu")
    return chapter.setting(base, TINY_SCALE, seed=0)


@pytest.mark.parametrize(("field", "value", "error"), [
    ("optimizer", "sgd", ValueError), ("gradient", "context", ValueError), ("data", "wide", ValueError),
    ("memory", "three_stage", ValueError), ("lr", 0.0, ValueError), ("lr", "1e-3", TypeError),
    ("batch_size", 0, ValueError), ("ewc", -1.0, ValueError), ("replay", 1.0, ValueError)])
def test_recipe_rejects_bad_fields(field, value, error):
    with pytest.raises(error, match=field):
        replace(chapter.PLAIN, **{field: value})


def test_unknown_defence_is_named():
    with pytest.raises(ValueError, match="unknown defence 'sleep'"):
        chapter.with_defences(["diverse", "sleep"])


def test_each_defence_is_one_field_change():
    for name, fields in chapter.DEFENCES.items():
        changed = {k for k, v in vars(chapter.with_defences([name])).items() if getattr(chapter.PLAIN, k) != v}
        assert changed == set(fields), name


def test_factorial_has_every_cell_once():
    cells = chapter.factorial_recipes()
    assert len(cells) == 2 ** len(chapter.FACTORS) == len(set(cells.values()))
    assert cells["plain"] == chapter.PLAIN
    assert cells["apollo+context_frozen+diverse+dreams"] == chapter.with_defences(chapter.FACTORS)


def _synthetic(effects: dict[str, float], interaction: float = 0.0, noise: float = 0.0) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    frame = []
    for name in chapter.factorial_recipes():
        on = set(name.split("+")) - {"plain"}
        for seed in range(3):
            y = 1.0 + sum(effects[f] for f in on) + interaction * ({"apollo", "diverse"} <= on)
            frame.append({"name": name, "seed": seed, "y": y + noise * rng.standard_normal()})
    return pd.DataFrame(frame)


def test_fit_recovers_main_effects_and_interactions():
    effects = {"apollo": 0.5, "context_frozen": -0.2, "diverse": 1.0, "dreams": 0.0}
    fit = chapter.fit_effects(_synthetic(effects, interaction=0.7, noise=0.01), "y")
    for name, value in effects.items():
        assert fit.loc[name, "effect"] == pytest.approx(value, abs=0.03)
    assert fit.loc["apollo x diverse", "effect"] == pytest.approx(0.7, abs=0.03)
    assert fit.loc["apollo x diverse", "low"] > 0.6
    assert chapter.interaction_share(fit) >= 1 / 6


def test_additive_outcome_has_no_interaction_and_full_r_squared():
    frame = _synthetic({"apollo": 0.5, "context_frozen": -0.2, "diverse": 1.0, "dreams": 0.3}, noise=0.01)
    assert chapter.r_squared(frame, "y") == pytest.approx(1.0, abs=1e-3)
    pairs = chapter.fit_effects(frame, "y").filter(like=" x ", axis=0)
    assert len(pairs) == 6 and pairs["effect"].abs().max() < 0.03


def test_pretraining_is_cached_by_config(tmp_path):
    first = chapter.pretrained(TINY, cache=tmp_path, device="cpu")
    again = chapter.pretrained(TINY, cache=tmp_path, device="cpu")
    assert not first.cached and again.cached
    for a, b in zip(first.model.parameters(), again.model.parameters(), strict=True):
        assert (a == b).all()
    assert chapter.cache_key(TINY) != chapter.cache_key(replace(TINY, steps=5))


def test_finetune_is_deterministic_per_seed(tiny_setting):
    recipe = chapter.with_defences(["apollo", "diverse", "dreams", "two_stage"])
    a, b = (chapter.finetune(tiny_setting, recipe, seed=3) for _ in range(2))
    assert (a.acquisition, a.novel, a.general_loss, a.drift) == (b.acquisition, b.novel, b.general_loss, b.drift)
    assert math.isfinite(a.retention) and a.drift["all"] > 0


def test_apollo_recipe_keeps_embeddings_on_adamw(tiny_setting):
    opt = chapter.make_optimizer(tiny_setting.base.model, chapter.with_defences(["apollo"]), seed=0)
    assert isinstance(opt, APOLLO)
    assert [g["apollo"] for g in opt.param_groups] == [True, False]


def test_two_stage_alone_writes_no_dreams(tiny_setting):
    run = chapter.finetune(tiny_setting, chapter.with_defences(["two_stage"]), seed=0)
    assert run.dreams_written == run.dreams_kept == 0


def test_run_all_gives_the_same_numbers_in_processes(tiny_setting):
    recipes = {"plain": chapter.PLAIN, "again": chapter.PLAIN, "diverse": chapter.with_defences(["diverse"])}
    serial = chapter.run_all(tiny_setting, recipes, [0, 1], workers=1)
    mapped = chapter.run_all(tiny_setting, recipes, [0, 1], workers=2)
    columns = ["name", "seed", "acquisition", "novel", "forgetting", "drift"]
    pd.testing.assert_frame_equal(serial[columns], mapped[columns])
    assert serial.loc[serial["name"] == "again", "run"].iloc[0] is serial.loc[serial["name"] == "plain", "run"].iloc[0]
