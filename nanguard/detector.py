"""Stats to verdict: is a step bad, and what went wrong first. Pure Python, no framework."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import statistics
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from nanguard.events import StepRecord

# Largest x with exp(x) finite: log(max finite value) of each dtype.
EXP_LIMITS: dict[str, float] = {
    "float16": math.log(65504.0),
    "bfloat16": math.log(3.3895313892515355e38),
    "float32": math.log(3.4028234663852886e38),
    "float64": math.log(1.7976931348623157e308),
}
GROWTH_WINDOW = 8
# Built-in optimizers (torch.optim, keras.optimizers) whose update of finite weights, finite
# gradients and finite state (with eps > 0) may overflow to Inf but never makes a NaN: it
# has no 0/0, inf - inf or 0 * inf. A NaN weight after their update was NaN before it.
NAN_FREE_UPDATES = frozenset({
    "SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adamax", "NAdam", "Nadam", "RAdam",
    "Adadelta", "Lion",
})
# Built-in optimizers whose step moves a weight by at most its learning rate times a factor
# their settings bound (the gradient over its own running scale, or its sign), whatever the
# finite gradient: under the settings ``bounded_step`` checks, their update cannot take a
# finite float32 (or wider) weight to Inf, whose last finite values are ~1e31 apart. An Inf
# weight after their update was Inf before it. (SGD's step is the gradient itself; RAdam's
# first steps are plain momentum: either can overflow, so they are not here.)
FLOAT32_TINY = 1.1754943508222875e-38  # float32's smallest normal number
BOUNDED_STEP_UPDATES = frozenset({
    "Adam", "AdamW", "NAdam", "Nadam", "Adamax", "Adagrad", "RMSprop", "Lion",
})


def eps_vanishes(eps: float, dtype: str) -> bool:
    """Whether an optimizer's ``eps`` > 0 is 0 in its weights' dtype (Adam's 1e-8 in
    float16): its update then divides 0 by 0, a NaN from finite numbers, wherever a
    gradient's square underflows to 0 as well. bfloat16 has float32's range."""
    dtype = "float32" if dtype == "bfloat16" else dtype
    try:
        return eps > 0 and float(np.asarray(eps, dtype=dtype)) == 0.0
    except (TypeError, ValueError):
        return False


def vanishing_eps(eps: object, dtypes: Iterable[str]) -> dict[str, object] | None:
    """``{"eps": eps, "dtype": dtype}`` for the first of ``dtypes`` (an optimizer's weights')
    in which a numeric ``eps`` is 0 (:func:`eps_vanishes`), for the event's details; or None."""
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        return None
    for dtype in sorted(set(dtypes)):
        if eps_vanishes(float(eps), dtype):
            return {"eps": float(eps), "dtype": dtype}
    return None


def bounded_step(kind: str, *, lr: float, eps: float, beta1: float = 0.0,
                 beta2: float = 0.0, momentum: float = 0.0, centered: bool = False,
                 decay: float = 0.0) -> bool:
    """Whether a built-in optimizer named ``kind`` (:data:`BOUNDED_STEP_UPDATES`) with these
    settings moves each weight by a bounded multiple of ``lr`` whatever the finite gradient.

    Adam-style ratios of averages are bounded when ``beta1**2 < beta2`` (Adamax:
    ``beta1 < beta2``), RMSprop's when it is not centred (``beta2``: its ``alpha``/``rho``
    below 1) and its momentum below 1, Adagrad's always; ``eps`` at least float32's smallest
    normal number for all but Lion (a sign). ``decay``: a decoupled weight decay,
    ``w * (1 - lr * decay)``, which cannot grow a weight while ``lr * decay`` is in [0, 2].
    """
    numbers = (lr, eps, beta1, beta2, momentum, decay)
    if kind not in BOUNDED_STEP_UPDATES or not all(map(math.isfinite, numbers)):
        return False
    if not (0.0 <= lr <= 1e6 and 0.0 <= lr * decay <= 2.0):
        return False
    if kind == "Lion":
        return True
    if eps < FLOAT32_TINY:  # an eps that is 0 in float32 leaves g / sqrt(v) unbounded
        return False
    if kind in ("Adam", "AdamW", "NAdam", "Nadam"):
        return 0.0 <= beta1 < 1.0 and 0.0 < beta2 < 1.0 and beta1 * beta1 < beta2
    if kind == "Adamax":
        return 0.0 <= beta1 < beta2 < 1.0
    if kind == "RMSprop":
        return not centered and 0.0 <= momentum < 1.0 and 0.0 <= beta2 < 1.0
    return True  # Adagrad: |g| / sqrt(sum of g**2) <= 1


