"""The framework-neutral core every adapter drives: history, ladder, events and dumps."""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
import warnings
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from nanguard import detector, policy
from nanguard.config import GuardConfig
from nanguard.dump import write_dump
from nanguard.events import Event, NonFiniteTrainingError, StepRecord

log = logging.getLogger("nanguard")
# Events a state_dict carries at most (a checkpoint of a long bad run stays small).
EVENTS_SAVED = 256
# Events kept in memory: the run's first EVENTS_FIRST and the latest, EVENTS_KEPT in all
# (about 1.7 kB each: a skip-only run over a corrupted shard, a bad step every few batches
# for days, grew without bound). Every event's dump, up to max_dumps, is on disk.
EVENTS_KEPT = 10_000
EVENTS_FIRST = 100
# A due snapshot is refused when the weights' peak grew this much since the last attempt
# and is huge (admit_snapshot, detector.blew_up).
SNAPSHOT_JUMP = detector.BLOW_UP


class Probe(Protocol):
    """What an adapter lets the core ask about a bad step (the slow path only)."""

    def evidence(self, record: StepRecord) -> detector.Evidence:
        """Look closer: batch checks, weights, optimizer state, replay."""
        ...

    def tensors(self) -> Mapping[str, np.ndarray]:
        """Forensic tensors for the dump: the batch, the model output, localized tensors."""
        ...

    def to_repair(self) -> list[str]:
        """The names of the tensors a skip's repair (``Decision.repair``) will put back."""
        ...

    def state(self) -> Mapping[str, Any]:
        """Model and optimizer state for the dump (``model.*``, ``optimizer.*``): arrays,
        or callables that make them when the dump writes them."""
        ...


class Verdict:
    """The core's answer for one step, which the adapter carries out.

    Attributes:
        record: The step's record, as it went into the history.
        decision: The ladder's decision (action, whether to lower the LR, reason).
        event: The event when the step was bad, else None.
        dump_path: The dump written for the event, if any.
        undo_update: An abort after an update that already reached the weights (found
            after it was applied): the adapter restores the last finite snapshot after the
            dump (which holds the non-finite state) and before raising, so the model the
            user's code gets back is finite, as the ladder's rule 1 promises.
    """

    __slots__ = ("decision", "dump_path", "event", "record", "undo_update")

    def __init__(
        self,
        record: StepRecord,
        decision: policy.Decision,
        event: Event | None = None,
        dump_path: str | None = None,
        undo_update: bool = False,
    ) -> None:
        self.record = record
        self.decision = decision
        self.event = event
        self.dump_path = dump_path
        self.undo_update = undo_update

    @property
    def action(self) -> str | None:
        return self.decision.action

    @property
    def restores(self) -> bool:
        """Whether the adapter restores the last snapshot: a rollback, or an abort's undo."""
        return self.decision.restores or self.undo_update

    def raise_if_abort(self) -> None:
        if self.decision.action == "abort" and self.event is not None:
            raise NonFiniteTrainingError(self.event, self.dump_path)


class Readout:
    """What users read on every adapter's guard: ``history``, ``events`` and the counters.

    An adapter says where its run's session is (None before its first run) and which step
    its last snapshot holds; the views are the same everywhere.
    """

    def _live_session(self) -> GuardSession | None:
        raise NotImplementedError

    def _snapshot_at(self) -> int | None:
        raise NotImplementedError

    @property
    def history(self) -> list[StepRecord]:
        """The last ``history_size`` (optimizer) steps of the current or last run, oldest
        first."""
        session = self._live_session()
        return [] if session is None else session.recent()

    @property
    def events(self) -> list[Event]:
        """Every event of the current or last run, oldest first."""
        session = self._live_session()
        return [] if session is None else list(session.events)

    @property
    def step_count(self) -> int:
        """Index of the next (optimizer) step."""
        session = self._live_session()
        return 0 if session is None else session.step

    @property
    def amp_skips(self) -> int:
        """Steps the mixed-precision loss scaler skipped itself (overflowing scaled
        gradients): the scaler's, not nanguard events."""
        session = self._live_session()
        return 0 if session is None else session.amp_skips

    @property
    def snapshot_step(self) -> int | None:
        """The step whose starting state the last snapshot holds."""
        return self._snapshot_at()


