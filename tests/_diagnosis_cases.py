"""What every adapter's diagnosis suite shares, with no framework import."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

RNN_LENGTHS = (10, 20, 30, 90)  # 3**90 overflows float32 in the gradient itself


class Case(NamedTuple):
    """One row of the table: what the truth is, and how to produce it."""

    key: str
    title: str
    run: Callable[[str], Any]  # dump_dir -> the guard after the run
    cause: str
    step: int
    where: str | None


def check_truth(case: Case, history: list[Any]) -> None:
    """Assert the facts that make a too-high-LR row's expectation true (any adapter)."""
    rec = next(r for r in history if r.step == case.step)
    if case.key == "lr_ce":  # loss and logits finite, the gradient norm overflowed
        assert math.isfinite(rec.loss), rec
        assert math.isfinite(rec.logits_min) and math.isfinite(rec.logits_max), rec
        assert not math.isfinite(rec.grad_norm), rec
    if case.key == "lr_mse":  # outputs finite beyond exp's float32 range, loss not finite
        assert math.isfinite(rec.logits_min) and math.isfinite(rec.logits_max), rec
        assert max(abs(rec.logits_min), abs(rec.logits_max)) > 88.7, rec
        assert not math.isfinite(rec.loss), rec
