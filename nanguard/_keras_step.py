"""What nanguard puts inside a Keras 3 training step (the hot path).

These instance attributes are patched while a guarded ``fit`` runs, never the classes:

- ``model.train_step``: opens a per-step capture and returns the packed stats, plus the
  batch and ``y_pred`` as tensors that stay where they are (read only on a bad step).
- ``model.compute_loss``: records the batch's own loss and ``y_pred``.
- the compiled loss's per-output loss functions (``model._compile_loss``, one per output
  of a multi-output model): each sees its own targets and output, paired by Keras; sparse
  labels outside ``[0, n_classes)`` are replaced by 0 for that loss (so TensorFlow on the
  CPU does not raise) and that loss is made NaN, which makes the step bad.
- ``optimizer.apply``: the global gradient norm before clipping, the finiteness decision,
  ``clip_grad_norm``, and the update itself inside a ``cond`` (as Keras's own
  ``LossScaleOptimizer`` does), then one check that the weights stayed finite. With an
  optimizer's ``gradient_accumulation_steps=k`` one step is one window of k micro-batches
  (see :meth:`StepInstrument._window`).
- ``model._loss_tracker.update_state`` (and the per-output loss means of a multi-output
  model): leaves out a bad batch's loss, so one skipped batch does not turn Keras's running
  mean (``logs["loss"]``, ``logs["a_loss"]``) into NaN for the epoch, nor counts a skipped
  batch whose loss is finite (its gradients or another output's labels were not). Keras
  updates these means before ``optimizer.apply``, where the step's verdict is taken: the
  updates wait until then and count the batch with weight 0 when the step is bad.

The same code runs traced (TensorFlow graph) and eagerly (``run_eagerly=True``, torch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import keras
from keras import ops

from nanguard._keras_state import inner_optimizer

STATS_KEY = "_nanguard"
# Order of the packed stats tensor; per-variable gradient norms follow.
# "last": the micro-batch ended its accumulation window (always 1.0 without gradient
# accumulation); "counted": the batch is in Keras's loss means; "micro_batch": its place in
# the window, from 0 (0 without accumulation).
HEAD = ("loss", "logits_min", "logits_max", "grad_norm", "lr", "applied", "weights_ok",
        "labels_ok", "amp_skip", "last", "counted", "micro_batch")


def float_tensors(structure: Any) -> list[Any]:
    """The floating tensors of a nested structure, in order (other leaves are skipped)."""
    return [t for t in keras.tree.flatten(structure)
            if t is not None and hasattr(t, "dtype")
            and "float" in keras.backend.standardize_dtype(t.dtype)]


class Head(NamedTuple):
    """One output's loss, as Keras pairs it with its targets.

    Attributes:
        name: Its targets' name in dumps and messages (``targets``, ``targets.cls``).
        sparse: The loss takes class ids (floating targets count as labels too).
        ignore_class: The class id the loss ignores, if any.
    """

    name: str
    sparse: bool
    ignore_class: int | None


def head_of(path: tuple[Any, ...], loss: Any) -> Head:
    """Describe one of the compiled loss's per-output losses."""
    fn = getattr(loss, "fn", None)
    names = f"{type(loss).__name__} {getattr(loss, 'name', '')} {getattr(fn, '__name__', '')}"
    ignore = getattr(loss, "ignore_class", None)
    if ignore is None:
        ignore = (getattr(loss, "_fn_kwargs", None) or {}).get("ignore_class")
    name = "targets" + "".join(f".{key}" for key in path)
    return Head(name, "sparse" in names.lower(), None if ignore is None else int(ignore))


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
        self.in_loss = False  # inside the step's own compute_loss
        self.labels_ok: Any = None
        self.heads: list[tuple[Head, Any, Any]] = []
        self.grad: tuple[Any, ...] | None = None
        # The loss means' updates waiting for `apply`'s verdict: (update, values, weight).
        self.tracked: list[tuple[Callable[..., Any], Any, Any]] = []