class GuardSession:
    """History, ladder counters, events and dumps of one guarded run.

    Adapters measure each step, call :meth:`conclude`, and carry out the verdict with
    their framework's objects.

    Args:
        config: The validated options.
        framework: Name of the adapter, recorded in dumps.
        environment: Versions for the dump's meta.
        rank: Distributed rank (0 when not distributed).
        world_size: Number of ranks.

    Example:
        >>> from nanguard.config import GuardConfig
        >>> s = GuardSession(GuardConfig(), framework="none")
        >>> s.conclude(StepRecord(step=0, loss=1.0, grad_norm=2.0), probe=None).action is None
        True
    """

    def __init__(
        self,
        config: GuardConfig,
        *,
        framework: str,
        environment: Mapping[str, str] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.config = config
        self.framework = framework
        self.environment = dict(environment or {})
        self.rank = rank
        self.world_size = world_size
        self.extra_meta: dict[str, Any] = {}
        self.reset()

    def reset(self) -> None:
        """Forget the run: a new ``fit`` starts from step 0 with fresh counters."""
        # The detector looks back further than a small history_size: the gradient norm's
        # growth and the snapshots' calm check read up to LAYER_WINDOW steps. Users and
        # dumps see the last history_size of them (recent()).
        self.history: collections.deque[StepRecord] = collections.deque(
            maxlen=max(self.config.history_size, detector.LAYER_WINDOW)
        )
        self.ladder = policy.LadderState()
        self.events: list[Event] = []
        self.events_dropped = 0  # left out of `events` past EVENTS_KEPT
        self.dumps_written = 0
        self.amp_skips = 0
        self.step = 0
        # Largest |w| at the last snapshot attempt and in the snapshot held (admit_snapshot).
        self.attempt_peak: float | None = None
        self.held_peak: float | None = None
        self.peak_refused_at: int | None = None

    def recent(self, until: int | None = None) -> list[StepRecord]:
        """The last ``history_size`` steps, oldest first (``guard.history``, dumps);
        ``until``: those up to and including that step."""
        kept = [r for r in self.history if until is None or r.step <= until]
        return kept[-self.config.history_size:]

    def snapshot_due(self, last_snapshot_step: int | None) -> bool:
        """Whether to snapshot before the step about to start.

        One is taken before the first step, then every ``snapshot_every`` steps, but only
        from a healthy state: the last ``min(8, snapshot_every)`` steps all good and the
        gradient norm not climbing, so a rollback lands before a divergence rather than
        inside it. A deferred snapshot is tried again at the next step.
        """
        if last_snapshot_step is None:
            return True
        every, calm = self.config.snapshot_every, min(detector.GROWTH_WINDOW,
                                                      self.config.snapshot_every)
        if self.peak_refused_at is not None:
            # After weights one update blew up: the next try comes no sooner, and only after
            # calmer steps, than GROWTH_WINDOW, so a rollback still lands before them.
            last_snapshot_step = max(last_snapshot_step, self.peak_refused_at)
            every = calm = max(every, detector.GROWTH_WINDOW)
        if self.step - last_snapshot_step < every:
            return False
        recent = list(self.history)[-calm:]
        if any(r.action is not None for r in recent):
            return False
        return detector.growth(self.history) is None

    def admit_snapshot(self, peak: float, *, scheduled: bool = True) -> bool:
        """Whether to take a finite snapshot of weights whose largest ``|w|`` is ``peak``.

        A scheduled one is refused when the weights are huge (``detector.HUGE_WEIGHT``) and
        their peak grew over ``SNAPSHOT_JUMP``-fold since the last attempt: an update blew
        them up (a one-step learning-rate spike) and the loss has not shown it yet; such a
        snapshot would make every later rollback land on those weights. The refused attempt
        counts for the schedule (the next comes ``max(snapshot_every, GROWTH_WINDOW)`` steps
        later, after as many steps that all had no action) and its peak is the next
        attempt's reference, so weights that stay that large and train on are taken then; a
        rollback voids the refusal. An unscheduled one (after a ``load_state_dict``) is
        always taken.
        """
        last, self.attempt_peak = self.attempt_peak, peak
        if scheduled and last is not None and detector.blew_up(peak, last):
            self.peak_refused_at = self.step
            return False
        self.held_peak, self.peak_refused_at = peak, None
        return True

    def skipped_by_scaler(self, record: StepRecord) -> Verdict:
        """An AMP loss scaler skipped this step itself (its scaled gradients overflowed).

        That is mixed precision working, not a nanguard event: the step is kept in the
        history with ``cause="amp_scaler_skip"`` and no action, and the ladder is untouched.
        """
        record.cause = "amp_scaler_skip"
        self.history.append(record)
        self.amp_skips += 1
        self.step = record.step + 1
        return Verdict(record, policy.Decision(None, False, "skipped by the AMP loss scaler"))

    def unseen_steps(self, bad: int = 0, consecutive: int | None = None) -> None:
        """Steps the adapter did not record one by one (batches a single call ran, whose
        bad updates it kept out itself): ``bad`` of them were bad, and the ladder's run of
        consecutive skips is ``consecutive`` after them (None: those bad steps extend it;
        0: a good one ended it)."""
        run = self.ladder.consecutive_skips + bad if consecutive is None else consecutive
        self.ladder = self.ladder._replace(total_bad=self.ladder.total_bad + bad,
                                           consecutive_skips=run)

    def count_scaler_skip(self) -> None:
        """An AMP loss scaler dropped a micro-batch inside a step (Keras's
        ``LossScaleOptimizer`` under gradient accumulation): counted, not a step."""
        self.amp_skips += 1

    def conclude(
        self,
        record: StepRecord,
        probe: Probe | None,
        *,
        bad: bool | None = None,
        update_nonfinite: bool = False,
        corrupt: bool = False,
        update_step: int | None = None,
        has_snapshot: bool = True,
        can_skip: bool = True,
    ) -> Verdict:
        """Decide one step, record it, and write a dump for an event.

        Args:
            record: The step's numbers; ``record.step`` should be :attr:`step`.
            probe: The adapter's slow-path probe, asked only when the step is bad.
            bad: Override the local verdict (the distributed OR of every rank's).
            update_nonfinite: The previous step's update left the weights non-finite.
            corrupt: Weights or optimizer state are known to be non-finite already.
            update_step: The step whose update left the weights non-finite. Default None:
                the step before ``record.step`` (adapters that see it one step late). An
                adapter that checks the weights inside the same step passes ``record.step``.
            has_snapshot: Whether the adapter holds a finite snapshot to roll back to.
            can_skip: Whether the adapter can still keep this step's update out of the
                weights (False for a loss-only check made after the update).

        Returns:
            The :class:`Verdict`; call ``verdict.raise_if_abort()`` after carrying it out.
        """
        if bad is None:
            bad = detector.is_bad(record)
        bad = bad or update_nonfinite or corrupt
        self.step = record.step + 1
        if not bad:
            decision, self.ladder = policy.decide(
                self.ladder, self.config, step=record.step, bad=False
            )
            self.history.append(record)
            return Verdict(record, decision)

        evidence = probe.evidence(record) if probe is not None else detector.Evidence()
        evidence.update_nonfinite = evidence.update_nonfinite or update_nonfinite
        corrupt = corrupt or evidence.update_nonfinite or bool(evidence.weights_nonfinite)
        past = list(self.history)
        culprit = record
        if evidence.update_nonfinite and past and update_step != record.step:
            # Caught one step late (the check rides on the next step's transfer): the
            # event is the step whose update overflowed, described by its own numbers.
            culprit, past = past[-1], past[:-1]
        self.history.append(record)
        return self._event(record, culprit, past, evidence, corrupt=corrupt, probe=probe,
                           has_snapshot=has_snapshot, can_skip=can_skip)

    def conclude_late_update(self, probe: Probe | None, *, has_snapshot: bool = True) -> Verdict:
        """The last recorded step's update left the weights non-finite, found after that
        step ended: before an evaluation, a checkpoint or the end of training, which must not
        see those weights. Its history entry takes the action (a rollback, usually)."""
        record = self.history[-1]
        evidence = probe.evidence(record) if probe is not None else detector.Evidence()
        evidence.update_nonfinite = True
        return self._event(record, record, list(self.history)[:-1], evidence, corrupt=True,
                           probe=probe, has_snapshot=has_snapshot, can_skip=True)

    def _event(
        self,
        record: StepRecord,
        culprit: StepRecord,
        past: list[StepRecord],
        evidence: detector.Evidence,
        *,
        corrupt: bool,
        probe: Probe | None,
        has_snapshot: bool,
        can_skip: bool,
    ) -> Verdict:
        """Classify a bad step, climb the ladder, and write the event's dump; ``record`` is
        the history entry that takes the action, ``culprit`` the step the event is about."""
        if ("weights_peak" in evidence.details and self.held_peak is not None
                and self.held_peak >= detector.HUGE_WEIGHT):
            evidence.details["snapshot_peak"] = self.held_peak
        evidence.framework = evidence.framework or self.framework
        peak = evidence.details.get("weights_peak")
        if (isinstance(peak, dict) and has_snapshot and self.held_peak is not None
                and detector.blew_up(float(peak["value"]), self.held_peak)):
            # Weights an update blew up since the snapshot (finite, ~1e36): skipping cannot
            # shrink them and every later step would be bad; only the snapshot undoes them
            # (a rollback at once, or a skip's repair of those weights).
            corrupt = True
        cause, where, message = detector.classify(culprit, evidence, past)
        micro, micros = (evidence.details.get(k) for k in ("micro_batch", "micro_batches"))
        if isinstance(micro, int) and isinstance(micros, int):
            # Gradient accumulation (Keras): which of the step's batches went bad.
            message = message.replace(
                f"Step {culprit.step}:",
                f"Step {culprit.step} (batch {micro + 1} of the {micros} it accumulates):", 1)
        found_on = evidence.details.get("cause_rank")
        if isinstance(found_on, int) and found_on != self.rank:
            # Every rank adopts the evidence of the rank whose cause comes first: say whose.
            message = message.replace(
                f"Step {culprit.step}:", f"Step {culprit.step}, on rank {found_on} (this rank, "
                f"{self.rank}, takes the same action; its own numbers are in "
                "details['local_numbers']):", 1)
        decision, self.ladder = policy.decide(
            self.ladder, self.config, step=record.step, bad=True, corrupt=corrupt,
            has_snapshot=has_snapshot, can_skip=can_skip,
        )
        record.action = decision.action
        record.cause = cause
        repaired = probe.to_repair() if decision.repair and probe is not None else []
        put_back = ("" if not repaired else f" Put back: {', '.join(repaired[:6])}"
                    + (f" and {len(repaired) - 6} more" if len(repaired) > 6 else "") + ".")
        if decision.restores:
            # The weights go back to the held snapshot's: a refused one's are gone.
            self.attempt_peak, self.peak_refused_at = self.held_peak, None
        undo = decision.action == "abort" and evidence.update_nonfinite and has_snapshot
        event = Event(
            step=culprit.step,
            cause=cause,
            where=where,
            message=message + _did(decision, self.config, undo=undo) + put_back,
            action=decision.action,
            rank=self.rank,
            details={"reason": decision.reason, "detected_at_step": record.step,
                     **evidence.details, **({"repaired": repaired} if repaired else {})},
        )
        if cause in ("grad_explosion", "grad_nonfinite"):
            grown = detector.layer_growth(self.history, self.extra_meta.get("param_names"))
            if grown is not None:
                event.details["layer_growth"] = grown
                if cause == "grad_explosion":
                    event.message = message + (
                        f" The first gradient to grow was '{grown['first']}' (from step "
                        f"{grown['step']})." + _did(decision, self.config, undo=undo) + put_back
                    )
        self.events.append(event)
        if len(self.events) > EVENTS_KEPT:
            del self.events[min(EVENTS_FIRST, EVENTS_KEPT - 1)]
            self.events_dropped += 1
        log.warning("nanguard: %s", event.message)
        dump_path = self._maybe_dump(event, decision, probe)
        return Verdict(record, decision, event, dump_path, undo_update=undo)

    def _maybe_dump(
        self, event: Event, decision: policy.Decision, probe: Probe | None
    ) -> str | None:
        abort = decision.action == "abort"
        if self.dumps_written >= self.config.max_dumps and not abort:
            return None
        tensors: Mapping[str, np.ndarray] = {}
        state: Mapping[str, Any] = {}
        mode = self.config.dump_state
        try:
            if probe is not None:
                tensors = probe.tensors()
                if mode == "always" or (abort and mode == "abort"):
                    state = probe.state()
            path = write_dump(
                self.config.dump_dir,
                event,
                # up to and including the event's step (an update caught a step late is
                # the step before the one that found it: details["detected_at_step"])
                self.recent(until=event.step),
                tensors,
                self.meta(),
                state,
            )
        except Exception as err:  # noqa: BLE001 - a dump that fails must not end the run
            warnings.warn(
                f"nanguard could not write a dump to {self.config.dump_dir!r} "
                f"({type(err).__name__}: {err}); the event stays in guard.history"
                + ("." if abort else " and training goes on."),
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        self.dumps_written += 1
        return path

    def meta(self) -> dict[str, Any]:
        return {
            "framework": self.framework,
            "environment": self.environment,
            "config": self.config.to_dict(),
            "rank": self.rank,
            "world_size": self.world_size,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "ladder": self.ladder._asdict(),
            **self.extra_meta,
        }

    def counters(self) -> dict[str, float]:
        """The run's counters as the adapters log them (``bad_steps``, ``rollbacks``,
        ``amp_skips``)."""
        return {
            "bad_steps": float(self.ladder.total_bad),
            "rollbacks": float(self.ladder.rollbacks),
            "amp_skips": float(self.amp_skips),
        }

    def state_dict(self) -> dict[str, Any]:
        """Counters to save with a checkpoint (and the last ``EVENTS_SAVED`` events, so a
        resumed run's ``events`` still holds the bad steps its ``history`` shows)."""
        return {
            "rank": self.rank,
            "step": self.step,
            "ladder": self.ladder._asdict(),
            "dumps_written": self.dumps_written,
            "amp_skips": self.amp_skips,
            "history": [r.to_dict() for r in self.history],
            "events": [dataclasses.asdict(e) for e in self.events[-EVENTS_SAVED:]],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state.get("step", 0))
        self.ladder = policy.LadderState(**state.get("ladder", {}))
        self.dumps_written = int(state.get("dumps_written", 0))
        self.amp_skips = int(state.get("amp_skips", 0))
        self.history.clear()
        self.history.extend(StepRecord.from_dict(r) for r in state.get("history", []))
        self.events = []
        if state.get("rank", self.rank) == self.rank:
            self.events = [Event.from_dict(e) for e in state.get("events", [])]
        # Else another rank's state (Lightning writes rank 0's checkpoint, every rank loads
        # it). Its history is kept: the actions and gradient norms in it agree across ranks
        # and feed decisions that must (the snapshot schedule, growth); its losses are that
        # rank's. Its events, that rank's messages and dumps, are left out.


def _did(decision: policy.Decision, config: GuardConfig, *, undo: bool = False) -> str:
    action = decision.action
    if action == "skip" and decision.repair:
        return (" nanguard skipped the step and put the weights that are non-finite or blown "
                "up (|w| of 1e8 or more, 1000-fold the snapshot's), with their optimizer "
                "state, back from the last finite snapshot; the rest of the model is left as "
                "it is (no rollback in actions, or none left).")
    if action == "skip":
        return " nanguard skipped the step."
    if action in ("rollback", "lower_lr"):
        done = "rolled back to the last finite snapshot" if action == "rollback" else "skipped"
        lr = f" and multiplied the learning rate by {config.lr_factor}" if decision.lower_lr else ""
        return f" nanguard {done}{lr}."
    if action == "abort":
        if "no finite snapshot" in decision.reason:
            return (" nanguard aborted the run: there is no finite snapshot to roll back to "
                    "(none was taken: the weights or the optimizer's state were non-finite "
                    "whenever one was due).")
        if undo:
            return (" nanguard aborted the run, after putting the model and optimizer back to "
                    "the last finite snapshot (the dump holds the non-finite state).")
        return " nanguard aborted the run."
    return " nanguard let the step through (no rung of the ladder left)."
