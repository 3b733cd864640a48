"""Keras 3 model and optimizer state for nanguard: snapshots, rollback, learning rate."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
from keras import ops

MAX_DUMP_BYTES = 64 * 2**20  # per tensor; larger batches are cut along the first dimension


def to_numpy(t: Any, limit: int = MAX_DUMP_BYTES) -> np.ndarray:
    """A host copy of a tensor (or variable), cut to ``limit`` bytes along its first axis."""
    a = np.asarray(t.numpy() if isinstance(t, keras.Variable) else ops.convert_to_numpy(t))
    if a.dtype.kind == "V" or str(a.dtype) == "bfloat16":
        a = a.astype(np.float32)
    if a.ndim and a.nbytes > limit:
        rows = max(1, limit // max(1, a[0].nbytes))
        a = a[:rows]
    return np.array(a, copy=True)


def optimizer_of(optimizer: Any) -> Any:
    """The optimizer that owns the learning rate (the inner one of a LossScaleOptimizer)."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def lr_variable(optimizer: Any) -> Any:
    lr = getattr(optimizer_of(optimizer), "_learning_rate", None)
    return lr if isinstance(lr, keras.Variable) else None


def state_variables(model: Any) -> Iterator[tuple[str, Any]]:
    """Every model and optimizer variable a rollback restores, with a dump name.

    The learning-rate variable is left out: a rollback must not undo ``lower_lr``.
    """
    seen: set[int] = set()
    skip = lr_variable(model.optimizer)
    groups = (
        ("model", [*model.trainable_variables, *model.non_trainable_variables]),
        ("optimizer", list(model.optimizer.variables) if model.optimizer is not None else []),
    )
    for prefix, variables in groups:
        for v in variables:
            if id(v) in seen or v is skip:
                continue
            seen.add(id(v))
            yield f"{prefix}.{v.path}", v


def nonfinite_variables(variables: list[Any]) -> list[Any]:
    """Those of ``variables`` (floating ones) that hold NaN/Inf."""
    found = []
    for v in variables:
        a = to_numpy(v, 2**62)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            found.append(v)
    return found


def first_nonfinite(model: Any) -> str | None:
    """The first trainable or optimizer variable holding NaN/Inf, described.

    Non-trainable model variables (BatchNormalization's moving statistics) are left out:
    the bad step's own forward writes them, so they say nothing about the state before it;
    :meth:`Snapshot.restore_nonfinite` repairs them when the step is skipped.
    """
    buffers = {id(v) for v in model.non_trainable_variables}
    for name, v in state_variables(model):
        if id(v) in buffers:
            continue
        a = to_numpy(v, 2**62)
        if a.dtype.kind != "f":
            continue
        nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
        if nan or inf:
            # A model variable is named by its path (as in meta["param_names"]), optimizer
            # state keeps its "optimizer." prefix, as in the torch adapters.
            name = name.removeprefix("model.")
            return f"{name}: {nan} NaN, {inf} Inf of {a.size} values"
    return None


class Snapshot:
    """Host copies of every model and optimizer variable, restored bit for bit."""

    def __init__(self, step: int, model: Any) -> None:
        self.step = step
        self.saved = [(v, to_numpy(v, 2**62)) for _, v in state_variables(model)]

    def finite(self) -> bool:
        return all(np.isfinite(a).all() for _, a in self.saved if a.dtype.kind == "f")

    def restore(self) -> None:
        for v, a in self.saved:
            v.assign(a)

    def restore_nonfinite(self, variables: list[Any]) -> list[str]:
        """Put back those of ``variables`` now holding NaN/Inf (a skipped step's forward
        left BatchNormalization's moving statistics NaN); their paths."""
        wanted = {id(v) for v in nonfinite_variables(variables)}
        fixed = []
        for v, a in self.saved:
            if id(v) in wanted:
                v.assign(a)
                fixed.append(v.path)
        return fixed


@keras.saving.register_keras_serializable(package="nanguard")
class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A user's schedule times a factor held in a variable (so the step need not retrace).

    nanguard puts it in place of a schedule for the length of a guarded ``fit`` and puts
    the user's schedule back at the end.

    Args:
        schedule: The user's ``LearningRateSchedule`` (or callable of the step).
        scale: A scalar ``keras.Variable`` multiplied into every rate.

    Example:
        >>> sched = keras.optimizers.schedules.ExponentialDecay(0.1, 100, 0.9)
        >>> scaled = ScaledSchedule(sched, keras.Variable(0.5))  # doctest: +SKIP
    """

    def __init__(self, schedule: Any, scale: Any) -> None:
        self.schedule = schedule
        self.scale = scale

    def __call__(self, step: Any) -> Any:
        lr = self.schedule(step)
        return lr * ops.cast(self.scale, keras.backend.standardize_dtype(ops.dtype(lr)))

    def get_config(self) -> dict[str, Any]:
        return {"schedule": keras.saving.serialize_keras_object(self.schedule),
                "scale": float(ops.convert_to_numpy(self.scale))}


class LearningRate:
    """Lowers an optimizer's learning rate, whether a float or a schedule.

    Args:
        optimizer: The model's optimizer.
    """

    def __init__(self, optimizer: Any) -> None:
        self.opt = optimizer_of(optimizer)
        self.scale = 1.0
        self.schedule: Any = None
        self.expected: float | None = None
        current = getattr(self.opt, "_learning_rate", None)
        if current is not None and not isinstance(current, keras.Variable):
            self.schedule = current
            self.scale_var = keras.Variable(1.0, dtype="float32", trainable=False,
                                            name="nanguard_lr_scale")
            self.scaled: ScaledSchedule | None = ScaledSchedule(current, self.scale_var)
            self.opt._learning_rate = self.scaled
        else:
            self.scaled = None

    def reinstall(self) -> None:
        """Start another ``fit`` with the schedule object a reused traced step captured.

        The lowering so far stays, as it does for a float rate (which keeps its value).
        """
        if self.scaled is not None and self.schedule is None:
            self.schedule = self.scaled.schedule
            self.opt._learning_rate = self.scaled

    def lower(self, factor: float) -> None:
        self.scale *= factor
        if self.schedule is not None:
            self.scale_var.assign(self.scale)
            return
        new = self.read() * factor
        self.opt.learning_rate = new
        self.expected = float(np.float32(new))

    def read(self) -> float:
        return float(to_numpy(self.opt.learning_rate))

    def keep_lowered(self) -> None:
        """Re-apply the lowering when another callback (a scheduler) set a new rate."""
        if self.schedule is not None or self.expected is None:
            return
        now = self.read()
        if now != self.expected:
            new = now * self.scale
            self.opt.learning_rate = new
            self.expected = float(np.float32(new))

    def restore(self) -> None:
        """Put the user's schedule back (a float rate keeps its lowered value)."""
        if self.schedule is not None:
            self.opt._learning_rate = self.schedule
            self.schedule = None