# What a logit_overflow message suggests instead of a naive softmax, per framework.
STABLE_LOSSES = {
    "torch": "torch.nn.functional.cross_entropy or log_softmax",
    "lightning": "torch.nn.functional.cross_entropy or log_softmax",
    "keras": "a Keras loss with from_logits=True, such as "
             "SparseCategoricalCrossentropy(from_logits=True), or keras.ops.log_softmax",
    "": "torch.nn.functional.cross_entropy, log_softmax, or a Keras loss with "
        "from_logits=True",
}
# A trained weight this large is no initialisation or slow drift: earlier updates blew it up
# (healthy networks keep weights within a few hundred; float32 overflows at 3.4e38).
HUGE_WEIGHT = 1e8
# Healthy weights grow a few-fold over a run, not 1000-fold: a huge peak that grew this much
# since a reference (a snapshot) was blown up by an update (a one-step learning-rate spike).
BLOW_UP = 1e3


def blew_up(peak: float, before: float) -> bool:
    """Whether a weight's largest ``|w|`` (``peak``) is huge and grew ``BLOW_UP``-fold from
    ``before``, its value at a reference point."""
    return peak >= HUGE_WEIGHT and peak > BLOW_UP * before
GROWTH_RATIO = 4.0


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


@dataclasses.dataclass
class Evidence:
    """What the slow path found when it looked at a bad step more closely.

    Every field is None (or False) when that check found nothing wrong.

    Args:
        input_nonfinite: Which input holds NaN/Inf, e.g. ``"inputs: 3 NaN"``.
        target_invalid: What is wrong with the targets, e.g. ``"label 12 at index 5"``.
        weights_nonfinite: The first parameter or optimizer state found non-finite.
        update_nonfinite: The previous step's update, made from finite gradients,
            left the weights non-finite.
        activation: The first hidden module whose output went non-finite (replay).
        grad_where: The first module whose gradient went non-finite in the backward
            replay, from finite gradients at its output.
        output_past_logits: The configured logits source (``logits_module``) whose output
            was finite when the model's own forward, after it, made the model output
            non-finite (replay).
        where: Where non-finite values first appeared (module, layer or parameter name).
        logits_dtype: dtype of the model output, for the ``exp`` overflow threshold.
        logits_seen: False when the step's output range was not recorded (the model was
            not called inside the guarded step, or a loss-only fallback): its NaN
            ``logits_min``/``logits_max`` then say nothing about the output.
        batch_seen: False when the batch could not be checked (a loss-only fallback).
        framework: The adapter's framework (``"torch"``, ``"lightning"``, ``"keras"``), for
            the function names a message suggests; set by the session.
        details: Extra numbers for the dump.

    Example:
        >>> Evidence(input_nonfinite="inputs: 1 NaN").input_nonfinite
        'inputs: 1 NaN'
    """

    input_nonfinite: str | None = None
    target_invalid: str | None = None
    weights_nonfinite: str | None = None
    update_nonfinite: bool = False
    activation: str | None = None
    grad_where: str | None = None
    output_past_logits: str | None = None
    where: str | None = None
    logits_dtype: str = "float32"
    logits_seen: bool = True
    batch_seen: bool = True
    framework: str = ""
    details: dict[str, object] = dataclasses.field(default_factory=dict)


def is_bad(record: StepRecord) -> bool:
    """A step is bad when its loss or its gradient norm is not finite."""
    return not (finite(record.loss) and finite(record.grad_norm))


def growth(history: Sequence[StepRecord]) -> tuple[float, float, int] | None:
    """How the gradient norm rose over the recent good steps, if it did.

    Returns ``(before, last, n_steps)`` when the last finite gradient norm is at least
    ``GROWTH_RATIO`` times the median of the ones before it in the window, else None.
    """
    norms = [r.grad_norm for r in history if r.action is None and finite(r.grad_norm)]
    norms = norms[-GROWTH_WINDOW:]
    if len(norms) < 2:
        return None
    before = statistics.median(norms[:-1])
    last = norms[-1]
    if before > 0 and last >= GROWTH_RATIO * before:
        return before, last, len(norms)
    return None


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def note_weights_peak(evidence: Evidence, peaks: Iterable[tuple[str, float]]) -> None:
    """Record the largest finite weight magnitude when it is huge (``HUGE_WEIGHT``):
    ``peaks`` is each trained parameter's name and max ``|w|``, from the adapter's slow
    path. A non-finite output from finite inputs and such weights is the learning rate's
    doing, not an unstable operation's, and the message says so."""
    best = max(((n, v) for n, v in peaks if math.isfinite(v)), key=lambda nv: nv[1],
               default=None)
    if best is not None and best[1] >= HUGE_WEIGHT:
        evidence.details["weights_peak"] = {"name": best[0], "value": float(best[1])}


HALF_MAX = 65504.0  # float16's largest finite value


# Inputs this large overflow float32 in a square (past ~1.8e19) after a layer or two: not
# merely unscaled data (a Unix time of 1.7e9 squares to 3e18, still finite).
HUGE_INPUT = 1e15


def note_inputs_peak(evidence: Evidence, peaks: Iterable[float]) -> None:
    """Record the largest finite magnitude of the batch's floating inputs when it is
    huge (``HUGE_INPUT``): the loss and gradient messages then name it."""
    best = max((p for p in peaks if math.isfinite(p)), default=None)
    if best is not None and best >= HUGE_INPUT:
        evidence.details["inputs_peak"] = float(best)


