"""What the guard reports: one step's record, an event, and the abort error."""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Iterator, Mapping
from typing import Any

CAUSES: tuple[str, ...] = (
    "input_nonfinite",
    "target_invalid",
    "weights_nonfinite",
    "activation_nonfinite",
    "logits_nonfinite",
    "logit_overflow",
    "loss_nonfinite",
    "grad_explosion",
    "grad_nonfinite",
    "update_nonfinite",
)


class _MappingMixin(Mapping[str, Any]):
    """Lets a dataclass be read as ``entry["name"]`` as well as ``entry.name``."""

    def __getitem__(self, key: str) -> Any:
        if key not in self._field_names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._field_names())

    def __len__(self) -> int:
        return len(self._field_names())

    @classmethod
    def _field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._field_names()}


@dataclasses.dataclass(eq=False)
class StepRecord(_MappingMixin):
    """One training step as the guard saw it; an entry of ``guard.history``.

    Entries read both ways: ``entry.grad_norm`` and ``entry["grad_norm"]``.

    Args:
        step: Index of the training step from 0, every step the guard saw counted.
        loss: The step's own loss (may be nan/inf).
        logits_min: Minimum of the model output (or the configured logits source).
        logits_max: Maximum of the model output.
        grad_norm: Global L2 norm of the gradients before clipping (may be nan/inf).
        lr: Learning rate of the first parameter group during the step.
        action: What the guard did: None, "skip", "rollback", "lower_lr", "abort" or "log".
        cause: The event's cause when the step was bad, else None.
        layer_grad_norms: L2 norm of each parameter's gradient, in the order of the
            dump's ``meta["param_names"]`` (None when not measured).

    Example:
        >>> r = StepRecord(step=3, loss=0.5, grad_norm=1.2)
        >>> r["grad_norm"] == r.grad_norm
        True
    """

    step: int
    loss: float = math.nan
    logits_min: float = math.nan
    logits_max: float = math.nan
    grad_norm: float = math.nan
    lr: float = math.nan
    action: str | None = None
    cause: str | None = None
    layer_grad_norms: list[float] | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepRecord:
        """Read an entry back from a dump's JSON; ``ValueError`` for a field of the wrong type."""
        fields = _known(cls, data)
        _need(fields, "step", _is_int)
        for name in ("loss", "logits_min", "logits_max", "grad_norm", "lr"):
            _need(fields, name, _is_number)
            if name in fields:
                fields[name] = float(fields[name])
        for name in ("action", "cause"):
            _need(fields, name, _is_text_or_none)
        norms = fields.get("layer_grad_norms")
        if norms is not None and not (isinstance(norms, list) and all(map(_is_number, norms))):
            raise ValueError(f"history entry: layer_grad_norms is not a list of numbers: {norms!r}")
        return cls(**fields)

    def __repr__(self) -> str:
        return (
            f"StepRecord(step={self.step}, loss={self.loss:.6g}, logits=[{self.logits_min:.4g}, "
            f"{self.logits_max:.4g}], grad_norm={self.grad_norm:.4g}, lr={self.lr:.4g}, "
            f"action={self.action!r})"
        )


@dataclasses.dataclass(eq=False)
class Event(_MappingMixin):
    """A bad step: when, why, where, and what to try.

    Args:
        step: The training step at fault.
        cause: One of ``nanguard.CAUSES``: the earliest point in the data flow that went wrong.
        where: Module or layer where non-finite values first appeared, when known.
        message: One human sentence saying what happened and what to try.
        action: What the guard did about it.
        rank: Distributed rank that wrote the event (0 when not distributed).
        details: Extra numbers behind the verdict (JSON-ready).

    Example:
        >>> e = Event(step=7, cause="input_nonfinite", where=None, message="...")
        >>> e.cause
        'input_nonfinite'
    """

    step: int
    cause: str
    where: str | None
    message: str
    action: str | None = None
    rank: int = 0
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Event:
        """Read an event back from a dump's JSON; ``ValueError`` for a field of the wrong type."""
        fields = _known(cls, data)
        for name in ("step", "cause", "where", "message"):
            if name not in fields:
                raise ValueError(f"event: no {name!r}")
        _need(fields, "step", _is_int)
        _need(fields, "rank", _is_int)
        _need(fields, "cause", lambda v: isinstance(v, str))
        _need(fields, "message", lambda v: isinstance(v, str))
        _need(fields, "where", _is_text_or_none)
        _need(fields, "action", _is_text_or_none)
        _need(fields, "details", lambda v: isinstance(v, dict))
        return cls(**fields)

    def __str__(self) -> str:
        return self.message


def _known(cls: Any, data: Any) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ValueError(f"expected a JSON object, found {type(data).__name__}")
    known = set(cls._field_names())
    return {k: v for k, v in data.items() if k in known}


def _need(fields: dict[str, Any], name: str, ok: Any) -> None:
    if name in fields and not ok(fields[name]):
        shown = repr(fields[name])
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ValueError(f"{name} has the wrong type: {shown}")


def _is_int(v: Any) -> bool:
    # A step index: what a training run can count to (JSON holds any integer: 10**400
    # would load, then break every tool doing float arithmetic on it).
    return isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**63


def _is_number(v: Any) -> bool:
    if isinstance(v, int) and not isinstance(v, bool):
        return abs(v) <= sys.float_info.max  # what float() of it can hold
    return isinstance(v, float)


def _is_text_or_none(v: Any) -> bool:
    return v is None or isinstance(v, str)


class NonFiniteTrainingError(RuntimeError):
    """Raised out of the training call when the guard aborts.

    Attributes:
        event: The :class:`Event` that ended the run.
        dump_path: Path of the dump written for it (None if it could not be written).

    Example:
        >>> try:
        ...     raise NonFiniteTrainingError(Event(1, "loss_nonfinite", None, "msg"), None)
        ... except NonFiniteTrainingError as err:
        ...     err.event.step
        1
    """

    def __init__(self, event: Event, dump_path: str | None) -> None:
        where = f" The dump is {dump_path}." if dump_path else ""
        super().__init__(f"nanguard aborted training: {event.message}{where}")
        self.event = event
        self.dump_path = dump_path

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.event, self.dump_path))
