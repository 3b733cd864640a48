"""Diagnosis suite, lightning: real failing trainings name the true cause, step and where.

The scenarios live in ``tests/_diagnosis_lightning.py`` (shared with ``benchmarks/diagnosis.py``).
"""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("lightning")
pytest.importorskip("torch")

import nanguard  # noqa: E402
from tests import _diagnosis_lightning as S  # noqa: E402
from tests._diagnosis_cases import check_truth  # noqa: E402

pytestmark = pytest.mark.lightning


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("nanguard").setLevel(logging.ERROR)
    yield
    logging.getLogger("nanguard").setLevel(logging.NOTSET)


def _params():
    for case in S.CASES:
        marks = ()
        yield pytest.param(case, id=case.key, marks=marks)


@pytest.mark.parametrize("case", list(_params()))
def test_cause_step_and_where(case, tmp_path):
    guard = case.run(str(tmp_path / "dumps"))
    assert guard.events, f"{case.title}: no event"
    event = guard.events[0]
    assert (event.cause, event.step, event.where) == (case.cause, case.step, case.where)
    check_truth(case, guard.history)
    dump = nanguard.load(guard.dumps[0])
    assert (dump.event.cause, dump.event.step, dump.event.where) == (
        case.cause, case.step, case.where)
