"""The escalation ladder as plain state and one decision function."""

from __future__ import annotations

from typing import NamedTuple

from nanguard.config import GuardConfig


class LadderState(NamedTuple):
    """Counters the ladder keeps between steps.

    Attributes:
        consecutive_skips: Bad steps skipped in a row since the last good step or rollback.
        rollbacks: Rollbacks (or learning-rate lowerings standing in for them) so far.
        total_bad: Bad steps seen in the whole run.
        last_good_step: Index of the last good step, -1 before any.
    """

    consecutive_skips: int = 0
    rollbacks: int = 0
    total_bad: int = 0
    last_good_step: int = -1


class Decision(NamedTuple):
    """What to do about one step.

    Attributes:
        action: None for a good step, else "skip", "rollback", "lower_lr", "abort", or
            "log" (a bad step let through because no rung of the ladder is left).
        lower_lr: Multiply every learning rate by ``lr_factor`` now.
        reason: Why, in words.
        repair: A skip of a step whose weights or optimizer state are already non-finite,
            with no rollback to undo it: the adapter puts back the non-finite parameters, and
            those the same update blew up (``detector.blew_up``), each with its optimizer
            state, from the last finite snapshot, leaving the rest as they are, so a
            skip-only ladder does not train on from NaN weights.
    """

    action: str | None
    lower_lr: bool
    reason: str
    repair: bool = False

    @property
    def restores(self) -> bool:
        return self.action == "rollback"

    @property
    def blocks_update(self) -> bool:
        """Whether the step's update must be kept from the weights."""
        return self.action in ("skip", "rollback", "lower_lr", "abort")


def decide(
    state: LadderState,
    config: GuardConfig,
    *,
    step: int,
    bad: bool,
    corrupt: bool = False,
    has_snapshot: bool = True,
    can_skip: bool = True,
) -> tuple[Decision, LadderState]:
    """Climb the ladder for one step.

    Args:
        state: The counters so far.
        config: The guard's options.
        step: The step's index.
        bad: Whether the step is bad (on any rank).
        corrupt: Whether the weights or optimizer state are already non-finite (or blown up
            by an update: ``detector.blew_up``), so that skipping cannot help and a rollback
            is due at once.
        has_snapshot: Whether a finite snapshot exists to roll back to. Without one (the
            weights were never finite when a snapshot was due) the rollback rung is passed
            over.
        can_skip: Whether the adapter can keep this step's update out of the weights. A
            loss-only check sees the step after its update was applied: then only a
            restore undoes it, and the skip rung is passed over.

    Returns:
        The decision and the new counters.
    """
    if not bad:
        return Decision(None, False, "finite"), state._replace(
            consecutive_skips=0, last_good_step=step
        )
    actions = config.actions
    state = state._replace(total_bad=state.total_bad + 1)
    if (not corrupt and can_skip and "skip" in actions
            and state.consecutive_skips < config.max_skips):
        reason = f"skip {state.consecutive_skips + 1} of {config.max_skips}"
        return Decision("skip", False, reason), state._replace(
            consecutive_skips=state.consecutive_skips + 1
        )
    why = ("weights or optimizer state broken (non-finite, or blown up)" if corrupt
           else "the update is already applied" if not can_skip
           else f"{config.max_skips} skips" if "skip" in actions else "skip not in actions")
    if "abort" in actions and "skip" not in actions and "rollback" not in actions:
        # The contract's rule 4: a bad step aborts when neither skip nor rollback is allowed
        # (lower_lr acts with a rollback; alone with abort it has nothing to act with).
        return Decision("abort", False, "neither skip nor rollback allowed: abort"), state
    lower = "lower_lr" in actions
    # Without rollback, lower_lr stands in for it (the update kept out, the rate lowered):
    # not when the weights are already non-finite, which only a snapshot can undo.
    rung = has_snapshot if "rollback" in actions else lower and not corrupt
    if "rollback" in actions and not has_snapshot:
        why += "; no finite snapshot to roll back to"
    if state.rollbacks < config.max_rollbacks and rung:
        action = "rollback" if "rollback" in actions else "lower_lr"
        reason = f"{why}: {action} {state.rollbacks + 1} of {config.max_rollbacks}"
        return Decision(action, lower, reason), state._replace(
            consecutive_skips=0, rollbacks=state.rollbacks + 1
        )
    if "abort" in actions:
        return Decision("abort", False, f"{why}, {state.rollbacks} rollbacks: abort"), state
    if actions and can_skip and not corrupt:
        # The ladder is spent but the user asked for protection: keep the update out. (Not
        # when the weights are already non-finite: a skip would not undo that.)
        return Decision("skip", False, f"{why}; no rung left, skipping"), state
    if corrupt and "skip" in actions and has_snapshot:
        # The contract's rule 1 keeps a bad update from the weights; one that got there
        # (found after the update) can only be undone from a snapshot. Without a rollback
        # to do it, the skip puts back just the broken tensors (non-finite or blown up).
        return Decision("skip", False, f"{why}; no rollback (in actions, or left): the broken "
                        "tensors put back from the last finite snapshot", repair=True), state
    if actions:
        return Decision("log", False, f"{why}; no rung left that can undo it, logged"), state
    return Decision("log", False, "monitoring only (actions=()), logged"), state
