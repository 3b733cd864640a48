"""The options every adapter shares, validated once."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

ACTIONS: tuple[str, ...] = ("skip", "rollback", "lower_lr", "abort")
DUMP_STATE_CHOICES: tuple[str, ...] = ("abort", "always", "never")


def _fail(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"Invalid value for `{name}`: {allowed}. Received: {name}={value!r}")


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def _check_int(name: str, value: Any, minimum: int) -> int:
    """An integer (numpy's too, as sweeps produce them) of at least ``minimum``, as an int."""
    if _is_bool(value) or not isinstance(value, numbers.Integral) or value < minimum:
        raise _fail(name, value, f"expected an integer >= {minimum}")
    return int(value)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not _is_bool(value)


@dataclasses.dataclass(frozen=True)
class GuardConfig:
    """Options shared by every nanguard adapter (see the contract's table).

    Args:
        actions: The escalation ladder, any subset of
            ``("skip", "rollback", "lower_lr", "abort")``; the order is fixed.
        clip_grad_norm: Clip the global gradient norm to this value every step.
        snapshot_every: Steps between snapshots of a finite training state.
        max_skips: Consecutive skipped steps before a rollback.
        max_rollbacks: Rollbacks before an abort.
        lr_factor: Learning-rate multiplier applied at each rollback, in (0, 1).
        dump_dir: Directory for forensic dumps, created on the first dump.
        max_dumps: Dumps written per run at most (an abort always dumps).
        history_size: Per-step stats kept in memory and written into dumps.
        log_every: How often stats are pushed to the framework's logger.
        dump_state: When a dump carries the model state: "abort", "always" or "never".
        logits_module: torch and Lightning: name of the submodule whose output
            counts as the logits.
        allow_neg_inf: Module (or layer) names whose ``-inf`` outputs are intended,
            such as attention masks; replay does not blame them.

    Example:
        >>> GuardConfig(max_skips=5).max_skips
        5
    """

    actions: tuple[str, ...] = ACTIONS
    clip_grad_norm: float | None = None
    snapshot_every: int = 100
    max_skips: int = 3
    max_rollbacks: int = 3
    lr_factor: float = 0.5
    dump_dir: str = "nanguard_dumps"
    max_dumps: int = 50
    history_size: int = 256
    log_every: int = 1
    dump_state: str = "abort"
    logits_module: str | None = None
    allow_neg_inf: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "actions", _check_actions(self.actions))
        if self.clip_grad_norm is not None:
            clip = self.clip_grad_norm
            if not _is_real(clip) or not 0 < clip < math.inf:
                raise _fail("clip_grad_norm", clip, "expected None or a finite number > 0")
            set_(self, "clip_grad_norm", float(clip))
        for name, minimum in (("snapshot_every", 1), ("max_skips", 0), ("max_rollbacks", 0),
                              ("max_dumps", 0), ("history_size", 1), ("log_every", 1)):
            set_(self, name, _check_int(name, getattr(self, name), minimum))
        factor = self.lr_factor
        if not _is_real(factor) or not 0 < factor < 1:
            raise _fail("lr_factor", factor, "expected a number in the open interval (0, 1)")
        set_(self, "lr_factor", float(factor))
        if not isinstance(self.dump_dir, str) or not self.dump_dir:
            if hasattr(self.dump_dir, "__fspath__"):
                set_(self, "dump_dir", str(self.dump_dir))
            else:
                raise _fail("dump_dir", self.dump_dir, "expected a non-empty path")
        if self.dump_state not in DUMP_STATE_CHOICES:
            raise _fail("dump_state", self.dump_state, f"expected one of {DUMP_STATE_CHOICES}")
        if self.logits_module is not None and not isinstance(self.logits_module, str):
            raise _fail("logits_module", self.logits_module, "expected None or a module name")
        names = self.allow_neg_inf
        if isinstance(names, str):
            names = (names,)
        names = tuple(names) if isinstance(names, Iterable) else None
        if names is None or not all(isinstance(n, str) for n in names):
            raise _fail("allow_neg_inf", self.allow_neg_inf, "expected module names (strings)")
        set_(self, "allow_neg_inf", names)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> GuardConfig:
        """Build from an adapter's keyword arguments (its ``locals()``); other keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """The options as plain JSON-ready values."""
        out = dataclasses.asdict(self)
        out["actions"] = list(self.actions)
        out["allow_neg_inf"] = list(self.allow_neg_inf)
        return out


def _check_actions(actions: Any) -> tuple[str, ...]:
    if isinstance(actions, str) or not isinstance(actions, Iterable):
        raise _fail("actions", actions, f"expected a sequence drawn from {ACTIONS}")
    given = list(actions)
    unknown = [a for a in given if a not in ACTIONS]
    if unknown:
        raise _fail("actions", actions, f"unknown action(s) {unknown}; allowed are {ACTIONS}")
    if len(set(given)) != len(given):
        raise _fail("actions", actions, "each action at most once")
    return tuple(a for a in ACTIONS if a in given)
