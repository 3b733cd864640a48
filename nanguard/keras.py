"""nanguard for Keras 3: a callback for ``model.fit`` (TensorFlow and torch backends)."""

from __future__ import annotations

import logging
import math
import sys
import warnings
from typing import Any

import numpy as np

try:
    import keras
except ImportError as err:  # pragma: no cover - exercised without keras installed
    raise ImportError(
        f"nanguard.keras needs Keras 3 and its backend (import keras failed: {err}). Install "
        "them with: pip install 'nanguard[keras]' (Keras with TensorFlow), or set "
        "KERAS_BACKEND to a backend you have installed (torch)"
    ) from err

from nanguard import policy
from nanguard._keras_probe import KerasProbe
from nanguard._keras_state import (
    LearningRate,
    MetricState,
    Snapshot,
    build_optimizer,
    inner_optimizer,
    to_numpy,
    weight_peaks,
)
from nanguard._keras_step import HEAD, STATS_KEY, ExecutionMemo, StepInstrument, end_window
from nanguard.config import ACTIONS, GuardConfig
from nanguard.detector import finite
from nanguard.dump import environment
from nanguard.events import StepRecord
from nanguard.session import GuardSession, Readout, Verdict

__all__ = ["LOG_NAMES", "NanGuard"]

log = logging.getLogger("nanguard")

LOG_NAMES = ("nanguard_loss", "nanguard_logits_min", "nanguard_logits_max",
             "nanguard_grad_norm", "nanguard_lr", "nanguard_bad")
SUPPORTED_BACKENDS = ("tensorflow", "torch")
_H = {name: i for i, name in enumerate(HEAD)}