class StepInstrument:
    """Patches a compiled Keras model's training step; :meth:`remove` undoes it.

    Args:
        model: The compiled model (its class's default ``train_step``).
        clip_grad_norm: Clip the global gradient norm to this value, or None.
    """

    def __init__(self, model: Any, clip_grad_norm: float | None) -> None:
        self.model = model
        self.optimizer = model.optimizer
        # The optimizer that accumulates (a LossScaleOptimizer's inner one), and its window.
        self.inner = inner_optimizer(self.optimizer)
        self.accumulate = int(getattr(self.inner, "gradient_accumulation_steps", None) or 0)
        self.clip = clip_grad_norm
        self.cap: _Capture | None = None
        # The per-output losses of the last traced step, in the order of its "heads".
        self.heads: list[Head] = []
        # 1.0: keep a bad step's update from the weights; 0.0 when the ladder would only log.
        self.block_bad = keras.Variable(1.0, dtype="float32", trainable=False,
                                        name="nanguard_block_bad")
        self._patched: list[tuple[Any, str]] = []
        self._heads_wrapped: list[tuple[int, Any]] = []
        self.memo, self.memo_off = ExecutionMemo.wanted(model, self.accumulate)
        self.tracker = getattr(model, "_loss_tracker", None)
        self.compile_loss = getattr(model, "_compile_loss", None)
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
            self._patch(self.tracker, "update_state", self._track(self.tracker))
        loss = self.compile_loss
        if loss is not None:
            if getattr(loss, "built", False):
                self._wrap_heads()
            else:  # Keras builds it in the first traced step, from that step's structures
                self._patch(loss, "build", self._build(loss.build))

    def _patch(self, obj: Any, name: str, fn: Callable[..., Any]) -> None:
        # Straight into the instance dict: no Keras/torch attribute tracking, easy to undo.
        vars(obj)[name] = fn
        self._patched.append((obj, name))

    def remove(self) -> None:
        for obj, name in reversed(self._patched):
            vars(obj).pop(name, None)
        self._patched = []
        flat = getattr(self.compile_loss, "_flat_losses", None)
        for i, entry in self._heads_wrapped:
            if flat is not None and i < len(flat):
                flat[i] = entry
        self._heads_wrapped = []

    # -- the wrappers ---------------------------------------------------------------------
    def _train_step(self, orig: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def train_step(data: Any) -> Any:
            self.cap = cap = _Capture()
            try:
                logs = orig(data)
                if cap.tracked:  # no `apply` in the step (no trainable weights)
                    self._flush(cap, ops.cast(True, "bool"))
                    # Keras's step returns these results: read them again, with this batch
                    logs = self.model.get_metrics_result()
            finally:
                self.cap = None
            if cap.loss is None or cap.grad is None:
                return logs
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            out = dict(logs)
            extra = {"stats": self._pack(cap)}
            for key, value in (("x", x), ("y", y), ("sample_weight", sample_weight)):
                if value is not None:
                    extra[key] = value
            if float_tensors(cap.y_pred):
                extra["y_pred"] = keras.tree.map_structure(_detach, cap.y_pred)
            self.heads = [head for head, _, _ in cap.heads]
            if cap.heads:
                # Dicts, not lists: a traced step cannot return a list of unlike tensors.
                extra["heads"] = {str(i): {"y": y_t, "y_pred": _detach(y_p)}
                                  for i, (_, y_t, y_p) in enumerate(cap.heads)}
            # A model's list of outputs (and its list of targets): TensorFlow packs a list
            # returned from the step into one tensor, which unlike shapes cannot be.
            extra = keras.tree.lists_to_tuples(extra)
            if self.memo is not None:
                extra["stats"] = self.memo.remember(extra)
            out[STATS_KEY] = extra
            return out

        return train_step

    def _compute_loss(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def compute_loss(x: Any = None, y: Any = None, y_pred: Any = None,
                         sample_weight: Any = None, **kwargs: Any) -> Any:
            cap = self.cap
            if cap is None or cap.loss is not None or kwargs.get("training") is False:
                return orig(x, y, y_pred, sample_weight, **kwargs)
            cap.in_loss = True
            try:
                loss = orig(x, y, y_pred, sample_weight, **kwargs)
            finally:
                cap.in_loss = False
            cap.loss = ops.stop_gradient(loss)
            cap.y_pred = y_pred
            return loss

        return compute_loss

    def _build(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def build(*args: Any, **kwargs: Any) -> Any:
            result = orig(*args, **kwargs)
            self._wrap_heads()
            return result

        return build

    def _wrap_heads(self) -> None:
        """Wrap each per-output loss of the built compiled loss (restored by remove)."""
        flat = getattr(self.compile_loss, "_flat_losses", None)
        if not flat or self._heads_wrapped:
            return
        for i, entry in enumerate(flat):
            if entry.loss is None:
                continue
            flat[i] = entry._replace(loss=self._head_loss(entry.loss, head_of(entry.path,
                                                                                entry.loss)))
            self._heads_wrapped.append((i, entry))
        for metric in getattr(self.compile_loss, "metrics", []):  # "a_loss", "b_loss", ...
            self._patch(metric, "update_state", self._track(metric))

    def _head_loss(self, orig: Callable[..., Any], head: Head) -> Callable[..., Any]:
        def loss(y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
            cap = self.cap
            if cap is None or not cap.in_loss:
                return orig(y_true, y_pred, sample_weight)
            y_safe, labels_ok = self._guard_labels(y_true, y_pred, head)
            value = orig(y_safe, y_pred, sample_weight)
            if labels_ok is not None:
                value = ops.where(labels_ok, value, ops.cast(math.nan, value.dtype))
                cap.labels_ok = (labels_ok if cap.labels_ok is None
                                 else ops.logical_and(cap.labels_ok, labels_ok))
            if y_true is not None and y_pred is not None:
                cap.heads.append((head, y_true, y_pred))
            return value

        return loss

    def _guard_labels(self, y: Any, y_pred: Any, head: Head) -> tuple[Any, Any]:
        """Out-of-range class ids of one output replaced by 0, and whether all were inside."""
        if y is None or y_pred is None or not hasattr(y, "shape") or not hasattr(y_pred, "shape"):
            return y, None
        dtype = keras.backend.standardize_dtype(y.dtype)
        if not ("int" in dtype or ("float" in dtype and head.sparse)):
            return y, None
        n = sparse_classes(tuple(y.shape), tuple(y_pred.shape))
        if n is None:
            return y, None
        inside = ops.logical_and(ops.greater_equal(y, 0), ops.less(y, n))
        if head.ignore_class is not None:  # the loss skips these: not invalid
            inside = ops.logical_or(inside, ops.equal(y, ops.cast(head.ignore_class, y.dtype)))
        return ops.where(inside, y, ops.zeros_like(y)), ops.all(inside)

    def _apply(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def apply(grads: Any, trainable_variables: Any = None) -> Any:
            cap = self.cap
            if cap is None or cap.loss is None or cap.grad is not None:
                if cap is not None and cap.tracked:
                    self._flush(cap, ops.cast(True, "bool"))
                return orig(grads, trainable_variables)
            grads = list(grads)
            tvs = (list(trainable_variables) if trainable_variables is not None
                   else list(self.optimizer._trainable_variables))
            squares = [None if g is None else sum_of_squares(g) for g in grads]
            present = [s for s in squares if s is not None]
            total = ops.sqrt(ops.sum(ops.stack(present))) if present else ops.cast(math.nan,
                                                                                   "float32")
            # A variable the loss does not reach (a layer `call` never uses, an output with
            # no loss) has no gradient: the optimizer leaves it alone, and its norm is 0.0
            # (TensorFlow's zero for unconnected gradients), never a non-finite one that
            # `where` would blame or that would make every step look unhealthy.
            per = ops.stack([
                ops.zeros((), "float32") if s is None else ops.sqrt(s) for s in squares
            ]) if squares else ops.zeros((0,), "float32")
            scale = _loss_scale(self.optimizer)
            div = _divisor(self.optimizer, scale)
            if div is not None:  # the gradients of a scaled loss: report the true norms
                total, per = total / div, per / div
            loss_ok = ops.all(ops.isfinite(cap.loss))
            good = ops.logical_and(loss_ok, ops.isfinite(total))
            go = ops.logical_or(good, ops.less(self.block_bad, 0.5))
            amp_skip = ops.cast(False, "bool")
            if scale is not None:
                # A finite loss with overflowing scaled gradients is the LossScaleOptimizer's
                # own business: let it see them, skip the update and lower its scale. Not
                # below a scale of 1: gradients non-finite then are so unscaled (a NaN made
                # in the backward), which it would skip forever while its scale falls to 0.
                amp_skip = ops.logical_and(
                    ops.logical_and(loss_ok, ops.logical_not(ops.isfinite(total))),
                    ops.greater_equal(scale, 1.0))
                go = ops.logical_or(go, amp_skip)
            # A bad step's batch leaves Keras's loss means as they were before it (also when
            # the ladder lets its update through); a LossScaleOptimizer's own skip counts, as
            # it does without the guard.
            self._flush(cap, ops.logical_or(good, amp_skip))
            if self.clip is not None and not self.accumulate:
                grads = _clipped(grads, total, self.clip)
            # The rate this step uses, read before `apply` advances the iteration count.
            lr = ops.cast(self.optimizer.learning_rate, "float32")
            counted = ops.logical_or(good, amp_skip)
            last, place = ops.cast(True, "bool"), ops.zeros((), "float32")
            if self.accumulate:
                total, per, go, last, place = self._window(
                    grads, tvs, total, per, loss_ok, amp_skip, div, orig, trainable_variables)
            else:
                _cond_apply(go, lambda: orig(grads, trainable_variables), self.optimizer)

            def check() -> Any:
                # Sums, not `all(isfinite(v))`: one pass and no temporary per variable. A sum
                # can also overflow with finite entries; the host confirms a False.
                return ops.all(ops.isfinite(ops.stack([
                    ops.sum(ops.cast(v, "float32")) for v in tvs
                ])))

            # With accumulation the weights change only when a window ends.
            weights_ok = (ops.cond(last, check, lambda: ops.cast(True, "bool"))
                          if self.accumulate else check())
            cap.grad = (total, per, lr, go, weights_ok, amp_skip, last, counted, place)
            return None

        return apply

    def _window(self, grads: list[Any], tvs: list[Any], total: Any, per: Any, loss_ok: Any,
                amp_skip: Any, div: Any, orig: Callable[..., Any], trainable_variables: Any,
                ) -> tuple[Any, Any, Any, Any, Any]:
        """One micro-batch of an accumulation window of ``k = gradient_accumulation_steps``.

        Keras adds each micro-batch's gradients to its accumulators and updates the weights
        with their mean at every k-th ``apply`` (its ``_iterations`` counts micro-batches).
        The window's last micro-batch is judged on the norm of that mean (the gradient the
        update uses), and a bad window never reaches the weights: its accumulators are
        zeroed and the iteration count moves on, as after an update. A bad micro-batch
        before the last poisons the accumulators (a NaN in the smallest one) rather than
        adding to them, so the window stays bad in Keras's own variables: across replicas,
        in snapshots and checkpoints, without a variable of nanguard's. ``clip_grad_norm``
        clips the mean, at a good window's last micro-batch. ``div`` unscales the gradients
        (a loss scale), or None.

        Returns:
            The norms (the mean gradient's at the last micro-batch, else the micro-batch's
            own), whether the optimizer's ``apply`` ran, whether the window ended, and the
            micro-batch's place in it (float32, from 0).
        """
        inner, k = self.inner, self.accumulate
        if not self.optimizer.built:  # its accumulators are read below
            with keras.name_scope(self.optimizer.name, caller=self.optimizer):
                self.optimizer.build(tvs)
            self.optimizer.built = True
        # Keras accumulates a variable that `overwrite_with_gradient` by `maximum`, not in
        # the mean: left out of the norms here.
        acc = [None if g is None or getattr(v, "overwrite_with_gradient", False)
               else inner._accumulated_gradients[inner._get_variable_index(v)]
               for g, v in zip(grads, tvs, strict=True)]
        place = ops.mod(inner._iterations, k)
        is_last = ops.equal(place, k - 1)

        def unscaled(g: Any) -> Any:  # as Keras's `apply` unscales it before accumulating
            g = ops.cast(g, "float32")
            return g if div is None else g / div

        def mean_norms() -> tuple[Any, Any]:
            squares = [None if a is None else sum_of_squares(unscaled(g) + ops.cast(a, "float32"))
                       for g, a in zip(grads, acc, strict=True)]
            kept = [s for s in squares if s is not None]
            mean_total = ops.sqrt(ops.sum(ops.stack(kept))) / k
            mean_per = ops.stack([ops.zeros((), "float32") if s is None else ops.sqrt(s) / k
                                  for s in squares])
            return mean_total, mean_per

        total, per = ops.cond(is_last, mean_norms, lambda: (total, per))
        good = ops.logical_and(loss_ok, ops.isfinite(total))
        go = ops.logical_or(ops.logical_or(good, ops.less(self.block_bad, 0.5)), amp_skip)
        last = ops.logical_and(is_last, ops.logical_not(amp_skip))  # a scaler's skip: not
        clip = self.clip

        def run() -> None:
            if clip is None:
                orig(grads, trainable_variables)
                return
            # Only a good window's end: a scaler's overflow there (its total is not finite)
            # leaves the window's accumulators as they are.
            now = ops.logical_and(is_last, good)
            factor = ops.where(now, _clip_factor(total, clip), 1.0)

            def scale_accumulators() -> None:
                for a in acc:
                    if a is not None:
                        a.assign(a * ops.cast(factor, a.dtype))

            ops.cond(now, scale_accumulators, lambda: None)
            orig(_scaled(grads, factor), trainable_variables)

        small = min((a for a in acc if a is not None and math.prod(a.shape) > 0),
                    key=lambda a: math.prod(a.shape), default=None)

        def poison() -> None:
            if small is not None:
                small.assign(ops.full(small.shape, math.nan, small.dtype))

        def drop() -> None:
            zero_accumulators(inner)

        def blocked() -> None:
            ops.cond(is_last, drop, poison)
            inner._iterations.assign_add(1)

        _cond_apply(go, run, self.optimizer, otherwise=blocked)
        return total, per, go, last, ops.cast(place, "float32")

    def mean_names(self) -> list[str]:
        """The names of the loss means this step feeds: ``loss``, and ``a_loss``, ... of a
        multi-output model."""
        means = [self.tracker] if self.tracker is not None else []
        means += list(getattr(self.compile_loss, "metrics", None) or [])
        return [m.name for m in means]

    def _track(self, metric: Any) -> Callable[..., Any]:
        orig = metric.update_state

        def update_state(values: Any, sample_weight: Any = None) -> Any:
            cap = self.cap
            if cap is None:
                return orig(values, sample_weight=sample_weight)
            ok = ops.all(ops.isfinite(values))
            values = ops.where(ok, values, ops.zeros_like(values))
            weight = ops.cast(1 if sample_weight is None else sample_weight, "float32")
            weight = weight * ops.cast(ok, "float32")
            if cap.grad is None:  # before `apply`: counted once the step is judged
                cap.tracked.append((orig, values, weight))
                return None
            return orig(values, sample_weight=weight)

        return update_state

    @staticmethod
    def _flush(cap: _Capture, keep: Any) -> None:
        """The loss means' updates of the step, the batch weighted 0 unless ``keep``: a
        mean with weight 0 adds 0 to its total and its count, so it stays as it was."""
        for update, values, weight in cap.tracked:
            update(values, sample_weight=weight * ops.cast(keep, "float32"))
        cap.tracked = []

    def _pack(self, cap: _Capture) -> Any:
        assert cap.grad is not None
        total, per, lr, go, weights_ok, amp_skip, last, counted, place = cap.grad
        f32 = "float32"
        nan = ops.cast(math.nan, f32)
        loss = ops.sum(ops.cast(cap.loss, f32))
        preds = [ops.cast(ops.stop_gradient(p), f32) for p in float_tensors(cap.y_pred)]
        if preds:  # over every floating output of a multi-output model
            has_nan = ops.any(ops.stack([ops.any(ops.isnan(p)) for p in preds]))
            lo = ops.where(has_nan, nan, ops.min(ops.stack([ops.min(p) for p in preds])))
            hi = ops.where(has_nan, nan, ops.max(ops.stack([ops.max(p) for p in preds])))
        else:
            lo = hi = nan
        labels_ok = (ops.cast(1.0, f32) if cap.labels_ok is None
                     else ops.cast(cap.labels_ok, f32))
        head = [loss, lo, hi, ops.cast(total, f32), lr, ops.cast(go, f32),
                ops.cast(weights_ok, f32), labels_ok, ops.cast(amp_skip, f32),
                ops.cast(last, f32), ops.cast(counted, f32), place]
        return ops.concatenate([ops.stack(head), ops.cast(per, f32)])


class ExecutionMemo:
    """``steps_per_execution > 1`` (TensorFlow): the first bad batch of an execution.

    Keras runs k batches per call of its train function and hands the host the last one's
    logs only, so a bad batch before the last would be skipped inside the step with no
    event. The step keeps, in variables of its own, the packed stats and the tensors (the
    batch, the output) of the first bad batch since the host last looked, how many bad
    batches there were, and counts of the batches run and of a ``LossScaleOptimizer``'s
    own skips; :meth:`remember` appends ``[pending, ran, offset, amp, run]`` to the step's
    stats (``ran`` and ``amp`` count modulo ``WRAP``, ``offset`` is how many batches ran
    after the first bad one, ``run`` how many bad batches in a row end at this one).
    Written only inside a ``cond`` on a bad batch: a healthy step adds three counter
    updates.

    With XLA (``jit_compile=True``) a variable cannot change shape: only the stats are
    kept (no tensors: the event's dump has no batch), and only for a model whose variables
    exist before ``fit`` (their count sizes the stats). Not used with gradient
    accumulation or under a ``tf.distribute`` strategy, where the documented limit stays.

    Args:
        size: The stats' length with XLA, else None (tensors kept too).
    """

    WRAP = 2**20  # exact in float32
    TAIL = 5

    def __init__(self, size: int | None = None) -> None:
        import tensorflow as tf

        none = tf.TensorShape(None)
        self.ran = tf.Variable(0.0, trainable=False, name="nanguard_ran")
        self.pending = tf.Variable(0.0, trainable=False, name="nanguard_pending")
        self.at = tf.Variable(0.0, trainable=False, name="nanguard_at")
        self.amp = tf.Variable(0.0, trainable=False, name="nanguard_amp_skips")
        self.run = tf.Variable(0.0, trainable=False, name="nanguard_bad_run")
        self.stats = tf.Variable(tf.zeros([0 if size is None else size]),
                                 shape=none if size is None else [size], trainable=False,
                                 name="nanguard_stats")
        self.tensors = size is None
        if self.tensors:
            self.flat = tf.Variable(tf.zeros([0], tf.float64), shape=none, trainable=False,
                                    name="nanguard_tensors")
            self.shapes = tf.Variable(tf.zeros([0], tf.int64), shape=none, trainable=False,
                                      name="nanguard_shapes")

    @classmethod
    def wanted(cls, model: Any, accumulate: int) -> tuple[ExecutionMemo | None, str | None]:
        """The memo this model's step needs (None with ``steps_per_execution=1``), and why
        there is none when one would be needed."""
        if max(1, int(getattr(model, "steps_per_execution", 1) or 1)) == 1:
            return None, None
        if keras.backend.backend() != "tensorflow":
            return None, f"the {keras.backend.backend()} backend"
        if accumulate:
            return None, "gradient accumulation"
        import tensorflow as tf

        if tf.distribute.has_strategy() or getattr(model, "_distribute_strategy", None):
            return None, "a tf.distribute strategy"  # the model trains under its scope
        if getattr(model, "jit_compile", False) is not True:
            return cls(), None
        n = len(model.trainable_variables)
        if not (n and getattr(model, "built", False)):
            return None, "XLA and a model with no variables before fit"
        # The stats, then whether the inputs, the sample weights and the targets were finite.
        return cls(len(HEAD) + n + 3), None

    def remember(self, extra: dict[str, Any]) -> Any:
        """The step's stats with ``[pending, ran, offset, amp, run]`` appended (traced)."""
        import tensorflow as tf

        stats = extra["stats"]
        loss, norm = stats[HEAD.index("loss")], stats[HEAD.index("grad_norm")]
        bad = tf.logical_or(
            tf.logical_not(tf.logical_and(tf.math.is_finite(loss), tf.math.is_finite(norm))),
            tf.less(stats[HEAD.index("labels_ok")], 0.5))
        # An update from finite numbers that left the weights non-finite: the batches after
        # it are bad too, but this one is where it happened.
        bad = tf.logical_or(bad, tf.logical_and(
            tf.greater(stats[HEAD.index("applied")], 0.5),
            tf.less(stats[HEAD.index("weights_ok")], 0.5)))
        # A LossScaleOptimizer's own skip is no event: kept, it would hide a bad batch
        # after it in the execution.
        bad = tf.logical_and(bad, tf.less(stats[HEAD.index("amp_skip")], 0.5))
        rest = {k: v for k, v in extra.items() if k != "stats"}
        leaves = memo_leaves(rest) if self.tensors else []
        ran = self.ran.assign(tf.math.floormod(self.ran + 1.0, float(self.WRAP)))
        first = tf.logical_and(bad, tf.equal(self.pending, 0.0))

        def keep() -> Any:
            if self.tensors:
                flat = [tf.reshape(_wide_bits(t), [-1]) for t in leaves]
                shapes = [tf.concat([[tf.rank(t)], tf.shape(t)], 0) for t in leaves]
                self.flat.assign(tf.concat(flat, 0) if flat else tf.zeros([0], tf.float64))
                self.shapes.assign(tf.cast(tf.concat(shapes, 0), tf.int64) if shapes
                                   else tf.zeros([0], tf.int64))
                self.stats.assign(stats)
            else:  # XLA: what the host would have checked in the batch, checked here
                def finite(key: str) -> Any:
                    found = float_tensors(extra.get(key))
                    return tf.cast(tf.reduce_all(tf.stack(
                        [tf.reduce_all(tf.math.is_finite(t)) for t in found]
                        or [tf.constant(True)])), tf.float32)

                self.stats.assign(tf.concat(
                    [stats, [finite("x"), finite("sample_weight"), finite("y")]], 0))
            self.at.assign(ran)
            return tf.constant(True)

        tf.cond(first, keep, lambda: tf.constant(False))
        pending = self.pending.assign_add(tf.cast(bad, tf.float32))
        offset = tf.math.floormod(ran - self.at, float(self.WRAP))
        amp_skip = stats[HEAD.index("amp_skip")]
        amp = self.amp.assign(tf.math.floormod(self.amp + amp_skip, float(self.WRAP)))
        # The run of bad batches ending here (a scaler's own skip neither ends nor extends
        # it), capped: it only tells the host how many consecutive skips the ladder saw.
        run = self.run.assign(tf.where(bad, tf.minimum(self.run + 1.0, float(self.WRAP)),
                                       tf.where(amp_skip > 0.5, self.run, 0.0)))
        return tf.concat([stats, tf.stack([pending, ran, offset, amp, run])], 0)

    def recall(self, like: dict[str, Any],
               ) -> tuple[list[float], dict[str, Any], dict[str, Any] | None]:
        """The first bad batch's stats and tensors (numpy, in the structure of ``like``,
        the last step's), and the pending count back to 0 (host). With XLA no tensors, and
        the checks the step made instead (``details["in_step_checks"]``)."""
        import numpy as np

        stats = self.stats.numpy().tolist()
        if not self.tensors:
            self.pending.assign(0.0)
            checks = {"inputs_finite": stats[-3] > 0.5, "sample_weight_finite": stats[-2] > 0.5,
                      "targets_finite": stats[-1] > 0.5,
                      "labels_valid": stats[HEAD.index("labels_ok")] > 0.5}
            return stats[:-3], {}, {"in_step_checks": checks}
        flat, shapes = self.flat.numpy(), self.shapes.numpy().tolist()
        self.pending.assign(0.0)
        rest = {k: v for k, v in like.items() if k != "stats"}
        kept = {id(t) for t in memo_leaves(rest)}
        pos = at = 0

        def rebuild(t: Any) -> Any:
            nonlocal pos, at
            if id(t) not in kept:
                return None
            rank = shapes[at]
            shape = shapes[at + 1:at + 1 + rank]
            at += 1 + rank
            size = math.prod(shape)
            dtype = np.dtype(t.dtype.as_numpy_dtype)
            chunk = flat[pos:pos + size].reshape(shape)
            pos += size
            # 64-bit integers travel as their bits (float64 holds integers to 2**53 only)
            return chunk.view(dtype) if _bits_kept(t.dtype) else chunk.astype(dtype)

        return stats, keras.tree.map_structure(rebuild, rest), None

    def reset(self) -> None:
        self.pending.assign(0.0)

    def start_fit(self) -> tuple[int, int]:
        """A new ``fit``: nothing pending, no run of bad batches (its ladder starts afresh);
        the counters as they are, for the host's differences."""
        self.pending.assign(0.0)
        self.run.assign(0.0)
        return int(self.ran.numpy()), int(self.amp.numpy())


def _bits_kept(dtype: Any) -> bool:
    return bool(dtype.is_integer and dtype.size == 8)


def _wide_bits(t: Any) -> Any:
    """A tensor as float64 values (exact for every dtype up to 32 bits) or, for a 64-bit
    integer, as its bits."""
    import tensorflow as tf

    return tf.bitcast(t, tf.float64) if _bits_kept(t.dtype) else tf.cast(t, tf.float64)


def memo_leaves(structure: Any) -> list[Any]:
    """The dense numeric tensors of a step's returned structure, in order: what
    :class:`ExecutionMemo` keeps (the same rule traced and on the host)."""
    import tensorflow as tf

    return [t for t in keras.tree.flatten(structure)
            if isinstance(t, tf.Tensor) and (t.dtype.is_floating or t.dtype.is_integer
                                             or t.dtype.is_bool)]


def _detach(t: Any) -> Any:
    return ops.stop_gradient(t) if t is not None and hasattr(t, "dtype") else t


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


def zero_accumulators(optimizer: Any) -> None:
    """Zero an optimizer's gradient accumulators, NaN entries included (Keras's torch
    backend resets them by multiplying by 0, which leaves a NaN a NaN)."""
    for a in getattr(optimizer, "_accumulated_gradients", None) or []:
        if a is not None:
            a.assign(ops.zeros(a.shape, a.dtype))


def end_window(optimizer: Any, k: int) -> int:
    """End an open accumulation window of ``k`` without its update, from the host: the
    accumulators zeroed and the iteration count moved to the window's end (returned)."""
    zero_accumulators(optimizer)
    done = int(keras.ops.convert_to_numpy(optimizer._iterations))
    end = done + (-done) % k
    optimizer._iterations.assign(end)
    return end


def _clip_factor(total: Any, clip: float) -> Any:
    """What scales gradients of global norm ``total`` to a norm of at most ``clip``."""
    return ops.minimum(1.0, clip / (total + 1e-6))


def _scaled(grads: list[Any], factor: Any) -> list[Any]:
    return [None if g is None else g * ops.cast(factor, g.dtype) for g in grads]


def _clipped(grads: list[Any], total: Any, clip: float) -> list[Any]:
    """The gradients scaled so that their global norm ``total`` is at most ``clip``."""
    return _scaled(grads, _clip_factor(total, clip))


def _divisor(optimizer: Any, scale: Any) -> Any:
    """What ``apply`` divides the gradients by (a ``LossScaleOptimizer``'s dynamic ``scale``,
    a static ``loss_scale_factor``, both), or None."""
    div = scale
    static = getattr(optimizer, "loss_scale_factor", None)
    if static is not None:  # static loss scaling: `apply` divides the gradients by it
        div = ops.cast(float(static), "float32") if div is None else div * float(static)
    return div


def _cond_apply(pred: Any, apply: Callable[[], Any], optimizer: Any,
                otherwise: Callable[[], Any] | None = None) -> None:
    """``apply()`` only where ``pred`` holds, else ``otherwise()``, inside the step (as
    ``LossScaleOptimizer``)."""

    def skip() -> None:
        if otherwise is not None:
            otherwise()

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