def note_activation(evidence: Evidence, out_dtypes: Iterable[str],
                    in_peaks: Iterable[float], masked: bool = False,
                    attention: bool = False, out_inf: bool = True) -> None:
    """Record what the inputs and outputs of the hidden layer the replay named say about
    how it overflowed: float16 outputs (``out_dtypes``) from inputs reaching ``in_peaks``
    overflowed float16's range (a plain Linear under autocast); ``masked``: its inputs held
    the ``-inf`` of an allowed mask (``allow_neg_inf``), so a row masked everywhere (a
    softmax of only ``-inf``: 0/0) made the NaN. The message names these instead of an
    unstable operation; so does ``attention`` (the layer is an attention layer, whose
    boolean mask can mask a whole row inside it). ``out_inf``: the outputs hold an Inf (an
    overflow makes one; a log or sqrt of a negative only NaN, which is no range problem)."""
    if masked:
        evidence.details["activation_input_masked"] = True
    if attention:
        evidence.details["activation_attention"] = True
    peak = max((p for p in in_peaks if math.isfinite(p)), default=None)
    if "float16" in set(out_dtypes) and (out_inf or (peak is not None and peak > HALF_MAX)):
        evidence.details["activation_dtype"] = "float16"
        if peak is not None:
            evidence.details["activation_input_peak"] = float(peak)


def _activation_hint(evidence: Evidence) -> str:
    """How a hidden layer's message goes on after "turned finite inputs into non-finite":
    what the replay's notes (``note_activation``) say about its outputs and inputs."""
    if evidence.details.get("activation_dtype") != "float16":
        if evidence.details.get("activation_attention"):
            return ("outputs. It is an attention layer: a key_padding_mask or attn_mask that "
                    "masks every key of some row (a fully padded sequence) makes its softmax "
                    "0/0; keep at least one key unmasked in each row. Otherwise look for a "
                    "score that overflows: scale or normalise its inputs.")
        return ("outputs. Look for an exp, log, pow or division there that overflows; clamp "
                "its input, add normalisation before it, or lower the learning rate.")
    peak = evidence.details.get("activation_input_peak")
    return (
        "outputs in float16 (autocast, a mixed_float16 policy or .half()), whose largest "
        f"finite value is {_fmt(HALF_MAX)}" + (f", from inputs reaching {_fmt(peak)}"
                                                if isinstance(peak, float) else "")
        + ". Scale the inputs down (normalise them), run this layer in float32 (outside "
        "autocast, or a float32 dtype policy for the Keras layer), or use bfloat16, whose "
        "range is float32's."
    )


def inf_as_before(now: np.ndarray, was: np.ndarray | None) -> bool:
    """Whether a buffer's only non-finite entries (``now``) are Infs its snapshot copy
    (``was``) holds at the same places: intended (a ``-inf`` mask, a running max that
    starts at ``-inf``), not left by a bad step."""
    return (was is not None and now.shape == was.shape and not np.isnan(now).any()
            and not (np.isinf(now) & np.isfinite(was)).any())


def _amp_scale(evidence: Evidence) -> str:
    scale = evidence.details.get("amp_scale")
    if not isinstance(scale, float):
        return ""
    scaler = "LossScaleOptimizer" if evidence.framework == "keras" else "GradScaler"
    return (f" The {scaler} has lowered its scale to {_fmt(scale)} and the gradients are "
            "still non-finite: they are so without scaling, not a float16 overflow the "
            "scaler can fix.")


def _unreproduced(evidence: Evidence) -> str:
    unavailable = evidence.details.get("replay_unavailable")
    if isinstance(unavailable, str):
        return (f" Which layer started it is unknown ({unavailable}): a hidden layer may have "
                "made it; run without jit_compile (or with steps_per_execution=1) to have "
                "the layer named.")
    if not evidence.details.get("replay_unreproduced"):
        return ""
    why = ("a layer that computes differently in training (the replay runs with "
           "training=False: dropout, BatchNormalization's batch statistics)"
           if evidence.framework == "keras" else "a non-deterministic operation")
    return (" Replaying the step gave a finite output, so which layer started it is unknown: "
            f"{why}, or state that the forward itself changes?")


def _huge_weights(evidence: Evidence) -> str | None:
    peak = evidence.details.get("weights_peak")
    if not isinstance(peak, dict):
        return None
    held = evidence.details.get("snapshot_peak")
    undo = ("a rollback to a snapshot from before the growth undoes it"
            if not isinstance(held, float) else
            f"the last snapshot holds such weights too (|w| up to {_fmt(held)}), so a rollback "
            "cannot undo it: restart from a checkpoint taken before the growth")
    return (f"its weights are finite but huge (|w| up to {_fmt(float(peak['value']))}, in "
            f"'{peak['name']}'): earlier updates blew them up, most likely with a learning "
            f"rate too high for them. Lower it or set clip_grad_norm; {undo}")