class NanGuard(Readout, keras.callbacks.Callback):
    """Keeps ``model.fit`` alive when a training step goes non-finite.

    Attached to ``fit``, it instruments the model's compiled training step (no subclassing):
    each step computes the batch's own loss, the output's min and max, the global gradient
    norm before clipping and the learning rate, and keeps a bad step's update from the
    weights inside the step. The numbers come back in one small tensor. Repeated bad steps
    roll back to the last finite snapshot and lower the learning rate; in the end the guard
    aborts with :class:`nanguard.NonFiniteTrainingError` raised out of ``fit`` (other
    callbacks' ``on_train_end`` does not run, so nothing cleans up a backup). Every event
    writes a dump that ``nanguard inspect`` reads. See ``docs/keras.md``.

    Args:
        actions: The ladder, any subset of ``("skip", "rollback", "lower_lr", "abort")``.
        clip_grad_norm: Clip the global gradient norm to this value on every step.
        snapshot_every: Steps between snapshots of a finite state (one before the first).
        max_skips: Consecutive skipped steps before a rollback.
        max_rollbacks: Rollbacks before an abort.
        lr_factor: Learning-rate multiplier at each rollback, in (0, 1).
        dump_dir: Where dumps go (created on the first dump).
        max_dumps: Dumps written per run at most; an abort always dumps.
        history_size: Steps of stats kept in ``guard.history`` and in dumps.
        log_every: Steps between stats put in the batch ``logs`` (``nanguard_loss``, ...)
            and on the ``nanguard`` Python logger (DEBUG).
        dump_state: When a dump carries model and optimizer variables: "abort",
            "always" or "never".
        logits_module: Accepted for a uniform signature; Keras's logits source is the
            model output ``y_pred``, so a value here is ignored with a warning.
        allow_neg_inf: Layer names whose ``-inf`` outputs are intended.

    Example:
        >>> from nanguard.keras import NanGuard
        >>> guard = NanGuard(dump_dir="dumps", clip_grad_norm=1.0)
        >>> model.fit(x, y, epochs=5, callbacks=[guard])  # doctest: +SKIP
        >>> guard.history[-1]["grad_norm"]  # doctest: +SKIP
    """

    # The batch-end hook only adds numbers to the logs: Keras may run it on a worker
    # thread. Everything that changes the model runs inside `model.train_function`.
    async_safe = True

    def __init__(
        self,
        *,
        actions: tuple[str, ...] = ACTIONS,
        clip_grad_norm: float | None = None,
        snapshot_every: int = 100,
        max_skips: int = 3,
        max_rollbacks: int = 3,
        lr_factor: float = 0.5,
        dump_dir: str = "nanguard_dumps",
        max_dumps: int = 50,
        history_size: int = 256,
        log_every: int = 1,
        dump_state: str = "abort",
        logits_module: str | None = None,
        allow_neg_inf: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.config = GuardConfig.from_options(locals())
        if logits_module is not None:
            warnings.warn(
                "nanguard.keras ignores `logits_module`: the logits source is the model "
                f"output y_pred. Received: logits_module={logits_module!r}",
                UserWarning,
                stacklevel=2,
            )
        versions = {"keras": keras.__version__, "keras_backend": keras.backend.backend()}
        backend_module = sys.modules.get(keras.backend.backend())
        if backend_module is not None and hasattr(backend_module, "__version__"):
            versions[keras.backend.backend()] = backend_module.__version__
        self.session = GuardSession(self.config, framework="keras",
                                    environment=environment(**versions))
        self.dumps: list[str] = []
        self.fallback = False
        self._instrument: StepInstrument | None = None
        self._inner: Any = None
        self._patched: Any = None  # the model the patches are on (see _teardown)
        self._lr: LearningRate | None = None
        self._snapshot: Snapshot | None = None
        self._metrics: MetricState | None = None  # the fallback's metrics before each step
        self._good_logs: dict[str, Any] = {}  # the fallback's logs of the last healthy step
        self._keys_warned = False  # the fallback warned which log values it reads
        self._batch = 0
        self._batch_logs: dict[int, dict[str, float]] = {}
        self._epoch_grad_max = -math.inf  # the epoch's largest finite gradient norm
        self._epoch_steps = self._epoch_counted = 0  # batches, and those in the loss means
        # Gradient accumulation: the stats of the open window's micro-batches, and the
        # tensors of its first bad one (None for the others: k batches stay alive else).
        self._window: list[tuple[list[float], dict[str, Any] | None]] = []
        # The loss-only fallback's: the batches of the open window (none ends a step).
        self._fallback_window = 0
        self._ran = self._amp = 0  # ExecutionMemo.ran and .amp as the last execution left them
        self._span = 1  # the batches the record being published stands for
        self._verdict: Verdict | None = None  # the last _conclude's
        self._blocking = True
        self._snapshot_complete = True  # False: the model had no variables before step 0
        self._cache: tuple[tuple[Any, ...], StepInstrument, Any, LearningRate] | None = None
        self._accumulators_checked = True  # see on_train_begin

    # -- what users read (history, events, step_count, amp_skips, snapshot_step) ----------
    def _live_session(self) -> GuardSession:
        return self.session

    def _snapshot_at(self) -> int | None:
        return None if self._snapshot is None else self._snapshot.step

    # -- Keras hooks -------------------------------------------------------------------
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._teardown()
        model = self.model
        if not getattr(model, "compiled", False) or getattr(model, "optimizer", None) is None:
            raise ValueError(
                "nanguard.keras.NanGuard needs a compiled model with an optimizer: call "
                f"model.compile(optimizer=..., loss=...) before fit. Received: model={model.name!r}"
            )
        self.session.reset()
        self.dumps = []
        self._snapshot = None
        self._metrics = None
        self._good_logs = {}
        self._keys_warned = False
        self._batch_logs = {}
        self._window = []
        self._epoch_grad_max = -math.inf
        self._blocking = True
        # Before the first snapshot: with the optimizer built lazily inside the first step,
        # a rollback to that snapshot would not restore its slots (Adam's moments).
        self._snapshot_complete = build_optimizer(model)
        self._name_params()
        # Checked at the first step, after every callback's on_train_begin (a
        # BackupAndRestore after the guard restores the optimizer then).
        self._accumulators_checked = False
        if self._reuse_step(model):
            self._sync_blocking()
            self._watch_next_fit(model)
            return
        self._lr = LearningRate(model.optimizer)
        reason = _why_not_instrumented(model)
        self.fallback = reason is not None
        if reason is not None:
            warnings.warn(
                f"nanguard cannot instrument this training step ({reason}); it falls back to "
                "loss-only checks: a bad batch is seen after its update from the loss in the "
                "step's logs, and every skip or rollback restores the last snapshot. "
                "See docs/keras.md.",
                RuntimeWarning,
                stacklevel=2,
            )
            self._metrics = MetricState(model)
        else:
            self._instrument = StepInstrument(model, self.config.clip_grad_norm)
        memo = self._instrument.memo if self._instrument is not None else None
        if _steps_per_execution(model) > 1 and (memo is None or not memo.tensors):
            warnings.warn(
                "With steps_per_execution > 1 and the loss-only fallback, nanguard sees only "
                "the logs of each execution's last step, after every update of the execution "
                "landed: it cannot skip a bad batch, and restoring the snapshot taken before "
                "the execution undoes all of it, good batches included (a rollback). Use "
                "steps_per_execution=1 to undo just the bad batch."
                if self.fallback else
                "With steps_per_execution > 1 and XLA, nanguard skips every bad update inside "
                "the step and records the last batch of each execution and its first bad "
                "one, but keeps no copy of a bad batch before the last (its dump has no "
                "batch)."
                if memo is not None else
                "With steps_per_execution > 1 nanguard still skips every bad update inside "
                "the step, but sees (and records) only the last step of each execution "
                f"(with {self._instrument.memo_off if self._instrument else 'this model'}; "
                "see docs/keras.md).",
                RuntimeWarning,
                stacklevel=2,
            )
        model.train_function = None
        model.make_train_function(force=True)
        self._inner = model.train_function
        model.train_function = self._train_function
        if self._instrument is not None:
            self._cache = (_step_key(model), self._instrument, self._inner, self._lr)
        self._sync_blocking()
        self._watch_next_fit(model)

    def _watch_next_fit(self, model: Any) -> None:
        """Undo the patches when the next ``fit`` starts, whatever happened to this one.

        A ``fit`` that raises outside the training step (a callback, a validation set of the
        wrong shape) runs no ``on_train_end``, and Keras reuses ``model.train_function`` as
        it is: a later ``fit`` without the guard would still run the guard's step. Every
        ``fit`` calls ``model.make_train_function()`` before ``on_train_begin``, so that is
        where the patches come off; a guarded ``fit`` puts them back in ``on_train_begin``.
        """
        def make_train_function(force: bool = False) -> Any:
            vars(model).pop("make_train_function", None)  # this very function
            if self._patched is model:
                self._teardown()
            elif getattr(model, "train_function", None) == self._train_function:
                model.train_function = None  # the guard moved on to another model since
            return model.make_train_function(force)

        self._patched = model
        vars(model)["make_train_function"] = make_train_function

    def _reuse_step(self, model: Any) -> bool:
        """Another ``fit`` of the same compiled model: reuse the instrumented step.

        Rebuilding it would retrace the whole training step (seconds for a large model) at
        every ``fit``, which Keras itself does not do.
        """
        if self._cache is None:
            return False
        key, instrument, inner, lr = self._cache
        now = _step_key(model)
        if any(a is not b and a != b for a, b in zip(now, key, strict=True)):
            self._cache = None
            return False
        self.fallback = False
        self._instrument, self._inner, self._lr = instrument, inner, lr
        instrument.install()
        instrument.block_bad.assign(1.0)
        lr.install()
        model.train_function = self._train_function
        return True

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._batch = batch

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        # Keyed by the execution's first batch: with steps_per_execution = k Keras calls
        # begin with batch b and end with b + k - 1 (or the epoch's last batch).
        spe = _steps_per_execution(self.model)
        stats = self._batch_logs.pop(batch - batch % spe, None)
        if stats and logs is not None:
            logs.update(stats)

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch_grad_max = -math.inf
        self._epoch_steps = self._epoch_counted = 0

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Epoch-level numbers for the callbacks that read epoch logs (``CSVLogger``,
        ``History``, TensorBoard's epoch scalars)."""
        if logs is None:
            return
        if self._instrument is not None and self._epoch_steps and not self._epoch_counted:
            # Every batch of the epoch left out of Keras's loss means: a mean of no batch
            # reads 0.0, a perfect epoch to ModelCheckpoint or EarlyStopping. Inf, the worst
            # a loss can read: not NaN, which those monitors adopt as the best when it is
            # the first epoch (with no best yet), after which nothing compares better.
            # (Counted here: a validation run has reset and refilled the same means by now.)
            for key in self._instrument.mean_names():
                if key in logs:
                    logs[key] = math.inf
        for name, value in self.session.counters().items():
            # amp_skips: every epoch when the step is instrumented with a LossScaleOptimizer
            # (only then are its skips seen), so History's lists and CSVLogger's columns
            # line up.
            if name != "amp_skips" or (self._instrument is not None and isinstance(
                    self.model.optimizer, keras.optimizers.LossScaleOptimizer)):
                logs[f"nanguard_{name}"] = value
        logs["nanguard_grad_norm_max"] = (
            self._epoch_grad_max if self._epoch_grad_max > -math.inf else math.nan
        )
        history = self.session.history
        logs["nanguard_lr"] = (self._lr.read() if self._lr is not None
                               else history[-1].lr if history else math.nan)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        try:
            if self._window and self._instrument is not None:
                self._close_window()
        finally:
            self._teardown()

    def _close_window(self) -> None:
        """``fit`` ended inside an accumulation window. A window with a bad micro-batch is
        concluded now, as a skipped step: its accumulators (poisoned) are zeroed and the
        iteration count moved to the window's end, as the in-step check does at a window's
        last micro-batch (not when the ladder only logs: the window is left as the step
        left it). A healthy one is left to Keras, whose accumulators carry it into the next
        ``fit``."""
        window, self._window = self._window, []
        if not any(_bad_micro_batch(v) for v, _ in window):
            return
        assert self._instrument is not None
        inner, k = self._instrument.inner, self._instrument.accumulate
        if self._blocking:
            end_window(inner, k)
        v, extra, details = _merge_window(window, k)
        v[_H["applied"]] = 0.0
        self._conclude(v, extra, logs={}, details=details)

    # -- the step ----------------------------------------------------------------------
    def _train_function(self, *args: Any, **kwargs: Any) -> Any:
        try:
            if not self._accumulators_checked:
                self._accumulators_checked = True
                _drop_nonfinite_window(self.model.optimizer)
                memo = self._instrument.memo if self._instrument is not None else None
                if memo is not None:
                    self._ran, self._amp = memo.start_fit()
            self._maybe_snapshot()
            if self._metrics is not None:
                self._metrics.save()
            assert self._lr is not None
            with self._lr.in_step():  # the step (traced or run) uses the lowered rate
                logs = self._inner(*args, **kwargs)
        except StopIteration:
            raise
        except BaseException as err:
            if type(err).__name__ != "OutOfRangeError":  # the end of a tf.data epoch
                self._teardown()
            raise
        try:
            return self._after_step(logs)
        except BaseException:
            self._teardown()
            raise

    def _maybe_snapshot(self) -> None:
        if self._window or self._fallback_window:
            return  # inside an accumulation window: at its start, or at the next
        last = None if self._snapshot is None else self._snapshot.step
        if not self._snapshot_complete and self.session.step > 0:
            # The model's variables appeared in the first step (a subclassed model called
            # for the first time): snapshot them all now, and name them.
            self._snapshot_complete = True
            self._name_params()
            last = None
        if self.session.snapshot_due(last):
            snap = Snapshot(self.session.step, self.model)
            if snap.finite() and self.session.admit_snapshot(
                    max((v for _, v in weight_peaks(self.model)), default=0.0)):
                self._snapshot = snap

    def _name_params(self) -> None:
        """``meta["param_names"]``: the paths of the variables ``layer_grad_norms`` follow.
        Read again when the variables appear in the first step (a model built lazily)."""
        names = [v.path for v in self.model.trainable_variables]
        self.session.extra_meta["param_names"] = names

    def _after_step(self, logs: Any) -> Any:
        logs = dict(logs)
        extra = logs.pop(STATS_KEY, None)
        if extra is None:
            return self._after_fallback_step(logs)
        v = to_numpy(extra["stats"]).tolist()  # the one device-to-host transfer
        memo = self._instrument.memo if self._instrument is not None else None
        if memo is not None:
            return self._after_execution(v, extra, logs, memo)
        self._epoch_steps += 1
        self._epoch_counted += v[_H["counted"]] > 0.5
        if self._instrument is not None and self._instrument.accumulate:
            # With steps_per_execution > 1, `v` is the execution's last micro-batch: a step
            # ends with the first execution whose last micro-batch ends a window.
            if v[_H["amp_skip"]] > 0.5:
                # The LossScaleOptimizer dropped this micro-batch (its scaled gradients
                # overflowed) and lowered its scale: not a step, the window goes on.
                self.session.count_scaler_skip()
                return logs
            if v[_H["last"]] < 0.5:
                first_bad = _bad_micro_batch(v) and not any(
                    t is not None for _, t in self._window)
                self._window.append((v, extra if first_bad else None))
                return logs
            window, self._window = self._window + [(v, extra)], []
            v, extra, details = _merge_window(window, self._instrument.accumulate)
            return self._conclude(v, extra, logs, details=details)
        return self._conclude(v, extra, logs)

    def _after_execution(self, v: list[float], extra: dict[str, Any], logs: dict[str, Any],
                         memo: ExecutionMemo) -> Any:
        """One execution of ``steps_per_execution > 1`` batches (:class:`ExecutionMemo`):
        its first bad batch, when that was not its last, is concluded first, at its own
        step, then the last batch, at its step (a step is a batch, as Keras counts them).

        A good batch between the two ends the run of skips, as it would one batch at a
        time. When the first conclusion restored the snapshot or the first bad batch's
        update overflowed the weights, the batches after it trained on (or were undone
        with) those weights: the last is recorded with its numbers, not judged again."""
        tail, v = v[-memo.TAIL:], v[:-memo.TAIL]
        pending, ran, offset, amp, run = (int(round(t)) for t in tail)
        n = (ran - self._ran) % memo.WRAP or memo.WRAP
        # The LossScaleOptimizer's own skips before the last batch (its own, if one, is
        # counted when it is concluded).
        for _ in range((amp - self._amp) % memo.WRAP - (v[_H["amp_skip"]] > 0.5)):
            self.session.count_scaler_skip()
        self._ran, self._amp = ran, amp
        last = self.session.step + n - 1
        self._epoch_steps += n
        # The batches in Keras's loss means: all but the bad ones (a scaler's skip counts).
        self._epoch_counted += n - pending
        self._span = n
        if pending and n - 1 - offset > 0:  # good batches before the first bad one
            self.session.unseen_steps(consecutive=0)
        try:
            if not pending or not offset:  # none, or the last batch is the first bad one
                if pending:
                    memo.reset()
                return self._conclude(v, extra, logs, step=last)
            early, early_extra, checks = memo.recall(extra)
            details = {"steps_per_execution": _steps_per_execution(self.model),
                       "bad_batches_in_execution": pending, **(checks or {})}
            # (A bad batch's record has an action: it is in the logs whatever log_every.)
            self._conclude(early, early_extra, {}, step=last - offset, details=details)
            verdict = self._verdict
            assert verdict is not None  # the memo keeps no LossScaleOptimizer's own skip
            said = self._batch_logs.get(self._batch)
            self._span = offset
            broken = verdict.event is not None and verdict.event.cause in (
                "update_nonfinite", "weights_nonfinite")
            if verdict.restores or verdict.decision.repair or broken:
                self.session.step = last + 1
                return logs
            # The bad batches between the first and the last, not recorded: counted, and in
            # the run of skips the last one extends (or a good batch between ended it).
            unseen = pending - 1 - (run > 0)
            if not run:
                self.session.unseen_steps(unseen, consecutive=0)
            elif run >= offset + 1:  # bad from the first bad batch on (or from before it)
                self.session.unseen_steps(unseen)
            else:
                self.session.unseen_steps(unseen, consecutive=run - 1)
            logs = self._conclude(v, extra, logs, step=last)
            if said is not None and said["nanguard_bad"]:  # the execution's logs say so
                self._batch_logs[self._batch] = {**self._batch_logs.get(self._batch, said),
                                                 "nanguard_bad": 1.0}
            return logs
        finally:
            self._span = 1

    def _after_fallback_step(self, logs: dict[str, Any]) -> Any:
        """The loss-only fallback's batch. With gradient accumulation (the optimizer's
        ``gradient_accumulation_steps=k``) a step is a window of k batches, as in the
        instrumented step: a healthy batch that does not end one is no step; a bad one ends
        its window at once (the snapshot, taken at the window's start, undoes the window
        with its accumulators and iteration count: a skip of that step), and the event names
        the batch, "batch i of the k it accumulates"."""
        inner = inner_optimizer(self.model.optimizer)
        k = int(getattr(inner, "gradient_accumulation_steps", None) or 0)
        logs = _flatten_logs(logs)  # as Keras hands them to callbacks
        judged = self._judge_logs(logs)
        if not k:
            return self._conclude(None, {}, logs, judged=judged)
        self._fallback_window += 1
        bad = judged[1]
        iterations = int(to_numpy(inner._iterations))  # after this batch's apply
        if not bad and iterations % k:
            return logs  # inside the window
        details = ({"micro_batch": self._fallback_window - 1, "micro_batches": k}
                   if bad else None)
        self._fallback_window = 0
        return self._conclude(None, {}, logs, details=details, judged=judged)

    def _conclude(self, v: list[float] | None, extra: dict[str, Any],
                  logs: dict[str, Any], details: dict[str, Any] | None = None,
                  judged: tuple[float, bool] | None = None, step: int | None = None) -> Any:
        """Judge one step: ``v`` its packed stats (None: the loss-only fallback, which reads
        ``logs``, flattened, and ``judged``: :meth:`_judge_logs` of them), ``extra`` the
        tensors the probe reads on a bad step, ``details`` what else its event should
        hold, ``step`` its index when the guard did not see the steps before it."""
        step = self.session.step if step is None else step
        self._verdict = None
        update_bad = False
        if v is not None:
            n = len(HEAD)
            record = StepRecord(
                step=step, loss=v[_H["loss"]], logits_min=v[_H["logits_min"]],
                logits_max=v[_H["logits_max"]], grad_norm=v[_H["grad_norm"]], lr=v[_H["lr"]],
                layer_grad_norms=v[n:] or None,
            )
            bad = _bad_micro_batch(v)
            if v[_H["amp_skip"]] > 0.5:  # the LossScaleOptimizer skipped it and lowered its scale
                self._publish(self.session.skipped_by_scaler(record))
                return logs
            if (bad and finite(record.loss) and not finite(record.grad_norm) and isinstance(
                    self.model.optimizer, keras.optimizers.LossScaleOptimizer)):
                # Its scale is below 1 (else it was the optimizer's own skip): these
                # gradients are non-finite unscaled, no overflow the scale can fix.
                details = {**(details or {}), "amp_scale": float(to_numpy(
                    self.model.optimizer.dynamic_scale))}
            update_bad = v[_H["applied"]] > 0.5 and v[_H["weights_ok"]] < 0.5 and not bad
            if update_bad:  # the in-step flag is a sum per variable: confirm element-wise
                update_bad = not all(np.isfinite(to_numpy(w, 2**62)).all()
                                     for w in self.model.trainable_variables)
            batch: dict[str, Any] = extra
            can_skip = True
            if (bad or update_bad) and len(record.layer_grad_norms or ()) != len(
                    self.session.extra_meta.get("param_names") or ()):
                self._name_params()  # a lazily built model's first step went bad
        else:
            assert judged is not None
            value, bad = judged
            assert self._lr is not None
            record = StepRecord(step=step, loss=value, lr=self._lr.read())
            batch = {}
            # The update is already in the variables: only restoring a snapshot taken right
            # before this step is a skip. Otherwise the skip rung is passed over: an older
            # snapshot is a rollback, and without one nothing can undo the update. With
            # steps_per_execution > 1 that snapshot predates the execution's good batches.
            can_skip = (self._snapshot is not None and self._snapshot.step == step
                        and _steps_per_execution(self.model) == 1)
            if bad and can_skip:
                # Undo this step's own update first, so the probe judges the state the step
                # started from (a NaN loss leaves NaN weights that it did not find there).
                assert self._snapshot is not None
                self._snapshot.restore()
        heads = self._instrument.heads if self._instrument is not None else None
        probe = KerasProbe(self.model, batch, heads=heads, replay=not self.fallback,
                           allow_neg_inf=self.config.allow_neg_inf, update_nonfinite=update_bad,
                           snapshot=self._snapshot, details=details)
        verdict = self.session.conclude(record, probe, bad=bad, update_nonfinite=update_bad,
                                        update_step=step, can_skip=can_skip,
                                        has_snapshot=self._snapshot is not None)
        self._carry_out(verdict)
        self._publish(verdict)
        self._verdict = verdict
        if verdict.action == "abort":
            self._teardown()
            verdict.raise_if_abort()
        if self._metrics is not None:
            if verdict.action is None:
                self._good_logs = logs
            else:
                logs = self._recovered_logs(logs)
        return logs

    def _judge_logs(self, logs: dict[str, Any]) -> tuple[float, bool]:
        """The fallback's reading of a step's (flattened) logs: the loss it records, and
        whether the step is bad (a judged value, any element of it, is NaN/Inf).

        Judged and recorded: ``logs["loss"]`` (its mean when it is not a scalar); without
        that key, the values whose name ends in ``loss`` (``d_loss + g_loss``, ``total_loss``:
        their sum is recorded); without those, every floating value is judged and the first
        in Keras's (sorted) order recorded. Metrics beside a loss are not judged (a custom
        metric may be NaN on purpose). Without a ``loss`` key the guard warns once, naming
        the values it reads.
        """
        leaves: dict[str, np.ndarray] = {}
        for key, value in logs.items():
            a = _host(value)
            if a is not None:
                leaves[key] = a
        loss_like = (["loss"] if "loss" in leaves
                     else [k for k in leaves if k.lower().endswith("loss")])
        judged = loss_like or list(leaves)
        named = loss_like or list(leaves)[:1]
        bad = not all(np.isfinite(leaves[k]).all() for k in judged)
        value = math.fsum(float(leaves[k].astype(np.float64).mean()) if leaves[k].size
                          else math.nan for k in named) if named else math.nan
        if "loss" not in leaves and not self._keys_warned:
            self._keys_warned = True
            if leaves:
                how = " + ".join(f"logs[{k!r}]" for k in named)
                which = " + ".join(f"logs[{k!r}]" for k in judged)
                text = (f"the guard judges every step on {which} (any NaN/Inf makes it bad) "
                        f"and records {how} as the step's loss")
            else:
                text = "the guard has nothing to judge: a non-finite step goes unseen"
            warnings.warn(
                "nanguard's loss-only fallback found no 'loss' in this train_step's logs "
                f"(floating values: {sorted(leaves) or 'none'}; all keys: {sorted(logs)}): "
                f"{text}. Return a 'loss' to choose what is recorded. See docs/keras.md.",
                RuntimeWarning,
                stacklevel=2,
            )
        return value, bad

    def _recovered_logs(self, logs: dict[str, Any]) -> dict[str, Any]:
        """The fallback's logs for a step the guard acted on, rebuilt after its metrics
        were put back: a value named like one of the model's metrics is that metric's
        result now; a value of the step's own is kept if finite, else it is the last healthy
        step's, or left out. Callbacks after the guard (``TerminateOnNaN``) never see the
        NaN of a step the guard recovered."""
        metrics = self.model.get_metrics_result()
        out = {}
        for key, value in logs.items():
            if key in metrics:
                out[key] = metrics[key]
            elif _all_finite(value):
                out[key] = value
            elif key in self._good_logs:
                out[key] = self._good_logs[key]
        return out

    def _carry_out(self, verdict: Verdict) -> None:
        decision = verdict.decision
        # Instrumented: a bad update was already kept from the weights inside the step.
        # Loss-only fallback: it was applied, so any blocking decision restores the snapshot.
        restore = verdict.restores or (self.fallback and decision.blocks_update)
        if restore and self._snapshot is not None:
            self._snapshot.restore()
        elif decision.blocks_update and self._snapshot is not None:
            # The update was kept out, but the step's forward already wrote the moving
            # statistics: a NaN batch leaves them NaN (evaluation would be NaN ever after).
            self._snapshot.restore_nonfinite(list(self.model.non_trainable_variables))
            if decision.repair:
                self._snapshot.restore_nonfinite_weights(self.model)
        if self._metrics is not None and decision.action is not None:
            # The bad batch is left out of Keras's running loss and metrics, as the
            # instrumented step leaves it out of the loss (else NaN all epoch).
            self._metrics.restore()
        if decision.lower_lr and self._lr is not None:
            self._lr.lower(self.config.lr_factor)
        self._sync_blocking()

    def _sync_blocking(self) -> None:
        """Whether the step keeps a bad update out: as the ladder would decide the next
        bad step (not when it would only log it, ``actions=()``). Set before each step the
        host sees, so also before a whole execution of ``steps_per_execution > 1``."""
        if self._instrument is not None:
            upcoming, _ = policy.decide(self.session.ladder, self.config,
                                        step=self.session.step, bad=True)
            if upcoming.blocks_update != self._blocking:
                self._blocking = upcoming.blocks_update
                self._instrument.block_bad.assign(1.0 if self._blocking else 0.0)

    def _publish(self, verdict: Verdict) -> None:
        if verdict.dump_path:
            self.dumps.append(verdict.dump_path)
        rec = verdict.record
        if finite(rec.grad_norm) and rec.grad_norm > self._epoch_grad_max:
            self._epoch_grad_max = rec.grad_norm
        every, span = self.config.log_every, self._span
        if rec.step // every == (rec.step - span) // every and verdict.action is None:
            # No step a multiple of log_every among the `span` batches this record stands
            # for (its own with steps_per_execution = 1); a step with an action is always
            # in its batch's logs.
            return
        self._batch_logs[self._batch] = {
            "nanguard_loss": rec.loss,
            "nanguard_logits_min": rec.logits_min,
            "nanguard_logits_max": rec.logits_max,
            "nanguard_grad_norm": rec.grad_norm,
            "nanguard_lr": rec.lr,
            "nanguard_bad": 0.0 if verdict.action is None else 1.0,
        }
        if log.isEnabledFor(logging.DEBUG):
            log.debug("nanguard %r", rec)

    def _teardown(self) -> None:
        """Undo every patch; the model trains as before without the guard. On the model
        the patches went on, which may not be ``self.model`` any more (Keras sets it for
        each ``fit``: the same guard on another model after an interrupted ``fit``)."""
        model, self._patched = self._patched, None
        if model is not None:
            vars(model).pop("make_train_function", None)
        if self._instrument is not None:
            self._instrument.remove()
            self._instrument = None
        if self._lr is not None:
            self._lr.restore()
        if self._inner is not None:
            if model is not None and getattr(model, "train_function", None) == (
                    self._train_function):
                model.train_function = None
            self._inner = None


def _drop_nonfinite_window(optimizer: Any) -> None:
    """Zero gradient accumulators that hold NaN/Inf as ``fit`` starts (before its first
    step, after a ``BackupAndRestore`` restored them), and move the
    iteration count to the window's end, with a warning: a window with a bad batch that a
    ``fit`` left open without ending it (interrupted, or resumed from a checkpoint taken
    inside it: the guard's NaN marker), or one a ``fit`` without the guard accumulated. Its
    update would be NaN, and its bad batch is gone."""
    inner = inner_optimizer(optimizer)
    k = int(getattr(inner, "gradient_accumulation_steps", None) or 0)
    accumulators = [a for a in getattr(inner, "_accumulated_gradients", None) or []
                    if a is not None]
    if not k or not accumulators:
        return
    ok = keras.ops.all(keras.ops.stack([keras.ops.all(keras.ops.isfinite(a))
                                        for a in accumulators]))
    if bool(to_numpy(ok)):
        return
    end = end_window(inner, k)
    warnings.warn(
        "nanguard: the optimizer's gradient accumulators hold NaN/Inf as fit starts (a "
        "gradient-accumulation window with a bad batch was left open: an interrupted fit, a "
        "checkpoint taken inside it, or a fit without the guard). That window's gradients are "
        f"dropped: accumulators zeroed, iteration count moved to {end}.",
        RuntimeWarning,
        stacklevel=3,
    )


def _bad_micro_batch(v: list[float]) -> bool:
    """Packed stats that make a step bad (a micro-batch's: its accumulation window):
    a non-finite loss or gradient norm, or an invalid label."""
    return (not (finite(v[_H["loss"]]) and finite(v[_H["grad_norm"]]))
            or v[_H["labels_ok"]] < 0.5)


def _merge_window(window: list[tuple[list[float], dict[str, Any] | None]], k: int,
                  ) -> tuple[list[float], dict[str, Any], dict[str, Any]]:
    """One step's stats from its accumulation window's micro-batches (oldest first): the
    mean loss (the loss the update's mean gradient belongs to), the output's range over
    every micro-batch, the last micro-batch's rate, update and weight check. The gradient
    norms are the mean gradient's (the last micro-batch's), or, when a micro-batch was bad,
    that first bad micro-batch's own (the mean's read nanguard's poison then), whose batch
    and output the probe reads; its place in the window is ``details["micro_batch"]``, of
    ``details["micro_batches"]``."""
    stats = [v for v, _ in window]
    merged = list(stats[-1])
    losses = np.array([v[_H["loss"]] for v in stats], dtype=np.float64)
    with np.errstate(all="ignore"):
        merged[_H["loss"]] = float(losses.mean())
    for key, pick in (("logits_min", min), ("logits_max", max)):
        values = [v[_H[key]] for v in stats]
        merged[_H[key]] = math.nan if any(math.isnan(x) for x in values) else pick(values)
    merged[_H["labels_ok"]] = min(v[_H["labels_ok"]] for v in stats)
    first_bad = next(((v, t) for v, t in window if _bad_micro_batch(v)), None)
    if first_bad is None:
        extra = window[-1][1]
        assert extra is not None  # the last micro-batch's tensors are always kept
        return merged, extra, {}
    v, extra = first_bad
    assert extra is not None  # kept for the first bad micro-batch
    n = len(HEAD)
    merged[_H["grad_norm"]] = v[_H["grad_norm"]]
    merged[n:] = v[n:]
    return merged, extra, {"micro_batch": int(v[_H["micro_batch"]]), "micro_batches": k}


def _flatten_logs(logs: Any) -> dict[str, Any]:
    """A step's logs as Keras hands them to callbacks (``pythonify_logs``): nested dicts
    (``{"compile_metrics": {"accuracy": ...}}`` from a step returning
    ``{m.name: m.result() for m in self.metrics}``) flattened in sorted key order, tensors
    moved to the host, scalars as Python floats."""
    out: dict[str, Any] = {}
    for key, value in sorted(dict(logs or {}).items()):
        if isinstance(value, dict):
            out.update(_flatten_logs(value))
            continue
        try:
            if keras.ops.is_tensor(value) or isinstance(value, keras.Variable):
                value = to_numpy(value, 2**62)
            value = float(value)
        except Exception:  # a vector, a string: kept as it is
            pass
        out[key] = value
    return out


def _host(value: Any) -> np.ndarray | None:
    """A log value as a host array when it is floating, else None (not judged)."""
    try:
        if isinstance(value, (float, int, np.ndarray, np.generic)):
            a = np.asarray(value)  # already on the host (_flatten_logs)
        else:
            a = to_numpy(value, 2**62)
    except Exception:  # not a tensor or a number: nothing to judge
        return None
    return a if a.dtype.kind in "fc" else None


def _all_finite(value: Any) -> bool:
    """A log value holds no NaN/Inf (values that are not numbers count as finite)."""
    a = _host(value)
    return a is None or bool(np.isfinite(a).all())


def _steps_per_execution(model: Any) -> int:
    return max(1, int(getattr(model, "steps_per_execution", 1) or 1))


def _step_key(model: Any) -> tuple[Any, ...]:
    """What a traced training step depends on: a change (a new ``compile``) means rebuild."""
    return (model, model.optimizer, getattr(model, "_compile_loss", None),
            getattr(model, "_loss_tracker", None), getattr(model, "steps_per_execution", 1),
            getattr(model, "run_eagerly", False), getattr(model, "jit_compile", None),
            type(model).train_step)


def _why_not_instrumented(model: Any) -> str | None:
    backend = keras.backend.backend()
    if backend not in SUPPORTED_BACKENDS:
        return f"the {backend!r} backend is not supported yet"
    owner = type(model).train_step
    if not getattr(owner, "__module__", "").startswith("keras."):
        return f"{type(model).__name__} overrides train_step"
    for name in ("compute_loss", "train_step"):
        if name in vars(model):
            return f"model.{name} was replaced on the instance"
    return None
