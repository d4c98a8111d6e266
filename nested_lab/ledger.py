"""The claims ledger: every finding the book states, with its measurement and verdict.

A notebook opens one :class:`Ledger` and calls :meth:`Ledger.record` (or
:meth:`Ledger.require` for a finding the prose relies on) once per claim. The
verdict is computed from the measured value and the claim's own expectation;
it is never typed in. Each call rewrites ``<ledger dir>/<chapter>.json``, and the
book's ledger page renders every record of the build with :func:`render_html`.

Expectations are strings:

* numeric: ``"< 1.2"``, ``"<= 3"``, ``"> 0"``, ``">= 0.9"``, ``"== 0"``, ``"!= 0"``,
  ``"in [0.5, 2]"`` (closed interval);
* categorical (for a string measurement): ``"== floor"``, ``"!= floor"``,
  ``"in {floor, ceiling}"``.

A measurement may be one value or one value per seed. For per-seed values the
verdict is the positive one (confirmed/reproduced) when every seed meets the
expectation, the negative one when none does, and ``partly`` otherwise.

Each record says how it was established (``evidence``): ``measured`` (code run on
seeded data; ``seeds`` counts the independent seeded runs), ``analytic`` (arithmetic
on a document's own numbers, an identity or a closed form) or ``code`` (a property of
the original's code, shown by a unit test of the replica); only a measured record
has seeds. When the test's precondition does not hold in this build (a "cause of the
oscillation" where nothing oscillates, "fewer spikes" where no arm spiked) the caller
passes ``precondition=False`` with the reason, and the verdict is ``untestable``.
"""

from __future__ import annotations

import html
import json
import math
import operator
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from nested_lab import runtime
from nested_lab.parameters import check_choice

LEDGER_ENV = "NESTED_LAB_LEDGER_DIR"
VERDICTS = ("confirmed", "refuted", "partly", "reproduced", "not-reproduced", "untestable")
EVIDENCE = ("measured", "analytic", "code")
KINDS = {"claim": ("confirmed", "refuted"), "reproduction": ("reproduced", "not-reproduced")}

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_COMPARISON = re.compile(rf"^(<=|>=|==|!=|<|>)\s*({_NUMBER})$")
_INTERVAL = re.compile(rf"^in\s*\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]$")
_CATEGORY = re.compile(r"^(==|!=)\s*([A-Za-z_][\w\-. ]*)$")
_CATEGORY_SET = re.compile(r"^in\s*\{\s*([A-Za-z_][\w\-. ]*(?:,\s*[A-Za-z_][\w\-. ]*)*)\s*\}$")
_OPERATORS = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt,
    ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
}
_ID = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")


class FindingNotHeld(AssertionError):
    """Raised by :meth:`Ledger.require` when a finding the prose relies on does not hold."""


@dataclass(frozen=True)
class Expectation:
    """A parsed expectation string; :meth:`holds` tests one measured value against it."""

    text: str
    categorical: bool

    @classmethod
    def parse(cls, text: str) -> Expectation:
        if not isinstance(text, str):
            raise TypeError(f"expected must be a string such as '< 1.2', got {type(text).__name__}")
        clean = " ".join(text.split())
        if m := _INTERVAL.match(clean):
            if float(m[1]) > float(m[2]):
                raise ValueError(f"empty interval in expectation {text!r}: {m[1]} > {m[2]}")
            return cls(clean, categorical=False)
        if _COMPARISON.match(clean):
            return cls(clean, categorical=False)
        if _CATEGORY.match(clean) or _CATEGORY_SET.match(clean):
            return cls(clean, categorical=True)
        raise ValueError(
            f"malformed expectation {text!r}; allowed forms: '< x', '<= x', '> x', '>= x', '== x', "
            "'!= x', 'in [a, b]' for numbers; '== word', '!= word', 'in {a, b}' for categories"
        )

    def holds(self, value: float | str) -> bool:
        if self.categorical:
            if not isinstance(value, str):
                raise TypeError(f"expectation {self.text!r} is categorical but the measurement is {value!r}")
            if m := _CATEGORY.match(self.text):
                return (value == m[2].strip()) == (m[1] == "==")
            return value in {part.strip() for part in _CATEGORY_SET.match(self.text)[1].split(",")}
        if isinstance(value, str):
            raise TypeError(f"expectation {self.text!r} is numeric but the measurement is {value!r}")
        if m := _COMPARISON.match(self.text):
            return bool(_OPERATORS[m[1]](value, float(m[2])))
        low, high = (float(x) for x in _INTERVAL.match(self.text).groups())
        return low <= value <= high


