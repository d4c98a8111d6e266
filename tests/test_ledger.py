"""Unit tests for nested_lab.ledger: expectations, verdicts, the JSON files and their HTML rendering."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from nested_lab import ledger
from nested_lab.ledger import Expectation, FindingNotHeld, Ledger, Record


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ledger.LEDGER_ENV, raising=False)
    monkeypatch.delenv("NESTED_LAB_QUICK", raising=False)


@pytest.fixture
def book(tmp_path: Path) -> Ledger:
    return Ledger("ch01", source="notebooks/ch01.ipynb", directory=tmp_path, quick=False)


def _file_rows(led: Ledger) -> list[dict]:
    return json.loads(led.path.read_text())


# ----- Expectation.parse / holds -----------------------------------------------------------------

BOUNDARIES = [
    ("< 1.2", [1.1, -5], [1.2, 1.3]),
    ("<= 3", [3, 2.999], [3.0001, 4]),
    ("> 0", [1e-9, 2], [0, -1e-9]),
    (">= 0.9", [0.9, 1], [0.8999, 0]),
    ("== 0", [0, 0.0], [1e-12, -1]),
    ("!= 0", [1, -1e-12], [0, 0.0]),
    ("in [0.5, 2]", [0.5, 1, 2], [0.4999, 2.0001]),
    ("in [1, 1]", [1], [0.999, 1.001]),
    ("< -1e-3", [-0.01], [-0.001, 0]),
    ("== floor", ["floor"], ["ceiling", "Floor", "floor "]),
    ("!= floor", ["ceiling", "round"], ["floor"]),
    ("in {floor, ceiling}", ["floor", "ceiling"], ["round", "floor, ceiling"]),
]


@pytest.mark.parametrize(("text", "inside", "outside"), BOUNDARIES, ids=[b[0] for b in BOUNDARIES])
def test_expectation_holds_at_its_boundaries(text, inside, outside):
    expectation = Expectation.parse(text)
    assert all(expectation.holds(v) for v in inside)
    assert not any(expectation.holds(v) for v in outside)


@pytest.mark.parametrize(("text", "categorical"), [
    ("< 1.2", False), ("in [0.5, 2]", False), ("== 0", False),
    ("== floor", True), ("!= floor", True), ("in {floor, ceiling}", True),
])
def test_expectation_parse_sets_categorical_flag(text, categorical):
    assert Expectation.parse(text).categorical is categorical


@pytest.mark.parametrize(("text", "clean"), [
    ("  <   1.2 ", "< 1.2"), ("<1.2", "<1.2"), ("in  [0.5,\t2]", "in [0.5, 2]"),
])
def test_expectation_parse_normalises_whitespace(text, clean):
    assert Expectation.parse(text).text == clean


@pytest.mark.parametrize("text", ["about 3", "<", "", "=< 3", "in [1, 2", "in {}", "== 3 apples", "~ 1"])
def test_expectation_parse_malformed_raises_value_error(text):
    with pytest.raises(ValueError, match="malformed expectation"):
        Expectation.parse(text)


def test_expectation_parse_empty_interval_raises_value_error():
    with pytest.raises(ValueError, match=r"empty interval in expectation 'in \[2, 1\]'"):
        Expectation.parse("in [2, 1]")


@pytest.mark.parametrize("text", [3, 1.2, None, ["< 1"]])
def test_expectation_parse_non_string_raises_type_error(text):
    with pytest.raises(TypeError, match="expected must be a string"):
        Expectation.parse(text)


def test_numeric_expectation_with_string_measurement_raises_type_error():
    with pytest.raises(TypeError, match="is numeric but the measurement is 'floor'"):
        Expectation.parse("< 1").holds("floor")


def test_categorical_expectation_with_number_raises_type_error():
    with pytest.raises(TypeError, match="is categorical but the measurement is 3"):
        Expectation.parse("== floor").holds(3)


# ----- Ledger.record: verdicts -------------------------------------------------------------------


def test_record_claim_confirmed(book):
    rec = book.record("lr.bound", "GD is stable below 2/lambda", 1.5, "< 2", unit="1/lambda")
    assert rec.verdict == "confirmed"
    assert rec.measured == 1.5
    assert rec.values == []
    assert rec.seeds == 1
    assert (rec.chapter, rec.source, rec.unit, rec.quick) == ("ch01", "notebooks/ch01.ipynb", "1/lambda", False)


def test_record_claim_refuted(book):
    assert book.record("a", "claim", 2.5, "< 2").verdict == "refuted"


def test_record_reproduction_reproduced(book):
    assert book.record("a", "claim", 0.95, ">= 0.9", kind="reproduction").verdict == "reproduced"


def test_record_reproduction_not_reproduced(book):
    assert book.record("a", "claim", 0.5, ">= 0.9", kind="reproduction").verdict == "not-reproduced"


def test_record_per_seed_all_hold_is_confirmed_with_mean(book):
    rec = book.record("a", "claim", [1.0, 2.0, 4.0], "in [0.5, 4]")
    assert rec.verdict == "confirmed"
    assert rec.measured == pytest.approx(7 / 3)
    assert rec.values == [1.0, 2.0, 4.0]
    assert rec.seeds == 3


def test_record_per_seed_some_hold_is_partly(book):
    rec = book.record("a", "claim", (1.0, 3.0), "< 2")
    assert rec.verdict == "partly"
    assert rec.measured == 2.0
    assert rec.values == [1.0, 3.0]


def test_record_per_seed_reproduction_partly(book):
    assert book.record("a", "claim", [0, 1, 2], "== 1", kind="reproduction").verdict == "partly"


def test_record_per_seed_none_hold_is_refuted(book):
    assert book.record("a", "claim", [3.0, 4.0], "< 2").verdict == "refuted"


def test_record_per_seed_none_hold_is_not_reproduced(book):
    assert book.record("a", "claim", [3.0, 4.0], "< 2", kind="reproduction").verdict == "not-reproduced"


def test_record_single_item_list_is_stored_as_plain_value(book):
    rec = book.record("a", "claim", [0.5], "< 1")
    assert rec.measured == 0.5
    assert rec.values == []


def test_record_categorical_measurement(book):
    assert book.record("a", "claim", "floor", "in {floor, ceiling}").verdict == "confirmed"
    assert book.record("b", "claim", "round", "== floor").verdict == "refuted"


def test_record_per_seed_strings_store_most_common(book):
    rec = book.record("a", "claim", ["floor", "ceiling", "floor"], "== floor")
    assert rec.verdict == "partly"
    assert rec.measured == "floor"
    assert rec.values == ["floor", "ceiling", "floor"]


def test_record_seeds_and_source_can_be_overridden(book):
    rec = book.record("a", "claim", 1.0, "> 0", seeds=5, source="paper.pdf", note="n")
    assert (rec.seeds, rec.source, rec.note) == (5, "paper.pdf", "n")


@pytest.mark.parametrize("value", [np.float64(0.5), np.float32(0.5), torch.tensor(0.5), torch.tensor([0.5])])
def test_record_accepts_numpy_and_torch_float_scalars(book, value):
    rec = book.record("a", "claim", value, "< 1")
    assert type(rec.measured) is float
    assert rec.measured == 0.5
    assert rec.verdict == "confirmed"


@pytest.mark.parametrize("value", [np.int64(3), torch.tensor(3)])
def test_record_accepts_numpy_and_torch_int_scalars(book, value):
    rec = book.record("a", "claim", value, "== 3")
    assert type(rec.measured) is int
    assert rec.verdict == "confirmed"


def test_record_accepts_list_of_numpy_scalars(book):
    rec = book.record("a", "claim", [np.float64(1.0), torch.tensor(3.0)], "< 2")
    assert rec.values == [1.0, 3.0]
    assert rec.verdict == "partly"
    json.dumps(_file_rows(book))  # written as plain JSON numbers


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -np.inf, np.float64("nan"), torch.tensor(float("inf")),
                                   [1.0, float("nan")]])
def test_record_non_finite_raises_value_error(book, value):
    with pytest.raises(ValueError, match="is not finite"):
        book.record("a", "claim", value, "< 1")


@pytest.mark.parametrize("value", [True, None, np.bool_(False), [1.0, None], object()])
def test_record_bool_none_and_objects_raise_type_error(book, value):
    with pytest.raises(TypeError, match="measured values must be numbers or strings"):
        book.record("a", "claim", value, "< 1")


def test_record_empty_measurement_raises_value_error(book):
    with pytest.raises(ValueError, match="measured is an empty sequence"):
        book.record("a", "claim", [], "< 1")


def test_record_duplicate_id_raises_value_error(book):
    book.record("a", "claim", 0.5, "< 1")
    with pytest.raises(ValueError, match="record id 'a' is already used in chapter 'ch01'"):
        book.record("a", "other claim", 0.5, "< 1")


@pytest.mark.parametrize("bad_id", ["", "Upper", "-lead", ".lead", "with space", "a/b", 3, None])
def test_record_bad_id_raises_value_error(book, bad_id):
    with pytest.raises(ValueError, match="record id must be lower-case words"):
        book.record(bad_id, "claim", 0.5, "< 1")


@pytest.mark.parametrize("good_id", ["a", "0", "lr.bound", "seed-3_x"])
def test_record_good_ids_are_accepted(book, good_id):
    assert book.record(good_id, "claim", 0.5, "< 1").id == good_id


def test_record_unknown_kind_raises_value_error(book):
    with pytest.raises(ValueError, match="unknown record kind 'finding'"):
        book.record("a", "claim", 0.5, "< 1", kind="finding")


def test_record_malformed_expectation_raises_value_error(book):
    with pytest.raises(ValueError, match="malformed expectation 'about 3'"):
        book.record("a", "claim", 3, "about 3")


def test_record_numeric_expectation_with_string_raises_type_error(book):
    with pytest.raises(TypeError, match="is numeric"):
        book.record("a", "claim", "floor", "< 1")


def test_record_categorical_expectation_with_number_raises_type_error(book):
    with pytest.raises(TypeError, match="is categorical"):
        book.record("a", "claim", 1.0, "== floor")


def test_failed_record_is_neither_kept_nor_written(book):
    book.record("a", "claim", 0.5, "< 1")
    with pytest.raises(ValueError):
        book.record("b", "claim", float("nan"), "< 1")
    assert [r.id for r in book.records] == ["a"]
    assert [row["id"] for row in _file_rows(book)] == ["a"]
    book.record("b", "claim", 0.5, "< 1")  # the id was not used up


# ----- Ledger: construction and files ------------------------------------------------------------


def test_new_ledger_writes_empty_file(tmp_path):
    led = Ledger("ch01", directory=tmp_path)
    assert led.path == tmp_path / "ch01.json"
    assert json.loads(led.path.read_text()) == []


def test_ledger_creates_missing_directory(tmp_path):
    led = Ledger("ch01", directory=tmp_path / "a" / "b")
    assert led.path.is_file()


def test_ledger_rewrites_file_on_each_record(book):
    book.record("a", "first", 0.5, "< 1")
    assert [row["id"] for row in _file_rows(book)] == ["a"]
    book.record("b", "second", [1, 2], "> 0")
    rows = _file_rows(book)
    assert [row["id"] for row in rows] == ["a", "b"]
    assert rows[1]["values"] == [1, 2]
    assert rows == [asdict(r) for r in book.records]
    assert sorted(p.name for p in book.path.parent.iterdir()) == ["ch01.json"]


def test_new_ledger_for_same_chapter_truncates_file(tmp_path):
    Ledger("ch01", directory=tmp_path).record("a", "claim", 0.5, "< 1")
    Ledger("ch01", directory=tmp_path)
    assert json.loads((tmp_path / "ch01.json").read_text()) == []


def test_ledgers_of_two_chapters_keep_separate_files(tmp_path):
    Ledger("ch01", directory=tmp_path).record("a", "claim", 0.5, "< 1")
    Ledger("ch02", directory=tmp_path).record("a", "claim", 0.5, "< 1")
    assert len(json.loads((tmp_path / "ch01.json").read_text())) == 1
    assert len(json.loads((tmp_path / "ch02.json").read_text())) == 1


@pytest.mark.parametrize("chapter", ["", ".", "a/b", "../up", 3, None])
def test_ledger_bad_chapter_raises_value_error(tmp_path, chapter):
    with pytest.raises(ValueError, match="chapter must be a notebook stem"):
        Ledger(chapter, directory=tmp_path)


def test_ledger_quick_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NESTED_LAB_QUICK", "1")
    led = Ledger("ch01", directory=tmp_path)
    assert led.quick is True
    assert led.record("a", "claim", 0.5, "< 1").quick is True


def test_ledger_quick_defaults_to_false_without_env(tmp_path):
    assert Ledger("ch01", directory=tmp_path).quick is False


def test_ledger_explicit_quick_overrides_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NESTED_LAB_QUICK", "1")
    assert Ledger("ch01", directory=tmp_path, quick=False).quick is False


def test_ledger_invalid_quick_env_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("NESTED_LAB_QUICK", "perhaps")
    with pytest.raises(ValueError, match="is not a boolean"):
        Ledger("ch01", directory=tmp_path)


def test_ledger_without_directory_uses_env_directory(tmp_path, monkeypatch):
    monkeypatch.setenv(ledger.LEDGER_ENV, str(tmp_path / "ledger"))
    led = Ledger("ch01")
    assert led.path == (tmp_path / "ledger").resolve() / "ch01.json"
    assert led.path.is_file()


# ----- Ledger.require ----------------------------------------------------------------------------


def test_require_returns_record_when_verdict_matches(book):
    rec = book.require("a", "claim", 0.5, "< 1", verdict="confirmed")
    assert rec.verdict == "confirmed"
    assert book.records == [rec]


def test_require_may_state_a_negative_or_partly_verdict(book):
    assert book.require("a", "claim", 2.0, "< 1", verdict="refuted").verdict == "refuted"
    assert book.require("b", "claim", [0.5, 2.0], "< 1", verdict="partly").verdict == "partly"


def test_require_passes_keyword_arguments_to_record(book):
    rec = book.require("a", "claim", 0.5, "< 1", verdict="reproduced", kind="reproduction", unit="s")
    assert (rec.verdict, rec.unit) == ("reproduced", "s")


def test_require_raises_finding_not_held_when_verdict_differs(book):
    with pytest.raises(FindingNotHeld, match="a: the text states 'confirmed' but the measurement gives 'refuted'"):
        book.require("a", "claim", 2.0, "< 1", verdict="confirmed")
    assert [row["verdict"] for row in _file_rows(book)] == ["refuted"]  # still recorded


def test_finding_not_held_is_an_assertion_error():
    assert issubclass(FindingNotHeld, AssertionError)


def test_require_claim_kind_cannot_state_reproduced(book):
    with pytest.raises(FindingNotHeld, match="gives 'confirmed'"):
        book.require("a", "claim", 0.5, "< 1", verdict="reproduced")


def test_require_unknown_verdict_raises_value_error_and_records_nothing(book):
    with pytest.raises(ValueError, match="unknown verdict 'true'"):
        book.require("a", "claim", 0.5, "< 1", verdict="true")
    assert book.records == []


# ----- load_records / to_frame -------------------------------------------------------------------


def _two_chapters(directory: Path) -> tuple[Ledger, Ledger]:
    first = Ledger("ch01", source="ch01.ipynb", directory=directory, quick=True)
    first.record("lr.bound", "stable below 2/lambda", 1.5, "< 2", unit="x", note="note")
    first.record("seeds", "per seed", [0.5, 1.5], "< 1")
    first.record("regime", "categorical", "floor", "in {floor, ceiling}")
    second = Ledger("ch00", source="ch00.ipynb", directory=directory)
    second.record("repro", "a reproduction", 3, "in [2, 4]", kind="reproduction", seeds=4)
    return first, second


def test_load_records_round_trip(tmp_path):
    first, second = _two_chapters(tmp_path)
    assert ledger.load_records(tmp_path, ["ch01", "ch00"]) == first.records + second.records


def test_load_records_without_chapters_reads_all_files_sorted(tmp_path):
    first, second = _two_chapters(tmp_path)
    assert ledger.load_records(tmp_path) == second.records + first.records


def test_load_records_accepts_string_directory(tmp_path):
    first, _ = _two_chapters(tmp_path)
    assert ledger.load_records(str(tmp_path), ["ch01"]) == first.records


def test_load_records_of_empty_directory_is_empty(tmp_path):
    assert ledger.load_records(tmp_path) == []


def test_load_records_missing_chapter_raises_file_not_found(tmp_path):
    _two_chapters(tmp_path)
    with pytest.raises(FileNotFoundError, match="no ledger file for chapter 'ch09'"):
        ledger.load_records(tmp_path, ["ch01", "ch09"])


def test_load_records_invalid_json_raises_value_error(tmp_path):
    (tmp_path / "ch01.json").write_text("[{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        ledger.load_records(tmp_path)


def test_load_records_non_list_file_raises_value_error(tmp_path):
    (tmp_path / "ch01.json").write_text('{"id": "a"}')
    with pytest.raises(ValueError, match="must hold a list of records"):
        ledger.load_records(tmp_path)


def _rewrite_first_row(directory: Path, **changes) -> None:
    path = directory / "ch01.json"
    rows = json.loads(path.read_text())
    rows[0].update(changes)
    path.write_text(json.dumps(rows))


def test_load_records_unknown_verdict_raises_value_error(tmp_path):
    _two_chapters(tmp_path)
    _rewrite_first_row(tmp_path, verdict="probably")
    with pytest.raises(ValueError, match=r"unknown verdict 'probably' in record 'lr\.bound'"):
        ledger.load_records(tmp_path)


def test_load_records_malformed_expectation_raises_value_error(tmp_path):
    _two_chapters(tmp_path)
    _rewrite_first_row(tmp_path, expected="roughly 2")
    with pytest.raises(ValueError, match="malformed expectation 'roughly 2'"):
        ledger.load_records(tmp_path)


def test_load_records_missing_field_raises_value_error(tmp_path):
    (tmp_path / "ch01.json").write_text(json.dumps([{"id": "a", "verdict": "confirmed"}]))
    with pytest.raises(ValueError, match=r"ledger record is missing field\(s\)"):
        ledger.load_records(tmp_path)


def test_load_records_without_optional_fields(tmp_path):
    row = {"id": "a", "chapter": "ch01", "source": "", "claim": "c", "measured": 1.0, "expected": "< 2",
           "unit": "", "verdict": "confirmed", "seeds": 1, "quick": False}
    (tmp_path / "ch01.json").write_text(json.dumps([row]))
    (rec,) = ledger.load_records(tmp_path)
    assert (rec.note, rec.values) == ("", [])


def test_load_records_non_object_row_raises_value_error(tmp_path):
    (tmp_path / "ch01.json").write_text("[1]")
    with pytest.raises(ValueError, match="ch01"):
        ledger.load_records(tmp_path)


def test_to_frame_has_one_row_per_record(tmp_path):
    first, second = _two_chapters(tmp_path)
    frame = ledger.to_frame(first.records + second.records)
    assert len(frame) == 4
    assert list(frame["id"]) == ["lr.bound", "seeds", "regime", "repro"]
    assert {"verdict", "measured", "expected", "values"} <= set(frame.columns)


# ----- render_html -------------------------------------------------------------------------------


def test_render_html_empty_says_no_records():
    assert "No ledger records" in ledger.render_html([])


def test_render_html_groups_by_chapter_and_names_source(tmp_path):
    first, second = _two_chapters(tmp_path)
    page = ledger.render_html(first.records + second.records)
    assert page.startswith('<table class="ledger-table">')
    assert page.count('class="ledger-chapter"') == 2
    assert page.index("ch01 &mdash; source: ch01.ipynb") < page.index("ch00 &mdash; source: ch00.ipynb")


def test_render_html_lists_records_of_a_chapter_under_its_heading(tmp_path):
    first, second = _two_chapters(tmp_path)
    page = ledger.render_html(first.records + second.records)
    heading_ch00 = page.index("ch00 &mdash;")
    assert all(page.index(f'data-record-id="ch01/{r.id}"') < heading_ch00 for r in first.records)
    assert page.index('data-record-id="ch00/repro"') > heading_ch00


def test_render_html_has_one_record_id_per_record(tmp_path):
    first, second = _two_chapters(tmp_path)
    records = first.records + second.records
    page = ledger.render_html(records)
    assert page.count("data-record-id=") == len(records)
    for r in records:
        assert page.count(f'data-record-id="{r.chapter}/{r.id}"') == 1


def test_render_html_without_source_says_none(tmp_path):
    led = Ledger("ch01", directory=tmp_path)
    led.record("a", "claim", 0.5, "< 1")
    assert "source: (none)" in ledger.render_html(led.records)


def test_render_html_escapes_claims(tmp_path):
    led = Ledger("ch01", directory=tmp_path)
    led.record("a", "<script>alert(1)</script> & x<y", 0.5, "< 1", note="<i>n</i>")
    page = ledger.render_html(led.records)
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; x&lt;y" in page
    assert "&lt;i&gt;n&lt;/i&gt;" in page
    assert "<code>&lt; 1</code>" in page


def test_render_html_shows_verdict_measurement_and_quick_mode(tmp_path):
    led = Ledger("ch01", directory=tmp_path, quick=True)
    led.record("a", "claim", 0.123456, "< 1", unit="s", seeds=3)
    led.record("b", "claim", "floor", "== floor")
    page = ledger.render_html(led.records)
    assert '<td class="verdict-confirmed">confirmed</td>' in page
    assert "0.1235 s" in page
    assert "<td>measured, 3 seeds (quick)</td>" in page
    assert "floor" in page


def test_render_html_row_ids_are_unique_across_chapters(tmp_path):
    records = []
    for chapter in ("ch01", "ch02"):
        led = Ledger(chapter, directory=tmp_path)
        records.append(led.record("lr.bound", "claim", 0.5, "< 1"))
    page = ledger.render_html(records)
    assert page.count('id="ledger-lr.bound"') <= 1


def test_render_html_of_loaded_records_matches_original(tmp_path):
    first, second = _two_chapters(tmp_path)
    records = first.records + second.records
    assert ledger.render_html(ledger.load_records(tmp_path, ["ch01", "ch00"])) == ledger.render_html(records)


# ----- default_directory -------------------------------------------------------------------------


def test_default_directory_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv(ledger.LEDGER_ENV, str(tmp_path / "somewhere"))
    assert ledger.default_directory() == (tmp_path / "somewhere").resolve()


def test_default_directory_resolves_relative_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(ledger.LEDGER_ENV, "rel/dir")
    assert ledger.default_directory() == tmp_path.resolve() / "rel" / "dir"


def test_default_directory_finds_toc_in_parent(tmp_path, monkeypatch):
    root = tmp_path / "book"
    (root / "notebooks" / "deep").mkdir(parents=True)
    (root / "_toc.yml").write_text("root: intro\n")
    monkeypatch.chdir(root / "notebooks" / "deep")
    assert ledger.default_directory() == root.resolve() / "_build" / "ledger"


def test_default_directory_finds_toc_in_working_directory(tmp_path, monkeypatch):
    (tmp_path / "_toc.yml").write_text("root: intro\n")
    monkeypatch.chdir(tmp_path)
    assert ledger.default_directory() == tmp_path.resolve() / "_build" / "ledger"


def test_default_directory_uses_nearest_toc(tmp_path, monkeypatch):
    inner = tmp_path / "outer" / "inner"
    (inner / "sub").mkdir(parents=True)
    (tmp_path / "outer" / "_toc.yml").write_text("root: a\n")
    (inner / "_toc.yml").write_text("root: b\n")
    monkeypatch.chdir(inner / "sub")
    assert ledger.default_directory() == inner.resolve() / "_build" / "ledger"


def test_default_directory_without_toc_uses_working_directory(tmp_path, monkeypatch):
    here = tmp_path.resolve()
    if any((p / "_toc.yml").exists() for p in (here, *here.parents)):
        pytest.skip("a _toc.yml lies above the temporary directory")
    monkeypatch.chdir(tmp_path)
    assert ledger.default_directory() == here / "_build" / "ledger"


def test_record_dataclass_is_frozen(book):
    rec = book.record("a", "claim", 0.5, "< 1")
    with pytest.raises(AttributeError):
        rec.verdict = "refuted"
    assert isinstance(rec, Record)


# ----- evidence kinds and the untestable verdict ----------------------------------------------------


def test_evidence_kind_is_recorded_and_only_measured_records_have_seeds(tmp_path):
    led = Ledger("ch01", directory=tmp_path)
    measured = led.record("a", "claim", [0.5, 0.6, 0.7], "< 1")
    identity = led.record("b", "an identity", 0.0, "== 0", evidence="analytic", seeds=3)
    code = led.record("c", "a property of the code", 128, "== 128", evidence="code")
    assert (measured.evidence, measured.seeds) == ("measured", 3)
    assert (identity.evidence, identity.seeds) == ("analytic", None)
    assert (code.evidence, code.seeds) == ("code", None)
    page = ledger.render_html(led.records)
    assert "<td>measured, 3 seeds</td>" in page and "<td>analytic</td>" in page and "<td>code</td>" in page
    assert [r.evidence for r in ledger.load_records(tmp_path)] == ["measured", "analytic", "code"]
    with pytest.raises(ValueError, match="unknown evidence 'guess'"):
        led.record("d", "claim", 0.5, "< 1", evidence="guess")


def test_a_failed_precondition_is_untestable_never_confirmed_or_refuted(tmp_path):
    led = Ledger("ch01", directory=tmp_path)
    spikes_original, spikes_fixed = 0, 0  # neither arm spiked: "fewer spikes" cannot be judged
    for i, expected in enumerate(("< 0", ">= 0")):
        record = led.record(f"fewer-spikes-{i}", "fewer spikes than the original",
                            spikes_fixed - spikes_original, expected,
                            precondition=spikes_original + spikes_fixed > 0, reason="neither arm spiked")
        assert record.verdict == "untestable"
        assert record.note.startswith("untestable: neither arm spiked")
    assert led.require("osc", "a cause of the oscillation", 1.1, "> 1.5", precondition=False,
                       reason="the original does not oscillate", verdict="untestable").verdict == "untestable"
    page = ledger.render_html(led.records)
    assert '<td class="verdict-untestable">untestable</td>' in page


def test_untestable_needs_a_reason(tmp_path):
    led = Ledger("ch01", directory=tmp_path)
    with pytest.raises(ValueError, match="False needs a reason"):
        led.record("a", "claim", 0.5, "< 1", precondition=False)


def test_records_written_before_evidence_kinds_read_back_as_measured(tmp_path):
    row = {"id": "a", "chapter": "ch01", "source": "", "claim": "c", "measured": 0.5, "expected": "< 1",
           "unit": "", "verdict": "confirmed", "seeds": 1, "quick": True}
    (tmp_path / "ch01.json").write_text(json.dumps([row]))
    assert ledger.load_records(tmp_path)[0].evidence == "measured"
