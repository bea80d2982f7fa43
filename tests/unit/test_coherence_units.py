"""Pieces of the coherence machinery that need no Redis."""

from __future__ import annotations

from service.coherence import _id, _independent_runs
from service.tiers.sqlite import JournalRow


def row(seq: int, op: str, key: str) -> JournalRow:
    return JournalRow(seq, op, key, None, seq)  # type: ignore[arg-type]


def test_journal_replay_keeps_the_order_that_matters() -> None:
    rows = [row(1, "set", "a"), row(2, "set", "b"), row(3, "delete", "a"),
            row(4, "pattern", "b*"), row(5, "set", "b"), row(6, "set", "c")]  # fmt: skip
    runs = [[r.seq for r in run] for run in _independent_runs(rows)]
    assert runs == [[1, 2], [3], [4], [5, 6]]


def test_stream_ids_compare_as_numbers() -> None:
    assert _id("1700000000000-10") > _id("1700000000000-9")
    assert _id("1700000000001-0") > _id("1700000000000-99")
    assert _id("0-0") < _id("1-0")
