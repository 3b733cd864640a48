"""nanguard for PyTorch Lightning: a callback driving the shared torch machinery.

``NanGuard`` subclasses the ``Callback`` of every Lightning package installed
(``lightning.pytorch`` and the standalone ``pytorch_lightning``), so one class works with
whichever ``Trainer`` the user builds: each package checks callbacks with ``isinstance``
against its own ``Callback``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

try:
    import torch
except ImportError as err:  # pragma: no cover - exercised without torch installed
    raise ImportError(
        "nanguard.lightning needs PyTorch and Lightning. Install them with: "
        "pip install 'nanguard[lightning]'"
    ) from err

from nanguard._torch_engine import TorchEngine, check_ignore_index
from nanguard.config import ACTIONS, GuardConfig
from nanguard.events import StepRecord
from nanguard.session import GuardSession, Readout, Verdict

__all__ = ["NanGuard"]

log = logging.getLogger("nanguard")

TARGET_KEYS = ("y", "target", "targets", "label", "labels")
# The per-step names logged through pl_module.log (docs/lightning.md, "Logged names").
STEP_KEYS = ("nanguard/loss", "nanguard/grad_norm", "nanguard/logits_min",
             "nanguard/logits_max", "nanguard/lr")


def _callback_base() -> type:
    """One class deriving from every installed Lightning package's ``Callback``."""
    bases: list[type] = []
    versions: dict[str, str] = {}
    try:
        import lightning
        import lightning.pytorch

        bases.append(lightning.pytorch.Callback)
        versions["lightning"] = lightning.__version__
    except ImportError:
        pass
    try:
        import pytorch_lightning

        bases.append(pytorch_lightning.Callback)
        versions["pytorch_lightning"] = pytorch_lightning.__version__
    except ImportError:
        pass
    if not bases:
        raise ImportError(
            "nanguard.lightning needs PyTorch Lightning (`lightning` or `pytorch_lightning`). "
            "Install it with: pip install 'nanguard[lightning]'"
        )
    _VERSIONS.update(versions)
    if len(bases) == 1:
        return bases[0]
    return type("_LightningCallback", tuple(bases), {"__module__": __name__})


_VERSIONS: dict[str, str] = {}
# An optimizer that evaluates Lightning's closure (training_step and backward) more than once
# per step: the guard judges the first evaluation only, and the others' updates land.
_REEVALUATES = (
    "nanguard.lightning.NanGuard cannot guard {name}: it evaluates the training step (the "
    "closure Lightning passes to optimizer.step) more than once per step, moving the weights "
    "between evaluations (LBFGS's iterations and line search; SAM-style optimizers), and the "
    "guard checks only the first, so a NaN in a later one would reach the weights. Remove "
    "the callback, or use an optimizer that evaluates the closure once."
)

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch import Callback as _CallbackBase
else:
    _CallbackBase = _callback_base()