def describe_ids(name: str, count: int, first: float, at: Sequence[int],
                 shape: Sequence[int], what: str) -> str:
    """How every adapter names a batch's bad class ids: how many, and the first by its batch
    row (and its position in that row for sequence or image labels, ``(B, T)``,
    ``(B, H, W)``; a trailing axis of 1 is not a position).

    Example:
        >>> describe_ids("targets", 3, -1, (8, 7), (32, 10), "outside [0, 5)")
        'targets: 3 class id(s) outside [0, 5), the first is -1 (batch row 8, position 7)'
    """
    where = f"batch row {int(at[0])}"
    inner = [int(i) for i, size in zip(at[1:], shape[1:], strict=True) if size != 1]
    if len(inner) == 1:
        where += f", position {inner[0]}"
    elif inner:
        where += f", position {tuple(inner)}"
    shown = str(int(first)) if float(first).is_integer() else f"{first:g}"
    return f"{name}: {count} class id(s) {what}, the first is {shown} ({where})"


def classify(
    record: StepRecord, evidence: Evidence, history: Sequence[StepRecord]
) -> tuple[str, str | None, str]:
    """Name the earliest point in the data flow that went wrong.

    Args:
        record: The bad step's stats.
        evidence: What the slow path found.
        history: The steps before it, oldest first.

    Returns:
        ``(cause, where, message)``.
    """
    s = record.step
    where = evidence.where
    limit = EXP_LIMITS.get(evidence.logits_dtype, EXP_LIMITS["float32"])
    logits_finite = not evidence.logits_seen or (
        finite(record.logits_min) and finite(record.logits_max))
    peak = (max(abs(record.logits_min), abs(record.logits_max))
            if logits_finite and evidence.logits_seen else 0.0)
    if not evidence.batch_seen:
        finite_so_far = ("the weights are finite (the batch and the output were not recorded: "
                         "check the batch for NaN/Inf first)")
    elif not evidence.logits_seen:
        finite_so_far = "inputs and weights are finite (the output's range was not recorded)"
    else:
        finite_so_far = ("inputs, weights and outputs are finite and moderate (output in "
                         f"[{_fmt(record.logits_min)}, {_fmt(record.logits_max)}])")
    big_inputs = evidence.details.get("inputs_peak")
    huge_inputs = ""
    # An overflow makes +inf or a NaN: a loss of -inf is a log(0), whatever the inputs.
    if (isinstance(big_inputs, float) and big_inputs >= HUGE_INPUT and evidence.batch_seen
            and record.loss != -math.inf):
        # Not "moderate": a penalty on the activations, a squared error or a variance of
        # values this large overflows float32 (a black-box tester's inputs of 1e20).
        finite_so_far = finite_so_far.replace(
            "finite and moderate (", f"finite, the inputs reaching {_fmt(big_inputs)} (")
        if "inputs reaching" not in finite_so_far:
            finite_so_far += f", the inputs reaching {_fmt(big_inputs)}"
        huge_inputs = (f"the inputs reach {_fmt(big_inputs)}: a loss term or its gradient "
                       "of values that large overflows (a squared error, an L2 penalty on "
                       "activations, a variance); scale or normalise the inputs.")
    grew = growth(history)
    trend = ""
    # Weights that do not move (a learning rate of 0) cannot make the norm grow: the
    # batches did.
    frozen = grew is not None and (all(r.lr == 0.0 for r in history[-grew[2]:])
                                   and record.lr == 0.0)
    if grew is not None:
        trend = (
            f" The gradient norm rose from a median of {_fmt(grew[0])} to {_fmt(grew[1])} over "
            f"the last {grew[2]} steps before it"
            + (" (with a learning rate of 0: from the batches, not the updates)." if frozen
               else ": the learning rate is likely too high.")
        )

    if evidence.input_nonfinite and evidence.input_nonfinite.startswith("sample_weight"):
        return "input_nonfinite", _name(evidence.input_nonfinite), (
            f"Step {s}: the batch's sample weights hold non-finite values "
            f"({evidence.input_nonfinite}). Check the sample_weight given to fit, or its "
            "class_weight, which Keras turns into these weights (a weight computed as "
            "1 / count is inf for a class with no samples)."
        )
    if evidence.input_nonfinite:
        return "input_nonfinite", _name(evidence.input_nonfinite), (
            f"Step {s}: the batch's inputs hold non-finite values ({evidence.input_nonfinite}). "
            "Fix the data: check the loader for missing values and any normalisation that "
            "divides by a zero standard deviation, or filter such samples out."
        )
    if evidence.target_invalid:
        return "target_invalid", _name(evidence.target_invalid), (
            f"Step {s}: the batch's targets are invalid ({evidence.target_invalid}). "
            "Check the labels: class ids must lie in [0, n_classes) and targets must be finite."
        )
    state = evidence.details.get("optimizer_state_nonfinite")
    if evidence.update_nonfinite and isinstance(state, str):
        return "weights_nonfinite", _name(state), (
            f"Step {s}: the optimizer's state was non-finite ({state}) and the update, made "
            f"from finite gradients (norm {_fmt(record.grad_norm)}), carried it into the "
            "weights. Finite gradients keep a float32 state finite, so it was non-finite "
            "before the step: something outside the training step wrote it (a corrupt "
            "optimizer checkpoint?). Only a finite snapshot can restore it."
        )
    before = ("NaN" if evidence.details.get("nan_before_update")
              else "Inf" if evidence.details.get("inf_before_update") else None)
    if evidence.update_nonfinite and before is not None:
        why = ("whose update of finite numbers can overflow to Inf but never makes a NaN"
               if before == "NaN" else "whose step is bounded by its learning rate (the "
               "gradient over its running scale): it cannot take a finite weight to Inf")
        made = "" if before == "NaN" else " (or a corrupt optimizer state made it)"
        hides = "a ReLU, a mask" if before == "NaN" else "a saturated tanh or sigmoid, a mask"
        return "weights_nonfinite", _name(evidence.weights_nonfinite), (
            f"Step {s}: a weight holds {before} ({evidence.weights_nonfinite}) after an update "
            f"made from finite gradients (norm {_fmt(record.grad_norm)}) by an optimizer {why}: "
            f"the {before} was there before the step{made}, and a later layer kept it from the "
            f"loss ({hides}). Something outside the training step wrote it (a corrupt "
            "checkpoint, a manual edit); only a finite snapshot can restore it."
        )
    vanishes = evidence.details.get("eps_vanishes")
    if evidence.update_nonfinite and isinstance(vanishes, dict):
        where = _name(evidence.weights_nonfinite)
        return "update_nonfinite", where, (
            f"Step {s}: the gradients were finite (norm {_fmt(record.grad_norm)}) but the "
            f"optimizer update made the weights non-finite{_at(where)}: the optimizer's "
            f"eps={vanishes['eps']:g} is 0 in {vanishes['dtype']}, the weights' dtype, so its "
            "update divides 0 by 0 wherever a gradient's square underflows to 0. A lower "
            "learning rate cannot help: train with float32 weights (16-bit compute under "
            "autocast / a mixed precision policy) or set an eps the dtype holds (1e-4 is "
            "usual for float16)."
        )
    if evidence.update_nonfinite and evidence.details.get("grads_changed_after_measure"):
        where = _name(evidence.weights_nonfinite)
        return "update_nonfinite", where, (
            f"Step {s}: the gradients were finite when measured (norm {_fmt(record.grad_norm)}) "
            f"but the optimizer update made the weights non-finite{_at(where)}. Code that runs "
            "after the measurement can change the gradients (your own clipping or normalisation: "
            "a loop's code between guard.backward and optimizer.step(), a LightningModule's "
            "on_before_optimizer_step or configure_gradient_clipping): check it for a "
            "division by a zero norm first; otherwise the update is too large: lower the "
            f"learning rate (it was {_fmt(_lr_of(record, evidence))}) or set clip_grad_norm."
        )
    if evidence.update_nonfinite:
        where = _name(evidence.weights_nonfinite)
        return "update_nonfinite", where, (
            f"Step {s}: the gradients were finite (norm {_fmt(record.grad_norm)}) but the "
            f"optimizer update made the weights non-finite{_at(where)}: the update is too large. "
            f"Lower the learning rate (it was {_fmt(_lr_of(record, evidence))}) or set "
            "clip_grad_norm."
        )
    if evidence.weights_nonfinite and not evidence.batch_seen:
        # A loss-only fallback looks after the step's update: it cannot tell which wrote them.
        return "weights_nonfinite", _name(evidence.weights_nonfinite), (
            f"Step {s}: the weights or optimizer state are non-finite after the step "
            f"({evidence.weights_nonfinite}). The loss-only check sees a step after its "
            "update, so this step's batch or update may have written them (or something "
            "before it); the batch was not recorded: check it for NaN/Inf. Only a finite "
            "snapshot can restore the weights."
        )
    if evidence.weights_nonfinite:
        return "weights_nonfinite", _name(evidence.weights_nonfinite), (
            f"Step {s}: the weights or optimizer state were already non-finite before the step "
            f"({evidence.weights_nonfinite}). Something outside the training step wrote them "
            "(a checkpoint load, a manual edit) or an earlier update slipped through: "
            "skipping cannot help, only a finite snapshot can."
        )
    huge = _huge_weights(evidence)
    if evidence.activation:
        kind = ("operation (a raw op between layers)" if evidence.details.get("replay_op")
                else "layer")
        if evidence.details.get("activation_input_masked"):
            return "activation_nonfinite", evidence.activation, (
                f"Step {s}: {kind} '{evidence.activation}' turned its inputs, finite but for "
                "the -inf of an allowed mask (allow_neg_inf), into NaN: a row masked at every "
                "position (a fully padded sequence, a query with no key left) makes a softmax "
                "of only -inf, 0/0. Keep at least one position unmasked in each row (mask the "
                "padded queries' outputs afterwards instead), or mask with a large negative "
                "number rather than -inf." + trend
            )
        return "activation_nonfinite", evidence.activation, (
            f"Step {s}: {kind} '{evidence.activation}' turned finite inputs into non-finite "
            + (f"outputs, and {huge}." if huge else _activation_hint(evidence)) + trend
        )
    if evidence.output_past_logits:
        return "logits_nonfinite", where, (
            f"Step {s}: the model output is non-finite while its logits source "
            f"'{evidence.output_past_logits}' (logits_module) was finite (in "
            f"[{_fmt(record.logits_min)}, {_fmt(record.logits_max)}]): an operation in the "
            "model's forward after it made them non-finite (a division by a zero temperature "
            "or scale, an exp?). Guard that operation (clamp its divisor, add an epsilon)."
            + trend
        )
    other = evidence.details.get("nonfinite_output")
    if logits_finite and isinstance(other, str):
        # A second output (a span model's end logits) went non-finite in the model's own
        # forward while the first, the logits the guard records, stayed finite.
        return "logits_nonfinite", where, (
            f"Step {s}: part '{other}' of the model output is non-finite while its logits (in "
            f"[{_fmt(record.logits_min)}, {_fmt(record.logits_max)}]), inputs and weights are "
            "finite, and in the replay no layer turned finite inputs into non-finite "
            "outputs: an operation in the model's forward, outside its layers, made it (a "
            "division by a zero temperature or scale, an exp or log, a raw op after a "
            "head). Guard that operation (clamp its divisor, add an epsilon)." + trend
        )
    if not logits_finite and evidence.details.get("made_in_model_code") and not huge:
        return "logits_nonfinite", where, (
            f"Step {s}: the model output is non-finite (min {_fmt(record.logits_min)}, max "
            f"{_fmt(record.logits_max)}) while its inputs and weights are finite, and in the "
            "replay no layer turned finite inputs into non-finite outputs: an operation in the "
            "model's own code, outside its layers, made it (a division by a zero temperature "
            "or scale, an exp or log in forward/call, or a raw op between layers). Guard that "
            "operation (clamp its divisor, add an epsilon; log_softmax instead of an exp over a "
            "sum)." + trend
        )
    if not logits_finite:
        return "logits_nonfinite", where, (
            f"Step {s}: the model output is non-finite (min {_fmt(record.logits_min)}, max "
            f"{_fmt(record.logits_max)}) while its inputs "
            + (f"are finite; {huge}." if huge else
               "and weights are finite. An operation in the model overflowed (a naive softmax "
               "or exp in the model?); use a numerically stable form such as log_softmax, add "
               "normalisation, or lower the learning rate.") + _unreproduced(evidence) + trend
        )
    if peak > limit and not finite(record.loss) and (
            record.logits_max - record.logits_min > math.exp(limit)):
        # Past the dtype's range from min to max: a fused log-softmax overflows as well
        # (it subtracts the max), so the softmax is not what to fix.
        return "logit_overflow", where, (
            f"Step {s}: the model output reaches {_fmt(peak)} (from {_fmt(record.logits_min)} "
            f"to {_fmt(record.logits_max)}), so large that even a fused, stable "
            f"cross-entropy overflows in {evidence.logits_dtype}, and the loss is "
            f"{record.loss}: the model is diverging. "
            + (f"And {huge}." if huge else
               "Lower the learning rate or set clip_grad_norm; check the inputs' scale.")
            + trend
        )
    if peak > limit and not finite(record.loss) and peak > math.exp(limit / 2):
        # Its square overflows: an MSE on it is inf too, and no softmax is to blame.
        return "logit_overflow", where, (
            f"Step {s}: the model output reaches {_fmt(peak)}, so large that its square "
            f"overflows in {evidence.logits_dtype} (as in an MSE) as well as exp, and the loss "
            f"is {record.loss}: the model is diverging. "
            + (f"And {huge}." if huge else
               "Lower the learning rate or set clip_grad_norm; check the inputs' and targets' "
               "scale.") + trend
        )
    if peak > limit and not finite(record.loss):
        return "logit_overflow", where, (
            f"Step {s}: the model output reaches {_fmt(peak)}, beyond {limit:.1f} where exp "
            f"overflows in {evidence.logits_dtype}, and the loss is {record.loss}: an unstable "
            "softmax / cross-entropy. Compute the loss from the logits with a fused, stable "
            f"function ({STABLE_LOSSES.get(evidence.framework, STABLE_LOSSES[''])}) instead of "
            "exp(x)/sum(exp(x)). If no exp reads this output (a regression), the loss itself "
            "went non-finite: look for a division by ~0 or a log(0) in it." + trend
        )
    added = evidence.details.get("added_loss")
    if not finite(record.loss) and isinstance(added, dict):
        return "loss_nonfinite", added["layer"], (
            f"Step {s}: {finite_so_far} but the loss is {record.loss}: the term layer "
            f"{added['layer']!r} adds to it (add_loss: a KL, a penalty, an auxiliary loss) is "
            f"{added['value']}. "
            + (f"That term overflows: {huge_inputs}" if huge_inputs else
               "That term divides by ~0 or takes log(0) (of a variance, a mean, a "
               "probability): add an epsilon to its denominators, clamp before its log.")
            + trend
        )
    targets_peak = evidence.details.get("targets_peak")
    # A loss is computed in float32 at least (autocast too); a squared error overflows to
    # +inf (or a NaN from inf - inf), never to -inf.
    loss_limit = max(limit, EXP_LIMITS["float32"])
    if (not finite(record.loss) and record.loss != -math.inf
            and isinstance(targets_peak, float) and targets_peak > math.exp(loss_limit / 2)):
        return "loss_nonfinite", None, (
            f"Step {s}: {finite_so_far} but the targets reach {_fmt(targets_peak)}, and the "
            f"loss is {record.loss}: a loss of targets this large overflows (a squared error "
            "does past the square root of the largest float). Such a target is a sentinel "
            "for a missing value, or the targets are unscaled: mask or drop those samples, "
            "or scale the targets." + trend
        )
    if not finite(record.loss):
        return "loss_nonfinite", None, (
            f"Step {s}: {finite_so_far} but the loss is {record.loss}: "
            + (huge_inputs if huge_inputs else
               "the loss function divides by ~0 or takes log(0). Add an epsilon to "
               "denominators, clamp before log, or use a built-in loss.") + trend
        )
    if grew is not None:
        # Every entry finite, only their float32 norm past its range: not "non-finite
        # gradients" (a first-time user read that and looked for NaN in them).
        became = ("the gradients' L2 norm overflowed (float32 past about 1.8e19; every "
                  "gradient entry is still finite)" if evidence.details.get("grad_entries_finite")
                  else "the gradients became non-finite")
        return "grad_explosion", evidence.grad_where or evidence.activation, (
            f"Step {s}: the loss is finite ({_fmt(record.loss)}) but {became} after the "
            f"gradient norm grew from a median of {_fmt(grew[0])} to "
            f"{_fmt(grew[1])} over the last {grew[2]} steps: exploding gradients. "
            + ("With a learning rate of 0 the batches made the rise, not the updates: check "
               "the inputs' scale, or add normalisation." if frozen else
               "Set clip_grad_norm (e.g. 1.0), lower the learning rate, or add normalisation.")
            + _amp_scale(evidence)
        )
    if not finite(record.grad_norm) and evidence.details.get("grad_entries_finite") and huge:
        return "grad_nonfinite", evidence.grad_where or evidence.activation, (
            f"Step {s}: the loss is finite ({_fmt(record.loss)}) and every gradient entry is "
            "finite, but they are so large that their L2 norm overflows (float32 past about "
            f"1.8e19){_at(evidence.grad_where)}, and {huge}."
        )
    if not finite(record.grad_norm) and evidence.details.get("grad_entries_finite"):
        reached = (f" (the model output reached {_fmt(peak)})"
                   if evidence.logits_seen and logits_finite else "")
        return "grad_nonfinite", evidence.grad_where or evidence.activation, (
            f"Step {s}: the loss is finite ({_fmt(record.loss)}) and every gradient entry is "
            "finite, but they are so large that their L2 norm overflows (float32 past about "
            f"1.8e19){_at(evidence.grad_where)}. Something in the forward is far too large "
            f"for this model: the inputs, a layer's output{reached}, or, after some training, "
            "the learning rate. Scale or normalise the inputs, bound the layer (an exp, a "
            "pow), or lower the learning rate."
        )
    if not finite(record.grad_norm):
        near_exp = (f" The model output reached {_fmt(peak)}, near {limit:.1f} where exp "
                    "overflows: a naive softmax (exp(x)/sum(exp(x))) overflows in its "
                    "backward first; compute the loss from the logits with a fused, stable "
                    "function." if 0.9 * limit < peak <= limit else "")
        return "grad_nonfinite", evidence.grad_where or evidence.activation, (
            f"Step {s}: the loss is finite ({_fmt(record.loss)}) but the gradients are "
            f"non-finite{_at(evidence.grad_where)}, with no growth before: an operation's "
            "backward is unstable (sqrt, "
            "pow or log at 0, a division by ~0 in a custom layer). Make that operation safe "
            "near 0, for example by adding an epsilon." + near_exp
            + (" " + huge_inputs[0].upper() + huge_inputs[1:] if huge_inputs else "")
            + _amp_scale(evidence)
        )
    return "update_nonfinite", None, (
        f"Step {s}: the gradients were finite (norm {_fmt(record.grad_norm)}) but the optimizer "
        f"update would make the weights non-finite: the update is too large. Lower the "
        f"learning rate (it was {_fmt(_lr_of(record, evidence))}) or set clip_grad_norm."
    )


