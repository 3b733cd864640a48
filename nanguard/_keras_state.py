"""Keras 3 model and optimizer state for nanguard: snapshots, rollback, learning rate."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
from keras import ops

from nanguard import detector

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


def inner_optimizer(optimizer: Any) -> Any:
    """A ``LossScaleOptimizer``'s inner optimizer (which holds the slots and the settings),
    else the optimizer itself."""
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None and isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return inner
    return optimizer


def slot_owners(optimizer: Any) -> dict[int, Any]:
    """Each optimizer slot variable's trainable variable, by the slot's id: Keras keeps a
    slot list per kind (``_momentums``, ``_velocities``, ...) aligned with the optimizer's
    ``_trainable_variables``. Empty when the optimizer keeps none such."""
    optimizer = inner_optimizer(optimizer)
    tvs = list(getattr(optimizer, "_trainable_variables", None) or [])
    held = {id(v) for v in tvs}
    owners: dict[int, Any] = {}
    for value in vars(optimizer).values():
        if isinstance(value, list) and value is not tvs and len(value) == len(tvs):
            for ref, slot in zip(tvs, value, strict=True):
                if hasattr(slot, "assign") and hasattr(slot, "path") and id(slot) not in held:
                    owners[id(slot)] = ref
    return owners


def lr_scaled_slots(optimizer: Any) -> set[int]:
    """The ids of slots that hold a learning rate times gradients (Keras's SGD and RMSprop
    momentum): finite gradients and a huge rate overflow them, so a non-finite one after an
    update does not prove a state that was bad before it."""
    optimizer = inner_optimizer(optimizer)
    name = type(optimizer).__name__
    slots = (getattr(optimizer, "momentums", None) if name == "SGD"
             else getattr(optimizer, "_momentums", None) if name == "RMSprop" else None)
    return {id(s) for s in slots or [] if s is not None}


def first_nonfinite_variable(model: Any, *, optimizer_wide_only: bool = False
                             ) -> tuple[str, str, np.ndarray] | None:
    """The first trainable or optimizer variable holding NaN/Inf: its description, its name
    (as ``where`` gives it) and its host copy. ``optimizer_wide_only``: optimizer variables
    of float32 or wider only.

    Non-trainable model variables (BatchNormalization's moving statistics) are left out:
    the bad step's own forward writes them, so they say nothing about the state before it;
    :meth:`Snapshot.restore_nonfinite` repairs them when the step is skipped.
    """
    buffers = {id(v) for v in model.non_trainable_variables}
    if optimizer_wide_only and model.optimizer is not None:
        buffers |= lr_scaled_slots(model.optimizer)
    for name, v in state_variables(model):
        if id(v) in buffers or (optimizer_wide_only and not name.startswith("optimizer.")):
            continue
        a = to_numpy(v, 2**62)
        if a.dtype.kind != "f" or (optimizer_wide_only and a.dtype.itemsize < 4):
            continue
        nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
        if nan or inf:
            # A model variable is named by its path (as in meta["param_names"]), optimizer
            # state keeps its "optimizer." prefix, as in the torch adapters.
            name = name.removeprefix("model.")
            return f"{name}: {nan} NaN, {inf} Inf of {a.size} values", name, a
    return None


def weight_peaks(model: Any) -> list[tuple[str, float]]:
    """Each trainable floating variable's path and largest ``|w|``."""
    peaks = []
    for v in model.trainable_variables:
        a = to_numpy(v, 2**62)
        if a.dtype.kind == "f" and a.size:
            peaks.append((v.path, float(np.abs(a).max())))
    return peaks


class Snapshot:
    """Host copies of every model and optimizer variable, restored bit for bit."""

    def __init__(self, step: int, model: Any) -> None:
        self.step = step
        self.saved = [(v, to_numpy(v, 2**62)) for _, v in state_variables(model)]
        self._buffers = {id(v) for v in model.non_trainable_variables}

    def finite(self) -> bool:
        """Whether the trainable and optimizer variables are finite and the non-trainable
        ones hold no NaN: a non-trainable variable may hold ``-inf`` on purpose (a mask, a
        running max that starts there)."""
        return all((not np.isnan(a).any()) if id(v) in self._buffers else np.isfinite(a).all()
                   for v, a in self.saved if a.dtype.kind == "f")

    def restore(self) -> None:
        for v, a in self.saved:
            v.assign(a)

    def restore_nonfinite(self, variables: list[Any]) -> list[str]:
        """Put back those of ``variables`` the step left non-finite (a skipped step's forward
        left BatchNormalization's moving statistics NaN); their paths. An Inf the snapshot
        holds at the same place is intended (a ``-inf`` mask): that variable is kept."""
        fixed = []
        for v, a in self.left_nonfinite(variables):
            v.assign(a)
            fixed.append(v.path)
        return fixed

    def restore_nonfinite_weights(self, model: Any) -> list[str]:
        """Put back :meth:`broken_weights` as they were in the snapshot; their paths."""
        fixed = []
        for v, a in self.broken_weights(model):
            v.assign(a)
            fixed.append(v.path)
        return fixed

    def broken_weights(self, model: Any) -> list[tuple[Any, np.ndarray]]:
        """The trainable variables holding NaN/Inf, or whose optimizer slots do, or
        that the update blew up, or whose slots it did (``detector.blew_up`` against this
        snapshot), each with its slots (:func:`slot_owners`; by name, Keras's
        ``<optimizer>/<variable path with _>_<slot>``, for an optimizer without slot lists),
        with the snapshot's copies: what a skip's repair of weights an applied update made
        non-finite puts back."""
        trainable = list(model.trainable_variables)
        slots = list(model.optimizer.variables) if model.optimizer is not None else []
        owners = slot_owners(model.optimizer) if model.optimizer is not None else {}

        def owner(slot: Any) -> Any:
            if id(slot) in owners:
                return owners[id(slot)]
            # By name, the longest match (`w_scale_momentum` is w_scale's, not w's).
            name = slot.path.split("/", 1)[-1]
            found = [v for v in trainable if name.startswith(v.path.replace("/", "_") + "_")]
            return max(found, key=lambda v: len(v.path), default=None)

        saved = {id(v): a for v, a in self.saved}

        def blown_up(v: Any) -> bool:
            # Finite, but the same update blew it up (1e38 next to the Inf): every later
            # step would be bad.
            a, was = to_numpy(v, 2**62), saved.get(id(v))
            return bool(was is not None and a.dtype.kind == "f" and a.size and was.size
                        and np.isfinite(a).all()
                        and detector.blew_up(float(np.abs(a).max()), float(np.abs(was).max())))

        bad = {id(v) for v in nonfinite_variables(trainable)}
        bad |= {id(v) for v in trainable if blown_up(v)}
        broken_slots = [*nonfinite_variables(slots), *(s for s in slots if blown_up(s))]
        bad |= {id(o) for o in map(owner, broken_slots) if o is not None}
        wanted = bad | {id(s) for s in slots if (o := owner(s)) is not None and id(o) in bad}
        return [(v, a) for v, a in self.saved if id(v) in wanted]

    def left_nonfinite(self, variables: list[Any]) -> list[tuple[Any, np.ndarray]]:
        """Those of ``variables`` holding NaN, or Inf where the snapshot's copy is finite,
        each with that copy (an Inf the snapshot holds at the same place is intended)."""
        wanted = {id(v) for v in nonfinite_variables(variables)}
        found = []
        for v, a in self.saved:
            if id(v) in wanted and not detector.inf_as_before(to_numpy(v, 2**62), a):
                found.append((v, a))
        return found


class MetricState:
    """The model's metric state (Keras's running loss, compiled metrics) before a step.

    The loss-only fallback cannot keep a bad batch out of the metrics inside the step, so it
    saves them before each step and puts them back when it acts on the step. The copies stay
    on the device (no transfer); ``model.metrics_variables`` are a few scalars per metric.

    Args:
        model: The model being trained.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.saved: dict[int, tuple[Any, Any]] = {}

    def save(self) -> None:
        self.saved = {id(v): (v, ops.copy(v.value)) for v in self.model.metrics_variables}

    def restore(self) -> None:
        """Assign back the saved values; a metric built during the step (compiled metrics
        are built in the first one) had nothing counted before it: reset."""
        for metric in self.model.metrics:
            variables = list(metric.variables)
            if all(id(v) in self.saved for v in variables):
                for v in variables:
                    v.assign(self.saved[id(v)][1])
            else:
                metric.reset_state()


def build_optimizer(model: Any) -> bool:
    """Create the optimizer's variables now, as Keras does before a distributed ``fit``.

    TensorFlow without a distribution strategy builds the optimizer lazily, inside the first
    traced step: a snapshot taken before it would hold no slots (Adam's moments) and a
    rollback to it would not restore them. Returns False when the model itself is not built
    yet (a subclassed model before its first call): its variables appear in the first step.
    """
    optimizer = model.optimizer
    flatten = getattr(model, "_flatten_layers", None)
    layers = list(flatten()) if callable(flatten) else [model]
    if not all(getattr(layer, "built", False) for layer in layers):
        return False
    if not optimizer.built:
        strategy = getattr(model, "distribute_strategy", None)
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            optimizer.build(model.trainable_variables)
    return True


class LearningRate:
    """Lowers an optimizer's learning rate, whether a float or a schedule, without touching it.

    The guard's factor is a variable multiplied into the rate the optimizer reads *inside the
    training step* (its ``_get_current_learning_rate`` is patched on the instance while a
    guarded ``fit`` runs). Outside the step, ``optimizer.learning_rate`` is your own rate: a
    callback that scales it (``ReduceLROnPlateau``, ``LearningRateScheduler(lambda e, lr:
    lr * 0.9)``) or sets it outright (``lambda e: 0.1 * 0.9**e``) changes your rate, and the
    factor applies on top, once per lowering. Nothing of nanguard's is ever stored in the
    optimizer, so a checkpoint written during ``fit`` holds your own rate or schedule.

    Args:
        optimizer: The model's optimizer (the inner one of a ``LossScaleOptimizer`` owns
            the rate).

    Example:
        >>> lr = LearningRate(model.optimizer)  # doctest: +SKIP
        >>> with lr.in_step():  # doctest: +SKIP
        ...     model.train_function(iterator)  # runs at lr * lr.factor
    """

    def __init__(self, optimizer: Any) -> None:
        self.opt = optimizer_of(optimizer)
        self.factor = 1.0
        self.scale = keras.Variable(1.0, dtype="float32", trainable=False,
                                    name="nanguard_lr_scale")
        self._in_step = False
        self.install()

    @property
    def is_schedule(self) -> bool:
        return not isinstance(getattr(self.opt, "_learning_rate", None), keras.Variable)

    def install(self) -> None:
        """Patch the optimizer instance (again for a later ``fit`` reusing a traced step)."""
        if "_get_current_learning_rate" in vars(self.opt):
            return
        orig = self.opt._get_current_learning_rate

        def current_learning_rate() -> Any:
            lr = orig()
            # A flag, not the thread: MirroredStrategy traces each replica in a thread of its
            # own. Batch-end callbacks run on Keras's worker thread only when every one is
            # async-safe, so no callback that writes the rate reads it during a step.
            if not self._in_step:
                return lr  # a callback reading (and maybe rescaling) your own rate
            dtype = keras.backend.standardize_dtype(getattr(lr, "dtype", "float32"))
            return ops.multiply(lr, ops.cast(self.scale, dtype))

        vars(self.opt)["_get_current_learning_rate"] = current_learning_rate

    @contextlib.contextmanager
    def in_step(self) -> Iterator[None]:
        """Within this block (the training step, traced or run) the rate is lowered."""
        self._in_step = True
        try:
            yield
        finally:
            self._in_step = False

    def lower(self, factor: float) -> None:
        self.factor *= factor
        self.scale.assign(self.factor)

    def read(self) -> float:
        """The rate the next step uses: your rate (or schedule's) times the guard's factor."""
        return float(to_numpy(self.opt.learning_rate)) * float(np.float32(self.factor))

    def restore(self) -> None:
        """Unpatch at the end of ``fit``. A float rate keeps its lowered value (the factor
        is folded into it); a schedule is left as it was, and the factor stays with this
        object for a later ``fit`` that reuses the traced step."""
        vars(self.opt).pop("_get_current_learning_rate", None)
        if not self.is_schedule and self.factor != 1.0:
            base = float(to_numpy(self.opt.learning_rate))
            self.opt.learning_rate = base * self.factor
            self.factor = 1.0
            self.scale.assign(1.0)
        elif self.is_schedule and self.factor != 1.0:
            # A black-box tester's `for ...: model.fit(..., callbacks=[NanGuard()])` trained
            # at the schedule's full rate again from the second fit on, silently.
            warnings.warn(
                f"nanguard lowered the learning rate to {self.factor:g}x your "
                f"{type(self.opt.learning_rate).__name__} schedule during this fit; the "
                "schedule itself is left as it was, so only a later fit with this same "
                "NanGuard keeps the lowering (a new NanGuard, or none, trains at the "
                "schedule's full rate). Reuse this guard, or lower the schedule itself.",
                RuntimeWarning,
                stacklevel=2,
            )
