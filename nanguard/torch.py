"""nanguard for plain PyTorch loops: a hook manager around your model and optimizer."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from types import TracebackType
from typing import Any

try:
    import torch
except ImportError as err:  # pragma: no cover - exercised without torch installed
    raise ImportError(
        "nanguard.torch needs PyTorch. Install it with: pip install 'nanguard[torch]'"
    ) from err

from nanguard._torch_engine import TorchEngine, check_targets
from nanguard.config import ACTIONS, GuardConfig
from nanguard.events import NonFiniteTrainingError
from nanguard.session import GuardSession, Readout, Verdict

__all__ = ["NanGuard"]

log = logging.getLogger("nanguard")


class NanGuard(Readout):
    """Keeps a plain PyTorch training loop alive when a step goes non-finite.

    Every step it records the loss, the model output's min and max, the global gradient
    norm and the learning rate in one device-to-host transfer. A bad step's update is
    kept from the weights (the optimizer's own ``step()`` sees no gradients); repeated bad
    steps roll back to the last finite snapshot and lower the learning rate; in the end
    the guard aborts with :class:`nanguard.NonFiniteTrainingError`. Each event writes a
    dump that ``nanguard inspect`` reads.

    Args:
        model: The ``torch.nn.Module`` being trained.
        optimizer: The optimizer stepping the model's parameters, or a list of them (say
            ``SparseAdam`` for a sparse embedding and ``Adam`` for the rest): the first
            ``step()`` of a training step decides for all of them.
        scaler: A ``torch.amp.GradScaler`` the loop steps with (``scaler.step(optimizer)``):
            ``guard.backward(loss)`` then scales the loss itself, and the steps the scaler
            skips for overflowing gradients are counted in ``guard.amp_skips`` (history
            cause ``"amp_scaler_skip"``), not treated as bad steps.
        actions: The ladder, any subset of ``("skip", "rollback", "lower_lr", "abort")``.
        clip_grad_norm: Clip the global gradient norm to this value on every good step.
        snapshot_every: Steps between snapshots of a finite state (one is taken before
            the first step).
        max_skips: Consecutive skipped steps before a rollback.
        max_rollbacks: Rollbacks before an abort.
        lr_factor: Learning-rate multiplier at each rollback, in (0, 1).
        dump_dir: Where dumps go (created on the first dump).
        max_dumps: Dumps written per run at most; an abort always dumps.
        history_size: Steps of stats kept in ``guard.history`` and in dumps.
        log_every: Steps between stats written to the ``nanguard`` Python logger (DEBUG).
        dump_state: When a dump carries the model and optimizer state: "abort",
            "always" or "never".
        logits_module: Name (as in ``model.named_modules()``) of the submodule whose
            output counts as the logits; default: the model's output.
        allow_neg_inf: Module names whose ``-inf`` outputs are intended (attention masks).
        ignore_index: The class id your loss ignores (``cross_entropy(..., ignore_index=)``;
            255 for many segmentation datasets): such targets are never invalid.

    Example:
        >>> guard = NanGuard(model, optimizer, snapshot_every=50)  # doctest: +SKIP
        >>> for x, y in loader:  # doctest: +SKIP
        ...     optimizer.zero_grad()
        ...     with guard.step(x, targets=y):
        ...         loss = loss_fn(model(x), y)
        ...         guard.backward(loss)
        ...         optimizer.step()
        >>> guard.close()  # doctest: +SKIP

        With AMP: ``NanGuard(model, optimizer, scaler=scaler)``, ``guard.backward(loss)`` on
        the unscaled loss, then ``scaler.step(optimizer)`` and ``scaler.update()``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        *,
        scaler: Any = None,
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
        self.config = GuardConfig.from_options(locals())
        optimizers: list[Any] = (
            list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer])
        if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
            raise TypeError(
                f"nanguard needs a torch.optim.Optimizer, or a list of them. Received: "
                f"optimizer={optimizer!r}"
            )
        if scaler is not None and not callable(getattr(scaler, "scale", None)):
            raise TypeError(
                f"`scaler` must be a torch.amp.GradScaler. Received: scaler={scaler!r}"
            )
        enabled = scaler is not None and getattr(scaler, "is_enabled", lambda: True)()
        self.scaler = scaler if enabled else None
        if self.scaler is not None and len(optimizers) > 1:
            raise ValueError(
                "With a GradScaler the guard takes one optimizer: scaler.step(opt) unscales "
                "only that optimizer's gradients, so at the first step() the others' would "
                f"still be scaled. Received: {len(optimizers)} optimizers"
            )
        self._engine = TorchEngine(self.config, model, optimizers, framework="torch",
                                   ignore_index=ignore_index)
        self._engine.attach()
        _take_over(optimizers)
        self.optimizer = optimizer
        self._handles = [
            handle
            for opt in optimizers
            for handle in (opt.register_step_pre_hook(self._before_optimizer_step),
                           opt.register_step_post_hook(self._after_optimizer_step))
        ]
        self.dumps: list[str] = []

    # -- what users read (history, events, step_count, amp_skips, snapshot_step) ----------
    def _live_session(self) -> GuardSession:
        return self._engine.session

    def _snapshot_at(self) -> int | None:
        snap = self._engine.snapshot
        return None if snap is None else snap.step

    @property
    def ignore_index(self) -> int:
        """The class id the loss ignores (never an invalid target), as validated."""
        return self._engine.ignore_index

    # -- the loop ----------------------------------------------------------------------
    def step(self, inputs: Any = None, targets: Any = None) -> _Step:
        """Mark one training step; the batch is checked on a bad step and kept for dumps.

        A context that ends without ``optimizer.step()`` leaves the step open and the next
        ``guard.step()`` continues it (gradient accumulation: one nanguard step is one
        optimizer step).

        Args:
            inputs: The batch's inputs (a tensor or a nested structure of tensors).
            targets: The batch's targets, checked for NaN/Inf and class ids outside
                ``[0, n_classes)``.
        """
        self._check_open()
        return _Step(self, inputs, targets)

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """Use instead of ``loss.backward()``: records the loss, then runs the backward pass;
        ``kwargs`` (``retain_graph=True``, ...) go to ``loss.backward``."""
        self._check_open()
        if not self._engine.in_step:
            raise RuntimeError(
                "guard.backward(loss) was called outside `with guard.step(...)`: wrap each "
                "training step in the guard's step context."
            )
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"guard.backward needs the loss tensor. Received: loss={loss!r}")
        if self._engine.verdict is not None:
            raise RuntimeError(
                "guard.backward(loss) was called after an optimizer already stepped in this "
                "guard.step(): this loss's gradients would go unchecked. Give each update "
                "its own guard.step() (a GAN's discriminator and generator phases, each "
                "critic iteration), or run every backward before the first optimizer.step()."
            )
        self._engine.add_loss(loss, kwargs.get("gradient"))
        if self.scaler is not None:
            self.scaler.scale(loss).backward(**kwargs)
            self._engine.after_backward(getattr(self.scaler, "_scale", None))
        else:
            loss.backward(**kwargs)
            self._engine.after_backward()

    def close(self) -> None:
        """Check the last update, then remove every hook the guard registered. Safe to
        call twice.

        An update's finiteness is read with the next step's numbers (on a GPU or under
        DDP; on the CPU right after the update); the last one has no next step, so
        ``close()`` reads it: weights it made non-finite are rolled back (or
        the run aborts, by the ladder) before the model is used.
        """
        try:
            if self._handles and not self._engine.in_step:
                if self._engine.open:
                    warnings.warn(
                        f"guard.close() with a step still open: {self._engine.micro_batches} "
                        "guard.step() context(s) since the last optimizer.step() (gradient "
                        "accumulation) were never followed by one, so that step was not "
                        "checked and is not counted.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                self.check_last_update()
        finally:
            self._remove_hooks()

    def check_last_update(self) -> None:
        """Read the last update's check now (one device-to-host transfer), e.g. before an
        evaluation or a checkpoint between epochs: non-finite weights from the last update
        are rolled back (or the run aborts, by the ladder) here instead of at the next step.
        """
        self._check_open()
        verdict = self._engine.check_last_update()
        if verdict is not None:
            self._finish(verdict)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._engine.detach()

    def __enter__(self) -> NanGuard:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:  # an error is on its way out: only remove the hooks
            self._remove_hooks()

    def state_dict(self) -> dict[str, Any]:
        """The guard's counters and history, to save beside a checkpoint (the lowered
        learning rates live in the optimizer's own state_dict)."""
        return self._engine.session.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (an older one's ``lr_scale`` is ignored)."""
        self._engine.session.load_state_dict(state)

    # -- hooks -------------------------------------------------------------------------
    def _check_open(self) -> None:
        if not self._handles:
            raise RuntimeError("This NanGuard was closed; create a new one to keep guarding.")

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        engine = self._engine
        if not engine.in_step:
            raise RuntimeError(
                "optimizer.step() was called outside `with guard.step(...)`: the guard "
                "cannot check this update. Wrap each training step in guard.step()."
            )
        if len(args) > 1 or kwargs.get("closure") is not None:  # args[0] is the optimizer
            raise RuntimeError(
                f"nanguard.torch cannot guard optimizer.step(closure) "
                f"({type(optimizer).__name__} computes the gradients inside step(), after "
                "the guard's check would run). Use an optimizer stepped without a closure."
            )
        if id(optimizer) in engine.stepped:
            raise RuntimeError(
                f"{type(optimizer).__name__}.step() ran twice in one guard.step(): nanguard "
                "checks one update per optimizer per step. Give each update its own "
                "guard.step() (each critic iteration of a WGAN, say)."
            )
        engine.stepped.add(id(optimizer))
        if engine.verdict is not None:
            return
        if engine.loss is None:
            raise RuntimeError(
                "optimizer.step() was called before guard.backward(loss) in this step: use "
                "guard.backward(loss) instead of loss.backward() so the loss is checked."
            )
        engine.warn_if_no_output(
            "nanguard saw no output of the model in this guard.step() (is the model called "
            "before `with guard.step(...)`, or the loss computed from a submodule's output?). "
            "Call the model inside the step, or set logits_module='<submodule name>', so the "
            "logits' range is recorded. A model torch.compile'd and run before the guard was "
            "created keeps a graph without its hooks: create the guard first."
        )
        self._finish(engine.decide())

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._engine.after_update()
        # On the CPU reading the update's check costs no wait: an update that made the
        # weights non-finite is undone right here, before any code after optimizer.step()
        # (an AveragedModel, the rest of the step, an exception's handler) sees them.
        verdict = self._engine.check_update_now()
        if verdict is not None:
            self._finish(verdict)

    def _finish(self, verdict: Verdict) -> None:
        if verdict.dump_path:
            self.dumps.append(verdict.dump_path)
        rec = verdict.record
        if rec.step % self.config.log_every == 0 and log.isEnabledFor(logging.DEBUG):
            log.debug("nanguard %r", rec)
        if verdict.decision.action == "abort":
            # The guarded run ends here: leave the optimizer and the model unhooked, so the
            # code after the error (a retry with a new guard, an evaluation) runs plainly.
            self._remove_hooks()
            # Raised from inside scaler.step(), scaler.update() never runs: the scaler
            # would take its optimizers for unscaled already and step a retry with scaled
            # gradients. Forget that step, as update() does.
            states = getattr(self.scaler, "_per_optimizer_states", None)
            if states is not None:
                states.clear()
        verdict.raise_if_abort()


def _take_over(optimizers: list[Any]) -> None:
    """An earlier guard still hooked on one of these optimizers (an exception or a re-run
    notebook cell skipped its ``close()``) would refuse every step outside its own
    ``guard.step()``: its hooks are removed, with a warning."""
    for opt in optimizers:
        for hook in list(getattr(opt, "_optimizer_step_pre_hooks", {}).values()):
            other = getattr(hook, "__self__", None)
            if isinstance(other, NanGuard) and other._handles:
                other._remove_hooks()
                warnings.warn(
                    f"An earlier NanGuard on this {type(opt).__name__} was still open (its "
                    "close() was not called); its hooks were removed and the new guard "
                    "takes over.",
                    RuntimeWarning,
                    stacklevel=3,
                )


def _about_class_ids(exc: BaseException) -> bool:
    """Whether an exception is what PyTorch raises on the CPU for a class id out of range:
    ``IndexError`` (cross_entropy, nll_loss, an embedding lookup), or ``RuntimeError`` from
    ``gather`` ("index 14 is out of bounds") or ``one_hot`` ("Class values must be ...")."""
    if isinstance(exc, IndexError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of bounds" in text or "Class values" in text)


def _scale_version(scaler: Any) -> int:
    scale = getattr(scaler, "_scale", None)
    return scale._version if isinstance(scale, torch.Tensor) else 0  # created at version 0


class _Step:
    """The context of one training step (``with guard.step(x, targets=y):``)."""

    def __init__(self, guard: NanGuard, inputs: Any, targets: Any) -> None:
        self.guard = guard
        self.inputs = inputs
        self.targets = targets

    def __enter__(self) -> _Step:
        engine = self.guard._engine
        if engine.in_step:
            raise RuntimeError("guard.step() contexts cannot be nested.")
        self.index = engine.session.step  # of this step (an open one's, if continued)
        self.scale_version = _scale_version(self.guard.scaler)
        if engine.open:  # the last guard.step() did not reach optimizer.step()
            engine.continue_step(self.inputs, self.targets)
            return self
        try:
            engine.begin_step(self.inputs, self.targets)
        except BaseException:  # Ctrl-C while the snapshot copies: no step was begun
            engine.end_step()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        guard, engine = self.guard, self.guard._engine
        keep_open = False
        try:
            if exc is None:
                if engine.verdict is None and engine.loss is not None:
                    keep_open = self._without_optimizer_step()
                elif engine.verdict is None:
                    warnings.warn(
                        "A guard.step() ended without guard.backward(loss): nanguard saw no "
                        "loss and could not check this step.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    engine.session.step += 1
                return False
            if engine.verdict is not None:
                return False
            # On the CPU an out-of-range label raises inside the loss before any hook can
            # act: that is a bad step with a known cause, not a crash.
            # classes=True: a loss that raised on these ids proved they index the output,
            # whatever the output's gradient suggested (scores_classes). No output seen (a
            # model computing its loss inside forward): the loss's IndexError names an id.
            # Not under DDP: the other ranks wait in the backward's all-reduce, and this
            # rank's decision would meet them there (labels are defused before the loss
            # there, see _defuse_labels; a loss inside forward needs logits_module).
            labels = None
            if (isinstance(exc, Exception) and not isinstance(exc, NonFiniteTrainingError)
                    and not engine.distributed):
                labels = (engine.describe_label_faults()
                          or check_targets(engine.targets, engine.class_output,
                                           engine.ignore_index)
                          or engine.labels_rejected_by(exc))
            if labels:
                engine.ids_index_the_output()
                verdict = engine.decide(bad=True)
                try:
                    guard._finish(verdict)
                except NonFiniteTrainingError as err:
                    raise err from exc
                # The loss's own complaint about the ids is the bad step, now handled; any
                # other error (a bug in the loop's own code) still reaches the loop.
                return _about_class_ids(exc)
            # An error the loop may catch and go on from (out of memory): the step still
            # counts, so later indices match the batch index (once: a verdict interrupted
            # on its slow path counted it already). No history entry: nothing was measured.
            # With gradient accumulation it was one micro-batch: the step stays open.
            if engine.accumulates:
                keep_open = True
            else:
                engine.session.step = max(engine.session.step, self.index + 1)
            return False
        finally:
            engine.end_step(keep_open=keep_open)

    def _scaler_stepped(self) -> bool:
        """Whether ``scaler.step(optimizer)`` ran in this context (and skipped the
        optimizer's step): its state says STEPPED until ``scaler.update()``, which changes
        the scale in place."""
        scaler, opt = self.guard.scaler, self.guard._engine.optimizers[0]
        state = getattr(scaler, "_per_optimizer_states", {}).get(id(opt))
        stage = getattr(state, "get", lambda _: None)("stage")
        return (getattr(stage, "name", None) == "STEPPED"
                or _scale_version(scaler) != self.scale_version)

    def _used_scale(self) -> float:
        """The scale this step's gradients were computed at: the scaler's now, undone by its
        backoff when ``scaler.update()`` already ran in this context (after its skip)."""
        scaler = self.guard.scaler
        assert scaler is not None
        scale = float(scaler.get_scale())
        if _scale_version(scaler) != self.scale_version:
            scale /= float(scaler.get_backoff_factor())
        return scale

    def _without_optimizer_step(self) -> bool:
        """The step's context ends with no ``optimizer.step()`` in it; whether the step
        stays open for the next ``guard.step()``.

        Without a scaler, or with one that did not step in this context, that is gradient
        accumulation: the optimizer steps in a later context, and one nanguard step is one
        optimizer step. When ``scaler.step`` ran here and kept the optimizer from stepping,
        the step ends here: the scaler's own skip (overflowing gradients, finite loss), or a
        bad step.
        """
        guard, engine = self.guard, self.guard._engine
        if guard.scaler is None or not self._scaler_stepped():
            # An accumulation micro-batch (also one with a NaN loss: the whole step is bad,
            # and concluded when the scaler steps at the window's end).
            engine.keep_open()
            return True
        # The scaler stepped and kept the optimizer from stepping: the window ends here, as
        # the scaler's own skip or as a bad step.
        record = engine.measure()
        if not engine.scaler_skipped(record, self._used_scale):
            guard._finish(engine.decide(record=record))
        return False