def last_nonfinite(values: Sequence[float] | None) -> int | None:
    """Index of the last non-finite value, e.g. of per-parameter gradient norms.

    Parameters are listed in forward order, so the last one whose gradient norm is
    non-finite is the first the backward pass reached: where the gradients overflowed
    (an L2 norm also overflows when its gradient's entries are finite but beyond
    ~1.8e19 in float32).
    """
    for i in range(len(values or ()) - 1, -1, -1):
        if not finite((values or ())[i]):
            return i
    return None


def _lr_of(record: StepRecord, evidence: Evidence) -> float:
    """The learning rate of the parameter that overflowed, when the adapter knows it."""
    lr = evidence.details.get("lr_of_where")
    return float(lr) if isinstance(lr, (int, float)) else record.lr


def _name(description: str | None) -> str | None:
    """The tensor or module name a description starts with (``"fc.weight: 1 NaN"``)."""
    return description.split(":", 1)[0] if description else None


def _at(where: str | None) -> str:
    return f" (first in '{where}')" if where else ""


LAYER_WINDOW = 64


def layer_growth(
    history: Sequence[StepRecord], names: Sequence[str] | None = None
) -> dict[str, object] | None:
    """Which parameter's gradient norm grew first over the recent good steps.

    Each parameter's baseline is the median of its norm over the first quarter of the last
    ``LAYER_WINDOW`` good steps; a parameter "grew" at the first later step where its norm
    reached ``GROWTH_RATIO`` times that baseline. The earliest grower wins (ties: the larger
    ratio), because the gradient that blows up first is where an explosion starts.

    Args:
        history: Steps oldest first; their ``layer_grad_norms`` are read.
        names: Parameter names in the order of ``layer_grad_norms``.

    Returns:
        ``{"first": name, "step": ..., "from": ..., "to": ..., "ratio": ..., "top": [...]}``
        or None when fewer than 4 good steps have per-layer norms or nothing grew.
    """
    rows = [
        r for r in history
        if r.action is None and r.layer_grad_norms and all(finite(x) for x in r.layer_grad_norms)
    ][-LAYER_WINDOW:]
    if len(rows) < 4:
        return None
    width = min(len(r.layer_grad_norms or ()) for r in rows)
    base_n = max(1, len(rows) // 4)
    growers: list[tuple[int, float, int, float, float]] = []
    for i in range(width):
        series = [(r.step, (r.layer_grad_norms or ())[i]) for r in rows]
        base = statistics.median(v for _, v in series[:base_n])
        if base <= 0:
            continue
        last = series[-1][1]
        for step, value in series[base_n:]:
            if value >= GROWTH_RATIO * base:
                growers.append((step, -last / base, i, base, last))
                break
    if not growers:
        return None
    growers.sort()

    def name(i: int) -> str:
        return names[i] if names is not None and i < len(names) else f"param {i}"

    step, _, i, base, last = growers[0]
    return {
        "first": name(i),
        "step": step,
        "from": base,
        "to": last,
        "ratio": last / base,
        "top": [
            {"name": name(j), "step": s, "ratio": -neg} for s, neg, j, _, _ in growers[:5]
        ],
    }


Flags = tuple[bool, bool, bool]
"""(any NaN, any +Inf, any -Inf) over a call's floating inputs or outputs."""


class Blame:
    """Which call a layer-by-layer replay blames: the first whose output is non-finite
    while its inputs are finite. ``-inf`` outputs of the layers ``allow_neg_inf`` names
    (exact names or ``fnmatch`` patterns: attention masks) are intended: they are not
    blamed, and ``-inf`` reaching later layers from them is not either. A NaN or ``+inf``
    out of them still is. Both replays (torch modules, Keras layers) ask it, call by call
    in the order the calls finish.

    Example:
        >>> b = Blame(("mask",))
        >>> b.blames("mask", (False, False, True), (False, False, False))
        False
        >>> b.blames("softmax", (True, False, False), (False, False, True))
        True
    """

    def __init__(self, allow_neg_inf: Sequence[str] = ()) -> None:
        self.allow = tuple(allow_neg_inf)
        self.neg_inf_seen = False

    def allowed(self, name: str) -> bool:
        return any(name == pat or fnmatch.fnmatchcase(name, pat) for pat in self.allow)

    def blames(self, name: str, outs: Flags, ins: Flags | Callable[[], Flags]) -> bool:
        """Whether the call of ``name`` with these output flags is to blame; ``ins`` may be
        a function, called only when an output is non-finite."""
        out_nan, out_pos, out_neg = outs
        if not (out_nan or out_pos or out_neg):
            return False
        allowed = self.allowed(name)
        if out_neg and allowed:
            self.neg_inf_seen = True
        in_nan, in_pos, in_neg = ins() if callable(ins) else ins
        in_bad = in_nan or in_pos or (in_neg and not self.neg_inf_seen)
        out_bad = out_nan or out_pos or (out_neg and not in_neg and not allowed)
        return out_bad and not in_bad
