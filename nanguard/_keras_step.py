"""What nanguard puts inside a Keras 3 training step (the hot path).

Four instance attributes are patched while a guarded ``fit`` runs, never the classes:

- ``model.train_step``: opens a per-step capture and returns the packed stats, plus the
  batch and ``y_pred`` as tensors that stay where they are (read only on a bad step).
- ``model.compute_loss``: records the batch's own loss and ``y_pred``; sparse labels
  outside ``[0, n_classes)`` are replaced by 0 for the loss (so TensorFlow on the CPU does
  not raise) and the loss is made NaN, which makes the step bad.
- ``optimizer.apply``: the global gradient norm before clipping, the finiteness decision,
  ``clip_grad_norm``, and the update itself inside a ``cond`` (as Keras's own
  ``LossScaleOptimizer`` does), then one check that the weights stayed finite.
- ``model._loss_tracker.update_state``: leaves out a bad batch's loss, so one skipped
  batch does not turn Keras's running mean (``logs["loss"]``) into NaN for the epoch.

The same code runs traced (TensorFlow graph) and eagerly (``run_eagerly=True``, torch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import keras
from keras import ops

STATS_KEY = "_nanguard"
# Order of the packed stats tensor; per-variable gradient norms follow.
HEAD = ("loss", "logits_min", "logits_max", "grad_norm", "lr", "applied", "weights_ok",
        "labels_ok", "amp_skip")


def float_tensors(structure: Any) -> list[Any]:
    """The floating tensors of a nested structure, in order (other leaves are skipped)."""
    return [t for t in keras.tree.flatten(structure)
            if t is not None and hasattr(t, "dtype")
            and "float" in keras.backend.standardize_dtype(t.dtype)]


def first_float(structure: Any) -> Any:
    """The first floating tensor of a (nested) model output: the logits source."""
    found = float_tensors(structure)
    return found[0] if found else None


def ignore_class(model: Any) -> int | None:
    """The class id the compiled loss ignores (``SparseCategoricalCrossentropy(ignore_class=)``)."""
    value = getattr(getattr(model, "loss", None), "ignore_class", None)
    return None if value is None else int(value)


def sparse_classes(y_shape: tuple[Any, ...], pred_shape: tuple[Any, ...]) -> int | None:
    """``n_classes`` when targets of this shape are class ids for outputs of that shape."""
    if not pred_shape or pred_shape[-1] is None or pred_shape[-1] < 2:
        return None
    n = int(pred_shape[-1])
    if len(y_shape) == len(pred_shape) - 1:
        return n
    if len(y_shape) == len(pred_shape) and y_shape[-1] == 1:
        return n
    return None


class _Capture:
    """Tensors of one step, linked across the patched methods while it is traced/run."""

    def __init__(self) -> None:
        self.loss: Any = None
        self.y_pred: Any = None
        self.labels_ok: Any = None
        self.grad: tuple[Any, ...] | None = None


class StepInstrument:
    """Patches a compiled Keras model's training step; :meth:`remove` undoes it.

    Args:
        model: The compiled model (its class's default ``train_step``).
        clip_grad_norm: Clip the global gradient norm to this value, or None.
        sparse_float_labels: Treat floating targets as class ids when their shape says so
            (the compiled loss is a sparse one).
    """

    def __init__(
        self, model: Any, clip_grad_norm: float | None, sparse_float_labels: bool
    ) -> None:
        self.model = model
        self.optimizer = model.optimizer
        self.clip = clip_grad_norm
        self.sparse_float_labels = sparse_float_labels
        self.ignore_class = ignore_class(model)
        self.cap: _Capture | None = None
        # 1.0: keep a bad step's update from the weights; 0.0 when the ladder would only log.
        self.block_bad = keras.Variable(1.0, dtype="float32", trainable=False,
                                        name="nanguard_block_bad")
        self._patched: list[tuple[Any, str]] = []
        self.tracker = getattr(model, "_loss_tracker", None)
        self.install()

    def install(self) -> None:
        """Patch the instances (again, after :meth:`remove`: a traced step is reused)."""
        if self._patched:
            return
        model = self.model
        self._patch(model, "train_step", self._train_step(model.train_step))
        self._patch(model, "compute_loss", self._compute_loss(model.compute_loss))
        self._patch(self.optimizer, "apply", self._apply(self.optimizer.apply))
        if self.tracker is not None:
            self._patch(self.tracker, "update_state", self._track(self.tracker.update_state))

    def _patch(self, obj: Any, name: str, fn: Callable[..., Any]) -> None:
        # Straight into the instance dict: no Keras/torch attribute tracking, easy to undo.
        vars(obj)[name] = fn
        self._patched.append((obj, name))

    def remove(self) -> None:
        for obj, name in reversed(self._patched):
            vars(obj).pop(name, None)
        self._patched = []

    # -- the wrappers ---------------------------------------------------------------------
    def _train_step(self, orig: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def train_step(data: Any) -> Any:
            self.cap = cap = _Capture()
            try:
                logs = orig(data)
            finally:
                self.cap = None
            if cap.loss is None or cap.grad is None:
                return logs
            x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
            out = dict(logs)
            extra = {"stats": self._pack(cap)}
            if x is not None:
                extra["x"] = x
            if y is not None:
                extra["y"] = y
            pred = first_float(cap.y_pred)
            if pred is not None:
                extra["y_pred"] = ops.stop_gradient(pred)
            out[STATS_KEY] = extra
            return out

        return train_step

    def _compute_loss(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def compute_loss(x: Any = None, y: Any = None, y_pred: Any = None,
                         sample_weight: Any = None, **kwargs: Any) -> Any:
            cap = self.cap
            if cap is None or cap.loss is not None or kwargs.get("training") is False:
                return orig(x, y, y_pred, sample_weight, **kwargs)
            y_safe, labels_ok = self._guard_labels(y, y_pred)
            loss = orig(x, y_safe, y_pred, sample_weight, **kwargs)
            if labels_ok is not None:
                loss = ops.where(labels_ok, loss, ops.cast(math.nan, loss.dtype))
            cap.loss = ops.stop_gradient(loss)
            cap.y_pred = y_pred
            cap.labels_ok = labels_ok
            return loss

        return compute_loss

    def _guard_labels(self, y: Any, y_pred: Any) -> tuple[Any, Any]:
        if y is None or y_pred is None or not hasattr(y, "shape") or not hasattr(y_pred, "shape"):
            return y, None
        dtype = keras.backend.standardize_dtype(y.dtype)
        is_int = "int" in dtype
        if not (is_int or ("float" in dtype and self.sparse_float_labels)):
            return y, None
        n = sparse_classes(tuple(y.shape), tuple(y_pred.shape))
        if n is None:
            return y, None
        inside = ops.logical_and(ops.greater_equal(y, 0), ops.less(y, n))
        if self.ignore_class is not None:  # the loss skips these: not invalid
            inside = ops.logical_or(inside, ops.equal(y, ops.cast(self.ignore_class, y.dtype)))
        return ops.where(inside, y, ops.zeros_like(y)), ops.all(inside)

    def _apply(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def apply(grads: Any, trainable_variables: Any = None) -> Any:
            cap = self.cap
            if cap is None or cap.loss is None or cap.grad is not None:
                return orig(grads, trainable_variables)
            grads = list(grads)
            tvs = (list(trainable_variables) if trainable_variables is not None
                   else list(self.optimizer._trainable_variables))
            squares = [None if g is None else sum_of_squares(g) for g in grads]
            present = [s for s in squares if s is not None]
            total = ops.sqrt(ops.sum(ops.stack(present))) if present else ops.cast(math.nan,
                                                                                   "float32")
            per = ops.stack([
                ops.cast(math.nan, "float32") if s is None else ops.sqrt(s) for s in squares
            ]) if squares else ops.zeros((0,), "float32")
            scale = _loss_scale(self.optimizer)
            if scale is not None:  # the gradients of a scaled loss: report the true norms
                total, per = total / scale, per / scale
            loss_ok = ops.all(ops.isfinite(cap.loss))
            good = ops.logical_and(loss_ok, ops.isfinite(total))
            go = ops.logical_or(good, ops.less(self.block_bad, 0.5))
            amp_skip = ops.cast(False, "bool")
            if scale is not None:
                # A finite loss with overflowing scaled gradients is the LossScaleOptimizer's
                # own business: let it see them, skip the update and lower its scale.
                amp_skip = ops.logical_and(loss_ok, ops.logical_not(ops.isfinite(total)))
                go = ops.logical_or(go, amp_skip)
            if self.clip is not None:
                factor = ops.minimum(1.0, self.clip / (total + 1e-6))
                grads = [None if g is None else g * ops.cast(factor, g.dtype) for g in grads]
            # The rate this step uses, read before `apply` advances the iteration count.
            lr = ops.cast(self.optimizer.learning_rate, "float32")
            _cond_apply(go, lambda: orig(grads, trainable_variables), self.optimizer)
            # Sums, not `all(isfinite(v))`: one pass and no temporary per variable. A sum can
            # also overflow with finite entries; the host confirms a False (slow path only).
            weights_ok = ops.all(ops.isfinite(ops.stack([
                ops.sum(ops.cast(v, "float32")) for v in tvs
            ])))
            cap.grad = (total, per, lr, go, weights_ok, amp_skip)
            return None

        return apply

    def _track(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def update_state(values: Any, sample_weight: Any = None) -> Any:
            if self.cap is None:
                return orig(values, sample_weight=sample_weight)
            ok = ops.all(ops.isfinite(values))
            values = ops.where(ok, values, ops.zeros_like(values))
            weight = ops.cast(1 if sample_weight is None else sample_weight, "float32")
            return orig(values, sample_weight=weight * ops.cast(ok, "float32"))

        return update_state

    def _pack(self, cap: _Capture) -> Any:
        assert cap.grad is not None
        total, per, lr, go, weights_ok, amp_skip = cap.grad
        f32 = "float32"
        nan = ops.cast(math.nan, f32)
        loss = ops.sum(ops.cast(cap.loss, f32))
        pred = first_float(cap.y_pred)
        if pred is not None:
            pred = ops.cast(ops.stop_gradient(pred), f32)
            has_nan = ops.any(ops.isnan(pred))
            lo = ops.where(has_nan, nan, ops.min(pred))
            hi = ops.where(has_nan, nan, ops.max(pred))
        else:
            lo = hi = nan
        labels_ok = (ops.cast(1.0, f32) if cap.labels_ok is None
                     else ops.cast(cap.labels_ok, f32))
        head = [loss, lo, hi, ops.cast(total, f32), lr, ops.cast(go, f32),
                ops.cast(weights_ok, f32), labels_ok, ops.cast(amp_skip, f32)]
        return ops.concatenate([ops.stack(head), ops.cast(per, f32)])


def _loss_scale(optimizer: Any) -> Any:
    """The dynamic loss scale of a ``LossScaleOptimizer`` (float32), else None."""
    if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return None
    scale = optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale
    return ops.cast(scale, "float32")


def sum_of_squares(g: Any) -> Any:
    """``sum(g**2)`` in float32, with the backend's fused kernel where it has one.

    TensorFlow's ``l2_loss`` and torch's ``vector_norm`` read the gradient once without the
    full-size temporary that ``sum(square(g))`` allocates; the MLP step of
    ``benchmarks/overhead_keras.py`` is memory-bound, so this is most of the guard's cost.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if isinstance(g, tf.Tensor):
            return 2.0 * tf.nn.l2_loss(tf.cast(g, tf.float32))
    elif backend == "torch":
        import torch

        if isinstance(g, torch.Tensor):
            return torch.linalg.vector_norm(g, dtype=torch.float32).square()
    return ops.sum(ops.square(ops.cast(g, "float32")))


def _cond_apply(pred: Any, apply: Callable[[], Any], optimizer: Any) -> None:
    """``apply()`` only where ``pred`` holds, inside the step (as ``LossScaleOptimizer``)."""

    def skip() -> None:
        return None

    def run() -> None:
        apply()

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if not tf.__internal__.distribute.strategy_supports_no_merge_call():
            def cross_replica(distribution: Any) -> None:
                ops.cond(pred, lambda: distribution.extended.call_for_each_replica(apply),
                         skip)

            tf.distribute.get_replica_context().merge_call(cross_replica)
            return
    ops.cond(pred, run, skip)