class NanGuard(Readout, _CallbackBase):
    """Keeps ``Trainer.fit`` alive when a training step goes non-finite.

    Each optimizer step it records the loss (from the training step's output), the
    LightningModule output's min and max (or ``logits_module``'s), the global gradient norm
    and the learning rate in one device-to-host transfer, in ``on_before_optimizer_step``.
    A bad step's gradients are dropped there, so the optimizer leaves the weights (and its
    state) untouched; repeated bad steps roll back to the last finite snapshot and lower the
    learning rate of every optimizer (schedulers keep it lowered); in the end the guard
    raises :class:`nanguard.NonFiniteTrainingError` out of ``trainer.fit``. Each event writes
    a dump that ``nanguard inspect`` reads. Under DDP every rank takes the same action on the
    same step and reports the same cause.

    Works with ``lightning.pytorch`` and the standalone ``pytorch_lightning`` (the class
    derives from the ``Callback`` of each one installed). Automatic optimization only.

    Args:
        actions: The ladder, any subset of ``("skip", "rollback", "lower_lr", "abort")``.
        clip_grad_norm: Clip the global gradient norm to this value on every good step
            (before Lightning's own ``gradient_clip_val``, which still applies after it).
        snapshot_every: Optimizer steps between snapshots of a finite state.
        max_skips: Consecutive skipped steps before a rollback.
        max_rollbacks: Rollbacks before an abort.
        lr_factor: Learning-rate multiplier at each rollback, in (0, 1).
        dump_dir: Where dumps go (created on the first dump).
        max_dumps: Dumps written per run at most; an abort always dumps.
        history_size: Steps of stats kept in ``history`` and in dumps.
        log_every: Thins the stats logged through ``pl_module.log`` (``nanguard/loss``,
            ``nanguard/grad_norm``, ...; see ``docs/lightning.md``): they are logged on the
            steps whose values the Trainer writes to its loggers (every
            ``log_every_n_steps``) when the step count is also a multiple of ``log_every``.
        dump_state: When a dump carries the model and optimizer state: "abort",
            "always" or "never".
        logits_module: Name (as in ``pl_module.named_modules()``) of the submodule whose
            output counts as the logits; default: the LightningModule's own output.
        allow_neg_inf: Module names whose ``-inf`` outputs are intended (attention masks).
        ignore_index: The class id your loss ignores (``cross_entropy(..., ignore_index=)``;
            255 for many segmentation datasets): such targets are never invalid.

    Example:
        >>> import lightning.pytorch as pl  # doctest: +SKIP
        >>> from nanguard.lightning import NanGuard
        >>> trainer = pl.Trainer(callbacks=[NanGuard(clip_grad_norm=1.0)])  # doctest: +SKIP
        >>> trainer.fit(model, loader)  # doctest: +SKIP
    """

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
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        self.config = GuardConfig.from_options(locals())
        self.ignore_index = check_ignore_index(ignore_index)
        self._engine: TorchEngine | None = None
        self._handles: list[Any] = []
        self._pending_state: dict[str, Any] | None = None
        self._scaler: Any = None
        self._stepped = False
        self._paused = False  # the step's hooks are paused for a validation run
        self._clipping_off: pl.LightningModule | None = None  # see _finish
        self._last_good: StepRecord | None = None  # the last step whose update went in
        self.dumps: list[str] = []

    # -- what users read (history, events, step_count, amp_skips, snapshot_step) ----------
    def _live_session(self) -> GuardSession | None:
        return None if self._engine is None else self._engine.session

    def _snapshot_at(self) -> int | None:
        snap = None if self._engine is None else self._engine.snapshot
        return None if snap is None else snap.step

    # -- set-up and tear-down ----------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "nanguard.lightning.NanGuard supports automatic optimization only: with manual "
                "optimization the training step, not Lightning, decides when and how often "
                "the optimizers step, so the guard cannot tell a step's boundaries. Received: "
                "automatic_optimization=False. Remove the callback, or switch to automatic "
                "optimization."
            )
        for opt in trainer.optimizers:
            if isinstance(opt, torch.optim.LBFGS):
                raise RuntimeError(_REEVALUATES.format(name=type(opt).__name__))
        self._remove_hooks()
        # Attached here, after the strategy created the process group and the optimizers.
        engine = TorchEngine(
            self.config,
            pl_module,
            list(trainer.optimizers),
            framework="lightning",
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            extra_versions=_VERSIONS,
            ignore_index=self.ignore_index,
        )
        engine.attach()
        if engine.calls is not None:
            engine.calls.is_redirect = _redirected
        engine.grads_may_change_after_measure = _changes_grads_later(self, trainer, pl_module)
        self._engine = engine
        self._handles = [opt.register_step_post_hook(self._after_step) for opt in engine.optimizers]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.dumps = []
        self._last_good = None  # this fit's own, or the resumed run's (_apply_state)
        if trainer.ckpt_path is None:
            # Lightning loads callback state for validate/test/predict(ckpt_path=...) too:
            # a fit that resumes nothing starts afresh.
            self._pending_state = None
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._engine is not None:
            # Count on from where Lightning's step is: after a checkpoint written without
            # the guard (restored after on_fit_start), a second fit of this Trainer, or the
            # checkpoint of an abort (OnExceptionCheckpoint), where the guard had counted
            # the aborted step and Lightning, whose optimizer step never finished, had not:
            # the resumed run retries that step under its own index, and its record of the
            # abort leaves the history (the event stays in `events`).
            session = self._engine.session
            session.step = trainer.global_step
            while session.history and session.history[-1].step >= session.step:
                session.history.pop()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_last_update()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        engine = self._engine
        if engine is not None and engine.open:
            # on_train_batch_start returned -1 last epoch: that step never reached the
            # optimizer and must not swallow this epoch's first batch.
            engine.end_step()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        engine = self._engine
        if engine is None:
            return
        self._check_last_update()
        # Validation inside a gradient-accumulation window: its forwards are not the step's.
        self._paused = engine.in_step
        engine.in_step = False

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._engine is not None and self._paused:
            self._engine.in_step = True
        self._paused = False

    def _check_last_update(self, now: bool = False) -> None:
        """The last update's finiteness, read before validation, a checkpoint or the end of
        training use the weights (it is otherwise read with the next step's numbers);
        ``now``: right after the update, where it reads without a wait (on the CPU)."""
        if self._engine is None or not self._handles:
            return
        engine = self._engine
        verdict = engine.check_update_now() if now else engine.check_last_update()
        if verdict is not None:
            if verdict.dump_path:
                self.dumps.append(verdict.dump_path)
            verdict.raise_if_abort()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        self._clipping_back()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._engine is not None:
            self._engine.end_step()
            self._engine.detach()

    # -- one optimizer step (one or more batches with gradient accumulation) -----------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        engine = self._engine
        if engine is None:
            return
        # Several training loaders (a list or a dict): Lightning's CombinedLoader gives one
        # batch per loader, in a list or a dict.
        per_loader = isinstance(getattr(trainer, "train_dataloader", None),
                                (list, tuple, Mapping))
        inputs, targets = _split_batch(batch, per_loader)
        if not engine.in_step:
            self._stepped = False
            engine.begin_step(inputs, targets)
        else:  # another micro-batch of the same optimizer step
            engine.continue_step(inputs, targets)

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        engine = self._engine
        if engine is None or not engine.in_step:
            return
        if self._stepped:  # a backward after this step was judged: the closure again
            raise RuntimeError(_REEVALUATES.format(name=type(trainer.optimizers[0]).__name__))
        # Lightning passes the loss divided by accumulate_grad_batches (summing the
        # micro-batches gives their mean) and, with a GradScaler, already scaled.
        if self._scaler is not None:
            scale = getattr(self._scaler, "_scale", None)
            loss = loss.detach() / (scale if scale is not None else self._scaler.get_scale())
        engine.add_loss(loss)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        engine = self._engine
        if engine is None or not engine.in_step or self._stepped:
            return
        self._stepped = True
        if engine.loss is None:
            # training_step returned None: Lightning's own skip, not an event.
            engine.session.step += 1
            return
        engine.warn_if_no_output(
            "nanguard saw no output of the LightningModule in this training step (does "
            "training_step call a submodule instead of self(x)?). Set "
            "logits_module='<submodule name>' so the logits' range is recorded. A model "
            "torch.compile'd and run before the guard was attached keeps a graph without "
            "its hooks: compile it after attaching the guard."
        )
        record = engine.measure()
        # Measured before the plugin's scaler.update(): get_scale() is the step's own.
        if self._scaler is not None and engine.scaler_skipped(
                record, lambda: float(self._scaler.get_scale())):
            return
        verdict = engine.decide(record=record)
        self._finish(pl_module, verdict)

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._engine is not None and self._engine.in_step:
            self._engine.after_update()
            # On the CPU the update's check reads without a wait: an update that made the
            # weights non-finite is undone right after it, before any callback (a weight
            # average, ModelCheckpoint) or the next step sees them.
            self._check_last_update(now=True)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._clipping_back()
        engine = self._engine
        if engine is None or not self._stepped:
            return  # with gradient accumulation, the optimizer steps at a later micro-batch
        self._stepped = False
        engine.end_step()

    def _finish(self, pl_module: pl.LightningModule, verdict: Verdict) -> None:
        if verdict.dump_path:
            self.dumps.append(verdict.dump_path)
        if verdict.decision.blocks_update:
            # The gradients are gone: Lightning's clipping (Trainer(gradient_clip_val=...)
            # or the module's own configure_gradient_clipping), which runs after this hook,
            # has nothing to clip, and torch's clip_grad_value_ raises on no gradients.
            pl_module.configure_gradient_clipping = _no_clipping  # type: ignore[method-assign]
            self._clipping_off = pl_module
        trainer = pl_module.trainer
        record = verdict.record
        quiet = _barebones(trainer)
        monitored = not quiet and self._monitored(trainer)
        flushes = not quiet and self._flushes(trainer)
        if monitored or flushes:
            # A monitor reads callback_metrics right after this step: a step the guard kept
            # from the weights shows the last good step's values, so EarlyStopping
            # (check_finite) does not end the run the guard has just saved.
            # A step whose line the loggers write shows its own values, unless a monitor
            # watches these names.
            good, kept_out = self._last_good, verdict.decision.blocks_update
            stand_in = (monitored and kept_out and good is not None
                        and (not flushes or self._watched(trainer)))
            self._log(pl_module, good if stand_in and good is not None else record)
        if not verdict.decision.blocks_update:
            self._last_good = record
        verdict.raise_if_abort()

    def _clipping_back(self) -> None:
        module, self._clipping_off = self._clipping_off, None
        if module is not None and "configure_gradient_clipping" in module.__dict__:
            del module.configure_gradient_clipping

    def _flushes(self, trainer: pl.Trainer) -> bool:
        """Whether this step's logged values reach the loggers: Lightning writes ``on_step``
        values every ``log_every_n_steps`` optimizer steps (when ``(global_step + 1)`` is a
        multiple), keeping only the last value logged in between. Logging only then costs
        the same as logging every step would, for the same lines in the loggers, without
        the 0.4 to 1 ms per key per call of ``pl_module.log``; ``log_every`` thins them."""
        n = trainer.global_step + 1
        # Both set on the Trainer at run time by its connectors (untyped attributes).
        every = int(getattr(trainer, "log_every_n_steps", 1))
        if every <= 0:  # Trainer(log_every_n_steps=0): no step's values reach a logger
            return False
        fast_dev_run = bool(getattr(trainer, "fast_dev_run", False))
        return fast_dev_run or (n % every == 0 and n % self.config.log_every == 0)

    @staticmethod
    def _monitored(trainer: pl.Trainer) -> bool:
        """Whether callbacks may read ``callback_metrics`` right after this step, so the
        step's values are logged whatever ``log_every_n_steps`` is:

        - every step, when a callback (``ModelCheckpoint``, ``EarlyStopping``) or a
          ``ReduceLROnPlateau`` schedule monitors one of the per-step names: it may read them
          at any step (``every_n_train_steps``, ``interval="step"``);
        - the epoch's last batch and the run's last step (``max_steps``, a stop requested by
          a callback): ``EarlyStopping`` and ``ModelCheckpoint`` run at the end;
        - a batch after which validation runs, counted as Lightning counts it
          (``val_check_interval``; across epochs with ``check_val_every_n_epoch=None``).
        """
        if NanGuard._watched(trainer):
            return True
        loop = trainer.fit_loop.epoch_loop
        if loop.batch_progress.is_last_batch or trainer.should_stop:
            return True
        if 0 < trainer.max_steps <= trainer.global_step + 1:
            return True
        every = trainer.val_check_batch
        idx = loop.total_batch_idx if trainer.check_val_every_n_epoch is None else loop.batch_idx
        return (isinstance(every, int) and every > 0 and trainer.enable_validation
                and (idx + 1) % every == 0)

    @staticmethod
    def _watched(trainer: pl.Trainer) -> bool:
        """Whether a callback or a ``ReduceLROnPlateau`` schedule monitors a per-step name."""
        monitors = [getattr(cb, "monitor", None) for cb in getattr(trainer, "callbacks", [])]
        monitors += [getattr(c, "monitor", None)
                     for c in getattr(trainer, "lr_scheduler_configs", None) or []]
        return any(m in STEP_KEYS for m in monitors if isinstance(m, str))

    def _log(self, pl_module: pl.LightningModule, rec: StepRecord) -> None:
        # Through pl_module.log like the user's own metrics: they reach the loggers and
        # `callback_metrics` (docs/lightning.md, "Logged names").
        values = (rec.loss, rec.grad_norm, rec.logits_min, rec.logits_max, rec.lr)
        pl_module.log_dict(dict(zip(STEP_KEYS, values, strict=True)), on_step=True,
                           on_epoch=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The run's counters through ``pl_module.log``, once per epoch: they reach
        ``trainer.callback_metrics``, so ``ModelCheckpoint`` or ``EarlyStopping`` can
        monitor them."""
        if self._engine is None:
            return
        self._check_last_update()  # before ModelCheckpoint (Lightning runs it last) saves
        if _barebones(trainer):
            return
        for name, value in self._counters().items():
            pl_module.log(name, value, on_step=False, on_epoch=True,
                          sync_dist=trainer.world_size > 1)

    def _counters(self) -> dict[str, float]:
        assert self._engine is not None
        return {f"nanguard/{name}": value
                for name, value in self._engine.session.counters().items()
                if name != "amp_skips" or self._scaler is not None}

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Counters and history, saved in Lightning checkpoints."""
        if self._engine is None:
            return dict(self._pending_state or {})
        # A checkpoint between steps (ModelCheckpoint(every_n_train_steps=...)): Lightning
        # took the model's state_dict already, as views of the live weights, and gathers
        # the optimizers' after this; a rollback here reaches both.
        self._check_last_update()
        # The lowered learning rates are in the optimizers' and schedulers' own state.
        return {"session": self._engine.session.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the counters; applied at ``on_fit_start`` when the run is set up."""
        state = dict(state_dict)
        if self._engine is None or not self._handles:
            self._pending_state = state
        else:
            self._apply_state(state)

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        assert self._engine is not None
        # A checkpoint of an older version also holds "lr_scale": not needed, ignored.
        session = self._engine.session
        session.load_state_dict(state.get("session", {}))
        # What a monitor reads after a resumed run's first bad step (see _finish).
        self._last_good = next((r for r in reversed(session.history)
                                if r.action in (None, "log")), None)


def _barebones(trainer: pl.Trainer) -> bool:
    """``Trainer(barebones=True)`` (Lightning >= 2.1) turns ``pl_module.log`` off, with a
    warning per call: the callback logs nothing then."""
    return bool(getattr(trainer, "barebones", False))


def _redirected(module: Any) -> bool:
    """Whether this call of the LightningModule runs another of its methods through its own
    ``__call__``: the DDP, FSDP and DeepSpeed strategies call the wrapped module with
    ``forward`` swapped for ``training_step`` (``_ForwardRedirection``), so that call's
    arguments are the batch and its index and its output is the loss. The model's own call
    (``self(x)``) runs inside it; the guard's hooks ignore the outer one."""
    forward = module.__dict__.get("forward")
    return forward is not None and "_ForwardRedirection" in getattr(forward, "__qualname__", "")


def _no_clipping(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``configure_gradient_clipping`` on a step whose gradients were dropped."""


def _split_batch(batch: Any, per_loader: bool = False) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch: ``(x, y)`` pairs and dicts with a label key.
    ``per_loader``: the training loaders were a list or a dict, and the batch is one batch
    per loader (``inputs.i``/``targets.i``, or ``inputs.<name>``/``targets.<name>``, in dumps
    are that loader's)."""
    if per_loader and isinstance(batch, (list, tuple)):
        parts = [_split_batch(b) for b in batch]
        return [x for x, _ in parts], [y for _, y in parts]
    if per_loader and isinstance(batch, Mapping):
        split = {k: _split_batch(b) for k, b in batch.items()}
        return {k: x for k, (x, _) in split.items()}, {k: y for k, (_, y) in split.items()}
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        for key in TARGET_KEYS:
            if key in batch:
                return {k: v for k, v in batch.items() if k != key}, batch[key]
    return batch, None


def _changes_grads_later(guard: Any, trainer: Any, pl_module: Any) -> bool:
    """Whether code that runs after the guard measures the gradients (in its
    ``on_before_optimizer_step``) may change them: the module's own
    ``on_before_optimizer_step`` or ``configure_gradient_clipping``, or a later callback's
    ``on_before_optimizer_step``. Lightning's own clipping never makes them non-finite."""

    def overrides(obj: Any, base_name: str, names: tuple[str, ...]) -> bool:
        # The framework's base class (lightning's or pytorch_lightning's) from the MRO.
        base = next((c for c in type(obj).__mro__ if c.__name__ == base_name
                     and c.__module__.split(".")[0] in ("lightning", "pytorch_lightning")),
                    None)
        return base is not None and any(
            getattr(type(obj), n, None) is not getattr(base, n, None) for n in names)

    if overrides(pl_module, "LightningModule",
                 ("on_before_optimizer_step", "configure_gradient_clipping")):
        return True
    callbacks = list(getattr(trainer, "callbacks", []))
    later = callbacks[callbacks.index(guard) + 1:] if guard in callbacks else []
    return any(overrides(c, "Callback", ("on_before_optimizer_step",)) for c in later)