@dataclass(frozen=True)
class Record:
    """One row of the ledger, as stored in a chapter's JSON ledger file."""

    id: str
    chapter: str
    source: str
    claim: str
    measured: float | str
    expected: str
    unit: str
    verdict: str
    seeds: int | None  # independent seeded runs; None unless the evidence is measured
    quick: bool
    note: str = ""
    values: list[float | str] = field(default_factory=list)
    evidence: str = "measured"

    @classmethod
    def from_dict(cls, data: dict) -> Record:
        """A record read back from JSON; malformed expectations or unknown verdicts raise ``ValueError``."""
        if not isinstance(data, dict):
            raise ValueError(f"ledger record must be a JSON object, got {data!r}")
        required = [f.name for f in fields(cls) if f.name not in ("note", "values", "evidence")]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"ledger record is missing field(s) {missing}: {data!r}")
        if data["verdict"] not in VERDICTS:
            raise ValueError(f"unknown verdict {data['verdict']!r} in record {data['id']!r}; allowed: {VERDICTS}")
        check_choice(f"evidence in record {data['id']!r}", data.get("evidence", "measured"), EVIDENCE)
        Expectation.parse(data["expected"])
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def default_directory() -> Path:
    """Env ``NESTED_LAB_LEDGER_DIR``, else ``_build/ledger`` under the book's root
    (the nearest folder above the working directory that holds ``_toc.yml``)."""
    if env := os.environ.get(LEDGER_ENV):
        return Path(env).resolve()
    return runtime.build_directory() / "ledger"


class Ledger:
    """The claims of one chapter; rewrites ``<directory>/<chapter>.json`` on every record."""

    def __init__(self, chapter: str, source: str = "", directory: str | Path | None = None,
                 quick: bool | None = None) -> None:
        if not isinstance(chapter, str) or not chapter or Path(chapter).name != chapter:
            raise ValueError(f"chapter must be a notebook stem such as '00_reading_this_book', got {chapter!r}")
        self.chapter = chapter
        self.source = source
        self.quick = runtime.is_quick() if quick is None else bool(quick)
        self.path = Path(directory or default_directory()) / f"{chapter}.json"
        self.records: list[Record] = []
        self._write()

    def record(self, id: str, claim: str, measured: float | str | Sequence[float | str], expected: str,
               *, kind: str = "claim", unit: str = "", seeds: int | None = None, note: str = "",
               source: str | None = None, evidence: str = "measured", precondition: bool = True,
               reason: str = "") -> Record:
        """Record a claim with its measurement; the verdict is computed, never given.

        ``kind="claim"`` gives confirmed/refuted, ``kind="reproduction"`` gives
        reproduced/not-reproduced; per-seed measurements may also give ``partly``.
        ``precondition=False`` gives ``untestable``, whatever the measurement; ``reason``
        (required then) says why the claim cannot be tested here and leads the note.
        ``evidence`` is measured, analytic or code; ``seeds`` (default: the number of
        per-seed values) is kept for measured records only.
        """
        if not isinstance(id, str) or not _ID.match(id):
            raise ValueError(f"record id must be lower-case words joined by '.', '-' or '_', got {id!r}")
        if any(r.id == id for r in self.records):
            raise ValueError(f"record id {id!r} is already used in chapter {self.chapter!r}")
        check_choice("record kind", kind, sorted(KINDS))
        check_choice("evidence", evidence, EVIDENCE)
        if not isinstance(precondition, bool) or (not precondition and not reason.strip()):
            raise ValueError(f"{id}: precondition must be True or False, and False needs a reason")
        expectation = Expectation.parse(expected)
        values = _as_values(measured)
        holds = [expectation.holds(v) for v in values]
        verdict = _verdict(holds, KINDS[kind]) if precondition else "untestable"
        record = Record(
            id=id, chapter=self.chapter, source=self.source if source is None else source,
            claim=claim, measured=_summary(values), expected=expectation.text, unit=unit,
            verdict=verdict, seeds=(len(values) if seeds is None else seeds) if evidence == "measured" else None,
            quick=self.quick, note=f"untestable: {reason}. {note}".strip() if not precondition else note,
            values=values if len(values) > 1 else [], evidence=evidence,
        )
        self.records.append(record)
        self._write()
        return record

    def require(self, id: str, claim: str, measured: float | str | Sequence[float | str], expected: str,
                *, verdict: str, **kwargs) -> Record:
        """:meth:`record`, then raise :class:`FindingNotHeld` unless the computed
        verdict is ``verdict``, the one the prose around the call states."""
        check_choice("verdict", verdict, VERDICTS)
        record = self.record(id, claim, measured, expected, **kwargs)
        if record.verdict != verdict:
            raise FindingNotHeld(
                f"{id}: the text states {verdict!r} but the measurement gives {record.verdict!r} "
                f"(measured {record.measured!r}, expected {record.expected!r})"
            )
        return record

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps([asdict(r) for r in self.records], indent=1))
        tmp.replace(self.path)


