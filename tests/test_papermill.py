"""Running a chapter with papermill: overridden parameters, and a wrong one."""

from __future__ import annotations

import json

import papermill as pm
import pytest
from conftest import ROOT, headless_env

CHAPTER0 = ROOT / "notebooks" / "00_reading_this_book.ipynb"


@pytest.fixture
def papermill_env(tmp_path, monkeypatch):
    for key, value in headless_env(tmp_path / "ledger").items():
        monkeypatch.setenv(key, value)
    return tmp_path


def test_chapter0_runs_with_other_parameters(papermill_env):
    out = papermill_env / "out.ipynb"
    pm.execute_notebook(CHAPTER0, out, parameters={"SEED": 3, "STEPS": 60, "MATRIX_DIM": 6},
                        kernel_name="python3", progress_bar=False, cwd=papermill_env)
    records = json.loads((papermill_env / "ledger" / "00_reading_this_book.json").read_text())
    assert {r["id"] for r in records} == {"quadratic.stable-iff-lr-lambda-below-2",
                                          "quadratic.oscillates-between-1-and-2",
                                          "quadratic.critical-lr-is-2-over-lambda-max"}
    assert all(r["verdict"] == "confirmed" for r in records)
    assert "STEPS = 60" in out.read_text()


def test_wrong_typed_parameter_gives_a_clear_error(papermill_env):
    with pytest.raises(pm.PapermillExecutionError, match="parameter SEED must be an int, got str"):
        pm.execute_notebook(CHAPTER0, papermill_env / "bad.ipynb", parameters={"SEED": "three"},
                            kernel_name="python3", progress_bar=False, cwd=papermill_env)


# Records whose quick-mode verdict rests on one short run per arm with a margin inside the
# seed-to-seed spread: SEED 11 and SEED 0 disagree on them in quick mode. Their published
# (full-mode) verdicts rest on 3 seeds, the prose quotes the verdict instead of stating it, and
# the ids must still be there with a verdict; every other record must agree.
SEED_SENSITIVE_IN_QUICK_MODE = {
    "cortexfix.003-converges-faster",  # steps to a common loss level, 100-step runs
    "cortexfix.003-converges-smoother",  # roughness difference of about 0.01
    "cortexfix.balanced-memory-use",  # share-balance difference of a few hundredths
    # chapter 6, one 150-step run per recipe on a model that has not acquired the behaviour yet:
    "spt.apollo-flatter-minima",  # sharpness ratio of two single runs (0.65 vs 2.9)
    "spt.diversity-spreads-gradient",  # cosine difference of a few hundredths
    "spt.diversity-catches-sharp-minimum",  # sharpness ratio of two single runs (1.68 vs 0.84)
    "spt.multi-scale-beats-baselines",  # score difference of +0.08 vs -0.03
}


@pytest.mark.book
@pytest.mark.parametrize("stem", ["01_meta_loss_collapse", "02_cortexgpt_instability", "03_cortexgpt_stabilized",
                                  "04_titan_self_modification", "05_nested_optimizers",
                                  "06_stability_plasticity"])
def test_verdicts_do_not_depend_on_the_seed(stem, papermill_env, quick_book):
    pm.execute_notebook(ROOT / "notebooks" / f"{stem}.ipynb", papermill_env / f"{stem}.ipynb",
                        parameters={"SEED": 11}, kernel_name="python3", progress_bar=False, cwd=papermill_env)
    other = json.loads((papermill_env / "ledger" / f"{stem}.json").read_text())
    reference = json.loads((quick_book.ledger / f"{stem}.json").read_text())
    assert [r["id"] for r in other] == [r["id"] for r in reference]
    assert [(r["id"], r["verdict"]) for r in other if r["id"] not in SEED_SENSITIVE_IN_QUICK_MODE] == \
        [(r["id"], r["verdict"]) for r in reference if r["id"] not in SEED_SENSITIVE_IN_QUICK_MODE]
