"""The framework-neutral core: options, the ladder, and cause classification."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import nanguard.session
from nanguard import ACTIONS, CAUSES, GuardConfig, LadderState, StepRecord, decide, detector
from nanguard.detector import Evidence, classify, growth, is_bad, note_weights_peak
from nanguard.session import GuardSession

NAN = math.nan


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("actions", ("skip", "explode")),
        ("actions", "skip"),
        ("actions", ("skip", "skip")),
        ("clip_grad_norm", 0),
        ("clip_grad_norm", -1.0),
        ("clip_grad_norm", math.inf),
        ("snapshot_every", 0),
        ("max_skips", -1),
        ("max_rollbacks", -2),
        ("lr_factor", 0.0),
        ("lr_factor", 1.0),
        ("lr_factor", 1.5),
        ("max_dumps", -1),
        ("history_size", 0),
        ("log_every", 0),
        ("dump_state", "sometimes"),
        ("max_skips", 1.5),
        ("max_skips", True),
    ],
)
def test_invalid_option_names_option_and_value(name, value):
    with pytest.raises(ValueError, match=name) as info:
        GuardConfig(**{name: value})
    assert repr(value) in str(info.value)


def test_numpy_scalars_are_accepted_as_numbers():
    cfg = GuardConfig(max_skips=np.int64(2), snapshot_every=np.int32(10),
                      lr_factor=np.float32(0.25), clip_grad_norm=np.float16(1.0))
    assert (cfg.max_skips, cfg.snapshot_every, cfg.lr_factor, cfg.clip_grad_norm) == (
        2, 10, 0.25, 1.0)
    assert type(cfg.max_skips) is int and type(cfg.lr_factor) is float
    with pytest.raises(ValueError, match="max_skips"):
        GuardConfig(max_skips=np.bool_(True))


@pytest.mark.parametrize("value", [None, 5, [1]])
def test_allow_neg_inf_must_be_module_names(value):
    with pytest.raises(ValueError, match="allow_neg_inf"):
        GuardConfig(allow_neg_inf=value)


def test_a_dump_that_fails_for_any_reason_warns_and_training_goes_on(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("Object arrays cannot be saved when allow_pickle=False")

    monkeypatch.setattr(nanguard.session, "write_dump", broken)
    s = GuardSession(GuardConfig(dump_dir=str(tmp_path)), framework="test")
    with pytest.warns(RuntimeWarning, match="ValueError: Object arrays"):
        v = s.conclude(rec(0, loss=NAN), probe=None)
    assert v.action == "skip" and v.dump_path is None


def test_a_state_saved_by_another_rank_restores_all_but_its_events(tmp_path):
    # Lightning writes rank 0's checkpoint and every rank loads it: rank 1 got rank 0's
    # events ("on rank 1 (this rank, 0, ..."). The history stays on every rank: its actions
    # and norms agree across ranks and decide the snapshot schedule, which must agree.
    cfg = GuardConfig(dump_dir=str(tmp_path))
    zero = GuardSession(cfg, framework="test", rank=0, world_size=2)
    for i in range(3):
        zero.conclude(rec(i, loss=NAN if i == 1 else 1.0 + i), probe=None)
    saved = zero.state_dict()
    one = GuardSession(cfg, framework="test", rank=1, world_size=2)
    one.load_state_dict(saved)
    assert one.step == zero.step == 3
    assert one.ladder == zero.ladder and one.ladder.total_bad == 1
    assert [r.step for r in one.history] == [0, 1, 2] and not one.events
    assert one.snapshot_due(0) == zero.snapshot_due(0)
    again = GuardSession(cfg, framework="test", rank=0, world_size=2)
    again.load_state_dict(saved)  # its own rank's: everything
    assert [r.step for r in again.history] == [0, 1, 2] and len(again.events) == 1


def test_actions_keep_the_fixed_order():
    assert GuardConfig(actions=["abort", "skip"]).actions == ("skip", "abort")
    assert GuardConfig().actions == ACTIONS


def _climb(config, bad_steps, corrupt_at=()):
    state = LadderState()
    out = []
    for step, bad in enumerate(bad_steps):
        decision, state = decide(state, config, step=step, bad=bad, corrupt=step in corrupt_at)
        out.append(decision)
    return out, state


def test_ladder_skips_then_rolls_back_with_lower_lr_then_aborts():
    cfg = GuardConfig(max_skips=2, max_rollbacks=2)
    decisions, _ = _climb(cfg, [True] * 10)
    # once the rollbacks are spent, abort takes the rollback's rung: skips still come first
    assert [d.action for d in decisions] == [
        "skip", "skip", "rollback", "skip", "skip", "rollback", "skip", "skip", "abort", "abort",
    ]
    assert [d.lower_lr for d in decisions][:3] == [False, False, True]


def test_good_step_resets_consecutive_skips_but_not_rollbacks():
    cfg = GuardConfig(max_skips=1, max_rollbacks=1)
    decisions, state = _climb(cfg, [True, False, True, True, False, True, True])
    assert [d.action for d in decisions] == [
        "skip", None, "skip", "rollback", None, "skip", "abort",
    ]  # max_skips=1: the second bad step in a row climbs past skip
    assert state.rollbacks == 1


def test_corrupt_state_rolls_back_at_once():
    decisions, _ = _climb(GuardConfig(), [True], corrupt_at={0})
    assert decisions[0].action == "rollback"


def test_without_a_snapshot_the_rollback_rung_is_passed_over():
    def first(config, **kw):
        return decide(LadderState(), config, step=0, bad=True, corrupt=True, **kw)[0]

    no_snap = first(GuardConfig(), has_snapshot=False)
    assert no_snap.action == "abort" and "no finite snapshot" in no_snap.reason
    # Non-finite weights and no snapshot: neither a skip nor lower_lr undoes them.
    assert first(GuardConfig(actions=("skip", "rollback")), has_snapshot=False).action == "log"
    assert first(GuardConfig(actions=("lower_lr", "abort")), has_snapshot=False).action == (
        "abort")
    # lower_lr without rollback restores nothing, so on a bad step with finite weights it
    # needs no snapshot
    ok = decide(LadderState(), GuardConfig(actions=("lower_lr",)), step=0, bad=True,
                has_snapshot=False)[0]
    assert ok.action == "lower_lr"


def test_a_step_whose_update_cannot_be_kept_out_is_never_a_skip():
    # A loss-only check (Keras's fallback) sees the step after its update was applied.
    late = GuardConfig()
    first = decide(LadderState(), late, step=0, bad=True, can_skip=False)[0]
    assert first.action == "rollback" and "already applied" in first.reason
    no_abort = GuardConfig(actions=("skip", "rollback"), max_rollbacks=0)
    spent = decide(LadderState(), no_abort, step=0, bad=True, can_skip=False)[0]
    assert spent.action == "log" and not spent.blocks_update


def test_missing_rungs_are_passed_over():
    only_abort = GuardConfig(actions=("abort",))
    assert _climb(only_abort, [True])[0][0].action == "abort"
    no_abort = GuardConfig(actions=("skip", "rollback"), max_skips=0, max_rollbacks=1)
    acts = [d.action for d in _climb(no_abort, [True, True, True])[0]]
    assert acts == ["rollback", "skip", "skip"]
    nothing = GuardConfig(actions=())
    assert _climb(nothing, [True])[0][0].action == "log"
    lower_only = GuardConfig(actions=("skip", "lower_lr"), max_skips=0, max_rollbacks=1)
    first = _climb(lower_only, [True])[0][0]
    assert (first.action, first.lower_lr) == ("lower_lr", True)


def test_a_reason_counts_no_skips_the_ladder_has_no_rung_for():
    # With actions=("rollback", "abort") the abort's reason read "3 skips, 3 rollbacks".
    cfg = GuardConfig(actions=("rollback", "abort"), max_rollbacks=1)
    decisions, _ = _climb(cfg, [True, True])
    assert [d.action for d in decisions] == ["rollback", "abort"]
    assert decisions[1].reason == "skip not in actions, 1 rollbacks: abort"


def test_neither_skip_nor_rollback_allowed_aborts_at_once():
    # The contract: "after max_rollbacks rollbacks, or on a bad step when neither skip nor
    # rollback is allowed: abort", also with lower_lr in actions.
    for actions in (("abort",), ("lower_lr", "abort")):
        d = decide(LadderState(), GuardConfig(actions=actions), step=0, bad=True)[0]
        assert (d.action, d.lower_lr) == ("abort", False), actions
    # Without abort, lower_lr alone still stands in for the missing rollback.
    d = decide(LadderState(), GuardConfig(actions=("lower_lr",)), step=0, bad=True)[0]
    assert (d.action, d.lower_lr) == ("lower_lr", True)


def test_non_finite_weights_without_rollback_are_repaired_by_a_skip_or_logged():
    # Only a snapshot undoes weights that are already non-finite (an update found bad after
    # it was applied): without the rollback rung, a skip puts back the non-finite tensors
    # from the snapshot (the contract's rule 1: a bad update never stays in the weights);
    # without a skip or a snapshot the step is an abort (if allowed) or logged.
    for actions in (("skip",), ("skip", "lower_lr")):
        d = decide(LadderState(), GuardConfig(actions=actions), step=0, bad=True,
                   corrupt=True)[0]
        assert (d.action, d.lower_lr, d.repair) == ("skip", False, True), actions
        assert d.blocks_update and "put back from the last finite snapshot" in d.reason
        spent = decide(LadderState(rollbacks=1), GuardConfig(actions=("skip", "rollback"),
                       max_rollbacks=1), step=0, bad=True, corrupt=True)[0]
        assert (spent.action, spent.repair) == ("skip", True)
    for actions, kw in ((("lower_lr",), {}), (("skip",), {"has_snapshot": False})):
        d = decide(LadderState(), GuardConfig(actions=actions), step=0, bad=True,
                   corrupt=True, **kw)[0]
        assert (d.action, d.lower_lr, d.repair) == ("log", False, False), actions
        assert "no rung left that can undo it" in d.reason
    d = decide(LadderState(), GuardConfig(actions=("skip", "lower_lr", "abort")), step=0,
               bad=True, corrupt=True)[0]
    assert d.action == "abort"


@given(
    bad=st.lists(st.booleans(), max_size=60),
    max_skips=st.integers(0, 4),
    max_rollbacks=st.integers(0, 3),
    actions=st.sets(st.sampled_from(ACTIONS)),
)
def test_ladder_invariants(bad, max_skips, max_rollbacks, actions):
    cfg = GuardConfig(actions=tuple(actions), max_skips=max_skips, max_rollbacks=max_rollbacks)
    decisions, state = _climb(cfg, bad)
    for d, b in zip(decisions, bad, strict=True):
        assert (d.action is None) == (not b)
        if b:
            # a bad step never reaches the weights while any blocking rung exists
            assert d.blocks_update == bool(actions)
            assert d.action in (*actions, "skip") if actions else d.action == "log"
    restores = sum(d.action in ("rollback", "lower_lr") for d in decisions)
    assert restores == state.rollbacks <= max_rollbacks
    if "abort" in actions:
        first_abort = next((i for i, d in enumerate(decisions) if d.action == "abort"), None)
        if first_abort is not None:
            assert (state.rollbacks == max_rollbacks or not ({"rollback", "lower_lr"} & actions)
                    or not ({"skip", "rollback"} & actions))


def rec(step, loss=1.0, lmin=-1.0, lmax=1.0, g=1.0, action=None):
    return StepRecord(step=step, loss=loss, logits_min=lmin, logits_max=lmax, grad_norm=g,
                      lr=0.1, action=action)


@pytest.mark.parametrize(("lr", "said"), [(0.1, "the learning rate is likely too high"),
                                          (0.0, "from the batches, not the updates")])
def test_a_growing_norm_blames_the_learning_rate_only_when_the_weights_moved(lr, said):
    # With SGD(0.0) a loss_nonfinite message said the rise came from a too-high rate.
    history = [dataclasses.replace(rec(i, g=1.0 if i < 6 else 50.0), lr=lr) for i in range(8)]
    bad = dataclasses.replace(rec(8, loss=math.inf), lr=lr)
    cause, _, message = classify(bad, Evidence(), history)
    assert cause == "loss_nonfinite" and said in message
    assert lr > 0 or "too high" not in message


@pytest.mark.parametrize("lr", [0.1, 0.0])
def test_grad_explosion_suggests_a_lower_learning_rate_only_when_the_weights_moved(lr):
    # With a learning rate of 0 grad_explosion still said "lower the learning rate".
    history = [dataclasses.replace(rec(i, g=1.0 if i < 6 else 50.0), lr=lr) for i in range(8)]
    bad = dataclasses.replace(rec(8, g=math.inf), lr=lr)
    cause, _, message = classify(bad, Evidence(), history)
    assert cause == "grad_explosion"
    assert ("lower the learning rate" in message) == (lr > 0), message
    assert lr > 0 or "the batches made the rise" in message


@pytest.mark.parametrize("entries_finite", [False, True])
def test_grad_explosion_says_whether_the_entries_or_only_their_norm_went_non_finite(
        entries_finite):
    # With every entry finite and only their float32 norm overflowing, the message said
    # "the gradients became non-finite" (a first-time user looked for NaN in them).
    history = [rec(i, g=1.0 if i < 6 else 50.0) for i in range(8)]
    evidence = Evidence(details={"grad_entries_finite": True} if entries_finite else {})
    cause, _, message = classify(rec(8, g=math.inf), evidence, history)
    assert cause == "grad_explosion"
    assert ("every gradient entry is still finite" in message) == entries_finite
    assert ("the gradients became non-finite" in message) != entries_finite


@pytest.mark.parametrize(("record", "cause"), [(rec(5, loss=math.inf), "loss_nonfinite"),
                                               (rec(5, g=math.nan), "grad_nonfinite")])
def test_huge_finite_inputs_are_named_not_called_moderate(record, cause):
    # Inputs of 1e20 read "inputs ... finite and moderate ... the loss divides by ~0" (a
    # black-box tester's L2 activity penalty): the inputs' peak is named, and scaling them.
    cause_was, _, plain = classify(record, Evidence(), [])
    assert cause_was == cause and "reach" not in plain
    found, _, message = classify(record, Evidence(details={"inputs_peak": 3e20}), [])
    assert found == cause
    assert "reach 3e+20" in message and "scale or normalise the inputs" in message
    assert "moderate" not in message and "divides by ~0 or takes log(0)" not in message
    # A loss of -inf is a log(0), not an overflow; and unscaled data (a Unix time of 1.7e9)
    # is no overflow either (a reviewer): the usual diagnosis.
    for loss, peak in ((-math.inf, 3e20), (math.inf, 1.7e9)):
        _, _, said = classify(rec(5, loss=loss), Evidence(details={"inputs_peak": peak}), [])
        assert "divides by ~0 or takes log(0)" in said and "reach" not in said


def test_is_bad():
    assert not is_bad(rec(0))
    assert is_bad(rec(0, loss=NAN))
    assert is_bad(rec(0, g=math.inf))


@pytest.mark.parametrize(
    ("record", "evidence", "cause"),
    [
        (rec(5, loss=NAN), Evidence(input_nonfinite="inputs: 1 NaN"), "input_nonfinite"),
        (rec(5, loss=NAN), Evidence(target_invalid="targets: label 12"), "target_invalid"),
        (rec(5, loss=NAN), Evidence(weights_nonfinite="fc.weight: 1 NaN"), "weights_nonfinite"),
        (rec(5, loss=NAN), Evidence(activation="block.2"), "activation_nonfinite"),
        (rec(5, loss=NAN, lmin=NAN, lmax=NAN), Evidence(), "logits_nonfinite"),
        (rec(5, loss=math.inf, lmin=-3.0, lmax=1e4), Evidence(), "logit_overflow"),
        (rec(5, loss=math.inf, lmin=-3.0, lmax=50.0), Evidence(), "loss_nonfinite"),
        (rec(5, loss=math.inf, lmin=-3.0, lmax=20.0), Evidence(logits_dtype="float16"),
         "logit_overflow"),
        (rec(5, g=NAN), Evidence(), "grad_nonfinite"),
        (rec(5, g=2.0), Evidence(update_nonfinite=True), "update_nonfinite"),
    ],
)
def test_classify_earliest_point(record, evidence, cause):
    got, _, message = classify(record, evidence, [rec(i) for i in range(5)])
    assert got == cause
    assert got in CAUSES
    assert "Step 5" in message


def test_logit_overflow_message_also_covers_a_regression():
    # A price regressor's outputs pass exp's range with no softmax anywhere: the numbers
    # cannot tell, so the message names the loss's own faults too.
    _, _, message = classify(rec(5, loss=math.inf, lmin=220.0, lmax=600.0), Evidence(), [])
    assert "exp(x)/sum(exp(x))" in message and "division by ~0" in message


def test_grad_nonfinite_messages_say_what_the_numbers_show():
    # Finite entries whose float32 norm overflows: not an unstable backward op.
    huge = Evidence(details={"grad_entries_finite": True})
    cause, _, message = classify(rec(5, g=math.inf), huge, [])
    assert cause == "grad_nonfinite"
    assert "every gradient entry is finite" in message and "sqrt" not in message
    # Logits near exp's limit: a naive softmax overflows in its backward first.
    _, _, near = classify(rec(5, g=NAN, lmax=86.6), Evidence(), [])
    _, _, far = classify(rec(5, g=NAN, lmax=20.0), Evidence(), [])
    assert "naive softmax" in near and "naive softmax" not in far
    # Past the limit with a finite loss, no naive softmax read it (its forward would be Inf).
    _, _, past = classify(rec(5, g=NAN, lmax=290.0), Evidence(), [])
    assert "naive softmax" not in past
    # A growth is quoted as the median it grew from.
    grown = [rec(i, g=1.0) for i in range(7)] + [rec(7, g=1e6)]
    _, _, msg = classify(rec(8, g=NAN), Evidence(), grown)
    assert "from a median of 1 to 1e+06" in msg


def test_weights_found_non_finite_after_an_unseen_step_do_not_blame_outside_code():
    # A loss-only fallback (Keras, own train_step) checks the weights after the update.
    seen = Evidence(weights_nonfinite="dense/kernel: 64 NaN")
    unseen = Evidence(weights_nonfinite="dense/kernel: 64 NaN", batch_seen=False)
    _, _, before = classify(rec(2, loss=NAN), seen, [])
    cause, where, after = classify(rec(2, loss=NAN), unseen, [])
    assert "outside the training step" in before
    assert (cause, where) == ("weights_nonfinite", "dense/kernel")
    assert "outside the training step" not in after and "check it for NaN/Inf" in after


def test_input_beats_everything_downstream():
    ev = Evidence(input_nonfinite="inputs.x: 2 NaN", target_invalid="targets: bad",
                  weights_nonfinite="w: 1 NaN")
    cause, where, _ = classify(rec(3, loss=NAN, lmin=NAN, lmax=NAN), ev, [])
    assert (cause, where) == ("input_nonfinite", "inputs.x")


def test_an_output_range_never_recorded_is_not_a_non_finite_output():
    # NaN logits_min/max because no output was seen (a loss-only fallback): the loss's own
    # fault, said without claiming the output was finite.
    unseen = Evidence(logits_seen=False)
    cause, _, message = classify(rec(3, loss=NAN, lmin=NAN, lmax=NAN), unseen, [])
    assert cause == "loss_nonfinite" and "range was not recorded" in message
    cause, _, _ = classify(rec(3, loss=NAN, lmin=NAN, lmax=NAN), Evidence(), [])
    assert cause == "logits_nonfinite"
    blind = Evidence(logits_seen=False, batch_seen=False)  # nothing but the loss was read
    _, _, message = classify(rec(3, loss=NAN, lmin=NAN, lmax=NAN), blind, [])
    assert "inputs" not in message and "check the batch for NaN/Inf first" in message


def test_grad_explosion_needs_growth():
    calm = [rec(i, g=1.0) for i in range(6)]
    rising = [rec(i, g=2.0**i) for i in range(6)]
    assert growth(calm) is None
    assert growth(rising) is not None
    assert classify(rec(6, g=math.inf), Evidence(), calm)[0] == "grad_nonfinite"
    cause, _, message = classify(rec(6, g=math.inf), Evidence(), rising)
    assert cause == "grad_explosion"
    assert "clip_grad_norm" in message


def test_session_counts_steps_and_keeps_bounded_history(tmp_path):
    s = GuardSession(GuardConfig(history_size=4, dump_dir=str(tmp_path)), framework="test")
    for i in range(10):
        v = s.conclude(rec(i, loss=NAN if i == 7 else 1.0), probe=None)
        assert (v.action is None) == (i != 7)
    assert [r.step for r in s.recent()] == [6, 7, 8, 9]  # what guard.history shows
    assert s.recent()[1]["action"] == "skip" and s.recent()[1].cause == "loss_nonfinite"
    assert s.step == 10
    for i in range(10, 200):  # the detector's own window is bounded too
        s.conclude(rec(i), probe=None)
    assert len(s.history) == 64 and len(s.recent()) == 4
    assert len(list(tmp_path.iterdir())) == 1


def test_session_respects_max_dumps_but_abort_always_dumps(tmp_path):
    cfg = GuardConfig(max_dumps=1, max_skips=10, max_rollbacks=0, actions=("skip", "abort"),
                      dump_dir=str(tmp_path))
    s = GuardSession(cfg, framework="test")
    paths = [s.conclude(rec(i, loss=NAN), probe=None).dump_path for i in range(11)]
    assert paths[0] is not None and all(p is None for p in paths[1:10])
    assert s.history[-1].action == "abort" and paths[10] is not None


def test_unwritable_dump_dir_warns_and_goes_on(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    s = GuardSession(GuardConfig(dump_dir=str(blocker / "dumps")), framework="test")
    with pytest.warns(RuntimeWarning, match="could not write a dump"):
        v = s.conclude(rec(0, loss=NAN), probe=None)
    assert v.action == "skip" and v.dump_path is None
    assert s.history[-1].cause == "loss_nonfinite"


def test_history_entries_read_both_ways():
    r = rec(3)
    assert r["grad_norm"] == r.grad_norm == 1.0
    assert set(r) >= {"step", "loss", "logits_min", "logits_max", "grad_norm", "lr", "action"}
    with pytest.raises(KeyError):
        r["nope"]


def test_an_output_whose_square_overflows_is_divergence_not_a_softmax():
    # A regression diverging: outputs past sqrt(float32 max) make an MSE inf. No softmax
    # is involved, and the message must not suggest one.
    cause, _, message = classify(rec(15, loss=math.inf, lmin=-5.5e22, lmax=1.8e23),
                                 Evidence(), [])
    assert cause == "logit_overflow"
    assert "its square overflows in float32" in message and "diverging" in message
    assert "softmax" not in message
    # Below that, an exp overflow: the stable function named is the adapter's own.
    for framework, named, other in (("keras", "from_logits=True", "torch."),
                                    ("torch", "torch.nn.functional.cross_entropy", "Keras"),
                                    ("lightning", "torch.nn.functional.cross_entropy",
                                     "Keras")):
        _, _, message = classify(rec(5, loss=math.inf, lmin=-2e4, lmax=2e4),
                                 Evidence(framework=framework), [])
        assert "unstable softmax" in message and named in message and other not in message


def test_huge_finite_weights_turn_the_advice_to_the_learning_rate():
    # A NaN output from finite inputs: an unstable op, unless the weights are huge (an
    # earlier update blew them up), when the message names the weight and the learning rate.
    bad = rec(5, loss=NAN, lmin=NAN, lmax=NAN)
    for peaks, huge in (([("a.weight", 3.0), ("b.weight", 2e9)], True),
                        ([("a.weight", 3.0), ("b.weight", 9e7)], False),
                        ([("a.weight", math.inf)], False), ([], False)):
        evidence = Evidence()
        note_weights_peak(evidence, peaks)
        assert ("weights_peak" in evidence.details) is huge
        cause, _, message = classify(bad, evidence, [])
        assert cause == "logits_nonfinite"
        assert ("finite but huge" in message and "'b.weight'" in message
                and "learning rate" in message) is huge
        assert ("naive softmax" in message) is not huge
        evidence.activation = "hidden"
        cause, where, message = classify(bad, evidence, [])
        assert (cause, where) == ("activation_nonfinite", "hidden")
        assert ("finite but huge" in message) is huge


def test_a_snapshot_of_weights_one_update_blew_up_is_refused_once():
    # A one-step learning-rate spike leaves finite weights of ~1e36 right before a due
    # snapshot: taking it would make every rollback land on them.
    session = GuardSession(GuardConfig(snapshot_every=4), framework="none")
    assert session.admit_snapshot(0.4)  # before the first step
    for step in range(4):
        session.conclude(rec(step), probe=None)
    assert session.snapshot_due(0)
    assert not session.admit_snapshot(2e36)
    assert not session.snapshot_due(0)  # the refusal counts for the schedule
    for step in range(4, 11):
        session.conclude(rec(step), probe=None)
    assert not session.snapshot_due(0)  # after a refusal: GROWTH_WINDOW (8) calm steps
    session.conclude(rec(11), probe=None)
    assert session.snapshot_due(0)
    assert session.admit_snapshot(2e36)  # still that large and training on: taken
    assert session.admit_snapshot(0.5)  # shrinking is never refused
    assert not session.admit_snapshot(1e9) and session.admit_snapshot(1e9)
    assert session.admit_snapshot(1e12, scheduled=False)  # after a load_state_dict
    # A rollback puts the held snapshot's weights back: a pending refusal is void.
    assert not session.admit_snapshot(1e20)
    session.conclude(rec(12, loss=NAN), probe=None)
    session.conclude(rec(13, loss=NAN), probe=None)
    session.conclude(rec(14, loss=NAN), probe=None)
    assert session.conclude(rec(15, loss=NAN), probe=None).action == "rollback"
    assert session.peak_refused_at is None and session.attempt_peak == 1e12


def test_huge_weights_in_the_held_snapshot_say_a_rollback_cannot_undo_them(tmp_path):
    bad = rec(5, loss=NAN, lmin=NAN, lmax=NAN)
    evidence = Evidence()
    note_weights_peak(evidence, [("b.weight", 2e36)])
    _, _, message = classify(bad, evidence, [])
    assert "a rollback to a snapshot from before the growth undoes it" in message
    evidence.details["snapshot_peak"] = 1e36
    _, _, message = classify(bad, evidence, [])
    assert "the last snapshot holds such weights too (|w| up to 1e+36)" in message
    assert "restart from a checkpoint" in message
    # The session adds it when the snapshot it holds is that large.
    session = GuardSession(GuardConfig(dump_dir=str(tmp_path)), framework="none")
    assert session.admit_snapshot(1e36)  # the first: nothing to compare with

    class Probe:
        def evidence(self, record):
            ev = Evidence()
            note_weights_peak(ev, [("b.weight", 2e36)])
            return ev

        def tensors(self):
            return {}

        def state(self):
            return {}

    verdict = session.conclude(rec(0, loss=NAN, lmin=NAN, lmax=NAN), probe=Probe())
    assert "the last snapshot holds such weights too" in verdict.event.message


def test_logits_past_the_dtypes_range_blame_divergence_not_the_softmax():
    # A fused log-softmax subtracts the max: it overflows only when max - min leaves the
    # dtype's range. Then switching to it cannot help; the message says the model diverges.
    cause, _, message = classify(rec(5, loss=math.inf, lmin=-2.8e38, lmax=2.9e38), Evidence(), [])
    assert cause == "logit_overflow"
    assert "even a fused, stable cross-entropy overflows" in message
    assert "instead of exp(x)/sum(exp(x))" not in message
    _, _, message = classify(rec(5, loss=math.inf, lmin=-2e4, lmax=2e4), Evidence(), [])
    assert "instead of exp(x)/sum(exp(x))" in message


@pytest.mark.parametrize(("kind", "settings", "bounded"), [
    ("Adam", {"beta1": 0.9, "beta2": 0.999}, True),
    ("Adam", {"beta1": 0.99, "beta2": 0.9}, False),   # beta1**2 > beta2: unbounded ratio
    ("Adam", {"beta1": 0.9, "beta2": 0.999, "eps": 0.0}, False),
    ("Adam", {"beta1": 0.9, "beta2": 0.999, "eps": 1e-50}, False),  # 0 in float32
    ("AdamW", {"beta1": 0.9, "beta2": 0.999, "decay": 0.01}, True),
    ("AdamW", {"beta1": 0.9, "beta2": 0.999, "decay": 3e3}, False),  # lr * decay > 2
    ("Adamax", {"beta1": 0.9, "beta2": 0.999}, True),
    ("Adamax", {"beta1": 0.999, "beta2": 0.9}, False),
    ("RMSprop", {"beta2": 0.99, "momentum": 0.9}, True),
    ("RMSprop", {"beta2": 0.99, "centered": True}, False),
    ("RMSprop", {"beta2": 1.0}, False),
    ("Adagrad", {}, True),
    ("Lion", {"eps": 0.0, "beta1": 0.9, "beta2": 0.99}, True),
    ("SGD", {}, False),                                # its step is the gradient itself
    ("RAdam", {"beta1": 0.9, "beta2": 0.999}, False),  # first steps: plain momentum
    ("Adam", {"beta1": 0.9, "beta2": 0.999, "lr": math.inf}, False),
])
def test_bounded_step_knows_which_updates_cannot_overflow(kind, settings, bounded):
    settings = {"lr": 1e-3, "eps": 1e-8, **settings}
    assert detector.bounded_step(kind, **settings) is bounded
