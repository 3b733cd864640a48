"""Diagnosis suite, torch: real failing trainings name the true cause, step and where.

The scenarios live in ``tests/_diagnosis_torch.py`` (shared with ``benchmarks/diagnosis.py``).
"""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("torch")

import nanguard  # noqa: E402
from tests import _diagnosis_torch as S  # noqa: E402
from tests._diagnosis_cases import check_truth  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("nanguard").setLevel(logging.ERROR)
    yield
    logging.getLogger("nanguard").setLevel(logging.NOTSET)


@pytest.mark.parametrize("case", S.CASES, ids=[c.key for c in S.CASES])
def test_cause_step_and_where(case, tmp_path):
    guard = case.run(str(tmp_path / "dumps"))
    assert guard.events, f"{case.title}: no event"
    event = guard.events[0]
    assert (event.cause, event.step, event.where) == (case.cause, case.step, case.where)
    check_truth(case, guard.history)
    dump = nanguard.load(guard.dumps[0])
    assert (dump.event.cause, dump.event.step, dump.event.where) == (
        case.cause, case.step, case.where)