def _as_values(measured) -> list[float | str]:
    if hasattr(measured, "tolist") and getattr(measured, "ndim", 0) > 0:  # numpy arrays, torch tensors
        measured = measured.tolist()
    is_sequence = isinstance(measured, Sequence) and not isinstance(measured, str)
    items = list(measured) if is_sequence else [measured]
    if not items:
        raise ValueError("measured is an empty sequence; give at least one value")
    values = []
    for item in items:
        if hasattr(item, "item") and not isinstance(item, str):  # numpy / torch scalars
            item = item.item()
        if isinstance(item, bool) or not isinstance(item, int | float | str):
            raise TypeError(f"measured values must be numbers or strings, got {type(item).__name__} ({item!r})")
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"measured value {item!r} is not finite; a verdict needs a finite measurement")
        values.append(item)
    return values


def _summary(values: list[float | str]) -> float | str:
    if len(values) == 1:
        return values[0]
    if any(isinstance(v, str) for v in values):
        return max(dict.fromkeys(values), key=values.count)
    return sum(values) / len(values)


def _verdict(holds: list[bool], outcomes: tuple[str, str]) -> str:
    positive, negative = outcomes
    if all(holds):
        return positive
    return "partly" if any(holds) else negative


def load_records(directory: str | Path, chapters: Sequence[str] | None = None) -> list[Record]:
    """All records in ``directory`` (optionally only ``chapters``, in that order).

    Raises ``ValueError`` for a malformed file or record and ``FileNotFoundError``
    for a requested chapter with no ledger file.
    """
    directory = Path(directory)
    names = chapters if chapters is not None else sorted(p.stem for p in directory.glob("*.json"))
    records = []
    for name in names:
        path = directory / f"{name}.json"
        if not path.exists():
            raise FileNotFoundError(f"no ledger file for chapter {name!r} at {path}")
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"ledger file {path} is not valid JSON: {err}") from err
        if not isinstance(rows, list):
            raise ValueError(f"ledger file {path} must hold a list of records")
        try:
            records.extend(Record.from_dict(row) for row in rows)
        except ValueError as err:
            raise ValueError(f"ledger file {path}: {err}") from err
    return records


def to_frame(records: Sequence[Record]):
    """The records as a pandas DataFrame, one row per record."""
    import pandas as pd

    return pd.DataFrame([asdict(r) for r in records])


def render_html(records: Sequence[Record]) -> str:
    """One HTML table of ``records``, grouped by chapter, each group naming its source document."""
    if not records:
        return '<p class="ledger-empty">No ledger records were produced by this build.</p>'
    head = "".join(f"<th>{h}</th>" for h in ("Claim", "Measured", "Expected", "Verdict", "Evidence", "Note"))
    rows = []
    for chapter in dict.fromkeys(r.chapter for r in records):
        group = [r for r in records if r.chapter == chapter]
        sources = [r.source for r in group]
        main = max(dict.fromkeys(sources), key=sources.count) or "(none)"
        rows.append(f'<tr class="ledger-chapter"><th colspan="6">{_e(chapter)} &mdash; '
                    f"source: {_e(main)}</th></tr>")
        rows.extend(_row(r, show_source=r.source != main) for r in group)
    return (f'<table class="ledger-table"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def _row(r: Record, show_source: bool) -> str:
    measured = f"{r.measured:.4g}" if isinstance(r.measured, float) else str(r.measured)
    mode = " (quick)" if r.quick else ""
    source = f'<br><span class="ledger-source">source: {_e(r.source)}</span>' if show_source else ""
    return (f'<tr id="ledger-{_e(r.chapter)}-{_e(r.id)}" data-record-id="{_e(r.chapter)}/{_e(r.id)}">'
            f"<td><code>{_e(r.id)}</code><br>{_e(r.claim)}{source}</td>"
            f"<td>{_e(measured)} {_e(r.unit)}</td><td><code>{_e(r.expected)}</code></td>"
            f'<td class="verdict-{_e(r.verdict)}">{_e(r.verdict)}</td>'
            f"<td>{_e(_evidence(r))}{mode}</td><td>{_e(r.note)}</td></tr>")


def _evidence(r: Record) -> str:
    """``measured, 3 seeds`` for a measured record, else the kind alone."""
    if r.evidence != "measured" or r.seeds is None:
        return r.evidence
    return f"measured, {r.seeds} seed{'s' if r.seeds != 1 else ''}"


def _e(text: object) -> str:
    return html.escape(str(text))
